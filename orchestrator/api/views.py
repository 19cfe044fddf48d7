"""Rendering stored webhook records as clients see them (job views: ``orchestrator.services.views``)."""

from __future__ import annotations

import json
from datetime import datetime

from orchestrator.domain.webhooks import Delivery, Endpoint
from orchestrator.wire.webhooks import DeliveryView, EndpointView


def endpoint_view(endpoint: Endpoint, failing_since: datetime | None) -> EndpointView:
    return EndpointView(id=endpoint.id, url=endpoint.url, events=endpoint.events, enabled=endpoint.enabled,
                        description=endpoint.description, created_at=endpoint.created_at,
                        updated_at=endpoint.updated_at, disabled_reason=endpoint.disabled_reason,
                        disabled_at=endpoint.disabled_at, failing_since=failing_since)


def delivery_view(d: Delivery, *, with_payload: bool = True) -> DeliveryView:
    return DeliveryView(
        id=d.id, endpoint_id=d.endpoint_id, event_type=d.event_type, job_id=d.job_id, batch_id=d.batch_id,
        sequence=d.sequence, status=d.status, attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None, note=d.note,
        created_at=d.created_at, payload=json.loads(d.payload) if with_payload else None,
    )


