"""``/v1/jobs``: submit, read, list, cancel, and the event log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from pydantic import ValidationError

from orchestrator.api.deps import RuntimeDep, TenantDep, caller_key, owned_job
from orchestrator.api.problems import Problem, field_name
from orchestrator.api.waiting import NO_WAIT, PREFERENCE_APPLIED, PreferWait, QueryWait
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.job import generation_request, source_media
from orchestrator.services.fallbacks import entry_request, unusable
from orchestrator.services.jobs import model_cost, model_note
from orchestrator.services.runtime import Runtime
from orchestrator.services.sources import SourceProblem, source_job
from orchestrator.store.jobs import Conflict, IdempotencyConflict
from orchestrator.store.ledger import BudgetExceeded, dollars
from orchestrator.wire.jobs import (
    TERMINAL,
    AttemptView,
    JobEvent,
    JobPage,
    JobQuery,
    JobQueryResult,
    JobQuote,
    JobRequest,
    JobStatus,
    JobView,
)
from orchestrator.wire.strict import IsoDatetime
from providers.catalog import CatalogError, lifecycle_verdict
from providers.validation import invalid_inputs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


async def request_problem(rt: Runtime, tenant: str, request: JobRequest) -> tuple[int, str, str] | None:
    """``(status, field, message)`` for the first thing the provider would refuse, or ``None``."""
    problems = await request_problems(rt, tenant, request)
    return problems[0] if problems else None


async def request_problems(rt: Runtime, tenant: str, request: JobRequest) -> list[tuple[int, str, str]]:
    """``(status, field, message)`` for every field the provider would refuse (empty: acceptable).

    A follow-up's source must be the tenant's (404), succeeded (409) and have the output (422).
    """
    provider = rt.registry.get(request.provider)
    if provider is None:
        names = ", ".join(rt.registry.names()) or "none"
        return [(422, "provider", f"unknown or unconfigured provider {request.provider!r} (configured: {names})")]
    if not provider.settings.api_keys:
        return [(422, "provider", f"{request.provider} has no API key configured on this server")]
    source = None
    if request.source is not None:
        try:
            found = await source_job(rt.store, tenant, request.source)
        except SourceProblem as exc:
            return [(exc.status, exc.field, exc.message)]
        url = await rt.storage.url(found.outputs[request.source.output].key, rt.settings.output_url_ttl_seconds)
        source = source_media(found, request.source.output, url)
    problems = [(422, exc.field, exc.message)
                for exc in invalid_inputs(provider, generation_request(request, source))]
    if any(field in ("model", "kind") for _, field, _ in problems):
        return problems
    try:
        refusal = lifecycle_verdict(provider.settings, request.model).refusal
    except CatalogError as exc:
        refusal = f"the operator's catalog entry is invalid: {exc}"
    if refusal is not None:
        problems.append((422, "model", refusal))  # after the input's: the first error stays the adapter's
    return problems


@dataclass
class Plan:
    """What an accepted request starts as: ``request`` (itself, or its first usable fallback when its
    own provider cannot take it here), and the entries skipped on the way."""

    request: JobRequest
    skipped: list[AttemptView]


def _fallback_field(index: int, field: str) -> str:
    return f"fallbacks[{index}].{field if field in ('provider', 'model', 'kind') else 'input.' + field}"


async def plan_request(rt: Runtime, tenant: str, request: JobRequest) -> Plan:
    """Validate a request and each of its fallbacks (422 naming ``fallbacks[i].field``).

    A provider that cannot take the job at all here (not configured, no key, a sunset model) is
    skipped for the next entry when the request has fallbacks: it provably creates nothing.
    """
    if request.fallbacks and request.source is not None:
        message = "a follow-up acts on its source's provider and cannot fall back"
        raise Problem(422, "Invalid request", f"fallbacks: {message}",
                      errors=[{"field": "fallbacks", "message": message}])
    candidates = [request]
    errors: list[dict[str, str]] = []
    for index, entry in enumerate(request.fallbacks):
        try:
            candidates.append(entry_request(request, entry, request.input))
        except ValidationError as exc:
            errors += [{"field": f"fallbacks[{index}].input.{field_name(e.get('loc', ()))}",
                        "message": e.get("msg", "invalid")} for e in exc.errors()]
    if errors:
        raise Problem(422, "Invalid request", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                      errors=errors)
    skipped: list[AttemptView] = []
    chosen: int | None = None
    status = 422
    for index, candidate in enumerate(candidates):
        why = unusable(rt.registry.get(candidate.provider), candidate.provider, candidate.model)
        if why is not None and request.fallbacks:
            if chosen is None:
                skipped.append(AttemptView(provider=candidate.provider, model=candidate.model, outcome="skipped",
                                           message=why))
            continue
        problems = await request_problems(rt, tenant, candidate)
        status = problems[0][0] if problems and not errors else status
        errors += [{"field": field if index == 0 else _fallback_field(index - 1, field), "message": message}
                   for _, field, message in problems]
        if chosen is None and not problems:
            chosen = index
    if errors:
        title = {404: "Not found", 409: "Conflict"}.get(status, "Invalid request")
        raise Problem(status, title, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
    if chosen is None:
        reasons = "; ".join(f"{a.provider}/{a.model}: {a.message}" for a in skipped)
        raise Problem(422, "Invalid request", f"provider: none of the request's providers can take it here ({reasons})",
                      errors=[{"field": "provider", "message": reasons}])
    if chosen == 0:
        return Plan(request, [])
    start = candidates[chosen].model_copy(update={
        "fallbacks": request.fallbacks[chosen:], "fallback_on": request.fallback_on,
        "webhook_url": request.webhook_url, "metadata": request.metadata,
        "retry_unknown_submissions": request.retry_unknown_submissions})
    return Plan(start, skipped)


def quote(rt: Runtime, request: JobRequest) -> JobQuote:
    """A dry run's answer: the request as it would start, and its estimate."""
    provider = rt.registry.get(request.provider)
    cost = model_cost(provider.settings if provider else None, request)
    return JobQuote(request=request, cost=cost.estimated if cost else None,
                    note=model_note(provider.settings, request.model) if provider else None)


