"""new-api ("one-api" family) gateway simulator: the shared task engine, and Kling video.

Written from new-api's documented wire format and code (shared/providers
replicate-fal-suno-gateways.md §3a and §4, new-api upstream ``ba474393``), not
from our adapters. A new-api gateway never runs a job itself: it forwards the
submission to an upstream channel, stores a task row, and refreshes that row
from the upstream in a background loop. Clients only ever see the *stored*
row, so this module simulates the loop:

- Every task is inserted as ``NOT_START`` / ``"0%"`` and changes only on a
  gateway **tick** (new-api sleeps 15 s between passes). Ticks happen at
  ``t0 + k * gateway_tick_seconds`` (short by default); on each tick the stored
  row becomes what the upstream reported at that moment.
- **Timeout sweep** (``TASK_TIMEOUT_MINUTES``, default 24 h): on the first tick
  after ``submit_time + timeout`` a task whose stored status is not terminal is
  set to ``FAILURE``, ``progress "100%"``, ``fail_reason "任务超时（N分钟）"`` —
  and its ``data`` keeps the stale upstream body (new-api issue #5715).
- Envelopes: task results ``{"code":"success","message":"","data":...}``, task
  errors ``{"code":"<code>","message":"...","data":null}`` with the error's HTTP
  status, auth/distribution errors OpenAI-style
  ``{"error":{"message","type":"new_api_error","code"}}``.
- Auth as new-api's ``TokenAuth``: ``Authorization: Bearer sk-...`` (also a bare
  key; ``mj-api-secret`` when Authorization is empty); the ``sk-`` prefix and a
  ``-<channel>`` suffix are stripped. Each key is its own user: a task fetched
  with another key is ``task_not_exist``.
- Public task ids ``task_`` + 32 alphanumerics (``public_task_ids`` false: the
  upstream id, as gateways before 2026-02 did).

``KlingGatewaySimulator`` — a new-api gateway with one Kling channel:

- ``POST /v1/video/generations`` and ``POST /v1/videos`` (JSON or
  ``multipart/form-data``; body ``prompt, model, image|images, duration|seconds,
  size, metadata``) and the Kling-native ``POST /kling/v1/videos/text2video`` /
  ``image2video`` (Kling body, converted to the unified one: ``model_name`` ->
  ``model``, everything -> ``metadata``). All answer **200** with the OpenAI
  video object ``{"id","task_id","object":"video","model","status":"queued",
  "progress":0,"created_at"}`` and header ``X-New-Api-Other-Ratios``.
- ``GET /v1/video/generations/{id}`` and ``GET /kling/v1/videos/{text2video|image2video}/{id}``
  -> ``{"code":"success","message":"","data":<TaskDto>}``; ``TaskDto.data`` is the
  raw Kling body of the last poll (before the first poll: Kling's submit body),
  ``result_url`` the video URL (or the fail reason), ``platform`` ``"50"``.
- ``GET /v1/videos/{id}`` -> OpenAI video object (kling converter): ``status``
  ``unknown`` (NOT_START) / ``queued`` / ``in_progress`` / ``completed`` /
  ``failed``, integer ``progress``, URL in ``metadata.url``, ``seconds``;
  ``created_at``/``completed_at`` copied from Kling's **millisecond** fields, and
  no ``error`` for failed tasks (Kling says ``code:0`` even then) — as new-api does.
- ``GET /v1/videos/{id}/content`` streams the video (400 until ``SUCCESS``,
  404 unknown, 502 when the upstream file has expired).
- Stored statuses: ``NOT_START -> SUBMITTED -> IN_PROGRESS -> SUCCESS|FAILURE``;
  progress ``0% / 10% / 30% / 100%`` (new-api's defaults, Kling reports none).

Directives (in the prompt): ``[sim:fail]`` upstream fails the task
(``task_status_msg`` becomes ``fail_reason``); ``[sim:stuck]`` upstream stays
``processing`` forever; ``[sim:lost]`` upstream never answers for the task
(stays ``NOT_START``) — both end in the timeout sweep; ``[sim:balance]`` submit
-> 429 "当前分组上游负载已饱和，请稍后再试" (Kling 1102 through new-api);
``[sim:unsafe]`` submit -> 400 ``fail_to_fetch_task`` carrying Kling's 1301 body;
``[sim:queue=S]`` / ``[sim:run=S]`` timings.

Fault route names: ``submit``, ``fetch`` (TaskDto routes), ``video_fetch``
(``/v1/videos/{id}``), ``content``, ``download`` (the upstream's file URLs).

``SimConfig.extra``: ``gateway_tick_seconds`` (0.25), ``gateway_task_timeout_seconds``
(86400; 0 disables), ``public_task_ids`` (true), ``models`` (Kling model list
the channel serves; any ``kling-*`` model is also accepted).
"""

