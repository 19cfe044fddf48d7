"""Vidu (Shengshu) API simulator: video creations, polling, cancel and signed callbacks.

Written from the documented wire format (shared/providers/video-wave2.md §7), not from our
adapter. ``https://api.vidu.com`` and ``https://api.vidu.cn`` serve the same routes.

Routes (``Authorization: Token <key>``; ``Bearer`` is refused):

- ``POST /ent/v2/text2video`` (``prompt``), ``/ent/v2/img2video`` (``images``: 1),
  ``/ent/v2/start-end2video`` (``images``: 2), ``/ent/v2/reference2video`` (``images``: 1-7 and a
  ``prompt``): answer ``{task_id, state: "created", model, prompt, images, duration, seed, aspect_ratio,
  resolution, movement_amplitude, bgm, payload, off_peak, credits, created_at}`` (``style`` on
  text2video). ``payload`` (<= 1 MB) is echoed everywhere: the client's only handle on a task.
- ``GET /ent/v2/tasks/{id}/creations``: ``{id, state, err_code, credits, payload, bgm, off_peak,
  creations: [{id, url, cover_url, watermarked_url}]}``; states ``created`` -> ``queueing`` ->
  ``processing`` -> ``success`` | ``failed`` (``err_code``, no creations, still HTTP 200).
  Each GET mints fresh URLs valid ``output_ttl_seconds`` (24 h at Vidu; ``extra["fresh_urls"]``).
- ``POST /ent/v2/tasks/{id}/cancel`` (body ``{"id"}``): ``{}`` while ``created``/``queueing`` (the
  task then shows ``failed`` with ``err_code`` ``extra["cancelled_err_code"]``, UNCONFIRMED);
  400 ``{"code": 400, "reason": "BadRequest", "message": "task state is scheduled, can not
  cancel"}`` once processing or finished.
- ``GET /vidu-media/{name}?expires=&signature=``: creations (real MP4s, a PNG cover), 403 when
  expired or tampered with.

Errors: ``{"code": <HTTP status>, "reason", "message", "metadata": {"trace_id"}}``: 401
``Unauthorized``; 400 ``FieldLacking``, ``FieldUnwanted``, ``FieldInvalid``,
``FieldItemCountOutOfRange``, ``ImageFormatInvalid``, ``ModelUnavailable``,
``TaskPromptPolicyViolation`` (input moderation, no task), ``CreditInsufficient``; 404
``TaskNotFound``; 429 ``QuotaExceeded`` over ``extra["max_concurrent"]`` unfinished tasks,
``TooManyRequests`` on injected faults; 500 ``InternalServiceFailure``.

Callbacks: with ``callback_url``, the get-generation body is POSTed when the state changes to
``processing``, ``success`` or ``failed`` (a cancel included); terminal ones are retried up to 3
times on non-2xx or network errors. Each carries ``Date`` (RFC 1123), ``x-request-nonce``,
``X-HMAC-SIGNED-HEADERS: Date;x-request-nonce``, ``X-HMAC-ALGORITHM: hmac-sha256``,
``X-HMAC-ACCESS-KEY: vidu`` and ``X-HMAC-SIGNATURE``: base64 HMAC-SHA256, keyed with the API token
that created the task, of ``callback_signing_string`` (APISIX hmac-auth v1 layout; the trailing
newline is UNCONFIRMED, ``extra["callback_trailing_newline"]``).

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]``; ``[sim:fail]`` failed with
``InternalServiceFailure`` (``[sim:fail=CODE]``: that ``err_code``); ``[sim:filtered]`` failed with
``CreationPolicyViolation`` (output moderation); ``[sim:blocked]`` 400 ``TaskPromptPolicyViolation``.

``SimConfig.extra`` knobs: ``max_prompt_chars`` (5000; older docs: 1500, CONFLICT),
``max_reference_images`` (7, UNCONFIRMED), ``models`` ({endpoint: [models]}, default all six models
on every endpoint: per-endpoint availability is UNCONFIRMED), ``durations`` ({model: [seconds]}),
``credit_balance`` (None = unlimited), ``max_concurrent`` (None), ``off_peak_queue_seconds`` (2.0
extra queueing for ``off_peak`` tasks; hours at Vidu), ``fresh_urls`` (True), ``cancelled_err_code``
("UserCancelled"), ``callback_access_key`` ("vidu"), ``callback_trailing_newline`` (True),
``callback_retries`` (3), ``callback_retry_delay`` (0.2), ``callback_timeout`` (10.0).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, directives, new_id, route_path

MODELS = ("viduq3-pro", "viduq3-turbo", "viduq2", "viduq1", "vidu2.0", "vidu1.5")
# Endpoint -> (min images, max images or None for extra["max_reference_images"], prompt required).
ENDPOINTS: dict[str, tuple[int, int | None, bool]] = {
    "text2video": (0, 0, True),
    "img2video": (1, 1, False),
    "start-end2video": (2, 2, False),
    "reference2video": (1, None, True),
}
# Allowed durations per model (UNCONFIRMED beyond "e.g. 4/5/8; q3 up to 16").
DURATIONS: dict[str, tuple[int, ...]] = {
    "viduq3-pro": tuple(range(1, 17)), "viduq3-turbo": tuple(range(1, 17)), "viduq2": tuple(range(1, 11)),
    "viduq1": (5,), "vidu2.0": (4, 8), "vidu1.5": (4, 8),
}
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")
RESOLUTIONS = ("540p", "720p", "1080p")
AMPLITUDES = ("auto", "small", "medium", "large")
DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,[A-Za-z0-9+/=]+$")
MAX_PAYLOAD = 1024 * 1024


def callback_signing_string(method: str, url: str, date: str, nonce: str, access_key: str = "vidu",
                            trailing_newline: bool = True) -> str:
    """Vidu's callback signing string: method, path, sorted query, access key, date, signed headers."""
    parts = urlsplit(url)
    query = "&".join(f"{k}={v}" for k, v in sorted(parse_qsl(parts.query, keep_blank_values=True),
                                                     key=lambda kv: kv[0]))
    text = (f"{method}\n{parts.path or '/'}\n{query}\n{access_key}\n{date}\n"
            f"Date:{date}\nx-request-nonce:{nonce}")
    return text + "\n" if trailing_newline else text


