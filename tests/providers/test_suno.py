"""The Suno adapter, both flavours, against the Suno simulators: through the real API and worker,
and ``fetch_many`` directly over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store import keypool
from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    ProviderSettings,
    TaskRef,
    TaskStatus,
)
from providers.errors import TaskNotFound
from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.suno import SunoApiSimulator, SunoGatewaySimulator
from providers.suno import SunoProvider
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

SANDBOX_AUTH = {"Authorization": "Bearer sandbox-key"}
PROMPT = "an upbeat song about orchestration"
LYRICS = "[Verse]\nQueues and workers in the night\n[Chorus]\nEvery job comes out right"


async def suno_job(client: httpx.AsyncClient, model: str = "chirp-v4", **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": PROMPT} | input_fields
    return await submit(client, provider="suno", kind="audio", model=model, input=body)


def sim_task(stack: Stack, sim: str, task_id: str) -> Any:
    return stack.simulators[sim].tasks[task_id]  # type: ignore[attr-defined]


async def gateway_dto(stack: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{stack.simulator_url('suno')}/suno/fetch/{task_id}", headers=SANDBOX_AUTH)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def sunoapi_record(stack: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{stack.simulator_url('suno-api')}/api/v1/generate/record-info",
                             params={"taskId": task_id}, headers=SANDBOX_AUTH)
    data: dict[str, Any] = resp.json()["data"]
    return data


async def check_outputs(client: httpx.AsyncClient, outputs: list[dict[str, Any]],
                        clips: list[tuple[str, str, str, str, float]]) -> None:
    """Each clip (id, title, audio url, cover url, duration) -> its audio then its cover, bytes as served."""
    assert [o["metadata"]["role"] for o in outputs] == ["audio", "cover"] * len(clips)
    async with httpx.AsyncClient() as raw:
        for i, (clip_id, title, audio_url, cover_url, duration) in enumerate(clips):
            audio, cover = outputs[2 * i], outputs[2 * i + 1]
            assert audio["content_type"] == "audio/mpeg" and cover["content_type"] == "image/png"
            assert audio["metadata"]["clip_id"] == cover["metadata"]["clip_id"] == clip_id
            assert audio["metadata"]["title"] == cover["metadata"]["title"] == title
            assert audio["metadata"]["duration"] == duration
            for output, url in ((audio, audio_url), (cover, cover_url)):
                served = (await raw.get(url)).content
                stored = (await client.get(output["url"])).content
                assert hashlib.sha256(served).hexdigest() == output["sha256"] == hashlib.sha256(stored).hexdigest()
                assert output["bytes"] == len(served)
    assert len({o["sha256"] for o in outputs}) == len(outputs)  # distinct files, not one copied


# ---------------------------------------------------------------------------
# gateway flavour (new-api task format), the default
# ---------------------------------------------------------------------------


async def test_gateway_clips_become_outputs_with_title_and_duration(stack):
    async with api(stack) as client:
        job = await suno_job(client)
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["provider_task_id"].startswith("task_") and done["progress"] == 100
        assert done["attempts"] == 1 and done["provider_status"] == "SUCCESS"
        dto = await gateway_dto(stack, done["provider_task_id"])
        clips = [(c["id"], c["title"], c["audio_url"], c["image_large_url"], c["metadata"]["duration"])
                 for c in dto["data"]]
        assert len(clips) == 2
        await check_outputs(client, done["outputs"], clips)
    assert done["outputs"][0]["metadata"]["model"] == "chirp-v4"
    # Description mode: the prompt is the gpt_description_prompt, the model Suno's mv.
    assert sim_task(stack, "suno", done["provider_task_id"]).input == {
        "gpt_description_prompt": PROMPT, "mv": "chirp-v4", "make_instrumental": False}


async def test_gateway_custom_mode_and_either_flavours_option_names(stack):
    async with api(stack) as client:
        custom = await suno_job(client, model="V4_5", prompt=LYRICS,
                                options={"tags": "synthpop", "title": "City Lights"})
        portable = await suno_job(client, model="chirp-crow", prompt=None,
                                  options={"customMode": True, "style": "ambient", "instrumental": True})
        custom = await wait_for(client, custom["id"])
        portable = await wait_for(client, portable["id"])
    assert custom["status"] == portable["status"] == "succeeded"
    assert sim_task(stack, "suno", custom["provider_task_id"]).input == {
        "prompt": LYRICS, "tags": "synthpop", "title": "City Lights", "mv": "chirp-auk", "make_instrumental": False}
    assert sim_task(stack, "suno", portable["provider_task_id"]).input == {
        "tags": "ambient", "mv": "chirp-crow", "make_instrumental": True}
    audio = custom["outputs"][0]["metadata"]
    assert audio["title"] == "City Lights" and audio["tags"] == "synthpop" and audio["lyrics"] == LYRICS


@pytest.mark.parametrize(
    ("trap", "reason"),
    [
        ("[sim:fail]", "Unable to generate audio"),
        ("[sim:filtered]", "flagged for moderation"),
        ("[sim:partial]", "Unable to generate audio"),  # one clip complete, the task FAILURE: no outputs
    ],
)
async def test_gateway_failed_task_carries_fail_reason(stack, trap, reason):
    async with api(stack) as client:
        done = await wait_for(client, (await suno_job(client, prompt=f"a song {trap}"))["id"])
    assert done["status"] == "failed" and done["outputs"] == []
    assert done["error"]["code"] == "provider_failed" and reason in done["error"]["message"]
    assert reason in done["error"]["provider_detail"]["fail_reason"]
    assert done["error"]["provider_detail"]["status"] == "FAILURE"


async def test_gateway_timeout_sweep_fails_on_the_top_level_status_despite_stale_data(stack):
    stack.simulators["suno"].config.extra["gateway_task_timeout_seconds"] = 2.0
    async with api(stack) as client:
        jobs = [await suno_job(client, prompt=f"a song {trap}") for trap in ("[sim:stuck]", "[sim:lost]",
                                                                             "[sim:unknown]")]
        # Before the sweep none of them fails: streaming, NOT_START and UNKNOWN all keep waiting.
        await asyncio.sleep(1.2)
        for job in jobs:
            current = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert current["status"] in ("submitted", "running"), current
        done = [await wait_for(client, job["id"], timeout=15) for job in jobs]
    for job in done:
        assert job["status"] == "failed" and job["error"]["code"] == "provider_gateway_timeout", job
        assert "任务超时" in job["error"]["message"]
    # The gateway still shows the upstream's old "streaming" clips (new-api #5715): we read `status`.
    dto = await gateway_dto(stack, done[0]["provider_task_id"])
    assert dto["status"] == "FAILURE" and dto["data"][0]["status"] == "streaming"


async def test_gateway_not_start_before_the_first_tick_stays_queued(stack):
    sim = stack.simulators["suno"]
    sim.config.extra["gateway_tick_seconds"] = 3600.0  # the gateway has not polled its upstream yet
    async with api(stack) as client:
        job = await suno_job(client)
        job = await wait_for(client, job["id"], {"submitted"})
        await asyncio.sleep(2.0)
        requests = (await sim_stats(stack, "suno"))["requests"]
        assert requests.get("batch_fetch", 0) >= 2  # polls go through POST /suno/fetch
        job = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert job["status"] == "submitted" and job["provider_status"] == "NOT_START" and job["error"] is None
        sim.config.extra["gateway_tick_seconds"] = 0.25  # the gateway's loop catches up
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and len(done["outputs"]) == 4


async def test_gateway_429_burst_on_submit_ends_in_success_with_one_creation(stack):
    await sim_faults(stack, "suno", {"kind": "429", "route": "submit", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await suno_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "suno")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:429": 2}


async def test_gateway_429_and_5xx_while_polling_are_retried(stack):
    # Polls of the gateway flavour are grouped into POST /suno/fetch.
    await sim_faults(stack, "suno", {"kind": "429", "route": "batch_fetch", "count": 2, "retry_after": 1},
                     {"kind": "503", "route": "batch_fetch", "count": 1},
                     {"kind": "500", "route": "batch_fetch", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await suno_job(client))["id"])
    assert done["status"] == "succeeded"
    stats = await sim_stats(stack, "suno")
    assert stats["creations"] == 1
    assert stats["faults_injected"] == {"batch_fetch:429": 2, "batch_fetch:503": 1, "batch_fetch:500": 1}


async def test_gateway_saturated_waits_and_upstream_refusal_is_retried_then_given_up(redis_url):
    # Both are the gateway's own answers: it kept (and billed) no task, so retrying is safe.
    # Saturation (429) is waiting, bounded only by the job's deadline; a refusal gives up after N attempts.
    async with dev_stack(redis_url=redis_url, submit_max_attempts=2, job_timeout_seconds=5,
                         log_format="text") as stack, api(stack) as client:
        saturated = await suno_job(client, prompt="a song [sim:saturated]")
        refused = await suno_job(client, prompt="a song [sim:rejected]")
        refused = await wait_for(client, refused["id"])
        waiting = (await client.get(f"/v1/jobs/{saturated['id']}")).json()
        assert refused["error"]["code"] == "provider_unavailable" and refused["attempts"] == 2
        assert "gave up after 2 attempts" in refused["error"]["message"]
        assert waiting["phase"] == "throttled" and "当前分组上游负载已饱和" in waiting["note"]
        saturated = await wait_for(client, saturated["id"], timeout=40)
        assert saturated["status"] == "timed_out" and saturated["attempts"] >= 2
        stats = await sim_stats(stack, "suno")
    assert stats["creations"] == 0


async def test_gateway_refused_key_fails_the_job(stack):
    stack.simulators["suno"].config.api_keys = ["sk-someone-else"]
    async with api(stack) as client:
        done = await wait_for(client, (await suno_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed"
    assert done["attempts"] == 1 and "sandbox-key" not in json.dumps(done)


async def test_gateway_ambiguous_submit_fails_without_resubmitting(redis_url):
    async with dev_stack(redis_url=redis_url, http_timeout_seconds=1.0, log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "suno", {"kind": "timeout", "route": "submit", "after_effect": True, "delay": 2})
        done = await wait_for(client, (await suno_job(client))["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
        stats = await sim_stats(stack, "suno")
    assert stats["creations"] == 1 and stats["requests"]["submit"] == 1


GATEWAY_BAD_INPUT: list[tuple[str, dict[str, Any], str]] = [
    ("chirp-v4", {"duration_seconds": 30}, "input.duration_seconds"),
    ("chirp-v4", {"num_outputs": 2}, "input.num_outputs"),
    ("chirp-v4", {"image_url": "https://example.com/a.png"}, "input.image_url"),
    ("chirp-v4", {"seed": 1}, "input.seed"),
    ("chirp-v4", {"negative_prompt": "no drums"}, "input.negative_prompt"),
    ("chirp-v4", {"options": {"vocalGender": "f"}}, "input.options.vocalGender"),
    ("chirp-v4", {"options": {"mv": "chirp-v3-5"}}, "input.options.mv"),
    ("chirp-v4", {"options": {"tags": "rock", "style": "pop"}}, "input.options.style"),
    ("chirp-v4", {"options": {"make_instrumental": "yes"}}, "input.options.make_instrumental"),
    ("chirp-v4", {"options": {"continue_at": 10}}, "input.options.continue_clip_id"),
    ("chirp-v4", {"options": {"custom_mode": False, "title": "T"}}, "input.options.title"),
    ("chirp-v4", {"options": {"bogus": 1}}, "input.options.bogus"),
    ("chirp-v4", {"prompt": None}, "input.prompt"),
    ("chirp-v4", {"prompt": None, "options": {"tags": "rock"}}, "input.prompt"),  # custom: lyrics needed
    ("V5_5", {}, "model"),
    ("suno-best", {}, "model"),
]


async def test_gateway_bad_input_is_rejected_before_any_provider_request(stack):
    async with api(stack) as client:
        for model, fields, field in GATEWAY_BAD_INPUT:
            body: dict[str, Any] = {"prompt": PROMPT} | fields
            body = {k: v for k, v in body.items() if v is not None}
            resp = await client.post("/v1/jobs", json={"provider": "suno", "kind": "audio", "model": model,
                                                       "input": body})
            assert resp.status_code == 422, (fields, resp.text)
            assert resp.headers["content-type"] == "application/problem+json"
            assert field in [e["field"] for e in resp.json()["errors"]], (fields, resp.text)
        resp = await client.post("/v1/jobs", json={"provider": "suno", "kind": "video", "model": "chirp-v4",
                                                   "input": {"prompt": PROMPT}})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "kind"
    assert (await sim_stats(stack, "suno"))["requests"] == {}


async def test_gateway_cancel_is_local_and_the_note_says_the_provider_was_not_told(stack):
    async with api(stack) as client:
        job = await suno_job(client, prompt="a long song [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled"
        for _ in range(50):
            job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if job["note"] and "no cancel endpoint" in job["note"]:
                break
            await asyncio.sleep(0.1)
    assert job["status"] == "canceled" and "suno has no cancel endpoint" in job["note"]


async def test_gateway_has_no_callbacks(stack):
    async with httpx.AsyncClient() as raw:
        resp = await raw.post(f"{stack.api_url}/v1/callbacks/suno?job=job_x&token=t", content=b"{}")
    assert resp.status_code == 404


# ---------------------------------------------------------------------------
# sunoapi flavour (sunoapi.org)
# ---------------------------------------------------------------------------


async def test_sunoapi_callbacks_finish_the_job_without_waiting_for_a_poll(redis_url):
    # Polls are minutes apart here (30 s minimum, slowed further while callbacks are expected).
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        started = time.monotonic()
        job = await suno_job(client)
        done = await wait_for(client, job["id"], timeout=15)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15 and done["attempts"] == 1
        # Each callback pulled one status fetch forward; no timed poll was needed.
        assert (await sim_stats(stack, "suno-api"))["requests"]["record_info"] <= 3
        record = await sunoapi_record(stack, done["provider_task_id"])
        clips = [(c["id"], c["title"], c["audioUrl"], c["imageUrl"], c["duration"])
                 for c in record["response"]["sunoData"]]
        assert len(clips) == 2
        await check_outputs(client, done["outputs"], clips)
        sim = stack.simulators["suno-api"]
        task = sim_task(stack, "suno-api", done["provider_task_id"])
        callback_url = task.input.pop("callBackUrl")
        assert callback_url.startswith(f"{stack.settings.public_url}/v1/callbacks/suno?job={job['id']}&token=")
        assert task.input == {"customMode": False, "instrumental": False, "model": "V4", "prompt": PROMPT}
        assert [c["callbackType"] for c in sim.callback_log] == ["text", "first", "complete"]  # type: ignore[attr-defined]
        assert all(c["status"] == 200 for c in sim.callback_log)  # type: ignore[attr-defined]


async def test_sunoapi_custom_mode_mapping(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", log_format="text") as stack, \
            api(stack) as client:
        custom = await suno_job(client, model="V4_5", prompt=LYRICS, negative_prompt="heavy drums",
                                options={"style": "synthpop", "title": "City Lights", "vocalGender": "f",
                                         "styleWeight": 0.65})
        portable = await suno_job(client, model="chirp-bluejay", prompt=None,
                                  options={"custom_mode": True, "tags": "ambient", "title": "Drift",
                                           "make_instrumental": True})
        custom = await wait_for(client, custom["id"])
        portable = await wait_for(client, portable["id"])
        assert custom["status"] == portable["status"] == "succeeded"
        inputs = [dict(sim_task(stack, "suno-api", j["provider_task_id"]).input) for j in (custom, portable)]
    for task_input in inputs:
        assert task_input.pop("callBackUrl").startswith(stack.settings.public_url)
    assert inputs[0] == {"customMode": True, "instrumental": False, "model": "V4_5", "prompt": LYRICS,
                         "style": "synthpop", "title": "City Lights", "negativeTags": "heavy drums",
                         "vocalGender": "f", "styleWeight": 0.65}
    assert inputs[1] == {"customMode": True, "instrumental": True, "model": "V4_5PLUS", "style": "ambient",
                         "title": "Drift"}
    audio = custom["outputs"][0]["metadata"]
    assert audio["title"] == "City Lights" and audio["tags"] == "synthpop" and audio["lyrics"] == LYRICS


async def test_sunoapi_failed_tasks_and_callback_exception(redis_url):
    traps = {
        "[sim:fail]": ("provider_failed", "GENERATE_AUDIO_FAILED"),
        "[sim:sensitive]": ("provider_content_filtered", "SENSITIVE_WORD_ERROR"),
        "[sim:create_failed]": ("provider_failed", "CREATE_TASK_FAILED"),
    }
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", log_format="text") as stack, \
            api(stack) as client:
        jobs = {trap: await suno_job(client, prompt=f"a song {trap}") for trap in traps}
        exception = await suno_job(client, prompt="a song [sim:callback_exception]")
        for trap, (code, status) in traps.items():
            done = await wait_for(client, jobs[trap]["id"])
            assert done["status"] == "failed" and done["error"]["code"] == code, done
            assert done["error"]["provider_detail"]["status"] == status and status in done["error"]["message"]
            assert done["error"]["provider_detail"]["errorMessage"]
        # CALLBACK_EXCEPTION: only their callback failed; every clip is there, so it succeeded.
        done = await wait_for(client, exception["id"])
    assert done["status"] == "succeeded" and done["provider_status"] == "CALLBACK_EXCEPTION"
    assert len(done["outputs"]) == 4


async def restore_keys(stack: Stack) -> None:
    """Put every key taken out of the pool back, and wait until every process's cache has seen it."""
    redis = Redis.from_url(stack.settings.redis_url)
    try:
        for provider, kid in await keypool.all_out(redis):
            await keypool.restore(redis, provider, kid)
    finally:
        await redis.aclose()
    await asyncio.sleep(keypool.CACHE_SECONDS + 0.1)


