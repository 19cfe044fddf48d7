"""Shared machinery of the provider simulators.

Each simulator is a Starlette app that serves one provider's documented HTTP
API. This module gives them what they have in common, none of it provider
specific:

- ``SimConfig``: timings (queue/run seconds, output URL lifetime) and the API
  keys the simulator accepts; changeable at run time through ``/_sim/config``.
- ``FaultPlan``: injected faults (429 bursts with or without ``Retry-After``,
  5xx, hangs, malformed bodies), taken per route name, optionally *after* the
  request took effect (so an adapter sees an ambiguous outcome).
- ``SimTask``: a task that advances queued -> running -> done over wall time,
  with directives read from the prompt (``[sim:fail]``, ``[sim:run=5]`` ...).
- ``FileStore``: output files at URLs that stop working after a lifetime.
- ``Stats``: creation and request counters, so tests can prove that no task was
  created twice.

The ``/_sim/*`` routes are the simulator's control plane; they are not part of
any provider's API and never used by Atelier's adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

FaultKind = Literal["429", "500", "502", "503", "504", "timeout", "malformed"]


@dataclass
class SimConfig:
    """Timings and credentials of one simulator (all durations in seconds)."""

    queue_seconds: float = 0.3
    run_seconds: float = 0.7
    output_ttl_seconds: float = 3600.0
    # Keys the simulator accepts; an empty list accepts any non-empty key.
    api_keys: list[str] = field(default_factory=list)
    # Extra per-simulator knobs (e.g. callback delays); free-form.
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown config field {key!r}")
            setattr(self, key, value)

    def key_ok(self, key: str | None) -> bool:
        if not key:
            return False
        return not self.api_keys or key in self.api_keys


@dataclass
class Fault:
    """One injected fault. ``route`` is the simulator's route name or ``*``."""

    kind: FaultKind
    route: str = "*"
    count: int = 1
    retry_after: float | None = None
    # For "timeout": how long to hang before answering (clients should give up first).
    delay: float = 30.0
    # Apply the request's effect first (e.g. create the task), then fail: an ambiguous outcome.
    after_effect: bool = False


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self.injected: Counter[str] = Counter()

    def add(self, faults: Iterable[Fault]) -> None:
        self._faults.extend(faults)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, route: str, after_effect: bool = False) -> Fault | None:
        """The next fault for ``route`` at this point of the request, consuming one of its count."""
        for fault in self._faults:
            if fault.route in ("*", route) and fault.after_effect == after_effect and fault.count > 0:
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                self.injected[f"{route}:{fault.kind}"] += 1
                return fault
        return None

    def pending(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self._faults]


@dataclass
class Stats:
    creations: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    # How many times the same client-chosen identity (prompt/external id) was created.
    created_by_identity: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        dupes = {k: v for k, v in self.created_by_identity.items() if v > 1}
        return {"creations": self.creations, "requests": dict(self.requests), "duplicate_identities": dupes}


_DIRECTIVE = re.compile(r"\[sim:([a-z_]+)(?:=([^\]]*))?\]")


def directives(text: str | None) -> dict[str, str]:
    """Simulator directives embedded in a prompt, e.g. ``"a cat [sim:fail] [sim:run=3]"``."""
    return {m.group(1): (m.group(2) or "") for m in _DIRECTIVE.finditer(text or "")}


