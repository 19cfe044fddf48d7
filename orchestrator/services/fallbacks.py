"""Fallbacks that never pay twice: moving a failing job to the next provider its request names.

A job moves on only when its provider provably created nothing (refused before acceptance after the
allowed retries, no usable key, an outage before acceptance), or when it failed with a code its
request lists in ``fallback_on``; never after an ambiguous submission (``Jobs.fail`` decides that,
this module does the move). One job id throughout: the job goes back to ``queued`` with the next
provider, model and input, its last attempt recorded in ``provider_attempts``, a ``job.fallback``
event (and webhook), and its budget hold moved in the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.deadlines import deadline_for
from orchestrator.domain.job import Job
from orchestrator.services.jobs import Jobs, final_cost, model_cost
from orchestrator.services.slots import Slots
from orchestrator.store import ledger
from orchestrator.store.jobs import Conflict
from orchestrator.wire.jobs import AttemptView, Fallback, JobError, JobInput, JobRequest, JobStatus, utcnow
from providers.catalog import CatalogError, lifecycle_verdict
from providers.contract import Provider
from providers.registry import Registry

# Fields of the job's current attempt that belong to its provider: cleared when it moves on.
PROVIDER_FIELDS: dict[str, Any] = {
    "provider_task_id": None, "provider_request_id": None, "provider_status": None, "provider_state": {},
    "provider_outputs": [], "submit_started_at": None, "reconcile": None, "callback_expected": False,
    "outputs_ready_at": None, "key_id": None, "refusals": 0, "progress": None, "error": None, "polls": 0,
    "poll_errors": 0, "provider_queue_position": None,
}


def merged_input(original: JobInput, entry: Fallback) -> JobInput:
    """The original request's input with the entry's fields over it."""
    return JobInput.model_validate({**original.model_dump(exclude_none=True), **entry.input})


def entry_request(request: JobRequest | Job, entry: Fallback, original: JobInput) -> JobRequest:
    """The request a fallback entry stands for (for validation, estimates and deadlines)."""
    return JobRequest(provider=entry.provider, model=entry.model, kind=request.kind,
                      input=merged_input(original, entry), operation=request.operation, source=request.source,
                      priority=request.priority)


def unusable(provider: Provider | None, name: str, model: str) -> str | None:
    """Why ``provider`` cannot take ``model`` at all here (no adapter, no key, a retired model), or ``None``."""
    if provider is None:
        return f"provider {name!r} is not configured on this server"
    if not provider.settings.api_keys:
        return f"{name} has no API key configured on this server"
    try:
        return lifecycle_verdict(provider.settings, model).refusal
    except CatalogError as exc:
        return f"the operator's catalog entry is invalid: {exc}"


@dataclass
class Fallbacks:
    jobs: Jobs
    registry: Registry
    slots: Slots

    async def move(self, job: Job, error: JobError, created_nothing: bool) -> Job | None:
        """``Jobs.fallback``: move ``job`` to its next usable fallback (``None``: none is left).

        Entries that cannot take the job here (no key, a retired model) are recorded as skipped.
        """
        now = utcnow()
        spent = final_cost(job, billed=not created_nothing)
        attempts = list(job.provider_attempts) or [AttemptView(provider=job.provider, model=job.model,
                                                               outcome="pending", started_at=job.created_at)]
        attempts[-1] = attempts[-1].model_copy(update={"outcome": error.code, "message": error.message[:500],
                                                       "cost": spent, "ended_at": now, "key_id": job.key_id})
        original = job.original_input or job.input
        remaining = list(job.fallbacks)
        while remaining:
            entry = remaining.pop(0)
            provider = self.registry.get(entry.provider)
            why = unusable(provider, entry.provider, entry.model)
            if why is not None or provider is None:
                attempts.append(AttemptView(provider=entry.provider, model=entry.model, outcome="skipped",
                                            message=why, started_at=now, ended_at=now))
                continue
            request = entry_request(job, entry, original)
            cost = model_cost(provider.settings, request)
            estimated = cost.estimated if cost else None
            deadline = deadline_for(request, provider.settings, self.jobs.settings.job_timeout_seconds, now)
            if job.deadline_at is not None and deadline is not None:
                deadline = max(deadline, job.deadline_at)
            changes: dict[str, Any] = {
                **PROVIDER_FIELDS, "provider": entry.provider, "model": entry.model, "input": request.input,
                "fallbacks": remaining, "cost": cost, "deadline_at": deadline,
                "provider_attempts": [*attempts, AttemptView(provider=entry.provider, model=entry.model,
                                                             outcome="pending", started_at=now)],
                "phase": None, "note": (f"{job.provider}/{job.model} failed ({error.code}: {error.message[:200]}); "
                                        f"moved to {entry.provider}/{entry.model}"),
            }
            moved = job.model_copy(update=changes)
            step = ledger.move(job, moved, spent.amount if spent else 0.0,
                               estimated.amount if estimated else None)
            try:
                saved = await self.jobs.transition(
                    job, JobStatus.queued, event_type="job.fallback", ledger_step=step,
                    active_at=time.time() + self.jobs.settings.sweep_grace_seconds,
                    ledger=moved.ledger, **changes)
            except ledger.BudgetExceeded as exc:
                return await self._out_of_budget(job, attempts, exc)
            except Conflict:
                return None  # the job changed meanwhile (canceled): the caller's failure finds out
            await self.slots.job_finished(job)  # the old key's slot, line place and pending poll
            await self.jobs.queue.submit(saved.id, saved.attempts, tag=f":fb{len(saved.provider_attempts)}")
            return saved
        # No entry could take it: the job fails with its own error, the skipped entries recorded.
        return await self.jobs.transition(job, JobStatus.failed, error=error, billed=not created_nothing,
                                          provider_attempts=attempts, fallbacks=[])

    async def _out_of_budget(self, job: Job, attempts: list[AttemptView], exc: ledger.BudgetExceeded) -> Job:
        return await self.jobs.transition(
            job, JobStatus.failed, billed=False, provider_attempts=attempts,
            error=JobError(code="budget_exceeded", message=f"no fallback was tried: {exc}"),
            fallbacks=[])
