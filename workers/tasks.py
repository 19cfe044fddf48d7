"""The worker's job functions. Each is short and holds no slot while a provider works.

submit_job       queued -> submitting -> submitted; the intent is recorded first, and an
                 ambiguous outcome is reconciled or failed, never blindly resubmitted.
poll             one status fetch (poll_group: many, where the provider allows); applies it and puts
                 the next poll on the key's poll board (orchestrator/polls.py, run by workers/polling.py).
collect_outputs  (workers/collect.py) streams every output into storage, then succeeded.
cancel_at_provider  tells the provider to stop a canceled job's task, where it can.
deliver_webhook  (workers/delivery.py) one signed delivery attempt; schedules the next on failure.
sweep            re-schedules jobs and deliveries whose pending work was lost.

All of them re-read the job and act only if it is still in the state they expect:
arq is at-least-once, and a callback, a sweeper and a poll may race.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator import keypool, metrics
from orchestrator.jobs import deadline_passed
from orchestrator.models import TERMINAL, Job, JobStatus, utcnow
from orchestrator.runtime import Runtime
from orchestrator.schedule import poll_delay, poll_rank, woken_rank
from orchestrator.store import Conflict
from providers.base import (
    AuthFailed,
    CallContext,
    InsufficientBalance,
    MalformedResponse,
    OutcomeUnknown,
    Provider,
    ProviderError,
    RateLimited,
    Rejected,
    TaskStatus,
    Unavailable,
)

log = logging.getLogger("atelier.worker")
S = JobStatus
T = TypeVar("T")

MAX_MALFORMED_POLLS = 3


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
    configured) picks another: nothing exists under the old key. Raises ``keypool.NoUsableKey`` when
    every key is out.
    """
    keys = provider.settings.api_keys
    key = keypool.resolve(keys, job.key_id) if job.key_id else None
    if keys and (not job.key_id or (job.status == S.queued and (key is None or job.key_id in (out_of_pool or {})))):
        key = keypool.pick(keys, job, out_of_pool)
    if key is None:
        metrics.key_missing(job.provider)
        if not job.key_id:
            raise LookupError(f"no API key configured for {job.provider}")
        raise LookupError(f"the {job.provider} key that submitted this job is no longer configured")
    callback_url = None
    if provider.supports_callbacks and rt.settings.callbacks_enabled:
        base = rt.settings.public_url.rstrip("/")
        callback_url = f"{base}/v1/callbacks/{job.provider}?job={job.id}&token={job.callback_token}"
    return CallContext(http=rt.http_for(job.provider), api_key=key, callback_url=callback_url)


async def load_job(rt: Runtime, job_id: str) -> Job | None:
    job = await rt.store.get(job_id)
    if job is None:
        log.warning("job %s vanished from the store", job_id, extra={"job_id": job_id, "event": "job.vanished"})
    return job


# -- submit ------------------------------------------------------------------------------

