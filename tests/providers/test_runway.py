"""The Runway adapter against the Runway simulator, through the real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

IMAGE = "https://example.com/hills.png"
SANDBOX_HEADERS = {"Authorization": "Bearer sandbox-key", "X-Runway-Version": "2024-11-06"}


async def runway_job(client: httpx.AsyncClient, model: str = "gen4_turbo", **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a drone shot over hills", "image_url": IMAGE} | input_fields
    body = {k: v for k, v in body.items() if v is not None}
    return await submit(client, provider="runway", kind="video", model=model, input=body)


async def wait_until(client: httpx.AsyncClient, job_id: str, check: Callable[[dict[str, Any]], bool],
                     timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if check(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never matched; last: {job}")


async def sim_task_view(stack: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=SANDBOX_HEADERS) as raw:
        resp = await raw.get(f"{stack.simulator_url('runway')}/v1/tasks/{task_id}")
    body: dict[str, Any] = resp.json()
    return body


async def test_image_to_video_success_stores_the_signed_output(stack):
    async with api(stack) as client:
        job = await runway_job(client, duration_seconds=5, aspect_ratio="16:9", seed=42)
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["provider_status"] == "SUCCEEDED" and done["progress"] == 100 and done["attempts"] == 1
    (output,) = done["outputs"]
    assert output["content_type"] == "video/mp4"
    task = await sim_task_view(stack, done["provider_task_id"])  # a fresh signed URL to the same asset
    async with httpx.AsyncClient() as raw:
        served = await raw.get(task["output"][0])
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"]


async def test_text_to_video_maps_aspect_ratio_and_resolution_to_a_pixel_ratio(stack):
    sim = stack.simulators["runway"]
    seen: list[dict[str, Any]] = []
    original = sim.validate  # type: ignore[attr-defined]

    def recording(endpoint: str, body: dict[str, Any]) -> Any:  # observe the wire body, change nothing
        seen.append({"endpoint": endpoint} | body)
        return original(endpoint, body)

    sim.validate = recording  # type: ignore[attr-defined]
    async with api(stack) as client:
        t2v = await runway_job(client, model="veo3.1_fast", image_url=None, aspect_ratio="9:16",
                               resolution="1080p", duration_seconds=6, negative_prompt="rain",
                               options={"audio": False})
        i2v = await runway_job(client, aspect_ratio="4:3",
                               options={"contentModeration": {"publicFigureThreshold": "low"}})
        for job in (t2v, i2v):
            assert (await wait_for(client, job["id"]))["status"] == "succeeded"
    assert seen[0] == {"endpoint": "text_to_video", "model": "veo3.1_fast", "promptText": "a drone shot over hills",
                       "negativePrompt": "rain", "duration": 6, "ratio": "1080:1920", "audio": False}
    assert seen[1] == {"endpoint": "image_to_video", "model": "gen4_turbo", "promptText": "a drone shot over hills",
                       "promptImage": IMAGE, "ratio": "1104:832",
                       "contentModeration": {"publicFigureThreshold": "low"}}


async def test_throttled_is_queued_and_visible_then_running_progress(stack):
    async with api(stack) as client:
        job = await runway_job(client, prompt="hills [sim:throttled=2] [sim:run=3]")
        throttled = await wait_until(client, job["id"], lambda j: j["provider_status"] == "THROTTLED")
        assert throttled["status"] == "submitted"  # queued at Runway, not failed
        running = await wait_until(client, job["id"], lambda j: j["status"] == "running" and (j["progress"] or 0) > 0)
        assert running["provider_status"] == "RUNNING" and running["progress"] < 100
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["progress"] == 100


@pytest.mark.parametrize(
    ("prompt", "code", "text"),
    [
        ("hills [sim:fail]", "provider_failed", "INTERNAL.BAD_OUTPUT.CODE01"),
        ("hills [sim:fail=THIRD_PARTY.UNAVAILABLE]", "provider_failed", "THIRD_PARTY.UNAVAILABLE"),
        ("hills [sim:safety]", "provider_content_filtered", "SAFETY.INPUT.TEXT"),
    ],
)
async def test_failed_task_reports_failure_and_failure_code(stack, prompt, code, text):
    async with api(stack) as client:
        done = await wait_for(client, (await runway_job(client, prompt=prompt))["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == code and text in done["error"]["message"]
    assert done["error"]["provider_detail"]["failureCode"] == text


async def test_cancel_deletes_the_task_at_runway(stack):
    async with api(stack) as client:
        job = await runway_job(client, prompt="hills [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        await client.post(f"/v1/jobs/{job['id']}/cancel")
        canceled = await wait_until(client, job["id"], lambda j: "told to stop" in (j["note"] or ""))
    assert canceled["status"] == "canceled"
    assert (await sim_stats(stack, "runway"))["requests"]["delete"] == 1
    assert (await sim_task_view(stack, canceled["provider_task_id"]))["status"] == "CANCELLED"


async def test_cancelled_at_runway_cancels_the_job(stack):
    async with api(stack) as client:
        job = await runway_job(client, prompt="hills [sim:run=30]")
        running = await wait_for(client, job["id"], {"running"})
        async with httpx.AsyncClient(headers=SANDBOX_HEADERS) as raw:  # someone cancels it in Runway's console
            resp = await raw.delete(f"{stack.simulator_url('runway')}/v1/tasks/{running['provider_task_id']}")
            assert resp.status_code == 204
        done = await wait_for(client, job["id"])
    assert done["status"] == "canceled" and done["error"]["code"] == "provider_canceled"


async def test_429_burst_ends_in_success_with_one_creation(stack):
    await sim_faults(stack, "runway", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await runway_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "runway")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_ambiguous_submit_is_never_resubmitted(stack):
    # Runway has no idempotency and no task list: nothing to reconcile with, so no second bill.
    await sim_faults(stack, "runway", {"kind": "502", "route": "create", "count": 1, "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await runway_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    stats = await sim_stats(stack, "runway")
    assert stats["creations"] == 1 and stats["requests"]["create"] == 1


async def test_not_enough_credits_is_insufficient_balance(stack):
    stack.simulators["runway"].config.extra["credit_balance"] = 1
    async with api(stack) as client:
        done = await wait_for(client, (await runway_job(client))["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "provider_insufficient_balance"


async def test_api_version_header_is_configurable(redis_url):
    providers_file = {"runway": {"extra": {"version": "2099-01-01"}}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as stack:
        stack.simulators["runway"].config.extra["api_versions"] = ["2099-01-01"]
        async with api(stack) as client:
            done = await wait_for(client, (await runway_job(client))["id"])
    assert done["status"] == "succeeded", done


async def test_runway_sends_no_callbacks(stack):
    async with httpx.AsyncClient() as raw:
        resp = await raw.post(f"{stack.api_url}/v1/callbacks/runway", content=b"{}")
    assert resp.status_code == 404


@pytest.mark.parametrize(
    ("model", "input_fields", "field"),
    [
        ("gen4_turbo", {"image_url": None}, "input.image_url"),  # image-to-video only
        ("gen4_turbo", {"image_url": "http://example.com/a.png"}, "input.image_url"),
        ("gen4_turbo", {"image_url": "https://10.0.0.1/a.png"}, "input.image_url"),
        ("gen4_turbo", {"duration_seconds": 11}, "input.duration_seconds"),
        ("gen4_turbo", {"duration_seconds": 5.5}, "input.duration_seconds"),
        ("veo3.1", {"duration_seconds": 5}, "input.duration_seconds"),
        ("gen4.5", {}, "input.duration_seconds"),  # required for gen4.5
        ("gen4_turbo", {"aspect_ratio": "2:1"}, "input.aspect_ratio"),
        ("veo3.1", {"aspect_ratio": "4:3"}, "input.aspect_ratio"),
        ("gen4_turbo", {"resolution": "1080p"}, "input.resolution"),
        ("gen4_turbo", {"resolution": "1920x1080"}, "input.resolution"),
        ("gen4_turbo", {"negative_prompt": "rain"}, "input.negative_prompt"),
        ("veo3", {"seed": 1}, "input.seed"),
        ("gen4_turbo", {"num_outputs": 2}, "input.num_outputs"),
        ("gen4_turbo", {"prompt": "x" * 1001}, "input.prompt"),
        ("gen4.5", {"image_url": None, "prompt": None, "duration_seconds": 5}, "input.prompt"),
        ("gen4_turbo", {"options": {"ratio": "1920:1080"}}, "input.options.ratio"),
        ("gen4_turbo", {"options": {"duration": "5"}}, "input.options.duration"),
        ("gen4_turbo", {"options": {"audio": True}}, "input.options.audio"),
        ("gen4_turbo", {"options": {"watermark": True}}, "input.options.watermark"),
        ("gen3a_turbo", {}, "model"),
        ("gen9", {}, "model"),
    ],
)
async def test_bad_input_is_rejected_before_any_request(stack, model, input_fields, field):
    body: dict[str, Any] = {"prompt": "hills", "image_url": IMAGE} | input_fields
    body = {k: v for k, v in body.items() if v is not None}
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json={"provider": "runway", "kind": "video", "model": model,
                                                   "input": body})
    assert resp.status_code == 422, resp.text
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert (await sim_stats(stack, "runway"))["requests"] == {}
