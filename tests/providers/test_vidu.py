"""The Vidu adapter against the Vidu simulator, through the real API and worker: creations, cancel,
and HMAC-signed callbacks verified before they are taken as hints."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from email.utils import formatdate
from typing import Any

import httpx

from orchestrator.cli.devstack import Stack, dev_stack
from providers.sandbox.vidu import ViduSimulator, callback_signature, callback_signing_string
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

MODEL = "viduq2"
IMAGE = "https://example.com/rabbit.png"


async def vidu_job(client: httpx.AsyncClient, model: str = MODEL, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a rabbit in a spacesuit waves at the camera"} | input_fields
    return await submit(client, provider="vidu", kind="video", model=model, input=body)


def vidu_sim(stack: Stack) -> ViduSimulator:
    sim = stack.simulators["vidu"]
    assert isinstance(sim, ViduSimulator)
    return sim


async def served_sha256(stack: Stack, task_id: str) -> str:
    sim = vidu_sim(stack)
    body = sim.creation_body(sim.tasks[task_id], stack.simulator_url("vidu"), time.time())
    async with httpx.AsyncClient() as raw:
        served = await raw.get(body["creations"][0]["url"])
    assert served.status_code == 200
    return hashlib.sha256(served.content).hexdigest()


async def wait_until(client: httpx.AsyncClient, job_id: str, check: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if check(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never matched; last: {job}")


# -- success ---------------------------------------------------------------------------------

async def test_text_to_video_success_stores_the_simulators_bytes(stack: Stack) -> None:
    async with api(stack) as client:
        job = await vidu_job(client, duration_seconds=8, aspect_ratio="9:16", resolution="1080p", seed=42,
                             options={"movement_amplitude": "small", "bgm": True, "style": "anime"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["provider_status"] == "success" and done["progress"] == 100
    (output,) = done["outputs"]
    assert output["content_type"] == "video/mp4" and output["metadata"]["creation_id"]
    task = vidu_sim(stack).tasks[done["provider_task_id"]]
    assert {k: task.input[k] for k in ("model", "duration", "aspect_ratio", "resolution", "seed", "bgm", "style",
                                       "movement_amplitude")} == \
        {"model": MODEL, "duration": 8, "aspect_ratio": "9:16", "resolution": "1080p", "seed": 42, "bgm": True,
         "style": "anime", "movement_amplitude": "small"}
    echo = json.loads(task.input["payload"])  # the job id (and the callback URL) ride in payload
    assert echo["job"] == job["id"]
    assert echo["callback_url"].startswith(f"{stack.settings.public_url}/v1/callbacks/vidu?job={job['id']}&token=")
    assert task.data["token"] == "sandbox-key"  # Authorization: Token <key> (Bearer is refused)
    assert output["sha256"] == await served_sha256(stack, done["provider_task_id"])
    assert (await sim_stats(stack, "vidu"))["creations"] == 1


async def test_image_start_end_and_reference_endpoints(stack: Stack) -> None:
    async with api(stack) as client:
        jobs = [
            await vidu_job(client, image_url=IMAGE, prompt=None),
            await vidu_job(client, model="vidu2.0", image_url=IMAGE, duration_seconds=4,
                           options={"last_frame_url": "https://example.com/end.png"}),
            await vidu_job(client, model="viduq1", options={"reference_images": [IMAGE, IMAGE, IMAGE]}),
        ]
        done = [await wait_for(client, job["id"]) for job in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    sim = vidu_sim(stack)
    images = [sim.tasks[d["provider_task_id"]].input["images"] for d in done]
    assert images == [[IMAGE], [IMAGE, "https://example.com/end.png"], [IMAGE] * 3]


# -- failures ---------------------------------------------------------------------------------

async def test_failures_and_content_refusals(stack: Stack) -> None:
    async with api(stack) as client:
        failed = await vidu_job(client, prompt="a rabbit [sim:fail]")
        filtered = await vidu_job(client, prompt="a rabbit [sim:filtered]")  # output moderation, HTTP 200
        blocked = await vidu_job(client, prompt="a rabbit [sim:blocked]")  # 400 TaskPromptPolicyViolation
        failed, filtered, blocked = [await wait_for(client, j["id"]) for j in (failed, filtered, blocked)]
        vidu_sim(stack).config.extra["credit_balance"] = 0
        broke = await wait_for(client, (await vidu_job(client))["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_failed"
    assert "InternalServiceFailure" in failed["error"]["message"]
    assert filtered["error"]["code"] == "content_policy" and "CreationPolicyViolation" in filtered["error"]["message"]
    assert blocked["error"]["code"] == "content_policy" and blocked["provider_task_id"] is None
    assert broke["error"]["code"] == "provider_insufficient_balance" and broke["attempts"] == 1
    assert (await sim_stats(stack, "vidu"))["creations"] == 2


async def test_rate_limit_then_success_with_one_creation(stack: Stack) -> None:
    await sim_faults(stack, "vidu", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await vidu_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "vidu")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_malformed_bodies(stack: Stack) -> None:
    await sim_faults(stack, "vidu", {"kind": "malformed", "route": "get", "count": 2})
    async with api(stack) as client:
        polled = await wait_for(client, (await vidu_job(client))["id"])
        await sim_faults(stack, "vidu", {"kind": "malformed", "route": "create", "count": 1})
        created = await wait_for(client, (await vidu_job(client, prompt="another rabbit"))["id"])
    assert polled["status"] == "succeeded", polled
    assert created["status"] == "failed" and created["error"]["code"] == "provider_malformed_response"


async def test_expired_creation_url_fails_the_collection(stack: Stack) -> None:
    vidu_sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await vidu_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_ambiguous_create_fails_without_resubmitting(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, log_format="text",
                         providers_file={"vidu": {"request_timeout_seconds": 0.5}}) as stack, api(stack) as client:
        await sim_faults(stack, "vidu", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 1.5})
        done = await wait_for(client, (await vidu_job(client))["id"])
        stats = await sim_stats(stack, "vidu")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert stats["creations"] == 1 and stats["requests"]["create"] == 1


# -- cancel -----------------------------------------------------------------------------------

async def test_cancel_stops_a_queued_task_and_reports_one_already_processing(stack: Stack) -> None:
    async with api(stack) as client:
        queued = await vidu_job(client, prompt="a rabbit [sim:queue=20]")
        running = await vidu_job(client, prompt="a rabbit [sim:run=20]")
        await wait_for(client, queued["id"], {"submitted"})
        await wait_for(client, running["id"], {"running"})
        for job in (queued, running):
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code in (200, 202)
        stopped = await wait_until(client, queued["id"], lambda j: "told to stop" in (j["note"] or ""))
        refused = await wait_until(client, running["id"], lambda j: "can not cancel" in (j["note"] or ""))
    assert stopped["status"] == "canceled" and refused["status"] == "canceled"
    sim = vidu_sim(stack)
    assert sim.tasks[stopped["provider_task_id"]].canceled_at is not None
    assert sim.tasks[refused["provider_task_id"]].canceled_at is None
    assert (await sim_stats(stack, "vidu"))["requests"]["cancel"] == 2


# -- callbacks --------------------------------------------------------------------------------

async def test_signed_callbacks_finish_the_job_without_waiting_for_a_poll(redis_url: str) -> None:
    # Polls are 30+ s apart: only Vidu's signed callback makes the job finish quickly. The signing
    # string without its trailing newline (UNCONFIRMED) is accepted too.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        vidu_sim(stack).config.extra["callback_trailing_newline"] = False
        started = time.monotonic()
        done = await wait_for(client, (await vidu_job(client))["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15
    assert vidu_sim(stack).callbacks_sent >= 1


def signed(url: str, key: str, *, date: str | None = None, nonce: str = "nonce-1") -> dict[str, str]:
    """Headers of a callback to ``url`` signed as Vidu documents (the simulator's signer)."""
    date = date or formatdate(usegmt=True)
    signature = callback_signature(key, callback_signing_string("POST", url, date, nonce))
    return {"Date": date, "x-request-nonce": nonce, "X-HMAC-SIGNED-HEADERS": "Date;x-request-nonce",
            "X-HMAC-ALGORITHM": "hmac-sha256", "X-HMAC-ACCESS-KEY": "vidu", "X-HMAC-SIGNATURE": signature,
            "content-type": "application/json"}


async def test_forged_stale_and_replayed_callbacks_are_refused_and_a_good_one_is_only_a_hint(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await vidu_job(client, prompt="slow [sim:queue=20]")
        job = await wait_for(client, job["id"], {"submitted"})
        payload = vidu_sim(stack).tasks[job["provider_task_id"]].input["payload"]
        url = json.loads(payload)["callback_url"]  # ours: /v1/callbacks/vidu?job=...&token=...
        claim = {"id": job["provider_task_id"], "state": "success", "err_code": "", "payload": payload,
                 "creations": [{"id": "1", "url": "https://evil.example/x.mp4"}]}
        body = json.dumps(claim).encode()
        stale = formatdate(time.time() - 3600, usegmt=True)
        async with httpx.AsyncClient() as raw:
            async def post(headers: dict[str, str], content: bytes = body) -> int:
                return (await raw.post(url, content=content, headers=headers)).status_code

            assert await post({"content-type": "application/json"}) == 401  # unsigned
            assert await post(signed(url, "not-our-key")) == 401  # forged
            assert await post(signed(url.replace("job=", "job=x"), "sandbox-key")) == 401  # another URL signed
            assert await post(signed(url, "sandbox-key", date=stale, nonce="n-stale")) == 401
            no_echo = json.dumps(claim | {"payload": ""}).encode()
            # Without the echo, the signature is checked against the URL as called.
            assert await post(signed(url, "sandbox-key", nonce="n-echo"), no_echo) == 200
            assert await post(signed(url.replace("job=", "job=x"), "sandbox-key", nonce="n-x"), no_echo) == 401
            good = await raw.post(url, content=body, headers=signed(url, "sandbox-key", nonce="n-good"))
            assert good.status_code == 200 and good.json()["status"] == "accepted"
            assert await post(signed(url, "sandbox-key", nonce="n-good")) == 401  # replayed nonce
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    # The signed callback claimed success; the fetched state (still queued) stands.
    assert after["status"] == "submitted" and after["provider_status"] in ("created", "queueing")
    assert after["outputs"] == []


# -- validation -------------------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    (MODEL, {"prompt": None}, "input.prompt"),  # text-to-video needs a prompt
    (MODEL, {"negative_prompt": "blur"}, "input.negative_prompt"),
    (MODEL, {"duration_seconds": 4.5}, "input.duration_seconds"),
    (MODEL, {"aspect_ratio": "21:9"}, "input.aspect_ratio"),
    (MODEL, {"resolution": "4k"}, "input.resolution"),
    (MODEL, {"num_outputs": 2}, "input.num_outputs"),
    (MODEL, {"image_url": "ftp://example.com/a.png"}, "input.image_url"),
    (MODEL, {"options": {"last_frame_url": IMAGE}}, "input.options.last_frame_url"),  # no first frame
    (MODEL, {"options": {"reference_images": []}}, "input.options.reference_images"),
    (MODEL, {"options": {"callback_url": "https://evil.example"}}, "input.options.callback_url"),
    (MODEL, {"options": {"bgm": "yes"}}, "input.options.bgm"),
    (MODEL, {"image_url": IMAGE, "options": {"style": "anime"}}, "input.options.style"),
    ("kling-v1", {}, "model"),
]


async def test_bad_input_is_refused_before_any_request(stack: Stack) -> None:
    async with api(stack) as client:
        for model, fields, field in BAD_INPUTS:
            resp = await client.post("/v1/jobs", json={"provider": "vidu", "kind": "video", "model": model,
                                                       "input": {"prompt": "a rabbit"} | fields})
            assert resp.status_code == 422, resp.text
            assert field in [e["field"] for e in resp.json()["errors"]], (field, resp.json())
    assert (await sim_stats(stack, "vidu"))["requests"] == {}
