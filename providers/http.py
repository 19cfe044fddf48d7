"""HTTP helpers shared by the adapters: sending without ever hiding an ambiguous submission,
reading JSON defensively, and the status codes that mean the same thing at every provider."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from providers.contract import CallContext
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    MalformedResponse,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)


def retry_after_seconds(headers: Mapping[str, str], default: float | None = None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else default


async def send(http: httpx.AsyncClient, request: httpx.Request, *, creates: bool = False,
               timeout: float | None = None) -> httpx.Response:
    """Send a request, mapping transport failures to provider errors.

    For a request that ``creates`` a billable task, anything that may have reached
    the provider is ``OutcomeUnknown``; a failure to connect is ``Unavailable``
    (nothing was sent). ``timeout`` (``CallContext.timeout``) replaces the client's read
    timeout for this request. No request is ever retried here: a retried create could pay twice.
    """
    if timeout is not None:
        request.extensions["timeout"] = httpx.Timeout(timeout, connect=min(10.0, timeout)).as_dict()
    try:
        return await http.send(request)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise Unavailable(f"could not connect to provider: {exc.__class__.__name__}") from exc
    except httpx.TransportError as exc:
        if creates:
            raise OutcomeUnknown(
                f"the submission may have reached the provider ({exc.__class__.__name__}); "
                "its outcome is unknown"
            ) from exc
        raise Unavailable(f"provider request failed: {exc.__class__.__name__}") from exc


# new-api / one-api gateways: the token's or the user's quota is used up (HTTP 403 with one of these
# codes, or a 401 from the token check that only says so in its message).
GATEWAY_QUOTA_CODES = frozenset({"quota_not_enough", "insufficient_user_quota", "pre_consume_token_quota_failed",
                                 "insufficient_quota"})
_GATEWAY_QUOTA_TEXT = re.compile(r"额度不足|额度已用尽|insufficient (user )?quota|quota (is )?(not enough|exhausted)",
                                 re.IGNORECASE)


def gateway_quota_exhausted(code: Any, message: str) -> bool:
    """Whether a gateway error means the key's quota (balance) ran out, not a bad key."""
    return str(code or "") in GATEWAY_QUOTA_CODES or bool(_GATEWAY_QUOTA_TEXT.search(message or ""))


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError) as exc:  # (RecursionError: nested thousands of levels deep)
        excerpt = response.text[:200]
        raise MalformedResponse(
            f"provider answered HTTP {response.status_code} with a body that is not JSON",
            detail={"body_excerpt": excerpt}, status_code=response.status_code,
        ) from exc


def expect_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedResponse(f"provider {what} is not a JSON object", detail={"body": str(body)[:200]})
    return body


def raise_for_common_status(response: httpx.Response, *, creates: bool = False, detail: Any = None) -> None:
    """Map non-2xx statuses that mean the same thing at every provider."""
    status = response.status_code
    if status < 400:
        return
    body_detail = detail if detail is not None else response.text[:500]
    if status == 429:
        raise RateLimited("provider rate limit (HTTP 429)", retry_after=retry_after_seconds(response.headers),
                          detail=body_detail)
    if status == 402:  # Payment Required: the account behind the key is out of credit (Replicate...)
        raise InsufficientBalance("provider says the account is out of credit (HTTP 402)", detail=body_detail,
                                  status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"provider refused the credentials (HTTP {status})", detail=body_detail,
                         status_code=status)
    if status >= 500:
        if creates and status != 503:
            # Only 503 (not accepting work) proves nothing was created; 500/502/504 may follow acceptance.
            raise OutcomeUnknown(f"provider answered HTTP {status} to a submission", detail=body_detail,
                                 status_code=status)
        raise Unavailable(f"provider unavailable (HTTP {status})", detail=body_detail, status_code=status)
    if status in (404, 410) and not creates:
        raise TaskNotFound(f"provider does not know this task (HTTP {status})", detail=body_detail,
                           status_code=status)
    raise Rejected(f"provider refused the request (HTTP {status})", detail=body_detail, status_code=status)


class DestinationRefused(Exception):
    """A guarded client refused to connect: the URL points to a private, loopback, link-local or
    metadata address (raised by the orchestrator's destination guard at connect time)."""


MAX_INPUT_REDIRECTS = 5


async def fetch_input(ctx: CallContext, url: str, *, max_bytes: int, what: str = "the input image",
                      code: str = "input_unavailable") -> tuple[bytes, str | None]:
    """Download a media input a tenant named (an ``image_url``): bounded, through the destination-guarded
    client (``ctx.media_http``), following redirects by hand so that every hop is checked again.

    Nothing is created at the provider if this fails. The error tells the tenant why in their terms,
    never what answered inside (an internal service's body or error must not leak into a job's error).
    Returns the bytes and the content type the server declared.
    """
    http = ctx.media_http or ctx.http
    for _ in range(MAX_INPUT_REDIRECTS + 1):
        if urlsplit(url).scheme not in ("http", "https"):
            raise Rejected(f"{what} must be an http(s) URL", code=code)
        try:
            async with http.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code >= 500:
                    raise Unavailable(f"{what} could not be fetched: its server answered HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise Rejected(f"{what} could not be fetched: its server answered HTTP {response.status_code}",
                                   code=code)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise Rejected(f"{what} is larger than {max_bytes} bytes", code=code)
                return bytes(data), response.headers.get("content-type")
        except DestinationRefused as exc:
            raise Rejected(f"{what} could not be fetched: its URL points to a private or internal address",
                           code=code) from exc
        except httpx.TimeoutException as exc:
            raise Unavailable(f"{what} could not be fetched: its server did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise Unavailable(f"{what} could not be fetched: its server could not be reached") from exc
    raise Rejected(f"{what} could not be fetched: more than {MAX_INPUT_REDIRECTS} redirects",
                   code=code)


COMMON_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


def sniff_image(head: bytes, allowed: tuple[str, ...] = COMMON_IMAGE_TYPES) -> str | None:
    """The image type the first bytes show (PNG, JPEG, WebP, GIF, HEIC), if it is one of ``allowed``.

    Providers check the bytes, not the declared type; so do we, before anything is created."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif head.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        mime = "image/heic"
    else:
        return None
    return mime if mime in allowed else None


def error_body(response: httpx.Response, *, unwrap: str | None = None) -> dict[str, Any]:
    """A provider's error body as an object for a job's error detail (non-JSON bodies cut to 300 chars).

    ``unwrap="error"`` returns the inner object of OpenAI's and Google's ``{"error": {...}}``."""
    try:
        body = response.json()
    except ValueError:
        return {"body": response.text[:300]}
    if unwrap is not None and isinstance(body, dict) and isinstance(body.get(unwrap), dict):
        inner: dict[str, Any] = body[unwrap]
        return inner
    return body if isinstance(body, dict) else {"body": str(body)[:300]}
