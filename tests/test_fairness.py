"""Fairness between tenants: one tenant's big batch on a provider key, or its dead webhook
endpoints, cannot hold back another tenant's work for long (issue 13, defect 3)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from orchestrator.cli.devstack import dev_stack
from orchestrator.store.tenants import create_api_key
from tests.helpers import api, submit, wait_for

IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell"}


async def test_a_big_batch_does_not_hold_back_another_tenants_job_on_the_same_key(redis_url):
    # Two slots on the key, 400 of tenant A's jobs waiting for them (about 40 s of work): tenant B's
    # single job, submitted behind them, takes one of the next slots, not the 401st.
    async with dev_stack(redis_url=redis_url, replicate_concurrency=2, poll_min_seconds=0.05,
                         log_format="text") as stack:
        r = aioredis.Redis.from_url(redis_url)
        key_a = await create_api_key(r, "fair-a")
        await r.aclose()
        async with api(stack, key_a) as a, api(stack) as b:
            items = [IMAGE | {"input": {"prompt": f"batch item {i} [sim:run=0.15]"}} for i in range(400)]
            resp = await a.post("/v1/batches", json={"jobs": items})
            assert resp.status_code == 202, resp.text
            batch_id = resp.json()["id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the line forms: A's jobs wait for the key's two slots
                page = (await a.get(f"/v1/batches/{batch_id}/jobs", params={"status": "queued"})).json()
                if len(page["data"]) >= 20 and any(j["phase"] == "throttled" for j in page["data"]):
                    break
                await asyncio.sleep(0.1)
            asked = time.monotonic()
            job = await submit(b, **IMAGE, input={"prompt": "tenant b's one job [sim:run=0.15]"})
            done = await wait_for(b, job["id"], timeout=30)
            waited = time.monotonic() - asked
            batch = (await a.get(f"/v1/batches/{batch_id}")).json()
            await a.post(f"/v1/batches/{batch_id}/cancel")
    assert done["status"] == "succeeded", done
    assert waited < 10, f"tenant B's job took {waited:.1f} s behind tenant A's batch"
    finished = sum(batch["counts"].get(s, 0) for s in ("succeeded", "failed"))
    assert finished < 100, f"{finished} of A's jobs finished before B's one job: B did not get its turn"
