"""Prometheus metrics: their definitions, the few functions that record them, and the scrape handlers.

Every series lives in prometheus-client's default registry of the process that
records it. The API serves that registry at ``GET /metrics``; ``atelier worker``
serves its own at ``:9100/metrics`` (``--metrics-port``, ``ATELIER_WORKER_METRICS_PORT``).
Counters are recorded where the thing happens, so sum them over all Atelier
processes (``sum by (provider) (...)``); the Redis-derived gauges describe the
shared Redis and read the same from every process (aggregate them with ``max``).

Recorded by the process that applies the change (mostly the worker; the API for
creations and cancels):
  atelier_jobs_total{provider,kind,status}            jobs that reached a status (queued = created)
  atelier_jobs_throttled_total{provider}              jobs put back to wait (429, provider concurrency cap)
  atelier_job_queued_seconds{provider,kind}           created -> accepted by the provider
  atelier_job_provider_seconds{provider,kind}         accepted by the provider -> outputs ready
  atelier_job_collect_seconds{provider,kind}          outputs ready -> stored (succeeded)
  atelier_job_polls{provider}                         status fetches per job, observed when it ends
Worker (and, for the few calls it makes, the API):
  atelier_provider_requests_total{provider,method,endpoint,status}   status: HTTP code or "error"
  atelier_provider_request_seconds{provider}          time to the response headers
  atelier_provider_rate_limited_total{provider}       HTTP 429 answers
  atelier_provider_key_missing_total{provider}        a job's key left the pool / no key configured
  atelier_provider_keys_taken_out_total{provider,reason}  keys taken out of the pool (auth_failed |
                                                      insufficient_balance)
  atelier_webhook_deliveries_total{outcome}           delivery attempts: delivered | retry | dead
  atelier_webhook_delivery_seconds{outcome}           latency of each attempt
  atelier_sweep_rescued_total{kind}                   jobs | deliveries whose pending work was lost
API:
  atelier_callback_verifications_failed_total{provider,reason}   signature | token
Both, read from Redis at scrape time:
  atelier_queue_jobs{queue,state}                     arq queue entries: due (waiting or running) | deferred
  atelier_polls_waiting{provider,state}               polls on the poll boards: scheduled | due (waiting for budget)
  atelier_jobs_active                                 jobs not yet finished
  atelier_jobs_overdue                                active jobs whose pending work is overdue
  atelier_webhook_deliveries_pending                  webhook deliveries not yet delivered or dead
  atelier_provider_keys{provider}                     keys configured per provider (a count, never a key)
  atelier_provider_key_out_of_pool{provider,key_id,reason}  1 per key out of the pool (a fingerprint)
  atelier_redis_up                                    1 when the last scrape could read Redis
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.domain.job import Job
from orchestrator.infra.netstream import StatelessClient
from orchestrator.wire.jobs import TERMINAL, JobStatus

disable_created_metrics()  # no ``*_created`` series: they double the output and nobody graphs them

# Seconds, from an instant image to a long video render.
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800)
POLL_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
WEBHOOK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

JOBS = Counter("atelier_jobs", "Jobs that reached a status (queued counts creations)",
               ["provider", "kind", "status"])
THROTTLED = Counter("atelier_jobs_throttled", "Jobs put back to wait because the provider or a cap throttled them",
                    ["provider"])
QUEUED_SECONDS = Histogram("atelier_job_queued_seconds", "From creation to acceptance by the provider",
                           ["provider", "kind"], buckets=DURATION_BUCKETS)
PROVIDER_SECONDS = Histogram("atelier_job_provider_seconds", "From acceptance by the provider to outputs ready",
                             ["provider", "kind"], buckets=DURATION_BUCKETS)
COLLECT_SECONDS = Histogram("atelier_job_collect_seconds", "From outputs ready to outputs stored (succeeded)",
                            ["provider", "kind"], buckets=DURATION_BUCKETS)
POLLS = Histogram("atelier_job_polls", "Provider status fetches per job, observed when the job ends",
                  ["provider"], buckets=POLL_BUCKETS)

PROVIDER_REQUESTS = Counter("atelier_provider_requests", "HTTP requests to providers",
                            ["provider", "method", "endpoint", "status"])
PROVIDER_REQUEST_SECONDS = Histogram("atelier_provider_request_seconds", "Provider request time to response headers",
                                     ["provider"], buckets=REQUEST_BUCKETS)
PROVIDER_RATE_LIMITED = Counter("atelier_provider_rate_limited", "HTTP 429 answers from providers", ["provider"])
KEY_MISSING = Counter("atelier_provider_key_missing",
                      "Calls that found no usable key: the job's key left the pool, or none is configured",
                      ["provider"])
PROVIDER_KEYS = Gauge("atelier_provider_keys", "API keys configured per provider (a count)", ["provider"])
KEYS_TAKEN_OUT = Counter("atelier_provider_keys_taken_out",
                         "Provider keys taken out of the pool: refused (auth_failed) or out of balance",
                         ["provider", "reason"])
KEYS_OUT = Gauge("atelier_provider_key_out_of_pool",
                 "1 for each provider key out of the pool (key_id is the key's fingerprint)",
                 ["provider", "key_id", "reason"])

WEBHOOK_DELIVERIES = Counter("atelier_webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"])
WEBHOOK_PARKED = Counter("atelier_webhook_deliveries_parked",
                         "Deliveries held back: their destination's circuit was open, or it or its tenant "
                         "had as many attempts in flight as allowed", ["reason"])
WEBHOOK_SECONDS = Histogram("atelier_webhook_delivery_seconds", "Latency of webhook delivery attempts",
                            ["outcome"], buckets=WEBHOOK_BUCKETS)
CALLBACKS_FAILED = Counter("atelier_callback_verifications_failed", "Provider callbacks that failed verification",
                           ["provider", "reason"])
QUARANTINED = Counter("atelier_records_quarantined", "Stored records that could not be read and were set aside")
SWEEP_RESCUED = Counter("atelier_sweep_rescued", "Work re-scheduled by the sweeper after it was lost", ["kind"])

QUEUE_JOBS = Gauge("atelier_queue_jobs", "arq queue entries: due now (waiting or running) or deferred",
                   ["queue", "state"])
JOBS_ACTIVE = Gauge("atelier_jobs_active", "Jobs not yet in a terminal state")
JOBS_OVERDUE = Gauge("atelier_jobs_overdue", "Active jobs whose pending work is overdue (the sweeper rescues them)")
WEBHOOKS_PENDING = Gauge("atelier_webhook_deliveries_pending", "Webhook deliveries neither delivered nor dead")
POLLS_WAITING = Gauge("atelier_polls_waiting", "Polls on the poll boards: scheduled for later, or due and "
                      "waiting for their key's request budget", ["provider", "state"])
REDIS_UP = Gauge("atelier_redis_up", "1 when the last scrape could read Redis")



# -- jobs (called from orchestrator/jobs.py) ---------------------------------------------

def job_created(job: Job) -> None:
    JOBS.labels(job.provider, job.kind.value, JobStatus.queued.value).inc()


def job_changed(old: Job, new: Job) -> None:
    """Record what an update of ``old`` to ``new`` means (status and phase changes)."""
    provider, kind = new.provider, new.kind.value
    now = time.time()
    if new.phase == "throttled" and old.phase != "throttled":
        THROTTLED.labels(provider).inc()
    if new.phase == "collecting" and old.phase != "collecting":
        submitted = new.timestamps.get(JobStatus.submitted.value)
        if submitted is not None:
            PROVIDER_SECONDS.labels(provider, kind).observe(max(0.0, now - submitted.timestamp()))
    if new.status == old.status:
        return
    if new.status != JobStatus.queued:  # back to queued is a throttle, counted above
        JOBS.labels(provider, kind, new.status.value).inc()
    if new.status == JobStatus.submitted:
        QUEUED_SECONDS.labels(provider, kind).observe(max(0.0, now - new.created_at.timestamp()))
    if new.status == JobStatus.succeeded:
        ready = new.outputs_ready_at
        if isinstance(ready, int | float):
            COLLECT_SECONDS.labels(provider, kind).observe(max(0.0, now - float(ready)))
    if new.status in TERMINAL and new.provider_task_id:
        POLLS.labels(provider).observe(new.polls)


# -- provider HTTP ----------------------------------------------------------------------

_VERSION = re.compile(r"^v\d+(alpha|beta)?\d*$")
_WORD = re.compile(r"^[a-z][a-z_]{0,23}$")
_ACTION = re.compile(r"^[A-Za-z][A-Za-z_]{0,40}$")
# Path segments that follow a model name (``/v1/models/{owner}/{name}/predictions``).
_AFTER_MODEL = frozenset({"predictions", "versions", "operations", "requests"})
# Providers whose API paths start with the model id (fal: ``/{owner}/{app}[/{path}][/requests/{id}/status]``).
MODEL_FIRST = frozenset({"fal"})
MAX_ENDPOINTS_PER_PROVIDER = 50


def endpoint_template(path: str, *, model_first: bool = False) -> str:
    """A low-cardinality template of a provider API path: ids and model names become placeholders.

    ``/v1/predictions/abc123/cancel`` -> ``/v1/predictions/{id}/cancel``;
    ``/v1/models/black-forest-labs/flux-schnell/predictions`` -> ``/v1/models/{model}/predictions``;
    ``/v1beta/models/veo-3.0-generate-preview:predictLongRunning`` -> ``/v1beta/models/{model}:predictLongRunning``;
    with ``model_first``, ``/fal-ai/flux/dev/requests/abc/status`` -> ``/{model}/requests/{id}/status``.
    """
    out: list[str] = []
    in_model = model_first
    for raw in path.strip("/").split("/"):
        if not raw:
            continue
        segment, colon, action = raw.partition(":")
        suffix = f":{action}" if colon and _ACTION.match(action) else ""
        if in_model and segment not in _AFTER_MODEL:
            if not out or out[-1] != "{model}":
                out.append("{model}")
            if suffix:
                out[-1] += suffix
                in_model = False
            continue
        in_model = False
        if _VERSION.match(segment) or _WORD.match(segment):
            out.append(segment + suffix)
            in_model = segment == "models" and not suffix
        else:
            out.append("{id}" + suffix)
    return "/" + "/".join(out)


class ProviderClassifier:
    """Maps a request URL to ``(provider, endpoint)`` by the providers' base URLs (longest match first).

    URLs under no provider's base URL (output CDNs, key sets) are ``("other", "other")``;
    past ``MAX_ENDPOINTS_PER_PROVIDER`` distinct endpoints a provider's further ones are ``"other"``.
    """

    def __init__(self, base_urls: Mapping[str, str]) -> None:
        self.bases = sorted(((url.rstrip("/"), name) for name, url in base_urls.items() if url),
                            key=lambda item: len(item[0]), reverse=True)
        self.seen: dict[str, set[str]] = {}

    def __call__(self, url: httpx.URL) -> tuple[str, str]:
        plain = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"
        for base, name in self.bases:
            if plain == base or plain.startswith(base + "/"):
                endpoint = endpoint_template(plain[len(base):], model_first=name in MODEL_FIRST)
                seen = self.seen.setdefault(name, set())
                if endpoint not in seen:
                    if len(seen) >= MAX_ENDPOINTS_PER_PROVIDER:
                        return name, "other"
                    seen.add(endpoint)
                return name, endpoint
        return "other", "other"


class MeteredClient(StatelessClient):
    """An HTTP client (no cookies kept) that counts every request it sends by provider, endpoint and status."""

    def __init__(self, classify: Callable[[httpx.URL], tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classify = classify

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        provider, endpoint = self.classify(request.url)
        started = time.perf_counter()
        status = "error"
        try:
            response = await super().send(request, **kwargs)
            status = str(response.status_code)
            return response
        finally:
            PROVIDER_REQUESTS.labels(provider, request.method, endpoint, status).inc()
            PROVIDER_REQUEST_SECONDS.labels(provider).observe(time.perf_counter() - started)
            if status == "429":
                PROVIDER_RATE_LIMITED.labels(provider).inc()


def key_missing(provider: str) -> None:
    KEY_MISSING.labels(provider).inc()


def key_taken_out(provider: str, reason: str) -> None:
    KEYS_TAKEN_OUT.labels(provider, reason).inc()


def provider_keys(counts: Mapping[str, int]) -> None:
    for provider, count in counts.items():
        PROVIDER_KEYS.labels(provider).set(count)


# -- webhooks, callbacks, sweeper --------------------------------------------------------

def webhook_attempt(outcome: str, seconds: float) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()
    WEBHOOK_SECONDS.labels(outcome).observe(seconds)


def webhook_parked(reason: str) -> None:
    WEBHOOK_PARKED.labels({"open": "circuit_open"}.get(reason, "at_capacity")).inc()


def callback_failed(provider: str, reason: str) -> None:
    CALLBACKS_FAILED.labels(provider, reason).inc()


def record_quarantined() -> None:
    QUARANTINED.inc()


def swept(jobs: int, deliveries: int) -> None:
    if jobs:
        SWEEP_RESCUED.labels("jobs").inc(jobs)
    if deliveries:
        SWEEP_RESCUED.labels("deliveries").inc(deliveries)


# -- scraping ----------------------------------------------------------------------------

@dataclass
class Gauges:
    """The shared state's gauges, read from Redis at scrape time (``orchestrator.store.stats``)."""

    queues: dict[str, tuple[int, int]]  # queue -> (due, total)
    active: int
    overdue: int
    deliveries_pending: int
    polls: dict[str, tuple[int, int]]  # provider -> (scheduled, due)
    keys_out: dict[tuple[str, str], str]  # (provider, key_id) -> reason


