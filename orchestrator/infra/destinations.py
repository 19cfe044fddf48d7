"""Where webhooks may go: refuse private, loopback, link-local, multicast, reserved and metadata addresses.

A webhook URL is a request a tenant makes Atelier send from inside its network
(server-side request forgery). By default every URL is checked twice:

- when it is registered (a webhook endpoint, a job's or a batch's ``webhook_url``):
  an IP literal or a name that resolves to a refused address is a ``422``;
- when a delivery connects: ``GuardedBackend`` resolves the name, checks every
  address, and connects to the address it checked. A name that resolved to a
  public address at registration and to ``127.0.0.1`` later (DNS rebinding) is
  refused there, and the attempt fails like any other.

``ATELIER_WEBHOOK_ALLOW_PRIVATE=true`` turns both checks off (the dev stack and the
tests run receivers on loopback).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream

from orchestrator.infra.netstream import AsyncioBackend, StatelessClient, transport
from orchestrator.infra.tls import client_ssl_context
from providers.http import DestinationRefused as _DestinationRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata services (some are on otherwise public or shared addresses).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
    "169.254.170.2",    # AWS ECS task metadata
    "169.254.169.253",  # AWS DNS
    "100.100.100.200",  # Alibaba Cloud
    "168.63.129.16",    # Azure wire server
    "fd00:ec2::254",    # AWS IMDS over IPv6
))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com"})
RESOLVE_TIMEOUT_SECONDS = 3.0


# A destination that resolved to an address Atelier does not send to (defined with the providers'
# HTTP helpers, which recognise it when they fetch a tenant's media input).
DestinationRefused = _DestinationRefused


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused as a webhook destination, or ``None`` if it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            reason = address_problem(inner)
            return f"{reason} (inside {ip})" if reason else None
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    for attr, what in (("is_loopback", "loopback"), ("is_unspecified", "unspecified"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return f"{ip} is a {what} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def name_problem(host: str) -> str | None:
    """Refusals decided by the name alone (no lookup): ``localhost`` and metadata names."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return f"{host} is a loopback name"
    if name in METADATA_NAMES:
        return f"{host} is a cloud metadata name"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                                   RESOLVE_TIMEOUT_SECONDS)
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = _literal(str(sockaddr[0]))
        if ip is not None and ip not in found:
            found.append(ip)
    return found


def first_problem(host: str, addresses: Iterable[IPAddress]) -> str | None:
    """The first refused address among ``addresses`` (one is enough: a rebinding name can mix them)."""
    for ip in addresses:
        reason = address_problem(ip)
        if reason is not None:
            return reason if _literal(host) is not None else f"{host} resolves to a refused address: {reason}"
    return None


async def url_problem(url: str, *, allow_private: bool) -> str | None:
    """Why a webhook URL is refused at registration, or ``None``.

    A name that does not resolve now is accepted (the delivery-time check still applies).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "webhook URLs must be http:// or https://"
    host = parts.hostname or ""
    if not host:
        return "the URL has no host"
    if allow_private:
        return None
    literal = _literal(host)
    if literal is not None:
        return address_problem(literal)
    reason = name_problem(host)
    if reason is not None:
        return reason
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await resolve(host, port)
    except (TimeoutError, OSError, ValueError):
        return None
    return first_problem(host, addresses)


class UrlChecker:
    """``url_problem`` with lookups shared by one request (a batch of 10,000 items names few hosts)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._seen: dict[tuple[str, str, int | None], str | None] = {}

    async def problem(self, url: str) -> str | None:
        parts = urlsplit(url)
        try:
            key = (parts.scheme, (parts.hostname or "").lower(), parts.port)
        except ValueError:
            return "the URL has an invalid port"
        if key not in self._seen:
            self._seen[key] = await url_problem(url, allow_private=self.allow_private)
        return self._seen[key]


# -- delivery time ------------------------------------------------------------------------------

class GuardedBackend(AsyncNetworkBackend):
    """httpcore network backend that resolves, checks, then connects to the checked address."""

    def __init__(self) -> None:
        self._inner: AsyncNetworkBackend = AsyncioBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> AsyncNetworkStream:
        literal = _literal(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            reason = name_problem(host)
            if reason is not None:
                raise DestinationRefused(reason)
            try:
                addresses = await resolve(host, port)
            except TimeoutError as exc:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        reason = first_problem(host, addresses)
        if reason is not None:
            raise DestinationRefused(reason)
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        last: Exception | None = None
        for ip in addresses:  # TLS still names and verifies the host: httpcore passes it as server_hostname
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                      socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> AsyncNetworkStream:
        raise DestinationRefused("unix sockets are not webhook destinations")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def webhook_client(timeout: float, allow_private: bool) -> httpx.AsyncClient:
    """The HTTP client deliveries use: its pool connects through ``GuardedBackend`` unless private
    destinations are allowed."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    if allow_private:
        return StatelessClient(timeout=httpx.Timeout(timeout), follow_redirects=False,
                               transport=transport(limits, client_ssl_context()))
    return StatelessClient(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
                           transport=transport(limits, client_ssl_context(trust_env=False), GuardedBackend()))
