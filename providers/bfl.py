"""Black Forest Labs FLUX API, direct (https://docs.bfl.ai): the model is the route.

Base URL ``https://api.bfl.ai`` (regional: ``api.eu.bfl.ai``, ``api.us.bfl.ai``); header
``x-key: <key>``; JSON bodies.

* ``POST /v1/{model}`` -> ``{id, polling_url, cost, input_mp, output_mp}`` (with ``webhook_url``:
  ``{id, status, webhook_url, cost...}``, no ``polling_url`` in the schema). Models: ``flux-2-pro``,
  ``flux-2-pro-preview``, ``flux-2-max``, ``flux-2-flex``, ``flux-2-klein-4b``, ``flux-2-klein-9b``,
  ``flux-2-klein-9b-preview``, ``flux-pro-1.1``, ``flux-dev``, ``flux-pro-1.1-ultra``,
  ``flux-pro-1.1-ultra-finetuned``, ``flux-kontext-pro``, ``flux-kontext-max``, ``flux-pro-1.0-fill``,
  ``flux-pro-1.0-fill-finetuned``, ``flux-pro-1.0-expand``; newer ones when ``[providers.bfl]
  extra_models`` lists them (names or fnmatch patterns; their options pass through).
* ``polling_url`` may be on another host than the submit's. It is kept in the task state and polled,
  with the key, only if it is HTTPS on ``bfl.ai`` or a subdomain, or on the configured base URL's
  origin; any other URL is dropped (the key never goes there) and ``{base_url}/v1/get_result?id=``
  is polled instead, as it is when no ``polling_url`` came back.
* ``GET`` the poll URL -> ``{id, status, result, progress, details}``: ``Pending`` (queued until it
  reports a progress, then running; ``progress`` 0-1 or 0-100), ``Ready`` (``result.sample``: a
  signed URL that lives 10 minutes; it is the output, collected at once, without the key),
  ``Request Moderated`` / ``Content Moderated`` -> ``content_policy`` (with
  ``details["Moderation Reasons"]``), ``Error`` -> ``provider_failed``, ``Task not found`` ->
  ``TaskNotFound``; anything else (``Reasoning``, ``Generating``...) is running.

Inputs: ``prompt``, ``seed``; one image per task; ``image_url`` (or a ``source`` job's output) is
fetched and sent base64 as ``input_image`` (FLUX.2, Kontext), ``image_prompt`` (pro, dev, ultra) or
``image`` (fill, expand); ``aspect_ratio`` goes as it is to ultra and Kontext and becomes
``width``/``height`` (about 1 MP; multiples of 16 for FLUX.2, of 32 within 256-1440 for pro/dev),
as ``resolution`` ``WxH`` does. ``options`` are the model's native fields (``output_format``,
``safety_tolerance``, ``prompt_upsampling``, ``raw``, ``steps``, ``guidance``, ``input_image_2``...).

Callbacks: the create body carries ``webhook_url`` (our callback URL, with the job's token) and a
per-job ``webhook_secret`` (derived from that token). BFL's signature scheme is UNCONFIRMED, so the
callback is authenticated by the token (``callback_auth = "token"``) and, like every callback, is
only a hint: the state applied is the one fetched.

Cost: the submission's ``cost`` (credits; 1 credit = 0.01 USD per BFL's docs, ``extra["usd_per_credit"]``
overrides it) is kept in the task state and reported as the usage of the Ready task.

Errors: 422 (FastAPI ``detail`` list) / 400 -> ``provider_rejected_input``, 401/403 -> AuthFailed,
402 -> InsufficientBalance, 404 -> ``model_not_found``, 429 (24 active tasks per key:
``default_concurrency``; 6 for ``flux-kontext-max``) -> RateLimited. No cancel, and no lookup of an
ambiguous submission: it fails ``provider_outcome_unknown``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
    TaskNotFound,
)
from providers.http import expect_object, fetch_input, parse_json, raise_for_common_status, retry_after_seconds, send
from providers.usage import credits_in_usd, usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What one family of models takes: where an input image goes, how its size is given."""

    image_field: str  # the field the input image goes in (base64)
    size: str  # "pixels" (width/height), "ratio" (aspect_ratio) or "none"
    multiple: int = 16
    min_side: int = 64
    max_side: int = 4096
    max_safety: int = 6
    prompt_required: bool = True
    image_required: bool = False


FLUX2 = Family("input_image", "pixels", 16, 64, 4096, max_safety=5)
PRO = Family("image_prompt", "pixels", 32, 256, 1440, prompt_required=False)
ULTRA = Family("image_prompt", "ratio", prompt_required=False)
KONTEXT = Family("input_image", "ratio")
EDIT = Family("image", "none", prompt_required=False, image_required=True)  # fill, expand
GENERIC = Family("input_image", "ratio")  # a model listed in extra_models: options pass through

