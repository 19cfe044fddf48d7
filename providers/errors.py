"""The errors an adapter raises. Each says what the worker may safely do next, most importantly
whether the provider may have accepted (and will bill) a submission:

* ``InvalidInput``        -- rejected before any request (the API answers 422, naming the field).
* ``Rejected``            -- the provider refused; nothing was created.
* ``AuthFailed``          -- the key was refused (a ``Rejected``): it leaves the pool.
* ``InsufficientBalance`` -- the key's account is out of credit (a ``Rejected``): out of the pool
                             until a recheck.
* ``RateLimited``         -- 429 or similar; nothing was created, retry after a pause.
* ``Unavailable``         -- 5xx / network trouble where the provider documents or the transport
                             proves that nothing was created.
* ``OutcomeUnknown``      -- the request may have been accepted (timeout after sending, connection
                             reset, 5xx after the body was sent).
* ``MalformedResponse``   -- the provider answered something we cannot read.
* ``TaskNotFound``        -- the provider does not know the task (expired, deleted).
* ``AmbiguousMatch``      -- (from ``reconcile``) several tasks could be the lost one (``candidates``,
                             as ``SubmitResult``s): the worker drops those other jobs own; one left is
                             taken, several fail the job, which is never resubmitted (one of them is
                             likely its own paid task).

The job's error code is given at construction (``code=``) where the provider says more than the
class does (``content_policy``, ``model_not_found``...); it never changes afterwards.
"""

from __future__ import annotations

from typing import Any


class ProviderError(Exception):
    default_code = "provider_error"

    def __init__(self, message: str, *, code: str | None = None, detail: Any = None,
                 status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.detail = detail
        self.status_code = status_code


class InvalidInput(ProviderError):
    default_code = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Rejected(ProviderError):
    default_code = "provider_rejected"


class AuthFailed(Rejected):
    default_code = "provider_auth_failed"


class InsufficientBalance(Rejected):
    default_code = "provider_insufficient_balance"


class RateLimited(ProviderError):
    default_code = "provider_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None,
                 detail: Any = None, status_code: int | None = 429) -> None:
        super().__init__(message, code=code, detail=detail, status_code=status_code)
        self.retry_after = retry_after


class Unavailable(ProviderError):
    default_code = "provider_unavailable"


class OutcomeUnknown(ProviderError):
    default_code = "provider_outcome_unknown"


class AmbiguousMatch(ProviderError):
    default_code = "provider_outcome_unknown"

    def __init__(self, message: str, candidates: list[Any], *, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.candidates = candidates  # SubmitResult of each task that could be the lost one


class MalformedResponse(ProviderError):
    default_code = "provider_malformed_response"


class TaskNotFound(ProviderError):
    default_code = "provider_task_not_found"


class CallbackRejected(ProviderError):
    """An incoming callback failed verification (bad or missing signature, stale timestamp)."""

    default_code = "callback_rejected"
