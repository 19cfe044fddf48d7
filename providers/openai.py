"""OpenAI Images API (https://platform.openai.com/docs/api-reference/images), a synchronous provider.

The base URL is the origin (``https://api.openai.com``, or a gateway's); the routes carry ``/v1``.
Auth: ``Authorization: Bearer <key>``.

* ``POST /v1/images/generations`` (JSON) renders from the prompt.
* ``POST /v1/images/edits`` (``multipart/form-data``) when the job gives input images: ``image_url``
  (or a ``source`` job's stored output) and ``options.images`` (URLs) are fetched here, bounded, and
  sent as repeated ``image[]`` file parts; ``options.mask`` (a PNG URL) as ``mask``.

The request stays open until the images exist and answers with them: there is no job id, no
status to poll, no idempotency key and no way to look a request up afterwards. So the task id is
the job's id, ``fetch`` has nothing to read, and a timeout, reset or 500/502/504 after the request
was sent is ``OutcomeUnknown``: the image may exist and be billed, and the job fails
``provider_outcome_unknown`` unless it opted into ``retry_unknown_submissions``. The request
timeout is the operator's (``request_timeout_seconds`` / ``request_timeout_by_model``); nothing here
retries a create.

Models (``model`` is always sent: OpenAI's default would be ``dall-e-2``), validated before anything
is sent, each refusal a 422 naming the field:

* ``gpt-image-2``, ``gpt-image-1.5``, ``gpt-image-1``, ``gpt-image-1-mini``: ``n`` 1-10; ``size``
  ``1024x1024``, ``1536x1024``, ``1024x1536``, ``auto`` (gpt-image-2: any ``WxH`` in multiples of
  16, ratio at most 3:1, at most 3840x2160 pixels); ``options``: ``quality`` (low, medium, high,
  auto), ``background`` (transparent needs png or webp), ``output_format``, ``output_compression``
  (0-100, jpeg/webp only), ``moderation`` (auto, low), ``user``, ``size``, and on edits
  ``input_fidelity`` (not gpt-image-1-mini). They answer ``b64_json`` only, with token ``usage``.
* ``dall-e-3`` (removed from OpenAI's API on 2026-05-12; gateways still serve it): ``n`` 1;
  ``size`` ``1024x1024``, ``1792x1024``, ``1024x1792``; ``options``: ``quality`` (standard, hd),
  ``style`` (vivid, natural), ``response_format`` (url, b64_json), ``user``, ``size``. No edits.
  It answers a ``url`` valid for 60 minutes (collected at once) and a ``revised_prompt``.
* Other models gateways serve in this format (FLUX, Seedream...) only when ``[providers.openai]
  extra_models`` lists them (names or fnmatch patterns); their options pass through unchecked.

``aspect_ratio`` / ``resolution`` map to the model's ``size``: a ``WxH`` resolution as it is; on
the fixed-size models an aspect ratio picks the listed size within 5% of it (16:9 -> 1792x1024 on
dall-e-3); on gpt-image-2 and gateway models the size is computed in multiples of 16, the short
side 1024 unless ``resolution`` says ``<N>p`` (short side N) or ``<N>k`` (long side N x 1024; 4k is
3840). ``num_outputs`` -> ``n``. No ``negative_prompt``, ``seed`` or ``duration_seconds``.

Outputs: ``b64_json`` -> a ``data:image/<fmt>;base64,...`` output (stored at once), ``url`` -> the
URL (collected). Each output's metadata keeps the model, ``size``, ``quality``, ``background``,
``output_format``, ``revised_prompt`` and the request's token ``usage`` (the whole request's, on
every output of it); its ``output_tokens`` are the task's ``usage`` (what a GPT image model bills).
A 200 without a usable image fails ``provider_no_output``.

Errors (``{"error": {message, type, param, code}}``): ``moderation_blocked`` /
``content_policy_violation`` -> ``content_policy``; 429 ``insufficient_quota`` (billing) ->
InsufficientBalance; other 429 -> RateLimited after ``retry-after-ms`` / ``retry-after``; 401 ->
AuthFailed; "organization must be verified" (403, or 400) -> ``provider_organization_unverified``
(the key stays: it still serves other models); 404 ``model_not_found`` -> ``model_not_found``;
other 4xx -> ``provider_rejected_input``; 503 (overloaded, nothing made) -> Unavailable.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
    TaskNotFound,
)
from providers.http import (
    error_body,
    expect_object,
    fetch_input,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
    sniff_image,
)
from providers.usage import count, usage

GPT_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
GPT_QUALITIES = ("low", "medium", "high", "auto")
DALLE3_QUALITIES = ("standard", "hd")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
GPT_OPTIONS = ("quality", "background", "output_format", "output_compression", "moderation", "user", "size")
DALLE3_OPTIONS = ("quality", "style", "response_format", "user", "size")
EDIT_OPTIONS = ("images", "mask", "input_fidelity")
GATEWAY_OPTIONS = tuple(dict.fromkeys(GPT_OPTIONS + DALLE3_OPTIONS))
MAX_EDIT_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 3840 * 2160
DEFAULT_SHORT_SIDE = 1024
RATIO_TOLERANCE = 1.05  # an aspect ratio picks a listed size within 5% of it
_WXH = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_NAMED = re.compile(r"^(\d{3,4})p$|^([1-8])k$")
_RATIO = re.compile(r"^(\d{1,2}):(\d{1,2})$")

REFUSAL_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
BILLING_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})


@dataclass(frozen=True)
class ModelRules:
    """What one model accepts (``gateway``: a model only a gateway knows; options pass through)."""

    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int
    max_prompt: int
    options: tuple[str, ...]
    free_size: bool = False  # any WxH (gpt-image-2 within OpenAI's bounds; gateway models unchecked)
    edits: bool = True
    input_fidelity: bool = True
    gateway: bool = False


MODELS: dict[str, ModelRules] = {
    "gpt-image-2": ModelRules(GPT_SIZES, GPT_QUALITIES, 10, 32000, GPT_OPTIONS, free_size=True),
    "gpt-image-1.5": ModelRules(GPT_SIZES, GPT_QUALITIES, 10, 32000, GPT_OPTIONS),
    "gpt-image-1": ModelRules(GPT_SIZES, GPT_QUALITIES, 10, 32000, GPT_OPTIONS),
    "gpt-image-1-mini": ModelRules(GPT_SIZES, GPT_QUALITIES, 10, 32000, GPT_OPTIONS, input_fidelity=False),
    "dall-e-3": ModelRules(DALLE3_SIZES, DALLE3_QUALITIES, 1, 4000, DALLE3_OPTIONS, edits=False,
                           input_fidelity=False),
}
GATEWAY_RULES = ModelRules(("auto",), (), 10, 32000, GATEWAY_OPTIONS, free_size=True, gateway=True)


@dataclass
class ImagesCall:
    """A validated request: the route, its fields, and the input image URLs to fetch for an edit."""

    model: str
    fields: dict[str, Any]
    images: list[str] = field(default_factory=list)
    mask: str | None = None

    @property
    def edit(self) -> bool:
        return bool(self.images)


class OpenAIProvider(Provider):
    name = "openai"
    kinds = frozenset({MediaKind.image})
    default_base_url = "https://api.openai.com"
    default_typical_seconds = {"image": 30}
    default_concurrency = 4  # synchronous: each call holds a slot for its whole run (up to minutes)
    synchronous = True
    supports_cancel = False
    supports_callbacks = False
    retention = "base64 outputs are stored at once; DALL·E URLs expire after 60 minutes"

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.plan(request)

    def rules(self, model: str) -> ModelRules:
        if model in MODELS:
            return MODELS[model]
        listed = self.settings.extra.get("extra_models") or []
        patterns = [listed] if isinstance(listed, str) else [str(p) for p in listed]
        if any(fnmatch.fnmatchcase(model, p) for p in patterns):
            return GATEWAY_RULES
        raise InvalidInput("model", f"OpenAI Images models are {', '.join(MODELS)}; other models served in "
                                    "this format by a gateway must be listed in [providers.openai] extra_models")

    def plan(self, request: GenerationRequest) -> ImagesCall:
        """The call for ``request``; raises ``InvalidInput`` naming the field."""
        model, given = request.model, request.input
        rules = self.rules(model)
        if not given.prompt:
            raise InvalidInput("input.prompt", "OpenAI Images needs a prompt")
        if len(given.prompt) > rules.max_prompt:
            raise InvalidInput("input.prompt", f"{model} takes at most {rules.max_prompt} characters")
        for common in ("negative_prompt", "seed", "duration_seconds"):
            if getattr(given, common) is not None:
                raise InvalidInput(f"input.{common}", f"OpenAI Images has no {common.replace('_', ' ')}")
        call = ImagesCall(model, {"model": model, "prompt": given.prompt})
        if given.num_outputs is not None:
            if given.num_outputs > rules.max_n:
                raise InvalidInput("input.num_outputs", f"{model} renders at most {rules.max_n} image(s) a request")
            call.fields["n"] = given.num_outputs
        self._inputs(request, rules, call)
        for key, value in given.options.items():
            if key in ("images", "mask"):
                continue  # the edit's inputs (above)
            if key not in rules.options and not (key == "input_fidelity" and call.edit):
                raise InvalidInput(f"input.options.{key}", _not_an_option(model, key, rules, call.edit))
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise InvalidInput(f"input.options.{key}", "expected a string or an integer")
            call.fields[key] = value
        size = self._size(model, rules, given)
        if size is not None:
            call.fields["size"] = size
        if not rules.gateway:
            _check_options(model, rules, call.fields)
        return call

    def _inputs(self, request: GenerationRequest, rules: ModelRules, call: ImagesCall) -> None:
        """The edit's input images and mask (URLs, fetched at submit)."""
        given = request.input
        if given.image_url is not None:
            call.images.append(str(given.image_url))
        extra = given.options.get("images")
        if extra is not None:
            if not isinstance(extra, list) or not extra or not all(_is_url(u) for u in extra):
                raise InvalidInput("input.options.images", "a list of http(s) image URLs")
            call.images += [str(u) for u in extra]
        if call.images and not rules.edits:
            from_source = request.source is not None and given.image_url == request.source.url
            where = "source" if from_source else "input.image_url" if given.image_url else "input.options.images"
            raise InvalidInput(where, f"{call.model} cannot edit images (no /v1/images/edits); use a gpt-image model")
        if len(call.images) > MAX_EDIT_IMAGES:
            raise InvalidInput("input.options.images", f"an edit takes at most {MAX_EDIT_IMAGES} images")
        mask = given.options.get("mask")
        if mask is not None:
            if not _is_url(mask):
                raise InvalidInput("input.options.mask", "an http(s) URL of a PNG with an alpha channel")
            if not call.images:
                raise InvalidInput("input.options.mask", "a mask needs an image to edit (image_url or options.images)")
            call.mask = str(mask)

    def _size(self, model: str, rules: ModelRules, given: MediaInput) -> str | None:
        ratio, resolution = given.aspect_ratio, given.resolution
        explicit = given.options.get("size")
        if explicit is not None:
            if ratio is not None or resolution is not None:
                raise InvalidInput("input.options.size", "give either options.size or aspect_ratio/resolution")
            if not isinstance(explicit, str):
                raise InvalidInput("input.options.size", "a string such as '1024x1024'")
            return _allowed_size(model, rules, explicit, "input.options.size")
        if resolution is None and ratio is None:
            return None
        wanted = _ratio(ratio) if ratio is not None else None
        if resolution is not None and _WXH.match(resolution):
            w, h = (int(v) for v in resolution.split("x"))
            if wanted is not None and abs(math.log(w / h / wanted)) > math.log(RATIO_TOLERANCE):
                raise InvalidInput("input.resolution", f"{resolution} does not have the aspect ratio {ratio}")
            return _allowed_size(model, rules, resolution, "input.resolution")
        if not rules.free_size:
            if resolution is not None:
                raise InvalidInput("input.resolution", f"{model} renders {', '.join(_fixed(rules))}: give "
                                                       "resolution as one of them, or only an aspect ratio")
            return _nearest(model, rules, wanted or 1.0, str(ratio))
        size = _computed(wanted or 1.0, resolution)
        return _allowed_size(model, rules, size, "input.resolution" if resolution else "input.aspect_ratio")

    # -- the call ------------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        call = self.plan(request)
        if call.edit:
            files = [("image[]", await _fetch_image(ctx, url, f"input image {i}", MAX_IMAGE_BYTES))
                     for i, url in enumerate(call.images)]
            if call.mask is not None:
                mask = await _fetch_image(ctx, call.mask, "the mask", MAX_MASK_BYTES)
                if mask[2] != "image/png":
                    raise Rejected("the mask must be a PNG file", code="input_image_unavailable")
                files.append(("mask", mask))
            form = {key: str(value) for key, value in call.fields.items()}
            http_request = ctx.http.build_request("POST", f"{self.base_url}/v1/images/edits", data=form,
                                                  files=files, headers=self._headers(ctx))
        else:
            http_request = ctx.http.build_request("POST", f"{self.base_url}/v1/images/generations",
                                                  json=call.fields, headers=self._headers(ctx))
        response = await send(ctx.http, http_request, creates=True, timeout=ctx.timeout)
        _raise_for_error(response)
        request_id = response.headers.get("x-request-id")
        done = images_status(expect_object(parse_json(response), "images response"), call.model)
        done.request_id = request_id
        return SubmitResult(task_id=request.reference, request_id=request_id, status=done.raw_status, done=done)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        raise TaskNotFound("OpenAI Images answers the create request itself: there is no task to fetch")


