"""Stability AI simulator (Stable Image v2beta).

Written from Stability's documented wire format (shared/providers/images-wave2.md §0.3 and §3),
not from our adapter.

Routes (``Authorization: Bearer <key>``; every POST is ``multipart/form-data``, a JSON or
urlencoded body is refused with 400; bodies over 10 MiB get 413):

- ``POST /v2beta/stable-image/generate/ultra`` (``prompt``*, optional ``image`` + ``strength``),
  ``/core`` (text-to-image only) and ``/sd3`` (``model``: ``sd3.5-large`` default,
  ``sd3.5-large-turbo``, ``sd3.5-medium``, ``sd3.5-flash``; ``mode`` ``text-to-image`` |
  ``image-to-image`` + ``image`` + ``strength``; ``cfg_scale`` 1-10). Common fields ``prompt``
  (1-10,000 chars), ``negative_prompt``, ``aspect_ratio`` (``21:9 16:9 3:2 5:4 1:1 4:5 2:3 9:16
  9:21``), ``seed`` (0-4294967294, 0 = random), ``output_format`` (``png|jpeg|webp``),
  ``style_preset``. Synchronous: the request is held ``run_seconds`` while the image "renders".
  ``Accept: image/*`` (or none) answers the raw bytes with ``finish-reason``, ``seed`` and
  ``x-request-id`` headers; ``Accept: application/json`` answers ``{image: base64,
  finish_reason, seed}`` with ``content-type: application/json; type=image/<fmt>``.
- ``POST /v2beta/stable-image/upscale/creative`` (``image``*, ``prompt``*) and
  ``/v2beta/stable-image/edit/replace-background-and-relight`` (``subject_image``*, and
  ``background_prompt`` or ``background_reference``): asynchronous, **200** ``{"id": <64 hex>}``.
- ``GET /v2beta/results/{id}``: 202 ``{"id", "status": "in-progress"}`` while running, then 200
  with the image (bytes or JSON, as above); 404 for an unknown id, another key's id, or a result
  older than ``extra["result_ttl_seconds"]`` (24 h) after completion.

Every output is a real PNG, baseline JPEG or lossless WebP (per ``output_format``), distinct
per generation; sizes are the documented megapixels / 16 per side.

Errors: ``{"id": <error id>, "name", "errors": [...]}`` (``extra["error_message_field"] =
"message"`` gives ``message`` instead, the CONFLICT in §3.5): 400 ``bad_request`` naming the
field, 401 ``unauthorized``, 402 ``payment_required`` when credits run out (code UNCONFIRMED:
``extra["insufficient_credits_status"]``), 403 ``content_moderation``, 404 ``not_found``, 413
``payload_too_large``, 422 ``invalid_language``, 429 ``rate_limit_exceeded`` (more than
``rate_limit`` requests in ``rate_window`` seconds per key locks the key out for
``lockout_seconds``), 500 ``internal_error``.

Prompt directives (``prompt`` or ``background_prompt``): ``[sim:run=S]`` hold time (async: with
``[sim:queue=S]``); ``[sim:filtered]`` 200 with ``finish-reason: CONTENT_FILTERED`` and a
blurred placeholder (generated, not charged); ``[sim:moderated]`` 403 before generating;
``[sim:reject]`` 422; ``[sim:fail]`` 500 (async: at the result). Failed, refused and filtered
generations are not charged; ``credits_used`` and ``Stats.creations`` (one per generation,
counted when it happens, before any after-effect fault) tell what was billed.

``SimConfig.extra`` knobs: ``credits`` (1e9), ``insufficient_credits_status`` (402),
``rate_limit`` (150), ``rate_window`` (10.0), ``lockout_seconds`` (60.0), ``result_ttl_seconds``
(86400), ``result_json_field`` (``image`` | ``result`` | ``artifacts``: the CONFLICT on the
finished async JSON), ``error_message_field`` (``errors`` | ``message``), ``sd3_models``
(adds/removes ``sd3.5-flash``, the CONFLICT in §3.2).

This module also holds the multipart parser and the image-format helpers that the Ideogram and
BFL simulators import (the environment has no ``python-multipart``, which Starlette's
``request.form()`` needs).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import secrets
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, bearer, directives

# -- multipart forms -------------------------------------------------------------------------


class FormError(ValueError):
    """The body is not a usable ``multipart/form-data`` body."""


@dataclass(frozen=True)
class FormPart:
    name: str
    data: bytes
    filename: str | None = None  # set on file uploads only


class Form:
    """The parts of a multipart body, in order; a name may repeat (reference image lists)."""

    def __init__(self, parts: Iterable[FormPart]) -> None:
        self.parts = list(parts)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Form:
        """A JSON object as text parts (lists become repeated parts), for routes taking either."""
        parts = []
        for name, value in body.items():
            for item in value if isinstance(value, list) else [value]:
                text = json.dumps(item) if isinstance(item, bool | dict) else str(item)
                parts.append(FormPart(name, text.encode()))
        return cls(parts)

    def text(self, name: str) -> str | None:
        part = self.part(name)
        return None if part is None else part.data.decode("utf-8", "replace")

    def part(self, name: str) -> FormPart | None:
        return next((p for p in self.parts if p.name == name), None)

    def all(self, name: str) -> list[FormPart]:
        return [p for p in self.parts if p.name == name]


def parse_form(content_type: str, body: bytes) -> Form:
    """Parse a ``multipart/form-data`` body with the standard library's MIME parser."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise FormError("Content-Type must be multipart/form-data")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") +
                                              b"\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects:
        raise FormError("malformed multipart/form-data body")
    parts = []
    for part in msg.iter_parts():
        assert isinstance(part, EmailMessage)
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise FormError("a multipart part has no name")
        data = part.get_payload(decode=True)
        parts.append(FormPart(name, data if isinstance(data, bytes) else b"", part.get_filename()))
    return Form(parts)


