"""Restart Redis (AOF) mid-run: no accepted job is lost, and the API and the workers carry on.

The full-size variant also kills Redis with SIGKILL (half of its restarts): with ``appendfsync
everysec`` a process crash loses nothing already written to the AOF (only a machine crash can
lose the last second).

Jobs are submitted throughout, with an ``Idempotency-Key`` each, and retried when the API answers
503 (the store is unreachable while Redis restarts). Every job id the API returned must exist
afterwards and end succeeded; the worker processes must survive (they are never restarted here).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.faults.harness import MODELS, fault_stack, job_body, record_figures

PROVIDERS = list(MODELS)


async def _redis_restart_scenario(name: str, *, jobs: int, restarts: int, down: float, interval: float,
                                  every: tuple[float, float], timeout: float, seed: int,
                                  crashes: tuple[int, ...] = ()) -> None:
    rng = random.Random(seed)
    started = time.monotonic()
    async with fault_stack(workers=1) as fs:
        fs.timings(queue=0.2, run=0.6)
        accepted: list[str] = []

        async def submitter() -> None:
            for i in range(jobs):
                provider = PROVIDERS[i % len(PROVIDERS)]
                body = job_body(provider, f"{fs.tag}-{i}", webhook_url=fs.receiver.url)
                job = await fs.submit(body, idempotency_key=f"{fs.tag}-{i}", retry_for=60)
                accepted.append(job["id"])
                await asyncio.sleep(interval)

        async def restarter() -> None:
            for n in range(restarts):
                await asyncio.sleep(rng.uniform(*every))
                await fs.restart_redis(down, crash=n in crashes)

        await asyncio.gather(submitter(), restarter())
        fs.assert_workers_alive()
        assert len(set(accepted)) == jobs  # one job per Idempotency-Key, whatever the retries
        done = await fs.wait_terminal(accepted, timeout)
        audit = await fs.audit(done)
        record_figures(name, {
            "seed": seed, "jobs": jobs, "redis_restarts": fs.redis_restarts,
            "of_which_sigkill": len(crashes), "redis_down_seconds": down,
            "kills": fs.kills, "worker_restarts": fs.worker_restarts, "submit_retries": dict(fs.submit_retries),
            "in_flight_at_faults": dict(fs.in_flight_at_faults), **audit.figures(),
            "accepted_jobs_lost": jobs - len(done),
            "seconds": round(time.monotonic() - started, 1)})
        fs.assert_workers_alive()
        assert set(fs.submit_retries) <= {"HTTP 503"}, fs.submit_retries  # a retryable 503, never a 500
        assert len(done) == jobs
        assert audit.statuses == {"succeeded": jobs}, audit.errors
        audit.assert_clean()
        assert audit.creations == audit.jobs_per_provider


async def test_redis_restart_mid_run_small() -> None:
    await _redis_restart_scenario("redis_restart_small", jobs=32, restarts=1, down=1.5, interval=0.1,
                                  every=(1.0, 2.0), timeout=90, seed=random.randrange(10**6))


@pytest.mark.faults
@pytest.mark.timeout(1200)
async def test_redis_restarts_mid_run_1000_jobs() -> None:
    await _redis_restart_scenario("redis_restart_1000", jobs=1000, restarts=6, down=3.0, interval=0.03,
                                  every=(4.0, 10.0), timeout=600, seed=random.randrange(10**6),
                                  crashes=(1, 3, 5))
