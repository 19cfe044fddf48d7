"""Provider misbehaviour: 429 bursts, malformed bodies, ambiguous submits, expired outputs,
lost queue entries, failing webhook receivers. Nothing is lost or paid for twice."""

from __future__ import annotations

import asyncio
import time

import redis

from orchestrator.cli.devstack import dev_stack
from orchestrator.infra.settings import Settings
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, sim_faults, sim_stats, submit, wait_for
from workers.main import run as run_worker


async def test_429_burst_on_submit_ends_in_success(stack):
    await sim_faults(stack, "replicate", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        job = await submit(client)
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "replicate")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_429_and_5xx_while_polling_are_retried(stack):
    await sim_faults(stack, "replicate", {"kind": "429", "route": "get", "count": 2},
                     {"kind": "503", "route": "get", "count": 2})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client))["id"])
    assert done["status"] == "succeeded"
    assert (await sim_stats(stack, "replicate"))["creations"] == 1


async def test_malformed_submit_response_fails_only_that_job(stack):
    await sim_faults(stack, "replicate", {"kind": "malformed", "route": "create", "count": 1})
    async with api(stack) as client:
        bad = await submit(client, input={"prompt": "first"})
        bad = await wait_for(client, bad["id"])
        good = await wait_for(client, (await submit(client, input={"prompt": "second"}))["id"])
    assert bad["status"] == "failed" and bad["error"]["code"] == "provider_malformed_response"
    assert "not JSON" in bad["error"]["message"]
    assert good["status"] == "succeeded"


async def test_repeatedly_malformed_status_fails_the_job(stack):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=3]"})
        await wait_for(client, job["id"], {"submitted", "running"})
        # More than 3: a callback-triggered fetch may race a scheduled one and share one error count.
        await sim_faults(stack, "replicate", {"kind": "malformed", "route": "get", "count": 12})
        done = await wait_for(client, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_malformed_response"


async def test_ambiguous_submit_is_reconciled_not_resubmitted(stack):
    await sim_faults(stack, "replicate", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client))["id"])
    assert done["status"] == "succeeded", done
    assert (await sim_stats(stack, "replicate"))["creations"] == 1


async def test_ambiguous_submit_with_nothing_found_fails_without_paying_twice(stack):
    await sim_faults(stack, "replicate", {"kind": "500", "route": "create", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client))["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
        assert "retry_unknown_submissions" in done["error"]["message"]
        # Opting in allows the retry.
        await sim_faults(stack, "replicate", {"kind": "500", "route": "create", "count": 1})
        retried = await wait_for(client, (await submit(client, retry_unknown_submissions=True))["id"])
    assert retried["status"] == "succeeded"
    assert (await sim_stats(stack, "replicate"))["creations"] == 1


async def test_outputs_expired_before_collection(redis_url):
    async with dev_stack(redis_url=redis_url, log_format="text") as stack, api(stack) as client:
        stack.simulators["replicate"].config.output_ttl_seconds = 0.0
        done = await wait_for(client, (await submit(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_sweeper_rescues_a_job_whose_queue_entry_was_lost(redis_url):
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text") as stack, api(stack) as client:
        job = await submit(client)
        r = redis.Redis.from_url(redis_url)
        r.delete("atelier:jobs")  # the queue lost the entry
        for key in r.keys("arq:job:*"):
            r.delete(key)
        r.zadd("atl:active", {job["id"]: 0}, xx=True)  # and its grace period is over
        stop = asyncio.Event()
        settings = Settings(**stack.settings.model_dump(exclude={"providers_file"}))
        worker = asyncio.create_task(run_worker(settings, stop=stop, completion_wait=1))
        try:
            done = await wait_for(client, job["id"])
        finally:
            stop.set()
            await worker
    assert done["status"] == "succeeded"


async def test_webhook_retried_until_receiver_accepts(stack):
    receiver = WebhookReceiver(fail_first=3)
    async with serving(receiver.app) as base, api(stack) as client:
        job = await submit(client, webhook_url=f"{base}/hook")
        await wait_for(client, job["id"])
        await receiver.wait(2, timeout=30)
    types = [e["type"] for e in receiver.events()]
    assert sorted(types) == ["job.running", "job.succeeded"]
    r = redis.Redis.from_url(stack.settings.redis_url)
    deliveries = [r.get(k) for k in r.keys("atl:wh:msg_*")]
    assert len(deliveries) == 2
    import json
    attempts = sorted(len(json.loads(d)["attempts"]) for d in deliveries if d)
    assert sum(attempts) == 5 and all(json.loads(d)["status"] == "delivered" for d in deliveries if d)


async def test_unreachable_webhook_is_dead_lettered(stack):
    async with api(stack) as client:
        job = await submit(client, webhook_url="http://127.0.0.1:9/hook")
        await wait_for(client, job["id"])
    r = redis.Redis.from_url(stack.settings.redis_url)
    deadline = time.monotonic() + 30
    import json
    while time.monotonic() < deadline:
        states = [json.loads(r.get(k))["status"] for k in r.keys("atl:wh:msg_*")]
        if states and all(s == "dead" for s in states):
            break
        await asyncio.sleep(0.2)
    assert states == ["dead", "dead"]
