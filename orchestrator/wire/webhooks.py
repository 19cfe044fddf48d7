"""The public schema of webhook endpoints and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictBool
from pydantic.json_schema import SkipJsonSchema

from orchestrator.wire.strict import Integer

# ``job.fallback``: the job moved to its next fallback provider (issue 17).
EVENT_TYPES = ("job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out", "job.fallback",
               "batch.progress", "batch.completed")
EventType = Literal["job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out", "job.fallback",
                    "batch.progress", "batch.completed"]
DEFAULT_GRACE_SECONDS = 24 * 3600


class Attempt(BaseModel):
    at: datetime
    status_code: int | None = None
    latency_ms: float
    error: str | None = None
    response_excerpt: str | None = None


DeliveryStatus = Literal["pending", "delivered", "dead"]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    events: list[EventType] = Field(default_factory=list, description="Event types to send; empty: all")
    enabled: StrictBool = True
    description: str | None = Field(None, max_length=500)


class EndpointUpdate(BaseModel):
    """Fields to change; ``events: []`` (or ``null``) subscribes to every event."""

    model_config = ConfigDict(extra="forbid")

    # absent: unchanged; null is refused (422), so the schema does not offer it
    url: AnyHttpUrl | SkipJsonSchema[None] = None
    events: list[EventType] | None = None
    enabled: StrictBool | SkipJsonSchema[None] = None
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

    grace_period_seconds: Integer = Field(DEFAULT_GRACE_SECONDS, ge=0, le=7 * 24 * 3600,
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
