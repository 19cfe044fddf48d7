"""What the worker does about a provider error, in one table per step.

An adapter's error says what happened at the provider (see ``providers.errors``); these tables
say what that means for the job. The first row whose error class matches wins, so subclasses
come before their bases.
"""

from __future__ import annotations

from enum import StrEnum

from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    MalformedResponse,
    OutcomeUnknown,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)


class Action(StrEnum):
    # Nothing was created.
    # The provider throttles: pause the key, back to queued after Retry-After; only the deadline bounds it.
    WAIT = "wait"
    RETRY = "retry"  # the provider is unavailable: back to queued with backoff, a bounded number of attempts
    REKEY = "rekey"  # the key was refused or is out of credit: out of the pool, submit again with another key
    # Something may have been created (and billed): never submit blindly again.
    RECONCILE = "reconcile"  # look the task up; found: follow it; not found: fail provider_outcome_unknown
    # While following a task.
    POLL_LATER = "poll_later"  # a transient failure reading the status: read it again later
    POLL_LATER_COUNTED = "poll_later_counted"  # an unreadable status: again, but fail after a few in a row
    KEY_OUT_AND_FAIL = "key_out_and_fail"  # the key was refused: only it can follow the task, so the job fails
    # Either step.
    FAIL = "fail"  # fail the job with the error's code


ON_SUBMIT: tuple[tuple[type[ProviderError], Action], ...] = (
    (RateLimited, Action.WAIT),
    (AuthFailed, Action.REKEY),
    (InsufficientBalance, Action.REKEY),
    (Unavailable, Action.RETRY),
    (OutcomeUnknown, Action.RECONCILE),
    (MalformedResponse, Action.RECONCILE),  # the provider answered, but we cannot read the task id: it may exist
    (Rejected, Action.FAIL),
    (ProviderError, Action.FAIL),
)

ON_POLL: tuple[tuple[type[ProviderError], Action], ...] = (
    (RateLimited, Action.WAIT),  # pause the key's whole budget, then poll again
    (Unavailable, Action.POLL_LATER),
    (OutcomeUnknown, Action.POLL_LATER),
    (MalformedResponse, Action.POLL_LATER_COUNTED),
    (AuthFailed, Action.KEY_OUT_AND_FAIL),
    (InsufficientBalance, Action.KEY_OUT_AND_FAIL),
    (TaskNotFound, Action.FAIL),
    (ProviderError, Action.FAIL),
)

# A task lookup (reconcile) that failed like this proves nothing either way: look again later.
TRANSIENT_LOOKUP = (RateLimited, Unavailable, OutcomeUnknown, MalformedResponse)


def action_for(table: tuple[tuple[type[ProviderError], Action], ...], error: ProviderError) -> Action:
    for kind, action in table:
        if isinstance(error, kind):
            return action
    return Action.FAIL
