"""Job life cycle: creating jobs and applying transitions with the webhooks they cause.

Both the API and the workers go through ``Jobs``: the state machine itself is
``orchestrator.domain.transitions``; here a transition is stored (compare-and-set,
with its event and deliveries in one step) and announced to whoever must know a
job finished (its provider slot, its batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator.domain.deadlines import deadline_for
from orchestrator.domain.ids import new_id, token
from orchestrator.domain.job import Job
from orchestrator.domain.transitions import IllegalTransition, allowed, derive
from orchestrator.domain.webhooks import NOTIFY_STATUSES, Delivery, Endpoint, job_event_payload, new_delivery
from orchestrator.infra import metrics
from orchestrator.infra.settings import Settings
from orchestrator.services.views import JobViews
from orchestrator.store import ledger
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import REMOVE, EndpointsChanged, JobStore, ms
from orchestrator.store.queue import Queue
from orchestrator.store.tenants import tenant_retention
from orchestrator.store.webhook_gates import WebhookGates
from orchestrator.wire import limits
from orchestrator.wire.jobs import (
    TERMINAL,
    AttemptView,
    CostEstimate,
    JobCost,
    JobError,
    JobEvent,
    JobRequest,
    JobStatus,
    JobView,
    utcnow,
)
from providers.catalog import estimate, lifecycle_verdict
from providers.contract import ProviderSettings

log = logging.getLogger("atelier.jobs")

S = JobStatus


# Times ``transition`` makes its webhook deliveries again after the tenant's endpoints changed under it.
ENDPOINT_RETRIES = 3
MAX_KNOWN_TENANTS = 10_000


def body_hash(request: JobRequest) -> str:
    body = request.model_dump(mode="json")
    if body["operation"] == "generate" and body["source"] is None:
        del body["operation"], body["source"]  # hashed as before these fields existed (keys stay valid)
    del body["dry_run"]
    if not body["fallbacks"] and not body["fallback_on"]:
        del body["fallbacks"], body["fallback_on"]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_note(provider: ProviderSettings | None, model: str) -> str | None:
    """The catalog's lifecycle note for a job accepted for ``model`` (a sunset model behind a gateway)."""
    return lifecycle_verdict(provider, model).note if provider is not None else None


def model_cost(provider: ProviderSettings | None, request: JobRequest | Job) -> JobCost | None:
    """The job's estimated cost from its model's price rule (``None`` without one)."""
    if provider is None:
        return None
    found = estimate(provider, request.model, request.input.duration_seconds, request.input.num_outputs)
    if found is None:
        return JobCost()
    return JobCost(estimated=CostEstimate(amount=found.amount, currency=found.currency, rule=found.rule))


def final_cost(job: Job, *, billed: bool) -> CostEstimate | None:
    """What a finished job cost: nothing when nothing was billed, else what the provider reported,
    else the estimate (a failure after the provider accepted the task counts its estimate: Atelier
    cannot know whether the provider charged it, unless the provider reported it)."""
    cost = job.cost or JobCost()
    if not billed:
        currency = cost.estimated.currency if cost.estimated else "USD"
        return CostEstimate(amount=0.0, currency=currency,
                            rule="nothing was billed: the provider created nothing for this job")
    return cost.reported or cost.estimated


def was_billed(old: Job, status: JobStatus) -> bool:
    """Whether a job finishing from ``old`` may have been billed: not when it never left the queue for
    its current provider (canceled before submission, refused before creation is said by the caller)."""
    return status == S.succeeded or old.status != S.queued or old.provider_task_id is not None


# Told that a job finished: (the job as saved, whether its change finished the job's batch).
FinishHook = Callable[[Job, bool], Awaitable[None]]
# Asked to move a failing job on: (the job, its error, whether its provider created nothing) -> the
# job moved to its next provider, or ``None`` when none can take it.
FallbackHook = Callable[[Job, JobError, bool], Awaitable[Job | None]]


