"""Vidu (Shengshu) video API: ``https://api.vidu.com`` (international), ``https://api.vidu.cn`` (China).

Auth: ``Authorization: Token <key>`` (the scheme word is ``Token``, not ``Bearer``).

Endpoints, chosen from the inputs:

* ``POST /ent/v2/text2video`` (no image), ``/ent/v2/img2video`` (``image_url``: ``images`` [1]),
  ``/ent/v2/start-end2video`` (``image_url`` + ``options.last_frame_url``: ``images`` [2]),
  ``/ent/v2/reference2video`` (``options.reference_images``: 1-7 subject images, with a prompt).
  Each answers ``{task_id, state: "created", ...echo...}``; ``payload`` (echoed everywhere) carries
  the job id and the callback URL we gave (see callbacks).
* ``GET /ent/v2/tasks/{id}/creations``: ``{id, state, err_code, creations: [{id, url, cover_url,
  watermarked_url}]}``. States ``created``/``queueing`` -> queued, ``processing`` -> running,
  ``success`` -> succeeded (``creations[].url``, 24 h), ``failed`` -> failed with ``err_code``
  (``CreationPolicyViolation``: ``content_policy``; ``UserCancelled``: canceled), still HTTP 200.
* ``POST /ent/v2/tasks/{id}/cancel`` (body ``{"id"}``): ``{}`` while queued; a 400 "can not
  cancel" once processing.

Errors are ``{code: <HTTP status>, reason, message}``: ``TaskPromptPolicyViolation`` /
``AuditSubmitIllegal`` (400) are content refusals at create; ``CreditInsufficient`` (400)
InsufficientBalance; ``ModelUnavailable`` ``model_not_found``; other 400s refused input; 401/403
AuthFailed; 429 (``QuotaExceeded``, ``TooManyRequests``, ``SystemThrottling``) RateLimited; 5xx
at create OutcomeUnknown. There is no list endpoint and no lookup by ``payload``: an ambiguous
create fails ``provider_outcome_unknown``.

Callbacks (``callback_url``; Vidu POSTs the get-generation body on ``processing``, ``success``,
``failed``) are signed APISIX hmac-auth style: ``X-HMAC-SIGNATURE`` = base64 HMAC-SHA256, keyed
with the API token that created the task, of ``METHOD\\npath\\nsorted query\\naccess key\\ndate\\n``
followed by the signed headers (``X-HMAC-SIGNED-HEADERS``, ``Date;x-request-nonce``) as
``name:value\\n`` (the trailing newline is UNCONFIRMED: both are accepted). The signature covers the
callback URL, not the body: it is checked against the URL as called (``ctx.callback_url``) and,
for a proxy that rewrote the path, the URL we gave Vidu as echoed in the (unsigned) ``payload``;
a callback whose signature matches neither under one of our keys, whose ``Date`` is more than
``extra["callback_max_age_seconds"]`` (300) away, or whose nonce was seen before, is refused.
A verified callback is only a hint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    ProviderState,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
    TaskNotFound,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send

log = logging.getLogger(__name__)

MODELS = ("viduq3-pro", "viduq3-turbo", "viduq2", "viduq1", "vidu2.0", "vidu1.5")
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")
RESOLUTIONS = ("540p", "720p", "1080p")
AMPLITUDES = ("auto", "small", "medium", "large")
STYLES = ("general", "anime")
MAX_REFERENCE_IMAGES = 7  # UNCONFIRMED
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,[A-Za-z0-9+/=]+$")
_STATES: dict[str, ProviderState] = {
    "created": "queued",
    "queueing": "queued",
    "processing": "running",
    "success": "succeeded",
    "failed": "failed",
}
CONTENT_REASONS = frozenset({"TaskPromptPolicyViolation", "AuditSubmitIllegal", "CreationPolicyViolation"})
# Set by Atelier from the common fields; options may not override them.
RESERVED_OPTIONS = {"model": "model", "prompt": "input.prompt", "images": "input.image_url",
                    "duration": "input.duration_seconds", "seed": "input.seed",
                    "aspect_ratio": "input.aspect_ratio", "resolution": "input.resolution",
                    "payload": None, "callback_url": None}
BOOL_OPTIONS = ("bgm", "audio", "off_peak", "watermark")
NONCE_CACHE = 10_000


def vidu_body(model: str, given: MediaInput) -> tuple[str, dict[str, Any]]:
    """``(endpoint, create body)`` for a job; raises ``InvalidInput`` naming the field."""
    if not model.startswith("vidu"):
        raise InvalidInput("model", f"Vidu models are {', '.join(MODELS)}")
    opts = dict(given.options)
    for key, target in RESERVED_OPTIONS.items():
        if key in opts:
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use {target} instead" if target
                               else "set by Atelier")
    if given.negative_prompt is not None:
        raise InvalidInput("input.negative_prompt", "Vidu has no negative prompt")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Vidu renders one video per task")
    last_frame = opts.pop("last_frame_url", None)
    references = opts.pop("reference_images", None)
    if references is not None:
        if given.image_url is not None or last_frame is not None:
            raise InvalidInput("input.options.reference_images", "reference images replace image_url and "
                                                                 "last_frame_url")
        if not isinstance(references, list) or not 1 <= len(references) <= MAX_REFERENCE_IMAGES:
            raise InvalidInput("input.options.reference_images", f"1 to {MAX_REFERENCE_IMAGES} image URLs")
        endpoint, images = "reference2video", [_image("input.options.reference_images", r) for r in references]
    elif last_frame is not None:
        if given.image_url is None:
            raise InvalidInput("input.options.last_frame_url", "a last frame needs image_url as the first frame")
        endpoint = "start-end2video"
        images = [_image("input.image_url", given.image_url), _image("input.options.last_frame_url", last_frame)]
    elif given.image_url is not None:
        endpoint, images = "img2video", [_image("input.image_url", given.image_url)]
    else:
        endpoint, images = "text2video", []
    prompt = given.prompt or ""
    if endpoint in ("text2video", "reference2video") and not prompt.strip():
        raise InvalidInput("input.prompt", f"Vidu {endpoint} needs a prompt")
    body: dict[str, Any] = {"model": model}
    if prompt:
        body["prompt"] = prompt
    if images:
        body["images"] = images
    if given.duration_seconds is not None:
        seconds = given.duration_seconds
        if not float(seconds).is_integer() or not 1 <= seconds <= 16:
            raise InvalidInput("input.duration_seconds", "Vidu renders whole seconds (4, 5, 8...; up to 16 on q3)")
        body["duration"] = int(seconds)
    if given.seed is not None:
        if given.seed < 0:
            raise InvalidInput("input.seed", "seed is a non-negative integer (0: random)")
        body["seed"] = given.seed
    for name, allowed in (("aspect_ratio", ASPECT_RATIOS), ("resolution", RESOLUTIONS)):
        value = getattr(given, name)
        if value is not None:
            if value not in allowed:
                raise InvalidInput(f"input.{name}", f"Vidu takes {', '.join(allowed)}")
            body[name] = value
    _check_options(endpoint, opts)
    return endpoint, body | opts


def _check_options(endpoint: str, opts: dict[str, Any]) -> None:
    for name in BOOL_OPTIONS:
        if name in opts and not isinstance(opts[name], bool):
            raise InvalidInput(f"input.options.{name}", f"{name} is true or false")
    if "movement_amplitude" in opts and opts["movement_amplitude"] not in AMPLITUDES:
        raise InvalidInput("input.options.movement_amplitude", f"movement_amplitude is one of {', '.join(AMPLITUDES)}")
    if "style" in opts:
        if endpoint != "text2video":
            raise InvalidInput("input.options.style", "style is for text-to-video")
        if opts["style"] not in STYLES:
            raise InvalidInput("input.options.style", "style is general or anime")


def _image(field: str, value: Any) -> str:
    if not isinstance(value, str) or not (value.startswith(("https://", "http://")) or _DATA_IMAGE.match(value)):
        raise InvalidInput(field, "an image is an http(s) URL or a data:image/...;base64 URI")
    return value


class ViduProvider(Provider):
    name = "vidu"
    default_base_url = "https://api.vidu.com"
    default_typical_seconds = {"video": 120}
    kinds = frozenset({MediaKind.video})
    supports_cancel = True
    supports_callbacks = True
    callback_auth = "signature"
    retention = "creation URLs 24 h (each status read mints fresh ones)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self._nonces: dict[str, float] = {}

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        vidu_body(request.model, request.input)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Token {ctx.api_key}", "User-Agent": "atelier"}

    # -- the task -----------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        endpoint, body = vidu_body(request.model, request.input)
        echo: dict[str, str] = {"job": request.reference}
        if ctx.callback_url:
            body["callback_url"] = echo["callback_url"] = ctx.callback_url
        body["payload"] = json.dumps(echo, separators=(",", ":"))
        url = f"{self.base_url}/ent/v2/{endpoint}"
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        raise_for_vidu_error(response, creates=True)
        answer = expect_object(parse_json(response), "create response")
        task_id = answer.get("task_id")
        if isinstance(task_id, bool) or not isinstance(task_id, str | int) or not str(task_id):
            raise MalformedResponse("Vidu created a task without a task_id", detail={"state": answer.get("state")})
        state = answer.get("state")
        return SubmitResult(task_id=str(task_id), status=state if isinstance(state, str) else None)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/ent/v2/tasks/{task.task_id}/creations"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        raise_for_vidu_error(response, creates=False)
        return parse_creations(expect_object(parse_json(response), "task"))

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        """Vidu stops a task while it is queued; once processing it answers 400 (raised: the note says so)."""
        url = f"{self.base_url}/ent/v2/tasks/{task.task_id}/cancel"
        request = ctx.http.build_request("POST", url, json={"id": task.task_id}, headers=self._headers(ctx))
        raise_for_vidu_error(await send(ctx.http, request), creates=False)
        return True

    # -- callbacks ----------------------------------------------------------------------
    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        try:
            task = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Vidu callback body is not JSON") from exc
        if not isinstance(task, dict) or not isinstance(task.get("id"), str | int):
            raise CallbackRejected("Vidu callback body is not a task")
        called = [ctx.callback_url] if ctx.callback_url else []
        echoed = _echoed_callback_url(task.get("payload"))
        self.verify_signature(ctx, headers, *called, *([echoed] if echoed else []))
        state = task.get("state")
        return CallbackHint(task_id=str(task["id"]), raw_status=state if isinstance(state, str) else None)

    def verify_signature(self, ctx: CallContext, headers: Mapping[str, str], *urls: str,
                         now: float | None = None) -> None:
        """Check the HMAC headers of a callback sent to one of ``urls``; raise ``CallbackRejected`` if not."""
        if not urls:
            raise CallbackRejected("Vidu callback: no callback URL to check its signature against")
        now = time.time() if now is None else now
        signature = headers.get("x-hmac-signature", "")
        algorithm = headers.get("x-hmac-algorithm", "").lower()
        if not signature or algorithm != "hmac-sha256":
            raise CallbackRejected("Vidu callback is not signed (X-HMAC-SIGNATURE, hmac-sha256)")
        access_key = headers.get("x-hmac-access-key", "")
        if access_key != str(self.settings.extra.get("callback_access_key", "vidu")):
            raise CallbackRejected("Vidu callback names another access key")
        signed = [name.strip() for name in headers.get("x-hmac-signed-headers", "").split(";") if name.strip()]
        if {"date", "x-request-nonce"} - {name.lower() for name in signed}:
            raise CallbackRejected("Vidu callback must sign its Date and x-request-nonce headers")
        date, nonce = headers.get("date", ""), headers.get("x-request-nonce", "")
        try:
            sent = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            raise CallbackRejected("Vidu callback has no valid Date") from None
        if abs(now - sent) > float(self.settings.extra.get("callback_max_age_seconds", 300)):
            raise CallbackRejected("Vidu callback's Date is too far from now (stale or replayed)")
        if not nonce:
            raise CallbackRejected("Vidu callback has no nonce")
        lines = "".join(f"{name}:{headers.get(name, '')}\n" for name in signed)
        texts = [signing_prefix("POST", url, access_key, date) + lines for url in dict.fromkeys(urls)]
        given = signature.encode()
        keys = [ctx.api_key, *(k for k in self.settings.api_keys if k != ctx.api_key)]
        if not any(hmac.compare_digest(callback_signature(key, variant), given)
                   for key in keys if key for text in texts for variant in (text, text[:-1])):
            raise CallbackRejected("Vidu callback signature does not match")
        self._remember(nonce, now)

    def _remember(self, nonce: str, now: float) -> None:
        """Refuse a nonce seen within the Date window (this process only)."""
        window = float(self.settings.extra.get("callback_max_age_seconds", 300)) * 2
        if len(self._nonces) > NONCE_CACHE:
            self._nonces = {n: t for n, t in self._nonces.items() if now - t < window}
        seen = self._nonces.get(nonce)
        if seen is not None and now - seen < window:
            raise CallbackRejected("Vidu callback nonce was already used (a replay)")
        self._nonces[nonce] = now


def signing_prefix(method: str, url: str, access_key: str, date: str) -> str:
    """The signing string's first five lines: method, path, query sorted by key, access key, date."""
    parts = urlsplit(url)
    pairs = sorted(parse_qsl(parts.query, keep_blank_values=True), key=lambda kv: kv[0])
    query = "&".join(f"{k}={v}" for k, v in pairs)
    return f"{method}\n{parts.path or '/'}\n{query}\n{access_key}\n{date}\n"


