"""An httpcore network backend on the event loop's own transports, for every outgoing HTTP client.

httpx's default backend goes through anyio: each read and write opens a cancel scope with a
timer, and the connection pool asks every pooled connection whether its socket is readable (a
``poll()`` system call behind a dictionary of attribute getters) before each request. In the
worker that was most of the cost of a provider request (bench/throughput.py with py-spy: 16 % of
the time in ``httpx.send`` went to that readability check, 22 % to anyio's send). Here a
connection's protocol reads all the time (up to a high-water mark), so "has the server closed this
idle connection" is answered from state, and a read or a write is one call on the transport.

httpcore's network backends are its documented extension point, so httpx's API, pool, HTTP/1.1
state machine and error types stay as they were. Errors map as httpcore's own anyio backend maps
them, which matters: ``ConnectError`` and ``ConnectTimeout`` mean nothing was sent (a create call is
then safe to retry), every later failure is a read or write error (its outcome is unknown).
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from collections import deque

import httpcore
import httpx

HIGH_WATER = 256 * 1024  # bytes read ahead of the reader before the transport stops reading
LOW_WATER = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Buffers what arrives; wakes the one reader or writer waiting on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.lost = False
        self.reading_paused = False
        self.writing_paused = False
        self.waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self.error = exc
        self._wake()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """Until something happens on the connection; ``False`` when ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        while not p.chunks:
            if p.eof:
                if p.error is not None:
                    raise httpcore.ReadError(str(p.error) or p.error.__class__.__name__)
                return b""
            if not await p.wait(timeout):
                raise httpcore.ReadTimeout("timed out reading from the server")
        chunk = p.chunks.popleft()
        if len(chunk) > max_bytes:
            p.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        p.buffered -= len(chunk)
        if p.reading_paused and p.buffered < LOW_WATER and not p.lost:
            p.reading_paused = False
            self._transport.resume_reading()
        return chunk

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._protocol
        if p.lost or self._transport.is_closing():
            raise httpcore.WriteError(str(p.error) if p.error else "the connection is closed")
        self._transport.write(buffer)
        while p.writing_paused:
            if p.lost:
                raise httpcore.WriteError(str(p.error) if p.error else "the connection is closed")
            if not await p.wait(timeout):
                raise httpcore.WriteTimeout("timed out writing to the server")

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self._transport, self._protocol, ssl_context, server_hostname=server_hostname),
                timeout)
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out during the TLS handshake") from exc
        except (OSError, ssl.SSLError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            self._transport.close()
            raise httpcore.ConnectError(str(exc) or exc.__class__.__name__) from exc
        if transport is None:
            raise httpcore.ConnectError("the TLS handshake did not complete")
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # an idle connection the server closed (or wrote to): not reusable
            return self._protocol.eof or bool(self._protocol.chunks)
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connects with ``loop.create_connection`` (TCP_NODELAY is the event loop's default)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(_Protocol, host, port,
                                       local_addr=(local_address, 0) if local_address else None),
                timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or exc.__class__.__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(loop.create_unix_connection(_Protocol, path), timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {path}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or exc.__class__.__name__) from exc
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def transport(limits: httpx.Limits, ssl_context: ssl.SSLContext,
              backend: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (pool, HTTP/1.1, error mapping), connecting through ``backend``
    (``AsyncioBackend`` unless given: the destination guard passes its own, which wraps it)."""
    made = httpx.AsyncHTTPTransport(limits=limits, verify=ssl_context, trust_env=False)
    assert isinstance(made._pool, httpcore.AsyncConnectionPool), "httpx changed its transport"
    made._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend or AsyncioBackend())
    return made


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing a server sets."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class StatelessClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that keeps no cookies between requests.

    The clients are shared by every tenant: a cookie one provider answer (or one tenant's webhook
    receiver) set would go out with the next request to that host, for whichever tenant. Reading
    ``Set-Cookie`` was also 7 % of the CPU a request cost (the standard library's cookie parsing).
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("this client keeps no cookies")
