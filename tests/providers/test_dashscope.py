"""The DashScope adapter (Wan video, Wan / Qwen-Image images) against the DashScope simulator, through the
real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings
from providers.dashscope import DashScopeProvider
from providers.errors import AmbiguousMatch
from providers.sandbox.base import SimConfig
from providers.sandbox.dashscope import DashScopeSimulator
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

T2V = "wan2.2-t2v-plus"
I2V = "wan2.2-i2v-plus"
IMAGE = "https://example.com/cat.png"
LAST = "https://example.com/cat-asleep.png"


async def video_job(client: httpx.AsyncClient, model: str = T2V, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a cat running on the grass"} | input_fields
    return await submit(client, provider="dashscope", kind="video", model=model, input=body)


async def image_job(client: httpx.AsyncClient, model: str = "wan2.2-t2i-flash", **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a tea house in the rain"} | input_fields
    return await submit(client, provider="dashscope", kind="image", model=model, input=body)


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
    return stack.simulators["dashscope"]


def task_output(stack: Stack, task_id: str) -> dict[str, Any]:
    """The task's ``output`` as DashScope serves it (with its signed URLs)."""
    ds = sim(stack)
    output: dict[str, Any] = ds.task_body(ds.tasks[task_id], stack.simulator_url("dashscope"), time.time())["output"]
    return output


async def assert_stored_equals_served(client: httpx.AsyncClient, output: dict[str, Any], served_url: str) -> None:
    async with httpx.AsyncClient() as raw:
        served = await raw.get(served_url)  # a signed OSS URL: no auth
    stored = await client.get(output["url"])
    assert served.status_code == 200 and stored.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"] == hashlib.sha256(stored.content).hexdigest()


# -- video ------------------------------------------------------------------------------------------

async def test_text_to_video_maps_the_common_fields_and_stores_the_video(stack):
    async with api(stack) as client:
        job = await video_job(client, aspect_ratio="9:16", resolution="720p", duration_seconds=5, seed=42,
                              negative_prompt="blur", options={"prompt_extend": False, "watermark": False})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        await assert_stored_equals_served(client, output, task_output(stack, done["provider_task_id"])["video_url"])
    task = sim(stack).tasks[done["provider_task_id"]]
    assert done["provider_status"] == "SUCCEEDED" and done["progress"] == 100 and done["attempts"] == 1
    assert output["content_type"] == "video/mp4"
    assert output["metadata"] == {"task_id": task.id, "orig_prompt": "a cat running on the grass",
                                  "usage": {"video_count": 1, "video_duration": 5, "video_ratio": "720*1280"}}
    assert task.input == {"model": T2V, "prompt": "a cat running on the grass", "prompt_extend": False,
                          "ratio": "720*1280", "duration": 5}
    requests = (await sim_stats(stack, "dashscope"))["requests"]
    assert requests["create"] == 1 and requests["get"] >= 1


async def test_image_to_video_and_first_last_frame_routes(stack):
    async with api(stack) as client:
        jobs = [await video_job(client, model=I2V, image_url=IMAGE, resolution="480p"),
                await video_job(client, model="wanx2.1-kf2v-plus", image_url=IMAGE, options={"last_frame_url": LAST})]
        i2v, kf2v = [await wait_for(client, job["id"]) for job in jobs]
    assert i2v["status"] == kf2v["status"] == "succeeded", (i2v, kf2v)
    assert sim(stack).tasks[i2v["provider_task_id"]].input["ratio"] == "480P"
    assert sim(stack).tasks[kf2v["provider_task_id"]].input["model"] == "wanx2.1-kf2v-plus"
    assert (await sim_stats(stack, "dashscope"))["creations"] == 2


async def test_failures_and_content_refusals(stack):
    cases = [
        (video_job, "a cat [sim:fail]", "provider_failed", "InternalError.Algo", True),
        (video_job, "a cat [sim:filtered]", "content_policy", "DataInspectionFailed", True),  # FAILED task
        (video_job, "a cat [sim:blocked]", "content_policy", "DataInspectionFailed", False),  # refused at create
        (video_job, "a cat [sim:fail=InvalidParameter.FileDownload]", "provider_rejected_input", "FileDownload", True),
    ]
    async with api(stack) as client:
        jobs = [await make(client, prompt=prompt) for make, prompt, *_ in cases]
        done = [await wait_for(client, job["id"]) for job in jobs]
    for job, (_, _, code, text, created) in zip(done, cases, strict=True):
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert text in job["error"]["message"] and job["attempts"] == 1
        assert bool(job["provider_task_id"]) is created
    assert (await sim_stats(stack, "dashscope"))["creations"] == 3


