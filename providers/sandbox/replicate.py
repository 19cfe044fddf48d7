"""Replicate predictions API simulator.

Written from Replicate's documented wire format (shared/providers §1), not
from our adapter:

- ``POST /v1/predictions`` (``version``) and ``POST /v1/models/{owner}/{name}/predictions``
  answer **201** with a prediction; ``GET /v1/predictions/{id}``,
  ``POST /v1/predictions/{id}/cancel``, ``GET /v1/predictions`` (paginated list,
  newest first, ``created_after``), ``GET /v1/webhooks/default/secret``.
- Statuses ``starting -> processing -> succeeded|failed|canceled``, plus
  ``aborted`` (canceled before start); tqdm-style progress lines in ``logs``.
- Output files on a delivery path that 404 after ``output_ttl_seconds``, after
  which the prediction shows ``output: null`` and ``data_removed: true``.
- Errors as ``application/problem+json`` (``title``/``detail``/``status``); 429
  with Replicate's throttle text; ``ratelimit-remaining``/``ratelimit-reset``.
- ``Prefer: wait[=n]`` holds the create until done or ``n`` seconds.
- Webhooks: POST the prediction to ``webhook`` on the filtered events, signed
  per Standard Webhooks with the account secret.

Prompt directives: ``[sim:fail]`` fails the prediction, ``[sim:queue=S]`` and
``[sim:run=S]`` set its timings. Output kind follows the model name (``video``
-> MP4, ``music``/``audio``/``sound`` -> MP3, ``speech``/``tts`` -> WAV, else PNG).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, bearer, new_id

_VERSION_RE = re.compile(r"^(?:[\w.-]+/[\w.-]+:)?([0-9a-f]{64})$")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def output_ext(model: str) -> str:
    name = model.lower()
    if "video" in name:
        return "mp4"
    if any(w in name for w in ("speech", "tts")):
        return "wav"
    if any(w in name for w in ("music", "audio", "sound")):
        return "mp3"
    return "png"


class ReplicateSimulator(Simulator):
    name = "replicate"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self.webhooks_sent: int = 0
        # Which API keys touched each prediction (create, get, cancel): key affinity is testable.
        self.keys_by_task: dict[str, set[str]] = {}

    # -- wire format -------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        titles = {401: "Unauthenticated", 404: "Not found", 422: "Unprocessable Entity",
                  429: "Request was throttled", 500: "Internal Server Error",
                  502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
        if status == 429:
            message = "Request was throttled. Your rate limit resets in ~30s."
        body = {"title": titles.get(status, "Error"), "detail": message, "status": status}
        return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")

    def prediction(self, task: SimTask, origin: str) -> dict[str, Any]:
        now = time.time()
        phase = task.phase(now)
        status = {"queued": "starting", "running": "processing"}.get(phase, "")
        if phase == "canceled":
            status = "aborted" if task.canceled_at and task.canceled_at < task.started_at else "canceled"
        elif phase == "done":
            status = "failed" if task.outcome == "fail" else "succeeded"
        removed = phase == "done" and now > task.finished_at + self.config.output_ttl_seconds
        body: dict[str, Any] = {
            "id": task.id,
            "model": task.data["model"],
            "version": task.data["version"],
            "input": None if removed else task.input,
            "logs": "" if removed else self._logs(task, now),
            "error": "CUDA out of memory (simulated)" if status == "failed" else None,
            "status": status,
            "created_at": _iso(task.created_at),
            "urls": {
                "get": f"{origin}/v1/predictions/{task.id}",
                "cancel": f"{origin}/v1/predictions/{task.id}/cancel",
                "web": f"https://replicate.com/p/{task.id}",
            },
        }
        if phase in ("running", "done") or (phase == "canceled" and status == "canceled"):
            body["started_at"] = _iso(task.started_at)
        if status in ("succeeded", "failed", "canceled", "aborted"):
            end = task.canceled_at if phase == "canceled" else task.finished_at
            body["completed_at"] = _iso(end)
            body["metrics"] = {"predict_time": round(task.run_seconds, 6)}
        if status == "succeeded":
            body["output"] = None if removed else self._outputs(task, origin)
            body["data_removed"] = removed
        return body

    def _logs(self, task: SimTask, now: float) -> str:
        pct = task.progress(now)
        if task.phase(now) == "queued":
            return ""
        steps = 50
        done = steps * pct // 100
        return f"Using seed: 42\n{pct:3d}%|{'#' * (pct // 10):<10}| {done}/{steps} [00:01<00:01, 16.47it/s]\n"

    def _outputs(self, task: SimTask, origin: str) -> str | list[str]:
        urls = task.data.get("output_paths")
        if urls is None:
            ext = output_ext(task.data["model"])
            n = int(task.input.get("num_outputs") or 1)
            urls = []
            for i in range(max(1, min(n, 4))):
                data, ctype = media.make(ext, f"{task.id}:{i}")
                urls.append(self.files.publish(data, ctype, f"out-{i}.{ext}"))
            task.data["output_paths"] = urls
        full = [origin + u for u in urls]
        # Single-file models return a bare URL string, multi-output models a list.
        return full[0] if ext_single(task) else full

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/predictions", self.create_version, methods=["POST"]),
            Route("/v1/predictions", self.list_predictions, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/predictions", self.create_official, methods=["POST"]),
            Route("/v1/predictions/{id}", self.get_prediction, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", self.cancel_prediction, methods=["POST"]),
            Route("/v1/webhooks/default/secret", self.get_secret, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        if not self.config.key_ok(bearer(request)):
            return self.error_response(401, "You did not pass a valid authentication token")
        return None

    def _ok(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        limit = "599" if status == 201 else "2999"
        hdrs = {"ratelimit-remaining": limit, "ratelimit-reset": "1", **(headers or {})}
        return JSONResponse(body, status_code=status, headers=hdrs)

    async def create_version(self, request: Request) -> Response:
        return await self._create(request, None)

    async def create_official(self, request: Request) -> Response:
        return await self._create(request, f"{request.path_params['owner']}/{request.path_params['name']}")

    async def _create(self, request: Request, model: str | None) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self.error_response(400, "Request body must be a JSON object")
        inp = body.get("input")
        if not isinstance(inp, dict):
            return self.error_response(422, "input is required and must be an object")
        if model is None:
            version = body.get("version")
            match = _VERSION_RE.match(version) if isinstance(version, str) else None
            if match is None:
                return self.error_response(422, "version is required: a 64-character version id")
            assert isinstance(version, str)
            version_id = match.group(1)
            model = version.split(":")[0] if ":" in version else "simulated/model-" + version_id[:8]
        else:
            if model.endswith("/missing-model"):
                return self.error_response(404, "The requested resource could not be found.")
            version_id = "dp-" + hashlib.sha256(model.encode()).hexdigest()[:32]
        prompt = inp.get("prompt") if isinstance(inp.get("prompt"), str) else None
        task = SimTask.create(new_id(), self.config, prompt, input=inp,
                              data={"model": model, "version": version_id})
        self.tasks[task.id] = task
        self.keys_by_task.setdefault(task.id, set()).add(bearer(request) or "")
        self.record_creation(json.dumps(inp, sort_keys=True) + model)
        webhook = body.get("webhook")
        if isinstance(webhook, str):
            events = body.get("webhook_events_filter") or ["start", "output", "logs", "completed"]
            self._schedule_webhooks(task, webhook, list(events), self.origin(request))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        headers: dict[str, str] = {"Location": f"{self.origin(request)}/v1/predictions/{task.id}"}
        prefer = request.headers.get("prefer", "")
        if prefer.startswith("wait"):
            wait = 60.0
            if "=" in prefer:
                wait = max(1.0, min(60.0, float(prefer.split("=", 1)[1])))
            deadline = time.time() + wait
            while time.time() < deadline and task.phase() not in ("done", "canceled"):
                await asyncio.sleep(0.05)
            headers["Preference-Applied"] = prefer
        return self._ok(self.prediction(task, self.origin(request)), 201, headers)

    async def get_prediction(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.error_response(404, "Not found.")
        self.keys_by_task.setdefault(task.id, set()).add(bearer(request) or "")
        return self._ok(self.prediction(task, self.origin(request)))

    async def cancel_prediction(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("cancel")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.error_response(404, "Not found.")
        if task.phase() in ("queued", "running"):
            task.canceled_at = time.time()
        return self._ok(self.prediction(task, self.origin(request)))

    async def list_predictions(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        after = request.query_params.get("created_after")
        since = datetime.fromisoformat(after.replace("Z", "+00:00")).timestamp() if after else 0.0
        tasks = sorted((t for t in self.tasks.values() if t.created_at >= since),
                       key=lambda t: t.created_at, reverse=True)
        origin = self.origin(request)
        return self._ok({"previous": None, "next": None,
                         "results": [self.prediction(t, origin) for t in tasks[:100]]})

    async def get_secret(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        return self._ok({"key": self.webhook_secret})

    # -- webhooks ----------------------------------------------------------
    def _schedule_webhooks(self, task: SimTask, url: str, events: list[str], origin: str) -> None:
        coro = self._send_webhooks(task, url, events, origin)
        t = asyncio.get_running_loop().create_task(coro)
        self._webhook_tasks.add(t)
        t.add_done_callback(self._webhook_tasks.discard)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        key = base64.b64decode(self.webhook_secret.split("_", 1)[1])
        mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode()

    async def _send_webhooks(self, task: SimTask, url: str, events: list[str], origin: str) -> None:
        sent_start = False
        async with self.callback_client(10) as client:
            while True:
                phase = task.phase()
                if not sent_start and phase != "queued" and "start" in events:
                    sent_start = True
                    await self._post_webhook(client, url, task, origin)
                if phase in ("done", "canceled"):
                    if "completed" in events:
                        await self._post_webhook(client, url, task, origin)
                    return
                # Sleep until the next phase boundary (a cancel is noticed within a second).
                boundary = task.started_at if phase == "queued" else task.finished_at
                await asyncio.sleep(min(1.0, max(0.01, boundary - time.time())))

    async def _post_webhook(self, client: httpx.AsyncClient, url: str, task: SimTask, origin: str) -> None:
        body = json.dumps(self.prediction(task, origin)).encode()
        msg_id = "msg_" + new_id(length=24)
        for attempt in range(3):  # a few retries on network problems, same webhook-id
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": msg_id,
                       "webhook-timestamp": str(ts), "webhook-signature": self.sign(msg_id, ts, body)}
            try:
                resp = await client.post(url, content=body, headers=headers)
                self.webhooks_sent += 1
                if resp.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2 * (attempt + 1))


def ext_single(task: SimTask) -> bool:
    """Video and audio models answer one URL string; image models a list."""
    return output_ext(task.data["model"]) != "png"