from __future__ import annotations

import json
import math
import secrets
import string
import time
import uuid
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, directives

_ALNUM = string.ascii_letters + string.digits
TERMINAL = ("SUCCESS", "FAILURE")
SATURATED = "当前分组上游负载已饱和，请稍后再试"


def public_task_id() -> str:
    """new-api's ``GenerateTaskID``: ``task_`` + 32 random alphanumerics."""
    return "task_" + "".join(secrets.choice(_ALNUM) for _ in range(32))


def request_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(8)


@dataclass
class Snapshot:
    """What the gateway stores for a task after one upstream poll."""

    status: str  # SUBMITTED, QUEUED, IN_PROGRESS, SUCCESS, FAILURE, UNKNOWN, ...
    since: float  # upstream time this status began (for ``updated_at``)
    data: Any = None  # raw upstream body as stored in ``TaskDto.data``
    fail_reason: str = ""
    result_url: str = ""
    start_time: float = 0.0
    finish_time: float = 0.0
    progress: str = ""


@dataclass
class View:
    """The task row as a client sees it at one moment."""

    status: str
    progress: str
    data: Any
    fail_reason: str
    result_url: str
    start_time: int
    finish_time: int
    updated_at: int


class NewApiGateway(Simulator):
    """Shared machinery of new-api-style gateways (tick clock, sweep, auth, envelopes)."""

    name = "new-api"
    platform = ""

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.t0 = time.time()
        self.tasks: dict[str, SimTask] = {}
        self.users: dict[str, int] = {}
        self.next_row_id = 1

    # -- config ------------------------------------------------------------
    @property
    def tick_seconds(self) -> float:
        return max(0.001, float(self.config.extra.get("gateway_tick_seconds", 0.25)))

    @property
    def timeout_seconds(self) -> float:
        return float(self.config.extra.get("gateway_task_timeout_seconds", 86400.0))

    def new_task_id(self, upstream_id: str) -> str:
        return public_task_id() if self.config.extra.get("public_task_ids", True) else upstream_id

    # -- wire format: errors -------------------------------------------------
    def task_error(self, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
        if status == 429:  # the relay rewrites every final 429 message
            message = SATURATED
        return JSONResponse({"code": code, "message": message, "data": None},
                            status_code=status, headers=headers)

    def openai_error(self, status: int, message: str, code: str = "") -> Response:
        body = {"error": {"message": f"{message} (request id: {request_id()})",
                          "type": "new_api_error", "code": code}}
        return JSONResponse(body, status_code=status)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        code = "fail_to_fetch_task" if status == 429 else "do_request_failed"
        return self.task_error(status, code, message, headers)

    # -- auth (TokenAuth) --------------------------------------------------
    @staticmethod
    def _normalise_key(raw: str) -> str:
        key = raw.strip()
        if key.lower().startswith("bearer "):
            key = key[7:].strip()
        key = key.removeprefix("sk-")
        return key.split("-")[0]

    def authenticate(self, request: Request) -> int | Response:
        """The caller's user id, or new-api's 401 body."""
        raw = request.headers.get("authorization", "")
        key = self._normalise_key(raw)
        if not key or raw.strip() == "midjourney-proxy":
            key = self._normalise_key(request.headers.get("mj-api-secret", ""))
        if not key:
            return self.openai_error(401, "未提供令牌")
        allowed = {self._normalise_key(k) for k in self.config.api_keys}
        if allowed and key not in allowed:
            english = request.headers.get("accept-language", "").startswith("en")
            msg = "Invalid token" if english else "无效的令牌"
            return self.openai_error(401, msg)
        if key not in self.users:
            self.users[key] = len(self.users) + 1
        return self.users[key]

    # -- tasks -------------------------------------------------------------
    def add_task(self, task: SimTask, user: int) -> None:
        task.data["user"] = user
        task.data["row_id"] = self.next_row_id
        self.next_row_id += 1
        self.tasks[task.id] = task

    def own_task(self, task_id: str, user: int) -> SimTask | None:
        task = self.tasks.get(task_id)
        return task if task is not None and task.data.get("user") == user else None

    # -- the polling loop, evaluated lazily ----------------------------------
    def tick_time(self, k: int) -> float:
        return self.t0 + k * self.tick_seconds

    def first_tick_after(self, t: float) -> int:
        """Index of the first tick strictly after ``t``."""
        return math.floor((t - self.t0) / self.tick_seconds) + 1

    def first_tick_at_or_after(self, t: float) -> int:
        return math.ceil((t - self.t0) / self.tick_seconds)

    def observed_at(self, task: SimTask, upstream_time: float) -> float:
        """When the gateway first sees an upstream change that happened at ``upstream_time``."""
        k = max(self.first_tick_after(task.created_at), self.first_tick_at_or_after(upstream_time))
        return self.tick_time(k)

    def upstream(self, task: SimTask, at: float) -> Snapshot | None:
        """What a poll of the upstream at ``at`` stores; ``None`` = no answer for this task."""
        raise NotImplementedError

    def initial(self, task: SimTask) -> Snapshot:
        """The row as inserted at submit time (before the first poll)."""
        return Snapshot("NOT_START", task.created_at, None, progress="0%")

    def default_progress(self, status: str) -> str:
        return "100%" if status in TERMINAL else "0%"

    def stored_after(self, task: SimTask, k: int, first: int) -> Snapshot:
        if k < first:
            return self.initial(task)
        snap = self.upstream(task, self.tick_time(k))
        return snap if snap is not None else self.initial(task)

    def view(self, task: SimTask, now: float | None = None) -> View:
        now = time.time() if now is None else now
        first = self.first_tick_after(task.created_at)
        k_now = math.floor((now - self.t0) / self.tick_seconds)
        timeout = self.timeout_seconds
        if timeout > 0:
            k_sweep = math.floor((task.created_at + timeout - self.t0) / self.tick_seconds) + 1
            if k_now >= k_sweep:
                prev = self.stored_after(task, k_sweep - 1, first)
                if prev.status not in TERMINAL:
                    swept = self.tick_time(k_sweep)
                    return View("FAILURE", "100%", prev.data, f"任务超时（{int(timeout // 60)}分钟）",
                                "", int(prev.start_time), int(swept), int(swept))
        snap = self.stored_after(task, k_now, first)
        updated = task.created_at if snap.status == "NOT_START" else self.observed_at(task, snap.since)
        return View(snap.status, snap.progress or self.default_progress(snap.status), snap.data,
                    snap.fail_reason, snap.result_url, int(snap.start_time), int(snap.finish_time),
                    int(updated))

    # -- TaskDto -----------------------------------------------------------
    def task_dto(self, task: SimTask, view: View) -> dict[str, Any]:
        model = task.data.get("model", "")
        dto: dict[str, Any] = {
            "id": task.data["row_id"],
            "created_at": int(task.created_at),
            "updated_at": view.updated_at,
            "task_id": task.id,
            "platform": self.platform,
            "user_id": task.data["user"],
            "group": "default",
            "channel_id": 1,
            "quota": task.data.get("quota", 0),
            "action": task.data["action"],
            "status": view.status,
            "fail_reason": view.fail_reason,
            "submit_time": int(task.created_at),
            "start_time": view.start_time,
            "finish_time": view.finish_time,
            "progress": view.progress,
            "properties": {"input": "", "upstream_model_name": model, "origin_model_name": model},
            "data": view.data,
        }
        # GetResultURL falls back to fail_reason; the field is omitempty.
        result_url = view.result_url or view.fail_reason
        if result_url:
            dto["result_url"] = result_url
        return dto

    def success(self, data: Any, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"code": "success", "message": "", "data": data}, headers=headers)

    def publish_once(self, task: SimTask, key: str, ext: str, seed: str, name: str) -> str:
        """Publish an output file once per task (lifetime counted from the task's finish)."""
        paths: dict[str, str] = task.data.setdefault("files", {})
        if key not in paths:
            data, ctype = media.make(ext, seed)
            ttl = max(0.0, task.finished_at + self.config.output_ttl_seconds - time.time())
            paths[key] = self.files.publish(data, ctype, name, ttl=ttl)
        return paths[key]


