"""The store's Lua scripts: one ``.lua`` file per kind of change, read once and registered by name."""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

LIBRARY_MARK = "--! "  # a script's first line ``--! ledger`` prepends ``scripts/ledger.lib.lua``


@cache
def source(name: str) -> str:
    text = resources.files("orchestrator.store").joinpath(f"scripts/{name}.lua").read_text()
    first = text.split("\n", 1)[0]
    if first.startswith(LIBRARY_MARK):
        libraries = first[len(LIBRARY_MARK):].split()
        text = "".join(source(f"{lib}.lib") for lib in libraries) + text
    return text


def script(redis: Redis, name: str) -> AsyncScript:
    """``scripts/{name}.lua`` registered on ``redis`` (EVALSHA, loaded again after a Redis restart)."""
    return redis.register_script(source(name))