MODELS: dict[str, Family] = {
    "flux-2-pro": FLUX2, "flux-2-pro-preview": FLUX2, "flux-2-max": FLUX2, "flux-2-flex": FLUX2,
    "flux-2-klein-4b": FLUX2, "flux-2-klein-9b": FLUX2, "flux-2-klein-9b-preview": FLUX2,
    "flux-pro-1.1": PRO, "flux-dev": PRO,
    "flux-pro-1.1-ultra": ULTRA, "flux-pro-1.1-ultra-finetuned": ULTRA,
    "flux-kontext-pro": KONTEXT, "flux-kontext-max": KONTEXT,
    "flux-pro-1.0-fill": EDIT, "flux-pro-1.0-fill-finetuned": EDIT, "flux-pro-1.0-expand": EDIT,
}
OUTPUT_FORMATS = ("jpeg", "png", "webp")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
TARGET_PIXELS = 1024 * 1024
USD_PER_CREDIT = 0.01  # BFL: 1 credit = 0.01 USD (images-wave2.md §4.4, BFL-SKILLS)
MAX_FLUX2_PIXELS = 4 * 1024 * 1024
# Fields Atelier sets itself, or that have a common input field.
_RESERVED = {"webhook_url": None, "webhook_secret": None, "prompt": "input.prompt", "seed": "input.seed",
             "input_image": "input.image_url", "image_prompt": "input.image_url", "image": "input.image_url"}
_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WXH = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_MODEL = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
MODERATED = ("Request Moderated", "Content Moderated")


class BflTask(TaskState):
    """The submission's ``polling_url`` (kept only when the key may go there) and its ``cost``."""

    polling_url: str | None = None
    cost: float | None = None


class BflProvider(Provider):
    name = "bfl"
    kinds = frozenset({MediaKind.image})
    default_base_url = "https://api.bfl.ai"
    default_typical_seconds = {"image": 10}
    default_concurrency = 24  # BFL's cap of active (submitted, unfinished) tasks per key
    supports_callbacks = True
    callback_auth = "token"
    retention = "signed result URLs expire 10 minutes after the task is Ready (collected at once)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)

    # -- validation ----------------------------------------------------------------------
    def family(self, model: str) -> Family:
        if model in MODELS:
            return MODELS[model]
        listed = self.settings.extra.get("extra_models") or []
        patterns = [listed] if isinstance(listed, str) else [str(p) for p in listed]
        if _MODEL.match(model) and any(fnmatch.fnmatchcase(model, p) for p in patterns):
            return GENERIC
        raise InvalidInput("model", f"BFL models are the API's routes ({', '.join(MODELS)}); newer ones must be "
                                    "listed in [providers.bfl] extra_models")

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.body(request)

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The create body without the input image, callbacks and secrets; raises ``InvalidInput``."""
        family, given = self.family(request.model), request.input
        # A source's stored output is the input image (its URL is only known at submit).
        has_image = given.image_url is not None or request.source is not None
        body: dict[str, Any] = {}
        if given.prompt:
            body["prompt"] = given.prompt
        elif family.prompt_required:
            raise InvalidInput("input.prompt", f"{request.model} needs a prompt")
        elif not has_image:
            raise InvalidInput("input.prompt", f"{request.model} needs a prompt or an input image")
        if family.image_required and not has_image:
            raise InvalidInput("input.image_url", f"{request.model} edits an image: give image_url or a source job")
        for name in ("negative_prompt", "duration_seconds"):
            if getattr(given, name) is not None:
                raise InvalidInput(f"input.{name}", f"FLUX has no {name.replace('_', ' ')}")
        if given.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", "BFL renders one image per task")
        if given.seed is not None:
            body["seed"] = given.seed
        body |= _size(request.model, family, given.aspect_ratio, given.resolution)
        for key, value in given.options.items():
            where = f"input.options.{key}"
            if key in _RESERVED:
                use = _RESERVED[key]
                raise InvalidInput(where, f"give it as {use}" if use else "Atelier sets it (callbacks)")
            if not _OPTION_NAME.match(key):
                raise InvalidInput(where, "BFL input names are identifiers")
            if key in body:
                raise InvalidInput(where, "already set from the common fields (aspect_ratio / resolution)")
            body[key] = value
        if family is not GENERIC:
            _check_options(request.model, family, body)
        try:
            json.dumps(body, allow_nan=False)
        except ValueError as exc:
            raise InvalidInput("input.options", "options must be plain JSON") from exc
        return body

    # -- submit ----------------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"x-key": ctx.api_key, "User-Agent": "atelier", "Accept": "application/json"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        body = self.body(request)
        family = self.family(request.model)
        if request.input.image_url is not None:
            data = (await fetch_input(ctx, request.input.image_url, max_bytes=MAX_IMAGE_BYTES,
                                      code="input_image_unavailable"))[0]
            body[family.image_field] = base64.b64encode(data).decode()
        if ctx.callback_url:
            body["webhook_url"] = ctx.callback_url
            body["webhook_secret"] = webhook_secret(ctx.callback_url)
        response = await send(ctx.http, ctx.http.build_request(
            "POST", f"{self.base_url}/v1/{request.model}", json=body, headers=self._headers(ctx)),
            creates=True, timeout=ctx.timeout)
        _raise_for_error(response)
        answer = expect_object(parse_json(response), "BFL submission")
        task_id = answer.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("BFL accepted the request without an id", detail=str(answer)[:300])
        cost = answer.get("cost")
        state = BflTask(polling_url=self._polling_url(answer.get("polling_url")),
                        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None)
        return SubmitResult(task_id=task_id, status=str(answer.get("status") or "Pending"), state=state)

    def _polling_url(self, url: Any) -> str | None:
        """``url`` if the key may be sent there: HTTPS on bfl.ai (or a subdomain), or our base URL's origin."""
        if not isinstance(url, str) or not url:
            return None
        parts = urlsplit(url)
        host = parts.hostname or ""
        on_bfl = parts.scheme == "https" and (host == "bfl.ai" or host.endswith(".bfl.ai"))
        if on_bfl or (parts.scheme, host, parts.port) == self._origin:
            return url
        log.warning("bfl returned a polling_url on another host (%s); polling the base URL instead", host)
        return None

    # -- status ----------------------------------------------------------------------------
    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        state = BflTask.of(task)
        if state.polling_url:
            request = ctx.http.build_request("GET", state.polling_url, headers=self._headers(ctx))
        else:
            request = ctx.http.build_request("GET", f"{self.base_url}/v1/get_result", params={"id": task.task_id},
                                             headers=self._headers(ctx))
        response = await send(ctx.http, request)
        raise_for_common_status(response, detail=_error(response) if response.status_code >= 400 else None)
        return result_status(expect_object(parse_json(response), "BFL result"), state,
                             self.settings.extra.get("usd_per_credit", USD_PER_CREDIT))

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """The per-job token in the URL authenticates (the API checks it); this only parses."""
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("BFL webhook body is not JSON") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            raise CallbackRejected("BFL webhook body has no task id")
        status = payload.get("status")
        return CallbackHint(task_id=payload["id"], raw_status=status if isinstance(status, str) else None)


