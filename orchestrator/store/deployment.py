"""Whether a Redis holds an Atelier deployment.

The operator commands (``atelier keys create``, ``tenants retention``...) talk to Redis directly.
Pointed at the wrong one (the default ``redis://127.0.0.1:6379/0`` next to ``atelier dev``'s
private server), they would write keys no Atelier reads; they ask first, and refuse until told
(``--init``) that this Redis is meant to start a new deployment.
"""

from __future__ import annotations

from redis.asyncio import Redis

from orchestrator.store import keys
from orchestrator.wire.jobs import utcnow


async def mark(redis: Redis) -> None:
    """Record that an Atelier deployment lives here (kept from the first time)."""
    await redis.hsetnx(keys.DEPLOYMENT, "created_at", utcnow().isoformat())  # type: ignore[misc]


async def holds_atelier_data(redis: Redis) -> bool:
    """The marker, or any ``atl:`` key (a deployment from before the marker existed)."""
    if await redis.exists(keys.DEPLOYMENT):
        return True
    async for _ in redis.scan_iter(match=f"{keys.P}*", count=1000):
        return True
    return False
