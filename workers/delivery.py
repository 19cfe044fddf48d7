"""deliver_webhook: one signed delivery attempt; the next is scheduled on failure, the last dead-letters.

- Standard Webhooks headers; ``webhook-id`` is the delivery id on every attempt and replay.
  A job's or batch's own ``webhook_url`` is signed with the tenant's secret; a registered
  endpoint's deliveries with the endpoint's secret, plus each previous secret still in its
  grace period (``webhook-signature: v1,<new> v1,<old>``).
- Any 2xx ends the series. Anything else (other status, refused connection, refused
  destination, timeout: the whole attempt is bounded by ``ATELIER_WEBHOOK_TIMEOUT_SECONDS``)
  is a failure: the next attempt follows ``ATELIER_WEBHOOK_RETRY_SCHEDULE`` with ±20 % jitter,
  later if the receiver's ``Retry-After`` asks for it (up to the schedule's longest step).
  After the last step the delivery is ``dead`` (replayable through the API).
- Every attempt is recorded: time, status code, latency, error, the start of the response.
- An endpoint that has failed without a success for ``ATELIER_WEBHOOK_DISABLE_AFTER_SECONDS``
  is disabled with the reason; deliveries still pending for a disabled endpoint end ``dead``
  without being sent (``POST .../recover`` resends them once it is enabled again).
- Fairness (``orchestrator.store.webhook_gates``): a delivery holds a place at its destination
  (at most ``ATELIER_WEBHOOK_ENDPOINT_CONCURRENCY``; adapting to how the destination answers up to
  ``ATELIER_WEBHOOK_ENDPOINT_CONCURRENCY_MAX`` when that is set higher) and at its tenant (at most
  ``ATELIER_WEBHOOK_TENANT_CONCURRENCY``) from its admission to the queue until its attempt ends; a
  destination's circuit opens after ``ATELIER_WEBHOOK_CIRCUIT_FAILURES`` failures in a row (after the
  cool-down, one probe at a time). A delivery with no room waits in its destination's and its
  tenant's lines (a finished attempt hands its place to the destination's oldest, which the same run
  then attempts, for up to ``CHAIN_SECONDS``, without a queue round; else it wakes the tenant's
  oldest) or, while the circuit is open, in the parking lot; either way outside the queue and not
  counted as an attempt, so one tenant's dead endpoints hold at most its cap of workers and stand in
  front of nobody. A delivery whose destination has failed for longer than the disable period ends
  ``dead`` without another attempt.
- Each attempt is queued once: the arq id carries the attempt number and a run whose number is not
  the delivery's next attempt does nothing (a duplicate queued by the sweeper, or a late retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from orchestrator.domain.webhooks import Delivery, Endpoint, destination
from orchestrator.infra import metrics
from orchestrator.infra.destinations import DestinationRefused
from orchestrator.infra.logs import redact_url
from orchestrator.services.runtime import Runtime
from orchestrator.store.tenants import webhook_secret
from orchestrator.store.webhook_gates import Freed, Gate
from orchestrator.wire.jobs import utcnow
from orchestrator.wire.signing import sign
from orchestrator.wire.webhooks import Attempt
from providers.http import retry_after_seconds

log = logging.getLogger("atelier.worker")

EXCERPT_CHARS = 200


@dataclass
class Outcome:
    status_code: int | None = None
    error: str | None = None
    excerpt: str | None = None
    retry_after: float | None = None
    latency_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def describe(self) -> str:
        return self.error or f"HTTP {self.status_code}"


def retry_delay(schedule: list[float], n: int, retry_after: float | None) -> float:
    """Seconds before attempt ``n + 1`` of a series: the schedule's step with jitter, or the receiver's
    ``Retry-After`` when it asks for longer (bounded by the schedule's longest step)."""
    delay = schedule[n] * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(schedule)))
    return delay


