"""A job's hold on its provider key: the slot it takes under the key's concurrency cap, its place
in the key's budget line, and its pending poll. Freed when the job finishes (or changes key)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.job import Job
from orchestrator.store.jobs import JobStore
from orchestrator.store.polls import PollBoard
from orchestrator.store.queue import Queue
from orchestrator.store.throttle import Throttle
from orchestrator.wire.jobs import JobStatus


@dataclass
class Slots:
    store: JobStore
    queue: Queue
    throttle: Throttle
    polls: PollBoard

    async def job_finished(self, job: Job, finished_batch: bool = False) -> None:
        """A job reached a terminal state: drop its pending poll and free its provider slot
        (one of ``Jobs.finish_hooks``)."""
        await self.polls.forget(job.provider, job.key_id, job.id)
        # A job whose task was created had its turn, which took it out of the budget line
        # (rate_turn.lua); the sweeper clears a place a race left (workers/sweep.py).
        if job.key_id and job.provider_task_id is None:
            await self.throttle.leave_line(job.provider, job.key_id, job.id)
        await self.free(job)

    async def free(self, job: Job) -> None:
        """Free the job's slot on its key and wake the jobs next in line for it."""
        if not job.key_id:
            return
        for waiting_id in await self.throttle.release(job.provider, job.key_id, job.id):
            waiting = await self.store.get(waiting_id)
            if waiting is not None and waiting.status == JobStatus.queued:
                await self.queue.submit(waiting.id, waiting.attempts, tag=f":woken{waiting.version}")
