"""Ideogram 3.0 (https://developer.ideogram.ai), a synchronous image provider.

Base URL ``https://api.ideogram.ai``; auth header ``Api-Key: <key>``. One model, ``ideogram-v3``,
served by the 3.0 routes, each a ``multipart/form-data`` POST that stays open until the images
exist:

* ``generate`` -> ``POST /v1/ideogram-v3/generate`` (``prompt``).
* Operations on an image, taken from a ``source`` job's stored output (any provider) or from
  ``input.image_url``, fetched here (bounded, destination-guarded) and sent as the ``image`` file:
  ``remix`` -> ``/remix`` (``prompt``, ``options.image_weight``), ``reframe`` -> ``/reframe``
  (``resolution`` required, no prompt), ``replace_background`` -> ``/replace-background``
  (``prompt`` = the new background), ``inpaint`` -> ``/inpaint`` (``prompt`` and
  ``options.mask``: a URL of a mask the image's size, black = the area to edit).

Common fields: ``prompt``, ``negative_prompt`` (generate, remix), ``seed`` (0-2147483647),
``num_outputs`` -> ``num_images`` (1-8), ``aspect_ratio`` ``a:b`` -> ``axb`` (the 15 documented
ratios) or ``resolution`` ``WxH`` (generate, remix; reframe's required target). ``options``, per
route as documented: ``rendering_speed`` (FLASH TURBO BALANCED DEFAULT QUALITY), ``magic_prompt``
(AUTO ON OFF), ``style_type``, ``style_preset``, ``style_codes`` (8-hex codes, not with
``style_type`` or style references), ``color_palette`` (an object, sent as JSON),
``custom_model_uri``, ``image_weight`` (remix, 1-100), and URL lists ``style_reference_images``,
``character_reference_images``, ``character_reference_images_mask`` (fetched, sent as repeated
file parts).

Answer: ``{created: ISO string, data: [{url, prompt, resolution, is_image_safe, seed, style_type}]}``.
An image with ``is_image_safe: false`` has a null URL and is not an output; when every image is
unsafe the job fails ``content_policy``. The URLs are ephemeral (``exp=<unix>`` in the query, kept
as the output's ``expires_at``): they are outputs collected at once by the collect step, without
the key (they are signed).

There is no task id, no status route and no idempotency key on the 3.0 routes: the task id is the
job's id, ``fetch`` has nothing to read, and a timeout or a 500/502/504 after the request was sent
is ``OutcomeUnknown`` (the images may exist and be billed; never resent unless the job opted in).

The V4 / v2 routes' asynchronous mode (``generation_id``, Ed25519-signed webhooks) is not used:
every model those routes serve also has a synchronous route, and ``ideogram-v3`` is served by the
3.0 routes only.

Errors (``{"error": ...}``): 400 -> ``provider_rejected_input``, 401/403 (remix answers 403) ->
AuthFailed, 402 -> InsufficientBalance (``reject_reason: inflight_limit`` -> RateLimited), 422 (the
prompt or image failed the safety check) -> ``content_policy``, 429 -> RateLimited (10 requests in
flight per account by default: ``default_concurrency``), 503 -> Unavailable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaKind,
    Operation,
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

MODEL = "ideogram-v3"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_REFERENCE_IMAGES = 10
MAX_SEED = 2147483647
ASPECT_RATIOS = frozenset({"1x3", "3x1", "1x2", "2x1", "9x16", "16x9", "10x16", "16x10", "2x3", "3x2", "3x4",
                           "4x3", "4x5", "5x4", "1x1"})
RENDERING_SPEEDS = ("FLASH", "TURBO", "BALANCED", "DEFAULT", "QUALITY")
MAGIC_PROMPT = ("AUTO", "ON", "OFF")
STYLE_TYPES = ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "CUSTOM", "FICTION", "STYLIZED")
_WXH = re.compile(r"^(\d{3,4})x(\d{3,4})$")
_STYLE_CODE = re.compile(r"^[0-9A-Fa-f]{8}$")
_STYLE_PRESET = re.compile(r"^[A-Z0-9_]{1,64}$")

# Options every route takes, then each route's own.
_SHARED = frozenset({"rendering_speed", "style_preset", "color_palette", "style_codes", "style_reference_images"})
_CHARACTER = frozenset({"character_reference_images", "character_reference_images_mask"})
_URL_LISTS = ("style_reference_images", "character_reference_images", "character_reference_images_mask")
# Native names that have a common field: the common field is the one to use.
_COMMON_NAMES = {"prompt": "input.prompt", "negative_prompt": "input.negative_prompt", "seed": "input.seed",
                 "num_images": "input.num_outputs", "aspect_ratio": "input.aspect_ratio",
                 "resolution": "input.resolution", "image": "input.image_url"}


@dataclass(frozen=True)
class Route:
    """One 3.0 route: what it requires and which native options it takes."""

    path: str
    options: frozenset[str]
    prompt: bool = True  # takes (and requires) a prompt
    image: bool = True
    sizable: bool = False  # aspect_ratio or resolution
    negative_prompt: bool = False


ROUTES = {
    "generate": Route("generate", _SHARED | _CHARACTER | {"magic_prompt", "style_type", "custom_model_uri"},
                      image=False, sizable=True, negative_prompt=True),
    "remix": Route("remix", _SHARED | _CHARACTER | {"magic_prompt", "style_type", "image_weight"},
                   sizable=True, negative_prompt=True),
    "reframe": Route("reframe", _SHARED, prompt=False),
    "replace_background": Route("replace-background", _SHARED | {"magic_prompt"}),
    "inpaint": Route("inpaint", _SHARED | _CHARACTER | {"magic_prompt", "style_type", "custom_model_uri", "mask"}),
}
_IMAGE = frozenset({MediaKind.image})


@dataclass
class Call:
    """A validated request: the route, its text fields, and the URLs of the files to send."""

    route: Route
    fields: list[tuple[str, str]] = field(default_factory=list)
    image: str | None = None  # None until submit when it comes from the source job (no URL while validating)
    files: list[tuple[str, str]] = field(default_factory=list)  # (part name, URL)


class IdeogramProvider(Provider):
    name = "ideogram"
    kinds = _IMAGE
    default_base_url = "https://api.ideogram.ai"
    default_typical_seconds = {"image": 15}
    default_concurrency = 10  # Ideogram's default: 10 requests in flight per account, each held until done
    synchronous = True
    retention = "ephemeral result URLs (exp= in the URL), collected at once"
    operations = (
        Operation("remix", source="optional_media", source_kinds=_IMAGE, models=(MODEL,),
                  description="a new image from an image and a prompt (options.image_weight 1-100)"),
        Operation("reframe", source="optional_media", source_kinds=_IMAGE, models=(MODEL,),
                  description="the image extended to input.resolution"),
        Operation("replace_background", source="optional_media", source_kinds=_IMAGE, models=(MODEL,),
                  description="the subject kept, the background from the prompt"),
        Operation("inpaint", source="optional_media", source_kinds=_IMAGE, models=(MODEL,),
                  description="the masked area (options.mask, black = edit) redrawn from the prompt"),
    )

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.plan(request)

    def plan(self, request: GenerationRequest) -> Call:
        """The call for ``request``; raises ``InvalidInput`` naming the field."""
        if request.model != MODEL:
            raise InvalidInput("model", f"Ideogram's model here is {MODEL} (the 3.0 routes)")
        route = ROUTES[request.operation]
        given = request.input
        call = Call(route)
        self._image(request, call)
        if route.prompt:
            if not given.prompt or not given.prompt.strip():
                raise InvalidInput("input.prompt", f"Ideogram {request.operation} needs a prompt")
            call.fields.append(("prompt", given.prompt))
        elif given.prompt is not None:
            raise InvalidInput("input.prompt", f"Ideogram {request.operation} takes no prompt")
        if given.negative_prompt is not None:
            if not route.negative_prompt:
                raise InvalidInput("input.negative_prompt", f"Ideogram {request.operation} has no negative prompt")
            call.fields.append(("negative_prompt", given.negative_prompt))
        if given.duration_seconds is not None:
            raise InvalidInput("input.duration_seconds", "an image has no duration")
        if given.seed is not None:
            if given.seed > MAX_SEED:
                raise InvalidInput("input.seed", f"Ideogram seeds are 0 to {MAX_SEED}")
            call.fields.append(("seed", str(given.seed)))
        if given.num_outputs is not None:
            call.fields.append(("num_images", str(given.num_outputs)))
        self._size(request, call)
        self._options(request, call)
        return call

    def _image(self, request: GenerationRequest, call: Call) -> None:
        given, source = request.input, request.source
        if not call.route.image:
            if source is not None or given.image_url is not None:
                raise InvalidInput("source" if source is not None else "input.image_url",
                                   "Ideogram generate takes no input image: use the remix, reframe, "
                                   "replace_background or inpaint operation")
            return
        if source is not None and given.image_url is not None:
            raise InvalidInput("input.image_url", "give the image either as input.image_url or as a source job")
        if source is None and given.image_url is None:
            raise InvalidInput("source", f"{request.operation} needs an image: a source job or input.image_url")
        call.image = source.url if source is not None else given.image_url

    def _size(self, request: GenerationRequest, call: Call) -> None:
        given, route = request.input, call.route
        if request.operation == "reframe":
            if given.resolution is None:
                raise InvalidInput("input.resolution", "reframe needs the target resolution (WxH)")
            if given.aspect_ratio is not None:
                raise InvalidInput("input.aspect_ratio", "reframe takes a resolution, not an aspect ratio")
        elif not route.sizable:
            for name in ("aspect_ratio", "resolution"):
                if getattr(given, name) is not None:
                    raise InvalidInput(f"input.{name}", f"Ideogram {request.operation} keeps the image's size")
            return
        if given.aspect_ratio is not None and given.resolution is not None:
            raise InvalidInput("input.resolution", "give either an aspect ratio or a resolution, not both")
        if given.resolution is not None:
            match = _WXH.match(given.resolution)
            if match is None or not all(512 <= int(v) <= 1536 and int(v) % 32 == 0 for v in match.groups()):
                raise InvalidInput("input.resolution", "one of Ideogram's resolutions: WxH, each side a multiple "
                                                       "of 32 from 512 to 1536 (e.g. 1024x1024, 1312x736)")
            call.fields.append(("resolution", given.resolution))
        elif given.aspect_ratio is not None:
            ratio = given.aspect_ratio.replace(":", "x")
            if ratio not in ASPECT_RATIOS:
                raise InvalidInput("input.aspect_ratio", "one of " + ", ".join(
                    sorted(r.replace("x", ":") for r in ASPECT_RATIOS)))
            call.fields.append(("aspect_ratio", ratio))

    def _options(self, request: GenerationRequest, call: Call) -> None:
        options, route = request.input.options, call.route
        for key, value in options.items():
            where = f"input.options.{key}"
            if key in _COMMON_NAMES:
                raise InvalidInput(where, f"give it as {_COMMON_NAMES[key]}")
            if key not in route.options:
                raise InvalidInput(where, f"not an Ideogram {request.operation} option (allowed: "
                                          f"{', '.join(sorted(route.options))})")
            if key in _URL_LISTS:
                urls = _url_list(where, value)
                call.files += [(key, url) for url in urls]
            elif key == "mask":
                if not _is_url(value):
                    raise InvalidInput(where, "an http(s) URL of the mask (the image's size, black = edit)")
                call.files.append(("mask", str(value)))
            elif key == "style_codes":
                codes = [value] if isinstance(value, str) else value
                if not isinstance(codes, list) or not codes or not all(
                        isinstance(c, str) and _STYLE_CODE.match(c) for c in codes):
                    raise InvalidInput(where, "a list of 8-hexadecimal-digit style codes")
                call.fields += [("style_codes", code) for code in codes]
            elif key == "color_palette":
                if not isinstance(value, dict) or not value:
                    raise InvalidInput(where, "an object: {\"name\": ...} or {\"members\": [...]}")
                call.fields.append((key, json.dumps(value)))
            elif key == "image_weight":
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
                    raise InvalidInput(where, "an integer from 1 to 100")
                call.fields.append((key, str(value)))
            else:
                call.fields.append((key, _text_option(where, key, value)))
        if "mask" in route.options and "mask" not in options:
            raise InvalidInput("input.options.mask", "inpaint needs options.mask: a URL of the mask image")
        if "style_codes" in options and ("style_type" in options or "style_reference_images" in options):
            raise InvalidInput("input.options.style_codes", "style_codes cannot be combined with style_type or "
                                                            "style_reference_images")

    # -- the call ------------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Api-Key": ctx.api_key, "User-Agent": "atelier", "Accept": "application/json"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        call = self.plan(request)
        parts: list[tuple[str, tuple[str | None, str | bytes] | tuple[str, bytes, str]]] = [
            (name, (None, value)) for name, value in call.fields]
        if call.image is not None:
            parts.append(("image", await _fetch_image(ctx, call.image, "the input image")))
        for name, url in call.files:
            parts.append((name, await _fetch_image(ctx, url, f"options.{name}")))
        # Text fields go as file-less parts: a body with no file would otherwise not be multipart.
        http_request = ctx.http.build_request("POST", f"{self.base_url}/v1/ideogram-v3/{call.route.path}",
                                              files=parts, headers=self._headers(ctx))
        response = await send(ctx.http, http_request, creates=True, timeout=ctx.timeout)
        _raise_for_error(response)
        done = images_status(expect_object(parse_json(response), "Ideogram answer"), request.operation)
        return SubmitResult(task_id=request.reference, status=done.raw_status, done=done)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        raise TaskNotFound("Ideogram's 3.0 routes answer the request itself: there is no task to fetch")


def images_status(body: dict[str, Any], operation: str) -> TaskStatus:
    """The answer as a finished task: one output per safe image; none safe -> ``content_policy``."""
    data = body.get("data")
    if not isinstance(data, list):
        raise MalformedResponse("Ideogram answered without a data list", detail=str(body)[:300])
    images = [item for item in data if isinstance(item, dict)]
    unsafe = sum(1 for item in images if item.get("is_image_safe") is False)
    outputs = []
    for index, item in enumerate(images):
        url = item.get("url")
        if item.get("is_image_safe") is False or not _is_url(url):
            continue
        metadata: dict[str, Any] = {"operation": operation, "index": index}
        metadata |= {key: item[key] for key in ("prompt", "resolution", "upscaled_resolution", "seed", "style_type")
                     if item.get(key) is not None}
        if isinstance(body.get("created"), str):
            metadata["created"] = body["created"]
        expires = _expires_at(str(url))
        if expires is not None:
            metadata["expires_at"] = expires
        if unsafe:
            metadata["unsafe_images_withheld"] = unsafe
        outputs.append(ProviderOutput(url=str(url), metadata=metadata))
    if outputs:
        return TaskStatus(state="succeeded", raw_status="completed", progress=100, outputs=outputs)
    if unsafe:
        return TaskStatus(state="failed", raw_status="unsafe", error_code="content_policy",
                          error_message=f"Ideogram withheld every image as unsafe ({unsafe} of {len(images)})",
                          error_detail={"images": len(images), "unsafe": unsafe})
    return TaskStatus(state="failed", raw_status="no_image", error_code="provider_no_output",
                      error_message="Ideogram answered without any image", error_detail={"data": str(data)[:300]})


# -- helpers ------------------------------------------------------------------------------------

def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def _url_list(where: str, value: Any) -> list[str]:
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls or not all(_is_url(u) for u in urls):
        raise InvalidInput(where, "a list of http(s) image URLs")
    if len(urls) > MAX_REFERENCE_IMAGES:
        raise InvalidInput(where, f"at most {MAX_REFERENCE_IMAGES} images")
    return [str(u) for u in urls]


def _text_option(where: str, key: str, value: Any) -> str:
    """An enumerated or free-text option's value, checked where Ideogram documents the values."""
    allowed = {"rendering_speed": RENDERING_SPEEDS, "magic_prompt": MAGIC_PROMPT, "style_type": STYLE_TYPES}
    if not isinstance(value, str) or not value:
        raise InvalidInput(where, "a string")
    if key in allowed and value not in allowed[key]:
        raise InvalidInput(where, f"one of {', '.join(allowed[key])}")
    if key == "style_preset" and not _STYLE_PRESET.match(value):
        raise InvalidInput(where, "one of Ideogram's style presets, e.g. 'WATERCOLOR'")
    return value


