"""Everything a process needs, built once from ``Settings`` (the API and the worker share it)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from arq.connections import ArqRedis

from orchestrator.jobs import Jobs
from orchestrator.queue import Queue, connect
from orchestrator.settings import Settings
from orchestrator.storage import Storage, open_storage
from orchestrator.store import JobStore
from orchestrator.tenants import shared_secret
from providers.registry import Registry


@dataclass
class Runtime:
    settings: Settings
    redis: ArqRedis
    store: JobStore
    queue: Queue
    storage: Storage
    registry: Registry
    jobs: Jobs
    http: httpx.AsyncClient  # to providers

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        redis = await connect(settings.redis_url, settings.queue_name)
        secret = (settings.file_url_secret.get_secret_value() if settings.file_url_secret
                  else await shared_secret(redis, "file-url"))
        storage = open_storage(settings.storage_url, public_url=settings.public_url, secret=secret,
                               s3_endpoint_url=settings.s3_endpoint_url)
        store = JobStore(redis, settings.idempotency_ttl_seconds)
        queue = Queue(redis, settings.queue_name, settings.webhook_queue_name)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False,
        )
        return cls(settings=settings, redis=redis, store=store, queue=queue, storage=storage,
                   registry=Registry(settings.provider_settings()),
                   jobs=Jobs(settings, store, queue, storage), http=http)

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()
