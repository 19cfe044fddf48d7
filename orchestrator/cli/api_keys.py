"""``atelier keys list`` and ``atelier keys budget``: a tenant's API keys (never the keys themselves:
their prefix, when they were made) and the budgets one key may have of its own."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from orchestrator.cli.client import CliError
from orchestrator.cli.redis_target import require_deployment, warn_if_empty
from orchestrator.infra import logs
from orchestrator.infra.settings import Settings
from orchestrator.store import keys
from orchestrator.store.ledger import Ledger
from orchestrator.store.queue import connect
from orchestrator.store.tenants import TENANT_RE


def add_api_key_commands(sub: Any) -> None:
    p = sub.add_parser("list", help="the tenant's API keys: prefix, creation time, budgets of their own")
    p.add_argument("--tenant", required=True)
    p.set_defaults(run=cmd_keys_list)
    p = sub.add_parser("budget", help="spending limits of one API key (USD per calendar month / day, UTC), "
                                      "on top of its tenant's")
    p.add_argument("--tenant", required=True)
    p.add_argument("--key-prefix", required=True, metavar="PREFIX",
                   help="the key's first characters as `atelier keys list` shows them (e.g. atl_AbCd)")
    p.add_argument("--monthly", type=float, metavar="USD")
    p.add_argument("--daily", type=float, metavar="USD")
    p.add_argument("--clear", action="store_true", help="remove the key's own limits")
    p.set_defaults(run=cmd_keys_budget)


def _check_tenant(name: str) -> None:
    if not TENANT_RE.match(name):
        raise CliError("tenant names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")


async def _key_records(redis: Any, tenant: str) -> list[tuple[str, dict[str, str]]]:
    digests = sorted(d.decode() if isinstance(d, bytes) else str(d)
                     for d in await redis.smembers(keys.tenant_api_keys(tenant)))
    out = []
    for digest in digests:
        raw = await redis.hgetall(keys.api_key(digest))
        out.append((digest, {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes)
                                                                                 else str(v)) for k, v in raw.items()}))
    return out


def _run(settings: Settings, work: Any) -> Any:
    async def go() -> Any:
        redis = await connect(settings.redis_url, settings.queue_name)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(go())
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc


def _budget_text(budgets: dict[str, dict[str, Any]]) -> str:
    own = [f"{label[4:]} {v['limit']:g} USD ({v['committed']:g} committed)" for label, v in budgets.items()
           if label.startswith("key_")]
    return "; ".join(own) or "the tenant's only"


def cmd_keys_list(args: argparse.Namespace) -> int:
    _check_tenant(args.tenant)
    settings = Settings()

    async def work(redis: Any) -> list[tuple[str, dict[str, str], dict[str, dict[str, Any]]]]:
        await warn_if_empty(redis, settings)
        return [(d, r, await Ledger(redis).budgets(args.tenant, api_key=d))
                for d, r in await _key_records(redis, args.tenant)]

    found = _run(settings, work)
    if not found:
        print(f"tenant {args.tenant} has no API keys (atelier keys create --tenant {args.tenant})")
    for _, record, budgets in found:
        print(f"{record.get('prefix', '?')}...  created {record.get('created_at', '?')}  budgets: "
              f"{_budget_text(budgets)}")
    return 0


def cmd_keys_budget(args: argparse.Namespace) -> int:
    _check_tenant(args.tenant)
    if args.clear == (args.monthly is not None or args.daily is not None):
        raise CliError("give --monthly USD and/or --daily USD, or --clear alone")
    if any(v is not None and v < 0 for v in (args.monthly, args.daily)):
        raise CliError("budgets are 0 or more USD")
    settings = Settings()

    async def work(redis: Any) -> tuple[str, dict[str, dict[str, Any]]]:
        await require_deployment(redis, settings, init=False)
        wanted = args.key_prefix
        matches = [(d, r) for d, r in await _key_records(redis, args.tenant)
                   if r.get("prefix", "").startswith(wanted) or wanted.startswith(r.get("prefix", "-"))]
        if len(matches) != 1:
            shown = ", ".join(r.get("prefix", "?") for _, r in matches) or "none"
            raise CliError(f"{len(matches)} of tenant {args.tenant}'s keys match {args.key_prefix!r} ({shown}): "
                           "give the prefix `atelier keys list` shows")
        digest, record = matches[0]
        ledger = Ledger(redis)
        for period in ("monthly", "daily"):
            amount = getattr(args, period)
            if args.clear or amount is not None:
                await ledger.set_budget(args.tenant, period, None if args.clear else amount, api_key=digest)
        return record.get("prefix", "?"), await ledger.budgets(args.tenant, api_key=digest)

    prefix, budgets = _run(settings, work)
    print(f"key {prefix}... of tenant {args.tenant}: budgets {_budget_text(budgets)}")
    return 0
