"""Measured run times per provider and model, for the catalog's p50/p90 (``GET /v1/models``).

A succeeded job's run time (from its submission to its success, outputs stored) goes at the head of
a list; the figures read its newest ``KEEP`` entries. One LPUSH per success, and an LTRIM back to
``KEEP`` when the list grew ``SLACK`` past it: a few KB per model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from orchestrator.domain.job import Job
from orchestrator.store import keys

log = logging.getLogger("atelier.durations")

KEEP = 200
SLACK = 50


@dataclass(frozen=True)
class Measured:
    count: int
    p50_seconds: float
    p90_seconds: float


def run_seconds(job: Job) -> float | None:
    stamps = job.timestamps
    start = stamps.get("submitting") or stamps.get("submitted") or job.created_at
    end = stamps.get("succeeded")
    return None if end is None else max(0.0, (end - start).total_seconds())


class Durations:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def job_finished(self, job: Job, _finished_batch: bool) -> None:
        """A finish hook (``Jobs.finish_hooks``): record a succeeded job's run time. Never raises."""
        seconds = run_seconds(job) if job.status == "succeeded" else None
        if seconds is None:
            return
        key = keys.model_durations(job.provider, job.model)
        try:
            if await self.redis.lpush(key, int(seconds * 1000)) > KEEP + SLACK:  # type: ignore[misc]
                await self.redis.ltrim(key, 0, KEEP - 1)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a statistic must never fail a job's transition
            log.warning("could not record the run time of job %s", job.id, exc_info=True)

    async def measured(self, models: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Measured]:
        """p50/p90 of the recorded run times, for the models that have any."""
        pairs = list(models)
        pipe = self.redis.pipeline(transaction=False)
        for provider, model in pairs:
            pipe.lrange(keys.model_durations(provider, model), 0, KEEP - 1)
        result = {}
        for pair, raw in zip(pairs, await pipe.execute(), strict=True):
            values = sorted(int(v) / 1000 for v in raw)
            if values:
                result[pair] = Measured(len(values), _percentile(values, 0.5), _percentile(values, 0.9))
        return result


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    index = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))
    return round(ordered[index], 3)