def _expires_at(url: str) -> int | None:
    """The ``exp=<unix seconds>`` of an ephemeral URL."""
    exp = parse_qs(urlsplit(url).query).get("exp", [""])[0]
    return int(exp) if exp.isdigit() else None


async def _fetch_image(ctx: CallContext, url: str, what: str) -> tuple[str, bytes, str]:
    """An input image as a multipart file (JPEG, PNG or WebP, at most 10 MB): nothing is sent to
    Ideogram if this fails."""
    data = (await fetch_input(ctx, url, max_bytes=MAX_IMAGE_BYTES, what=what, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16])
    if mime is None:
        raise Rejected(f"{what} is not a JPEG, PNG or WebP image", code="input_image_unavailable")
    return f"image.{mime.removeprefix('image/')}", data, mime


def _message(error: Mapping[str, Any], status: int) -> str:
    text = error.get("error") or error.get("detail") or error.get("message") or error.get("body")
    return str(text or f"HTTP {status}")[:300]


def _raise_for_error(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response)
    message = _message(error, status)
    if status == 422:
        raise Rejected(f"Ideogram's safety check refused the request: {message}", code="content_policy",
                       detail=error, status_code=status)
    if status == 429 or (status == 402 and error.get("reject_reason") == "inflight_limit"):
        raise RateLimited(f"Ideogram rate limit: {message}", retry_after=retry_after_seconds(response.headers),
                          detail=error, status_code=status)
    if status == 402:
        raise InsufficientBalance(f"Ideogram refused the request: {message}", detail=error, status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"Ideogram refused the key (HTTP {status}): {message}", detail=error, status_code=status)
    if status in (400, 404, 413, 415):
        raise Rejected(f"Ideogram refused the request: {message}", code="provider_rejected_input", detail=error,
                       status_code=status)
    raise_for_common_status(response, creates=True, detail=error)