def callback_signature(api_token: str, signing_string: str) -> bytes:
    return base64.b64encode(hmac.new(api_token.encode(), signing_string.encode(), hashlib.sha256).digest())


def _echoed_callback_url(payload: Any) -> str | None:
    """The callback URL we put in ``payload`` at create (what Vidu signed), if echoed."""
    try:
        echo = json.loads(payload) if isinstance(payload, str) else None
    except ValueError:
        echo = None
    url = echo.get("callback_url") if isinstance(echo, dict) else None
    return url if isinstance(url, str) and url else None


# -- responses ------------------------------------------------------------------------------

def parse_creations(task: dict[str, Any]) -> TaskStatus:
    """A ``GET /ent/v2/tasks/{id}/creations`` answer (also the callback body), translated."""
    raw = task.get("state")
    if not isinstance(raw, str):
        raise MalformedResponse("Vidu task has no state", detail={"keys": sorted(task)[:20]})
    state = _STATES.get(raw)
    if state is None:
        log.warning("vidu: unknown task state %r; treating it as still in progress", raw)
        return TaskStatus(state="unknown", raw_status=raw)
    if state == "succeeded":
        outputs = []
        for creation in task.get("creations") or []:
            if isinstance(creation, dict) and isinstance(creation.get("url"), str) and creation["url"]:
                meta = {"creation_id": str(creation["id"])} if creation.get("id") else {}
                outputs.append(ProviderOutput(url=creation["url"], content_type="video/mp4", metadata=meta))
        if not outputs:
            return TaskStatus(state="failed", raw_status=raw, error_code="provider_no_output",
                              error_message="Vidu reported success without a creation URL")
        return TaskStatus(state="succeeded", raw_status=raw, progress=100, outputs=outputs)
    if state == "failed":
        err_code = str(task.get("err_code") or "")
        detail = {"err_code": err_code, "task_id": task.get("id")}
        if err_code == "UserCancelled":
            return TaskStatus(state="canceled", raw_status=raw, error_code="provider_canceled",
                              error_message="Vidu canceled the task (UserCancelled)", error_detail=detail)
        code = "content_policy" if err_code in CONTENT_REASONS else "provider_failed"
        return TaskStatus(state="failed", raw_status=raw, error_code=code,
                          error_message=f"Vidu task failed: {err_code or 'no err_code'}", error_detail=detail)
    return TaskStatus(state=state, raw_status=raw)


