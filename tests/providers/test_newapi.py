"""The newapi adapter (a new-api gateway's unified video tasks) against the gateway simulator, through
the real API and worker (and the adapter itself over real HTTP for the poll hint and statuses)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store import keypool
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings, TaskRef
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    OutcomeUnknown,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.newapi import NewApiProvider, newapi_body, openai_error, parse_task, task_error, video_size
from providers.sandbox.base import SimConfig
from providers.sandbox.newapi_video import NewApiVideoSimulator
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

REFRESH = 0.3  # the gateway's refresh interval as configured for the adapter (new-api: 15 s)
SETTINGS = {"newapi": {"extra": {"refresh_seconds": REFRESH}, "request_timeout_seconds": 1.0}}
KEY_A, KEY_B = "sk-newapi0alpha", "sk-newapi0bravo"


FAST = {"queue_seconds": 0.05, "run_seconds": 0.1}  # the upstream's timings; the gateway ticks every 0.1 s


@pytest.fixture
async def gw(redis_url: str) -> AsyncIterator[Stack]:
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=SETTINGS) as stack:
        await sim_config(stack, **FAST, extra={"gateway_tick_seconds": 0.1})
        yield stack


def sim_of(stack: Stack) -> NewApiVideoSimulator:
    sim = stack.simulators["newapi"]
    assert isinstance(sim, NewApiVideoSimulator)
    return sim


async def sim_config(stack: Stack, **values: Any) -> None:
    """The simulator's knobs, through its control plane (``extra`` is replaced as a whole)."""
    async with httpx.AsyncClient() as c:
        (await c.post(f"{stack.simulator_url('newapi')}/_sim/config", json=values)).raise_for_status()


