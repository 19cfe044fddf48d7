"""What the Replicate and fal facades share: model naming, kinds, native inputs, the key, submitting.

**Model naming** (as the OpenAI facade's): a name whose first segment is an Atelier provider
reaches that provider (``kling/kling-v2-1``, ``replicate/black-forest-labs/flux-schnell``,
``fal/fal-ai/flux/schnell``); any other name is a model of the facade's own provider, named as
that provider names it (``black-forest-labs/flux-schnell`` on Replicate, ``fal-ai/flux/schnell``
on fal). So ``minimax/video-01`` is Atelier's MiniMax provider; Replicate's model of that name is
``replicate/minimax/video-01``.

**Kind.** Replicate and fal requests do not say whether they render an image, a video or audio;
the job's kind is, in order: the ``Atelier-Kind`` header (``image``, ``video`` or ``audio``); the
one kind the catalog lists for the model; the one kind its provider renders; among the kinds
allowed (the catalog's, else the provider's), ``video`` when the input carries a ``duration`` or
the model's name says ``video``, ``audio`` when the name says ``audio``/``music``/``song``/
``sound``/``speech``/``tts``/``voice``; else the first of ``image``, ``video``, ``audio`` allowed.

**Inputs** are the provider's native ones. Names with a common meaning (``prompt``,
``negative_prompt``, the input image, ``duration``, ``aspect_ratio``, ``resolution``, ``seed``,
the output count) become Atelier's common inputs when their value fits one, so the catalog and
any provider's adapter read them; everything else passes through verbatim as ``options``. For
the facade's own provider only the names its adapter maps back unchanged become common inputs,
so a Replicate input reaches Replicate, and a fal input fal, exactly as it was sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api.deps import RuntimeDep, caller_key
from orchestrator.api.jobs import request_problem
from orchestrator.api.problems import Problem
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.store.jobs import Conflict, IdempotencyConflict, UnreadableRecord
from orchestrator.store.ledger import BudgetExceeded
from orchestrator.store.tenants import hash_key, tenant_for_key
from orchestrator.wire.jobs import TERMINAL, JobEvent, JobInput, JobKind, JobRequest, JobStatus
from providers.catalog import CatalogError, model_spec
from providers.registry import ADAPTERS

log = logging.getLogger("atelier.api")

KIND_ORDER = (JobKind.image, JobKind.video, JobKind.audio)
AUDIO_WORDS = re.compile(r"audio|music|song|sound|speech|tts|voice", re.IGNORECASE)


@dataclass
class FacadeError(Exception):
    """A refusal, answered in the shape of the facade's provider. ``fields``: ``(field, message)`` pairs
    (the facade's own names); ``code``: a short machine name (fal's ``error_type``)."""

    status: int
    detail: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.detail)


def from_problem(exc: Problem) -> FacadeError:
    errors = exc.extra.get("errors") or []
    fields = [(str(e.get("field")), str(e.get("message"))) for e in errors if isinstance(e, dict)]
    return FacadeError(exc.status, exc.detail or exc.title, fields, headers=dict(exc.headers or {}))


def shaped_route(render: Callable[[FacadeError], Response]) -> type[APIRoute]:
    """A route class whose every error (auth, validation, store, ours) is ``render``ed in the provider's shape."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def answer(request: Request) -> Response:
                try:
                    return await handler(request)
                except FacadeError as exc:
                    return render(exc)
                except Problem as exc:
                    return render(from_problem(exc))
                except RequestValidationError as exc:
                    fields = [(".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path",
                                                                                        "header")) or "body",
                               str(e.get("msg", "invalid"))) for e in exc.errors()]
                    return render(FacadeError(422, "; ".join(f"{f}: {m}" for f, m in fields), fields))
                except StarletteHTTPException as exc:
                    status = exc.status_code if 400 <= exc.status_code < 600 else 400
                    detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
                    return render(FacadeError(status, detail))
                except UnreadableRecord:
                    return render(FacadeError(410, "this job's record cannot be read; it is set aside for an "
                                                   "operator", code="gone"))
                except RedisError:
                    return render(FacadeError(503, "the job store is briefly unreachable; retry",
                                              code="service_unavailable", headers={"Retry-After": "1"}))
                except Exception:
                    log.exception("unhandled error on %s %s", request.method, request.url.path)
                    return render(FacadeError(500, "the server failed to handle this request",
                                              code="internal_error"))

            return answer

    return ShapedRoute


