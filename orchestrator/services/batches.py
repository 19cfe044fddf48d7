"""Batches: many jobs accepted in one request, counted and followed as one.

A batch of up to 10,000 items is inserted in pipelines (one Lua call per job,
hundreds per round trip) and enqueued the same way. Batch item job ids are
derived from the batch id and the item index, so a retried request (same
``Idempotency-Key``) resumes an interrupted insert instead of duplicating it.
Per-status counts are kept by the same Lua script that moves each job, so they
add up at every instant. The transition that finishes the last job marks the
batch finished exactly once; its ``batch.completed`` webhook has a delivery id
derived from the batch id, so it is recorded once even if a sweep repeats it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.domain.deadlines import deadline_for
from orchestrator.domain.ids import derived_id, new_id, token
from orchestrator.domain.job import BatchRecord, Job
from orchestrator.domain.webhooks import Delivery
from orchestrator.infra import metrics
from orchestrator.services.jobs import Jobs, model_cost, model_note
from orchestrator.store import ledger
from orchestrator.store.batches import BatchStore, finished_at
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import Conflict, JobStore, ms
from orchestrator.store.ledger import Ledger
from orchestrator.store.queue import Queue
from orchestrator.store.tenants import tenant_retention
from orchestrator.store.webhook_gates import WebhookGates
from orchestrator.wire.batches import BatchItemRef, BatchRequest, BatchView
from orchestrator.wire.jobs import AttemptView, JobRequest, JobStatus, utcnow
from providers.contract import ProviderSettings

log = logging.getLogger("atelier.batches")


class BatchIdempotencyConflict(Exception):
    def __init__(self, batch_id: str) -> None:
        super().__init__(batch_id)
        self.batch_id = batch_id


@dataclass
class BatchEvents:
    """A batch's counts as clients see them, and its webhooks: progress (at most once per
    interval) and completion (exactly once). Told by ``Jobs`` when a batch job finishes."""

    store: JobStore
    batch_store: BatchStore
    endpoints: Endpoints
    queue: Queue
    progress_interval_seconds: float = 10.0
    retention_seconds: int = 30 * 24 * 3600
    webhooks: WebhookGates = field(kw_only=True)  # new deliveries are admitted to the queue through it

    async def record(self, batch_id: str) -> BatchRecord | None:
        return await self.batch_store.get(batch_id)

    async def view(self, record: BatchRecord) -> BatchView:
        data = await self.batch_store.counters(record.id)
        counts = {s.value: max(0, int(data.get(f"c:{s.value}", 0))) for s in JobStatus}
        total = int(data.get("total", 0))
        done = int(data.get("done", 0))
        finished = finished_at(data)
        return BatchView(
            id=record.id, status="completed" if finished else "running", total=total,
            invalid_count=record.invalid_count, counts=counts, done=done,
            progress=100 if total == 0 else int(100 * done / total), canceled="canceled_at" in data,
            webhook_url=record.webhook_url, metadata=record.metadata, created_at=record.created_at,
            finished_at=finished,
        )

    # -- batch events -----------------------------------------------------------------------
    async def on_job_finished(self, job: Job, finished_batch: bool) -> None:
        """Called after any job reached a terminal state (one of ``Jobs.finish_hooks``)."""
        if job.batch_id is None:
            return
        if finished_batch:
            await self._notify_completed(job.batch_id)
            return
        if await self.batch_store.progress_due(job.batch_id, self.progress_interval_seconds):
            record = await self.record(job.batch_id)
            if record is not None:
                await self._deliver(record, "batch.progress", new_id("msg"))

    async def finish_if_done(self, batch_id: str) -> None:
        if await self.batch_store.finish(batch_id):
            await self._notify_completed(batch_id)

    async def _notify_completed(self, batch_id: str) -> None:
        record = await self.record(batch_id)
        if record is not None:
            await self._deliver(record, "batch.completed", f"msg_{batch_id}_completed")
            keep = await tenant_retention(self.store.redis, record.tenant) or self.retention_seconds
            await self.batch_store.expire_at(batch_id, time.time() + keep)
        await self.batch_store.completion_recorded(batch_id)

    async def _deliver(self, record: BatchRecord, event_type: str, delivery_id: str) -> None:
        """Record the event's deliveries (the batch's ``webhook_url`` and the tenant's endpoints) in one step.

        Endpoint delivery ids derive from ``delivery_id`` (and, for ``batch.completed``, the finish
        time), so a repeated ``batch.completed`` is recorded once per endpoint too.
        """
        endpoints = await self.endpoints.matching(record.tenant, event_type)
        if not record.webhook_url and not endpoints:
            return
        view = await self.view(record)
        payload = json.dumps({"type": event_type, "timestamp": utcnow().isoformat(),
                              "data": view.model_dump(mode="json")}, separators=(",", ":"))
        deliveries = []
        if record.webhook_url:
            deliveries.append(Delivery(id=delivery_id, tenant=record.tenant, batch_id=record.id,
                                       url=record.webhook_url, event_type=event_type, sequence=view.done,
                                       payload=payload))
        at_ms = ms(view.finished_at.timestamp()) if view.finished_at and event_type == "batch.completed" else ms()
        deliveries += [Delivery(id=derived_id("msg", at_ms, f"{delivery_id}:{e.id}"), tenant=record.tenant,
                                batch_id=record.id, endpoint_id=e.id, url=e.url, event_type=event_type,
                                sequence=view.done, payload=payload) for e in endpoints]
        created = await self.store.create_deliveries(deliveries)
        await self.webhooks.admit([d for d, new in zip(deliveries, created, strict=True) if new], ms())

    async def sweep(self, before: float) -> int:
        """Finished batches whose completion webhook was not recorded (a crash in between)."""
        ids = await self.batch_store.finished_unnotified(before)
        for batch_id in ids:
            await self._notify_completed(batch_id)
        return len(ids)


@dataclass
class Batches:
    jobs: Jobs
    events: BatchEvents
    ledger: Ledger

    @property
    def store(self) -> JobStore:
        return self.jobs.store

    @property
    def batch_store(self) -> BatchStore:
        return self.events.batch_store

    # -- creating --------------------------------------------------------------------
    async def create(self, tenant: str, request: BatchRequest, valid: list[tuple[int, JobRequest, str | None]],
                     invalid_count: int, *, idempotency_key: str | None, body_hash: str,
                     providers: Mapping[str, ProviderSettings],
                     api_key: str | None = None) -> tuple[BatchRecord, list[BatchItemRef], bool]:
        """Insert the valid items as jobs of a new batch. Returns ``(batch, items, created)``.

        ``providers``: the settings that give each item its deadline (see ``jobs.deadline_for``).
        """
        record: BatchRecord | None = None
        if idempotency_key:
            prior_id, prior_hash = await self.batch_store.claim_idempotency(tenant, idempotency_key, new_id("bat"),
                                                                            body_hash)
            if prior_hash != body_hash:
                raise BatchIdempotencyConflict(prior_id)
            record = await self.record(prior_id)
            if record is not None and await self.batch_store.accepted(prior_id):
                return record, self._item_refs(record, valid), False
            batch_id = prior_id
        else:
            batch_id = new_id("bat")
        insert = record is None
        if record is None:
            record = BatchRecord(id=batch_id, tenant=tenant, created_at=utcnow(),
                                 webhook_url=str(request.webhook_url) if request.webhook_url else None,
                                 metadata=request.metadata, items=len(request.jobs), invalid_count=invalid_count,
                                 idempotency_key=idempotency_key)
        jobs = [self._job(record, index, item, ref, providers.get(item.provider))
                for index, item, ref in valid]
        estimates = [j.cost.estimated.amount if j.cost and j.cost.estimated else 0.0 for j in jobs]
        # The whole batch's estimate is held at once (once per batch id: a replay holds nothing more),
        # before anything of the batch is written; each job then carries its share.
        await self.ledger.reserve_batch(tenant, batch_id, sum(estimates), api_key)
        if insert:
            await self.batch_store.insert(record)
        specs = [ledger.accept(job, amount, reserved_by_batch=True, api_key=api_key)
                 for job, amount in zip(jobs, estimates, strict=True)]
        grace = self.jobs.settings.sweep_grace_seconds
        if await self.store.create_many(jobs, active_at=time.time() + grace, ledgers=specs) == len(jobs):
            for job in jobs:  # (a replayed half-created batch is not counted again)
                metrics.job_created(job)
        if await self.batch_store.accept(batch_id):
            await self.events.finish_if_done(batch_id)  # nothing valid to run (or all already finished)
        await self.jobs.queue.submit_many([j.id for j in jobs])
        return record, self._item_refs(record, valid), True

    def _job_id(self, record: BatchRecord, index: int) -> str:
        return derived_id("job", ms(record.created_at.timestamp()), f"{record.id}:{index}")

    def _item_refs(self, record: BatchRecord, valid: list[tuple[int, JobRequest, str | None]]) -> list[BatchItemRef]:
        return [BatchItemRef(index=i, ref=ref, job_id=self._job_id(record, i)) for i, _, ref in valid]

    def _job(self, record: BatchRecord, index: int, item: JobRequest, ref: str | None,
             provider: ProviderSettings | None) -> Job:
        now = utcnow()
        deadline = deadline_for(item, provider, self.jobs.settings.job_timeout_seconds, now)
        return Job(
            id=self._job_id(record, index), tenant=record.tenant, provider=item.provider, kind=item.kind,
            model=item.model, input=item.input, webhook_url=str(item.webhook_url) if item.webhook_url else None,
            metadata=item.metadata, priority=item.priority, retry_unknown_submissions=item.retry_unknown_submissions,
            batch_id=record.id, ref=ref, callback_token=token(), created_at=now, updated_at=now,
            timestamps={"queued": now}, deadline_at=deadline, operation=item.operation, source=item.source,
            note=model_note(provider, item.model), cost=model_cost(provider, item),
            fallbacks=item.fallbacks, fallback_on=item.fallback_on,
            original_input=item.input if item.fallbacks else None,
            provider_attempts=[AttemptView(provider=item.provider, model=item.model, outcome="pending",
                                           started_at=now)] if item.fallbacks else [],
        )

    # -- reading ------------------------------------------------------------------------
    async def record(self, batch_id: str) -> BatchRecord | None:
        return await self.batch_store.get(batch_id)

    async def owned(self, tenant: str, batch_id: str) -> BatchRecord | None:
        record = await self.record(batch_id) if batch_id.startswith("bat_") and len(batch_id) < 64 else None
        return record if record is not None and record.tenant == tenant else None

    async def view(self, record: BatchRecord) -> BatchView:
        return await self.events.view(record)

    async def job_ids(self, batch_id: str, status: JobStatus | None, cursor: str | None,
                      limit: int) -> tuple[list[str], str | None]:
        return await self.batch_store.job_ids(batch_id, status, cursor, limit)

    # -- cancel ---------------------------------------------------------------------------
    async def request_cancel(self, record: BatchRecord) -> None:
        """Mark the batch canceled and have a worker cancel its jobs (``cancel``): a batch of 10,000 is
        answered at once, not after 10,000 transitions. Until the worker reaches a queued job, the submit
        step sees the mark and cancels it instead of submitting it."""
        await self.batch_store.mark_canceled(record.id)
        await self.jobs.queue.cancel_batch(record.id, str(ms()))

    async def cancel(self, record: BatchRecord) -> None:
        """Cancel every job of the batch that has not finished (a worker's step)."""
        await self.batch_store.mark_canceled(record.id)
        sem = asyncio.Semaphore(50)

        async def cancel_one(job_id: str) -> None:
            async with sem:
                for _ in range(5):
                    job = await self.store.get(job_id)
                    if job is None or job.status.terminal:
                        return
                    try:
                        await self.jobs.cancel(job)
                        return
                    except Conflict:
                        continue

        for status in JobStatus:
            if status.terminal:
                continue
            cursor = None
            while True:
                ids, cursor = await self.job_ids(record.id, status, cursor, 1000)
                await asyncio.gather(*(cancel_one(i) for i in ids))
                if cursor is None:
                    break

    async def page(self, tenant: str, cursor: str | None, limit: int) -> tuple[list[BatchRecord], str | None]:
        ids = await self.batch_store.page(tenant, cursor, limit)
        records = [await self.record(i) for i in ids[:limit]]
        found = [r for r in records if r is not None]
        return found, (found[-1].id if len(ids) > limit and found else None)


def item_problem_ref(item: dict[str, Any]) -> str | None:
    ref = item.get("ref") if isinstance(item, dict) else None
    return ref if isinstance(ref, str) else None