async def video_job(client: httpx.AsyncClient, model: str = "kling-v2-1", **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a koi pond in the rain"} | input_fields
    return await submit(client, provider="newapi", kind="video", model=model, input=body)


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


def served_sha256(stack: Stack, task_id: str) -> str:
    """sha256 of the MP4 the simulator published for the task."""
    sim = sim_of(stack)
    stored = sim.files.files[sim.tasks[task_id].data["files"]["video"]]
    return hashlib.sha256(stored.data).hexdigest()


async def assert_stored_video(client: httpx.AsyncClient, stack: Stack, job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job
    (output,) = job["outputs"]
    assert output["content_type"] == "video/mp4"
    assert output["sha256"] == served_sha256(stack, job["provider_task_id"])
    stored = await client.get(output["url"])
    assert hashlib.sha256(stored.content).hexdigest() == output["sha256"]


# -- success --------------------------------------------------------------------------------------

ENVELOPE_MODELS = {  # one model per fetch envelope, each a different upstream family
    "kling-v2-1": "task_dto",
    "doubao-seedance-1-0-pro": "legacy_dto",
    "veo3.1": "realtime",
    "wan2.2-t2v-plus": "openapi_doc",
    "viduq1": "sora_doc",
    "grok-imagine-video": "openai_video",
}


async def test_success_in_every_envelope_stores_the_simulators_mp4(gw: Stack) -> None:
    await sim_config(gw, extra={"envelopes_by_model": ENVELOPE_MODELS, "gateway_tick_seconds": 0.1})
    async with api(gw) as client:
        jobs = {model: await video_job(client, model) for model in ENVELOPE_MODELS}
        done = {model: await wait_for(client, job["id"]) for model, job in jobs.items()}
        for job in done.values():
            await assert_stored_video(client, gw, job)
    for model, job in done.items():
        assert job["provider_status"] in ("SUCCESS", "succeeded", "completed"), model
        assert job["provider_task_id"].startswith("task_") and job["progress"] == 100
    assert (await sim_stats(gw, "newapi"))["creations"] == len(ENVELOPE_MODELS)


async def test_common_fields_and_options_map_to_the_unified_body(gw: Stack) -> None:
    async with api(gw) as client:
        job = await video_job(client, "MiniMax-Hailuo-02", duration_seconds=6, resolution="1080p",
                              aspect_ratio="9:16", negative_prompt="blur", seed=42,
                              image_url="https://example.com/first.png",
                              options={"images": ["https://example.com/last.png"], "prompt_optimizer": False})
        done = await wait_for(client, job["id"])
        await assert_stored_video(client, gw, done)
    task = sim_of(gw).tasks[done["provider_task_id"]]
    assert task.input == {"model": "MiniMax-Hailuo-02", "prompt": "a koi pond in the rain",
                          "image": "https://example.com/first.png",
                          "images": ["https://example.com/first.png", "https://example.com/last.png"],
                          "duration": 6, "size": "1080x1920",
                          "metadata": {"prompt_optimizer": False, "negative_prompt": "blur", "seed": 42}}
    assert task.data["dims"] == (1080, 1920) and task.data["action"] == "generate"


async def test_raw_upstream_bodies_of_every_family_give_the_video(gw: Stack) -> None:
    """2025 TaskDtos have no result_url: the video is in the upstream's own body, per family."""
    await sim_config(gw, extra={"envelope": "legacy_dto", "gateway_tick_seconds": 0.1})
    models = ["kling-v2-1", "doubao-seedance-1-0-pro", "wan2.2-t2v-plus", "viduq1", "jimeng_vgfm_t2v_l20",
              "grok-imagine-video", "veo3.1", "some-new-model"]
    async with api(gw) as client:
        jobs = [await video_job(client, model) for model in [*models, "MiniMax-Hailuo-02"]]
        done = [await wait_for(client, job["id"]) for job in jobs]
        for job in done[:-1]:
            await assert_stored_video(client, gw, job)
    hailuo = done[-1]  # MiniMax's query body names a file_id only: no URL anywhere
    assert hailuo["status"] == "failed" and hailuo["error"]["code"] == "provider_no_output"


async def test_not_start_and_empty_rows_stay_queued_and_polls_follow_the_refresh(gw: Stack) -> None:
    await sim_config(gw, extra={"gateway_tick_seconds": 3600, "initial_status": "",
                                "envelopes_by_model": {"viduq1": "openai_video"}})
    async with api(gw) as client:
        empty, unknown = await video_job(client), await video_job(client, "viduq1")
        start = time.monotonic()
        waiting = await wait_until(client, empty["id"], lambda j: j["provider_status"] == "")
        await sim_config(gw, extra={"gateway_tick_seconds": 3600, "initial_status": "NOT_START",
                                    "envelopes_by_model": {"viduq1": "openai_video"}})
        not_start = await wait_until(client, empty["id"], lambda j: j["provider_status"] == "NOT_START")
        openai = await wait_until(client, unknown["id"], lambda j: j["provider_status"] == "unknown")
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - start
        fetches = (await sim_stats(gw, "newapi"))["requests"]["fetch"]
        for job in (waiting, not_start, openai):
            assert job["status"] == "submitted" and job["error"] is None
        await sim_config(gw, extra={"gateway_tick_seconds": 0.1})  # the gateway refreshes its rows now
        for job in (empty, unknown):
            await assert_stored_video(client, gw, await wait_for(client, job["id"]))
    # Two jobs, polled no faster than the gateway refreshes (plus each job's first poll).
    assert fetches <= 2 * (elapsed / REFRESH + 1)


# -- failures -------------------------------------------------------------------------------------

async def test_provider_failure_keeps_the_upstream_reason(gw: Stack) -> None:
    await sim_config(gw, extra={"envelopes_by_model": {"viduq1": "openai_video"}, "gateway_tick_seconds": 0.1})
    async with api(gw) as client:
        kling = await video_job(client, prompt="x [sim:fail=Image pixel is invalid]")
        vidu = await video_job(client, "viduq1", prompt="x [sim:fail]")
        kling, vidu = await wait_for(client, kling["id"]), await wait_for(client, vidu["id"])
    for job, reason in ((kling, "Image pixel is invalid"), (vidu, "InternalServiceFailure")):
        assert job["status"] == "failed" and job["provider_status"] in ("FAILURE", "failed")
        assert job["error"]["code"] == "provider_failed" and reason in job["error"]["message"]
        assert job["error"]["provider_detail"]["task_id"] == job["provider_task_id"]


MODERATED = {  # model -> the envelope its refusal is read from
    "veo3.1": "realtime",  # "You have not been charged" (Veo's RAI filter), no raw body
    "grok-imagine-video": "openai_video",  # error.message only
    "doubao-seedance-1-0-pro": "task_dto",  # OutputVideoSensitiveContentDetected in the raw body
    "jimeng_vgfm_t2v_l20": "legacy_dto",  # 50511 in the raw body
    "wan2.2-t2v-plus": "openapi_doc",
    "viduq1": "sora_doc",
}


async def test_moderation_fails_with_content_policy(gw: Stack) -> None:
    await sim_config(gw, extra={"envelopes_by_model": MODERATED, "gateway_tick_seconds": 0.1})
    async with api(gw) as client:
        jobs = [await video_job(client, model, prompt="x [sim:moderated]") for model in MODERATED]
        done = [await wait_for(client, job["id"]) for job in jobs]
    for model, job in zip(MODERATED, done, strict=True):
        assert job["status"] == "failed" and job["error"]["code"] == "content_policy", (model, job)
        assert job["error"]["provider_detail"]["fail_reason"], model


async def test_upstream_refusal_at_submit_is_rejected_with_its_body(gw: Stack) -> None:
    async with api(gw) as client:
        done = await wait_for(client, (await video_job(client, prompt="x [sim:rejected]"))["id"])
    assert done["status"] == "failed" and done["attempts"] == 1 and done["provider_task_id"] is None
    assert done["error"]["code"] == "provider_rejected_input" and "InvalidParameter" in done["error"]["message"]
    assert (await sim_stats(gw, "newapi"))["creations"] == 0


async def test_saturated_gateway_then_success_with_one_creation(gw: Stack) -> None:
    await sim_faults(gw, "newapi", {"kind": "429", "route": "submit", "count": 1, "retry_after": 1},
                     {"kind": "429", "route": "fetch", "count": 1})
    async with api(gw) as client:
        job = await video_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
        await assert_stored_video(client, gw, done)
    assert done["attempts"] == 2
    assert any(e["type"] == "job.queued" and "饱和" in (e["note"] or "") for e in events)
    stats = await sim_stats(gw, "newapi")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:429": 1, "fetch:429": 1}


async def test_used_up_quota_takes_the_key_out_of_the_pool(redis_url: str) -> None:
    table = {"newapi": SETTINGS["newapi"] | {"api_keys": [KEY_A, KEY_B]}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=table) as stack, \
            api(stack) as client:
        first = await wait_for(client, (await video_job(client, prompt="x [sim:quota]"))["id"])
        later = await wait_for(client, (await video_job(client))["id"])
        redis = Redis.from_url(stack.settings.redis_url)
        try:
            out = await keypool.all_out(redis)
        finally:
            await redis.aclose()
        stats = await sim_stats(stack, "newapi")
    # Each key met quota_not_enough once, left the pool, and the job moved to the other one.
    assert first["status"] == "failed" and first["attempts"] == 2
    assert first["error"]["code"] == "provider_insufficient_balance" and "quota" in first["error"]["message"]
    assert set(out) == {("newapi", keypool.key_id(KEY_A)), ("newapi", keypool.key_id(KEY_B))}
    assert all(record.reason == keypool.NO_BALANCE and record.until is not None for record in out.values())
    assert later["status"] == "failed" and later["error"]["code"] == "no_usable_key" and later["attempts"] == 0
    assert stats["creations"] == 0 and stats["requests"]["submit"] == 2


async def test_malformed_status_bodies_are_retried_then_fail(gw: Stack) -> None:
    await sim_faults(gw, "newapi", {"kind": "malformed", "route": "fetch", "count": 1})
    async with api(gw) as client:
        once = await wait_for(client, (await video_job(client))["id"])
        await assert_stored_video(client, gw, once)
        await sim_faults(gw, "newapi", {"kind": "malformed", "route": "fetch", "count": 3})
        always = await wait_for(client, (await video_job(client))["id"])
    assert always["status"] == "failed" and always["error"]["code"] == "provider_malformed_response"
    assert "3 times in a row" in always["error"]["message"]
    assert (await sim_stats(gw, "newapi"))["creations"] == 2


async def test_expired_media_fails_output_expired(gw: Stack) -> None:
    await sim_config(gw, output_ttl_seconds=0)
    async with api(gw) as client:
        done = await wait_for(client, (await video_job(client, "doubao-seedance-1-0-pro"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"
    assert done["provider_status"] == "SUCCESS"


async def test_ambiguous_create_is_not_resubmitted(gw: Stack) -> None:
    # The gateway creates (and bills) the task, then the answer never comes within the request timeout.
    await sim_faults(gw, "newapi", {"kind": "timeout", "route": "submit", "after_effect": True, "delay": 1.6})
    async with api(gw) as client:
        done = await wait_for(client, (await video_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert done["attempts"] == 1
    stats = await sim_stats(gw, "newapi")
    assert stats["creations"] == 1 and stats["requests"]["submit"] == 1


async def test_cancel_is_local_only(gw: Stack) -> None:
    await sim_config(gw, extra={"gateway_tick_seconds": 3600})
    async with api(gw) as client:
        job = await video_job(client)
        await wait_for(client, job["id"], {"submitted"})
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code in (200, 202)
        canceled = await wait_until(client, job["id"], lambda j: "no cancel endpoint" in (j["note"] or ""))
    assert canceled["status"] == "canceled"


# -- follow-ups -------------------------------------------------------------------------------------

async def test_generate_with_a_source_image_hands_it_over_as_the_first_frame(gw: Stack) -> None:
    async with api(gw) as client:
        image = await wait_for(client, (await submit(client, input={"prompt": "a red fox, portrait"}))["id"])
        assert image["status"] == "succeeded", image
        video = await submit(client, provider="newapi", kind="video", model="wan2.2-i2v-plus",
                             source={"job_id": image["id"]}, input={"prompt": "the fox turns its head"})
        assert video["source"] == {"job_id": image["id"], "output": 0} and video["operation"] == "generate"
        done = await wait_for(client, video["id"])
        await assert_stored_video(client, gw, done)
        task = sim_of(gw).tasks[done["provider_task_id"]]
        async with httpx.AsyncClient() as raw:
            handed = await raw.get(task.input["image"])
        assert hashlib.sha256(handed.content).hexdigest() == image["outputs"][0]["sha256"]
        assert task.input["images"] == [task.input["image"]] and task.data["action"] == "generate"
        # A video is no first frame: refused, naming the field.
        resp = await client.post("/v1/jobs", json={"provider": "newapi", "kind": "video", "model": "viduq1",
                                                   "source": {"job_id": done["id"]}, "input": {"prompt": "x"}})
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == "source"


async def test_bad_input_is_refused_before_any_request(gw: Stack) -> None:
    cases = [
        ("kling v2!", {}, "model"),
        ("kling-v2-1", {"prompt": ""}, "input.prompt"),
        ("kling-v2-1", {"duration_seconds": 2.5}, "input.duration_seconds"),
        ("kling-v2-1", {"num_outputs": 2}, "input.num_outputs"),
        ("kling-v2-1", {"resolution": "huge"}, "input.resolution"),
        ("kling-v2-1", {"resolution": "720x1280", "aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("kling-v2-1", {"options": {"model": "cheap"}}, "input.options.model"),
        ("kling-v2-1", {"options": {"duration": 5}}, "input.options.duration"),
        ("kling-v2-1", {"options": {"images": "https://example.com/a.png"}}, "input.options.images"),
        ("kling-v2-1", {"options": {"images": ["file:///etc/passwd"]}}, "input.options.images[0]"),
    ]
    async with api(gw) as client:
        for model, fields, field in cases:
            resp = await client.post("/v1/jobs", json={"provider": "newapi", "kind": "video", "model": model,
                                                       "input": {"prompt": "a cat"} | fields})
            assert resp.status_code == 422, (field, resp.text)
            assert field in [e["field"] for e in resp.json()["errors"]], resp.json()
        image = await client.post("/v1/jobs", json={"provider": "newapi", "kind": "image", "model": "kling-v2-1",
                                                    "input": {"prompt": "a cat"}})
        assert image.status_code == 422
    assert (await sim_stats(gw, "newapi"))["requests"] == {}


# -- the adapter itself ------------------------------------------------------------------------------

async def test_polls_ask_no_faster_than_the_gateway_refreshes() -> None:
    sim = NewApiVideoSimulator(SimConfig(extra={"gateway_tick_seconds": 3600}))
    provider = NewApiProvider(ProviderSettings(name="newapi", base_url="", extra={}))
    request = GenerationRequest(kind=MediaKind.video, model="kling-v2-1", input=MediaInput(prompt="a koi"))
    async with serving(sim.app) as url, httpx.AsyncClient() as http:
        provider.base_url = url
        ctx = CallContext(http=http, api_key="sk-test")
        created = await provider.submit(ctx, request)
        status = await provider.fetch(ctx, TaskRef(task_id=created.task_id, request=request))
        with pytest.raises(TaskNotFound):
            await provider.fetch(ctx, TaskRef(task_id="task_nope", request=request))
    assert created.callback_expected is False and created.status == "queued"
    assert status.state == "queued" and status.raw_status == "NOT_START"
    assert status.poll_after is not None and status.poll_after >= 15


@pytest.mark.parametrize(("row", "state"), [
    ({"code": "success", "data": {"status": ""}}, "queued"),
    ({"code": "success", "data": {"status": "NOT_START", "progress": "0%"}}, "queued"),
    ({"status": "unknown", "progress": 0}, "queued"),
    ({"status": "QUEUED"}, "queued"),
    ({"id": "veo3.1-fast:1762241017-x", "status": "pending"}, "queued"),
    ({"status": "IN_PROGRESS", "progress": "30%"}, "running"),
    ({"code": "success", "data": {"status": "processing", "url": ""}}, "running"),
    ({"status": "MODAL"}, "unknown"),
])
def test_statuses_before_the_end_are_never_failures(row: dict[str, Any], state: str) -> None:
    assert parse_task(row).state == state


def test_failed_rows_name_the_gateway_sweep_and_refusals() -> None:
    swept = parse_task({"code": "success", "data": {"status": "FAILURE", "fail_reason": "任务超时（1440分钟）",
                                                    "data": {"output": {"task_status": "RUNNING"}}}})
    assert swept.state == "failed" and swept.error_code == "provider_gateway_timeout"
    filtered = parse_task({"status": "SUCCESS", "data": {"status": "done", "video": {"respect_moderation": False}}})
    assert filtered.state == "failed" and filtered.error_code == "content_policy"
    fallback = parse_task({"status": "FAILURE", "fail_reason": "boom", "result_url": "boom"})
    assert fallback.error_code == "provider_failed" and fallback.outputs == []


def test_gateway_error_bodies_say_what_happened() -> None:
    def answer(status: int, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(status, json=body, request=httpx.Request("POST", "http://gw.test/v1/video/generations"))

    ark = json.dumps({"error": {"code": "InputTextSensitiveContentDetected", "message": "sensitive"}})
    refused = task_error("fail_to_fetch_task", ark, answer(400, {}), creates=True)
    assert isinstance(refused, Rejected) and refused.code == "content_policy"
    kling = json.dumps({"code": 1301, "message": "Failure to pass the risk control system"})
    assert task_error("fail_to_fetch_task", kling, answer(400, {}), creates=True).code == "content_policy"
    channel = task_error("fail_to_fetch_task", '{"message":"bad key"}', answer(401, {}), creates=True)
    assert isinstance(channel, Unavailable)  # the upstream refused the gateway's channel, not our key
    quota = openai_error({"message": "用户额度不足", "type": "new_api_error", "code": ""}, answer(403, {}),
                         creates=True)
    assert isinstance(quota, InsufficientBalance)
    unrouted = openai_error({"message": "当前分组 default 下对于模型 x 无可用渠道", "code": "model_not_found"},
                            answer(503, {}), creates=True)
    assert isinstance(unrouted, Rejected) and unrouted.code == "model_not_found"
    assert isinstance(openai_error({"message": "无效的令牌"}, answer(401, {}), creates=True), AuthFailed)
    broken = task_error("do_request_failed", "upstream reset", answer(502, {}), creates=True)
    assert isinstance(broken, OutcomeUnknown)


def test_sizes_from_resolution_and_aspect_ratio() -> None:
    assert video_size("720p", None) == "1280x720"
    assert video_size(None, "9:16") == "720x1280"
    assert video_size("1080p", "1:1") == "1080x1080"
    assert video_size("4k", "16:9") == "3840x2160"
    assert video_size("1280*720", "16:9") == "1280x720"
    with pytest.raises(InvalidInput):
        newapi_body("kling-v2-1", MediaInput(prompt="x", image_url="ftp://example.com/a.png"))
