"""The sweep step (cron): re-enter whatever step a job's lost work was, after a worker crash or a
lost queue entry, and repair provider slots still held by finished jobs. Safe to run anywhere, often."""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.infra import metrics
from orchestrator.services.runtime import Runtime
from orchestrator.store.jobs import Conflict
from orchestrator.wire.jobs import TERMINAL, JobStatus
from workers.context import runtime_of
from workers.path import Reentry, submit_again
from workers.poll import schedule_poll

log = logging.getLogger("atelier.worker")
S = JobStatus


async def sweep(ctx: dict[str, Any]) -> dict[str, int]:
    rt = runtime_of(ctx)
    now = time.time()
    grace = rt.settings.sweep_grace_seconds
    rescued = 0
    overdue = await rt.store.overdue(now)
    for job_id, job in zip(overdue, await rt.store.get_many(overdue), strict=True):  # unreadable ones: quarantined
        if job is None or job.status in TERMINAL:
            await rt.store.forget_active(job_id)
            continue
        await rt.store.touch_active(job_id, now + grace)
        if job.status in (S.queued, S.submitting):
            # A fresh arq id: `submit:{job}:{attempt}` may still be reserved by a killed worker's
            # lease (arq holds it for the function timeout + 10 s, 130 s). Duplicates are harmless:
            # submit_job re-reads the job and moves it only by compare-and-set.
            await submit_again(rt, job, Reentry.SWEPT, nonce=int(now))
        elif job.phase == "collecting":
            n = max(job.collects, 1)
            try:
                job = await rt.jobs.change(job, collects=n + 1)
            except Conflict:
                continue
            await rt.queue.collect(job.id, n + 1)
        else:
            provider = rt.registry.get(job.provider)
            try:
                job = await rt.jobs.change(job, poll_seq=job.poll_seq + 1)
            except Conflict:
                continue
            if provider is None:
                await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured")
                continue
            await schedule_poll(rt, provider, job, 0)
        rescued += 1
    redelivered = await _rescue_deliveries(rt, now, grace)
    redelivered += await rt.batches.events.sweep(now - grace)
    rescued += await _repair_slots(rt)
    await rt.reaper.reap(now)
    metrics.swept(rescued, redelivered)
    if rescued or redelivered:
        log.info("sweep re-scheduled %d jobs and %d webhook deliveries", rescued, redelivered,
                 extra={"event": "sweep.rescued"})
    return {"jobs": rescued, "deliveries": redelivered}


async def _rescue_deliveries(rt: Runtime, now: float, grace: float) -> int:
    """Queue again the pending deliveries whose attempt is overdue and in no queue: neither parked nor
    waiting or running in arq (a lost entry), or held as running by arq with no worker making it (a
    killed worker). One that is merely late (a long queue, a slow receiver) is left where it is and
    looked at again after the grace period: each attempt is queued once (a stalled one twice at most;
    the attempt marker and the attempt number keep the two from both posting)."""
    pending = []
    for delivery_id in await rt.store.overdue_deliveries(now - grace):
        delivery = await rt.store.get_delivery(delivery_id)
        if delivery is None or delivery.status != "pending":
            await rt.store.forget_due_delivery(delivery_id)
        else:
            pending.append(delivery)
    pairs = [(d.id, len(d.attempts)) for d in pending]
    rescued = 0
    for pair, state in zip(pairs, await rt.webhook_gates.waiting(pairs), strict=True):
        if state == "lost":  # the attempt's own arq id
            await rt.queue.deliver(*pair)
            rescued += 1
        elif state == "stalled":  # arq holds the dead worker's id until its timeout: a fresh one now
            await rt.queue.deliver(*pair, tag=f":s{int(now)}")
            rescued += 1
        # Only the due time moves (the record is the attempt's to write): looked at again after the grace.
        await rt.store.touch_due_delivery(pair[0], now)
    return rescued


async def _repair_slots(rt: Runtime) -> int:
    """Free provider slots (and places in line) still held by finished jobs, e.g. after a crash
    between a job's last transition and the release of its slot."""
    freed = 0
    async for kind, provider, key_id, ids in rt.throttle.holders():
        for job_id, job in zip(ids, await rt.store.get_many(ids), strict=True):
            if kind == "budgetline":
                if job is None or job.status != S.queued:
                    await rt.throttle.leave_line(provider, key_id, job_id)
                    freed += 1
                continue
            if job is None:
                await rt.throttle.release(provider, key_id, job_id)
                freed += 1
            elif job.status in TERMINAL:
                await rt.slots.free(job)
                freed += 1
    return freed
