"""Logging: one JSON object per line (or human-readable text), with job/tenant/provider fields.

Secrets never reach the logs: httpx's request logging (which would print
signed URLs and query-string keys) is silenced, URLs we log go through
``redact_url``, and as a last line of defence every formatted line goes through
``redact_text``: URL query strings, signature/token parameters and bearer
tokens are cut, and the configured secrets (provider keys, signing secrets,
registered with ``mask_secrets``) are replaced by ``[redacted]``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

FIELDS = ("job_id", "tenant", "provider", "event", "delivery_id", "batch_id", "key_id", "reason")
REDACTED = "[redacted]"

_URL = re.compile(r"""\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"<>]+""")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;]|\b)((?:x-amz-(?:signature|credential|security-token)|signature|sig|token|api[_-]?key|key|"
    r"access_token|secret)=)[^&\s'\"<>]+")
_BEARER = re.compile(r"\b([Bb]earer|Basic|Token|Key)\s+[A-Za-z0-9._~+/=:-]{8,}")
_secrets: set[str] = set()


def redact_url(url: str) -> str:
    """Drop the query string and credentials of a URL (signatures, keys, tokens)."""
    parts = urlsplit(url)
    # The host part after any credentials (kept whole: ``h1:26379,h2:26379`` is a Sentinel list).
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def mask_secrets(values: Iterable[str]) -> None:
    """Register secret values (and the parts of ``id:secret`` pairs) that must never be printed."""
    for value in values:
        for part in (value, *value.split(":")):
            if len(part) >= 8:
                _secrets.add(part)


def redact_text(text: str) -> str:
    """Cut URL query strings and credentials, secret parameters, bearer tokens and known secrets."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = redact_text(str(value))
        if record.exc_info:
            entry["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{datetime.now().strftime('%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        tags = " ".join(f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None) is not None)
        text = f"{base} [{tags}]" if tags else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact_text(text)


def configure(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("arq").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
