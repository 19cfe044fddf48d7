"""xAI Grok Imagine video (REST; ``Authorization: Bearer <key>``).

The base URL is the origin (``https://api.x.ai``); the routes carry ``/v1``.

Endpoints (the reference shows no image route, so only video):

* ``POST /v1/videos/generations``: text-to-video; ``image: {url}`` (an object, not a string) is the
  start frame, ``reference_images: [{url}]`` pass through ``options``.
* ``POST /v1/videos/edits`` (follow-up ``edit``) and ``POST /v1/videos/extensions`` (follow-up
  ``extend``): ``video: {url}`` is the source job's stored output.
* ``GET /v1/videos/{request_id}``: the status and the result.

Every create answers only ``{"request_id"}``: there is no status until the first poll.
Statuses: ``pending`` (no separate queued state; some gateways answer only ``{"request_id"}``
while pending) -> running; ``done`` **with** ``video.url`` -> succeeded; ``done`` without a URL
(``respect_moderation: false``) -> failed ``content_policy``; ``failed`` (HTTP 200, ``error:
{code, message}``) -> failed; ``expired`` -> failed ``output_expired``. Anything else is
non-terminal and logged. ``usage.cost_in_usd_ticks`` is kept raw in the output's metadata.

Errors: ``{"code": "<gRPC text>", "error": "<message>"}`` or OpenAI-style ``{"error": {message,
code}}`` (CONFLICT: both read). An invalid API key is **400** at xAI ("Incorrect API key
provided"): AuthFailed, not a bad request. 404 at create naming the model is an unknown model; 422 (body not
deserialised) and 400 are refused input.

No callbacks, no cancel, no list and no client id: an ambiguous create cannot be looked up and
fails ``provider_outcome_unknown``. ``duration`` is always sent (the clients' defaults differ:
6 or 8 s; ``extra["default_duration"]``, 8 as in xAI's SDK); ``1080p`` only with
``extra["allow_1080p"]`` (UNCONFIRMED). Video URLs are temporary (24 h per the SDK).
"""

from __future__ import annotations

import json
import logging
from typing import Any

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
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send

log = logging.getLogger(__name__)

MODEL_PREFIX = "grok-imagine-video"
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
RESOLUTIONS = ("480p", "720p")
ENDPOINTS = {"generate": "generations", "edit": "edits", "extend": "extensions"}
# Set from the common fields (or the source job) by Atelier; options may not override them.
RESERVED_OPTIONS = {"model": "model", "prompt": "input.prompt", "image": "input.image_url",
                    "image_url": "input.image_url", "video": "source", "duration": "input.duration_seconds",
                    "aspect_ratio": "input.aspect_ratio", "resolution": "input.resolution",
                    "size": "input.aspect_ratio and input.resolution"}
VIDEO = frozenset({MediaKind.video})