async def post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
               timeout: float) -> Outcome:
    """One POST, bounded as a whole by ``timeout``; reads at most the start of the response."""
    out = Outcome()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), client.stream("POST", url, content=body, headers=headers) as response:
            out.status_code = response.status_code
            out.retry_after = retry_after_seconds(response.headers)
            data = b""
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) >= EXCERPT_CHARS * 4:
                    break
            out.excerpt = data.decode("utf-8", errors="replace")[:EXCERPT_CHARS]
    except TimeoutError:
        out.error = f"timed out after {timeout:g} s"
    except DestinationRefused as exc:
        out.error = f"destination refused: {exc}"[:EXCERPT_CHARS]
    except Exception as exc:  # noqa: BLE001 - any failure to deliver is a failed attempt, recorded
        out.error = f"{exc.__class__.__name__}: {exc}"[:EXCERPT_CHARS]
    out.latency_ms = round((time.perf_counter() - started) * 1000, 1)
    return out


DISPATCH_INTERVAL = 0.1
# How long one run goes on attempting the deliveries its attempts handed their places to (well inside
# the function's arq timeout, 60 s, with one more attempt of ATELIER_WEBHOOK_TIMEOUT_SECONDS).
CHAIN_SECONDS = 5.0


Handed = tuple[tuple[str, int], ...]  # deliveries (id, attempt) that a finished attempt handed its places to


async def deliver_webhook(ctx: dict[str, Any], delivery_id: str, attempt: int | None = None) -> None:
    """Attempt the delivery; then, for up to ``CHAIN_SECONDS``, the deliveries its finished attempts
    handed their places to (same destination, places already held: no queue round), one after the
    other; any more handed at once (the destination's limit grew) and, past that time, the next are
    queued."""
    rt: Runtime = ctx["rt"]
    started = time.monotonic()
    handed = await _deliver(ctx, rt, delivery_id, attempt)
    while handed:
        if time.monotonic() - started >= CHAIN_SECONDS:
            await _queue_handed(rt, handed)
            return
        await _queue_handed(rt, handed[1:])
        handed = await _deliver(ctx, rt, *handed[0])


