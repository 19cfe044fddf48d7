"""The Sora adapter against the Sora simulator, through the real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

SANDBOX_AUTH = {"Authorization": "Bearer sandbox-key"}


async def sora_job(client: httpx.AsyncClient, **input_fields: Any) -> dict[str, Any]:
    model = input_fields.pop("model", "sora-2")
    body: dict[str, Any] = {"prompt": "a paper boat on a stream"} | input_fields
    return await submit(client, provider="sora", kind="video", model=model, input=body)


def sim_video(stack: Stack, video_id: str) -> Any:
    return stack.simulators["sora"].tasks[video_id]  # type: ignore[attr-defined]


async def test_success_stores_the_video_served_by_the_content_endpoint(stack):
    async with api(stack) as client:
        job = await sora_job(client, duration_seconds=8, aspect_ratio="16:9")
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["provider_task_id"].startswith("video_")
        assert done["provider_request_id"].startswith("req_")
        assert done["progress"] == 100 and done["attempts"] == 1
        (output,) = done["outputs"]
        assert output["content_type"] == "video/mp4"
        stored = (await client.get(output["url"])).content
    async with httpx.AsyncClient() as raw:
        served = await raw.get(f"{stack.simulator_url('sora')}/v1/videos/{done['provider_task_id']}/content",
                               headers=SANDBOX_AUTH)
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"] == hashlib.sha256(stored).hexdigest()
    # The common fields reached OpenAI under its own names and types.
    assert sim_video(stack, done["provider_task_id"]).input == {
        "prompt": "a paper boat on a stream", "model": "sora-2", "seconds": "8", "size": "1280x720"}


async def test_pro_sizes_and_native_options(stack):
    async with api(stack) as client:
        job = await sora_job(client, model="sora-2-pro", resolution="1024x1792", aspect_ratio="9:16",
                             options={"seconds": "12"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    task_input = sim_video(stack, done["provider_task_id"]).input
    assert (task_input["model"], task_input["size"], task_input["seconds"]) == ("sora-2-pro", "1024x1792", "12")


async def test_content_is_fetched_only_after_completion(stack):
    async with api(stack) as client:
        job = await sora_job(client, prompt="a slow boat [sim:run=3]")
        running = await wait_for(client, job["id"], {"running"})
        assert 0 <= running["progress"] < 100
        assert (await sim_stats(stack, "sora"))["requests"].get("content", 0) == 0
        async with httpx.AsyncClient() as raw:  # the trap: /content is 404 while the video renders
            early = await raw.get(f"{stack.simulator_url('sora')}/v1/videos/{running['provider_task_id']}/content",
                                  headers=SANDBOX_AUTH)
        assert early.status_code == 404
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded"
    assert (await sim_stats(stack, "sora"))["requests"]["content"] == 2  # ours above + the one download


@pytest.mark.parametrize(
    ("prompt", "code", "text"),
    [
        ("a boat [sim:fail]", "provider_failed", "internal_error"),
        ("a boat [sim:fail=video_generation_failed]", "provider_failed", "video_generation_failed"),
        ("a boat [sim:moderation]", "provider_content_filtered", "moderation"),
    ],
)
async def test_failed_video_carries_the_providers_error(stack, prompt, code, text):
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client, prompt=prompt))["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == code and text in done["error"]["message"]
    assert done["error"]["provider_detail"]["error"]["code"] in done["error"]["message"]
    assert done["outputs"] == []
    assert (await sim_stats(stack, "sora"))["requests"].get("content", 0) == 0


async def test_create_blocked_by_moderation_fails_without_a_video(stack):
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client, prompt="a boat [sim:blocked]"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_content_filtered"
    assert done["error"]["provider_detail"]["code"] == "moderation_blocked"
    assert (await sim_stats(stack, "sora"))["creations"] == 0


async def test_429_burst_on_create_ends_in_success_with_one_creation(stack):
    await sim_faults(stack, "sora", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "sora")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_429_and_5xx_while_polling_are_retried(stack):
    await sim_faults(stack, "sora", {"kind": "429", "route": "get", "count": 2},
                     {"kind": "502", "route": "get", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client))["id"])
    assert done["status"] == "succeeded"
    assert (await sim_stats(stack, "sora"))["creations"] == 1


async def test_insufficient_quota_is_a_billing_failure_not_a_retry(stack):
    stack.simulators["sora"].config.extra["sora_429_kind"] = "insufficient_quota"
    await sim_faults(stack, "sora", {"kind": "429", "route": "create", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_insufficient_balance"
    assert done["attempts"] == 1 and (await sim_stats(stack, "sora"))["creations"] == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"duration_seconds": 5}, "input.duration_seconds"),
        ({"duration_seconds": 4.5}, "input.duration_seconds"),
        ({"options": {"seconds": 8}}, "input.options.seconds"),  # an integer: OpenAI wants the string
        ({"aspect_ratio": "1:1"}, "input.aspect_ratio"),
        ({"resolution": "1792x1024"}, "input.resolution"),  # pro-only size on sora-2
        ({"resolution": "1080p"}, "input.resolution"),
        ({"model": "sora-2-pro", "resolution": "1792x1024", "aspect_ratio": "9:16"}, "input.resolution"),
        ({"options": {"size": "1920x1080"}}, "input.options.size"),
        ({"seed": 3}, "input.seed"),
        ({"negative_prompt": "rain"}, "input.negative_prompt"),
        ({"num_outputs": 2}, "input.num_outputs"),
        ({"options": {"quality": "high"}}, "input.options.quality"),
        ({"options": {"input_reference": {"image_url": "https://x.test/a.png", "file_id": "f"}}},
         "input.options.input_reference"),
        ({"prompt": None}, "input.prompt"),
        ({"model": "dall-e-3"}, "model"),
    ],
)
async def test_bad_input_is_rejected_before_any_provider_request(stack, fields, field):
    body: dict[str, Any] = {"prompt": "a boat"} | fields
    model = body.pop("model", "sora-2")
    if body.get("prompt") is None:
        body.pop("prompt")
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json={"provider": "sora", "kind": "video", "model": model,
                                                   "input": body})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert (await sim_stats(stack, "sora"))["requests"] == {}


async def test_image_job_kind_is_rejected(stack):
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json={"provider": "sora", "kind": "image", "model": "sora-2",
                                                   "input": {"prompt": "x"}})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "kind"


async def test_cancel_is_local_and_the_note_says_the_provider_was_not_told(stack):
    async with api(stack) as client:
        job = await sora_job(client, prompt="a long voyage [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled"
        for _ in range(50):
            job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if job["note"] and "no cancel endpoint" in job["note"]:
                break
            await asyncio.sleep(0.1)
    assert job["status"] == "canceled"
    assert "sora has no cancel endpoint" in job["note"]
    # Nothing was sent to OpenAI to stop it (there is no such endpoint); the video still renders there.
    stats = await sim_stats(stack, "sora")
    assert stats["requests"].get("delete", 0) == 0
    assert sim_video(stack, job["provider_task_id"]).canceled_at is None


async def test_ambiguous_create_is_reconciled_through_the_list(stack):
    async with httpx.AsyncClient() as raw:  # someone else's video, same model, other prompt
        other = await raw.post(f"{stack.simulator_url('sora')}/v1/videos", headers=SANDBOX_AUTH,
                               json={"model": "sora-2", "prompt": "another boat"})
        assert other.status_code == 200
    await sim_faults(stack, "sora", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client, duration_seconds=4))["id"])
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] != other.json()["id"] and done["attempts"] == 1
    assert sim_video(stack, done["provider_task_id"]).input["prompt"] == "a paper boat on a stream"
    stats = await sim_stats(stack, "sora")
    assert stats["creations"] == 2 and stats["requests"]["list"] >= 1  # ours + the other one, never twice


async def test_ambiguous_create_that_created_nothing_fails_without_resubmitting(stack):
    await sim_faults(stack, "sora", {"kind": "500", "route": "create", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    stats = await sim_stats(stack, "sora")
    assert stats["creations"] == 0 and stats["requests"]["create"] == 1


async def test_poll_after_hint_is_honoured(redis_url):
    # Polls would come every ~0.2-2 s; OpenAI's openai-poll-after-ms asks for 3 s.
    async with dev_stack(redis_url=redis_url, poll_max_seconds=10, log_format="text") as stack, \
            api(stack) as client:
        stack.simulators["sora"].config.extra["sora_poll_after_ms"] = 3000
        done = await wait_for(client, (await sora_job(client, prompt="boat [sim:run=4]"))["id"])
        assert done["status"] == "succeeded"
        assert (await sim_stats(stack, "sora"))["requests"]["get"] <= 3


async def test_expired_content_fails_the_job_as_expired(stack):
    stack.simulators["sora"].config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await sora_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_download_headers_only_for_the_api_origin(stack):
    from orchestrator.services.runtime import Runtime
    from providers.contract import CallContext

    rt = await Runtime.open(stack.settings)
    try:
        sora = rt.registry.get("sora")
        assert sora is not None
        ctx = CallContext(http=rt.http, api_key="sk-test")
        base = stack.simulator_url("sora")
        assert sora.download_headers(ctx, f"{base}/v1/videos/video_1/content") == {"Authorization": "Bearer sk-test"}
        assert sora.download_headers(ctx, "https://cdn.example.com/video_1.mp4") == {}
    finally:
        await rt.close()


def test_gateway_and_unknown_statuses_are_mapped_or_left_non_terminal():
    from providers.contract import ProviderSettings
    from providers.sora import SoraProvider

    sora = SoraProvider(ProviderSettings(name="sora", base_url="https://gw.example.com/openai/"))
    assert sora.parse_video({"id": "video_1", "status": "processing", "progress": 40}).state == "running"
    assert sora.parse_video({"id": "video_1", "status": "cancelled"}).state == "canceled"
    odd = sora.parse_video({"id": "video_1", "status": "rendering_sideways"})
    assert odd.state == "unknown" and odd.raw_status == "rendering_sideways"
    done = sora.parse_video({"task_id": "video_2", "status": "completed", "expires_at": 1, "quality": "x"})
    assert [o.url for o in done.outputs] == ["https://gw.example.com/openai/v1/videos/video_2/content"]
    failed = sora.parse_video({"id": "video_3", "status": "failed"})  # no error object at all
    assert failed.state == "failed" and failed.error_code == "provider_failed"
