"""Checking what Atelier's webhooks sent (Standard Webhooks) and reading it as typed events."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from atelier_client.errors import WebhookVerificationError
from atelier_client.wire.events import WebhookEvent, parse_event
from atelier_client.wire.signing import DEFAULT_TOLERANCE
from atelier_client.wire.signing import verify as _verify_signature


def verify_webhook(secret: str | Sequence[str], headers: Mapping[str, str], body: bytes | str, *,
                   tolerance: float | None = DEFAULT_TOLERANCE) -> WebhookEvent:
    """Check an Atelier webhook (Standard Webhooks) and return its event, typed.

    ``secret`` is the ``whsec_...`` of the endpoint or tenant (or several, while rotating);
    ``headers`` the request's headers (any case); ``body`` the raw body, exactly as received.
    Returns a ``JobWebhookEvent`` (``job.*``: ``data`` is the ``JobView``), a ``BatchWebhookEvent``
    (``batch.*``: ``data`` is the ``BatchView``), or an ``OtherWebhookEvent`` for a type this client
    does not know. Raises ``WebhookVerificationError`` when a header is missing, the timestamp is
    more than ``tolerance`` seconds from now (replays), no signature matches, or the body is not an
    event. De-duplicate on the ``webhook-id`` header: it is the same on every retry of one delivery.
    """
    h = {k.lower(): v for k, v in headers.items()}
    raw = body.encode() if isinstance(body, str) else bytes(body)
    missing = [n for n in ("webhook-id", "webhook-timestamp", "webhook-signature") if not h.get(n)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    stamp = h["webhook-timestamp"].strip()
    if not stamp.isdigit():
        raise WebhookVerificationError("webhook-timestamp is not a Unix time")
    if tolerance is not None and abs(time.time() - int(stamp)) > tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g}s from now (stale or replayed)")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not _verify_signature(secrets, h, raw, tolerance=None):
        raise WebhookVerificationError("no webhook-signature matches the secret")
    try:
        event = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("the body is not JSON") from exc
    if not isinstance(event, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    try:
        return parse_event(event)
    except ValidationError as exc:
        raise WebhookVerificationError(f"the body is not an Atelier event: {exc.errors()[0].get('msg')}") from exc
