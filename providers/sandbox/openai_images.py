"""OpenAI Images API simulator (gpt-image-2, gpt-image-1.5, gpt-image-1, gpt-image-1-mini, dall-e-3).

Written from OpenAI's documented wire format (shared/providers/images-wave2.md §1, and §0.3 on
synchronous providers), not from an adapter. The Atelier base URL is the simulator's origin,
so the routes carry OpenAI's ``/v1`` prefix:

- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (``multipart/form-data``
  with ``image`` / repeated ``image[]`` / ``image[N]`` parts and an optional ``mask``; also the
  newer JSON body with ``images: [{image_url} | {file_id}]``, ``extra["json_edits"]``).
- ``GET /delivery/{token}/{name}?se=...&sig=...``: DALL·E 3 output URLs (Azure-blob style SAS),
  valid ``output_ttl_seconds`` (60 minutes in reality), then 404 ``BlobNotFound`` (or 403
  ``AuthenticationFailed`` with ``extra["expired_url_status"] = 403``).

**Synchronous**: the request stays open for the run time (``SimConfig.run_seconds`` or
``[sim:run=S]``) and answers with the images. There is no job id, no idempotency and no way
to look a request up afterwards. Each request that produces images is billed once, at the
moment the images exist (``Stats.record_creation``), *before* any after-effect fault: a
``timeout`` or ``500`` injected with ``after_effect`` shows a billed generation whose client
never saw the image, and a client whose own read timeout fires mid-generation is billed too.
Retrying such a request bills again (``Stats.duplicate_identities``).

Responses: gpt-image models answer ``data[].b64_json`` (always; ``response_format`` is refused)
plus ``created``, ``background``, ``output_format``, ``quality``, ``size`` (resolved, ``auto``
becomes the real value) and ``usage`` (input/output tokens from the quality/size table, +100
per streamed partial). dall-e-3 answers ``data[].url`` by default or ``b64_json``, with
``revised_prompt`` and no ``usage``. ``stream: true`` (gpt-image only) answers
``text/event-stream``: ``partial_images`` (0-3) ``image_generation.partial_image`` (or
``image_edit.*``) events spread over the run time, then one ``*.completed`` per image;
after-effect faults do not apply to streams.

Validation as OpenAI answers it (400 ``invalid_request_error`` with ``param`` and ``code``):
``prompt`` required, at most 32 000 characters (4 000 on dall-e-3); ``n`` 1-10 (dall-e-3: 1);
``size`` per model (gpt-image-2: any ``WxH`` in multiples of 16, ratio <= 3:1, at most
3840x2160 pixels); ``quality`` per family; ``background``/``output_format``/
``output_compression``/``moderation``/``stream``/``partial_images``/``input_fidelity`` are
gpt-image only, ``response_format``/``style`` dall-e-3 only (``unknown_parameter``);
``background=transparent`` needs png or webp; ``input_fidelity`` per model (gpt-image-1-mini:
``low`` only); edits: gpt-image models only, 1-16 png/jpeg/webp images < 50 MB, the mask a
PNG < 4 MB with an alpha channel and the first image's dimensions. A missing ``model`` means
``dall-e-2`` on generations (``gpt-image-1`` when a gpt-image-only field is present) and
``gpt-image-1.5`` on edits; ``dall-e-2`` and unknown models answer 404 ``model_not_found``.

Errors use ``{"error": {message, type, param, code}}`` and every response carries
``x-request-id``. 401 missing/wrong key; 403 organization verification for keys in
``extra["unverified_keys"]`` on gpt-image models (CONFLICT: 400 with
``extra["unverified_status"]``); 429 ``rate_limit_exceeded`` with ``retry-after``,
``retry-after-ms`` and ``x-should-retry: true`` when more than ``extra["images_per_minute"]``
images were asked for in the last 60 s, or injected (``extra["rate_limit_kind"] =
"insufficient_quota"``: the billing 429, ``x-should-retry: false``); 500/503 JSON; 502/504
Cloudflare HTML.

Prompt directives: ``[sim:refuse]`` (= ``[sim:refuse=input]``) answers 400 at once:
``moderation_blocked`` (type ``image_generation_user_error``, with ``moderation_details``)
on gpt-image, ``content_policy_violation`` on dall-e-3; ``[sim:refuse=output]`` answers the
same after the run time (not billed unless ``extra["bill_output_refusals"]``; an SSE
``error`` event when streaming); ``[sim:drop]`` generates and bills, then closes the
connection without an answer (not for streams); ``[sim:run=S]`` sets the run time.

``SimConfig.extra`` knobs (defaults): ``json_edits`` (True), ``expired_url_status`` (404),
``unverified_keys`` ([]), ``unverified_status`` (403), ``images_per_minute`` (None),
``rate_limit_kind`` ("rate_limit"), ``bill_output_refusals`` (False),
``moderation_details`` (True), ``gpt_image_2_transparent`` (True: the SDK's "preview";
False: the guide's "not supported"), ``gpt_image_2_input_fidelity`` (True: the schema;
False: the guide's "omit it").

Fault route names: ``generate``, ``edit``, ``download``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from providers.sandbox import media
from providers.sandbox.base import SimConfig, Simulator, bearer, directives
from providers.sandbox.sora import (
    MSG_500,
    MSG_BAD_JSON,
    MSG_NO_KEY,
    MSG_QUOTA,
    InvalidRequest,
    LastFaultPlan,
    image_size,
    jpeg,
    webp,
)

GPT_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
GPT_QUALITIES = ("low", "medium", "high", "auto")
DALLE3_QUALITIES = ("standard", "hd")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
GPT_ONLY = ("background", "output_format", "output_compression", "moderation", "stream", "partial_images",
            "input_fidelity")
DALLE_ONLY = ("response_format", "style")
GENERATE_FIELDS = frozenset({"prompt", "model", "n", "size", "quality", "background", "output_format",
                             "output_compression", "moderation", "response_format", "style", "stream",
                             "partial_images", "user"})
EDIT_FIELDS = (GENERATE_FIELDS - {"style"}) | {"image", "images", "mask", "input_fidelity"}
INT_FIELDS = ("n", "output_compression", "partial_images")
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_EDIT_IMAGES = 16
MAX_PIXELS = 3840 * 2160
SCALE = 32  # simulated images are 1/32 of the requested size (real, decodable, small)

# Output tokens per image (the published gpt-image-1 table; illustrative for the other models).
OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
IMAGE_INPUT_TOKENS = 323  # per edit input image (illustrative)
PARTIAL_IMAGE_TOKENS = 100

MSG_REFUSED = ("Your request was rejected by the safety system. If you believe this is an error, contact us at "
               "help.openai.com and include the request ID {request_id}.")
MSG_CONTENT_POLICY = ("Your request was rejected as a result of our safety system. Your prompt may contain text "
                      "that is not allowed by our safety system.")
CLOUDFLARE_HTML = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
_FREE_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_INDEXED_IMAGE = re.compile(r"^image\[\d*\]$")
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.S)


@dataclass(frozen=True)
class ModelSpec:
    gpt: bool  # a gpt-image model (base64 only, usage) rather than DALL·E
    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int
    max_prompt: int
    free_size: bool = False  # gpt-image-2: any WxH within the documented bounds
    edits: bool = True
    input_fidelity: tuple[str, ...] = ("high", "low")


MODELS: dict[str, ModelSpec] = {
    "gpt-image-2": ModelSpec(True, GPT_SIZES, GPT_QUALITIES, 10, 32000, free_size=True),
    "gpt-image-1.5": ModelSpec(True, GPT_SIZES, GPT_QUALITIES, 10, 32000),
    "gpt-image-1": ModelSpec(True, GPT_SIZES, GPT_QUALITIES, 10, 32000),
    "gpt-image-1-mini": ModelSpec(True, GPT_SIZES, GPT_QUALITIES, 10, 32000, input_fidelity=("low",)),
    "dall-e-3": ModelSpec(False, DALLE3_SIZES, DALLE3_QUALITIES, 1, 4000, edits=False, input_fidelity=()),
}

Upload = tuple[str, str, bytes]
"""A multipart file part: (filename, content type, bytes)."""


@dataclass
class ImageJob:
    """One validated request: everything needed to produce and describe its images."""

    route: str  # "generate" or "edit"
    model: str
    spec: ModelSpec
    prompt: str
    n: int
    size: str  # resolved WxH
    quality: str  # resolved
    background: str  # resolved
    output_format: str
    response_format: str  # "b64_json" or "url"
    stream: bool
    partial_images: int
    input_images: int
    identity: str

    @property
    def dimensions(self) -> tuple[int, int]:
        w, _, h = self.size.partition("x")
        return int(w), int(h)


# -- helpers shared with the Gemini simulator ----------------------------------


class DroppedConnection(Response):
    """Starts the answer and closes the connection before any body: the client cannot tell
    whether the request took effect (uvicorn logs "returned without completing response")."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})