async def submit_job(ctx: dict[str, Any], job_id: str) -> None:
    rt = runtime_of(ctx)
    job = await load_job(rt, job_id)
    if job is None or job.status in TERMINAL:
        return
    provider = rt.registry.get(job.provider)
    if provider is None:
        await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured")
        return
    if job.status == S.submitting:
        retry = job.provider_data.get("reconcile_retry")
        if isinstance(retry, dict) and retry.get("attempt") == job.attempts:
            # This attempt's submission is over; looking its task up failed transiently (see
            # _reconcile_later): look again now.
            await _resolve_unknown(rt, provider, job, OutcomeUnknown(str(retry.get("reason") or "")))
            return
        # A previous attempt recorded its intent and no outcome. If it may still be talking to the
        # provider (a duplicate delivery of this arq job), look again once it must have finished.
        started = float(job.provider_data.get("submit_started") or 0)
        wait = started + provider.settings.timeout_seconds + 15 - time.time()
        if wait > 0:
            await rt.queue.submit(job.id, job.attempts, wait, tag=":check")
            return
        await _resolve_unknown(rt, provider, job, OutcomeUnknown("a worker stopped during the submission"))
        return
    if job.status != S.queued:
        return
    if deadline_passed(job):
        await rt.jobs.fail(job, "timed_out", "the job's deadline passed before it could be submitted",
                           status=S.timed_out)
        return
    try:
        call = call_context(rt, provider, job, await keypool.out_of_pool(
            rt.redis, job.provider, provider.settings.api_keys))
    except keypool.NoUsableKey as exc:
        metrics.key_missing(job.provider)
        await fail_current(rt, job, exc.code, str(exc), exc.detail)
        return
    except LookupError as exc:
        await rt.jobs.fail(job, "provider_not_configured", str(exc))
        return
    if job.key_id and job.key_id != keypool.key_id(call.api_key):
        await rt.free_slot(job)  # it held (or waited for) a slot on a key that left the pool
    if not await _within_limits(rt, job, keypool.key_id(call.api_key)):
        return
    attempt_started = time.time()
    try:
        job = await rt.jobs.transition(
            job, S.submitting, attempts=job.attempts + 1, key_id=keypool.key_id(call.api_key), phase=None,
            provider_data={**job.provider_data, "submit_started": attempt_started},
            active_at=attempt_started + provider.settings.timeout_seconds + rt.settings.sweep_grace_seconds,
        )
    except Conflict:
        return  # someone else is submitting it
    try:
        result = await provider.submit(call, job)
    except RateLimited as exc:
        if exc.retry_after and job.key_id:
            # The provider's limit binds the key, not only this job: hold back every request on it.
            await rt.throttle.pause(job.provider, job.key_id, exc.retry_after)
        await _requeue(rt, job, exc, exc.retry_after)
        return
    except (AuthFailed, InsufficientBalance) as exc:
        await _key_refused(rt, provider, job, keypool.key_id(call.api_key), exc)
        return
    except Unavailable as exc:
        await _requeue(rt, job, exc, None)
        return
    except OutcomeUnknown as exc:
        await _resolve_unknown(rt, provider, job, exc)
        return
    except MalformedResponse as exc:
        # The provider answered but we cannot read the task id: it may exist.
        await _resolve_unknown(rt, provider, job, exc)
        return
    except Rejected as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail)
        return
    except ProviderError as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail)
        return
    # The adapter may say no callback will come (e.g. through a gateway), whatever URL it was given.
    data = {"callback_expected": call.callback_url is not None, **result.data}
    await _submitted(rt, provider, job, result.task_id, result.request_id, result.status, data)


async def _take_key_out(rt: Runtime, provider: Provider, job: Job, kid: str,
                        exc: AuthFailed | InsufficientBalance) -> tuple[str, str]:
    """Take key ``kid`` out of the pool for every process; the first to see it raises the alert.
    Returns the reason and the provider's message (keys in it replaced by their fingerprints)."""
    balance = isinstance(exc, InsufficientBalance)
    reason = keypool.NO_BALANCE if balance else keypool.AUTH_FAILED
    message = keypool.redact(exc.message, provider.settings.api_keys)
    record = await keypool.take_out(rt.redis, job.provider, kid, reason=reason, code=exc.code, message=message,
                                    recheck_seconds=rt.settings.key_recheck_seconds if balance else None)
    if record is not None:
        metrics.key_taken_out(job.provider, reason)
        then = (f"tried again in {rt.settings.key_recheck_seconds:.0f}s" if balance
                else f"restore it with `atelier provider-keys restore {job.provider} {kid}` once fixed")
        log.error("%s key %s taken out of the pool (%s): %s; %s", job.provider, kid, reason, message, then,
                  extra={**log_extra(job, "key.out_of_pool"), "key_id": kid, "reason": reason})
    return reason, message


async def _key_refused(rt: Runtime, provider: Provider, job: Job, kid: str,
                       exc: AuthFailed | InsufficientBalance) -> None:
    """The provider refused key ``kid`` or it is out of balance: nothing was created. Take the key out
    of the pool (for every process) and resubmit on another key; with none left, fail the job clearly."""
    keys = provider.settings.api_keys
    reason, message = await _take_key_out(rt, provider, job, kid, exc)
    out = await keypool.out_of_pool(rt.redis, job.provider, keys, fresh=True)
    if all(keypool.key_id(k) in out for k in keys):
        # This job met the refusal: it keeps the provider's code; later ones fail with no_usable_key.
        metrics.key_missing(job.provider)
        err = keypool.NoUsableKey(job.provider, out)
        await fail_current(rt, job, exc.code, f"{message}; {err}", {**err.detail, "provider_error": exc.detail})
        return
    try:
        requeued = await rt.jobs.transition(
            job, S.queued, key_id=None, phase=None,
            note=f"the {job.provider} key {kid} was taken out of the pool ({reason}); resubmitting with another key",
            active_at=time.time() + rt.settings.sweep_grace_seconds)
    except Conflict:
        return  # canceled or timed out meanwhile (its slot was freed then)
    await rt.free_slot(job)  # the old key's slot (and wake whoever waits for it)
    await rt.queue.submit(requeued.id, requeued.attempts, tag=":rekey")


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


