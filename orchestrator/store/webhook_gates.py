"""Fairness for webhook deliveries: per-destination and per-tenant caps on active deliveries, a
circuit breaker per destination, a waiting line per tenant and a parking lot.

A destination's cap can adapt to how it answers (additive increase, multiplicative decrease, as TCP
does): every destination gets ``endpoint_concurrency``; with ``endpoint_concurrency_max`` higher,
one answering quickly while at least as many deliveries as its limit wait for it earns one more
place per success, up to that, and each failure or slow answer halves what it earned (a failing one
meets the circuit breaker). A fixed cap holds a healthy receiver to what it allows (eight at once
is 80 deliveries/s at a 100 ms round trip); more places cost the worker more connections.

A destination is a registered endpoint, or a tenant's job/batch ``webhook_url`` origin (per tenant,
so one tenant cannot open another's circuit). A delivery is *admitted* when it is created: if its
destination and tenant have room it holds its places and goes to the arq queue; if not, it waits
in its tenant's line (woken by the tenant's next finished attempt) or, while its destination's
circuit is open, in the parking lot until the cool-down ends. So the queue holds at most a tenant's
cap of its deliveries at once, and thousands of deliveries to dead endpoints stand in front of
nobody. A delivery that cannot go waits in its destination's line and its tenant's line; a finishing
attempt hands its place straight to the oldest in the destination's line (``Freed.handed``: the
caller attempts or queues it), else wakes the oldest in the tenant's line, which ``dispatch``
(``take_parked``) queues again with the parked deliveries that are due.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from orchestrator.domain.webhooks import Delivery, destination
from orchestrator.store import keys
from orchestrator.store.queue import Queue, delivery_job_id
from orchestrator.store.scripts import script


def _pair(member: bytes | str) -> tuple[str, int]:
    """A waiting-line or parking-lot member, ``"{delivery id}:{attempt}"``, as ``(delivery id, attempt)``."""
    delivery_id, _, attempt = (member.decode() if isinstance(member, bytes) else member).rpartition(":")
    return delivery_id, int(attempt)


def ms_now() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Gate:
    verdict: str  # go | busy | open | full
    wait_ms: int = 0
    failing_since_ms: int = 0


@dataclass(frozen=True)
class Freed:
    """What an attempt's end did: the destination's circuit is open until ``open_until`` (ms, 0: closed);
    ``handed``: the waiting deliveries ``(id, attempt)`` that now hold the freed places (and any the
    destination's grown limit opened), to be attempted or queued by the caller."""
    open_until: int = 0
    handed: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class CircuitRules:
    endpoint_concurrency: int = 8  # a destination's limit to start with, and the least
    endpoint_concurrency_max: int = 8  # ... and the most it grows to (the same: a fixed cap)
    slow_ms: int = 5_000  # a success slower than this counts as a sign of strain (the limit halves)
    tenant_concurrency: int = 50
    failures_to_open: int = 5
    cooldown_ms: int = 5_000
    max_cooldown_ms: int = 300_000
    lease_ms: int = 15_000  # an attempt's hold on its places (the timeout and some)
    queue_lease_ms: int = 120_000  # an admitted delivery's hold while it waits in the queue


class WebhookGates:
    def __init__(self, redis: Redis, rules: CircuitRules, queue: Queue,
                 deliver_now: Callable[[str, int], bool] | None = None) -> None:
        self.redis = redis
        self.rules = rules
        self.queue = queue
        # In a worker process: attempts an admitted delivery in this process at once (``False``: it
        # cannot take more now, so the delivery is queued). ``None`` (the API): always queued.
        self.deliver_now = deliver_now
        self._gate = script(redis, "webhook_gate")
        self._outcome = script(redis, "webhook_outcome")
        self._take = script(redis, "webhook_parked_take")

    @staticmethod
    def _keys(delivery: Delivery) -> list[str]:
        dest = destination(delivery)
        return [keys.webhook_destination(dest, "inflight"), keys.webhook_destination(dest, "circuit"),
                keys.webhook_tenant(delivery.tenant, "inflight"), keys.webhook_attempt(delivery.id),
                keys.webhook_tenant(delivery.tenant, "waiting"), keys.webhook_destination(dest, "waiting")]

    async def _pass(self, delivery: Delivery, mode: str, now_ms: int, lease_ms: int) -> Gate:
        r = self.rules
        verdict, wait, since = await self._gate(
            keys=[*self._keys(delivery), keys.webhook_destination(destination(delivery), "limit")],
            args=[delivery.id, mode, now_ms, lease_ms, r.endpoint_concurrency, r.tenant_concurrency, r.lease_ms,
                  f"{delivery.id}:{len(delivery.attempts)}", r.endpoint_concurrency_max])
        return Gate(verdict.decode() if isinstance(verdict, bytes) else str(verdict), int(wait), int(since))

    async def admit(self, deliveries: Sequence[Delivery], now_ms: int) -> None:
        """New deliveries: where their destination and tenant have room, attempted at once by this
        worker (``deliver_now``) or queued; else waiting in the tenant's line or parked while the
        destination's circuit is open."""
        for delivery in deliveries:
            gate = await self._pass(delivery, "admit", now_ms, self.rules.queue_lease_ms)
            if gate.verdict == "go":
                attempt = len(delivery.attempts)
                if self.deliver_now is None or not self.deliver_now(delivery.id, attempt):
                    await self.queue.deliver(delivery.id, attempt)
            else:
                await self.hold_back(delivery, gate, now_ms)

    async def acquire(self, delivery: Delivery, now_ms: int) -> Gate:
        """About to attempt ``delivery``: ``go`` (it holds its places), ``busy`` (another worker is making
        this attempt), ``open`` (the destination's circuit) or ``full`` (it now waits in line)."""
        return await self._pass(delivery, "attempt", now_ms, self.rules.lease_ms)

    async def hold_back(self, delivery: Delivery, gate: Gate, now_ms: int) -> None:
        """A delivery that may not go: parked until its destination's cool-down ends (spread over a
        cool-down, so they do not all come back at once), or waiting in line (``full``); either way the
        sweeper leaves it alone until then (its due time moves)."""
        if gate.verdict == "open":
            until = now_ms + gate.wait_ms + random.randint(0, max(gate.wait_ms, 1000))
            await self.park(delivery.id, len(delivery.attempts), until, destination(delivery))
        else:  # woken by the tenant's next finished attempt; if that wake is lost, the sweeper queues it
            await self.redis.zadd(keys.DELIVERIES_DUE, {delivery.id: now_ms + self.rules.lease_ms}, xx=True)

    async def outcome(self, delivery: Delivery, now_ms: int, ok: bool | None, latency_ms: float = 0.0) -> Freed:
        """Free the delivery's places (handing them to the oldest deliveries waiting for its destination,
        or waking the tenant's oldest waiting delivery), count the attempt's outcome (``None``: no
        attempt was made) and adapt the destination's limit to it and its ``latency_ms``."""
        r = self.rules
        ttl = max(r.max_cooldown_ms * 4, 24 * 3600 * 1000)
        result = "skip" if ok is None else ("1" if ok else "0")
        dest = destination(delivery)
        open_until, handed = await self._outcome(
            keys=[*self._keys(delivery), keys.DELIVERIES_PARKED, keys.webhook_destination(dest, "parked"),
                  keys.webhook_destination(dest, "limit")],
            args=[delivery.id, now_ms, result, r.failures_to_open, r.cooldown_ms, r.max_cooldown_ms, ttl,
                  r.queue_lease_ms, r.endpoint_concurrency, r.endpoint_concurrency_max, r.tenant_concurrency,
                  "1" if latency_ms > r.slow_ms else "0"])
        return Freed(int(open_until), tuple(_pair(m) for m in handed))

    async def park(self, delivery_id: str, attempt: int, until_ms: int, dest: str | None = None) -> None:
        """Hold the delivery back until ``until_ms`` (or until ``dest``, whose circuit is open, recovers);
        its due time moves along (the sweeper leaves it)."""
        member = f"{delivery_id}:{attempt}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(keys.DELIVERIES_PARKED, {member: until_ms})
        if dest is not None:
            pipe.zadd(keys.webhook_destination(dest, "parked"), {member: until_ms})
            pipe.pexpire(keys.webhook_destination(dest, "parked"), max(until_ms - ms_now(), 0) + 3_600_000)
        pipe.zadd(keys.DELIVERIES_DUE, {delivery_id: until_ms}, xx=True)
        await pipe.execute()

    async def take_parked(self, now_ms: int, limit: int = 1000) -> list[tuple[str, int]]:
        """The parked (or woken) deliveries now due, removed from the lot: ``(delivery id, attempt)``."""
        members = await self._take(keys=[keys.DELIVERIES_PARKED], args=[now_ms, limit])
        return [_pair(m) for m in members]

    async def waiting(self, pairs: list[tuple[str, int]]) -> list[str]:
        """For each ``(delivery id, attempt)``: ``queued`` (parked, or waiting or running in arq), ``stalled``
        (arq holds it as running but no worker is making the attempt: its worker died, and arq would
        only retry it after the function's timeout) or ``lost`` (in no queue)."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id, attempt in pairs:
            arq_id = delivery_job_id(delivery_id, attempt)
            pipe.zscore(keys.DELIVERIES_PARKED, f"{delivery_id}:{attempt}")
            pipe.exists(job_key_prefix + arq_id)
            pipe.exists(in_progress_key_prefix + arq_id)
            pipe.exists(keys.webhook_attempt(delivery_id))
        found = await pipe.execute()
        states = []
        for i in range(len(pairs)):
            parked, queued, running, attempting = found[4 * i:4 * i + 4]
            if parked is not None or (queued and not (running and not attempting)):
                states.append("queued")
            else:
                states.append("stalled" if queued else "lost")
        return states