def images_status(body: dict[str, Any], model: str) -> TaskStatus:
    """The ``ImagesResponse`` as a finished task: ``b64_json`` first, then ``url``, per image."""
    data = body.get("data")
    if not isinstance(data, list):
        raise MalformedResponse("OpenAI Images answered without a data list", detail=str(body)[:300])
    common: dict[str, Any] = {"model": model}
    common |= {key: body[key] for key in ("created", "size", "quality", "background", "output_format")
               if body.get(key) is not None}
    if isinstance(body.get("usage"), dict):
        common["usage"] = body["usage"]
    outputs = []
    for item in data:
        if not isinstance(item, dict):
            continue
        metadata = dict(common)
        if isinstance(item.get("revised_prompt"), str):
            metadata["revised_prompt"] = item["revised_prompt"]
        b64, url = item.get("b64_json"), item.get("url")
        if isinstance(b64, str) and b64:
            content_type = _decoded_type(b64, body.get("output_format"))
            outputs.append(ProviderOutput(url=f"data:{content_type};base64,{b64}", content_type=content_type,
                                          metadata=metadata))
        elif _is_url(url):
            outputs.append(ProviderOutput(url=str(url), metadata=metadata))
    # GPT image models bill output tokens (partial images included); DALL-E reports no usage.
    used = body.get("usage")
    tokens = usage(tokens=count(used.get("output_tokens"))) if isinstance(used, dict) else None
    if not outputs:
        return TaskStatus(state="failed", raw_status="no_image", error_code="provider_no_output",
                          error_message="OpenAI Images answered without any image",
                          error_detail={"data": str(data)[:300]}, usage=tokens)
    return TaskStatus(state="succeeded", raw_status="completed", progress=100, outputs=outputs, usage=tokens)


