"""What the OpenAI facades share: OpenAI-shaped errors, model naming, size mapping, submitting.

**Model naming.** A facade request names ``<provider>/<model>`` (``kling/kling-v2-1-master``,
``replicate/black-forest-labs/flux-schnell``, ``fal/fal-ai/flux/schnell``): the part before the
first ``/`` is an Atelier provider. A bare name goes to its default provider: ``gpt-image-*`` and
``dall-e-*`` -> ``openai``, ``sora-*`` -> ``sora``, ``veo-*`` -> ``veo``, ``kling-*`` and
``kolors-*`` -> ``kling``. Responses name the model the same way (bare when its default provider
ran it), so a name read back can be sent again.

**Sizes.** OpenAI's ``size`` (``WxH``) maps onto Atelier's common inputs: the first of
``resolution=WxH`` (+ the nearest common ``aspect_ratio``), ``resolution=WxH``,
``aspect_ratio`` + ``resolution=<short side>p``, ``aspect_ratio`` alone that the model's adapter
accepts (Sora and OpenAI images take exact sizes, Veo ``720p``/``1080p``, Kling an aspect ratio).
When none fits, a 400 names ``size``.

**Errors** are OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Every error the SDK
would retry by default (409, 5xx) but where a retry could pay for a render twice carries
``x-should-retry: false``; only a briefly unreachable store (503) invites one.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api.deps import caller_key
from orchestrator.api.jobs import request_problem
from orchestrator.api.problems import Problem
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.ids import new_id
from orchestrator.domain.job import Job
from orchestrator.infra.media import sniff
from orchestrator.infra.storage import OutputTooLarge, spool
from orchestrator.services.runtime import Runtime
from orchestrator.store.jobs import IdempotencyConflict, UnreadableRecord
from orchestrator.store.ledger import BudgetExceeded
from orchestrator.wire.jobs import JobRequest
from providers.registry import ADAPTERS

log = logging.getLogger("atelier.api")

# Bare model names and the provider that serves them (fnmatch patterns, first match wins).
DEFAULT_PROVIDERS: tuple[tuple[str, str], ...] = (
    ("gpt-image-*", "openai"),
    ("dall-e-*", "openai"),
    ("sora-*", "sora"),
    ("veo-*", "veo"),
    ("kling-*", "kling"),
    ("kolors-*", "kling"),
)

# Aspect ratios a size may map to (within 5 %).
RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21", "5:4", "4:5")

# Uploaded input images (input_reference, images/edits): types and size cap.
INPUT_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
INPUT_MAX_BYTES = 50 * 1024 * 1024

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 410: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape. ``retry``: whether the SDK may send the request again."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry = retry
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        headers = {**self.headers, "x-should-retry": "true" if self.retry else "false"}
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def param_for(field: str, names: dict[str, str]) -> str:
    """The OpenAI parameter an Atelier field name comes from (``input.duration_seconds`` -> ``seconds``)."""
    for prefix, param in names.items():
        if field == prefix or field.startswith(prefix + "."):
            return param
    return field.removeprefix("input.options.").removeprefix("input.")


def from_problem(exc: Problem) -> OpenAIError:
    errors = exc.extra.get("errors") or []
    param = errors[0].get("field") if errors and isinstance(errors[0], dict) else None
    message = exc.detail or exc.title
    if exc.status == 401:
        return OpenAIError(401, f"Incorrect API key provided: {message}", code="invalid_api_key",
                           headers=exc.headers)
    status = 400 if exc.status == 422 else exc.status
    return OpenAIError(status, message, param=param, retry=exc.status == 503, headers=exc.headers)


class OpenAIRoute(APIRoute):
    """A route whose every error (auth, validation, store, ours) is answered in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except Problem as exc:
                return from_problem(exc).response()
            except RequestValidationError as exc:
                first: dict[str, Any] = next(iter(exc.errors()), {})
                loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
                return OpenAIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                                   param=".".join(loc) or None, code="invalid_value").response()
            except StarletteHTTPException as exc:
                status = exc.status_code if 400 <= exc.status_code < 600 else 400
                detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
                return OpenAIError(status, detail).response()
            except UnreadableRecord:
                return OpenAIError(410, "this video's record cannot be read; it is set aside for an operator",
                                   code="gone").response()
            except RedisError:
                return OpenAIError(503, "the job store is briefly unreachable; retry", retry=True,
                                   headers={"Retry-After": "1"}).response()
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return OpenAIError(500, "the server failed to handle this request").response()

        return answer


