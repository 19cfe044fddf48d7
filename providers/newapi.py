"""Unified video tasks of new-api-style gateways (new-api, one-api forks, n1n...): any video model a
gateway routes, in one task format.

The base URL is the gateway's origin (plus any path prefix); there is no default: a gateway must be
configured (``ATELIER_NEWAPI_BASE_URL``). Auth: ``Authorization: Bearer sk-...`` (the gateway's key).

Endpoints (shared/providers replicate-fal-suno-gateways.md §4.1, video-wave2.md §8):

* ``POST /v1/video/generations``: ``{model, prompt, image, images[], duration, size, metadata}``.
  The model is whatever the gateway routes (``kling-v2-1``, ``MiniMax-Hailuo-02``,
  ``doubao-seedance-1-0-pro``, ``wan2.2-t2v-plus``, ``viduq1``, ``veo3.1``...). Common fields map to
  ``prompt``, ``image``/``images`` (``image_url`` first, then ``options.images``), ``duration``
  (whole seconds) and ``size`` (``WIDTHxHEIGHT`` from ``resolution``/``aspect_ratio``; 720p and
  16:9 when only one is given); ``negative_prompt``, ``seed`` and every other option go in
  ``metadata``, the vendor extras new-api's channel adaptors merge into the upstream request.
  The answer is an OpenAI-style video object (``id`` and ``task_id``), or the published
  ``{task_id, status}``, or a new-api envelope around either: the task id is taken from any.
* ``GET /v1/video/generations/{task_id}`` (the id URL-encoded: some gateways put ``:`` in it), in
  any envelope gateways answer: new-api's ``{code: "success", data: <TaskDto>}`` (the media in
  ``result_url``; in 2025 TaskDtos only in the raw upstream ``data``), the real-time shape of
  Gemini/Vertex channels (``data: {status, url, error}``), and the bare documented shapes
  ``{task_id, status, url}``, ``{id, status, video_url}`` and the OpenAI video object
  (``metadata.url``). Without a URL at the top level, the raw upstream body of the model's family
  is read (Kling ``data.task_result.videos[].url``, Doubao ``content.video_url``, Wan
  ``output.video_url``, Vidu ``creations[].url``, Jimeng ``data.video_url``, Grok ``video.url``,
  Veo ``...generatedSamples[].video.uri``). Only the top-level status counts: after the gateway's
  timeout sweep ``data`` still holds a stale upstream body.
* No cancel endpoint (canceled locally), no callbacks, and no lookup by a client id: an ambiguous
  create cannot be reconciled and fails ``provider_outcome_unknown``.

Statuses: ``NOT_START``, ``""`` and ``unknown`` (the row before the gateway's first refresh),
``SUBMITTED``, ``QUEUED``, ``queued``, ``pending`` -> queued; ``IN_PROGRESS``, ``in_progress``,
``processing``, ``running`` -> running; ``SUCCESS``, ``completed``, ``succeeded`` -> succeeded;
``FAILURE``, ``failed`` -> failed (``fail_reason`` or ``error.message``; the gateway's own 24 h
sweep, "任务超时", is ``provider_gateway_timeout``). A gateway refreshes a task from its upstream
every 15 s at best, so polls come no faster than ``extra["refresh_seconds"]`` (15).

Errors: task errors ``{code: "<string>", message, data: null}``; 429 ("当前分组上游负载已饱和")
-> RateLimited; ``quota_not_enough`` & co -> InsufficientBalance (the key leaves the pool);
``task_not_exist`` on fetch -> TaskNotFound; ``fail_to_fetch_task`` carries the upstream's status
and body: a 4xx is Rejected (``provider_rejected_input`` for 400), a 5xx is handled like the
gateway's own. Auth and distribution errors are OpenAI-style ``{"error": {...}}`` (503 "无可用渠道"
-> ``model_not_found``). Content refusals, at submit or in a failed task, are recognised by the
vendors' moderation codes (Ark ``*SensitiveContentDetected``, DashScope ``DataInspectionFailed``,
Vidu ``*PolicyViolation``, MiniMax 1026/1027, Jimeng 504xx/505xx, Kling 1301, Veo's
``raiMediaFiltered*``, Grok's ``respect_moderation: false``) or wording (Veo's "you have not been
charged", risk control, sensitive, moderation...) and fail with ``content_policy``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from typing import Any, TypeGuard
from urllib.parse import quote, urlsplit

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    ProviderState,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.http import (
    expect_object,
    gateway_quota_exhausted,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
)

log = logging.getLogger(__name__)

GENERATIONS = "/v1/video/generations"
DEFAULT_REFRESH_SECONDS = 15.0
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_DIMENSIONS = re.compile(r"(\d{2,5})\s*[x*×]\s*(\d{2,5})")
_LINES = re.compile(r"(\d{3,4})p", re.IGNORECASE)
_RATIO = re.compile(r"(\d{1,2}):(\d{1,2})")
NAMED_LINES = {"2k": 1440, "4k": 2160}
# Fields of the request body that the common inputs set; an option cannot set them too.
RESERVED_OPTIONS = {"model": "model", "prompt": "input.prompt", "image": "input.image_url",
                    "image_url": "input.image_url", "duration": "input.duration_seconds",
                    "seconds": "input.duration_seconds", "size": "input.resolution / input.aspect_ratio",
                    "metadata": "input.options", "input_reference": "input.image_url"}

# Status spellings of every envelope (new-api rows, ToVideoStatus, real-time channels, n1n), lower-cased.
_STATES: dict[str, ProviderState] = {
    "": "queued", "not_start": "queued", "unknown": "queued", "submitted": "queued", "queued": "queued",
    "pending": "queued",
    "in_progress": "running", "processing": "running", "running": "running",
    "success": "succeeded", "completed": "succeeded", "succeeded": "succeeded",
    "failure": "failed", "failed": "failed",
    "cancelled": "canceled", "canceled": "canceled",
}

# Where each upstream family's raw body (``TaskDto.data``) keeps the video; ``*`` walks a list.
RAW_MEDIA_PATHS: tuple[tuple[str, ...], ...] = (
    ("data", "task_result", "videos", "*", "url"),  # Kling
    ("task_result", "videos", "*", "url"),  # Kling, unwrapped
    ("content", "video_url"),  # Doubao Seedance (Ark)
    ("output", "video_url"),  # Wan (DashScope)
    ("creations", "*", "url"),  # Vidu
    ("data", "video_url"),  # Jimeng
    ("video", "url"),  # Grok (xAI)
    ("response", "generateVideoResponse", "generatedSamples", "*", "video", "uri"),  # Veo (Gemini API)
    ("video_url",), ("url",), ("metadata", "url"),  # OpenAI/Sora-like upstreams
)

# Vendors' moderation codes (string codes anywhere; numeric ones under a code field).
MODERATION_CODES = frozenset({
    "InputTextSensitiveContentDetected", "InputImageSensitiveContentDetected",
    "InputImageSensitiveContentDetected.PrivacyInformation", "InputTextRiskDetection", "SensitiveContentDetected",
    "OutputVideoSensitiveContentDetected", "DataInspectionFailed", "InvalidParameter.DataInspection",
    "TaskPromptPolicyViolation", "AuditSubmitIllegal", "CreationPolicyViolation", "content_policy_violation",
    "moderation_blocked", "sensitive_words_detected",
})
MODERATION_NUMBERS = frozenset({1026, 1027, 1301, 50411, 50412, 50413, 50511, 50512})
_CODE_FIELDS = ("code", "status_code", "err_code", "reason")
_MODERATION_TEXT = re.compile(
    r"risk control|risk not pass|sensitive|inappropriate|content polic|polic(y|ies) ?violation|moderat|"
    r"safety|(have|has|will) not (been |be )?charged|违规|敏感|审核", re.IGNORECASE)


# -- request building (validation happens here, before anything is sent) ----------------------

def newapi_body(model: str, job_input: MediaInput) -> dict[str, Any]:
    """The create body for a job; raises ``InvalidInput`` naming the field."""
    if not _MODEL.fullmatch(model):
        raise InvalidInput("model", "a gateway model name is letters, digits and . _ : / + - (at most 128)")
    if not isinstance(job_input.prompt, str) or not job_input.prompt.strip():
        raise InvalidInput("input.prompt", "the gateway's video channels need a prompt")
    if job_input.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "a gateway video task renders one video")
    body: dict[str, Any] = {"model": model, "prompt": job_input.prompt}
    images = [str(job_input.image_url)] if job_input.image_url is not None else []
    metadata: dict[str, Any] = {}
    for key, value in job_input.options.items():
        if key in RESERVED_OPTIONS:
            raise InvalidInput(f"input.options.{key}", f"set by Atelier from {RESERVED_OPTIONS[key]}")
        if not _OPTION.fullmatch(key):
            raise InvalidInput(f"input.options.{key}", "option names are identifiers")
        if key == "images":
            if not isinstance(value, list) or not value:
                raise InvalidInput("input.options.images", "images is a non-empty list of image URLs")
            images += [_image(f"input.options.images[{i}]", v) for i, v in enumerate(value)]
        else:
            metadata[key] = value
    if images:
        _image("input.image_url", images[0])
        body["image"] = images[0]
        body["images"] = images
    if job_input.duration_seconds is not None:
        seconds = job_input.duration_seconds
        if not float(seconds).is_integer() or not 1 <= seconds <= 60:
            raise InvalidInput("input.duration_seconds", "the gateway takes whole seconds (1 to 60)")
        body["duration"] = int(seconds)
    size = video_size(job_input.resolution, job_input.aspect_ratio)
    if size is not None:
        body["size"] = size
    if job_input.negative_prompt is not None:
        metadata["negative_prompt"] = job_input.negative_prompt
    if job_input.seed is not None:
        metadata["seed"] = job_input.seed
    if metadata:
        body["metadata"] = metadata
    return body


def _image(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://", "data:image/")):
        raise InvalidInput(field, "an image is an http(s) URL or a data:image/... URI")
    return value


def video_size(resolution: str | None, aspect_ratio: str | None) -> str | None:
    """``WIDTHxHEIGHT`` from a resolution (``720p``, ``4k`` or ``1280x720``) and an aspect ratio."""
    if resolution is None and aspect_ratio is None:
        return None
    ratio = (16, 9)
    if aspect_ratio is not None:
        match = _RATIO.fullmatch(aspect_ratio.strip())
        if match is None or 0 in (int(match[1]), int(match[2])):
            raise InvalidInput("input.aspect_ratio", "an aspect ratio is W:H, e.g. 16:9")
        ratio = (int(match[1]), int(match[2]))
    text = (resolution or "720p").strip().lower()
    if (dims := _DIMENSIONS.fullmatch(text)) is not None:
        width, height = int(dims[1]), int(dims[2])
        if aspect_ratio is not None and width * ratio[1] != height * ratio[0]:
            raise InvalidInput("input.aspect_ratio", f"{aspect_ratio} does not match the resolution {resolution}")
        return f"{width}x{height}"
    lines = NAMED_LINES.get(text) or (int(m[1]) if (m := _LINES.fullmatch(text)) else None)
    if lines is None:
        raise InvalidInput("input.resolution", "a resolution is 480p, 720p, 1080p, 4k... or WIDTHxHEIGHT")

    def even(x: float) -> int:
        return 2 * round(x / 2)

    if ratio[0] >= ratio[1]:
        return f"{even(lines * ratio[0] / ratio[1])}x{lines}"
    return f"{lines}x{even(lines * ratio[1] / ratio[0])}"


# -- the adapter ------------------------------------------------------------------------------

class NewApiProvider(Provider):
    name = "newapi"
    kinds = frozenset({MediaKind.video})
    default_base_url = ""  # a gateway's origin must be configured
    default_typical_seconds = {"video": 60}
    supports_cancel = False
    supports_callbacks = False
    retention = "the upstream's (vendor URLs signed for hours to days; a gateway's proxy URL while the task is kept)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)

    @property
    def refresh_seconds(self) -> float:
        """How often the gateway refreshes a task from its upstream (new-api: every 15 s at best)."""
        return float(self.settings.extra.get("refresh_seconds", DEFAULT_REFRESH_SECONDS))

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if request.source is not None and request.source.kind != MediaKind.image:
            raise InvalidInput("source", f"a gateway video task takes an image source (its first frame), "
                                         f"not {request.source.kind}")
        newapi_body(request.model, request.input)

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        body = newapi_body(request.model, request.input)
        http_request = ctx.http.build_request("POST", f"{self.base_url}{GENERATIONS}", json=body,
                                              headers=self._headers(ctx))
        response = await send(ctx.http, http_request, creates=True, timeout=ctx.timeout)
        payload = _json_or_error(response, creates=True)
        raise_for_gateway_error(response, payload, creates=True)
        task_id, status = created_task(payload)
        # A gateway never calls back and cannot be asked for a task by our id.
        return SubmitResult(task_id=task_id, status=status, callback_expected=False)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}{GENERATIONS}/{quote(task.task_id, safe='')}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        payload = _json_or_error(response, creates=False)
        raise_for_gateway_error(response, payload, creates=False)
        status = parse_task(payload)
        if status.state in ("queued", "running", "unknown"):
            # The row changes only when the gateway refreshes it: asking sooner only spends the budget.
            status.poll_after = self.refresh_seconds * random.uniform(1.0, 1.2)
        return status

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """Vendor URLs are signed (no auth); the gateway's own proxy URLs take its key."""
        parts = urlsplit(url)
        if (parts.scheme, parts.hostname or "", parts.port) == self._origin:
            return {"Authorization": f"Bearer {ctx.api_key}"}
        return {}