async def test_sunoapi_body_codes(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", submit_max_attempts=2,
                         job_timeout_seconds=5, log_format="text") as stack, api(stack) as client:
        credits = await suno_job(client, prompt="a song [sim:credits]")  # 429 = insufficient credits
        credits = await wait_for(client, credits["id"])
        assert credits["error"]["code"] == "provider_insufficient_balance" and credits["attempts"] == 1
        await restore_keys(stack)  # no credit took the only key out of the pool: top-up done
        frequency = await suno_job(client, prompt="a song [sim:frequency]")  # 430 = call frequency
        ratelimit = await suno_job(client, prompt="a song [sim:ratelimit]")  # 405 = rate limit
        maintenance = await suno_job(client, prompt="a song [sim:maintenance]")  # 455
        for job in (frequency, ratelimit):  # rate limits wait (throttled) until the job's deadline
            job = await wait_for(client, job["id"], timeout=40)
            assert job["status"] == "timed_out" and job["attempts"] >= 2, job
        maintenance = await wait_for(client, maintenance["id"])
        assert maintenance["error"]["code"] == "provider_unavailable" and maintenance["attempts"] == 2
        # The body's code decides even when the HTTP status mirrors it: HTTP 429 is still "no credits".
        stack.simulators["suno-api"].config.extra["http_status_mirrors_code"] = True
        await restore_keys(stack)
        mirrored = await wait_for(client, (await suno_job(client, prompt="a song [sim:credits]"))["id"])
        assert mirrored["error"]["code"] == "provider_insufficient_balance" and mirrored["attempts"] == 1
        stats = await sim_stats(stack, "suno-api")
    assert stats["creations"] == 0