@dataclass
class Jobs:
    settings: Settings
    store: JobStore
    queue: Queue
    views: JobViews
    endpoints: Endpoints  # the tenants' webhook endpoints (events fan out to them)
    # Called, in order, after a job reached a terminal state: free its provider slot, count its batch.
    finish_hooks: Sequence[FinishHook] = ()
    webhooks: WebhookGates = field(kw_only=True)  # new deliveries are admitted to the queue through it
    # Moves a failing job to its next fallback (``services.fallbacks``); ``None``: the job fails.
    fallback: FallbackHook | None = field(default=None, kw_only=True)
    # tenant -> (fingerprint, endpoints): what ``transition`` fans events out to, re-read when the
    # store says they changed.
    _known_endpoints: dict[str, tuple[str, list[Endpoint]]] = field(default_factory=dict)
    _retention: dict[str, tuple[int, float]] = field(default_factory=dict)  # tenant -> (seconds, fresh until)

    async def _endpoints(self, tenant: str, *, refresh: bool = False) -> tuple[str, list[Endpoint]]:
        """The tenant's webhook endpoints and their fingerprint (``store.endpoints_fingerprint``)."""
        known = None if refresh else self._known_endpoints.get(tenant)
        if known is None:
            known = await self.endpoints.snapshot(tenant)
            if len(self._known_endpoints) >= MAX_KNOWN_TENANTS:
                self._known_endpoints.clear()
            self._known_endpoints[tenant] = known
        return known

    async def retention_seconds(self, tenant: str) -> int:
        """How long the tenant's finished jobs are kept: its own setting, else ``ATELIER_RETENTION_SECONDS``
        (read at most once a minute per tenant and process)."""
        cached = self._retention.get(tenant)
        now = time.monotonic()
        if cached is None or cached[1] < now:
            if len(self._retention) >= MAX_KNOWN_TENANTS:
                self._retention.clear()
            own = await tenant_retention(self.store.redis, tenant)
            cached = (own or self.settings.retention_seconds, now + 60)
            self._retention[tenant] = cached
        return cached[0]

    async def view(self, job: Job, url_ttl: int | None = None) -> JobView:
        return await self.views.job(job, url_ttl)

    # -- creating ----------------------------------------------------------------
    async def create(self, tenant: str, request: JobRequest, *, idempotency_key: str | None = None,
                     provider: ProviderSettings | None = None, key_id: str | None = None,
                     original: JobRequest | None = None, skipped: Sequence[AttemptView] = (),
                     api_key: str | None = None) -> tuple[Job, bool]:
        """Record a job and schedule its submission. Returns ``(job, created)``.

        ``provider``: the settings that give the job its deadline (see ``deadline_for``).
        ``key_id``: the provider key it must use (a follow-up of a task, with the key that created it).
        ``original``/``skipped``: the request as sent and the providers it names that could not take it
        (a sunset model, no key), when ``request`` is already its first usable fallback.
        ``api_key``: the submitting key's SHA-256 (its own budgets count the job too).
        Raises ``BudgetExceeded`` (nothing is created) when the estimate does not fit the budgets.
        """
        now = utcnow()
        job = Job(
            id=new_id("job"), tenant=tenant, provider=request.provider, kind=request.kind, model=request.model,
            input=request.input, webhook_url=str(request.webhook_url) if request.webhook_url else None,
            metadata=request.metadata, priority=request.priority,
            retry_unknown_submissions=request.retry_unknown_submissions, idempotency_key=idempotency_key,
            callback_token=token(), created_at=now, updated_at=now, timestamps={"queued": now},
            deadline_at=deadline_for(request, provider, self.settings.job_timeout_seconds, now),
            operation=request.operation, source=request.source, key_id=key_id,
            note=model_note(provider, request.model), cost=model_cost(provider, request),
            fallbacks=request.fallbacks, fallback_on=request.fallback_on,
            original_input=request.input if request.fallbacks else None,
            provider_attempts=[*skipped, AttemptView(provider=request.provider, model=request.model,
                                                     outcome="pending", started_at=now)]
            if request.fallbacks or skipped else [],
        )
        estimated = job.cost.estimated if job.cost else None
        job, created = await self.store.create(
            job, active_at=time.time() + self.settings.sweep_grace_seconds,
            body_hash=body_hash(original or request) if idempotency_key else None,
            ledger=ledger.accept(job, estimated.amount if estimated else None, api_key=api_key),
            enqueue=self.queue.first_submission(job.id),
        )
        if created:
            metrics.job_created(job)
        return job, created

    # -- changing ------------------------------------------------------------------
    async def transition(self, job: Job, status: JobStatus, *, active_at: float | None = None,
                         billed: bool | None = None, event_type: str | None = None,
                         ledger_step: ledger.Spec | None = None, via: JobStatus | None = None,
                         **changes: Any) -> Job:
        """Move ``job`` to ``status`` (compare-and-set), log the event, create its webhooks.

        A job finishing settles its cost (``cost.final``) and its budget hold in the same step;
        ``billed=False`` says the provider created nothing for it (by default: only a job that never
        left the queue was not billed). ``event_type``/``ledger_step``: a fallback's own event and money.
        ``via``: a status passed through on the way, in the same write (its own event and timestamp;
        webhooks only for ``status``): a create call that answered with the task already running
        takes a job ``submitting -> submitted -> running`` in one step instead of two.
        """
        if via is not None and not (allowed(job.status, via) and via not in TERMINAL):
            raise IllegalTransition(f"{job.status} -> {via}")
        if not allowed(via or job.status, status, fallback=event_type == "job.fallback"):
            raise IllegalTransition(f"{via or job.status} -> {status}")
        now = utcnow()
        new = derive(job, {**changes, "status": status})
        if status != job.status:
            new.timestamps = {**job.timestamps, **({via.value: now} if via else {}), status.value: now}
        if new.phase == "collecting" and job.phase != "collecting":
            new.outputs_ready_at = time.time()
        expires_at = None
        if status in TERMINAL:
            active_at = REMOVE
            if status == S.succeeded:
                new.progress = 100
            new.phase = None
            if not job.status.terminal:
                expires_at = time.time() + await self.retention_seconds(job.tenant)
                new.expires_at = datetime.fromtimestamp(expires_at, UTC)
                final = final_cost(new, billed=was_billed(job, status) if billed is None else billed)
                new.cost = (new.cost or JobCost()).model_copy(update={"final": final})
                ledger_step = ledger.settle(job, new, final.amount if final else 0.0,
                                            succeeded=status == S.succeeded)
                if new.provider_attempts and new.provider_attempts[-1].outcome == "pending":
                    new.provider_attempts = [*new.provider_attempts[:-1], new.provider_attempts[-1].model_copy(
                        update={"outcome": new.error.code if new.error else status.value, "ended_at": now,
                                "cost": final, "key_id": new.key_id})]
        event = None
        passed: list[JobEvent] = []
        if via is not None:
            passed.append(JobEvent(sequence=0, type=f"job.{via.value}", status=via, at=now, progress=job.progress))
        if status != job.status or event_type is not None:
            event = JobEvent(sequence=0, type=event_type or f"job.{status.value}", status=status, at=now,
                             progress=new.progress, error=new.error, note=new.note)
        events = [*passed, *([event] if event is not None else [])]
        for attempt in range(ENDPOINT_RETRIES + 1):
            deliveries: list[Delivery] = []
            fingerprint = None
            if event is not None and (status in NOTIFY_STATUSES or event_type is not None):
                # The endpoints as last seen by this process; the store checks, in the same step as
                # the change, that they are still the tenant's (else: read them again, retry).
                fingerprint, known = await self._endpoints(job.tenant, refresh=attempt > 0)
                endpoints = [e for e in known if e.wants(event.type)]
                if attempt == ENDPOINT_RETRIES:
                    fingerprint = None  # (endpoints changing without pause: as read just now)
                if new.webhook_url or endpoints:
                    new.version = job.version + len(passed) + 1
                    view = await self.view(new, self.settings.webhook_url_ttl_seconds)
                    payload = job_event_payload(event.type, view)
                    if new.webhook_url:
                        deliveries.append(new_delivery(job.tenant, new.webhook_url, event.type, view,
                                                       payload=payload))
                    deliveries += [new_delivery(job.tenant, e.url, event.type, view, payload=payload,
                                                endpoint_id=e.id) for e in endpoints]
            try:
                saved, finished_batch = await self.store.apply(job, new, events=events, active_at=active_at,
                                                               deliveries=deliveries, endpoints=fingerprint,
                                                               expires_at=expires_at, ledger=ledger_step)
                break
            except EndpointsChanged:
                continue
        else:  # pragma: no cover - the last attempt does not check
            raise AssertionError("unreachable")
        if via is not None:  # counted as the two steps it stands for
            passed_through = derive(job, {"status": via, "timestamps": saved.timestamps})
            metrics.job_changed(job, passed_through)
            metrics.job_changed(passed_through, saved)
        else:
            metrics.job_changed(job, saved)
        for logged in events:
            log.info("job %s", logged.type, extra={"job_id": job.id, "tenant": job.tenant,
                                                   "provider": job.provider, "event": logged.type})
        if deliveries:
            await self.webhooks.admit(deliveries, ms())
        if status in TERMINAL and not job.status.terminal:
            for hook in self.finish_hooks:
                await hook(saved, finished_batch)
        return saved

    async def change(self, job: Job, *, active_at: float | None = None, **changes: Any) -> Job:
        """Update fields without a state change (progress, provider status, notes)."""
        new = derive(job, changes)
        if new.phase == "collecting" and job.phase != "collecting":
            new.outputs_ready_at = time.time()
        saved = await self.store.update(job, new, active_at=active_at)
        metrics.job_changed(job, saved)
        return saved

    async def fail(self, job: Job, code: str, message: str, detail: Any = None,
                   status: JobStatus = S.failed, *, created_nothing: bool = False, **changes: Any) -> Job:
        """Fail the job, or move it to its next fallback provider when the request allows it.

        ``created_nothing``: the provider provably created nothing (refused before acceptance after the
        allowed retries, no usable key): nothing was billed, and a fallback may take the job.
        """
        log.warning("job failed: %s: %s", code, message,
                    extra={"job_id": job.id, "tenant": job.tenant, "provider": job.provider,
                           "event": f"job.{status.value}.error"})
        # Provider words are kept bounded and valid: a 900 KB error string or a lone surrogate in it must
        # neither bloat nor break the record (issue 13, defect 5).
        error = JobError(code=limits.clean_text(code, 100), message=limits.clean_text(message),
                         provider_detail=limits.bounded(detail))
        if (self.fallback is not None and status == S.failed and job.fallbacks and not job.status.terminal
                and code != "provider_outcome_unknown" and (created_nothing or code in job.fallback_on)):
            moved = await self.fallback(job, error, created_nothing)
            if moved is not None:
                return moved
        return await self.transition(job, status, error=error, billed=False if created_nothing else None,
                                     **changes)

    async def cancel(self, job: Job) -> Job:
        """Cancel now; a task already at the provider is told to stop by a worker."""
        told_later = job.status in (S.submitting, S.submitted, S.running)
        note = "cancel requested; telling the provider" if told_later else "canceled before submission"
        job = await self.transition(job, S.canceled, note=note)
        if told_later:
            await self.queue.cancel_at_provider(job.id)
        return job
