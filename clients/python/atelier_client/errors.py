"""The errors this client raises; ``AtelierError`` is the base of all.

``APIError`` carries the HTTP ``status`` and the ``application/problem+json`` body as ``problem``
(``detail``, ``errors``); its subclasses name the statuses a caller handles differently.
``APIConnectionError`` wraps httpx's transport errors (refused, reset, timed out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


class AtelierError(Exception):
    """Base class of every error raised by this client."""


class APIConnectionError(AtelierError):
    """The server could not be reached, or the connection broke (wraps httpx's transport errors)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{reason}: {url}")
        self.url = url
        self.reason = reason


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class APIError(AtelierError):
    """The server answered with an error; ``problem`` is its ``application/problem+json`` body."""

    def __init__(self, status: int, problem: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.problem = problem
        self.headers = dict(headers or {})
        self.title: str = str(problem.get("title") or "Error")
        self.detail: str | None = problem.get("detail")
        super().__init__(f"{status} {self.title}" + (f": {self.detail}" if self.detail else ""))

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Per-field problems (``field``, ``message``); for an atomic batch, per item (``index``, ``ref`` ...)."""
        found = self.problem.get("errors") or self.problem.get("invalid") or []
        return [e for e in found if isinstance(e, dict)]


class BadRequestError(APIError):
    """400."""


class InvalidRequestError(BadRequestError):
    """422 (and 400): the request was refused and nothing was enqueued; ``errors`` names the fields."""


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such job or batch (another tenant's look the same)."""


class ConflictError(APIError):
    """409: an ``Idempotency-Key`` reused with another body, or a change the job's state does not allow."""


class PayloadTooLargeError(APIError):
    """413: the request body is over the server's limit."""


class UnsupportedMediaTypeError(APIError):
    """415: an upload whose bytes are not a media type Atelier takes as an input."""


class RateLimitError(APIError):
    """429."""


class ServerError(APIError):
    """5xx."""


class StreamError(AtelierError):
    """An event stream could not be opened as one, or broke before it ended."""


class WaitTimeoutError(AtelierError):
    """``wait``/``wait_batch`` gave up; ``last`` is the last state seen (a job status or a ``BatchView``)."""

    def __init__(self, what: str, timeout: float, last: object = None) -> None:
        super().__init__(f"{what} did not finish within {timeout:g}s" + (f" (last seen: {last})" if last else ""))
        self.last = last


class DownloadError(AtelierError):
    """An output could not be downloaded, or its sha256 did not match."""


class WebhookVerificationError(AtelierError):
    """A webhook's signature is wrong, its timestamp stale, or its headers missing."""


_STATUS_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: InvalidRequestError,
    429: RateLimitError,
}


def _error_from_response(resp: httpx.Response) -> APIError:
    try:
        problem = resp.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": resp.reason_phrase or "Error", "status": resp.status_code,
                   "detail": resp.text[:300] or None}
    cls = _STATUS_ERRORS.get(resp.status_code) or (ServerError if resp.status_code >= 500 else APIError)
    return cls(resp.status_code, problem, resp.headers)


def _connection_error(url: str, exc: httpx.TransportError) -> APIConnectionError:
    if isinstance(exc, httpx.ConnectTimeout):
        return APITimeoutError(url, "timed out connecting to the server")
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(url, "the server did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        return APIConnectionError(url, "cannot connect to the server")
    return APIConnectionError(url, f"the connection to the server failed ({exc.__class__.__name__})")

