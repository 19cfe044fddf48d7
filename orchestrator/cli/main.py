"""The ``atelier`` command line.

Server side:   serve, worker, dev, demo, sandbox, keys create, provider-keys list|restore, models, healthcheck
Client side:   run, submit, get, jobs list|get|cancel|wait|download, batch submit|status,
               webhooks create|list|get|update|delete|secret|rotate|deliveries|delivery|replay|recover
               (talk to --url / ATELIER_URL with --api-key / ATELIER_API_KEY through the client package,
               atelier_client; see cli/client.py, cli/run.py, cli/batch.py, cli/webhooks.py;
               provider-keys: cli/provider_keys.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from orchestrator.cli.api_keys import add_api_key_commands
from orchestrator.cli.batch import add_batch_commands
from orchestrator.cli.client import CliError, add_jobs_commands, client_args, cmd_get, cmd_submit
from orchestrator.cli.models import add_models_command
from orchestrator.cli.money import add_budget_command, add_usage_command
from orchestrator.cli.provider_keys import add_provider_keys_commands
from orchestrator.cli.run import add_run_command
from orchestrator.cli.webhooks import add_webhooks_commands
from orchestrator.infra import logs
from orchestrator.infra.settings import Settings

if TYPE_CHECKING:
    from orchestrator.cli.devstack import Stack


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
        return result
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return exc.exit_code


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description="Asynchronous media job orchestrator")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", default=os.environ.get("ATELIER_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("ATELIER_PORT", "8000")))
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("worker", help="run an arq worker (jobs and webhook queues)")
    p.add_argument("--queues", default="jobs,webhooks", help="comma-separated: jobs, webhooks")
    p.add_argument("--completion-wait", type=float, default=30.0,
                   help="seconds to let running jobs finish after SIGTERM")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics and /healthz here (default ATELIER_WORKER_METRICS_PORT, "
                        "9100; 0 turns it off)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop: auto (uvloop where installed, as uvicorn does for the API), asyncio, uvloop")
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("healthcheck", help="exit 0 if the API or worker in this container answers /healthz")
    p.add_argument("--url", action="append",
                   help="URL to probe (repeatable; default: the API on :8000, then the worker metrics port)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(run=cmd_healthcheck)

    p = sub.add_parser("dev", help="everything in one process: private Redis, simulators, API, worker")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sandbox-port", type=int, default=8790)
    p.add_argument("--storage", default="./.atelier/storage")
    p.set_defaults(run=cmd_dev)

    p = sub.add_parser("demo", help="the offline demo: renders a mix of jobs on the simulators")
    p.add_argument("--storage", default="./.atelier/demo-storage")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--verbose", action="store_true", help="also print each job's final JSON")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("sandbox", help="serve the provider simulators alone")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.set_defaults(run=cmd_sandbox)

    keys_parser = sub.add_parser("keys", help="manage API keys")
    keys_parser.set_defaults(run=lambda _args: _usage(keys_parser))
    keys = keys_parser.add_subparsers(dest="keys_command", metavar="ACTION")
    p = keys.add_parser("create", help="create an API key for a tenant (printed once)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--init", action="store_true",
                   help="the Redis (ATELIER_REDIS_URL) holds no Atelier data yet: start a new deployment on it")
    p.set_defaults(run=cmd_keys_create)
    add_api_key_commands(keys)

    tenants_parser = sub.add_parser("tenants", help="per-tenant settings an operator sets")
    tenants_parser.set_defaults(run=lambda _args: _usage(tenants_parser))
    tenants = tenants_parser.add_subparsers(dest="tenants_command", metavar="ACTION")
    p = tenants.add_parser("retention", help="how long the tenant's finished jobs and outputs are kept")
    p.add_argument("--tenant", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--seconds", type=int, help="keep finished jobs this long (then they are deleted)")
    group.add_argument("--clear", action="store_true", help="back to ATELIER_RETENTION_SECONDS")
    p.add_argument("--init", action="store_true",
                   help="the Redis (ATELIER_REDIS_URL) holds no Atelier data yet: start a new deployment on it")
    p.set_defaults(run=cmd_tenant_retention)
    add_budget_command(tenants)
    add_usage_command(sub)

    quarantine_parser = sub.add_parser("quarantine", help="stored records set aside because they cannot be read")
    quarantine_parser.set_defaults(run=lambda _args: _usage(quarantine_parser))
    quarantine = quarantine_parser.add_subparsers(dest="quarantine_command", metavar="ACTION")
    p = quarantine.add_parser("list", help="list quarantined job records and why")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_quarantine_list)

    p = sub.add_parser("submit", help="submit a job")
    _client_args(p)
    p.add_argument("--provider", required=True)
    p.add_argument("--kind", required=True, choices=["image", "video", "audio"])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt")
    p.add_argument("--input", help="the job's input as JSON (merged with --prompt)")
    p.add_argument("--webhook-url")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="wait until the job finishes")
    p.set_defaults(run=cmd_submit)

    p = sub.add_parser("get", help="show a job")
    _client_args(p)
    p.add_argument("job_id")
    p.set_defaults(run=cmd_get)

    add_run_command(sub)
    add_jobs_commands(sub)
    add_batch_commands(sub)
    add_webhooks_commands(sub)
    add_provider_keys_commands(sub)
    add_models_command(sub)
    return parser


_client_args = client_args


# -- server commands --------------------------------------------------------------------

def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except Exception as exc:  # pydantic's message names the variable
        raise CliError(f"invalid configuration: {exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    logs.configure(settings.log_format, settings.log_level)
    if args.workers > 1:
        uvicorn.run("orchestrator.api.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_config=None, proxy_headers=True)
        return 0
    from orchestrator.api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None, proxy_headers=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run

    settings = _settings()
    logs.configure(settings.log_format, settings.log_level)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - {"jobs", "webhooks"}
    if unknown:
        raise CliError(f"unknown queue(s) {', '.join(sorted(unknown))}: use jobs and/or webhooks")
    port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        runner.run(run(settings, queues=queues, completion_wait=args.completion_wait, metrics_port=port or None))
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (``auto``): the worker spends 15-25 % less CPU per job on it (bench/throughput.py,
    three runs each); ``asyncio`` for the standard loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CliError("--loop uvloop: uvloop is not installed (pip install uvloop); or use --loop asyncio"
                           ) from None
        return None
    return uvloop.new_event_loop


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """For container HEALTHCHECKs: one image runs the API (``serve``) or a worker."""
    urls = args.url
    if not urls:
        try:
            worker_port = Settings().worker_metrics_port
        except Exception:  # noqa: BLE001 - an invalid configuration is reported by the server itself
            worker_port = 9100
        urls = ["http://127.0.0.1:8000/healthz"] + ([f"http://127.0.0.1:{worker_port}/healthz"] if worker_port else [])
    for url in urls:
        try:
            if httpx.get(url, timeout=args.timeout).status_code == 200:
                return 0
        except httpx.HTTPError:
            continue
    print(f"atelier: unhealthy: no answer from {', '.join(urls)}", file=sys.stderr)
    return 1


def cmd_dev(args: argparse.Namespace) -> int:
    from orchestrator.cli.devstack import dev_stack

    async def run() -> None:
        logs.configure("text", os.environ.get("ATELIER_LOG_LEVEL", "INFO"))
        storage = "file://" + str(Path(args.storage).resolve())
        async with dev_stack(api_port=args.port, sandbox_port=args.sandbox_port, storage_url=storage,
                             log_format="text") as stack:
            print(dev_banner(stack, storage), flush=True)
            await _until_stopped()
        print("Atelier dev stack stopped (its private Redis with it).", flush=True)

    _run_until_interrupted(run())
    return 0


def dev_banner(stack: Stack, storage: str) -> str:
    """What ``atelier dev`` prints: where everything is, and the exports the other commands need."""
    redis_url = stack.settings.redis_url
    off = [what for what, allowed in (("webhooks", stack.settings.webhook_allow_private),
                                      ("media inputs", stack.settings.allow_private_fetches)) if allowed]
    guard = ("on (webhooks and media inputs never reach loopback or private addresses)\n" if not off else
             f"OFF for {' and '.join(off)} (ATELIER_WEBHOOK_ALLOW_PRIVATE=true), so local receivers work;\n"
             f"              they may reach loopback and private addresses. Never run production like this.\n")
    return (
        f"Atelier dev stack is up.\n"
        f"  API:        {stack.api_url}   (docs: {stack.api_url}/docs)\n"
        f"  API key:    {stack.api_key}\n"
        f"  dashboard:  {stack.api_url}/dashboard   (sign in with the API key)\n"
        f"  simulators: {stack.sandbox_url}/<provider>   (every provider is simulated; nothing is billed)\n"
        f"  storage:    {storage}\n"
        f"  Redis:      {redis_url}   (private: it stops with this command)\n"
        f"  guard:      private-address guard {guard}"
        f"In another shell, point the other commands at this stack:\n"
        f"  export ATELIER_URL={stack.api_url} ATELIER_API_KEY={stack.api_key} ATELIER_REDIS_URL={redis_url}\n"
        f"Then try:\n"
        f"  atelier submit --provider replicate --kind image --model black-forest-labs/flux-schnell "
        f"--prompt 'a red fox' --wait\n"
        f"  atelier keys create --tenant other      # a second tenant's key, in this stack's Redis\n"
        f"Ctrl-C (or SIGTERM) stops everything."
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli.demo import run_demo

    logs.configure("text", "WARNING")

    async def run() -> int:
        # SIGTERM unwinds the demo like Ctrl-C does, so its private redis-server stops with it.
        demo = asyncio.ensure_future(run_demo(Path(args.storage), args.timeout, verbose=args.verbose))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, demo.cancel)
        try:
            return await demo
        except asyncio.CancelledError:
            return 128 + signal.SIGTERM

    return asyncio.run(run())


def cmd_sandbox(args: argparse.Namespace) -> int:
    from orchestrator.cli.devstack import sandbox

    async def run() -> None:
        async with sandbox(args.port, args.host) as (url, simulators):
            print(f"Provider simulators on {url}:")
            for name in simulators:
                print(f"  {name:<10} {url}/{name}")
            print(f"Point Atelier at them with ATELIER_SANDBOX=1 ATELIER_SANDBOX_URL={url}", flush=True)
            await _forever()

    _run_until_interrupted(run())
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from orchestrator.cli.redis_target import require_deployment
    from orchestrator.store.queue import connect
    from orchestrator.store.tenants import TENANT_RE, create_api_key

    if not TENANT_RE.match(args.tenant):
        raise CliError("tenant names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    settings = _settings()

    async def run() -> str:
        redis = await connect(settings.redis_url, settings.queue_name)
        try:
            await require_deployment(redis, settings, init=args.init)
            return await create_api_key(redis, args.tenant)
        finally:
            await redis.aclose()

    try:
        key = asyncio.run(run())
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc
    print(key)
    print(f"(API key for tenant {args.tenant!r}; it is shown only this once)", file=sys.stderr)
    return 0


def cmd_tenant_retention(args: argparse.Namespace) -> int:
    from orchestrator.cli.redis_target import require_deployment
    from orchestrator.store.queue import connect
    from orchestrator.store.tenants import TENANT_RE, set_tenant_retention

    if not TENANT_RE.match(args.tenant):
        raise CliError("tenant names are 1-63 letters, digits, '.', '_' or '-'")
    if args.seconds is not None and args.seconds <= 0:
        raise CliError("--seconds must be a positive number of seconds (or use --clear)")
    settings = _settings()

    async def run() -> None:
        redis = await connect(settings.redis_url, settings.queue_name)
        try:
            await require_deployment(redis, settings, init=args.init)
            await set_tenant_retention(redis, args.tenant, None if args.clear else args.seconds)
        finally:
            await redis.aclose()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc
    kept = f"{settings.retention_seconds} s (ATELIER_RETENTION_SECONDS)" if args.clear else f"{args.seconds} s"
    print(f"tenant {args.tenant}: finished jobs are kept {kept}; jobs finishing from now on use it")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from orchestrator.cli.redis_target import warn_if_empty
    from orchestrator.store.jobs import JobStore
    from orchestrator.store.queue import connect

    settings = _settings()

    async def run() -> dict[str, str]:
        redis = await connect(settings.redis_url, settings.queue_name)
        try:
            await warn_if_empty(redis, settings)
            return await JobStore(redis).quarantined()
        finally:
            await redis.aclose()

    try:
        found = asyncio.run(run())
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
    elif not found:
        print("no quarantined records")
    else:
        for job_id, reason in sorted(found.items()):
            print(f"{job_id}  {reason}")
    return 0


async def _forever() -> None:
    await asyncio.Event().wait()


async def _until_stopped() -> None:
    """Wait for SIGTERM or SIGINT; returning lets every ``async with`` close (the private Redis too)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _run_until_interrupted(coro: Any) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