class DirectDeliveries:
    """Admitted webhook deliveries this worker attempts at once, as tasks of its own, not via the queue.

    A delivery holds its places at its destination and tenant from its admission. Through the queue
    it held them while waiting for the webhook worker's next poll and arq's bookkeeping (14 Redis
    commands): bench/callback_latency.py at 100 deliveries/s to one receiver spent the destination's
    8 places mostly waiting (completed -> webhook p99 2-3 s while each POST took 4-22 ms). Here the
    attempt starts at once while fewer than ``limit`` run in this process, else the delivery is
    queued as before. One that fails unexpectedly is queued; one cut short by the worker stopping
    frees its places and stays pending, and the sweeper queues it again (as for a killed worker).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ctx: dict[str, Any] | None = None  # the worker's context, once it exists
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    def bind(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx

    def __call__(self, delivery_id: str, attempt: int) -> bool:
        """Start the attempt now; ``False`` when it must be queued instead."""
        if self.ctx is None or self.closing or len(self.tasks) >= self.limit:
            return False
        task = asyncio.get_running_loop().create_task(self._run(self.ctx, delivery_id, attempt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _run(self, ctx: dict[str, Any], delivery_id: str, attempt: int) -> None:
        rt: Runtime = ctx["rt"]
        try:
            await deliver_webhook(ctx, delivery_id, attempt)
        except Exception:  # noqa: BLE001 - as arq would retry it: queued (the sweeper, if that fails too)
            log.exception("a webhook delivery attempted in the worker failed; queued", extra={
                "event": "webhook.direct_failed", "delivery_id": delivery_id})
            with contextlib.suppress(Exception):
                await rt.queue.deliver(delivery_id, attempt, tag=":direct")

    async def drain(self, seconds: float) -> None:
        """Take no more; let running attempts end for up to ``seconds``, then cut them short."""
        self.closing = True
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _queue_handed(rt: Runtime, handed: Handed) -> None:
    """Queue deliveries handed places (they hold them); one whose arq id is still taken (the run in which
    it met a full destination has not finished yet) is parked a moment, and the dispatcher queues it
    then, as it does for parked deliveries. If this is lost, the sweeper queues them."""
    if not handed:
        return
    for (delivery_id, attempt), added in zip(handed, await rt.queue.deliver_many(list(handed)), strict=True):
        if not added:
            await rt.webhook_gates.park(delivery_id, attempt, int(time.time() * 1000) + 100)


async def _deliver(ctx: dict[str, Any], rt: Runtime, delivery_id: str, attempt: int | None) -> Handed:
    """One attempt (or nothing, when it is not due or not this run's); returns the waiting deliveries
    that its freed places went to, for the caller to attempt or queue."""
    delivery = await rt.store.get_delivery(delivery_id)
    if delivery is None:
        return ()
    if delivery.status != "pending":  # ended meanwhile: places handed to it while it waited go on
        return (await _free(rt, delivery, ok=None)).handed
    if attempt is not None and attempt != len(delivery.attempts):
        return ()  # not this delivery's next attempt: a duplicate entry, or one already made (its own run frees)
    endpoints = rt.endpoints
    endpoint = None
    if delivery.endpoint_id:
        endpoint = await endpoints.get(delivery.tenant, delivery.endpoint_id)
        if endpoint is None:  # deleted: its deliveries go with it
            await rt.store.drop_delivery(delivery)
            return (await _free(rt, delivery, ok=None)).handed
        if not endpoint.enabled:
            delivery.status = "dead"
            delivery.note = f"not sent: the endpoint is disabled ({endpoint.disabled_reason or 'by the API'})"
            await rt.store.save_delivery(delivery)
            return (await _free(rt, delivery, ok=None)).handed
        delivery.url = endpoint.url
        secrets = endpoint.signing_secrets()
    else:
        secrets = [await webhook_secret(rt.redis, delivery.tenant)]
    now_ms = int(time.time() * 1000)
    gate = await rt.webhook_gates.acquire(delivery, now_ms)
    if gate.verdict == "busy":
        return ()  # another worker is making this very attempt
    if gate.verdict != "go":
        await _hold_back(rt, delivery, gate, now_ms)
        return ()
    freed: Freed | None = None
    try:
        out = await _attempt(ctx, rt, delivery, secrets)
        freed = await _free(rt, delivery, ok=out.ok, latency_ms=out.latency_ms)
        if freed.open_until:
            log.info("webhook destination of %s failing: circuit open for %.1f s", redact_url(delivery.url),
                     (freed.open_until - time.time() * 1000) / 1000,
                     extra=await _log_extra(rt, delivery, "webhook.circuit_open"))
        await _record(rt, delivery, endpoint, out, freed.open_until)
    except BaseException:  # cut short (the worker stopping): the places are freed (else their leases end
        if freed is None:  # them), and whoever they went to is queued, not left to the sweeper
            freed = await _free(rt, delivery, ok=False)
        await _queue_handed(rt, freed.handed)
        raise
    return freed.handed


async def _free(rt: Runtime, delivery: Delivery, ok: bool | None, latency_ms: float = 0.0) -> Freed:
    """End the delivery's hold on its places (``ok``: the attempt's outcome, ``None``: none was made);
    ``Freed.handed`` are the waiting deliveries that hold them now, for the caller to attempt or queue."""
    return await rt.webhook_gates.outcome(delivery, int(time.time() * 1000), ok=ok, latency_ms=latency_ms)


async def _hold_back(rt: Runtime, delivery: Delivery, gate: Gate, now_ms: int) -> None:
    """Park a delivery its destination cannot take now, let it wait in its tenant's line, or end it if
    the destination has failed for longer than an endpoint may before it is disabled."""
    failing_ms = now_ms - gate.failing_since_ms if gate.failing_since_ms else 0
    if gate.verdict == "open" and failing_ms > rt.settings.webhook_disable_after_seconds * 1000:
        delivery.status = "dead"
        delivery.note = f"not sent: its destination has failed continuously for {failing_ms // 1000} s"
        await rt.store.save_delivery(delivery)
        metrics.webhook_attempt("dead", 0.0)
        return
    await rt.webhook_gates.hold_back(delivery, gate, now_ms)
    metrics.webhook_parked(gate.verdict)


async def dispatch_parked(rt: Runtime, stop: asyncio.Event) -> None:
    """Queue parked deliveries (and those a finished attempt woke from their tenant's line) again when
    they are due (runs beside the webhook worker). One still queued (the run that parked it has not
    finished) is parked a moment more."""
    while not stop.is_set():
        taken = 0
        try:
            now_ms = int(time.time() * 1000)
            due = await rt.webhook_gates.take_parked(now_ms)
            taken = len(due)
            for (delivery_id, attempt), added in zip(due, await rt.queue.deliver_many(due), strict=True):
                if not added:
                    await rt.webhook_gates.park(delivery_id, attempt, now_ms + 100)
        except Exception:  # noqa: BLE001 - Redis away: the loop goes on; the sweeper rescues what is lost
            log.exception("dispatching parked webhook deliveries failed", extra={"event": "webhook.dispatch_failed"})
            await asyncio.sleep(1.0)
        if taken < 1000:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DISPATCH_INTERVAL)


async def _attempt(ctx: dict[str, Any], rt: Runtime, delivery: Delivery, secrets: list[str]) -> Outcome:
    body = delivery.payload.encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Atelier-Webhooks/1",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, delivery.id, timestamp, body) for s in secrets),
    }
    return await post(ctx["webhook_http"], delivery.url, body, headers, rt.settings.webhook_timeout_seconds)


async def _record(rt: Runtime, delivery: Delivery, endpoint: Endpoint | None, out: Outcome,
                  open_until: int = 0) -> None:
    """Record an attempt; schedule the next one (``open_until``: the destination's circuit is open), or end
    the delivery."""
    endpoints = rt.endpoints
    delivery.attempts.append(Attempt(at=utcnow(), status_code=out.status_code, latency_ms=out.latency_ms,
                                     error=out.error, response_excerpt=out.excerpt))
    schedule = rt.settings.retry_schedule
    n = len(delivery.attempts) - delivery.series_start
    delay = 0.0
    if out.ok:
        delivery.status = "delivered"
        if endpoint is not None:
            await endpoints.record_success(endpoint.id)
    elif endpoint is not None and await endpoints.record_failure(
            endpoint, rt.settings.webhook_disable_after_seconds, out.describe()):
        delivery.status = "dead"
        delivery.note = "the endpoint was disabled after failing continuously"
        log.warning("webhook endpoint %s disabled: every delivery failed for %.0f s", endpoint.id,
                    rt.settings.webhook_disable_after_seconds,
                    extra=await _log_extra(rt, delivery, "webhook.endpoint_disabled"))
    elif n >= len(schedule):
        delivery.status = "dead"
        log.warning("webhook %s to %s dead after %d attempts", delivery.id, redact_url(delivery.url), n,
                    extra=await _log_extra(rt, delivery, "webhook.dead"))
    else:
        delay = retry_delay(schedule, n, out.retry_after)
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        log.info("webhook %s to %s failed (%s); retrying in %.1fs", delivery.id, redact_url(delivery.url),
                 out.describe(), delay, extra=await _log_extra(rt, delivery, "webhook.retry"))
    metrics.webhook_attempt("retry" if delivery.status == "pending" else delivery.status, out.latency_ms / 1000)
    if await rt.store.save_delivery(delivery) and delivery.status == "pending":
        if open_until:  # its destination is down: the retry waits outside the queue (woken if it recovers)
            until = max(int(delivery.next_attempt_at.timestamp() * 1000), open_until + random.randint(0, 1000))
            await rt.webhook_gates.park(delivery.id, len(delivery.attempts), until, destination(delivery))
        else:
            await rt.queue.deliver(delivery.id, len(delivery.attempts), delay)


async def _log_extra(rt: Runtime, delivery: Delivery, event: str) -> dict[str, str | None]:
    job = await rt.store.get(delivery.job_id) if delivery.job_id else None
    return {"job_id": delivery.job_id, "tenant": delivery.tenant, "provider": job.provider if job else None,
            "delivery_id": delivery.id, "event": event, "batch_id": delivery.batch_id}