GaugeReader = Callable[[], Awaitable["Gauges | None"]]


def set_gauges(reading: Gauges | None) -> None:
    """Publish a reading; ``None`` means Redis could not be read (a scrape still answers)."""
    if reading is None:
        REDIS_UP.set(0)
        return
    KEYS_OUT.clear()
    for (provider, key_id), reason in reading.keys_out.items():
        KEYS_OUT.labels(provider, key_id, reason).set(1)
    for queue, (due, total) in reading.queues.items():
        QUEUE_JOBS.labels(queue, "due").set(due)
        QUEUE_JOBS.labels(queue, "deferred").set(max(0, total - due))
    POLLS_WAITING.clear()
    for provider, (scheduled, due) in reading.polls.items():
        POLLS_WAITING.labels(provider, "scheduled").set(scheduled)
        POLLS_WAITING.labels(provider, "due").set(due)
    JOBS_ACTIVE.set(reading.active)
    JOBS_OVERDUE.set(reading.overdue)
    WEBHOOKS_PENDING.set(reading.deliveries_pending)
    REDIS_UP.set(1)


def exposition() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def worker_app(read_gauges: GaugeReader, healthy: Callable[[], bool]) -> Starlette:
    """The worker's metrics server: ``/metrics`` and ``/healthz`` (200 while its arq loops run)."""

    async def metrics(request: Request) -> Response:
        set_gauges(await read_gauges())
        return exposition()

    async def healthz(request: Request) -> Response:
        ok = healthy()
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz)])
