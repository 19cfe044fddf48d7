"""Client-side ``atelier`` commands: ``submit``, ``get`` and ``jobs list|get|cancel|wait|download``.

They talk to ``--url``/``ATELIER_URL`` with ``--api-key``/``ATELIER_API_KEY``
through the client package (``atelier_client``) and turn its errors into one
clear line (connection refused, 401, a 4xx problem's detail). Batch commands
live in ``cli/batch.py``, ``run`` in ``cli/run.py``, ``webhooks`` in
``cli/webhooks.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from atelier_client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AtelierError,
    AuthenticationError,
    Client,
    JobEvent,
    JobStatus,
    JobView,
    WaitTimeoutError,
)


class CliError(Exception):
    """Printed as ``atelier: <message>``; the process exits with ``exit_code``."""

    exit_code = 1


class UsageError(CliError):
    exit_code = 2


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("ATELIER_URL", "http://127.0.0.1:8000"),
                   help="the Atelier API (default: ATELIER_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("ATELIER_API_KEY"),
                   help="API key (default: ATELIER_API_KEY)")


def usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """For a command group run without its action: print its help, exit 2."""
    def run(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2
    return run


def _key(args: argparse.Namespace) -> str:
    if not args.api_key:
        raise UsageError("no API key: pass --api-key or set ATELIER_API_KEY")
    key: str = args.api_key
    return key


def make_client(args: argparse.Namespace) -> Client:
    return Client(args.url, _key(args))


def make_async_client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.url, _key(args))


def describe(exc: AtelierError, url: str) -> str:
    """One line that says what went wrong and what to do."""
    if isinstance(exc, AuthenticationError):
        return f"the server refused the API key (401): {exc.detail or 'check --api-key / ATELIER_API_KEY'}"
    if isinstance(exc, APIConnectionError):
        if exc.reason.startswith("cannot connect"):
            return f"cannot connect to {url} (is the server running? check --url / ATELIER_URL)"
        return f"{exc.reason} ({url})"
    if isinstance(exc, APIError):
        message = f"{exc.status}: {exc.detail or exc.title}"
        extra = [e for e in exc.errors if "index" not in e and str(e.get("field")) not in message]
        return message + "".join(f"; {e['field']}: {e.get('message')}" for e in extra)
    return str(exc)


@contextlib.contextmanager
def client_errors(args: argparse.Namespace) -> Iterator[None]:
    try:
        yield
    except AtelierError as exc:
        raise CliError(describe(exc, args.url)) from exc


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _view_json(job: JobView) -> dict[str, Any]:
    data: dict[str, Any] = job.model_dump(mode="json")
    return data


def _progress_line(job_id: str) -> Any:
    def show(update: JobEvent | JobView) -> None:
        progress = f" {update.progress}%" if update.progress is not None else ""
        print(f"{job_id}: {update.status.value}{progress}", file=sys.stderr, flush=True)
    return show


# -- submit / get (top level, kept as they were) ------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    try:
        job_input = json.loads(args.input) if args.input else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"--input is not valid JSON: {exc}") from exc
    if not isinstance(job_input, dict):
        raise CliError("--input must be a JSON object")
    if args.prompt:
        job_input["prompt"] = args.prompt
    body: dict[str, Any] = {"provider": args.provider, "kind": args.kind, "model": args.model, "input": job_input}
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    with client_errors(args), make_client(args) as client:
        job = client.submit(body, idempotency_key=args.idempotency_key)
        if args.wait:
            job = client.wait(job.id, on_update=_progress_line(job.id))
    print_json(_view_json(job))
    return 0 if not args.wait or job.status == JobStatus.succeeded else 1


def cmd_get(args: argparse.Namespace) -> int:
    with client_errors(args), make_client(args) as client:
        print_json(_view_json(client.get(args.job_id)))
    return 0


# -- atelier jobs ... ---------------------------------------------------------------------------

def add_jobs_commands(sub: Any) -> None:
    group = sub.add_parser("jobs", help="list, show, cancel and wait for jobs")
    group.set_defaults(run=usage(group))
    jobs = group.add_subparsers(dest="jobs_command", metavar="ACTION")

    p = jobs.add_parser("list", help="the tenant's jobs, newest first")
    client_args(p)
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--provider")
    p.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON job per line instead of a table")
    p.set_defaults(run=cmd_jobs_list)

    p = jobs.add_parser("get", help="show a job (JSON)")
    client_args(p)
    p.add_argument("job_id")
    p.set_defaults(run=cmd_get)

    p = jobs.add_parser("cancel", help="cancel a job")
    client_args(p)
    p.add_argument("job_id")
    p.set_defaults(run=cmd_jobs_cancel)

    p = jobs.add_parser("wait", help="wait until a job finishes (exit 0 if it succeeded)")
    client_args(p)
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between polls when the event stream is unavailable")
    p.set_defaults(run=cmd_jobs_wait)

    p = jobs.add_parser("download", help="download a job's outputs (sha256 checked)")
    client_args(p)
    p.add_argument("job_id")
    p.add_argument("--dir", default=".", help="into this directory (default: the current one)")
    p.set_defaults(run=cmd_jobs_download)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    with client_errors(args), make_client(args) as client:
        found: list[JobView] = []
        for job in client.iter_jobs(status=args.status, provider=args.provider, page_size=min(args.limit, 200)):
            found.append(job)
            if len(found) >= args.limit:
                break
    if args.json:
        for job in found:
            print(job.model_dump_json())
        return 0
    rows = [("ID", "STATUS", "PROVIDER", "KIND", "MODEL", "CREATED", "REF")]
    rows += [(j.id, j.status.value + (f" {j.progress}%" if j.progress is not None and not j.status.terminal else ""),
              j.provider, j.kind.value, j.model, j.created_at.strftime("%Y-%m-%d %H:%M:%S"), j.ref or "")
             for j in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not found:
        print("(no jobs)", file=sys.stderr)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with client_errors(args), make_client(args) as client:
        job = client.cancel(args.job_id)
    print_json(_view_json(job))
    if job.note:
        print(f"atelier: {job.note}", file=sys.stderr)
    return 0


def cmd_jobs_wait(args: argparse.Namespace) -> int:
    with client_errors(args), make_client(args) as client:
        try:
            job = client.wait(args.job_id, timeout=args.timeout, poll_interval=args.poll_interval,
                              on_update=_progress_line(args.job_id))
        except WaitTimeoutError as exc:
            raise CliError(f"{exc}; it keeps running (atelier jobs wait {args.job_id} to wait again)") from exc
    print_json(_view_json(job))
    return 0 if job.status == JobStatus.succeeded else 1


def cmd_jobs_download(args: argparse.Namespace) -> int:
    """Each output as ``{job id}-{index}{ext}`` in ``--dir``; one path per line on stdout."""
    with client_errors(args), make_client(args) as client:
        job = client.get(args.job_id)
        if not job.outputs:
            state = f"{job.status.value}" + (f" ({job.error.code}: {job.error.message})" if job.error else "")
            raise CliError(f"job {job.id} has no outputs to download: it is {state}")
        files = client.download_outputs(job, args.dir)
    for path in files:
        print(path)
    return 0
