"""The submit step: ``queued -> submitting -> submitted``.

The intent is recorded first (``submitting``, with the attempt's start time); an ambiguous outcome
is reconciled or failed, never blindly resubmitted. What each provider error means for the job is
``workers.actions.ON_SUBMIT``; why the step runs again is ``workers.path.Reentry``.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from typing import Any

from orchestrator.domain.deadlines import deadline_passed
from orchestrator.domain.job import Job, ReconcileRetry
from orchestrator.domain.schedule import poll_delay
from orchestrator.infra import metrics
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from orchestrator.store.jobs import Conflict
from orchestrator.wire import limits
from orchestrator.wire.jobs import TERMINAL, JobStatus
from providers.contract import Provider, SubmitResult
from providers.errors import (
    AmbiguousMatch,
    AuthFailed,
    InsufficientBalance,
    MalformedResponse,
    OutcomeUnknown,
    ProviderError,
    RateLimited,
)
from workers.actions import ON_SUBMIT, TRANSIENT_LOOKUP, Action, action_for
from workers.context import (
    SourceUnavailable,
    call_context,
    fail_current,
    load_job,
    log,
    log_extra,
    requested,
    runtime_of,
    through_redis_outage,
)
from workers.keys import take_key_out
from workers.path import Reentry, SubmitEntry, interrupted_wait, submit_again, submit_entry
from workers.poll import apply_now, apply_status, inline_outputs, schedule_poll, unreadable

S = JobStatus
BUDGET_NOTE = "throttled: waiting for the request budget"
RECONCILE_TRIES = 6
MAX_TASK_ID = 256


async def submit_job(ctx: dict[str, Any], job_id: str) -> None:
    rt = runtime_of(ctx)
    job = await load_job(rt, job_id)
    if job is None or job.status in TERMINAL:
        return
    provider = rt.registry.get(job.provider)
    if provider is None:
        await rt.jobs.fail(job, "provider_not_configured", f"provider {job.provider} is not configured",
                           created_nothing=job.status == S.queued)
        return
    match submit_entry(job):
        case SubmitEntry.SUBMIT:
            await _submit(rt, provider, job)
        case SubmitEntry.RECONCILE_DUE:
            # This attempt's submission is over; looking its task up failed transiently: look again now.
            reason = job.reconcile.reason if job.reconcile else ""
            await _resolve_unknown(rt, provider, job, OutcomeUnknown(reason))
        case SubmitEntry.INTERRUPTED:
            wait = interrupted_wait(job, provider.settings.request_timeout(job.model))
            if wait > 0:
                await submit_again(rt, job, Reentry.CHECK, wait)
            else:
                await _resolve_unknown(rt, provider, job, OutcomeUnknown("a worker stopped during the submission"))
        case SubmitEntry.NOTHING:
            return


async def _submit(rt: Runtime, provider: Provider, job: Job) -> None:
    if deadline_passed(job):
        await rt.jobs.fail(job, "timed_out", "the job's deadline passed before it could be submitted",
                           status=S.timed_out)
        return
    if job.batch_id and await rt.batches.batch_store.canceled(job.batch_id):
        with contextlib.suppress(Conflict):  # its batch was canceled: a worker is canceling its jobs
            await rt.jobs.cancel(job)
        return
    try:
        request, source = await requested(rt, job)
    except SourceUnavailable as exc:
        await fail_current(rt, job, exc.code, str(exc))
        return
    op = provider.operation(job.operation, job.model)
    if source is not None and op is not None and op.source == "task" and not job.key_id:
        # A follow-up of the provider's own task: only the key that created the task can act on it.
        job = job.model_copy(update={"key_id": source.key_id})
    try:
        call = call_context(rt, provider, job, await keypool.out_of_pool(
            rt.redis, job.provider, provider.settings.api_keys))
    except keypool.NoUsableKey as exc:
        metrics.key_missing(job.provider)
        await fail_current(rt, job, exc.code, exc.message, exc.detail, created_nothing=True)
        return
    except keypool.KeyUnavailable as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail, created_nothing=True)
        return
    kid = keypool.key_id(call.api_key)
    if job.key_id and job.key_id != kid:
        await rt.slots.free(job)  # it held (or waited for) a slot on a key that left the pool
    if not await _within_limits(rt, job, kid):
        return
    started = time.time()
    try:
        job = await through_redis_outage(functools.partial(
            rt.jobs.transition,
            job, S.submitting, attempts=job.attempts + 1, key_id=kid, phase=None, submit_started_at=started,
            active_at=started + provider.settings.request_timeout(job.model) + rt.settings.sweep_grace_seconds,
        ))
    except Conflict:
        # Someone else is submitting it, or this very write landed and Redis went away before its
        # answer (the retry then meets its own write): only this run's own intent lets it call the
        # provider. Fault suite finding: the run failed, a later one found the job `submitting` with
        # no outcome, looked for a task never created and failed it provider_outcome_unknown.
        mine = await through_redis_outage(functools.partial(load_job, rt, job.id))
        if mine is None or not (mine.status == S.submitting and mine.submit_started_at == started
                                and mine.attempts == job.attempts + 1):
            return
        job = mine
    try:
        result = await provider.submit(call, request)
        bad_id = (not result.task_id or len(result.task_id) > MAX_TASK_ID or limits.problem(result.task_id)
                  is not None)
        if bad_id:
            raise MalformedResponse("the provider's task id is not usable (empty, too long or not valid text)")
    except ProviderError as exc:
        await _submit_failed(rt, provider, job, kid, exc)
        return
    except Exception as exc:  # noqa: BLE001 - the adapter could not read the answer: the task may exist
        await _submit_failed(rt, provider, job, kid, unreadable(exc))
        return
    expected = result.callback_expected if result.callback_expected is not None else call.callback_url is not None
    await _submitted(rt, provider, job, result, callback_expected=expected)


async def _submit_failed(rt: Runtime, provider: Provider, job: Job, kid: str, exc: ProviderError) -> None:
    match action_for(ON_SUBMIT, exc):
        case Action.WAIT:
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            if retry_after and job.key_id:
                # The provider's limit binds the key, not only this job: hold back every request on it.
                await rt.throttle.pause(job.provider, job.key_id, retry_after)
            await _requeue(rt, job, exc, retry_after)
        case Action.REKEY if isinstance(exc, AuthFailed | InsufficientBalance):
            await _key_refused(rt, provider, job, kid, exc)
        case Action.RETRY:
            await _requeue(rt, job, exc, None)
        case Action.RECONCILE:
            await _resolve_unknown(rt, provider, job, exc)
        case _:  # a definite refusal of the create call: nothing was created
            await fail_current(rt, job, exc.code, exc.message, exc.detail, created_nothing=True)


async def _key_refused(rt: Runtime, provider: Provider, job: Job, kid: str,
                       exc: AuthFailed | InsufficientBalance) -> None:
    """The provider refused key ``kid`` or it is out of balance: nothing was created. Take the key out
    of the pool (for every process) and resubmit on another key; with none left, fail the job clearly."""
    keys = provider.settings.api_keys
    reason, message = await take_key_out(rt, provider, job, kid, exc)
    out = await keypool.out_of_pool(rt.redis, job.provider, keys, fresh=True)
    if all(keypool.key_id(k) in out for k in keys):
        # This job met the refusal: it keeps the provider's code; later ones fail with no_usable_key.
        metrics.key_missing(job.provider)
        err = keypool.NoUsableKey(job.provider, out)
        await fail_current(rt, job, exc.code, f"{message}; {err}", {**err.detail, "provider_error": exc.detail},
                           created_nothing=True)
        return
    try:
        requeued = await rt.jobs.transition(
            job, S.queued, key_id=None, phase=None,
            note=f"the {job.provider} key {kid} was taken out of the pool ({reason}); resubmitting with another key",
            active_at=time.time() + rt.settings.sweep_grace_seconds)
    except Conflict:
        return  # canceled or timed out meanwhile (its slot was freed then)
    await rt.slots.free(job)  # the old key's slot (and wake whoever waits for it)
    await submit_again(rt, requeued, Reentry.REKEY)


async def _submitted(rt: Runtime, provider: Provider, job: Job, result: SubmitResult, *,
                     callback_expected: bool) -> None:
    """The provider created task ``result.task_id`` for the job: record it and schedule the first poll."""
    # The provider created the task and only this process knows its id: a Redis restart now must not
    # lose it (fault suite finding: a fal job, which cannot be reconciled, failed with
    # provider_outcome_unknown when Redis restarted between fal's answer and this record).
    if not await through_redis_outage(lambda: rt.store.claim_task(job.provider, result.task_id, job.id)):
        await fail_current(rt, job, "provider_task_conflict",
                           f"provider task {result.task_id} already belongs to another job")
        return
    state = result.state.model_dump(exclude_none=True) if result.state is not None else {}
    current = job.model_copy(update={"callback_expected": callback_expected})
    delay = poll_delay(rt.settings, provider, current)
    done = result.done
    for _ in range(5):
        try:
            if current.status != S.submitting:
                break
            submission: dict[str, Any] = {
                "provider_task_id": result.task_id, "provider_request_id": result.request_id,
                "provider_status": result.status, "provider_state": state, "callback_expected": callback_expected,
                "phase": "waiting", "poll_seq": current.poll_seq + 1}
            if done is not None and done.state in ("running", "succeeded") and not inline_outputs(done):
                # The create call answered with the task running or done (linked outputs): the
                # submission and that status are one write, not two.
                await apply_status(rt, provider, current, done, submission=submission)
                return
            job = await through_redis_outage(functools.partial(
                rt.jobs.transition, current, S.submitted,
                active_at=time.time() + delay + rt.settings.sweep_grace_seconds, **submission))
            if done is not None:
                await apply_now(rt, provider, job, done)  # the create call answered with the result
            else:
                await schedule_poll(rt, provider, job, delay)
            return
        except Conflict:
            fresh = await through_redis_outage(functools.partial(load_job, rt, job.id))
            if fresh is None:
                return
            current = fresh
    # The job left `submitting` while we talked to the provider (canceled, timed out): stop the task.
    if current.status in TERMINAL:
        current = await rt.jobs.change(current, provider_task_id=result.task_id,
                                       provider_request_id=result.request_id, provider_state=state,
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
        await submit_again(rt, job, Reentry.BUDGET, wait, nonce=int(at * 1000))
        return False
    return True


async def _requeue(rt: Runtime, job: Job, exc: ProviderError, retry_after: float | None) -> None:
    """Nothing was created: back to queued, retried after a pause (throttled, not failed).

    A provider's rate or concurrency limit is waiting, not failing: only the job's
    deadline bounds it. Other errors (unavailable) give up after a number of attempts.
    """
    # Only refusals count toward giving up, not the waits a rate limit asked for (fault suite finding:
    # a Doubao job that met seven 429s gave up at its first 503), nor those at an earlier fallback.
    outage = not isinstance(exc, RateLimited)
    refusals = job.refusals + 1 if outage else job.refusals
    if outage and refusals >= rt.settings.submit_max_attempts:
        await fail_current(rt, job, exc.code, f"{exc.message} (gave up after {refusals} attempts)",
                           exc.detail, created_nothing=True)
        return
    backoff = min(300.0, 2.0 ** refusals) * random.uniform(0.8, 1.2)
    delay = max(retry_after or 0.0, backoff if retry_after is None else 0.0, 0.1)
    try:
        job = await rt.jobs.transition(job, S.queued, phase="throttled", note=exc.message, refusals=refusals,
                                       active_at=time.time() + delay + rt.settings.sweep_grace_seconds)
    except Conflict:
        return
    await submit_again(rt, job, Reentry.RETRY, delay)


async def _reconcile_later(rt: Runtime, job: Job, exc: ProviderError, rec_exc: ProviderError) -> bool:
    """Looking the task up failed transiently: keep the job in ``submitting`` and look again after a
    backoff (a few times), instead of failing a job whose task the provider may have created and bills.

    Fault suite finding: during a provider storm the lookup meets the same 429s and 5xx as the
    ambiguous submission did, and every such job failed with ``provider_outcome_unknown``.
    ``False`` when the tries are used up (the caller then decides as if nothing was found).
    """
    pending = job.reconcile
    tries = pending.tries + 1 if pending is not None and pending.attempt == job.attempts else 1
    if tries > RECONCILE_TRIES:
        return False
    delay = max(getattr(rec_exc, "retry_after", None) or 0.0, min(60.0, 2.0 ** tries) * random.uniform(0.8, 1.2))
    try:
        job = await rt.jobs.change(job, reconcile=ReconcileRetry(attempt=job.attempts, tries=tries, reason=exc.message),
                                   note=f"looking for the submitted task again in {delay:.0f}s ({rec_exc.message})",
                                   active_at=time.time() + delay + rt.settings.sweep_grace_seconds)
    except Conflict:
        return True  # the job moved on meanwhile (canceled, timed out)
    await submit_again(rt, job, Reentry.RECONCILE, delay, nonce=tries)
    return True


async def _resolve_unknown(rt: Runtime, provider: Provider, job: Job, exc: ProviderError) -> None:
    """The provider may have accepted the submission: find the task, or never pay twice."""
    since = job.submit_started_at or job.created_at.timestamp()
    try:
        request, _ = await requested(rt, job)
        found = await provider.reconcile(call_context(rt, provider, job), request, since)
    except (ProviderError, keypool.KeyUnavailable, SourceUnavailable) as rec_exc:
        log.warning("reconcile failed: %s", rec_exc, extra=log_extra(job, "submit.reconcile_failed"))
        if isinstance(rec_exc, TRANSIENT_LOOKUP) and await _reconcile_later(rt, job, exc, rec_exc):
            return
        found = None
        if isinstance(rec_exc, AmbiguousMatch):
            # Tasks other jobs own are not ours; of the rest, one is taken, several fail the job:
            # one of them is likely its own (paid) task, so it is never resubmitted.
            owners = [await rt.store.job_for_task(job.provider, c.task_id) for c in rec_exc.candidates]
            free = [c for c, owner in zip(rec_exc.candidates, owners, strict=True) if owner in (None, job.id)]
            if len(free) > 1:
                await fail_current(rt, job, "provider_outcome_unknown",
                                   f"{exc.message}. {rec_exc.message} and none can be told to be this job's: "
                                   "it was not resubmitted (whatever retry_unknown_submissions says), since one "
                                   "of them is likely its task.", exc.detail)
                return
            found = free[0] if free else None
    # The task may already be bound to this very job (a worker killed between claiming the task and
    # recording `submitted`): that is the task to follow, not another job's (fault suite finding).
    owner = await rt.store.job_for_task(job.provider, found.task_id) if found is not None else None
    if found is not None and owner in (None, job.id):
        log.info("reconciled an ambiguous submission to task %s", found.task_id,
                 extra=log_extra(job, "submit.reconciled"))
        await _submitted(rt, provider, job, found, callback_expected=bool(found.callback_expected))
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
