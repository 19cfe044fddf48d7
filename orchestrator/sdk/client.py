"""Python client for the Atelier API: ``Client`` (sync) and ``AsyncClient`` (asyncio), on httpx.

Both have the same methods (the async ones are awaited, and their iterators are
``async for``), take and return the service's own pydantic models
(``JobRequest``, ``JobView``, ``BatchCreated``, ``BatchView``, ``JobQueryResult``
...) and raise the errors below. The URL and key default to ``ATELIER_URL`` and
``ATELIER_API_KEY``.

Usage::

    from orchestrator.sdk.client import Client, JobRequest

    with Client("http://127.0.0.1:8000", api_key="atl_...") as atelier:
        job = atelier.submit(JobRequest(provider="replicate", kind="image",
                                        model="black-forest-labs/flux-schnell",
                                        input={"prompt": "a lighthouse at dusk"}),
                             idempotency_key="order-42")     # a retried call returns the same job
        job = atelier.wait(job.id, timeout=600)             # Server-Sent Events; polls if the stream fails
        for output in job.outputs:
            atelier.download(output, f"lighthouse-{output.index}.png")   # streamed, sha256 checked

        batch = atelier.submit_batch([{"ref": "fox", "provider": "replicate", "kind": "image",
                                       "model": "black-forest-labs/flux-schnell", "input": {"prompt": "a fox"}}])
        for problem in batch.invalid:                        # invalid items are reported, not enqueued
            print(problem.index, problem.field, problem.message)
        for job in atelier.iter_batch_results(batch.id, wait=True):
            print(job.ref, job.status, [o.url for o in job.outputs])

    async with AsyncClient() as atelier:                     # ATELIER_URL / ATELIER_API_KEY
        job = await atelier.wait((await atelier.submit(request)).id)
        async for job in atelier.iter_batch_results(batch_id, wait=True):
            ...

Errors: ``AtelierError`` is the base. ``APIError`` carries the HTTP ``status``
and the ``application/problem+json`` body as ``problem`` (``detail``,
``errors``); ``AuthenticationError`` (401), ``PermissionDeniedError`` (403),
``NotFoundError`` (404), ``ConflictError`` (409, e.g. an ``Idempotency-Key``
reused with another body, or cancelling a finished job),
``PayloadTooLargeError`` (413), ``InvalidRequestError`` (400/422),
``RateLimitError`` (429) and ``ServerError`` (5xx) are its subclasses.
``APIConnectionError`` wraps httpx's transport errors (refused, reset,
timed out). Connection failures are retried (``max_retries``) when that is
safe: always before the request was sent, and otherwise only for reads,
cancels, queries and requests that carry an ``Idempotency-Key``.

A webhook receiver verifies what Atelier sent it with ``verify_webhook(secret,
headers, body)``, which returns the event and raises
``WebhookVerificationError`` on a bad signature or a stale timestamp::

    event = verify_webhook(secret, request.headers, await request.body())
    if event["type"] == "job.succeeded": ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from orchestrator.wire.batches import MAX_BATCH_ITEMS, BatchCreated, BatchItem, BatchView
from orchestrator.wire.jobs import JobEvent, JobPage, JobQueryResult, JobRequest, JobStatus, JobView, OutputView
from orchestrator.wire.signing import DEFAULT_TOLERANCE
from orchestrator.wire.signing import verify as _verify_signature

__all__ = [
    "Client", "AsyncClient", "verify_webhook", "BatchEvent",
    "AtelierError", "APIConnectionError", "APITimeoutError", "APIError", "BadRequestError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError",
    "InvalidRequestError", "RateLimitError", "ServerError", "StreamError", "WaitTimeoutError", "DownloadError",
    "WebhookVerificationError",
    "JobRequest", "BatchItem", "JobView", "JobEvent", "JobPage", "JobQueryResult", "BatchCreated", "BatchView",
    "OutputView", "JobStatus",
]

log = logging.getLogger("atelier.client")

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "atelier-python/0.1"
MAX_QUERY_IDS = 1000
STREAM_READ_TIMEOUT = 45.0  # the server sends a keep-alive every 15 s
STREAM_ATTEMPTS = 3  # consecutive stream failures (without a new event) before polling instead


# -- errors ---------------------------------------------------------------------------------

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
    409: ConflictError, 413: PayloadTooLargeError, 422: InvalidRequestError, 429: RateLimitError,
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


# -- webhook verification -------------------------------------------------------------------

def verify_webhook(secret: str | Sequence[str], headers: Mapping[str, str], body: bytes | str, *,
                   tolerance: float | None = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Check an Atelier webhook (Standard Webhooks) and return its event.

    ``secret`` is the tenant's ``whsec_...`` (or several, while rotating);
    ``headers`` the request's headers (any case); ``body`` the raw body, exactly
    as received. Raises ``WebhookVerificationError`` when a header is missing,
    the timestamp is more than ``tolerance`` seconds from now (replays), or no
    signature matches. De-duplicate on the ``webhook-id`` header: it is the same
    on every retry of one delivery.
    """
    h = {k.lower(): v for k, v in headers.items()}
    raw = body.encode() if isinstance(body, str) else bytes(body)
    missing = [n for n in ("webhook-id", "webhook-timestamp", "webhook-signature") if not h.get(n)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    stamp = h["webhook-timestamp"].strip()
    if not stamp.isdigit():
        raise WebhookVerificationError("webhook-timestamp is not a Unix time")
    if tolerance is not None and abs(time.time() - int(stamp)) > tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g}s from now (stale or replayed)")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not _verify_signature(secrets, h, raw, tolerance=None):
        raise WebhookVerificationError("no webhook-signature matches the secret")
    try:
        event = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("the body is not JSON") from exc
    if not isinstance(event, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return event


# -- shared pieces ----------------------------------------------------------------------------

class BatchEvent(BaseModel):
    """One entry of a batch's event stream: a state change of one of its jobs."""

    sequence: int
    job_id: str
    event: JobEvent


JobUpdate = JobEvent | JobView


@dataclass
class _SSE:
    id: str | None = None
    event: str = "message"
    data: list[str] = field(default_factory=list)


class _SSEDecoder:
    """Server-Sent Events, line by line (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

    def __init__(self) -> None:
        self._current = _SSE()

    def feed(self, line: str) -> _SSE | None:
        if line == "":
            current, self._current = self._current, _SSE()
            return current if current.data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._current.data.append(value)
        elif name == "event":
            self._current.event = value
        elif name == "id":
            self._current.id = value
        return None


def _dump(item: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """A request as JSON: models as the fields that were set; mappings as they are (the server validates)."""
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json", exclude_unset=True)
    return dict(item)


def _iso(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _params(**values: Any) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, JobStatus) else _iso(v)) for k, v in values.items() if v is not None}


def _chunks(ids: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


def _merge_query(results: Iterable[JobQueryResult]) -> JobQueryResult:
    data: list[JobView] = []
    not_found: list[str] = []
    for r in results:
        data.extend(r.data)
        not_found.extend(r.not_found)
    return JobQueryResult(data=data, not_found=not_found)


def _retry_delay(attempt: int, resp: httpx.Response | None = None) -> float:
    if resp is not None:
        after = resp.headers.get("Retry-After", "")
        if after.isdigit():
            return min(float(after), 30.0)
    return min(0.25 * 2**attempt, 4.0)


def _retryable_status(status: int) -> bool:
    return status in (429, 502, 503, 504)


def _stream_timeout(base: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    read = STREAM_READ_TIMEOUT
    if deadline is not None:
        read = max(0.05, min(read, deadline - time.monotonic()))
    return httpx.Timeout(base.connect, read=read, write=base.write, pool=base.pool)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _check_deadline(what: str, timeout: float | None, deadline: float | None, last: object) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        if isinstance(last, BatchView):
            last = f"{last.done:,}/{last.total:,} jobs finished"
        raise WaitTimeoutError(what, timeout or 0.0, last)


def _changed(update: JobView, seen: tuple[JobStatus, int | None] | None) -> bool:
    return seen != (update.status, update.progress)


class _BaseClient:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout,
                 max_retries: int, headers: Mapping[str, str] | None) -> None:
        self.base_url = (base_url or os.environ.get("ATELIER_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("ATELIER_API_KEY")
        if not key:
            raise AtelierError("no API key: pass api_key or set ATELIER_API_KEY")
        self.max_retries = max(0, max_retries)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._headers = {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT, **(headers or {})}

    @staticmethod
    def _headers_for(idempotency_key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    def _retry_after_error(self, exc: httpx.TransportError, attempt: int, safe: bool) -> bool:
        # A connection that was never made carried nothing: retrying it cannot create anything twice.
        return attempt < self.max_retries and (safe or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout))

    def _retry_after_status(self, resp: httpx.Response, attempt: int, safe: bool) -> bool:
        return attempt < self.max_retries and _retryable_status(resp.status_code) and (
            safe or resp.status_code == 429)

    def _parse(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        return resp.json()


def _download_target(output: OutputView | str, sha256: str | None) -> tuple[str, str | None]:
    if isinstance(output, OutputView):
        return output.url, sha256 or output.sha256
    return output, sha256


def _check_download(status: int, url: str) -> None:
    if status >= 400:
        raise DownloadError(f"downloading {url.split('?')[0]} failed: HTTP {status}")


def _finish_download(part: Path, path: Path, digest: str, expected: str | None, url: str) -> Path:
    if expected and digest != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url.split('?')[0]}: sha256 {digest} does not match the recorded {expected}")
    part.replace(path)
    return path


# -- the sync client -------------------------------------------------------------------------

class Client(_BaseClient):
    """Synchronous client. Use as a context manager, or call ``close()``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 30.0, max_retries: int = 2,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                 idempotency_key: str | None = None, safe: bool | None = None) -> Any:
        safe = (method == "GET" or idempotency_key is not None) if safe is None else safe
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._http.request(method, path, json=json, params=params,
                                          headers=self._headers_for(idempotency_key))
            except httpx.TransportError as exc:
                if self._retry_after_error(exc, attempt, safe):
                    time.sleep(_retry_delay(attempt))
                    continue
                raise _connection_error(self.base_url, exc) from exc
            if self._retry_after_status(resp, attempt, safe):
                time.sleep(_retry_delay(attempt, resp))
                continue
            return self._parse(resp)
        raise AssertionError("unreachable")

    # -- jobs
    def submit(self, request: JobRequest | Mapping[str, Any], *, idempotency_key: str | None = None) -> JobView:
        """Submit a job. With ``idempotency_key``, repeating the call returns the same job (and may be retried)."""
        return JobView.model_validate(self._request("POST", "/v1/jobs", json=_dump(request),
                                                    idempotency_key=idempotency_key))

    def get(self, job_id: str) -> JobView:
        return JobView.model_validate(self._request("GET", f"/v1/jobs/{job_id}"))

    def query(self, ids: Iterable[str]) -> JobQueryResult:
        """Many jobs at once (1,000 per request); unknown ids, and other tenants', come back in ``not_found``."""
        wanted = list(dict.fromkeys(ids))
        return _merge_query(
            JobQueryResult.model_validate(self._request("POST", "/v1/jobs/query", json={"ids": list(chunk)},
                                                        safe=True))
            for chunk in _chunks(wanted, MAX_QUERY_IDS))

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job; ``ConflictError`` if it already finished (a canceled job is returned as it is)."""
        return JobView.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel", safe=True))

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        data = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        return [JobEvent.model_validate(e) for e in data]

    def list_jobs(self, *, status: JobStatus | str | None = None, provider: str | None = None,
                  created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                  limit: int = 50, cursor: str | None = None) -> JobPage:
        """One page of the tenant's jobs, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""
        params = _params(status=status, provider=provider, created_after=created_after,
                         created_before=created_before, limit=limit, cursor=cursor)
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params))

    def iter_jobs(self, *, status: JobStatus | str | None = None, provider: str | None = None,
                  created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                  page_size: int = 200) -> Generator[JobView, None, None]:
        """Every matching job, page by page."""
        cursor = None
        while True:
            page = self.list_jobs(status=status, provider=provider, created_after=created_after,
                                  created_before=created_before, limit=page_size, cursor=cursor)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def _sse(self, path: str, last_event_id: int | None, deadline: float | None) -> Generator[_SSE, None, None]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = str(last_event_id)
        try:
            with self._http.stream("GET", path, headers=headers,
                                   timeout=_stream_timeout(self._timeout, deadline)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error_from_response(resp)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    raise StreamError(f"{path} did not answer with an event stream")
                decoder = _SSEDecoder()
                for line in resp.iter_lines():
                    message = decoder.feed(line)
                    if message is not None:
                        yield message
        except httpx.TransportError as exc:
            raise StreamError(f"the event stream {path} broke: {exc.__class__.__name__}") from exc

    def stream_job_events(self, job_id: str, *,
                          last_event_id: int | None = None) -> Generator[JobEvent, None, None]:
        """The job's state changes as they happen (one connection; it ends after the terminal event).

        Pass the last ``sequence`` seen as ``last_event_id`` to resume after a disconnect.
        """
        for message in self._sse(f"/v1/jobs/{job_id}/stream", last_event_id, None):
            yield JobEvent.model_validate_json("\n".join(message.data))

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 1.0, stream: bool = True,
             on_update: Callable[[JobUpdate], object] | None = None) -> JobView:
        """Block until the job is terminal and return it.

        Follows ``/v1/jobs/{id}/stream`` (resuming with ``Last-Event-ID`` if it
        drops) and polls ``GET /v1/jobs/{id}`` every ``poll_interval`` seconds
        instead when the stream is unavailable or keeps failing (or with
        ``stream=False``). ``on_update`` receives each ``JobEvent`` (stream) or
        changed ``JobView`` (polling). Raises ``WaitTimeoutError`` after ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_status: JobStatus | None = None
        if stream:
            last_event: int | None = None
            failures = 0
            while failures < STREAM_ATTEMPTS:
                progressed = False
                try:
                    with contextlib.closing(self._sse(f"/v1/jobs/{job_id}/stream", last_event, deadline)) as sse:
                        for message in sse:
                            event = JobEvent.model_validate_json("\n".join(message.data))
                            last_event, last_status, progressed = event.sequence, event.status, True
                            if on_update is not None:
                                on_update(event)
                            if event.status.terminal:
                                break
                except (StreamError, ServerError, ValueError) as exc:  # ValueError: an event that does not parse
                    log.debug("stream of %s failed: %s", job_id, exc)
                except AuthenticationError:
                    raise
                except APIError as exc:  # e.g. a proxy or an older server without the stream route
                    log.debug("no stream for %s (%s); polling", job_id, exc)
                    break
                _check_deadline(job_id, timeout, deadline, last_status)
                if last_status is not None and last_status.terminal:
                    return self.get(job_id)
                failures = 0 if progressed else failures + 1
                time.sleep(min(0.2 * failures, _remaining(deadline) or 1.0))
        return self._poll(job_id, timeout, deadline, poll_interval, on_update)

    def _poll(self, job_id: str, timeout: float | None, deadline: float | None, interval: float,
              on_update: Callable[[JobUpdate], object] | None) -> JobView:
        seen: tuple[JobStatus, int | None] | None = None
        while True:
            job = self.get(job_id)
            if on_update is not None and _changed(job, seen):
                on_update(job)
            seen = (job.status, job.progress)
            if job.status.terminal:
                return job
            _check_deadline(job_id, timeout, deadline, job.status)
            time.sleep(min(interval, max(0.0, _remaining(deadline) or interval)))

    def webhook_secret(self) -> str:
        """The tenant's ``whsec_...`` secret, for ``verify_webhook``."""
        return str(self._request("GET", "/v1/webhook-secret")["secret"])

    def download(self, output: OutputView | str, path: str | Path, *, sha256: str | None = None,
                 chunk_size: int = 1 << 20) -> Path:
        """Stream an output (or any output URL) to ``path``, checking its sha256; returns the path.

        The API key is not sent: output URLs are signed (presigned S3 or the API's signed file URLs).
        """
        url, expected = _download_target(output, sha256)
        path = Path(path)
        part = path.with_name(path.name + ".part")
        request = self._http.build_request("GET", url)
        del request.headers["Authorization"]
        digest = hashlib.sha256()
        try:
            resp = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise DownloadError(f"downloading {url.split('?')[0]} failed: {exc.__class__.__name__}") from exc
        try:
            _check_download(resp.status_code, url)
            with part.open("wb") as f:
                for chunk in resp.iter_bytes(chunk_size):
                    digest.update(chunk)
                    f.write(chunk)
        except httpx.TransportError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"downloading {url.split('?')[0]} failed: {exc.__class__.__name__}") from exc
        finally:
            resp.close()
        return _finish_download(part, path, digest.hexdigest(), expected, url)

    # -- batches
    def submit_batch(self, jobs: Iterable[BatchItem | JobRequest | Mapping[str, Any]], *,
                     webhook_url: str | None = None, metadata: Mapping[str, Any] | None = None,
                     atomic: bool = False, idempotency_key: str | None = None) -> BatchCreated:
        """Submit up to 10,000 jobs (each may carry a ``ref``) as one batch.

        Invalid items come back in ``invalid`` (index, ref, field, message) and
        are not enqueued; with ``atomic=True`` any invalid item rejects the whole
        batch (``InvalidRequestError``, whose ``errors`` lists the items).
        """
        body = _batch_body(jobs, webhook_url, metadata, atomic)
        return BatchCreated.model_validate(self._request("POST", "/v1/batches", json=body,
                                                         idempotency_key=idempotency_key))

    def get_batch(self, batch_id: str) -> BatchView:
        return BatchView.model_validate(self._request("GET", f"/v1/batches/{batch_id}"))

    def cancel_batch(self, batch_id: str) -> BatchView:
        """Cancel every job of the batch that has not finished."""
        return BatchView.model_validate(self._request("POST", f"/v1/batches/{batch_id}/cancel", safe=True))

    def list_batch_jobs(self, batch_id: str, *, status: JobStatus | str | None = None, cursor: str | None = None,
                        limit: int = 100) -> JobPage:
        params = _params(status=status, cursor=cursor, limit=limit)
        return JobPage.model_validate(self._request("GET", f"/v1/batches/{batch_id}/jobs", params=params))

    def stream_batch_events(self, batch_id: str, *,
                            last_event_id: int | None = None) -> Generator[BatchEvent, None, None]:
        """State changes of the batch's jobs (one connection; it ends once the batch finished)."""
        for message in self._sse(f"/v1/batches/{batch_id}/stream", last_event_id, None):
            yield BatchEvent.model_validate_json("\n".join(message.data))

    def wait_batch(self, batch_id: str, *, timeout: float | None = None, poll_interval: float = 1.0,
                   on_update: Callable[[BatchView], object] | None = None) -> BatchView:
        """Poll the batch until every job finished; ``on_update`` receives each ``BatchView``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch.status == "completed":
                return batch
            _check_deadline(batch_id, timeout, deadline, batch)
            time.sleep(min(poll_interval, max(0.0, _remaining(deadline) or poll_interval)))

    def iter_batch_results(self, batch_id: str, *, status: JobStatus | str | None = None, wait: bool = False,
                           timeout: float | None = None, poll_interval: float = 1.0,
                           page_size: int = 1000) -> Generator[JobView, None, None]:
        """The batch's jobs, page by page (``GET /v1/batches/{id}/jobs``); with ``wait``, once all finished."""
        if wait:
            self.wait_batch(batch_id, timeout=timeout, poll_interval=poll_interval)
        cursor = None
        while True:
            page = self.list_batch_jobs(batch_id, status=status, cursor=cursor, limit=page_size)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor


