"""The work queue: arq, behind the few calls Atelier makes of it.

Kept small on purpose (arq is in maintenance mode; saq or streaq could replace
it here). Every enqueue carries a ``_job_id`` that makes duplicates no-ops:
``submit:{job}:{attempt}``, ``collect:{job}:{n}``, ``wh:{delivery}:{attempt}`` (``attempt``: the
attempts made before it, so a delivery's attempt is queued once however often it is looked at).
Polls are not queue entries: they wait on the poll boards (``orchestrator/polls.py``).
Payloads are JSON, never pickle: Redis content must not be able to run code in a worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

# Enqueue unless the arq job id is already queued, running or holding a result (as arq's own
# enqueue_job does with WATCH), in one round trip so thousands can share a pipeline.
_ENQUEUE_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1], KEYS[3]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""


def delivery_job_id(delivery_id: str, attempt: int) -> str:
    """The arq id of a delivery's attempt: one queue entry per attempt, however often it is queued."""
    return f"wh:{delivery_id}:{attempt}"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=str, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass
class SentinelTarget:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master>[/<db>][?sentinel_password=...]``"""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("a Sentinel URL lists host:port pairs: redis+sentinel://h1:26379,h2:26379/mymaster/0")
            sentinels.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("a Sentinel URL names the master and optionally the db: .../mymaster/0")
        query = parse_qs(parts.query)
        return cls(sentinels=sentinels, master=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
                   username=unquote(username) or None, password=unquote(password) or None,
                   sentinel_password=query.get("sentinel_password", [None])[0],
                   ssl=parts.scheme.startswith("rediss"))


async def _connect_sentinel(target: SentinelTarget, queue_name: str, retries: int = 10) -> ArqRedis:
    """The primary that the Sentinels name (re-resolved on failover by redis-py's Sentinel pool)."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5.0}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, ssl=target.ssl, db=target.db,
                        username=target.username, password=target.password, retry_on_timeout=True)
    for attempt in range(retries + 1):
        redis = sentinel.master_for(target.master, redis_class=ArqRedis)
        redis.job_serializer = dumps
        redis.job_deserializer = loads
        redis.default_queue_name = queue_name
        try:
            await redis.ping()
            return redis
        except (OSError, RedisError):  # TimeoutError is an OSError
            await redis.aclose()
            if attempt == retries:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def connect(redis_url: str, queue_name: str) -> ArqRedis:
    """Redis for the store and the queue: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``."""
    if redis_url.split("://", 1)[0] in SENTINEL_SCHEMES:
        return await _connect_sentinel(SentinelTarget.parse(redis_url), queue_name)
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = 10
    settings.retry_on_timeout = True
    return await create_pool(settings, job_serializer=dumps, job_deserializer=loads,
                             default_queue_name=queue_name)


@dataclass(frozen=True)
class Entry:
    """An arq job written by another atomic step (a job's creation puts its first submission on the
    queue in the same script): the arq job's key and the queue, then the payload, its expiry (ms),
    its score (ms) and its arq id."""

    keys: tuple[str, str]
    args: tuple[bytes, int, int, str]


class Queue:
    def __init__(self, arq: ArqRedis, jobs_queue: str, webhooks_queue: str) -> None:
        self.arq = arq
        self.jobs_queue = jobs_queue
        self.webhooks_queue = webhooks_queue
        self._enqueue_if_absent = arq.register_script(_ENQUEUE_IF_ABSENT)

    async def _enqueue(self, function: str, job_id: str, queue: str, defer: float, *args: Any) -> bool:
        """What arq's ``enqueue_job`` does, in one round trip instead of three (WATCH, MULTI, EXEC):
        enqueue unless the id is queued, running or holding a result."""
        now = int(time.time() * 1000)
        defer_ms = int(max(0.0, defer) * 1000)
        payload = serialize_job(function, args, {}, None, now, serializer=dumps)
        added = await self._enqueue_if_absent(
            keys=[job_key_prefix + job_id, queue, result_key_prefix + job_id],
            args=[payload, defer_ms + expires_extra_ms, now + defer_ms, job_id])
        return bool(added)

    def first_submission(self, job_id: str) -> Entry:
        """The entry that submits a new job (``submit:{job}:0``, due now), for ``JobStore.create``."""
        arq_id = f"submit:{job_id}:0"
        now = int(time.time() * 1000)
        payload = serialize_job("submit_job", (job_id,), {}, None, now, serializer=dumps)
        return Entry((job_key_prefix + arq_id, self.jobs_queue), (payload, expires_extra_ms, now, arq_id))

    async def submit(self, job_id: str, attempt: int, defer: float = 0, tag: str = "") -> bool:
        arq_id = f"submit:{job_id}:{attempt}{tag}"
        return await self._enqueue("submit_job", arq_id, self.jobs_queue, defer, job_id)

    async def submit_many(self, job_ids: Sequence[str], chunk: int = 1000) -> int:
        """Enqueue first submissions for many jobs in pipelines (batches); returns how many were new."""
        added = 0
        now = int(time.time() * 1000)
        for start in range(0, len(job_ids), chunk):
            pipe = self.arq.pipeline(transaction=False)
            for job_id in job_ids[start:start + chunk]:
                arq_id = f"submit:{job_id}:0"
                payload = serialize_job("submit_job", (job_id,), {}, None, now, serializer=dumps)
                await self._enqueue_if_absent(
                    keys=[job_key_prefix + arq_id, self.jobs_queue, result_key_prefix + arq_id],
                    args=[payload, expires_extra_ms, now, arq_id], client=pipe)
            added += sum(int(r) for r in await pipe.execute())
        return added

    async def collect(self, job_id: str, n: int, defer: float = 0) -> bool:
        return await self._enqueue("collect_outputs", f"collect:{job_id}:{n}", self.jobs_queue, defer, job_id)

    async def cancel_batch(self, batch_id: str, tag: str) -> bool:
        return await self._enqueue("cancel_batch_jobs", f"cancelbatch:{batch_id}:{tag}", self.jobs_queue, 0,
                                   batch_id)

    async def cancel_at_provider(self, job_id: str) -> bool:
        return await self._enqueue("cancel_at_provider", f"cancel:{job_id}", self.jobs_queue, 0, job_id)

    async def deliver(self, delivery_id: str, attempt: int, defer: float = 0, tag: str = "") -> bool:
        """Queue attempt ``attempt`` (the count of attempts made so far) unless it is queued already
        (``tag``: a second id, for an attempt whose first is held by a dead worker)."""
        return await self._enqueue("deliver_webhook", delivery_job_id(delivery_id, attempt) + tag,
                                   self.webhooks_queue, defer, delivery_id, attempt)

    async def deliver_many(self, pairs: Sequence[tuple[str, int]]) -> list[bool]:
        """Queue many ``(delivery id, attempt)`` now, in one pipeline; ``False`` where already queued."""
        if not pairs:
            return []
        now = int(time.time() * 1000)
        pipe = self.arq.pipeline(transaction=False)
        for delivery_id, attempt in pairs:
            arq_id = delivery_job_id(delivery_id, attempt)
            payload = serialize_job("deliver_webhook", (delivery_id, attempt), {}, None, now, serializer=dumps)
            await self._enqueue_if_absent(
                keys=[job_key_prefix + arq_id, self.webhooks_queue, result_key_prefix + arq_id],
                args=[payload, expires_extra_ms, now, arq_id], client=pipe)
        return [bool(r) for r in await pipe.execute()]

    async def depth(self) -> dict[str, int]:
        return {q: int(await self.arq.zcard(q)) for q in (self.jobs_queue, self.webhooks_queue)}
