"""Provider throttling shared through Redis by every worker: a cap on tasks in flight and a
requests-per-minute budget, per provider and per API key.

Tasks in flight are a Redis set per key (``atl:inflight:{provider}:{key_id}``).
A job that finds the key full waits in ``queued`` (phase ``throttled``) in a
sorted set ordered by priority, then submission time; when a task finishes,
the next waiting jobs are woken in that order. A job may take a slot only if
fewer jobs are ahead of it than there are free slots, so newcomers never jump
the line. The request budget is a GCRA limiter (``atl:rate:...``): submits
and polls of one key spend the same budget, so no 429 is self-inflicted. A 429
with ``Retry-After`` pauses the key (``pause``): its TAT moves past the pause,
so every worker holds that key's submits and polls back, rpm limit or not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from orchestrator.models import Job, Priority

P = "atl:"

_ACQUIRE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free > 0 then
  local ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[3])
  if ahead < free then
    redis.call('SADD', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 1
  end
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1])
return 0
"""

_RELEASE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free <= 0 then return {} end
return redis.call('ZRANGE', KEYS[2], 0, free - 1)
"""

# A provider's Retry-After: push the key's TAT forward (never back) so nothing goes before it.
_PAUSE = """
local target = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > tat then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# One request of a key's request budget (GCRA: ``tat`` is the key's theoretical arrival time; a
# pause (Retry-After) may have pushed it forward, which also holds back keys without an rpm).
# For a submission (ARGV[4], a job id) a job that must wait joins the key's
# budget line (priority, then submission order) and is told to come back when its turn should come
# (its place in line times the interval), so ten thousand waiting jobs retry about once each, not
# every interval. The line only spreads the retries: whoever finds a free request takes it.
# Returns {0} when the request may go now, else {milliseconds to wait, place in line}.
_TURN = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allow_at = tat - burst
if interval == 0 then allow_at = tat end
if now >= allow_at then
  if interval > 0 then
    redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(burst + 2 * interval))
  end
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {0, 0}
end
if ARGV[4] == '' then return {allow_at - now, 0} end
redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[4])
local place = redis.call('ZRANK', KEYS[2], ARGV[4])
return {allow_at - now + place * interval, place}
"""

_PRIORITY_RANK = {Priority.high: 0, Priority.normal: 1, Priority.low: 2}


def queue_score(job: Job) -> float:
    """Priority first, then submission order (milliseconds since the epoch fit well in a double)."""
    return _PRIORITY_RANK[job.priority] * 1e13 + job.created_at.timestamp() * 1000


@dataclass
class Limits:
    concurrency: int | None = None  # tasks in flight per key
    rpm: float | None = None  # requests per minute per key
    burst: int = 5


class Throttle:
    def __init__(self, redis: Redis, limits: dict[str, Limits]) -> None:
        self.redis = redis
        self.limits = limits
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._pause = redis.register_script(_PAUSE)
        self._turn = redis.register_script(_TURN)

    @staticmethod
    def inflight_key(provider: str, key_id: str) -> str:
        return f"{P}inflight:{provider}:{key_id}"

    @staticmethod
    def waiting_key(provider: str, key_id: str) -> str:
        return f"{P}waiting:{provider}:{key_id}"

    def cap(self, provider: str) -> int | None:
        limits = self.limits.get(provider)
        return limits.concurrency if limits else None

    async def acquire(self, job: Job, key_id: str) -> bool:
        """Take a slot for ``job`` on ``key_id``, or join the line (``False``)."""
        cap = self.cap(job.provider)
        if not cap:
            return True
        got = await self._acquire(keys=[self.inflight_key(job.provider, key_id),
                                        self.waiting_key(job.provider, key_id)],
                                  args=[job.id, cap, queue_score(job)])
        return bool(got)

    async def release(self, provider: str, key_id: str, job_id: str) -> list[str]:
        """Free ``job_id``'s slot; returns the waiting jobs that may now take one."""
        cap = self.cap(provider)
        if not cap:
            return []
        heads = await self._release(keys=[self.inflight_key(provider, key_id), self.waiting_key(provider, key_id)],
                                    args=[job_id, cap])
        return [h.decode() if isinstance(h, bytes) else str(h) for h in heads]

    @staticmethod
    def line_key(provider: str, key_id: str) -> str:
        """Jobs waiting for the key's request budget to submit (see ``_TURN``)."""
        return f"{P}budgetline:{provider}:{key_id}"

    async def turn(self, job: Job, key_id: str) -> tuple[float, int]:
        """Spend one request of the key's budget for ``job``'s submission: ``(0, 0)`` if it may go now,
        else (seconds until its turn should come, its place in the key's budget line)."""
        interval, burst = self._interval_burst(job.provider)
        wait, place = await self._turn(keys=[self.rate_key(job.provider, key_id), self.line_key(job.provider, key_id)],
                                       args=[int(time.time() * 1000), interval, burst, job.id, queue_score(job)])
        return max(0.0, float(wait)) / 1000, int(place)

    async def leave_line(self, provider: str, key_id: str, job_id: str) -> None:
        await self.redis.zrem(self.line_key(provider, key_id), job_id)

    @staticmethod
    def rate_key(provider: str, key_id: str) -> str:
        return f"{P}rate:{provider}:{key_id}"

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
        wait, _ = await self._turn(keys=[self.rate_key(provider, key_id), self.line_key(provider, key_id)],
                                   args=[int(time.time() * 1000), interval, burst, "", 0])
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

    async def inflight(self, provider: str, key_id: str) -> int:
        return int(await self.redis.scard(self.inflight_key(provider, key_id)))  # type: ignore[misc]
