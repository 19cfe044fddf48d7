"""The job's state machine: which transitions are legal, and copying a record to change it."""

from __future__ import annotations

from typing import Any

from orchestrator.domain.job import Job
from orchestrator.wire.jobs import JobStatus

S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.queued: frozenset({S.submitting, S.failed, S.canceled, S.timed_out}),
    # back to queued only when the provider provably created nothing (429, refused connection)
    S.submitting: frozenset({S.submitted, S.queued, S.failed, S.canceled, S.timed_out}),
    S.submitted: frozenset({S.running, S.failed, S.canceled, S.timed_out}),
    S.running: frozenset({S.succeeded, S.failed, S.canceled, S.timed_out}),
}


# A fallback (``services.fallbacks``) takes a job back to ``queued`` for its next provider from any
# live state; only a ``job.fallback`` transition may, so no other path can requeue a created task.
FALLBACK_FROM = frozenset({S.queued, S.submitting, S.submitted, S.running})


def allowed(old: JobStatus, new: JobStatus, *, fallback: bool = False) -> bool:
    return new == old or new in ALLOWED.get(old, frozenset()) or (fallback and new == S.queued
                                                                   and old in FALLBACK_FROM)


class IllegalTransition(Exception):
    pass


# The Job fields holding dicts or lists. Nested models (input, error, outputs...) are never changed in
# place anywhere: a change replaces them.
_CONTAINERS = ("metadata", "provider_state", "provider_outputs", "outputs", "timestamps")


def derive(job: Job, changes: dict[str, Any]) -> Job:
    """A copy of ``job`` with ``changes``, sharing no dict or list with it.

    What ``model_copy(deep=True)`` guaranteed for the ways the code changes jobs (assigning fields,
    building new dicts), at a tenth of its cost: a deep copy of a Job (its datetimes, its models)
    took about 27 us, several times per job.
    """
    new = job.model_copy(update=changes)
    fields = new.__dict__
    for name in _CONTAINERS:
        if name not in changes:
            value = fields[name]
            fields[name] = dict(value) if isinstance(value, dict) else list(value)
    return new