# -- validation helpers ----------------------------------------------------------------------

def _not_an_option(model: str, key: str, rules: ModelRules, edit: bool) -> str:
    if key == "input_fidelity" and not edit:
        return "'input_fidelity' applies to edits (give image_url or options.images)"
    if key in GPT_OPTIONS:
        return f"'{key}' is for gpt-image models, not {model}"
    if key in DALLE3_OPTIONS:
        return f"'{key}' is for dall-e-3, not {model}"
    allowed = rules.options + (EDIT_OPTIONS if rules.edits else ())
    return f"not an OpenAI Images parameter for {model} (allowed: {', '.join(allowed)})"


def _check_options(model: str, rules: ModelRules, fields: dict[str, Any]) -> None:
    """The values OpenAI would refuse for ``model`` (the fields are already known to be allowed)."""
    _choice("quality", fields, rules.qualities)
    _choice("style", fields, ("vivid", "natural"))
    _choice("response_format", fields, ("url", "b64_json"))
    _choice("output_format", fields, OUTPUT_FORMATS)
    _choice("background", fields, BACKGROUNDS)
    _choice("moderation", fields, ("auto", "low"))
    _choice("input_fidelity", fields, ("high", "low"))
    if "input_fidelity" in fields and not rules.input_fidelity:
        raise InvalidInput("input.options.input_fidelity", f"{model} has no input_fidelity")
    output_format = fields.get("output_format", "png")
    if fields.get("background") == "transparent" and output_format == "jpeg":
        raise InvalidInput("input.options.background", "a transparent background needs png or webp output")
    if "output_compression" in fields:
        value = fields["output_compression"]
        if not isinstance(value, int) or not 0 <= value <= 100:
            raise InvalidInput("input.options.output_compression", "an integer from 0 to 100")
        if output_format == "png":
            raise InvalidInput("input.options.output_compression", "applies to jpeg or webp output only")
    if "user" in fields and not isinstance(fields["user"], str):
        raise InvalidInput("input.options.user", "a string (your end user's id)")


