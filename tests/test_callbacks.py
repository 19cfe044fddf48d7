"""Provider callbacks in: verified, treated as hints, never double-applied."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from orchestrator.cli.devstack import dev_stack
from orchestrator.wire.signing import sign
from tests.helpers import api, submit, wait_for


async def test_replicate_webhook_finishes_the_job_without_waiting_for_a_poll(redis_url):
    # Polls are 30+ s apart here: only the callback can make the job finish quickly.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        job = await submit(client)
        done = await wait_for(client, job["id"], timeout=15)
        assert done["status"] == "succeeded"
        assert time.monotonic() - started < 15
        assert done["attempts"] == 1
    sim = stack.simulators["replicate"]
    assert sim.webhooks_sent >= 1  # type: ignore[attr-defined]


async def test_forged_and_replayed_callbacks_are_rejected_and_change_nothing(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=20]"})
        job = await wait_for(client, job["id"], {"submitted", "running"})
        sim = stack.simulators["replicate"]
        secret = sim.webhook_secret  # type: ignore[attr-defined]
        url = f"{stack.api_url}/v1/callbacks/replicate"
        body = json.dumps({"id": job["provider_task_id"], "status": "succeeded",
                           "output": ["https://evil.example/x.png"]}).encode()
        async with httpx.AsyncClient() as raw:
            now = int(time.time())
            forged = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
                      "webhook-signature": sign("whsec_" + "A" * 32, "msg_1", now, body)}
            assert (await raw.post(url, content=body, headers=forged)).status_code == 401
            old = now - 3600
            replayed = {"webhook-id": "msg_2", "webhook-timestamp": str(old),
                        "webhook-signature": sign(secret, "msg_2", old, body)}
            assert (await raw.post(url, content=body, headers=replayed)).status_code == 401
            unsigned = await raw.post(url, content=body)
            assert unsigned.status_code == 401
            assert unsigned.headers["content-type"] == "application/problem+json"
            # A correctly signed callback is only a hint: the fetched state (still running) stands.
            good = {"webhook-id": "msg_3", "webhook-timestamp": str(now),
                    "webhook-signature": sign(secret, "msg_3", now, body)}
            resp = await raw.post(url, content=body, headers=good)
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
            # Unknown task: acknowledged, ignored.
            other = json.dumps({"id": "nosuchtask", "status": "succeeded"}).encode()
            hdrs = {"webhook-id": "msg_4", "webhook-timestamp": str(now),
                    "webhook-signature": sign(secret, "msg_4", now, other)}
            resp = await raw.post(url, content=other, headers=hdrs)
            assert resp.status_code == 200 and resp.json()["status"].startswith("ignored")
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert after["status"] in ("submitted", "running") and after["outputs"] == []


async def test_a_signed_callback_is_taken_once_inside_the_tolerance_window(redis_url):
    """Issue 13, defect 6: one signed Replicate request was accepted 5 times; a Kling token callback too."""
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await wait_for(client, (await submit(client, input={"prompt": "slow [sim:run=20]"}))["id"],
                             {"submitted", "running"})
        secret = stack.simulators["replicate"].webhook_secret  # type: ignore[attr-defined]
        body = json.dumps({"id": job["provider_task_id"], "status": "processing"}).encode()
        now = int(time.time())
        signed = {"webhook-id": "msg_once", "webhook-timestamp": str(now),
                  "webhook-signature": sign(secret, "msg_once", now, body)}
        kling = await wait_for(client, (await submit(client, provider="kling", kind="video", model="kling-v1",
                                                     input={"prompt": "slow [sim:run=20]"}))["id"],
                               {"submitted", "running"})
        raw_kling = await stack_job_token(stack, kling["id"])
        kling_body = json.dumps({"task_id": kling["provider_task_id"], "task_status": "processing"}).encode()
        async with httpx.AsyncClient(base_url=stack.api_url) as raw:
            outcomes = [(await raw.post("/v1/callbacks/replicate", content=body, headers=signed)).json()["status"]
                        for _ in range(5)]
            kling_url = f"/v1/callbacks/kling?job={kling['id']}&token={raw_kling}"
            kling_outcomes = [(await raw.post(kling_url, content=kling_body)).json()["status"] for _ in range(3)]
    assert outcomes[0] == "accepted" and outcomes[1:] == ["ignored: already received"] * 4
    assert kling_outcomes[0] == "accepted" and kling_outcomes[1:] == ["ignored: already received"] * 2


async def stack_job_token(stack, job_id: str) -> str:  # noqa: ANN001 - the per-job token from the store
    from orchestrator.services.runtime import Runtime

    rt = await Runtime.open(stack.settings)
    try:
        job = await rt.store.get(job_id)
        assert job is not None
        return job.callback_token
    finally:
        await rt.close()
