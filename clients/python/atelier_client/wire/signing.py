"""Standard Webhooks signatures (https://www.standardwebhooks.com/), used both ways.

Replicate (and OpenAI's and Google's project webhooks) sign what they send us
this way, and Atelier signs what it sends its clients the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

DEFAULT_TOLERANCE = 300


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.split("_", 1)[1] if secret.startswith("whsec_") else secret)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str | list[str], headers: Mapping[str, str], body: bytes,
           tolerance: float | None = DEFAULT_TOLERANCE) -> bool:
    """True when any ``v1,`` signature matches any of the secrets and the timestamp is fresh."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp = h.get("webhook-id"), h.get("webhook-timestamp")
    if not msg_id or not stamp or not stamp.isdigit():
        return False
    if tolerance is not None and abs(time.time() - int(stamp)) > tolerance:
        return False
    given = [s.split(",", 1)[1] for s in h.get("webhook-signature", "").split() if s.startswith("v1,")]
    secrets = [secret] if isinstance(secret, str) else secret
    for s in secrets:
        try:
            expected = sign(s, msg_id, int(stamp), body).split(",", 1)[1]
        except (ValueError, IndexError):
            continue
        if any(hmac.compare_digest(expected, g) for g in given):
            return True
    return False
