"""Provider throttling shared through Redis by every worker: a cap on tasks in flight and a
requests-per-minute budget, per provider and per API key.

Tasks in flight are a Redis set per key (``keys.inflight``).
A job that finds the key full waits in ``queued`` (phase ``throttled``) in a
sorted set ordered by priority, then by fair share between tenants (within a
priority, tenants take turns: see ``scripts/slot_acquire.lua``), then arrival;
when a task finishes, the next waiting jobs are woken in that order. A job may take a slot only if
fewer jobs are ahead of it than there are free slots, so newcomers never jump
the line. The request budget is a GCRA limiter (``keys.rate``): submits
and polls of one key spend the same budget, so no 429 is self-inflicted. A 429
with ``Retry-After`` pauses the key (``pause``): its TAT moves past the pause,
so every worker holds that key's submits and polls back, rpm limit or not.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from orchestrator.domain.job import Job
from orchestrator.store import keys
from orchestrator.store.scripts import script
from orchestrator.wire.jobs import Priority

_PRIORITY_RANK = {Priority.high: 0, Priority.normal: 1, Priority.low: 2}


@dataclass
class Limits:
    concurrency: int | None = None  # tasks in flight per key
    rpm: float | None = None  # requests per minute per key
    burst: int = 5


@dataclass(frozen=True)
class LinePlace:
    """A job's place in one of its key's lines: ``rank`` jobs wait ahead of it; ``inflight`` tasks hold
    the key's ``cap`` slots; ``interval``: seconds between two requests of the key's budget."""

    line: Literal["slot", "request_budget"]
    rank: int
    inflight: int
    cap: int | None
    interval: float | None


class Throttle:
    def __init__(self, redis: Redis, limits: dict[str, Limits]) -> None:
        self.redis = redis
        self.limits = limits
        self._acquire = script(redis, "slot_acquire")
        self._release = script(redis, "slot_release")
        self._pause = script(redis, "rate_pause")
        self._turn = script(redis, "rate_turn")

    inflight_key = staticmethod(keys.inflight)
    waiting_key = staticmethod(keys.waiting)
    line_key = staticmethod(keys.budget_line)  # jobs waiting for the key's request budget to submit
    rate_key = staticmethod(keys.rate)

    def cap(self, provider: str) -> int | None:
        limits = self.limits.get(provider)
        return limits.concurrency if limits else None

    async def acquire(self, job: Job, key_id: str) -> bool:
        """Take a slot for ``job`` on ``key_id``, or join the line (``False``)."""
        cap = self.cap(job.provider)
        if not cap:
            return True
        got = await self._acquire(keys=[self.inflight_key(job.provider, key_id),
                                        self.waiting_key(job.provider, key_id),
                                        keys.fair_tags(job.provider, key_id)],
                                  args=[job.id, cap, _PRIORITY_RANK[job.priority], job.tenant])
        return bool(got)

    async def release(self, provider: str, key_id: str, job_id: str) -> list[str]:
        """Free ``job_id``'s slot; returns the waiting jobs that may now take one."""
        cap = self.cap(provider)
        if not cap:
            return []
        heads = await self._release(keys=[self.inflight_key(provider, key_id), self.waiting_key(provider, key_id),
                                          keys.fair_tags(provider, key_id)],
                                    args=[job_id, cap])
        return [h.decode() if isinstance(h, bytes) else str(h) for h in heads]

    async def turn(self, job: Job, key_id: str) -> tuple[float, int]:
        """Spend one request of the key's budget for ``job``'s submission: ``(0, 0)`` if it may go now,
        else (seconds until its turn should come, its place in the key's budget line)."""
        interval, burst = self._interval_burst(job.provider)
        wait, place = await self._turn(keys=[self.rate_key(job.provider, key_id), self.line_key(job.provider, key_id),
                                             keys.fair_tags(job.provider, key_id, "budget")],
                                       args=[int(time.time() * 1000), interval, burst, job.id,
                                             _PRIORITY_RANK[job.priority], job.tenant])
        return max(0.0, float(wait)) / 1000, int(place)

    async def leave_line(self, provider: str, key_id: str, job_id: str) -> None:
        await self.redis.zrem(self.line_key(provider, key_id), job_id)

    def _interval_burst(self, provider: str) -> tuple[float, float]:
        """The GCRA emission interval and burst tolerance (ms) of ``provider``'s keys; (0, 0) without an rpm."""
        limits = self.limits.get(provider)
        if not limits or not limits.rpm:
            return 0.0, 0.0
        interval = 60_000 / limits.rpm
        return interval, interval * max(0, limits.burst - 1)

    async def wait_ms(self, provider: str, key_id: str) -> int:
        """Spend one request of the key's budget: 0 if it may go now, else how long to wait (a poll
        outside the poll boards; submissions use ``turn``).

        Without a requests-per-minute limit only a pause (a provider's Retry-After) can hold a key back.
        """
        interval, burst = self._interval_burst(provider)
        wait, _ = await self._turn(keys=[self.rate_key(provider, key_id), self.line_key(provider, key_id),
                                         keys.fair_tags(provider, key_id, "budget")],
                                   args=[int(time.time() * 1000), interval, burst, "", 0, ""])
        return max(0, math.ceil(float(wait)))

    async def pause(self, provider: str, key_id: str, seconds: float) -> None:
        """Allow no request on the key for ``seconds`` (a provider's 429 with ``Retry-After``), shared by
        every worker: submits and polls of that key wait, not only the job that met the 429."""
        if seconds <= 0:
            return
        interval, burst = self._interval_burst(provider)
        now = int(time.time() * 1000)
        target = now + math.ceil(seconds * 1000 + burst)
        await self._pause(keys=[self.rate_key(provider, key_id)],
                          args=[target, math.ceil(target - now + burst + 2 * interval) + 1000])

    async def holders(self) -> AsyncIterator[tuple[str, str, str, list[str]]]:
        """Every key's slot holders, slot waiters and budget line, as ``(kind, provider, key_id, job ids)``
        with ``kind`` one of ``inflight``, ``waiting``, ``budgetline`` (the sweeper's repair)."""
        for pattern in keys.SLOT_PATTERNS:
            async for raw_key in self.redis.scan_iter(match=pattern, count=100):
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                kind, provider, key_id = keys.parse_slot_key(key)
                members = (await self.redis.smembers(key) if kind == "inflight"  # type: ignore[misc]
                           else await self.redis.zrange(key, 0, 999))
                yield kind, provider, key_id, [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    async def place(self, provider: str, key_id: str, job_id: str) -> LinePlace | None:
        """Where ``job_id`` waits on the key: in its slot line or its budget line (``None``: in neither).

        One round trip (both ranks, the slots taken); a job view of a throttled job asks it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrank(self.waiting_key(provider, key_id), job_id)
        pipe.zrank(self.line_key(provider, key_id), job_id)
        pipe.scard(self.inflight_key(provider, key_id))
        slot_rank, budget_rank, inflight = await pipe.execute()
        if slot_rank is not None:
            return LinePlace("slot", int(slot_rank), int(inflight), self.cap(provider), None)
        if budget_rank is not None:
            interval, _ = self._interval_burst(provider)
            return LinePlace("request_budget", int(budget_rank), int(inflight), self.cap(provider),
                             interval / 1000 if interval else None)
        return None

    async def inflight(self, provider: str, key_id: str) -> int:
        return int(await self.redis.scard(self.inflight_key(provider, key_id)))  # type: ignore[misc]

    async def usage(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], KeyUsage]:
        """What each ``(provider, key_id)`` holds now: slots in flight and waiting, the request budget spent
        and when its next request may go (one round trip; the dashboard's operations view)."""
        pipe = self.redis.pipeline(transaction=False)
        for provider, key_id in pairs:
            pipe.scard(self.inflight_key(provider, key_id))
            pipe.zcard(self.waiting_key(provider, key_id))
            pipe.zcard(self.line_key(provider, key_id))
            pipe.get(self.rate_key(provider, key_id))
        values = await pipe.execute() if pairs else []
        now = time.time() * 1000
        result = {}
        for i, (provider, key_id) in enumerate(pairs):
            inflight, waiting, line, raw_tat = values[4 * i:4 * i + 4]
            limits = self.limits.get(provider) or Limits()
            interval, burst_ms = self._interval_burst(provider)
            tat = max(now, float(raw_tat)) if raw_tat is not None else now
            allow_at = tat - burst_ms if interval else tat
            spent = min(limits.burst, math.ceil((tat - now) / interval)) if interval else 0
            result[(provider, key_id)] = KeyUsage(
                inflight=int(inflight), cap=limits.concurrency, waiting=int(waiting), budget_line=int(line),
                rpm=limits.rpm, burst=limits.burst if limits.rpm else None, budget_spent=spent,
                next_request_in=max(0.0, (allow_at - now) / 1000))
        return result


@dataclass(frozen=True)
class KeyUsage:
    """One provider key's throttle state: ``budget_spent`` of its ``burst`` requests are spent (the GCRA
    window), and ``next_request_in`` seconds pass before it may make another (a pause from a 429 too)."""

    inflight: int
    cap: int | None
    waiting: int  # jobs queued for a slot
    budget_line: int  # jobs waiting for the request budget to submit
    rpm: float | None
    burst: int | None
    budget_spent: int
    next_request_in: float
