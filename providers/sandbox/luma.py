"""Luma Dream Machine API simulator (Ray video and Photon image generations).

Written from Luma's documented wire format (shared/providers/video-wave2.md §1; the image
route's fields from the LUMA-SDK types it cites), not from an adapter.

Routes, below the API's base path ``/dream-machine/v1`` (``Authorization: Bearer <key>``):

- ``POST /generations`` (older path; ``generation_type`` "video", the default) and
  ``POST /generations/video`` (the SDK's path): create a video; **201** with the generation in
  ``queued``, the create body echoed as ``request`` (``callback_url`` included).
- ``POST /generations/image``: create a Photon image (``photon-1``, ``photon-flash-1``).
- ``GET /generations/{id}``; ``GET /generations?limit=&offset=`` ->
  ``{generations, count, has_more, limit, offset}``, newest first.
- ``DELETE /generations/{id}``: 204, then GET answers 404 (there is no cancel; deleting a
  queued or dreaming generation just removes it and stops its callbacks).
- ``GET /credits``: ``{"credit_balance": <cents>}``; completed generations are charged,
  failed ones are not.
- ``GET /dream_machine/{folder}/{name}``: ``storage.cdn-luma.com``-style assets: plain,
  unsigned paths fixed per generation, 404 once ``output_ttl_seconds`` after completion have
  passed (Luma documents no expiry: UNCONFIRMED, so it is the config's TTL).

States ``queued -> dreaming -> completed | failed`` (``failure_reason``). Moderation is
asynchronous: the create succeeds and the generation later fails. Keyframes ``frame0``/``frame1``
are ``{"type": "image", "url"}`` or ``{"type": "generation", "id"}`` (extend: frame0; reverse
extend: frame1; interpolate: both); a generation keyframe must name a completed video
generation of this account, else 400.

Errors (body shape UNCONFIRMED; FastAPI style): 400 ``{"detail": "<text>"}`` for the documented
request checks (prompt required / 3-5000 characters, loop with an end frame or with extend,
reverse extend or interpolation, "No keyframes provided", "Unknown request type", invalid image
URL, unusable generation keyframe, low balance); 422 ``{"detail": [{loc, msg, type}]}`` for
schema errors (model, aspect_ratio, duration, resolution and field types); 401 bad key; 404
unknown generation or route; 429 over the concurrency or per-minute create limits.

Callbacks: the full generation object is POSTed (unsigned) to ``callback_url`` when it becomes
``dreaming``, ``completed`` or ``failed``; a delivery that does not answer 200 is retried up to 3
times, 100 ms apart, with a 5 s timeout. Luma warns a state may be sent more than once:
``[sim:callback=duplicate]`` or ``extra["callback_duplicates"]`` sends each state twice.

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]`` timings; ``[sim:fail]`` (generic failure,
``[sim:fail=<reason>]`` for a given ``failure_reason``); ``[sim:moderation]`` ("Frame moderation
failed"); ``[sim:blacklisted]`` ("Contains blacklisted words", also for any word of
``extra["blacklisted_words"]``); ``[sim:no_video]`` (completed without ``assets.video``, a
defensive case the reference asks adapters to handle).

``SimConfig.extra`` knobs: ``concurrency`` ({"video": 10, "image": 40} active generations; a
kind left out is unlimited), ``creates_per_minute`` ({"video": 20, "image": 80}),
``retry_after`` (None: 429 without the header, UNCONFIRMED), ``credit_balance`` (1e9 cents),
``prices`` ({"video": 100, "image": 2} cents), ``low_balance_status`` (400; 402 is possible,
UNCONFIRMED), ``resolutions`` ({model: [...]} override; the model matrix is UNCONFIRMED),
``list_order`` ("newest" | "oldest", UNCONFIRMED), ``delete_removes_assets`` (True,
UNCONFIRMED), ``blacklisted_words`` ([]), ``callback_duplicates`` (False),
``callback_retries`` (3), ``callback_retry_delay`` (0.1), ``callback_timeout`` (5.0).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, bearer, directives, route_path

BASE = "/dream-machine/v1"
VIDEO_MODELS = ("ray-2", "ray-flash-2", "ray-1-6")
IMAGE_MODELS = ("photon-1", "photon-flash-1")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
DURATIONS = ("5s", "9s")
RESOLUTIONS = ("540p", "720p", "1080p", "4k")
IMAGE_FORMATS = ("jpg", "png")
FRAMES = ("frame0", "frame1")
GENERIC_FAILURE = "Job failed: internal error"
MODERATION_FAILURE = "Frame moderation failed"
BLACKLIST_FAILURE = "Contains blacklisted words"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Invalid(Exception):
    """A request the API refuses: 400 with a text ``detail``, or 422 with a FastAPI-style list."""

    def __init__(self, message: str, field: str | None = None, kind: str = "value_error") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.kind = kind

    def response(self) -> Response:
        if self.field is None:
            return JSONResponse({"detail": self.message}, status_code=400)
        item = {"loc": ["body", *self.field.split(".")], "msg": self.message, "type": self.kind}
        return JSONResponse({"detail": [item]}, status_code=422)


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


class LumaSimulator(Simulator):
    name = "luma"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.callback_log: list[dict[str, Any]] = []
        self.deleted_spend = 0.0  # what deleted, completed generations were charged
        self._creates: dict[str, deque[float]] = {"video": deque(), "image": deque()}
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.app.add_exception_handler(HTTPException, self._http_exception)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        text = {401: "Invalid API key", 404: "Not Found", 429: "Rate limit exceeded. Please try again later.",
                500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                504: "Gateway Timeout"}.get(status, message)
        return JSONResponse({"detail": text}, status_code=status, headers=headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        text = "Method Not Allowed" if exc.status_code == 405 else "Not Found"
        return JSONResponse({"detail": text}, status_code=exc.status_code)

    def state(self, task: SimTask, now: float | None = None) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "queued"
        if phase == "running":
            return "dreaming"
        return "failed" if task.outcome == "fail" else "completed"

    def generation(self, task: SimTask, origin: str, now: float | None = None) -> dict[str, Any]:
        """The generation object (create, get, list items and callbacks all use it)."""
        state = self.state(task, now)
        body: dict[str, Any] = {
            "id": task.id,
            "generation_type": task.data["kind"],
            "state": state,
            "failure_reason": task.data["failure_reason"] if state == "failed" else None,
            "created_at": _iso(task.created_at),
            "assets": None,
            "model": task.data["model"],
            "request": task.input,
        }
        if state == "completed":
            body["assets"] = self._assets(task, origin)
        return body

    def _assets(self, task: SimTask, origin: str) -> dict[str, str | None]:
        paths: dict[str, str] | None = task.data.get("asset_paths")
        if paths is None:
            folder, stem = uuid.uuid4(), uuid.uuid5(uuid.NAMESPACE_URL, "luma:" + task.id)
            expires = task.finished_at + self.config.output_ttl_seconds
            paths = {"image": f"/dream_machine/{folder}/{stem}_thumb.png"}
            self.files.files[paths["image"]] = StoredFile(media.png(f"luma:{task.id}"), "image/png", expires)
            if task.data["kind"] == "video" and task.outcome != "no_video":
                paths["video"] = f"/dream_machine/{folder}/{stem}_result.mp4"
                self.files.files[paths["video"]] = StoredFile(media.mp4(f"luma:{task.id}"), "video/mp4", expires)
            task.data["asset_paths"] = paths
        return {"video": origin + paths["video"] if "video" in paths else None,
                "image": origin + paths["image"], "progress_video": None}

    # -- routes ----------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route(f"{BASE}/generations", self.create_legacy, methods=["POST"]),
            Route(f"{BASE}/generations", self.list_generations, methods=["GET"]),
            Route(f"{BASE}/generations/video", self.create_video, methods=["POST"]),
            Route(f"{BASE}/generations/image", self.create_image, methods=["POST"]),
            Route(f"{BASE}/generations/{{id}}", self.get_generation, methods=["GET"]),
            Route(f"{BASE}/generations/{{id}}", self.delete_generation, methods=["DELETE"]),
            Route(f"{BASE}/credits", self.credits, methods=["GET"]),
            Route("/dream_machine/{folder}/{name}", self.asset, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        key = bearer(request)
        if key is None:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        if not self.config.key_ok(key):
            return self.error_response(401, "Invalid API key")
        return None

    async def create_legacy(self, request: Request) -> Response:
        return await self._create(request, "video", legacy=True)

    async def create_video(self, request: Request) -> Response:
        return await self._create(request, "video", legacy=False)

    async def create_image(self, request: Request) -> Response:
        return await self._create(request, "image", legacy=False)

    async def _create(self, request: Request, kind: str, legacy: bool) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return Invalid("JSON decode error", "body", "json_invalid").response()
        if not isinstance(body, dict):
            return Invalid("Input should be a valid dictionary", "body", "dict_type").response()
        try:
            if kind == "video":
                self._validate_video(body, legacy)
            else:
                self._validate_image(body)
        except Invalid as err:
            return err.response()
        now = time.time()
        if (limited := self._rate_limited(kind, now)) is not None:
            return limited
        price = float(self._x("prices", {"video": 100, "image": 2})[kind])
        charged, reserved = self._credit_use(now)
        if float(self._x("credit_balance", 1e9)) - charged - reserved < price:
            return JSONResponse({"detail": "Insufficient credits to create this generation"},
                                status_code=int(self._x("low_balance_status", 400)))

        task = self._new_task(body, kind, price, now)
        self.tasks[task.id] = task
        self._creates[kind].append(now)
        self.record_creation(kind + ":" + json.dumps(body, sort_keys=True))  # no idempotency key exists
        if isinstance(body.get("callback_url"), str):
            self._spawn(self._send_callbacks(task, body["callback_url"], self.origin(request)))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse(self.generation(task, self.origin(request), now), status_code=201)

    def _new_task(self, body: dict[str, Any], kind: str, price: float, now: float) -> SimTask:
        prompt = str(body.get("prompt") or "")
        d = directives(prompt)
        outcome, reason = "succeed", None
        words = {w.lower() for w in self._x("blacklisted_words", [])}
        if "blacklisted" in d or words & set(prompt.lower().split()):
            outcome, reason = "fail", BLACKLIST_FAILURE
        elif "moderation" in d:
            outcome, reason = "fail", MODERATION_FAILURE
        elif "fail" in d:
            outcome, reason = "fail", d["fail"] or GENERIC_FAILURE
        elif "no_video" in d:
            outcome = "no_video"
        duplicate = d.get("callback") == "duplicate" or bool(self._x("callback_duplicates", False))
        return SimTask(
            id=str(uuid.uuid4()),
            created_at=now,
            queue_seconds=float(d.get("queue") or self.config.queue_seconds),
            run_seconds=float(d.get("run") or self.config.run_seconds),
            outcome=outcome,
            input=body,
            data={"kind": kind, "model": body["model"], "failure_reason": reason, "price": price,
                  "duplicate_callbacks": duplicate},
        )

    # -- validation --------------------------------------------------------------
    def _validate_video(self, body: dict[str, Any], legacy: bool) -> None:
        gen_type = body.get("generation_type", "video")
        if gen_type != "video":
            if legacy:
                raise Invalid("Unknown request type")
            raise Invalid("Input should be 'video'", "generation_type", "literal_error")
        model = _enum(body, "model", VIDEO_MODELS, required=True)
        _enum(body, "aspect_ratio", ASPECT_RATIOS)
        _enum(body, "duration", DURATIONS)
        resolutions = self._x("resolutions", {}).get(model, RESOLUTIONS)
        _enum(body, "resolution", tuple(resolutions))
        loop = body.get("loop", False)
        if not isinstance(loop, bool):
            raise Invalid("Input should be a valid boolean", "loop", "bool_type")
        _concepts(body.get("concepts"))
        _callback(body.get("callback_url"))
        frames = self._keyframes(body.get("keyframes"))
        _prompt(body.get("prompt"), required=not frames)
        if loop:
            kinds = {name: kf["type"] for name, kf in frames.items()}
            if kinds.get("frame0") == "generation" and kinds.get("frame1") == "generation":
                raise Invalid("Loop is not supported for interpolation")
            if kinds.get("frame1") == "generation":
                raise Invalid("Loop is not supported for extend-reverse")
            if kinds.get("frame0") == "generation":
                raise Invalid("Loop is not supported for extend")
            if "frame1" in kinds:
                raise Invalid("Loop is not supported with an end frame")

    def _keyframes(self, value: Any) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, dict) or set(value) - set(FRAMES):
            raise Invalid("Input should be an object with frame0 and/or frame1", "keyframes", "model_type")
        frames = {name: kf for name, kf in value.items() if kf is not None}
        if not frames:
            raise Invalid("No keyframes provided")
        for name, kf in frames.items():
            field = f"keyframes.{name}"
            if not isinstance(kf, dict) or kf.get("type") not in ("image", "generation"):
                raise Invalid("Input tag should be 'image' or 'generation'", field, "union_tag_invalid")
            if kf["type"] == "image":
                if not isinstance(kf.get("url"), str):
                    raise Invalid("Field required", field + ".url", "missing")
                if not _http_url(kf["url"]):
                    raise Invalid(f"Invalid or unreachable image URL: {kf['url']}")
                continue
            ref = kf.get("id")
            if not isinstance(ref, str):
                raise Invalid("Field required", field + ".id", "missing")
            source = self.tasks.get(ref)
            if source is None:
                raise Invalid(f"Generation {ref} not found")
            if source.data["kind"] != "video" or self.state(source) != "completed":
                raise Invalid(f"Generation {ref} is not a completed video generation")
        return frames

    def _validate_image(self, body: dict[str, Any]) -> None:
        if body.get("generation_type", "image") != "image":
            raise Invalid("Input should be 'image'", "generation_type", "literal_error")
        _enum(body, "model", IMAGE_MODELS, required=True)
        _enum(body, "aspect_ratio", ASPECT_RATIOS)
        _enum(body, "format", IMAGE_FORMATS)
        _callback(body.get("callback_url"))
        refs: list[tuple[str, Any]] = []
        for key in ("image_ref", "style_ref"):
            items = body.get(key, [])
            if not isinstance(items, list):
                raise Invalid("Input should be a valid list", key, "list_type")
            refs += [(f"{key}.{i}.url", item.get("url") if isinstance(item, dict) else None)
                     for i, item in enumerate(items)]
        modify = body.get("modify_image_ref")
        if modify is not None:
            refs.append(("modify_image_ref.url", modify.get("url") if isinstance(modify, dict) else None))
        character = body.get("character_ref")
        identity = character.get("identity0") if isinstance(character, dict) else None
        images = identity.get("images") if isinstance(identity, dict) else None
        refs += [(f"character_ref.identity0.images.{i}", url) for i, url in enumerate(images or [])]
        for field, url in refs:
            if not isinstance(url, str):
                raise Invalid("Input should be a valid string", field, "string_type")
            if not _http_url(url):
                raise Invalid(f"Invalid or unreachable image URL: {url}")
        _prompt(body.get("prompt"), required=True)

    # -- limits and credits ------------------------------------------------------
    def _rate_limited(self, kind: str, now: float) -> Response | None:
        limit = self._x("concurrency", {"video": 10, "image": 40}).get(kind)
        active = sum(1 for t in self.tasks.values() if t.data["kind"] == kind and t.phase(now) != "done")
        per_minute = self._x("creates_per_minute", {"video": 20, "image": 80}).get(kind)
        recent = self._creates[kind]
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if limit is not None and active >= int(limit):
            message = f"Too many concurrent {kind} generations: the limit is {int(limit)}"
        elif per_minute is not None and len(recent) >= int(per_minute):
            message = f"Too many {kind} generation requests: the limit is {int(per_minute)} per minute"
        else:
            return None
        retry = self._x("retry_after", None)
        headers = {"Retry-After": str(int(retry))} if retry is not None else None
        return JSONResponse({"detail": message}, status_code=429, headers=headers)

    def _credit_use(self, now: float) -> tuple[float, float]:
        """(charged, reserved): completed generations are charged, failed ones are not, and active
        ones hold their price until they finish."""
        charged, reserved = self.deleted_spend, 0.0
        for task in self.tasks.values():
            if task.phase(now) != "done":
                reserved += task.data["price"]
            elif task.outcome != "fail":
                charged += task.data["price"]
        return charged, reserved

    # -- read routes ---------------------------------------------------------------
    async def get_generation(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return JSONResponse({"detail": "Generation not found"}, status_code=404)
        return JSONResponse(self.generation(task, self.origin(request)))

    async def list_generations(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        try:
            limit = int(request.query_params.get("limit", "10"))
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return Invalid("Input should be a valid integer", "limit", "int_parsing").response()
        if not 1 <= limit <= 100 or offset < 0:
            return Invalid("limit must be 1-100 and offset >= 0", "limit", "value_error").response()
        tasks = sorted(self.tasks.values(), key=lambda t: t.created_at,
                       reverse=self._x("list_order", "newest") == "newest")
        page = tasks[offset:offset + limit]
        origin = self.origin(request)
        return JSONResponse({"generations": [self.generation(t, origin) for t in page], "count": len(page),
                             "has_more": offset + len(page) < len(tasks), "limit": limit, "offset": offset})

    async def delete_generation(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("delete")) is not None:
            return injected
        task = self.tasks.pop(request.path_params["id"], None)
        if task is None:
            return JSONResponse({"detail": "Generation not found"}, status_code=404)
        if task.phase() == "done" and task.outcome != "fail":
            self.deleted_spend += task.data["price"]
        if self._x("delete_removes_assets", True):
            for path in (task.data.get("asset_paths") or {}).values():
                self.files.files.pop(path, None)
        return Response(status_code=204)

    async def credits(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("credits")) is not None:
            return injected
        charged, _ = self._credit_use(time.time())
        return JSONResponse({"credit_balance": float(self._x("credit_balance", 1e9)) - charged})

    async def asset(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        stored = self.files.get(route_path(request))
        if stored is None:
            return self.expired_file_response()
        return Response(stored.data, media_type=stored.content_type)

    # -- callbacks -------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _send_callbacks(self, task: SimTask, url: str, origin: str) -> None:
        copies = 2 if task.data["duplicate_callbacks"] else 1
        timeout = float(self._x("callback_timeout", 5.0))
        async with self.callback_client(timeout) as client:
            for at in (task.started_at, task.finished_at):
                await asyncio.sleep(max(0.0, at - time.time()))
                if self.tasks.get(task.id) is not task:  # deleted: nothing more is sent
                    return
                body = json.dumps(self.generation(task, origin, now=at + 1e-6)).encode()
                for _ in range(copies):
                    await self._deliver(client, url, task.id, body)

    async def _deliver(self, client: httpx.AsyncClient, url: str, task_id: str, body: bytes) -> None:
        """One delivery: retried up to ``callback_retries`` times while the answer is not 200."""
        retries, delay = int(self._x("callback_retries", 3)), float(self._x("callback_retry_delay", 0.1))
        state = json.loads(body)["state"]
        for attempt in range(retries + 1):
            entry: dict[str, Any] = {"id": task_id, "state": state, "attempt": attempt + 1, "url": url}
            try:
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                entry["status_code"] = resp.status_code
            except httpx.HTTPError as exc:
                entry["error"] = type(exc).__name__
            self.callback_log.append(entry)
            if entry.get("status_code") == 200:
                return
            if attempt < retries:
                await asyncio.sleep(delay)


def _enum(body: dict[str, Any], field: str, allowed: tuple[str, ...], required: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise Invalid("Field required", field, "missing")
        return None
    if value not in allowed:
        raise Invalid("Input should be " + ", ".join(f"'{a}'" for a in allowed), field, "enum")
    return str(value)


def _prompt(value: Any, required: bool) -> None:
    if value is None or value == "":
        if required:
            raise Invalid("Prompt is required")
        return
    if not isinstance(value, str):
        raise Invalid("Input should be a valid string", "prompt", "string_type")
    if len(value) < 3:
        raise Invalid("Prompt is too short: it must be at least 3 characters")
    if len(value) > 5000:
        raise Invalid("Prompt is too long: it must be at most 5000 characters")


def _concepts(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(c, dict) and isinstance(c.get("key"), str) for c in value):
        raise Invalid("Input should be a list of {key} objects", "concepts", "list_type")


def _callback(value: Any) -> None:
    if value is not None and not _http_url(value):
        raise Invalid("Input should be a valid URL", "callback_url", "url_parsing")