def _batch_body(jobs: Iterable[BatchItem | JobRequest | Mapping[str, Any]], webhook_url: str | None,
                metadata: Mapping[str, Any] | None, atomic: bool) -> dict[str, Any]:
    items = [_dump(j) for j in jobs]
    if len(items) > MAX_BATCH_ITEMS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_ITEMS:,} jobs, got {len(items):,}: split it")
    body: dict[str, Any] = {"jobs": items, "atomic": atomic}
    if webhook_url:
        body["webhook_url"] = webhook_url
    if metadata:
        body["metadata"] = dict(metadata)
    return body


# -- the async client ------------------------------------------------------------------------

class AsyncClient(_BaseClient):
    """Asynchronous client (asyncio); the same methods as ``Client``, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 30.0, max_retries: int = 2,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                       idempotency_key: str | None = None, safe: bool | None = None) -> Any:
        safe = (method == "GET" or idempotency_key is not None) if safe is None else safe
        for attempt in range(self.max_retries + 1):
            try:
                resp = await self._http.request(method, path, json=json, params=params,
                                                headers=self._headers_for(idempotency_key))
            except httpx.TransportError as exc:
                if self._retry_after_error(exc, attempt, safe):
                    await asyncio.sleep(_retry_delay(attempt))
                    continue
                raise _connection_error(self.base_url, exc) from exc
            if self._retry_after_status(resp, attempt, safe):
                await asyncio.sleep(_retry_delay(attempt, resp))
                continue
            return self._parse(resp)
        raise AssertionError("unreachable")

    # -- jobs
    async def submit(self, request: JobRequest | Mapping[str, Any], *,
                     idempotency_key: str | None = None) -> JobView:
        return JobView.model_validate(await self._request("POST", "/v1/jobs", json=_dump(request),
                                                          idempotency_key=idempotency_key))

    async def get(self, job_id: str) -> JobView:
        return JobView.model_validate(await self._request("GET", f"/v1/jobs/{job_id}"))

    async def query(self, ids: Iterable[str]) -> JobQueryResult:
        wanted = list(dict.fromkeys(ids))
        results = [JobQueryResult.model_validate(await self._request("POST", "/v1/jobs/query",
                                                                     json={"ids": list(chunk)}, safe=True))
                   for chunk in _chunks(wanted, MAX_QUERY_IDS)]
        return _merge_query(results)

    async def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(await self._request("POST", f"/v1/jobs/{job_id}/cancel", safe=True))

    async def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        data = await self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        return [JobEvent.model_validate(e) for e in data]

    async def list_jobs(self, *, status: JobStatus | str | None = None, provider: str | None = None,
                        created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                        limit: int = 50, cursor: str | None = None) -> JobPage:
        params = _params(status=status, provider=provider, created_after=created_after,
                         created_before=created_before, limit=limit, cursor=cursor)
        return JobPage.model_validate(await self._request("GET", "/v1/jobs", params=params))

    async def iter_jobs(self, *, status: JobStatus | str | None = None, provider: str | None = None,
                        created_after: datetime | str | None = None, created_before: datetime | str | None = None,
                        page_size: int = 200) -> AsyncGenerator[JobView, None]:
        cursor = None
        while True:
            page = await self.list_jobs(status=status, provider=provider, created_after=created_after,
                                        created_before=created_before, limit=page_size, cursor=cursor)
            for job in page.data:
                yield job
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def _sse(self, path: str, last_event_id: int | None, deadline: float | None) -> AsyncGenerator[_SSE, None]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = str(last_event_id)
        try:
            async with self._http.stream("GET", path, headers=headers,
                                         timeout=_stream_timeout(self._timeout, deadline)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error_from_response(resp)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    raise StreamError(f"{path} did not answer with an event stream")
                decoder = _SSEDecoder()
                async for line in resp.aiter_lines():
                    message = decoder.feed(line)
                    if message is not None:
                        yield message
        except httpx.TransportError as exc:
            raise StreamError(f"the event stream {path} broke: {exc.__class__.__name__}") from exc

    async def stream_job_events(self, job_id: str, *,
                                last_event_id: int | None = None) -> AsyncGenerator[JobEvent, None]:
        async with contextlib.aclosing(self._sse(f"/v1/jobs/{job_id}/stream", last_event_id, None)) as sse:
            async for message in sse:
                yield JobEvent.model_validate_json("\n".join(message.data))

    async def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 1.0,
                   stream: bool = True, on_update: Callable[[JobUpdate], object] | None = None) -> JobView:
        deadline = None if timeout is None else time.monotonic() + timeout
        last_status: JobStatus | None = None
        if stream:
            last_event: int | None = None
            failures = 0
            while failures < STREAM_ATTEMPTS:
                progressed = False
                try:
                    async with contextlib.aclosing(self._sse(f"/v1/jobs/{job_id}/stream", last_event,
                                                             deadline)) as sse:
                        async for message in sse:
                            event = JobEvent.model_validate_json("\n".join(message.data))
                            last_event, last_status, progressed = event.sequence, event.status, True
                            if on_update is not None:
                                on_update(event)
                            if event.status.terminal:
                                break
                except (StreamError, ServerError, ValueError) as exc:  # ValueError: an event that does not parse
                    log.debug("stream of %s failed: %s", job_id, exc)
                except AuthenticationError:
                    raise
                except APIError as exc:
                    log.debug("no stream for %s (%s); polling", job_id, exc)
                    break
                _check_deadline(job_id, timeout, deadline, last_status)
                if last_status is not None and last_status.terminal:
                    return await self.get(job_id)
                failures = 0 if progressed else failures + 1
                await asyncio.sleep(min(0.2 * failures, _remaining(deadline) or 1.0))
        seen: tuple[JobStatus, int | None] | None = None
        while True:
            job = await self.get(job_id)
            if on_update is not None and _changed(job, seen):
                on_update(job)
            seen = (job.status, job.progress)
            if job.status.terminal:
                return job
            _check_deadline(job_id, timeout, deadline, job.status)
            await asyncio.sleep(min(poll_interval, max(0.0, _remaining(deadline) or poll_interval)))

    async def webhook_secret(self) -> str:
        return str((await self._request("GET", "/v1/webhook-secret"))["secret"])

    async def download(self, output: OutputView | str, path: str | Path, *, sha256: str | None = None,
                       chunk_size: int = 1 << 20) -> Path:
        url, expected = _download_target(output, sha256)
        path = Path(path)
        part = path.with_name(path.name + ".part")
        request = self._http.build_request("GET", url)
        del request.headers["Authorization"]
        digest = hashlib.sha256()
        try:
            resp = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise DownloadError(f"downloading {url.split('?')[0]} failed: {exc.__class__.__name__}") from exc
        try:
            _check_download(resp.status_code, url)
            with part.open("wb") as f:  # noqa: ASYNC230 - local disk writes of bounded chunks
                async for chunk in resp.aiter_bytes(chunk_size):
                    digest.update(chunk)
                    f.write(chunk)
        except httpx.TransportError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"downloading {url.split('?')[0]} failed: {exc.__class__.__name__}") from exc
        finally:
            await resp.aclose()
        return _finish_download(part, path, digest.hexdigest(), expected, url)

    # -- batches
    async def submit_batch(self, jobs: Iterable[BatchItem | JobRequest | Mapping[str, Any]], *,
                           webhook_url: str | None = None, metadata: Mapping[str, Any] | None = None,
                           atomic: bool = False, idempotency_key: str | None = None) -> BatchCreated:
        body = _batch_body(jobs, webhook_url, metadata, atomic)
        return BatchCreated.model_validate(await self._request("POST", "/v1/batches", json=body,
                                                               idempotency_key=idempotency_key))

    async def get_batch(self, batch_id: str) -> BatchView:
        return BatchView.model_validate(await self._request("GET", f"/v1/batches/{batch_id}"))

    async def cancel_batch(self, batch_id: str) -> BatchView:
        return BatchView.model_validate(await self._request("POST", f"/v1/batches/{batch_id}/cancel", safe=True))

    async def list_batch_jobs(self, batch_id: str, *, status: JobStatus | str | None = None,
                              cursor: str | None = None, limit: int = 100) -> JobPage:
        params = _params(status=status, cursor=cursor, limit=limit)
        return JobPage.model_validate(await self._request("GET", f"/v1/batches/{batch_id}/jobs", params=params))

    async def stream_batch_events(self, batch_id: str, *,
                                  last_event_id: int | None = None) -> AsyncGenerator[BatchEvent, None]:
        async with contextlib.aclosing(self._sse(f"/v1/batches/{batch_id}/stream", last_event_id, None)) as sse:
            async for message in sse:
                yield BatchEvent.model_validate_json("\n".join(message.data))

    async def wait_batch(self, batch_id: str, *, timeout: float | None = None, poll_interval: float = 1.0,
                         on_update: Callable[[BatchView], object] | None = None) -> BatchView:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = await self.get_batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch.status == "completed":
                return batch
            _check_deadline(batch_id, timeout, deadline, batch)
            await asyncio.sleep(min(poll_interval, max(0.0, _remaining(deadline) or poll_interval)))

    async def iter_batch_results(self, batch_id: str, *, status: JobStatus | str | None = None,
                                 wait: bool = False, timeout: float | None = None, poll_interval: float = 1.0,
                                 page_size: int = 1000) -> AsyncGenerator[JobView, None]:
        if wait:
            await self.wait_batch(batch_id, timeout=timeout, poll_interval=poll_interval)
        cursor = None
        while True:
            page = await self.list_batch_jobs(batch_id, status=status, cursor=cursor, limit=page_size)
            for job in page.data:
                yield job
            if not page.next_cursor:
                return
            cursor = page.next_cursor
