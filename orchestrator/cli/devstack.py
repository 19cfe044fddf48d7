"""The whole of Atelier in one process: private Redis, provider simulators, API and worker.

Used by ``atelier dev``, ``atelier demo``, the tests and the benchmarks. Every
part is the real thing on real sockets; only the providers are simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from orchestrator.api.app import create_app
from orchestrator.infra.redis_server import RedisServer, free_port
from orchestrator.infra.settings import Settings
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from providers.sandbox import registry as sandbox_registry
from providers.sandbox.base import Simulator
from providers.sandbox.serve import serving


@dataclass
class Stack:
    settings: Settings
    api_url: str
    sandbox_url: str
    api_key: str
    simulators: dict[str, Simulator]
    redis_server: RedisServer | None = None
    extra_keys: dict[str, str] = field(default_factory=dict)

    def simulator_url(self, provider: str) -> str:
        return f"{self.sandbox_url}/{provider}"


def sandbox_app(simulators: dict[str, Simulator]) -> Starlette:
    """All simulators on one server, each under ``/{provider}`` (its base URL)."""
    return Starlette(routes=[Mount(f"/{name}", app=sim.app) for name, sim in simulators.items()])


@contextlib.asynccontextmanager
async def sandbox(port: int = 0, host: str = "127.0.0.1") -> AsyncIterator[tuple[str, dict[str, Simulator]]]:
    simulators = {name: sandbox_registry.create(name) for name in sandbox_registry.SIMULATORS}
    async with serving(sandbox_app(simulators), host=host, port=port) as url:
        yield url, simulators


@contextlib.asynccontextmanager
async def dev_stack(
    *,
    api_port: int = 0,
    sandbox_port: int = 0,
    redis_url: str | None = None,
    storage_url: str | None = None,
    run_worker: bool = True,
    tenant: str = "dev",
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """Start everything; yields a ``Stack``. ``overrides`` are ``Settings`` fields."""
    server = None
    if redis_url is None:
        server = RedisServer().start()
        redis_url = server.url
    tmp = None
    if storage_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="atelier-storage-")
        storage_url = f"file://{tmp.name}"
    try:
        async with sandbox(sandbox_port) as (sandbox_url, simulators):
            port = api_port or free_port()
            defaults: dict[str, Any] = {
                "redis_url": redis_url, "storage_url": storage_url, "sandbox": True,
                "sandbox_url": sandbox_url, "public_url": f"http://127.0.0.1:{port}",
                "poll_min_seconds": 0.2, "poll_max_seconds": 2.0,
                "webhook_retry_schedule": "0,0.5,1,2,5", "sweep_grace_seconds": 30.0,
                # the circuit's cool-downs compressed like the retry schedule
                "webhook_circuit_cooldown_seconds": 0.5, "webhook_circuit_max_cooldown_seconds": 2.0,
                "webhook_allow_private": True,  # receivers run on loopback
            }
            settings = Settings(**(defaults | overrides))
            redis = await connect(settings.redis_url, settings.queue_name)
            api_key = await create_api_key(redis, tenant)
            await redis.aclose()
            async with serving(create_app(settings), port=port) as api_url:
                stop = asyncio.Event()
                worker_task = None
                if run_worker:
                    from workers.main import run

                    worker_task = asyncio.create_task(run(settings, stop=stop, completion_wait=2.0))
                try:
                    yield Stack(settings=settings, api_url=api_url, sandbox_url=sandbox_url, api_key=api_key,
                                simulators=simulators, redis_server=server)
                finally:
                    stop.set()
                    if worker_task is not None:
                        await worker_task
    finally:
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
