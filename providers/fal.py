"""fal.ai queue API (https://docs.fal.ai/model-endpoints/queue).

Endpoints (``base_url`` defaults to ``https://queue.fal.run``; auth ``Authorization: Key <key_id:key_secret>``):

* ``POST {base_url}/{model_id}[?fal_webhook=<url>]`` -- submit; the body is the model's
  input JSON. ``model_id`` is ``owner/app[/path...]`` (``fal-ai/flux/dev``) and keeps
  its sub-path here. The answer carries ``request_id`` and the ``status_url``,
  ``response_url`` and ``cancel_url`` to use from then on: they name only
  ``owner/app`` (the sub-path is dropped), so they are kept in the task state
  (``FalTask``) and never rebuilt unless fal left them out.
* ``GET {status_url}?logs=1`` -- ``IN_QUEUE`` (with 0-indexed ``queue_position``),
  ``IN_PROGRESS`` (with ``logs``), ``COMPLETED``. HTTP 202 until complete, then 200.
* ``GET {response_url}`` -- the model's output (2xx) or the request's error. The billed run time
  is the COMPLETED status's ``metrics.inference_time`` (the task's ``usage``), not the result's.
* ``PUT {cancel_url}`` -- ``CANCELLATION_REQUESTED`` (202), ``ALREADY_COMPLETED`` (400),
  ``NOT_FOUND`` (404).

Status mapping: ``IN_QUEUE`` -> queued (``queue_position``), ``IN_PROGRESS`` ->
running (progress from tqdm / "Step i/N" log lines), ``COMPLETED`` -> the result
decides: 2xx -> succeeded (``images[]``, ``image``, ``video``, ``audio``... every
File-like object), an error -> failed with fal's ``error_type`` and ``detail``
(``content_policy_violation`` gets its own code; ``client_cancelled`` -> canceled).
``FAILED``/``CANCELED`` (listed only by third-party schemas) map to failed/canceled;
anything else is non-terminal and logged.

Traps:

* A ``COMPLETED`` request can have failed: success is only known from ``GET response_url``.
* A 5xx from ``response_url`` is the request's outcome when fal marks it as such
  (``X-Fal-Error-Type``, ``x-fal-request-id``, an ``error_type`` or a validation
  ``detail`` list); a bare 5xx (ingress, injected) is transient and polled again.
* ``403 User is locked. Reason: Exhausted balance`` is an empty balance, not a bad key.
* fal validates inputs in the runner: a bad input is accepted at submit and fails at the result.
* Webhooks (``callback_auth = "signature"``) are Ed25519 over
  ``request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`` with a hex signature, checked
  against a cached JWKS (``settings.extra["jwks_url"]``); only a completion webhook
  exists. It is a hint: the state applied is the one fetched from status/result.
* No lookup by our own id exists, so an ambiguous submit cannot be reconciled.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
    Usage,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    Rejected,
    Unavailable,
)
from providers.fal_webhooks import JwksVerifier
from providers.http import expect_object, parse_json, raise_for_common_status, send
from providers.usage import amount, usage

log = logging.getLogger(__name__)

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})+$")
_LEGACY_MODEL = re.compile(r"^(\d+)-([A-Za-z0-9][A-Za-z0-9_.-]*)$")  # "123-myapp" -> "123/myapp"
_NAMESPACES = ("workflows", "comfy")
_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WXH = re.compile(r"^(\d+)x(\d+)$")
_TQDM = re.compile(r"(\d{1,3})%\|")
_STEPS = re.compile(r"\bstep\s+(\d+)\s*/\s*(\d+)", re.IGNORECASE)

_STATES = {"IN_QUEUE": "queued", "IN_PROGRESS": "running"}

# fal image models' ``image_size`` presets, by aspect ratio.
_IMAGE_SIZE_PRESETS = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}
# Result keys whose values are output media (File objects or bare URLs).
_MEDIA_KEYS = ("images", "image", "videos", "video", "audio", "audios", "audio_file")
_KIND_PREFIX = {MediaKind.image: "image/", MediaKind.video: "video/", MediaKind.audio: "audio/"}


def app_id(model_id: str) -> str:
    """``owner/app`` of a model id (``workflows/``, ``comfy/`` namespaces keep a third part)."""
    parts = model_id.strip("/").split("/")
    return "/".join(parts[: 3 if parts[0] in _NAMESPACES else 2])


def normalize_model(model: str) -> str:
    legacy = _LEGACY_MODEL.match(model)
    return f"{legacy.group(1)}/{legacy.group(2)}" if legacy else model.strip("/")


def fal_input(kind: MediaKind, job_input: Any) -> dict[str, Any]:
    """Map the common input fields to fal's usual names, then lay the native ``options`` over them."""
    data = job_input.fields()
    body: dict[str, Any] = {}
    for name in ("prompt", "negative_prompt", "image_url", "seed"):
        if name in data:
            body[name] = data[name]
    if "duration_seconds" in data:
        # fal's video models take a string enum ("5", "10"); integer fields accept it too.
        seconds = float(data["duration_seconds"])
        body["duration"] = str(int(seconds)) if seconds.is_integer() else str(seconds)
    ratio, resolution = data.get("aspect_ratio"), data.get("resolution")
    size = _WXH.match(resolution) if isinstance(resolution, str) else None
    if kind == MediaKind.image:
        if size:
            body["image_size"] = {"width": int(size.group(1)), "height": int(size.group(2))}
        elif resolution:
            body["resolution"] = resolution
        if ratio:
            body["aspect_ratio"] = ratio  # models with an aspect_ratio input (FLUX ultra, Imagen...)
            if not size and ratio in _IMAGE_SIZE_PRESETS:
                body["image_size"] = _IMAGE_SIZE_PRESETS[ratio]  # models with image_size (FLUX, SDXL...)
        if "num_outputs" in data:
            body["num_images"] = data["num_outputs"]
    else:
        if ratio:
            body["aspect_ratio"] = ratio
        if resolution:
            body["resolution"] = resolution
    body.update(job_input.options)
    return body