def callback_signature(api_token: str, signing_string: str) -> str:
    return base64.b64encode(hmac.new(api_token.encode(), signing_string.encode(), hashlib.sha256).digest()).decode()


class ViduError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _bad(reason: str, message: str) -> ViduError:
    return ViduError(400, reason, message)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ViduSimulator(Simulator):
    name = "vidu"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.credits_used = 0
        self.callbacks_sent = 0
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._url_secret = secrets.token_bytes(32)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def vidu_error(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Response:
        body = {"code": status, "reason": reason, "message": message, "metadata": {"trace_id": secrets.token_hex(16)}}
        return JSONResponse(body, status_code=status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        reason = {429: "TooManyRequests", 404: "NotFound", 401: "Unauthorized"}.get(
            status, "InternalServiceFailure" if status >= 500 else "BadRequest")
        return self.vidu_error(status, reason, message, headers)

    def state_of(self, task: SimTask, now: float) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "created" if now - task.created_at < task.data["created_seconds"] else "queueing"
        if phase == "running":
            return "processing"
        return "failed" if phase == "canceled" or task.outcome in ("fail", "filtered") else "success"

    def creation_body(self, task: SimTask, origin: str, now: float) -> dict[str, Any]:
        state = self.state_of(task, now)
        err_code = ""
        if state == "failed":
            if task.phase(now) == "canceled":
                err_code = str(self._x("cancelled_err_code", "UserCancelled"))
            elif task.outcome == "filtered":
                err_code = "CreationPolicyViolation"
            else:
                err_code = task.data["fail_code"]
        inp = task.input
        creations = [self._creation(task, origin, now)] if state == "success" else []
        return {"id": task.id, "state": state, "err_code": err_code, "credits": task.data["credits"],
                "payload": inp["payload"], "bgm": inp["bgm"], "off_peak": inp["off_peak"], "creations": creations}

    # -- signed, expiring output URLs --------------------------------------
    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self._url_secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def _creation(self, task: SimTask, origin: str, now: float) -> dict[str, str]:
        paths: dict[str, str] | None = task.data.get("paths")
        if paths is None:
            files = {"url": (media.mp4(f"vidu:{task.id}"), "video/mp4", "mp4"),
                     "watermarked_url": (media.mp4(f"vidu:{task.id}:watermarked"), "video/mp4", "mp4"),
                     "cover_url": (media.jpeg_like_cover(f"vidu:{task.id}"), "image/png", "png")}
            paths = {}
            for key, (data, ctype, ext) in files.items():
                paths[key] = f"/vidu-media/{secrets.token_hex(12)}.{ext}"
                self.files.files[paths[key]] = StoredFile(data, ctype, 0.0)
            task.data["paths"] = paths
            task.data["expires"] = 0.0
        if self._x("fresh_urls", True) or not task.data["expires"]:
            task.data["expires"] = now + self.config.output_ttl_seconds
            for path in paths.values():  # the files live as long as the newest URL to them
                self.files.files[path].expires_at = task.data["expires"]
        stamp = math.ceil(task.data["expires"])
        urls = {key: f"{origin}{path}?expires={stamp}&signature={self._sign(path, stamp)}"
                for key, path in paths.items()}
        return {"id": task.data["creation_id"], **urls}

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)
        stamp = request.query_params.get("expires", "")
        stored = self.files.get(path)
        if (stored is None or not stamp.isdigit() or int(stamp) < time.time()
                or not hmac.compare_digest(request.query_params.get("signature", ""), self._sign(path, int(stamp)))):
            return self.expired_file_response()
        return Response(stored.data, media_type=stored.content_type)

    def expired_file_response(self) -> Response:
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>' \
               b"<Message>Request has expired</Message></Error>"
        return Response(body, status_code=403, media_type="application/xml")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            *(Route(f"/ent/v2/{e}", self._create_handler(e), methods=["POST"]) for e in ENDPOINTS),
            Route("/ent/v2/tasks/{id}/creations", self.get_creations, methods=["GET"]),
            Route("/ent/v2/tasks/{id}/cancel", self.cancel, methods=["POST"]),
            Route("/vidu-media/{name}", self.download, methods=["GET"]),
        ]

    def _token(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        return token if scheme == "Token" and self.config.key_ok(token) else None

    def _unauthorized(self) -> Response:
        return self.vidu_error(401, "Unauthorized", "invalid token: use 'Authorization: Token <api key>'")

    def _create_handler(self, endpoint: str) -> Any:
        async def create(request: Request) -> Response:
            return await self.create(request, endpoint)
        return create

    async def create(self, request: Request, endpoint: str) -> Response:
        token = self._token(request)
        if token is None:
            return self._unauthorized()
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return self.vidu_error(400, "BadRequest", "request body must be a JSON object")
        try:
            inp = self.validate(endpoint, body)
            d = directives(inp["prompt"])
            if "blocked" in d:
                raise _bad("TaskPromptPolicyViolation", "prompt violates the content policy")
            credits = 4 * inp["duration"] * (2 if inp["resolution"] == "1080p" else 1)
            self.admit(credits)
        except ViduError as err:
            return self.vidu_error(err.status, err.reason, err.message)
        now = time.time()
        queue = float(d.get("queue") or self.config.queue_seconds)
        if inp["off_peak"]:
            queue += float(self._x("off_peak_queue_seconds", 2.0))
        outcome = "filtered" if "filtered" in d else "fail" if "fail" in d else "succeed"
        task = SimTask(id=_numeric_id(), created_at=now, queue_seconds=queue,
                       run_seconds=float(d.get("run") or self.config.run_seconds), outcome=outcome, input=inp,
                       data={"credits": credits, "token": token, "creation_id": _numeric_id(),
                             "created_seconds": min(queue / 2, 1.0),
                             "fail_code": d.get("fail") or "InternalServiceFailure"})
        self.tasks[task.id] = task
        self.credits_used += credits
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{endpoint}:{digest}")  # no idempotency key: a retried POST is a new task
        callback = body.get("callback_url")
        if callback:
            self._spawn(self._run_callbacks(task, callback, self.origin(request)))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        response = {"task_id": task.id, "state": "created", "model": inp["model"]}
        if endpoint == "text2video":
            response["style"] = inp["style"]
        response |= {k: inp[k] for k in ("prompt", "images", "duration", "seed", "aspect_ratio", "resolution",
                                         "movement_amplitude", "bgm", "payload", "off_peak")}
        return JSONResponse(response | {"credits": credits, "created_at": _iso(now)})

    def validate(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Check a create body as documented; returns the normalised request."""
        low, high, prompt_required = ENDPOINTS[endpoint]
        high = int(self._x("max_reference_images", 7)) if high is None else high
        model = body.get("model")
        if not model:
            raise _bad("FieldLacking", "model is required")
        allowed = (self._x("models", None) or {}).get(endpoint, MODELS)
        if model not in allowed:
            raise _bad("ModelUnavailable", f"model {model} is not available for {endpoint}")
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _bad("FieldInvalid", "prompt must be a string")
        if prompt_required and not prompt.strip():
            raise _bad("FieldLacking", "prompt is required")
        if len(prompt) > int(self._x("max_prompt_chars", 5000)):
            raise _bad("FieldInvalid", f"prompt exceeds {self._x('max_prompt_chars', 5000)} characters")
        images = body.get("images")
        if high == 0 and images:
            raise _bad("FieldUnwanted", f"images is not accepted by {endpoint}")
        images = images or []
        if high and not images:
            raise _bad("FieldLacking", "images is required")
        if not isinstance(images, list) or not low <= len(images) <= high:
            raise _bad("FieldItemCountOutOfRange", f"{endpoint} takes {low}-{high} images")
        for image in images:
            if not isinstance(image, str) or not (image.startswith(("http://", "https://"))
                                                  or DATA_IMAGE.match(image)):
                raise _bad("ImageFormatInvalid", "images must be URLs or data:image/...;base64 strings")
        durations = tuple((self._x("durations", None) or {}).get(model, DURATIONS[model]))
        duration = body.get("duration", 5 if 5 in durations else durations[0])
        if isinstance(duration, bool) or not isinstance(duration, int) or duration not in durations:
            raise _bad("FieldInvalid", f"duration {json.dumps(duration)} is not supported by {model}")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise _bad("FieldInvalid", "seed must be a non-negative integer")
        enums = (("aspect_ratio", ASPECT_RATIOS, "16:9"), ("resolution", RESOLUTIONS, "720p"),
                 ("movement_amplitude", AMPLITUDES, "auto"), ("style", ("general", "anime"), "general"))
        out: dict[str, Any] = {}
        for name, choices, default in enums:
            out[name] = body.get(name, default)
            if out[name] not in choices:
                raise _bad("FieldInvalid", f"{name} must be one of {', '.join(choices)}")
        for name in ("bgm", "off_peak", "audio", "watermark"):
            if not isinstance(body.get(name, False), bool):
                raise _bad("FieldInvalid", f"{name} must be a boolean")
        payload = body.get("payload", "")
        if not isinstance(payload, str) or len(payload.encode()) > MAX_PAYLOAD:
            raise _bad("FieldInvalid", "payload must be a string of at most 1 MB")
        callback = body.get("callback_url")
        if callback is not None and not (isinstance(callback, str) and re.match(r"^https?://[^/\s]+", callback)):
            raise _bad("FieldInvalid", "callback_url must be an http(s) URL")
        return out | {"model": model, "prompt": prompt, "images": images, "duration": duration,
                      "seed": seed or secrets.randbelow(2**31), "bgm": body.get("bgm", False),
                      "off_peak": body.get("off_peak", False), "payload": payload}

    def admit(self, credits: int) -> None:
        balance = self._x("credit_balance", None)
        if balance is not None and self.credits_used + credits > float(balance):
            raise _bad("CreditInsufficient", "insufficient credits")
        limit = self._x("max_concurrent", None)
        now = time.time()
        if limit is not None and sum(t.phase(now) in ("queued", "running") for t in self.tasks.values()) >= int(limit):
            raise ViduError(429, "QuotaExceeded", "the number of concurrent tasks exceeds your quota")

    async def get_creations(self, request: Request) -> Response:
        if self._token(request) is None:
            return self._unauthorized()
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.vidu_error(404, "TaskNotFound", "task not found")
        return JSONResponse(self.creation_body(task, self.origin(request), time.time()))

    async def cancel(self, request: Request) -> Response:
        if self._token(request) is None:
            return self._unauthorized()
        if (injected := await self.fault("cancel")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.vidu_error(404, "TaskNotFound", "task not found")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("id", task.id) != task.id:
            return self.vidu_error(400, "BadRequest", "body id must match the task id in the path")
        now = time.time()
        state = self.state_of(task, now)
        if state not in ("created", "queueing"):
            shown = "scheduled" if state == "processing" else state
            return self.vidu_error(400, "BadRequest", f"task state is {shown}, can not cancel")
        task.canceled_at = now
        return JSONResponse({})

    # -- callbacks ---------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _run_callbacks(self, task: SimTask, url: str, origin: str) -> None:
        sent_processing = False
        async with self.callback_client(float(self._x("callback_timeout", 10.0))) as client:
            while True:
                now = time.time()
                state = self.state_of(task, now)
                if state == "processing" and not sent_processing:
                    sent_processing = True
                    await self._deliver(client, task, url, origin, retries=0)
                if state in ("success", "failed"):
                    await self._deliver(client, task, url, origin, retries=int(self._x("callback_retries", 3)))
                    return
                boundary = task.started_at if state in ("created", "queueing") else task.finished_at
                await asyncio.sleep(min(0.25, max(0.01, boundary - now)))  # a cancel is seen within 0.25 s

    def sign_callback(self, task: SimTask, url: str, date: str, nonce: str) -> str:
        text = callback_signing_string("POST", url, date, nonce, str(self._x("callback_access_key", "vidu")),
                                       bool(self._x("callback_trailing_newline", True)))
        return callback_signature(task.data["token"], text)

    async def _deliver(self, client: httpx.AsyncClient, task: SimTask, url: str, origin: str, retries: int) -> None:
        for attempt in range(retries + 1):
            raw = json.dumps(self.creation_body(task, origin, time.time())).encode()
            date, nonce = formatdate(usegmt=True), new_id(length=32)
            headers = {"content-type": "application/json", "Date": date, "x-request-nonce": nonce,
                       "X-HMAC-SIGNED-HEADERS": "Date;x-request-nonce", "X-HMAC-ALGORITHM": "hmac-sha256",
                       "X-HMAC-ACCESS-KEY": str(self._x("callback_access_key", "vidu")),
                       "X-HMAC-SIGNATURE": self.sign_callback(task, url, date, nonce)}
            try:
                resp = await client.post(url, content=raw, headers=headers)
                self.callbacks_sent += 1
                if 200 <= resp.status_code < 300:
                    return
            except httpx.HTTPError:
                pass
            if attempt < retries:
                await asyncio.sleep(float(self._x("callback_retry_delay", 0.2)))


def _numeric_id() -> str:
    return "8" + new_id("0123456789", 17)