def budget_problem(exc: BudgetExceeded) -> Problem:
    """402 naming what is left of the budget that refused the job."""
    return Problem(402, "Budget exceeded", str(exc), budget=exc.period, remaining=dollars(exc.remaining),
                   needed=dollars(exc.needed), currency="USD")


@router.post("", status_code=202, response_model=JobView | JobQuote,
             responses={200: {"description": "An earlier job with the same Idempotency-Key and body, "
                                             "a dry run's quote (`dry_run: true`: nothing is created), or "
                                             "the job finished within `Prefer: wait=N`",
                              "headers": PREFERENCE_APPLIED},
                        202: {"description": "Accepted: the job as it is now (also when a `Prefer: wait=N` "
                                             "ended before it finished)", "headers": PREFERENCE_APPLIED},
                        402: {"description": "The job's estimate does not fit the tenant's budget"}})
async def submit_job(request: JobRequest, rt: RuntimeDep, tenant: TenantDep, response: Response, wait: PreferWait,
                     idempotency_key: IdempotencyKey = None) -> JobView | JobQuote:
    plan = await plan_request(rt, tenant, request)
    if request.dry_run:
        if request.webhook_url is not None:
            await check_url(rt, str(request.webhook_url), "webhook_url")
        response.status_code = 200
        return quote(rt, plan.request)
    return await wait.answer(rt, await accept(rt, tenant, request, plan, response, idempotency_key), response)


