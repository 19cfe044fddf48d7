"""The job's path through the workers, in one place: which step follows which, and why a step runs again.

::

    POST /v1/jobs ──> queued ──submit──> submitting ──accepted──> submitted ──poll──> running
                        ^                    │                                           │
                        └── WAIT/RETRY/REKEY ┘  (nothing created)        outputs ready ──┘
                                             │                                 │
                             RECONCILE ──────┘ (may exist)               collect ──> succeeded
    any non-terminal state ──> failed | canceled | timed_out
    every transition with a webhook ──> deliver (wh:{delivery}:{attempt})

=========  =================================  ============================================
step       where it runs                      entered by
=========  =================================  ============================================
submit     ``workers.submit.submit_job``      arq ``submit:{job}:{attempt}{tag}`` (see ``Reentry``)
poll       ``workers.poll.poll``              the key's poll board (``workers.polling``), or a
                                              callback waking the job; never a queue entry
collect    ``workers.collect.collect_outputs`` arq ``collect:{job}:{n}`` once a status shows outputs
cancel     ``workers.cancel.cancel_at_provider`` arq ``cancel:{job}`` after a cancel or a timeout
deliver    ``workers.delivery.deliver_webhook``  arq ``wh:{delivery}:{attempt}`` per transition's webhook
sweep      ``workers.sweep.sweep``            cron: re-enters whatever step a job's lost work was
=========  =================================  ============================================

arq is at-least-once and a callback, a poll and the sweeper may race: every step re-reads the job
and acts only by compare-and-set, so a duplicate entry is harmless. Each arq id names its step and
entry, which makes a repeated enqueue of the same entry a no-op.
"""

from __future__ import annotations

import time
from enum import Enum

from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import JobStatus


class Reentry(Enum):
    """Why ``submit`` runs again for a job, and the arq id tag that keeps each entry once-only.

    The first submission (``Jobs.create``, batches) and a retry after a refusal that created
    nothing (a new attempt, so a new id) have no tag.
    """

    RETRY = ""  # nothing was created (429, 503, a refused key): the next attempt
    CHECK = ":check"  # a submission left no outcome: look once it must have finished
    REKEY = ":rekey"  # the key was taken out of the pool: submit with another
    BUDGET = ":budget"  # waiting for the key's request budget: come back at its turn (+ ms of the turn)
    RECONCILE = ":reconcile"  # looking the task up failed transiently: look again (+ the try)
    SWEPT = ":swept"  # the sweeper found the job's pending work lost (+ the time: a dead worker's id may be held)
    WOKEN = ":woken"  # a slot on the key was freed (+ the job version; see ``services.slots``)

    def tag(self, nonce: int | None = None) -> str:
        return self.value if nonce is None else f"{self.value}{nonce}"


async def submit_again(rt: Runtime, job: Job, why: Reentry, defer: float = 0.0, nonce: int | None = None) -> bool:
    """Enqueue the job's submit step again, for ``why``."""
    return await rt.queue.submit(job.id, job.attempts, defer, tag=why.tag(nonce))


class SubmitEntry(Enum):
    """What a submit step finds to do, from the job's state."""

    NOTHING = "nothing"  # finished, or moved on (submitted by someone else)
    SUBMIT = "submit"  # queued: take a key, a slot and the budget, then submit
    RECONCILE_DUE = "reconcile_due"  # submitting, and this attempt's look-up is due again
    INTERRUPTED = "interrupted"  # submitting with no outcome recorded: a worker stopped mid-submission


def submit_entry(job: Job) -> SubmitEntry:
    if job.status == JobStatus.queued:
        return SubmitEntry.SUBMIT
    if job.status != JobStatus.submitting:
        return SubmitEntry.NOTHING
    if job.reconcile is not None and job.reconcile.attempt == job.attempts:
        return SubmitEntry.RECONCILE_DUE
    return SubmitEntry.INTERRUPTED


def interrupted_wait(job: Job, timeout_seconds: float) -> float:
    """Seconds until an interrupted submission must have finished (it may still be talking to the
    provider: a duplicate delivery of its arq entry)."""
    return (job.submit_started_at or 0.0) + timeout_seconds + 15 - time.time()
