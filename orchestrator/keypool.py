"""Provider key pools: a job remembers which key submitted it (by fingerprint, never the key)."""

from __future__ import annotations

import hashlib

from orchestrator.models import Job


def key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def pick(keys: list[str], job: Job) -> str:
    """Spread jobs over the pool deterministically (a retried submit uses the same key)."""
    if not keys:
        raise LookupError(f"no API key configured for {job.provider}")
    digest = int(hashlib.sha256(job.id.encode()).hexdigest()[:8], 16)
    return keys[digest % len(keys)]


def resolve(keys: list[str], wanted: str | None) -> str | None:
    """The pool key with fingerprint ``wanted``; ``None`` if it left the pool."""
    return next((k for k in keys if key_id(k) == wanted), None)
