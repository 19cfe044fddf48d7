"""The Luma Dream Machine adapter against the Luma simulator, through the real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.jobs import JobStore
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings
from providers.luma import LumaProvider
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

IMAGE = "https://example.com/first.jpg"


async def luma_job(client: httpx.AsyncClient, model: str = "ray-2", kind: str = "video",
                   **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"provider": "luma", "kind": kind, "model": model,
                            "input": {"prompt": "a tiger walking through fresh snow"} | fields.pop("input", {})}
    return await submit(client, **(body | fields))


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
    return stack.simulators["luma"]


def generation(stack: Stack, gen_id: str) -> dict[str, Any]:
    """The generation object as Luma serves it (assets with their URLs)."""
    luma = sim(stack)
    body: dict[str, Any] = luma.generation(luma.tasks[gen_id], stack.simulator_url("luma"))
    return body


async def assert_stored_equals_served(client: httpx.AsyncClient, output: dict[str, Any], served_url: str) -> None:
    async with httpx.AsyncClient() as raw:
        served = await raw.get(served_url)  # storage.cdn-luma.com-style: no auth
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


# -- success ------------------------------------------------------------------------------------

async def test_video_success_maps_the_common_fields_and_stores_lumas_video(stack):
    async with api(stack) as client:
        job = await luma_job(client, input={"image_url": IMAGE, "duration_seconds": 5, "aspect_ratio": "9:16",
                                            "resolution": "720p", "options": {"loop": True}})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        gen_id = done["provider_task_id"]
        await assert_stored_equals_served(client, output, generation(stack, gen_id)["assets"]["video"])
    assert done["provider_status"] == "completed" and done["progress"] == 100 and done["attempts"] == 1
    assert output["content_type"] == "video/mp4"
    assert output["metadata"] == {"generation_id": gen_id, "generation_type": "video", "model": "ray-2"}
    sent = dict(sim(stack).tasks[gen_id].input)
    callback = sent.pop("callback_url")
    assert sent == {"model": "ray-2", "prompt": "a tiger walking through fresh snow", "aspect_ratio": "9:16",
                    "resolution": "720p", "duration": "5s", "loop": True,
                    "keyframes": {"frame0": {"type": "image", "url": IMAGE}}}
    assert parse_qs(urlsplit(callback).query)["job"] == [job["id"]]  # what reconcile matches on
    assert (await sim_stats(stack, "luma"))["requests"]["create"] == 1  # POST /generations/video


async def test_photon_image_success(stack):
    async with api(stack) as client:
        job = await luma_job(client, kind="image", model="photon-flash-1",
                             input={"prompt": "a teapot", "aspect_ratio": "1:1", "image_url": IMAGE,
                                    "options": {"format": "png", "style_ref": [{"url": IMAGE, "weight": 0.5}]}})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        served_url = generation(stack, done["provider_task_id"])["assets"]["image"]
        await assert_stored_equals_served(client, output, served_url)
    assert output["content_type"] == "image/png"
    sent = sim(stack).tasks[done["provider_task_id"]].input
    assert sent["image_ref"] == [{"url": IMAGE}] and sent["style_ref"] == [{"url": IMAGE, "weight": 0.5}]
    assert sent["format"] == "png" and sent["model"] == "photon-flash-1"


# -- failures --------------------------------------------------------------------------------------

async def test_asynchronous_failures_and_moderation(stack):
    cases = {
        "a tiger [sim:fail]": ("provider_failed", "Job failed"),
        "a tiger [sim:moderation]": ("content_policy", "Frame moderation failed"),
        "a tiger [sim:blacklisted]": ("content_policy", "Contains blacklisted words"),
        "a tiger [sim:no_video]": ("provider_no_output", "without its video asset"),
    }
    async with api(stack) as client:
        jobs = {prompt: await luma_job(client, input={"prompt": prompt}) for prompt in cases}
        done = {prompt: await wait_for(client, job["id"]) for prompt, job in jobs.items()}
    for prompt, (code, text) in cases.items():
        job = done[prompt]
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert text in job["error"]["message"]
        assert job["provider_task_id"] and job["attempts"] == 1  # the create succeeded; the generation failed
    assert (await sim_stats(stack, "luma"))["creations"] == len(cases)


async def test_rate_limit_then_success_with_one_creation(stack):
    await sim_faults(stack, "luma", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await luma_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "luma")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_malformed_bodies_reconcile_the_create_and_repoll_the_status(stack):
    # The create took effect but its answer is unreadable, and one status read is unreadable too.
    await sim_faults(stack, "luma", {"kind": "malformed", "route": "create", "after_effect": True},
                     {"kind": "malformed", "route": "get", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await luma_job(client))["id"])
    assert done["status"] == "succeeded", done
    stats = await sim_stats(stack, "luma")
    assert stats["creations"] == 1 and stats["requests"]["list"] == 1 and stats["requests"]["get"] >= 2
    assert stats["faults_injected"] == {"create:malformed": 1, "get:malformed": 1}


async def test_expired_asset_fails_as_expired(stack):
    sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await luma_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_bad_input_is_refused_before_any_request(stack):
    refused = [
        ({"model": "gen-3"}, "model"),
        ({"kind": "image", "model": "ray-2"}, "model"),
        ({"input": {"prompt": "a tiger", "duration_seconds": 7}}, "input.duration_seconds"),
        ({"input": {"prompt": "a tiger", "resolution": "8k"}}, "input.resolution"),
        ({"input": {"prompt": "a tiger", "aspect_ratio": "5:4"}}, "input.aspect_ratio"),
        ({"input": {"prompt": "a tiger", "seed": 3}}, "input.seed"),
        ({"input": {"prompt": "ok"}}, "input.prompt"),
        ({"input": {"image_url": "data:image/png;base64,AAAA"}}, "input.image_url"),
        ({"input": {"prompt": "a tiger", "options": {"callback_url": "https://evil.example"}}},
         "input.options.callback_url"),
        ({"input": {"prompt": "a tiger", "image_url": IMAGE,
                    "options": {"loop": True, "keyframes": {"frame1": {"type": "image", "url": IMAGE}}}}},
         "input.options.loop"),
        ({"kind": "image", "model": "photon-1", "input": {"prompt": "a teapot", "duration_seconds": 5}},
         "input.duration_seconds"),
        ({"kind": "image", "model": "photon-1", "input": {"prompt": "a teapot", "options": {"sync": True}}},
         "input.options.sync"),
    ]
    async with api(stack) as client:
        for overrides, field in refused:
            body = {"provider": "luma", "kind": "video", "model": "ray-2", "input": {"prompt": "a tiger"}} | overrides
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, (overrides, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], resp.json()
    assert (await sim_stats(stack, "luma"))["requests"] == {}


# -- callbacks, cancel, reconcile ---------------------------------------------------------------

async def test_callbacks_finish_the_job_without_waiting_for_a_poll(redis_url):
    # Polls are 30+ s apart: only Luma's callbacks (each state sent twice here) can finish it quickly.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        done = await wait_for(client, (await luma_job(client, input={"prompt": "a tiger [sim:callback=duplicate]"}))
                              ["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15
        deadline = time.monotonic() + 5  # the job may finish on the first "completed" before its repeat is sent
        while len(sim(stack).callback_log) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log = list(sim(stack).callback_log)
    assert [e["state"] for e in log] == ["dreaming", "dreaming", "completed", "completed"]
    assert all(e["status_code"] == 200 and e["attempt"] == 1 for e in log)


async def test_forged_callbacks_are_refused_and_a_callback_is_only_a_hint(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await luma_job(client, input={"prompt": "slow tiger [sim:queue=20]"})
        job = await wait_for(client, job["id"], {"submitted", "running"})
        url = f"{stack.api_url}/v1/callbacks/luma"
        forged = json.dumps({"id": job["provider_task_id"], "state": "completed",
                             "assets": {"video": "https://evil.example/x.mp4"}}).encode()
        async with httpx.AsyncClient() as raw:
            assert (await raw.post(url, params={"job": job["id"], "token": "wrong"}, content=forged)).status_code == 401
            assert (await raw.post(url, params={"job": job["id"]}, content=forged)).status_code == 401
            good = {"job": job["id"], "token": await callback_token(stack, job["id"])}
            assert (await raw.post(url, params=good, content=b"not json")).status_code == 401
            resp = await raw.post(url, params=good, content=forged)  # right token, lying body
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "submitted" and after["provider_status"] == "queued" and after["outputs"] == []


async def test_cancel_is_local_only(stack):
    async with api(stack) as client:
        job = await luma_job(client, input={"prompt": "a long tiger [sim:run=30]"})
        job = await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200, resp.text
        canceled = await wait_until(client, job["id"], lambda j: "no cancel endpoint" in (j["note"] or ""))
    assert canceled["status"] == "canceled"
    assert job["provider_task_id"] in sim(stack).tasks  # never deleted: a DELETE is no documented cancel
    assert "delete" not in (await sim_stats(stack, "luma"))["requests"]


async def test_ambiguous_create_is_reconciled_by_the_echoed_callback_url(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        other = await wait_for(client, (await luma_job(client, input={"prompt": "another tiger"}))["id"])
        await sim_faults(stack, "luma", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 2})
        job = await luma_job(client)
        done = await wait_for(client, job["id"])
        stats = await sim_stats(stack, "luma")
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert done["provider_task_id"] != other["provider_task_id"]
    callback = sim(stack).tasks[done["provider_task_id"]].input["callback_url"]
    assert parse_qs(urlsplit(callback).query)["job"] == [job["id"]]
    assert stats["creations"] == 2 and stats["requests"]["create"] == 2 and stats["requests"]["list"] == 1


# -- the extend follow-up ----------------------------------------------------------------------

async def test_extend_continues_the_source_generation(stack):
    async with api(stack) as client:
        source = await wait_for(client, (await luma_job(client, model="ray-flash-2"))["id"])
        assert source["status"] == "succeeded", source
        extend = await luma_job(client, operation="extend", source={"job_id": source["id"]},
                                input={"prompt": "the tiger breaks into a run", "image_url": IMAGE})
        assert extend["operation"] == "extend" and extend["source"] == {"job_id": source["id"], "output": 0}
        done = await wait_for(client, extend["id"])
        assert done["status"] == "succeeded", done
        await assert_stored_equals_served(client, done["outputs"][0],
                                          generation(stack, done["provider_task_id"])["assets"]["video"])
    sent = sim(stack).tasks[done["provider_task_id"]].input
    assert sent["keyframes"] == {"frame0": {"type": "generation", "id": source["provider_task_id"]},
                                 "frame1": {"type": "image", "url": IMAGE}}
    assert sent["model"] == "ray-2" and sent["prompt"] == "the tiger breaks into a run"


async def test_refused_follow_ups_name_the_field(stack):
    async with api(stack) as client:
        video = await wait_for(client, (await luma_job(client))["id"])
        photon = await wait_for(client, (await luma_job(client, kind="image", model="photon-1",
                                                        input={"prompt": "a teapot"}))["id"])
        other = await wait_for(client, (await submit(client, input={"prompt": "a red fox"}))["id"])
        assert {video["status"], photon["status"], other["status"]} == {"succeeded"}
        refused = [
            ({"operation": "extend"}, "source"),  # extend needs its source
            ({"operation": "extend", "source": {"job_id": other["id"]}}, "source"),  # a replicate job
            ({"operation": "extend", "source": {"job_id": photon["id"]}}, "source"),  # not a video
            ({"operation": "extend", "source": {"job_id": video["id"]}, "input": {"prompt": "on and on",
                                                                                  "options": {"loop": True}}},
             "input.options.loop"),
            ({"operation": "extend", "kind": "image", "model": "photon-1", "source": {"job_id": video["id"]}},
             "operation"),
            ({"source": {"job_id": video["id"]}}, "source"),  # generate takes an image, not a video
        ]
        for overrides, field in refused:
            body = {"provider": "luma", "kind": "video", "model": "ray-2", "input": {"prompt": "a tiger"}} | overrides
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, (overrides, resp.text)
            assert resp.json()["errors"][0]["field"] == field, (overrides, resp.json())
    assert (await sim_stats(stack, "luma"))["creations"] == 2


# -- configuration -------------------------------------------------------------------------------

async def test_older_create_path_and_a_base_url_without_the_api_path():
    provider = LumaProvider(ProviderSettings(name="luma", base_url="https://api.lumalabs.ai",
                                             extra={"video_path": "/generations"}))
    assert provider.api == "https://api.lumalabs.ai/dream-machine/v1"
    request = GenerationRequest(kind=MediaKind.video, model="ray-2", input=MediaInput(prompt="a tiger"),
                                reference="job_1")
    assert provider.build(request) == ("/generations", {"model": "ray-2", "generation_type": "video",
                                                        "prompt": "a tiger"})
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as http:  # nothing listens: no request is made
        assert await provider.reconcile(CallContext(http=http, api_key="k"), request, time.time()) is None