async def test_sunoapi_429_burst_ends_in_success_with_one_creation(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", log_format="text") as stack, \
            api(stack) as client:
        await sim_faults(stack, "suno-api", {"kind": "429", "route": "generate", "count": 2, "retry_after": 1})
        done = await wait_for(client, (await suno_job(client))["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 3
        stats = await sim_stats(stack, "suno-api")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"generate:429": 2}


async def test_sunoapi_forged_callbacks_are_rejected_and_change_nothing(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", poll_min_seconds=30, poll_max_seconds=60,
                         log_format="text") as stack, api(stack) as client:
        job = await suno_job(client, prompt="a long song [sim:run=30]")
        job = await wait_for(client, job["id"], {"running"})  # after the genuine "text" callback
        await asyncio.sleep(0.5)
        job = (await client.get(f"/v1/jobs/{job['id']}")).json()
        task_id = job["provider_task_id"]
        token = sim_task(stack, "suno-api", task_id).input["callBackUrl"].rsplit("token=", 1)[1]
        fetches = (await sim_stats(stack, "suno-api"))["requests"]["record_info"]
        body = json.dumps({"code": 200, "msg": "All generated successfully.", "data": {
            "callbackType": "complete", "task_id": task_id,
            "data": [{"id": "x", "audio_url": "https://evil.example/x.mp3", "title": "Forged"}]}}).encode()
        url = f"{stack.api_url}/v1/callbacks/suno"
        async with httpx.AsyncClient() as raw:
            for query in (f"?job={job['id']}&token=wrong", f"?job={job['id']}", ""):
                resp = await raw.post(url + query, content=body)
                assert resp.status_code == 401, (query, resp.text)
                assert resp.headers["content-type"] == "application/problem+json"
            not_json = await raw.post(f"{url}?job={job['id']}&token={token}", content=b"<html>")
            assert not_json.status_code == 401
            await asyncio.sleep(0.5)
            after = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert after["sequence"] == job["sequence"] and after["outputs"] == []
            assert (await sim_stats(stack, "suno-api"))["requests"]["record_info"] == fetches
            # With the right token it is a hint only: the fetched state (still generating) stands.
            resp = await raw.post(f"{url}?job={job['id']}&token={token}", content=body)
            assert resp.status_code == 200 and resp.json()["status"] == "accepted"
        await asyncio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "running" and after["outputs"] == []
    assert after["provider_status"] == "TEXT_SUCCESS"


SUNOAPI_BAD_INPUT: list[tuple[str, dict[str, Any], str]] = [
    ("chirp-v3-0", {}, "model"),
    ("V3", {}, "model"),
    ("V4", {"prompt": "x" * 501}, "input.prompt"),
    ("V4", {"negative_prompt": "drums"}, "input.negative_prompt"),  # non-custom mode takes only the prompt
    ("V4", {"options": {"customMode": False, "vocalGender": "m"}}, "input.options.vocalGender"),
    ("V4", {"options": {"customMode": True, "title": "T"}}, "input.options.style"),
    ("V4", {"options": {"style": "rock"}}, "input.options.title"),
    ("V4", {"prompt": None, "options": {"style": "rock", "title": "T"}}, "input.prompt"),
    ("V4", {"options": {"style": "r" * 201, "title": "T"}}, "input.options.style"),
    ("V4", {"options": {"style": "rock", "title": "t" * 81}}, "input.options.title"),
    ("V4_5ALL", {"options": {"style": "rock", "title": "t" * 81}}, "input.options.title"),
    ("V5", {"options": {"style": "rock", "title": "t" * 101}}, "input.options.title"),
    ("V5", {"prompt": "l" * 5001, "options": {"style": "rock", "title": "T"}}, "input.prompt"),
    ("V4", {"options": {"style": "rock", "title": "T", "styleWeight": 1.5}}, "input.options.styleWeight"),
    ("V4", {"options": {"style": "rock", "title": "T", "personaModel": "voice_persona"}},
     "input.options.personaModel"),
    ("V4", {"options": {"continue_at": 5, "continue_clip_id": "c"}}, "input.options.continue_at"),
    ("V4", {"options": {"callBackUrl": "https://evil.example/"}}, "input.options.callBackUrl"),
    ("V4", {"aspect_ratio": "1:1"}, "input.aspect_ratio"),
]


async def test_sunoapi_bad_input_is_rejected_before_any_provider_request(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", log_format="text") as stack, \
            api(stack) as client:
        for model, fields, field in SUNOAPI_BAD_INPUT:
            body: dict[str, Any] = {"prompt": PROMPT} | fields
            body = {k: v for k, v in body.items() if v is not None}
            resp = await client.post("/v1/jobs", json={"provider": "suno", "kind": "audio", "model": model,
                                                       "input": body})
            assert resp.status_code == 422, (model, fields, resp.text)
            assert field in [e["field"] for e in resp.json()["errors"]], (model, fields, resp.text)
        # The limits that depend on the model: 100-character titles are fine on V4_5.
        ok = await suno_job(client, model="V4_5", options={"style": "rock", "title": "t" * 100})
        assert (await wait_for(client, ok["id"]))["status"] == "succeeded"
        stats = await sim_stats(stack, "suno-api")
    assert stats["requests"]["generate"] == 1 and stats["creations"] == 1


# ---------------------------------------------------------------------------
# fetch_many, directly against the simulators over real HTTP
# ---------------------------------------------------------------------------


class SmallBatches(SunoProvider):
    batch_fetch_size = 2


def adapter_for(url: str, flavor: str, cls: type[SunoProvider] = SunoProvider) -> SunoProvider:
    return cls(ProviderSettings(name="suno", base_url=url, api_keys=["sk-a"], extra={"flavor": flavor}))


async def submitted(adapter: SunoProvider, ctx: CallContext, prompt: str, n: int) -> list[TaskRef]:
    tasks = []
    for i in range(n):
        request = GenerationRequest(kind=MediaKind.audio, model="chirp-v4", input=MediaInput(prompt=f"{prompt} {i}"),
                                    reference=f"job_{i}")
        result = await adapter.submit(ctx, request)
        state = result.state.model_dump(exclude_none=True) if result.state else {}
        tasks.append(TaskRef(task_id=result.task_id, request=request, state=state))
    return tasks


async def until_all(fetch: Any, jobs: list[TaskRef], state: str, timeout: float = 10.0) -> dict[str, TaskStatus]:
    deadline = time.monotonic() + timeout
    while True:
        statuses: dict[str, TaskStatus] = await fetch(jobs)
        if all(s.state == state for s in statuses.values()) and len(statuses) == len(jobs):
            return statuses
        assert time.monotonic() < deadline, {k: v.raw_status for k, v in statuses.items()}
        await asyncio.sleep(0.1)


@pytest.fixture
async def gateway_sim() -> AsyncIterator[tuple[SunoGatewaySimulator, str]]:
    sim = SunoGatewaySimulator(SimConfig(queue_seconds=0.2, run_seconds=0.3,
                                         extra={"gateway_tick_seconds": 3600.0}))
    async with serving(sim.app) as url:
        yield sim, url


async def test_fetch_many_batches_gateway_polls(gateway_sim):
    sim, url = gateway_sim
    adapter = adapter_for(url, "gateway", SmallBatches)
    async with httpx.AsyncClient(timeout=10) as http:
        ctx = CallContext(http=http, api_key="sk-a")
        jobs = await submitted(adapter, ctx, "a song", 5)
        other_key = await submitted(adapter, CallContext(http=http, api_key="sk-b"), "not ours", 1)
        unknown = dataclasses.replace(jobs[0], task_id="task_" + "x" * 32)

        async def fetch(batch: list[TaskRef]) -> dict[str, TaskStatus]:
            return await adapter.fetch_many(ctx, batch)

        # Before the gateway's first upstream poll every task is NOT_START: queued, never failed.
        with pytest.raises(TaskNotFound):
            await adapter.fetch(ctx, unknown)
        first = await fetch([*jobs, *other_key, unknown])
        assert set(first) == {j.task_id for j in jobs}  # foreign and unknown ids are simply absent
        assert {(s.state, s.raw_status) for s in first.values()} == {("queued", "NOT_START")}
        assert sim.stats.requests["batch_fetch"] == 4  # 7 ids in batches of 2
        sim.config.extra["gateway_tick_seconds"] = 0.05
        done = await until_all(fetch, jobs, "succeeded")
    for job in jobs:
        status = done[job.task_id]
        assert len(status.outputs) == 4 and status.progress == 100
        assert [o.metadata["role"] for o in status.outputs] == ["audio", "cover", "audio", "cover"]
        assert all(o.metadata["title"] == "Simulated Song" for o in status.outputs)
        assert status.outputs[0].metadata["duration"] == 1.0
    assert SunoProvider.batch_fetch_size == 50
    assert sim.stats.requests["fetch"] == 1  # only the TaskNotFound check above: polls are batched


async def test_fetch_many_sunoapi_falls_back_to_one_fetch_each():
    sim = SunoApiSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2))
    async with serving(sim.app) as url, httpx.AsyncClient(timeout=10) as http:
        adapter = adapter_for(url, "sunoapi")
        assert adapter.supports_callbacks and not adapter_for(url, "gateway").supports_callbacks
        ctx = CallContext(http=http, api_key="sk-a")
        jobs = await submitted(adapter, ctx, "a song", 3)
        unknown = dataclasses.replace(jobs[0], task_id="nosuchtask")
        with pytest.raises(TaskNotFound):
            await adapter.fetch(ctx, unknown)

        async def fetch(batch: list[TaskRef]) -> dict[str, TaskStatus]:
            result = await adapter.fetch_many(ctx, [*batch, unknown])
            assert "nosuchtask" not in result
            return result

        done = await until_all(fetch, jobs, "succeeded")
    assert all(len(s.outputs) == 4 for s in done.values())
    assert "callBackUrl" not in sim.tasks[jobs[0].task_id].input  # no callback URL: none sent
