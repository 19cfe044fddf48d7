"""``/v1/batches``: up to 10,000 jobs in one request, with per-item validation, counts and cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError

from orchestrator.api.deps import RuntimeDep, TenantDep, caller_key
from orchestrator.api.jobs import budget_problem, plan_request, quote
from orchestrator.api.problems import Problem, field_name
from orchestrator.api.webhook_endpoints import check_url
from orchestrator.domain.job import BatchRecord
from orchestrator.infra.destinations import UrlChecker
from orchestrator.services.batches import BatchIdempotencyConflict, item_problem_ref
from orchestrator.services.runtime import Runtime
from orchestrator.store.ledger import BudgetExceeded
from orchestrator.wire.batches import (
    BatchCreated,
    BatchItem,
    BatchPage,
    BatchQuote,
    BatchRequest,
    BatchView,
    ItemProblem,
    ItemQuote,
)
from orchestrator.wire.jobs import CostEstimate, JobPage, JobRequest, JobStatus

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
        if item.dry_run:
            problems.append(ItemProblem(index=index, ref=ref, field="dry_run",
                                        message="a batch's items are quoted with the batch's own dry_run"))
            continue
        try:
            plan = await plan_request(rt, tenant, JobRequest.model_validate(item.model_dump(exclude={"ref"})))
        except Problem as exc:
            found = (exc.extra.get("errors") or [{"field": "body", "message": exc.detail or exc.title}])[0]
            problems.append(ItemProblem(index=index, ref=ref, field=found["field"], message=found["message"]))
            continue
        refused = await destinations.problem(str(item.webhook_url)) if item.webhook_url else None
        if refused is not None:
            problems.append(ItemProblem(index=index, ref=ref, field="webhook_url", message=refused))
            continue
        valid.append((index, plan.request, item.ref))
    return valid, problems


def batch_quote(rt: Runtime, valid: list[tuple[int, JobRequest, str | None]],
                problems: list[ItemProblem]) -> BatchQuote:
    items = [ItemQuote(index=i, ref=ref, provider=r.provider, model=r.model, cost=quote(rt, r).cost)
             for i, r, ref in valid]
    currencies = {q.cost.currency for q in items if q.cost is not None} or {"USD"}
    total = round(sum(q.cost.amount for q in items if q.cost is not None), 6)
    return BatchQuote(items=items, invalid=problems, unpriced=[q.index for q in items if q.cost is None],
                      total=CostEstimate(amount=total, currency=sorted(currencies)[0],
                                         rule=f"the sum of {len(items) - sum(q.cost is None for q in items)} "
                                              "items' estimates"))


async def _owned(rt: Runtime, tenant: str, batch_id: str) -> BatchRecord:
    record = await rt.batches.owned(tenant, batch_id)
    if record is None:
        raise Problem(404, "Not found", f"no batch {batch_id!r}")
    return record


@router.post("", status_code=202, response_model=BatchCreated | BatchQuote,
             responses={200: {"description": "An earlier batch with the same Idempotency-Key, or a dry run's "
                                             "quote (`dry_run: true`: nothing is created)"},
                        402: {"description": "The batch's estimate does not fit the tenant's budget"}})
async def create_batch(request: BatchRequest, raw: Request, rt: RuntimeDep, tenant: TenantDep, response: Response,
                       idempotency_key: IdempotencyKey = None) -> BatchCreated | BatchQuote:
    if request.webhook_url is not None:
        await check_url(rt, str(request.webhook_url), "webhook_url")
    valid, problems = await validate_items(rt, tenant, request.jobs)
    if request.atomic and problems:
        raise Problem(422, "Invalid batch", f"{len(problems)} of {len(request.jobs)} items are invalid and the "
                      "batch is atomic: nothing was accepted",
                      invalid=[p.model_dump() for p in problems])
    if request.dry_run:
        response.status_code = 200
        return batch_quote(rt, valid, problems)
    body_hash = hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    providers = {name: p.settings for name, p in rt.registry.providers.items()}
    try:
        record, items, created = await rt.batches.create(
            tenant, request, valid, len(problems), idempotency_key=idempotency_key, body_hash=body_hash,
            providers=providers, api_key=caller_key.get())
    except BatchIdempotencyConflict as exc:
        raise Problem(409, "Idempotency key reused", "this Idempotency-Key was used with a different batch",
                      batch_id=exc.batch_id) from exc
    except BudgetExceeded as exc:
        raise budget_problem(exc) from exc
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


@router.post("/{batch_id}/cancel", response_model=BatchView, status_code=202)
async def cancel_batch(batch_id: str, rt: RuntimeDep, tenant: TenantDep) -> BatchView:
    """Cancel the batch's unfinished jobs: answered at once (``canceled: true``), the jobs are canceled
    by a worker within moments (their counts follow); none of them is submitted any more."""
    record = await _owned(rt, tenant, batch_id)
    await rt.batches.request_cancel(record)
    return await rt.batches.view(record)