async def read_json_object(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def read_form_fields(request: Request) -> dict[str, Any] | None:
    """Text fields of a ``multipart/form-data`` body (file parts are noted, not kept)."""
    raw = await request.body()
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + raw)
    if not msg.is_multipart():
        return None
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename():
            fields[name] = f"<file {part.get_filename()}>"
        else:
            payload = part.get_payload(decode=True)
            fields[name] = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return fields


KLING_MODELS = ["kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo",
                "kling-v2-6"]
KLING_CHANNEL_TYPE = "50"
# new-api's default progress strings when the upstream reports none.
VIDEO_PROGRESS = {"NOT_START": "0%", "SUBMITTED": "10%", "QUEUED": "20%", "IN_PROGRESS": "30%",
                  "SUCCESS": "100%", "FAILURE": "100%"}
VIDEO_STATUS = {"QUEUED": "queued", "SUBMITTED": "queued", "IN_PROGRESS": "in_progress",
                "SUCCESS": "completed", "FAILURE": "failed"}


class KlingGatewaySimulator(NewApiGateway):
    """A new-api gateway whose only video channel is Kling."""

    name = "newapi-kling"
    platform = KLING_CHANNEL_TYPE

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/video/generations", self.submit_unified, methods=["POST"]),
            Route("/v1/video/generations/{task_id}", self.fetch_dto, methods=["GET"]),
            Route("/v1/videos", self.submit_openai, methods=["POST"]),
            Route("/v1/videos/{task_id}", self.fetch_openai, methods=["GET"]),
            Route("/v1/videos/{task_id}/content", self.content, methods=["GET"]),
            Route("/kling/v1/videos/{kind:str}", self.submit_kling, methods=["POST"]),
            Route("/kling/v1/videos/{kind:str}/{task_id}", self.fetch_dto, methods=["GET"]),
        ]

    # -- submit ------------------------------------------------------------
    async def submit_unified(self, request: Request) -> Response:
        return await self._submit(request, native=False)

    async def submit_openai(self, request: Request) -> Response:
        return await self._submit(request, native=False)

    async def submit_kling(self, request: Request) -> Response:
        if request.path_params["kind"] not in ("text2video", "image2video"):
            return Response(b"404 page not found", status_code=404, media_type="text/plain")
        return await self._submit(request, native=True)

    async def _submit(self, request: Request, *, native: bool) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("submit")) is not None:
            return injected
        if request.headers.get("content-type", "").startswith("multipart/form-data") and not native:
            body = await read_form_fields(request)
            if body is None:
                return self.task_error(400, "invalid_multipart_form", "invalid multipart form")
        else:
            body = await read_json_object(request)
            if body is None:
                return self.task_error(400, "invalid_request", "invalid character in request body")
        if native:  # middleware.KlingRequestConvert
            model = str(body.get("model_name") or body.get("model") or "kling-v1")
            body = {"model": model, "prompt": str(body.get("prompt") or ""), "metadata": body}
        model = str(body.get("model") or "")
        served = list(self.config.extra.get("models", KLING_MODELS))
        if not model or not (model in served or model.startswith("kling-")):
            return self.openai_error(503, f"当前分组 default 下对于模型 {model} 无可用渠道",
                                     "model_not_found")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self.task_error(400, "invalid_request", "prompt is required")
        meta = body.get("metadata")
        if isinstance(meta, str):  # multipart forms carry metadata as a JSON string
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = {}
        meta = meta if isinstance(meta, dict) else {}
        images = body.get("images") if isinstance(body.get("images"), list) else []
        image = body.get("image") or (images[0] if images else None) or meta.get("image") \
            or meta.get("image_tail") or body.get("input_reference")
        action = "generate" if image else "textGenerate"
        duration = meta.get("duration") or body.get("duration") or body.get("seconds") or 5
        try:
            seconds = int(float(duration))
        except (TypeError, ValueError):
            return self.task_error(400, "invalid_request", f"invalid duration: {duration!r}")
        traps = directives(prompt)
        if "balance" in traps:  # Kling 1102 arrives as HTTP 429 -> final 429
            return self.task_error(429, "fail_to_fetch_task", "Account balance not enough")
        if "unsafe" in traps:  # Kling 1301 (HTTP 400): upstream body becomes the message
            upstream_body = json.dumps({"code": 1301, "message": "Failure to pass the risk control system",
                                        "request_id": str(uuid.uuid4())})
            return self.task_error(400, "fail_to_fetch_task", upstream_body)
        upstream_id = str(secrets.randbelow(9 * 10**17) + 10**17)  # Kling's numeric task ids
        task = SimTask.create(self.new_task_id(upstream_id), self.config, prompt, input=body,
                              data={"model": model, "action": action, "upstream_id": upstream_id,
                                    "seconds": seconds, "quota": 0})
        self.add_task(task, user)
        self.record_creation(json.dumps(body, sort_keys=True, default=str))
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        video = {"id": task.id, "task_id": task.id, "object": "video", "model": model,
                 "status": "queued", "progress": 0, "created_at": int(time.time())}
        return JSONResponse(video, headers={"X-New-Api-Other-Ratios": json.dumps({"seconds": seconds})})

    # -- upstream (Kling) ----------------------------------------------------
    def _kling_body(self, task: SimTask, status: str, updated_ms: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"task_id": task.data["upstream_id"], "task_status": status,
                                "task_status_msg": "", "task_info": {"external_task_id": ""},
                                "created_at": int(task.created_at * 1000), "updated_at": updated_ms}
        data.update(extra)
        return {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}

    def initial(self, task: SimTask) -> Snapshot:
        # Before its first poll the row's data is Kling's submit response.
        body = self._kling_body(task, "submitted", int(task.created_at * 1000), {})
        return Snapshot("NOT_START", task.created_at, body, progress="0%")

    def upstream(self, task: SimTask, at: float) -> Snapshot | None:
        if task.outcome == "lost":
            return None
        phase = task.phase(at)
        if phase == "queued":
            body = self._kling_body(task, "submitted", int(task.created_at * 1000), {})
            return Snapshot("SUBMITTED", task.created_at, body, progress=VIDEO_PROGRESS["SUBMITTED"])
        started = self.observed_at(task, task.started_at)
        if phase == "running" or task.outcome == "stuck":
            body = self._kling_body(task, "processing", int(task.started_at * 1000), {})
            return Snapshot("IN_PROGRESS", task.started_at, body, start_time=started,
                            progress=VIDEO_PROGRESS["IN_PROGRESS"])
        finished = self.observed_at(task, task.finished_at)
        updated_ms = int(task.finished_at * 1000)
        if task.outcome == "fail":
            reason = "Image pixel is invalid (simulated)"
            body = self._kling_body(task, "failed", updated_ms,
                                    {"task_status_msg": reason, "task_result": {}})
            return Snapshot("FAILURE", task.finished_at, body, fail_reason=reason, start_time=started,
                            finish_time=finished, progress="100%")
        url = self._video_url(task)
        video = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, task.id)), "url": url,
                 "duration": f"{task.data['seconds']}.1"}
        body = self._kling_body(task, "succeed", updated_ms,
                                {"task_result": {"videos": [video]}, "final_unit_deduction": "1"})
        return Snapshot("SUCCESS", task.finished_at, body, result_url=url, start_time=started,
                        finish_time=finished, progress="100%")

    def _video_url(self, task: SimTask) -> str:
        name = f"{task.data['upstream_id']}-0_raw_video_1.mp4"
        path = self.publish_once(task, "video", "mp4", task.id, name)
        return task.data["origin"] + path

    # -- fetch -------------------------------------------------------------
    async def _find(self, request: Request, route: str) -> SimTask | Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault(route)) is not None:
            return injected
        task = self.own_task(request.path_params["task_id"], user)
        if task is None:
            return self.task_error(400, "task_not_exist", "task_not_exist")
        task.data.setdefault("origin", self.origin(request))
        return task

    async def fetch_dto(self, request: Request) -> Response:
        if request.path_params.get("kind", "text2video") not in ("text2video", "image2video"):
            return Response(b"404 page not found", status_code=404, media_type="text/plain")
        found = await self._find(request, "fetch")
        if isinstance(found, Response):
            return found
        return self.success(self.task_dto(found, self.view(found)))

    async def fetch_openai(self, request: Request) -> Response:
        found = await self._find(request, "video_fetch")
        if isinstance(found, Response):
            return found
        view = self.view(found)
        kling = view.data.get("data", {}) if isinstance(view.data, dict) else {}
        video: dict[str, Any] = {"id": found.id, "object": "video", "model": "",
                                 "status": VIDEO_STATUS.get(view.status, "unknown"),
                                 "progress": int(view.progress.rstrip("%") or 0),
                                 "created_at": kling.get("created_at", 0)}
        if kling.get("updated_at"):
            video["completed_at"] = kling["updated_at"]
        videos = (kling.get("task_result") or {}).get("videos") or []
        if videos:
            if videos[0].get("duration"):
                video["seconds"] = videos[0]["duration"]
            if videos[0].get("url"):
                video["metadata"] = {"url": videos[0]["url"]}
        return JSONResponse(video)

    async def content(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("content")) is not None:
            return injected
        task = self.own_task(request.path_params["task_id"], user)
        if task is None:
            return JSONResponse({"error": {"message": "Task not found", "type": "invalid_request_error"}},
                                status_code=404)
        task.data.setdefault("origin", self.origin(request))
        view = self.view(task)
        if view.status != "SUCCESS":
            msg = f"Task is not completed yet, current status: {view.status}"
            return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, status_code=400)
        stored = self.files.get(task.data["files"]["video"])
        if stored is None:
            return JSONResponse({"error": {"message": "Failed to fetch video content: upstream returned 404",
                                           "type": "server_error"}}, status_code=502)
        return Response(stored.data, media_type=stored.content_type)
