"""The Volcengine Ark adapter (Seedance video, Seedream images) against the Ark simulator, through the
real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.jobs import JobStore
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings
from providers.doubao import DoubaoProvider
from providers.errors import AmbiguousMatch
from providers.sandbox.base import SimConfig
from providers.sandbox.doubao import DoubaoSimulator
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

PRO = "doubao-seedance-1-0-pro-250528"
PRO15 = "doubao-seedance-1-5-pro-251215"
SEEDREAM = "doubao-seedream-4-0-250828"
FIRST = "https://example.com/first.png"
LAST = "https://example.com/last.png"


async def video_job(client: httpx.AsyncClient, model: str = PRO, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "A kitten yawns at the camera"} | input_fields
    return await submit(client, provider="doubao", kind="video", model=model, input=body)


async def image_job(client: httpx.AsyncClient, model: str = SEEDREAM, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a tea house in the rain"} | input_fields
    return await submit(client, provider="doubao", kind="image", model=model, input=body)


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


def sim(stack: Stack) -> Any:
    return stack.simulators["doubao"]


def task_view(stack: Stack, task_id: str) -> dict[str, Any]:
    """The task as Ark serves it (content with its signed URLs)."""
    ark = sim(stack)
    view: dict[str, Any] = ark.task_object(ark.tasks[task_id], stack.simulator_url("doubao"))
    return view


async def assert_stored_equals_served(client: httpx.AsyncClient, output: dict[str, Any], served_url: str) -> None:
    async with httpx.AsyncClient() as raw:
        served = await raw.get(served_url)  # a signed TOS URL: no auth
    stored = await client.get(output["url"])
    assert served.status_code == 200 and stored.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"] == hashlib.sha256(stored.content).hexdigest()


async def callback_token(stack: Stack, job_id: str) -> str:
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None and job.callback_token
    return job.callback_token


# -- video ------------------------------------------------------------------------------------------

async def test_seedance_1_0_takes_flags_in_the_text_and_stores_video_and_last_frame(stack):
    async with api(stack) as client:
        job = await video_job(client, prompt="A kitten yawns at the camera --ratio 4:3 --wm true", aspect_ratio="16:9",
                              duration_seconds=5, resolution="720p", seed=7, image_url=FIRST,
                              options={"last_frame": LAST, "camera_fixed": False, "return_last_frame": True})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        video, last_frame = done["outputs"]
        content = task_view(stack, done["provider_task_id"])["content"]
        await assert_stored_equals_served(client, video, content["video_url"])
        await assert_stored_equals_served(client, last_frame, content["last_frame_url"])
    task_id = done["provider_task_id"]
    assert task_id.startswith("cgt-") and done["provider_status"] == "succeeded" and done["attempts"] == 1
    assert video["content_type"] == "video/mp4" and last_frame["content_type"] == "image/png"
    assert video["metadata"] == {"task_id": task_id, "model": PRO, "seed": 7, "resolution": "720p", "ratio": "16:9",
                                 "duration": 5, "framespersecond": 24}
    assert last_frame["metadata"] == {"task_id": task_id, "frame": "last"}
    sent = dict(sim(stack).tasks[task_id].input)
    callback = sent.pop("callback_url")
    assert parse_qs(urlsplit(callback).query)["job"] == [job["id"]]
    # The prompt's own --ratio gave way to aspect_ratio; its --wm stays (Atelier did not set it).
    assert sent == {"model": PRO, "return_last_frame": True, "content": [
        {"type": "text", "text": "A kitten yawns at the camera --wm true --ratio 16:9 --resolution 720p "
                                 "--duration 5 --seed 7 --camerafixed false"},
        {"type": "image_url", "image_url": {"url": FIRST}, "role": "first_frame"},
        {"type": "image_url", "image_url": {"url": LAST}, "role": "last_frame"}]}


async def test_seedance_1_5_takes_body_fields(stack):
    async with api(stack) as client:
        done = await wait_for(client, (await video_job(client, model=PRO15, aspect_ratio="9:16", duration_seconds=6,
                                                       options={"generate_audio": True, "watermark": False}))["id"])
    assert done["status"] == "succeeded", done
    sent = dict(sim(stack).tasks[done["provider_task_id"]].input)
    sent.pop("callback_url")
    assert sent == {"model": PRO15, "content": [{"type": "text", "text": "A kitten yawns at the camera"}],
                    "ratio": "9:16", "duration": 6, "generate_audio": True, "watermark": False}
    assert done["outputs"][0]["metadata"]["ratio"] == "9:16"


async def test_failures_and_content_refusals(stack):
    cases = [
        (video_job, "a kitten [sim:fail]", "provider_failed", "InternalServiceError", True),
        (video_job, "a kitten [sim:output_sensitive]", "content_policy", "OutputVideoSensitiveContentDetected", True),
        (video_job, "a kitten [sim:sensitive]", "content_policy", "InputTextSensitiveContentDetected", False),
        (image_job, "a teapot [sim:image_sensitive]", "content_policy", "InputImageSensitiveContentDetected", None),
        (image_job, "a teapot [sim:output_sensitive]", "content_policy", "OutputImageSensitiveContentDetected", None),
    ]
    async with api(stack) as client:
        jobs = [await make(client, prompt=prompt) for make, prompt, *_ in cases]
        done = [await wait_for(client, job["id"]) for job in jobs]
    for job, (_, _, code, text, created) in zip(done, cases, strict=True):
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert text in job["error"]["message"] and job["attempts"] == 1
        if created is not None:  # an image call has no task of its own
            assert bool(job["provider_task_id"]) is created
    assert (await sim_stats(stack, "doubao"))["creations"] == 2


async def test_account_errors(stack):
    sim(stack).config.extra["not_open_models"] = [PRO15]
    async with api(stack) as client:
        not_open = await wait_for(client, (await video_job(client, model=PRO15))["id"])
        unknown = await wait_for(client, (await video_job(client, model="doubao-seedance-9-0-pro-991231"))["id"])
        sim(stack).config.extra["account_overdue"] = True
        overdue = await wait_for(client, (await video_job(client))["id"])
    assert not_open["error"]["code"] == unknown["error"]["code"] == "model_not_found"
    assert "ModelNotOpen" in not_open["error"]["message"]
    assert "InvalidEndpointOrModel.NotFound" in unknown["error"]["message"]
    assert overdue["status"] == "failed" and overdue["error"]["code"] == "provider_insufficient_balance"
    assert "AccountOverdueError" in overdue["error"]["message"]
    assert (await sim_stats(stack, "doubao"))["creations"] == 0


async def test_rate_limit_then_success_with_one_creation(stack):
    await sim_faults(stack, "doubao", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        job = await video_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "doubao")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}
    assert any("RateLimitExceeded.EndpointRPMExceeded" in (e["note"] or "") for e in events)


async def test_malformed_bodies_reconcile_the_create_and_repoll_the_status(stack):
    await sim_faults(stack, "doubao", {"kind": "malformed", "route": "create", "after_effect": True},
                     {"kind": "malformed", "route": "get", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await video_job(client, aspect_ratio="4:3"))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    stats = await sim_stats(stack, "doubao")
    assert stats["creations"] == 1 and stats["requests"]["list"] == 1 and stats["requests"]["get"] >= 2
    assert stats["faults_injected"] == {"create:malformed": 1, "get:malformed": 1}


async def test_expired_video_url_fails_as_expired(stack):
    sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await video_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_bad_input_is_refused_before_any_request(stack):
    refused = [
        ("video", PRO, {"negative_prompt": "blur"}, "input.negative_prompt"),
        ("video", PRO, {"aspect_ratio": "5:4"}, "input.aspect_ratio"),
        ("video", PRO, {"resolution": "4k"}, "input.resolution"),
        ("video", PRO, {"duration_seconds": 5.5}, "input.duration_seconds"),
        ("video", PRO, {"num_outputs": 2}, "input.num_outputs"),
        ("video", PRO, {"options": {"last_frame": LAST}}, "input.options.last_frame"),
        ("video", PRO, {"image_url": FIRST, "options": {"reference_images": [LAST]}}, "input.options.reference_images"),
        ("video", PRO, {"options": {"generate_audio": True}}, "input.options.generate_audio"),
        ("video", PRO, {"options": {"ratio": "16:9"}}, "input.options.ratio"),
        ("video", PRO, {"options": {"callback_url": "https://evil.example"}}, "input.options.callback_url"),
        ("video", PRO, {"options": {"frames": 30}}, "input.options.frames"),
        ("video", SEEDREAM, {}, "model"),
        ("image", PRO, {}, "model"),
        ("image", SEEDREAM, {"seed": 3}, "input.seed"),
        ("image", SEEDREAM, {"resolution": "8k"}, "input.resolution"),
        ("image", SEEDREAM, {"resolution": "1024x1024", "aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("image", SEEDREAM, {"options": {"stream": True}}, "input.options.stream"),
        ("image", "doubao-seedream-3-0-t2i-250415", {"num_outputs": 2}, "input.num_outputs"),
    ]
    async with api(stack) as client:
        for kind, model, fields, field in refused:
            body = {"provider": "doubao", "kind": kind, "model": model, "input": {"prompt": "a kitten"} | fields}
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, (fields, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], resp.json()
    assert (await sim_stats(stack, "doubao"))["requests"] == {}


# -- callbacks, cancel, reconcile ---------------------------------------------------------------

async def test_callbacks_finish_the_job_without_waiting_for_a_poll(redis_url):
    # Polls are 30+ s apart: only Ark's callbacks can finish the job quickly.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        done = await wait_for(client, (await video_job(client))["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15
        log = list(sim(stack).callback_log)
    assert [e["status"] for e in log][:3] == ["queued", "running", "succeeded"]
    assert all(e["status_code"] == 200 and e["id"] == done["provider_task_id"] for e in log)


async def test_forged_callbacks_are_refused_and_a_callback_is_only_a_hint(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await video_job(client, prompt="a slow kitten [sim:queue=20]")
        job = await wait_for(client, job["id"], {"submitted", "running"})
        url = f"{stack.api_url}/v1/callbacks/doubao"
        forged = json.dumps({"id": job["provider_task_id"], "status": "succeeded",
                             "content": {"video_url": "https://evil.example/x.mp4"}}).encode()
        async with httpx.AsyncClient() as raw:
            assert (await raw.post(url, params={"job": job["id"], "token": "wrong"}, content=forged)).status_code == 401
            assert (await raw.post(url, params={"job": job["id"]}, content=forged)).status_code == 401
            good = {"job": job["id"], "token": await callback_token(stack, job["id"])}
            assert (await raw.post(url, params=good, content=b"not json")).status_code == 401
            resp = await raw.post(url, params=good, content=forged)  # right token, lying body
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        # The hint made the worker fetch the task now: the fetched status stands.
        after = await wait_until(client, job["id"], lambda j: j["provider_status"] is not None, timeout=5)
    assert after["status"] == "submitted" and after["provider_status"] == "queued" and after["outputs"] == []


async def test_cancel_deletes_a_queued_task_and_leaves_a_running_one(stack):
    async with api(stack) as client:
        queued = await wait_for(client, (await video_job(client, prompt="a kitten [sim:queue=30]"))["id"],
                                {"submitted"})
        running = await video_job(client, prompt="a long kitten [sim:run=30]")
        running = await wait_for(client, running["id"], {"running"})
        for job in (queued, running):
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        told = await wait_until(client, queued["id"], lambda j: "told to stop" in (j["note"] or ""))
        refused = await wait_until(client, running["id"], lambda j: "stop failed" in (j["note"] or ""))
    assert told["status"] == refused["status"] == "canceled"
    assert task_view(stack, queued["provider_task_id"])["status"] == "cancelled"
    assert "only queued tasks" in refused["note"]
    assert task_view(stack, running["provider_task_id"])["status"] == "running"  # Ark cannot stop it
    assert (await sim_stats(stack, "doubao"))["requests"]["delete"] == 1


async def test_ambiguous_create_is_reconciled_through_the_task_list(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        # Another job with the same model and parameters, created earlier: not ours.
        other = await wait_for(client, (await video_job(client, aspect_ratio="4:3", duration_seconds=10))["id"])
        await asyncio.sleep(max(0.0, sim(stack).tasks[other["provider_task_id"]].created_at + 1.1 - time.time()))
        await sim_faults(stack, "doubao", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 2})
        job = await video_job(client, aspect_ratio="4:3", duration_seconds=10)
        done = await wait_for(client, job["id"])
        stats = await sim_stats(stack, "doubao")
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert done["provider_task_id"] != other["provider_task_id"]
    callback = sim(stack).tasks[done["provider_task_id"]].input["callback_url"]
    assert parse_qs(urlsplit(callback).query)["job"] == [job["id"]]
    assert stats["creations"] == 2 and stats["requests"]["create"] == 2 and stats["requests"]["list"] == 1


async def test_an_ambiguous_lost_create_is_never_resubmitted(redis_url):
    # A job's create is lost (the answer times out after Ark made the task); before it looks, a twin
    # with the same model and parameters appears (Ark echoes no prompt). Either could be the job's, so
    # it fails rather than pay for a third task, even though it allows retrying unknown submissions.
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.5, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "doubao", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 3})
        resp = await client.post("/v1/jobs", json={
            "provider": "doubao", "kind": "video", "model": PRO, "retry_unknown_submissions": True,
            "input": {"prompt": "a kitten", "aspect_ratio": "4:3", "duration_seconds": 10}})
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + 10
        while not sim(stack).tasks and time.monotonic() < deadline:  # the lost task exists
            await asyncio.sleep(0.02)
        (lost,) = sim(stack).tasks.values()
        async with httpx.AsyncClient(timeout=5) as http:  # the twin, as another client would create it
            twin = await http.post(f"{stack.simulator_url('doubao')}/api/v3/contents/generations/tasks",
                                   json=lost.input, headers={"Authorization": "Bearer sandbox-key"})
            assert twin.status_code == 200, twin.text
        done = await wait_for(client, resp.json()["id"], timeout=60)
        stats = await sim_stats(stack, "doubao")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert "2 Ark tasks match" in done["error"]["message"] and "not resubmitted" in done["error"]["message"]
    assert stats["creations"] == 2, stats  # the lost one and the twin; never a third


async def test_reconcile_takes_only_an_unambiguous_match():
    ark = DoubaoSimulator(SimConfig(queue_seconds=30, run_seconds=1))
    async with serving(ark.app) as base, httpx.AsyncClient(timeout=5) as http:
        provider = DoubaoProvider(ProviderSettings(name="doubao", base_url=base))
        ctx = CallContext(http=http, api_key="ark-key")

        def request(seed: int, prompt: str = "a kitten") -> GenerationRequest:
            return GenerationRequest(kind=MediaKind.video, model=PRO, reference=f"job_{seed}",
                                     input=MediaInput(prompt=prompt, seed=seed, aspect_ratio="1:1"))

        since = time.time()
        created = {seed: (await provider.submit(ctx, request(seed))).task_id for seed in (1, 2)}
        found = await provider.reconcile(ctx, request(2), since)
        assert found is not None and found.task_id == created[2]  # the echoed seed tells them apart
        await provider.submit(ctx, request(2, "another kitten"))  # the prompt is not echoed: a twin
        with pytest.raises(AmbiguousMatch, match="2 Ark tasks match"):  # two could be ours: none is taken
            await provider.reconcile(ctx, request(2), since)
        assert await provider.reconcile(ctx, request(1), time.time() + 60) is None  # nothing created then


# -- Seedream images (synchronous) ------------------------------------------------------------------

async def test_seedream_group_keeps_the_good_images_of_a_partial_failure(stack):
    async with api(stack) as client:
        job = await image_job(client, prompt="three frames: morning, noon, evening [sim:partial=1]", num_outputs=3,
                              image_url=FIRST, resolution="2k", options={"watermark": False})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        first, third = done["outputs"]
        stored = [(await client.get(o["url"])).content for o in done["outputs"]]
    assert done["provider_task_id"] == job["id"] and done["provider_status"] == "partially_succeeded"
    served = {hashlib.sha256(f.data).hexdigest() for f in sim(stack).files.files.values()}
    assert {hashlib.sha256(b).hexdigest() for b in stored} == {first["sha256"], third["sha256"]} <= served
    failed = [{"index": 1, "code": "OutputImageSensitiveContentDetected",
               "message": "The request failed because the output image may contain sensitive information."}]
    assert first["metadata"]["index"] == 0 and third["metadata"]["index"] == 2
    assert first["metadata"]["failed"] == third["metadata"]["failed"] == failed
    assert first["metadata"]["usage"]["generated_images"] == 2 and first["metadata"]["size"] == "2048x2048"
    assert sim(stack).billed_images == 2 and (await sim_stats(stack, "doubao"))["creations"] == 1


async def test_seedream_base64_and_a_refusal_inside_a_200(stack):
    async with api(stack) as client:
        jobs = [await image_job(client, aspect_ratio="16:9", options={"response_format": "b64_json"}),
                await image_job(client, prompt="a teapot [sim:partial]")]
        inline, refused = [await wait_for(client, job["id"]) for job in jobs]
        assert inline["status"] == "succeeded", inline
        (output,) = inline["outputs"]
        stored = (await client.get(output["url"])).content
    assert output["content_type"] == "image/png" and stored.startswith(b"\x89PNG")
    assert hashlib.sha256(stored).hexdigest() == output["sha256"]
    assert (output["width"], output["height"]) == (2736 // 16, 1536 // 16)  # the simulator draws 1/16 scale
    assert refused["status"] == "failed" and refused["error"]["code"] == "content_policy"
    assert "OutputImageSensitiveContentDetected" in refused["error"]["message"]
    assert (await sim_stats(stack, "doubao"))["creations"] == 1  # the refused call made no image


async def test_ambiguous_image_call_fails_without_resubmitting(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "doubao", {"kind": "timeout", "route": "images", "after_effect": True, "delay": 2})
        done = await wait_for(client, (await image_job(client))["id"])
        stats = await sim_stats(stack, "doubao")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert stats["creations"] == 1 and stats["requests"]["images"] == 1 and "list" not in stats["requests"]


# -- configuration -------------------------------------------------------------------------------

def test_base_url_forms_and_the_parameter_style_per_model():
    for base in ("https://ark.ap-southeast.bytepluses.com/api/v3", "https://ark.ap-southeast.bytepluses.com"):
        provider = DoubaoProvider(ProviderSettings(name="doubao", base_url=base))
        assert provider.api == "https://ark.ap-southeast.bytepluses.com/api/v3"
    provider = DoubaoProvider(ProviderSettings(name="doubao", base_url="https://ark.example",
                                               extra={"body_param_models": ["ep-*"]}))
    request = GenerationRequest(kind=MediaKind.video, model="ep-20250101-abc", reference="job_1",
                                input=MediaInput(prompt="a kitten", duration_seconds=5))
    assert provider.build(request)[1] == {"model": "ep-20250101-abc", "duration": 5,
                                          "content": [{"type": "text", "text": "a kitten"}]}
    image = GenerationRequest(kind=MediaKind.image, model=SEEDREAM, reference="job_2",
                              input=MediaInput(prompt="a teapot", num_outputs=2, aspect_ratio="1:1"))
    assert provider.build(image) == ("/images/generations", {
        "model": SEEDREAM, "prompt": "a teapot", "response_format": "url", "size": "2048x2048",
        "sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 2}})
