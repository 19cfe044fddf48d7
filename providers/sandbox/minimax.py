"""MiniMax Hailuo video API simulator (V1: ``/v1/video_generation``).

Written from MiniMax's documented wire format (shared/providers/video-wave2.md §2.1-§2.11,
§2.13-§2.14), not from an adapter. V2 (MiniMax-H3) is not simulated.

Routes (``Authorization: Bearer <key>``):

- ``POST /v1/video_generation``: create -> ``{"task_id": "<digits>", "base_resp": {"status_code":
  0, "status_msg": "success"}}``. No idempotency: every POST is a new task.
- ``GET /v1/query/video_generation?task_id=``: ``{task_id, status, file_id, video_width,
  video_height, base_resp}``; ``status`` is ``Preparing -> Queueing -> Processing -> Success |
  Fail``. ``file_id`` is a **string** here ("" until Success); a Fail carries the reason in
  ``base_resp`` (1027 output moderation, or the code of ``[sim:fail=N]``).
- ``GET /v1/files/retrieve?file_id=``: ``{"file": {file_id (an **integer** here), bytes (0, as in
  real answers), created_at (unix s), filename "output.mp4", purpose "video_generation",
  download_url}, base_resp}``. Each call mints a fresh OSS-style signed URL
  (``?Expires=&OSSAccessKeyId=&Signature=``) valid ``output_ttl_seconds`` (the docs' 1 h; real
  URLs last longer: CONFLICT); an expired, altered or revoked URL answers 403 with OSS's XML.

Every API error is **HTTP 200** with ``base_resp.status_code`` != 0 and no ``task_id``: 1002 rate
limit (``extra["rpm"]`` creates a minute, and injected 429 faults), 1004 missing/unknown key, 2049
a key of the other region (``extra["other_region_keys"]``), 1008 balance used up
(``extra["balance"]`` tasks), 1026 sensitive input, 2013 invalid parameters (the message names the
field: model, prompt <= 2000 characters, duration 6/10 with 1080P only 6, resolution per model
and mode, first_frame_image required by I2V models and refused by T2V ones, last_frame_image only
on ``extra["last_frame_models"]``, subject_reference only on S2V-01, images as http(s) URLs or
``data:image/(jpeg|png|webp);base64`` under 20 MB whose PNG size has a short side > 300 px and an
aspect between 2:5 and 5:2, callback_url, booleans). Injected 5xx faults are transport-level:
that HTTP status with a ``base_resp`` body.

Callbacks (``callback_url``): right after the create, the simulator POSTs ``{"challenge":
"<random>"}`` and needs the same JSON echoed with HTTP 200 within ``extra["challenge_timeout"]``
(3 s). Otherwise the callback is not registered: no status POSTs follow and the task runs on
(``extra["challenge_failure"]`` = "fail_task" makes it Fail with 2013 instead; the task's fate
is UNCONFIRMED). After a good handshake: unsigned POSTs in the query shape with **lowercase**
statuses ``processing`` then ``success`` (with ``file_id``) or ``failed``.

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]`` timings (Preparing is the first half of
the queue time, Queueing the second); ``[sim:sensitive]`` -> 1026 at create (no task; also any
word of ``extra["sensitive_words"]``); ``[sim:output_sensitive]`` -> Fail with 1027;
``[sim:fail]`` / ``[sim:fail=CODE]`` -> Fail with 1000 / CODE.

``SimConfig.extra`` knobs: ``rpm`` (None = unlimited; the docs give 20 paid, 5 free),
``balance`` (None = unlimited; tasks left), ``other_region_keys`` ([]), ``sensitive_words``
([]), ``last_frame_models`` (["MiniMax-Hailuo-02"]; "Hailuo-02 family" per the docs),
``http_status_errors`` (False; True answers API errors with a matching HTTP status, since
whether V1 ever does is UNCONFIRMED), ``fresh_url_per_retrieve`` (True, UNCONFIRMED; False:
the first URL minted is returned every time, even once expired), ``challenge_timeout`` (3.0),
``challenge_failure`` ("ignore" | "fail_task"), ``callback_retries`` (0; the retry policy is
UNCONFIRMED), ``callback_timeout`` (10.0).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, bearer, directives, route_path

HAILUO_T2V = ("768P", "1080P")
HAILUO_I2V = ("512P", "768P", "1080P")
DIMENSIONS = {"512P": (912, 512), "720P": (1280, 720), "768P": (1366, 768), "1080P": (1920, 1080)}
MESSAGES = {
    0: "success",
    1000: "unknown error",
    1001: "request timeout",
    1002: "rate limit exceeded(RPM)",
    1004: "login fail: Please carry the API secret key in the 'Authorization' field of the request header",
    1008: "insufficient balance",
    1026: "input new_sensitive",
    1027: "output new_sensitive",
    2013: "invalid params",
    2049: "invalid api key",
}
HTTP_STATUS = {1002: 429, 1004: 401, 2049: 401, 1008: 402, 1026: 400, 2013: 400}
DATA_URI = re.compile(r"^data:image/(jpeg|jpg|png|webp);base64,(.*)$", re.S)
MAX_IMAGE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class ModelSpec:
    """What one model takes: ``image`` is "none", "optional" or "required" (a first frame)."""

    image: str
    t2v_resolutions: tuple[str, ...]
    i2v_resolutions: tuple[str, ...]
    default_resolution: str
    durations: tuple[int, ...] = (6, 10)
    subject: bool = False


_01 = ("720P",)
MODELS = {
    "MiniMax-Hailuo-2.3": ModelSpec("optional", HAILUO_T2V, HAILUO_I2V, "768P"),
    "MiniMax-Hailuo-2.3-Fast": ModelSpec("required", (), HAILUO_I2V, "768P"),
    "MiniMax-Hailuo-02": ModelSpec("optional", HAILUO_T2V, HAILUO_I2V, "768P"),
    "T2V-01-Director": ModelSpec("none", _01, (), "720P", (6,)),
    "T2V-01": ModelSpec("none", _01, (), "720P", (6,)),
    "I2V-01-Director": ModelSpec("required", (), _01, "720P", (6,)),
    "I2V-01-live": ModelSpec("required", (), _01, "720P", (6,)),
    "I2V-01": ModelSpec("required", (), _01, "720P", (6,)),
    "S2V-01": ModelSpec("none", _01, (), "720P", (6,), subject=True),
}


class ApiError(Exception):
    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _invalid(detail: str) -> ApiError:
    return ApiError(2013, detail)


class MinimaxSimulator(Simulator):
    name = "minimax"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.task_by_file: dict[str, SimTask] = {}
        self.handshakes: list[dict[str, Any]] = []
        self.callbacks_sent = 0
        self._creates: deque[float] = deque()
        self._oss_secret = secrets.token_bytes(32)
        self._callback_tasks: set[asyncio.Task[None]] = set()

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------
    def base_resp(self, code: int, detail: str = "") -> dict[str, Any]:
        message = MESSAGES.get(code, "error")
        return {"status_code": code, "status_msg": f"{message}, {detail}" if detail else message}

    def api_error(self, err: ApiError, headers: dict[str, str] | None = None) -> Response:
        status = HTTP_STATUS.get(err.code, 500) if self._x("http_status_errors", False) else 200
        return JSONResponse({"base_resp": self.base_resp(err.code, err.detail)}, status_code=status,
                            headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:  # MiniMax's rate limit is an HTTP 200 with 1002
            return self.api_error(ApiError(1002), headers)
        code = 1001 if status == 504 else 1000
        return JSONResponse({"base_resp": self.base_resp(code)}, status_code=status, headers=headers)

    def status(self, task: SimTask, now: float | None = None) -> str:
        now = time.time() if now is None else now
        phase = task.phase(now)
        if phase == "queued":
            return "Preparing" if now - task.created_at < task.queue_seconds / 2 else "Queueing"
        if phase == "running":
            return "Processing"
        return "Fail" if task.outcome == "fail" else "Success"

    def query_body(self, task: SimTask, now: float | None = None) -> dict[str, Any]:
        status = self.status(task, now)
        width, height = DIMENSIONS[task.data["resolution"]] if status == "Success" else (0, 0)
        return {"task_id": task.id, "status": status, "file_id": task.data["file_id"] if status == "Success" else "",
                "video_width": width, "video_height": height,
                "base_resp": self.base_resp(task.data["fail_code"] if status == "Fail" else 0)}

    # -- routes ----------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/video_generation", self.create, methods=["POST"]),
            Route("/v1/query/video_generation", self.query, methods=["GET"]),
            Route("/v1/files/retrieve", self.retrieve, methods=["GET"]),
            Route("/inference_output/video/{day}/{token}/output.mp4", self.download, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> None:
        key = bearer(request)
        if key is not None and key in self._x("other_region_keys", []):
            raise ApiError(2049)
        if not self.config.key_ok(key):
            raise ApiError(1004)

    async def create(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as err:
            return self.api_error(err)
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise _invalid("request body must be a JSON object")
            spec, resolution = self.validate(body)
            prompt = str(body.get("prompt") or "")
            self._admit(prompt, time.time())
        except ValueError:
            return self.api_error(_invalid("request body is not valid JSON"))
        except ApiError as err:
            return self.api_error(err)

        task = self._new_task(body, prompt, resolution)
        self.tasks[task.id] = task
        self.task_by_file[task.data["file_id"]] = task
        self.record_creation(json.dumps(body, sort_keys=True))
        if isinstance(body.get("callback_url"), str):
            self._spawn(self._callbacks(task, body["callback_url"]))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"task_id": task.id, "base_resp": self.base_resp(0)})

    def _admit(self, prompt: str, now: float) -> None:
        """Account checks after validation: moderation of the prompt, rate limit, balance."""
        words = {w.lower() for w in self._x("sensitive_words", [])}
        if "sensitive" in directives(prompt) or words & set(prompt.lower().split()):
            raise ApiError(1026)
        rpm = self._x("rpm", None)
        while self._creates and self._creates[0] <= now - 60:
            self._creates.popleft()
        if rpm is not None and len(self._creates) >= int(rpm):
            raise ApiError(1002)
        balance = self._x("balance", None)
        if balance is not None:
            if int(balance) <= 0:
                raise ApiError(1008)
            self.config.extra["balance"] = int(balance) - 1
        self._creates.append(now)

    def _new_task(self, body: dict[str, Any], prompt: str, resolution: str) -> SimTask:
        d = directives(prompt)
        outcome, code = "succeed", 0
        if "output_sensitive" in d:
            outcome, code = "fail", 1027
        elif "fail" in d:
            outcome, code = "fail", int(d["fail"] or 1000)
        return SimTask(
            id=_digits(15),
            created_at=time.time(),
            queue_seconds=float(d.get("queue") or self.config.queue_seconds),
            run_seconds=float(d.get("run") or self.config.run_seconds),
            outcome=outcome,
            input=body,
            data={"resolution": resolution, "fail_code": code, "file_id": _digits(15)},
        )

    def validate(self, body: dict[str, Any]) -> tuple[ModelSpec, str]:
        """Check a create body against the documented fields; returns (model spec, resolution)."""
        model = body.get("model")
        if not isinstance(model, str) or model not in MODELS:
            raise _invalid(f"model: unsupported model {json.dumps(model)}")
        spec = MODELS[model]
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _invalid("prompt must be a string")
        if prompt is not None and len(prompt) > 2000:
            raise _invalid("prompt exceeds 2000 characters")
        for flag in ("prompt_optimizer", "fast_pretreatment", "aigc_watermark"):
            if flag in body and not isinstance(body[flag], bool):
                raise _invalid(f"{flag} must be a boolean")
        callback = body.get("callback_url")
        parts = urlsplit(callback) if isinstance(callback, str) else None
        if callback is not None and (parts is None or parts.scheme not in ("http", "https") or not parts.hostname):
            raise _invalid("callback_url is not a valid URL")

        first, last = body.get("first_frame_image"), body.get("last_frame_image")
        if first is not None and spec.image == "none":
            raise _invalid(f"first_frame_image is not supported by {model}")
        if first is None and spec.image == "required":
            raise _invalid(f"first_frame_image is required by {model}")
        if last is not None and model not in self._x("last_frame_models", ["MiniMax-Hailuo-02"]):
            raise _invalid(f"last_frame_image is not supported by {model}")
        for name, value in (("first_frame_image", first), ("last_frame_image", last)):
            if value is not None:
                _check_image(name, value)
        subject = body.get("subject_reference")
        if spec.subject:
            image = _subject_image(subject)
            if image is None:
                raise _invalid('subject_reference must be [{"type": "character", "image": [<one image>]}]')
            _check_image("subject_reference.image", image)
        elif subject is not None:
            raise _invalid(f"subject_reference is not supported by {model}")
        if not spec.subject and first is None and last is None and not prompt:
            raise _invalid("prompt is required for text-to-video")

        image_mode = first is not None or last is not None
        allowed = spec.i2v_resolutions if image_mode else spec.t2v_resolutions
        resolution = body.get("resolution", spec.default_resolution)
        if resolution not in allowed:
            raise _invalid(f"resolution {json.dumps(resolution)} is not supported by {model} "
                           f"({'image' if image_mode else 'text'}-to-video: {', '.join(allowed)})")
        duration = body.get("duration", 6)
        if isinstance(duration, bool) or duration not in spec.durations:
            raise _invalid(f"duration {json.dumps(duration)} is not supported by {model}")
        if resolution == "1080P" and duration != 6:
            raise _invalid("duration: 1080P supports only 6 seconds")
        return spec, str(resolution)

    async def query(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as err:
            return self.api_error(err)
        if (injected := await self.fault("query")) is not None:
            return injected
        task_id = request.query_params.get("task_id")
        if not task_id:
            return self.api_error(_invalid("task_id is required"))
        task = self.tasks.get(task_id)
        if task is None:
            return self.api_error(_invalid("invalid task_id"))
        return JSONResponse(self.query_body(task))

    async def retrieve(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as err:
            return self.api_error(err)
        if (injected := await self.fault("retrieve")) is not None:
            return injected
        file_id = request.query_params.get("file_id", "")
        task = self.task_by_file.get(file_id)
        if task is None or self.status(task) != "Success":
            return self.api_error(_invalid("invalid file_id"))
        file = {"file_id": int(file_id), "bytes": 0, "created_at": int(task.finished_at), "filename": "output.mp4",
                "purpose": "video_generation", "download_url": self._download_url(task, self.origin(request))}
        return JSONResponse({"file": file, "base_resp": self.base_resp(0)})

    # -- signed, expiring download URLs ------------------------------------------
    def _sign(self, path: str, expires: int) -> str:
        mac = hmac.new(self._oss_secret, f"GET\n\n\n{expires}\n{path}".encode(), hashlib.sha1).digest()
        return base64.b64encode(mac).decode()

    def _download_url(self, task: SimTask, origin: str) -> str:
        last: tuple[str, StoredFile] | None = task.data.get("last_url")
        if last is None or self._x("fresh_url_per_retrieve", True):
            now = time.time()
            data = task.data.setdefault("video", media.mp4(f"minimax:{task.id}"))
            day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
            path = f"/inference_output/video/{day}/{uuid.uuid4().hex}/output.mp4"
            stored = StoredFile(data, "video/mp4", now + self.config.output_ttl_seconds)
            self.files.files[path] = stored
            last = (path, stored)
            task.data["last_url"] = last
        path, stored = last
        expires = math.ceil(stored.expires_at)
        query = urlencode({"Expires": expires, "OSSAccessKeyId": "LTAI5tSimulatedKeyId",
                           "Signature": self._sign(path, expires)})
        return f"{origin}{path}?{query}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)
        try:
            expires = int(request.query_params.get("Expires", ""))
        except ValueError:
            return _oss_error("AccessDenied", "Request has expired.")
        signature = request.query_params.get("Signature", "")
        if not hmac.compare_digest(signature, self._sign(path, expires)):
            return _oss_error("SignatureDoesNotMatch", "The request signature we calculated does not match "
                                                       "the signature you provided.")
        stored = self.files.get(path)
        if stored is None or expires <= time.time():
            return _oss_error("AccessDenied", "Request has expired.")
        return Response(stored.data, media_type=stored.content_type)

    # -- callbacks -------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _callbacks(self, task: SimTask, url: str) -> None:
        async with self.callback_client(float(self._x("callback_timeout", 10.0))) as client:
            if not await self._handshake(client, task, url):
                if self._x("challenge_failure", "ignore") == "fail_task":
                    task.outcome, task.data["fail_code"] = "fail", 2013
                return
            for at in (task.started_at, task.finished_at):
                await asyncio.sleep(max(0.0, at - time.time()))
                body = self.query_body(task, now=at + 1e-6)
                body["status"] = {"Processing": "processing", "Success": "success", "Fail": "failed"}[body["status"]]
                for key in ("video_width", "video_height"):
                    body.pop(key)
                await self._deliver(client, url, json.dumps(body).encode())

    async def _handshake(self, client: httpx.AsyncClient, task: SimTask, url: str) -> bool:
        """POST ``{"challenge"}``; the receiver must echo it with HTTP 200 in time."""
        challenge = secrets.token_urlsafe(24)
        entry: dict[str, Any] = {"task_id": task.id, "url": url, "challenge": challenge, "ok": False}
        started = time.monotonic()
        try:
            resp = await client.post(url, json={"challenge": challenge},
                                     timeout=float(self._x("challenge_timeout", 3.0)))
            entry["status_code"] = resp.status_code
            echoed = resp.json()
            entry["ok"] = resp.status_code == 200 and isinstance(echoed, dict) and echoed.get("challenge") == challenge
        except (httpx.HTTPError, ValueError) as exc:
            entry["error"] = type(exc).__name__
        entry["seconds"] = round(time.monotonic() - started, 3)
        self.handshakes.append(entry)
        return bool(entry["ok"])

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: bytes) -> None:
        for attempt in range(int(self._x("callback_retries", 0)) + 1):
            try:
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                self.callbacks_sent += 1
                if resp.status_code < 300:
                    return
            except httpx.HTTPError:
                self.callbacks_sent += 1
            await asyncio.sleep(0.2 * (attempt + 1))


def _digits(n: int) -> str:
    return str(10 ** (n - 1) + secrets.randbelow(9 * 10 ** (n - 1)))


def _check_image(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a URL or a data URL")
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.hostname:
        return
    match = DATA_URI.match(value)
    if match is None:
        raise _invalid(f"{name} must be an http(s) URL or data:image/(jpeg|png|webp);base64")
    try:
        raw = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{name} is not valid base64") from None
    if len(raw) >= MAX_IMAGE_BYTES:
        raise _invalid(f"{name} must be under 20MB")
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        width, height = struct.unpack(">II", raw[16:24])
        if min(width, height) <= 300:
            raise _invalid(f"{name}: the short side must be over 300px (got {width}x{height})")
        if not 2 / 5 <= width / height <= 5 / 2:
            raise _invalid(f"{name}: the aspect ratio must be between 2:5 and 5:2 (got {width}x{height})")


def _subject_image(value: Any) -> Any:
    """The one image of ``[{"type": "character", "image": [<image>]}]``, or None if malformed."""
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)):
        return None
    images = value[0].get("image")
    if value[0].get("type") != "character" or not isinstance(images, list) or len(images) != 1:
        return None
    return images[0]


def _oss_error(code: str, message: str) -> Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>{code}</Code>\n  <Message>{message}</Message>\n'
            f"  <RequestId>{uuid.uuid4().hex[:24].upper()}</RequestId>\n"
            "  <HostId>public-cdn-video-data-algeng.oss-cn-wulanchabu.aliyuncs.com</HostId>\n</Error>\n")
    return Response(body.encode(), status_code=403, media_type="application/xml")
