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