@dataclass
class SimTask:
    """A provider task that advances with wall time."""

    id: str
    created_at: float
    queue_seconds: float
    run_seconds: float
    outcome: str = "succeed"  # "succeed", "fail", or a provider-specific trap name
    input: dict[str, Any] = field(default_factory=dict)
    canceled_at: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # provider-specific extras

    @classmethod
    def create(cls, task_id: str, config: SimConfig, prompt: str | None, **kw: Any) -> SimTask:
        d = directives(prompt)
        outcome = "succeed"
        for name in d:
            if name not in ("queue", "run"):
                outcome = name
        return cls(
            id=task_id,
            created_at=time.time(),
            queue_seconds=float(d.get("queue") or config.queue_seconds),
            run_seconds=float(d.get("run") or config.run_seconds),
            outcome=outcome,
            **kw,
        )

    def phase(self, now: float | None = None) -> Literal["queued", "running", "done", "canceled"]:
        now = time.time() if now is None else now
        if self.canceled_at is not None and self.canceled_at <= now:
            return "canceled"
        age = now - self.created_at
        if age < self.queue_seconds:
            return "queued"
        if age < self.queue_seconds + self.run_seconds:
            return "running"
        return "done"

    def progress(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        phase = self.phase(now)
        if phase == "done":
            return 100
        if phase != "running" or self.run_seconds <= 0:
            return 0
        return min(99, int(100 * (now - self.created_at - self.queue_seconds) / self.run_seconds))

    @property
    def started_at(self) -> float:
        return self.created_at + self.queue_seconds

    @property
    def finished_at(self) -> float:
        return self.created_at + self.queue_seconds + self.run_seconds


@dataclass
class StoredFile:
    data: bytes
    content_type: str
    expires_at: float


class FileStore:
    """Output files served at ``/delivery/<token>/<name>`` until they expire."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.files: dict[str, StoredFile] = {}

    def publish(self, data: bytes, content_type: str, name: str, ttl: float | None = None) -> str:
        """Store a file; returns its path (relative to the simulator's origin)."""
        lifetime = self.config.output_ttl_seconds if ttl is None else ttl
        path = f"/delivery/{secrets.token_urlsafe(12)}/{name}"
        self.files[path] = StoredFile(data, content_type, time.time() + lifetime)
        return path

    def get(self, path: str) -> StoredFile | None:
        f = self.files.get(path)
        if f is None or f.expires_at <= time.time():
            return None
        return f

    def expire_all(self) -> None:
        for f in self.files.values():
            f.expires_at = 0


class _LimitedClient(httpx.AsyncClient):
    """Bounds requests in flight: httpcore's pool slows down badly with thousands waiting in it."""

    def __init__(self, *, limit: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._limit = asyncio.Semaphore(limit)

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        async with self._limit:
            return await super().send(request, **kwargs)


class Simulator:
    """Base class: owns config, faults, stats, files and the ``/_sim`` control routes.

    Subclasses implement ``routes()`` and ``error_response()`` (the provider's own
    error envelope for a status code), and call ``self.fault(route)`` at the top
    of each handler.
    """

    name = "simulator"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.faults = FaultPlan()
        self.stats = Stats()
        self.files = FileStore(self.config)
        self.app = Starlette(routes=[*self._control_routes(), *self.routes(), self._delivery_route()])
        self.app.state.simulator = self

    # -- provider-specific -------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    # -- callbacks -------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def callback_client(self, timeout: float = 10.0) -> AsyncIterator[httpx.AsyncClient]:
        """A shared HTTP client for sending callbacks (one per timeout; creating clients is costly)."""
        clients: dict[float, httpx.AsyncClient] = self.__dict__.setdefault("_callback_clients", {})
        client = clients.get(timeout)
        if client is None or client.is_closed:
            client = clients[timeout] = _LimitedClient(timeout=timeout)
        yield client

    # -- helpers for handlers ---------------------------------------------
    def origin(self, request: Request) -> str:
        """The base URL the client used (``http://127.0.0.1:PORT`` plus any mount prefix such as
        ``/replicate`` when all simulators share one server), for absolute URLs."""
        return str(request.base_url).rstrip("/") + request.scope.get("root_path", "")

    def count(self, route: str) -> None:
        self.stats.requests[route] += 1

    def record_creation(self, identity: str) -> None:
        self.stats.creations += 1
        self.stats.created_by_identity[identity] += 1

    async def fault(self, route: str, *, after_effect: bool = False) -> Response | None:
        """The injected-fault response for ``route``, or ``None`` to proceed normally.

        Handlers call this once before acting (``after_effect=False``) and, for
        routes with effects, once more after acting (``after_effect=True``).
        """
        if not after_effect:
            self.count(route)
        fault = self.faults.take(route, after_effect)
        if fault is None:
            return None
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay)
            return self.error_response(504, "simulated timeout")
        if fault.kind == "malformed":
            return Response(b'{"id": "truncated', status_code=200, media_type="application/json")
        status = int(fault.kind)
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after)) if fault.retry_after >= 1 else "1"
        return self.error_response(status, f"simulated {status}", headers)

    # -- control plane -----------------------------------------------------
    def _control_routes(self) -> list[BaseRoute]:
        async def get_stats(request: Request) -> Response:
            body = self.stats.as_dict() | {"faults_injected": dict(self.faults.injected)}
            return JSONResponse(body)

        async def post_faults(request: Request) -> Response:
            body = await request.json()
            items = body if isinstance(body, list) else body.get("faults", [])
            self.faults.add(Fault(**item) for item in items)
            return JSONResponse({"pending": self.faults.pending()})

        async def delete_faults(request: Request) -> Response:
            self.faults.clear()
            return JSONResponse({"pending": []})

        async def post_config(request: Request) -> Response:
            try:
                self.config.update(await request.json())
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse(asdict(self.config))

        async def post_expire(request: Request) -> Response:
            self.files.expire_all()
            return JSONResponse({"expired": len(self.files.files)})

        return [
            Route("/_sim/stats", get_stats, methods=["GET"]),
            Route("/_sim/faults", post_faults, methods=["POST"]),
            Route("/_sim/faults", delete_faults, methods=["DELETE"]),
            Route("/_sim/config", post_config, methods=["POST"]),
            Route("/_sim/expire-files", post_expire, methods=["POST"]),
        ]

    def _delivery_route(self) -> BaseRoute:
        async def delivery(request: Request) -> Response:
            injected = await self.fault("download")
            if injected is not None:
                return injected
            f = self.files.get(route_path(request))
            if f is None:
                return self.expired_file_response()
            return Response(f.data, media_type=f.content_type)

        return Route("/delivery/{token}/{name}", delivery, methods=["GET"])

    def expired_file_response(self) -> Response:
        """What the provider's CDN answers for an expired or unknown file (override per provider)."""
        return Response(b"Not Found", status_code=404, media_type="text/plain")


def route_path(request: Request) -> str:
    """The request path below the simulator's mount point (``/delivery/...``, ``/v1/...``)."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def new_id(alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789", length: int = 26) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


Handler = Callable[[Request], Any]
