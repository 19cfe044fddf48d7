"""The Jimeng adapter against the Jimeng simulator (Volcengine's visual API, V4-signed requests),
through the real API and worker."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store import keypool
from providers import jimeng
from providers.contract import GenerationRequest, MediaKind, ProviderSettings, TaskRef
from providers.sandbox import jimeng as jimeng_sim
from providers.sandbox.jimeng import JimengSimulator
from providers.sandbox.media import png
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

# The key pair the simulator accepts (its ``key_pairs`` knob), given the way ATELIER_JIMENG_ACCESS_KEY /
# ATELIER_JIMENG_SECRET_KEY reach the adapter: ``extra``. A short not_found grace for the test of it.
PAIR = {"access_key": "sandbox-ak", "secret_key": "sandbox-sk"}
VIDEO, IMAGE = "jimeng_t2v_v30", "jimeng_t2i_v40"


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    providers_file = {"jimeng": {"extra": PAIR | {"not_found_grace_seconds": 1}}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as s:
        yield s


async def jimeng_job(client: httpx.AsyncClient, model: str = VIDEO, kind: str = "video",
                     **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "千军万马在草原上奔腾，航拍镜头"} | input_fields
    return await submit(client, provider="jimeng", kind=kind, model=model, input=body)


def sim_of(stack: Stack) -> JimengSimulator:
    sim = stack.simulators["jimeng"]
    assert isinstance(sim, JimengSimulator)
    return sim


# -- success ---------------------------------------------------------------------------------

async def test_signed_video_success_stores_the_simulators_bytes(stack: Stack) -> None:
    async with api(stack) as client:
        job = await jimeng_job(client, duration_seconds=10, aspect_ratio="9:16", seed=7)
        i2v = await jimeng_job(client, model="jimeng_i2v_first_tail_v30", prompt=None,
                               image_url="https://example.com/first.png",
                               options={"image_urls": ["https://example.com/last.png"]})
        done, i2v = await wait_for(client, job["id"]), await wait_for(client, i2v["id"])
    assert done["status"] == "succeeded" and i2v["status"] == "succeeded", (done, i2v)
    assert done["provider_status"] == "done" and done["progress"] == 100
    (output,) = done["outputs"]
    assert output["content_type"] == "video/mp4"
    task = sim_of(stack).tasks[done["provider_task_id"]]
    assert task.input["req_key"] == VIDEO and len(done["provider_task_id"]) == 19
    async with httpx.AsyncClient() as raw:
        served = await raw.get(task.data["video_url"])  # a signed TOS URL, valid 1 h
    assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == output["sha256"]
    # Two input images (first and last frame), or the simulator would have refused the req_key.
    assert sim_of(stack).tasks[i2v["provider_task_id"]].input["req_key"] == "jimeng_i2v_first_tail_v30"
    stats = await sim_stats(stack, "jimeng")
    assert stats["creations"] == 2 and stats["requests"]["result"] >= 2


async def test_image_outputs_as_urls(stack: Stack) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client, model=IMAGE, kind="image",
                                                        prompt="a red fox [sim:images=2]"))["id"])
    assert done["status"] == "succeeded", done
    assert [o["sha256"] for o in done["outputs"]] == \
        [hashlib.sha256(png(f"jimeng:{done['provider_task_id']}:{i}")).hexdigest() for i in range(2)]


async def test_image_outputs_as_base64_with_an_ak_sk_pool_key(redis_url: str) -> None:
    providers_file = {"jimeng": {"api_keys": ["sandbox-ak:sandbox-sk"], "extra": {"image_return_url": False}}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as stack, \
            api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client, model=IMAGE, kind="image", num_outputs=1,
                                                        image_url="https://example.com/ref.png"))["id"])
    assert done["status"] == "succeeded", done
    (output,) = done["outputs"]  # num_outputs 1 -> force_single
    assert output["content_type"] == "image/png"
    assert output["sha256"] == hashlib.sha256(png(f"jimeng:{done['provider_task_id']}:0")).hexdigest()


# -- signing --------------------------------------------------------------------------------

def test_signer_agrees_with_the_simulators_verifier() -> None:
    """Our signer and the simulator's verifier were written separately from the reference."""
    when = datetime(2025, 7, 20, 10, 39, 39, tzinfo=UTC)
    url = "https://visual.volcengineapi.com/?Version=2022-08-31&Action=CVSync2AsyncSubmitTask"
    body = '{"req_key":"jimeng_t2v_v30","prompt":"千军万马"}'.encode()
    headers = jimeng.signed_headers(url, body, "AKLTtest", "c2VjcmV0", now=when)
    assert headers["X-Date"] == "20250720T103939Z" and headers["Host"] == "visual.volcengineapi.com"
    assert headers["X-Content-Sha256"] == hashlib.sha256(body).hexdigest()
    signed = ["content-type", "host", "x-content-sha256", "x-date"]
    canonical = jimeng_sim.canonical_request("POST", "/", jimeng_sim.canonical_query(url.split("?")[1]),
                                             {k.lower(): v for k, v in headers.items()}, signed,
                                             headers["X-Content-Sha256"])
    expected = jimeng_sim.signature("c2VjcmV0", "20250720", "cn-north-1", "cv", jimeng_sim.string_to_sign(
        headers["X-Date"], "20250720/cn-north-1/cv/request", canonical))
    assert headers["Authorization"] == (
        "HMAC-SHA256 Credential=AKLTtest/20250720/cn-north-1/cv/request, "
        f"SignedHeaders=content-type;host;x-content-sha256;x-date, Signature={expected}")


