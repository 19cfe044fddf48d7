"""What every step of the job's path needs: the runtime, the job as stored now, the call context
for its provider key, log fields, and writes that ride out a Redis restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.domain.job import Job, generation_request, source_media
from orchestrator.infra import metrics
from orchestrator.services.runtime import Runtime
from orchestrator.services.sources import SourceProblem, source_job
from orchestrator.store import keypool
from orchestrator.store.jobs import Conflict
from orchestrator.wire.jobs import TERMINAL, JobStatus
from providers.contract import CallContext, GenerationRequest, Provider

log = logging.getLogger("atelier.worker")
T = TypeVar("T")


def runtime_of(ctx: dict[str, Any]) -> Runtime:
    rt: Runtime = ctx["rt"]
    return rt


def log_extra(job: Job, event: str) -> dict[str, str]:
    """The fields every log line about a job carries (``event``: what happened, e.g. ``status.unknown``)."""
    return {"job_id": job.id, "tenant": job.tenant, "provider": job.provider, "event": event}


def call_context(rt: Runtime, provider: Provider, job: Job,
                 out_of_pool: Mapping[str, keypool.KeyOut] | None = None) -> CallContext:
    """Call context with the key that submitted ``job`` (or, before submission, the one it will use).

    A job not yet at the provider (``queued``) whose key left the pool (``out_of_pool``, or no longer
    configured) picks another: nothing exists under the old key. Raises ``keypool.KeyUnavailable``
    (``NoUsableKey`` when every key is out).
    """
    keys = provider.settings.api_keys
    key = keypool.resolve(keys, job.key_id) if job.key_id else None
    unsubmitted = job.status == JobStatus.queued
    if keys and (not job.key_id or (unsubmitted and (key is None or job.key_id in (out_of_pool or {})))):
        key = keypool.pick(keys, job, out_of_pool)
    if key is None:
        metrics.key_missing(job.provider)
        if not job.key_id:
            raise keypool.KeyUnavailable(f"no API key configured for {job.provider}")
        raise keypool.KeyUnavailable(f"the {job.provider} key that submitted this job is no longer configured")
    callback_url = None
    if provider.supports_callbacks and rt.settings.callbacks_enabled:
        base = rt.settings.public_url.rstrip("/")
        callback_url = f"{base}/v1/callbacks/{job.provider}?job={job.id}&token={job.callback_token}"
    return CallContext(http=rt.http_for(job.provider), api_key=key, callback_url=callback_url,
                       timeout=provider.settings.request_timeout(job.model), media_http=rt.media_http)


class SourceUnavailable(Exception):
    """A follow-up's source job is gone (retention, deletion) or no longer usable."""

    code = "source_unavailable"


async def requested(rt: Runtime, job: Job) -> tuple[GenerationRequest, Job | None]:
    """What the adapter is told to render for ``job``, with its source job (a follow-up), whose stored
    output it can fetch at a freshly minted URL."""
    if job.source is None:
        return generation_request(job), None
    try:
        source = await source_job(rt.store, job.tenant, job.source)
    except SourceProblem as exc:
        raise SourceUnavailable(f"the source job cannot be used any more: {exc.message}") from exc
    url = await rt.storage.url(source.outputs[job.source.output].key, rt.settings.output_url_ttl_seconds)
    return generation_request(job, source_media(source, job.source.output, url)), source


async def load_job(rt: Runtime, job_id: str) -> Job | None:
    job = await rt.store.get(job_id)
    if job is None:
        log.warning("job %s vanished from the store", job_id, extra={"job_id": job_id, "event": "job.vanished"})
    return job


async def fail_current(rt: Runtime, job: Job, code: str, message: str, detail: Any = None, *,
                       created_nothing: bool = False) -> None:
    """Fail the job (or move it to its fallback), re-reading it once if it changed meanwhile (unless it
    finished). ``created_nothing``: the provider provably created nothing for this attempt."""
    try:
        await rt.jobs.fail(job, code, message, detail, created_nothing=created_nothing)
    except Conflict:
        fresh = await load_job(rt, job.id)
        if fresh is not None and fresh.status not in TERMINAL:
            await rt.jobs.fail(fresh, code, message, detail, created_nothing=created_nothing)


REDIS_OUTAGE_SECONDS = 60.0


async def through_redis_outage(call: Callable[[], Awaitable[T]], seconds: float = REDIS_OUTAGE_SECONDS) -> T:
    """``call()``, retried while Redis is unreachable (a restart, a failover) for up to ``seconds``.

    Only for writes that are safe to repeat (compare-and-set transitions, SET NX claims): a retry of
    one that did apply before the connection dropped meets a ``Conflict`` or finds its own claim.
    """
    deadline = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)
