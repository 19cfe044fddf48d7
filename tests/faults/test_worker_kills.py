"""Kill -9 the worker at random points while jobs run through the simulators.

Every job must end succeeded, no provider task may be created twice (the simulators count
creations per request identity, and every prompt here is unique), and every webhook must
arrive. The small variant runs in ``make test``; the 1,000-job one under ``-m faults``.

Jobs on providers that can look an ambiguous submission up (Replicate lists recent
predictions, Kling finds a task by our ``external_task_id``, Sora lists videos) opt into
``retry_unknown_submissions``: a worker killed between recording the intent and recording
the outcome is then reconciled (never resubmitted when the task exists) or, when the provider
has no such task, resubmitted. So they must all succeed, and a reconcile that misses a task
shows up as a duplicate creation. fal has no lookup: a fal job whose submission was cut by a
kill fails safe with ``provider_outcome_unknown`` (possibly one task created and abandoned,
never two); those are counted, not hidden.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from tests.faults.harness import MODELS, FaultStack, fault_stack, job_body, record_figures

PROVIDERS = list(MODELS)


async def _submit_stream(fs: FaultStack, count: int, interval: float, submitters: int = 1,
                         **fields: Any) -> list[str]:
    """Submit ``count`` jobs over time (round-robin over the providers), so kills land in every phase."""
    ids: list[str] = []
    counter = iter(range(count))

    async def one_submitter() -> None:
        for i in counter:
            provider = PROVIDERS[i % len(PROVIDERS)]
            body = job_body(provider, f"{fs.tag}-{i}", webhook_url=fs.receiver.url,
                            retry_unknown_submissions=MODELS[provider]["reconciles"], **fields)
            ids.append((await fs.submit(body, retry_for=10))["id"])
            await asyncio.sleep(interval)

    await asyncio.gather(*(one_submitter() for _ in range(submitters)))
    return ids


async def _kill_scenario(name: str, *, jobs: int, kills: int, workers: int, interval: float, submitters: int,
                         every: tuple[float, float], timeout: float, seed: int) -> None:
    rng = random.Random(seed)
    started = time.monotonic()
    async with fault_stack(workers=workers) as fs:
        fs.timings(queue=0.2, run=0.6)
        chaos = asyncio.create_task(fs.chaos(rng, kills, every))
        ids = await _submit_stream(fs, jobs, interval, submitters)
        await chaos
        fs.assert_workers_alive()
        done = await fs.wait_terminal(ids, timeout)
        audit = await fs.audit(done)
        unsafe = [j for j in done.values() if j["status"] != "succeeded"
                  and (MODELS[j["provider"]]["reconciles"] or j["error"]["code"] != "provider_outcome_unknown")]
        fal_failed_safe = sum(1 for j in done.values() if j["status"] != "succeeded") - len(unsafe)
        record_figures(name, {
            "seed": seed, "jobs": jobs, "worker_processes": workers, "kills": fs.kills,
            "worker_restarts": fs.worker_restarts, "redis_restarts": fs.redis_restarts,
            "in_flight_at_faults": dict(fs.in_flight_at_faults), **audit.figures(),
            "fal_failed_safe_unknown_outcome": fal_failed_safe,
            "seconds": round(time.monotonic() - started, 1),
        })
        assert fs.kills == kills
        assert not unsafe, [(j["id"], j["provider"], j["status"], j["error"]) for j in unsafe[:10]]
        audit.assert_clean()
        for provider, count in audit.jobs_per_provider.items():
            if MODELS[provider]["reconciles"]:
                assert audit.creations[provider] == count, (provider, audit.creations, audit.jobs_per_provider)


async def test_kill_9_worker_at_random_points_small() -> None:
    await _kill_scenario("worker_kill_small", jobs=24, kills=2, workers=1, interval=0.12, submitters=1,
                         every=(0.6, 1.5), timeout=90, seed=random.randrange(10**6))


@pytest.mark.faults
@pytest.mark.timeout(1800)
async def test_kill_9_workers_at_random_points_1000_jobs() -> None:
    await _kill_scenario("worker_kill_1000", jobs=1000, kills=12, workers=2, interval=0.05, submitters=4,
                         every=(2.0, 6.0), timeout=600, seed=random.randrange(10**6))


async def test_killed_worker_jobs_finish_after_restart() -> None:
    """SIGKILL while every job waits at its provider, and once mid-submission (the provider created the
    task, the worker died before recording it): after a restart all succeed, each created once."""
    async with fault_stack(workers=1) as fs:
        fs.timings(queue=0.2, run=0.6)
        waiting = [(await fs.submit(job_body(p, f"{fs.tag}-{i}", "[sim:run=4]")))["id"]
                   for i, p in enumerate(["replicate", "sora", "fal", "kling"] * 2)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = await fs.query(waiting)
            if all(j["status"] in ("submitted", "running") for j in jobs.values()):
                break
            await asyncio.sleep(0.05)
        # One Kling submission hangs after Kling created the task: the worker dies waiting for the answer.
        await fs.faults("kling", {"kind": "timeout", "route": "create", "count": 1, "after_effect": True,
                                  "delay": 30})
        kling = fs.stack.simulators["kling"]
        created = kling.stats.creations
        hung = await fs.submit(job_body("kling", f"{fs.tag}-hung"))
        while kling.stats.creations == created and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert (await fs.query([hung["id"]]))[hung["id"]]["status"] == "submitting"
        worker = fs.workers[0]
        worker.kill()
        worker.start()
        await worker.wait_ready()
        started = time.monotonic()
        done = await fs.wait_terminal([hung["id"], *waiting], 60)
        recovery = time.monotonic() - started
        audit = await fs.audit(done, webhooks=False)
        record_figures("killed_worker_jobs_finish", {
            "jobs": len(done), "kills": fs.kills, "worker_restarts": fs.worker_restarts, **audit.figures(),
            "recovery_seconds": round(recovery, 1)})
        assert all(j["status"] == "succeeded" for j in done.values()), audit.statuses
        assert done[hung["id"]]["attempts"] == 1  # reconciled, not resubmitted
        audit.assert_clean()
        assert audit.creations == audit.jobs_per_provider
