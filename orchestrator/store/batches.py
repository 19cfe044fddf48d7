"""Batches in Redis: the record, its counters (kept by the job scripts), its job indexes and
idempotency, and the finished-batch set the sweeper reads."""

from __future__ import annotations

from datetime import UTC, datetime

from redis.asyncio import Redis

from orchestrator.domain.job import BatchRecord
from orchestrator.store import keys
from orchestrator.store.jobs import ms
from orchestrator.wire.jobs import JobStatus


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BatchStore:
    def __init__(self, redis: Redis, idempotency_ttl_seconds: int) -> None:
        self.redis = redis
        self.idempotency_ttl = idempotency_ttl_seconds

    async def claim_idempotency(self, tenant: str, idempotency_key: str, candidate: str,
                                body_hash: str) -> tuple[str, str]:
        """``(batch id, body hash)`` that the key names: ``candidate`` if it was free."""
        key = keys.batch_idempotency(tenant, idempotency_key)
        await self.redis.set(key, f"{candidate} {body_hash}", nx=True, ex=self.idempotency_ttl)
        batch_id, _, prior_hash = _s(await self.redis.get(key) or "").partition(" ")
        return batch_id, prior_hash

    async def insert(self, record: BatchRecord) -> None:
        """Record the batch (once) and index it under its tenant."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(keys.batch(record.id), "d", record.model_dump_json())
        pipe.zadd(keys.tenant_batches(record.tenant), {record.id: 0})
        await pipe.execute()

    async def accepted(self, batch_id: str) -> bool:
        return await self.redis.hget(keys.batch(batch_id), "accepted") in (b"1", "1")  # type: ignore[misc]

    async def accept(self, batch_id: str) -> bool:
        """Mark every job of the batch as inserted; ``True`` when they had all finished already."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.batch(batch_id), "accepted", "1")
        pipe.hget(keys.batch(batch_id), "done")
        pipe.hget(keys.batch(batch_id), "total")
        _, done, total = await pipe.execute()
        return int(done or 0) >= int(total or 0)

    async def get(self, batch_id: str) -> BatchRecord | None:
        raw = await self.redis.hget(keys.batch(batch_id), "d")  # type: ignore[misc]
        return BatchRecord.model_validate_json(raw) if raw else None

    async def counters(self, batch_id: str) -> dict[str, str]:
        """The batch's counters (``c:{status}``, ``total``, ``done``, ``finished_at``, ``canceled_at``)."""
        fields = await self.redis.hgetall(keys.batch(batch_id))  # type: ignore[misc]
        return {_s(k): _s(v) for k, v in fields.items() if _s(k) != "d"}

    async def job_ids(self, batch_id: str, status: JobStatus | None, cursor: str | None,
                      limit: int) -> tuple[list[str], str | None]:
        key = keys.batch(batch_id) + (f":st:{status.value}" if status else ":jobs")
        lower = f"({cursor}" if cursor else "-"
        ids = [_s(i) for i in await self.redis.zrangebylex(key, lower, "+", start=0, num=limit + 1)]
        return ids[:limit], ids[limit - 1] if len(ids) > limit else None

    async def mark_canceled(self, batch_id: str) -> None:
        await self.redis.hsetnx(keys.batch(batch_id), "canceled_at", str(ms()))  # type: ignore[misc]

    async def canceled(self, batch_id: str) -> bool:
        return bool(await self.redis.hexists(keys.batch(batch_id), "canceled_at"))  # type: ignore[misc]

    async def progress_due(self, batch_id: str, interval_seconds: float) -> bool:
        """``True`` at most once per interval: time for a ``batch.progress`` event."""
        interval_ms = max(1, int(interval_seconds * 1000))
        return bool(await self.redis.set(keys.batch_progress_lock(batch_id), "1", nx=True, px=interval_ms))

    async def finish(self, batch_id: str) -> bool:
        """Mark the batch finished (``True`` only the first time) and note that its completion
        webhook is still to be recorded."""
        if await self.redis.hsetnx(keys.batch(batch_id), "finished_at", str(ms())):  # type: ignore[misc]
            await self.redis.zadd(keys.BATCHES_FINISHED, {batch_id: ms()})
            return True
        return False

    async def expire_at(self, batch_id: str, at: float) -> None:
        """Reap the finished batch's records at ``at`` (its jobs are reaped on their own schedule)."""
        await self.redis.zadd(keys.RETENTION, {f"batch:{batch_id}": ms(at)})

    async def delete(self, batch_id: str) -> None:
        """Remove a batch's record, counters, indexes and event log."""
        record = await self.get(batch_id)
        pipe = self.redis.pipeline(transaction=True)
        base = keys.batch(batch_id)
        pipe.delete(base, f"{base}:jobs", f"{base}:ev", keys.batch_progress_lock(batch_id),
                    *(f"{base}:st:{status.value}" for status in JobStatus))
        pipe.zrem(keys.RETENTION, f"batch:{batch_id}")
        pipe.zrem(keys.BATCHES_FINISHED, batch_id)
        if record is not None:
            pipe.zrem(keys.tenant_batches(record.tenant), batch_id)
        await pipe.execute()

    async def completion_recorded(self, batch_id: str) -> None:
        await self.redis.zrem(keys.BATCHES_FINISHED, batch_id)

    async def finished_unnotified(self, before: float, limit: int = 100) -> list[str]:
        """Finished batches whose completion webhook was not recorded by ``before`` (a crash in between)."""
        ids = await self.redis.zrangebyscore(keys.BATCHES_FINISHED, "-inf", ms(before), start=0, num=limit)
        return [_s(i) for i in ids]

    async def page(self, tenant: str, cursor: str | None, limit: int) -> list[str]:
        """Up to ``limit + 1`` of the tenant's batch ids, newest first, after ``cursor``."""
        upper = f"({cursor}" if cursor else "+"
        ids = await self.redis.zrevrangebylex(keys.tenant_batches(tenant), upper, "-", start=0, num=limit + 1)
        return [_s(i) for i in ids]


def finished_at(counters: dict[str, str]) -> datetime | None:
    raw = counters.get("finished_at")
    return datetime.fromtimestamp(int(raw) / 1000, UTC) if raw else None
