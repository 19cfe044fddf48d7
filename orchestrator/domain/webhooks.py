"""Outgoing webhooks: event payloads, delivery records and the tenants' registered endpoints.

A delivery is created in the same Redis step as the job transition that causes it
(see ``orchestrator.store.jobs``), so a crash can delay a webhook but never lose it.
``webhook-id`` is the delivery id and stays the same on every retry, so receivers can
de-duplicate. Every job or batch event is offered to the tenant's enabled endpoints whose
filter takes it (an empty filter takes every event). Each endpoint signs with its own
``whsec_`` secret; after a rotation the previous secret keeps signing too, for a grace period.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from orchestrator.domain.ids import new_id
from orchestrator.wire.jobs import JobStatus, JobView, utcnow
from orchestrator.wire.webhooks import Attempt, DeliveryStatus

NOTIFY_STATUSES = frozenset({JobStatus.running, JobStatus.succeeded, JobStatus.failed,
                             JobStatus.canceled, JobStatus.timed_out})
MAX_ENDPOINTS_PER_TENANT = 50
MAX_PREVIOUS_SECRETS = 5


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Delivery(BaseModel):
    id: str
    tenant: str
    job_id: str | None = None
    batch_id: str | None = None
    # Set for deliveries to a registered webhook endpoint (signed with its secret); ``None`` for a
    # job's or batch's own ``webhook_url`` (signed with the tenant's secret).
    endpoint_id: str | None = None
    url: str
    event_type: str
    sequence: int
    payload: str
    status: DeliveryStatus = "pending"
    attempts: list[Attempt] = Field(default_factory=list)
    # Index in ``attempts`` where the current series began (a replay starts a new series).
    series_start: int = 0
    # Why a delivery ended without attempts running out (its endpoint was disabled...).
    note: str | None = None
    next_attempt_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)


def destination(delivery: Delivery) -> str:
    """Where a delivery goes, for fairness and circuit breaking: its registered endpoint, or the origin
    of a job's or batch's own ``webhook_url`` *per tenant* (one tenant cannot open another's circuit)."""
    if delivery.endpoint_id:
        return f"ep:{delivery.endpoint_id}"
    parts = urlsplit(delivery.url)
    origin = f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    return "url:" + hashlib.sha256(f"{delivery.tenant}\n{origin}".encode()).hexdigest()[:24]


def job_event_payload(event_type: str, view: JobView) -> str:
    body: dict[str, Any] = {
        "type": event_type,
        "timestamp": utcnow().isoformat(),
        "sequence": view.sequence,
        "data": view.model_dump(mode="json"),
    }
    return json.dumps(body, separators=(",", ":"))


def new_delivery(tenant: str, url: str, event_type: str, view: JobView, *, payload: str | None = None,
                 endpoint_id: str | None = None) -> Delivery:
    return Delivery(id=new_id("msg"), tenant=tenant, job_id=view.id, batch_id=view.batch_id,
                    endpoint_id=endpoint_id, url=url, event_type=event_type, sequence=view.sequence,
                    payload=payload if payload is not None else job_event_payload(event_type, view))


def restart(delivery: Delivery) -> None:
    """Start a new attempt series (a replay): same id and body, signed afresh when sent."""
    delivery.status = "pending"
    delivery.series_start = len(delivery.attempts)
    delivery.note = None
    delivery.next_attempt_at = utcnow()


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
