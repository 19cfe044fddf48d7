"""Verifying fal's webhooks: Ed25519 signatures checked against a JWKS that is fetched and cached.

fal signs each webhook with headers ``X-Fal-Webhook-Request-Id``, ``-User-Id``,
``-Timestamp`` (unix seconds) and ``-Signature`` (hex). The signed message is
``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(raw_body)}"`` (UTF-8); any
Ed25519 key of the JWKS (``kty: OKP``, ``crv: Ed25519``, ``x`` = base64url raw key)
may have signed it. The headers carry no key id, so an unknown (rotated) key shows
up as "no cached key verifies": the JWKS is then fetched again, at most once per
``refresh_min_seconds`` so that forged callbacks cannot make us hammer it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from providers.errors import CallbackRejected

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "x-fal-webhook-request-id"
HEADER_USER_ID = "x-fal-webhook-user-id"
HEADER_TIMESTAMP = "x-fal-webhook-timestamp"
HEADER_SIGNATURE = "x-fal-webhook-signature"

# After a failed JWKS fetch, wait this long before an ordinary (non-forced) fetch is tried again.
FAILED_FETCH_BACKOFF = 5.0


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


def parse_jwks(document: Any) -> list[Ed25519PublicKey]:
    """The usable Ed25519 keys of a JWKS document; anything else is skipped."""
    keys: list[Ed25519PublicKey] = []
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        x = entry.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


class JwksVerifier:
    """Verifies fal webhook signatures; holds the cached JWKS (one per adapter instance)."""

    def __init__(self, url: str, *, cache_seconds: float = 86400.0, refresh_min_seconds: float = 30.0,
                 tolerance_seconds: float = 300.0, timeout_seconds: float = 10.0,
                 expected_user_id: str | None = None) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.refresh_min_seconds = refresh_min_seconds
        self.tolerance_seconds = tolerance_seconds
        self.timeout_seconds = timeout_seconds
        self.expected_user_id = expected_user_id
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._failed_at: float | None = None
        self._forced_at: float | None = None
        self._lock = asyncio.Lock()

    async def verify(self, http: httpx.AsyncClient, headers: Mapping[str, str], body: bytes) -> str:
        """Return the signed request id, or raise ``CallbackRejected``."""
        h = {k.lower(): v for k, v in headers.items()}
        request_id, user_id = h.get(HEADER_REQUEST_ID), h.get(HEADER_USER_ID)
        stamp, signature_hex = h.get(HEADER_TIMESTAMP), h.get(HEADER_SIGNATURE)
        if not (request_id and user_id and stamp and signature_hex):
            raise CallbackRejected("fal webhook without its X-Fal-Webhook-* signature headers")
        try:
            timestamp = int(stamp)
        except ValueError as exc:
            raise CallbackRejected("fal webhook timestamp is not a number") from exc
        if abs(time.time() - timestamp) > self.tolerance_seconds:
            raise CallbackRejected("fal webhook timestamp is outside the tolerance (stale or replayed)")
        if self.expected_user_id and user_id != self.expected_user_id:
            raise CallbackRejected("fal webhook for another fal user")
        try:
            signature = bytes.fromhex(signature_hex.strip())
        except ValueError as exc:
            raise CallbackRejected("fal webhook signature is not hex") from exc
        if len(signature) != 64:
            raise CallbackRejected("fal webhook signature has the wrong length")
        message = signed_message(request_id, user_id, stamp, body)
        if self._check(await self._current_keys(http), signature, message):
            return request_id
        # Perhaps fal rotated its key: look at the JWKS again (rate-limited), then decide.
        if await self._forced_refresh(http) and self._check(self._keys, signature, message):
            return request_id
        raise CallbackRejected("fal webhook signature did not verify against fal's published keys")

    @staticmethod
    def _check(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
        for key in keys:
            try:
                key.verify(signature, message)
                return True
            except InvalidSignature:
                continue
        return False

    async def _current_keys(self, http: httpx.AsyncClient) -> list[Ed25519PublicKey]:
        now = time.monotonic()
        fresh = self._fetched_at is not None and now - self._fetched_at < self.cache_seconds
        backing_off = self._failed_at is not None and now - self._failed_at < FAILED_FETCH_BACKOFF
        if not fresh and not backing_off:
            async with self._lock:
                fetched_at = self._fetched_at
                if fetched_at is None or time.monotonic() - fetched_at >= self.cache_seconds:
                    await self._fetch(http)
        if not self._keys:
            raise CallbackRejected("fal's webhook keys (JWKS) could not be fetched")
        return self._keys  # stale keys stay usable while a refresh fails

    async def _forced_refresh(self, http: httpx.AsyncClient) -> bool:
        """Fetch the JWKS again because no cached key verified; ``True`` if the keys may have changed."""
        started = time.monotonic()
        async with self._lock:
            if self._fetched_at is not None and self._fetched_at >= started:
                return True  # another callback refreshed while we waited
            if self._forced_at is not None and time.monotonic() - self._forced_at < self.refresh_min_seconds:
                return False
            self._forced_at = time.monotonic()
            return await self._fetch(http)

    async def _fetch(self, http: httpx.AsyncClient) -> bool:
        try:
            response = await http.get(self.url, timeout=self.timeout_seconds,
                                      headers={"Accept": "application/json"})
            keys = parse_jwks(response.json()) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("fal JWKS fetch failed: %s", exc.__class__.__name__)
            keys = []
        else:
            if not keys:
                log.warning("fal JWKS fetch gave no usable Ed25519 keys (HTTP %s)", response.status_code)
        if not keys:
            self._failed_at = time.monotonic()
            return False
        self._keys, self._fetched_at, self._failed_at = keys, time.monotonic(), None
        return True