async def _submitted(rt: Runtime, provider: Provider, job: Job, task_id: str, request_id: str | None,
                     raw_status: str | None, data: dict[str, Any]) -> None:
    # The provider created the task and only this process knows its id: a Redis restart now must not
    # lose it (fault suite finding: a fal job, which cannot be reconciled, failed with
    # provider_outcome_unknown when Redis restarted between fal's answer and this record).
    if not await through_redis_outage(lambda: rt.store.claim_task(job.provider, task_id, job.id)):
        await fail_current(rt, job, "provider_task_conflict",
                            f"provider task {task_id} already belongs to another job")
        return
    current = job.model_copy(update={"provider_data": {**job.provider_data, **data}})
    delay = poll_delay(rt.settings, provider, current)
    for _ in range(5):
        try:
            if current.status != S.submitting:
                break
            job = await through_redis_outage(functools.partial(
                rt.jobs.transition,
                current, S.submitted, provider_task_id=task_id, provider_request_id=request_id,
                provider_status=raw_status, provider_data={**current.provider_data, **data},
                phase="waiting", poll_seq=current.poll_seq + 1,
                active_at=time.time() + delay + rt.settings.sweep_grace_seconds,
            ))
            await schedule_poll(rt, provider, job, delay)
            return
        except Conflict:
            fresh = await through_redis_outage(functools.partial(load_job, rt, job.id))
            if fresh is None:
                return
            current = fresh
    # The job left `submitting` while we talked to the provider (canceled, timed out): stop the task.
    if current.status in TERMINAL:
        current = await rt.jobs.change(current, provider_task_id=task_id, provider_request_id=request_id,
                                       key_id=job.key_id)
        await rt.queue.cancel_at_provider(current.id)


async def _within_limits(rt: Runtime, job: Job, key_id: str) -> bool:
    """Take a slot on the key and spend one request of its budget; else wait in ``queued``.

    Over the cap, the job joins the key's line and is woken when a task finishes
    (the sweeper also retries it). Over the request budget, it retries when the
    budget allows.
    """
    grace = rt.settings.sweep_grace_seconds
    if not await rt.throttle.acquire(job, key_id):
        cap = rt.throttle.cap(job.provider)
        note = (f"throttled: {await rt.throttle.inflight(job.provider, key_id)} tasks in flight on this "
                f"{job.provider} key (cap {cap}); waiting for a free slot")
        with contextlib.suppress(Conflict):
            await rt.jobs.change(job, phase="throttled", key_id=key_id, note=note, active_at=time.time() + grace)
        return False
    wait, place = await rt.throttle.turn(job, key_id)
    if wait > 0:
        at = time.time() + wait
        if job.phase == "throttled" and (job.note or "").startswith(BUDGET_NOTE):
            await rt.store.touch_active(job.id, at + grace)  # still in line: no new event per retry
        else:
            note = (f"{BUDGET_NOTE} of this {job.provider} key ({place} jobs ahead when it joined the line, "
                    f"first try in {wait:.1f}s)")
            try:
                job = await rt.jobs.change(job, phase="throttled", key_id=key_id, note=note, active_at=at + grace)
            except Conflict:
                return False
        await rt.queue.submit(job.id, job.attempts, wait, tag=f":budget{int(at * 1000)}")
        return False
    return True


BUDGET_NOTE = "throttled: waiting for the request budget"


