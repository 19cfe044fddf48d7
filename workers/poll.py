"""The poll step: one status fetch (many, where the provider reads many per request), applied to
the job, and the next poll put on the key's poll board (``orchestrator.store.polls``; the poller in
``workers.polling`` takes due polls as the key's budget allows). What each provider error means
here is ``workers.actions.ON_POLL``."""

from __future__ import annotations

import functools
import time
from typing import Any

from orchestrator.domain.deadlines import deadline_passed
from orchestrator.domain.job import Job, task_ref
from orchestrator.domain.schedule import poll_delay, poll_rank, woken_rank
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from orchestrator.store.jobs import Conflict
from orchestrator.wire import limits
from orchestrator.wire.jobs import TERMINAL, CostEstimate, JobCost, JobStatus
from providers import catalog
from providers.contract import Provider, TaskStatus
from providers.errors import AuthFailed, InsufficientBalance, MalformedResponse, ProviderError, RateLimited
from workers.actions import ON_POLL, Action, action_for
from workers.collect import OutputUnavailable, collect, collect_inline, store_outputs
from workers.context import call_context, fail_current, load_job, log, log_extra, runtime_of, through_redis_outage
from workers.keys import take_key_out

S = JobStatus
MAX_MALFORMED_POLLS = 3


async def poll_job(ctx: dict[str, Any], job_id: str, seq: int) -> None:
    """An arq poll (queued by an earlier version, or by hand): polls now go through the poll board
    (``workers/polling.py``), which spends the budget before handing a poll out; this one spends it."""
    await poll(runtime_of(ctx), job_id, seq, budget_spent=False)


async def _pollable(rt: Runtime, job: Job | None, seq: int) -> tuple[Job, Provider] | None:
    """The job and its provider when poll ``seq`` is still wanted (else ``None``, handled)."""
    if job is None or job.status not in (S.submitted, S.running) or job.poll_seq != seq:
        return None  # finished, or a newer poll superseded this one
    if job.phase == "collecting" or not job.provider_task_id:
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
        status = await provider.fetch(call_context(rt, provider, job), task_ref(job))
    except ProviderError as exc:
        await _poll_failed(rt, provider, job, exc)
        return
    except keypool.KeyUnavailable as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail)
        return
    except Exception as exc:  # noqa: BLE001 - an answer the adapter could not read: one job's problem
        await _poll_failed(rt, provider, job, unreadable(exc))
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
    statuses: dict[str, TaskStatus] = {}
    try:
        statuses = await provider.fetch_many(call_context(rt, provider, live[0]), [task_ref(j) for j in live])
    except ProviderError as exc:
        if action_for(ON_POLL, exc) in (Action.WAIT, Action.POLL_LATER, Action.POLL_LATER_COUNTED):
            for job in live:
                await _poll_failed(rt, provider, job, exc)
            return
        # e.g. one bad id spoils the request: read each on its own for its own error
    except keypool.KeyUnavailable:
        pass  # each read on its own fails with its own message
    except Exception as exc:  # noqa: BLE001 - an answer the adapter could not read
        for job in live:
            await _poll_failed(rt, provider, job, unreadable(exc))
        return
    for job in live:
        status = statuses.get(job.provider_task_id or "")
        if status is None:
            await poll(rt, job.id, job.poll_seq, budget_spent=False)
        else:
            await apply_status(rt, provider, job, status)


def unreadable(exc: Exception) -> MalformedResponse:
    """An adapter failed on a provider's answer (nested too deep, not what it expected): the job's
    problem, retried and then failed like any malformed answer, never a crash of the poller."""
    return MalformedResponse(f"the provider's answer could not be read ({exc.__class__.__name__})")