class XaiProvider(Provider):
    name = "xai"
    default_base_url = "https://api.x.ai"
    default_typical_seconds = {"video": 90}
    kinds = VIDEO
    supports_cancel = False
    supports_callbacks = False
    retention = "video URLs are temporary (24 h per xAI's SDK; UNCONFIRMED); requests cannot be listed"
    operations = (
        Operation("edit", source="media", source_kinds=VIDEO,
                  description="edit a stored video with a prompt (POST /v1/videos/edits)"),
        Operation("extend", source="media", source_kinds=VIDEO,
                  description="continue a stored video (POST /v1/videos/extensions)"),
    )

    # -- validation ---------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.build_body(request)

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The create body (without the source video); raises ``InvalidInput`` naming the field."""
        if not request.model.startswith(MODEL_PREFIX):
            raise InvalidInput("model", "xAI video models are grok-imagine-video, grok-imagine-video-1.5...")
        given = request.input
        if not (given.prompt or "").strip():
            raise InvalidInput("input.prompt", "xAI needs a prompt")
        for name in ("negative_prompt", "seed"):
            if getattr(given, name) is not None:
                raise InvalidInput(f"input.{name}", f"xAI video has no {name}")
        if given.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", "xAI renders one video per request")
        body: dict[str, Any] = {"model": request.model, "prompt": given.prompt}
        if request.operation != "generate" and given.image_url is not None:
            raise InvalidInput("input.image_url", f"{request.operation} acts on the source video, not an image")
        if request.operation == "edit":
            others = [name for name in given.fields() if name != "prompt"]
            if others:
                raise InvalidInput(f"input.{others[0]}", "an edit takes a prompt; the source video sets the rest")
        else:
            body["duration"] = self._duration(given.duration_seconds)
            if request.operation == "generate":
                body |= self._shape(given.aspect_ratio, given.resolution)
                if given.image_url is not None:
                    body["image"] = {"url": _media_url("input.image_url", given.image_url)}
            elif given.aspect_ratio is not None or given.resolution is not None:
                field = "aspect_ratio" if given.aspect_ratio is not None else "resolution"
                raise InvalidInput(f"input.{field}", "an extension keeps the source video's shape")
        body |= _options(dict(given.options))
        return body

    def _duration(self, seconds: float | None) -> int:
        if seconds is None:
            return int(self.settings.extra.get("default_duration", 8))
        if not float(seconds).is_integer() or not 1 <= seconds <= 15:
            raise InvalidInput("input.duration_seconds", "xAI renders 1 to 15 whole seconds")
        return int(seconds)

    def _shape(self, aspect_ratio: str | None, resolution: str | None) -> dict[str, str]:
        shape: dict[str, str] = {}
        if aspect_ratio is not None:
            if aspect_ratio not in ASPECT_RATIOS:
                raise InvalidInput("input.aspect_ratio", f"xAI renders {', '.join(ASPECT_RATIOS)}")
            shape["aspect_ratio"] = aspect_ratio
        if resolution is not None:
            allowed = RESOLUTIONS + (("1080p",) if self.settings.extra.get("allow_1080p") else ())
            if resolution not in allowed:
                raise InvalidInput("input.resolution", f"xAI renders {', '.join(allowed)}")
            shape["resolution"] = resolution
        return shape

    # -- the task -----------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        body = self.build_body(request)
        if request.operation != "generate":
            if request.source is None or not request.source.url:
                raise InvalidInput("source", f"{request.operation} needs the source job's stored video")
            body["video"] = {"url": request.source.url}
        url = f"{self.base_url}/v1/videos/{ENDPOINTS[request.operation]}"
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        raise_for_xai_error(response, creates=True)
        answer = expect_object(parse_json(response), "create response")
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise MalformedResponse("xAI accepted the video request without a request_id",
                                    detail={"body": _excerpt(answer)})
        return SubmitResult(task_id=request_id)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/v1/videos/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        raise_for_xai_error(response, creates=False)
        return parse_video(expect_object(parse_json(response), "video status"))


# -- responses ----------------------------------------------------------------------------

def parse_video(body: dict[str, Any]) -> TaskStatus:
    """A ``GET /v1/videos/{request_id}`` answer, translated (failures come with HTTP 200)."""
    raw = body.get("status")
    if raw is None and "request_id" in body:
        return TaskStatus(state="running", raw_status="pending")  # some gateways' pending shape
    if not isinstance(raw, str):
        raise MalformedResponse("xAI video status has no status", detail={"body": _excerpt(body)})
    status = raw.lower()
    video: dict[str, Any] = body["video"] if isinstance(body.get("video"), dict) else {}
    if status == "pending":
        return TaskStatus(state="running", raw_status=raw, progress=_progress(body.get("progress")))
    if status == "done":
        url = video.get("url")
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            meta = {k: v for k, v in (("duration", video.get("duration")), ("model", body.get("model"))) if v}
            usage = body.get("usage")
            if isinstance(usage, dict) and usage.get("cost_in_usd_ticks") is not None:
                meta["cost_in_usd_ticks"] = usage["cost_in_usd_ticks"]
            return TaskStatus(state="succeeded", raw_status=raw, progress=100,
                              outputs=[ProviderOutput(url=url, content_type="video/mp4", metadata=meta)])
        if video.get("respect_moderation") is False:
            return TaskStatus(state="failed", raw_status=raw, error_code="content_policy",
                              error_message="xAI's moderation withheld the video (done without a URL)",
                              error_detail={"respect_moderation": False})
        return TaskStatus(state="failed", raw_status=raw, error_code="provider_no_output",
                          error_message="xAI finished the request without a video URL")
    if status == "failed":
        error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
        code, message = str(error.get("code") or ""), str(error.get("message") or "xAI reports the video failed")
        moderated = "moderat" in code.lower() or "moderat" in message.lower()
        return TaskStatus(state="failed", raw_status=raw,
                          error_code="content_policy" if moderated else "provider_failed",
                          error_message=f"xAI: {message}" + (f" ({code})" if code else ""),
                          error_detail={"error": error} if error else None)
    if status == "expired":
        return TaskStatus(state="failed", raw_status=raw, error_code="output_expired",
                          error_message="xAI reports the video request expired (its result lapsed)")
    log.warning("xai: unknown video status %r; treating it as still in progress", raw)
    return TaskStatus(state="unknown", raw_status=raw)


def _progress(value: Any) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0, min(99, int(value)))
    return None


# -- errors ---------------------------------------------------------------------------------

def xai_error(response: httpx.Response) -> tuple[str, str]:
    """``(code, message)`` of an error body: ``{code, error: "<text>"}`` or ``{error: {message, code}}``."""
    try:
        body: Any = response.json()
    except ValueError:
        return "", response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")
        if isinstance(error, str):
            return str(body.get("code") or ""), error
    return "", _excerpt(body)


def raise_for_xai_error(response: httpx.Response, *, creates: bool) -> None:
    status = response.status_code
    if status < 400:
        return
    code, message = xai_error(response)
    detail = {"http_status": status, "code": code, "error": message}
    text = f"xAI answered HTTP {status}: {message}" if message else f"xAI answered HTTP {status}"
    lowered = message.lower()
    if status in (400, 401, 403) and "api key" in lowered:  # xAI answers a bad key with 400
        raise AuthFailed(text, detail=detail, status_code=status)
    if status in (402, 403) and ("credit" in lowered or "spending limit" in lowered):
        raise InsufficientBalance(text, detail=detail, status_code=status)
    if status == 429:
        raise RateLimited(text, retry_after=retry_after_seconds(response.headers), detail=detail)
    if status == 404:
        if creates:
            raise Rejected(text, code="model_not_found" if "model" in lowered else None, detail=detail,
                           status_code=status)
        raise TaskNotFound(text, detail=detail, status_code=status)
    if status in (400, 422):
        raise Rejected(text, code="provider_rejected_input", detail=detail, status_code=status)
    raise_for_common_status(response, creates=creates, detail=detail)


# -- helpers --------------------------------------------------------------------------------

def _media_url(field: str, url: str) -> str:
    if not url.startswith(("https://", "http://", "data:")):
        raise InvalidInput(field, "xAI takes an https URL or a data: URI")
    return url


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    """xAI's own parameters (``reference_images``, ``generate_audio``, ``user``...), checked where known."""
    for key, target in RESERVED_OPTIONS.items():
        if key in opts:
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use {target} instead")
    refs = opts.get("reference_images")
    if refs is not None and not (isinstance(refs, list) and all(
            isinstance(r, dict) and isinstance(r.get("url"), str) for r in refs)):
        raise InvalidInput("input.options.reference_images", "reference_images is a list of {\"url\": ...}")
    if "generate_audio" in opts and not isinstance(opts["generate_audio"], bool):
        raise InvalidInput("input.options.generate_audio", "generate_audio is true or false")
    if "user" in opts and not isinstance(opts["user"], str):
        raise InvalidInput("input.options.user", "user is a string")
    return opts


def _excerpt(value: Any) -> str:
    return json.dumps(value, default=str)[:300]
