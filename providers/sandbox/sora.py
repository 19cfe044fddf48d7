"""OpenAI Sora (Videos API) simulator.

Written from OpenAI's documented wire format (shared/providers/video-sora-veo-kling-runway.md
§1), not from our adapter. The Atelier base URL is the simulator's origin, so the
routes carry OpenAI's ``/v1`` prefix:

- ``POST /v1/videos`` (``multipart/form-data`` as the SDK sends it, or JSON): create;
  answers **200** with a ``Video`` object (``status: queued``).
- ``GET /v1/videos/{id}``: retrieve. ``GET /v1/videos?after=&limit=&order=``: list page
  ``{"object":"list","data","first_id","last_id","has_more"}`` (newest first by default;
  useful to reconcile an ambiguous create). ``DELETE /v1/videos/{id}``: only completed or
  failed videos (``{"id","deleted":true,"object":"video.deleted"}``).
- ``GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet``: MP4 / WebP / JPEG
  bytes; **404** until the video is ``completed``; 404 again once its assets expired.
- ``POST /v1/videos/{id}/remix`` (``{"prompt"}``, JSON as the SDK sends it, or multipart): a
  new video with the source's model, size and seconds and ``remixed_from_video_id``; only a
  ``completed`` source (otherwise 400 ``invalid_value`` on ``video_id``; the exact body is not
  in the reference), unknown or deleted sources 404.
- ``POST /v1/videos/edits`` and ``POST /v1/videos/extensions`` (``{"prompt", "video": {"id"}}``
  [+ ``seconds``]).

Statuses ``queued -> in_progress`` (``progress`` rising 0..99) ``-> completed`` (100,
``completed_at``, ``expires_at`` = completion + ``output_ttl_seconds``, 1 h by default)
or ``failed`` (``error: {code, message}``, progress 0). There is no cancel. While a video
is not terminal, ``completed_at``/``expires_at``/``error`` are *absent* (as in the guide's
examples); terminal videos carry them (null where unset).

Validation as OpenAI answers it (400 ``invalid_request_error`` with ``param`` and ``code``):
missing ``prompt``; ``seconds`` must be one of the strings ``"4"``, ``"8"``, ``"12"`` (an
integer is an ``invalid_type``); ``size`` per model (``sora-2``: 720x1280/1280x720;
``sora-2-pro`` adds 1024x1792/1792x1024); unknown ``model``; an ``input_reference`` image
whose dimensions differ from ``size``. Errors use ``{"error": {message, type, param,
code}}``; 401 for a missing/wrong key; 429 ``rate_limit_exceeded`` (``retry-after`` and
``retry-after-ms`` when the fault has a delay); 500/503 JSON; 502/504 Cloudflare HTML.
Every response carries ``x-request-id``; non-terminal videos carry ``openai-poll-after-ms``.

Project webhooks (the dashboard setting, here ``extra["webhook_url"]``): ``video.completed``
and ``video.failed`` events ``{"id":"evt_…","object":"event","created_at","type","data":{"id"}}``
signed per Standard Webhooks with ``extra["webhook_secret"]`` (default: generated,
``sim.webhook_secret``), retried on non-2xx.

Prompt directives: ``[sim:fail]`` / ``[sim:fail=<code>]`` (failed, ``error.code``
``internal_error`` or ``<code>``), ``[sim:moderation]`` (failed with
``moderation_blocked``), ``[sim:blocked]`` (the create itself answers 400
``moderation_blocked``), ``[sim:queue=S]``, ``[sim:run=S]``.

``SimConfig.extra`` knobs: ``sora_extended`` (accept the guide's ``"16"``/``"20"`` seconds and
1080p sizes on pro; default False), ``sora_models`` (model -> sizes), ``sora_poll_after_ms``
(int or None; default 1000), ``sora_expired_status`` (default 404), ``sora_delete_active``
(``"reject"`` default, or ``"allow"``), ``sora_429_kind`` (``"rate_limit"`` or
``"insufficient_quota"``), ``sora_unverified_keys`` (keys answered 403 organization
verification), ``sora_always_include_nulls`` (emit null ``completed_at``/``expires_at``/``error``
also while not terminal), ``webhook_url``, ``webhook_secret``, ``webhook_events`` (default both),
``webhook_retry_delays`` (seconds list), ``webhook_duplicates`` (extra copies of each delivery,
same ``webhook-id``).

Also home of small helpers the Veo simulator reuses (``DueTimers``, ``Background``,
``LastFaultPlan``, ``CutoffFileStore``, ``standard_webhook_signature``).

Fault route names: ``create``, ``get``, ``list``, ``delete``, ``content``, ``remix``,
``edit``, ``extend``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from email import policy
from email.parser import BytesParser
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import (
    Fault,
    FaultPlan,
    FileStore,
    SimConfig,
    SimTask,
    Simulator,
    bearer,
    directives,
)

log = logging.getLogger(__name__)

SORA_2_SIZES = ("720x1280", "1280x720")
SORA_PRO_SIZES = (*SORA_2_SIZES, "1024x1792", "1792x1024")
HD_SIZES = ("1920x1080", "1080x1920")
SECONDS = ("4", "8", "12")
EXTENDED_SECONDS = ("16", "20")
MODELS: dict[str, tuple[str, ...]] = {
    "sora-2": SORA_2_SIZES,
    "sora-2-2025-10-06": SORA_2_SIZES,
    "sora-2-2025-12-08": SORA_2_SIZES,
    "sora-2-pro": SORA_PRO_SIZES,
    "sora-2-pro-2025-10-06": SORA_PRO_SIZES,
}
WEBHOOK_USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"

Files = dict[str, tuple[str, str, bytes]]
"""Uploaded multipart files by field name: (filename, content type, bytes)."""

MSG_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (HTTP Basic Auth, i.e. "
    "-u YOUR_KEY:). You can obtain an API key from https://platform.openai.com/account/api-keys."
)
MSG_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you "
    "have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)
MSG_QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
MSG_RATE = (
    "Rate limit reached for videos in organization org-simulated on requests per min (RPM): Limit 2, Used 2, "
    "Requested 1. Please try again in 30s. Visit https://platform.openai.com/account/rate-limits to learn "
    "more."
)
MSG_500 = "The server had an error while processing your request. Sorry about that!"

_CLOUDFLARE_HTML = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)


# -- small media the shared media module does not have ----------------------

_WEBP_1X1 = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def webp(seed: str) -> bytes:
    """A 1x1 lossless WebP (extended format) whose XMP chunk names ``seed``."""
    vp8l = _WEBP_1X1[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x14, 0, 0, 0]) + bytes(6)  # alpha + XMP, 1x1 canvas
    safe = seed.replace("--", "-")[:200]
    xmp_data = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><!-- {safe} --></x:xmpmeta>'.encode()
    xmp = b"XMP " + struct.pack("<I", len(xmp_data)) + xmp_data + (b"\x00" if len(xmp_data) % 2 else b"")
    body = b"WEBP" + vp8x + vp8l + xmp
    return b"RIFF" + struct.pack("<I", len(body)) + body


_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)  # the standard luminance DC table


def _dc_codes() -> dict[int, tuple[int, int]]:
    codes: dict[int, tuple[int, int]] = {}
    code, symbol = 0, 0
    for length, count in enumerate(_DC_BITS, start=1):
        for _ in range(count):
            codes[symbol] = (code, length)
            code += 1
            symbol += 1
        code <<= 1
    return codes


def jpeg(seed: str, width: int = 64, height: int = 32) -> bytes:
    """A baseline greyscale JPEG of one grey level derived from ``seed`` (a COM segment names it)."""
    level = 40 + hashlib.sha256(seed.encode()).digest()[0] * 175 // 255
    dc = 8 * (level - 128)  # DC coefficient of a flat 8x8 block, quantiser 1
    codes = _dc_codes()
    acc, nbits, out, prev = 0, 0, bytearray(), 0
    for _ in range(((width + 7) // 8) * ((height + 7) // 8)):
        diff, prev = dc - prev, dc
        size = abs(diff).bit_length()
        fields = [codes[size]]
        if size:
            fields.append(((diff if diff > 0 else diff - 1 + (1 << size)) & ((1 << size) - 1), size))
        fields.append((0, 1))  # end of block: the only symbol of our one-entry AC table, code "0"
        for value, length in fields:
            acc, nbits = (acc << length) | value, nbits + length
            while nbits >= 8:
                nbits -= 8
                out.append((acc >> nbits) & 0xFF)
                if out[-1] == 0xFF:
                    out.append(0)
                acc &= (1 << nbits) - 1
    if nbits:
        out.append(((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF)
        if out[-1] == 0xFF:
            out.append(0)

    def seg(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload

    return (
        b"\xff\xd8"
        + seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + seg(0xFE, seed.encode()[:200])
        + seg(0xDB, b"\x00" + b"\x01" * 64)
        + seg(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + seg(0xC4, b"\x00" + bytes(_DC_BITS) + bytes(range(12)))
        + seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
        + seg(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + bytes(out)
        + b"\xff\xd9"
    )


VARIANTS: dict[str, tuple[str, Callable[[str], bytes]]] = {
    "video": ("video/mp4", media.mp4),
    "thumbnail": ("image/webp", webp),
    "spritesheet": ("image/jpeg", jpeg),
}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG or JPEG, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            length = struct.unpack(">H", data[i + 2 : i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return int(w), int(h)
            i += 2 + length
    return None


# -- machinery shared with the Veo simulator --------------------------------


class LastFaultPlan(FaultPlan):
    """A FaultPlan that remembers the fault it handed out last (for provider-specific headers)."""

    last: Fault | None = None

    def take(self, route: str, after_effect: bool = False) -> Fault | None:
        self.last = super().take(route, after_effect)
        return self.last


class CutoffFileStore(FileStore):
    """A FileStore whose ``expire_all`` also expires outputs that are generated on demand."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.cutoff = 0.0

    def expire_all(self) -> None:
        super().expire_all()
        self.cutoff = time.time()