async def create_job(request: JobRequest, rt: Runtime, tenant: str, response: Response,
                     idempotency_key: str | None = None) -> JobView:
    """Validate and accept a job (the dashboard's and the facades' way in; a dry run is not one)."""
    return await accept(rt, tenant, request, await plan_request(rt, tenant, request), response, idempotency_key)


async def accept(rt: Runtime, tenant: str, request: JobRequest, plan: Plan, response: Response,
                 idempotency_key: str | None) -> JobView:
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), "webhook_url")
    provider = rt.registry.get(plan.request.provider)
    assert provider is not None
    try:
        job, created = await rt.jobs.create(tenant, plan.request, idempotency_key=idempotency_key,
                                            provider=provider.settings, original=request, skipped=plan.skipped,
                                            api_key=caller_key.get())
    except IdempotencyConflict as exc:
        raise Problem(409, "Idempotency key reused", "this Idempotency-Key was used with a different "
                      "request body", job_id=exc.job_id) from exc
    except BudgetExceeded as exc:
        raise budget_problem(exc) from exc
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await rt.jobs.view(job)


@router.get("", response_model=JobPage)
async def list_jobs(
    rt: RuntimeDep, tenant: TenantDep,
    status: JobStatus | None = None,
    provider: str | None = None,
    created_after: IsoDatetime | None = None,
    created_before: IsoDatetime | None = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    page = await rt.store.page(
        tenant, status=status, provider=provider,
        created_from=created_after.timestamp() if created_after else None,
        created_to=created_before.timestamp() if created_before else None,
        cursor=cursor, limit=limit,
    )
    return JobPage(data=[await rt.jobs.view(j) for j in page.jobs], next_cursor=page.next_cursor)


@router.post("/query", response_model=JobQueryResult)
async def query_jobs(query: JobQuery, rt: RuntimeDep, tenant: TenantDep) -> JobQueryResult:
    """Up to 1,000 jobs in one call; unknown ids and other tenants' ids are reported as not found."""
    wanted = list(dict.fromkeys(query.ids))
    found = await rt.store.get_many([i for i in wanted if i.startswith("job_") and len(i) < 64])
    by_id = {j.id: j for j in found if j is not None and j.tenant == tenant}
    return JobQueryResult(data=[await rt.jobs.view(by_id[i]) for i in wanted if i in by_id],
                          not_found=[i for i in wanted if i not in by_id])


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: str, rt: RuntimeDep, tenant: TenantDep, wait: QueryWait = NO_WAIT) -> JobView:
    return await wait.answer(rt, await rt.jobs.view(await owned_job(rt, tenant, job_id)))


@router.post("/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, rt: RuntimeDep, tenant: TenantDep) -> JobView:
    for _ in range(5):
        job = await owned_job(rt, tenant, job_id)
        if job.status == JobStatus.canceled:
            return await rt.jobs.view(job)
        if job.status in TERMINAL:
            raise Problem(409, "Job already finished", f"job {job_id} is {job.status.value}",
                          status_code=job.status.value)
        try:
            return await rt.jobs.view(await rt.jobs.cancel(job))
        except Conflict:
            continue
    raise Problem(409, "Job is changing", "the job changed repeatedly; retry the cancel")


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={409: {"description": "The job has not finished: cancel it first"}})
async def delete_job(job_id: str, rt: RuntimeDep, tenant: TenantDep) -> Response:
    """Delete a finished job and its stored outputs now (otherwise they go after the retention period)."""
    job = await owned_job(rt, tenant, job_id)
    if job.status not in TERMINAL:
        raise Problem(409, "Job not finished", f"job {job_id} is {job.status.value}: cancel it first, then delete it",
                      status_code=job.status.value)
    await rt.reaper.delete(job.id, job)
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=list[JobEvent])
async def job_events(job_id: str, rt: RuntimeDep, tenant: TenantDep,
                     after: Annotated[int, Query(ge=0)] = 0) -> list[JobEvent]:
    await owned_job(rt, tenant, job_id)
    return await rt.store.events(job_id, after)