async def _requeue(rt: Runtime, job: Job, exc: ProviderError, retry_after: float | None) -> None:
    """Nothing was created: back to queued, retried after a pause (throttled, not failed).

    A provider's rate or concurrency limit is waiting, not failing: only the job's
    deadline bounds it. Other errors (unavailable) give up after a number of attempts.
    """
    if not isinstance(exc, RateLimited) and job.attempts >= rt.settings.submit_max_attempts:
        await fail_current(rt, job, exc.code, f"{exc.message} (gave up after {job.attempts} attempts)",
                            exc.detail)
        return
    backoff = min(300.0, 2.0 ** job.attempts) * random.uniform(0.8, 1.2)
    delay = max(retry_after or 0.0, backoff if retry_after is None else 0.0, 0.1)
    try:
        job = await rt.jobs.transition(job, S.queued, phase="throttled", note=exc.message,
                                       active_at=time.time() + delay + rt.settings.sweep_grace_seconds)
    except Conflict:
        return
    await rt.queue.submit(job.id, job.attempts, delay)


# A lookup that failed like this proves nothing either way (the provider is throttling or failing).
TRANSIENT_LOOKUP_ERRORS = (RateLimited, Unavailable, OutcomeUnknown, MalformedResponse)
RECONCILE_TRIES = 6


async def _reconcile_later(rt: Runtime, job: Job, exc: ProviderError, rec_exc: ProviderError) -> bool:
    """Looking the task up failed transiently: keep the job in ``submitting`` and look again after a
    backoff (a few times), instead of failing a job whose task the provider may have created and bills.

    Fault suite finding: during a provider storm the lookup meets the same 429s and 5xx as the
    ambiguous submission did, and every such job failed with ``provider_outcome_unknown``.
    ``False`` when the tries are used up (the caller then decides as if nothing was found).
    """
    retry = job.provider_data.get("reconcile_retry")
    same_attempt = isinstance(retry, dict) and retry.get("attempt") == job.attempts
    tries = int(retry.get("tries", 0)) + 1 if same_attempt and isinstance(retry, dict) else 1
    if tries > RECONCILE_TRIES:
        return False
    delay = max(getattr(rec_exc, "retry_after", None) or 0.0, min(60.0, 2.0 ** tries) * random.uniform(0.8, 1.2))
    data = {**job.provider_data, "reconcile_retry": {"attempt": job.attempts, "tries": tries, "reason": exc.message}}
    try:
        job = await rt.jobs.change(job, provider_data=data, note=f"looking for the submitted task again in "
                                   f"{delay:.0f}s ({rec_exc.message})",
                                   active_at=time.time() + delay + rt.settings.sweep_grace_seconds)
    except Conflict:
        return True  # the job moved on meanwhile (canceled, timed out)
    await rt.queue.submit(job.id, job.attempts, delay, tag=f":reconcile{tries}")
    return True


async def _resolve_unknown(rt: Runtime, provider: Provider, job: Job, exc: ProviderError) -> None:
    """The provider may have accepted the submission: find the task, or never pay twice."""
    since = float(job.provider_data.get("submit_started") or job.created_at.timestamp())
    try:
        found = await provider.reconcile(call_context(rt, provider, job), job, since)
    except (ProviderError, LookupError) as rec_exc:
        log.warning("reconcile failed: %s", rec_exc, extra=log_extra(job, "submit.reconcile_failed"))
        if isinstance(rec_exc, TRANSIENT_LOOKUP_ERRORS) and await _reconcile_later(rt, job, exc, rec_exc):
            return
        found = None
    # The task may already be bound to this very job (a worker killed between claiming the task and
    # recording `submitted`): that is the task to follow, not another job's (fault suite finding).
    owner = await rt.store.job_for_task(job.provider, found.task_id) if found is not None else None
    if found is not None and owner in (None, job.id):
        log.info("reconciled an ambiguous submission to task %s", found.task_id,
                 extra=log_extra(job, "submit.reconciled"))
        await _submitted(rt, provider, job, found.task_id, found.request_id, found.status, found.data)
        return
    if job.retry_unknown_submissions:
        await _requeue(rt, job, exc, None)
        return
    await fail_current(
        rt, job, exc.code if isinstance(exc, MalformedResponse) else "provider_outcome_unknown",
        f"{exc.message}. The provider may have created (and may bill) a task that Atelier cannot find, "
        "so it was not resubmitted; set retry_unknown_submissions to allow a retry.",
        exc.detail,
    )


async def fail_current(rt: Runtime, job: Job, code: str, message: str, detail: Any = None) -> None:
    try:
        await rt.jobs.fail(job, code, message, detail)
    except Conflict:
        fresh = await load_job(rt, job.id)
        if fresh is not None and fresh.status not in TERMINAL:
            await rt.jobs.fail(fresh, code, message, detail)


