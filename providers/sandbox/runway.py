"""Runway API simulator (video generation tasks).

Written from Runway's documented wire format (shared/providers/video-sora-veo-kling-runway.md
§0 and §4: the runwayml SDK types, docs.dev.runwayml.com errors/tiers pages), not from our
adapter.

Routes (every one needs ``Authorization: Bearer <key>`` and ``X-Runway-Version: 2024-11-06``):

- ``POST /v1/image_to_video`` and ``POST /v1/text_to_video``: create; the body is **only**
  ``{"id": "<uuid>"}`` (HTTP 200, ``extra["create_status"]``). No idempotency: every POST is
  a new billed task.
- ``GET /v1/tasks/{id}``: ``{id, status, createdAt, ...}`` where status is ``THROTTLED``
  (stored, not yet enqueued) -> ``PENDING`` -> ``RUNNING`` (``progress``: float 0-1) ->
  ``SUCCEEDED`` (``output: [url]``) | ``FAILED`` (``failure``, ``failureCode``) | ``CANCELLED``.
  Unfinished tasks carry ``estimatedCost: {credits: <float>}``, finished ones the final
  ``cost: {credits: <int>}`` (the runwayml SDK's task types require them): the full price
  for SUCCEEDED, for FAILED with ``SAFETY.INPUT.*`` (not refunded) and for a task
  cancelled while RUNNING; 0 (refunded) for any other failure and for a task cancelled
  before it ran (the refund rules beyond ``SAFETY.INPUT`` are a guess).
- ``DELETE /v1/tasks/{id}``: cancels a THROTTLED/PENDING/RUNNING task (GET then shows
  ``CANCELLED``), deletes any other task (GET then 404, or ``CANCELLED`` with
  ``extra["deleted_task_get"] = "cancelled"``); 204 with no body.
- ``GET /v1/organization``: ``{creditBalance, tier: {maxMonthlyCreditSpend, models: {m:
  {maxConcurrentGenerations, maxDailyGenerations}}}, usage: {models: {m: {dailyGenerations}}}}``.
- ``GET /{uuid}.mp4?_jwt=<JWT>``: the output (a real H.264 MP4, distinct per task), a
  CloudFront-style signed URL whose JWT payload carries ``exp``. Each GET of the task mints a
  fresh URL valid for ``output_ttl_seconds``; expired or revoked URLs answer 403.

Validation (400 ``{"error": "<human text naming the field>", "issues": [{path, message}]}``):
model per endpoint, ``ratio`` and ``duration`` per model (gen4_turbo, gen4.5, veo3, veo3.1,
veo3.1_fast; gen3a_turbo with ``extra["legacy_models"]``), ``promptText`` (<= 1000 UTF-16
units; required by gen4.5 and text_to_video), ``promptImage`` (HTTPS URL on a hostname, not an
IP; ``data:image/{jpeg,png,webp};base64`` <= 5 MB; ``runway://`` upload; or
``[{uri, position: first|last}]``), ``seed``, ``contentModeration``. Not enough credits: 400.

Errors: 401 ``{"error"}`` for a missing/unknown key; 400 for a missing or unsupported
``X-Runway-Version``; 404 unknown task/route; 405 wrong method; 429 ``{"error"}`` when the
model's daily generations are used up (``extra["max_daily_generations"]``) or on injected
faults; 502/503/504 injected.

Concurrency: per model, ``extra["max_concurrent_generations"]`` (None = unlimited). Tasks over
the limit are THROTTLED and admitted in submission order as slots free up (a slot is held from
PENDING until the task's scheduled end; cancelling does not give it back early).

Prompt directives (in ``promptText``): ``[sim:queue=S]``, ``[sim:run=S]`` timings;
``[sim:throttled=S]`` THROTTLED for S seconds before PENDING (default
``extra["throttle_seconds"]``, 1.0); ``[sim:fail]`` FAILED with
``INTERNAL.BAD_OUTPUT.CODE01``, ``[sim:fail=CODE]`` with that ``failureCode``
(``[sim:fail=none]``: no code); ``[sim:safety]`` FAILED with ``SAFETY.INPUT.TEXT``.

Runway sends no webhooks; clients poll.

``SimConfig.extra`` knobs: ``api_versions`` (["2024-11-06"]), ``create_status`` (200),
``deleted_task_get`` ("404" | "cancelled"), ``max_concurrent_generations``,
``max_daily_generations``, ``credit_balance`` (1e9), ``legacy_models`` (False),
``strict_asset_urls`` (True: reject http:// and IP hosts), ``throttle_seconds`` (1.0).
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import json
import re
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import FileStore, SimConfig, SimTask, Simulator, bearer, directives

API_VERSION = "2024-11-06"
R6 = ("1280:720", "720:1280", "1104:832", "832:1104", "960:960", "1584:672")
R4 = ("1280:720", "720:1280", "1080:1920", "1920:1080")
GEN_DURATIONS = tuple(range(2, 11))
VEO_DURATIONS = (4, 6, 8)


@dataclass(frozen=True)
class ModelSpec:
    ratios: tuple[str, ...]
    durations: tuple[int, ...]
    default_duration: int
    credits_per_second: int
    duration_required: bool = False
    prompt_text_required: bool = False
    last_frame: bool = False


IMAGE_TO_VIDEO = {
    "gen4_turbo": ModelSpec(R6, GEN_DURATIONS, 10, 5),
    "gen4.5": ModelSpec(R6, GEN_DURATIONS, 10, 12, duration_required=True, prompt_text_required=True),
    "veo3.1": ModelSpec(R4, VEO_DURATIONS, 8, 40, last_frame=True),
    "veo3.1_fast": ModelSpec(R4, VEO_DURATIONS, 8, 15, last_frame=True),
    "veo3": ModelSpec(R4, (8,), 8, 40, duration_required=True),
}
TEXT_TO_VIDEO = {
    "gen4.5": ModelSpec(("1280:720", "720:1280"), GEN_DURATIONS, 10, 12, duration_required=True,
                        prompt_text_required=True),
    "veo3.1": ModelSpec(R4, VEO_DURATIONS, 8, 40, prompt_text_required=True),
    "veo3.1_fast": ModelSpec(R4, VEO_DURATIONS, 8, 15, prompt_text_required=True),
}
# Removed from the SDK union around 2026-06; accepted only with extra["legacy_models"].
LEGACY_IMAGE_TO_VIDEO = {
    "gen3a_turbo": ModelSpec(("768:1280", "1280:768"), (5, 10), 10, 5, prompt_text_required=True),
}

FAILURES = {
    "SAFETY": "The generation was flagged by our content moderation system.",
    "INTERNAL.BAD_OUTPUT": "The model produced an output that did not pass our quality checks.",
    "ASSET": "One of the input assets is invalid.",
    "THIRD_PARTY": "An upstream provider is unavailable.",
}
DEFAULT_FAILURE = "An unexpected error occurred."
DATA_URI = re.compile(r"^data:image/(jpeg|jpg|png|webp);base64,([A-Za-z0-9+/=\s]*)$")
MAX_DATA_URI = 5 * 1024 * 1024
UINT32_MAX = 4294967295


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


class BadRequest(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _RevocableFiles(FileStore):
    """FileStore that remembers the last ``/_sim/expire-files``: URLs minted before it are dead."""

    revoked_before: float = 0.0

    def expire_all(self) -> None:
        super().expire_all()
        self.revoked_before = time.time()


class RunwaySimulator(Simulator):
    name = "runway"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.revocable = _RevocableFiles(self.config)
        self.files = self.revocable
        self.tasks: dict[str, SimTask] = {}
        self._slots: dict[str, list[float]] = {}  # per model: heap of times each slot frees up
        self._daily: Counter[tuple[str, str]] = Counter()
        self._cdn_secret = secrets.token_bytes(32)
        self.app.add_exception_handler(HTTPException, self._http_exception)

    # -- wire format -------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        text = {
            401: "Invalid API key.",
            404: "Not found.",
            429: "Too many requests. Please slow down and retry later.",
            502: "Bad gateway.", 503: "Service is temporarily unavailable.",
            504: "Gateway timeout: the service is overloaded.",
        }.get(status, message)
        return JSONResponse({"error": text}, status_code=status, headers=headers)

    def bad_request(self, err: BadRequest) -> Response:
        issue = {"path": [err.path] if err.path else [], "message": err.message}
        return JSONResponse({"error": err.message, "issues": [issue]}, status_code=400)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return JSONResponse({"error": "Method not allowed."}, status_code=405)
        return JSONResponse({"error": "Not found."} if exc.status_code == 404 else {"error": str(exc.detail)},
                            status_code=exc.status_code)

    def task_object(self, task: SimTask, origin: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        body: dict[str, Any] = {"id": task.id, "status": "", "createdAt": _iso(task.data["submitted_at"])}
        phase = task.phase(now)
        if phase == "canceled" or task.data.get("deleted"):
            body["status"] = "CANCELLED"
        elif now < task.created_at:  # created_at is the moment the task leaves THROTTLED
            body["status"] = "THROTTLED"
        elif phase == "queued":
            body["status"] = "PENDING"
        elif phase == "running":
            body["status"] = "RUNNING"
            body["progress"] = round(min(0.99, max(0.0, (now - task.started_at) / task.run_seconds)), 4)
        elif task.outcome == "fail":
            body["status"] = "FAILED"
            code = task.data.get("failure_code")
            prefix = next((p for p in FAILURES if code and code.startswith(p)), None)
            body["failure"] = FAILURES[prefix] if prefix else DEFAULT_FAILURE
            body["failureCode"] = code
        else:
            body["status"] = "SUCCEEDED"
            body["output"] = [self._output_url(task, origin, now)]
        if body["status"] in ("THROTTLED", "PENDING", "RUNNING"):
            body["estimatedCost"] = {"credits": float(task.data["credits"])}
        else:
            body["cost"] = {"credits": self.charged(task, now)}
        return body

    def charged(self, task: SimTask, now: float) -> int:
        """Credits a task holds: the price until it ends, then what stays charged (refunds give back)."""
        price: int = task.data["credits"]
        if task.canceled_at is not None and task.canceled_at <= now:
            return price if task.canceled_at >= task.started_at else 0
        if task.phase(now) == "done" and task.outcome == "fail":
            return price if str(task.data.get("failure_code") or "").startswith("SAFETY.INPUT") else 0
        return price

    @property
    def credits_used(self) -> int:
        now = time.time()
        return sum(self.charged(t, now) for t in self.tasks.values())

    # -- signed, expiring output URLs --------------------------------------
    def _output_url(self, task: SimTask, origin: str, now: float) -> str:
        claims = {
            "keyHash": task.data["key_hash"],
            "bucket": "runway-task-artifacts",
            "stage": "prod",
            "exp": round(now + self.config.output_ttl_seconds, 3),
            "mint": int(now * 1000),
            "task": task.id,
        }
        token = jwt.encode(claims, self._cdn_secret, algorithm="HS256")
        return f"{origin}/{_asset_id(task.id)}.mp4?_jwt={token}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        try:
            claims = jwt.decode(request.query_params.get("_jwt", ""), self._cdn_secret,
                                algorithms=["HS256"], options={"verify_exp": False})
        except jwt.InvalidTokenError:
            return self.expired_file_response()
        task_id = str(claims.get("task", ""))
        now = time.time()
        if (
            _asset_id(task_id) != request.path_params["asset"]
            or float(claims.get("exp", 0)) <= now
            or int(claims.get("mint", 0)) <= int(self.revocable.revoked_before * 1000)
            or task_id not in self.tasks
        ):
            return self.expired_file_response()
        return Response(media.mp4(f"runway:{task_id}"), media_type="video/mp4")

    def expired_file_response(self) -> Response:
        body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>' \
               b"<Message>Access denied</Message></Error>"
        return Response(body, status_code=403, media_type="application/xml")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/image_to_video", self.create_image_to_video, methods=["POST"]),
            Route("/v1/text_to_video", self.create_text_to_video, methods=["POST"]),
            Route("/v1/tasks/{id}", self.get_task, methods=["GET"]),
            Route("/v1/tasks/{id}", self.delete_task, methods=["DELETE"]),
            Route("/v1/organization", self.organization, methods=["GET"]),
            Route("/{asset}.mp4", self.download, methods=["GET"]),
        ]

    def _check_headers(self, request: Request) -> Response | None:
        key = bearer(request)
        if key is None:
            return JSONResponse({"error": "No API key provided. Pass it as 'Authorization: Bearer <key>'."},
                                status_code=401)
        if not self.config.key_ok(key):
            return JSONResponse({"error": "Invalid API key."}, status_code=401)
        version = request.headers.get("x-runway-version")
        accepted = [str(v) for v in self.config.extra.get("api_versions", [API_VERSION])]
        if not version:
            return JSONResponse({"error": "The X-Runway-Version header is required. "
                                          f"Supported versions: {', '.join(accepted)}."}, status_code=400)
        if version not in accepted:
            return JSONResponse({"error": f"Unsupported X-Runway-Version '{version}'. "
                                          f"Supported versions: {', '.join(accepted)}."}, status_code=400)
        return None

    async def create_image_to_video(self, request: Request) -> Response:
        return await self._create(request, "image_to_video")

    async def create_text_to_video(self, request: Request) -> Response:
        return await self._create(request, "text_to_video")

    async def _create(self, request: Request, endpoint: str) -> Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.bad_request(BadRequest("", "Request body is not valid JSON."))
        if not isinstance(body, dict):
            return self.bad_request(BadRequest("", "Request body must be a JSON object."))
        try:
            model, spec, duration = self.validate(endpoint, body)
        except BadRequest as err:
            return self.bad_request(err)

        extra = self.config.extra
        cost = spec.credits_per_second * duration
        if self.credits_used + cost > float(extra.get("credit_balance", 1e9)):
            return JSONResponse({"error": "You do not have enough credits to run this task."},
                                status_code=400)
        now = time.time()
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        daily_limit = extra.get("max_daily_generations")
        if daily_limit is not None and self._daily[(model, day)] >= int(daily_limit):
            return JSONResponse({"error": f"You have reached the maximum number of daily generations "
                                          f"for {model} in your tier. Try again tomorrow."}, status_code=429)

        text = body.get("promptText")
        prompt = text if isinstance(text, str) else ""
        task = self._new_task(model, spec, prompt, request, now)
        task.data["credits"] = cost
        self.tasks[task.id] = task
        self._daily[(model, day)] += 1
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{endpoint}:{digest}")  # no idempotency: equal bodies are separate tasks
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"id": task.id}, status_code=int(extra.get("create_status", 200)))

    def _new_task(self, model: str, spec: ModelSpec, prompt: str, request: Request, now: float) -> SimTask:
        d = directives(prompt)
        queue = float(d.get("queue") or self.config.queue_seconds)
        run = float(d.get("run") or self.config.run_seconds)
        throttle = 0.0
        if "throttled" in d:
            throttle = float(d["throttled"] or self.config.extra.get("throttle_seconds", 1.0))
        admit = now + throttle
        limit = self.config.extra.get("max_concurrent_generations")
        if limit:  # FIFO admission: take the slot that frees first
            slots = self._slots.setdefault(model, [])
            while len(slots) > int(limit):
                heapq.heappop(slots)
            if len(slots) >= int(limit):
                admit = max(admit, heapq.heappop(slots))
            heapq.heappush(slots, admit + queue + run)
        outcome, code = "succeed", None
        if "safety" in d:
            outcome, code = "fail", "SAFETY.INPUT.TEXT"
        elif "fail" in d:
            outcome, code = "fail", d["fail"] or "INTERNAL.BAD_OUTPUT.CODE01"
            if code.lower() in ("none", "null"):
                code = None
        key = bearer(request) or ""
        return SimTask(
            id=str(uuid.uuid4()),
            created_at=admit,  # leaves THROTTLED here; PENDING and RUNNING follow
            queue_seconds=queue,
            run_seconds=run,
            outcome=outcome,
            data={"submitted_at": now, "model": model, "failure_code": code,
                  "key_hash": hashlib.sha256(key.encode()).hexdigest()[:16]},
        )

    def validate(self, endpoint: str, body: dict[str, Any]) -> tuple[str, ModelSpec, int]:
        """Check a create body against the model's documented enums; returns (model, spec, duration)."""
        table = dict(IMAGE_TO_VIDEO if endpoint == "image_to_video" else TEXT_TO_VIDEO)
        if endpoint == "image_to_video" and self.config.extra.get("legacy_models"):
            table |= LEGACY_IMAGE_TO_VIDEO
        model = body.get("model")
        if model not in table:
            raise BadRequest("model", f"Invalid parameter 'model': expected one of "
                                      f"{_choices(table)}, received {json.dumps(model)}.")
        spec = table[model]

        ratio = body.get("ratio")
        if ratio not in spec.ratios:
            raise BadRequest("ratio", f"Invalid parameter 'ratio' for {model}: expected one of "
                                      f"{_choices(spec.ratios)}, received {json.dumps(ratio)}.")

        duration = body.get("duration")
        if duration is None:
            if spec.duration_required:
                raise BadRequest("duration", f"Invalid parameter 'duration': required for {model}.")
            duration = spec.default_duration
        elif isinstance(duration, bool) or not isinstance(duration, int) or duration not in spec.durations:
            raise BadRequest("duration", f"Invalid parameter 'duration' for {model}: expected one of "
                                         f"{_choices(spec.durations)}, received {json.dumps(duration)}.")

        text = body.get("promptText")
        if text is None:
            if spec.prompt_text_required:
                raise BadRequest("promptText", f"Invalid parameter 'promptText': required for {model}.")
        elif not isinstance(text, str) or not text.strip():
            raise BadRequest("promptText", "Invalid parameter 'promptText': expected a non-empty string.")
        elif len(text.encode("utf-16-le")) // 2 > 1000:
            raise BadRequest("promptText", "Invalid parameter 'promptText': must be at most 1000 characters.")

        if endpoint == "image_to_video":
            self._check_prompt_image(body.get("promptImage"), spec)

        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed <= UINT32_MAX):
            raise BadRequest("seed", f"Invalid parameter 'seed': expected an integer from 0 to {UINT32_MAX}.")
        moderation = body.get("contentModeration")
        threshold = moderation.get("publicFigureThreshold", "auto") if isinstance(moderation, dict) else None
        if moderation is not None and threshold not in ("auto", "low"):
            raise BadRequest("contentModeration", "Invalid parameter 'contentModeration."
                                                  "publicFigureThreshold': expected 'auto' or 'low'.")
        return model, spec, duration

    def _check_prompt_image(self, value: Any, spec: ModelSpec) -> None:
        if isinstance(value, str):
            self._check_uri("promptImage", value)
            return
        if not isinstance(value, list) or not value:
            raise BadRequest("promptImage", "Invalid parameter 'promptImage': expected a URI or a list of "
                                            "{uri, position} objects.")
        positions = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
                raise BadRequest(f"promptImage.{i}", f"Invalid parameter 'promptImage[{i}]': expected "
                                                     "{uri, position}.")
            pos = item.get("position", "first")
            allowed = ("first", "last") if spec.last_frame else ("first",)
            if pos not in allowed:
                message = f"Invalid parameter 'promptImage[{i}].position': expected {_choices(allowed)}."
                raise BadRequest(f"promptImage.{i}.position", message)
            self._check_uri(f"promptImage[{i}].uri", item["uri"])
            positions.append(pos)
        if len(set(positions)) != len(positions):
            raise BadRequest("promptImage", "Invalid parameter 'promptImage': each position may be used "
                                            "once.")

    def _check_uri(self, field: str, uri: str) -> None:
        if uri.startswith("data:"):
            match = DATA_URI.match(uri)
            if match is None:
                raise BadRequest(field, f"Invalid parameter '{field}': Invalid data URI or unsupported asset "
                                        "type (jpeg, png or webp).")
            if len(uri) > MAX_DATA_URI:
                raise BadRequest(field, f"Invalid parameter '{field}': data URI must be under 5MB.")
            return
        if uri.startswith("runway://"):
            return
        parts = urlsplit(uri)
        if not parts.scheme or not parts.hostname:
            raise BadRequest(field, f"Invalid parameter '{field}': Invalid URL.")
        if not self.config.extra.get("strict_asset_urls", True):
            return
        if parts.scheme != "https":
            raise BadRequest(field, f"Invalid parameter '{field}': Only HTTPS URLs are allowed.")
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return
        raise BadRequest(field, f"Invalid parameter '{field}': URLs must be hosted on a domain.")

    async def get_task(self, request: Request) -> Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None or (task.data.get("deleted")
                            and self.config.extra.get("deleted_task_get", "404") != "cancelled"):
            return JSONResponse({"error": "Task not found."}, status_code=404)
        return JSONResponse(self.task_object(task, self.origin(request)))

    async def delete_task(self, request: Request) -> Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        if (injected := await self.fault("delete")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None or task.data.get("deleted"):
            return JSONResponse({"error": "Task not found."}, status_code=404)
        now = time.time()
        if task.phase(now) in ("queued", "running"):
            task.canceled_at = now
        else:
            task.data["deleted"] = True
        return Response(status_code=204)

    async def organization(self, request: Request) -> Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        if (injected := await self.fault("organization")) is not None:
            return injected
        extra = self.config.extra
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        models = sorted(set(IMAGE_TO_VIDEO) | set(TEXT_TO_VIDEO))
        concurrent = extra.get("max_concurrent_generations") or 1000
        daily = extra.get("max_daily_generations") or 1_000_000
        balance = float(extra.get("credit_balance", 1e9))
        return JSONResponse({
            "creditBalance": int(balance - self.credits_used),
            "tier": {
                "maxMonthlyCreditSpend": int(balance),
                "models": {m: {"maxConcurrentGenerations": int(concurrent), "maxDailyGenerations": int(daily)}
                           for m in models},
            },
            "usage": {"models": {m: {"dailyGenerations": self._daily[(m, day)]} for m in models}},
        })


def _asset_id(task_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "runway:" + task_id))


def _choices(values: Any) -> str:
    return " | ".join(json.dumps(v) for v in values)
