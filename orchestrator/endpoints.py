"""Webhook endpoints: a tenant's registered destinations, with an event filter, a secret and a health record.

Every job or batch event is offered to the tenant's enabled endpoints whose filter
takes it (an empty filter takes every event); the deliveries are recorded in the
same Redis step as the change that causes them (``Jobs.transition``, ``Batches``).
Each endpoint signs with its own ``whsec_`` secret; after a rotation the previous
secret keeps signing too, for a grace period, so receivers can switch over
(``webhook-signature`` then carries two ``v1,`` entries). An endpoint whose
deliveries keep failing, without a single success, for
``ATELIER_WEBHOOK_DISABLE_AFTER_SECONDS`` is disabled with a recorded reason.

Keys (prefix ``atl:``):

- ``t:{tenant}:endpoints``   hash: endpoint id -> endpoint JSON (a tenant has few)
- ``ep:{id}:health``         hash: ``failing_since`` (ms) while deliveries fail without a success
- ``ep:{id}:dl``, ``ep:{id}:dl:{status}``  delivery ids, newest last (kept by the store's scripts)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from orchestrator.ids import new_id, time_prefix
from orchestrator.models import utcnow
from orchestrator.store import JobStore, P, ms
from orchestrator.webhooks import Attempt, Delivery, DeliveryStatus, new_secret

EVENT_TYPES = ("job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out",
               "batch.progress", "batch.completed")
EventType = Literal["job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out",
                    "batch.progress", "batch.completed"]
MAX_ENDPOINTS_PER_TENANT = 50
MAX_PREVIOUS_SECRETS = 5
DEFAULT_GRACE_SECONDS = 24 * 3600

# Create an endpoint unless the tenant has too many. KEYS: 1 tenant hash; ARGV: 1 id, 2 JSON, 3 max
_CREATE = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class PreviousSecret(BaseModel):
    secret: str
    expires_at: datetime


class Endpoint(BaseModel):
    """An endpoint as stored (with its secrets)."""

    id: str
    tenant: str
    url: str
    events: list[str] = Field(default_factory=list)
    enabled: bool = True
    description: str | None = None
    secret: str
    previous_secrets: list[PreviousSecret] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None = None
    disabled_at: datetime | None = None

    def wants(self, event_type: str) -> bool:
        return self.enabled and (not self.events or event_type in self.events)

    def signing_secrets(self, now: datetime | None = None) -> list[str]:
        """The current secret, then every previous one still in its grace period."""
        at = now or utcnow()
        return [self.secret, *(p.secret for p in self.previous_secrets if p.expires_at > at)]


# -- what clients send and see ---------------------------------------------------------------------

class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    events: list[EventType] = Field(default_factory=list, description="Event types to send; empty: all")
    enabled: bool = True
    description: str | None = Field(None, max_length=500)


class EndpointUpdate(BaseModel):
    """Fields to change; ``events: []`` (or ``null``) subscribes to every event."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = None
    events: list[EventType] | None = None
    enabled: bool | None = None
    description: str | None = Field(None, max_length=500)


class EndpointView(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    events: list[str]
    enabled: bool
    description: str | None
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None
    disabled_at: datetime | None
    # Since when deliveries have failed without a success (``None`` when healthy).
    failing_since: datetime | None


class EndpointCreated(EndpointView):
    secret: str


class EndpointPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointView]
    next_cursor: str | None


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_seconds: int = Field(DEFAULT_GRACE_SECONDS, ge=0, le=7 * 24 * 3600,
                                      description="How long the previous secret keeps signing too")


class EndpointSecret(BaseModel):
    secret: str
    previous_secrets_expire_at: list[datetime]


class DeliveryView(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str  # the ``webhook-id`` header, the same on every attempt and replay
    endpoint_id: str | None
    event_type: str
    job_id: str | None
    batch_id: str | None
    sequence: int
    status: DeliveryStatus
    attempts: list[Attempt]
    next_attempt_at: datetime | None
    note: str | None
    created_at: datetime
    payload: Any = None


class DeliveryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryView]
    next_cursor: str | None


class Recovery(BaseModel):
    object: Literal["recovery"] = "recovery"
    since: datetime
    recovered: int
    delivery_ids: list[str]
    more: bool = Field(description="More dead deliveries remain: call again")


def delivery_view(d: Delivery, *, with_payload: bool = True) -> DeliveryView:
    return DeliveryView(
        id=d.id, endpoint_id=d.endpoint_id, event_type=d.event_type, job_id=d.job_id, batch_id=d.batch_id,
        sequence=d.sequence, status=d.status, attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None, note=d.note,
        created_at=d.created_at, payload=json.loads(d.payload) if with_payload else None,
    )


def restart(delivery: Delivery) -> None:
    """Start a new attempt series (a replay): same id and body, signed afresh when sent."""
    delivery.status = "pending"
    delivery.series_start = len(delivery.attempts)
    delivery.note = None
    delivery.next_attempt_at = utcnow()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Endpoints:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.redis = store.redis
        self._create = self.redis.register_script(_CREATE)

    @staticmethod
    def key(tenant: str) -> str:
        return f"{P}t:{tenant}:endpoints"

    @staticmethod
    def health_key(endpoint_id: str) -> str:
        return f"{P}ep:{endpoint_id}:health"

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

    def view(self, endpoint: Endpoint, failing_since: datetime | None) -> EndpointView:
        return EndpointView(id=endpoint.id, url=endpoint.url, events=endpoint.events, enabled=endpoint.enabled,
                            description=endpoint.description, created_at=endpoint.created_at,
                            updated_at=endpoint.updated_at, disabled_reason=endpoint.disabled_reason,
                            disabled_at=endpoint.disabled_at, failing_since=failing_since)

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