def webhook_secret(callback_url: str) -> str:
    """The job's ``webhook_secret``: derived from the callback URL's per-job token (never the API key)."""
    token = parse_qs(urlsplit(callback_url).query).get("token", [callback_url])[0]
    return hmac.new(token.encode(), b"atelier bfl webhook_secret", hashlib.sha256).hexdigest()


def result_status(body: dict[str, Any], state: BflTask, usd_per_credit: Any = USD_PER_CREDIT) -> TaskStatus:
    """A ``get_result`` answer, translated (status strings compared exactly: they have spaces). A Ready
    task's usage is the ``cost`` its submission reported (credits, in USD at ``usd_per_credit``);
    whether a moderated task is billed is UNCONFIRMED, so a failure reports none."""
    raw = body.get("status")
    if not isinstance(raw, str):
        raise MalformedResponse("BFL result has no status", detail=str(body)[:300])
    if raw == "Task not found":
        raise TaskNotFound("BFL does not know this task (Task not found)", detail=str(body)[:300])
    details = body.get("details")
    if raw == "Ready":
        result = body.get("result")
        sample = result.get("sample") if isinstance(result, dict) else None
        if not isinstance(sample, str) or not sample.startswith(("https://", "http://")):
            return TaskStatus(state="failed", raw_status=raw, error_code="provider_no_output",
                              error_message="BFL reported Ready without a result.sample URL",
                              error_detail={"result": str(result)[:300]})
        metadata: dict[str, Any] = {}
        if isinstance(result, dict):
            metadata |= {key: result[key] for key in ("prompt", "seed") if result.get(key) is not None}
        if state.cost is not None:
            metadata["cost_credits"] = state.cost
        return TaskStatus(state="succeeded", raw_status=raw, progress=100,
                          outputs=[ProviderOutput(url=sample, metadata=metadata)],
                          usage=usage(cost=credits_in_usd(state.cost, usd_per_credit)))
    if raw in MODERATED:
        reasons = details.get("Moderation Reasons") if isinstance(details, dict) else None
        said = f": {', '.join(str(r) for r in reasons)}" if isinstance(reasons, list) and reasons else ""
        which = "the request" if raw == "Request Moderated" else "the generated image"
        return TaskStatus(state="failed", raw_status=raw, error_code="content_policy",
                          error_message=f"BFL's moderation refused {which}{said}", error_detail={"details": details})
    if raw == "Error":
        cause = body.get("error") or body.get("message") or details
        return TaskStatus(state="failed", raw_status=raw, error_code="provider_failed",
                          error_message=f"BFL reports the generation failed{': ' + str(cause)[:200] if cause else ''}",
                          error_detail={"details": details})
    if raw != "Pending":
        log.info("bfl: status %r is not documented; treating it as running", raw)
    progress = _progress(body.get("progress"))
    queued = raw == "Pending" and progress is None
    return TaskStatus(state="queued" if queued else "running", raw_status=raw, progress=progress)


