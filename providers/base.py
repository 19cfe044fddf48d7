"""The provider protocol: what every adapter implements, and the errors it raises.

An adapter translates between Atelier's job and one provider's wire format over
httpx. It holds no state beyond its settings: Redis, storage, scheduling and
retries belong to the workers. Errors say what the worker may safely do next,
most importantly whether the provider may have accepted (and will bill) a
submission:

* ``InvalidInput``      -- rejected before any request (API answers 422).
* ``Rejected``          -- the provider refused; nothing was created.
* ``AuthFailed``        -- the key was refused (a ``Rejected``): the worker takes it out of the pool.
* ``InsufficientBalance`` -- the key's account is out of credit (a ``Rejected``): out of the pool
                           until a recheck.
* ``RateLimited``       -- 429 or similar; nothing was created, retry after a pause.
* ``Unavailable``       -- 5xx / network trouble where the provider documents or
                           the transport proves that nothing was created.
* ``OutcomeUnknown``    -- the request may have been accepted (timeout after
                           sending, connection reset, 5xx after the body was sent).
* ``MalformedResponse`` -- the provider answered something we cannot read.
* ``TaskNotFound``      -- the provider does not know the task (expired, deleted).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx

from orchestrator.models import Job, JobKind, JobRequest, ProviderOutput


class ProviderError(Exception):
    code = "provider_error"

    def __init__(self, message: str, *, detail: Any = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.status_code = status_code


class InvalidInput(ProviderError):
    code = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Rejected(ProviderError):
    code = "provider_rejected"


class AuthFailed(Rejected):
    code = "provider_auth_failed"


class InsufficientBalance(Rejected):
    code = "provider_insufficient_balance"


class RateLimited(ProviderError):
    code = "provider_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, detail: Any = None,
                 status_code: int | None = 429) -> None:
        super().__init__(message, detail=detail, status_code=status_code)
        self.retry_after = retry_after


class Unavailable(ProviderError):
    code = "provider_unavailable"


class OutcomeUnknown(ProviderError):
    code = "provider_outcome_unknown"


class MalformedResponse(ProviderError):
    code = "provider_malformed_response"


class TaskNotFound(ProviderError):
    code = "provider_task_not_found"


class CallbackRejected(ProviderError):
    """An incoming callback failed verification (bad or missing signature, stale timestamp)."""

    code = "callback_rejected"


@dataclass
class ProviderSettings:
    """Configuration of one provider, built by ``orchestrator.settings``."""

    name: str
    base_url: str
    api_keys: list[str] = field(default_factory=list)
    timeout_seconds: float = 30.0
    # Typical run time per kind, used for the first poll and for ordering polls.
    typical_seconds: dict[str, float] = field(default_factory=dict)
    poll_initial_seconds: float | None = None
    poll_max_seconds: float = 30.0
    job_timeout_seconds: float = 3600.0
    # Per-model deadlines (seconds): exact model names, or fnmatch patterns such as "minimax/*".
    job_timeout_by_model: dict[str, float] = field(default_factory=dict)
    concurrency: int | None = None  # tasks in flight per API key
    rpm: float | None = None  # requests per minute per API key
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubmitResult:
    task_id: str
    request_id: str | None = None
    status: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


ProviderState = Literal["queued", "running", "succeeded", "failed", "canceled", "unknown"]


@dataclass
class TaskStatus:
    """The provider's view of a task, translated."""

    state: ProviderState
    raw_status: str
    progress: int | None = None
    outputs: list[ProviderOutput] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    error_detail: Any = None
    # The provider's hint for the next poll (seconds), e.g. ``openai-poll-after-ms``.
    poll_after: float | None = None
    request_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CallbackHint:
    """What a verified callback says: which task (and, where the body says it, the raw status).

    It is only a hint: the worker fetches the task's state from the provider.
    """

    task_id: str | None = None
    raw_status: str | None = None


@dataclass
class CallContext:
    """What one call needs: the HTTP client, the chosen key and our callback URL."""

    http: httpx.AsyncClient
    api_key: str
    callback_url: str | None = None


