"""The Midjourney adapter against the midjourney-proxy-through-new-api simulator: through the real API
and worker, and ``fetch_many`` directly over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.jobs import JobStore
from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    ProviderSettings,
    SourceMedia,
    TaskRef,
)
from providers.errors import CallbackRejected, InvalidInput
from providers.midjourney import MidjourneyProvider
from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.midjourney import MidjourneySimulator, grid_png, suggested_prompts
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for


def sim_of(stack: Stack) -> MidjourneySimulator:
    sim = stack.simulators["midjourney"]
    assert isinstance(sim, MidjourneySimulator)
    return sim


@pytest.fixture
async def stack(stack: Stack) -> Stack:
    """The dev stack (tests/conftest.py), with short proxy timings and a gateway that refreshes its rows
    every 0.1 s."""
    sim = sim_of(stack)
    sim.config.queue_seconds, sim.config.run_seconds = 0.05, 0.25
    sim.config.extra["gateway_tick_seconds"] = 0.1
    return stack


async def mj_job(client: httpx.AsyncClient, prompt: str | None = "a red fox in the snow", *,
                 operation: str = "generate", source: str | None = None, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"provider": "midjourney", "kind": "image", "model": "midjourney",
                            "operation": operation, "input": ({"prompt": prompt} if prompt else {}) | input_fields}
    if source is not None:
        body["source"] = {"job_id": source}
    return await submit(client, **body)


async def follow_up(client: httpx.AsyncClient, operation: str, source: str, prompt: str | None = None,
                    **input_fields: Any) -> dict[str, Any]:
    return await mj_job(client, prompt, operation=operation, source=source, **input_fields)


async def done(client: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, Any]:
    finished = await wait_for(client, job["id"])
    assert finished["status"] == "succeeded", finished
    return finished


async def stored(client: httpx.AsyncClient, output: dict[str, Any]) -> bytes:
    data = (await client.get(output["url"])).content
    assert hashlib.sha256(data).hexdigest() == output["sha256"]
    return data


async def served(stack: Stack, task_id: str) -> bytes:
    """The image the gateway serves for a task (its ``/mj/image`` proxy)."""
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{stack.simulator_url('midjourney')}/mj/image/{task_id}")
    assert resp.status_code == 200, resp.text
    return resp.content


def button(sim: MidjourneySimulator, task_id: str, label: str) -> str:
    return str(next(b["customId"] for b, _ in sim.tasks[task_id].data["buttons"] if b["label"] == label))


async def refused(client: httpx.AsyncClient, operation: str, source: str, prompt: str | None = None,
                  **input_fields: Any) -> str:
    """The field a 422 names for a follow-up request."""
    body = {"provider": "midjourney", "kind": "image", "model": "midjourney", "operation": operation,
            "source": {"job_id": source}, "input": ({"prompt": prompt} if prompt else {}) | input_fields}
    resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    return str(resp.json()["errors"][0]["field"])


# -- imagine ---------------------------------------------------------------------------------------

async def test_imagine_stores_the_grid_polled_in_groups_with_accepted_hooks(stack):
    sim = sim_of(stack)
    async with api(stack) as client:
        job = await mj_job(client, aspect_ratio="1:1", seed=7, options={"botType": "NIJI_JOURNEY"})
        finished = await done(client, job)
        (output,) = finished["outputs"]
        task_id = finished["provider_task_id"]
        data = await stored(client, output)
    assert data == grid_png([f"{task_id}:{i}" for i in range(1, 5)], 64, 64) == await served(stack, task_id)
    assert output["content_type"] == "image/png" and (output["width"], output["height"]) == (64, 64)
    assert output["metadata"]["action"] == "IMAGINE" and output["metadata"]["prompt"].endswith("--ar 1:1 --seed 7")
    sent = sim.tasks[task_id].input
    assert sent["prompt"] == "a red fox in the snow --ar 1:1 --seed 7" and sent["botType"] == "NIJI_JOURNEY"
    assert sent["state"] == job["id"] and f"job={job['id']}&token=" in sent["notifyHook"]
    assert finished["progress"] == 100 and finished["attempts"] == 1 and finished["provider_status"] == "SUCCESS"
    # Every poll went through list-by-condition; the proxy's hooks reached the API and were accepted.
    requests = (await sim_stats(stack, "midjourney"))["requests"]
    assert requests["list"] >= 1 and "fetch" not in requests
    assert {e["http_status"] for e in sim.notify_log if e["task"] == task_id} == {200}


# -- follow-ups on the source task -----------------------------------------------------------------

async def test_upscale_sends_the_sources_button_and_stores_the_quadrant_then_acts_on_the_upscale(stack):
    sim = sim_of(stack)
    async with api(stack) as client:
        grid = await done(client, await mj_job(client))
        source = grid["provider_task_id"]
        assert await refused(client, "pan", grid["id"], options={"direction": "left"}) == "input.options.direction"
        assert await refused(client, "upscale", grid["id"]) == "input.options.index"
        assert await refused(client, "upscale", grid["id"], options={"index": 5}) == "input.options.index"
        upscale = await done(client, await follow_up(client, "upscale", grid["id"], options={"index": 2}))
        jobs = {"reroll": await follow_up(client, "reroll", grid["id"], prompt="a red fox in the rain")}
        child = upscale["provider_task_id"]
        assert sim.tasks[child].input == {"taskId": source, "customId": button(sim, source, "U2"),
                                          "notifyHook": sim.tasks[child].input["notifyHook"], "state": upscale["id"]}
        assert upscale["operation"] == "upscale" and upscale["source"]["job_id"] == grid["id"]
        assert await stored(client, upscale["outputs"][0]) == media.png(f"{source}:2", 64, 64) == await served(
            stack, child)
        # The upscaled image has its own buttons: no U1-U4 there.
        assert await refused(client, "upscale", upscale["id"], options={"index": 1}) == "input.options.index"
        jobs["zoom"] = await follow_up(client, "zoom_out", upscale["id"], options={"zoom": 1.5})
        jobs["custom"] = await follow_up(client, "zoom_out", upscale["id"], options={"zoom": 1.2})
        jobs["pan"] = await follow_up(client, "pan", upscale["id"], options={"direction": "left"})
        jobs["creative"] = await follow_up(client, "upscale", upscale["id"], options={"type": "creative"})
        results = {name: await done(client, job) for name, job in jobs.items()}
    reroll, zoom, custom, pan, creative = (sim.tasks[job["provider_task_id"]] for job in results.values())
    # A prompt on a reroll asks for remix: the modal step carries it.
    assert reroll.input["enableRemix"] is True and reroll.data["promptEn"] == "a red fox in the rain"
    assert zoom.input["customId"] == button(sim, child, "Zoom Out 1.5x") and not zoom.data["modal"]
    assert custom.input["customId"] == button(sim, child, "Custom Zoom")
    assert custom.data["promptEn"] == "a red fox in the snow --zoom 1.2"
    assert pan.input["customId"].startswith("MJ::JOB::pan_left::") and pan.data["action"] == "PAN"
    assert creative.input["customId"] == button(sim, child, "Upscale (Creative)")
    assert all(len(job["outputs"]) == 1 for job in results.values())
    stats = await sim_stats(stack, "midjourney")
    assert stats["creations"] == 7 and stats["duplicate_identities"] == {}


async def test_variation_completes_the_modal_step_asked_for_or_hidden_by_the_gateway(stack):
    sim = sim_of(stack)
    sim.config.extra["remix_mode"] = True  # the account has remix on: variations wait for the modal
    async with api(stack) as client:
        grid = await done(client, await mj_job(client))
        # The proxy answers 21 "Waiting for window confirm": the adapter sends the modal at once.
        asked = await follow_up(client, "variation", grid["id"], options={"index": 1})
        asked = await wait_for(client, asked["id"], {"submitted", "running", "succeeded", "failed"})
        # new-api rewrites 21 -> 1: the child is found waiting in MODAL by a poll, which sends it.
        sim.config.extra["rewrite_codes"] = True
        hidden = await follow_up(client, "variation", grid["id"], options={"index": 3})
        asked, hidden = await done(client, asked), await done(client, hidden)
        for job, index in ((asked, 1), (hidden, 3)):
            task = sim.tasks[job["provider_task_id"]]
            assert task.data["modal"] and task.data["admitted"] is not None  # it waited, then ran
            assert task.data["action"] == "VARIATION"
            assert task.input["customId"] == button(sim, grid["provider_task_id"], f"V{index}")
            assert await stored(client, job["outputs"][0]) == await served(stack, task.id)
    stats = await sim_stats(stack, "midjourney")
    assert stats["creations"] == 3 and stats["duplicate_identities"] == {}


async def test_describe_blend_and_face_swap_take_the_source_image(stack):
    sim = sim_of(stack)
    async with api(stack) as client:
        grid = await done(client, await mj_job(client))
        image = await stored(client, grid["outputs"][0])
        other = f"{stack.simulator_url('midjourney')}/mj/image/{grid['provider_task_id']}"
        assert await refused(client, "describe", grid["id"], prompt="x") == "input.prompt"
        assert await refused(client, "blend", grid["id"]) == "input.options.images"
        described = await follow_up(client, "describe", grid["id"])
        blended = await follow_up(client, "blend", grid["id"], options={"images": [other], "dimensions": "SQUARE"})
        swapped = await follow_up(client, "swap_face", grid["id"], options={"face": other})
        described, blended, swapped = [await done(client, j) for j in (described, blended, swapped)]
        texts = [(await stored(client, o)).decode() for o in described["outputs"]]
        blend_bytes = await stored(client, blended["outputs"][0])
        swap_bytes = await stored(client, swapped["outputs"][0])
    expected = [line.split(" ", 1)[1] for line in suggested_prompts(image).split("\n\n")]
    assert texts == expected and len(texts) == 4
    assert [o["content_type"] for o in described["outputs"]] == ["text/plain"] * 4
    assert [o["metadata"]["index"] for o in described["outputs"]] == [1, 2, 3, 4]
    sent = sim.tasks[described["provider_task_id"]].input["base64"]
    assert sent == "data:image/png;base64," + base64.b64encode(image).decode()  # the stored grid, inlined
    blend_task = sim.tasks[blended["provider_task_id"]]
    assert len(blend_task.input["base64Array"]) == 2 and blend_task.input["dimensions"] == "SQUARE"
    assert blend_bytes == await served(stack, blend_task.id)
    swap_task = sim.tasks[swapped["provider_task_id"]]
    assert swap_task.data["action"] == "SWAP_FACE" and swap_bytes == await served(stack, swap_task.id)
    assert set(swap_task.input) >= {"sourceBase64", "targetBase64"}


# -- failures --------------------------------------------------------------------------------------

FAILURES = [
    ("a fox [sim:banned=blood]", "content_policy", "'blood'"),  # submit code 24 inside HTTP 200
    ("a fox [sim:fail=Banned prompt detected]", "content_policy", "Banned prompt detected"),  # FAILURE
    ("a fox [sim:fail]", "provider_failed", "[Invalid parameter] Invalid value"),
]


async def test_refusals_and_failures(stack):
    async with api(stack) as client:
        jobs = [await mj_job(client, prompt) for prompt, _, _ in FAILURES]
        failed = [await wait_for(client, job["id"]) for job in jobs]
    for job, (_, code, text) in zip(failed, FAILURES, strict=True):
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert text in job["error"]["message"] and job["attempts"] == 1
    assert failed[0]["error"]["provider_detail"]["properties"]["bannedWord"] == "blood"
    assert failed[1]["error"]["provider_detail"]["failReason"] == "Banned prompt detected"
    assert (await sim_stats(stack, "midjourney"))["creations"] == 2  # the banned prompt created nothing


async def test_full_queue_and_gateway_429_wait_then_succeed_with_one_creation_each(stack):
    sim = sim_of(stack)
    sim.config.extra["queue_size"] = 0  # no waiting room at the proxy: busy slots answer code 23
    async with httpx.AsyncClient(base_url=stack.simulator_url("midjourney"),
                                 headers={"Authorization": "Bearer someone-else"}) as other:
        for n in range(3):  # another client of the account takes its three slots for 2 s
            answer = (await other.post("/mj/submit/imagine", json={"prompt": f"busy {n} [sim:run=2]"})).json()
            assert answer["code"] == 1
    async with api(stack) as client:
        queued = await done(client, await mj_job(client))
        await sim_faults(stack, "midjourney", {"kind": "429", "route": "submit", "retry_after": 1})
        throttled = await done(client, await mj_job(client, "a fox, once"))
    # Refused with code 23 while the slots were taken (each retry after a growing backoff), then accepted.
    assert queued["attempts"] >= 2 and throttled["attempts"] == 2
    stats = await sim_stats(stack, "midjourney")
    assert stats["creations"] == 5 and stats["duplicate_identities"] == {}
    assert stats["requests"]["submit"] == 3 + queued["attempts"] + 2 and stats["faults_injected"] == {"submit:429": 1}


async def test_malformed_answers(stack):
    await sim_faults(stack, "midjourney", {"kind": "malformed", "route": "submit"})
    async with api(stack) as client:
        failed = await wait_for(client, (await mj_job(client))["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "provider_malformed_response"
        await sim_faults(stack, "midjourney", {"kind": "malformed", "route": "list"})
        recovered = await done(client, await mj_job(client, "a fox, again"))
    assert recovered["attempts"] == 1
    stats = await sim_stats(stack, "midjourney")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:malformed": 1, "list:malformed": 1}


async def test_expired_output_and_expired_input_image(stack):
    sim = sim_of(stack)
    sim.config.output_ttl_seconds = 0.0  # the CDN file is gone by the time it is collected
    gone = f"{stack.simulator_url('midjourney')}/delivery/expired/input.png"
    async with api(stack) as client:
        expired = await wait_for(client, (await mj_job(client))["id"])
        no_input = await wait_for(client, (await mj_job(client, image_url=gone))["id"])
    assert expired["status"] == "failed" and expired["error"]["code"] == "output_expired"
    assert no_input["status"] == "failed" and no_input["error"]["code"] == "input_image_unavailable"
    assert (await sim_stats(stack, "midjourney"))["creations"] == 1  # nothing submitted without the image


async def callback_token(stack: Stack, job_id: str) -> str:
    """The per-job token the worker put in the notifyHook URL (read from the job record)."""
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None and job.callback_token
    return job.callback_token


async def test_forged_callbacks_are_refused_and_only_hints(stack):
    async with api(stack) as client:
        job = await mj_job(client, "a slow fox [sim:queue=20]")
        job = await wait_for(client, job["id"], {"submitted", "running"})
        url = f"{stack.api_url}/v1/callbacks/midjourney"
        forged = json.dumps({"id": job["provider_task_id"], "status": "SUCCESS", "progress": "100%",
                             "imageUrl": "https://evil.example/x.png"}).encode()
        async with httpx.AsyncClient() as raw:
            assert (await raw.post(url, params={"job": job["id"], "token": "wrong"}, content=forged)).status_code == 401
            assert (await raw.post(url, params={"job": job["id"]}, content=forged)).status_code == 401
            good = {"job": job["id"], "token": await callback_token(stack, job["id"])}
            assert (await raw.post(url, params=good, content=b"not json")).status_code == 401
            resp = await raw.post(url, params=good, content=forged)
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] in ("submitted", "running") and after["outputs"] == []
    assert after["provider_status"] in ("", "NOT_START", "SUBMITTED")


async def test_ambiguous_submit_fails_without_resubmitting(redis_url):
    settings = {"midjourney": {"request_timeout_seconds": 1.0}}
    async with dev_stack(redis_url=redis_url, providers_file=settings, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "midjourney", {"kind": "timeout", "route": "submit", "after_effect": True,
                                               "delay": 2})
        failed = await wait_for(client, (await mj_job(client))["id"])
        stats = await sim_stats(stack, "midjourney")
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_outcome_unknown"
    assert stats["creations"] == 1 and stats["requests"]["submit"] == 1


# -- direct ----------------------------------------------------------------------------------------

REQUEST = GenerationRequest(kind=MediaKind.image, model="midjourney", input=MediaInput(prompt="a heron"))


async def test_fetch_many_reads_the_group_with_one_request_and_omits_unknown_ids():
    sim = MidjourneySimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, extra={"gateway_tick_seconds": 0.05}))
    async with serving(sim.app) as url, httpx.AsyncClient() as http:
        adapter = MidjourneyProvider(ProviderSettings(name="midjourney", base_url=url, api_keys=["k"]))
        ctx = CallContext(http=http, api_key="k")
        ids = [(await adapter.submit(ctx, REQUEST)).task_id for _ in range(2)]
        refs = [TaskRef(task_id=i, request=REQUEST) for i in [*ids, "1700000000000000"]]
        calls = 0
        while calls < 100:
            statuses = await adapter.fetch_many(ctx, refs)
            calls += 1
            if all(s.state == "succeeded" for s in statuses.values()):
                break
            await asyncio.sleep(0.05)
    await sim.shutdown()
    assert sorted(statuses) == sorted(ids)  # the unknown id is left for its own poll
    assert all(s.task_state is not None and len(s.task_state.model_dump()["buttons"]) == 9 for s in statuses.values())
    assert sim.stats.requests["list"] == calls and "fetch" not in sim.stats.requests  # one request per group


async def test_validation_names_the_field_and_callbacks_name_the_task():
    adapter = MidjourneyProvider(ProviderSettings(name="midjourney", base_url="http://mj.invalid"))
    source = SourceMedia(provider="midjourney", model="midjourney", kind=MediaKind.image, task_id="1",
                         state={"buttons": [{"custom_id": "MJ::JOB::upsample::1::h"}]})
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("v6", {"prompt": "x"}, "model"),
        ("midjourney", {"prompt": "x", "options": {"botType": "DALL_E"}}, "input.options.botType"),
        ("midjourney", {"prompt": "x", "num_outputs": 4}, "input.num_outputs"),
        ("midjourney", {"prompt": "x --ar 1:1", "aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("midjourney", {"prompt": "x", "resolution": "1024x1024"}, "input.resolution"),
        ("midjourney", {"prompt": "x", "options": {"images": ["ftp://x"]}}, "input.options.images"),
        ("midjourney", {"prompt": "x", "options": {"index": 1}}, "input.options.index"),
        ("midjourney", {}, "input.prompt"),
    ]
    for model, given, field in cases:
        with pytest.raises(InvalidInput) as err:
            adapter.validate(GenerationRequest(kind=MediaKind.image, model=model, input=MediaInput(**given)))
        assert err.value.field == field, (given, err.value)
    with pytest.raises(InvalidInput) as err:
        adapter.validate(GenerationRequest(kind=MediaKind.image, model="midjourney", operation="upscale",
                                           source=source, input=MediaInput(options={"index": 2})))
    assert err.value.field == "input.options.index"
    async with httpx.AsyncClient() as http:
        ctx = CallContext(http=http, api_key="k")
        hint = await adapter.verify_callback(ctx, {}, b'{"id": "17", "status": "IN_PROGRESS", "progress": "15%"}')
        assert (hint.task_id, hint.raw_status) == ("17", "IN_PROGRESS")
        for body in (b"[]", b"not json", b'{"status": "SUCCESS"}'):
            with pytest.raises(CallbackRejected):
                await adapter.verify_callback(ctx, {}, body)
