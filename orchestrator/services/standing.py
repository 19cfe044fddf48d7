"""Where a waiting job stands, for its view's ``queue``.

At Atelier a throttled job waits in one of its provider key's lines (``store/throttle.py``: the slot
line of the key's concurrency cap, or the line for its request budget); at the provider, the task
waits in the provider's own queue where the provider reports a position (fal's ``queue_position``,
kept on the job by the poll). The ETA is rough by design: it is the model's measured p50 run time
(``store/durations.py``) times the turns the job still has to wait, plus its own run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from orchestrator.domain.job import Job
from orchestrator.store.durations import Durations
from orchestrator.store.throttle import Throttle
from orchestrator.wire.jobs import JobStatus, QueueView

P50_FRESH_SECONDS = 30.0  # a model's p50 is read at most this often per process (a list of 200 per read)
MAX_MODELS = 1000


@dataclass
class Standings:
    throttle: Throttle
    durations: Durations
    _p50: dict[tuple[str, str], tuple[float | None, float]] = field(default_factory=dict)

    async def queue(self, job: Job) -> QueueView | None:
        """The job's place in a line, or ``None`` when it waits in none that Atelier can see."""
        if job.status == JobStatus.queued and job.phase == "throttled" and job.key_id:
            place = await self.throttle.place(job.provider, job.key_id, job.id)
            if place is None:
                return None
            p50 = await self.p50(job.provider, job.model)
            if place.line == "slot":
                # It starts after rank + 1 slots are freed, the key's cap of them per run.
                ahead = place.rank + place.inflight
                turns = math.ceil((place.rank + 1) / max(1, place.cap or 1))
                eta = None if p50 is None else p50 * (turns + 1)
            else:
                ahead = place.rank
                eta = None if p50 is None else (place.rank + 1) * (place.interval or 0.0) + p50
            return QueueView(at="atelier", line=place.line, position=place.rank + 1, ahead=ahead,
                             eta_seconds=_rounded(eta))
        if job.status in (JobStatus.submitted, JobStatus.running) and job.provider_queue_position is not None:
            p50 = await self.p50(job.provider, job.model)
            eta = None
            if p50 is not None:
                started = job.timestamps.get("submitting") or job.timestamps.get("submitted") or job.created_at
                eta = max(0.0, p50 - (time.time() - started.timestamp()))
            ahead = max(0, job.provider_queue_position)
            return QueueView(at="provider", line="provider", position=ahead + 1, ahead=ahead,
                             eta_seconds=_rounded(eta))
        return None

    async def p50(self, provider: str, model: str) -> float | None:
        """The model's measured p50 run time (seconds), ``None`` before any of its jobs succeeded."""
        now = time.monotonic()
        cached = self._p50.get((provider, model))
        if cached is not None and cached[1] > now:
            return cached[0]
        measured = (await self.durations.measured([(provider, model)])).get((provider, model))
        if len(self._p50) >= MAX_MODELS:
            self._p50.clear()
        value = measured.p50_seconds if measured is not None else None
        self._p50[(provider, model)] = (value, now + P50_FRESH_SECONDS)
        return value


def _rounded(eta: float | None) -> float | None:
    return None if eta is None else round(eta, 1)
