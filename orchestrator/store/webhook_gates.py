"""Fairness for webhook deliveries: per-destination and per-tenant caps on attempts in flight, a
circuit breaker per destination, and the parking lot of deliveries held back by them.

A destination is a registered endpoint, or a tenant's job/batch ``webhook_url`` origin (per tenant,
so one tenant cannot open another's circuit). A delivery that may not go now is *parked*: it leaves
the arq queue (so thousands of deliveries to dead endpoints never stand in front of a healthy
endpoint's) and is queued again when its destination may take it (``take_parked``).
"""

from __future__ import annotations

from dataclasses import dataclass

from arq.constants import job_key_prefix
from redis.asyncio import Redis

from orchestrator.store import keys
from orchestrator.store.queue import delivery_job_id
from orchestrator.store.scripts import script


@dataclass(frozen=True)
class Gate:
    verdict: str  # go | busy | open | full
    wait_ms: int = 0
    failing_since_ms: int = 0


@dataclass(frozen=True)
class CircuitRules:
    endpoint_concurrency: int = 8
    tenant_concurrency: int = 0
    failures_to_open: int = 5
    cooldown_ms: int = 5_000
    max_cooldown_ms: int = 300_000
    lease_ms: int = 15_000


class WebhookGates:
    def __init__(self, redis: Redis, rules: CircuitRules) -> None:
        self.redis = redis
        self.rules = rules
        self._gate = script(redis, "webhook_gate")
        self._outcome = script(redis, "webhook_outcome")
        self._take = script(redis, "webhook_parked_take")

    @staticmethod
    def _keys(destination: str, tenant: str) -> list[str]:
        return [keys.webhook_destination(destination, "inflight"), keys.webhook_destination(destination, "circuit"),
                keys.webhook_tenant_inflight(tenant)]

    async def acquire(self, destination: str, tenant: str, delivery_id: str, now_ms: int) -> Gate:
        r = self.rules
        verdict, wait, since = await self._gate(
            keys=self._keys(destination, tenant),
            args=[delivery_id, now_ms, r.lease_ms, r.endpoint_concurrency, r.tenant_concurrency])
        return Gate(verdict.decode() if isinstance(verdict, bytes) else str(verdict), int(wait), int(since))

    async def outcome(self, destination: str, tenant: str, delivery_id: str, now_ms: int, ok: bool) -> int:
        """Free the attempt's holds and count its outcome; returns when the circuit is open until (0: closed)."""
        r = self.rules
        ttl = max(r.max_cooldown_ms * 4, 24 * 3600 * 1000)
        return int(await self._outcome(
            keys=self._keys(destination, tenant),
            args=[delivery_id, now_ms, 1 if ok else 0, r.failures_to_open, r.cooldown_ms, r.max_cooldown_ms, ttl]))

    async def park(self, delivery_id: str, attempt: int, until_ms: int) -> None:
        """Hold the delivery back until ``until_ms``; its due time moves along (the sweeper leaves it)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(keys.DELIVERIES_PARKED, {f"{delivery_id}:{attempt}": until_ms})
        pipe.zadd(keys.DELIVERIES_DUE, {delivery_id: until_ms}, xx=True)
        await pipe.execute()

    async def take_parked(self, now_ms: int, limit: int = 1000) -> list[tuple[str, int]]:
        """The parked deliveries now due, removed from the lot: ``(delivery id, attempt)``."""
        members = await self._take(keys=[keys.DELIVERIES_PARKED], args=[now_ms, limit])
        taken = []
        for m in members:
            delivery_id, _, attempt = (m.decode() if isinstance(m, bytes) else str(m)).rpartition(":")
            taken.append((delivery_id, int(attempt)))
        return taken

    async def waiting(self, pairs: list[tuple[str, int]]) -> list[bool]:
        """For each ``(delivery id, attempt)``: is it parked or in the queue (waiting or running)?"""
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id, attempt in pairs:
            pipe.zscore(keys.DELIVERIES_PARKED, f"{delivery_id}:{attempt}")
            pipe.exists(job_key_prefix + delivery_job_id(delivery_id, attempt))
        found = await pipe.execute()
        return [found[2 * i] is not None or bool(found[2 * i + 1]) for i in range(len(pairs))]

    async def parked(self) -> int:
        return int(await self.redis.zcard(keys.DELIVERIES_PARKED))
