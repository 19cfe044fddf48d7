"""Fallbacks that never pay twice (issue 17): a job moves to its next provider only when the current
one provably created nothing, or failed with a code the request lists in ``fallback_on``; never after
an ambiguous submission. One job id throughout, each attempt recorded, a ``job.fallback`` event and
webhook per switch, the budget hold moved with the job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, sim_faults, sim_stats, wait_for

FLUX = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
        "input": {"prompt": "a red fox"}}
FAL = {"provider": "fal", "model": "fal-ai/flux/schnell"}


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    # Two submission attempts per provider: an outage "after the allowed retries" comes within seconds.
    async with dev_stack(redis_url=redis_url, log_format="text", submit_max_attempts=2) as s:
        yield s


async def test_a_provider_refusing_before_acceptance_moves_the_job_to_its_fallback(stack: Stack) -> None:
    receiver = WebhookReceiver()
    async with serving(receiver.app) as hook_url, api(stack) as client:
        await sim_faults(stack, "replicate", {"kind": "503", "route": "create", "count": 10})
        resp = await client.post("/v1/jobs", json={**FLUX, "fallbacks": [FAL], "webhook_url": f"{hook_url}/hook"})
        assert resp.status_code == 202, resp.text
        job = await wait_for(client, resp.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        assert (job["provider"], job["model"]) == ("fal", "fal-ai/flux/schnell")
        assert job["outputs"] and job["fallbacks"] == []
        first, second = job["provider_attempts"]
        assert (first["provider"], first["outcome"]) == ("replicate", "provider_unavailable")
        assert first["cost"]["amount"] == 0 and first["key_id"]
        assert (second["provider"], second["model"], second["outcome"]) == ("fal", "fal-ai/flux/schnell", "succeeded")
        assert second["cost"] == job["cost"]["final"]
        # One creation at the fallback, none at the refusing primary.
        assert (await sim_stats(stack, "fal"))["creations"] == 1
        assert (await sim_stats(stack, "replicate"))["creations"] == 0
        events = [e["type"] for e in (await client.get(f"/v1/jobs/{job['id']}/events")).json()]
        assert events.count("job.fallback") == 1 and events[-1] == "job.succeeded"
        await receiver.wait(3)  # job.fallback, job.running, job.succeeded (delivered independently)
        received = [e["type"] for e in receiver.events()]
        assert "job.fallback" in received and "job.succeeded" in received
        fallback = next(e for e in receiver.events() if e["type"] == "job.fallback")
        assert fallback["data"]["provider"] == "fal" and fallback["data"]["id"] == job["id"]
        usage = (await client.get("/v1/usage", params={"group_by": "provider"})).json()
        assert [(g["key"], g["jobs"], g["succeeded"]) for g in usage["groups"]] == [("fal", 1, 1)]


async def test_an_ambiguous_submission_is_never_moved(stack: Stack) -> None:
    async with api(stack) as client:
        # The primary creates the task, then answers 504: the task may exist, so the job stays with it
        # (Replicate can be asked: the reconcile finds it) and the fallback never pays.
        await sim_faults(stack, "replicate", {"kind": "504", "route": "create", "count": 1, "after_effect": True})
        resp = await client.post("/v1/jobs", json={**FLUX, "fallbacks": [FAL], "fallback_on": ["provider_failed"]})
        job = await wait_for(client, resp.json()["id"], timeout=60)
        assert job["status"] == "succeeded" and job["provider"] == "replicate", job
        assert (await sim_stats(stack, "fal"))["creations"] == 0
        assert (await sim_stats(stack, "replicate"))["creations"] == 1
        assert [a["outcome"] for a in job["provider_attempts"]] == ["succeeded"]


async def test_a_failure_listed_in_fallback_on_moves_the_job_and_others_do_not(stack: Stack) -> None:
    async with api(stack) as client:
        failing = {**FLUX, "input": {"prompt": "a fox [sim:fail]", "seed": 7}}
        # The entry's input is merged over the request's: its own prompt, the request's seed.
        retry = {**FAL, "input": {"prompt": "a fox"}}
        listed = await client.post("/v1/jobs", json={**failing, "fallbacks": [retry],
                                                     "fallback_on": ["provider_failed"]})
        not_listed = await client.post("/v1/jobs", json={**failing, "fallbacks": [retry]})
        moved = await wait_for(client, listed.json()["id"], timeout=60)
        stayed = await wait_for(client, not_listed.json()["id"], timeout=60)
        assert moved["status"] == "succeeded" and moved["provider"] == "fal", moved
        assert [a["outcome"] for a in moved["provider_attempts"]] == ["provider_failed", "succeeded"]
        assert (moved["input"]["prompt"], moved["input"]["seed"]) == ("a fox", 7)
        # The failed attempt was created at the provider: it counts its estimate (or what was reported).
        assert moved["provider_attempts"][0]["cost"]["amount"] > 0
        assert stayed["status"] == "failed" and stayed["error"]["code"] == "provider_failed"
        assert stayed["provider"] == "replicate" and stayed["fallbacks"] == [retry]


async def test_unusable_providers_are_skipped_at_acceptance_and_fallbacks_are_validated(stack: Stack) -> None:
    async with api(stack) as client:
        # No such provider here: provably creates nothing, so the job starts at its first usable entry.
        resp = await client.post("/v1/jobs", json={**FLUX, "provider": "nowhere", "fallbacks": [FAL]})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert job["provider"] == "fal" and job["provider_attempts"][0]["outcome"] == "skipped"
        assert "nowhere" in job["provider_attempts"][0]["message"]
        assert (await wait_for(client, job["id"], timeout=60))["status"] == "succeeded"

        bad: list[tuple[dict[str, Any], str]] = [
            ({**FLUX, "fallbacks": [{**FAL, "input": {"num_outputs": 99}}]}, "fallbacks[0].input.num_outputs"),
            ({**FLUX, "fallbacks": [{"provider": "fal", "model": "fal-ai/flux/schnell", "colour": 1}]},
             "fallbacks.0.colour"),
            ({**FLUX, "fallback_on": ["Not A Code"]}, "fallback_on"),
            ({**FLUX, "fallbacks": [FAL] * 6}, "fallbacks"),
        ]
        for body, field in bad:
            refused = await client.post("/v1/jobs", json=body)
            assert refused.status_code == 422, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert any(e["field"].startswith(field) for e in refused.json()["errors"]), (field, refused.json())
        none = await client.post("/v1/jobs", json={**FLUX, "provider": "nowhere",
                                                   "fallbacks": [{"provider": "elsewhere", "model": "m"}]})
        assert none.status_code == 422 and none.json()["errors"][0]["field"] == "provider"
