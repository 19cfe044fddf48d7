"""Identifiers: time-ordered (so Redis can list by id in creation order) and unguessable."""

from __future__ import annotations

import secrets
import time

# Crockford base32, lowercase: ASCII order equals numeric order.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode_time(ms: int, width: int = 10) -> str:
    chars = []
    for _ in range(width):
        ms, rem = divmod(ms, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def time_prefix(ms: int) -> str:
    """The leading characters of every id created at ``ms`` (for range queries)."""
    return _encode_time(ms)


def new_id(prefix: str, at_ms: int | None = None) -> str:
    """``<prefix>_<10 chars of milliseconds><16 random chars>``, e.g. ``job_01jd5...``."""
    ms = int(time.time() * 1000) if at_ms is None else at_ms
    rand = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    return f"{prefix}_{_encode_time(ms)}{rand}"


def derived_id(prefix: str, at_ms: int, seed: str) -> str:
    """A time-ordered id whose random part is derived from ``seed`` (stable across retries)."""
    import hashlib

    digest = hashlib.sha256(seed.encode()).digest()
    rand = "".join(_ALPHABET[b % 32] for b in digest[:16])
    return f"{prefix}_{_encode_time(at_ms)}{rand}"


def token(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)
