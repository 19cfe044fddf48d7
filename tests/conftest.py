"""Shared fixtures: a private redis-server per session, and a full dev stack per test.

Everything is real: redis-server, the API on a loopback port, the arq worker,
and the provider simulators over HTTP. Only the providers are simulated.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.redis_server import RedisServer

# Tests never reach a real provider or cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for name in list(os.environ):
    if name.startswith("ATELIER_"):
        del os.environ[name]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test killed it
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with dev_stack(redis_url=redis_url, log_format="text") as s:
        yield s
