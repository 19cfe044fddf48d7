"""arq's ``Worker``, kept alive through Redis outages (a restart, a failover, a network blip).

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

from arq.worker import Worker as ArqWorker
from redis.exceptions import RedisError

log = logging.getLogger("atelier.worker")

RETRY_SECONDS = 0.5
LOG_EVERY_SECONDS = 10.0


class Worker(ArqWorker):
    _redis_down_since: float | None = None
    _redis_logged_at: float = 0.0

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        try:
            await super().start_jobs(job_ids)
        except (RedisError, OSError):
            # arq acquired a slot (semaphore + counter) for the job it was starting and only gives
            # it back on the paths it expects; without this, every outage would leak one slot.
            self.job_counter -= 1
            self.sem.release()
            raise

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
