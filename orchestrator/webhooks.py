"""Outgoing webhooks: Standard Webhooks signing, event payloads and delivery records.

A delivery is created in the same Redis transaction as the job transition that
causes it (see ``store.JobStore.update``), so a crash can delay a webhook but
never lose it. ``webhook-id`` is the delivery id and stays the same on every
retry, so receivers can de-duplicate.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.ids import new_id
from orchestrator.models import JobStatus, JobView, utcnow
from providers.signatures import sign, verify

__all__ = ["sign", "verify", "new_secret", "Delivery", "DeliveryStatus", "Attempt", "new_delivery",
           "job_event_payload"]

NOTIFY_STATUSES = frozenset({JobStatus.running, JobStatus.succeeded, JobStatus.failed,
                             JobStatus.canceled, JobStatus.timed_out})


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Attempt(BaseModel):
    at: datetime
    status_code: int | None = None
    latency_ms: float
    error: str | None = None
    response_excerpt: str | None = None


DeliveryStatus = Literal["pending", "delivered", "dead"]


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
