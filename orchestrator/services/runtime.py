"""The composition root: every service a process needs, built once from ``Settings``.

The API and the worker each open one ``Runtime``; nothing below the API and the workers
imports it. Services get their collaborators at construction (no hooks set afterwards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
from arq.connections import ArqRedis

from orchestrator.infra import logs, metrics, netstream
from orchestrator.infra.destinations import webhook_client
from orchestrator.infra.settings import Settings
from orchestrator.infra.storage import Storage, open_storage
from orchestrator.infra.tls import client_ssl_context
from orchestrator.services.batches import Batches, BatchEvents
from orchestrator.services.fallbacks import Fallbacks
from orchestrator.services.jobs import Jobs
from orchestrator.services.retention import Reaper
from orchestrator.services.slots import Slots
from orchestrator.services.standing import Standings
from orchestrator.services.views import JobViews
from orchestrator.store import deployment
from orchestrator.store.batches import BatchStore
from orchestrator.store.durations import Durations
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import JobStore
from orchestrator.store.ledger import Ledger
from orchestrator.store.polls import PollBoard
from orchestrator.store.queue import Queue, connect
from orchestrator.store.tenants import shared_secret
from orchestrator.store.throttle import Limits, Throttle
from orchestrator.store.webhook_gates import CircuitRules, WebhookGates
from providers.registry import Registry

KEEPALIVE = 8  # idle connections kept per HTTP pool


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
    endpoints: Endpoints
    slots: Slots
    http: httpx.AsyncClient  # output downloads (any host)
    media_http: httpx.AsyncClient  # media inputs tenants name: the destination guard checks every connection
    provider_http: dict[str, httpx.AsyncClient]  # API calls: one small pool per provider
    throttle: Throttle
    polls: PollBoard
    reaper: Reaper
    webhook_gates: WebhookGates
    durations: Durations  # measured run times per model (the catalog's p50/p90)
    ledger: Ledger  # budgets and usage figures (a job's money moves with the job in store.jobs)

    @classmethod
    async def open(cls, settings: Settings, *, deliver_now: Callable[[str, int], bool] | None = None) -> Runtime:
        """Everything a process needs. ``deliver_now``: a worker that attempts admitted webhook
        deliveries itself (``workers.delivery.DirectDeliveries``); without it they are queued."""
        redis = await connect(settings.redis_url, settings.queue_name)
        await deployment.mark(redis)  # the operator commands check for it (a wrong ATELIER_REDIS_URL)
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
        classify = metrics.ProviderClassifier({name: p.base_url for name, p in registry.providers.items()})

        def client(max_connections: int) -> httpx.AsyncClient:
            # Few idle connections per pool: httpcore walks every pooled connection on each request (a
            # system call each on anyio's backend: with 50 kept alive a request cost ~1.7 ms of CPU,
            # with 5 ~0.6 ms, measured; netstream's backend answers from state).
            return metrics.MeteredClient(
                classify, timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
                transport=netstream.transport(
                    httpx.Limits(max_connections=max_connections, max_keepalive_connections=KEEPALIVE),
                    client_ssl_context()),
                follow_redirects=False)

        gates = WebhookGates(redis, CircuitRules(
            endpoint_concurrency=settings.webhook_endpoint_concurrency,
            endpoint_concurrency_max=max(settings.webhook_endpoint_concurrency,
                                         settings.webhook_endpoint_concurrency_max or 0),
            slow_ms=int(settings.webhook_timeout_seconds * 500),  # half the attempt's timeout
            tenant_concurrency=settings.webhook_tenant_concurrency,
            failures_to_open=settings.webhook_circuit_failures,
            cooldown_ms=int(settings.webhook_circuit_cooldown_seconds * 1000),
            max_cooldown_ms=int(settings.webhook_circuit_max_cooldown_seconds * 1000),
            lease_ms=int((settings.webhook_timeout_seconds + 5) * 1000)), queue, deliver_now)
        throttle = Throttle(redis, {name: Limits(p.settings.concurrency, p.settings.rpm)
                                    for name, p in registry.providers.items()})
        polls = PollBoard(redis, store.ACTIVE)
        endpoints = Endpoints(store)
        slots = Slots(store, queue, throttle, polls)
        durations = Durations(redis)
        batch_store = BatchStore(redis, settings.idempotency_ttl_seconds)
        events = BatchEvents(store, batch_store, endpoints, queue, settings.batch_progress_interval_seconds,
                             settings.retention_seconds, webhooks=gates)
        # a job's view shows where it waits (services/standing.py)
        views = JobViews(storage, settings.output_url_ttl_seconds, Standings(throttle, durations).queue)
        jobs = Jobs(settings, store, queue, views, endpoints,
                    finish_hooks=(slots.job_finished, events.on_job_finished, durations.job_finished),
                    webhooks=gates)
        jobs.fallback = Fallbacks(jobs, registry, slots).move
        money = Ledger(redis)
        return cls(settings=settings, redis=redis, store=store, queue=queue, storage=storage,
                   registry=registry, jobs=jobs, batches=Batches(jobs, events, money), endpoints=endpoints, slots=slots,
                   http=client(200), provider_http={name: client(100) for name in registry.providers},
                   media_http=webhook_client(settings.http_timeout_seconds, settings.allow_private_fetches),
                   throttle=throttle, polls=polls, reaper=Reaper(store, batch_store, storage),
                   webhook_gates=gates, durations=durations, ledger=money)

    def http_for(self, provider: str) -> httpx.AsyncClient:
        """The client for ``provider``'s API."""
        return self.provider_http.get(provider, self.http)

    async def close(self) -> None:
        await self.http.aclose()
        await self.media_http.aclose()
        for client in self.provider_http.values():
            await client.aclose()
        await self.redis.aclose()
