"""Batches, bulk queries and event streams."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from orchestrator.store.tenants import create_api_key
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit

IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
         "input": {"prompt": "a fox"}}
VIDEO = {"provider": "replicate", "kind": "video", "model": "minimax/video-01", "input": {"prompt": "sea"}}
AUDIO = {"provider": "replicate", "kind": "audio", "model": "meta/musicgen", "input": {"prompt": "piano"}}


async def wait_batch(client: httpx.AsyncClient, batch_id: str, timeout: float = 60.0,
                     check: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        if check:
            check(batch)
        if batch["status"] == "completed":
            return batch
        await asyncio.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not complete: {batch}")


def counts_add_up(batch: dict[str, Any]) -> None:
    assert sum(batch["counts"].values()) == batch["total"], batch
    terminal = sum(batch["counts"][s] for s in ("succeeded", "failed", "canceled", "timed_out"))
    assert terminal == batch["done"], batch


async def test_mixed_batch_with_invalid_items_and_webhook(stack):
    receiver = WebhookReceiver()
    items = [IMAGE | {"ref": "img"}, VIDEO | {"ref": "vid"}, AUDIO | {"ref": "aud"},
             IMAGE | {"ref": "bad-provider", "provider": "nope"},
             IMAGE | {"ref": "bad-field", "input": {"prompt": "x", "duration_seconds": -1}},
             {"ref": "bad-kind", "provider": "replicate", "kind": "smell", "model": "a/b"},
             IMAGE | {"ref": "fails", "input": {"prompt": "x [sim:fail]"}}]
    async with serving(receiver.app) as base, api(stack) as client:
        resp = await client.post("/v1/batches", json={"jobs": items, "webhook_url": f"{base}/hook",
                                                       "metadata": {"campaign": "spring"}})
        assert resp.status_code == 202, resp.text
        created = resp.json()
        assert created["total"] == 4 and created["invalid_count"] == 3
        assert [(p["index"], p["ref"], p["field"]) for p in created["invalid"]] == [
            (3, "bad-provider", "provider"), (4, "bad-field", "input.duration_seconds"), (5, "bad-kind", "kind")]
        refs = {i["ref"]: i["job_id"] for i in created["items"]}
        assert set(refs) == {"img", "vid", "aud", "fails"}
        batch = await wait_batch(client, created["id"], check=counts_add_up)
        assert batch["counts"]["succeeded"] == 3 and batch["counts"]["failed"] == 1 and batch["progress"] == 100
        assert batch["metadata"] == {"campaign": "spring"} and batch["finished_at"]
        job = (await client.get(f"/v1/jobs/{refs['vid']}")).json()
        assert job["batch_id"] == created["id"] and job["ref"] == "vid"
        assert job["outputs"][0]["content_type"] == "video/mp4"
        failed = (await client.get(f"/v1/batches/{created['id']}/jobs", params={"status": "failed"})).json()
        assert [j["ref"] for j in failed["data"]] == ["fails"]
        await receiver.wait(1)
        await asyncio.sleep(1.0)  # a duplicate would arrive by now
        secret = (await client.get("/v1/webhook-secret")).json()["secret"]
        events = [Webhook(secret).verify(body, headers) for headers, body in receiver.deliveries]
        completed = [e for e in events if e["type"] == "batch.completed"]
        assert len(completed) == 1 and completed[0]["data"]["counts"]["succeeded"] == 3
        ids = [h["webhook-id"] for h, b in receiver.deliveries if json.loads(b)["type"] == "batch.completed"]
        assert len(ids) == len(set(ids)) == 1


async def test_atomic_batch_rejects_everything(stack, redis_url):
    async with api(stack) as client:
        resp = await client.post("/v1/batches", json={"atomic": True, "jobs": [IMAGE, IMAGE | {"model": "??"}]})
        assert resp.status_code == 422 and resp.json()["invalid"][0]["field"] == "model"
        assert (await client.get("/v1/batches")).json()["data"] == []
    assert redis.Redis.from_url(redis_url).keys("atl:job:*") == []


async def test_batch_idempotency_key(stack):
    async with api(stack) as client:
        body = {"jobs": [IMAGE, AUDIO]}
        first = await client.post("/v1/batches", json=body, headers={"Idempotency-Key": "b-1"})
        again = await client.post("/v1/batches", json=body, headers={"Idempotency-Key": "b-1"})
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"] and first.json()["items"] == again.json()["items"]
        other = await client.post("/v1/batches", json={"jobs": [IMAGE]}, headers={"Idempotency-Key": "b-1"})
        assert other.status_code == 409
        await wait_batch(client, first.json()["id"])
    assert stack.simulators["replicate"].stats.creations == 2


async def test_batch_cancel_and_tenant_walls(stack, redis_url):
    r = redis.asyncio.Redis.from_url(redis_url)
    other = await create_api_key(r, "someone-else")
    await r.aclose()
    slow = IMAGE | {"input": {"prompt": "slow [sim:run=30]"}}
    async with api(stack) as client, api(stack, other) as stranger:
        created = (await client.post("/v1/batches", json={"jobs": [slow, slow, slow]})).json()
        assert (await stranger.get(f"/v1/batches/{created['id']}")).status_code == 404
        assert (await stranger.post(f"/v1/batches/{created['id']}/cancel")).status_code == 404
        await asyncio.sleep(0.5)
        resp = await client.post(f"/v1/batches/{created['id']}/cancel")
        assert resp.status_code == 202 and resp.json()["canceled"] is True
        batch = await wait_batch(client, created["id"], check=counts_add_up)
        assert batch["counts"]["canceled"] == 3


async def test_a_large_batch_is_canceled_by_a_worker_and_its_queued_jobs_are_never_submitted(stack):
    slow = IMAGE | {"input": {"prompt": "slow [sim:run=30]"}}
    async with api(stack) as client:
        created = (await client.post("/v1/batches", json={"jobs": [slow] * 400})).json()
        await asyncio.sleep(0.5)
        resp = await client.post(f"/v1/batches/{created['id']}/cancel")
        assert resp.status_code == 202 and resp.json()["canceled"] is True
        submitted_before = stack.simulators["replicate"].stats.creations
        batch = await wait_batch(client, created["id"], check=counts_add_up)
        assert batch["counts"]["canceled"] == 400 and batch["done"] == 400
        # Only jobs already at the provider (or being sent) when the cancel came were created there.
        assert stack.simulators["replicate"].stats.creations <= submitted_before + stack.settings.worker_max_jobs
        assert stack.simulators["replicate"].stats.creations < 400


async def test_bulk_query_never_leaks(stack, redis_url):
    r = redis.asyncio.Redis.from_url(redis_url)
    other = await create_api_key(r, "someone-else")
    await r.aclose()
    async with api(stack) as client, api(stack, other) as stranger:
        mine = [(await submit(client))["id"] for _ in range(3)]
        theirs = (await submit(stranger))["id"]
        resp = await client.post("/v1/jobs/query", json={"ids": [*mine, theirs, "job_unknown", mine[0]]})
        body = resp.json()
        assert [j["id"] for j in body["data"]] == mine
        assert body["not_found"] == [theirs, "job_unknown"]
        too_many = await client.post("/v1/jobs/query", json={"ids": ["job_x"] * 1001})
        assert too_many.status_code == 422


async def read_sse(client: httpx.AsyncClient, path: str, last_id: str | None = None,
                   stop_after: int | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[tuple[str, str, dict[str, Any]]] = []
    async with client.stream("GET", path, headers=headers, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in resp.aiter_lines():
            if line == "":
                if "data" in fields:
                    events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                    if stop_after and len(events) >= stop_after:
                        return events
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


async def test_job_stream_resumes_after_disconnect(stack):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "x [sim:run=1]"})
        first = await read_sse(client, f"/v1/jobs/{job['id']}/stream", stop_after=2)  # then disconnect
        rest = await read_sse(client, f"/v1/jobs/{job['id']}/stream", last_id=first[-1][0])
    seqs = [int(i) for i, _, _ in first + rest]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    types = [t for _, t, _ in first + rest]
    assert types == ["job.created", "job.submitting", "job.submitted", "job.running", "job.succeeded"]
    async with api(stack) as client:
        log = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert [e["sequence"] for e in log] == seqs  # nothing lost, nothing repeated


async def test_batch_stream(stack):
    async with api(stack) as client:
        created = (await client.post("/v1/batches", json={"jobs": [IMAGE, AUDIO]})).json()
        first = await read_sse(client, f"/v1/batches/{created['id']}/stream", stop_after=3)
        rest = await read_sse(client, f"/v1/batches/{created['id']}/stream", last_id=first[-1][0])
    events = first + rest
    seqs = [int(i) for i, _, _ in events]
    assert seqs == list(range(1, len(seqs) + 1))
    finished = [d["job_id"] for _, t, d in events if t == "job.succeeded" and d["event"]["type"] == t]
    assert sorted(finished) == sorted(i["job_id"] for i in created["items"])


async def test_thousand_item_mixed_batch(redis_url):
    """1,000 items accepted in one request, run through the simulators; counts add up all along."""
    await _mixed_batch(redis_url, 1_000, timeout=120)


@pytest.mark.faults  # a long run: make test-faults
@pytest.mark.timeout(600)
async def test_ten_thousand_item_mixed_batch(redis_url):
    """10,000 items accepted in one request, run through the simulators; counts add up all along."""
    await _mixed_batch(redis_url, 10_000, timeout=400)


async def _mixed_batch(redis_url: str, size: int, timeout: float) -> None:
    from orchestrator.cli.devstack import dev_stack

    async with dev_stack(redis_url=redis_url, log_format="text", log_level="WARNING",
                         poll_min_seconds=0.05) as stack, api(stack) as client:
        sim = stack.simulators["replicate"]
        sim.config.queue_seconds = 0.0
        sim.config.run_seconds = 0.0
        kinds = [IMAGE, VIDEO, AUDIO]
        items = [kinds[i % 3] | {"ref": f"r{i}", "input": {"prompt": f"item {i}"}} for i in range(size)]
        items[17] = IMAGE | {"ref": "r17", "input": {"prompt": "x", "seed": -1}}  # one invalid item
        started = time.monotonic()
        resp = await client.post("/v1/batches", json={"jobs": items}, timeout=120)
        accept_seconds = time.monotonic() - started
        assert resp.status_code == 202, resp.text[:500]
        created = resp.json()
        assert created["total"] == size - 1 and [p["index"] for p in created["invalid"]] == [17]
        observed = []

        def check(batch: dict[str, Any]) -> None:
            counts_add_up(batch)
            observed.append(batch["done"])

        batch = await wait_batch(client, created["id"], timeout=timeout, check=check)
        run_seconds = time.monotonic() - started
        assert batch["counts"]["succeeded"] == size - 1, batch
        assert observed == sorted(observed)
        print(f"\n{size} item batch: accepted in {accept_seconds:.2f}s, all succeeded after {run_seconds:.1f}s "
              f"({(size - 1) / run_seconds:.0f} jobs/s), {len(observed)} observations, counts added up at each")
    assert sim.stats.creations == size - 1