# -- reading request bodies -------------------------------------------------------------------
async def read_body(request: Request) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
    """A JSON or form (multipart or urlencoded) body as fields and files. ``a[b]`` form keys nest
    one level (``input_reference[image_url]``); ``a[]`` keys collect into a list."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=20, max_fields=200)
        except StarletteHTTPException:
            raise
        except Exception as exc:  # a malformed multipart body
            raise OpenAIError(400, f"the form body cannot be read: {exc}", code="invalid_body") from exc
        fields: dict[str, Any] = {}
        files: dict[str, list[UploadFile]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(key.removesuffix("[]"), []).append(value)
                continue
            if key.endswith("[]"):
                fields.setdefault(key[:-2], []).append(value)
            elif "[" in key and key.endswith("]"):
                outer, _, inner = key[:-1].partition("[")
                nested = fields.setdefault(outer, {})
                if isinstance(nested, dict):
                    nested[inner] = value
            else:
                fields[key] = value
        return fields, files
    raw = await request.body()
    if not raw.strip():
        return {}, {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    return body, {}


async def close_files(files: dict[str, list[UploadFile]]) -> None:
    for uploads in files.values():
        for upload in uploads:
            await upload.close()


async def store_input(rt: Runtime, tenant: str, upload: UploadFile, param: str) -> str:
    """Keep an uploaded input image in storage and return a URL providers can fetch it at.

    Its type is checked from its bytes (images only) and its size capped (``INPUT_MAX_BYTES``). The URL
    lives as long as a job may wait for its submission; the file is reaped then (``input:`` members of
    the retention schedule).
    """
    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await upload.read(1024 * 1024):
            yield chunk

    try:
        spooled = await spool(chunks(), INPUT_MAX_BYTES)
    except OutputTooLarge as exc:
        raise OpenAIError(400, f"{param}: a file of at most {INPUT_MAX_BYTES} bytes", param=param,
                          code="file_too_large") from exc
    try:
        info = sniff(spooled.head)
        if info is None or info.content_type not in INPUT_TYPES:
            raise OpenAIError(400, f"{param}: an image ({', '.join(sorted(INPUT_TYPES))}), not "
                                   f"{info.content_type if info else 'an unknown type'}", param=param,
                              code="invalid_image_format")
        key = f"{tenant}/inputs/{new_id('inp')}.{info.extension}"
        await rt.storage.put(key, spooled, info.content_type)
    finally:
        spooled.file.close()
    ttl = int(min(7 * 24 * 3600, rt.settings.job_timeout_seconds + 3600))
    await rt.store.schedule_expiry(f"input:{key}", time.time() + ttl)
    return await rt.storage.url(key, ttl)


def invalid(exc: ValidationError, names: dict[str, str] | None = None, prefix: str = "") -> OpenAIError:
    """A 400 for a body that did not validate; ``names`` maps Atelier fields (``prefix`` + loc) to parameters."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    if names is not None:
        loc = param_for(prefix + loc, names)
    message = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        message = "unknown parameter"
    return OpenAIError(400, f"{loc or 'body'}: {message}", param=loc or None, code="invalid_value")


# -- models ------------------------------------------------------------------------------------
def resolve_model(name: str) -> tuple[str, str]:
    """``(provider, model)`` for a facade model name (see the module's doc)."""
    provider, sep, rest = name.partition("/")
    if sep and provider in ADAPTERS and rest:
        return provider, rest
    for pattern, default in DEFAULT_PROVIDERS:
        if fnmatch.fnmatchcase(name, pattern):
            return default, name
    bare = ", ".join(p for p, _ in DEFAULT_PROVIDERS)
    raise OpenAIError(400, f"The model {name!r} does not exist: name it '<provider>/<model>' with an Atelier "
                           f"provider ({', '.join(sorted(ADAPTERS))}), or use a bare name of {bare}",
                      param="model", code="model_not_found")