# -- poll --------------------------------------------------------------------------------

async def poll_job(ctx: dict[str, Any], job_id: str, seq: int) -> None:
    """An arq poll (queued by an earlier version, or by hand): polls now go through the poll board
    (``workers/polling.py``), which spends the budget before handing a poll out; this one spends it."""
    await poll(runtime_of(ctx), job_id, seq, budget_spent=False)


async def _pollable(rt: Runtime, job: Job | None, seq: int) -> tuple[Job, Provider] | None:
    """The job and its provider when poll ``seq`` is still wanted (else ``None``, handled)."""
    if job is None or job.status not in (S.submitted, S.running) or job.poll_seq != seq:
        return None  # finished, or a newer poll superseded this one
    if job.phase == "collecting":
        return None
    provider = rt.registry.get(job.provider)
    if provider is None:
        await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured")
        return None
    if deadline_passed(job):
        await _time_out(rt, job)
        return None
    return job, provider


async def poll(rt: Runtime, job_id: str, seq: int, *, budget_spent: bool = True) -> None:
    """One status fetch for poll ``seq`` of the job; applies it and schedules the next poll."""
    found = await _pollable(rt, await load_job(rt, job_id), seq)
    if found is None:
        return
    job, provider = found
    if not budget_spent and job.key_id:
        budget_wait = await rt.throttle.wait_ms(job.provider, job.key_id) / 1000
        if budget_wait > 0:
            await _next_poll(rt, provider, job, budget_wait)
            return
    try:
        status = await provider.fetch(call_context(rt, provider, job), job)
    except (ProviderError, LookupError) as exc:
        await _poll_failed(rt, provider, job, exc)
        return
    await apply_status(rt, provider, job, status)


async def poll_group(rt: Runtime, polls: list[tuple[str, int]]) -> None:
    """Read many jobs of one provider key with one request (``Provider.fetch_many``).

    A job missing from the answer is polled on its own (that read spends the budget itself), so
    an unknown task still gets its own error.
    """
    jobs = await rt.store.get_many([job_id for job_id, _ in polls])
    live: list[Job] = []
    provider: Provider | None = None
    for job, (_, seq) in zip(jobs, polls, strict=True):
        found = await _pollable(rt, job, seq)
        if found is not None:
            live.append(found[0])
            provider = found[1]
    if not live or provider is None:
        return
    try:
        statuses = await provider.fetch_many(call_context(rt, provider, live[0]), live)
    except (RateLimited, Unavailable, OutcomeUnknown, MalformedResponse) as exc:
        for job in live:
            await _poll_failed(rt, provider, job, exc)
        return
    except (ProviderError, LookupError):
        statuses = {}  # e.g. one bad id spoils the request: read each on its own for its own error
    for job in live:
        status = statuses.get(job.provider_task_id or "")
        if status is None:
            await poll(rt, job.id, job.poll_seq, budget_spent=False)
        else:
            await apply_status(rt, provider, job, status)


async def _poll_failed(rt: Runtime, provider: Provider, job: Job, exc: ProviderError | LookupError) -> None:
    if isinstance(exc, RateLimited):
        # The provider's limit binds the key, not only this job: pause the key's whole budget.
        pause = exc.retry_after or poll_delay(rt.settings, provider, job) * 2
        if job.key_id:
            await rt.throttle.pause(job.provider, job.key_id, pause)
        await _next_poll(rt, provider, job, pause, note=exc.message)
    elif isinstance(exc, (Unavailable, OutcomeUnknown)):
        await _next_poll(rt, provider, job, None, note=exc.message)
    elif isinstance(exc, MalformedResponse):
        if job.poll_errors + 1 >= MAX_MALFORMED_POLLS:
            await fail_current(rt, job, exc.code, f"{exc.message} ({job.poll_errors + 1} times in a row)",
                               exc.detail)
        else:
            await _next_poll(rt, provider, job, None, note=exc.message, poll_errors=job.poll_errors + 1)
    else:
        if isinstance(exc, (AuthFailed, InsufficientBalance)) and job.key_id:
            # Only this key can follow the task, so the job fails; new jobs must not use the key either.
            await _take_key_out(rt, provider, job, job.key_id, exc)
        code = getattr(exc, "code", "provider_error")
        await fail_current(rt, job, code, getattr(exc, "message", str(exc)), getattr(exc, "detail", None))


