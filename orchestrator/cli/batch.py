"""``atelier batch submit FILE`` and ``atelier batch status ID``.

``batch submit`` reads JSON Lines (one job request per line, each may carry a
``ref``; blank lines are skipped), reports invalid lines by number (JSON errors
found here, and per-item problems the server returned, mapped back to their
lines), and submits the rest in chunks: one batch per ``--chunk`` lines (at
most 10,000, the server's limit, and at most 16 MiB of requests). With
``--wait`` it follows every batch's event stream (polling if a stream is
unavailable), shows a live progress bar per provider, then writes one result
line per input line (``--out``, else stdout) and, with ``--download DIR``,
streams every output into DIR (checked against its sha256), named by the
line's ``ref`` (or its job id) and the output's index.

Exit code: 0 when every line succeeded (without ``--wait``: was accepted), 1
when any line failed or was invalid, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mimetypes
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from atelier_client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AuthenticationError,
    DownloadError,
    InvalidRequestError,
    JobStatus,
    JobView,
    PayloadTooLargeError,
    ServerError,
    StreamError,
)

from orchestrator.cli.client import (
    CliError,
    UsageError,
    client_args,
    client_errors,
    describe,
    make_async_client,
    make_client,
    print_json,
    usage,
)
from orchestrator.wire.batches import MAX_BATCH_ITEMS

CHUNK_BYTES = 16 * 1024 * 1024  # half the server's default ATELIER_MAX_BATCH_REQUEST_BYTES
DOWNLOADS_AT_ONCE = 8
FAILED = frozenset({JobStatus.failed, JobStatus.canceled, JobStatus.timed_out})
RUNNING = frozenset({JobStatus.submitting, JobStatus.submitted, JobStatus.running})


def add_batch_commands(sub: Any) -> None:
    group = sub.add_parser("batch", help="submit JSON Lines files as batches, follow them")
    group.set_defaults(run=usage(group))
    batch = group.add_subparsers(dest="batch_command", metavar="ACTION")

    p = batch.add_parser("submit", help="submit a JSON Lines file of job requests as one or more batches")
    client_args(p)
    p.add_argument("file", help="JSON Lines: one job request per line (optional \"ref\"), '-' for stdin")
    p.add_argument("--wait", action="store_true", help="follow the batches with a progress bar until they finish")
    p.add_argument("--out", help="write one result line per input line here (default: stdout)")
    p.add_argument("--download", metavar="DIR", help="with --wait: download every output into DIR")
    p.add_argument("--chunk", type=int, default=MAX_BATCH_ITEMS,
                   help=f"at most this many lines per batch (default and maximum {MAX_BATCH_ITEMS:,})")
    p.add_argument("--atomic", action="store_true",
                   help="submit nothing if any line is invalid (the file must fit in one batch)")
    p.add_argument("--idempotency-key", help="makes a re-run return the same batches (chunk n of several "
                                             "uses KEY-n)")
    p.add_argument("--webhook-url", help="the batch's webhook (batch.progress, batch.completed)")
    p.set_defaults(run=cmd_batch_submit)

    p = batch.add_parser("status", help="show a batch (JSON): counts per status, progress")
    client_args(p)
    p.add_argument("batch_id")
    p.set_defaults(run=cmd_batch_status)


def cmd_batch_status(args: argparse.Namespace) -> int:
    with client_errors(args), make_client(args) as client:
        print_json(client.get_batch(args.batch_id).model_dump(mode="json"))
    return 0


# -- reading the file ---------------------------------------------------------------------------

@dataclass
class Line:
    number: int
    item: dict[str, Any] | None
    size: int
    ref: str | None = None
    provider: str = "?"
    status: str = "pending"
    problem: dict[str, Any] | None = None
    batch_id: str | None = None
    job_id: str | None = None
    job: JobView | None = None
    files: list[str] = field(default_factory=list)

    def invalid(self, field_name: str, message: str) -> None:
        self.status = "invalid"
        self.problem = {"field": field_name, "message": message}

    def where(self) -> str:
        return f"line {self.number}" + (f" (ref {self.ref})" if self.ref else "")


def read_lines(stream: IO[str]) -> list[Line]:
    lines = []
    for number, text in enumerate(stream, start=1):
        text = text.strip()
        if not text:
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            line = Line(number, None, len(text))
            line.invalid("line", f"not valid JSON: {exc.msg} (column {exc.colno})")
            lines.append(line)
            continue
        line = Line(number, item if isinstance(item, dict) else None, len(text.encode()))
        if not isinstance(item, dict):
            line.invalid("line", f"a job request must be a JSON object, not {type(item).__name__}")
        else:
            line.ref = item["ref"] if isinstance(item.get("ref"), str) else None
            line.provider = item["provider"] if isinstance(item.get("provider"), str) else "?"
        lines.append(line)
    return lines


def chunked(lines: list[Line], size: int, max_bytes: int = CHUNK_BYTES) -> list[list[Line]]:
    chunks: list[list[Line]] = []
    current: list[Line] = []
    used = 0
    for line in lines:
        if current and (len(current) >= size or used + line.size > max_bytes):
            chunks.append(current)
            current, used = [], 0
        current.append(line)
        used += line.size + 1
    if current:
        chunks.append(current)
    return chunks


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the command ----------------------------------------------------------------------------------

def cmd_batch_submit(args: argparse.Namespace) -> int:
    if args.download and not args.wait:
        raise UsageError("--download needs --wait (outputs exist once the jobs finished)")
    if not 1 <= args.chunk <= MAX_BATCH_ITEMS:
        raise UsageError(f"--chunk must be between 1 and {MAX_BATCH_ITEMS:,}")
    lines = _read(args.file)
    if not lines:
        raise UsageError(f"{args.file} holds no job requests")
    download = Path(args.download) if args.download else None
    if download is not None:
        download.mkdir(parents=True, exist_ok=True)

    for line in lines:
        if line.status == "invalid" and line.problem:
            say(f"atelier: {line.where()}: {line.problem['message']}")
    valid = [line for line in lines if line.status != "invalid"]
    chunks = chunked(valid, args.chunk)
    if args.atomic and len(chunks) > 1:
        raise UsageError(f"--atomic needs the whole file in one batch, but its {len(valid):,} requests need "
                         f"{len(chunks)} batches (at most {args.chunk:,} lines and 16 MiB per batch)")
    if args.atomic and len(valid) < len(lines):
        for line in valid:
            line.status = "rejected"
            line.problem = {"field": "batch", "message": "not submitted: --atomic and some lines are invalid"}
        say(f"atelier: nothing submitted: {len(lines) - len(valid)} invalid line(s) and --atomic")
        chunks = []
    elif len(chunks) > 1:
        say(f"{args.file}: {len(valid):,} job requests, submitted as {len(chunks)} batches of at most "
            f"{max(len(c) for c in chunks):,} (a batch holds at most {MAX_BATCH_ITEMS:,})")

    batch_ids: list[str] = []
    try:
        with client_errors(args):
            asyncio.run(_run(args, lines, chunks, batch_ids, download))
    except KeyboardInterrupt:
        if batch_ids:
            say(f"atelier: interrupted; the batches keep running: {' '.join(batch_ids)} "
                f"(atelier batch status ID)")
        return 130
    except CliError as exc:
        if batch_ids:
            raise CliError(f"{exc} (submitted batches: {' '.join(batch_ids)})") from exc
        raise
    _write_results(args.out, lines, with_files=download is not None)
    return _report(lines, waited=args.wait)


def _read(name: str) -> list[Line]:
    if name == "-":
        return read_lines(sys.stdin)
    try:
        with open(name, encoding="utf-8-sig") as f:
            return read_lines(f)
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text: {exc}") from exc


async def _run(args: argparse.Namespace, lines: list[Line], chunks: list[list[Line]], batch_ids: list[str],
               download: Path | None) -> None:
    async with make_async_client(args) as client:
        submitted = await _submit(client, args, chunks, batch_ids)
        if not args.wait or not submitted:
            return
        tracker = Tracker([line for line in lines if line.job_id])
        with tracker.display():
            await asyncio.gather(*(tracker.follow(client, batch_id) for batch_id in batch_ids))
        by_id: dict[str, JobView] = {}
        for batch_id in batch_ids:
            async for job in client.iter_batch_results(batch_id):
                by_id[job.id] = job
        for line in lines:
            if line.job_id:
                line.job = by_id.get(line.job_id)
                line.status = line.job.status.value if line.job else "unknown"
        if download is not None:
            await _download_all(client, lines, download)


async def _submit(client: AsyncClient, args: argparse.Namespace, chunks: list[list[Line]],
                  batch_ids: list[str]) -> bool:
    """Submit each chunk as one batch; mark every line accepted, invalid or in error. True if any was accepted."""
    accepted = False
    for number, chunk in enumerate(chunks, start=1):
        key = args.idempotency_key
        if key and len(chunks) > 1:
            key = f"{key}-{number}"
        try:
            created = await client.submit_batch([line.item or {} for line in chunk], atomic=args.atomic,
                                                webhook_url=args.webhook_url, idempotency_key=key)
        except APIError as exc:
            if isinstance(exc, InvalidRequestError) and exc.problem.get("invalid"):
                _mark_atomic_rejection(chunk, exc)
                continue
            message = describe(exc, args.url)
            if isinstance(exc, PayloadTooLargeError):
                message += " (try a smaller --chunk)"
            if not batch_ids:  # nothing went out yet: one clear message (a refused key, a bad --webhook-url ...)
                raise CliError(message) from exc
            say(f"atelier: lines {chunk[0].number}-{chunk[-1].number} were not submitted: {message}")
            fatal = isinstance(exc, AuthenticationError)
            for rest in chunks[number - 1:] if fatal else [chunk]:
                _mark_error(rest, message)
            if fatal:
                break
            continue
        except APIConnectionError as exc:
            if not batch_ids:
                raise
            message = describe(exc, args.url)
            say(f"atelier: lines {chunk[0].number}-{chunk[-1].number} and later were not submitted: {message}")
            for rest in chunks[number - 1:]:
                _mark_error(rest, message)
            break
        batch_ids.append(created.id)
        for item in created.items:
            line = chunk[item.index]
            line.batch_id, line.job_id, line.status = created.id, item.job_id, "accepted"
            accepted = True
        for problem in created.invalid:
            line = chunk[problem.index]
            line.batch_id = created.id
            line.invalid(problem.field, problem.message)
            say(f"atelier: {line.where()}: {problem.field}: {problem.message}")
        say(f"batch {created.id}: {len(created.items):,} accepted, {len(created.invalid):,} invalid "
            f"(lines {chunk[0].number}-{chunk[-1].number})")
    return accepted


def _mark_atomic_rejection(chunk: list[Line], exc: APIError) -> None:
    for problem in exc.errors:
        index = problem.get("index")
        if isinstance(index, int) and 0 <= index < len(chunk):
            line = chunk[index]
            line.invalid(str(problem.get("field", "")), str(problem.get("message", "")))
            say(f"atelier: {line.where()}: {problem.get('field')}: {problem.get('message')}")
    count = sum(1 for line in chunk if line.status == "invalid")
    for line in chunk:
        if line.status != "invalid":
            line.status = "rejected"
            line.problem = {"field": "batch", "message": f"not submitted: the batch is atomic and {count} "
                                                         "line(s) are invalid"}
    say(f"atelier: nothing submitted: {count} invalid line(s) and --atomic")


def _mark_error(chunk: list[Line], message: str) -> None:
    for line in chunk:
        line.status = "error"
        line.problem = {"field": "batch", "message": message}


# -- following the batches ------------------------------------------------------------------------

class Tracker:
    """The latest status of every submitted job, counted per provider, shown as progress bars."""

    def __init__(self, lines: list[Line]) -> None:
        self.provider = {line.job_id: line.provider for line in lines if line.job_id}
        self.by_batch: dict[str, list[str]] = {}
        for line in lines:
            if line.job_id and line.batch_id:
                self.by_batch.setdefault(line.batch_id, []).append(line.job_id)
        self.status: dict[str, JobStatus] = dict.fromkeys(self.provider, JobStatus.queued)
        self.counts: dict[str, Counter[str]] = {}
        for provider in self.provider.values():
            self.counts.setdefault(provider, Counter())[_bucket(JobStatus.queued)] += 1
        self._refresh: Callable[[str], None] = lambda provider: None

    def update(self, job_id: str, status: JobStatus) -> None:
        old = self.status.get(job_id)
        if old is None or old == status or old.terminal:
            return
        self.status[job_id] = status
        provider = self.provider[job_id]
        self.counts[provider][_bucket(old)] -= 1
        self.counts[provider][_bucket(status)] += 1
        self._refresh(provider)

    def summary(self, provider: str) -> str:
        c = self.counts[provider]
        return f"{c['succeeded']} ok, {c['failed']} failed, {c['running']} running, {c['queued']} queued"

    @contextlib.contextmanager
    def display(self) -> Iterator[None]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        width = max(len(p) for p in self.counts)
        progress = Progress(TextColumn(f"{{task.description:<{width}}}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[summary]}"), TimeElapsedColumn(),
                            console=Console(stderr=True))
        tasks = {p: progress.add_task(p, total=sum(self.counts[p].values()), summary=self.summary(p))
                 for p in sorted(self.counts)}

        def refresh(provider: str) -> None:
            c = self.counts[provider]
            progress.update(tasks[provider], completed=c["succeeded"] + c["failed"], summary=self.summary(provider))

        for provider in tasks:
            refresh(provider)
        self._refresh = refresh
        with progress:
            yield
        self._refresh = lambda provider: None

    async def follow(self, client: AsyncClient, batch_id: str) -> None:
        """Apply the batch's event stream until it finished; poll the jobs instead if the stream fails."""
        last: int | None = None
        failures = 0
        while failures < 3:
            progressed = ended = False
            try:
                async with contextlib.aclosing(client.stream_batch_events(batch_id, last_event_id=last)) as events:
                    async for event in events:
                        last, progressed = event.sequence, True
                        self.update(event.job_id, event.event.status)
                ended = True
            except (StreamError, ServerError, ValueError):
                pass
            except AuthenticationError:
                raise
            except APIError:  # no stream route (an older server, a proxy): poll
                break
            if ended and (await client.get_batch(batch_id)).status == "completed":
                break  # the server ends the stream once the batch finished and every event was sent
            failures = 0 if progressed else failures + 1
            await asyncio.sleep(0.5 * failures)
        await self._poll(client, batch_id)

    async def _poll(self, client: AsyncClient, batch_id: str) -> None:
        while True:
            pending = [j for j in self.by_batch.get(batch_id, []) if not self.status[j].terminal]
            if not pending:
                return
            for job in (await client.query(pending)).data:
                self.update(job.id, job.status)
            if any(not self.status[j].terminal for j in pending):
                await asyncio.sleep(1.0 if len(pending) <= 1000 else 3.0)


