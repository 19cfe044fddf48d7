"""The shared state's gauges, read from Redis at scrape time (published by ``orchestrator.infra.metrics``)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from redis.asyncio import Redis

from orchestrator.infra.metrics import Gauges
from orchestrator.store import keypool, keys, polls


async def read_gauges(redis: Redis, queues: Iterable[str]) -> Gauges | None:
    """``None`` when Redis cannot be read: a scrape must answer even then."""
    now_ms = int(time.time() * 1000)
    names = list(queues)
    try:
        pipe = redis.pipeline(transaction=False)
        for queue in names:
            pipe.zcount(queue, "-inf", now_ms)
            pipe.zcard(queue)
        pipe.zcard(keys.ACTIVE)
        pipe.zcount(keys.ACTIVE, "-inf", now_ms)
        pipe.zcard(keys.DELIVERIES_DUE)
        values = [int(v) for v in await pipe.execute()]
        boards = await polls.counts(redis)
        keys_out = await keypool.all_out(redis)
    except Exception:  # noqa: BLE001 - a scrape must answer even when Redis does not
        return None
    active, overdue, pending = values[-3:]
    return Gauges(queues={q: (values[2 * i], values[2 * i + 1]) for i, q in enumerate(names)},
                  active=active, overdue=overdue, deliveries_pending=pending, polls=boards,
                  keys_out={pair: record.reason for pair, record in keys_out.items()})


async def dead_deliveries(redis: Redis, limit: int = 10_000) -> dict[str, int]:
    """Dead-lettered webhook deliveries per endpoint (endpoints with none left out). A SCAN over the
    endpoints' ``dead`` indexes: for an operator's page, not for every scrape; at most ``limit`` endpoints."""
    found: dict[str, int] = {}
    head, _, tail = keys.endpoint_deliveries("\0", "dead").partition("\0")
    names = []
    async for raw in redis.scan_iter(match=keys.endpoint_deliveries("*", "dead"), count=1000):
        names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
        if len(names) >= limit:
            break
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.zcard(name)
    for name, count in zip(names, await pipe.execute() if names else [], strict=True):
        if int(count):
            found[name[len(head):len(name) - len(tail)]] = int(count)
    return found
