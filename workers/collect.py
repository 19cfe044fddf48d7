"""Collecting outputs: stream each provider output into storage, then mark the job succeeded.

Downloads follow redirects by hand so that provider credentials (e.g. Veo's
``x-goog-api-key``) go only to the host they were meant for, never to the
storage host a redirect points at. Memory stays bounded: bytes are spooled
with a size cap while their sha256 is computed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from orchestrator.domain.job import Job, Output
from orchestrator.infra.media import identify, is_not_media
from orchestrator.infra.storage import OutputTooLarge, spool
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from orchestrator.store.jobs import Conflict
from orchestrator.wire.jobs import JobKind, JobStatus
from providers.contract import CallContext, Provider, ProviderOutput
from workers.context import call_context, fail_current, load_job, log, log_extra, runtime_of

S = JobStatus
MAX_COLLECT_ATTEMPTS = 5
MAX_REDIRECTS = 5
FINISH_TRIES = 3
INLINE_COLLECT_SECONDS = 20.0  # an inline collection (images) longer than this goes on in the collect step
INLINE_IDENTIFY_BYTES = 1024 * 1024
DOWNLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


@contextlib.asynccontextmanager
async def open_download(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
    """GET ``url`` as a stream, following redirects; ``headers`` only reach ``url``'s own origin."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        request = http.build_request("GET", url, headers=headers if _origin(url) == origin else {},
                                     timeout=DOWNLOAD_TIMEOUT)
        response = await http.send(request, stream=True)
        if response.is_redirect and "location" in response.headers:
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=request)


class OutputUnavailable(Exception):
    def __init__(self, code: str, message: str, transient: bool) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient


async def collect_outputs(ctx: dict[str, Any], job_id: str) -> None:
    rt = runtime_of(ctx)
    job = await load_job(rt, job_id)
    if job is None or job.status != S.running or job.phase != "collecting":
        return
    provider = rt.registry.get(job.provider)
    if provider is None:
        await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured")
        return
    await collect(rt, provider, job)


def collect_inline(job: Job) -> bool:
    """Whether the step that saw the job's outputs stores them itself: images (small, quick), which then
    skip a queue round and an arq job; videos and audio take the collect step of their own."""
    return job.kind == JobKind.image


async def collect(rt: Runtime, provider: Provider, job: Job, *, inline: bool = False) -> None:
    """Store the outputs of a job in ``collecting`` and mark it succeeded; a transient failure retries
    later through the queue. ``inline``: run by the step that saw the outputs (a poll, or the submit
    step), bounded by ``INLINE_COLLECT_SECONDS``, past which the collect step takes over."""
    outputs: list[Output] = []
    n = max(job.collects, 1)
    try:
        call = call_context(rt, provider, job)
        async with _keep_active(rt, job.id, fresh=inline), asyncio.timeout(INLINE_COLLECT_SECONDS if inline else None):
            outputs = await store_outputs(rt, provider, call, job, job.provider_outputs)
    except TimeoutError:
        if not inline:
            raise
        await rt.queue.collect(job.id, n)  # slower than an image should be: the collect step goes on
        return
    except OutputUnavailable as exc:
        if exc.transient and n < MAX_COLLECT_ATTEMPTS:
            delay = 2.0 ** n
            try:
                job = await rt.jobs.change(job, collects=n + 1, note=str(exc),
                                           active_at=time.time() + delay + rt.settings.sweep_grace_seconds)
            except Conflict:
                return
            await rt.queue.collect(job.id, n + 1, delay)
        else:
            await fail_current(rt, job, exc.code, str(exc))
        return
    except keypool.KeyUnavailable as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail)
        return
    if not outputs:
        await fail_current(rt, job, "provider_no_output", "the provider reported success without outputs")
        return
    for _ in range(FINISH_TRIES):
        try:
            await rt.jobs.transition(job, S.succeeded, outputs=outputs, note=None)
            return
        except Conflict:
            # Changed meanwhile: canceled or timed out (it stays so), or a field written beside the
            # collection (a late callback's poll number): then it is still this collection's to finish.
            fresh = await load_job(rt, job.id)
            if fresh is None or fresh.status != S.running or fresh.phase != "collecting" \
                    or fresh.collects != job.collects:
                break
            job = fresh
    log.info("job changed during collection (canceled?); outputs kept in storage",
             extra=log_extra(job, "collect.superseded"))