async def apply_status(rt: Runtime, provider: Provider, job: Job, status: TaskStatus) -> None:
    """Apply a fetched provider status to the job (also used after callbacks)."""
    common: dict[str, Any] = {"provider_status": status.raw_status, "polls": job.polls + 1, "poll_errors": 0}
    if status.progress is not None:
        common["progress"] = status.progress
    if status.request_id:
        common["provider_request_id"] = status.request_id
    position = status.data.get("queue_position")
    if status.state == "queued" and position is not None:
        common["note"] = f"queue position {position} at {job.provider}"
    elif job.note and job.note.startswith(("queue position", "throttled")):
        common["note"] = None
    try:
        if status.state in ("queued", "unknown"):
            if status.state == "unknown":
                log.warning("unknown provider status %r; still waiting", status.raw_status,
                            extra=log_extra(job, "status.unknown"))
            await _next_poll(rt, provider, job, status.poll_after, **common)
        elif status.state == "running":
            if job.status == S.submitted:
                job = await rt.jobs.transition(job, S.running, **common)
                common = {}
            await _next_poll(rt, provider, job, status.poll_after, **common)
        elif status.state == "succeeded":
            if job.status == S.submitted:
                job = await rt.jobs.transition(job, S.running, **common)
                common = {}
            n = job.provider_data.get("collects", 0) + 1
            job = await rt.jobs.change(
                job, phase="collecting", provider_outputs=status.outputs,
                provider_data={**job.provider_data, "collects": n},
                # collect_outputs keeps this deadline fresh while it runs (workers/collect.py), so a
                # collection lost with its worker is re-scheduled after the grace, not minutes later.
                active_at=time.time() + rt.settings.sweep_grace_seconds, **common)
            await rt.queue.collect(job.id, n)
        elif status.state == "failed":
            await rt.jobs.fail(job, status.error_code or "provider_failed",
                               status.error_message or "the provider reported the task failed",
                               status.error_detail, **common)
        elif status.state == "canceled":
            await rt.jobs.fail(job, status.error_code or "provider_canceled",
                               status.error_message or "the provider canceled the task",
                               status.error_detail, status=S.canceled, **common)
    except Conflict:
        log.info("job changed while applying a status; the newer state stands",
                 extra=log_extra(job, "status.superseded"))


async def _next_poll(rt: Runtime, provider: Provider, job: Job, hint: float | None, **changes: Any) -> None:
    delay = poll_delay(rt.settings, provider, job, hint)
    seq = job.poll_seq + 1
    try:
        job = await rt.jobs.change(job, poll_seq=seq, active_at=time.time() + delay + rt.settings.sweep_grace_seconds,
                                   **changes)
    except Conflict:
        return
    await schedule_poll(rt, provider, job, delay)


async def retry_polls(rt: Runtime, polls: list[tuple[str, int]], delay: float) -> None:
    """Put polls that crashed back on their boards (through a Redis outage, if that was the cause)."""
    for job, (_, seq) in zip(await through_redis_outage(lambda: rt.store.get_many([i for i, _ in polls])),
                             polls, strict=True):
        if job is not None and job.poll_seq == seq and job.status not in TERMINAL:
            await through_redis_outage(functools.partial(
                rt.polls.put, job.provider, job.key_id, job.id, seq, time.time() + delay, woken_rank(time.time())))


async def schedule_poll(rt: Runtime, provider: Provider, job: Job, delay: float) -> None:
    """Put the job's current poll (``job.poll_seq``) on its key's poll board, ``delay`` seconds out."""
    await rt.polls.put(job.provider, job.key_id, job.id, job.poll_seq, time.time() + delay, poll_rank(provider, job))


async def _time_out(rt: Runtime, job: Job) -> None:
    try:
        job = await rt.jobs.fail(job, "timed_out", "the job passed its deadline at the provider",
                                 status=S.timed_out)
    except Conflict:
        return
    await rt.queue.cancel_at_provider(job.id)


# -- cancel ------------------------------------------------------------------------------

