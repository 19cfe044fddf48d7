"""Dashboard sessions: a signed, expiring cookie naming the tenant and the API key's hash; CSRF tokens.

The cookie holds ``base64(json).signature`` where the signature is HMAC-SHA256 under the deployment's
dashboard secret (``ATELIER_DASHBOARD_SECRET``, else one generated and kept in Redis like the file-URL
secret). It never holds the API key itself, only its SHA-256 (the stored hash), so a deleted key ends
every session signed in with it. The CSRF token is an HMAC of the session's random nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from orchestrator.services.runtime import Runtime
from orchestrator.store import keys
from orchestrator.store.tenants import hash_key, shared_secret, tenant_for_key

COOKIE = "atelier_session"


@dataclass(frozen=True)
class Session:
    tenant: str
    key_hash: str
    nonce: str
    expires: int
    csrf: str
    admin: bool = False  # the tenant is one ATELIER_ADMIN_TENANTS names (the operations view)


async def _secret(rt: Runtime, request: Request) -> bytes:
    """The signing secret, read once per app (kept on ``app.state``)."""
    cached: bytes | None = getattr(request.app.state, "dashboard_secret", None)
    if cached is None:
        configured = rt.settings.dashboard_secret
        value = configured.get_secret_value() if configured else await shared_secret(rt.redis, "dashboard")
        cached = value.encode()
        request.app.state.dashboard_secret = cached
    return cached


def _sign(secret: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, payload, hashlib.sha256).digest()).decode().rstrip("=")


def _csrf(secret: bytes, nonce: str) -> str:
    return _sign(secret, b"csrf:" + nonce.encode())


async def sign_in(rt: Runtime, request: Request, api_key: str) -> tuple[str, Session] | None:
    """The cookie value and its session for a valid API key, or ``None``."""
    tenant = await tenant_for_key(rt.redis, api_key)
    if tenant is None:
        return None
    secret = await _secret(rt, request)
    nonce = secrets.token_urlsafe(16)
    expires = int(time.time()) + rt.settings.dashboard_session_seconds
    payload = json.dumps({"t": tenant, "k": hash_key(api_key), "n": nonce, "e": expires},
                         separators=(",", ":")).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    session = Session(tenant, hash_key(api_key), nonce, expires, _csrf(secret, nonce), tenant in rt.settings.admins)
    return f"{body}.{_sign(secret, body.encode())}", session


async def current(rt: Runtime, request: Request) -> Session | None:
    """The request's valid session: signature good, not expired, the API key still the tenant's."""
    raw = request.cookies.get(COOKIE)
    if not raw or len(raw) > 1024 or "." not in raw:
        return None
    body, _, signature = raw.rpartition(".")
    secret = await _secret(rt, request)
    if not hmac.compare_digest(signature, _sign(secret, body.encode())):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        tenant, key_hash, nonce, expires = str(data["t"]), str(data["k"]), str(data["n"]), int(data["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires <= time.time():
        return None
    owner = await rt.redis.hget(keys.api_key(key_hash), "tenant")  # type: ignore[misc]
    if owner is None or (owner.decode() if isinstance(owner, bytes) else str(owner)) != tenant:
        return None  # the key was deleted or moved: the session ends with it
    return Session(tenant, key_hash, nonce, expires, _csrf(secret, nonce), tenant in rt.settings.admins)


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(str(token), session.csrf)