async def test_account_and_model_errors(stack):
    async with api(stack) as client:
        unknown = await wait_for(client, (await video_job(client, model="wan9.9-t2v-plus"))["id"])
        arrears = await wait_for(client, (await video_job(client, prompt="a cat [sim:arrearage]"))["id"])
    assert unknown["status"] == "failed" and unknown["error"]["code"] == "model_not_found"
    assert "Model not exist" in unknown["error"]["message"]
    assert arrears["status"] == "failed" and arrears["error"]["code"] == "provider_insufficient_balance"
    assert "Arrearage" in arrears["error"]["message"]


async def test_rate_limit_then_success_with_one_creation(stack):
    sim(stack).config.extra["throttling_status"] = 400  # one client saw Throttling.RateQuota as an HTTP 400
    await sim_faults(stack, "dashscope", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        job = await video_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "dashscope")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}
    assert any("Throttling.RateQuota" in (e["note"] or "") for e in events)


async def test_malformed_bodies_reconcile_the_create_and_repoll_the_status(stack):
    async with api(stack) as client:
        # The create took effect but its answer is unreadable: the task list finds it.
        await sim_faults(stack, "dashscope", {"kind": "malformed", "route": "create", "after_effect": True})
        reconciled = await wait_for(client, (await video_job(client))["id"])
        stats = await sim_stats(stack, "dashscope")
        assert stats["creations"] == 1 and stats["requests"]["list"] == 1
        # An unreadable status is read again.
        await sim_faults(stack, "dashscope", {"kind": "malformed", "route": "get", "count": 1})
        repolled = await wait_for(client, (await video_job(client))["id"])
    assert reconciled["status"] == repolled["status"] == "succeeded" and reconciled["attempts"] == 1, reconciled
    stats = await sim_stats(stack, "dashscope")
    assert stats["creations"] == 2 and stats["requests"]["list"] == 1
    assert stats["faults_injected"] == {"create:malformed": 1, "get:malformed": 1}


async def test_expired_video_url_fails_as_expired(stack):
    sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await video_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_unknown_is_queued_while_fresh_and_not_found_once_expired(redis_url):
    async with dev_stack(redis_url=redis_url, providers_file={"dashscope": {"extra": {"task_ttl_seconds": 1.5}}},
                         log_format="text") as stack, api(stack) as client:
        job = await video_job(client, prompt="a lost cat [sim:lost]")
        fresh = await wait_until(client, job["id"], lambda j: j["provider_status"] == "UNKNOWN", timeout=3)
        done = await wait_for(client, job["id"], timeout=10)
    assert fresh["status"] == "submitted" and fresh["provider_status"] == "UNKNOWN"
    assert done["status"] == "failed" and done["error"]["code"] == "provider_task_not_found"
    assert "24 h" in done["error"]["message"]


async def test_cancel_stops_a_pending_task_and_not_a_running_one(stack):
    async with api(stack) as client:
        pending = await wait_for(client, (await video_job(client, prompt="a cat [sim:queue=30]"))["id"],
                                 {"submitted"})
        running = await video_job(client, prompt="a long cat [sim:run=30]")
        running = await wait_for(client, running["id"], {"running"})
        for job in (pending, running):
            assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        told = await wait_until(client, pending["id"], lambda j: "told to stop" in (j["note"] or ""))
        refused = await wait_until(client, running["id"], lambda j: "stop failed" in (j["note"] or ""))
    assert told["status"] == refused["status"] == "canceled"
    assert task_output(stack, pending["provider_task_id"])["task_status"] == "CANCELED"
    assert "only PENDING" in refused["note"] and "UnsupportedOperation" in refused["note"]
    assert task_output(stack, running["provider_task_id"])["task_status"] == "RUNNING"


