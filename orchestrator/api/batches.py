"""``/v1/batches``: up to 10,000 jobs in one request, with per-item validation, counts and cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.jobs import request_problem
from orchestrator.api.problems import Problem, field_name
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.job import BatchRecord
from orchestrator.infra.destinations import UrlChecker
from orchestrator.services.batches import BatchIdempotencyConflict, item_problem_ref
from orchestrator.services.runtime import Runtime
from orchestrator.wire.batches import BatchCreated, BatchItem, BatchPage, BatchRequest, BatchView, ItemProblem
from orchestrator.wire.jobs import JobPage, JobRequest, JobStatus

router = APIRouter(prefix="/v1/batches", tags=["batches"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


async def validate_items(rt: Runtime, tenant: str, items: list[dict[str, object]]) -> tuple[
        list[tuple[int, JobRequest, str | None]], list[ItemProblem]]:
    valid: list[tuple[int, JobRequest, str | None]] = []
    problems: list[ItemProblem] = []
    destinations = UrlChecker(rt.settings.webhook_allow_private)
    for index, raw in enumerate(items):
        if index % 500 == 499:
            await asyncio.sleep(0)  # let other requests through while validating thousands of items
        ref = item_problem_ref(raw)
        try:
            item = BatchItem.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            problems.append(ItemProblem(index=index, ref=ref, field=field_name(err.get("loc", ())),
                                        message=err.get("msg", "invalid")))
            continue
        problem = await request_problem(rt, tenant, item)
        if problem is not None:
            problems.append(ItemProblem(index=index, ref=ref, field=problem[1], message=problem[2]))
            continue
        refused = await destinations.problem(str(item.webhook_url)) if item.webhook_url else None
        if refused is not None:
            problems.append(ItemProblem(index=index, ref=ref, field="webhook_url", message=refused))
            continue
        valid.append((index, JobRequest.model_validate(item.model_dump(exclude={"ref"})), item.ref))
    return valid, problems


async def _owned(rt: Runtime, tenant: str, batch_id: str) -> BatchRecord:
    record = await rt.batches.owned(tenant, batch_id)
    if record is None:
        raise Problem(404, "Not found", f"no batch {batch_id!r}")
    return record


@router.post("", status_code=202, response_model=BatchCreated)
async def create_batch(request: BatchRequest, raw: Request, rt: RuntimeDep, tenant: TenantDep, response: Response,
                       idempotency_key: IdempotencyKey = None) -> BatchCreated:
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), "webhook_url")
    valid, problems = await validate_items(rt, tenant, request.jobs)
    if request.atomic and problems:
        raise Problem(422, "Invalid batch", f"{len(problems)} of {len(request.jobs)} items are invalid and the "
                      "batch is atomic: nothing was accepted",
                      invalid=[p.model_dump() for p in problems])
    body_hash = hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    providers = {name: p.settings for name, p in rt.registry.providers.items()}
    try:
        record, items, created = await rt.batches.create(
            tenant, request, valid, len(problems), idempotency_key=idempotency_key, body_hash=body_hash,
            providers=providers)
    except BatchIdempotencyConflict as exc:
        raise Problem(409, "Idempotency key reused", "this Idempotency-Key was used with a different batch",
                      batch_id=exc.batch_id) from exc
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/batches/{record.id}"
    view = await rt.batches.view(record)
    return BatchCreated(**view.model_dump(), items=items, invalid=problems)


@router.get("", response_model=BatchPage)
async def list_batches(rt: RuntimeDep, tenant: TenantDep, cursor: Annotated[str | None, Query(max_length=64)] = None,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50) -> BatchPage:
    records, next_cursor = await rt.batches.page(tenant, cursor, limit)
    return BatchPage(data=[await rt.batches.view(r) for r in records], next_cursor=next_cursor)


@router.get("/{batch_id}", response_model=BatchView)
async def get_batch(batch_id: str, rt: RuntimeDep, tenant: TenantDep) -> BatchView:
    return await rt.batches.view(await _owned(rt, tenant, batch_id))


@router.get("/{batch_id}/jobs", response_model=JobPage)
async def batch_jobs(batch_id: str, rt: RuntimeDep, tenant: TenantDep, status: JobStatus | None = None,
                     cursor: Annotated[str | None, Query(max_length=64)] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobPage:
    record = await _owned(rt, tenant, batch_id)
    ids, next_cursor = await rt.batches.job_ids(record.id, status, cursor, limit)
    jobs = [j for j in await rt.store.get_many(ids) if j is not None]
    return JobPage(data=[await rt.jobs.view(j) for j in jobs], next_cursor=next_cursor)


@router.post("/{batch_id}/cancel", response_model=BatchView)
async def cancel_batch(batch_id: str, rt: RuntimeDep, tenant: TenantDep) -> BatchView:
    record = await _owned(rt, tenant, batch_id)
    await rt.batches.cancel(record)
    return await rt.batches.view(record)
