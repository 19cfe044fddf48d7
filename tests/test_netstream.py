"""The outgoing HTTP clients' network backend (orchestrator/infra/netstream.py), against real servers
on loopback: keep-alive, a server closing idle connections, errors mapped as "sent" or "not sent"
(what decides whether a create call may be retried), timeouts, large bodies, TLS, no cookies kept."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.infra.netstream import StatelessClient, transport
from orchestrator.infra.redis_server import free_port
from providers.errors import OutcomeUnknown, Unavailable
from providers.http import send

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=5)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    """One HTTP/1.1 request's line and headers (its body read and dropped); ``None`` at EOF."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    line, *rest = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
    if int(headers.get("content-length", 0)):
        await reader.readexactly(int(headers["content-length"]))
    return line, headers


def reply(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


class Server:
    """An asyncio TCP server on loopback that counts the connections it accepted."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", self.port, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (request := await read_request(reader)) is not None:
        line, headers = request
        writer.write(reply(f"{line}|{headers.get('cookie', '')}".encode(), "set-cookie: session=abc; Path=/\r\n"))
        await writer.drain()


def client(ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0) -> httpx.AsyncClient:
    return StatelessClient(timeout=timeout, transport=transport(LIMITS, ssl_context or ssl.create_default_context()))


@pytest.fixture
async def plain() -> AsyncIterator[Server]:
    async with Server(keep_alive) as server:
        yield server


async def test_requests_reuse_one_connection_and_send_no_cookie_back(plain: Server) -> None:
    async with client() as http:
        answers = [(await http.get(f"{plain.url}/n/{i}")).text for i in range(5)]
    assert answers == [f"GET /n/{i} HTTP/1.1|" for i in range(5)]  # the cookie set each time never went back
    assert plain.connections == 1
    assert len(http.cookies) == 0


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def one_request_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"ok"))  # keep-alive by HTTP/1.1's default, then closed while idle
        await writer.drain()

    async with Server(one_request_then_close) as server, client() as http:
        for _ in range(3):
            assert (await http.get(server.url)).text == "ok"
            await asyncio.sleep(0.05)  # the close reaches the client while its connection is idle
    assert server.connections == 3


async def test_refused_connection_is_not_sent_and_a_dropped_answer_is_unknown() -> None:
    async with client() as http:
        with pytest.raises(Unavailable, match="could not connect"):
            await send(http, http.build_request("POST", f"http://127.0.0.1:{free_port()}/create"), creates=True)

    async def close_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # the request arrived: the provider may have created the task

    async with Server(close_after_request) as server, client() as http:
        with pytest.raises(OutcomeUnknown):
            await send(http, http.build_request("POST", f"{server.url}/create", json={"a": 1}), creates=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url)


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with Server(silent) as server, client(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(server.url)


async def test_a_large_body_streams_whole_through_flow_control() -> None:
    body = bytes(range(256)) * (24 * 1024)  # 6 MiB, far past the read-ahead mark

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(body))
        await writer.drain()

    async with Server(large) as server, client() as http:
        got = bytearray()
        async with http.stream("GET", server.url) as response:
            async for chunk in response.aiter_bytes(64 * 1024):
                got += chunk
                await asyncio.sleep(0)  # a slow reader: the transport pauses and resumes
        upload = await http.post(f"{server.url}/up", content=body)  # a large request body too
    assert bytes(got) == body
    assert upload.status_code == 200


def self_signed(host: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


async def test_tls_verifies_the_server_and_a_bad_certificate_is_not_sent() -> None:
    cert, key = self_signed("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cert.pem").write_bytes(cert)
        (Path(tmp) / "key.pem").write_bytes(key)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
        trusting = ssl.create_default_context(cadata=cert.decode())
        async with Server(keep_alive, server_ctx) as server:
            async with client(trusting) as http:
                first = await http.get(f"{server.url}/a")
                second = await http.get(f"{server.url}/b")
            assert (first.text, second.text) == ("GET /a HTTP/1.1|", "GET /b HTTP/1.1|")
            assert server.connections == 1
            async with client(ssl.create_default_context()) as http:  # does not trust the certificate
                with pytest.raises(Unavailable, match="could not connect"):
                    await send(http, http.build_request("POST", f"{server.url}/create"), creates=True)