class MinuteWindow:
    """Units (images) admitted per key over a sliding 60 s window: the providers' IPM limits."""

    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def admit(self, key: str, count: int, limit: int | None, now: float | None = None) -> tuple[float, int]:
        """``(0, used)`` and counts ``count`` when within ``limit``, else ``(seconds to wait, used)``."""
        now = time.time() if now is None else now
        events = self._events.setdefault(key, deque())
        while events and events[0][0] <= now - 60:
            events.popleft()
        used = sum(c for _, c in events)
        if limit is not None and used + count > limit:
            return max(0.001, events[0][0] + 60 - now) if events else 60.0, used
        events.append((now, count))
        return 0.0, used + count


def read_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, Upload]]]:
    """Fields and files of a ``multipart/form-data`` body; repeated file parts are all kept, in order."""
    head = b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("not multipart")
    fields: dict[str, str] = {}
    files: list[tuple[str, Upload]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            files.append((name, (filename, part.get_content_type(), data)))
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files


def image_kind(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from the file's magic bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_has_alpha(data: bytes) -> bool:
    """An RGBA / grey+alpha PNG, or one with a ``tRNS`` chunk."""
    return len(data) > 25 and (data[25] in (4, 6) or b"tRNS" in data)


# -- validation -------------------------------------------------------------------


def _type_name(value: Any) -> str:
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


def _quoted(values: tuple[str, ...]) -> str:
    items = [f"'{v}'" for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{name}': expected one of {_quoted(allowed)}, but got "
                             f"{_type_name(value)} instead.", name, "invalid_type")
    if value not in allowed:
        raise InvalidRequest(f"Invalid value: '{value}'. Supported values are: {_quoted(allowed)}.",
                             name, "invalid_value")
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} "
                             "instead.", name, "invalid_type")
    if value < low:
        raise InvalidRequest(f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but "
                             f"got {value} instead.", name, "integer_below_min_value")
    if value > high:
        raise InvalidRequest(f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but "
                             f"got {value} instead.", name, "integer_above_max_value")
    return value


