"""Job life cycle: creating jobs, applying transitions, rendering what clients see.

Both the API and the workers go through ``Jobs``; it is the one place that
knows which transitions are legal, which cause webhooks, and when the sweeper
should next look at a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator import metrics
from orchestrator.endpoints import Endpoints
from orchestrator.ids import new_id, token
from orchestrator.models import (
    TERMINAL,
    Job,
    JobError,
    JobEvent,
    JobRequest,
    JobStatus,
    JobView,
    OutputView,
    utcnow,
)
from orchestrator.queue import Queue
from orchestrator.settings import Settings
from orchestrator.storage import Storage
from orchestrator.store import REMOVE, JobStore
from orchestrator.webhooks import NOTIFY_STATUSES, Delivery, job_event_payload, new_delivery

log = logging.getLogger("atelier.jobs")

S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.queued: frozenset({S.submitting, S.failed, S.canceled, S.timed_out}),
    # back to queued only when the provider provably created nothing (429, refused connection)
    S.submitting: frozenset({S.submitted, S.queued, S.failed, S.canceled, S.timed_out}),
    S.submitted: frozenset({S.running, S.failed, S.canceled, S.timed_out}),
    S.running: frozenset({S.succeeded, S.failed, S.canceled, S.timed_out}),
}


class IllegalTransition(Exception):
    pass


def body_hash(request: JobRequest) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Jobs:
    settings: Settings
    store: JobStore
    queue: Queue
    storage: Storage
    # Called after a batch job finished: (job, whether it finished its batch). Set by the runtime.
    on_batch_job_finished: Callable[[Job, bool], Awaitable[None]] | None = None
    # Called after any job finished (frees its provider slot). Set by the runtime.
    on_job_finished: Callable[[Job], Awaitable[None]] | None = None
    # The tenants' webhook endpoints (events fan out to them).
    endpoints: Endpoints = field(init=False)

    def __post_init__(self) -> None:
        self.endpoints = Endpoints(self.store)

    # -- views -----------------------------------------------------------------
    async def view(self, job: Job, url_ttl: int | None = None) -> JobView:
        ttl = url_ttl or self.settings.output_url_ttl_seconds
        outputs = [
            OutputView(index=o.index, url=await self.storage.url(o.key, ttl), content_type=o.content_type,
                       bytes=o.bytes, sha256=o.sha256, width=o.width, height=o.height,
                       duration_seconds=o.duration_seconds, metadata=o.metadata)
            for o in job.outputs
        ]
        return JobView(
            id=job.id, status=job.status, phase=job.phase, provider=job.provider, kind=job.kind,
            model=job.model, input=job.input, priority=job.priority, progress=job.progress, outputs=outputs,
            error=job.error, provider_task_id=job.provider_task_id, provider_request_id=job.provider_request_id,
            provider_status=job.provider_status, note=job.note, attempts=job.attempts, metadata=job.metadata,
            webhook_url=job.webhook_url, batch_id=job.batch_id, ref=job.ref, created_at=job.created_at,
            updated_at=job.updated_at, timestamps=job.timestamps, deadline_at=job.deadline_at,
            sequence=job.version,
        )

    # -- creating ----------------------------------------------------------------
    async def create(self, tenant: str, request: JobRequest, *, idempotency_key: str | None = None,
                     job_timeout: float | None = None) -> tuple[Job, bool]:
        """Record a job and schedule its submission. Returns ``(job, created)``."""
        now = utcnow()
        timeout = job_timeout or self.settings.job_timeout_seconds
        job = Job(
            id=new_id("job"), tenant=tenant, provider=request.provider, kind=request.kind, model=request.model,
            input=request.input, webhook_url=str(request.webhook_url) if request.webhook_url else None,
            metadata=request.metadata, priority=request.priority,
            retry_unknown_submissions=request.retry_unknown_submissions, idempotency_key=idempotency_key,
            callback_token=token(), created_at=now, updated_at=now, timestamps={"queued": now},
            deadline_at=now + timedelta(seconds=timeout),
        )
        job, created = await self.store.create(
            job, active_at=time.time() + self.settings.sweep_grace_seconds,
            body_hash=body_hash(request) if idempotency_key else None,
        )
        if created:
            metrics.job_created(job)
            await self.queue.submit(job.id, job.attempts)
        return job, created

    # -- changing ------------------------------------------------------------------
    async def transition(self, job: Job, status: JobStatus, *, active_at: float | None = None,
                         **changes: Any) -> Job:
        """Move ``job`` to ``status`` (compare-and-set), log the event, create its webhooks."""
        if status != job.status and status not in ALLOWED.get(job.status, frozenset()):
            raise IllegalTransition(f"{job.status} -> {status}")
        now = utcnow()
        new = job.model_copy(update={**changes, "status": status}, deep=True)
        if status != job.status:
            new.timestamps = {**job.timestamps, status.value: now}
        if status in TERMINAL:
            active_at = REMOVE
            if status == S.succeeded:
                new.progress = 100
            new.phase = None
        event = None
        deliveries: list[Delivery] = []
        if status != job.status:
            event = JobEvent(sequence=0, type=f"job.{status.value}", status=status, at=now,
                             progress=new.progress, error=new.error, note=new.note)
            endpoints = await self.endpoints.matching(job.tenant, event.type) if status in NOTIFY_STATUSES else []
            if status in NOTIFY_STATUSES and (new.webhook_url or endpoints):
                new.version = job.version + 1
                view = await self.view(new, self.settings.webhook_url_ttl_seconds)
                payload = job_event_payload(event.type, view)
                if new.webhook_url:
                    deliveries.append(new_delivery(job.tenant, new.webhook_url, event.type, view, payload=payload))
                deliveries += [new_delivery(job.tenant, e.url, event.type, view, payload=payload, endpoint_id=e.id)
                               for e in endpoints]
        saved, finished_batch = await self.store.apply(job, new, event=event, active_at=active_at,
                                                       deliveries=deliveries)
        metrics.job_changed(job, saved)
        if event is not None:
            log.info("job %s", event.type, extra={"job_id": job.id, "tenant": job.tenant,
                                                   "provider": job.provider, "event": event.type})
        for delivery in deliveries:
            await self.queue.deliver(delivery.id, 0)
        if status in TERMINAL and not job.status.terminal and self.on_job_finished:
            await self.on_job_finished(saved)
        if saved.batch_id and status in TERMINAL and not job.status.terminal and self.on_batch_job_finished:
            await self.on_batch_job_finished(saved, finished_batch)
        return saved

    async def change(self, job: Job, *, active_at: float | None = None, **changes: Any) -> Job:
        """Update fields without a state change (progress, provider status, notes)."""
        new = job.model_copy(update=changes, deep=True)
        if new.phase == "collecting" and job.phase != "collecting":
            new.provider_data = {**new.provider_data, metrics.OUTPUTS_READY_AT: time.time()}
        saved = await self.store.update(job, new, active_at=active_at)
        metrics.job_changed(job, saved)
        return saved

    async def fail(self, job: Job, code: str, message: str, detail: Any = None,
                   status: JobStatus = S.failed, **changes: Any) -> Job:
        log.warning("job failed: %s: %s", code, message,
                    extra={"job_id": job.id, "tenant": job.tenant, "provider": job.provider,
                           "event": f"job.{status.value}.error"})
        return await self.transition(job, status, error=JobError(code=code, message=message,
                                                                    provider_detail=detail), **changes)

    async def cancel(self, job: Job) -> Job:
        """Cancel now; a task already at the provider is told to stop by a worker."""
        told_later = job.status in (S.submitting, S.submitted, S.running)
        note = "cancel requested; telling the provider" if told_later else "canceled before submission"
        job = await self.transition(job, S.canceled, note=note)
        if told_later:
            await self.queue.cancel_at_provider(job.id)
        return job


def deadline_passed(job: Job) -> bool:
    return job.deadline_at is not None and job.deadline_at <= datetime.now(UTC)