# -- helpers ------------------------------------------------------------------------------------

def _progress(value: Any) -> int | None:
    """``progress`` as a percentage (BFL's scale is UNCONFIRMED: 0-1 and 0-100 are both seen)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return min(99, round(value * 100 if value <= 1 else value))


def _ratio(text: str, model: str) -> float:
    w, h = (int(v) for v in text.split(":"))
    if not w or not h or not 9 / 21 <= w / h <= 21 / 9:
        raise InvalidInput("input.aspect_ratio", f"{model} takes aspect ratios between 21:9 and 9:21")
    return w / h


def _size(model: str, family: Family, aspect_ratio: str | None, resolution: str | None) -> dict[str, Any]:
    """``aspect_ratio`` / ``resolution`` as the family takes them."""
    if family.size == "none":
        for name, value in (("aspect_ratio", aspect_ratio), ("resolution", resolution)):
            if value is not None:
                raise InvalidInput(f"input.{name}", f"{model} keeps the input image's size")
        return {}
    if family.size == "ratio":
        if resolution is not None:
            raise InvalidInput("input.resolution", f"{model} takes an aspect_ratio, not a resolution")
        if aspect_ratio is None:
            return {}
        _ratio(aspect_ratio, model)
        return {"aspect_ratio": aspect_ratio}
    if resolution is not None:
        match = _WXH.match(resolution)
        if match is None:
            raise InvalidInput("input.resolution", f"{model} takes a WxH resolution")
        if aspect_ratio is not None:
            raise InvalidInput("input.aspect_ratio", "give either an aspect ratio or a resolution, not both")
        width, height = int(match.group(1)), int(match.group(2))
    elif aspect_ratio is not None:
        ratio = _ratio(aspect_ratio, model)
        side = family.multiple
        width = round(math.sqrt(TARGET_PIXELS * ratio) / side) * side
        height = round(width / ratio / side) * side
        scale = min(1.0, family.max_side / max(width, height))
        width, height = (round(width * scale / side) * side, round(height * scale / side) * side)
    else:
        return {}
    where = "input.resolution" if resolution is not None else "input.aspect_ratio"
    if width % family.multiple or height % family.multiple:
        raise InvalidInput(where, f"{model} sizes are multiples of {family.multiple}")
    if not all(family.min_side <= v <= family.max_side for v in (width, height)):
        raise InvalidInput(where, f"{model} sides are {family.min_side} to {family.max_side} pixels")
    if family is FLUX2 and width * height > MAX_FLUX2_PIXELS:
        raise InvalidInput(where, f"{model} renders at most 4 megapixels")
    return {"width": width, "height": height}


def _check_options(model: str, family: Family, body: dict[str, Any]) -> None:
    fmt = body.get("output_format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise InvalidInput("input.options.output_format", f"one of {', '.join(OUTPUT_FORMATS)}")
    safety = body.get("safety_tolerance")
    if safety is not None and (isinstance(safety, bool) or not isinstance(safety, int)
                               or not 0 <= safety <= family.max_safety):
        raise InvalidInput("input.options.safety_tolerance", f"{model}: an integer from 0 to {family.max_safety}")


def _error(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"body": response.text[:300]}


def _message(error: Any, status: int) -> str:
    """FastAPI's ``detail``: a string, or a list of ``{loc, msg}``."""
    detail = error.get("detail") if isinstance(error, dict) else None
    if isinstance(detail, list):
        items = [f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
                 if isinstance(d, dict)]
        return "; ".join(items)[:300] or f"HTTP {status}"
    return str(detail or (error.get("message") if isinstance(error, dict) else None) or f"HTTP {status}")[:300]


def _raise_for_error(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    error = _error(response)
    message = _message(error, status)
    if status == 429:
        raise RateLimited(f"BFL: too many active tasks: {message}", retry_after=retry_after_seconds(response.headers),
                          detail=error)
    if status == 402:
        raise InsufficientBalance(f"BFL refused the request: {message}", detail=error, status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"BFL refused the key (HTTP {status}): {message}", detail=error, status_code=status)
    if status in (400, 404, 413, 422):
        raise Rejected(f"BFL refused the request: {message}", detail=error, status_code=status,
                       code="model_not_found" if status == 404 else "provider_rejected_input")
    raise_for_common_status(response, creates=True, detail=error)