async def test_wrong_secret_fails_the_job_and_takes_the_key_out_of_the_pool(redis_url: str) -> None:
    bad = "sandbox-ak:not-the-secret"
    async with dev_stack(redis_url=redis_url, log_format="text",
                         providers_file={"jimeng": {"api_keys": [bad]}}) as stack, api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client))["id"])
        redis = Redis.from_url(stack.settings.redis_url)
        try:
            out = await keypool.all_out(redis)
        finally:
            await redis.aclose()
        stats = await sim_stats(stack, "jimeng")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed", done
    assert "SignatureDoesNotMatch" in done["error"]["message"] and "not-the-secret" not in str(done)
    assert ("jimeng", keypool.key_id(bad)) in out
    assert stats["creations"] == 0


# -- failures ---------------------------------------------------------------------------------

async def test_failures_and_content_refusals(stack: Stack) -> None:
    cases = [("[sim:fail]", "provider_failed", "50500"),  # an internal error at every read: fails after 3
             ("[sim:filtered]", "content_policy", "50511"),  # output moderation on GetResult (HTTP 400)
             ("[sim:blocked]", "content_policy", "50412"),  # input moderation at submit
             ("[sim:expired]", "output_expired", "expired")]
    async with api(stack) as client:
        jobs = [await jimeng_job(client, prompt=f"草原 {directive}") for directive, _, _ in cases]
        done = [await wait_for(client, job["id"]) for job in jobs]
    for job, (_, code, message) in zip(done, cases, strict=True):
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert message in job["error"]["message"]
    assert done[2]["provider_task_id"] is None
    assert (await sim_stats(stack, "jimeng"))["creations"] == 3


async def test_forgotten_task_fails_after_the_grace(stack: Stack) -> None:
    sim_of(stack).config.extra["task_ttl_seconds"] = 1.5  # 12 h at Volcengine
    async with api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client, prompt="草原 [sim:queue=20]"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_task_not_found", done


