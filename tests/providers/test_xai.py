"""The xAI Grok Imagine adapter against the xAI simulator, through the real API and worker."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

from orchestrator.cli.devstack import Stack, dev_stack
from providers.sandbox.xai import XaiSimulator
from providers.xai import parse_video
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

MODEL = "grok-imagine-video"


async def xai_job(client: httpx.AsyncClient, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a paper boat drifting down a rainy street"} | input_fields
    return await submit(client, provider="xai", kind="video", model=MODEL, input=body)


def xai_sim(stack: Stack) -> XaiSimulator:
    sim = stack.simulators["xai"]
    assert isinstance(sim, XaiSimulator)
    return sim


async def served_sha256(stack: Stack, task_id: str) -> str:
    """The sha256 of the video the simulator serves at the URL it announced."""
    path = xai_sim(stack).tasks[task_id].data["path"]
    async with httpx.AsyncClient() as raw:
        served = await raw.get(f"{stack.simulator_url('xai')}{path}")
    assert served.status_code == 200
    return hashlib.sha256(served.content).hexdigest()


async def test_success_stores_the_simulators_bytes_and_always_sends_a_duration(stack: Stack) -> None:
    sim = xai_sim(stack)
    sim.config.extra["default_duration"] = 6  # the simulator's default differs from ours (8)
    sim.config.extra["pending_shape"] = "request_id"  # some gateways answer only the id while pending
    async with api(stack) as client:
        job = await xai_job(client, image_url="https://example.com/boat.jpg", aspect_ratio="9:16",
                            resolution="720p", duration_seconds=6, options={"generate_audio": False})
        plain = await xai_job(client, prompt="a boat at sea")
        done, plain = await wait_for(client, job["id"]), await wait_for(client, plain["id"])
    assert done["status"] == "succeeded" and plain["status"] == "succeeded", (done, plain)
    assert done["provider_status"] == "done" and done["progress"] == 100
    (output,) = done["outputs"]
    assert output["content_type"] == "video/mp4"
    assert output["metadata"]["cost_in_usd_ticks"] == 6 * 800_000_000  # kept raw
    task = sim.tasks[done["provider_task_id"]]
    assert task.input == {"model": MODEL, "prompt": "a paper boat drifting down a rainy street", "duration": 6,
                          "aspect_ratio": "9:16", "resolution": "720p",
                          "image": {"url": "https://example.com/boat.jpg"}}  # an object, not a string
    assert output["sha256"] == await served_sha256(stack, done["provider_task_id"])
    assert sim.tasks[plain["provider_task_id"]].input["duration"] == 8
    assert plain["outputs"][0]["sha256"] == await served_sha256(stack, plain["provider_task_id"])
    assert (await sim_stats(stack, "xai"))["creations"] == 2


FAILURES = [
    ("[sim:fail]", "provider_failed", "Video generation failed (internal_error)"),
    ("[sim:moderated]", "content_policy", "moderation"),  # done, HTTP 200, but no URL
    ("[sim:expired]", "output_expired", "expired"),
]


async def test_failures_inside_http_200(stack: Stack) -> None:
    async with api(stack) as client:
        jobs = [await xai_job(client, prompt=f"a boat {directive}") for directive, _, _ in FAILURES]
        done = [await wait_for(client, job["id"]) for job in jobs]
    for job, (_, code, message) in zip(done, FAILURES, strict=True):
        assert job["status"] == "failed", job
        assert job["error"]["code"] == code and message in job["error"]["message"]
        assert job["outputs"] == []


async def test_rate_limit_then_success_with_one_creation(stack: Stack) -> None:
    await sim_faults(stack, "xai", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await xai_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "xai")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_malformed_bodies(stack: Stack) -> None:
    await sim_faults(stack, "xai", {"kind": "malformed", "route": "get", "count": 2})
    async with api(stack) as client:
        polled = await wait_for(client, (await xai_job(client))["id"])
        await sim_faults(stack, "xai", {"kind": "malformed", "route": "create", "count": 1})
        created = await wait_for(client, (await xai_job(client, prompt="another"))["id"])
    assert polled["status"] == "succeeded", polled  # two unreadable statuses in a row are tolerated
    assert created["status"] == "failed" and created["error"]["code"] == "provider_malformed_response"


async def test_expired_video_url_fails_the_collection(stack: Stack) -> None:
    xai_sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await xai_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_invalid_key_answered_with_400_is_an_auth_failure(stack: Stack) -> None:
    xai_sim(stack).config.api_keys = ["xai-the-real-key"]
    async with api(stack) as client:
        done = await wait_for(client, (await xai_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed"
    assert "Incorrect API key" in done["error"]["message"]
    assert (await sim_stats(stack, "xai"))["creations"] == 0


async def test_ambiguous_create_fails_without_resubmitting(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, log_format="text",
                         providers_file={"xai": {"request_timeout_seconds": 0.5}}) as stack, api(stack) as client:
        await sim_faults(stack, "xai", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 1.5})
        done = await wait_for(client, (await xai_job(client))["id"])
        stats = await sim_stats(stack, "xai")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert stats["creations"] == 1 and stats["requests"]["create"] == 1


async def test_extend_and_edit_follow_ups_send_the_stored_source_video(stack: Stack) -> None:
    async with api(stack) as client:
        source = await wait_for(client, (await xai_job(client))["id"])
        assert source["status"] == "succeeded", source
        extend = await submit(client, provider="xai", kind="video", model=MODEL, operation="extend",
                              source={"job_id": source["id"]},
                              input={"prompt": "the boat reaches a river", "duration_seconds": 4})
        edit = await submit(client, provider="xai", kind="video", model=MODEL, operation="edit",
                            source={"job_id": source["id"]}, input={"prompt": "make it snow"})
        extended, edited = await wait_for(client, extend["id"]), await wait_for(client, edit["id"])
        refused = [await client.post("/v1/jobs", json={"provider": "xai", "kind": "video", "model": MODEL} | body)
                   for body in ({"operation": "extend", "input": {"prompt": "x"}},
                                {"operation": "edit", "source": {"job_id": source["id"]},
                                 "input": {"prompt": "x", "aspect_ratio": "1:1"}})]
    assert extended["status"] == "succeeded" and edited["status"] == "succeeded", (extended, edited)
    sim = xai_sim(stack)
    for done, endpoint in ((extended, "extensions"), (edited, "edits")):
        task = sim.tasks[done["provider_task_id"]]
        assert task.data["endpoint"] == endpoint
        assert done["outputs"][0]["sha256"] == await served_sha256(stack, done["provider_task_id"])
    assert sim.tasks[extended["provider_task_id"]].input["duration"] == 4
    assert [r.status_code for r in refused] == [422, 422]
    assert [r.json()["errors"][0]["field"] for r in refused] == ["source", "input.aspect_ratio"]


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"duration_seconds": 16}, "input.duration_seconds"),
    ({"duration_seconds": 5.5}, "input.duration_seconds"),
    ({"aspect_ratio": "21:9"}, "input.aspect_ratio"),
    ({"resolution": "1080p"}, "input.resolution"),
    ({"seed": 3}, "input.seed"),
    ({"negative_prompt": "rain"}, "input.negative_prompt"),
    ({"num_outputs": 2}, "input.num_outputs"),
    ({"prompt": " "}, "input.prompt"),
    ({"image_url": "ftp://example.com/a.png"}, "input.image_url"),
    ({"options": {"image": {"url": "https://example.com/a.png"}}}, "input.options.image"),
    ({"options": {"reference_images": ["https://example.com/a.png"]}}, "input.options.reference_images"),
]


async def test_bad_input_is_refused_before_any_request(stack: Stack) -> None:
    async with api(stack) as client:
        for input_fields, field in BAD_INPUTS:
            resp = await client.post("/v1/jobs", json={"provider": "xai", "kind": "video", "model": MODEL,
                                                       "input": {"prompt": "a boat"} | input_fields})
            assert resp.status_code == 422, resp.text
            assert field in [e["field"] for e in resp.json()["errors"]], (field, resp.json())
        for body in ({"kind": "image", "model": MODEL}, {"kind": "video", "model": "grok-2-image"}):
            resp = await client.post("/v1/jobs", json={"provider": "xai", "input": {"prompt": "a boat"}} | body)
            assert resp.status_code == 422, resp.text  # no image route in the reference
    assert (await sim_stats(stack, "xai"))["requests"] == {}


def test_statuses_map_as_documented() -> None:
    assert parse_video({"status": "pending", "progress": 40}).progress == 40
    assert parse_video({"request_id": "r1"}).state == "running"
    assert parse_video({"status": "done", "video": {"respect_moderation": True}}).error_code == "provider_no_output"
    assert parse_video({"status": "DONE", "video": {"url": "https://vidgen.x.ai/a.mp4"}}).state == "succeeded"
    assert parse_video({"status": "queued_somewhere"}).state == "unknown"