class DueTimers:
    """Calls ``on_due(key)`` at wall-clock times, from one background task.

    A heap entry per pending key, no coroutine per task: cheap with 100,000 tasks.
    """

    def __init__(self, on_due: Callable[[str], None]) -> None:
        self._on_due = on_due
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None

    def schedule(self, due: float, key: str) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), key))
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        elif self._heap[0][2] == key and self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                key = heapq.heappop(self._heap)[2]
                try:
                    self._on_due(key)
                except Exception:  # a broken handler must not stop later timers
                    log.exception("timer handler failed for %s", key)
            self._wake.clear()
            timeout = self._heap[0][0] - time.time() if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def aclose(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner


def standard_webhook_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` with a ``whsec_`` (base64) secret."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Background:
    """Fire-and-forget coroutines (webhook deliveries) that are cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10)
        return self._client

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# -- OpenAI-specific helpers ------------------------------------------------


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _quoted_list(values: tuple[str, ...] | list[str], conj: str) -> str:
    items = [f"'{v}'" for v in values]
    if len(items) <= 2:
        return f" {conj} ".join(items)
    return ", ".join(items[:-1]) + f", {conj} " + items[-1]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _enum(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected one of {_quoted_list(allowed, 'or')}, "
            f"but got {_json_type(value)} instead.", name, "invalid_type")
    if value not in allowed:
        raise InvalidRequest(
            f"Invalid value: '{value}'. Supported values are: {_quoted_list(allowed, 'and')}.",
            name, "invalid_value")
    return value


def _string(name: str, value: Any, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{name}': expected a string, but got {_json_type(value)} "
                             "instead.", name, "invalid_type")
    return value


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], Files]:
    """Fields and files (filename, content type, bytes) of a ``multipart/form-data`` body."""
    head = b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("not multipart")
    fields: dict[str, str] = {}
    files: Files = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, part.get_content_type(), data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files


class SoraSimulator(Simulator):
    name = "sora"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.faults: LastFaultPlan = LastFaultPlan()
        self.files: CutoffFileStore = CutoffFileStore(self.config)
        self.tasks: dict[str, SimTask] = {}
        self._order: list[str] = []  # creation order, ids of deleted videos included (cursors stay valid)
        self._position: dict[str, int] = {}
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.webhook_attempts: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.timers = DueTimers(self._on_finished)
        self.background = Background()
        self.app.router.lifespan_context = self._lifespan

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.timers.aclose()
        await self.background.aclose()

    def extra(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"x-request-id": "req_" + secrets.token_hex(16), "openai-processing-ms": "42",
                "openai-version": "2020-10-01", **(extra or {})}

    def oai_error(self, status: int, message: str, type_: str = "invalid_request_error",
                  param: str | None = None, code: str | None = None,
                  headers: dict[str, str] | None = None) -> Response:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=self._headers(headers))

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status in (502, 504):
            reason = "Bad Gateway" if status == 502 else "Gateway Time-out"
            html = _CLOUDFLARE_HTML.format(status=status, reason=reason)
            return Response(html, status_code=status, media_type="text/html", headers=self._headers(headers))
        if status == 429:
            if self.extra("sora_429_kind", "rate_limit") == "insufficient_quota":
                return self.oai_error(429, MSG_QUOTA, "insufficient_quota", None, "insufficient_quota",
                                      headers)
            return self.oai_error(429, MSG_RATE, "requests", None, "rate_limit_exceeded", headers)
        if status == 500:
            return self.oai_error(500, MSG_500, "server_error", headers=headers)
        if status == 503:
            return self.oai_error(503, "The server is overloaded or not ready yet.", "server_error",
                                  headers=headers)
        return self.oai_error(status, message, headers=headers)

    async def fault(self, route: str, *, after_effect: bool = False) -> Response | None:
        response = await super().fault(route, after_effect=after_effect)
        fault = self.faults.last
        if response is not None and fault is not None and fault.retry_after is not None:
            response.headers["retry-after-ms"] = str(int(fault.retry_after * 1000))
        return response

    def _ok(self, body: Any, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse(body, headers=self._headers(headers))

    def _status(self, task: SimTask, now: float) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "queued"
        if phase == "running":
            return "in_progress"
        return "completed" if task.outcome not in ("fail", "moderation") else "failed"

    def expired(self, task: SimTask, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return task.finished_at <= now and (
            now >= task.finished_at + self.config.output_ttl_seconds or task.finished_at <= self.files.cutoff)

    def video(self, task: SimTask, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        status = self._status(task, now)
        body: dict[str, Any] = {
            "id": task.id,
            "object": "video",
            "created_at": int(task.created_at),
            "status": status,
            "model": task.input["model"],
            "progress": {"completed": 100, "failed": 0, "queued": 0}.get(status, task.progress(now)),
            "seconds": task.input["seconds"],
            "size": task.input["size"],
            "prompt": task.input["prompt"],
        }
        terminal = status in ("completed", "failed")
        nulls = terminal or bool(self.extra("sora_always_include_nulls", False))
        if nulls:
            body["completed_at"] = int(task.finished_at) if terminal else None
            body["expires_at"] = (int(task.finished_at + self.config.output_ttl_seconds)
                                  if status == "completed" else None)
            body["error"] = None
        if status == "failed":
            body["error"] = self._failure(task)
        remixed = task.data.get("remixed_from")
        if remixed is not None or nulls:
            body["remixed_from_video_id"] = remixed
        return body

    def _failure(self, task: SimTask) -> dict[str, str]:
        if task.outcome == "moderation":
            return {"code": "moderation_blocked",
                    "message": "Your request was blocked by our moderation system."}
        code = task.data.get("error_code") or "internal_error"
        return {"code": code, "message": "Video generation failed. Please try again."}

    def _poll_headers(self, task: SimTask) -> dict[str, str]:
        after = self.extra("sora_poll_after_ms", 1000)
        if after is None or self._status(task, time.time()) in ("completed", "failed"):
            return {}
        return {"openai-poll-after-ms": str(int(after))}

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/videos", self.create_video, methods=["POST"]),
            Route("/v1/videos", self.list_videos, methods=["GET"]),
            Route("/v1/videos/edits", self.edit_video, methods=["POST"]),
            Route("/v1/videos/extensions", self.extend_video, methods=["POST"]),
            Route("/v1/videos/{id}", self.get_video, methods=["GET"]),
            Route("/v1/videos/{id}", self.delete_video, methods=["DELETE"]),
            Route("/v1/videos/{id}/content", self.get_content, methods=["GET"]),
            Route("/v1/videos/{id}/remix", self.remix_video, methods=["POST"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        key = bearer(request)
        if key is None:
            return self.oai_error(401, MSG_NO_KEY)
        if not self.config.key_ok(key):
            shown = key[:3] + "*" * 8 + key[-4:] if len(key) > 8 else key
            return self.oai_error(
                401, f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        return None

    def _verified(self, request: Request, model: str) -> Response | None:
        if bearer(request) in self.extra("sora_unverified_keys", []):
            return self.oai_error(
                403, f"Your organization must be verified to use the model `{model}`. Please go to: "
                "https://platform.openai.com/settings/organization/general and click on Verify Organization. "
                "If you just verified, it can take up to 15 minutes for access to propagate.")
        return None

    async def _read_body(self, request: Request) -> tuple[dict[str, Any], Files]:
        ctype = request.headers.get("content-type", "")
        raw = await request.body()
        media_type = ctype.split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            try:
                fields, files = parse_multipart(ctype, raw)
            except ValueError as exc:
                raise InvalidRequest("Could not parse multipart form") from exc
            return dict(fields), files
        if media_type == "application/json" or (not media_type and raw):
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise InvalidRequest(MSG_BAD_JSON) from exc
            if not isinstance(body, dict):
                raise InvalidRequest(f"Invalid type for body: expected an object, but got {_json_type(body)} "
                                     "instead.", None, "invalid_type")
            return body, {}
        raise InvalidRequest(
            f"Unsupported content type: '{media_type}'. This API method only accepts 'application/json' and "
            f"'multipart/form-data' requests, but you specified the header 'Content-Type: {media_type}'. "
            "Please try again with a supported content type.")

    def _allowed(self, model: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(seconds, sizes) accepted for ``model``."""
        models: dict[str, Any] = self.extra("sora_models", MODELS)
        sizes = tuple(models[model])
        seconds: tuple[str, ...] = SECONDS
        if self.extra("sora_extended", False):
            seconds = SECONDS + EXTENDED_SECONDS
            if "pro" in model:
                sizes = sizes + tuple(s for s in HD_SIZES if s not in sizes)
        return seconds, sizes

    def _validate_create(self, body: dict[str, Any], files: Files) -> dict[str, str]:
        prompt = _string("prompt", body.get("prompt"))
        models: dict[str, Any] = self.extra("sora_models", MODELS)
        model = _enum("model", body.get("model", "sora-2"), tuple(models))
        seconds_allowed, sizes = self._allowed(model)
        seconds = _enum("seconds", body.get("seconds", "4"), seconds_allowed)
        size = body.get("size", "720x1280")
        if isinstance(size, str) and size not in sizes and size in (*SORA_PRO_SIZES, *HD_SIZES):
            raise InvalidRequest(
                f"Invalid value: '{size}'. Supported values for model '{model}' are: "
                f"{_quoted_list(sizes, 'and')}.", "size", "invalid_value")
        size = _enum("size", size, sizes)
        self._check_reference(body.get("input_reference"), files.get("input_reference"), size)
        assert prompt is not None
        return {"prompt": prompt, "model": model, "seconds": seconds, "size": size}

    def _check_reference(self, ref: Any, upload: tuple[str, str, bytes] | None, size: str) -> None:
        data: bytes | None = None
        if upload is not None:
            _, ctype, data = upload
            if ctype not in ("image/jpeg", "image/png", "image/webp"):
                raise InvalidRequest(
                    f"Invalid file format for 'input_reference': '{ctype}'. Supported formats are: "
                    "'image/jpeg', 'image/png', and 'image/webp'.", "input_reference", "invalid_value")
        elif ref is not None:
            if not isinstance(ref, dict) or len([k for k in ("image_url", "file_id") if ref.get(k)]) != 1:
                raise InvalidRequest("'input_reference' must be an object with exactly one of 'image_url' or "
                                     "'file_id'.", "input_reference", "invalid_value")
            url = ref.get("image_url")
            if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
                try:
                    data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
                except ValueError as exc:
                    raise InvalidRequest("Invalid base64 image data in 'input_reference.image_url'.",
                                         "input_reference.image_url", "invalid_value") from exc
        if data is not None:
            dims = image_size(data)
            want = tuple(int(x) for x in size.split("x"))
            if dims is not None and dims != want:
                raise InvalidRequest("Inpaint image must match the requested width and height")

    def _new_task(self, fields: dict[str, str], remixed_from: str | None = None) -> SimTask:
        prompt = fields["prompt"]
        d = directives(prompt)
        data: dict[str, Any] = {}
        if remixed_from is not None:
            data["remixed_from"] = remixed_from
        if d.get("fail"):
            data["error_code"] = d["fail"]
        task = SimTask.create("video_" + secrets.token_hex(24), self.config, prompt, input=fields, data=data)
        self.tasks[task.id] = task
        self._position[task.id] = len(self._order)
        self._order.append(task.id)
        # A remix is identified by its source too: the same prompt on two sources is two requests.
        identity = fields if remixed_from is None else {**fields, "remixed_from_video_id": remixed_from}
        self.record_creation(json.dumps(identity, sort_keys=True))
        self.timers.schedule(task.finished_at, task.id)
        return task

    async def _create_common(self, request: Request, route: str,
                             build: Callable[[dict[str, Any], Files], tuple[dict[str, str], str | None]],
                             ) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault(route)) is not None:
            return injected
        try:
            body, files = await self._read_body(request)
            fields, remixed_from = build(body, files)
        except InvalidRequest as exc:
            return self.oai_error(exc.status, exc.message, param=exc.param, code=exc.code)
        if (denied := self._verified(request, fields["model"])) is not None:
            return denied
        if "blocked" in directives(fields["prompt"]):
            return self.oai_error(400, "Your request was blocked by our moderation system.",
                                  code="moderation_blocked")
        task = self._new_task(fields, remixed_from)
        if (injected := await self.fault(route, after_effect=True)) is not None:
            return injected
        return self._ok(self.video(task), self._poll_headers(task))

    async def create_video(self, request: Request) -> Response:
        return await self._create_common(request, "create", lambda b, f: (self._validate_create(b, f), None))

    def _source(self, video_id: Any) -> SimTask:
        task = self.tasks.get(video_id) if isinstance(video_id, str) else None
        if task is None:
            raise InvalidRequest(f"Video with id '{video_id}' not found.", status=404)
        if self._status(task, time.time()) != "completed":
            raise InvalidRequest(f"Video '{video_id}' is not completed; only completed videos can be used "
                                 "as a source.", "video_id", "invalid_value")
        return task

    async def remix_video(self, request: Request) -> Response:
        video_id = request.path_params["id"]

        def build(body: dict[str, Any], files: Files) -> tuple[dict[str, str], str]:
            prompt = _string("prompt", body.get("prompt"))
            src = self._source(video_id)
            assert prompt is not None
            return {**src.input, "prompt": prompt}, src.id

        return await self._create_common(request, "remix", build)

    def _video_ref(self, body: dict[str, Any], files: Files) -> dict[str, str]:
        """Model/size/seconds of the ``video`` an edit or extension starts from."""
        if "video" in files:
            return {"model": str(body.get("model", "sora-2")), "size": "720x1280", "seconds": "4"}
        ref = body.get("video")
        if ref is None:
            raise InvalidRequest("Missing required parameter: 'video'.", "video",
                                 "missing_required_parameter")
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str):
            raise InvalidRequest("'video' must be an object with an 'id' or an uploaded file.", "video",
                                 "invalid_value")
        return dict(self._source(ref["id"]).input)

    async def edit_video(self, request: Request) -> Response:
        def build(body: dict[str, Any], files: Files) -> tuple[dict[str, str], None]:
            prompt = _string("prompt", body.get("prompt"))
            base = self._video_ref(body, files)
            assert prompt is not None
            return {**base, "prompt": prompt}, None

        return await self._create_common(request, "edit", build)

    async def extend_video(self, request: Request) -> Response:
        def build(body: dict[str, Any], files: Files) -> tuple[dict[str, str], None]:
            prompt = _string("prompt", body.get("prompt"))
            base = self._video_ref(body, files)
            seconds_allowed, _ = self._allowed(base["model"])
            more = _enum("seconds", body.get("seconds", "4"), seconds_allowed)
            assert prompt is not None
            # For extensions ``seconds`` is the total duration of the stitched video.
            return {**base, "prompt": prompt, "seconds": str(int(base["seconds"]) + int(more))}, None

        return await self._create_common(request, "extend", build)

    def _not_found(self, video_id: str) -> Response:
        return self.oai_error(404, f"Video with id '{video_id}' not found.")

    async def get_video(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self._not_found(request.path_params["id"])
        return self._ok(self.video(task), self._poll_headers(task))

    async def delete_video(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("delete")) is not None:
            return injected
        video_id = request.path_params["id"]
        task = self.tasks.get(video_id)
        if task is None:
            return self._not_found(video_id)
        status = self._status(task, time.time())
        if status not in ("completed", "failed") and self.extra("sora_delete_active", "reject") == "reject":
            return self.oai_error(400, f"Video '{video_id}' cannot be deleted while it is {status}. Only "
                                  "completed or failed videos can be deleted.", code="invalid_state")
        del self.tasks[video_id]
        if (injected := await self.fault("delete", after_effect=True)) is not None:
            return injected
        return self._ok({"id": video_id, "deleted": True, "object": "video.deleted"})

    async def list_videos(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
            if not 1 <= limit <= 100:
                raise ValueError
        except ValueError:
            return self.oai_error(400, f"Invalid 'limit': expected an integer between 1 and 100, but got "
                                  f"'{q.get('limit')}' instead.", param="limit", code="invalid_value")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            return self.oai_error(400, f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
                                  param="order", code="invalid_value")
        step = 1 if order == "asc" else -1
        i = 0 if order == "asc" else len(self._order) - 1
        after = q.get("after")
        if after:
            pos = self._position.get(after)
            if pos is None:
                return self.oai_error(400, f"Invalid 'after': no video with id '{after}'.", param="after",
                                      code="invalid_value")
            i = pos + step
        now = time.time()
        data: list[dict[str, Any]] = []
        has_more = False
        while 0 <= i < len(self._order):
            task = self.tasks.get(self._order[i])
            i += step
            if task is None:
                continue
            if len(data) == limit:
                has_more = True
                break
            data.append(self.video(task, now))
        return self._ok({"object": "list", "data": data,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    async def get_content(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("content")) is not None:
            return injected
        video_id = request.path_params["id"]
        task = self.tasks.get(video_id)
        if task is None:
            return self._not_found(video_id)
        variant = request.query_params.get("variant", "video")
        if variant not in VARIANTS:
            return self.oai_error(400, f"Invalid value: '{variant}'. Supported values are: 'video', "
                                  "'thumbnail', and 'spritesheet'.", param="variant", code="invalid_value")
        now = time.time()
        status = self._status(task, now)
        if status in ("queued", "in_progress"):
            return self.oai_error(404, f"Video is not ready yet, use GET /v1/videos/{video_id} to check "
                                  "status.")
        if status == "failed":
            return self.oai_error(404, f"Video '{video_id}' failed; no content is available.")
        if self.expired(task, now):
            return self.oai_error(int(self.extra("sora_expired_status", 404)),
                                  f"The assets of video '{video_id}' have expired.")
        ctype, make = VARIANTS[variant]
        return Response(make(f"{task.id}:{variant}"), media_type=ctype, headers=self._headers())

    # -- webhooks ----------------------------------------------------------
    def _on_finished(self, video_id: str) -> None:
        task = self.tasks.get(video_id)
        url = self.extra("webhook_url", None)
        if task is None or not url:
            return
        status = self._status(task, max(time.time(), task.finished_at))
        event = {"id": "evt_" + secrets.token_hex(16), "object": "event", "created_at": int(time.time()),
                 "type": f"video.{status}", "data": {"id": task.id}}
        if event["type"] in self.extra("webhook_events", ["video.completed", "video.failed"]):
            self.background.spawn(self._deliver(str(url), event))

    async def _deliver(self, url: str, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        msg_id = "wh_" + secrets.token_hex(16)
        copies = 1 + int(self.extra("webhook_duplicates", 0))
        for _ in range(copies):
            await self._deliver_once(url, event, body, msg_id)

    async def _deliver_once(self, url: str, event: dict[str, Any], body: bytes, msg_id: str) -> None:
        delays: list[float] = list(self.extra("webhook_retry_delays", [0.5, 1.0, 2.0, 4.0]))
        secret = str(self.extra("webhook_secret", self.webhook_secret))
        for attempt in range(len(delays) + 1):
            ts = int(time.time())
            headers = {"user-agent": WEBHOOK_USER_AGENT, "content-type": "application/json",
                       "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "webhook-signature": standard_webhook_signature(secret, msg_id, ts, body)}
            status: int | None = None
            try:
                resp = await self.background.client.post(url, content=body, headers=headers)
                status = resp.status_code
            except httpx.HTTPError:
                pass
            self.webhook_attempts.append({"webhook_id": msg_id, "type": event["type"],
                                          "video_id": event["data"]["id"], "attempt": attempt + 1,
                                          "status": status})
            if status is not None and 200 <= status < 300:
                return
            if attempt < len(delays):
                await asyncio.sleep(delays[attempt])