def facade_model(provider: str, model: str) -> str:
    """The name a facade shows for ``model`` at ``provider`` (bare when that is its default provider)."""
    for pattern, default in DEFAULT_PROVIDERS:
        if fnmatch.fnmatchcase(model, pattern):
            return model if default == provider else f"{provider}/{model}"
    return f"{provider}/{model}"


# -- sizes -------------------------------------------------------------------------------------
def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and 16 <= int(width) <= 8192 and 16 <= int(height) <= 8192):
        raise OpenAIError(400, f"Invalid size {size!r}: give it as WIDTHxHEIGHT, e.g. 1280x720", param="size",
                          code="invalid_value")
    return int(width), int(height)


def nearest_ratio(width: int, height: int) -> str | None:
    actual = width / height
    best = min(RATIOS, key=lambda r: abs(int(r.split(":")[0]) / int(r.split(":")[1]) - actual))
    w, h = (int(v) for v in best.split(":"))
    return best if abs(w / h - actual) / actual <= 0.05 else None


def size_inputs(size: str | None) -> list[dict[str, Any]]:
    """The common-input candidates for ``size`` (best first); ``[{}]`` when no size is asked."""
    if size is None or size == "auto":
        return [{}]
    width, height = parse_size(size)
    ratio = nearest_ratio(width, height)
    exact = f"{width}x{height}"
    candidates: list[dict[str, Any]] = []
    if ratio is not None:
        candidates.append({"resolution": exact, "aspect_ratio": ratio})
    candidates.append({"resolution": exact})
    if ratio is not None:
        candidates += [{"aspect_ratio": ratio, "resolution": f"{min(width, height)}p"}, {"aspect_ratio": ratio}]
    return candidates


# -- submitting --------------------------------------------------------------------------------
async def choose(rt: Runtime, tenant: str, requests: Sequence[JobRequest], names: dict[str, str]) -> JobRequest:
    """The first request the provider accepts; else a 400 (404/409 for a source) from the last one's problem."""
    problem: tuple[int, str, str] | None = None
    for request in requests:
        problem = await request_problem(rt, tenant, request)
        if problem is None:
            return request
    assert problem is not None
    status, field, message = problem
    param = param_for(field, names)
    code = {404: "not_found", 409: "invalid_state"}.get(status, "invalid_value")
    if field == "provider":
        param, code = "model", "model_not_found"
    raise OpenAIError(400 if status == 422 else status, f"{param}: {message}", param=param, code=code)


async def create_job(rt: Runtime, tenant: str, request: JobRequest, idempotency_key: str | None) -> Job:
    """Record the job exactly as ``POST /v1/jobs`` does (idempotency, deadline, queueing)."""
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), "webhook_url")
    provider = rt.registry.get(request.provider)
    assert provider is not None  # checked by ``choose``
    try:
        job, _ = await rt.jobs.create(tenant, request, idempotency_key=idempotency_key, provider=provider.settings,
                                      api_key=caller_key.get())
    except IdempotencyConflict as exc:
        raise OpenAIError(409, f"this Idempotency-Key was used with a different request (job {exc.job_id})",
                          code="idempotency_key_reused") from exc
    except BudgetExceeded as exc:  # OpenAI's own answer to a spent quota
        raise OpenAIError(429, f"You exceeded your current quota: {exc}", code="insufficient_quota") from exc
    return job


async def wait_finished(rt: Runtime, job: Job, timeout: float) -> Job:
    """The job once terminal, or as it stands when ``timeout`` passed (polling the store)."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while not job.status.terminal and time.monotonic() < deadline:
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, 0.5)
        found = await rt.store.get(job.id)
        if found is None:
            break
        job = found
    return job
