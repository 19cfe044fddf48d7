"""arq's ``Worker``: its job claim in one round trip, and kept alive through Redis outages (a restart,
a failover, a network blip).

arq lets any Redis error in its polling loop escape ``Worker.main()``, which ends the worker:
one Redis restart stopped every worker process for good (found by the fault suite,
tests/faults). Here a failed poll iteration is logged and retried after a pause, and the
slot arq took for a job it was starting when Redis went away is given back. Work whose
Redis writes failed meanwhile is re-scheduled by the sweeper (workers/tasks.sweep).
"""

from __future__ import annotations

import asyncio
import logging
import time

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker as ArqWorker
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from orchestrator.store.scripts import script

log = logging.getLogger("atelier.worker")

RETRY_SECONDS = 0.5
LOG_EVERY_SECONDS = 10.0


class Worker(ArqWorker):
    """arq's worker, with its claim of a job in one Lua step (``arq_claim.lua``: one round trip where
    arq's WATCH/MULTI claim takes five, a sixth of a job step's Redis round trips) and kept alive
    through Redis outages."""

    _redis_down_since: float | None = None
    _redis_logged_at: float = 0.0
    _claim: AsyncScript | None = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` (0.28), the claim made by one script."""
        if self._claim is None:
            self._claim = script(self.pool, "arq_claim")
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            try:
                score = await self._claim(keys=[in_progress_key_prefix + job_id, self.queue_name],
                                          args=[job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000)])
            except BaseException:
                # The slot (semaphore + counter) taken for the job is given back; without this, every
                # Redis outage would leak one.
                self.job_counter -= 1
                self.sem.release()
                raise
            if not score:  # running elsewhere, finished, or queued again for later
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            if self._redis_down_since is None:
                self._redis_down_since = now
            if now - self._redis_logged_at >= LOG_EVERY_SECONDS:
                self._redis_logged_at = now
                log.warning("redis unavailable (%s: %s); the %s worker keeps retrying", exc.__class__.__name__,
                            exc, self.queue_name, extra={"event": "worker.redis_unavailable"})
            await asyncio.sleep(RETRY_SECONDS)
            return
        if self._redis_down_since is not None:
            log.warning("redis is back after %.1fs; the %s worker resumed",
                        time.monotonic() - self._redis_down_since, self.queue_name,
                        extra={"event": "worker.redis_back"})
            self._redis_down_since = None
            self._redis_logged_at = 0.0
