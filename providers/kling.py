"""Kling video API (https://api-singapore.klingai.com), directly or through a new-api gateway.

Endpoints (``{family}`` is ``text2video`` or ``image2video``, chosen by whether an image is
given; each family is its own namespace, so the family is kept in the task state):

* ``POST /v1/videos/{family}``: create. Body ``model_name, prompt, negative_prompt, duration``
  (a *string*), ``mode`` (std|pro), ``aspect_ratio`` (text2video only), ``cfg_scale``,
  ``image``/``image_tail`` (image2video), ``callback_url`` and ``external_task_id`` (= our job id).
* ``GET /v1/videos/{family}/{task_id}``: status. The same path takes the ``external_task_id``
  instead of the task id, which is how ``reconcile`` finds a task after an ambiguous submit.
* No cancel endpoint is documented.

Auth: ``Authorization: Bearer <JWT>``, HS256 signed with the secret key, claims ``iss`` =
access key, ``exp`` = now + 1800, ``nbf`` = now - 5; cached per access key and rebuilt when
less than 5 minutes are left. **Gateway mode**: when the pool key is not the access key
(``ATELIER_KLING_API_KEY`` is a gateway's ``sk-...`` key), it is sent as ``Bearer <key>``.

Responses are an envelope ``{code, message, request_id, data}``; ``code`` 0 is success.
Status mapping: ``submitted`` -> queued, ``processing`` -> running, ``succeed`` -> succeeded
(``data.task_result.videos[].url``: signed CDN URLs, fetched without auth, cleared after
30 days), ``failed`` -> failed with ``task_status_msg``. Anything else is logged and
non-terminal.

Traps handled:

* A failed task still answers ``code: 0, message: "SUCCEED"``; only ``task_status`` says so.
* Business codes matter more than HTTP statuses (1102 was seen as HTTP 400 and 429):
  1000-1004 (JWT) and 1304 (IP allow-list) -> AuthFailed; 1101/1102 (arrears, balance) ->
  InsufficientBalance (not retried); 1302 (rate) and 1303 (concurrency over the resource
  pack) -> RateLimited, so the job waits; 1301 content policy -> Rejected
  ``provider_content_filtered``; 1200/1201 -> ``provider_rejected_input``; 1203 -> model
  unknown on create, task unknown on fetch; 5000/5002 on create -> OutcomeUnknown.
* Callbacks are unsigned bare task objects: the per-job token in the callback URL
  authenticates them and the state applied is the one fetched.

Through a new-api gateway (base URL = the gateway's Kling mount, e.g.
``https://gateway.example.com/kling``) the same paths answer other shapes, recognised from
the response itself: create returns an OpenAI-style video object (``id``/``task_id``,
``status: queued``); fetch returns ``{code: "success", message, data: <TaskDto>}`` with
``status`` ``NOT_START`` (and ``""``/``unknown`` before the gateway's first poll; queued),
``SUBMITTED``/``QUEUED`` (queued), ``IN_PROGRESS`` (running), ``SUCCESS`` (``result_url``, or
the raw Kling body in ``data``) and ``FAILURE`` (``fail_reason``; the gateway's own 24 h
timeout sweep ends up here as ``provider_gateway_timeout``). Task errors are
``{code: "<string>", message, data: null}`` (Kling's own body may be embedded in
``message``), auth errors ``{"error": {...}}``; a used-up gateway quota (``quota_not_enough``,
``insufficient_user_quota``... with 401/403) is InsufficientBalance, not AuthFailed. A
gateway never calls back and cannot look a task up by our external id, so neither is used
in gateway mode.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from providers.contract import (
    CallbackHint,
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
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    OutcomeUnknown,
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

TEXT2VIDEO = "text2video"
IMAGE2VIDEO = "image2video"
T2V_MODELS = frozenset({"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master",
                        "kling-v2-5-turbo", "kling-v2-6", "kling-v3"})
I2V_MODELS = T2V_MODELS | {"kling-v1-5", "kling-v2-1"}
# Older models render 5 or 10 s; kling-v3 takes "3" .. "15" (Kling's capability map).
DURATIONS: dict[str, tuple[str, ...]] = {"kling-v3": tuple(str(n) for n in range(3, 16))}
LEGACY_DURATIONS = ("5", "10")
SOUND_MODELS = frozenset({"kling-v2-6", "kling-v3"})
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
MODES = ("std", "pro")
MAX_PROMPT = 2500
# Set by Atelier itself; a client may not override them through options.
RESERVED_OPTIONS = {"model_name": "model", "model": "model", "callback_url": None, "external_task_id": None}

JWT_TTL = 1800
JWT_REFRESH_MARGIN = 300

_KLING_STATES: dict[str, ProviderState] = {
    "submitted": "queued",
    "processing": "running",
    "succeed": "succeeded",
    "failed": "failed",
}
# new-api task rows. NOT_START (and "" or "unknown" as some routes render it) is the row
# before the gateway's first poll of Kling.
_GATEWAY_STATES: dict[str, ProviderState] = {
    "": "queued",
    "NOT_START": "queued",
    "unknown": "queued",
    "SUBMITTED": "queued",
    "QUEUED": "queued",
    "IN_PROGRESS": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
}


# -- request building (validation happens here, before anything is sent) ------------------

def family_for(job_input: MediaInput) -> str:
    opts = job_input.options
    return IMAGE2VIDEO if job_input.image_url or opts.get("image") or opts.get("image_tail") else TEXT2VIDEO


def kling_body(model: str, job_input: MediaInput) -> tuple[str, dict[str, Any]]:
    """``(family, create body)`` for a job; raises ``InvalidInput`` naming the field."""
    family = family_for(job_input)
    models = T2V_MODELS if family == TEXT2VIDEO else I2V_MODELS
    if model not in models:
        raise InvalidInput("model", f"Kling {family} models are {', '.join(sorted(models))}")
    opts = dict(job_input.options)
    for key in opts:
        if key in RESERVED_OPTIONS:
            target = RESERVED_OPTIONS[key]
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use '{target}' instead" if target
                               else "set by Atelier")
    if job_input.seed is not None:
        raise InvalidInput("input.seed", "Kling video has no seed parameter")
    if job_input.resolution is not None:
        raise InvalidInput("input.resolution", "Kling has no resolution parameter; use options.mode (std or pro)")
    if job_input.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Kling renders one video per task")

    body: dict[str, Any] = {"model_name": model}
    if job_input.prompt is not None:
        body["prompt"] = job_input.prompt
    if job_input.negative_prompt is not None:
        body["negative_prompt"] = job_input.negative_prompt
    if job_input.duration_seconds is not None:
        seconds = job_input.duration_seconds
        allowed = DURATIONS.get(model, LEGACY_DURATIONS)
        if not float(seconds).is_integer() or str(int(seconds)) not in allowed:
            raise InvalidInput("input.duration_seconds", f"{model} renders {_seconds(allowed)} seconds")
        body["duration"] = str(int(seconds))
    if job_input.aspect_ratio is not None:
        if family == IMAGE2VIDEO:
            raise InvalidInput("input.aspect_ratio", "Kling image-to-video follows the image's aspect ratio")
        if job_input.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("input.aspect_ratio", f"Kling renders {', '.join(ASPECT_RATIOS)}")
        body["aspect_ratio"] = job_input.aspect_ratio
    if job_input.image_url is not None:
        body["image"] = str(job_input.image_url)

    _check_options(model, family, opts)
    body.update(opts)
    if "duration" in opts:
        body["duration"] = str(opts["duration"])
    _check_prompts(family, body)
    return family, body


def _check_options(model: str, family: str, opts: dict[str, Any]) -> None:
    def bad(key: str, message: str) -> InvalidInput:
        return InvalidInput(f"input.options.{key}", message)

    for key in opts:
        if not key.replace("_", "").isalnum():
            raise bad(key, "Kling parameter names are identifiers")
    if "mode" in opts and opts["mode"] not in MODES:
        raise bad("mode", "mode is std or pro")
    if "duration" in opts:
        allowed = DURATIONS.get(model, LEGACY_DURATIONS)
        value = opts["duration"]
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value) not in allowed:
            raise bad("duration", f"{model} takes duration {' or '.join(repr(d) for d in allowed)}")
    if "aspect_ratio" in opts:
        if family == IMAGE2VIDEO:
            raise bad("aspect_ratio", "Kling image-to-video follows the image's aspect ratio")
        if opts["aspect_ratio"] not in ASPECT_RATIOS:
            raise bad("aspect_ratio", f"aspect_ratio is one of {', '.join(ASPECT_RATIOS)}")
    if "cfg_scale" in opts:
        value = opts["cfg_scale"]
        if model.startswith("kling-v2"):
            raise bad("cfg_scale", f"{model} does not support cfg_scale (Kling v2.x models)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise bad("cfg_scale", "cfg_scale is a number from 0 to 1")
    if "sound" in opts:
        if opts["sound"] not in ("on", "off"):
            raise bad("sound", "sound is on or off")
        if model not in SOUND_MODELS:
            raise bad("sound", f"sound needs {' or '.join(sorted(SOUND_MODELS))}")
    if "watermark_info" in opts:
        wm = opts["watermark_info"]
        if not isinstance(wm, dict) or not isinstance(wm.get("enabled", False), bool):
            raise bad("watermark_info", 'watermark_info is {"enabled": true|false}')
    if "camera_control" in opts and not isinstance(opts["camera_control"], dict):
        raise bad("camera_control", "camera_control is an object {type, config}")
    for key in ("image", "image_tail"):
        if key in opts:
            if family == TEXT2VIDEO:
                raise bad(key, "images are for image-to-video")
            _check_image(f"input.options.{key}", opts[key])
    if opts.get("image_tail"):
        clash = [k for k in ("static_mask", "dynamic_masks", "camera_control") if opts.get(k)]
        if clash:
            raise bad("image_tail", f"image_tail cannot be combined with {', '.join(clash)}")


def _check_image(field: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, "an image is a URL or raw Base64")
    if value.startswith("data:"):
        raise InvalidInput(field, "Kling takes raw Base64 without a 'data:' prefix")


def _check_prompts(family: str, body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    multi_custom = body.get("multi_shot") is True and body.get("shot_type") == "customize"
    if family == TEXT2VIDEO and not (isinstance(prompt, str) and prompt.strip()) and not multi_custom:
        raise InvalidInput("input.prompt", "Kling text-to-video needs a prompt")
    for key in ("prompt", "negative_prompt"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_PROMPT):
            raise InvalidInput(f"input.{key}", f"{key} is a string of at most {MAX_PROMPT} characters")


def _seconds(allowed: tuple[str, ...]) -> str:
    return " or ".join(allowed) if len(allowed) <= 2 else f"{allowed[0]} to {allowed[-1]}"


# -- the adapter ------------------------------------------------------------------------

class KlingTask(TaskState):
    """The API family the task lives in (each is its own namespace), and whether a gateway took it."""

    family: str | None = None
    gateway: bool | None = None


class KlingProvider(Provider):
    name = "kling"
    default_base_url = "https://api-singapore.klingai.com"
    default_typical_seconds = {"video": 180}
    kinds = frozenset({MediaKind.video})
    supports_cancel = False
    supports_callbacks = True
    callback_auth = "token"
    retention = "30 days (generated videos are cleared; result links are signed CDN URLs)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)
        self._tokens: dict[str, tuple[str, float]] = {}

    # -- auth ---------------------------------------------------------------
    def gateway_mode(self, ctx: CallContext) -> bool:
        """A pool key other than Kling's access key is a gateway's Bearer key."""
        return ctx.api_key != str(self.settings.extra.get("access_key") or "")

    def token(self, now: float | None = None) -> str:
        """Kling's API token: an HS256 JWT, reused until less than 5 minutes are left."""
        access_key = str(self.settings.extra.get("access_key") or "")
        secret_key = str(self.settings.extra.get("secret_key") or "")
        now = time.time() if now is None else now
        cached = self._tokens.get(access_key)
        if cached is not None and cached[1] - now > JWT_REFRESH_MARGIN:
            return cached[0]
        issued = int(now)
        claims = {"iss": access_key, "exp": issued + JWT_TTL, "nbf": issued - 5}
        with warnings.catch_warnings():  # short (sandbox) secrets are still what Kling would check
            warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
            token = jwt.encode(claims, secret_key, algorithm="HS256", headers={"typ": "JWT"})
        self._tokens[access_key] = (token, float(issued + JWT_TTL))
        return token

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        bearer = ctx.api_key if self.gateway_mode(ctx) else self.token()
        return {"Authorization": f"Bearer {bearer}", "User-Agent": "atelier"}

    # -- validation -----------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        kling_body(request.model, request.input)

    # -- the task ------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        family, body = kling_body(request.model, request.input)
        gateway = self.gateway_mode(ctx)
        body["external_task_id"] = request.reference
        if ctx.callback_url and not gateway:
            body["callback_url"] = ctx.callback_url
        url = f"{self.base_url}/v1/videos/{family}"
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True)
        payload = _json_or_error(response, creates=True)
        raise_for_error(response, payload, creates=True)
        if isinstance(payload.get("code"), int):  # Kling's envelope
            task = expect_object(payload.get("data"), "task")
            task_id = task.get("task_id")
            status = task.get("task_status")
            request_id = payload.get("request_id")
        else:  # a gateway: an OpenAI-style video object, or {code: "success", data: "<task id>"}
            inner = payload.get("data")
            task = inner if isinstance(inner, dict) else payload
            task_id = task.get("task_id") or task.get("id") or (inner if isinstance(inner, str) else None)
            status = task.get("status")
            request_id = None
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise MalformedResponse("Kling created a task without a task_id", detail=payload)
        # A gateway never calls back: poll at the normal pace.
        return SubmitResult(task_id=str(task_id), request_id=_str_or_none(request_id),
                            status=None if status is None else str(status),
                            state=KlingTask(family=family, gateway=not isinstance(payload.get("code"), int) or None),
                            callback_expected=False if gateway else None)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        family = KlingTask.of(task).family or family_for(task.request.input)
        url = f"{self.base_url}/v1/videos/{family}/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        payload = _json_or_error(response, creates=False)
        raise_for_error(response, payload, creates=False)
        return parse_task_response(payload)

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Query the task by our ``external_task_id`` (the job's reference); gateways cannot do this."""
        if self.gateway_mode(ctx):
            return None
        family = family_for(request.input)
        url = f"{self.base_url}/v1/videos/{family}/{request.reference}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        payload = _json_or_error(response, creates=False)
        try:
            raise_for_error(response, payload, creates=False)
        except TaskNotFound:
            return None
        task = payload.get("data")
        if not isinstance(task, dict) or not isinstance(task.get("task_id"), str | int):
            return None
        info = task.get("task_info")
        external = info.get("external_task_id") if isinstance(info, dict) else None
        if external not in (None, "", request.reference):
            return None
        return SubmitResult(task_id=str(task["task_id"]), request_id=_str_or_none(payload.get("request_id")),
                            status=_str_or_none(task.get("task_status")), state=KlingTask(family=family))

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Kling signs nothing: the per-job token in the URL authenticates; this only parses."""
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Kling callback body is not JSON") from exc
        if isinstance(obj, dict) and isinstance(obj.get("data"), dict) and "task_id" in obj["data"]:
            obj = obj["data"]  # tolerate an enveloped body
        if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str | int):
            raise CallbackRejected("Kling callback body is not a task object")
        return CallbackHint(task_id=str(obj["task_id"]), raw_status=_str_or_none(obj.get("task_status")))

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """Kling's CDN links are signed (no auth). A gateway's own content URLs take its key."""
        parts = urlsplit(url)
        if self.gateway_mode(ctx) and (parts.scheme, parts.hostname or "", parts.port) == self._origin:
            return {"Authorization": f"Bearer {ctx.api_key}"}
        return {}


# -- responses ------------------------------------------------------------------------

def parse_task_response(payload: dict[str, Any]) -> TaskStatus:
    """A status answer in any of the shapes Kling or a new-api gateway give."""
    code = payload.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        task = expect_object(payload.get("data"), "task")
        return parse_kling_task(task, request_id=_str_or_none(payload.get("request_id")))
    if code == "success":
        return parse_gateway_task(expect_object(payload.get("data"), "gateway task"))
    if "task_status" in payload:  # a bare task object (the callback shape)
        return parse_kling_task(payload)
    raise MalformedResponse("Kling answered a status in an unknown shape", detail=_excerpt(payload))


def parse_kling_task(task: dict[str, Any], request_id: str | None = None) -> TaskStatus:
    raw = task.get("task_status")
    if not isinstance(raw, str):
        raise MalformedResponse("Kling task has no task_status", detail=_excerpt(task))
    state = _KLING_STATES.get(raw)
    if state is None:
        log.warning("kling: unknown task_status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, request_id=request_id)
    if state == "succeeded":
        status.progress = 100
        status.outputs = _videos(task)
        if not status.outputs:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "Kling reported success without a video"
    elif state == "failed":
        message = str(task.get("task_status_msg") or "Kling reported the task failed")
        status.error_code = _failure_code(message)
        status.error_message = message
        status.error_detail = {"task_id": task.get("task_id"), "task_status_msg": task.get("task_status_msg")}
    return status


def parse_gateway_task(row: dict[str, Any]) -> TaskStatus:
    """A new-api TaskDto: trust its top-level ``status``, never the raw upstream ``data``."""
    raw = row.get("status")
    raw = "" if raw is None else str(raw)
    state = _GATEWAY_STATES.get(raw)
    if state is None:
        log.warning("kling via gateway: unknown task status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(row.get("progress")))
    upstream = row.get("data")
    upstream_task = upstream.get("data") if isinstance(upstream, dict) else None
    if state == "succeeded":
        status.progress = 100
        status.outputs = _videos(upstream_task) if isinstance(upstream_task, dict) else []
        result_url = row.get("result_url")
        if not status.outputs and isinstance(result_url, str) and result_url.startswith(("https://", "http://")):
            status.outputs = [ProviderOutput(url=result_url, content_type="video/mp4")]
        if not status.outputs:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "the gateway reported success without a video URL"
    elif state == "failed":
        reason = str(row.get("fail_reason") or "")
        if not reason and isinstance(upstream_task, dict):
            reason = str(upstream_task.get("task_status_msg") or "")
        timed_out = "超时" in reason or "timeout" in reason.lower()
        status.error_code = "provider_gateway_timeout" if timed_out else _failure_code(reason)
        status.error_message = (f"the gateway gave up on the task: {reason}" if timed_out
                                else reason or "the gateway reported the task failed")
        status.error_detail = {"task_id": row.get("task_id"), "fail_reason": row.get("fail_reason")}
    return status


def _videos(task: dict[str, Any]) -> list[ProviderOutput]:
    result = task.get("task_result")
    videos = result.get("videos") if isinstance(result, dict) else None
    outputs = []
    for video in videos if isinstance(videos, list) else []:
        if isinstance(video, dict) and isinstance(video.get("url"), str) and video["url"]:
            meta = {k: video[k] for k in ("id", "duration") if video.get(k) not in (None, "")}
            outputs.append(ProviderOutput(url=video["url"], content_type="video/mp4", metadata=meta))
    return outputs


def _failure_code(message: str) -> str:
    """Kling's failed tasks carry only text; its risk-control refusals get their own code."""
    return "provider_content_filtered" if "risk control" in message.lower() else "provider_failed"


def _percent(value: Any) -> int | None:
    try:
        return max(0, min(100, int(float(str(value).rstrip("%")))))
    except (TypeError, ValueError):
        return None


# -- errors ---------------------------------------------------------------------------

def _json_or_error(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The body as an object; a non-JSON error body is mapped by its HTTP status."""
    try:
        body = response.json()
    except ValueError:
        if response.status_code == 404 and creates:
            raise Rejected("the Kling base URL does not serve /v1/videos (through a new-api gateway "
                           "it is the gateway's Kling mount, e.g. https://gateway.example.com/kling)",
                           detail={"body_excerpt": response.text[:200]}, status_code=404) from None
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    return expect_object(body, "response")


def raise_for_error(response: httpx.Response, payload: dict[str, Any], *, creates: bool) -> None:
    """Raise the provider error a Kling or gateway answer stands for (nothing if it is a success)."""
    code = payload.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        if code != 0:
            raise kling_error(code, str(payload.get("message") or ""), response, creates=creates,
                              detail=_detail(payload))
        raise_for_common_status(response, creates=creates, detail=_detail(payload))
        return
    if isinstance(code, str) and code != "success":
        raise _gateway_error(code, str(payload.get("message") or ""), response, creates=creates,
                             detail=_detail(payload))
    error = payload.get("error")
    if isinstance(error, dict):  # OpenAI-style errors of gateways (auth, distribution)
        detail = {"error": {k: error.get(k) for k in ("message", "type", "code")}}
        if response.status_code != 429 and gateway_quota_exhausted(error.get("code"), str(error.get("message") or "")):
            raise InsufficientBalance(f"the gateway says the key's quota is used up: {error.get('message')}",
                                      detail=detail, status_code=response.status_code)
        if error.get("code") == "model_not_found":
            raise Rejected(f"the gateway serves no channel for this model: {error.get('message')}",
                           code="model_not_found", detail=detail, status_code=response.status_code)
        raise_for_common_status(response, creates=creates, detail=detail)
        raise Rejected(f"the gateway refused the request: {error.get('message')}", detail=detail,
                       status_code=response.status_code)
    raise_for_common_status(response, creates=creates, detail=_excerpt(payload))


def kling_error(code: int, message: str, response: httpx.Response, *, creates: bool,
                detail: Any = None) -> ProviderError:
    """Kling's business codes, which decide what an error means (not the HTTP status)."""
    status = response.status_code
    text = f"Kling {code}: {message}" if message else f"Kling error {code}"
    if 1000 <= code <= 1004:
        return AuthFailed(f"{text} (the API token was refused)", detail=detail, status_code=status)
    if code == 1304:
        return AuthFailed(f"{text} (IP allow-list)", detail=detail, status_code=status)
    if code in (1101, 1102):
        return InsufficientBalance(f"{text} (resource pack or balance exhausted; not retried)",
                                   detail=detail, status_code=status)
    if code in (1302, 1303):
        reason = "rate limit" if code == 1302 else "concurrency limit of the resource pack"
        return RateLimited(f"{text} ({reason}; waiting)", retry_after=retry_after_seconds(response.headers),
                           detail=detail, status_code=status)
    if code == 1203 and not creates:
        return TaskNotFound(text, detail=detail, status_code=status)
    if code >= 5000:
        if code == 5001 or not creates:
            return Unavailable(text, detail=detail, status_code=status)
        return OutcomeUnknown(f"{text} after a submission", detail=detail, status_code=status)
    return Rejected(text, detail=detail, status_code=status, code={
        1100: "provider_account_error",
        1103: "provider_forbidden",
        1200: "provider_rejected_input",
        1201: "provider_rejected_input",
        1203: "model_not_found",
        1300: "provider_policy",
        1301: "provider_content_filtered",
    }.get(code, "provider_rejected"))


def _gateway_error(code: str, message: str, response: httpx.Response, *, creates: bool,
                   detail: Any) -> ProviderError:
    """new-api task errors ``{code: "<string>", message, data: null}``."""
    status = response.status_code
    try:
        upstream = json.loads(message)
    except ValueError:
        upstream = None
    if isinstance(upstream, dict) and isinstance(upstream.get("code"), int):  # Kling's body, relayed
        return kling_error(upstream["code"], str(upstream.get("message") or ""), response, creates=creates,
                           detail=detail)
    if code == "task_not_exist" and not creates:
        return TaskNotFound(f"the gateway does not know this task ({message})", detail=detail, status_code=status)
    if status != 429 and gateway_quota_exhausted(code, message):
        return InsufficientBalance(f"the gateway says the key's quota is used up: {code}: {message}",
                                   detail=detail, status_code=status)
    try:
        raise_for_common_status(response, creates=creates, detail=detail)
    except ProviderError as exc:
        exc.message = f"{exc.message}: {code}: {message}"
        return exc
    return Rejected(f"the gateway refused the request: {code}: {message}", detail=detail, status_code=status)


def _detail(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload[k] for k in ("code", "message", "request_id") if k in payload}


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str)[:300]}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
