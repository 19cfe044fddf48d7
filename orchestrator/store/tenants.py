"""Tenants and their API keys. Keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import re
import secrets

from redis.asyncio import Redis

from orchestrator.domain.webhooks import new_secret
from orchestrator.store import keys
from orchestrator.wire.jobs import utcnow

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


async def create_api_key(redis: Redis, tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError("tenant names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    api_key = "atl_" + secrets.token_urlsafe(32)
    digest = hash_key(api_key)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.api_key(digest), mapping={"tenant": tenant, "created_at": utcnow().isoformat(),
                                              "prefix": api_key[:8]})
    pipe.sadd(keys.tenant_api_keys(tenant), digest)
    await pipe.execute()
    return api_key


async def tenant_for_key(redis: Redis, api_key: str) -> str | None:
    tenant = await redis.hget(keys.api_key(hash_key(api_key)), "tenant")  # type: ignore[misc]
    if tenant is None:
        return None
    return tenant.decode() if isinstance(tenant, bytes) else str(tenant)


async def webhook_secret(redis: Redis, tenant: str) -> str:
    """The tenant's signing secret, created on first use."""
    key = keys.tenant_webhook_secret(tenant)
    pipe = redis.pipeline(transaction=False)  # one round trip: read for every webhook sent
    pipe.set(key, new_secret(), nx=True)
    pipe.get(key)
    _, secret = await pipe.execute()
    assert secret is not None
    return secret.decode() if isinstance(secret, bytes) else str(secret)


async def tenant_retention(redis: Redis, tenant: str) -> int | None:
    """The tenant's own retention (seconds), if an operator set one."""
    raw = await redis.hget(keys.tenant_settings(tenant), "retention_seconds")  # type: ignore[misc]
    return int(raw) if raw else None


async def set_tenant_retention(redis: Redis, tenant: str, seconds: int | None) -> None:
    """Set (or, with ``None``, clear) the tenant's retention; new finishes use it within a minute."""
    if seconds is None:
        await redis.hdel(keys.tenant_settings(tenant), "retention_seconds")  # type: ignore[misc]
    else:
        await redis.hset(keys.tenant_settings(tenant), "retention_seconds", str(int(seconds)))  # type: ignore[misc]


async def shared_secret(redis: Redis, name: str) -> str:
    """A deployment-wide random secret kept in Redis (e.g. for local file URLs)."""
    key = keys.shared_secret(name)
    await redis.set(key, secrets.token_hex(32), nx=True)
    value = await redis.get(key)
    assert value is not None
    return value.decode() if isinstance(value, bytes) else str(value)
