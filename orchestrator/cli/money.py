"""``atelier tenants budget`` and ``atelier usage``: an operator sets a tenant's budgets and reads its
spend (the figures ``GET /v1/usage`` gives the tenant)."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, date, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.cli.client import CliError
from orchestrator.cli.redis_target import require_deployment, warn_if_empty
from orchestrator.infra import logs
from orchestrator.infra.settings import Settings
from orchestrator.services.usage import MAX_DAYS, usage_report
from orchestrator.store.ledger import Ledger
from orchestrator.store.queue import connect
from orchestrator.store.tenants import TENANT_RE
from orchestrator.wire.usage import UsageReport


def add_budget_command(tenants: Any) -> None:
    p = tenants.add_parser("budget", help="the tenant's spending limits (USD per calendar month / day, UTC)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--monthly", type=float, metavar="USD", help="limit per calendar month")
    p.add_argument("--daily", type=float, metavar="USD", help="limit per day")
    p.add_argument("--clear", action="store_true", help="remove both limits")
    p.add_argument("--init", action="store_true",
                   help="the Redis (ATELIER_REDIS_URL) holds no Atelier data yet: start a new deployment on it")
    p.set_defaults(run=cmd_budget)


def add_usage_command(sub: Any) -> None:
    p = sub.add_parser("usage", help="a tenant's spend and job counts, with its budgets")
    p.add_argument("--tenant", required=True)
    p.add_argument("--from", dest="start", type=date.fromisoformat, metavar="YYYY-MM-DD",
                   help="first day (UTC; default: this month's first)")
    p.add_argument("--to", dest="end", type=date.fromisoformat, metavar="YYYY-MM-DD", help="last day (default: today)")
    p.add_argument("--group-by", choices=("provider", "model", "day", "batch"))
    p.add_argument("--json", action="store_true", help="GET /v1/usage's JSON")
    p.set_defaults(run=cmd_usage)


async def _with_ledger(settings: Settings, work: Any, *, write: bool, init: bool = False) -> Any:
    redis = await connect(settings.redis_url, settings.queue_name)
    try:
        if write:
            await require_deployment(redis, settings, init=init)
        else:
            await warn_if_empty(redis, settings)
        return await work(Ledger(redis))
    finally:
        await redis.aclose()


def _run(settings: Settings, work: Any, *, write: bool, init: bool = False) -> Any:
    try:
        return asyncio.run(_with_ledger(settings, work, write=write, init=init))
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc


def _tenant(name: str) -> str:
    if not TENANT_RE.match(name):
        raise CliError("tenant names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def cmd_budget(args: argparse.Namespace) -> int:
    tenant = _tenant(args.tenant)
    if args.clear and (args.monthly is not None or args.daily is not None):
        raise CliError("give --clear alone, or --monthly/--daily amounts")
    if not args.clear and args.monthly is None and args.daily is None:
        raise CliError("give --monthly USD and/or --daily USD (or --clear to remove the limits)")
    for flag, value in (("--monthly", args.monthly), ("--daily", args.daily)):
        if value is not None and value < 0:
            raise CliError(f"{flag} must be 0 or more USD")

    async def work(ledger: Ledger) -> dict[str, dict[str, Any]]:
        if args.clear:
            await ledger.set_budget(tenant, "monthly", None)
            await ledger.set_budget(tenant, "daily", None)
        if args.monthly is not None:
            await ledger.set_budget(tenant, "monthly", args.monthly)
        if args.daily is not None:
            await ledger.set_budget(tenant, "daily", args.daily)
        return await ledger.budgets(tenant)

    for period, view in _run(Settings(), work, write=True, init=args.init).items():
        limit = "none" if view["limit"] is None else f"{view['limit']:g} USD"
        print(f"tenant {tenant}: {period} budget {limit} ({view['period']}: {view['committed']:g} USD committed)")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    tenant = _tenant(args.tenant)
    end = args.end or datetime.now(UTC).date()
    start = args.start or end.replace(day=1)
    if start > end:
        raise CliError("--from must not be after --to")
    if (end - start).days > MAX_DAYS:
        raise CliError(f"the period spans at most {MAX_DAYS} days")

    async def work(ledger: Ledger) -> UsageReport:
        return await usage_report(ledger, tenant, start, end, args.group_by)

    report: UsageReport = _run(Settings(), work, write=False)
    if args.json:
        print(json.dumps(report.model_dump(mode="json", by_alias=True), indent=2))
        return 0
    table = Table(title=f"{tenant}: jobs accepted {start} .. {end} (USD)")
    for column in (args.group_by or "", "jobs", "finished", "succeeded", "estimated", "final"):
        table.add_column(column, justify="left" if column == (args.group_by or "") else "right")
    rows = [(g.key, g) for g in report.groups] + [("total", report.total)]
    for key, f in rows:
        table.add_row(key, str(f.jobs), str(f.finished), str(f.succeeded), f"{f.estimated:.4f}", f"{f.final:.4f}")
    Console().print(table)
    for period, budget in report.budgets.items():
        if budget.limit is not None:
            print(f"{period} budget ({budget.period}): {budget.limit:g} USD, {budget.committed:g} committed, "
                  f"{budget.remaining:g} left")
    return 0