async def cancel_at_provider(ctx: dict[str, Any], job_id: str) -> None:
    rt = runtime_of(ctx)
    job = await load_job(rt, job_id)
    if job is None or not job.provider_task_id:
        return
    provider = rt.registry.get(job.provider)
    if provider is None:
        return
    try:
        told = await provider.cancel(call_context(rt, provider, job), job)
        note = ("the provider was told to stop the task" if told
                else f"{job.provider} has no cancel endpoint: the task may still run (and bill) there")
    except (ProviderError, LookupError) as exc:
        note = f"telling the provider to stop failed: {exc}"
    for _ in range(3):
        try:
            await rt.jobs.change(job, note=note)
            return
        except Conflict:
            fresh = await load_job(rt, job_id)
            if fresh is None:
                return
            job = fresh


# -- sweep -------------------------------------------------------------------------------

async def sweep(ctx: dict[str, Any]) -> dict[str, int]:
    """Re-schedule work that was lost (worker killed, queue entry gone). Safe to run anywhere, often."""
    rt = runtime_of(ctx)
    now = time.time()
    grace = rt.settings.sweep_grace_seconds
    rescued = 0
    for job_id in await rt.store.overdue(now):
        job = await rt.store.get(job_id)
        if job is None or job.status in TERMINAL:
            await rt.redis.zrem(rt.store.ACTIVE, job_id)
            continue
        await rt.store.touch_active(job_id, now + grace)
        if job.status in (S.queued, S.submitting):
            # A fresh arq id: `submit:{job}:{attempt}` may still be reserved by a killed worker's
            # lease (arq holds it for the function timeout + 10 s, 130 s). Duplicates are harmless:
            # submit_job re-reads the job and moves it only by compare-and-set.
            await rt.queue.submit(job.id, job.attempts, tag=f":swept{int(now)}")
        elif job.phase == "collecting":
            n = int(job.provider_data.get("collects", 1))
            try:
                job = await rt.jobs.change(job, provider_data={**job.provider_data, "collects": n + 1})
            except Conflict:
                continue
            await rt.queue.collect(job.id, n + 1)
        else:
            provider = rt.registry.get(job.provider)
            try:
                job = await rt.jobs.change(job, poll_seq=job.poll_seq + 1)
            except Conflict:
                continue
            if provider is None:
                await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured")
                continue
            await schedule_poll(rt, provider, job, 0)
        rescued += 1
    redelivered = 0
    for delivery_id in await rt.store.overdue_deliveries(now - grace):
        delivery = await rt.store.get_delivery(delivery_id)
        if delivery is None or delivery.status != "pending":
            await rt.redis.zrem(rt.store.DELIVERIES_DUE, delivery_id)
            continue
        # A fresh arq id: the lost entry's id may still be reserved by a dead worker's lease.
        await rt.queue.deliver(delivery.id, len(delivery.attempts) * 1000 + int(now) % 1000)
        delivery.next_attempt_at = utcnow()
        await rt.store.save_delivery(delivery)
        redelivered += 1
    redelivered += await rt.batches.sweep(now - grace)
    rescued += await _repair_slots(rt)
    metrics.swept(rescued, redelivered)
    if rescued or redelivered:
        log.info("sweep re-scheduled %d jobs and %d webhook deliveries", rescued, redelivered,
                 extra={"event": "sweep.rescued"})
    return {"jobs": rescued, "deliveries": redelivered}


async def _repair_slots(rt: Runtime) -> int:
    """Free provider slots (and places in line) still held by finished jobs, e.g. after a crash
    between a job's last transition and the release of its slot."""
    freed = 0
    for pattern in ("atl:inflight:*", "atl:waiting:*", "atl:budgetline:*"):
        async for raw_key in rt.redis.scan_iter(match=pattern, count=100):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            _, kind, provider, key_id = key.split(":", 3)
            members = (await rt.redis.smembers(key) if kind == "inflight"  # type: ignore[misc]
                       else await rt.redis.zrange(key, 0, 999))
            ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
            for job_id, job in zip(ids, await rt.store.get_many(ids), strict=True):
                if kind == "budgetline":
                    if job is None or job.status != S.queued:
                        await rt.throttle.leave_line(provider, key_id, job_id)
                        freed += 1
                    continue
                if job is None:
                    await rt.throttle.release(provider, key_id, job_id)
                    freed += 1
                elif job.status in TERMINAL:
                    await rt.free_slot(job)
                    freed += 1
    return freed

