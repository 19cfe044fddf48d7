"""Provider key pools: which key a job uses, and which keys are out of the pool.

A job remembers the key that submitted it by fingerprint (``key_id``), never the key,
and keeps using it for polls and cancels. A key the provider refuses (auth) or that
ran out of balance is taken out of the pool for every process: the state lives in
Redis (``keys.key_out`` = JSON ``{reason, code, message, at, until}``,
indexed in the set ``keys.KEYS_OUT``). Refused keys stay out until an operator restores
them (``atelier provider-keys restore``); an out-of-balance key's record expires after
``ATELIER_KEY_RECHECK_SECONDS`` and the next submit tries it again. Each process
caches a provider's out-set briefly, so a submit does not cost a Redis round trip.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from orchestrator.domain.job import Job
from orchestrator.store.keys import KEYS_OUT, key_out

INDEX = KEYS_OUT
CACHE_SECONDS = 1.5

AUTH_FAILED = "auth_failed"
NO_BALANCE = "insufficient_balance"
REASON_TEXT = {AUTH_FAILED: "refused the key", NO_BALANCE: "out of balance"}

# Per process and per Redis client: provider -> (fresh until, out-set).
_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[float, dict[str, KeyOut]]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class KeyOut:
    """Why a key is out of the pool; ``until`` is when it is tried again (``None``: an operator decides)."""

    reason: str
    code: str
    message: str
    at: float
    until: float | None = None

    def describe(self, key_id: str) -> str:
        back = f", back in the pool at {_iso(self.until)}" if self.until else ", until an operator restores it"
        return f"{key_id} ({REASON_TEXT.get(self.reason, self.reason)} at {_iso(self.at)}: {self.message}{back})"


class KeyUnavailable(Exception):
    """No key can make this call: the job fails with ``code`` (nothing was sent to the provider)."""

    code = "provider_not_configured"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NoUsableKey(KeyUnavailable):
    """Every configured key of the provider is out of the pool."""

    code = "no_usable_key"

    def __init__(self, provider: str, out: Mapping[str, KeyOut]) -> None:
        self.provider = provider
        self.out = dict(out)
        listed = "; ".join(record.describe(kid) for kid, record in sorted(self.out.items()))
        super().__init__(f"no usable {provider} API key: every key in the pool is out ({listed})",
                         {"keys_out": {kid: asdict(record) for kid, record in self.out.items()}})


def key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def pick(keys: list[str], job: Job, out: Mapping[str, KeyOut] | None = None) -> str:
    """Spread jobs over the keys still in the pool, deterministically (a retried submit uses the same key)."""
    if not keys:
        raise LookupError(f"no API key configured for {job.provider}")
    usable = [k for k in keys if key_id(k) not in (out or {})]
    if not usable:
        raise NoUsableKey(job.provider, out or {})
    digest = int(hashlib.sha256(job.id.encode()).hexdigest()[:8], 16)
    return usable[digest % len(usable)]


def resolve(keys: list[str], wanted: str | None) -> str | None:
    """The pool key with fingerprint ``wanted``; ``None`` if it left the configuration."""
    return next((k for k in keys if key_id(k) == wanted), None)


def redact(text: str, keys: Iterable[str]) -> str:
    """``text`` with any configured key replaced by its fingerprint (provider messages may echo keys)."""
    for key in sorted(keys, key=len, reverse=True):
        if len(key) >= 6 and key in text:
            text = text.replace(key, f"[key {key_id(key)}]")
    return text


record_key = key_out


# -- shared state ---------------------------------------------------------------------------

async def out_of_pool(redis: Redis, provider: str, keys: list[str], *, fresh: bool = False) -> dict[str, KeyOut]:
    """The configured keys of ``provider`` that are out of the pool (cached for ``CACHE_SECONDS``)."""
    per_client = _cache.setdefault(redis, {})
    cached = per_client.get(provider)
    now = time.monotonic()
    if cached is not None and cached[0] > now and not fresh:
        return cached[1]
    ids = list(dict.fromkeys(key_id(k) for k in keys))
    raws = await redis.mget([record_key(provider, kid) for kid in ids]) if ids else []
    out = {kid: record for kid, raw in zip(ids, raws, strict=True) if (record := _parse(raw)) is not None}
    per_client[provider] = (now + CACHE_SECONDS, out)
    return out


async def take_out(redis: Redis, provider: str, kid: str, *, reason: str, code: str, message: str,
                   recheck_seconds: float | None = None) -> KeyOut | None:
    """Take ``kid`` out of the pool; ``None`` when it already was (another job got there first).

    With ``recheck_seconds`` the record expires then, and the key is back in the pool.
    """
    now = time.time()
    record = KeyOut(reason=reason, code=code, message=message[:500], at=now,
                    until=now + recheck_seconds if recheck_seconds else None)
    pipe = redis.pipeline(transaction=True)
    pipe.set(record_key(provider, kid), json.dumps(asdict(record)), nx=True,
             px=int(recheck_seconds * 1000) if recheck_seconds else None)
    pipe.sadd(INDEX, f"{provider}:{kid}")
    created, _ = await pipe.execute()
    _forget(redis, provider)
    return record if created else None


async def restore(redis: Redis, provider: str, kid: str) -> bool:
    """Put ``kid`` back in the pool (an operator's decision); ``False`` if it was not out."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(record_key(provider, kid))
    pipe.srem(INDEX, f"{provider}:{kid}")
    removed, _ = await pipe.execute()
    _forget(redis, provider)
    return bool(removed)


async def all_out(redis: Redis) -> dict[tuple[str, str], KeyOut]:
    """Every key out of the pool, configured or not, as ``{(provider, key_id): record}``.

    Index entries whose record expired (a balance recheck came due) are dropped on the way.
    """
    members = sorted(m.decode() if isinstance(m, bytes) else str(m)
                     for m in await redis.smembers(INDEX))  # type: ignore[misc]
    if not members:
        return {}
    pairs = [m.partition(":")[::2] for m in members]
    raws = await redis.mget([record_key(p, k) for p, k in pairs])
    result: dict[tuple[str, str], KeyOut] = {}
    gone = []
    for member, (provider, kid), raw in zip(members, pairs, raws, strict=True):
        record = _parse(raw)
        if record is None:
            gone.append(member)
        else:
            result[(provider, kid)] = record
    if gone:
        await redis.srem(INDEX, *gone)  # type: ignore[misc]
    return result


async def pool_state(redis: Redis, keys_by_provider: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """One row per configured key (and per out-of-pool record of a key no longer configured):
    provider, key_id, state (in | out), configured, reason, code, message, since, back_at."""
    out = await all_out(redis)
    rows = []
    for provider, keys in keys_by_provider.items():
        for kid in dict.fromkeys(key_id(k) for k in keys):
            rows.append(_row(provider, kid, out.pop((provider, kid), None), configured=True))
    rows += [_row(provider, kid, record, configured=False) for (provider, kid), record in sorted(out.items())]
    return rows


def _row(provider: str, kid: str, record: KeyOut | None, *, configured: bool) -> dict[str, Any]:
    return {"provider": provider, "key_id": kid, "state": "out" if record else "in", "configured": configured,
            "reason": record.reason if record else None, "code": record.code if record else None,
            "message": record.message if record else None, "since": _iso(record.at) if record else None,
            "back_at": _iso(record.until) if record and record.until else None}


def _forget(redis: Redis, provider: str) -> None:
    _cache.get(redis, {}).pop(provider, None)


def _parse(raw: Any) -> KeyOut | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return KeyOut(reason=str(data["reason"]), code=str(data.get("code", "")),
                      message=str(data.get("message", "")), at=float(data["at"]),
                      until=float(data["until"]) if data.get("until") else None)
    except (ValueError, KeyError, TypeError):
        return KeyOut(reason="unknown", code="", message="unreadable record", at=0.0)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
