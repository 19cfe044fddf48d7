"""Jimeng / Dreamina simulator: Volcengine's visual ("CV") API with V4-signed requests.

Written from the documented wire format (shared/providers/video-wave2.md §4), not from our
adapter. The image ``req_key`` values and their result fields (``binary_data_base64``, or
``image_urls`` when ``req_json`` asks ``return_url``) are not in the reference: they come from a
public copy of Volcengine's "即梦4.0" page (docs 85621), which shares the action pair and envelope.

Routes (the simulator's origin stands for ``https://visual.volcengineapi.com``):

- ``POST /?Action=CVSync2AsyncSubmitTask&Version=2022-08-31``: ``{req_key, prompt, ...}`` ->
  ``{"code": 10000, "data": {"task_id": "<19 digits>"}, "message": "Success", "request_id",
  "status": 10000, "time_elapsed"}``.
- ``POST /?Action=CVSync2AsyncGetResult&Version=2022-08-31`` (also a POST): ``{req_key, task_id,
  req_json?}`` -> ``data.status`` ``in_queue`` -> ``generating`` -> ``done`` with ``video_url``
  (video) or ``binary_data_base64`` / ``image_urls`` (images); ``not_found`` for unknown ids, for
  another ``req_key`` than the submit's, and for tasks older than ``extra["task_ttl_seconds"]``
  (12 h); ``expired``. A failed task is **not** ``done``+10000: the outer ``code`` says it, with
  the HTTP status set too (50511 output moderation -> 400, 50500 -> 500), ``data: null``.
- ``GET /tos-cn-i-jimeng/{name}?x-expires=&x-signature=``: outputs (real MP4/PNG, distinct per
  task), 403 once expired: video ``output_ttl_seconds`` (1 h at Volcengine), image URLs
  ``extra["image_url_ttl_seconds"]`` (24 h).

Signing (every request): ``Authorization: HMAC-SHA256 Credential={AK}/{YYYYMMDD}/cn-north-1/cv/request,
SignedHeaders=..., Signature=...``, ``X-Date`` (``YYYYMMDD'T'HHMMSS'Z'``), ``X-Content-Sha256``. The
simulator recomputes the signature over the request as received (method, raw path, sorted query,
the signed headers, the SHA-256 of the body bytes) with the secret key of the AK
(``extra["key_pairs"]``, plus ``"AK:SK"`` entries of ``SimConfig.api_keys``). Refusals use the
Volcengine OpenAPI gateway shape ``{"ResponseMetadata": {RequestId, Action, Version, Service,
Region, Error: {CodeN, Code, Message}}}``: ``InvalidAuthorization`` (100024, 400) for a missing or
malformed header, ``MissingRequestInfo`` (100004, 400) without ``X-Date``, ``InvalidAccessKey``
(100009) and ``SignatureDoesNotMatch`` (100010; also a wrong scope or an ``X-Date`` more than
``extra["max_clock_skew_seconds"]`` off, UNCONFIRMED) with HTTP ``extra["auth_error_status"]`` (401).
An unknown Action or Version: 404 ``InvalidActionOrVersion``. Signatures are checked before the
Action, as Volcengine's gateway does.

Business errors: ``{code, data: null, message, request_id, status, time_elapsed}`` with HTTP 400
(50411 input image, 50412 input text, 50413 sensitive terms, ``extra["invalid_param_code"]`` =
50400 for bad fields, UNCONFIRMED), 429 (50429 QPS, 50430 concurrency), 500 (50500, 50501). They
arrive on GetResult too: a 429 there is not a task failure.

No callback, no cancel, no list, no client id.

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]``; at submit (no task): ``[sim:blocked]``
50412, ``[sim:sensitive]`` 50413, ``[sim:image_risk]`` 50411, ``[sim:qps]`` 50429,
``[sim:concurrency]`` 50430; at the result: ``[sim:filtered]`` 50511, ``[sim:fail]`` 50500,
``[sim:expired]`` ``expired``; ``[sim:images=N]`` N output images (``jimeng_t2i_v40``).

``SimConfig.extra`` knobs: ``key_pairs`` ({"sandbox-ak": "sandbox-sk"}), ``region`` ("cn-north-1"),
``service`` ("cv"), ``max_clock_skew_seconds`` (900), ``auth_error_status`` (401),
``invalid_param_code`` (50400), ``task_ttl_seconds`` (43200), ``stale_status`` ("not_found" |
"expired"), ``result_req_key`` ("strict": another req_key is ``not_found`` | "lenient": the
CONFLICT with new-api, which always polls with ``jimeng_vgfm_t2v_l20``), ``failed_result_data``
("null", as the documented example | "done": ``{"status": "done", "video_url": ""}``),
``image_url_ttl_seconds`` (86400), ``qps`` (None = unlimited; submits per second, else 50429),
``max_concurrent`` (None; unfinished tasks, else 50430), ``req_keys`` ({req_key: {"kind":
"video"|"image", "images": [min, max]}} merged over ``REQ_KEYS``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, directives, new_id, route_path

VERSION = "2022-08-31"
SUBMIT, RESULT = "CVSync2AsyncSubmitTask", "CVSync2AsyncGetResult"
ALGORITHM = "HMAC-SHA256"

# kind and (min, max) input images. Video keys: reference §4.2 (1080p suffixes UNCONFIRMED);
# image keys: Volcengine's 即梦 image pages (not in the reference).
REQ_KEYS: dict[str, dict[str, Any]] = {
    "jimeng_ti2v_v30_pro": {"kind": "video", "images": (0, 1)},
    "jimeng_t2v_v30": {"kind": "video", "images": (0, 0)},
    "jimeng_i2v_first_v30": {"kind": "video", "images": (1, 1)},
    "jimeng_i2v_first_tail_v30": {"kind": "video", "images": (2, 2)},
    "jimeng_t2v_v30_1080p": {"kind": "video", "images": (0, 0)},
    "jimeng_i2v_first_v30_1080": {"kind": "video", "images": (1, 1)},
    "jimeng_i2v_first_tail_v30_1080": {"kind": "video", "images": (2, 2)},
    "jimeng_vgfm_t2v_l20": {"kind": "video", "images": (0, 0)},
    "jimeng_t2i_v40": {"kind": "image", "images": (0, 10)},
    "jimeng_t2i_v30": {"kind": "image", "images": (0, 0)},
    "jimeng_t2i_v31": {"kind": "image", "images": (0, 0)},
}
FRAMES = (121, 241)
ASPECT_RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9")
BUSINESS = {
    50411: (400, "Pre Img Risk Not Pass"),
    50412: (400, "Text Risk Not Pass"),
    50413: (400, "Post Text Risk Not Pass"),
    50511: (400, "Post Img Risk Not Pass"),
    50429: (429, "Request Has Reached API Limit, Please Try Later"),
    50430: (429, "Request Has Reached API Concurrent Limit, Please Try Later"),
    50500: (500, "Internal Error"),
    50501: (500, "Internal RPC Error"),
}
SUBMIT_DIRECTIVES = {"blocked": 50412, "sensitive": 50413, "image_risk": 50411, "qps": 50429, "concurrency": 50430}
X_DATE = re.compile(r"^(\d{8})T\d{6}Z$")
AUTH_HEADER = re.compile(r"^HMAC-SHA256 Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-fA-F]+)$")
MAX_IMAGE_BYTES = 4_700_000


# -- Volcengine V4 signing (what the gateway recomputes) --------------------------------------
def canonical_query(raw_query: str) -> str:
    """Query parameters sorted by key, each side percent-encoded (RFC 3986 unreserved kept)."""
    pairs = sorted(parse_qsl(raw_query, keep_blank_values=True))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def canonical_request(method: str, path: str, query: str, headers: dict[str, str], signed: list[str],
                      payload_hash: str) -> str:
    """``METHOD\\npath\\nquery\\nname:value\\n...\\n\\nsigned;headers\\npayload-hash`` (headers lowercased)."""
    canon_headers = "".join(f"{name}:{headers.get(name, '').strip()}\n" for name in signed)
    return "\n".join([method, path or "/", query, canon_headers, ";".join(signed), payload_hash])


def string_to_sign(x_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, x_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def signature(secret_key: str, date: str, region: str, service: str, to_sign: str) -> str:
    """Hex HMAC-SHA256 with the key derived from the **raw** SK (no "AWS4" prefix, unlike SigV4)."""
    key = secret_key.encode()
    for part in (date, region, service, "request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str, code_n: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.code_n = status, code, message, code_n


class CvError(Exception):
    def __init__(self, code: int, message: str | None = None) -> None:
        status, text = BUSINESS.get(code, (400, "Invalid Request"))
        super().__init__(message or text)
        self.status, self.code, self.message = status, code, message or text


class JimengSimulator(Simulator):
    name = "jimeng"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self._submits: deque[float] = deque()
        self._url_secret = secrets.token_bytes(32)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    def key_pairs(self) -> dict[str, str]:
        pairs = dict(self._x("key_pairs", None) or {"sandbox-ak": "sandbox-sk"})
        for item in self.config.api_keys:
            ak, sep, sk = item.partition(":")
            if sep and ak and sk:
                pairs[ak] = sk
        return pairs

    def req_keys(self) -> dict[str, dict[str, Any]]:
        return REQ_KEYS | (self._x("req_keys", None) or {})

    # -- wire format -------------------------------------------------------
    def envelope(self, code: int, data: Any, message: str, started: float, status: int = 200) -> Response:
        elapsed = f"{(time.perf_counter() - started) * 1000:.6f}ms"
        body = {"code": code, "data": data, "message": message, "request_id": _request_id(), "status": code,
                "time_elapsed": elapsed}
        return JSONResponse(body, status_code=status)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        code = 50429 if status == 429 else 50500 if status >= 500 else int(self._x("invalid_param_code", 50400))
        text = BUSINESS.get(code, (status, message))[1]
        body = {"code": code, "data": None, "message": text, "request_id": _request_id(), "status": code,
                "time_elapsed": "0.5ms"}
        return JSONResponse(body, status_code=status, headers=headers)

    def gateway_error(self, request: Request, err: GatewayError) -> Response:
        error: dict[str, Any] = {"Code": err.code, "Message": err.message}
        if err.code_n is not None:
            error = {"CodeN": err.code_n} | error
        meta = {"RequestId": _request_id(), "Action": request.query_params.get("Action", ""),
                "Version": request.query_params.get("Version", ""), "Service": self._x("service", "cv"),
                "Region": self._x("region", "cn-north-1"), "Error": error}
        return JSONResponse({"ResponseMetadata": meta}, status_code=err.status)

    def verify_signature(self, request: Request, body: bytes) -> None:
        """Recompute the V4 signature of the request as received; raise GatewayError if it is wrong."""
        auth_status = int(self._x("auth_error_status", 401))
        match = AUTH_HEADER.match(request.headers.get("authorization", "").strip())
        if match is None:
            raise GatewayError(400, "InvalidAuthorization", "Invalid 'Authorization' header", 100024)
        credential, signed_list, given = match.groups()
        x_date = request.headers.get("x-date", "")
        date_match = X_DATE.match(x_date)
        if date_match is None:
            raise GatewayError(400, "MissingRequestInfo", "The request is missing timestamp information.", 100004)
        signed = signed_list.lower().split(";")
        if not {"host", "x-date"} <= set(signed):
            raise GatewayError(400, "InvalidAuthorization", "Invalid 'Authorization' header: SignedHeaders must "
                                                            "include host and x-date", 100024)
        parts = credential.split("/")
        secret = self.key_pairs().get(parts[0])
        if secret is None:
            raise GatewayError(auth_status, "InvalidAccessKey", "The access key you provided is invalid.", 100009)
        mismatch = "The request signature we calculated does not match the signature you provided."
        region, service = str(self._x("region", "cn-north-1")), str(self._x("service", "cv"))
        if len(parts) != 5 or parts[1:] != [date_match.group(1), region, service, "request"]:
            raise GatewayError(auth_status, "SignatureDoesNotMatch",
                               f"{mismatch} The credential scope must be <date of X-Date>/{region}/{service}/request.",
                               100010)
        sent_at = datetime.strptime(x_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        if abs(time.time() - sent_at) > float(self._x("max_clock_skew_seconds", 900)):
            raise GatewayError(auth_status, "SignatureDoesNotMatch", f"{mismatch} X-Date {x_date} is too far "
                                                                     "from the server time.", 100010)
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        headers = {name: request.headers.get(name, "") for name in signed}
        canonical = canonical_request(request.method, raw_path.decode("latin-1"),
                                      canonical_query(request.url.query), headers, signed,
                                      hashlib.sha256(body).hexdigest())
        expected = signature(secret, date_match.group(1), region, service,
                             string_to_sign(x_date, "/".join(parts[1:]), canonical))
        if not hmac.compare_digest(expected, given.lower()):
            raise GatewayError(auth_status, "SignatureDoesNotMatch", mismatch, 100010)

    # -- signed, expiring output URLs --------------------------------------
    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self._url_secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def _publish(self, data: bytes, ctype: str, ext: str, ttl: float, origin: str) -> str:
        path = f"/tos-cn-i-jimeng/{secrets.token_hex(16)}.{ext}"
        expires = time.time() + ttl
        self.files.files[path] = StoredFile(data, ctype, expires)
        stamp = math.ceil(expires)
        return f"{origin}{path}?x-expires={stamp}&x-signature={self._sign(path, stamp)}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)
        stamp = request.query_params.get("x-expires", "")
        stored = self.files.get(path)
        if stored is None or not stamp.isdigit() or not hmac.compare_digest(
                request.query_params.get("x-signature", ""), self._sign(path, int(stamp))):
            return self.expired_file_response()
        return Response(stored.data, media_type=stored.content_type)

    def expired_file_response(self) -> Response:
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>' \
               b"<Message>Request has expired</Message></Error>"
        return Response(body, status_code=403, media_type="application/xml")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.action, methods=["POST"]),
            Route("/tos-cn-i-jimeng/{name}", self.download, methods=["GET"]),
        ]

    async def action(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await request.body()
        try:
            self.verify_signature(request, body)
        except GatewayError as err:
            return self.gateway_error(request, err)
        name, version = request.query_params.get("Action"), request.query_params.get("Version")
        if name not in (SUBMIT, RESULT) or version != VERSION:
            return self.gateway_error(request, GatewayError(404, "InvalidActionOrVersion", "Could not find operation "
                                                                 f"{name} at version {version}"))
        route = "submit" if name == SUBMIT else "result"
        if (injected := await self.fault(route)) is not None:
            return injected
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError
        except ValueError:
            return self.error_response(400, "Invalid Request: the body is not a JSON object")
        try:
            if name == SUBMIT:
                return await self.submit(request, payload, body, started)
            return self.get_result(request, payload, started)
        except CvError as err:
            return self.envelope(err.code, None, err.message, started, err.status)

    def _invalid(self, message: str) -> CvError:
        return CvError(int(self._x("invalid_param_code", 50400)), f"Invalid Request: {message}")

    async def submit(self, request: Request, payload: dict[str, Any], raw: bytes, started: float) -> Response:
        req_key, keys = payload.get("req_key"), self.req_keys()
        if not isinstance(req_key, str) or req_key not in keys:
            raise self._invalid(f"unsupported req_key {json.dumps(req_key)}")
        spec = keys[req_key]
        prompt = self.validate(req_key, spec, payload)
        d = directives(prompt)
        for directive, code in SUBMIT_DIRECTIVES.items():
            if directive in d:
                raise CvError(code)
        now = time.time()
        qps, limit = self._x("qps", None), self._x("max_concurrent", None)
        while self._submits and self._submits[0] <= now - 1.0:
            self._submits.popleft()
        if qps is not None and len(self._submits) >= int(qps):
            raise CvError(50429)
        if limit is not None and sum(t.phase(now) in ("queued", "running") for t in self.tasks.values()) >= int(limit):
            raise CvError(50430)
        self._submits.append(now)
        task = SimTask.create("7" + new_id("0123456789", 18), self.config, prompt,
                              input={"req_key": req_key, "prompt": prompt},
                              data={"kind": spec["kind"], "images": _image_count(d, payload)})
        self.tasks[task.id] = task
        self.record_creation(f"{req_key}:{hashlib.sha256(raw).hexdigest()}")  # no client id: each submit bills
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        return self.envelope(10000, {"task_id": task.id}, "Success", started)

    def validate(self, req_key: str, spec: dict[str, Any], payload: dict[str, Any]) -> str:
        """Check a submit body as documented; returns the prompt."""
        prompt = payload.get("prompt", "")
        if not isinstance(prompt, str):
            raise self._invalid("prompt must be a string")
        if len(prompt) > 800:
            raise self._invalid("prompt must be at most 800 characters")
        urls, b64 = payload.get("image_urls"), payload.get("binary_data_base64")
        if urls is not None and b64 is not None:
            raise self._invalid("pass either image_urls or binary_data_base64, not both")
        images: list[Any] = urls if isinstance(urls, list) else b64 if isinstance(b64, list) else []
        if (urls is not None and not isinstance(urls, list)) or (b64 is not None and not isinstance(b64, list)):
            raise self._invalid("image_urls and binary_data_base64 must be arrays of strings")
        for item in images:
            _check_image(item, base64_item=b64 is not None, invalid=self._invalid)
        low, high = spec["images"]
        if not low <= len(images) <= high:
            raise self._invalid(f"{req_key} takes {low}-{high} input images, got {len(images)}")
        if not prompt.strip() and not images:
            raise self._invalid("prompt must not be empty")
        if spec["kind"] == "video":
            frames = payload.get("frames", 121)
            if isinstance(frames, bool) or frames not in FRAMES:
                raise self._invalid("frames must be 121 (5 s) or 241 (10 s)")
            ratio = payload.get("aspect_ratio", "16:9")
            if ratio not in ASPECT_RATIOS:
                raise self._invalid(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}")
        for name in ("seed", "width", "height", "size"):
            value = payload.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise self._invalid(f"{name} must be an integer")
        return prompt

    def get_result(self, request: Request, payload: dict[str, Any], started: float) -> Response:
        req_key, task_id = payload.get("req_key"), payload.get("task_id")
        if not isinstance(req_key, str) or req_key not in self.req_keys():
            raise self._invalid(f"unsupported req_key {json.dumps(req_key)}")
        if not isinstance(task_id, str) or not task_id:
            raise self._invalid("task_id is required")
        options = payload.get("req_json", "{}")
        try:
            req_json = json.loads(options) if isinstance(options, str) else None
        except ValueError:
            req_json = None
        if not isinstance(req_json, dict):
            raise self._invalid("req_json must be a JSON-encoded object string")
        kind = self.req_keys()[req_key]["kind"]
        task = self.tasks.get(task_id)
        now = time.time()
        if task is not None and req_key != task.input["req_key"] and self._x("result_req_key", "strict") == "strict":
            task = None
        if task is None:
            return self.envelope(10000, _data(kind, "not_found"), "Success", started)
        if now - task.created_at > float(self._x("task_ttl_seconds", 43200)):
            return self.envelope(10000, _data(kind, str(self._x("stale_status", "not_found"))), "Success", started)
        phase = task.phase(now)
        if phase != "done":
            return self.envelope(10000, _data(kind, "in_queue" if phase == "queued" else "generating"), "Success",
                                 started)
        if task.outcome in ("filtered", "fail"):
            code = 50511 if task.outcome == "filtered" else 50500
            status, message = BUSINESS[code]
            data = _data(kind, "done") if self._x("failed_result_data", "null") == "done" else None
            return self.envelope(code, data, message, started, status)
        if task.outcome == "expired":
            return self.envelope(10000, _data(kind, "expired"), "Success", started)
        return self.envelope(10000, self._result(task, kind, req_json, self.origin(request)), "Success", started)

    def _result(self, task: SimTask, kind: str, req_json: dict[str, Any], origin: str) -> dict[str, Any]:
        if kind == "video":
            url = task.data.get("video_url")
            if url is None:
                url = self._publish(media.mp4(f"jimeng:{task.id}"), "video/mp4", "mp4",
                                    self.config.output_ttl_seconds, origin)
                task.data["video_url"] = url
            return {"status": "done", "video_url": url, "aigc_meta_tagged": "aigc_meta" in req_json}
        pngs = [media.png(f"jimeng:{task.id}:{i}") for i in range(task.data["images"])]
        if req_json.get("return_url") is True:
            ttl = float(self._x("image_url_ttl_seconds", 86400))
            urls = [self._publish(p, "image/png", "png", ttl, origin) for p in pngs]
            return {"status": "done", "binary_data_base64": None, "image_urls": urls}
        return {"status": "done", "binary_data_base64": [base64.b64encode(p).decode() for p in pngs],
                "image_urls": None}


def _data(kind: str, status: str) -> dict[str, Any]:
    if kind == "video":
        return {"status": status, "video_url": ""}
    return {"status": status, "binary_data_base64": None, "image_urls": None}


def _image_count(d: dict[str, str], payload: dict[str, Any]) -> int:
    if payload.get("force_single") is True:
        return 1
    try:
        return max(1, min(15, int(d.get("images") or 1)))
    except ValueError:
        return 1


def _check_image(item: Any, *, base64_item: bool, invalid: Callable[[str], CvError]) -> None:
    if not isinstance(item, str) or not item:
        raise invalid("images must be non-empty strings")
    if not base64_item:
        if not item.startswith(("http://", "https://")):
            raise invalid("image_urls must be http(s) URLs")
        return
    if item.startswith("data:"):
        raise invalid("binary_data_base64 items must be bare base64, without a data: prefix")
    try:
        raw = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("binary_data_base64 item is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise invalid("input image exceeds 4.7 MB")


def _request_id() -> str:
    """Volcengine's request ids: China-time ``YYYYMMDDhhmmss`` and 20 hex digits."""
    stamp = datetime.now(timezone(timedelta(hours=8))).strftime("%Y%m%d%H%M%S")
    return stamp + secrets.token_hex(10).upper()
