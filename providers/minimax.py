"""MiniMax Hailuo video, V1 API (https://platform.minimax.io/docs/api-reference/video-generation-t2v).

The base URL is the host: ``https://api.minimax.io`` (international, the default) or
``https://api.minimaxi.com`` (China); keys are bound to their region. Auth:
``Authorization: Bearer <key>``.

Endpoints:

* ``POST /v1/video_generation``: create -> ``{"task_id", "base_resp"}``. Body ``model, prompt,
  duration`` (6 or 10, an integer), ``resolution`` (``512P``/``720P``/``768P``/``1080P``),
  ``first_frame_image`` (``image_url``: a URL or a ``data:image/...`` URL),
  ``last_frame_image``, ``subject_reference``, ``prompt_optimizer``, ``fast_pretreatment``,
  ``aigc_watermark`` (options) and ``callback_url``.
* ``GET /v1/query/video_generation?task_id=``: ``Preparing``/``Queueing`` -> queued,
  ``Processing`` -> running, ``Success`` -> succeeded, ``Fail`` -> failed (the reason is in
  ``base_resp``: 1026/1027 are ``content_policy``). Anything else is non-terminal and logged.
* ``GET /v1/files/retrieve?file_id=``: the ``download_url`` of a succeeded task's video. A third
  request, made by ``fetch`` when the query says ``Success``, so that the URL (valid an hour per
  the docs) is minted right before the collect step downloads it.
* No cancel, no list, no client-supplied id: an ambiguous create cannot be found again and fails
  ``provider_outcome_unknown`` (never resubmitted).

Traps handled:

* Errors are **HTTP 200** with ``base_resp.status_code`` != 0 and no ``task_id``: 1002/1039/1041/
  2045 -> RateLimited; 1004/2049 (a key of the other region) -> AuthFailed; 1008/2056 ->
  InsufficientBalance; 1026 -> Rejected ``content_policy``; 2013 -> ``provider_rejected_input``
  (``model_not_found`` when it is about the model; an unknown task on a query is TaskNotFound);
  1000/1001/1024/1033 -> Unavailable (MiniMax says they are retryable). A non-2xx HTTP status is
  transport-level (a 5xx after a create may follow acceptance: OutcomeUnknown).
* ``file_id`` is a string in the query and an integer in ``files/retrieve``: it is kept a string.
* Callbacks: MiniMax first POSTs ``{"challenge": "<random>"}`` and needs it echoed within 3 s,
  else no status callback follows; ``verify_callback`` returns it as ``CallbackHint.reply`` and the
  API answers it once the per-job token checked. Later POSTs are the query shape with lowercase
  statuses (``processing``/``success``/``failed``): hints, the state applied is the one fetched.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderState,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send

log = logging.getLogger(__name__)

# What a known model takes as a first frame ("none", "optional" or "required"). Other model names
# are passed on: MiniMax adds models, and refuses unknown ones (2013, model_not_found).
FIRST_FRAME = {
    "MiniMax-Hailuo-2.3": "optional",
    "MiniMax-Hailuo-2.3-Fast": "required",
    "MiniMax-Hailuo-02": "optional",
    "T2V-01-Director": "none",
    "T2V-01": "none",
    "I2V-01-Director": "required",
    "I2V-01-live": "required",
    "I2V-01": "required",
    "S2V-01": "none",
}
RESOLUTIONS = ("512P", "720P", "768P", "1080P")
DURATIONS = (6, 10)
MAX_PROMPT = 2000
FLAGS = ("prompt_optimizer", "fast_pretreatment", "aigc_watermark")
OPTIONS = frozenset({*FLAGS, "last_frame_image", "subject_reference"})
_DATA_IMAGE = re.compile(r"^data:image/(jpeg|jpg|png|webp);base64,", re.IGNORECASE)

_STATES: dict[str, ProviderState] = {
    "Preparing": "queued",
    "Queueing": "queued",
    "Processing": "running",
    "Success": "succeeded",
    "Fail": "failed",
}

RATE_CODES = frozenset({1002, 1039, 1041, 2045})
AUTH_CODES = frozenset({1004, 2049})
BALANCE_CODES = frozenset({1008, 2056})
RETRYABLE_CODES = frozenset({1000, 1001, 1024, 1033})
CONTENT_CODES = frozenset({1026, 1027})
_MODEL_REFUSED = re.compile(r"unsupported model|invalid model|model (is )?not (found|exist|supported)", re.IGNORECASE)


# -- request building (validation happens here, before anything is sent) ------------------

def _check_image(field: str, value: Any) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or not ((parts.scheme in ("http", "https") and parts.hostname) or _DATA_IMAGE.match(value)):
        raise InvalidInput(field, "an image is an http(s) URL or a data:image/(jpeg|png|webp);base64 URL")
    return str(value)


def minimax_body(model: str, given: MediaInput) -> dict[str, Any]:
    """The create body for a job; raises ``InvalidInput`` naming the field."""
    for common in ("negative_prompt", "seed"):
        if getattr(given, common) is not None:
            raise InvalidInput(f"input.{common}", f"MiniMax video has no {common.replace('_', ' ')}")
    if given.aspect_ratio is not None:
        raise InvalidInput("input.aspect_ratio", "MiniMax video has no aspect ratio (the first frame or the "
                                                 "resolution decides the shape)")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "MiniMax renders one video per task")
    for key in given.options:
        if key not in OPTIONS:
            raise InvalidInput(f"input.options.{key}", f"not a MiniMax parameter Atelier passes on "
                                                       f"(allowed: {', '.join(sorted(OPTIONS))})")
    opts = given.options
    body: dict[str, Any] = {"model": model}
    if given.prompt:
        if len(given.prompt) > MAX_PROMPT:
            raise InvalidInput("input.prompt", f"MiniMax prompts are at most {MAX_PROMPT} characters")
        body["prompt"] = given.prompt
    first_frame = FIRST_FRAME.get(model)
    if given.image_url is not None:
        if first_frame == "none":
            raise InvalidInput("input.image_url", f"{model} takes no first frame (an image-to-video model does)")
        body["first_frame_image"] = _check_image("input.image_url", given.image_url)
    elif first_frame == "required":
        raise InvalidInput("input.image_url", f"{model} is image-to-video: give the first frame as image_url")
    if "last_frame_image" in opts:
        body["last_frame_image"] = _check_image("input.options.last_frame_image", opts["last_frame_image"])
    if "subject_reference" in opts:
        ref = opts["subject_reference"]
        images = ref[0].get("image") if isinstance(ref, list) and len(ref) == 1 and isinstance(ref[0], dict) else None
        if not isinstance(images, list) or len(images) != 1 or ref[0].get("type") != "character":
            raise InvalidInput("input.options.subject_reference",
                               'subject_reference is [{"type": "character", "image": [<one image>]}]')
        _check_image("input.options.subject_reference", images[0])
        body["subject_reference"] = ref
    for flag in FLAGS:
        if flag in opts:
            if not isinstance(opts[flag], bool):
                raise InvalidInput(f"input.options.{flag}", f"{flag} is true or false")
            body[flag] = opts[flag]
    if not body.get("prompt") and not any(k in body for k in ("first_frame_image", "last_frame_image",
                                                                "subject_reference")):
        raise InvalidInput("input.prompt", "MiniMax text-to-video needs a prompt")
    if given.resolution is not None:
        resolution = given.resolution.upper()
        if resolution not in RESOLUTIONS:
            raise InvalidInput("input.resolution", f"MiniMax renders {', '.join(RESOLUTIONS)} (per model)")
        body["resolution"] = resolution
    if given.duration_seconds is not None:
        seconds = given.duration_seconds
        if not float(seconds).is_integer() or int(seconds) not in DURATIONS:
            raise InvalidInput("input.duration_seconds", "MiniMax renders 6 or 10 seconds (per model)")
        if int(seconds) != 6 and body.get("resolution") == "1080P":
            raise InvalidInput("input.duration_seconds", "MiniMax renders 1080P only at 6 seconds")
        body["duration"] = int(seconds)
    return body


# -- the adapter ------------------------------------------------------------------------

class MinimaxProvider(Provider):
    name = "minimax"
    default_base_url = "https://api.minimax.io"
    default_typical_seconds = {"video": 180}
    kinds = frozenset({MediaKind.video})
    supports_cancel = False
    supports_callbacks = True
    callback_auth = "token"
    retention = ("download_url valid 1 hour per the docs (real URLs carry a later Expires: CONFLICT); "
                 "how long file_id stays retrievable is not documented")

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        minimax_body(request.model, request.input)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier", "Accept": "application/json"}

    async def _get(self, ctx: CallContext, path: str, params: dict[str, str]) -> dict[str, Any]:
        response = await send(ctx.http, ctx.http.build_request("GET", self.base_url + path, params=params,
                                                               headers=self._headers(ctx)))
        return _answer(response, creates=False)

    # -- the task ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        body = minimax_body(request.model, request.input)
        if ctx.callback_url:
            body["callback_url"] = ctx.callback_url
        response = await send(ctx.http, ctx.http.build_request("POST", f"{self.base_url}/v1/video_generation",
                                                               json=body, headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        answer = _answer(response, creates=True)
        task_id = answer.get("task_id")
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise MalformedResponse("MiniMax accepted the task without a task_id", detail=_excerpt(answer))
        return SubmitResult(task_id=str(task_id))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        query = await self._get(ctx, "/v1/query/video_generation", {"task_id": task.task_id})
        status = parse_query(query)
        if status.state != "succeeded":
            return status
        file_id = str(query["file_id"])
        retrieved = await self._get(ctx, "/v1/files/retrieve", {"file_id": file_id})
        file = retrieved.get("file")
        url = file.get("download_url") if isinstance(file, dict) else None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise MalformedResponse("MiniMax retrieved the file without a download_url", detail=_excerpt(retrieved))
        metadata = {"task_id": task.task_id, "file_id": file_id} | {
            k: query[k] for k in ("video_width", "video_height") if isinstance(query.get(k), int) and query[k]}
        status.outputs = [ProviderOutput(url=url, content_type="video/mp4", metadata=metadata)]
        return status

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """MiniMax signs nothing (the per-job token authenticates). A ``challenge`` is the handshake:
        echoed back at once; anything else is a status hint."""
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("MiniMax callback body is not JSON") from exc
        if not isinstance(payload, dict):
            raise CallbackRejected("MiniMax callback body is not an object")
        if "challenge" in payload:
            challenge = payload["challenge"]
            if not isinstance(challenge, str) or not challenge:
                raise CallbackRejected("MiniMax challenge is not a string")
            return CallbackHint(reply={"challenge": challenge})
        task_id = payload.get("task_id")
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise CallbackRejected("MiniMax callback names no task")
        return CallbackHint(task_id=str(task_id), raw_status=_str_or_none(payload.get("status")))

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        return {}  # download_url is a signed OSS/CDN URL


# -- responses ------------------------------------------------------------------------

def parse_query(query: dict[str, Any]) -> TaskStatus:
    """A ``query/video_generation`` answer (its ``base_resp`` already checked), translated."""
    raw = query.get("status")
    if not isinstance(raw, str):
        raise MalformedResponse("MiniMax query answer has no status", detail=_excerpt(query))
    state = _STATES.get(raw)
    if state is None:
        log.warning("minimax: unknown task status %r; treating it as still in progress", raw)
        return TaskStatus(state="unknown", raw_status=raw)
    status = TaskStatus(state=state, raw_status=raw)
    if state == "succeeded":
        if not isinstance(query.get("file_id"), str | int) or not str(query["file_id"]):
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "MiniMax reported success without a file_id"
            return status
        status.progress = 100
    elif state == "failed":
        code, message = _base_resp(query)
        status.error_code = ("content_policy" if code in CONTENT_CODES
                             else "provider_rejected_input" if code == 2013 else "provider_failed")
        status.error_message = f"MiniMax {code}: {message}" if code else "MiniMax reported the task failed"
        status.error_detail = {"task_id": query.get("task_id"), "base_resp": query.get("base_resp")}
    return status


def _base_resp(body: dict[str, Any]) -> tuple[int, str]:
    base = body.get("base_resp")
    code = base.get("status_code") if isinstance(base, dict) else None
    message = base.get("status_msg") if isinstance(base, dict) else None
    return (code if isinstance(code, int) and not isinstance(code, bool) else 0), str(message or "")


# -- errors ---------------------------------------------------------------------------

def _answer(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The answer as an object, once neither its HTTP status nor its ``base_resp`` says it failed.

    A failed task's query answer carries its reason in ``base_resp`` too: that is the task's
    outcome, not an error of the request, so it is returned.
    """
    if response.status_code >= 500:  # transport-level, whatever the body says
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
    try:
        body = response.json()
    except ValueError:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    answer = expect_object(body, "answer")
    code, message = _base_resp(answer)
    if code != 0 and answer.get("status") != "Fail":
        raise minimax_error(code, message, response, creates=creates, detail={"base_resp": answer.get("base_resp")})
    raise_for_common_status(response, creates=creates, detail=_excerpt(answer))
    return answer