# -- image formats ---------------------------------------------------------------------------

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def sniff_image(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from the magic bytes, else ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG or WebP, or ``None`` when it cannot be read."""
    kind = sniff_image(data)
    if kind == "png" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if kind == "jpeg":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
        return None
    if kind == "webp" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
    return None


def _rgb(seed: str) -> tuple[int, int, int]:
    r, g, b = hashlib.sha256(seed.encode()).digest()[:3]
    return r, g, b


class _Bits:
    """A bit writer, most significant bit first (JPEG) or least significant first (WebP)."""

    def __init__(self, lsb_first: bool = False) -> None:
        self.lsb_first = lsb_first
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, count: int) -> None:
        for i in range(count):
            bit = (value >> i) & 1 if self.lsb_first else (value >> (count - 1 - i)) & 1
            if self.lsb_first:
                self.acc |= bit << self.n
            else:
                self.acc = (self.acc << 1) | bit
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF and not self.lsb_first:
                    self.out.append(0)  # JPEG byte stuffing
                self.acc = self.n = 0

    def flush(self) -> bytes:
        if self.n:
            self.write(0 if self.lsb_first else (1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


# Standard luminance DC table (categories 0-11); the AC table has the single code "0" = end of block.
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)


def _dc_codes() -> dict[int, tuple[int, int]]:
    codes, code, symbol = {}, 0, 0
    for length, count in enumerate(_DC_BITS, start=1):
        for _ in range(count):
            codes[symbol] = (code, length)
            code += 1
            symbol += 1
        code <<= 1
    return codes


def jpeg(seed: str, width: int = 32, height: int = 32) -> bytes:
    """A baseline JPEG (YCbCr, 4:4:4) of one colour derived from ``seed``; a COM segment names it."""
    r, g, b = _rgb(seed)
    ycc = (0.299 * r + 0.587 * g + 0.114 * b,
           128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
           128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
    dc = [8 * (max(0, min(255, round(v))) - 128) for v in ycc]  # DC of a flat 8x8 block, quantiser 1
    codes = _dc_codes()
    bits = _Bits()
    previous = [0, 0, 0]
    for _ in range(math.ceil(width / 8) * math.ceil(height / 8)):
        for c in range(3):
            diff, previous[c] = dc[c] - previous[c], dc[c]
            size = abs(diff).bit_length()
            bits.write(*codes[size])
            if size:
                bits.write(diff if diff > 0 else diff + (1 << size) - 1, size)
            bits.write(0, 1)  # EOB: no AC coefficients
    scan = bits.flush()

    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    comment = seed.encode()[:200]
    dht = (b"\x00" + bytes(_DC_BITS) + bytes(range(12)) + b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return (b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
            + segment(0xFE, comment) + segment(0xDB, b"\x00" + b"\x01" * 64) + segment(0xC0, sof)
            + segment(0xC4, dht) + segment(0xDA, b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00")
            + scan + b"\xff\xd9")


def webp(seed: str, width: int = 32, height: int = 32) -> bytes:
    """A lossless (VP8L) WebP of one colour derived from ``seed``: five one-symbol prefix codes, no pixel bits."""
    r, g, b = _rgb(seed)
    bits = _Bits(lsb_first=True)
    bits.write(0x2F, 8)
    bits.write(width - 1, 14)
    bits.write(height - 1, 14)
    bits.write(0, 1 + 3 + 1 + 1 + 1)  # alpha unused, version 0, no transform, no colour cache, no meta codes
    for symbol in (g, r, b, 255):  # green, red, blue, alpha: simple code, one 8-bit symbol
        bits.write(0b101, 3)
        bits.write(symbol, 8)
    bits.write(0b001, 3)  # distance: simple code, one 1-bit symbol
    bits.write(0, 1)
    data = bits.flush()
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def encode(fmt: str, seed: str, width: int, height: int) -> bytes:
    """A real image of ``fmt`` (``png``, ``jpeg`` or ``webp``)."""
    if fmt == "jpeg":
        return jpeg(seed, width, height)
    if fmt == "webp":
        return webp(seed, width, height)
    return media.png(seed, width, height)


def dimensions(aspect_ratio: str, megapixels: float) -> tuple[int, int]:
    """Output size for an ``a:b`` ratio at about ``megapixels``, in multiples of 64."""
    a, b = (int(x) for x in aspect_ratio.split(":"))
    w = max(64, round(math.sqrt(megapixels * 1e6 * a / b) / 64) * 64)
    return w, max(64, round(w * b / a / 64) * 64)


# -- the simulator ---------------------------------------------------------------------------

MAX_BODY = 10 * 1024 * 1024
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
MAX_SEED = 4294967294
# Credits per generation (illustrative; Stability publishes a price per model).
CREDITS = {"ultra": 8.0, "core": 3.0, "sd3.5-large": 6.5, "sd3.5-large-turbo": 4.0, "sd3.5-medium": 3.5,
           "sd3.5-flash": 2.5, "upscale-creative": 60.0, "replace-background-and-relight": 8.0}
MEGAPIXELS = {"ultra": 1.0, "core": 1.5, "sd3": 1.0}
ERROR_NAMES = {400: "bad_request", 401: "unauthorized", 402: "payment_required", 403: "content_moderation",
               404: "not_found", 413: "payload_too_large", 422: "invalid_language", 429: "rate_limit_exceeded",
               500: "internal_error", 502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}


class StabilityError(Exception):
    def __init__(self, status: int, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.name = name or ERROR_NAMES.get(status, "error")


@dataclass
class Job:
    """What a generation produces: its format, pixel size, outcome and seed."""

    fmt: str
    size: tuple[int, int]
    seed: int
    credits: float
    prompt: str


class StabilitySimulator(Simulator):
    name = "stability"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.credits_used = 0.0
        self._recent: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return self.error(StabilityError(status, message), headers)

    def error(self, err: StabilityError, headers: dict[str, str] | None = None) -> Response:
        field = "message" if self._x("error_message_field", "errors") == "message" else "errors"
        value: str | list[str] = err.message if field == "message" else [err.message]
        body = {"id": secrets.token_hex(16), "name": err.name, field: value}
        return JSONResponse(body, status_code=err.status, headers=headers)

    def image_response(self, request: Request, data: bytes, fmt: str, finish: str, seed: int,
                       field: str = "image") -> Response:
        """Raw bytes with ``finish-reason``/``seed`` headers, or JSON base64, as ``Accept`` asks."""
        request_id = secrets.token_hex(16)
        if "application/json" in request.headers.get("accept", ""):
            b64 = base64.b64encode(data).decode()
            if field == "artifacts":
                body: dict[str, Any] = {"artifacts": [{"base64": b64, "finishReason": finish, "seed": seed}]}
            else:
                body = {field: b64, "finish_reason": finish, "seed": seed}
            return Response(json.dumps(body), media_type=f"application/json; type={MEDIA_TYPES[fmt]}",
                            headers={"x-request-id": request_id})
        return Response(data, media_type=MEDIA_TYPES[fmt],
                         headers={"finish-reason": finish, "seed": str(seed), "x-request-id": request_id})

    # -- routes --------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v2beta/stable-image/generate/{model}", self.generate, methods=["POST"]),
            Route("/v2beta/stable-image/upscale/creative", self.upscale_creative, methods=["POST"]),
            Route("/v2beta/stable-image/edit/replace-background-and-relight", self.relight, methods=["POST"]),
            Route("/v2beta/results/{id}", self.result, methods=["GET"]),
        ]

    def _gate(self, request: Request) -> str:
        """The caller's key, after auth and the per-key rate limit (150 / 10 s, then 60 s locked out)."""
        key = bearer(request)
        if not self.config.key_ok(key):
            raise StabilityError(401, "authorization: missing or invalid API key")
        assert key is not None
        now = time.time()
        message = (f"You have exceeded the rate limit of {self._x('rate_limit', 150)} requests within a "
                   f"{self._x('rate_window', 10.0):g} second period, and have been timed out for "
                   f"{self._x('lockout_seconds', 60.0):g} seconds.")
        if self._locked_until.get(key, 0.0) > now:
            raise StabilityError(429, message)
        recent = self._recent.setdefault(key, deque())
        while recent and recent[0] <= now - float(self._x("rate_window", 10.0)):
            recent.popleft()
        if len(recent) >= int(self._x("rate_limit", 150)):
            self._locked_until[key] = now + float(self._x("lockout_seconds", 60.0))
            recent.clear()
            raise StabilityError(429, message)
        recent.append(now)
        return key

    async def _form(self, request: Request) -> Form:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise StabilityError(413, "payload too large: the request must be at most 10MiB")
        try:
            return parse_form(request.headers.get("content-type", ""), body)
        except FormError as exc:
            raise StabilityError(400, f"{exc}: all requests must be multipart/form-data") from exc

    async def generate(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in MEGAPIXELS:
            return self.error(StabilityError(404, f"route not found: /v2beta/stable-image/generate/{model}"))
        try:
            self._gate(request)
            if (injected := await self.fault("generate")) is not None:
                return injected
            form = await self._form(request)
            job = self._validate_generate(model, form)
        except StabilityError as err:
            return self.error(err)
        return await self._run_sync(request, model, form, job)

    async def _run_sync(self, request: Request, route: str, form: Form, job: Job) -> Response:
        d = directives(job.prompt)
        try:
            self._precheck(d, job)
        except StabilityError as err:
            return self.error(err)
        await asyncio.sleep(float(d.get("run") or self.config.run_seconds))  # the connection stays open
        if "fail" in d:
            return self.error(StabilityError(500, "An unexpected server error occurred, please try again."))
        identity = hashlib.sha256(b"".join(p.name.encode() + p.data for p in form.parts)).hexdigest()
        self.record_creation(f"{route}:{identity}")
        filtered = "filtered" in d
        if not filtered:
            self.credits_used += job.credits
        if (injected := await self.fault("generate", after_effect=True)) is not None:
            return injected
        seed = f"stability:{identity}:{self.stats.creations}"
        data = encode(job.fmt, ("blurred:" if filtered else "") + seed, *job.size)
        return self.image_response(request, data, job.fmt, "CONTENT_FILTERED" if filtered else "SUCCESS",
                                   job.seed)

    def _precheck(self, d: dict[str, str], job: Job) -> None:
        """Refusals before any image is generated: moderation, language, credits."""
        if "moderated" in d:
            raise StabilityError(403, "Your request was flagged by our content moderation system, as a result "
                                      "your request was denied and you were not charged.")
        if "reject" in d:
            raise StabilityError(422, "English is the only supported language for this service.")
        if self.credits_used + job.credits > float(self._x("credits", 1e9)):
            raise StabilityError(int(self._x("insufficient_credits_status", 402)),
                                 "You lack sufficient credits to make this request. Please purchase more "
                                 "credits and try again.")

    # -- validation ----------------------------------------------------------------
    def _common(self, form: Form, prompt_field: str = "prompt", required: bool = True) -> tuple[str, str, int]:
        prompt = form.text(prompt_field)
        if prompt is None or not prompt.strip():
            if required:
                raise StabilityError(400, f"{prompt_field}: cannot be empty")
            prompt = ""
        if len(prompt) > 10_000:
            raise StabilityError(400, f"{prompt_field}: must be at most 10000 characters")
        fmt = form.text("output_format") or "png"
        if fmt not in OUTPUT_FORMATS:
            raise StabilityError(400, f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}")
        seed = _number(form, "seed", 0, MAX_SEED, integer=True)
        return prompt, fmt, int(seed) if seed else secrets.randbelow(MAX_SEED) + 1

    def _validate_generate(self, model: str, form: Form) -> Job:
        prompt, fmt, seed = self._common(form)
        ratio = form.text("aspect_ratio") or "1:1"
        if ratio not in ASPECT_RATIOS:
            raise StabilityError(400, f"aspect_ratio: must be one of {', '.join(ASPECT_RATIOS)}")
        price_key = model
        image_mode = False
        if model == "sd3":
            price_key = form.text("model") or "sd3.5-large"
            if price_key not in self._x("sd3_models", SD3_MODELS):
                raise StabilityError(400, f"model: must be one of {', '.join(self._x('sd3_models', SD3_MODELS))}")
            mode = form.text("mode") or "text-to-image"
            if mode not in ("text-to-image", "image-to-image"):
                raise StabilityError(400, "mode: must be one of text-to-image, image-to-image")
            image_mode = mode == "image-to-image"
            _number(form, "cfg_scale", 1, 10)
        elif model == "ultra":
            image_mode = form.part("image") is not None
        if image_mode:
            size = _image(form, "image")
            if form.text("strength") is None:
                raise StabilityError(400, "strength: required when an image is provided")
            _number(form, "strength", 0, 1)
            w, h = size
        else:
            w, h = dimensions(ratio, MEGAPIXELS[model])
        return Job(fmt, (max(1, w // 16), max(1, h // 16)), seed, CREDITS[price_key], prompt)

    # -- asynchronous routes -------------------------------------------------------
    async def upscale_creative(self, request: Request) -> Response:
        return await self._submit(request, "upscale-creative")

    async def relight(self, request: Request) -> Response:
        return await self._submit(request, "replace-background-and-relight")

    async def _submit(self, request: Request, route: str) -> Response:
        try:
            key = self._gate(request)
            if (injected := await self.fault("submit")) is not None:
                return injected
            form = await self._form(request)
            if route == "upscale-creative":
                prompt, fmt, seed = self._common(form)
                w, h = _image(form, "image")
                size = (min(256, w // 4), min(256, h // 4))  # up to 4x, at 1/16 per side
            else:
                prompt, fmt, seed = self._common(form, "background_prompt", required=False)
                w, h = _image(form, "subject_image")
                if not prompt and form.part("background_reference") is None:
                    raise StabilityError(400, "background_prompt: either background_prompt or "
                                              "background_reference is required")
                if form.part("background_reference") is not None:
                    _image(form, "background_reference")
                size = (max(1, w // 16), max(1, h // 16))
            job = Job(fmt, size, seed, CREDITS[route], prompt)
            self._precheck(directives(prompt), job)
        except StabilityError as err:
            return self.error(err)
        task = SimTask.create(secrets.token_hex(32), self.config, prompt, data={"key": key, "job": job})
        self.tasks[task.id] = task
        self.record_creation(f"{route}:{task.id}")  # no idempotency: every POST is a new billed job
        if task.outcome not in ("fail", "filtered"):
            self.credits_used += job.credits
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        return JSONResponse({"id": task.id})

    async def result(self, request: Request) -> Response:
        try:
            key = self._gate(request)
        except StabilityError as err:
            return self.error(err)
        if (injected := await self.fault("result")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        now = time.time()
        if (task is None or task.data["key"] != key
                or now > task.finished_at + float(self._x("result_ttl_seconds", 86400.0))):
            return self.error(StabilityError(404, f"generation {request.path_params['id']} not found"))
        if task.phase(now) != "done":
            return JSONResponse({"id": task.id, "status": "in-progress"}, status_code=202)
        if task.outcome == "fail":
            return self.error(StabilityError(500, "An unexpected server error occurred, please try again."))
        job: Job = task.data["job"]
        filtered = task.outcome == "filtered"
        data = encode(job.fmt, ("blurred:" if filtered else "") + f"stability:{task.id}", *job.size)
        return self.image_response(request, data, job.fmt, "CONTENT_FILTERED" if filtered else "SUCCESS",
                                   job.seed, str(self._x("result_json_field", "image")))


def _number(form: Form, name: str, lo: float, hi: float, integer: bool = False) -> float | None:
    text = form.text(name)
    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise StabilityError(400, f"{name}: must be {kind} between {lo:g} and {hi:g}")
    return value


def _image(form: Form, name: str) -> tuple[int, int]:
    """Size of a required JPEG/PNG/WebP file part."""
    part = form.part(name)
    if part is None or not part.data:
        raise StabilityError(400, f"{name}: required")
    if part.filename is None:
        raise StabilityError(400, f"{name}: must be a file upload")
    size = image_size(part.data)
    if size is None:
        raise StabilityError(400, f"{name}: must be a jpeg, png or webp image")
    return size
