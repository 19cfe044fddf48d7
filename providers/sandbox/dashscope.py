"""Alibaba Model Studio (DashScope) simulator: Wan video, Wan and Qwen-Image images.

Written from the documented wire format (shared/providers/video-wave2.md §6 and images-wave2.md
§6), not from our adapter. The Beijing, Singapore and Virginia hosts serve the same routes; only
the base URL (and the region a key belongs to) differ, so one simulator stands for any of them.

Routes (``Authorization: Bearer <key>``):

- ``POST /api/v1/services/aigc/video-generation/video-synthesis``: Wan text-to-video
  (``parameters.size`` as ``"W*H"``) and image-to-video (``input.img_url``,
  ``parameters.resolution`` ``480P|720P|1080P``); the other mode's size field is refused.
- ``POST /api/v1/services/aigc/image2video/video-synthesis``: first+last frame (``kf2v`` models,
  ``input.first_frame_url`` [+ ``last_frame_url``]).
- ``POST /api/v1/services/aigc/text2image/image-synthesis``: asynchronous text-to-image (Wan t2i,
  ``qwen-image``, ``qwen-image-plus``; ``size`` ``"W*H"``, ``n``).
  These three require ``X-DashScope-Async: enable`` (else 403 ``AccessDenied`` "current user api
  does not support synchronous calls") and answer ``{request_id, output: {task_id, task_status:
  "PENDING"}}``.
- ``POST /api/v1/services/aigc/multimodal-generation/generation``: the synchronous route
  (``input.messages`` with ``{text}``/``{image}`` parts; qwen-image-edit*, qwen-image-max,
  qwen-image-2.0*, z-image-turbo, wan2.6/2.7 image models). Holds the request for the queue+run
  time, then answers ``output.choices[0].message.content[{image: url}]``, ``task_metric``
  (singular) and ``usage {width, height, image_count}``. The async header here, or a sync-only
  model on an async route, is 403 ``AccessDenied`` "current user api does not support asynchronous
  calls". Which model takes which route: ``MODEL_ROUTES`` (``extra["model_routes"]`` overrides).
- ``GET /api/v1/tasks/{task_id}``: ``PENDING`` -> ``RUNNING`` -> ``SUCCEEDED`` | ``FAILED``
  (``code``/``message`` inside ``output``, HTTP 200) | ``CANCELED``; ``UNKNOWN`` for ids never
  seen and for tasks older than ``extra["task_ttl_seconds"]`` (24 h). Times are China-time strings
  ``"YYYY-MM-DD hh:mm:ss.mmm"`` without a zone. Video results: ``video_url``, ``orig_prompt``,
  ``actual_prompt`` (when ``prompt_extend``, on by default), ``usage {video_count, video_duration,
  video_ratio}``. Image results: ``results[{orig_prompt, actual_prompt, url}]``, where an item may
  carry ``code``/``message`` instead of ``url`` inside a SUCCEEDED task, ``task_metrics``,
  ``usage.image_count``.
- ``POST /api/v1/tasks/{task_id}/cancel``: PENDING only -> ``{request_id}``; any other task ->
  400 ``extra["cancel_error_code"]`` (``UnsupportedOperation``, invented: UNCONFIRMED).
- ``GET /api/v1/tasks``: reconciliation list, newest first; filters ``start_time``/``end_time``
  (``YYYYMMDDhhmmss``, China time), ``model_name``, ``status``, ``task_id``, ``page_no``,
  ``page_size``; ``{request_id, data: [{task_id, task_status, model_name, submit_time, end_time?}],
  total, total_page, page_no, page_size}`` (shape UNCONFIRMED).
- ``GET /oss/dashscope-result/...?Expires=&OSSAccessKeyId=&Signature=``: the outputs (real MP4 and
  PNG files, distinct per task) at OSS-style signed URLs, minted once per task; 403 ``AccessDenied``
  XML after ``output_ttl_seconds`` (24 h at Alibaba) or a tampered query.

Errors: ``{request_id, code, message}``: 400 ``InvalidParameter`` (message names the field; an
unknown model or a model on the wrong route is "Model not exist."), 400 ``DataInspectionFailed``,
400 ``Arrearage``, 401 ``InvalidApiKey``, 403 ``AccessDenied``, 429 ``Throttling.RateQuota`` (HTTP
status ``extra["throttling_status"]``), 500 ``InternalError``.

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]`` timings; ``[sim:fail]`` FAILED
``InternalError.Algo`` (``[sim:fail=CODE]`` that code); ``[sim:filtered]`` FAILED
``DataInspectionFailed`` (output moderation; the sync route answers it as a 400);
``[sim:partial]`` the last image of a SUCCEEDED task failed (all of them when ``n`` is 1);
``[sim:suspended]`` ``SUSPENDED`` instead of ``PENDING``; ``[sim:lost]`` the task is created but
every poll says ``UNKNOWN``. No task is created for: ``[sim:blocked]`` 400 ``DataInspectionFailed``
(input moderation), ``[sim:arrearage]`` 400 ``Arrearage``, ``[sim:error_in_body]`` an
``InvalidParameter`` error inside an HTTP 200 body without ``output``.

No callbacks (none documented): clients poll.

``SimConfig.extra`` knobs: ``task_ttl_seconds`` (86400), ``model_routes`` ({model: [route, ...]}
merged over ``MODEL_ROUTES``), ``durations`` ({model: [seconds]}), ``cancel_error_code``
(``UnsupportedOperation``), ``async_header_status`` (403), ``throttling_status`` (429; a client saw
400), ``fault_429_code`` (``Throttling.RateQuota``), ``submit_rps`` (None = unlimited; 2 for wan2.1
at Alibaba), ``max_running_per_model`` (None; 2 for wan2.1: later tasks stay PENDING),
``strict_mode_fields`` (True: t2v refuses ``resolution``, i2v/kf2v refuse ``size``), ``region``
("intl") with ``region_keys`` ({region: [keys]}: a key of another region is ``InvalidApiKey``),
``time_zone_hours`` (8).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import json
import math
import re
import secrets
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, bearer, directives, route_path

VIDEO_ROUTE = "/api/v1/services/aigc/video-generation/video-synthesis"
KF2V_ROUTE = "/api/v1/services/aigc/image2video/video-synthesis"
T2I_ROUTE = "/api/v1/services/aigc/text2image/image-synthesis"
SYNC_ROUTE = "/api/v1/services/aigc/multimodal-generation/generation"

T2V_MODELS = ("wanx2.1-t2v-turbo", "wanx2.1-t2v-plus", "wan2.2-t2v-plus", "wan2.5-t2v-preview", "wan2.6-t2v")
I2V_MODELS = ("wanx2.1-i2v-turbo", "wanx2.1-i2v-plus", "wan2.2-i2v-flash", "wan2.2-i2v-plus",
              "wan2.5-i2v-preview", "wan2.6-i2v")
KF2V_MODELS = ("wanx2.1-kf2v-plus",)
T2I_MODELS = ("wan2.2-t2i-flash", "wan2.2-t2i-plus", "wanx2.1-t2i-turbo", "wanx2.1-t2i-plus",
              "wan2.5-t2i-preview", "qwen-image", "qwen-image-plus")
SYNC_IMAGE_MODELS = ("qwen-image-edit", "qwen-image-edit-plus", "qwen-image-max", "qwen-image-2.0",
                     "qwen-image-2.0-pro", "z-image-turbo", "wan2.6-t2i", "wan2.6-image", "wan2.7-image",
                     "wan2.7-image-pro")
# images-wave2.md §6.2: which route serves which model. CONFLICT: new-api sends every qwen-image
# model to the sync route; Alibaba documents qwen-image/qwen-image-plus as async.
MODEL_ROUTES: dict[str, tuple[str, ...]] = {
    **{m: ("t2v",) for m in T2V_MODELS},
    **{m: ("i2v",) for m in I2V_MODELS},
    **{m: ("kf2v",) for m in KF2V_MODELS},
    **{m: ("text2image",) for m in T2I_MODELS},
    **{m: ("multimodal",) for m in SYNC_IMAGE_MODELS},
}
ROUTE_OF_PATH = {VIDEO_ROUTE: ("t2v", "i2v"), KF2V_ROUTE: ("kf2v",), T2I_ROUTE: ("text2image",),
                 SYNC_ROUTE: ("multimodal",)}

RESOLUTIONS = ("480P", "720P", "1080P")
SIZE = re.compile(r"^(\d{3,4})\*(\d{3,4})$")
STAMP = re.compile(r"^\d{14}$")
ACCESS_KEY_ID = "LTAI5tSimDashScope0001"

SYNC_ASYNC_ONLY = "current user api does not support synchronous calls"
ASYNC_SYNC_ONLY = "current user api does not support asynchronous calls"
INPUT_INSPECTION = "Input data may contain inappropriate content."
OUTPUT_INSPECTION = "Output data may contain inappropriate content."
RATE_LIMITED = "Requests rate limit exceeded, please try again later."
INTERNAL_ERROR = "An internal error has occured, please try again later or contact service support."
FAILURE_MESSAGES = {
    "InternalError.Algo": "An internal error occurred in the algorithm service, please try again later.",
    "DataInspectionFailed": OUTPUT_INSPECTION,
}


class DsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str) -> DsError:
    return DsError(400, "InvalidParameter", message)


def _default_durations(model: str) -> tuple[int, ...]:
    """wan2.1: 5 s (turbo 3-5); wan2.2: 5; wan2.5: 5 or 10; wan2.6: up to 15 (per model UNCONFIRMED)."""
    if model.startswith("wanx2.1") and model.endswith("turbo"):
        return (3, 4, 5)
    if model.startswith("wan2.5"):
        return (5, 10)
    if model.startswith("wan2.6"):
        return tuple(range(2, 16))
    return (5,)


class DashScopeSimulator(Simulator):
    name = "dashscope"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.order: list[str] = []
        self._slots: dict[str, list[float]] = {}  # per model: heap of times a running slot frees up
        self._submits: dict[str, deque[float]] = {}  # per model: submit times in the last second
        self._url_secret = secrets.token_bytes(32)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def ds_error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        body = {"request_id": str(uuid.uuid4()), "code": code, "message": message}
        return JSONResponse(body, status_code=status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            code = str(self._x("fault_429_code", "Throttling.RateQuota"))
            return self.ds_error(int(self._x("throttling_status", 429)), code, RATE_LIMITED, headers)
        if status >= 500:
            return self.ds_error(status, "InternalError", INTERNAL_ERROR, headers)
        return self.ds_error(status, "InvalidParameter", message, headers)

    def _time(self, ts: float) -> str:
        """China time without a zone, milliseconds: ``2025-07-27 21:00:01.123``."""
        tz = timezone(timedelta(hours=float(self._x("time_zone_hours", 8))))
        return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    def _parse_stamp(self, value: str) -> float:
        tz = timezone(timedelta(hours=float(self._x("time_zone_hours", 8))))
        return datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=tz).timestamp()

    def routes_of(self, model: str) -> tuple[str, ...]:
        override = self._x("model_routes", None) or {}
        if model in override:
            return tuple(override[model])
        return MODEL_ROUTES.get(model, ())

    # -- task view ---------------------------------------------------------
    def status_of(self, task: SimTask, now: float) -> str:
        if task.outcome == "lost" or now - task.created_at > float(self._x("task_ttl_seconds", 86400.0)):
            return "UNKNOWN"
        phase = task.phase(now)
        if phase == "canceled":
            return "CANCELED"
        if phase == "queued":
            return "SUSPENDED" if task.outcome == "suspended" else "PENDING"
        if phase == "running":
            return "RUNNING"
        return "FAILED" if task.outcome in ("fail", "filtered") else "SUCCEEDED"

    def task_body(self, task: SimTask, origin: str, now: float) -> dict[str, Any]:
        status = self.status_of(task, now)
        output: dict[str, Any] = {"task_id": task.id, "task_status": status}
        body: dict[str, Any] = {"request_id": str(uuid.uuid4()), "output": output}
        if status == "UNKNOWN":
            return body
        output["submit_time"] = self._time(task.created_at)
        started = status in ("RUNNING", "SUCCEEDED", "FAILED")  # a cancel only ever hits a PENDING task
        if started:
            output["scheduled_time"] = self._time(task.started_at)
        if status == "CANCELED" and task.canceled_at is not None:
            output["end_time"] = self._time(task.canceled_at)
        elif status in ("SUCCEEDED", "FAILED"):
            output["end_time"] = self._time(task.finished_at)
        image = task.data["kind"] == "image"
        n = int(task.input.get("n", 1))
        if status == "RUNNING" or (image and started):
            output["task_metrics"] = {"TOTAL": n, "SUCCEEDED": 0, "FAILED": n if status == "FAILED" else 0}
        if status == "FAILED":
            code = task.data["fail_code"]
            output["code"] = code
            output["message"] = FAILURE_MESSAGES.get(code, "The task failed (simulated).")
        elif status == "SUCCEEDED":
            urls = self._mint(task, origin, now)
            if image:
                results: list[dict[str, Any]] = []
                for i in range(n):
                    if task.outcome == "partial" and i == n - 1:
                        results.append({"code": "DataInspectionFailed", "message": OUTPUT_INSPECTION})
                    else:
                        results.append(self._prompts(task) | {"url": urls[i]})
                ok = sum(1 for r in results if "url" in r)
                output["results"] = results
                output["task_metrics"] = {"TOTAL": n, "SUCCEEDED": ok, "FAILED": n - ok}
                body["usage"] = {"image_count": ok}
            else:
                output["video_url"] = urls[0]
                output |= self._prompts(task)
                body["usage"] = {"video_count": 1, "video_duration": task.input["duration"],
                                 "video_ratio": task.input["ratio"]}
        return body

    def _prompts(self, task: SimTask) -> dict[str, str]:
        prompt = str(task.input.get("prompt") or "")
        out = {"orig_prompt": prompt}
        if task.input.get("prompt_extend", True):
            out["actual_prompt"] = f"{prompt}. Rich detail, soft natural light, cinematic composition."
        return out

    # -- signed, expiring output URLs --------------------------------------
    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self._url_secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()[:40]

    def _mint(self, task: SimTask, origin: str, now: float) -> list[str]:
        """The task's output URLs, created (and their files stored) the first time they are shown."""
        urls: list[str] | None = task.data.get("urls")
        if urls is None:
            expires = max(now, task.finished_at) + self.config.output_ttl_seconds
            urls = [self._publish(task.id, i, task.data["ext"], expires) for i in range(int(task.input.get("n", 1)))]
            task.data["urls"] = urls
        return [origin + u for u in urls]

    def _publish(self, key: str, index: int, ext: str, expires: float) -> str:
        data, ctype = media.make(ext, f"dashscope:{key}:{index}")
        day = datetime.fromtimestamp(time.time(), UTC).strftime("%Y%m%d")
        path = f"/oss/dashscope-result/{day}/{key}/{secrets.token_hex(8)}-{index}.{ext}"
        self.files.files[path] = StoredFile(data, ctype, expires)
        stamp = math.ceil(expires)
        return f"{path}?Expires={stamp}&OSSAccessKeyId={ACCESS_KEY_ID}&Signature={self._sign(path, stamp)}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)
        stamp = request.query_params.get("Expires", "")
        signature = request.query_params.get("Signature", "")
        stored = self.files.get(path)
        if stored is None or not stamp.isdigit() or not hmac.compare_digest(signature, self._sign(path, int(stamp))):
            return self.expired_file_response()
        return Response(stored.data, media_type=stored.content_type)

    def expired_file_response(self) -> Response:
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Request has expired.</Message><HostId>dashscope-result.oss-accelerate.aliyuncs.com"
                b"</HostId></Error>")
        return Response(body, status_code=403, media_type="application/xml")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route(VIDEO_ROUTE, self.create_async, methods=["POST"]),
            Route(KF2V_ROUTE, self.create_async, methods=["POST"]),
            Route(T2I_ROUTE, self.create_async, methods=["POST"]),
            Route(SYNC_ROUTE, self.generate_sync, methods=["POST"]),
            Route("/api/v1/tasks", self.list_tasks, methods=["GET"]),
            Route("/api/v1/tasks/{task_id}", self.get_task, methods=["GET"]),
            Route("/api/v1/tasks/{task_id}/cancel", self.cancel_task, methods=["POST"]),
            Route("/oss/dashscope-result/{day}/{key}/{name}", self.download, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        key = bearer(request)
        region = str(self._x("region", "intl"))
        other_regions = {k for r, keys in (self._x("region_keys", None) or {}).items() if r != region for k in keys}
        if not self.config.key_ok(key) or key in other_regions:
            return self.ds_error(401, "InvalidApiKey", "Invalid API-key provided.")
        return None

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _bad("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        return body

    async def create_async(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        if request.headers.get("x-dashscope-async", "").lower() != "enable":
            return self.ds_error(int(self._x("async_header_status", 403)), "AccessDenied", SYNC_ASYNC_ONLY)
        try:
            body = await self._json(request)
            mode, model = self._route_model(route_path(request), body, sync=False)
            inp = self.validate(mode, model, body)
            d = directives(inp["prompt"])
            if "error_in_body" in d:
                return JSONResponse({"request_id": str(uuid.uuid4()), "code": "InvalidParameter",
                                     "message": "Size not supported"})
            self.admit(model, d)
        except DsError as err:
            return self.ds_error(err.status, err.code, err.message)

        now = time.time()
        queue = float(d.get("queue") or self.config.queue_seconds) + self._wait_for_slot(model, now)
        video = mode != "text2image"
        task = SimTask(id=str(uuid.uuid4()), created_at=now, queue_seconds=queue,
                       run_seconds=float(d.get("run") or self.config.run_seconds), outcome=_outcome(d), input=inp,
                       data={"kind": "video" if video else "image", "ext": "mp4" if video else "png",
                             "fail_code": _fail_code(d)})
        self._hold_slot(model, task)
        self.tasks[task.id] = task
        self.order.append(task.id)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{model}:{digest}")  # no client id: equal bodies are separate tasks
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"request_id": str(uuid.uuid4()),
                             "output": {"task_id": task.id, "task_status": "PENDING"}})

    def _route_model(self, path: str, body: dict[str, Any], *, sync: bool) -> tuple[str, str]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("Missing required parameter: model")
        served = self.routes_of(model)
        if not sync and served == ("multimodal",):
            raise DsError(int(self._x("async_header_status", 403)), "AccessDenied", ASYNC_SYNC_ONLY)
        mode = next((m for m in ROUTE_OF_PATH[path] if m in served), None)
        if mode is None:
            raise _bad("Model not exist.")
        return mode, model

    def validate(self, mode: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """Check a task body as documented; returns the task's normalised input."""
        inp, params = body.get("input"), body.get("parameters", {})
        if not isinstance(inp, dict):
            raise _bad("Missing required parameter: input")
        if not isinstance(params, dict):
            raise _bad("parameters must be an object")
        prompt = inp.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _bad("input.prompt must be a string")
        if mode in ("t2v", "text2image") and not prompt:
            raise _bad("Missing required parameter: input.prompt")
        limit = 800 if model.startswith(("wanx2.1", "wan2.2")) else 2000
        if prompt and len(prompt) > limit:
            raise _bad(f"input.prompt exceeds the maximum length of {limit} characters")
        negative = inp.get("negative_prompt")
        if negative is not None and (not isinstance(negative, str) or len(negative) > 500):
            raise _bad("input.negative_prompt must be a string of at most 500 characters")
        strict = bool(self._x("strict_mode_fields", True))
        out: dict[str, Any] = {"model": model, "prompt": prompt or "",
                               "prompt_extend": params.get("prompt_extend", True) is not False}
        if mode == "text2image":
            size = params.get("size", "1664*928" if model.startswith("qwen-image") else "1024*1024")
            _check_size(size)
            n = params.get("n", 1)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
                raise _bad("parameters.n must be an integer from 1 to 4")
            if model.startswith("qwen-image") and n != 1:
                raise _bad(f"parameters.n must be 1 for {model}")
            return out | {"n": n, "size": size}

        if mode == "t2v":
            size = params.get("size", "1920*1080")
            _check_size(size)
            if strict and "resolution" in params:
                raise _bad("parameters.resolution is not supported for text-to-video, use parameters.size")
            out["ratio"] = size
        else:
            if mode == "i2v" and not _is_image_ref(inp.get("img_url")):
                raise _bad("Missing required parameter: input.img_url")
            if mode == "kf2v" and not _is_image_ref(inp.get("first_frame_url")):
                raise _bad("Missing required parameter: input.first_frame_url")
            if mode == "kf2v" and "last_frame_url" in inp and not _is_image_ref(inp["last_frame_url"]):
                raise _bad("input.last_frame_url must be a URL")
            resolution = params.get("resolution", "1080P" if model.startswith("wan2.") else "720P")
            if resolution not in RESOLUTIONS:
                raise _bad(f"parameters.resolution must be one of {', '.join(RESOLUTIONS)}")
            if strict and "size" in params:
                raise _bad("parameters.size is not supported for image-to-video, use parameters.resolution")
            out["ratio"] = resolution
        override = self._x("durations", None) or {}
        allowed = tuple(override.get(model, _default_durations(model)))
        duration = params.get("duration", 5 if 5 in allowed else allowed[0])
        if isinstance(duration, bool) or not isinstance(duration, int) or duration not in allowed:
            raise _bad(f"parameters.duration must be one of {list(allowed)} for {model}")
        return out | {"duration": duration}

    def admit(self, model: str, d: dict[str, str]) -> None:
        """Account checks before a task or a sync call starts (moderation, balance, rate)."""
        if "blocked" in d:
            raise DsError(400, "DataInspectionFailed", INPUT_INSPECTION)
        if "arrearage" in d:
            raise DsError(400, "Arrearage", "Access denied, please make sure your account is in good standing.")
        rps = self._x("submit_rps", None)
        if rps is not None:
            now = time.time()
            window = self._submits.setdefault(model, deque())
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= int(rps):
                raise DsError(int(self._x("throttling_status", 429)), "Throttling.RateQuota", RATE_LIMITED)
            window.append(now)

    def _wait_for_slot(self, model: str, now: float) -> float:
        """Extra PENDING time until one of the model's running slots frees (FIFO)."""
        limit = self._x("max_running_per_model", None)
        slots = self._slots.setdefault(model, [])
        if not limit:
            return 0.0
        while slots and slots[0] <= now:
            heapq.heappop(slots)
        if len(slots) < int(limit):
            return 0.0
        return max(0.0, heapq.heappop(slots) - now - self.config.queue_seconds)

    def _hold_slot(self, model: str, task: SimTask) -> None:
        if self._x("max_running_per_model", None):
            heapq.heappush(self._slots.setdefault(model, []), task.finished_at)

    async def generate_sync(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("generate")) is not None:
            return injected
        if request.headers.get("x-dashscope-async", "").lower() == "enable":
            return self.ds_error(int(self._x("async_header_status", 403)), "AccessDenied", ASYNC_SYNC_ONLY)
        try:
            body = await self._json(request)
            _, model = self._route_model(SYNC_ROUTE, body, sync=True)
            prompt, n, width, height = self._validate_messages(model, body)
            d = directives(prompt)
            if "error_in_body" in d:
                return JSONResponse({"request_id": str(uuid.uuid4()), "code": "InvalidParameter",
                                     "message": "Size not supported"})
            self.admit(model, d)
        except DsError as err:
            return self.ds_error(err.status, err.code, err.message)

        await asyncio.sleep(float(d.get("queue") or self.config.queue_seconds)
                            + float(d.get("run") or self.config.run_seconds))
        call_id = str(uuid.uuid4())
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{model}:{digest}")  # billed once generated, whatever reaches the client
        outcome = _outcome(d)
        if outcome == "filtered":
            return self.ds_error(400, "DataInspectionFailed", OUTPUT_INSPECTION)
        if outcome == "fail":
            code = _fail_code(d)
            return self.ds_error(500 if code.startswith("InternalError") else 400, code,
                                 FAILURE_MESSAGES.get(code, "The request failed (simulated)."))
        ok = n - 1 if outcome == "partial" else n
        expires = time.time() + self.config.output_ttl_seconds
        origin = self.origin(request)
        content = [{"image": origin + self._publish(call_id, i, "png", expires)} for i in range(ok)]
        if (injected := await self.fault("generate", after_effect=True)) is not None:
            return injected
        return JSONResponse({
            "output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                       "task_metric": {"FAILED": n - ok, "SUCCEEDED": ok, "TOTAL": n}},
            "usage": {"height": height, "image_count": ok, "width": width},
            "request_id": call_id,
        })

    def _validate_messages(self, model: str, body: dict[str, Any]) -> tuple[str, int, int, int]:
        inp, params = body.get("input"), body.get("parameters", {})
        messages = inp.get("messages") if isinstance(inp, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(params, dict):
            raise _bad("Missing required parameter: input.messages")
        content = messages[0].get("content") if isinstance(messages[0], dict) else None
        if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
            raise _bad("input.messages[0].content must be a list of {text} and {image} items")
        texts = [c["text"] for c in content if isinstance(c.get("text"), str)]
        images = [c["image"] for c in content if "image" in c]
        if not texts or not texts[0].strip():
            raise _bad("input.messages[0].content must contain a text item")
        if "edit" in model and not images:
            raise _bad(f"{model} needs at least one image item")
        if not all(_is_image_ref(i) for i in images):
            raise _bad("image items must be URLs or data:image/...;base64 strings")
        n = params.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 6:
            raise _bad("parameters.n must be an integer from 1 to 6")
        size = params.get("size", "1328*1328")
        match = _check_size(size)
        return texts[0], n, int(match.group(1)), int(match.group(2))

    async def get_task(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task_id = request.path_params["task_id"]
        task = self.tasks.get(task_id)
        if task is None:
            return JSONResponse({"request_id": str(uuid.uuid4()),
                                 "output": {"task_id": task_id, "task_status": "UNKNOWN"}})
        return JSONResponse(self.task_body(task, self.origin(request), time.time()))

    async def cancel_task(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("cancel")) is not None:
            return injected
        task = self.tasks.get(request.path_params["task_id"])
        now = time.time()
        if task is None or self.status_of(task, now) != "PENDING":
            return self.ds_error(400, str(self._x("cancel_error_code", "UnsupportedOperation")),
                                 "Failed to cancel the task, please confirm if the task is in PENDING status.")
        task.canceled_at = now
        return JSONResponse({"request_id": str(uuid.uuid4())})

    async def list_tasks(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        q = request.query_params
        try:
            page_no, page_size = int(q.get("page_no", "1")), int(q.get("page_size", "10"))
        except ValueError:
            return self.ds_error(400, "InvalidParameter", "page_no and page_size must be integers")
        if page_no < 1 or not 1 <= page_size <= 100:
            return self.ds_error(400, "InvalidParameter", "page_no must be >= 1 and page_size in [1, 100]")
        bounds = []
        for name in ("start_time", "end_time"):
            value = q.get(name)
            if value is not None and not STAMP.match(value):
                return self.ds_error(400, "InvalidParameter", f"{name} must be formatted as YYYYMMDDhhmmss")
            bounds.append(self._parse_stamp(value) if value else None)
        start, end = bounds
        now = time.time()
        chosen = []
        for task_id in reversed(self.order):
            task = self.tasks[task_id]
            status = self.status_of(task, now)
            if status == "UNKNOWN":
                continue
            # The stamps have whole seconds: a task submitted within end_time's second is inside.
            if (start is not None and task.created_at < start) or (end is not None and task.created_at >= end + 1):
                continue
            if q.get("model_name") not in (None, task.input["model"]):
                continue
            if q.get("status") not in (None, status) or q.get("task_id") not in (None, task.id):
                continue
            item = {"task_id": task.id, "task_status": status, "model_name": task.input["model"],
                    "submit_time": self._time(task.created_at)}
            if status in ("SUCCEEDED", "FAILED"):
                item["end_time"] = self._time(task.finished_at)
            chosen.append(item)
        page = chosen[(page_no - 1) * page_size:page_no * page_size]
        return JSONResponse({"request_id": str(uuid.uuid4()), "data": page, "total": len(chosen),
                             "total_page": math.ceil(len(chosen) / page_size), "page_no": page_no,
                             "page_size": page_size})


def _outcome(d: dict[str, str]) -> str:
    for name in ("lost", "filtered", "fail", "partial", "suspended"):
        if name in d:
            return name
    return "succeed"


def _fail_code(d: dict[str, str]) -> str:
    if "filtered" in d:
        return "DataInspectionFailed"
    return d.get("fail") or "InternalError.Algo"


def _check_size(size: Any) -> re.Match[str]:
    match = SIZE.match(size) if isinstance(size, str) else None
    if match is None:
        raise _bad(f"parameters.size must be formatted as width*height, e.g. 1280*720, got {json.dumps(size)}")
    return match


def _is_image_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://", "oss://", "data:image/"))
