"""Answers in one request (``Prefer: wait=N``, ``?wait=N``) and where a waiting job stands (``queue``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import redis.asyncio as aioredis

from orchestrator.api.waiting import parse_prefer_wait
from orchestrator.cli.devstack import dev_stack
from tests.helpers import TERMINAL, api, submit, wait_for

FLUX = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell"}


def job_body(prompt: str) -> dict[str, Any]:
    return FLUX | {"input": {"prompt": prompt}}


async def test_prefer_wait_answers_with_the_finished_job(stack):
    async with api(stack) as client:
        started = time.monotonic()
        resp = await client.post("/v1/jobs", json=job_body("a fox [sim:run=0.5]"), headers={"Prefer": "wait=30"})
        elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    assert resp.headers["Preference-Applied"] == "wait=30"
    job = resp.json()
    assert job["status"] == "succeeded"
    assert job["outputs"] and job["outputs"][0]["url"]
    assert job["queue"] is None
    assert elapsed < 20


async def test_prefer_wait_answers_202_with_the_job_as_it_is_when_the_wait_ends(stack):
    async with api(stack) as client:
        started = time.monotonic()
        resp = await client.post("/v1/jobs", json=job_body("slow [sim:run=10]"),
                                 headers={"Prefer": "respond-async, wait=1"})
        elapsed = time.monotonic() - started
        assert resp.status_code == 202, resp.text
        assert resp.headers["Preference-Applied"] == "wait=1"
        assert resp.headers["Location"] == f"/v1/jobs/{resp.json()['id']}"
        assert resp.json()["status"] not in TERMINAL
        assert 0.9 <= elapsed < 6, elapsed
        # GET ?wait returns as soon as the job finished, with its outputs.
        got = await client.get(f"/v1/jobs/{resp.json()['id']}", params={"wait": 30})
    assert got.status_code == 200
    assert got.json()["status"] == "succeeded" and got.json()["outputs"]


async def test_get_with_wait_answers_the_job_as_it_is_when_the_wait_ends(stack):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=10]"})
        started = time.monotonic()
        resp = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 1})
        elapsed = time.monotonic() - started
        no_wait = await client.get(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200
    assert resp.json()["status"] not in TERMINAL
    assert 0.9 <= elapsed < 6, elapsed
    assert "Preference-Applied" not in no_wait.headers


async def test_a_wait_that_is_too_long_or_malformed_is_refused_naming_the_header(stack):
    async with api(stack) as client:
        for value in ("wait=61", "wait=abc", "wait=-1", "wait=", "respond-async, wait=1.5"):
            resp = await client.post("/v1/jobs", json=job_body("x"), headers={"Prefer": value})
            assert resp.status_code == 422, (value, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["errors"][0]["field"] == "Prefer", resp.json()
        job = await submit(client)
        for value in ("61", "abc", "-1"):
            resp = await client.get(f"/v1/jobs/{job['id']}", params={"wait": value})
            assert resp.status_code == 422, (value, resp.text)
            assert resp.json()["errors"][0]["field"] == "wait", resp.json()
        # Preferences Atelier does not know are ignored (RFC 7240): a plain 202, nothing applied.
        plain = await client.post("/v1/jobs", json=job_body("y"), headers={"Prefer": "return=minimal"})
        assert plain.status_code == 202 and "Preference-Applied" not in plain.headers
        # A finished job with a wait answers at once.
        done = await wait_for(client, job["id"])
        again = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 60})
        assert again.json()["status"] == done["status"]
        assert (await client.get("/v1/jobs/job_nope", params={"wait": 5})).status_code == 404


def test_prefer_header_parsing():
    assert parse_prefer_wait(None) is None
    assert parse_prefer_wait("respond-async") is None
    assert parse_prefer_wait("wait=10") == 10
    assert parse_prefer_wait("respond-async, Wait=0") == 0
    assert parse_prefer_wait('wait="15"; foo=bar, wait=99') == 15  # the first one counts
    assert parse_prefer_wait("handling=lenient,wait=60") == 60
    for bad in ("wait=61", "wait=1e3", "wait=٣", "wait"):
        try:
            parse_prefer_wait(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


async def _subscriptions(client: aioredis.Redis) -> list[int]:
    """The channel count of every Redis connection in subscribed mode."""
    return [int(c["sub"]) for c in await client.client_list() if int(c.get("sub", 0)) > 0]


async def test_500_concurrent_waiters_share_one_subscription(redis_url):
    # 25 jobs that finish within a few seconds, and 20 GET ?wait=60 on each: 500 requests held open
    # at once. Every one answers 200 with the finished job; the API subscribes on one connection
    # (not one per waiter) and its Redis connections stay bounded.
    async with dev_stack(redis_url=redis_url, log_format="text", poll_min_seconds=0.5) as stack, \
            api(stack) as client:
        # 20 clients of 25 connections: one httpx pool of 500 spends seconds of CPU per round in its own
        # bookkeeping, in this very event loop (the API and the worker run here too).
        waiters = [httpx.AsyncClient(base_url=stack.api_url, timeout=90, limits=httpx.Limits(max_connections=25),
                                     headers={"Authorization": f"Bearer {stack.api_key}"}) for _ in range(20)]
        monitor = aioredis.Redis.from_url(redis_url)
        try:
            # 500 requests without a wait first: the API's pool grows to what a burst of requests takes
            # (authentication, the job's read), whatever the waiting does.
            other = (await submit(client))["id"]
            plain = await asyncio.gather(*(waiters[i % 20].get(f"/v1/jobs/{other}") for i in range(500)))
            assert all(p.status_code == 200 for p in plain)
            baseline = len(await monitor.client_list())
            jobs = await asyncio.gather(*(submit(client, input={"prompt": f"fox {i} [sim:run=2]"})
                                          for i in range(25)))
            ids = [j["id"] for j in jobs]
            started = time.monotonic()
            waits = [asyncio.create_task(waiters[i % 20].get(f"/v1/jobs/{ids[i % 25]}", params={"wait": 60}))
                     for i in range(500)]
            most_clients, subscribed_modes, most_channels = 0, 0, 0
            while not all(w.done() for w in waits):
                most_clients = max(most_clients, len(await monitor.client_list()))
                subs = await _subscriptions(monitor)
                subscribed_modes = max(subscribed_modes, len(subs))
                most_channels = max(most_channels, max(subs, default=0))
                await asyncio.sleep(0.2)
            answers = await asyncio.gather(*waits)
            elapsed = time.monotonic() - started
        finally:
            await monitor.aclose()
            for w in waiters:
                await w.aclose()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    bodies = [a.json() for a in answers]
    assert all(b["status"] == "succeeded" and b["outputs"] for b in bodies), \
        (elapsed, {b["status"] for b in bodies})
    assert {b["id"] for b in bodies} == set(ids)
    # One subscribed connection carries the waiters' channels (one per job, not per waiter); the other
    # subscribed one is the worker's poll wake-up. The waiters add the subscription and a few pooled
    # connections for their reads (waiting.MAX_READS), not one per waiter.
    assert subscribed_modes <= 2, subscribed_modes
    assert 1 < most_channels <= 25, most_channels
    assert most_clients - baseline < 40, (baseline, most_clients)


async def test_a_job_waiting_for_a_slot_shows_its_place_in_the_line(redis_url):
    # One slot on the key and three jobs: the first runs, the second is next (position 1, one task ahead
    # of it in the slot), the third position 2 with 2 ahead. The ETA comes from the measured runs.
    async with dev_stack(redis_url=redis_url, log_format="text", replicate_concurrency=1,
                         poll_min_seconds=0.2) as stack, api(stack) as client:
        warm = await client.post("/v1/jobs", json=job_body("warm-up [sim:run=0.5]"), headers={"Prefer": "wait=30"})
        assert warm.status_code == 200 and warm.json()["status"] == "succeeded", warm.text
        ids = []
        for i in range(3):
            ids.append((await submit(client, input={"prompt": f"fox {i} [sim:run=5]"}))["id"])
            await asyncio.sleep(0.3)
        third = await _until(client, ids[2], lambda j: j["queue"] is not None and j["queue"]["position"] == 2)
        second = (await client.get(f"/v1/jobs/{ids[1]}")).json()
        first = (await client.get(f"/v1/jobs/{ids[0]}")).json()
        assert third["status"] == "queued" and third["phase"] == "throttled"
        assert third["queue"]["at"] == "atelier" and third["queue"]["line"] == "slot"
        assert third["queue"]["ahead"] == 2
        assert third["queue"]["eta_seconds"] is not None and third["queue"]["eta_seconds"] > 0
        assert second["queue"]["position"] == 1 and second["queue"]["ahead"] == 1
        assert second["queue"]["eta_seconds"] < third["queue"]["eta_seconds"]
        assert first["queue"] is None and first["status"] in ("submitting", "submitted", "running")
        listed = {j["id"]: j for j in (await client.get("/v1/jobs")).json()["data"]}
        assert listed[ids[2]]["queue"]["position"] in (1, 2)
        done = (await client.get(f"/v1/jobs/{ids[2]}", params={"wait": 40})).json()
        assert done["status"] == "succeeded" and done["queue"] is None


async def test_a_job_waiting_for_the_request_budget_shows_its_place(redis_url):
    async with dev_stack(redis_url=redis_url, log_format="text", replicate_rpm=30,
                         poll_min_seconds=5) as stack, api(stack) as client:
        ids = [(await submit(client, input={"prompt": f"p{i} [sim:run=0.2]"}))["id"] for i in range(9)]
        last = await _until(client, ids[-1], lambda j: j["queue"] is not None)
    assert last["queue"]["at"] == "atelier" and last["queue"]["line"] == "request_budget"
    assert last["queue"]["position"] >= 1 and last["queue"]["ahead"] == last["queue"]["position"] - 1
    assert last["queue"]["eta_seconds"] is None  # nothing of the model measured yet on this deployment


async def test_a_job_in_the_providers_queue_shows_the_position_it_reports(stack):
    async with api(stack) as client:
        body = {"provider": "fal", "kind": "image", "model": "fal-ai/flux/dev",
                "input": {"prompt": "a fox [sim:position=4] [sim:queue=8] [sim:run=0.5]"}}
        job = (await client.post("/v1/jobs", json=body)).json()
        seen = await _until(client, job["id"], lambda j: j["queue"] is not None, timeout=15)
        assert seen["queue"]["at"] == "provider" and seen["queue"]["line"] == "provider"
        assert 0 <= seen["queue"]["ahead"] <= 4
        assert seen["queue"]["position"] == seen["queue"]["ahead"] + 1
        assert seen["provider_status"] == "IN_QUEUE"
        done = (await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})).json()
    assert done["status"] == "succeeded" and done["queue"] is None


async def _until(client: httpx.AsyncClient, job_id: str, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if check(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never matched; last: {job}")


async def test_waiters_get_their_answer_across_a_redis_restart(redis_server, redis_url):
    # The shared subscription is lost with Redis; the waiters still get the finished job: the client
    # reconnects and subscribes again, and the periodic re-read catches an event published meanwhile.
    async with dev_stack(redis_url=redis_url, log_format="text", poll_min_seconds=0.2) as stack, \
            api(stack) as client:
        job = await submit(client, input={"prompt": "fox [sim:run=4]"})
        waits = [asyncio.create_task(client.get(f"/v1/jobs/{job['id']}", params={"wait": 60})) for _ in range(5)]
        await asyncio.sleep(1.0)
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(redis_server.restart)  # stop (AOF written), start on the same port
        answers = await asyncio.gather(*waits)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert all(a.json()["status"] == "succeeded" for a in answers), [a.json()["status"] for a in answers]