async def test_ambiguous_create_is_reconciled_through_the_task_list(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "dashscope", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 2})
        lost = await video_job(client, prompt="a lighthouse at dusk [sim:run=0.2]")  # finished when looked up
        other = await video_job(client, prompt="another lighthouse")  # same model, submitted meanwhile
        done = await wait_for(client, lost["id"])
        other = await wait_for(client, other["id"])
        stats = await sim_stats(stack, "dashscope")
    assert done["status"] == other["status"] == "succeeded" and done["attempts"] == 1, done
    assert done["provider_task_id"] != other["provider_task_id"]
    assert sim(stack).tasks[done["provider_task_id"]].input["prompt"] == "a lighthouse at dusk [sim:run=0.2]"
    assert stats["creations"] == 2 and stats["requests"]["create"] == 2 and stats["requests"]["list"] == 1


async def test_reconcile_takes_the_task_that_echoes_the_prompt_and_never_guesses():
    ds = DashScopeSimulator(SimConfig(queue_seconds=30, run_seconds=1))
    async with serving(ds.app) as base, httpx.AsyncClient(timeout=5) as http:
        provider = DashScopeProvider(ProviderSettings(name="dashscope", base_url=base))
        ctx = CallContext(http=http, api_key="sk-1")
        since = time.time()
        ours, theirs = [GenerationRequest(kind=MediaKind.video, model=T2V, reference=f"job_{i}",
                                          input=MediaInput(prompt=prompt))
                        for i, prompt in enumerate(("a lighthouse", "another lighthouse"))]
        created = [(await provider.submit(ctx, r)).task_id for r in (ours, theirs)]
        with pytest.raises(AmbiguousMatch):  # two PENDING tasks, no prompt shown yet: either could be ours
            await provider.reconcile(ctx, ours, since)
        for task in ds.tasks.values():
            task.queue_seconds = task.run_seconds = 0.0  # both finish and echo their prompt
        found = await provider.reconcile(ctx, ours, since)
        assert found is not None and found.task_id == created[0]
        assert await provider.reconcile(ctx, ours, time.time() + 60) is None  # nothing created then


# -- images ----------------------------------------------------------------------------------------

async def test_async_text_to_image_keeps_the_good_images(stack):
    async with api(stack) as client:
        jobs = [await image_job(client, prompt="a tea house [sim:partial]", num_outputs=2, aspect_ratio="16:9"),
                await image_job(client, model="qwen-image", aspect_ratio="16:9")]
        partial, qwen = [await wait_for(client, job["id"]) for job in jobs]
        assert partial["status"] == qwen["status"] == "succeeded", (partial, qwen)
        (output,) = partial["outputs"]
        results = task_output(stack, partial["provider_task_id"])["results"]
        await assert_stored_equals_served(client, output, results[0]["url"])
    assert partial["provider_task_id"] != partial["id"]  # a task, polled
    assert output["metadata"]["index"] == 0 and output["metadata"]["usage"] == {"image_count": 1}
    assert output["metadata"]["failed"] == [{"index": 1, "code": "DataInspectionFailed",
                                             "message": "Output data may contain inappropriate content."}]
    assert sim(stack).tasks[partial["provider_task_id"]].input["n"] == 2
    assert sim(stack).tasks[qwen["provider_task_id"]].input["size"] == "1664*928"


async def test_sync_multimodal_route_answers_the_create(stack):
    async with api(stack) as client:
        jobs = [await image_job(client, model="qwen-image-edit", prompt="make it copper", image_url=IMAGE,
                                num_outputs=2, options={"images": [LAST]}),
                await image_job(client, model="qwen-image-max", prompt="x [sim:error_in_body]"),
                await image_job(client, model="qwen-image-max", prompt="x [sim:filtered]")]
        edit, in_body, refused = [await wait_for(client, job["id"]) for job in jobs]
        assert edit["status"] == "succeeded", edit
        stored = [(await client.get(o["url"])).content for o in edit["outputs"]]
    assert edit["provider_task_id"] == edit["id"] and edit["provider_status"] == "succeeded"
    served = {hashlib.sha256(f.data).hexdigest() for f in sim(stack).files.files.values()}
    assert {hashlib.sha256(b).hexdigest() for b in stored} == {o["sha256"] for o in edit["outputs"]} <= served
    assert len(edit["outputs"]) == 2 and edit["outputs"][1]["metadata"]["usage"]["image_count"] == 2
    assert in_body["status"] == "failed" and in_body["error"]["code"] == "provider_rejected_input"
    assert "Size not supported" in in_body["error"]["message"]  # an error inside an HTTP 200
    assert refused["status"] == "failed" and refused["error"]["code"] == "content_policy"
    requests = (await sim_stats(stack, "dashscope"))["requests"]
    assert requests["generate"] == 3 and "get" not in requests and "create" not in requests


