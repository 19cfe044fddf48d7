"""Kling official API simulator (video tasks: text-to-video and image-to-video).

Written from Kling's documented wire format (shared/providers/video-sora-veo-kling-runway.md
§0 and §3, and the KLING-DOC API reference), not from our adapter.

Routes (``{family}`` is ``text2video`` or ``image2video``; each is its own namespace):

- ``POST /v1/videos/{family}``: create; answers the envelope
  ``{code: 0, message: "SUCCEED", request_id, data: {task_id, task_status: "submitted",
  task_info: {external_task_id}, created_at, updated_at}}``.
- ``GET /v1/videos/{family}/{id}``: query one task; ``id`` is the ``task_id`` **or** the
  ``external_task_id`` given at creation (documented: "choose one"; filled directly into the path).
  A task is only found under the family it was created on.
- ``GET /v1/videos/{family}?pageNum=1&pageSize=30``: list (newest first; pageNum 1-1000,
  pageSize 1-500), ``data`` is an array of task objects.
- ``GET /bs2/upload-kling-api/...mp4?x-exp=..&x-t=..&x-sign=..``: the generated video
  (a real H.264 MP4, distinct per task), at a signed URL that stops working (404) after
  ``output_ttl_seconds``. The URL is fixed per task (re-querying does not refresh it).

Auth: ``Authorization: Bearer <JWT>``, HS256 signed with the secret key, ``iss`` = access key,
``exp`` required, ``nbf`` honoured, no leeway (``extra["jwt_leeway"]``). Failures are HTTP 401
with code 1001 (empty), 1002 (not a JWT / wrong alg / claim missing), 1000 (unknown access
key or bad signature), 1003 (``nbf`` in the future), 1004 (expired).

Statuses: ``submitted -> processing -> succeed | failed`` (ms timestamps; ``task_status_msg``
carries the failure reason). A failed task is still ``code: 0, message: "SUCCEED"`` (the
documented trap). Succeeded tasks carry ``task_result.videos[{id, url, duration: "5.1"}]``
(plus ``watermark_url`` when ``watermark_info.enabled``) and ``final_unit_deduction``.

Errors: envelope ``{code, message, request_id}`` with Kling's business codes: 1200/1201 (400)
for bad parameters (``duration``, ``mode``, ``aspect_ratio``, ``cfg_scale``, a ``data:`` prefix
on a base64 image, duplicate ``external_task_id`` ...), 1203 (404) unknown model or task,
1202 (404) unknown route or method, 1301 (400) content policy, 1102 balance exhausted,
1302 rate limit, 1303 concurrency over the resource-pack limit (all 429), 5000/5001/5002
(500/503/504). Injected 429 faults answer with ``extra["fault_429_code"]`` (default 1302).

Callbacks: when ``callback_url`` is set, the bare task object (not the envelope) is POSTed,
unsigned, on every status change (``processing``, then ``succeed``/``failed``; also
``submitted`` at creation if ``extra["callback_on_submit"]``). Retries on network errors and
5xx (``extra["callback_retries"]``, default 2).

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]`` timings; ``[sim:fail]`` /
``[sim:fail=reason]`` task fails (code 0 envelope); ``[sim:filtered]`` task fails with the
risk-control message; request-level (no task created): ``[sim:blocked]`` 1301,
``[sim:balance]`` 1102, ``[sim:ratelimit]`` 1302, ``[sim:concurrency]`` 1303;
``[sim:callback=drop|duplicate|reorder]`` callback faults for that task.

``SimConfig.extra`` knobs: ``access_key``/``secret_key`` (default ``sandbox-ak``/``sandbox-sk``;
``SimConfig.api_keys`` may add ``"AK:SK"`` pairs), ``jwt_leeway`` (0), ``concurrency``
(None = unlimited; active tasks per account, else 1303), ``balance_units`` (None = unlimited;
units deducted per task, else 1102), ``balance_http_status`` (429; one project saw 400),
``fault_429_code`` (1302), ``error_data_null`` (False; add ``"data": null`` to error
envelopes), ``durations`` ({model: [..]} override), ``callback_mode``
(``normal|drop|duplicate|reorder``), ``callback_on_submit`` (False), ``callback_retries`` (2).

All keys belong to one simulated account: tasks, ``external_task_id`` uniqueness and the
concurrency count are shared by every key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import hmac
import json
import re
import secrets
import time
import uuid
import warnings
from typing import Any

import httpx
import jwt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import FileStore, SimConfig, SimTask, Simulator, directives, new_id, route_path

FAMILIES = ("text2video", "image2video")

T2V_MODELS = frozenset({"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master",
                        "kling-v2-5-turbo", "kling-v2-6", "kling-v3"})
I2V_MODELS = T2V_MODELS | {"kling-v1-5", "kling-v2-1"}
MODELS = {"text2video": T2V_MODELS, "image2video": I2V_MODELS}
# Older models only do 5 s and 10 s; kling-v3 does 3-15 s (Capability Map).
DEFAULT_DURATIONS: dict[str, tuple[str, ...]] = {"kling-v3": tuple(str(n) for n in range(3, 16))}
LEGACY_DURATIONS = ("5", "10")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
MODES = ("std", "pro")
# Units per 5 s of video (only used for final_unit_deduction and the balance knob).
UNITS_PER_5S = {"std": 1.0, "pro": 3.5}

FAIL_MESSAGE = "Image pixel is invalid"
FILTERED_MESSAGE = "Failure to pass the risk control system"
ACCOUNT = "5739745938"
MAX_IMAGE_BYTES = 10 * 1024 * 1024

_AUTH_MESSAGES = {
    1000: "Authentication failed",
    1001: "Authorization is empty",
    1002: "Authorization is invalid",
    1003: "Authorization is not yet valid",
    1004: "Authorization has expired",
}
_VIDEO_NAME = re.compile(r"^(\d+)-0_(raw|watermark)_video_1\.mp4$")


def _ms(ts: float) -> int:
    return int(ts * 1000)


class KlingError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str, code: int = 1201) -> KlingError:
    return KlingError(400, code, message)


class _RevocableFiles(FileStore):
    """FileStore that also remembers when ``/_sim/expire-files`` was called.

    Kling's video URLs are signed and generated on demand (no bytes kept per task); any URL
    minted before the last ``expire_all`` stops working.
    """

    revoked_before: float = 0.0

    def expire_all(self) -> None:
        super().expire_all()
        self.revoked_before = time.time()


class KlingSimulator(Simulator):
    name = "kling"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.revocable = _RevocableFiles(self.config)
        self.files = self.revocable
        self.tasks: dict[str, SimTask] = {}
        self.by_external_id: dict[str, str] = {}
        self.order: dict[str, list[str]] = {f: [] for f in FAMILIES}
        self._active: list[float] = []  # heap of finish times of tasks holding a concurrency slot
        self.units_used = 0.0
        self._cdn_secret = secrets.token_bytes(32)
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.callbacks_sent = 0
        self.app.add_exception_handler(HTTPException, self._http_exception)

    # -- wire format -------------------------------------------------------
    def kling_error(self, status: int, code: int, message: str,
                    headers: dict[str, str] | None = None) -> Response:
        body: dict[str, Any] = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
        if self.config.extra.get("error_data_null"):
            body["data"] = None
        return JSONResponse(body, status_code=status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            code = int(self.config.extra.get("fault_429_code", 1302))
            text = {1102: "Account balance not enough", 1303: "parallel task over resource pack limit"}.get(
                code, "request is too fast, exceeding the platform's rate limit")
            return self.kling_error(429, code, text, headers)
        code = {503: 5001, 504: 5002}.get(status, 5000 if status >= 500 else 1200)
        text = {5000: "Server internal error", 5001: "Server temporarily unavailable",
                5002: "Server internal timeout"}.get(code, message)
        return self.kling_error(status, code, text, headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):
            return self.kling_error(404, 1202, "The requested method is invalid")
        return self.kling_error(exc.status_code, 1200, str(exc.detail))

    def envelope(self, data: Any) -> Response:
        return JSONResponse({"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data})

    def status_of(self, task: SimTask, now: float) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "submitted"
        if phase == "running":
            return "processing"
        return "failed" if task.outcome in ("fail", "filtered") else "succeed"

    def task_object(self, task: SimTask, origin: str, now: float | None = None) -> dict[str, Any]:
        """The task as Kling shows it (``data`` of a query, and the callback body)."""
        now = time.time() if now is None else now
        status = self.status_of(task, now)
        updated = {"submitted": task.created_at, "processing": task.started_at}.get(status, task.finished_at)
        ext = task.data.get("external_task_id")
        obj: dict[str, Any] = {
            "task_id": task.id,
            "task_status": status,
            "task_status_msg": "",
            "task_info": {"external_task_id": ext} if ext else {},
            "created_at": _ms(task.created_at),
            "updated_at": _ms(updated),
        }
        if status == "failed":
            obj["task_status_msg"] = task.data.get("fail_message") or FAIL_MESSAGE
            obj["task_result"] = {}
            obj["final_unit_deduction"] = "0"
        elif status == "succeed":
            video: dict[str, Any] = {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "kling:" + task.id)),
                "url": self._video_url(task, origin, "raw", now),
                "duration": f"{task.input['duration']}.1",
            }
            watermark = bool(task.data.get("watermark"))
            if watermark:
                video["watermark_url"] = self._video_url(task, origin, "watermark", now)
            obj["task_result"] = {"videos": [video]}
            obj["watermark_info"] = {"enabled": watermark}
            obj["final_unit_deduction"] = _fmt_units(task.data["units"])
        return obj

    # -- signed, expiring output URLs ---------------------------------------
    def _sign(self, path: str, exp_ms: int, minted_ms: int) -> str:
        msg = f"{path}|{exp_ms}|{minted_ms}".encode()
        return hmac.new(self._cdn_secret, msg, hashlib.sha256).hexdigest()[:32]

    def _video_url(self, task: SimTask, origin: str, variant: str, now: float) -> str:
        sig = task.data.get("url_sig")
        if sig is None:  # minted once, when the result is first shown; stable afterwards
            minted = max(now, task.finished_at)
            sig = (_ms(minted + self.config.output_ttl_seconds), _ms(minted))
            task.data["url_sig"] = sig
        exp_ms, minted_ms = sig
        path = f"/bs2/upload-kling-api/{ACCOUNT}/{task.data['family']}/{task.id}-0_{variant}_video_1.mp4"
        return f"{origin}{path}?x-exp={exp_ms}&x-t={minted_ms}&x-sign={self._sign(path, exp_ms, minted_ms)}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)  # below the mount point (/kling in the sandbox server)
        q = request.query_params
        match = _VIDEO_NAME.match(request.path_params["name"])
        try:
            exp_ms, minted_ms = int(q.get("x-exp", "")), int(q.get("x-t", ""))
        except ValueError:
            return self.expired_file_response()
        ok = (
            match is not None
            and hmac.compare_digest(q.get("x-sign", ""), self._sign(path, exp_ms, minted_ms))
            and exp_ms > _ms(time.time())
            and minted_ms > _ms(self.revocable.revoked_before)
            and match.group(1) in self.tasks
        )
        if not ok or match is None:
            return self.expired_file_response()
        data = media.mp4(f"kling:{match.group(1)}:{match.group(2)}")
        return Response(data, media_type="video/mp4")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for family in FAMILIES:
            routes += [
                Route(f"/v1/videos/{family}", self._create_handler(family), methods=["POST"]),
                Route(f"/v1/videos/{family}", self._list_handler(family), methods=["GET"]),
                Route(f"/v1/videos/{family}/{{id}}", self._get_handler(family), methods=["GET"]),
            ]
        cdn = "/bs2/upload-kling-api/{account}/{family}/{name}"
        routes.append(Route(cdn, self.download, methods=["GET"]))
        return routes

    def key_pairs(self) -> dict[str, str]:
        extra = self.config.extra
        pairs = {str(extra.get("access_key", "sandbox-ak")): str(extra.get("secret_key", "sandbox-sk"))}
        for item in self.config.api_keys:
            ak, sep, sk = item.partition(":")
            if sep and ak and sk:
                pairs[ak] = sk
        return pairs

    def _auth(self, request: Request) -> Response | None:
        code = self.check_jwt(request.headers.get("authorization", ""))
        if code is None:
            return None
        return self.kling_error(401, code, _AUTH_MESSAGES[code])

    def check_jwt(self, authorization: str) -> int | None:
        """Validate a Kling API token like Kling does; ``None`` if good, else the 100x code."""
        if not authorization.strip():
            return 1001
        token = bearer_token(authorization)
        if token is None:
            return 1002
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return 1002
        if header.get("alg") != "HS256" or not isinstance(claims.get("iss"), str):
            return 1002
        secret = self.key_pairs().get(claims["iss"])
        if secret is None:
            return 1000
        leeway = float(self.config.extra.get("jwt_leeway", 0))
        try:
            with warnings.catch_warnings():  # sandbox secrets are shorter than 32 bytes
                warnings.filterwarnings("ignore", message="The HMAC key", category=UserWarning)
                jwt.decode(token, secret, algorithms=["HS256"], leeway=leeway,
                           options={"require": ["exp"], "verify_aud": False})
        except jwt.InvalidSignatureError:
            return 1000
        except jwt.ExpiredSignatureError:
            return 1004
        except jwt.ImmatureSignatureError:
            return 1003
        except jwt.InvalidTokenError:
            return 1002
        return None

    def _create_handler(self, family: str) -> Any:
        async def create(request: Request) -> Response:
            return await self.create(request, family)
        return create

    def _get_handler(self, family: str) -> Any:
        async def get(request: Request) -> Response:
            return await self.get_task(request, family)
        return get

    def _list_handler(self, family: str) -> Any:
        async def list_(request: Request) -> Response:
            return await self.list_tasks(request, family)
        return list_

    async def create(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.kling_error(400, 1200, "Invalid request parameters: body is not valid JSON")
        if not isinstance(body, dict):
            return self.kling_error(400, 1200, "Invalid request parameters: body must be a JSON object")
        try:
            params = self.validate(family, body)
            prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
            d = directives(prompt)
            self.admit(d, params)
        except KlingError as err:
            return self.kling_error(err.status, err.code, err.message)

        now = time.time()
        task_id = _numeric_id()
        outcome = "succeed"
        if "filtered" in d:
            outcome = "filtered"
        elif "fail" in d:
            outcome = "fail"
        task = SimTask(
            id=task_id, created_at=now,
            queue_seconds=float(d.get("queue") or self.config.queue_seconds),
            run_seconds=float(d.get("run") or self.config.run_seconds),
            outcome=outcome,
            input={k: params[k] for k in ("model_name", "mode", "duration")},
            data={"family": family, "units": params["units"]},
        )
        ext = params["external_task_id"]
        if ext:
            task.data["external_task_id"] = ext
            self.by_external_id[ext] = task_id
        if params["watermark"]:
            task.data["watermark"] = True
        if outcome == "filtered":
            task.data["fail_message"] = FILTERED_MESSAGE
        elif outcome == "fail" and d["fail"]:
            task.data["fail_message"] = d["fail"]
        self.tasks[task_id] = task
        self.order[family].append(task_id)
        heapq.heappush(self._active, task.finished_at)
        self.units_used += params["units"]
        # The client's identity for the request: its external_task_id, else a digest of the body
        # (bodies may carry megabytes of base64 image).
        identity = ext or hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{family}:{identity}")
        if params["callback_url"]:
            mode = d.get("callback") or str(self.config.extra.get("callback_mode", "normal"))
            self._schedule_callbacks(task, params["callback_url"], mode, self.origin(request))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return self.envelope({
            "task_id": task_id,
            "task_info": {"external_task_id": ext},
            "task_status": "submitted",
            "created_at": _ms(now),
            "updated_at": _ms(now),
        })

    def validate(self, family: str, body: dict[str, Any]) -> dict[str, Any]:
        """Check the create body as documented; returns the normalised parameters."""
        model = body.get("model_name")
        if model is None or model == "":
            model = "kling-v1"  # the legacy ``model`` field is accepted and also means V1
        if not isinstance(model, str):
            raise _bad("Invalid parameter: model_name must be a string")
        if model not in MODELS[family]:
            raise KlingError(404, 1203, f"model_name '{model}' is not supported by {family}")

        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _bad("Invalid parameter: prompt must be a string")
        multi_custom = body.get("multi_shot") is True and body.get("shot_type") == "customize"
        if family == "text2video" and not prompt and not multi_custom:
            raise _bad("Invalid parameter: prompt must not be empty")
        if prompt and len(prompt) > 2500:
            raise _bad("Invalid parameter: prompt cannot exceed 2500 characters")
        neg = body.get("negative_prompt")
        if neg is not None and (not isinstance(neg, str) or len(neg) > 2500):
            raise _bad("Invalid parameter: negative_prompt must be a string of at most 2500 characters")

        cfg = body.get("cfg_scale")
        if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, int | float)
                                or not 0 <= cfg <= 1):
            raise _bad("Invalid parameter: cfg_scale must be in [0, 1]")

        mode = body.get("mode", "std")
        if mode not in MODES:
            raise _bad(f"Invalid parameter: mode value '{mode}' is invalid, expected std or pro")

        duration = body.get("duration", "5")
        if isinstance(duration, int) and not isinstance(duration, bool):
            duration = str(duration)  # Kling's JSON binding coerces numbers to the string enum
        allowed = self.durations(model)
        if not isinstance(duration, str) or duration not in allowed:
            raise _bad(f"Invalid parameter: duration value '{duration}' is invalid for model {model}, "
                       f"supported: {', '.join(allowed)}")

        if family == "text2video":
            ratio = body.get("aspect_ratio", "16:9")
            if ratio not in ASPECT_RATIOS:
                raise _bad(f"Invalid parameter: aspect_ratio value '{ratio}' is invalid")

        sound = body.get("sound", "off")
        if sound not in ("on", "off"):
            raise _bad(f"Invalid parameter: sound value '{sound}' is invalid")

        callback = body.get("callback_url") or ""
        if not isinstance(callback, str) or (callback and not re.match(r"^https?://[^/\s]+", callback)):
            raise _bad("Invalid parameter: callback_url is not a valid URL")

        ext = body.get("external_task_id") or ""
        if not isinstance(ext, str):
            raise _bad("Invalid parameter: external_task_id must be a string")
        if ext and ext in self.by_external_id:
            raise _bad(f"external_task_id '{ext}' already exists, it must be unique within the account")

        wm = body.get("watermark_info")
        if wm is not None and not (isinstance(wm, dict) and isinstance(wm.get("enabled", False), bool)):
            raise _bad("Invalid parameter: watermark_info must be {\"enabled\": boolean}")

        if family == "image2video":
            image, tail = body.get("image"), body.get("image_tail")
            if not image and not tail:
                raise _bad("Invalid parameter: image and image_tail cannot both be empty")
            for name, value in (("image", image), ("image_tail", tail)):
                if value:
                    _check_image(name, value)
            exclusive = [k for k in ("image_tail", "static_mask", "dynamic_masks", "camera_control")
                         if body.get(k)]
            if len(exclusive) > 1 and "image_tail" in exclusive:
                raise _bad(f"Invalid parameter: {' and '.join(exclusive)} cannot be used together")

        units = UNITS_PER_5S[mode] * int(duration) / 5
        return {"model_name": model, "mode": mode, "duration": duration, "callback_url": callback,
                "external_task_id": ext, "watermark": bool(wm and wm.get("enabled")), "units": units}

    def durations(self, model: str) -> tuple[str, ...]:
        override = self.config.extra.get("durations") or {}
        if model in override:
            return tuple(str(x) for x in override[model])
        return DEFAULT_DURATIONS.get(model, LEGACY_DURATIONS)

    def admit(self, d: dict[str, str], params: dict[str, Any]) -> None:
        """Account-level checks before a task is created (balance, rate, concurrency)."""
        extra = self.config.extra
        balance_status = int(extra.get("balance_http_status", 429))
        if "blocked" in d:
            raise KlingError(400, 1301, "Failure to pass the risk control system")
        if "balance" in d:
            raise KlingError(balance_status, 1102, "Account balance not enough")
        if "ratelimit" in d:
            raise KlingError(429, 1302, "request is too fast, exceeding the platform's rate limit")
        if "concurrency" in d:
            raise KlingError(429, 1303, "parallel task over resource pack limit")
        balance = extra.get("balance_units")
        if balance is not None and self.units_used + params["units"] > float(balance):
            raise KlingError(balance_status, 1102, "Account balance not enough")
        limit = extra.get("concurrency")
        if limit is not None:
            now = time.time()
            while self._active and self._active[0] <= now:
                heapq.heappop(self._active)
            if len(self._active) >= int(limit):
                raise KlingError(429, 1303, "parallel task over resource pack limit")

    def find(self, family: str, ident: str) -> SimTask | None:
        task = self.tasks.get(ident)
        if task is None and ident in self.by_external_id:
            task = self.tasks.get(self.by_external_id[ident])
        if task is None or task.data["family"] != family:
            return None
        return task

    async def get_task(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.find(family, request.path_params["id"])
        if task is None:
            return self.kling_error(404, 1203, "task not found")
        return self.envelope(self.task_object(task, self.origin(request)))

    async def list_tasks(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        try:
            page = int(request.query_params.get("pageNum", "1"))
            size = int(request.query_params.get("pageSize", "30"))
        except ValueError:
            return self.kling_error(400, 1201, "Invalid parameter: pageNum and pageSize must be integers")
        if not 1 <= page <= 1000 or not 1 <= size <= 500:
            return self.kling_error(400, 1201, "Invalid parameter: pageNum must be in [1, 1000], "
                                               "pageSize in [1, 500]")
        ids = self.order[family]
        end = len(ids) - (page - 1) * size
        chosen = ids[max(0, end - size):max(0, end)][::-1]
        origin = self.origin(request)
        return self.envelope([self.task_object(self.tasks[i], origin) for i in chosen])

    # -- callbacks ---------------------------------------------------------
    def _schedule_callbacks(self, task: SimTask, url: str, mode: str, origin: str) -> None:
        t = asyncio.get_running_loop().create_task(self._run_callbacks(task, url, mode, origin))
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _run_callbacks(self, task: SimTask, url: str, mode: str, origin: str) -> None:
        if mode == "drop":
            return
        times = [task.started_at, task.finished_at]
        if self.config.extra.get("callback_on_submit"):
            times.insert(0, task.created_at)
        held: list[bytes] = []
        async with self.callback_client(10) as client:
            for i, at in enumerate(times):
                await asyncio.sleep(max(0.0, at - time.time()))
                body = json.dumps(self.task_object(task, origin, now=at + 1e-6)).encode()
                if mode == "reorder" and i < len(times) - 1:
                    held.append(body)  # delivered after the final status instead
                    continue
                await self._post_callback(client, url, body)
                if mode == "duplicate":
                    await self._post_callback(client, url, body)
            for body in reversed(held):
                await self._post_callback(client, url, body)

    async def _post_callback(self, client: httpx.AsyncClient, url: str, body: bytes) -> None:
        retries = int(self.config.extra.get("callback_retries", 2))
        for attempt in range(retries + 1):
            try:
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                self.callbacks_sent += 1
                if resp.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2 * (attempt + 1))


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check_image(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _bad(f"Invalid parameter: {name} must be a URL or a Base64 string")
    if value.startswith(("http://", "https://")):
        return
    if value.startswith("data:"):
        raise _bad(f"Invalid parameter: {name} Base64 must not carry a 'data:' prefix")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"Invalid parameter: {name} is neither a URL nor valid Base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise _bad(f"Invalid parameter: {name} exceeds 10MB")


def _numeric_id() -> str:
    return "7" + new_id("0123456789", 17)


def _fmt_units(units: float) -> str:
    return str(int(units)) if units == int(units) else f"{units:g}"


def make_token(access_key: str = "sandbox-ak", secret_key: str = "sandbox-sk", ttl: int = 1800,
               nbf_offset: int = -5, now: float | None = None) -> str:
    """An API token as Kling's docs build it (for tests, benchmarks and the demo)."""
    ts = int(time.time() if now is None else now)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The HMAC key", category=UserWarning)
        return jwt.encode({"iss": access_key, "exp": ts + ttl, "nbf": ts + nbf_offset}, secret_key,
                          algorithm="HS256", headers={"typ": "JWT"})
