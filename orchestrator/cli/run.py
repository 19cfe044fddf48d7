"""``atelier run``: one render from the shell, the way ``Client.run`` does it from Python.

Submit (uploading ``--image FILE`` first when it is a local file), follow the job with a progress
bar, download its outputs with ``--download DIR``. The exit status is the outcome: 0 when the job
succeeded, 1 when it failed, was canceled or timed out (the error is printed), or when ``--timeout``
passed first (the job keeps running), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atelier_client import Client, JobEvent, JobStatus, JobView, WaitTimeoutError

from orchestrator.cli.client import CliError, UsageError, client_args, client_errors, make_client, print_json

KINDS = ("image", "video", "audio")


def add_run_command(sub: Any) -> None:
    p = sub.add_parser("run", help="submit a job, follow it with a progress bar, download its outputs",
                       description="Submit a job, follow it until it finishes and (with --download) fetch its "
                                   "outputs. Exit status 0 when it succeeded, 1 otherwise.")
    client_args(p)
    p.add_argument("--provider", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--kind", choices=KINDS, help="image, video or audio (default: the model's only kind in the "
                                                 "catalog)")
    p.add_argument("--prompt")
    p.add_argument("--image", metavar="FILE|URL",
                   help="an input image: a local file (uploaded first, POST /v1/uploads) or an http(s) URL")
    p.add_argument("--input", help="more of the job's input as JSON (merged under --prompt and --image)")
    p.add_argument("--download", metavar="DIR", help="download the outputs into DIR")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    p.add_argument("--idempotency-key", help="a retried command with the same key follows the same job")
    p.add_argument("--json", action="store_true", help="print the finished job as JSON")
    p.set_defaults(run=cmd_run)


def _job_input(args: argparse.Namespace) -> dict[str, Any]:
    try:
        given = json.loads(args.input) if args.input else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from exc
    if not isinstance(given, dict):
        raise UsageError("--input must be a JSON object")
    if args.prompt is not None:
        given["prompt"] = args.prompt
    return given


def _kind(client: Client, args: argparse.Namespace) -> str:
    """``--kind``, else the model's only kind in the catalog."""
    if args.kind:
        return str(args.kind)
    wanted = f"{args.provider}/{args.model}"
    for model in client.models().data:
        if model.id == wanted:
            if len(model.kinds) == 1:
                return model.kinds[0]
            raise UsageError(f"{wanted} makes {', '.join(model.kinds)}: say which with --kind")
    raise UsageError(f"{wanted} is not in the model catalog (atelier models): say what it makes with --kind")


def _image_url(client: Client, image: str) -> str:
    if image.startswith(("http://", "https://")):
        return image
    path = Path(image)
    if not path.is_file():
        raise UsageError(f"--image {image}: no such file (give a local file or an http(s) URL)")
    upload = client.upload(path)
    say(f"uploaded {path.name} ({upload.content_type}, {upload.bytes:,} bytes) as {upload.id}")
    if upload.note:
        say(f"atelier: note: {upload.note}")
    return upload.url


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(job_id: str) -> Iterator[Any]:
    """A rich progress bar on stderr; yields the ``on_update`` callback that moves it."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=Console(stderr=True))
    task = progress.add_task(job_id, total=100, status="queued")

    def on_update(update: JobEvent | JobView) -> None:
        done = 100 if update.status == JobStatus.succeeded else update.progress
        if done is not None:
            progress.update(task, completed=done)
        progress.update(task, status=update.status.value)

    with progress:
        yield on_update


def cmd_run(args: argparse.Namespace) -> int:
    job_input = _job_input(args)
    with client_errors(args), make_client(args) as client:
        body: dict[str, Any] = {"provider": args.provider, "model": args.model, "kind": _kind(client, args)}
        if args.image:
            job_input["image_url"] = _image_url(client, args.image)
        body["input"] = job_input
        # Always an Idempotency-Key: a submission whose answer was lost is retried without a second job.
        job = client.submit(body, idempotency_key=args.idempotency_key or f"run-{uuid.uuid4().hex}")
        say(f"submitted {job.id} ({args.provider}/{args.model})")
        try:
            with progress_bar(job.id) as on_update:
                job = client.wait(job.id, timeout=args.timeout, on_update=on_update)
        except WaitTimeoutError as exc:
            raise CliError(f"{exc}; it keeps running (atelier jobs wait {job.id}, then atelier jobs download "
                           f"{job.id})") from exc
        files = client.download_outputs(job, args.download) if args.download and job.outputs else []
    if args.json:
        print_json(job.model_dump(mode="json") | ({"files": [str(f) for f in files]} if args.download else {}))
    elif job.status == JobStatus.succeeded:
        for line in [str(f) for f in files] or [o.url for o in job.outputs]:
            print(line)
    if job.status != JobStatus.succeeded:
        reason = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
        say(f"atelier: job {job.id} {job.status.value}: {reason}")
        return 1
    say(f"job {job.id} succeeded: {len(job.outputs)} output(s)" + (f" in {args.download}" if files else ""))
    return 0