def minimax_error(code: int, message: str, response: httpx.Response, *, creates: bool,
                  detail: Any = None) -> ProviderError:
    """What a ``base_resp.status_code`` means (not the HTTP status, which is usually 200)."""
    text = f"MiniMax {code}: {message}" if message else f"MiniMax error {code}"
    status = response.status_code
    if code in RATE_CODES:
        return RateLimited(f"{text} (rate limit; waiting)", retry_after=retry_after_seconds(response.headers),
                           detail=detail)
    if code in AUTH_CODES:
        reason = " (a key of the other region's host?)" if code == 2049 else ""
        return AuthFailed(f"{text}{reason}", detail=detail, status_code=status)
    if code in BALANCE_CODES:
        return InsufficientBalance(text, detail=detail, status_code=status)
    if code in RETRYABLE_CODES:
        return Unavailable(text, detail=detail, status_code=status)
    if code in CONTENT_CODES:
        return Rejected(text, code="content_policy", detail=detail, status_code=status)
    if code == 2013:
        if not creates and re.search(r"\b(task_id|file_id)\b", message):
            return TaskNotFound(text, detail=detail, status_code=status)
        refused_model = bool(_MODEL_REFUSED.search(message))
        return Rejected(text, code="model_not_found" if refused_model else "provider_rejected_input",
                        detail=detail, status_code=status)
    return Rejected(text, detail=detail, status_code=status)


def _excerpt(value: Any) -> str:
    return json.dumps(value, default=str)[:300]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
