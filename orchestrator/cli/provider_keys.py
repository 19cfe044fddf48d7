"""``atelier provider-keys list|restore``: the operator's view of the provider key pools.

A key the provider refused (or whose account ran out of balance) is taken out of the pool by
the workers (``orchestrator.keypool``); ``list`` shows every configured key by fingerprint with
its state and why, ``restore`` puts a fixed key back. Both talk to Redis directly, with the
server's configuration (``ATELIER_REDIS_URL``, provider keys from the environment or TOML file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from orchestrator.cli.client import CliError, usage
from orchestrator.infra import logs
from orchestrator.infra.settings import Settings
from orchestrator.store import keypool

T = TypeVar("T")


def add_provider_keys_commands(sub: Any) -> None:
    group = sub.add_parser("provider-keys", help="provider API keys: which are out of the pool, and restore")
    group.set_defaults(run=usage(group))
    actions = group.add_subparsers(dest="provider_keys_command", metavar="ACTION")
    p = actions.add_parser("list", help="every configured provider key (by fingerprint), in or out of the pool")
    p.add_argument("--json", action="store_true", help="one JSON object per key")
    p.set_defaults(run=cmd_list)
    p = actions.add_parser("restore", help="put a key taken out of the pool back in (after fixing it)")
    p.add_argument("provider")
    p.add_argument("key_id", help="the key's fingerprint, as `provider-keys list` shows it")
    p.set_defaults(run=cmd_restore)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        configured = {name: cfg.api_keys for name, cfg in settings.provider_settings().items()}
    except ValueError as exc:
        raise CliError(f"invalid configuration: {exc}") from exc
    rows = _with_redis(settings, lambda redis: keypool.pool_state(redis, configured))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no provider keys configured")
        return 0
    print(f"{'PROVIDER':<10} {'KEY_ID':<12}  {'STATE':<5} {'REASON':<20} {'SINCE':<20} {'BACK':<20} MESSAGE")
    for r in rows:
        back = r["back_at"] or ("operator" if r["state"] == "out" else "-")
        gone = "" if r["configured"] else " (no longer configured)"
        print(f"{r['provider']:<10} {r['key_id']:<12}  {r['state']:<5} {r['reason'] or '-':<20} "
              f"{r['since'] or '-':<20} {back:<20} {r['message'] or ''}{gone}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    settings = _settings()
    if not _with_redis(settings, lambda redis: keypool.restore(redis, args.provider, args.key_id)):
        raise CliError(f"{args.provider} key {args.key_id} is not out of the pool (see `atelier provider-keys list`)")
    print(f"{args.provider} key {args.key_id} is back in the pool (every process uses it within "
          f"{keypool.CACHE_SECONDS:g} s)")
    return 0


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's message names the variable
        raise CliError(f"invalid configuration: {exc}") from exc


def _with_redis(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(redis)`` against the configured Redis (saying so when it holds no Atelier data)."""
    from orchestrator.cli.redis_target import warn_if_empty
    from orchestrator.store.queue import connect

    async def run() -> T:
        redis = await connect(settings.redis_url, settings.queue_name)
        try:
            await warn_if_empty(redis, settings)
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except OSError as exc:
        raise CliError(f"cannot reach Redis at {logs.redact_url(settings.redis_url)}: {exc}") from exc
