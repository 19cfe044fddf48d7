"""``/v1/jobs``: submit, read, list, cancel, and the event log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from orchestrator.api.deps import RuntimeDep, TenantDep, owned_job
from orchestrator.api.problems import Problem
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.job import generation_request, source_media
from orchestrator.services.runtime import Runtime
from orchestrator.services.sources import SourceProblem, source_job
from orchestrator.store.jobs import Conflict, IdempotencyConflict
from orchestrator.wire.jobs import (
    TERMINAL,
    JobEvent,
    JobPage,
    JobQuery,
    JobQueryResult,
    JobRequest,
    JobStatus,
    JobView,
)
from providers.catalog import CatalogError, lifecycle_verdict
from providers.errors import InvalidInput

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


async def request_problem(rt: Runtime, tenant: str, request: JobRequest) -> tuple[int, str, str] | None:
    """``(status, field, message)`` for the first thing the provider would refuse, or ``None``.

    A follow-up's source must be the tenant's (404), succeeded (409) and have the output (422).
    """
    provider = rt.registry.get(request.provider)
    if provider is None:
        names = ", ".join(rt.registry.names()) or "none"
        return 422, "provider", f"unknown or unconfigured provider {request.provider!r} (configured: {names})"
    if not provider.settings.api_keys:
        return 422, "provider", f"{request.provider} has no API key configured on this server"
    source = None
    if request.source is not None:
        try:
            found = await source_job(rt.store, tenant, request.source)
        except SourceProblem as exc:
            return exc.status, exc.field, exc.message
        url = await rt.storage.url(found.outputs[request.source.output].key, rt.settings.output_url_ttl_seconds)
        source = source_media(found, request.source.output, url)
    try:
        provider.validate(generation_request(request, source))
    except InvalidInput as exc:
        return 422, exc.field, exc.message
    try:
        refusal = lifecycle_verdict(provider.settings, request.model).refusal
    except CatalogError as exc:
        return 422, "model", f"the operator's catalog entry is invalid: {exc}"
    if refusal is not None:
        return 422, "model", refusal
    return None


async def validate_request(rt: Runtime, tenant: str, request: JobRequest) -> None:
    """Everything the provider would refuse, refused here with the field named (nothing is enqueued)."""
    problem = await request_problem(rt, tenant, request)
    if problem is not None:
        status, field, message = problem
        title = {404: "Not found", 409: "Conflict"}.get(status, "Invalid request")
        raise Problem(status, title, f"{field}: {message}", errors=[{"field": field, "message": message}])


@router.post("", status_code=202, response_model=JobView,
             responses={200: {"description": "An earlier job with the same Idempotency-Key and body"}})
async def submit_job(request: JobRequest, rt: RuntimeDep, tenant: TenantDep, response: Response,
                     idempotency_key: IdempotencyKey = None) -> JobView:
    await validate_request(rt, tenant, request)
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), "webhook_url")
    provider = rt.registry.get(request.provider)
    assert provider is not None
    try:
        job, created = await rt.jobs.create(tenant, request, idempotency_key=idempotency_key,
                                            provider=provider.settings)
    except IdempotencyConflict as exc:
        raise Problem(409, "Idempotency key reused", "this Idempotency-Key was used with a different "
                      "request body", job_id=exc.job_id) from exc
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await rt.jobs.view(job)


@router.get("", response_model=JobPage)
async def list_jobs(
    rt: RuntimeDep, tenant: TenantDep,
    status: JobStatus | None = None,
    provider: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
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
async def get_job(job_id: str, rt: RuntimeDep, tenant: TenantDep) -> JobView:
    return await rt.jobs.view(await owned_job(rt, tenant, job_id))


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
