"""The store's Lua scripts: one ``.lua`` file per kind of change, read once and registered by name."""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    return resources.files("orchestrator.store").joinpath(f"scripts/{name}.lua").read_text()


def script(redis: Redis, name: str) -> AsyncScript:
    """``scripts/{name}.lua`` registered on ``redis`` (EVALSHA, loaded again after a Redis restart)."""
    return redis.register_script(source(name))
