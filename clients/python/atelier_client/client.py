"""The Atelier API client: ``Client`` (sync) and ``AsyncClient`` (asyncio), on httpx.

Both have the same methods (the async ones are awaited, and their iterators are ``async for``),
take and return the API's pydantic models (``JobRequest``, ``JobView``, ``UploadView``,
``BatchCreated``, ``EndpointCreated``...) and raise the errors of ``atelier_client.errors``. The URL
and key default to ``ATELIER_URL`` and ``ATELIER_API_KEY``.

Connection failures are retried (``max_retries``) when that is safe: always before the request was
sent, and otherwise only for reads, cancels, queries, uploads and requests that carry an
``Idempotency-Key`` (``run`` always sends one, so its submission is retried safely too).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import mimetypes
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import BaseModel

from atelier_client.errors import (
    APIError,
    AtelierError,
    AuthenticationError,
    DownloadError,
    ServerError,
    StreamError,
    WaitTimeoutError,
    _connection_error,
    _error_from_response,
)
from atelier_client.wire.batches import MAX_BATCH_ITEMS, BatchCreated, BatchItem, BatchView
from atelier_client.wire.jobs import JobEvent, JobPage, JobQueryResult, JobRequest, JobStatus, JobView, OutputView
from atelier_client.wire.models import ModelList
from atelier_client.wire.uploads import UploadView
from atelier_client.wire.webhooks import (
    DeliveryPage,
    DeliveryStatus,
    DeliveryView,
    EndpointCreated,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    EndpointView,
    EventType,
    Recovery,
)

log = logging.getLogger("atelier.client")

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "atelier-python/0.1"
MAX_QUERY_IDS = 1000
STREAM_READ_TIMEOUT = 45.0  # the server sends a keep-alive every 15 s
STREAM_ATTEMPTS = 3  # consecutive stream failures (without a new event) before polling instead
UPLOAD_TIMEOUT = 300.0  # writing a large file may take longer than an ordinary request

# A local file to upload: a path, its bytes, or an open binary file.
UploadSource = str | os.PathLike[str] | bytes | IO[bytes]


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
        return resp.json() if resp.status_code != 204 and resp.content else None


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


def _output_path(directory: str | Path, job: JobView, output: OutputView) -> Path:
    """``{job id}-{output index}{extension}`` in ``directory`` (created when missing)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job.id}-{output.index}{extension(output.content_type)}"


def extension(content_type: str) -> str:
    """The usual file extension for a stored output's type (``.bin`` when unknown)."""
    return {"audio/mpeg": ".mp3", "image/jpeg": ".jpg", "audio/wav": ".wav"}.get(content_type) or \
        mimetypes.guess_extension(content_type) or ".bin"


def _run_key() -> str:
    """The ``Idempotency-Key`` of a ``run`` without one: a retried submission returns the same job."""
    return f"run-{uuid.uuid4().hex}"


@dataclass
class _Upload:
    """A file to send as ``POST /v1/uploads``'s ``file`` part, opened afresh for each attempt."""

    source: UploadSource
    filename: str | None
    content_type: str | None

    @classmethod
    def of(cls, source: UploadSource, filename: str | None, content_type: str | None) -> _Upload:
        if filename is None and isinstance(source, str | os.PathLike):
            filename = Path(source).name
        elif filename is None and not isinstance(source, bytes):
            name = getattr(source, "name", None)
            filename = Path(name).name if isinstance(name, str) else None
        if content_type is None:
            content_type = (mimetypes.guess_type(filename)[0] if filename else None) or "application/octet-stream"
        return cls(source, filename, content_type)

    @property
    def repeatable(self) -> bool:
        """Whether the body can be sent again (a path or bytes; a stream only when seekable)."""
        return isinstance(self.source, str | os.PathLike | bytes) or self.source.seekable()

    @contextlib.contextmanager
    def part(self) -> Iterator[dict[str, Any]]:
        with contextlib.ExitStack() as opened_here:
            if isinstance(self.source, bytes):
                opened: IO[bytes] = io.BytesIO(self.source)
            elif isinstance(self.source, str | os.PathLike):
                opened = opened_here.enter_context(Path(self.source).open("rb"))
            else:  # the caller's stream: left open
                opened = self.source
                if opened.seekable():
                    opened.seek(0)
            yield {"file": (self.filename or "upload", opened, self.content_type)}