# -- errors ---------------------------------------------------------------------------------

def raise_for_vidu_error(response: httpx.Response, *, creates: bool) -> None:
    """Map a Vidu error ``{code, reason, message}`` to the provider error it stands for."""
    status = response.status_code
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    reason = str(body.get("reason") or "") if isinstance(body, dict) else ""
    message = str(body.get("message") or "") if isinstance(body, dict) else response.text[:200]
    detail = {"http_status": status, "reason": reason, "message": message}
    text = f"Vidu answered HTTP {status} {reason}: {message}".rstrip(": ")
    if reason in CONTENT_REASONS:
        raise Rejected(text, code="content_policy", detail=detail, status_code=status)
    if reason == "CreditInsufficient":
        raise InsufficientBalance(text, detail=detail, status_code=status)
    if status in (401, 403):
        raise AuthFailed(text, detail=detail, status_code=status)
    if status == 429:
        raise RateLimited(text, retry_after=retry_after_seconds(response.headers), detail=detail)
    if reason == "ModelUnavailable":
        raise Rejected(text, code="model_not_found", detail=detail, status_code=status)
    if status == 404 and not creates:
        raise TaskNotFound(text, detail=detail, status_code=status)
    if status == 400:
        raise Rejected(text, code="provider_rejected_input" if creates else None, detail=detail, status_code=status)
    raise_for_common_status(response, creates=creates, detail=detail)