class FalTask(TaskState):
    """The request's URLs as fal returned them (they drop the model's sub-path: never rebuild them)."""

    status_url: str | None = None
    response_url: str | None = None
    cancel_url: str | None = None


class FalProvider(Provider):
    name = "fal"
    default_base_url = "https://queue.fal.run"
    default_typical_seconds = {"image": 6, "video": 90, "audio": 30}
    kinds = frozenset({MediaKind.image, MediaKind.video, MediaKind.audio})
    supports_cancel = True
    supports_callbacks = True
    callback_auth = "signature"
    retention = ("CDN media: account/request setting (no documented default); "
                 "request payloads and results: 30 days")

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        extra = settings.extra
        self._origin = _origin(self.base_url)
        self.webhooks = JwksVerifier(
            str(extra.get("jwks_url") or "https://rest.alpha.fal.ai/.well-known/jwks.json"),
            cache_seconds=float(extra.get("jwks_cache_seconds", 86400)),
            refresh_min_seconds=float(extra.get("jwks_refresh_min_seconds", 30)),
            tolerance_seconds=float(extra.get("webhook_tolerance_seconds", 300)),
            timeout_seconds=min(10.0, settings.timeout_seconds),
            expected_user_id=extra.get("webhook_user_id") or None,
        )

    # -- validation ---------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        model = normalize_model(request.model)
        parts = model.split("/")
        if not _MODEL.match(model) or (parts[0] in _NAMESPACES and len(parts) < 3):
            raise InvalidInput("model", "fal model ids are 'owner/app[/path...]', e.g. 'fal-ai/flux/dev'")
        inp, kind = request.input, request.kind
        for key in inp.options:
            if not _OPTION_NAME.match(key):
                raise InvalidInput(f"input.options.{key}", "fal input names are identifiers")
        if kind == MediaKind.image and inp.duration_seconds is not None:
            raise InvalidInput("input.duration_seconds", "fal image models have no duration")
        if kind != MediaKind.image and inp.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", f"fal {kind.value} models return one file per request")
        if kind == MediaKind.audio:
            for name in ("aspect_ratio", "resolution"):
                if getattr(inp, name) is not None:
                    raise InvalidInput(f"input.{name}", f"fal audio models have no {name}")
        size = _WXH.match(inp.resolution or "")
        if kind == MediaKind.image and size and inp.aspect_ratio:
            w, h = (int(g) for g in size.groups())
            rw, rh = (int(g) for g in inp.aspect_ratio.split(":"))
            if w == 0 or h == 0 or rh == 0 or abs(w / h - rw / rh) > 0.02 * (rw / rh):
                raise InvalidInput("input.aspect_ratio", f"{inp.aspect_ratio} does not match the "
                                                         f"resolution {inp.resolution}")
        if inp.prompt is None and inp.image_url is None and not inp.options:
            raise InvalidInput("input.prompt", "fal models need a prompt, an image_url or native options")
        try:
            json.dumps(inp.options, allow_nan=False)
        except ValueError as exc:
            raise InvalidInput("input.options", "options must be plain JSON") from exc

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Key {ctx.api_key}", "User-Agent": "atelier", "Accept": "application/json"}

    # -- submit ---------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        model = normalize_model(request.model)
        params = {"fal_webhook": ctx.callback_url} if ctx.callback_url else None
        response = await send(ctx.http, ctx.http.build_request(
            "POST", f"{self.base_url}/{model}", params=params, json=fal_input(request.kind, request.input),
            headers=self._headers(ctx)), creates=True)
        if response.status_code >= 400:
            self._raise_refusal(response)
        body = expect_object(parse_json(response), "submit response")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise MalformedResponse("fal accepted the request without a request_id", detail=body)
        fallback = f"{self.base_url}/{app_id(model)}/requests/{request_id}"
        state = FalTask(
            status_url=self._own_url(body.get("status_url"), fallback + "/status"),
            response_url=self._own_url(body.get("response_url"), fallback),
            cancel_url=self._own_url(body.get("cancel_url"), fallback + "/cancel"),
        )
        gateway_id = body.get("gateway_request_id")
        return SubmitResult(task_id=request_id, status=str(body.get("status") or "IN_QUEUE"), state=state,
                            request_id=gateway_id if isinstance(gateway_id, str) and gateway_id else None)

    def _own_url(self, url: Any, fallback: str) -> str:
        """A URL fal returned, if it points where our key may go (fal's queue or our base URL)."""
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            return fallback
        origin = _origin(url)
        host = origin[1]
        if origin == self._origin or (self._origin[1].endswith("fal.run") and
                                      (host == "fal.run" or host.endswith(".fal.run"))):
            return url
        log.warning("fal returned a request URL on another host; using the configured base URL instead")
        return fallback

    def _raise_refusal(self, response: httpx.Response) -> None:
        """A refused submission: nothing was created (except for the ambiguous 5xx)."""
        status = response.status_code
        error_type, message, detail = fal_error(response)
        if status == 402 or (status == 403 and "balance" in message.lower()):
            raise InsufficientBalance(f"fal refused the request: {message}", detail=detail, status_code=status)
        if status in (401, 403):
            raise AuthFailed(f"fal refused the credentials (HTTP {status}): {message}", detail=detail,
                             status_code=status)
        if status in (400, 404, 422):
            code = ("content_policy_violation" if error_type == "content_policy_violation"
                    else "model_not_found" if status == 404
                    else "provider_rejected_input" if status == 422 else None)
            raise Rejected(f"fal refused the request: {message}", code=code, detail=detail, status_code=status)
        raise_for_common_status(response, creates=True, detail=detail)

    # -- status and result -------------------------------------------------------------
    def _urls(self, task: TaskRef) -> tuple[str, str, str]:
        state = FalTask.of(task)
        base = f"{self.base_url}/{app_id(normalize_model(task.request.model))}/requests/{task.task_id}"
        return (state.status_url or base + "/status", state.response_url or base,
                state.cancel_url or base + "/cancel")

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        status_url, response_url, _ = self._urls(task)
        request = ctx.http.build_request("GET", status_url, params={"logs": "1"}, headers=self._headers(ctx))
        response = await send(ctx.http, request)
        raise_for_common_status(response, detail=fal_error(response)[2] if response.status_code >= 400 else None)
        body = expect_object(parse_json(response), "request status")
        raw = body.get("status")
        if not isinstance(raw, str):
            raise MalformedResponse("fal request status has no status", detail=_excerpt(body))
        if raw == "COMPLETED":
            if body.get("error") or body.get("error_type"):
                done = _failed_status(raw, body.get("error_type"), str(body.get("error") or body.get("error_type")),
                                      {"error_type": body.get("error_type"), "error": body.get("error")})
            else:
                done = await self._result(ctx, task, response_url)
            if done.state in ("succeeded", "failed", "canceled"):
                done.usage = completed_usage(body)
            return done
        if raw in ("FAILED", "CANCELED", "CANCELLED"):  # third-party schemas only; not in fal's SDKs
            error_type = body.get("error_type") or ("client_cancelled" if raw != "FAILED" else None)
            return _failed_status(raw, error_type, str(body.get("error") or f"fal reports the request {raw}"),
                                  {"error_type": body.get("error_type"), "error": body.get("error")})
        state = _STATES.get(raw)
        if state is None:
            log.warning("fal: unknown request status %r; treating as still running", raw)
            return TaskStatus(state="unknown", raw_status=raw)
        status = TaskStatus(state="queued" if state == "queued" else "running", raw_status=raw)
        if state == "queued":
            position = body.get("queue_position")
            if isinstance(position, int) and not isinstance(position, bool):
                status.queue_position = position
        else:
            status.progress = log_progress(body.get("logs"))
        return status

    async def _result(self, ctx: CallContext, task: TaskRef, response_url: str) -> TaskStatus:
        request = ctx.http.build_request("GET", response_url, headers=self._headers(ctx))
        response = await send(ctx.http, request)
        code = response.status_code
        if code < 400:
            result = expect_object(parse_json(response), "result")
            return self.parse_result(task.request.kind, result)
        error_type, message, detail = fal_error(response)
        if code == 429 or code in (401, 403) or (code == 404 and not error_type):
            raise_for_common_status(response, detail=detail)
        if code == 400 and not error_type and "in progress" in message.lower():
            # COMPLETED already, but the result is not served yet: look again shortly.
            return TaskStatus(state="running", raw_status="COMPLETED", poll_after=1.0)
        if code >= 500 and not _is_request_outcome(response):
            raise Unavailable(f"fal answered HTTP {code} for the result", detail=detail, status_code=code)
        return _failed_status("COMPLETED", error_type, message, detail)

    def parse_result(self, kind: MediaKind, result: dict[str, Any]) -> TaskStatus:
        outputs = result_outputs(kind, result)
        if not outputs:
            return TaskStatus(state="failed", raw_status="COMPLETED", error_code="provider_no_output",
                              error_message="fal completed the request without output files",
                              error_detail={"result_keys": sorted(result)[:20]})
        return TaskStatus(state="succeeded", raw_status="COMPLETED", progress=100, outputs=outputs)

    # -- cancel -------------------------------------------------------------------------
    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        _, _, cancel_url = self._urls(task)
        response = await send(ctx.http, ctx.http.build_request("PUT", cancel_url, headers=self._headers(ctx)))
        if response.status_code == 400 and _reply_status(response) == "ALREADY_COMPLETED":
            return True  # nothing left to stop
        raise_for_common_status(response, detail=fal_error(response)[2] if response.status_code >= 400 else None)
        return True

    # -- callbacks ----------------------------------------------------------------------
    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Verify the Ed25519 signature; the hint names the (signed) request id."""
        request_id = await self.webhooks.verify(ctx.http, headers, body)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("fal webhook body is not JSON") from exc
        if not isinstance(payload, dict):
            raise CallbackRejected("fal webhook body is not an object")
        if payload.get("request_id") not in (None, request_id):
            raise CallbackRejected("fal webhook body names another request than its signature")
        # "OK" / "ERROR": the state applied is the one fetched from status and result.
        return CallbackHint(task_id=request_id, raw_status=str(payload.get("status") or "") or None)

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        return {}  # fal's CDN media URLs are public


# -- helpers -----------------------------------------------------------------------------

def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _excerpt(value: Any) -> str:
    return json.dumps(value, default=str)[:300]


def _reply_status(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


def fal_error(response: httpx.Response) -> tuple[str | None, str, dict[str, Any]]:
    """``(error_type, message, detail)`` of a fal error response.

    Request errors are flat ``{"detail": str, "error_type"}`` (+ ``X-Fal-Error-Type``);
    model errors are ``{"detail": [{"loc", "msg", "type", ...}]}``, sometimes a plain string.
    """
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    error_type = (body.get("error_type") if isinstance(body, dict) else None) or \
        response.headers.get("x-fal-error-type")
    message = ""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                error_type = error_type or item.get("type")
                loc = ".".join(str(p) for p in item.get("loc") or [] if p != "body")
                parts.append(f"{item.get('msg')}" + (f" ({loc})" if loc else ""))
        message = "; ".join(parts)
    elif isinstance(detail, str):
        message = detail
    if not message:
        message = response.text[:200] if body is None else _excerpt(body)
    info: dict[str, Any] = {"http_status": response.status_code, "error_type": error_type,
                            "detail": detail if detail is not None else (body if body is not None
                                                                         else response.text[:300])}
    retryable = response.headers.get("x-fal-retryable")
    if retryable is not None:
        info["retryable"] = retryable.lower() == "true"
    if response.headers.get("x-fal-request-timeout-type"):
        info["timeout_type"] = response.headers["x-fal-request-timeout-type"]
    return (str(error_type) if error_type else None), message, info


def _is_request_outcome(response: httpx.Response) -> bool:
    """A 5xx that is the request's stored outcome (not a transient failure to serve it)."""
    if response.headers.get("x-fal-error-type") or response.headers.get("x-fal-request-id"):
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and (bool(body.get("error_type")) or isinstance(body.get("detail"), list))


