"""Nothing grows forever (issue 13, defect 7): a finished job leaves no record and no stored file behind
once its retention passes; DELETE removes one now; a tenant may keep its jobs for another time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.tenants import set_tenant_retention
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for


@pytest.fixture
async def short(redis_url: str) -> AsyncIterator[Stack]:
    async with dev_stack(redis_url=redis_url, log_format="text", retention_seconds=5) as s:
        yield s


async def keys_naming(r: redis.asyncio.Redis, *names: str) -> list[str]:
    """Every atl: key whose name, or whose set/zset/hash members, mention one of ``names``."""
    found = []
    async for raw in r.scan_iter(match="atl:*", count=500):
        key = raw.decode()
        if any(n in key for n in names):
            found.append(key)
            continue
        kind = (await r.type(key)).decode()
        members: list[bytes] = []
        if kind == "zset":
            members = await r.zrange(key, 0, -1)
        elif kind == "set":
            members = list(await r.smembers(key))
        elif kind == "hash":
            members = list(await r.hkeys(key))
        if any(n.encode() in m for m in members for n in names):
            found.append(key)
    return found


def stored_files(stack: Stack) -> list[Path]:
    root = Path(stack.settings.storage_url.removeprefix("file://"))
    return [p for p in root.rglob("*") if p.is_file()]


async def test_a_finished_job_leaves_nothing_behind_after_retention(short: Stack) -> None:
    receiver = WebhookReceiver()
    r = redis.asyncio.Redis.from_url(short.settings.redis_url)
    async with serving(receiver.app) as hook, api(short) as client:
        job = await submit(client, webhook_url=f"{hook}/hook", input={"prompt": "a short-lived fox"})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded" and done["expires_at"]
        assert done["outputs"][0]["url_expires_at"] <= done["expires_at"]
        await receiver.wait(2)
        task = done["provider_task_id"]
        assert await keys_naming(r, job["id"], task) and stored_files(short)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (await keys_naming(r, job["id"], task) or stored_files(short)):
            await asyncio.sleep(1)
        assert await keys_naming(r, job["id"], task) == []
        assert stored_files(short) == []
        assert (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404
    await r.aclose()


async def test_delete_removes_a_finished_job_now_and_refuses_an_active_one(stack: Stack) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, input={"prompt": "a fox"}))["id"])
        running = await submit(client, input={"prompt": "slow [sim:run=30]"})
        busy = await client.delete(f"/v1/jobs/{running['id']}")
        assert busy.status_code == 409 and busy.headers["content-type"].startswith("application/problem+json")
        assert (await client.delete(f"/v1/jobs/{done['id']}")).status_code == 204
        assert (await client.get(f"/v1/jobs/{done['id']}")).status_code == 404
        assert (await client.delete(f"/v1/jobs/{done['id']}")).status_code == 404
        assert stored_files(stack) == []


async def test_a_tenant_keeps_its_jobs_for_its_own_retention(stack: Stack) -> None:
    r = redis.asyncio.Redis.from_url(stack.settings.redis_url)
    await set_tenant_retention(r, "dev", 3600)
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, input={"prompt": "a fox"}))["id"])
    kept = time.time() + 3600
    expires = datetime.fromisoformat(done["expires_at"]).timestamp()
    assert abs(expires - kept) < 60
    await r.aclose()
