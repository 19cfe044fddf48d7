"""Nothing grows forever: a finished job's records and stored outputs are deleted once its retention
passes (``ATELIER_RETENTION_SECONDS``, or the tenant's own), finished batches likewise.

The schedule (``atl:retention``) is written in the same step as the transition that finishes a job,
so no finished job escapes it; the sweeper reaps what is due a few hundred at a time.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from orchestrator.domain.job import Job
from orchestrator.infra.storage import Storage
from orchestrator.store.batches import BatchStore
from orchestrator.store.jobs import JobStore, UnreadableRecord

log = logging.getLogger("atelier.retention")


@dataclass
class Reaper:
    store: JobStore
    batch_store: BatchStore
    storage: Storage

    async def reap(self, now: float, limit: int = 200) -> int:
        """Delete what is due; returns how many jobs and batches went."""
        due = await self.store.retention_due(now, limit)
        for member in due:
            if member.startswith("batch:"):
                await self.batch_store.delete(member.removeprefix("batch:"))
                continue
            if member.startswith("input:"):  # a file a tenant uploaded as a job's input (the OpenAI facade)
                await self.storage.delete(member.removeprefix("input:"))
                await self.store.forget_expiry(member)
                continue
            job = None
            with contextlib.suppress(UnreadableRecord):  # quarantined by get_many; its keys go anyway
                job = (await self.store.get_many([member]))[0]
            await self.delete(member, job)
        if due:
            log.info("retention: deleted %d finished jobs and batches", len(due), extra={"event": "retention.reaped"})
        return len(due)

    async def delete(self, job_id: str, job: Job | None) -> None:
        """Delete a finished job now: its stored outputs first, then every record of it."""
        for output in job.outputs if job is not None else []:
            await self.storage.delete(output.key)
        await self.store.delete_job(job_id, job)