def _bucket(status: JobStatus) -> str:
    if status == JobStatus.succeeded:
        return "succeeded"
    if status in FAILED:
        return "failed"
    return "running" if status in RUNNING else "queued"


# -- downloads, results ------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _stems(lines: list[Line]) -> dict[int, str]:
    """File name stems by line number: the ref made safe for a file name, or the job id when that is not unique."""
    safe = {line.number: _UNSAFE.sub("_", line.ref).strip("._")[:120] for line in lines if line.ref}
    taken = Counter(safe.values())
    return {line.number: safe[line.number] if safe.get(line.number) and taken[safe[line.number]] == 1
            else (line.job_id or f"line{line.number}") for line in lines}


def _extension(content_type: str) -> str:
    return {"audio/mpeg": ".mp3", "image/jpeg": ".jpg"}.get(content_type) or \
        mimetypes.guess_extension(content_type) or ".bin"


async def _download_all(client: AsyncClient, lines: list[Line], directory: Path) -> None:
    stems = _stems(lines)
    sem = asyncio.Semaphore(DOWNLOADS_AT_ONCE)
    total = [0, 0]

    async def one(line: Line) -> None:
        assert line.job is not None
        for output in line.job.outputs:
            path = directory / f"{stems[line.number]}-{output.index}{_extension(output.content_type)}"
            async with sem:
                try:
                    await client.download(output, path)
                except DownloadError as exc:
                    line.status = "download_failed"
                    line.problem = {"field": "outputs", "message": str(exc)}
                    say(f"atelier: {line.where()}: {exc}")
                    return
            line.files.append(str(path))
            total[0] += 1
            total[1] += output.bytes

    await asyncio.gather(*(one(line) for line in lines if line.job and line.job.status == JobStatus.succeeded))
    say(f"downloaded {total[0]:,} file(s), {total[1] / 1e6:.1f} MB, into {directory}")


def result(line: Line, with_files: bool) -> dict[str, Any]:
    job = line.job
    out: dict[str, Any] = {
        "line": line.number, "ref": line.ref, "batch_id": line.batch_id, "job_id": line.job_id,
        "status": line.status, "provider": line.provider if line.item else None,
        "outputs": [o.url for o in job.outputs] if job else [],
        "error": job.error.model_dump(mode="json") if job and job.error else None,
        "problem": line.problem,
    }
    if with_files:
        out["files"] = line.files
    return out


def _write_results(out: str | None, lines: list[Line], with_files: bool) -> None:
    text = "".join(json.dumps(result(line, with_files)) + "\n" for line in lines)
    if out:
        try:
            Path(out).write_text(text)
        except OSError as exc:
            raise CliError(f"cannot write {out}: {exc.strerror or exc}") from exc
    else:
        sys.stdout.write(text)


def _report(lines: list[Line], waited: bool) -> int:
    statuses = Counter(line.status for line in lines)
    say(f"{len(lines):,} line(s): " + ", ".join(f"{n:,} {s}" for s, n in statuses.most_common()))
    good = "succeeded" if waited else "accepted"
    return 0 if statuses[good] == len(lines) else 1