async def test_rate_limits_on_both_actions_then_success_with_one_creation(stack: Stack) -> None:
    await sim_faults(stack, "jimeng", {"kind": "429", "route": "submit", "count": 2, "retry_after": 1},
                     {"kind": "429", "route": "result", "count": 1, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    stats = await sim_stats(stack, "jimeng")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:429": 2, "result:429": 1}


async def test_malformed_bodies(stack: Stack) -> None:
    await sim_faults(stack, "jimeng", {"kind": "malformed", "route": "result", "count": 2})
    async with api(stack) as client:
        polled = await wait_for(client, (await jimeng_job(client))["id"])
        await sim_faults(stack, "jimeng", {"kind": "malformed", "route": "submit", "count": 1})
        created = await wait_for(client, (await jimeng_job(client, prompt="另一个"))["id"])
    assert polled["status"] == "succeeded", polled
    assert created["status"] == "failed" and created["error"]["code"] == "provider_malformed_response"


async def test_expired_video_url_fails_the_collection(stack: Stack) -> None:
    sim_of(stack).config.output_ttl_seconds = 0.0  # 1 h at Volcengine
    async with api(stack) as client:
        done = await wait_for(client, (await jimeng_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_ambiguous_submit_fails_without_resubmitting(redis_url: str) -> None:
    providers_file = {"jimeng": {"extra": PAIR, "request_timeout_seconds": 0.5}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as stack, \
            api(stack) as client:
        await sim_faults(stack, "jimeng", {"kind": "timeout", "route": "submit", "after_effect": True, "delay": 1.5})
        done = await wait_for(client, (await jimeng_job(client))["id"])
        stats = await sim_stats(stack, "jimeng")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert stats["creations"] == 1 and stats["requests"]["submit"] == 1


def test_not_found_soon_after_submit_is_read_again() -> None:
    provider = jimeng.JimengProvider(ProviderSettings(name="jimeng", base_url="https://visual.invalid"))
    answer = {"code": 10000, "data": {"status": "not_found", "video_url": ""}, "message": "Success"}
    request = GenerationRequest(kind=MediaKind.video, model=VIDEO)
    fresh = TaskRef(task_id="7" * 19, request=request, state={"submitted_at": time.time()})
    old = TaskRef(task_id="7" * 19, request=request, state={"submitted_at": time.time() - 120})
    assert provider.parse_result(fresh, answer).state == "unknown"
    assert provider.parse_result(old, answer).error_code == "provider_task_not_found"


# -- validation -------------------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("video", "jimeng_v99", {}, "model"),
    ("image", VIDEO, {}, "model"),  # a video req_key
    ("video", VIDEO, {"duration_seconds": 7}, "input.duration_seconds"),
    ("video", VIDEO, {"aspect_ratio": "2:1"}, "input.aspect_ratio"),
    ("video", VIDEO, {"resolution": "1080p"}, "input.resolution"),
    ("video", VIDEO, {"negative_prompt": "blur"}, "input.negative_prompt"),
    ("video", VIDEO, {"prompt": "x" * 801}, "input.prompt"),
    ("video", VIDEO, {"image_url": "https://example.com/a.png"}, "model"),  # text-only req_key
    ("video", "jimeng_i2v_first_v30", {"prompt": None}, "input.image_url"),
    ("video", "jimeng_ti2v_v30_pro", {"image_url": "https://example.com/a.png", "aspect_ratio": "16:9"},
     "input.aspect_ratio"),
    ("video", "jimeng_i2v_first_tail_v30",
     {"image_url": "https://example.com/a.png", "options": {"image_urls": ["data:image/png;base64,iVBO"]}},
     "input.options.image_urls"),
    ("video", VIDEO, {"options": {"req_key": "jimeng_t2v_v30_1080p"}}, "input.options.req_key"),
    ("video", VIDEO, {"options": {"frames": 241}}, "input.options.frames"),
    ("image", IMAGE, {"resolution": "big"}, "input.resolution"),
    ("image", IMAGE, {"num_outputs": 3}, "input.num_outputs"),
]


async def test_bad_input_is_refused_before_any_request(stack: Stack) -> None:
    async with api(stack) as client:
        for kind, model, fields, field in BAD_INPUTS:
            resp = await client.post("/v1/jobs", json={"provider": "jimeng", "kind": kind, "model": model,
                                                       "input": {"prompt": "草原"} | fields})
            assert resp.status_code == 422, resp.text
            assert field in [e["field"] for e in resp.json()["errors"]], (field, resp.json())
    assert (await sim_stats(stack, "jimeng"))["requests"] == {}
