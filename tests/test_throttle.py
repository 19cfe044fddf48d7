"""Provider throttling: caps on tasks in flight, request budgets, priority order, key affinity."""

from __future__ import annotations

import asyncio
import time

from orchestrator.cli.devstack import dev_stack
from orchestrator.infra.settings import Settings
from tests.helpers import api, submit, wait_for
from workers.main import run as run_worker


async def test_cap_in_flight_is_never_exceeded_with_several_workers(redis_url):
    async with dev_stack(redis_url=redis_url, replicate_concurrency=2, poll_min_seconds=0.1,
                         log_format="text") as stack, api(stack) as client:
        settings = Settings(**stack.settings.model_dump(exclude={"providers_file"}))
        stop = asyncio.Event()
        extra = [asyncio.create_task(run_worker(settings, stop=stop, completion_wait=1, queues=("jobs",)))
                 for _ in range(2)]
        sim = stack.simulators["replicate"]
        try:
            low = [(await submit(client, priority="low", input={"prompt": f"low {i} [sim:run=2]"}))["id"]
                   for i in range(5)]
            await asyncio.sleep(0.3)
            high = (await submit(client, priority="high", input={"prompt": "urgent [sim:run=2]"}))["id"]
            most = 0
            throttled_seen = False
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                busy = sum(1 for t in sim.tasks.values() if t.phase() in ("queued", "running"))  # type: ignore[attr-defined]
                most = max(most, busy)
                jobs = (await client.post("/v1/jobs/query", json={"ids": [*low, high]})).json()["data"]
                throttled_seen = throttled_seen or any(j["phase"] == "throttled" for j in jobs)
                if all(j["status"] == "succeeded" for j in jobs):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*extra)
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert most <= 2, f"{most} tasks in flight with a cap of 2"
    assert throttled_seen
    started = {j["id"]: j["timestamps"]["submitting"] for j in jobs}
    later_lows = sorted(started[i] for i in low)[2:]  # the first two took the free slots at once
    # The first two finish together and free two slots at once: the high job and the oldest waiting low
    # one start together (in either order), and the high job ahead of the other two waiting.
    assert started[high] < later_lows[1], "the high-priority job should jump the waiting low ones"
    assert sim.stats.creations == 6


async def test_request_budget_spreads_submissions(redis_url):
    async with dev_stack(redis_url=redis_url, replicate_rpm=60, poll_min_seconds=0.1,
                         log_format="text") as stack, api(stack) as client:
        sim = stack.simulators["replicate"]
        started = time.monotonic()
        ids = [(await submit(client, input={"prompt": f"p{i}"}))["id"] for i in range(8)]
        await asyncio.sleep(1.0)
        early = sim.stats.requests["create"] + sim.stats.requests["get"]
        for job_id in ids:
            assert (await wait_for(client, job_id, timeout=40))["status"] == "succeeded"
        elapsed = time.monotonic() - started
        total = sim.stats.requests["create"] + sim.stats.requests["get"]
    assert early <= 6, f"{early} requests in the first second with a burst of 5 at 1/s"
    assert total <= 5 + elapsed * 1.0 + 1, (total, elapsed)
    assert "429" not in str(sim.stats.as_dict())


async def test_jobs_waiting_for_the_budget_line_up_instead_of_retrying_every_interval(redis_url):
    # 2 requests/s (burst 5) and 20 jobs at once: the last waits ~8 s for its turn. Each waiting job is
    # told when its turn should come (its place in the key's budget line), so it records one
    # "throttled" change, however many intervals it waits, and the jobs start about in submission order.
    async with dev_stack(redis_url=redis_url, replicate_rpm=120, poll_min_seconds=5,
                         log_format="text") as stack, api(stack) as client:
        ids = [(await submit(client, input={"prompt": f"p{i} [sim:run=0.2]"}))["id"] for i in range(20)]
        jobs = [await wait_for(client, i, {"submitted", "running", "succeeded"}, timeout=40) for i in ids]
        events = [(await client.get(f"/v1/jobs/{i}/events")).json() for i in ids]
    throttled = [sum(1 for e in ev if (e.get("note") or "").startswith("throttled")) for ev in events]
    assert max(throttled) <= 2, throttled
    assert sum(1 for n in throttled if n) >= 10  # most had to wait
    started = [j["timestamps"]["submitting"] for j in jobs]
    # Roughly in submission order (retries at their turn may swap neighbours on a loaded machine).
    assert max(started[:5]) < min(started[-5:]), started
    assert sorted(started[:10])[5] < sorted(started[10:])[5], started


async def test_key_that_submitted_is_the_key_that_polls(redis_url):
    async with dev_stack(redis_url=redis_url, replicate_api_key="r8_one,r8_two,r8_three",
                         log_format="text") as stack, api(stack) as client:
        ids = [(await submit(client, input={"prompt": f"p{i} [sim:run=0.5]"}))["id"] for i in range(9)]
        jobs = [await wait_for(client, i) for i in ids]
    sim = stack.simulators["replicate"]
    used = [sim.keys_by_task[j["provider_task_id"]] for j in jobs]  # type: ignore[attr-defined]
    assert all(len(keys) == 1 for keys in used), used
    assert len(set().union(*used)) > 1  # the pool spreads the load