# -- responses ----------------------------------------------------------------------------------

def created_task(payload: dict[str, Any]) -> tuple[str, str | None]:
    """``(task id, status)`` from a create answer in any shape gateways give."""
    inner = payload.get("data") if payload.get("code") == "success" else payload
    if isinstance(inner, str | int) and not isinstance(inner, bool) and str(inner):
        return str(inner), None  # {code: "success", data: "task_..."}
    task = inner if isinstance(inner, dict) else {}
    task_id = task.get("task_id") or task.get("id")
    if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
        raise MalformedResponse("the gateway created a task without an id", detail=_excerpt(payload))
    status = task.get("status")
    return str(task_id), None if status is None else str(status)


def parse_task(payload: dict[str, Any]) -> TaskStatus:
    """A task in any envelope: new-api's ``{code, data}``, or a bare documented shape."""
    row = payload.get("data") if payload.get("code") == "success" else payload
    if not isinstance(row, dict) or "status" not in row:
        raise MalformedResponse("the gateway answered a task without a status", detail=_excerpt(payload))
    raw = "" if row["status"] is None else str(row["status"])
    state = _STATES.get(raw.lower())
    if state is None:
        log.warning("newapi: unknown task status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(row.get("progress")))
    upstream = row.get("data")
    if state == "succeeded":
        status.progress = 100
        status.outputs = [ProviderOutput(url=url, content_type="video/mp4") for url in media_urls(row)]
        if not status.outputs:
            status.state = "failed"
            if _moderated(upstream):
                status.error_code = "content_policy"
                status.error_message = "the upstream withheld the video (content moderation)"
            else:
                status.error_code = "provider_no_output"
                status.error_message = "the gateway reported success without a video URL"
            status.error_detail = {"task_id": _task_id(row), "upstream": _excerpt(upstream)}
    elif state in ("failed", "canceled"):
        error = row.get("error")
        message = str(error.get("message") or "") if isinstance(error, dict) else ""
        reason = str(row.get("fail_reason") or "") or message
        if "超时" in reason or re.search(r"task (timed out|timeout)", reason, re.IGNORECASE):
            status.error_code = "provider_gateway_timeout"
            status.error_message = f"the gateway gave up on the task: {reason}"
        elif _moderated(upstream) or _moderated(error) or _MODERATION_TEXT.search(reason):
            status.error_code = "content_policy"
            status.error_message = f"the upstream refused the content: {reason or 'no reason given'}"
        else:
            status.error_code = "provider_failed" if state == "failed" else "provider_canceled"
            status.error_message = reason or f"the gateway reported the task {state}"
        status.error_detail = {"task_id": _task_id(row), "fail_reason": reason,
                               "upstream": _excerpt(upstream) if upstream is not None else None}
    return status


def media_urls(row: dict[str, Any]) -> list[str]:
    """The video URLs of a finished task: top-level fields first, then the raw upstream body."""
    metadata = row.get("metadata")
    for value in (row.get("result_url"), row.get("url"), row.get("video_url"),
                  metadata.get("url") if isinstance(metadata, dict) else None):
        if _is_url(value):
            return [value]
    upstream = row.get("data")
    for path in RAW_MEDIA_PATHS:
        urls = [v for v in _walk(upstream, path) if _is_url(v)]
        if urls:
            return urls
    return []


def _walk(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        yield value
    elif path[0] == "*":
        for item in value if isinstance(value, list) else []:
            yield from _walk(item, path[1:])
    elif isinstance(value, dict) and path[0] in value:
        yield from _walk(value[path[0]], path[1:])


def _is_url(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def _moderated(value: Any) -> bool:
    """Whether an upstream body (or error) carries a vendor's moderation marker."""
    if isinstance(value, list):
        return any(_moderated(v) for v in value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)  # a relayed upstream body
        except ValueError:
            return value in MODERATION_CODES
        return isinstance(parsed, dict | list) and _moderated(parsed)
    if not isinstance(value, dict):
        return False
    for key, item in value.items():
        if key in _CODE_FIELDS and (item in MODERATION_CODES or (
                isinstance(item, int) and not isinstance(item, bool) and item in MODERATION_NUMBERS)):
            return True
        if (key == "raiMediaFilteredCount" and item) or (key == "respect_moderation" and item is False):
            return True
        if isinstance(item, dict | list) and _moderated(item):
            return True
    return False


def _task_id(row: dict[str, Any]) -> Any:
    return row.get("task_id") or row.get("id")


def _percent(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return max(0, min(100, int(float(str(value).rstrip("%") or 0))))
    except ValueError:
        return None


# -- errors -------------------------------------------------------------------------------------

def _json_or_error(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The body as an object; a non-JSON error body is mapped by its HTTP status."""
    try:
        body = response.json()
    except ValueError:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    return expect_object(body, "response")


def raise_for_gateway_error(response: httpx.Response, payload: dict[str, Any], *, creates: bool) -> None:
    """Raise the error a gateway answer stands for (nothing if it is a task or a created one)."""
    code = payload.get("code")
    if isinstance(code, str) and code != "success":
        raise task_error(code, str(payload.get("message") or ""), response, creates=creates)
    error = payload.get("error")
    if isinstance(error, dict) and "status" not in payload:  # OpenAI-style: auth, distribution
        raise openai_error(error, response, creates=creates)
    raise_for_common_status(response, creates=creates, detail=_excerpt(payload))


def task_error(code: str, message: str, response: httpx.Response, *, creates: bool) -> ProviderError:
    """new-api task errors ``{code, message, data: null}`` (HTTP status = the error's)."""
    status = response.status_code
    detail = {"code": code, "message": message}
    text = f"{code}: {message}" if message else code
    if code == "task_not_exist" and not creates:
        return TaskNotFound(f"the gateway does not know this task ({text})", detail=detail, status_code=status)
    if status == 429:  # every final 429 reads "当前分组上游负载已饱和" (the group's upstreams are saturated)
        return RateLimited(f"the gateway is saturated ({text})", retry_after=retry_after_seconds(response.headers),
                           detail=detail, status_code=status)
    if gateway_quota_exhausted(code, message):
        return InsufficientBalance(f"the gateway says the key's quota is used up ({text})", detail=detail,
                                   status_code=status)
    if code in MODERATION_CODES or _moderated(message) or _MODERATION_TEXT.search(message):
        return Rejected(f"the upstream refused the content ({text})", code="content_policy", detail=detail,
                        status_code=status)
    if code == "model_not_found":
        return Rejected(f"the gateway routes no channel for this model ({text})", code="model_not_found",
                        detail=detail, status_code=status)
    if code == "fail_to_fetch_task" and status in (401, 403):
        # The upstream refused the gateway's channel credentials, not our key.
        return Unavailable(f"the gateway's upstream channel refused its credentials ({text})", detail=detail,
                           status_code=status)
    if 400 <= status < 500 and status not in (401, 403, 404, 410):
        input_code = "provider_rejected_input" if status == 400 else "provider_rejected"
        return Rejected(f"the gateway refused the request ({text})", code=input_code, detail=detail,
                        status_code=status)
    try:
        raise_for_common_status(response, creates=creates, detail=detail)
    except ProviderError as exc:
        exc.message = f"{exc.message}: {text}"
        return exc
    return Rejected(f"the gateway refused the request ({text})", detail=detail, status_code=status)


def openai_error(error: dict[str, Any], response: httpx.Response, *, creates: bool) -> ProviderError:
    """OpenAI-style gateway errors ``{"error": {message, type, code}}`` (auth, model distribution)."""
    status = response.status_code
    message = str(error.get("message") or "")
    code = error.get("code")
    detail = {"error": {k: error.get(k) for k in ("message", "type", "code")}}
    if status == 429:
        return RateLimited(f"the gateway is saturated ({message})", retry_after=retry_after_seconds(response.headers),
                           detail=detail, status_code=status)
    if gateway_quota_exhausted(code, message):
        return InsufficientBalance(f"the gateway says the key's quota is used up ({message})", detail=detail,
                                   status_code=status)
    if code == "model_not_found" or "无可用渠道" in message:
        return Rejected(f"the gateway routes no channel for this model ({message})", code="model_not_found",
                        detail=detail, status_code=status)
    if code in MODERATION_CODES:
        return Rejected(f"the gateway refused the content ({message})", code="content_policy", detail=detail,
                        status_code=status)
    try:
        raise_for_common_status(response, creates=creates, detail=detail)
    except ProviderError as exc:
        exc.message = f"{exc.message}: {message}"
        return exc
    return Rejected(f"the gateway refused the request ({message})", detail=detail, status_code=status)


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str, ensure_ascii=False)[:300]}