def _files(upload: _Upload | None) -> contextlib.AbstractContextManager[dict[str, Any] | None]:
    return upload.part() if upload is not None else contextlib.nullcontext()


def _endpoint_body(url: str, events: Sequence[EventType | str] | None, description: str | None,
                   enabled: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url, "events": list(events or []), "enabled": enabled}
    if description is not None:
        body["description"] = description
    return body


def _endpoint_path(endpoint_id: str, *rest: str) -> str:
    return "/".join(["/v1/webhook-endpoints", endpoint_id, *rest])


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
                 idempotency_key: str | None = None, safe: bool | None = None, upload: _Upload | None = None) -> Any:
        safe = (method == "GET" or idempotency_key is not None) if safe is None else safe
        for attempt in range(self.max_retries + 1):
            try:
                with _files(upload) as files:
                    resp = self._http.request(method, path, json=json, params=params, files=files,
                                              headers=self._headers_for(idempotency_key),
                                              timeout=UPLOAD_TIMEOUT if upload else httpx.USE_CLIENT_DEFAULT)
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

    def run(self, request: JobRequest | Mapping[str, Any], *, timeout: float | None = None,
            on_update: Callable[[JobUpdate], object] | None = None, idempotency_key: str | None = None,
            poll_interval: float = 1.0, stream: bool = True) -> JobView:
        """Submit a job, follow it and return it finished (succeeded or not: check ``status``).

        The one call for "render this": ``on_update`` receives each ``JobEvent`` (or changed
        ``JobView`` while polling), and ``timeout`` bounds the whole (``WaitTimeoutError``; the job
        keeps running). The submission carries ``idempotency_key`` (a fresh one when not given), so
        a connection lost while submitting is retried without creating a second job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.submit(request, idempotency_key=idempotency_key or _run_key())
        return self.wait(job.id, timeout=_remaining(deadline), poll_interval=poll_interval, stream=stream,
                         on_update=on_update)

    def webhook_secret(self) -> str:
        """The tenant's ``whsec_...`` secret, for ``verify_webhook`` (webhooks sent to a job's ``webhook_url``)."""
        return str(self._request("GET", "/v1/webhook-secret")["secret"])

    def upload(self, file: UploadSource, *, filename: str | None = None,
               content_type: str | None = None) -> UploadView:
        """Store a local file (``POST /v1/uploads``) for use as a job's input: pass the returned
        ``url`` as ``input.image_url`` (or another media input). The server checks the type from the
        bytes and caps the size (``PayloadTooLargeError``, ``UnsupportedMediaTypeError``).

        ``file`` is a path, the file's bytes or an open binary file; ``filename`` defaults to the
        path's name (``"upload"`` for bytes without one). The answer's ``note`` is set when the
        server warns that providers may not be able to fetch the URL."""
        upload = _Upload.of(file, filename, content_type)
        return UploadView.model_validate(self._request("POST", "/v1/uploads", upload=upload,
                                                       safe=upload.repeatable))

    def models(self) -> ModelList:
        """The model catalog (``GET /v1/models``): each model's kinds, inputs, price and lifecycle."""
        return ModelList.model_validate(self._request("GET", "/v1/models"))

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

    def download_outputs(self, job: JobView | str, directory: str | Path) -> list[Path]:
        """Every output of the job into ``directory`` as ``{job id}-{index}{ext}`` (sha256 checked)."""
        found = self.get(job) if isinstance(job, str) else job
        return [self.download(o, _output_path(directory, found, o)) for o in found.outputs]

    # -- webhook endpoints
    def create_webhook_endpoint(self, url: str, *, events: Sequence[EventType | str] | None = None,
                                description: str | None = None, enabled: bool = True) -> EndpointCreated:
        """Register a destination for the tenant's events (``events``: the types to send; none: all).

        The answer carries the endpoint's ``secret`` for ``verify_webhook``."""
        return EndpointCreated.model_validate(self._request(
            "POST", "/v1/webhook-endpoints", json=_endpoint_body(url, events, description, enabled)))

    def list_webhook_endpoints(self, *, cursor: str | None = None, limit: int = 50) -> EndpointPage:
        return EndpointPage.model_validate(self._request("GET", "/v1/webhook-endpoints",
                                                         params=_params(cursor=cursor, limit=limit)))

    def get_webhook_endpoint(self, endpoint_id: str) -> EndpointView:
        return EndpointView.model_validate(self._request("GET", _endpoint_path(endpoint_id)))

    def update_webhook_endpoint(self, endpoint_id: str, changes: EndpointUpdate | Mapping[str, Any]) -> EndpointView:
        """Change ``url``, ``events``, ``enabled`` or ``description`` (only the fields given)."""
        return EndpointView.model_validate(self._request("PATCH", _endpoint_path(endpoint_id), json=_dump(changes),
                                                         safe=True))

    def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        self._request("DELETE", _endpoint_path(endpoint_id), safe=True)

    def get_webhook_endpoint_secret(self, endpoint_id: str) -> EndpointSecret:
        return EndpointSecret.model_validate(self._request("GET", _endpoint_path(endpoint_id, "secret")))

    def rotate_webhook_endpoint_secret(self, endpoint_id: str, *,
                                       grace_period_seconds: int | None = None) -> EndpointSecret:
        """A new secret; the previous one keeps signing too for ``grace_period_seconds`` (server default 24 h)."""
        body = None if grace_period_seconds is None else {"grace_period_seconds": grace_period_seconds}
        return EndpointSecret.model_validate(self._request("POST", _endpoint_path(endpoint_id, "secret", "rotate"),
                                                           json=body))

    def list_webhook_deliveries(self, endpoint_id: str, *, status: DeliveryStatus | None = None,
                                cursor: str | None = None, limit: int = 50) -> DeliveryPage:
        """The endpoint's deliveries, newest first, each with its attempts (``status``: pending, delivered, dead)."""
        return DeliveryPage.model_validate(self._request(
            "GET", _endpoint_path(endpoint_id, "deliveries"), params=_params(status=status, cursor=cursor,
                                                                             limit=limit)))

    def get_webhook_delivery(self, endpoint_id: str, delivery_id: str) -> DeliveryView:
        return DeliveryView.model_validate(self._request("GET", _endpoint_path(endpoint_id, "deliveries",
                                                                               delivery_id)))

    def replay_webhook_delivery(self, endpoint_id: str, delivery_id: str) -> DeliveryView:
        """Send a delivered or dead delivery again (same ``webhook-id``)."""
        return DeliveryView.model_validate(self._request(
            "POST", _endpoint_path(endpoint_id, "deliveries", delivery_id, "replay"), safe=True))

    def recover_webhook_deliveries(self, endpoint_id: str, since: datetime | str) -> Recovery:
        """Resend every dead delivery created since ``since`` (up to 1,000 a call: ``more`` says to call again)."""
        return Recovery.model_validate(self._request("POST", _endpoint_path(endpoint_id, "recover"),
                                                     params=_params(since=since), safe=True))

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
                       idempotency_key: str | None = None, safe: bool | None = None,
                       upload: _Upload | None = None) -> Any:
        safe = (method == "GET" or idempotency_key is not None) if safe is None else safe
        for attempt in range(self.max_retries + 1):
            try:
                with _files(upload) as files:
                    resp = await self._http.request(method, path, json=json, params=params, files=files,
                                                    headers=self._headers_for(idempotency_key),
                                                    timeout=UPLOAD_TIMEOUT if upload else httpx.USE_CLIENT_DEFAULT)
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

    async def run(self, request: JobRequest | Mapping[str, Any], *, timeout: float | None = None,
                  on_update: Callable[[JobUpdate], object] | None = None, idempotency_key: str | None = None,
                  poll_interval: float = 1.0, stream: bool = True) -> JobView:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.submit(request, idempotency_key=idempotency_key or _run_key())
        return await self.wait(job.id, timeout=_remaining(deadline), poll_interval=poll_interval, stream=stream,
                               on_update=on_update)

    async def webhook_secret(self) -> str:
        return str((await self._request("GET", "/v1/webhook-secret"))["secret"])

    async def upload(self, file: UploadSource, *, filename: str | None = None,
                     content_type: str | None = None) -> UploadView:
        upload = _Upload.of(file, filename, content_type)
        return UploadView.model_validate(await self._request("POST", "/v1/uploads", upload=upload,
                                                             safe=upload.repeatable))

    async def models(self) -> ModelList:
        return ModelList.model_validate(await self._request("GET", "/v1/models"))

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

    async def download_outputs(self, job: JobView | str, directory: str | Path) -> list[Path]:
        found = await self.get(job) if isinstance(job, str) else job
        return [await self.download(o, _output_path(directory, found, o)) for o in found.outputs]

    # -- webhook endpoints
    async def create_webhook_endpoint(self, url: str, *, events: Sequence[EventType | str] | None = None,
                                      description: str | None = None, enabled: bool = True) -> EndpointCreated:
        return EndpointCreated.model_validate(await self._request(
            "POST", "/v1/webhook-endpoints", json=_endpoint_body(url, events, description, enabled)))

    async def list_webhook_endpoints(self, *, cursor: str | None = None, limit: int = 50) -> EndpointPage:
        return EndpointPage.model_validate(await self._request("GET", "/v1/webhook-endpoints",
                                                               params=_params(cursor=cursor, limit=limit)))

    async def get_webhook_endpoint(self, endpoint_id: str) -> EndpointView:
        return EndpointView.model_validate(await self._request("GET", _endpoint_path(endpoint_id)))

    async def update_webhook_endpoint(self, endpoint_id: str,
                                      changes: EndpointUpdate | Mapping[str, Any]) -> EndpointView:
        return EndpointView.model_validate(await self._request("PATCH", _endpoint_path(endpoint_id),
                                                               json=_dump(changes), safe=True))

    async def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        await self._request("DELETE", _endpoint_path(endpoint_id), safe=True)

    async def get_webhook_endpoint_secret(self, endpoint_id: str) -> EndpointSecret:
        return EndpointSecret.model_validate(await self._request("GET", _endpoint_path(endpoint_id, "secret")))

    async def rotate_webhook_endpoint_secret(self, endpoint_id: str, *,
                                             grace_period_seconds: int | None = None) -> EndpointSecret:
        body = None if grace_period_seconds is None else {"grace_period_seconds": grace_period_seconds}
        return EndpointSecret.model_validate(await self._request(
            "POST", _endpoint_path(endpoint_id, "secret", "rotate"), json=body))

    async def list_webhook_deliveries(self, endpoint_id: str, *, status: DeliveryStatus | None = None,
                                      cursor: str | None = None, limit: int = 50) -> DeliveryPage:
        return DeliveryPage.model_validate(await self._request(
            "GET", _endpoint_path(endpoint_id, "deliveries"), params=_params(status=status, cursor=cursor,
                                                                             limit=limit)))

    async def get_webhook_delivery(self, endpoint_id: str, delivery_id: str) -> DeliveryView:
        return DeliveryView.model_validate(await self._request(
            "GET", _endpoint_path(endpoint_id, "deliveries", delivery_id)))

    async def replay_webhook_delivery(self, endpoint_id: str, delivery_id: str) -> DeliveryView:
        return DeliveryView.model_validate(await self._request(
            "POST", _endpoint_path(endpoint_id, "deliveries", delivery_id, "replay"), safe=True))

    async def recover_webhook_deliveries(self, endpoint_id: str, since: datetime | str) -> Recovery:
        return Recovery.model_validate(await self._request("POST", _endpoint_path(endpoint_id, "recover"),
                                                           params=_params(since=since), safe=True))

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
