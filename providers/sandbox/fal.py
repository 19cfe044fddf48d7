"""fal.ai queue API simulator.

Written from fal's documented wire format (shared/providers §2), not from our
adapter.

Routes (the simulator's origin stands in for ``https://queue.fal.run``):

- ``POST /{model_id}[?fal_webhook=<url>]`` -- submit; ``model_id`` is
  ``owner/app[/path...]`` (``fal-ai/flux/dev``,
  ``fal-ai/kling-video/v2/master/text-to-video``; ``workflows/`` and ``comfy/``
  namespaces keep their third segment). Answers ``{"status": "IN_QUEUE",
  "request_id", "gateway_request_id", "response_url", "status_url",
  "cancel_url", "queue_position"}``; the URLs use **owner/app only**.
- ``GET .../requests/{id}/status[?logs=1|true]`` -- **202** while ``IN_QUEUE``
  (with ``queue_position``) or ``IN_PROGRESS`` (with ``logs``), **200** when
  ``COMPLETED`` (``logs``, ``metrics.inference_time``). ``logs`` is ``null``
  unless asked for.
- ``GET .../requests/{id}/status/stream[?logs=1]`` -- SSE of status objects,
  closed after ``COMPLETED``.
- ``GET .../requests/{id}`` -- the model output (image models: ``images[]``
  with url/width/height/content_type/file_name/file_size; video models:
  ``video`` {url, content_type, file_name, file_size}; audio models: ``audio``),
  or the model's error with its error status.
- ``PUT .../requests/{id}/cancel`` -- 202 ``CANCELLATION_REQUESTED``, 400
  ``ALREADY_COMPLETED``, 404 ``NOT_FOUND``.
- ``.../requests/...`` routes accept the owner/app form and any model id of
  the same app (the sub-path form, e.g. ``fal-ai/flux/dev/requests/{id}``);
  another app's path answers 404.
- ``GET /files/...`` -- fal-CDN-style media (``/files/lion/<token>.png``,
  ``/files/b/<hex>/<token>_output.mp4``); 404 once expired.
- ``GET /.well-known/jwks.json`` -- the Ed25519 public keys that verify webhooks.

Auth: ``Authorization: Key <key_id>:<key_secret>``. Missing/other scheme ->
401 ``{"detail": "Unauthorized"}``; a key without ``:`` -> 401 ``Invalid Key
Authorization header format...``; an unknown key -> 401 ``{"detail": "No user
found for Key ID and Secret"}``. Keys listed in ``SimConfig.api_keys`` are
accepted whatever their format.

Traps and directives (in ``input.prompt``): ``[sim:queue=S]``/``[sim:run=S]``
timings; ``[sim:fail]`` -> ``COMPLETED`` whose result is HTTP 500 with a model
error (``detail`` list, ``internal_server_error``); ``[sim:fail=<error_type>]``
-> a request error (``request_timeout`` 504, ``runner_disconnected`` 503 ...,
flat ``{"detail", "error_type"}`` + ``X-Fal-Error-Type``) or, for any other
type, a 422 model error of that type; ``[sim:filtered]`` -> 422
``content_policy_violation``; ``[sim:nsfw]`` -> success with
``has_nsfw_concepts: [true]``; ``[sim:payload_error]`` -> the webhook says OK
with ``payload: null`` + ``payload_error`` (result fetch still works);
``[sim:retried]`` -> ``gateway_request_id`` differs from ``request_id``;
``[sim:position=N]`` -> starting queue position. An input with neither
``prompt`` nor an ``*_url`` field is accepted at submit and fails at the result
with 422 ``field required`` (fal validates in the runner). Request headers:
``X-Fal-Request-Timeout`` (queue wait longer than it -> 504 ``request_timeout``
with ``x-fal-request-timeout-type: user``), ``X-Fal-Object-Lifecycle-Preference``
(media expiry; ``null`` = never), ``X-Fal-Store-IO: 0`` (result kept only
``result_ttl_seconds``).

Webhooks: one POST per finished request (no progress events), body
``{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload",
"error"?, "payload_error"?}``, headers ``X-Fal-Webhook-Request-Id``,
``-User-Id``, ``-Timestamp`` (unix s) and ``-Signature`` (hex Ed25519 over
``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"``); retried on
non-2xx/network errors. Control: ``POST /_sim/fal/rotate-key``
(``{"retire_old": bool, "activate": bool}``), ``GET /_sim/fal/webhooks``.

``SimConfig.extra`` knobs (defaults): ``user_id`` ("sim-user"),
``allow_anonymous`` (False), ``strict_key_format`` (True), ``submit_status_code``
(200), ``result_before_done`` ("400": 400 ``Request is still in progress``;
"202": the status object), ``status_error_fields`` (False: COMPLETED-with-error
looks like success until the result fetch), ``cancel_running`` ("stop" |
"ignore": the app finishes anyway), ``cancel_queued_reply``
("CANCELLATION_REQUESTED" | "OK"), ``cancel_accepted_code`` (202),
``cancel_completed_code`` (400), ``cancelled_status`` ("COMPLETED"),
``webhook_on_cancel`` (False), ``result_ttl_seconds`` (3600, with
``X-Fal-Store-IO: 0``), ``payload_ttl_seconds`` (30 days), ``media_base_url``
(None = the simulator), ``stream_interval`` (0.1), ``webhook_retries`` (10),
``webhook_retry_base`` (0.2), ``webhook_retry_max`` (5.0), ``webhook_timeout``
(15.0), ``webhook_delay_seconds`` (0), ``webhook_drop`` (False),
``webhook_duplicate`` (False), ``webhook_timestamp_skew`` (0),
``webhook_corrupt_signature`` (False).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, directives, route_path

# Infrastructure ("request") errors: type -> (HTTP status, detail) [fal-docs request-errors].
REQUEST_ERRORS: dict[str, tuple[int, str]] = {
    "request_timeout": (504, "Request timed out"),
    "startup_timeout": (504, "Runner startup timed out"),
    "runner_scheduling_failure": (503, "Could not schedule a runner"),
    "runner_connection_timeout": (503, "Connection to the runner timed out"),
    "runner_disconnected": (503, "Runner disconnected"),
    "runner_connection_refused": (503, "Runner refused the connection"),
    "runner_connection_error": (503, "Runner connection error"),
    "runner_incomplete_response": (502, "Runner sent an incomplete response"),
    "runner_server_error": (500, "Runner server error"),
    "client_disconnected": (499, "Client disconnected"),
    "client_cancelled": (499, "Request cancelled by the client."),
    "bad_request": (400, "Bad request"),
    "internal_error": (500, "Internal error"),
}

# Image size presets of fal's image models; the real PNG is 1/16 of the size.
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

_VIDEO_WORDS = {"video", "kling", "veo", "veo2", "veo3", "hailuo", "seedance", "pixverse", "ltxv",
                "wan", "t2v", "i2v", "sora", "vidu", "mochi", "dream-machine"}
_AUDIO_WORDS = {"audio", "music", "tts", "speech", "lyria", "elevenlabs", "sound", "stable-audio"}
_NAMESPACES = ("workflows", "comfy")
_ANIMALS = ("lion", "tiger", "panda", "koala", "zebra", "rabbit", "elephant", "monkey", "penguin")
_MEDIA_KEYS = ("image_url", "video_url", "audio_url", "image_urls", "start_image_url")
_REQ_PATH = re.compile(
    r"^/(?P<prefix>.+?)/requests/(?P<id>[^/]+)(?P<tail>/status/stream|/status|/cancel)?/?$")
_DOCS = "https://docs.fal.ai/errors"


def app_id_of(model_id: str) -> str:
    """``owner/app`` of a model id (namespace kept): ``fal-ai/flux/dev`` -> ``fal-ai/flux``."""
    parts = model_id.strip("/").split("/")
    keep = 3 if parts[0] in _NAMESPACES else 2
    return "/".join(parts[:keep])


def output_kind(model_id: str) -> str:
    """``video``, ``audio`` or ``image``, from the words of the model id."""
    low = model_id.lower()
    words = set(re.split(r"[/_.]", low)) | set(re.split(r"[/_.-]", low))
    if "video" in low or words & _VIDEO_WORDS:
        return "video"
    if words & _AUDIO_WORDS:
        return "audio"
    return "image"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class Failure(NamedTuple):
    """How a finished request failed: what ``GET response_url`` answers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    message: str
    error_type: str


