"""The MiniMax Hailuo (V1) adapter against the MiniMax simulator, through the real API and worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.jobs import JobStore
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

FIRST = "https://example.com/first.jpg"
LAST = "https://example.com/last.jpg"


async def minimax_job(client: httpx.AsyncClient, model: str = "MiniMax-Hailuo-02",
                      **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "A man picks up a book [Pedestal up]"} | input_fields
    return await submit(client, provider="minimax", kind="video", model=model, input=body)


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
    return stack.simulators["minimax"]


async def callback_token(stack: Stack, job_id: str) -> str:
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None and job.callback_token
    return job.callback_token


# -- success ------------------------------------------------------------------------------------

async def test_text_to_video_is_queried_then_retrieved_and_stored(stack):
    async with api(stack) as client:
        job = await minimax_job(client, duration_seconds=6, resolution="1080p",
                                options={"prompt_optimizer": False})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        stored = (await client.get(output["url"])).content
    task = sim(stack).tasks[done["provider_task_id"]]
    served = task.data["video"]  # the bytes behind every download_url minted for the task
    assert hashlib.sha256(served).hexdigest() == output["sha256"] == hashlib.sha256(stored).hexdigest()
    assert done["provider_status"] == "Success" and done["progress"] == 100 and done["attempts"] == 1
    assert output["metadata"] == {"task_id": task.id, "file_id": task.data["file_id"],
                                  "video_width": 1920, "video_height": 1080}
    sent = dict(task.input)
    assert sent.pop("callback_url").startswith(f"{stack.settings.public_url}/v1/callbacks/minimax?job={job['id']}")
    assert sent == {"model": "MiniMax-Hailuo-02", "prompt": "A man picks up a book [Pedestal up]",
                    "duration": 6, "resolution": "1080P", "prompt_optimizer": False}
    requests = (await sim_stats(stack, "minimax"))["requests"]
    assert requests["create"] == 1 and requests["retrieve"] == 1 and requests["download"] == 1


async def test_first_and_last_frames(stack):
    async with api(stack) as client:
        job = await minimax_job(client, image_url=FIRST, options={"last_frame_image": LAST})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    sent = sim(stack).tasks[done["provider_task_id"]].input
    assert sent["first_frame_image"] == FIRST and sent["last_frame_image"] == LAST


async def test_image_to_video_from_another_jobs_output(stack):
    async with api(stack) as client:
        image = await wait_for(client, (await submit(client, input={"prompt": "a red fox, portrait"}))["id"])
        assert image["status"] == "succeeded", image
        video = await submit(client, provider="minimax", kind="video", model="I2V-01",
                             source={"job_id": image["id"]}, input={"prompt": "the fox turns its head"})
        assert video["source"] == {"job_id": image["id"], "output": 0} and video["operation"] == "generate"
        done = await wait_for(client, video["id"])
        assert done["status"] == "succeeded", done
        first_frame = sim(stack).tasks[done["provider_task_id"]].input["first_frame_image"]
        async with httpx.AsyncClient() as raw:
            fetched = await raw.get(first_frame)  # what MiniMax would fetch: Atelier's stored copy
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).hexdigest() == image["outputs"][0]["sha256"]


# -- failures --------------------------------------------------------------------------------------

async def test_failures_and_content_refusals(stack):
    cases = {
        "a book [sim:fail]": ("provider_failed", "1000", True),
        "a book [sim:output_sensitive]": ("content_policy", "1027", True),  # the task fails
        "a book [sim:sensitive]": ("content_policy", "1026", False),  # refused inside an HTTP 200 create
    }
    async with api(stack) as client:
        jobs = {prompt: await minimax_job(client, prompt=prompt) for prompt in cases}
        done = {prompt: await wait_for(client, job["id"]) for prompt, job in jobs.items()}
    for prompt, (code, text, created) in cases.items():
        job = done[prompt]
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert text in job["error"]["message"] and job["attempts"] == 1
        assert bool(job["provider_task_id"]) is created
    stats = await sim_stats(stack, "minimax")
    assert stats["creations"] == 2 and "retrieve" not in stats["requests"]


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        ({"balance": 0}, "provider_insufficient_balance", "1008"),
        ({"other_region_keys": ["sandbox-key"]}, "provider_auth_failed", "2049"),
    ],
)
async def test_account_errors_inside_http_200(redis_url, extra, code, text):
    async with dev_stack(redis_url=redis_url, log_format="text") as stack, api(stack) as client:
        sim(stack).config.extra.update(extra)
        done = await wait_for(client, (await minimax_job(client))["id"])
        stats = await sim_stats(stack, "minimax")
    assert done["status"] == "failed" and done["error"]["code"] == code and text in done["error"]["message"]
    assert stats["creations"] == 0  # refused at the key check: nothing was created


async def test_rate_limit_then_success_with_one_creation(stack):
    # MiniMax's rate limit is an HTTP 200 with base_resp 1002 (what the simulator answers for a 429),
    # without Retry-After: the job waits with backoff.
    await sim_faults(stack, "minimax", {"kind": "429", "route": "create", "count": 1})
    async with api(stack) as client:
        job = await minimax_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    stats = await sim_stats(stack, "minimax")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 1}
    assert any(e["type"] == "job.queued" and "1002" in (e["note"] or "") for e in events)


async def test_malformed_bodies(stack):
    await sim_faults(stack, "minimax", {"kind": "malformed", "route": "create"})
    async with api(stack) as client:
        refused = await wait_for(client, (await minimax_job(client))["id"])
        assert refused["status"] == "failed" and refused["error"]["code"] == "provider_malformed_response"
        # An unreadable status or file answer is read again.
        await sim_faults(stack, "minimax", {"kind": "malformed", "route": "query"},
                         {"kind": "malformed", "route": "retrieve"})
        done = await wait_for(client, (await minimax_job(client))["id"])
    assert done["status"] == "succeeded", done
    stats = await sim_stats(stack, "minimax")
    assert stats["creations"] == 1 and stats["requests"]["retrieve"] == 2
    assert stats["faults_injected"] == {"create:malformed": 1, "query:malformed": 1, "retrieve:malformed": 1}


async def test_expired_download_url_fails_as_expired(stack):
    sim(stack).config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await minimax_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_bad_input_is_refused_before_any_request(stack):
    refused = [
        ("MiniMax-Hailuo-02", {"duration_seconds": 8}, "input.duration_seconds"),
        ("MiniMax-Hailuo-02", {"duration_seconds": 10, "resolution": "1080p"}, "input.duration_seconds"),
        ("MiniMax-Hailuo-02", {"resolution": "4k"}, "input.resolution"),
        ("MiniMax-Hailuo-02", {"aspect_ratio": "16:9"}, "input.aspect_ratio"),
        ("MiniMax-Hailuo-02", {"seed": 1}, "input.seed"),
        ("MiniMax-Hailuo-02", {"prompt": "x" * 2001}, "input.prompt"),
        ("MiniMax-Hailuo-02", {"options": {"last_frame_image": "ftp://example.com/x.png"}},
         "input.options.last_frame_image"),
        ("MiniMax-Hailuo-02", {"options": {"prompt_optimizer": "no"}}, "input.options.prompt_optimizer"),
        ("MiniMax-Hailuo-02", {"options": {"callback_url": "https://evil.example"}}, "input.options.callback_url"),
        ("I2V-01", {}, "input.image_url"),  # image-to-video only
        ("T2V-01", {"image_url": FIRST}, "input.image_url"),  # text-to-video only
    ]
    async with api(stack) as client:
        for model, fields, field in refused:
            body = {"provider": "minimax", "kind": "video", "model": model,
                    "input": {"prompt": "a man reads"} | fields}
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, (fields, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], resp.json()
    assert (await sim_stats(stack, "minimax"))["requests"] == {}


async def test_unknown_model_is_refused_by_minimax_as_model_not_found(stack):
    async with api(stack) as client:
        done = await wait_for(client, (await minimax_job(client, model="Hailuo-9000"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found"
    assert "2013" in done["error"]["message"]


# -- callbacks, cancel, ambiguous create -------------------------------------------------------

async def test_handshake_answered_and_status_callbacks_finish_the_job(redis_url):
    # Polls are 30+ s apart: only MiniMax's callbacks (after a good handshake) can finish it quickly.
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        done = await wait_for(client, (await minimax_job(client))["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15
    (handshake,) = sim(stack).handshakes
    assert handshake["ok"] is True and handshake["status_code"] == 200 and handshake["seconds"] < 3
    assert handshake["task_id"] == done["provider_task_id"]
    assert sim(stack).callbacks_sent >= 1


async def test_forged_callbacks_are_refused_and_a_callback_is_only_a_hint(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await minimax_job(client, prompt="a slow book [sim:queue=20]")
        job = await wait_for(client, job["id"], {"submitted", "running"})
        url = f"{stack.api_url}/v1/callbacks/minimax"
        challenge = b'{"challenge": "abc123"}'
        forged = json.dumps({"task_id": job["provider_task_id"], "status": "success", "file_id": "1",
                             "base_resp": {"status_code": 0, "status_msg": "success"}}).encode()
        async with httpx.AsyncClient() as raw:
            for body in (challenge, forged):
                assert (await raw.post(url, params={"job": job["id"], "token": "wrong"}, content=body)).status_code \
                    == 401
                assert (await raw.post(url, params={"job": job["id"]}, content=body)).status_code == 401
            good = {"job": job["id"], "token": await callback_token(stack, job["id"])}
            assert (await raw.post(url, params=good, content=b"not json")).status_code == 401
            echoed = await raw.post(url, params=good, content=challenge)
            assert echoed.status_code == 200 and echoed.json() == {"challenge": "abc123"}
            resp = await raw.post(url, params=good, content=forged)  # right token, lying body
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        # The accepted hint made the worker fetch the task now: the fetched status stands.
        after = await wait_until(client, job["id"], lambda j: j["provider_status"] is not None, timeout=5)
    assert after["status"] == "submitted" and after["provider_status"] in ("Preparing", "Queueing")
    assert after["outputs"] == []


async def test_cancel_is_local_only(stack):
    async with api(stack) as client:
        job = await minimax_job(client, prompt="a long book [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
        canceled = await wait_until(client, job["id"], lambda j: "no cancel endpoint" in (j["note"] or ""))
    assert canceled["status"] == "canceled"


async def test_ambiguous_create_fails_without_resubmitting(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "minimax", {"kind": "timeout", "route": "create", "after_effect": True, "delay": 2})
        done = await wait_for(client, (await minimax_job(client))["id"])
        stats = await sim_stats(stack, "minimax")
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    assert done["provider_task_id"] is None
    assert stats["creations"] == 1 and stats["requests"]["create"] == 1
    # MiniMax's handshake for the lost task was still answered: the token in its URL checked out.
    assert [h["ok"] for h in sim(stack).handshakes] == [True]