async def _poll_failed(rt: Runtime, provider: Provider, job: Job, exc: ProviderError) -> None:
    match action_for(ON_POLL, exc):
        case Action.WAIT:
            # The provider's limit binds the key, not only this job: pause the key's whole budget.
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            pause = retry_after or poll_delay(rt.settings, provider, job) * 2
            if job.key_id:
                await rt.throttle.pause(job.provider, job.key_id, pause)
            await _next_poll(rt, provider, job, pause, note=exc.message)
        case Action.POLL_LATER:
            await _next_poll(rt, provider, job, None, note=exc.message)
        case Action.POLL_LATER_COUNTED:
            if job.poll_errors + 1 >= MAX_MALFORMED_POLLS:
                await fail_current(rt, job, exc.code, f"{exc.message} ({job.poll_errors + 1} times in a row)",
                                   exc.detail)
            else:
                await _next_poll(rt, provider, job, None, note=exc.message, poll_errors=job.poll_errors + 1)
        case Action.KEY_OUT_AND_FAIL if isinstance(exc, AuthFailed | InsufficientBalance) and job.key_id:
            # Only this key can follow the task, so the job fails; new jobs must not use the key either.
            await take_key_out(rt, provider, job, job.key_id, exc)
            await fail_current(rt, job, exc.code, exc.message, exc.detail)
        case _:
            await fail_current(rt, job, exc.code, exc.message, exc.detail)


async def apply_status(rt: Runtime, provider: Provider, job: Job, status: TaskStatus, *,
                       submission: dict[str, Any] | None = None) -> None:
    """Apply a fetched provider status to the job (also used after callbacks).

    ``submission``: the job is still ``submitting`` and the create call answered with ``status``
    (``running``, or ``succeeded`` with linked outputs): these fields, which record the submission
    (the task id...), go in the same write, ``submitting -> submitted -> running``. A ``Conflict``
    then reaches the caller, which must record the task whatever happened meanwhile.
    """
    if submission is not None:
        assert status.state in ("running", "succeeded"), "only a live or finished task is applied with its submission"
        # The submitted record, still `submitting`: the status adds to it, and the write carries both.
        job = job.model_copy(update=submission)
    common: dict[str, Any] = {"provider_status": limits.clean_text(status.raw_status, 200),
                              "polls": job.polls + 1, "poll_errors": 0}
    if status.task_state is not None:
        learnt = limits.bounded(status.task_state.model_dump(exclude_none=True))
        common["provider_state"] = {**job.provider_state, **learnt}
    if status.progress is not None:
        common["progress"] = max(0, min(100, status.progress))
    if status.request_id:
        common["provider_request_id"] = limits.clean_text(status.request_id, 200)
    for output in status.outputs:  # what a provider says of an output is kept bounded (it reads back)
        output.metadata = limits.bounded(output.metadata)
    if status.usage is not None and (reported := reported_cost(provider, job, status)) is not None:
        common["cost"] = reported
    if status.state == "queued" and status.queue_position is not None:
        common["note"] = f"queue position {status.queue_position} at {job.provider}"
    elif job.note and job.note.startswith(("queue position", "throttled")):
        common["note"] = None
    position = max(0, status.queue_position) if status.state == "queued" and status.queue_position is not None else None
    if position != job.provider_queue_position:
        common["provider_queue_position"] = position  # the view's ``queue`` (services/standing.py)
    try:
        if status.state in ("queued", "unknown"):
            if status.state == "unknown":
                log.warning("unknown provider status %r; still waiting", status.raw_status,
                            extra=log_extra(job, "status.unknown"))
            await _next_poll(rt, provider, job, status.poll_after, **common)
        elif status.state == "running":
            if submission is None and job.status != S.submitted:
                await _next_poll(rt, provider, job, status.poll_after, **common)
                return
            # One write: running, and the next poll's number and deadline (then its place on the board).
            step = dict(common, poll_seq=job.poll_seq + 1)
            delay = poll_delay(rt.settings, provider, job.model_copy(update=step), status.poll_after)
            at = time.time() + delay + rt.settings.sweep_grace_seconds
            if submission is not None:
                job = await _record_with_submission(rt, job, step, active_at=at)
            else:
                job = await rt.jobs.transition(job, S.running, active_at=at, **step)
            await schedule_poll(rt, provider, job, delay)
        elif status.state == "succeeded":
            n = job.collects + 1
            # One write: running (if it was not yet) and collecting. collect keeps this deadline fresh
            # while it runs (workers/collect.py), so a collection lost with its worker is re-scheduled
            # after the grace, not minutes later.
            collecting = dict(common, phase="collecting", provider_outputs=status.outputs, collects=n)
            active_at = time.time() + rt.settings.sweep_grace_seconds
            if submission is not None:
                job = await _record_with_submission(rt, job, collecting, active_at=active_at)
            elif job.status == S.submitted:
                job = await rt.jobs.transition(job, S.running, active_at=active_at, **collecting)
            else:
                job = await rt.jobs.change(job, active_at=active_at, **collecting)
            if collect_inline(job):
                await _collect_here(rt, provider, job)
            else:
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
        if submission is not None:
            raise
        log.info("job changed while applying a status; the newer state stands",
                 extra=log_extra(job, "status.superseded"))


