"""Batch benchmark: seconds to accept a 10,000-item batch, and items/s through to `succeeded`
with simulators that finish at once.

    .venv/bin/python bench/batch.py [--items 10000] [--workers 1]

Runs the API and the simulators in this process and the workers as separate
`atelier worker` processes (as in production), against a private redis-server.
Prints its figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx

from orchestrator.cli.devstack import dev_stack


async def main(items: int, workers: int) -> None:
    async with dev_stack(run_worker=False, log_format="text", log_level="WARNING", poll_min_seconds=0.05,
                         worker_max_jobs=200) as stack:
        for sim in stack.simulators.values():
            sim.config.queue_seconds = 0.0
            sim.config.run_seconds = 0.0
        env = {**os.environ, **{f"ATELIER_{k.upper()}": str(v) for k, v in {
            "redis_url": stack.settings.redis_url, "storage_url": stack.settings.storage_url,
            "sandbox": "1", "sandbox_url": stack.sandbox_url, "public_url": stack.settings.public_url,
            "poll_min_seconds": 0.05, "log_level": "WARNING", "worker_max_jobs": 200,
            "worker_metrics_port": 0}.items()}}
        command = [sys.executable, "-m", "orchestrator.cli", "worker"]
        procs = [subprocess.Popen(command, env=env) for _ in range(workers)]  # noqa: ASYNC220 - before measuring
        kinds = [("image", "black-forest-labs/flux-schnell"), ("video", "minimax/video-01"),
                 ("audio", "meta/musicgen")]
        body = {"jobs": [{"provider": "replicate", "kind": kinds[i % 3][0], "model": kinds[i % 3][1],
                          "ref": f"r{i}", "input": {"prompt": f"item {i}"}} for i in range(items)]}
        try:
            async with httpx.AsyncClient(base_url=stack.api_url, timeout=300,
                                         headers={"Authorization": f"Bearer {stack.api_key}"}) as client:
                t0 = time.perf_counter()
                resp = await client.post("/v1/batches", json=body)
                accepted = time.perf_counter() - t0
                resp.raise_for_status()
                batch_id = resp.json()["id"]
                while True:
                    batch = (await client.get(f"/v1/batches/{batch_id}")).json()
                    if batch["status"] == "completed":
                        break
                    await asyncio.sleep(0.5)
                total = time.perf_counter() - t0
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
        print(f"items:                 {items}")
        print(f"worker processes:      {workers}")
        print(f"accept (POST -> 202):  {accepted:.2f} s")
        print(f"all succeeded after:   {total:.1f} s")
        print(f"throughput:            {batch['counts']['succeeded'] / (total - accepted):.0f} items/s "
              f"(succeeded {batch['counts']['succeeded']}, failed {batch['counts']['failed']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.items, args.workers))
