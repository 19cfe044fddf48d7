"""The public schema of the webhook events Atelier sends (the body of a delivery).

A job's events carry the job as ``GET /v1/jobs/{id}`` shows it; a batch's events the batch. The
``type`` names the event (``EVENT_TYPES`` in ``webhooks.py``); a receiver dispatches on its prefix.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from atelier_client.wire.batches import BatchView
from atelier_client.wire.jobs import JobView


class JobWebhookEvent(BaseModel):
    """``job.running``, ``job.succeeded``, ``job.failed``, ``job.canceled``, ``job.timed_out``."""

    type: str = Field(description="`job.<status>`")
    timestamp: datetime
    sequence: int = Field(description="The job's version this event reports (later ones are higher)")
    data: JobView


class BatchWebhookEvent(BaseModel):
    """``batch.progress`` (rate-limited) and ``batch.completed``."""

    type: str = Field(description="`batch.progress` or `batch.completed`")
    timestamp: datetime
    data: BatchView


class OtherWebhookEvent(BaseModel):
    """An event type this schema does not know yet (a newer server): its body as sent."""

    type: str
    timestamp: datetime | None = None
    data: Any = None


WebhookEvent = JobWebhookEvent | BatchWebhookEvent | OtherWebhookEvent


def parse_event(body: dict[str, Any]) -> WebhookEvent:
    """The typed event for a delivery's JSON body (by its ``type``'s prefix)."""
    kind = str(body.get("type", ""))
    if kind.startswith("job."):
        return JobWebhookEvent.model_validate(body)
    if kind.startswith("batch."):
        return BatchWebhookEvent.model_validate(body)
    return OtherWebhookEvent.model_validate(body)