class Provider:
    """Base class of the adapters. Subclasses set the class attributes and override methods."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[JobKind]]
    supports_cancel: ClassVar[bool] = False
    supports_callbacks: ClassVar[bool] = False
    # How callbacks are authenticated: the provider's signature, or our per-job token in the URL.
    callback_auth: ClassVar[Literal["signature", "token"]] = "token"
    retention: ClassVar[str] = ""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")

    # -- validation (before anything is enqueued) -------------------------
    def validate(self, request: JobRequest) -> None:
        """Raise ``InvalidInput`` naming the field when the provider would refuse the request."""
        if request.kind not in self.kinds:
            kinds = ", ".join(sorted(self.kinds))
            raise InvalidInput("kind", f"{self.name} renders {kinds}, not {request.kind}")

    # -- the task ----------------------------------------------------------
    async def submit(self, ctx: CallContext, job: Job) -> SubmitResult:
        raise NotImplementedError

    async def fetch(self, ctx: CallContext, job: Job) -> TaskStatus:
        raise NotImplementedError

    async def cancel(self, ctx: CallContext, job: Job) -> bool:
        """Ask the provider to stop; ``False`` when it has no way to be told."""
        return False

    async def reconcile(self, ctx: CallContext, job: Job, since: float) -> SubmitResult | None:
        """Find the task an ambiguous submit may have created (``None`` if none or unknowable)."""
        return None

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Authenticate a callback (``callback_auth == "signature"``) and say which task it is about.

        Raise ``CallbackRejected`` when it does not verify. Token-authenticated
        providers only parse: the API checks the per-job token.
        """
        raise CallbackRejected(f"{self.name} does not send callbacks")

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """Headers for fetching an output URL (auth only where the provider requires it)."""
        return {}

    def typical_seconds(self, job: Job) -> float:
        """The job's typical run time: its model's entry in ``typical_seconds``, else its kind's."""
        typical = self.settings.typical_seconds
        return typical[job.model] if job.model in typical else typical.get(job.kind.value, 60.0)

    @property
    def fetch_group_size(self) -> int:
        """Tasks one status request can read (``fetch_many``); 1 when the provider reads one at a time."""
        return 1

    async def fetch_many(self, ctx: CallContext, jobs: list[Job]) -> dict[str, TaskStatus]:
        """Statuses of up to ``fetch_group_size`` tasks, keyed by provider task id (all submitted
        with ``ctx.api_key``). A task missing from the answer is polled on its own."""
        return {job.provider_task_id: await self.fetch(ctx, job) for job in jobs if job.provider_task_id}


# -- HTTP helpers shared by adapters ---------------------------------------

def retry_after_seconds(headers: Mapping[str, str], default: float | None = None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else default


async def send(http: httpx.AsyncClient, request: httpx.Request, *, creates: bool = False) -> httpx.Response:
    """Send a request, mapping transport failures to provider errors.

    For a request that ``creates`` a billable task, anything that may have reached
    the provider is ``OutcomeUnknown``; a failure to connect is ``Unavailable``
    (nothing was sent).
    """
    try:
        return await http.send(request)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise Unavailable(f"could not connect to provider: {exc.__class__.__name__}") from exc
    except httpx.TransportError as exc:
        if creates:
            raise OutcomeUnknown(
                f"the submission may have reached the provider ({exc.__class__.__name__}); "
                "its outcome is unknown"
            ) from exc
        raise Unavailable(f"provider request failed: {exc.__class__.__name__}") from exc


# new-api / one-api gateways: the token's or the user's quota is used up (HTTP 403 with one of these
# codes, or a 401 from the token check that only says so in its message).
GATEWAY_QUOTA_CODES = frozenset({"quota_not_enough", "insufficient_user_quota", "pre_consume_token_quota_failed",
                                 "insufficient_quota"})
_GATEWAY_QUOTA_TEXT = re.compile(r"额度不足|额度已用尽|insufficient (user )?quota|quota (is )?(not enough|exhausted)",
                                 re.IGNORECASE)


def gateway_quota_exhausted(code: Any, message: str) -> bool:
    """Whether a gateway error means the key's quota (balance) ran out, not a bad key."""
    return str(code or "") in GATEWAY_QUOTA_CODES or bool(_GATEWAY_QUOTA_TEXT.search(message or ""))


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        excerpt = response.text[:200]
        raise MalformedResponse(
            f"provider answered HTTP {response.status_code} with a body that is not JSON",
            detail={"body_excerpt": excerpt}, status_code=response.status_code,
        ) from exc


def expect_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedResponse(f"provider {what} is not a JSON object", detail={"body": str(body)[:200]})
    return body


def raise_for_common_status(response: httpx.Response, *, creates: bool = False, detail: Any = None) -> None:
    """Map non-2xx statuses that mean the same thing at every provider."""
    status = response.status_code
    if status < 400:
        return
    body_detail = detail if detail is not None else response.text[:500]
    if status == 429:
        raise RateLimited("provider rate limit (HTTP 429)", retry_after=retry_after_seconds(response.headers),
                          detail=body_detail)
    if status == 402:  # Payment Required: the account behind the key is out of credit (Replicate...)
        raise InsufficientBalance("provider says the account is out of credit (HTTP 402)", detail=body_detail,
                                  status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"provider refused the credentials (HTTP {status})", detail=body_detail,
                         status_code=status)
    if status >= 500:
        if creates and status != 503:
            # Only 503 (not accepting work) proves nothing was created; 500/502/504 may follow acceptance.
            raise OutcomeUnknown(f"provider answered HTTP {status} to a submission", detail=body_detail,
                                 status_code=status)
        raise Unavailable(f"provider unavailable (HTTP {status})", detail=body_detail, status_code=status)
    if status in (404, 410) and not creates:
        raise TaskNotFound(f"provider does not know this task (HTTP {status})", detail=body_detail,
                           status_code=status)
    raise Rejected(f"provider refused the request (HTTP {status})", detail=body_detail, status_code=status)
