"""The work queue: arq, behind the few calls Atelier makes of it.

Kept small on purpose (arq is in maintenance mode; saq or streaq could replace
it here). Every enqueue carries a ``_job_id`` that makes duplicates no-ops:
``submit:{job}:{attempt}``, ``poll:{job}:{seq}``, ``collect:{job}:{n}``,
``wh:{delivery}:{attempt}``. Payloads are JSON, never pickle: Redis content must
not be able to run code in a worker.
"""

from __future__ import annotations

import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=str, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


async def connect(redis_url: str, queue_name: str) -> ArqRedis:
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = 10
    settings.retry_on_timeout = True
    return await create_pool(settings, job_serializer=dumps, job_deserializer=loads,
                             default_queue_name=queue_name)


class Queue:
    def __init__(self, arq: ArqRedis, jobs_queue: str, webhooks_queue: str) -> None:
        self.arq = arq
        self.jobs_queue = jobs_queue
        self.webhooks_queue = webhooks_queue

    async def _enqueue(self, function: str, job_id: str, queue: str, defer: float, *args: Any) -> bool:
        job = await self.arq.enqueue_job(function, *args, _job_id=job_id, _queue_name=queue,
                                         _defer_by=max(0.0, defer) or None)
        return job is not None

    async def submit(self, job_id: str, attempt: int, defer: float = 0) -> bool:
        return await self._enqueue("submit_job", f"submit:{job_id}:{attempt}", self.jobs_queue, defer, job_id)

    async def poll(self, job_id: str, seq: int, defer: float = 0) -> bool:
        return await self._enqueue("poll_job", f"poll:{job_id}:{seq}", self.jobs_queue, defer, job_id, seq)

    async def collect(self, job_id: str, n: int, defer: float = 0) -> bool:
        return await self._enqueue("collect_outputs", f"collect:{job_id}:{n}", self.jobs_queue, defer, job_id)

    async def cancel_at_provider(self, job_id: str) -> bool:
        return await self._enqueue("cancel_at_provider", f"cancel:{job_id}", self.jobs_queue, 0, job_id)

    async def deliver(self, delivery_id: str, attempt: int, defer: float = 0) -> bool:
        return await self._enqueue("deliver_webhook", f"wh:{delivery_id}:{attempt}", self.webhooks_queue,
                                   defer, delivery_id)

    async def depth(self) -> dict[str, int]:
        return {q: int(await self.arq.zcard(q)) for q in (self.jobs_queue, self.webhooks_queue)}