async def store_outputs(rt: Runtime, provider: Provider, call: CallContext, job: Job,
                        refs: list[ProviderOutput]) -> list[Output]:
    """Stream each output into storage (size cap, sha256, type); raises ``OutputUnavailable``."""
    return [await _store_output(rt, provider, call, job, index, ref) for index, ref in enumerate(refs)]


@contextlib.asynccontextmanager
async def _keep_active(rt: Runtime, job_id: str, fresh: bool = False) -> AsyncIterator[None]:
    """While outputs download, keep pushing the sweeper's deadline for the job forward.

    A collection can take minutes (large videos), but one whose worker was killed must be
    re-scheduled soon: so the deadline is short (the sweep grace) and renewed while alive,
    instead of one long allowance that also delays the rescue of a dead worker's collection.
    """
    grace = rt.settings.sweep_grace_seconds
    interval = max(0.5, grace / 3)

    async def beat() -> None:
        if fresh:  # the step that began the collection has just set it
            await asyncio.sleep(interval)
        while True:
            with contextlib.suppress(Exception):  # a missed beat only risks a duplicate collection
                await rt.store.touch_active(job_id, time.time() + grace)
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _store_output(rt: Runtime, provider: Provider, call: CallContext, job: Job, index: int,
                        ref: ProviderOutput) -> Output:
    max_bytes = rt.settings.max_output_bytes
    declared = ref.content_type
    try:
        if ref.url.startswith("data:"):
            declared = declared or ref.url[5:].split(";", 1)[0].split(",", 1)[0]
            spooled = await spool(_data_url_chunks(ref.url), max_bytes)
        else:
            headers = provider.download_headers(call, ref.url)
            async with open_download(rt.http, ref.url, headers) as response:
                if response.status_code in (401, 403, 404, 410):
                    raise OutputUnavailable(
                        "output_expired",
                        f"output {index} is no longer available at the provider (HTTP {response.status_code})",
                        transient=False)
                if response.status_code >= 400:
                    raise OutputUnavailable("output_download_failed",
                                            f"output {index}: provider answered HTTP {response.status_code}",
                                            transient=True)
                declared = declared or response.headers.get("content-type")
                spooled = await spool(response.aiter_bytes(256 * 1024), max_bytes)
    except OutputTooLarge as exc:
        raise OutputUnavailable("output_too_large", f"output {index}: {exc}", transient=False) from exc
    except httpx.HTTPError as exc:
        raise OutputUnavailable("output_download_failed",
                                f"output {index}: download failed ({exc.__class__.__name__})",
                                transient=True) from exc
    with spooled.file:
        if spooled.size > INLINE_IDENTIFY_BYTES:  # it reads through the file: off the event loop
            media = await asyncio.to_thread(identify, spooled.file, declared)
        else:
            media = identify(spooled.file, declared)
        if is_not_media(media):
            raise OutputUnavailable("output_invalid", f"output {index}: the provider served a web page or an "
                                    f"error body ({media.content_type}) instead of the file", transient=False)
        key = f"{job.tenant}/{job.id}/{index}.{media.extension}"
        await rt.storage.put(key, spooled, media.content_type)
    return Output(index=index, key=key, content_type=media.content_type, bytes=spooled.size,
                  sha256=spooled.sha256, width=media.width, height=media.height,
                  duration_seconds=media.duration_seconds, metadata={**ref.metadata, **media.notes})


async def _data_url_chunks(url: str) -> AsyncIterator[bytes]:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise OutputUnavailable("output_invalid", "data: outputs must be base64", transient=False)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error
        raise OutputUnavailable("output_invalid", "a data: output is not valid base64", transient=False) from exc
    yield data
