"""Webhook endpoints in Redis: a tenant's registered destinations and their health records.

An endpoint whose deliveries keep failing, without a single success, for
``ATELIER_WEBHOOK_DISABLE_AFTER_SECONDS`` is disabled with a recorded reason.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis.exceptions import WatchError

from orchestrator.domain.ids import new_id, time_prefix
from orchestrator.domain.webhooks import (
    MAX_ENDPOINTS_PER_TENANT,
    MAX_PREVIOUS_SECRETS,
    Delivery,
    Endpoint,
    PreviousSecret,
    new_secret,
)
from orchestrator.store import keys
from orchestrator.store.jobs import JobStore, endpoints_fingerprint, ms
from orchestrator.store.scripts import script
from orchestrator.wire.jobs import utcnow
from orchestrator.wire.webhooks import DeliveryStatus, EndpointCreate


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Endpoints:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.redis = store.redis
        self._create = script(self.redis, "endpoint_create")

    key = staticmethod(keys.endpoints)
    health_key = staticmethod(keys.endpoint_health)

    async def snapshot(self, tenant: str) -> tuple[str, list[Endpoint]]:
        """The tenant's endpoints and their fingerprint (``endpoints_fingerprint``), read together."""
        raw = await self.redis.hvals(self.key(tenant))  # type: ignore[misc]
        return endpoints_fingerprint(raw), sorted((Endpoint.model_validate_json(r) for r in raw), key=lambda e: e.id)

    # -- endpoints ------------------------------------------------------------------------------
    async def for_tenant(self, tenant: str) -> list[Endpoint]:
        raw = await self.redis.hvals(self.key(tenant))  # type: ignore[misc]
        return sorted((Endpoint.model_validate_json(r) for r in raw), key=lambda e: e.id)

    async def get(self, tenant: str, endpoint_id: str) -> Endpoint | None:
        if not endpoint_id.startswith("ep_") or len(endpoint_id) > 64:
            return None
        raw = await self.redis.hget(self.key(tenant), endpoint_id)  # type: ignore[misc]
        return Endpoint.model_validate_json(raw) if raw else None

    async def matching(self, tenant: str, event_type: str) -> list[Endpoint]:
        """The tenant's enabled endpoints that take ``event_type`` (one read per event)."""
        return [e for e in await self.for_tenant(tenant) if e.wants(event_type)]

    async def create(self, tenant: str, body: EndpointCreate) -> Endpoint | None:
        """The new endpoint, or ``None`` when the tenant already has the most it may."""
        now = utcnow()
        endpoint = Endpoint(id=new_id("ep"), tenant=tenant, url=str(body.url), events=list(dict.fromkeys(body.events)),
                            enabled=body.enabled, description=body.description, secret=new_secret(),
                            created_at=now, updated_at=now,
                            disabled_reason=None if body.enabled else "created disabled",
                            disabled_at=None if body.enabled else now)
        ok = await self._create(keys=[self.key(tenant)],
                                args=[endpoint.id, endpoint.model_dump_json(), MAX_ENDPOINTS_PER_TENANT])
        return endpoint if ok else None

    async def update(self, tenant: str, endpoint_id: str,
                     change: Callable[[Endpoint], bool]) -> Endpoint | None:
        """Read, ``change`` in place (``False``: nothing to save), write back unless it changed meanwhile.

        Returns the endpoint as saved, or ``None`` if there is no such endpoint.
        """
        if not endpoint_id.startswith("ep_") or len(endpoint_id) > 64:
            return None
        key = self.key(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, endpoint_id)  # type: ignore[misc]
                    if raw is None:
                        return None
                    endpoint = Endpoint.model_validate_json(raw)
                    if not change(endpoint):
                        return endpoint  # (leaving the block unwatches)
                    endpoint.updated_at = utcnow()
                    pipe.multi()
                    pipe.hset(key, endpoint_id, endpoint.model_dump_json())
                    await pipe.execute()
                    return endpoint
                except WatchError:
                    continue

    async def rotate(self, tenant: str, endpoint_id: str, grace_seconds: float) -> Endpoint | None:
        def rotate(e: Endpoint) -> bool:
            now = utcnow()
            kept = [p for p in e.previous_secrets if p.expires_at > now]
            if grace_seconds > 0:
                kept.append(PreviousSecret(secret=e.secret, expires_at=now + timedelta(seconds=grace_seconds)))
            e.previous_secrets = kept[-MAX_PREVIOUS_SECRETS:]
            e.secret = new_secret()
            return True

        return await self.update(tenant, endpoint_id, rotate)

    async def delete(self, tenant: str, endpoint_id: str) -> bool:
        """Remove the endpoint, its health record, its delivery indexes and its delivery records."""
        if not endpoint_id.startswith("ep_") or len(endpoint_id) > 64:
            return False
        if not await self.redis.hdel(self.key(tenant), endpoint_id):  # type: ignore[misc]
            return False
        index = self.store.endpoint_deliveries_key(endpoint_id)
        while True:
            ids = [_s(i) for i in await self.redis.zrange(index, 0, 999)]
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*(self.store.delivery_key(i) for i in ids))
            pipe.zrem(self.store.DELIVERIES_DUE, *ids)
            pipe.zrem(index, *ids)
            await pipe.execute()
        await self.redis.delete(self.health_key(endpoint_id),
                                *(self.store.endpoint_deliveries_key(endpoint_id, s)
                                  for s in ("pending", "delivered", "dead")))
        return True

    # -- health ---------------------------------------------------------------------------------
    async def failing_since(self, endpoint_ids: list[str]) -> dict[str, datetime | None]:
        pipe = self.redis.pipeline(transaction=False)
        for endpoint_id in endpoint_ids:
            pipe.hget(self.health_key(endpoint_id), "failing_since")
        values = await pipe.execute()
        return {i: datetime.fromtimestamp(int(v) / 1000, UTC) if v else None
                for i, v in zip(endpoint_ids, values, strict=True)}

    async def reset_health(self, endpoint_id: str) -> None:
        await self.redis.hdel(self.health_key(endpoint_id), "failing_since")  # type: ignore[misc]

    async def record_success(self, endpoint_id: str) -> None:
        await self.reset_health(endpoint_id)

    async def record_failure(self, endpoint: Endpoint, disable_after_seconds: float, error: str) -> bool:
        """Note a failed attempt; disable the endpoint once it has failed for long enough. ``True`` if
        this call disabled it."""
        now = ms()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.health_key(endpoint.id), "failing_since", str(now))
        pipe.hget(self.health_key(endpoint.id), "failing_since")
        _, raw = await pipe.execute()
        since = int(raw or now)
        if now - since < disable_after_seconds * 1000:
            return False
        started = datetime.fromtimestamp(since / 1000, UTC)
        reason = (f"every delivery failed for {(now - since) / 1000:.0f} s (since {started.isoformat()}); "
                  f"last: {error}")[:500]
        disabled = False

        def disable(e: Endpoint) -> bool:
            nonlocal disabled
            if not e.enabled:
                return False
            e.enabled, e.disabled_reason, e.disabled_at = False, reason, utcnow()
            disabled = True
            return True

        await self.update(endpoint.tenant, endpoint.id, disable)
        return disabled

    # -- deliveries -----------------------------------------------------------------------------
    async def deliveries(self, endpoint_id: str, status: DeliveryStatus | None, cursor: str | None,
                         limit: int) -> tuple[list[Delivery], str | None]:
        """Newest first; ``cursor`` is the last id of the previous page."""
        key = self.store.endpoint_deliveries_key(endpoint_id, status)
        upper = f"({cursor}" if cursor else "+"
        ids = [_s(i) for i in await self.redis.zrevrangebylex(key, upper, "-", start=0, num=limit + 1)]
        page = ids[:limit]
        found = await self._load(page)
        return found, (page[-1] if len(ids) > limit else None)

    async def delivery(self, endpoint: Endpoint, delivery_id: str) -> Delivery | None:
        if not delivery_id.startswith("msg_") or len(delivery_id) > 80:
            return None
        d = await self.store.get_delivery(delivery_id)
        return d if d is not None and d.endpoint_id == endpoint.id and d.tenant == endpoint.tenant else None

    async def dead_since(self, endpoint_id: str, since: datetime, limit: int) -> list[Delivery]:
        """Dead deliveries created at or after ``since`` (ids begin with their creation time), oldest first."""
        key = self.store.endpoint_deliveries_key(endpoint_id, "dead")
        ids = await self.redis.zrangebylex(key, f"[msg_{time_prefix(ms(since.timestamp()))}", "+", start=0,
                                           num=limit)
        return await self._load([_s(i) for i in ids])

    async def _load(self, ids: list[str]) -> list[Delivery]:
        if not ids:
            return []
        raw = await self.redis.mget([self.store.delivery_key(i) for i in ids])
        return [Delivery.model_validate_json(r) for r in raw if r]