def _free_size(size: str) -> str:
    """gpt-image-2's ``WxH``: multiples of 16, ratio at most 3:1, at most 3840x2160 pixels."""
    match = _FREE_SIZE.match(size)
    if match is None:
        raise InvalidRequest(f"Invalid value: '{size}'. Size must be 'auto' or of the form 'WIDTHxHEIGHT'.",
                             "size", "invalid_value")
    w, h = int(match.group(1)), int(match.group(2))
    if w % 16 or h % 16:
        reason = "width and height must both be multiples of 16"
    elif max(w, h) > 3 * min(w, h):
        reason = "the aspect ratio must be at most 3:1"
    elif max(w, h) > 3840 or w * h > MAX_PIXELS:
        reason = "the image must be at most 3840x2160 pixels"
    else:
        return size
    raise InvalidRequest(f"Invalid size '{size}': {reason}.", "size", "invalid_value")


def _typed_form(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart fields as the JSON types the API validates (``n`` an integer, ``stream`` a boolean)."""
    body: dict[str, Any] = dict(fields)
    for name in INT_FIELDS:
        if name in body:
            try:
                body[name] = int(body[name])
            except ValueError:
                raise InvalidRequest(f"Invalid type for '{name}': expected an integer, but got a string "
                                     "instead.", name, "invalid_type") from None
    if "stream" in body:
        body["stream"] = body["stream"].lower() == "true"
    return body


class OpenAIImagesSimulator(Simulator):
    name = "openai"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.faults: LastFaultPlan = LastFaultPlan()
        self.window = MinuteWindow()

    def extra(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def _headers(self, extra: dict[str, str] | None = None, processing_ms: int = 42) -> dict[str, str]:
        return {"x-request-id": "req_" + secrets.token_hex(16), "openai-processing-ms": str(processing_ms),
                "openai-version": "2020-10-01", "openai-organization": "org-simulated", **(extra or {})}

    def oai_error(self, status: int, message: str, type_: str = "invalid_request_error",
                  param: str | None = None, code: str | None = None,
                  headers: dict[str, str] | None = None) -> Response:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=self._headers(headers))

    def invalid(self, err: InvalidRequest) -> Response:
        return self.oai_error(err.status, err.message, param=err.param, code=err.code)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status in (502, 504):
            reason = "Bad Gateway" if status == 502 else "Gateway Time-out"
            html = CLOUDFLARE_HTML.format(status=status, reason=reason)
            return Response(html, status_code=status, media_type="text/html", headers=self._headers(headers))
        if status == 429:
            if self.extra("rate_limit_kind", "rate_limit") == "insufficient_quota":
                return self.oai_error(429, MSG_QUOTA, "insufficient_quota", None, "insufficient_quota",
                                      {**(headers or {}), "x-should-retry": "false"})
            return self.oai_error(429, "Rate limit reached for images in organization org-simulated on requests "
                                       "per min (RPM). Please try again later.", "requests", None,
                                  "rate_limit_exceeded", {**(headers or {}), "x-should-retry": "true"})
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

    def expired_file_response(self) -> Response:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
        request_id = f"RequestId:{secrets.token_hex(4)}-{secrets.token_hex(2)}-0000-0000-{secrets.token_hex(6)}"
        if int(self.extra("expired_url_status", 404)) == 403:
            code, status = "AuthenticationFailed", 403
            text = ("Server failed to authenticate the request. Make sure the value of Authorization header is "
                    "formed correctly including the signature.")
        else:
            code, status, text = "BlobNotFound", 404, "The specified blob does not exist."
        body = (f'\ufeff<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{text}\n'
                f"{request_id}\nTime:{now}</Message></Error>")
        return Response(body.encode(), status_code=status, media_type="application/xml",
                        headers={"x-ms-error-code": code})

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/images/generations", self.generate, methods=["POST"]),
            Route("/v1/images/edits", self.edit, methods=["POST"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        key = bearer(request)
        if key is None:
            return self.oai_error(401, MSG_NO_KEY)
        if not self.config.key_ok(key):
            shown = key[:3] + "*" * 8 + key[-4:] if len(key) > 8 else key
            return self.oai_error(401, f"Incorrect API key provided: {shown}. You can find your API key at "
                                       "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        return None

    async def generate(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("generate")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.oai_error(400, MSG_BAD_JSON)
        try:
            if not isinstance(body, dict):
                raise InvalidRequest(MSG_BAD_JSON)
            job = self.parse("generate", body, 0)
        except InvalidRequest as err:
            return self.invalid(err)
        return await self.run(request, job)

    async def edit(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("edit")) is not None:
            return injected
        try:
            body, images = await self._edit_body(request)
            job = self.parse("edit", body, len(images))
        except InvalidRequest as err:
            return self.invalid(err)
        return await self.run(request, job)

    # -- request parsing -------------------------------------------------------
    async def _edit_body(self, request: Request) -> tuple[dict[str, Any], list[bytes | None]]:
        """The edit's fields and its input images (``None`` for URL / file-id references)."""
        ctype = request.headers.get("content-type", "")
        raw = await request.body()
        if ctype.split(";")[0].strip().lower() == "application/json" and self.extra("json_edits", True):
            try:
                body = json.loads(raw)
            except ValueError:
                raise InvalidRequest(MSG_BAD_JSON) from None
            if not isinstance(body, dict):
                raise InvalidRequest(MSG_BAD_JSON)
            refs = body.get("images")
            if not isinstance(refs, list) or not refs:
                raise InvalidRequest("Missing required parameter: 'images'.", "images", "missing_required_parameter")
            images: list[bytes | None] = [self._reference(f"images[{i}]", ref) for i, ref in enumerate(refs)]
            mask = self._reference("mask", body["mask"]) if "mask" in body else None
            self._check_images(images, mask)
            return body, images
        try:
            fields, files = read_multipart(ctype, raw)
        except ValueError:
            raise InvalidRequest("Invalid Content-Type header (expected multipart/form-data with a boundary)."
                                 ) from None
        body = _typed_form(fields)
        for name, _ in files:
            if not (_INDEXED_IMAGE.match(name) or name in ("image", "mask")):
                raise InvalidRequest(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        images = [data for name, (_, _, data) in files if name != "mask"]
        masks = [data for name, (_, _, data) in files if name == "mask"]
        if not images:
            raise InvalidRequest("Missing required parameter: 'image'.", "image", "missing_required_parameter")
        body["image"] = [hashlib.sha256(data).hexdigest()[:16] for data in images if data is not None]
        if masks:
            body["mask"] = True
        self._check_images(images, masks[0] if masks else None)
        return body, images

    @staticmethod
    def _reference(param: str, ref: Any) -> bytes | None:
        """Bytes of a JSON edit's ``{image_url: data:...}``; ``None`` for https URLs and file ids."""
        if isinstance(ref, dict) and isinstance(ref.get("file_id"), str):
            return None
        url = ref.get("image_url") if isinstance(ref, dict) else None
        if not isinstance(url, str):
            raise InvalidRequest(f"Invalid '{param}': expected an object with 'image_url' or 'file_id'.",
                                 param, "invalid_value")
        if url.startswith("https://"):
            return None  # fetched by OpenAI; the simulator has no network
        match = _DATA_URL.match(url)
        if match is None:
            raise InvalidRequest(f"Invalid '{param}.image_url': expected an https URL or a base64 data URL.",
                                 param, "invalid_value")
        try:
            return base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"Invalid base64 image data in '{param}'.", param, "invalid_value") from None

    @staticmethod
    def _check_images(images: list[bytes | None], mask: bytes | None) -> None:
        if len(images) > MAX_EDIT_IMAGES:
            raise InvalidRequest(f"Invalid 'image': array too long. Expected an array with maximum length "
                                 f"{MAX_EDIT_IMAGES}, but got an array with length {len(images)} instead.",
                                 "image", "array_above_max_length")
        for data in images:
            if data is None:
                continue
            if image_kind(data) is None:
                raise InvalidRequest("Invalid file 'image': unsupported mimetype. Supported file formats are "
                                     "'image/jpeg', 'image/png', and 'image/webp'.", "image",
                                     "unsupported_file_mimetype")
            if len(data) >= MAX_IMAGE_BYTES:
                raise InvalidRequest("Invalid file 'image': the image must be smaller than 50 MB.", "image",
                                     "image_too_large")
        if mask is None:
            return
        if image_kind(mask) != "png" or len(mask) >= MAX_MASK_BYTES:
            raise InvalidRequest("Invalid file 'mask': the mask must be a PNG file smaller than 4 MB.", "mask",
                                 "invalid_image_format")
        if not png_has_alpha(mask):
            raise InvalidRequest("Invalid mask image format - mask image missing alpha channel.", "mask",
                                 "invalid_image_format")
        first = images[0]
        if first is not None and image_size(first) not in (None, image_size(mask)):
            raise InvalidRequest("Invalid mask: the mask and the image must have the same dimensions.", "mask",
                                 "invalid_image_format")

    def parse(self, route: str, body: dict[str, Any], input_images: int) -> ImageJob:
        """Validate a generation or edit body (JSON types) against the model's rules."""
        allowed = GENERATE_FIELDS if route == "generate" else EDIT_FIELDS
        for key in body:
            if key not in allowed:
                raise InvalidRequest(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
        model = body.get("model")
        if model is None:
            gpt_only = any(body.get(k) is not None for k in GPT_ONLY)
            model = "gpt-image-1.5" if route == "edit" else ("gpt-image-1" if gpt_only else "dall-e-2")
        if not isinstance(model, str):
            raise InvalidRequest(f"Invalid type for 'model': expected a string, but got {_type_name(model)} "
                                 "instead.", "model", "invalid_type")
        spec = MODELS.get(model)
        if spec is None:
            raise InvalidRequest(f"The model `{model}` does not exist or you do not have access to it.",
                                 code="model_not_found", status=404)
        if route == "edit" and not spec.edits:
            edit_models = tuple(m for m, s in MODELS.items() if s.edits)
            raise InvalidRequest(f"Invalid value: '{model}'. Supported values are: {_quoted(edit_models)}.",
                                 "model", "invalid_value")
        for key in DALLE_ONLY if spec.gpt else GPT_ONLY:
            if body.get(key) is not None:
                raise InvalidRequest(f"Unknown parameter: '{key}'.", key, "unknown_parameter")

        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            raise InvalidRequest("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str):
            raise InvalidRequest(f"Invalid type for 'prompt': expected a string, but got {_type_name(prompt)} "
                                 "instead.", "prompt", "invalid_type")
        if len(prompt) > spec.max_prompt:
            raise InvalidRequest(f"Invalid 'prompt': string too long. Expected a string with maximum length "
                                 f"{spec.max_prompt}, but got a string with length {len(prompt)} instead.",
                                 "prompt", "string_above_max_length")
        n = _integer("n", body.get("n", 1), 1, 10)
        if n > spec.max_n:
            raise InvalidRequest(f"Invalid 'n': integer above maximum value. Expected a value <= {spec.max_n}, "
                                 f"but got {n} instead.", "n", "integer_above_max_value")

        size = body.get("size") or ("auto" if spec.gpt else "1024x1024")
        if spec.free_size and isinstance(size, str) and size not in spec.sizes:
            size = _free_size(size)
        else:
            size = _choice("size", size, spec.sizes)
        if size == "auto":
            size = "1024x1024"
        quality = _choice("quality", body.get("quality") or ("auto" if spec.gpt else "standard"), spec.qualities)

        if not spec.gpt:
            if body.get("style") is not None:
                _choice("style", body["style"], ("vivid", "natural"))
            response_format = _choice("response_format", body.get("response_format") or "url", ("url", "b64_json"))
            return ImageJob(route, model, spec, prompt, n, size, quality, "opaque", "png", response_format,
                            False, 0, input_images, self._identity(route, model, body))

        output_format = _choice("output_format", body.get("output_format") or "png", OUTPUT_FORMATS)
        background = _choice("background", body.get("background") or "auto", BACKGROUNDS)
        if background == "transparent":
            if output_format == "jpeg":
                raise InvalidRequest("Transparent background is not supported for the 'jpeg' output format; use "
                                     "'png' or 'webp'.", "background", "invalid_value")
            if model == "gpt-image-2" and not self.extra("gpt_image_2_transparent", True):
                raise InvalidRequest(f"Transparent background is not supported for {model}.", "background",
                                     "invalid_value")
        if body.get("output_compression") is not None:
            _integer("output_compression", body["output_compression"], 0, 100)
        if body.get("moderation") is not None:
            _choice("moderation", body["moderation"], ("auto", "low"))
        if body.get("input_fidelity") is not None:
            fidelity = spec.input_fidelity
            if model == "gpt-image-2" and not self.extra("gpt_image_2_input_fidelity", True):
                fidelity = ()
            if not fidelity:
                raise InvalidRequest(f"Unknown parameter: 'input_fidelity' is not supported for {model}.",
                                     "input_fidelity", "unknown_parameter")
            _choice("input_fidelity", body["input_fidelity"], fidelity)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest(f"Invalid type for 'stream': expected a boolean, but got {_type_name(stream)} "
                                 "instead.", "stream", "invalid_type")
        partials = _integer("partial_images", body.get("partial_images", 0), 0, 3) if stream else 0
        return ImageJob(route, model, spec, prompt, n, size, "medium" if quality == "auto" else quality,
                        "opaque" if background == "auto" else background, output_format, "b64_json",
                        stream, partials, input_images, self._identity(route, model, body))

    @staticmethod
    def _identity(route: str, model: str, body: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{route}:{model}:{digest}"

    # -- generation --------------------------------------------------------------
    async def run(self, request: Request, job: ImageJob) -> Response:
        """Hold the request for the run time, bill, and answer with the images."""
        if job.spec.gpt and bearer(request) in self.extra("unverified_keys", []):
            return self.oai_error(
                int(self.extra("unverified_status", 403)),
                f"Your organization must be verified to use the model `{job.model}`. Please go to: "
                "https://platform.openai.com/settings/organization/general and click on Verify Organization. "
                "If you just verified, it can take up to 15 minutes for access to propagate.")
        limit = self.extra("images_per_minute", None)
        wait, used = self.window.admit(job.model, job.n, None if limit is None else int(limit))
        if wait:
            return self.oai_error(
                429, f"Rate limit reached for {job.model} in organization org-simulated on images per min (IPM): "
                     f"Limit {limit}, Used {used}, Requested {job.n}. Please try again in {wait:.3f}s. Visit "
                     "https://platform.openai.com/account/rate-limits to learn more.",
                "images", None, "rate_limit_exceeded",
                {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000)),
                 "x-should-retry": "true"})
        d = directives(job.prompt)
        stage = d.get("refuse")
        if stage is not None and stage != "output":
            return self.refusal(job, "input")
        run = float(d.get("run") or self.config.run_seconds)
        if job.stream:
            return self._stream(job, run, refuse=stage == "output")
        started = time.monotonic()
        await asyncio.sleep(run)
        if stage == "output":
            if self.extra("bill_output_refusals", False):
                self.record_creation(job.identity)
            return self.refusal(job, "output")
        images = self.render(job)
        self.record_creation(job.identity)
        if "drop" in d:
            return DroppedConnection()
        if (injected := await self.fault(job.route, after_effect=True)) is not None:
            return injected
        body = self.response_body(job, images, self.origin(request))
        return JSONResponse(body, headers=self._headers(processing_ms=int((time.monotonic() - started) * 1000)))

    def refusal_error(self, job: ImageJob, stage: str) -> dict[str, Any]:
        """The error object of a content refusal at the ``input`` or ``output`` stage."""
        if not job.spec.gpt:
            return {"message": MSG_CONTENT_POLICY, "type": "invalid_request_error", "param": None,
                    "code": "content_policy_violation"}
        error: dict[str, Any] = {"message": MSG_REFUSED.format(request_id="req_" + secrets.token_hex(16)),
                                 "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}
        if self.extra("moderation_details", True):
            error["moderation_details"] = {"moderation_stage": stage, "categories": ["violence"]}
        return error

    def refusal(self, job: ImageJob, stage: str) -> Response:
        return JSONResponse({"error": self.refusal_error(job, stage)}, status_code=400, headers=self._headers())

    def render(self, job: ImageJob) -> list[bytes]:
        w, h = job.dimensions
        seed = secrets.token_hex(8)
        return [self._image(job.output_format, f"{job.model}:{seed}:{i}", w, h) for i in range(job.n)]

    @staticmethod
    def _image(fmt: str, seed: str, w: int, h: int) -> bytes:
        sw, sh = max(1, w // SCALE), max(1, h // SCALE)
        if fmt == "jpeg":
            return jpeg(seed, sw, sh)
        if fmt == "webp":
            return webp(seed)
        return media.png(seed, sw, sh)

    def usage(self, job: ImageJob, images: int) -> dict[str, Any]:
        text_tokens = max(1, math.ceil(len(job.prompt) / 4))
        image_tokens = IMAGE_INPUT_TOKENS * job.input_images
        w, h = job.dimensions
        table = OUTPUT_TOKENS[job.quality]
        per_image = table.get(job.size) or round(table["1024x1024"] * w * h / (1024 * 1024))
        output = per_image * images + PARTIAL_IMAGE_TOKENS * job.partial_images
        return {"input_tokens": text_tokens + image_tokens,
                "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
                "output_tokens": output, "total_tokens": text_tokens + image_tokens + output,
                "output_tokens_details": {"image_tokens": output, "text_tokens": 0}}

    def response_body(self, job: ImageJob, images: list[bytes], origin: str) -> dict[str, Any]:
        created = int(time.time())
        if job.spec.gpt:
            return {"created": created, "background": job.background, "output_format": job.output_format,
                    "quality": job.quality, "size": job.size,
                    "data": [{"b64_json": base64.b64encode(data).decode()} for data in images],
                    "usage": self.usage(job, len(images))}
        revised = "A detailed, vivid rendering of " + re.sub(r"\s*\[sim:[^\]]*\]", "", job.prompt).strip()
        data: list[dict[str, Any]] = []
        for image in images:
            if job.response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(image).decode(), "revised_prompt": revised})
            else:
                data.append({"url": self._blob_url(origin, image), "revised_prompt": revised})
        return {"created": created, "data": data}

    def _blob_url(self, origin: str, image: bytes) -> str:
        """An Azure-blob-style SAS URL that stops working after ``output_ttl_seconds``."""
        path = self.files.publish(image, "image/png", f"img-{secrets.token_urlsafe(18)}.png")
        now = time.time()

        def stamp(ts: float) -> str:
            return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H%%3A%M%%3A%SZ")

        sig = base64.b64encode(secrets.token_bytes(32)).decode().replace("+", "%2B").replace("/", "%2F")
        return (f"{origin}{path}?st={stamp(now - 300)}&se={stamp(now + self.config.output_ttl_seconds)}"
                f"&sp=r&sv=2024-08-04&sr=b&rscd=inline&rsct=image/png&sig={sig.replace('=', '%3D')}")

    def _stream(self, job: ImageJob, run: float, *, refuse: bool) -> Response:
        """Server-sent events: partial images over the run time, then one ``*.completed`` per image."""
        prefix = "image_generation" if job.route == "generate" else "image_edit"

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            meta = {"background": job.background, "output_format": job.output_format, "quality": job.quality,
                    "size": job.size}
            step = run / (job.partial_images + 1)
            for index in range(job.partial_images):
                await asyncio.sleep(step)
                preview = self._image(job.output_format, f"partial:{secrets.token_hex(4)}", *job.dimensions)
                yield event(f"{prefix}.partial_image", {
                    "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(preview).decode(),
                    "partial_image_index": index, "created_at": int(time.time()), **meta})
            await asyncio.sleep(step)
            if refuse:
                if self.extra("bill_output_refusals", False):
                    self.record_creation(job.identity)
                yield event("error", {"type": "error", "error": self.refusal_error(job, "output")})
                return
            images = self.render(job)
            self.record_creation(job.identity)
            usage = self.usage(job, 1)
            for image in images:
                yield event(f"{prefix}.completed", {
                    "type": f"{prefix}.completed", "b64_json": base64.b64encode(image).decode(),
                    "created_at": int(time.time()), "usage": usage, **meta})

        return StreamingResponse(events(), media_type="text/event-stream", headers=self._headers())

