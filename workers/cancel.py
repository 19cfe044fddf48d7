"""The cancel step: tell the provider to stop a canceled (or timed-out) job's task, where it can."""

from __future__ import annotations

from typing import Any

from orchestrator.domain.job import task_ref
from orchestrator.store import keypool
from orchestrator.store.jobs import Conflict
from providers.errors import ProviderError
from workers.context import call_context, load_job, runtime_of


async def cancel_batch_jobs(ctx: dict[str, Any], batch_id: str) -> None:
    """Cancel every unfinished job of a batch the API marked canceled (``Batches.request_cancel``)."""
    rt = runtime_of(ctx)
    record = await rt.batches.record(batch_id)
    if record is not None:
        await rt.batches.cancel(record)


async def cancel_at_provider(ctx: dict[str, Any], job_id: str) -> None:
    rt = runtime_of(ctx)
    job = await load_job(rt, job_id)
    if job is None or not job.provider_task_id:
        return
    provider = rt.registry.get(job.provider)
    if provider is None:
        return
    try:
        told = await provider.cancel(call_context(rt, provider, job), task_ref(job))
        note = ("the provider was told to stop the task" if told
                else f"{job.provider} has no cancel endpoint: the task may still run (and bill) there")
    except (ProviderError, keypool.KeyUnavailable) as exc:
        note = f"telling the provider to stop failed: {exc}"
    for _ in range(3):
        try:
            await rt.jobs.change(job, note=note)
            return
        except Conflict:
            fresh = await load_job(rt, job_id)
            if fresh is None:
                return
            job = fresh
