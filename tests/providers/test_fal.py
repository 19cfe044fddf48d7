"""The fal adapter against the fal simulator, through the real API and worker (and, for the
queue position, the adapter itself over real HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator.cli.devstack import Stack, dev_stack
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, TaskRef
from providers.fal import FalProvider, FalTask
from providers.fal_webhooks import signed_message
from providers.sandbox.fal import FalSimulator
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

FLUX = "fal-ai/flux/dev"
KLING = "fal-ai/kling-video/v2/master/text-to-video"


def fal_job(**body: Any) -> dict[str, Any]:
    return {"provider": "fal", "kind": "image", "model": FLUX, "input": {"prompt": "a red fox in snow"}} | body


def fal_sim(stack: Stack) -> FalSimulator:
    sim = stack.simulators["fal"]
    assert isinstance(sim, FalSimulator)
    return sim


async def assert_outputs_match(client: httpx.AsyncClient, job: dict[str, Any]) -> None:
    assert job["outputs"]
    for out in job["outputs"]:
        served = await client.get(out["url"])
        assert served.status_code == 200
        assert hashlib.sha256(served.content).hexdigest() == out["sha256"]
        assert len(served.content) == out["bytes"]


# -- success ---------------------------------------------------------------------------------

async def test_image_success_maps_common_inputs(stack: Stack) -> None:
    async with api(stack) as client:
        job = await submit(client, **fal_job(input={"prompt": "a red fox", "aspect_ratio": "16:9",
                                                    "num_outputs": 2, "seed": 7}))
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["provider_status"] == "COMPLETED" and done["progress"] == 100
        assert [o["content_type"] for o in done["outputs"]] == ["image/png", "image/png"]
        meta = done["outputs"][0]["metadata"]
        assert meta["width"] == done["outputs"][0]["width"] and meta["has_nsfw_concepts"] is False
        assert meta["seed"] == 7
        await assert_outputs_match(client, done)
    task = fal_sim(stack).tasks[done["provider_task_id"]]
    assert task.input == {"prompt": "a red fox", "aspect_ratio": "16:9", "image_size": "landscape_16_9",
                          "num_images": 2, "seed": 7}
    stats = await sim_stats(stack, "fal")
    assert stats["creations"] == 1


async def test_video_success_submits_the_subpath_and_follows_returned_urls(stack: Stack) -> None:
    async with api(stack) as client:
        job = await submit(client, **fal_job(kind="video", model=KLING,
                                             input={"prompt": "a fox running", "duration_seconds": 5,
                                                    "aspect_ratio": "9:16", "options": {"cfg_scale": 0.5}}))
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        out = done["outputs"][0]
        assert len(done["outputs"]) == 1 and out["content_type"] == "video/mp4"
        assert out["metadata"]["file_name"] == "output.mp4" and out["metadata"]["file_size"] == out["bytes"]
        await assert_outputs_match(client, done)
    task = fal_sim(stack).tasks[done["provider_task_id"]]
    assert task.data["model_id"] == KLING  # the sub-path was kept on submit
    assert task.input == {"prompt": "a fox running", "duration": "5", "aspect_ratio": "9:16", "cfg_scale": 0.5}


async def test_audio_success(stack: Stack) -> None:
    async with api(stack) as client:
        job = await submit(client, **fal_job(kind="audio", model="fal-ai/stable-audio",
                                             input={"prompt": "calm piano", "duration_seconds": 8}))
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["outputs"][0]["content_type"].startswith("audio/")
        await assert_outputs_match(client, done)


async def test_webhook_without_payload_still_succeeds_from_the_result(stack: Stack) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job(
            input={"prompt": "x [sim:payload_error]"})))["id"])
    assert done["status"] == "succeeded", done


# -- failure traps -----------------------------------------------------------------------------

@pytest.mark.parametrize(("directive", "http_status", "error_type"), [
    ("[sim:fail]", 500, "internal_server_error"),               # model error behind a COMPLETED status
    ("[sim:fail=runner_disconnected]", 503, "runner_disconnected"),  # request error, X-Fal-Error-Type
    ("[sim:fail=request_timeout]", 504, "request_timeout"),
])
async def test_completed_with_error_is_a_failed_job(stack: Stack, directive: str, http_status: int,
                                                    error_type: str) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job(input={"prompt": f"boom {directive}"})))["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "provider_failed" and error_type in done["error"]["message"]
    detail = done["error"]["provider_detail"]
    assert detail["http_status"] == http_status and detail["error_type"] == error_type
    assert done["outputs"] == []
    stats = await sim_stats(stack, "fal")
    assert stats["creations"] == 1


async def test_completed_status_carrying_the_error_fails_without_a_result_fetch(stack: Stack) -> None:
    fal_sim(stack).config.extra["status_error_fields"] = True  # COMPLETED + error/error_type in the status
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job(
            input={"prompt": "boom [sim:fail=runner_server_error]"})))["id"])
        stats = await sim_stats(stack, "fal")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_failed"
    assert done["error"]["provider_detail"]["error_type"] == "runner_server_error"
    assert "result" not in stats["requests"]


async def test_content_policy_violation(stack: Stack) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job(input={"prompt": "bad [sim:filtered]"})))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "content_policy_violation"
    detail = done["error"]["provider_detail"]
    assert detail["http_status"] == 422 and detail["error_type"] == "content_policy_violation"
    assert detail["detail"][0]["loc"] == ["body", "prompt"]


async def test_invalid_input_found_by_the_runner_fails_the_job(stack: Stack) -> None:
    # fal validates in the runner: accepted at submit, refused at the result.
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job(input={"options": {"strength": 0.5}})))["id"])
    assert done["status"] == "failed" and done["error"]["provider_detail"]["http_status"] == 422
    assert "field required" in done["error"]["message"]


async def test_transient_status_and_result_errors_are_retried(stack: Stack) -> None:
    await sim_faults(stack, "fal", {"kind": "429", "route": "status", "count": 1},
                     {"kind": "503", "route": "result", "count": 2}, {"kind": "502", "route": "result", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job()))["id"])
    assert done["status"] == "succeeded", done
    stats = await sim_stats(stack, "fal")
    assert stats["creations"] == 1 and stats["requests"]["result"] >= 4


async def test_unknown_key_fails_with_auth_error(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, log_format="text") as stack, api(stack) as client:
        fal_sim(stack).config.api_keys = ["real-id:real-secret"]
        done = await wait_for(client, (await submit(client, **fal_job()))["id"])
        assert (await sim_stats(stack, "fal"))["creations"] == 0
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed"


async def test_429_burst_on_submit_ends_in_success_with_one_creation(stack: Stack) -> None:
    await sim_faults(stack, "fal", {"kind": "429", "route": "submit", "count": 3, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job()))["id"], timeout=40)
    assert done["status"] == "succeeded" and done["attempts"] == 4
    stats = await sim_stats(stack, "fal")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:429": 3}


async def test_ambiguous_submit_is_not_resubmitted(stack: Stack) -> None:
    await sim_faults(stack, "fal", {"kind": "500", "route": "submit", "count": 1, "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await submit(client, **fal_job()))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert (await sim_stats(stack, "fal"))["creations"] == 1


@pytest.mark.parametrize(("body", "field"), [
    (fal_job(model="flux"), "model"),
    (fal_job(model="workflows/someone"), "model"),
    (fal_job(input={"prompt": "x", "duration_seconds": 5}), "input.duration_seconds"),
    (fal_job(kind="video", model=KLING, input={"prompt": "x", "num_outputs": 2}), "input.num_outputs"),
    (fal_job(kind="audio", model="fal-ai/stable-audio", input={"prompt": "x", "aspect_ratio": "16:9"}),
     "input.aspect_ratio"),
    (fal_job(input={"prompt": "x", "resolution": "1024x1024", "aspect_ratio": "16:9"}), "input.aspect_ratio"),
    (fal_job(input={"prompt": "x", "options": {"bad-name": 1}}), "input.options.bad-name"),
    (fal_job(input={}), "input.prompt"),
])
async def test_bad_input_is_422_before_any_provider_request(stack: Stack, body: dict[str, Any], field: str) -> None:
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert [e["field"] for e in problem["errors"]] == [field]
    stats = await sim_stats(stack, "fal")
    assert stats["creations"] == 0 and stats["requests"] == {}


# -- cancel ----------------------------------------------------------------------------------

async def test_cancel_tells_fal(stack: Stack) -> None:
    async with api(stack) as client:
        job = await submit(client, **fal_job(input={"prompt": "slow [sim:run=30]"}))
        job = await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if after["note"] != "cancel requested; telling the provider":
                break
            await asyncio.sleep(0.1)
        assert after["note"] == "the provider was told to stop the task"
        assert after["status"] == "canceled" and after["outputs"] == []
    assert (await sim_stats(stack, "fal"))["requests"]["cancel"] == 1
    assert fal_sim(stack).tasks[job["provider_task_id"]].canceled_at is not None


async def test_request_canceled_at_fal_cancels_the_job(stack: Stack) -> None:
    async with api(stack) as client:
        job = await submit(client, **fal_job(input={"prompt": "slow [sim:run=30]"}))
        job = await wait_for(client, job["id"], {"running"})
        async with httpx.AsyncClient() as raw:  # someone cancels the request at fal directly
            url = f"{stack.simulator_url('fal')}/fal-ai/flux/requests/{job['provider_task_id']}/cancel"
            resp = await raw.put(url, headers={"Authorization": "Key a:b"})
            assert resp.status_code == 202
        done = await wait_for(client, job["id"])
    assert done["status"] == "canceled" and done["error"]["code"] == "provider_canceled"
    assert done["error"]["provider_detail"]["error_type"] == "client_cancelled"


# -- queue position ------------------------------------------------------------------------------

async def test_queue_position_is_reported(stack: Stack) -> None:
    settings = stack.settings.provider_settings()["fal"]
    provider = FalProvider(settings)
    request = GenerationRequest(kind=MediaKind.image, model=FLUX,
                                input=MediaInput(prompt="wait [sim:queue=30] [sim:position=3]"), reference="job_queue")
    async with httpx.AsyncClient(timeout=10) as http:
        ctx = CallContext(http=http, api_key=settings.api_keys[0])
        result = await provider.submit(ctx, request)
        state = FalTask.model_validate(result.state.model_dump() if result.state else {})
        assert result.status == "IN_QUEUE" and "/fal-ai/flux/requests/" in (state.status_url or "")
        task = TaskRef(task_id=result.task_id, request=request, state=state.model_dump(exclude_none=True))
        status = await provider.fetch(ctx, task)
        assert status.state == "queued" and status.raw_status == "IN_QUEUE"
        assert status.queue_position == 3
        assert await provider.cancel(ctx, task) is True


# -- webhooks -------------------------------------------------------------------------------------

def signed_headers(key: Ed25519PrivateKey, request_id: str, body: bytes, ts: int,
                   user_id: str = "sim-user") -> dict[str, str]:
    signature = key.sign(signed_message(request_id, user_id, str(ts), body)).hex()
    return {"content-type": "application/json", "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": user_id, "x-fal-webhook-timestamp": str(ts),
            "x-fal-webhook-signature": signature}


async def test_webhook_finishes_the_job_without_waiting_for_a_poll(redis_url: str) -> None:
    # Polls are 2+ minutes apart here (30 s minimum, slowed while a callback is expected).
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        done = await wait_for(client, (await submit(client, **fal_job()))["id"], timeout=15)
        assert done["status"] == "succeeded" and time.monotonic() - started < 15
        await assert_outputs_match(client, done)
        stats = await sim_stats(stack, "fal")
    assert [d["status_code"] for d in fal_sim(stack).webhook_log] == [200]
    # One status fetch and one result fetch, both caused by the webhook; JWKS fetched once.
    assert stats["requests"]["status"] == 1 and stats["requests"]["result"] == 1
    assert stats["requests"]["jwks"] == 1


async def test_forged_expired_and_tampered_webhooks_are_rejected_and_change_nothing(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        sim = fal_sim(stack)
        job = await submit(client, **fal_job(input={"prompt": "slow [sim:run=60]"}))
        job = await wait_for(client, job["id"], {"submitted", "running"})
        before = (await client.get(f"/v1/jobs/{job['id']}")).json()
        rid = job["provider_task_id"]
        url = f"{stack.api_url}/v1/callbacks/fal"
        body = json.dumps({"request_id": rid, "gateway_request_id": rid, "status": "OK",
                           "payload": {"images": [{"url": "https://evil.example/x.png",
                                                   "content_type": "image/png"}]}}).encode()
        real_key = sim.signing_key.private
        now = int(time.time())
        rejected = [
            signed_headers(Ed25519PrivateKey.generate(), rid, body, now),      # forged: not fal's key
            signed_headers(real_key, rid, body, now - 400),                    # expired / replayed later
            signed_headers(real_key, rid, body, now + 400),                    # from the future
            signed_headers(real_key, rid, body.replace(b"OK", b"ER"), now),    # signed another body
            signed_headers(real_key, "another-request", body, now),            # header and body disagree
            {"content-type": "application/json"},                              # unsigned
            signed_headers(real_key, rid, body, now) | {"x-fal-webhook-signature": "zz"},  # not hex
        ]
        async with httpx.AsyncClient() as raw:
            for headers in rejected:
                resp = await raw.post(url, content=body, headers=headers)
                assert resp.status_code == 401, (headers, resp.text)
                assert resp.headers["content-type"] == "application/problem+json"
            after = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert after["sequence"] == before["sequence"] and after["outputs"] == []
            # Forged callbacks cannot make us hammer the JWKS: one load, at most one forced refresh.
            assert (await sim_stats(stack, "fal"))["requests"]["jwks"] <= 2
            # Genuinely signed but a lie: only a hint, the fetched state (still running) stands.
            resp = await raw.post(url, content=body, headers=signed_headers(real_key, rid, body, now))
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (await sim_stats(stack, "fal"))["requests"].get("status", 0) < 1:
                await asyncio.sleep(0.05)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert after["status"] in ("submitted", "running") and after["outputs"] == []
        assert (await sim_stats(stack, "fal"))["requests"].get("result", 0) == 0


async def test_key_rotation_refreshes_the_jwks_and_retired_keys_are_refused(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        sim = fal_sim(stack)
        first = await wait_for(client, (await submit(client, **fal_job()))["id"], timeout=15)
        assert first["status"] == "succeeded"
        old_key = sim.signing_key.private
        async with httpx.AsyncClient() as raw:
            resp = await raw.post(f"{stack.simulator_url('fal')}/_sim/fal/rotate-key", json={"retire_old": True})
            assert resp.status_code == 200
        second = await wait_for(client, (await submit(client, **fal_job(input={"prompt": "again"})))["id"],
                                timeout=15)
        assert second["status"] == "succeeded"  # its webhook was signed by a key we had not seen
        stats = await sim_stats(stack, "fal")
        assert stats["requests"]["jwks"] == 2 and stats["requests"]["status"] == 2
        # A replay of a finished job's webhook, even correctly signed, changes nothing.
        rid = second["provider_task_id"]
        body = json.dumps({"request_id": rid, "status": "OK", "payload": None}).encode()
        async with httpx.AsyncClient() as raw:
            url = f"{stack.api_url}/v1/callbacks/fal"
            now = int(time.time())
            resp = await raw.post(url, content=body, headers=signed_headers(sim.signing_key.private, rid, body, now))
            assert resp.status_code == 200 and resp.json()["status"] == "ignored: job already finished"
            # The retired key no longer verifies.
            resp = await raw.post(url, content=body, headers=signed_headers(old_key, rid, body, now))
            assert resp.status_code == 401
        again = (await client.get(f"/v1/jobs/{second['id']}")).json()
        assert again["sequence"] == second["sequence"]
