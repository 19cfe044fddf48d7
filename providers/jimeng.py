"""Jimeng / Dreamina on Volcengine's visual ("CV") API (``https://visual.volcengineapi.com``).

Both actions are POSTs to ``/`` with the action in the query string (part of the signature):

* ``?Action=CVSync2AsyncSubmitTask&Version=2022-08-31``: ``{req_key, prompt, image_urls |
  binary_data_base64, seed, frames, aspect_ratio, ...}`` -> ``{code: 10000, data: {task_id}}``.
* ``?Action=CVSync2AsyncGetResult&Version=2022-08-31``: ``{req_key (the submit's), task_id,
  req_json}`` -> ``data.status`` ``in_queue`` (queued), ``generating`` (running), ``done``,
  ``not_found``, ``expired``. **``done`` is not success**: it needs ``code`` 10000 and an output
  (``video_url``, valid 1 h; images as ``image_urls``, valid 24 h, because ``req_json`` asks
  ``return_url``: base64 would sit in the job record until collected. With
  ``extra["image_return_url"] = false`` they come as ``binary_data_base64`` -> ``data:`` URLs).

The model is the ``req_key`` (``jimeng_ti2v_v30_pro``, ``jimeng_t2v_v30``, ``jimeng_i2v_first_v30``,
``jimeng_i2v_first_tail_v30``, their 1080p variants, ``jimeng_t2i_v40``...; ``extra["req_keys"]``
adds more as ``{name: {"kind", "images": [min, max]}}``). Images go as ``image_urls``, or, given as
``data:`` URIs, as ``binary_data_base64`` **without** the ``data:`` prefix; ``duration_seconds``
5/10 -> ``frames`` 121/241.

Signing (every request): Volcengine's HMAC-SHA256 V4 over ``POST``, the path, the sorted query,
the headers ``content-type;host;x-content-sha256;x-date`` and the SHA-256 of the exact body bytes
sent; key = HMAC chain of the **raw** secret key over date, region (``cn-north-1``), service
(``cv``) and ``request``. The key pair is the pool key ``"AK:SK"``, else ``extra["access_key"]``
(or the pool key) with ``extra["secret_key"]``. The gateway refuses a bad signature or key with
``{"ResponseMetadata": {"Error": {"Code": "SignatureDoesNotMatch" | "InvalidAccessKey" ...}}}``:
AuthFailed, so the key leaves the pool.

Business codes (HTTP status set too, on either action): 50411/50412/50413 (input) and
50511/50512 (output) moderation -> ``content_policy``; 50429/50430 -> RateLimited (on GetResult
not a task failure); 50500/50501 -> OutcomeUnknown at submit, a retried read at GetResult (the
task fails after ``INTERNAL_ERROR_POLLS`` in a row); others -> refused input / failed.
``not_found`` within ``extra["not_found_grace_seconds"]`` (60) of the submit is read again (the
task may not be visible yet), later it fails ``provider_task_not_found`` (tasks are forgotten
after 12 h: keep job deadlines below that); ``expired`` fails ``output_expired``.

No callbacks, no cancel, no list, no client id: an ambiguous submit fails
``provider_outcome_unknown``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    OutcomeUnknown,
    ProviderError,
    RateLimited,
    Rejected,
    Unavailable,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send

log = logging.getLogger(__name__)

VERSION = "2022-08-31"
SUBMIT, RESULT = "CVSync2AsyncSubmitTask", "CVSync2AsyncGetResult"
ALGORITHM = "HMAC-SHA256"
SIGNED_HEADERS = ("content-type", "host", "x-content-sha256", "x-date")

# req_key -> (kind, min images, max images). Video: the reference (1080p suffixes UNCONFIRMED);
# images: Volcengine's 即梦 image pages.
REQ_KEYS: dict[str, tuple[MediaKind, int, int]] = {
    "jimeng_ti2v_v30_pro": (MediaKind.video, 0, 1),
    "jimeng_t2v_v30": (MediaKind.video, 0, 0),
    "jimeng_i2v_first_v30": (MediaKind.video, 1, 1),
    "jimeng_i2v_first_tail_v30": (MediaKind.video, 2, 2),
    "jimeng_t2v_v30_1080p": (MediaKind.video, 0, 0),
    "jimeng_i2v_first_v30_1080": (MediaKind.video, 1, 1),
    "jimeng_i2v_first_tail_v30_1080": (MediaKind.video, 2, 2),
    "jimeng_vgfm_t2v_l20": (MediaKind.video, 0, 0),
    "jimeng_t2i_v40": (MediaKind.image, 0, 10),
    "jimeng_t2i_v31": (MediaKind.image, 0, 0),
    "jimeng_t2i_v30": (MediaKind.image, 0, 0),
}
FRAMES = {5: 121, 10: 241}
ASPECT_RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9")
MAX_PROMPT = 800
CONTENT_CODES = frozenset({50411, 50412, 50413, 50511, 50512})
RATE_CODES = frozenset({50429, 50430})
INTERNAL_CODES = frozenset({50500, 50501})
INTERNAL_ERROR_POLLS = 3
# Volcengine OpenAPI gateway codes meaning the key pair (or our signature with it) is refused.
AUTH_CODES = frozenset({"SignatureDoesNotMatch", "InvalidAccessKey", "InvalidAuthorization", "MissingRequestInfo",
                        "InvalidCredential", "InvalidSecretKey", "AccessDenied", "InvalidTimestamp"})
# Set by Atelier from the common fields; options may not override them.
RESERVED_OPTIONS = {"req_key": "model", "task_id": None, "req_json": None, "prompt": "input.prompt",
                    "binary_data_base64": "data: URIs in input.image_url or options.image_urls",
                    "seed": "input.seed", "aspect_ratio": "input.aspect_ratio",
                    "frames": "input.duration_seconds (5 or 10)", "width": "input.resolution (WxH)",
                    "height": "input.resolution (WxH)"}
_IMAGE_MAGIC = {"iVBOR": "image/png", "/9j/": "image/jpeg", "UklGR": "image/webp"}


# -- Volcengine V4 signing --------------------------------------------------------------------

def canonical_query(query: str) -> str:
    """Query parameters sorted by key, each side percent-encoded (RFC 3986 unreserved kept)."""
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def signed_headers(url: str, body: bytes, access_key: str, secret_key: str, *, region: str = "cn-north-1",
                   service: str = "cv", now: datetime | None = None) -> dict[str, str]:
    """The headers of a ``POST url`` with ``body`` signed with Volcengine's HMAC-SHA256 V4 scheme."""
    parts = urlsplit(url)
    x_date = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    date = x_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    values = {"content-type": "application/json", "host": parts.netloc.rpartition("@")[2],
              "x-content-sha256": payload_hash, "x-date": x_date}
    canonical = "\n".join(["POST", parts.path or "/", canonical_query(parts.query),
                           "".join(f"{name}:{values[name]}\n" for name in SIGNED_HEADERS),
                           ";".join(SIGNED_HEADERS), payload_hash])
    scope = f"{date}/{region}/{service}/request"
    to_sign = "\n".join([ALGORITHM, x_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = secret_key.encode()  # the raw secret key (no "AWS4" prefix, unlike SigV4)
    for part in (date, region, service, "request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"Authorization": f"{ALGORITHM} Credential={access_key}/{scope}, "
                             f"SignedHeaders={';'.join(SIGNED_HEADERS)}, Signature={signature}",
            "Content-Type": values["content-type"], "Host": values["host"],
            "X-Content-Sha256": payload_hash, "X-Date": x_date}


# -- request building --------------------------------------------------------------------------

def jimeng_body(req_key: str, spec: tuple[MediaKind, int, int], kind: MediaKind,
                given: MediaInput) -> dict[str, Any]:
    """The submit body for a job; raises ``InvalidInput`` naming the field."""
    key_kind, low, high = spec
    if kind != key_kind:
        raise InvalidInput("model", f"{req_key} renders {key_kind}, not {kind}")
    opts = dict(given.options)
    for key, target in RESERVED_OPTIONS.items():
        if key in opts:
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use {target} instead" if target
                               else "set by Atelier")
    if given.negative_prompt is not None:
        raise InvalidInput("input.negative_prompt", "Jimeng has no negative prompt")
    prompt = given.prompt or ""
    if len(prompt) > MAX_PROMPT:
        raise InvalidInput("input.prompt", f"Jimeng prompts are at most {MAX_PROMPT} characters")
    images = _images(given.image_url, opts.pop("image_urls", None))
    if not low <= len(images) <= high:
        field = "input.image_url" if high else "model"
        raise InvalidInput(field, f"{req_key} takes {low} to {high} input images, not {len(images)}")
    if not prompt.strip() and not images:
        raise InvalidInput("input.prompt", "Jimeng needs a prompt (or an image)")
    body: dict[str, Any] = {"req_key": req_key}
    if prompt:
        body["prompt"] = prompt
    if images and all(i.startswith("data:") for i in images):
        body["binary_data_base64"] = [i.partition(",")[2] for i in images]
    elif images:
        body["image_urls"] = images
    if given.seed is not None:
        if given.seed < -1:
            raise InvalidInput("input.seed", "seed is -1 (random) or a non-negative integer")
        body["seed"] = given.seed
    body |= _video_fields(given, bool(images)) if kind == MediaKind.video else _image_fields(req_key, given)
    return body | opts


def _video_fields(given: MediaInput, with_images: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if given.resolution is not None:
        raise InvalidInput("input.resolution", "Jimeng video resolution is the model's: pick a 1080p req_key")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Jimeng renders one video per task")
    if given.duration_seconds is not None:
        frames = FRAMES.get(int(given.duration_seconds)) if float(given.duration_seconds).is_integer() else None
        if frames is None:
            raise InvalidInput("input.duration_seconds", "Jimeng renders 5 or 10 seconds")
        fields["frames"] = frames
    if given.aspect_ratio is not None:
        if with_images:
            raise InvalidInput("input.aspect_ratio", "Jimeng image-to-video follows the image's aspect ratio")
        if given.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("input.aspect_ratio", f"Jimeng renders {', '.join(ASPECT_RATIOS)}")
        fields["aspect_ratio"] = given.aspect_ratio
    return fields


def _image_fields(req_key: str, given: MediaInput) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if given.duration_seconds is not None:
        raise InvalidInput("input.duration_seconds", "an image has no duration")
    if given.aspect_ratio is not None:
        raise InvalidInput("input.aspect_ratio", "Jimeng images take input.resolution as WxH (or options.size)")
    if given.resolution is not None:
        width, sep, height = given.resolution.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise InvalidInput("input.resolution", "Jimeng image resolution is WxH, e.g. 2048x2048")
        fields |= {"width": int(width), "height": int(height)}
    if given.num_outputs is not None:
        if given.num_outputs != 1:
            raise InvalidInput("input.num_outputs", "Jimeng decides how many images it renders; 1 forces one")
        if req_key == "jimeng_t2i_v40":
            fields["force_single"] = True
    return fields


def _images(image_url: str | None, more: Any) -> list[str]:
    images = [image_url] if image_url else []
    if more is not None:
        if not isinstance(more, list) or not all(isinstance(i, str) and i for i in more):
            raise InvalidInput("input.options.image_urls", "image_urls is a list of URLs or data: URIs")
        images += more
    data = [i.startswith("data:") for i in images]
    if any(data) and not all(data):
        raise InvalidInput("input.options.image_urls", "give all images as URLs or all as data: URIs")
    for image in images:
        if image.startswith("data:"):
            header, _, encoded = image.partition(",")
            if not header.endswith(";base64") or not encoded:
                raise InvalidInput("input.image_url", "a data: image must be base64")
        elif not image.startswith(("https://", "http://")):
            raise InvalidInput("input.image_url", "an image is an http(s) URL or a data: URI")
    return images


# -- the adapter ----------------------------------------------------------------------------------

class JimengTask(TaskState):
    """When the task was submitted (a ``not_found`` soon after is read again), and how many reads
    in a row met an internal error."""

    submitted_at: float | None = None
    internal_errors: int | None = None


class JimengProvider(Provider):
    name = "jimeng"
    default_base_url = "https://visual.volcengineapi.com"
    default_typical_seconds = {"video": 120, "image": 20}
    kinds = frozenset({MediaKind.video, MediaKind.image})
    supports_cancel = False
    supports_callbacks = False
    retention = "video_url 1 hour, image URLs 24 hours; tasks forgotten after 12 hours"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        extra = settings.extra
        self._req_keys = dict(REQ_KEYS)
        for name, spec in dict(extra.get("req_keys") or {}).items():
            low, high = spec.get("images", (0, 0))
            self._req_keys[name] = (MediaKind(spec["kind"]), int(low), int(high))
        self._region = str(extra.get("region", "cn-north-1"))
        self._service = str(extra.get("service", "cv"))
        self._return_url = bool(extra.get("image_return_url", True))
        self._not_found_grace = float(extra.get("not_found_grace_seconds", 60.0))

    # -- validation -------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.build_body(request)

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        spec = self._req_keys.get(request.model)
        if spec is None:
            raise InvalidInput("model", "Jimeng models are req_keys: " + ", ".join(sorted(self._req_keys)))
        return jimeng_body(request.model, spec, request.kind, request.input)

    # -- signed calls -----------------------------------------------------------------------
    def key_pair(self, ctx: CallContext) -> tuple[str, str]:
        """``(access key, secret key)``: the pool key ``AK:SK``, else the configured pair."""
        access_key, sep, secret_key = ctx.api_key.partition(":")
        if sep and access_key and secret_key:
            return access_key, secret_key
        extra = self.settings.extra
        access_key, secret_key = str(extra.get("access_key") or ctx.api_key), str(extra.get("secret_key") or "")
        if not access_key or not secret_key:
            raise AuthFailed("no Volcengine key pair for Jimeng: give the key as 'AK:SK' or set "
                             "ATELIER_JIMENG_ACCESS_KEY and ATELIER_JIMENG_SECRET_KEY")
        return access_key, secret_key

    async def _call(self, ctx: CallContext, action: str, payload: dict[str, Any], *,
                    creates: bool) -> dict[str, Any]:
        """POST ``action`` signed; the CV envelope (``code``, ``data``...) of any JSON answer."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        url = f"{self.base_url}/?Action={action}&Version={VERSION}"
        access_key, secret_key = self.key_pair(ctx)
        headers = signed_headers(url, body, access_key, secret_key, region=self._region, service=self._service)
        request = ctx.http.build_request("POST", url, content=body, headers=headers | {"User-Agent": "atelier"})
        response = await send(ctx.http, request, creates=creates, timeout=ctx.timeout if creates else None)
        try:
            answer = response.json()
        except ValueError:
            raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
            answer = parse_json(response)  # a 2xx that is not JSON: MalformedResponse
        answer = expect_object(answer, "response")
        meta = answer.get("ResponseMetadata")
        if isinstance(meta, dict) and isinstance(meta.get("Error"), dict):
            raise gateway_error(response, meta["Error"], creates=creates)
        code = answer.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            raise_for_common_status(response, creates=creates, detail={"body": _excerpt(answer)})
            raise MalformedResponse("Jimeng answered without a code", detail={"body": _excerpt(answer)})
        if code in RATE_CODES:  # on either action; on GetResult not a task failure
            raise RateLimited(f"Jimeng: {answer.get('message') or 'rate limited'} ({code})",
                              retry_after=retry_after_seconds(response.headers),
                              detail={"code": code, "message": answer.get("message")})
        return answer

    # -- the task ---------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        answer = await self._call(ctx, SUBMIT, self.build_body(request), creates=True)
        code = answer["code"]
        if code != 10000:
            raise business_error(code, answer)
        data = answer.get("data")
        task_id = data.get("task_id") if isinstance(data, dict) else None
        if isinstance(task_id, bool) or not isinstance(task_id, str | int) or not str(task_id):
            raise MalformedResponse("Jimeng accepted the task without a task_id", detail={"body": _excerpt(answer)})
        return SubmitResult(task_id=str(task_id), request_id=_str(answer.get("request_id")),
                            state=JimengTask(submitted_at=time.time()))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        payload: dict[str, Any] = {"req_key": task.request.model, "task_id": task.task_id}
        if task.request.kind == MediaKind.image and self._return_url:
            payload["req_json"] = json.dumps({"return_url": True})
        answer = await self._call(ctx, RESULT, payload, creates=False)
        return self.parse_result(task, answer)

    def parse_result(self, task: TaskRef, answer: dict[str, Any]) -> TaskStatus:
        code, request_id = answer["code"], _str(answer.get("request_id"))
        data: dict[str, Any] = answer["data"] if isinstance(answer.get("data"), dict) else {}
        raw = str(data.get("status") or code)
        if code != 10000:
            if code in INTERNAL_CODES and raw != "done":
                return self._internal_error(task, code, answer)
            return TaskStatus(state="failed", raw_status=raw, request_id=request_id,
                              error_code="content_policy" if code in CONTENT_CODES else "provider_failed",
                              error_message=f"Jimeng: {answer.get('message') or 'task failed'} ({code})",
                              error_detail={"code": code, "message": answer.get("message")})
        status = TaskStatus(state="unknown", raw_status=raw, request_id=request_id,
                            task_state=JimengTask(internal_errors=0))
        if raw == "in_queue":
            status.state = "queued"
        elif raw == "generating":
            status.state = "running"
        elif raw == "done":
            status.outputs = outputs(task.request.kind, data)
            status.state = "succeeded" if status.outputs else "failed"
            if status.outputs:
                status.progress = 100
            else:
                status.error_code, status.error_message = "provider_no_output", "Jimeng finished without an output"
        elif raw == "not_found":
            submitted = JimengTask.of(task).submitted_at
            if submitted is not None and time.time() - submitted < self._not_found_grace:
                return status  # not visible yet: read again
            status.state, status.error_code = "failed", "provider_task_not_found"
            status.error_message = "Jimeng no longer knows the task (unknown id, or older than 12 hours)"
        elif raw == "expired":
            status.state, status.error_code = "failed", "output_expired"
            status.error_message = "Jimeng reports the task expired"
        else:
            log.warning("jimeng: unknown task status %r; treating it as still in progress", raw)
        return status

    def _internal_error(self, task: TaskRef, code: int, answer: dict[str, Any]) -> TaskStatus:
        """An internal error reading the result: read again, and fail after a few in a row."""
        seen = (JimengTask.of(task).internal_errors or 0) + 1
        message = f"Jimeng: {answer.get('message') or 'internal error'} ({code})"
        if seen >= INTERNAL_ERROR_POLLS:
            return TaskStatus(state="failed", raw_status=str(code), error_code="provider_failed",
                              error_message=f"{message}, {seen} reads in a row",
                              error_detail={"code": code, "message": answer.get("message")})
        return TaskStatus(state="unknown", raw_status=str(code), task_state=JimengTask(internal_errors=seen))


# -- responses --------------------------------------------------------------------------------------

def outputs(kind: MediaKind, data: dict[str, Any]) -> list[ProviderOutput]:
    if kind == MediaKind.video:
        url = data.get("video_url")
        ok = isinstance(url, str) and url.startswith(("https://", "http://"))
        return [ProviderOutput(url=url, content_type="video/mp4")] if ok else []
    urls = data.get("image_urls")
    if isinstance(urls, list) and urls:
        return [ProviderOutput(url=u) for u in urls if isinstance(u, str) and u.startswith(("https://", "http://"))]
    images = data.get("binary_data_base64")
    found = []
    for item in images if isinstance(images, list) else []:
        if isinstance(item, str) and item:
            ctype = next((t for magic, t in _IMAGE_MAGIC.items() if item.startswith(magic)), "image/png")
            found.append(ProviderOutput(url=f"data:{ctype};base64,{item}", content_type=ctype))
    return found


# -- errors ------------------------------------------------------------------------------------------

def gateway_error(response: httpx.Response, error: dict[str, Any], *, creates: bool) -> ProviderError:
    """A refusal by Volcengine's OpenAPI gateway (signature, key, action) before the service saw it."""
    code, status = str(error.get("Code") or ""), response.status_code
    detail = {"http_status": status, "code": code, "code_n": error.get("CodeN"), "message": error.get("Message")}
    text = f"Volcengine refused the request: {code}: {error.get('Message') or ''}".rstrip(": ")
    if code in AUTH_CODES:
        return AuthFailed(text, detail=detail, status_code=status)
    if "arrear" in code.lower() or "balance" in code.lower():  # UNCONFIRMED codes
        return InsufficientBalance(text, detail=detail, status_code=status)
    if status == 429:
        return RateLimited(text, retry_after=retry_after_seconds(response.headers), detail=detail)
    if status >= 500:
        return (OutcomeUnknown if creates and status != 503 else Unavailable)(text, detail=detail, status_code=status)
    if status in (401, 403):
        return AuthFailed(text, detail=detail, status_code=status)
    return Rejected(text, detail=detail, status_code=status)


def business_error(code: int, answer: dict[str, Any]) -> ProviderError:
    """A submit refused with a business code (rate codes are raised for both actions in ``_call``)."""
    message = f"Jimeng: {answer.get('message') or 'error'} ({code})"
    detail = {"code": code, "message": answer.get("message"), "request_id": answer.get("request_id")}
    if code in CONTENT_CODES:
        return Rejected(message, code="content_policy", detail=detail)
    if code in INTERNAL_CODES:
        return OutcomeUnknown(message, detail=detail)
    return Rejected(message, code="provider_rejected_input", detail=detail)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _excerpt(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)[:300]
