"""The Kling adapter against the Kling simulator and against a new-api gateway in front of Kling,
through the real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.redis_server import free_port
from orchestrator.store.jobs import JobStore
from providers.contract import ProviderSettings
from providers.kling import KlingProvider, parse_gateway_task
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

GATEWAY_KEY = "sk-atelier0gateway0key"


async def kling_job(client: httpx.AsyncClient, model: str = "kling-v1", **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a cat playing piano"} | input_fields
    return await submit(client, provider="kling", kind="video", model=model, input=body)


async def wait_until(client: httpx.AsyncClient, job_id: str, check: Callable[[dict[str, Any]], bool],
                     timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if check(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never matched; last: {job}")


def sim_task(stack: Stack, task_id: str) -> Any:
    return stack.simulators["kling"].tasks[task_id]  # type: ignore[attr-defined]


# -- direct: success -----------------------------------------------------------------------

async def test_text_to_video_success_stores_the_video_from_the_signed_cdn_url(stack):
    async with api(stack) as client:
        job = await kling_job(client, duration_seconds=10, aspect_ratio="9:16", negative_prompt="blur",
                              options={"mode": "pro", "cfg_scale": 0.7})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 100 and done["attempts"] == 1 and done["provider_status"] == "succeed"
    (output,) = done["outputs"]
    assert output["content_type"] == "video/mp4" and output["metadata"]["duration"] == "10.1"
    task = sim_task(stack, done["provider_task_id"])
    # Duration went as Kling's string enum, our job id as the external id, under text2video.
    assert task.input == {"model_name": "kling-v1", "mode": "pro", "duration": "10"}
    assert task.data["external_task_id"] == job["id"] and task.data["family"] == "text2video"
    sim = stack.simulators["kling"]
    url = sim.task_object(task, stack.simulator_url("kling"))["task_result"]["videos"][0]["url"]  # type: ignore[attr-defined]
    async with httpx.AsyncClient() as raw:
        served = await raw.get(url)  # signed CDN URL: no auth header needed
        stored = await raw.get(output["url"])
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"] == hashlib.sha256(stored.content).hexdigest()


async def test_image_to_video_is_created_and_polled_in_its_own_namespace(stack):
    async with api(stack) as client:
        job = await kling_job(client, model="kling-v1-5", image_url="https://example.com/cat.png",
                              duration_seconds=5, options={"image_tail": "https://example.com/end.png"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert sim_task(stack, done["provider_task_id"]).data["family"] == "image2video"
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 1 and stats["requests"]["get"] >= 1


# -- direct: failure traps -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("prompt", "code", "message"),
    [
        ("a cat [sim:fail=Image pixel is invalid]", "provider_failed", "Image pixel is invalid"),
        ("a cat [sim:filtered]", "provider_content_filtered", "risk control"),
    ],
)
async def test_failed_task_inside_a_code_0_envelope(stack, prompt, code, message):
    async with api(stack) as client:
        done = await wait_for(client, (await kling_job(client, prompt=prompt))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == code and message in done["error"]["message"]
    assert done["error"]["provider_detail"]["task_id"] == done["provider_task_id"]


@pytest.mark.parametrize(
    ("prompt", "code", "message"),
    [
        ("a cat [sim:balance]", "provider_insufficient_balance", "1102"),
        ("a cat [sim:blocked]", "provider_content_filtered", "1301"),
    ],
)
async def test_refusals_with_business_codes_fail_at_once(stack, prompt, code, message):
    async with api(stack) as client:
        done = await wait_for(client, (await kling_job(client, prompt=prompt))["id"])
    assert done["status"] == "failed" and done["attempts"] == 1  # 1102 is never retried
    assert done["error"]["code"] == code and message in done["error"]["message"]
    assert done["provider_task_id"] is None
    assert (await sim_stats(stack, "kling"))["creations"] == 0


async def test_rate_limit_burst_ends_in_success_with_one_creation(stack):
    # HTTP 429 with business code 1302 (the simulator's default for injected 429s).
    await sim_faults(stack, "kling", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        job = await kling_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}
    assert any(e["type"] == "job.queued" and "1302" in (e["note"] or "") for e in events)


async def test_concurrency_limit_makes_the_job_wait_not_fail(stack):
    stack.simulators["kling"].config.extra["concurrency"] = 1
    async with api(stack) as client:
        first = await kling_job(client, prompt="first [sim:run=2]")
        await wait_for(client, first["id"], {"submitted", "running"})
        second = await kling_job(client, prompt="second")
        throttled = await wait_until(client, second["id"], lambda j: j["phase"] == "throttled")
        assert throttled["status"] == "queued" and "concurrency" in throttled["note"]
        done = await wait_for(client, second["id"], timeout=40)
        assert (await wait_for(client, first["id"]))["status"] == "succeeded"
    assert done["status"] == "succeeded" and done["attempts"] >= 2
    assert (await sim_stats(stack, "kling"))["creations"] == 2


async def test_refused_token_is_an_auth_failure(redis_url):
    async with dev_stack(redis_url=redis_url, log_format="text", kling_access_key="sandbox-ak",
                         kling_secret_key="not-the-secret") as stack, api(stack) as client:
        done = await wait_for(client, (await kling_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed"
    assert "1000" in done["error"]["message"]
    assert "not-the-secret" not in str(done)


def test_jwt_is_built_from_the_key_pair_cached_and_refreshed_before_expiry():
    provider = KlingProvider(ProviderSettings(name="kling", base_url="https://kling.invalid",
                                              extra={"access_key": "AK1", "secret_key": "SK" * 16}))
    now = 1_700_000_000.0
    token = provider.token(now)
    claims = jwt.decode(token, "SK" * 16, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
    assert claims == {"iss": "AK1", "exp": int(now) + 1800, "nbf": int(now) - 5}
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert provider.token(now + 1400) == token  # more than 5 minutes left: reused
    fresh = provider.token(now + 1600)  # less than 5 minutes left: rebuilt
    assert fresh != token and jwt.decode(fresh, options={"verify_signature": False})["exp"] == int(now) + 1600 + 1800


@pytest.mark.parametrize(
    ("model", "input_fields", "field"),
    [
        ("kling-v1", {"duration_seconds": 7}, "input.duration_seconds"),
        ("kling-v3", {"duration_seconds": 16}, "input.duration_seconds"),
        ("kling-v1", {"options": {"mode": "ultra"}}, "input.options.mode"),
        ("kling-v1", {"aspect_ratio": "4:3"}, "input.aspect_ratio"),
        ("kling-v1", {"image_url": "https://example.com/a.png", "aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("kling-v2-master", {"options": {"cfg_scale": 0.5}}, "input.options.cfg_scale"),
        ("kling-v1", {"options": {"cfg_scale": 2}}, "input.options.cfg_scale"),
        ("kling-v1", {"options": {"sound": "on"}}, "input.options.sound"),
        ("kling-v1", {"options": {"duration": 5.5}}, "input.options.duration"),
        ("kling-v1", {"options": {"image": "data:image/png;base64,AAAA"}}, "input.options.image"),
        ("kling-v1", {"options": {"callback_url": "https://evil.example"}}, "input.options.callback_url"),
        ("kling-v1", {"seed": 3}, "input.seed"),
        ("kling-v1", {"resolution": "1080p"}, "input.resolution"),
        ("kling-v1", {"num_outputs": 2}, "input.num_outputs"),
        ("kling-v1", {"prompt": ""}, "input.prompt"),
        ("kling-v1", {"prompt": "x" * 2501}, "input.prompt"),
        ("kling-v9", {}, "model"),
        ("kling-v1-5", {}, "model"),  # image-to-video only
    ],
)
async def test_bad_input_is_rejected_before_any_request(stack, model, input_fields, field):
    async with api(stack) as client:
        body = {"prompt": "a cat"} | input_fields
        resp = await client.post("/v1/jobs", json={"provider": "kling", "kind": "video", "model": model,
                                                   "input": body})
    assert resp.status_code == 422, resp.text
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert (await sim_stats(stack, "kling"))["requests"] == {}


async def test_cancel_leaves_a_note_that_kling_cannot_be_told(stack):
    async with api(stack) as client:
        job = await kling_job(client, prompt="a long one [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code in (200, 202), resp.text
        canceled = await wait_until(client, job["id"], lambda j: "no cancel endpoint" in (j["note"] or ""))
    assert canceled["status"] == "canceled"


async def test_ambiguous_submit_is_reconciled_by_external_task_id(stack):
    # Kling creates the task, then the answer is lost (HTTP 500 / code 5000 after the effect).
    await sim_faults(stack, "kling", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
    async with api(stack) as client:
        job = await kling_job(client)
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert sim_task(stack, done["provider_task_id"]).data["external_task_id"] == job["id"]
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 1 and stats["duplicate_identities"] == {}


async def test_ambiguous_submit_with_nothing_found_fails_without_resubmitting(stack):
    await sim_faults(stack, "kling", {"kind": "500", "route": "create", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await kling_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 0 and stats["requests"]["create"] == 1


# -- direct: callbacks -----------------------------------------------------------------------

async def test_callback_finishes_the_job_without_waiting_for_a_poll(redis_url):
    # Polls are 30+ s apart: only Kling's callback can make the job finish quickly.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        done = await wait_for(client, (await kling_job(client))["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15
    assert stack.simulators["kling"].callbacks_sent >= 1  # type: ignore[attr-defined]


async def test_forged_callbacks_are_rejected_and_a_callback_is_only_a_hint(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        stack.simulators["kling"].config.extra["callback_mode"] = "drop"
        job = await kling_job(client, prompt="slow [sim:queue=20]")
        job = await wait_for(client, job["id"], {"submitted", "running"})
        url = f"{stack.api_url}/v1/callbacks/kling"
        forged = b'{"task_id": "%s", "task_status": "succeed", "task_result": {"videos": [{"url": ' \
                 b'"https://evil.example/x.mp4"}]}}' % job["provider_task_id"].encode()
        async with httpx.AsyncClient() as raw:
            assert (await raw.post(url, params={"job": job["id"], "token": "wrong"}, content=forged)).status_code == 401
            no_token = await raw.post(url, params={"job": job["id"]}, content=forged)
            assert no_token.status_code == 401
            assert no_token.headers["content-type"] == "application/problem+json"
            token = await callback_token(stack, job["id"])
            good = {"job": job["id"], "token": token}
            assert (await raw.post(url, params=good, content=b"not json")).status_code == 401
            # Right token, forged body claiming success: the fetched state (still queued) stands.
            resp = await raw.post(url, params=good, content=forged)
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "submitted" and after["provider_status"] == "submitted" and after["outputs"] == []


async def callback_token(stack: Stack, job_id: str) -> str:
    """The per-job token the worker put in the callback URL (read from the job record)."""
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None and job.callback_token
    return job.callback_token


# -- through a new-api gateway ----------------------------------------------------------------

@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[Stack]:
    """Kling reached through the new-api gateway simulator: base URL = its Kling mount, a gateway key."""
    port = free_port()  # the gateway's URL must be known before the stack starts
    async with dev_stack(redis_url=redis_url, sandbox_port=port, log_format="text",
                         kling_base_url=f"http://127.0.0.1:{port}/gateway-kling/kling",
                         kling_api_key=GATEWAY_KEY) as stack:
        yield stack


async def gateway_row(stack: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {GATEWAY_KEY}"}) as raw:
        resp = await raw.get(f"{stack.simulator_url('gateway-kling')}/kling/v1/videos/text2video/{task_id}")
    row: dict[str, Any] = resp.json()["data"]
    return row


async def test_gateway_success_after_not_start(gateway):
    sim = gateway.simulators["gateway-kling"]
    sim.config.extra["gateway_tick_seconds"] = 3600  # the gateway has not polled Kling yet
    async with api(gateway) as client:
        job = await kling_job(client, duration_seconds=5)
        waiting = await wait_until(client, job["id"], lambda j: j["provider_status"] == "NOT_START")
        assert waiting["status"] == "submitted" and waiting["provider_task_id"].startswith("task_")
        sim.config.extra["gateway_tick_seconds"] = 0.25  # now it polls
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["provider_status"] == "SUCCESS" and done["progress"] == 100
    (output,) = done["outputs"]
    row = await gateway_row(gateway, done["provider_task_id"])
    async with httpx.AsyncClient() as raw:
        served = await raw.get(row["result_url"])
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"]
    assert sim.users == {"atelier0gateway0key": 1}  # type: ignore[attr-defined]  # Bearer gateway key, no JWT
    assert (await sim_stats(gateway, "kling"))["requests"] == {}  # Kling itself never reached directly


async def test_gateway_failure_carries_the_fail_reason(gateway):
    async with api(gateway) as client:
        done = await wait_for(client, (await kling_job(client, prompt="a cat [sim:fail]"))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "provider_failed"
    assert "Image pixel is invalid" in done["error"]["message"]


async def test_gateway_timeout_sweep_fails_the_job(gateway):
    gateway.simulators["gateway-kling"].config.extra["gateway_task_timeout_seconds"] = 1.5
    async with api(gateway) as client:
        done = await wait_for(client, (await kling_job(client, prompt="a cat [sim:stuck]"))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "provider_gateway_timeout"
    assert "任务超时" in done["error"]["message"]


async def test_gateway_relays_klings_content_refusal(gateway):
    async with api(gateway) as client:
        done = await wait_for(client, (await kling_job(client, prompt="a cat [sim:unsafe]"))["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "provider_content_filtered" and "1301" in done["error"]["message"]


async def test_gateway_429_burst_ends_in_success_with_one_creation(gateway):
    await sim_faults(gateway, "gateway-kling", {"kind": "429", "route": "submit", "count": 2, "retry_after": 1})
    async with api(gateway) as client:
        done = await wait_for(client, (await kling_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    assert (await sim_stats(gateway, "gateway-kling"))["creations"] == 1


async def test_gateway_ambiguous_submit_is_not_resubmitted(gateway):
    # A gateway cannot look a task up by our external id: the job fails rather than paying twice.
    await sim_faults(gateway, "gateway-kling", {"kind": "500", "route": "submit", "count": 1, "after_effect": True})
    async with api(gateway) as client:
        done = await wait_for(client, (await kling_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert (await sim_stats(gateway, "gateway-kling"))["creations"] == 1


async def test_gateway_cancel_is_local_only(gateway):
    gateway.simulators["gateway-kling"].config.extra["gateway_tick_seconds"] = 3600
    async with api(gateway) as client:
        job = await kling_job(client)
        await wait_for(client, job["id"], {"submitted"})
        await client.post(f"/v1/jobs/{job['id']}/cancel")
        canceled = await wait_until(client, job["id"], lambda j: "no cancel endpoint" in (j["note"] or ""))
    assert canceled["status"] == "canceled"


@pytest.mark.parametrize(
    ("raw", "state"),
    [("", "queued"), ("NOT_START", "queued"), ("unknown", "queued"), ("SUBMITTED", "queued"),
     ("QUEUED", "queued"), ("IN_PROGRESS", "running"), ("UNKNOWN", "unknown"), ("MODAL", "unknown")],
)
def test_gateway_statuses_before_and_during_the_run_are_not_failures(raw, state):
    status = parse_gateway_task({"task_id": "task_x", "status": raw, "progress": "30%", "fail_reason": ""})
    assert status.state == state and status.progress == 30
