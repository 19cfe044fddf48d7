"""Which Redis an operator command talks to, checked before it writes.

``keys create``, ``tenants retention`` and ``provider-keys`` go to Redis directly with
``ATELIER_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Next to ``atelier dev``, whose Redis
is private, that default is another server: a key written there is one the API never sees. So a
command that would write into a Redis holding no Atelier data refuses, saying how to point it at
the right one, unless ``--init`` says this Redis starts a new deployment; one that only reads says
so on stderr.
"""

from __future__ import annotations

import os
import sys

from redis.asyncio import Redis

from orchestrator.cli.client import CliError
from orchestrator.infra import logs
from orchestrator.infra.settings import Settings
from orchestrator.store import deployment


def describe(settings: Settings) -> str:
    """The Redis as the operator knows it: its URL without credentials, and where it came from."""
    url = logs.redact_url(settings.redis_url)
    if os.environ.get("ATELIER_REDIS_URL"):
        return f"Redis at {url} (ATELIER_REDIS_URL)"
    return f"Redis at {url} (the default: ATELIER_REDIS_URL is not set)"


def _nothing_here(settings: Settings) -> str:
    return (f"{describe(settings)} holds no Atelier data. Point ATELIER_REDIS_URL at the Redis your Atelier "
            f"API and workers use (`atelier dev` prints the export line for its private one)")


async def require_deployment(redis: Redis, settings: Settings, *, init: bool) -> None:
    """Before a write: refuse a Redis with no Atelier data, unless ``init`` (then mark it)."""
    if await deployment.holds_atelier_data(redis):
        return
    if not init:
        raise CliError(_nothing_here(settings) + ", or run again with --init to start a new deployment on it.")
    await deployment.mark(redis)
    print(f"atelier: {describe(settings)} had no Atelier data: marked as a new deployment (--init)",
          file=sys.stderr)


async def warn_if_empty(redis: Redis, settings: Settings) -> None:
    """Before a read: an empty answer from the wrong Redis looks like a healthy one; say which it is."""
    if not await deployment.holds_atelier_data(redis):
        print(f"atelier: warning: {_nothing_here(settings)}.", file=sys.stderr)
