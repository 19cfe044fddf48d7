"""Outgoing webhooks: Standard Webhooks signing, event payloads and delivery records.

A delivery is created in the same Redis transaction as the job transition that
causes it (see ``store.JobStore.update``), so a crash can delay a webhook but
never lose it. ``webhook-id`` is the delivery id and stays the same on every
retry, so receivers can de-duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.ids import new_id
from orchestrator.models import JobStatus, JobView, utcnow

NOTIFY_STATUSES = frozenset({JobStatus.running, JobStatus.succeeded, JobStatus.failed,
                             JobStatus.canceled, JobStatus.timed_out})


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a Standard Webhooks signature (any of the space-separated ``v1,`` entries)."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        expected = sign(secret, h["webhook-id"], int(h["webhook-timestamp"]), body).split(",", 1)[1]
    except (KeyError, ValueError):
        return False
    given = [s.split(",", 1)[1] for s in h.get("webhook-signature", "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


class Attempt(BaseModel):
    at: datetime
    status_code: int | None = None
    latency_ms: float
    error: str | None = None
    response_excerpt: str | None = None


class Delivery(BaseModel):
    id: str
    tenant: str
    job_id: str | None = None
    url: str
    event_type: str
    sequence: int
    payload: str
    status: Literal["pending", "delivered", "dead"] = "pending"
    attempts: list[Attempt] = Field(default_factory=list)
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


def new_delivery(tenant: str, url: str, event_type: str, view: JobView) -> Delivery:
    return Delivery(id=new_id("msg"), tenant=tenant, job_id=view.id, url=url, event_type=event_type,
                    sequence=view.sequence, payload=job_event_payload(event_type, view))