# -- the key -----------------------------------------------------------------------------------
async def facade_tenant(rt: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant behind an Atelier API key sent as the SDKs send theirs: ``Bearer`` (Replicate),
    ``Token`` (Replicate's older clients) or ``Key`` (fal)."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() not in ("bearer", "token", "key") or not key.strip():
        raise FacadeError(401, "send an Atelier API key as 'Authorization: Bearer <key>' (or 'Key <key>')",
                          code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    found = await tenant_for_key(rt.redis, key.strip())
    if found is None:
        raise FacadeError(401, "the API key is not valid", code="unauthorized",
                          headers={"WWW-Authenticate": "Bearer"})
    caller_key.set(hash_key(key.strip()))
    return found


FacadeTenant = Annotated[str, Depends(facade_tenant)]


# -- naming and kinds --------------------------------------------------------------------------
def resolve(name: str, home: str) -> tuple[str, str]:
    """``(provider, model)`` for a facade model name (see the module's doc); ``home``: the facade's provider."""
    provider, sep, rest = name.partition("/")
    if sep and rest and provider in ADAPTERS:
        return provider, rest
    return home, name


def shown_name(provider: str, model: str, home: str) -> str:
    """The name the facade shows for a job's model: one that, sent again, reaches the same provider."""
    return model if provider == home and model.partition("/")[0] not in ADAPTERS else f"{provider}/{model}"


def choose_kind(rt: Runtime, provider: str, model: str, asked: str | None, given: Mapping[str, Any]) -> JobKind:
    """The job's kind (see the module's doc); a 422 naming ``Atelier-Kind`` for one the model does not render."""
    adapter = rt.registry.get(provider)
    allowed: list[JobKind] = [k for k in KIND_ORDER if adapter is None or k.value in adapter.kinds]
    if adapter is not None:
        try:
            spec = model_spec(adapter.settings, model.split(":")[0])
        except CatalogError:
            spec = None
        listed = [JobKind(k) for k in spec.kinds()] if spec is not None else []
        if listed:
            allowed = [k for k in allowed if k in listed] or allowed
    if asked is not None:
        kind = next((k for k in KIND_ORDER if k.value == asked.strip().lower()), None)
        if kind is None or kind not in allowed:
            names = ", ".join(k.value for k in allowed)
            raise FacadeError(422, f"Atelier-Kind: {provider}/{model} renders {names}, not {asked!r}",
                              [("Atelier-Kind", f"one of {names}")], code="invalid_kind")
        return kind
    if len(allowed) == 1:
        return allowed[0]
    if JobKind.video in allowed and ("duration" in given or "video" in model.lower()):
        return JobKind.video
    if JobKind.audio in allowed and AUDIO_WORDS.search(model):
        return JobKind.audio
    return allowed[0] if allowed else JobKind.image


# -- native inputs -----------------------------------------------------------------------------
def _misfit(common: str, value: Any) -> str | None:
    """Why ``value`` is not a valid common input ``common`` (``None`` when it is)."""
    try:
        JobInput.model_validate({common: value})
    except ValidationError as exc:
        return str(exc.errors()[0].get("msg", "invalid"))
    return None


def native_input(given: Mapping[str, Any], aliases: Mapping[str, str], exact: frozenset[str] | None,
                 field: str) -> JobInput:
    """Common inputs from the native names in ``aliases`` (only those in ``exact`` unless it is ``None``)
    whose value fits, the rest as ``options``. The facade's own provider (``exact``) reads a value that
    does not fit under its native name; another provider could not, so it is a 422 naming it
    (``field.name``), as is a whole too large."""
    common: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for name, value in given.items():
        target = aliases.get(name)
        if target is None or target in common or (exact is not None and name not in exact):
            options[name] = value
        elif (message := _misfit(target, value)) is None:
            common[target] = value
        elif exact is not None:
            options[name] = value
        else:
            raise FacadeError(422, f"{field}.{name}: {message}", [(f"{field}.{name}", message)],
                              code="invalid_input")
    try:
        return JobInput.model_validate({**common, "options": options})
    except ValidationError as exc:
        message = str(exc.errors()[0].get("msg", "invalid"))
        raise FacadeError(422, f"{field}: {message}", [(field, message)], code="invalid_input") from exc


def native_field(atelier: str, aliases: Mapping[str, str], *, name_field: str, webhook: str, body: str) -> str:
    """The facade's name for an Atelier field a refusal names: ``name_field`` for the model's name,
    ``webhook`` for ``webhook_url``, ``{body}.{native}`` for an input (its native alias where ``aliases``,
    native -> common, has one; an option as it is)."""
    if atelier in ("provider", "model", "kind", "operation", "source"):
        return name_field
    if atelier == "webhook_url":
        return webhook
    if atelier.startswith("input.options."):
        return f"{body}." + atelier.removeprefix("input.options.")
    if atelier.startswith("input."):
        common = atelier.removeprefix("input.").split(".")[0]
        native = {to: name for name, to in aliases.items()}  # (the last native name of a common one wins)
        return f"{body}.{native.get(common, common)}"
    return atelier


def native_view(job_input: JobInput, aliases: Mapping[str, str]) -> dict[str, Any]:
    """A job's input under the facade's native names (the inverse of ``native_input``)."""
    inverse = {common: name for name, common in reversed(list(aliases.items()))}
    shown: dict[str, Any] = {}
    for common, value in job_input.model_dump(mode="json", exclude={"options"}, exclude_none=True).items():
        if common == "duration_seconds" and float(value).is_integer():
            value = int(value)
        shown[inverse.get(common, common)] = value
    return shown | job_input.options


# -- submitting --------------------------------------------------------------------------------
async def submit(rt: Runtime, tenant: str, request: JobRequest, idempotency_key: str | None,
                 field_name: Callable[[str], str]) -> Job:
    """Validate ``request`` as ``POST /v1/jobs`` does and record it (idempotency, deadline, queueing);
    ``field_name`` turns an Atelier field into the facade's name for it."""
    problem = await request_problem(rt, tenant, request)
    if problem is not None:
        status, name, message = problem
        shown = field_name(name)
        raise FacadeError(status if status in (404, 409) else 422, f"{shown}: {message}", [(shown, message)],
                          code="invalid_input" if status == 422 else "invalid_source")
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), field_name("webhook_url"))
    provider = rt.registry.get(request.provider)
    assert provider is not None  # checked by ``request_problem``
    try:
        job, _ = await rt.jobs.create(tenant, request, idempotency_key=idempotency_key, provider=provider.settings,
                                      api_key=caller_key.get())
    except IdempotencyConflict as exc:
        raise FacadeError(422, f"this Idempotency-Key was used with a different request (job {exc.job_id})",
                          [("Idempotency-Key", "used with a different request")],
                          code="idempotency_key_reused") from exc
    except BudgetExceeded as exc:  # as Replicate answers a spent credit
        raise FacadeError(402, f"Budget exceeded: {exc}", code="budget_exceeded") from exc
    return job


async def owned(rt: Runtime, tenant: str, job_id: str, missing: str) -> Job:
    """The tenant's job, or a 404 (other tenants' ids included: existence is not disclosed)."""
    job = await rt.store.get(job_id) if job_id.startswith("job_") and len(job_id) < 64 else None
    if job is None or job.tenant != tenant:
        raise FacadeError(404, missing, code="not_found")
    return job


async def cancel(rt: Runtime, job: Job) -> Job:
    """Cancel an unfinished job (a finished one is returned as it is, as Replicate and fal do)."""
    for _ in range(5):
        if job.status in TERMINAL:
            return job
        try:
            return await rt.jobs.cancel(job)
        except Conflict:
            found = await rt.store.get(job.id)
            if found is None:
                break
            job = found
    raise FacadeError(503, "the job changed repeatedly; retry the cancel", code="conflict",
                      headers={"Retry-After": "1"})


def log_lines(events: list[JobEvent]) -> list[tuple[str, str, str]]:
    """``(timestamp, level, message)`` per event of a job's log: what a provider's ``logs`` shows."""
    lines = []
    for event in events:
        text = f"{event.type}: {event.status.value}"
        if event.note:
            text += f" ({event.note})"
        if event.error is not None:
            text += f": {event.error.code}: {event.error.message}"
        level = "ERROR" if event.error is not None or event.status == JobStatus.failed else "INFO"
        lines.append((event.at.isoformat().replace("+00:00", "Z"), level, text))
    return lines


def run_seconds(job: Job) -> tuple[float | None, float | None]:
    """``(seconds rendering, seconds in all)`` of a finished job (``None`` before it finished)."""
    finished = job.timestamps.get(job.status.value) if job.status in TERMINAL else None
    if finished is None:
        return None, None
    started = job.timestamps.get(JobStatus.running.value) or job.timestamps.get(JobStatus.submitted.value)
    predict = max(0.0, (finished - started).total_seconds()) if started is not None else None
    return predict, max(0.0, (finished - job.created_at).total_seconds())