async def test_ambiguous_sync_call_fails_without_resubmitting(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "dashscope", {"kind": "timeout", "route": "generate", "after_effect": True,
                                              "delay": 2})
        done = await wait_for(client, (await image_job(client, model="qwen-image-max"))["id"])
        stats = await sim_stats(stack, "dashscope")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert stats["creations"] == 1 and stats["requests"]["generate"] == 1 and "list" not in stats["requests"]


async def test_bad_input_is_refused_before_any_request(stack):
    refused = [
        ("video", T2V, {"image_url": IMAGE}, "input.image_url"),
        ("video", I2V, {}, "input.image_url"),
        ("video", I2V, {"image_url": IMAGE, "aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("video", T2V, {"aspect_ratio": "21:9"}, "input.aspect_ratio"),
        ("video", T2V, {"resolution": "4k"}, "input.resolution"),
        ("video", T2V, {"num_outputs": 2}, "input.num_outputs"),
        ("video", T2V, {"prompt": "x" * 801}, "input.prompt"),
        ("video", T2V, {"options": {"last_frame_url": LAST}}, "input.options.last_frame_url"),
        ("video", T2V, {"options": {"size": "1280*720"}}, "input.options.size"),
        ("video", "qwen-image", {}, "model"),
        ("image", T2V, {}, "model"),
        ("image", "wan2.2-t2i-flash", {"image_url": IMAGE}, "input.image_url"),
        ("image", "qwen-image", {"num_outputs": 2}, "input.num_outputs"),
        ("image", "qwen-image-edit", {}, "input.image_url"),
        ("image", "wan2.2-t2i-flash", {"resolution": "720p"}, "input.resolution"),
        ("image", "wan2.2-t2i-flash", {"options": {"prompt_extend": "yes"}}, "input.options.prompt_extend"),
    ]
    async with api(stack) as client:
        for kind, model, fields, field in refused:
            body = {"provider": "dashscope", "kind": kind, "model": model, "input": {"prompt": "a cat"} | fields}
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, (model, fields, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], resp.json()
    assert (await sim_stats(stack, "dashscope"))["requests"] == {}


# -- configuration -------------------------------------------------------------------------------

async def test_hosts_workspace_and_model_routes():
    for base in ("https://dashscope.aliyuncs.com", "https://dashscope.aliyuncs.com/api/v1"):
        assert DashScopeProvider(ProviderSettings(name="dashscope", base_url=base)).api == \
            "https://dashscope.aliyuncs.com/api/v1"
    assert DashScopeProvider.default_base_url == "https://dashscope-intl.aliyuncs.com"
    provider = DashScopeProvider(ProviderSettings(
        name="dashscope", base_url="https://dashscope-intl.aliyuncs.com",
        extra={"workspace": "ws-1", "model_routes": {"qwen-image": "multimodal"}}))
    request = GenerationRequest(kind=MediaKind.image, model="qwen-image", reference="job_1",
                                input=MediaInput(prompt="a teapot", negative_prompt="blur", resolution="1328x1328"))
    call = provider.build(request)
    assert call.sync and call.body == {"model": "qwen-image", "input": {"messages": [
        {"role": "user", "content": [{"text": "a teapot"}]}]},
        "parameters": {"size": "1328*1328", "negative_prompt": "blur"}}
    async with httpx.AsyncClient() as http:  # nothing is sent
        headers = provider._headers(CallContext(http=http, api_key="sk-1"), asynchronous=True)
    assert headers["X-DashScope-Async"] == "enable" and headers["X-DashScope-WorkSpace"] == "ws-1"