class Output(NamedTuple):
    path: str
    content_type: str
    file_name: str
    file_size: int
    width: int | None
    height: int | None


@dataclass
class SigningKey:
    kid: str
    private: Ed25519PrivateKey

    def jwk(self) -> dict[str, str]:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}


def _new_key() -> SigningKey:
    return SigningKey("fal-sim-" + secrets.token_hex(6), Ed25519PrivateKey.generate())


class FalSimulator(Simulator):
    name = "fal"
    jwks_path = "/.well-known/jwks.json"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.tasks: dict[str, SimTask] = {}
        self.keys: list[SigningKey] = [_new_key()]
        self.signing_key: SigningKey = self.keys[0]
        self.webhook_log: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.webhooks_sent = 0
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self._queues: dict[str, deque[float]] = {}
        super().__init__(config)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format: errors and auth -----------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            message = "Too many requests"
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    def _auth(self, request: Request) -> Response | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "key" or not key:
            if not request.headers.get("authorization") and self._x("allow_anonymous", False):
                return None
            return self.error_response(401, "Unauthorized")
        if key in self.config.api_keys:
            return None
        if self._x("strict_key_format", True) and ":" not in key:
            return self.error_response(401, "Invalid Key Authorization header format. "
                                            "Expected '<key_id>:<key_secret>'.")
        if self.config.api_keys:
            return self.error_response(401, "No user found for Key ID and Secret")
        return None

    # -- routes ------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route(self.jwks_path, self.get_jwks, methods=["GET"]),
            Route("/_sim/fal/rotate-key", self.post_rotate_key, methods=["POST"]),
            Route("/_sim/fal/webhooks", self.get_webhook_log, methods=["GET"]),
            Route("/files/{rest:path}", self.get_file, methods=["GET"]),
            Route("/{path:path}", self.dispatch, methods=["GET", "POST", "PUT"]),
        ]

    async def dispatch(self, request: Request) -> Response:
        path = route_path(request)  # below the mount point (/fal in the sandbox server)
        match = _REQ_PATH.match(path)
        if request.method == "POST":
            if match is not None or len(path.strip("/").split("/")) < 2:
                return self.error_response(404, "Not Found")
            return await self.submit(request, path.strip("/"))
        if match is None:
            return self.error_response(405 if request.method == "GET" else 404, "Method Not Allowed")
        tail = match.group("tail") or ""
        if (request.method == "PUT") != (tail == "/cancel"):
            return self.error_response(405, "Method Not Allowed")
        if (denied := self._auth(request)) is not None:
            return denied
        route = {"": "result", "/status": "status", "/status/stream": "status", "/cancel": "cancel"}[tail]
        if (injected := await self.fault(route)) is not None:
            return injected
        task = self.tasks.get(match.group("id"))
        prefix = match.group("prefix")
        # owner/app (what fal returns) or any model id of that app (the sub-path form).
        if task is not None and app_id_of(prefix) != task.data["app_id"]:
            task = None
        if route == "cancel":
            return await self.cancel(task)
        if task is None:
            return self.error_response(404, "Request not found")
        if route == "status":
            return self.status(request, task, stream=tail.endswith("/stream"))
        return self.result(task)

    # -- submit ------------------------------------------------------------------
    async def submit(self, request: Request, model_id: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("submit")) is not None:
            return injected
        app_id = app_id_of(model_id)
        if app_id.endswith("/missing-model"):
            return self.error_response(404, f"Application '{app_id.split('/')[-1]}' not found")
        try:
            inp = json.loads(await request.body() or b"{}")
        except ValueError:
            inp = None
        if not isinstance(inp, dict):
            return JSONResponse({"detail": "Request body must be a JSON object", "error_type": "bad_request"},
                                status_code=400, headers={"X-Fal-Error-Type": "bad_request"})
        request_id = str(uuid.uuid4())
        prompt = inp.get("prompt") if isinstance(inp.get("prompt"), str) else None
        d = directives(prompt)
        # Interned: 100,000 requests share these strings instead of holding copies.
        model_id, app_id, origin = sys.intern(model_id), sys.intern(app_id), sys.intern(self.origin(request))
        data: dict[str, Any] = {"model_id": model_id, "app_id": app_id, "origin": origin,
                                "gateway_request_id": str(uuid.uuid4()) if "retried" in d else request_id}
        task = SimTask.create(request_id, self.config, prompt, input=inp, data=data)
        task.outcome = self._outcome(d, inp, data)
        self._apply_headers(request, task)
        data["position"] = self._enqueue(app_id, task, d)
        self.tasks[request_id] = task
        self.record_creation(model_id + json.dumps(inp, sort_keys=True))
        webhook = request.query_params.get("fal_webhook")
        if webhook:
            self._spawn(self._webhook_when_done(task, webhook))
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        body = {"status": "IN_QUEUE", "request_id": request_id,
                "gateway_request_id": data["gateway_request_id"], **self._urls(task),
                "queue_position": data["position"]}
        return JSONResponse(body, status_code=int(self._x("submit_status_code", 200)),
                            headers={"x-fal-request-id": request_id})

    def _outcome(self, d: dict[str, str], inp: dict[str, Any], data: dict[str, Any]) -> str:
        if "fail" in d:
            data["fail_type"] = d["fail"] or None
            return "fail"
        for trap in ("filtered", "nsfw", "payload_error"):
            if trap in d:
                return trap
        if not isinstance(inp.get("prompt"), str) and not any(k in inp for k in _MEDIA_KEYS):
            return "invalid"
        return "succeed"

    def _apply_headers(self, request: Request, task: SimTask) -> None:
        lifecycle = request.headers.get("x-fal-object-lifecycle-preference")
        if lifecycle:
            try:
                pref = json.loads(lifecycle)
                if isinstance(pref, dict) and "expiration_duration_seconds" in pref:
                    secs = pref["expiration_duration_seconds"]
                    task.data["media_ttl"] = math.inf if secs is None else float(secs)
            except (ValueError, TypeError):
                pass
        if request.headers.get("x-fal-store-io", "").strip() == "0":
            task.data["no_store"] = True
        timeout = request.headers.get("x-fal-request-timeout")
        try:
            limit = float(timeout) if timeout else None
        except ValueError:
            limit = None
        if limit is not None and limit < task.queue_seconds:
            # The queue wait alone exceeds the caller's start timeout: fal gives up.
            task.queue_seconds, task.run_seconds = limit, 0.0
            task.outcome, task.data["fail_type"], task.data["user_timeout"] = "fail", "request_timeout", True

    def _enqueue(self, app_id: str, task: SimTask, d: dict[str, str]) -> int:
        """Initial 0-indexed queue position: requests of the app still waiting (amortised O(1))."""
        if d.get("position", "").isdigit():
            return int(d["position"])
        q = self._queues.setdefault(app_id, deque())
        now = time.time()
        while q and q[0] <= now:
            q.popleft()
        position = len(q)
        q.append(task.started_at)
        return position

    def _urls(self, task: SimTask) -> dict[str, str]:
        base = f"{task.data['origin']}/{task.data['app_id']}/requests/{task.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    # -- status ------------------------------------------------------------------
    def status_body(self, task: SimTask, logs: bool, now: float | None = None) -> tuple[int, dict[str, Any]]:
        now = time.time() if now is None else now
        phase = task.phase(now)
        base: dict[str, Any] = {"request_id": task.id, **self._urls(task)}
        if phase == "queued":
            remaining = max(0.0, task.started_at - now)
            frac = remaining / task.queue_seconds if task.queue_seconds > 0 else 0.0
            position = min(task.data["position"], int(task.data["position"] * frac + 0.999))
            return 202, {"status": "IN_QUEUE", "queue_position": position, **base}
        if phase == "running":
            return 202, {"status": "IN_PROGRESS", "logs": self._logs(task, now) if logs else None, **base}
        if phase == "canceled":
            body = {"status": str(self._x("cancelled_status", "COMPLETED")), **base,
                    "logs": self._logs(task, now) if logs else None}
            if self._x("status_error_fields", False):
                body |= {"error": REQUEST_ERRORS["client_cancelled"][1], "error_type": "client_cancelled"}
            return 200, body
        body = {"status": "COMPLETED", **base, "logs": self._logs(task, now) if logs else None,
                "metrics": {"inference_time": round(task.run_seconds, 4)}}
        failure = self.failure(task)
        if failure is not None and self._x("status_error_fields", False):
            body |= {"error": failure.message, "error_type": failure.error_type}
        return 200, body

    def _logs(self, task: SimTask, now: float) -> list[dict[str, str]]:
        if now < task.started_at:
            return []
        steps = task.input.get("num_inference_steps")
        steps = steps if isinstance(steps, int) and 0 < steps <= 50 else 28
        end = task.canceled_at if task.canceled_at is not None else now
        span = min(end, task.finished_at) - task.started_at
        finished = task.run_seconds <= 0 or end >= task.finished_at
        done = steps if finished else min(steps, int(steps * span / task.run_seconds))
        lines = [{"message": f"Step {i}/{steps}", "level": "INFO", "source": "USER",
                  "timestamp": _iso(task.started_at + task.run_seconds * i / steps)}
                 for i in range(1, done + 1)]
        return [{"message": "Running inference", "level": "INFO", "source": "USER",
                 "timestamp": _iso(task.started_at)}, *lines]

    def status(self, request: Request, task: SimTask, *, stream: bool) -> Response:
        logs = _flag(request.query_params.get("logs"))
        if not stream:
            code, body = self.status_body(task, logs)
            return JSONResponse(body, status_code=code)

        async def events() -> AsyncIterator[bytes]:
            while True:
                _, body = self.status_body(task, logs)
                yield f"data: {json.dumps(body)}\n\n".encode()
                if body["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
                    return
                await asyncio.sleep(float(self._x("stream_interval", 0.1)))

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- result ------------------------------------------------------------------
    def failure(self, task: SimTask) -> Failure | None:
        """The error a finished (or cancelled) request reports at its result URL, if any."""
        if task.phase() == "canceled":
            return self._request_error("client_cancelled")
        if task.outcome == "fail":
            kind = task.data.get("fail_type") or "internal_server_error"
            if kind in REQUEST_ERRORS:
                failure = self._request_error(kind)
                if task.data.get("user_timeout"):
                    failure.headers["x-fal-request-timeout-type"] = "user"
                return failure
            status = 500 if kind == "internal_server_error" else 422
            return self._model_error(status, kind, ["body"], f"Simulated model failure ({kind})",
                                     retryable=status >= 500)
        if task.outcome == "filtered":
            prompt = task.input.get("prompt")
            return self._model_error(422, "content_policy_violation", ["body", "prompt"],
                                     "The content was flagged by a content checker.",
                                     extra={"input": prompt, "categories": ["model_moderated"]})
        if task.outcome == "invalid":
            return self._model_error(422, "value_error.missing", ["body", "prompt"], "field required")
        return None

    def _request_error(self, kind: str) -> Failure:
        status, detail = REQUEST_ERRORS[kind]
        body = {"detail": detail, "error_type": kind}
        return Failure(status, body, {"X-Fal-Error-Type": kind}, detail, kind)

    def _model_error(self, status: int, kind: str, loc: list[str], msg: str, *, retryable: bool = False,
                     extra: dict[str, Any] | None = None) -> Failure:
        item = {"loc": loc, "msg": msg, "type": kind, "url": f"{_DOCS}#{kind}", **(extra or {})}
        headers = {"X-Fal-Retryable": "true" if retryable else "false"}
        return Failure(status, {"detail": [item]}, headers, msg, kind)

    def result(self, task: SimTask) -> Response:
        now = time.time()
        phase = task.phase(now)
        if phase in ("queued", "running"):
            if str(self._x("result_before_done", "400")) == "202":
                code, body = self.status_body(task, False, now)
                return JSONResponse(body, status_code=code)
            return self.error_response(400, "Request is still in progress")
        end = task.canceled_at if phase == "canceled" and task.canceled_at is not None else task.finished_at
        keep = self._x("result_ttl_seconds", 3600.0) if task.data.get("no_store") \
            else self._x("payload_ttl_seconds", 30 * 86400.0)
        if now > end + float(keep):
            return self.error_response(404, "Request not found")
        failure = self.failure(task)
        if failure is not None:
            return JSONResponse(failure.body, status_code=failure.status,
                                headers={"x-fal-request-id": task.id, **failure.headers})
        return JSONResponse(self.result_body(task), headers={"x-fal-request-id": task.id})

    def result_body(self, task: SimTask) -> dict[str, Any]:
        base = self._x("media_base_url", None) or task.data["origin"]
        outs = self._outputs(task)
        seed = task.input.get("seed")
        seed = seed if isinstance(seed, int) else int(hashlib.sha256(task.id.encode()).hexdigest()[:8], 16)

        def file(o: Output) -> dict[str, Any]:
            f: dict[str, Any] = {"url": base + o.path, "content_type": o.content_type,
                                 "file_name": o.file_name, "file_size": o.file_size}
            if o.width is not None:
                f |= {"width": o.width, "height": o.height}
            return f

        kind = output_kind(task.data["model_id"])
        if kind == "video":
            return {"video": file(outs[0]), "seed": seed}
        if kind == "audio":
            return {"audio": file(outs[0])}
        return {"images": [file(o) for o in outs], "seed": seed, "prompt": task.input.get("prompt"),
                "timings": {"inference": round(task.run_seconds, 4)},
                "has_nsfw_concepts": [task.outcome == "nsfw"] * len(outs)}

    def _outputs(self, task: SimTask) -> list[Output]:
        outs: list[Output] | None = task.data.get("outputs")
        if outs is not None:
            return outs
        ttl = task.data.get("media_ttl", self.config.output_ttl_seconds)
        expires = task.finished_at + float(ttl)
        kind = output_kind(task.data["model_id"])
        outs = []
        if kind == "image":
            n = task.input.get("num_images")
            n = max(1, min(n, 4)) if isinstance(n, int) else 1
            w, h = self._image_size(task.input.get("image_size"))
            for i in range(n):
                data = media.png(f"{task.id}:{i}", w, h)
                name = f"{secrets.token_urlsafe(15)}.png"
                path = f"/files/{_ANIMALS[i % len(_ANIMALS)]}/{name}"
                outs.append(self._store(path, name, data, "image/png", expires, w, h))
        else:
            model = task.data["model_id"].lower()
            ext = "mp4" if kind == "video" else ("wav" if "tts" in model or "speech" in model else "mp3")
            data, ctype = media.make(ext, task.id)
            name = f"output.{ext}"
            path = f"/files/b/{secrets.token_hex(4)}/{secrets.token_urlsafe(15)}_{name}"
            outs.append(self._store(path, name, data, ctype, expires))
        task.data["outputs"] = outs
        return outs

    def _store(self, path: str, name: str, data: bytes, ctype: str, expires: float,
               w: int | None = None, h: int | None = None) -> Output:
        self.files.files[path] = StoredFile(data, ctype, expires)
        return Output(path, ctype, name, len(data), w, h)

    @staticmethod
    def _image_size(spec: Any) -> tuple[int, int]:
        if isinstance(spec, dict) and all(isinstance(spec.get(k), int) for k in ("width", "height")):
            w, h = spec["width"], spec["height"]
        else:
            w, h = IMAGE_SIZES.get(spec if isinstance(spec, str) else "", IMAGE_SIZES["landscape_4_3"])
        return max(1, min(w, 4096) // 16), max(1, min(h, 4096) // 16)

    async def get_file(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        f = self.files.get(route_path(request))
        if f is None:
            return self.expired_file_response()
        return Response(f.data, media_type=f.content_type)

    # -- cancel ------------------------------------------------------------------
    async def cancel(self, task: SimTask | None) -> Response:
        if task is None:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        phase = task.phase()
        if task.data.get("cancel_requested") and phase == "running":
            return JSONResponse({"status": "CANCELLATION_REQUESTED"},
                                status_code=int(self._x("cancel_accepted_code", 202)))
        if phase in ("done", "canceled"):
            return JSONResponse({"status": "ALREADY_COMPLETED"},
                                status_code=int(self._x("cancel_completed_code", 400)))
        reply = "CANCELLATION_REQUESTED"
        if phase == "queued":
            task.canceled_at = time.time()  # removed from the queue, never processed
            reply = str(self._x("cancel_queued_reply", reply))
        elif self._x("cancel_running", "stop") == "stop":
            task.canceled_at = time.time()  # the app honours the cancellation signal
        else:
            task.data["cancel_requested"] = True  # signal sent; the app finishes anyway
        if (injected := await self.fault("cancel", after_effect=True)) is not None:
            return injected
        return JSONResponse({"status": reply}, status_code=int(self._x("cancel_accepted_code", 202)))

    # -- webhooks ----------------------------------------------------------------
    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self.keys]}

    async def get_jwks(self, request: Request) -> Response:
        if (injected := await self.fault("jwks")) is not None:
            return injected
        return JSONResponse(self.jwks())

    def rotate_key(self, *, retire_old: bool = False, activate: bool = True) -> SigningKey:
        """Publish a new key; sign with it if ``activate``; drop older keys if ``retire_old``."""
        key = _new_key()
        if retire_old:
            self.keys = [key]
        else:
            self.keys.append(key)
        if activate or retire_old:
            self.signing_key = key
        return key

    async def post_rotate_key(self, request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        retire, activate = bool(body.get("retire_old")), bool(body.get("activate", True))
        key = self.rotate_key(retire_old=retire, activate=activate)
        return JSONResponse({"kid": key.kid, "signing_kid": self.signing_key.kid, **self.jwks()})

    async def get_webhook_log(self, request: Request) -> Response:
        return JSONResponse({"sent": self.webhooks_sent, "deliveries": list(self.webhook_log)})

    def sign(self, request_id: str, user_id: str, timestamp: str, body: bytes) -> str:
        """Hex Ed25519 signature of ``request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)``."""
        msg = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
        return self.signing_key.private.sign(msg).hex()

    def webhook_body(self, task: SimTask) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": task.id, "gateway_request_id": task.data["gateway_request_id"]}
        failure = self.failure(task)
        if failure is not None:
            return body | {"status": "ERROR", "error": f"Invalid status code: {failure.status}",
                           "payload": failure.body}
        if task.outcome == "payload_error":
            return body | {"status": "OK", "payload": None,
                           "payload_error": "Response payload is not JSON serializable (simulated)"}
        return body | {"status": "OK", "payload": self.result_body(task)}

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._webhook_tasks.add(t)
        t.add_done_callback(self._webhook_tasks.discard)

    async def _webhook_when_done(self, task: SimTask, url: str) -> None:
        while True:
            phase = task.phase()
            if phase == "done":
                break
            if phase == "canceled":
                if not self._x("webhook_on_cancel", False):
                    return
                break
            await asyncio.sleep(max(0.01, min(0.25, task.finished_at - time.time())))
        delay = float(self._x("webhook_delay_seconds", 0))
        if delay > 0:
            await asyncio.sleep(delay)
        if self._x("webhook_drop", False):
            self.webhook_log.append({"request_id": task.id, "url": url, "dropped": True, "at": time.time()})
            return
        raw = json.dumps(self.webhook_body(task)).encode()
        copies = 2 if self._x("webhook_duplicate", False) else 1
        async with self.callback_client(float(self._x("webhook_timeout", 15.0))) as client:
            for _ in range(copies):
                await self._deliver(client, url, task.id, raw)

    async def _deliver(self, client: httpx.AsyncClient, url: str, request_id: str, raw: bytes) -> None:
        retries = int(self._x("webhook_retries", 10))
        base, cap = float(self._x("webhook_retry_base", 0.2)), float(self._x("webhook_retry_max", 5.0))
        user_id = str(self._x("user_id", "sim-user"))
        for attempt in range(retries + 1):
            ts = str(int(time.time() + float(self._x("webhook_timestamp_skew", 0))))
            signature = self.sign(request_id, user_id, ts, raw)
            if self._x("webhook_corrupt_signature", False):
                signature = ("0" if signature[0] != "0" else "1") + signature[1:]
            headers = {"content-type": "application/json", "x-fal-webhook-request-id": request_id,
                       "x-fal-webhook-user-id": user_id, "x-fal-webhook-timestamp": ts,
                       "x-fal-webhook-signature": signature}
            entry: dict[str, Any] = {"request_id": request_id, "url": url, "attempt": attempt + 1,
                                     "kid": self.signing_key.kid, "at": time.time()}
            try:
                resp = await client.post(url, content=raw, headers=headers)
                self.webhooks_sent += 1
                entry["status_code"] = resp.status_code
                self.webhook_log.append(entry)
                if 200 <= resp.status_code < 300:
                    return
            except httpx.HTTPError as exc:
                entry["error"] = type(exc).__name__
                self.webhook_log.append(entry)
            if attempt < retries:
                await asyncio.sleep(min(cap, base * 2**attempt))