def completed_usage(status_body: dict[str, Any]) -> Usage | None:
    """The billed run time a COMPLETED status reports (``metrics.inference_time``; fal reports it in the
    status, not in the result; legacy apps leave ``metrics`` out)."""
    metrics = status_body.get("metrics")
    return usage(compute_seconds=amount(metrics.get("inference_time"))) if isinstance(metrics, dict) else None


def _failed_status(raw: str, error_type: Any, message: str, detail: dict[str, Any]) -> TaskStatus:
    if error_type == "client_cancelled":
        return TaskStatus(state="canceled", raw_status=raw, error_code="provider_canceled",
                          error_message=f"fal canceled the request: {message}", error_detail=detail)
    code = "content_policy_violation" if error_type == "content_policy_violation" else "provider_failed"
    suffix = f" ({error_type})" if error_type and str(error_type) not in message else ""
    return TaskStatus(state="failed", raw_status=raw, error_code=code,
                      error_message=f"fal: {message}{suffix}", error_detail=detail)


def log_progress(logs: Any) -> int | None:
    """Progress from the newest tqdm (``45%|``) or ``Step i/N`` log line, capped at 99 while running."""
    if not isinstance(logs, list):
        return None
    for entry in reversed(logs):
        message = entry.get("message") if isinstance(entry, dict) else None
        if not isinstance(message, str):
            continue
        if tqdm := _TQDM.findall(message):
            return min(99, int(tqdm[-1]))
        if steps := _STEPS.findall(message):
            done, total = (int(x) for x in steps[-1])
            if total > 0:
                return min(99, 100 * done // total)
    return None


def _file(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str) and value.startswith(("https://", "http://", "data:")):
        return {"url": value}
    if isinstance(value, dict) and isinstance(value.get("url"), str) and \
            value["url"].startswith(("https://", "http://", "data:")):
        return value
    return None


def _find_files(value: Any, path: tuple[str | int, ...], found: list[tuple[dict[str, Any], tuple[str | int, ...]]]
                ) -> None:
    """Collect File-like objects: ``{"url", ...}`` with file fields, or anything under a media key."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _find_files(item, (*path, i), found)
        return
    f = _file(value)
    key = next((p for p in reversed(path) if isinstance(p, str)), None)
    if f is not None and (key in _MEDIA_KEYS or any(k in f for k in ("content_type", "file_name", "file_size"))):
        found.append((f, path))
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _find_files(v, (*path, k), found)


def result_outputs(kind: MediaKind, result: dict[str, Any]) -> list[ProviderOutput]:
    """Every media file of a fal result, preferring those of the job's kind."""
    found: list[tuple[dict[str, Any], tuple[str | int, ...]]] = []
    _find_files(result, (), found)
    nsfw = result.get("has_nsfw_concepts")
    outputs: list[ProviderOutput] = []
    seen: set[str] = set()
    for f, path in found:
        url = f["url"]
        if url in seen:
            continue
        seen.add(url)
        meta: dict[str, Any] = {k: f[k] for k in ("width", "height", "file_name", "file_size", "duration")
                                if f.get(k) is not None}
        index = path[1] if len(path) == 2 and path[0] == "images" else None
        if isinstance(index, int) and isinstance(nsfw, list) and index < len(nsfw):
            meta["has_nsfw_concepts"] = bool(nsfw[index])
        if isinstance(result.get("seed"), int):
            meta["seed"] = result["seed"]
        ctype = f.get("content_type") if isinstance(f.get("content_type"), str) else None
        outputs.append(ProviderOutput(url=url, content_type=ctype, metadata=meta))
    prefix = _KIND_PREFIX[kind]
    matching = [o for o in outputs if o.content_type and o.content_type.startswith(prefix)]
    untyped = [o for o in outputs if not o.content_type]
    return matching or untyped or outputs