def _choice(name: str, fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    if name in fields and fields[name] not in allowed:
        raise InvalidInput(f"input.options.{name}", f"one of {', '.join(allowed)}")


def _ratio(text: str) -> float:
    match = _RATIO.match(text)
    if match is None or not int(match.group(1)) or not int(match.group(2)):
        raise InvalidInput("input.aspect_ratio", "a ratio such as 3:2")
    return int(match.group(1)) / int(match.group(2))


def _fixed(rules: ModelRules) -> tuple[str, ...]:
    return tuple(s for s in rules.sizes if s != "auto")


def _nearest(model: str, rules: ModelRules, wanted: float, ratio: str) -> str:
    """The fixed size whose ratio is within 5% of ``wanted``."""
    for size in _fixed(rules):
        w, h = (int(v) for v in size.split("x"))
        if abs(math.log(w / h / wanted)) <= math.log(RATIO_TOLERANCE):
            return size
    raise InvalidInput("input.aspect_ratio", f"{model} renders {', '.join(_fixed(rules))}, not {ratio}")


def _computed(ratio: float, resolution: str | None) -> str:
    """A ``WxH`` in multiples of 16 with ``ratio``, sized by ``resolution`` (``<N>p`` or ``<N>k``)."""
    match = _NAMED.match(resolution or "")
    if resolution is not None and match is None:
        raise InvalidInput("input.resolution", "a WxH size, <N>p or <N>k")
    if match is not None and match.group(2):
        k = int(match.group(2))
        long_side = 3840 if k == 4 else k * 1024
        w, h = (long_side, long_side / ratio) if ratio >= 1 else (long_side * ratio, long_side)
    else:
        short = int(match.group(1)) if match is not None else DEFAULT_SHORT_SIDE
        w, h = (short * ratio, short) if ratio >= 1 else (short, short / ratio)
    return f"{max(16, round(w / 16) * 16)}x{max(16, round(h / 16) * 16)}"


def _allowed_size(model: str, rules: ModelRules, size: str, where: str) -> str:
    if size in rules.sizes or rules.gateway:
        return size  # a gateway's model: its own sizes (e.g. Seedream's "2K")
    match = _WXH.match(size)
    if not rules.free_size or match is None:
        raise InvalidInput(where, f"{model} renders sizes {', '.join(rules.sizes)}, not {size}")
    w, h = int(match.group(1)), int(match.group(2))
    if w % 16 or h % 16:
        problem = "both sides must be multiples of 16"
    elif max(w, h) > 3 * min(w, h):
        problem = "the aspect ratio must be at most 3:1"
    elif max(w, h) > 3840 or w * h > MAX_PIXELS:
        problem = "the image must be at most 3840x2160 pixels"
    else:
        return size
    raise InvalidInput(where, f"{model} cannot render {size}: {problem}")


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


# -- the wire ----------------------------------------------------------------------------------

def _decoded_type(b64: str, output_format: Any) -> str:
    """The image's type, once the base64 is known to decode (a broken one is a malformed answer)."""
    try:
        head = base64.b64decode(b64, validate=True)[:16]
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponse("OpenAI Images answered an image that is not valid base64") from exc
    fallback = f"image/{output_format}" if output_format in OUTPUT_FORMATS else "image/png"
    return sniff_image(head) or fallback


async def _fetch_image(ctx: CallContext, url: str, what: str, limit: int) -> tuple[str, bytes, str]:
    """Download an input image (bounded, destination-guarded, no credentials) as a multipart file:
    nothing is sent to OpenAI if this fails."""
    data = (await fetch_input(ctx, url, max_bytes=limit, what=what, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16])
    if mime is None:
        raise Rejected(f"{what} is not a PNG, JPEG or WebP file", code="input_image_unavailable")
    return f"image.{mime.removeprefix('image/')}", data, mime


def _retry_after(response: httpx.Response) -> float | None:
    millis = response.headers.get("retry-after-ms")
    try:
        return max(0.0, float(millis) / 1000) if millis else retry_after_seconds(response.headers)
    except ValueError:
        return retry_after_seconds(response.headers)


def _raise_for_error(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response, unwrap="error")
    code = str(error.get("code") or "")
    message = str(error.get("message") or f"HTTP {status}")
    if status < 500 and code in REFUSAL_CODES:
        raise Rejected(f"OpenAI refused the image: {message}", code="content_policy", detail=error,
                       status_code=status)
    if code in BILLING_CODES or error.get("type") in BILLING_CODES:
        raise InsufficientBalance(f"OpenAI refused the request: {message}", detail=error, status_code=status)
    if status == 429:
        raise RateLimited(f"OpenAI Images rate limit: {message}", retry_after=_retry_after(response), detail=error)
    if status == 401:
        raise AuthFailed(f"OpenAI refused the key: {message}", detail=error, status_code=status)
    if status in (400, 403) and "must be verified" in message:
        raise Rejected(f"OpenAI refused the model: {message}", code="provider_organization_unverified",
                       detail=error, status_code=status)
    if status in (400, 404, 409, 413, 415, 422):
        raise Rejected(f"OpenAI refused the request: {message}", detail=error, status_code=status,
                       code="model_not_found" if code == "model_not_found" else "provider_rejected_input")
    raise_for_common_status(response, creates=True, detail=error)