async def _record_with_submission(rt: Runtime, job: Job, changes: dict[str, Any],
                                  active_at: float | None = None) -> Job:
    """``submitting -> submitted -> running`` in one write (through a Redis outage: the provider
    created the task and only this process knows its id)."""
    return await through_redis_outage(functools.partial(
        rt.jobs.transition, job, S.running, via=S.submitted, active_at=active_at, **changes))


async def _collect_here(rt: Runtime, provider: Provider, job: Job) -> None:
    """Store the outputs in this step (images: skips a queue round and an arq job); anything unforeseen
    hands the job to the collect step, which arq retries, instead of leaving it in ``collecting``."""
    try:
        await collect(rt, provider, job, inline=True)
    except Exception:
        log.exception("collecting outputs in the poll failed; the collect step takes over",
                      extra=log_extra(job, "collect.inline_failed"))
        await rt.queue.collect(job.id, job.collects)


def reported_cost(provider: Provider, job: Job, status: TaskStatus) -> JobCost | None:
    """The job's ``cost`` with ``reported`` set from what the provider reported the task used, priced
    by the model's rule (``None`` when nothing it reported can be priced). It is saved with the change
    that applies the status, never in a write of its own."""
    found = catalog.reported_cost(provider.settings, job.model, status.usage)
    if found is None:
        return None
    reported = CostEstimate(amount=found.amount, currency=found.currency, rule=found.rule)
    return (job.cost or JobCost()).model_copy(update={"reported": reported})


def inline_outputs(status: TaskStatus) -> bool:
    """A finished task whose outputs came in the answer itself (``data:`` URLs), not as links."""
    return status.state == "succeeded" and bool(status.outputs) and all(o.url.startswith("data:")
                                                                         for o in status.outputs)


async def apply_now(rt: Runtime, provider: Provider, job: Job, status: TaskStatus) -> None:
    """Apply the status a create call answered with (a synchronous provider, or a task already done).

    Outputs the provider returned inline (``data:`` URLs: base64 or bytes in the response) are stored
    here at once, like downloaded ones, so they never sit in the job record; linked outputs take the
    usual collect step (before their links expire).
    """
    if not inline_outputs(status):
        await apply_status(rt, provider, job, status)
        return
    try:
        stored = await store_outputs(rt, provider, call_context(rt, provider, job), job, status.outputs)
    except OutputUnavailable as exc:
        await fail_current(rt, job, exc.code, str(exc))
        return
    except keypool.KeyUnavailable as exc:
        await fail_current(rt, job, exc.code, exc.message, exc.detail)
        return
    changes: dict[str, Any] = {"provider_status": status.raw_status, "polls": job.polls, "progress": 100}
    if status.usage is not None and (reported := reported_cost(provider, job, status)) is not None:
        changes["cost"] = reported
    try:
        job = await rt.jobs.transition(job, S.running, **changes)
        await rt.jobs.transition(job, S.succeeded, outputs=stored, note=None)
    except Conflict:
        log.info("job changed while its outputs were stored (canceled?); outputs kept in storage",
                 extra=log_extra(job, "collect.superseded"))


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
