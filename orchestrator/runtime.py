"""Everything a process needs, built once from ``Settings`` (the API and the worker share it)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from arq.connections import ArqRedis

from orchestrator import logs, metrics
from orchestrator.batches import Batches
from orchestrator.jobs import Jobs
from orchestrator.models import Job, JobStatus
from orchestrator.queue import Queue, connect
from orchestrator.settings import Settings
from orchestrator.storage import Storage, open_storage
from orchestrator.store import JobStore
from orchestrator.tenants import shared_secret
from orchestrator.throttle import Limits, Throttle
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
    batches: Batches
    http: httpx.AsyncClient  # to providers
    throttle: Throttle

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        redis = await connect(settings.redis_url, settings.queue_name)
        secret = (settings.file_url_secret.get_secret_value() if settings.file_url_secret
                  else await shared_secret(redis, "file-url"))
        storage = open_storage(settings.storage_url, public_url=settings.public_url, secret=secret,
                               s3_endpoint_url=settings.s3_endpoint_url,
                               s3_public_endpoint_url=settings.s3_public_endpoint_url)
        store = JobStore(redis, settings.idempotency_ttl_seconds)
        queue = Queue(redis, settings.queue_name, settings.webhook_queue_name)
        registry = Registry(settings.provider_settings())
        logs.mask_secrets(settings.secret_values())
        metrics.provider_keys({name: len(p.settings.api_keys) for name, p in registry.providers.items()})
        http = metrics.MeteredClient(
            metrics.ProviderClassifier({name: p.base_url for name, p in registry.providers.items()}),
            timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False,
        )
        jobs = Jobs(settings, store, queue, storage)
        batches = Batches(jobs, settings.batch_progress_interval_seconds)
        jobs.on_batch_job_finished = batches.on_job_finished
        throttle = Throttle(redis, {name: Limits(p.settings.concurrency, p.settings.rpm)
                                    for name, p in registry.providers.items()})
        rt = cls(settings=settings, redis=redis, store=store, queue=queue, storage=storage,
                 registry=registry, jobs=jobs, batches=batches, http=http, throttle=throttle)
        jobs.on_job_finished = rt.free_slot
        return rt

    async def free_slot(self, job: Job) -> None:
        """A job finished: free its provider slot and wake the jobs next in line for it."""
        if not job.key_id:
            return
        for waiting_id in await self.throttle.release(job.provider, job.key_id, job.id):
            waiting = await self.store.get(waiting_id)
            if waiting is not None and waiting.status == JobStatus.queued:
                await self.queue.submit(waiting.id, waiting.attempts, tag=f":woken{waiting.version}")

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()
