"""Throughput benchmark: bare arq no-op jobs/s against Atelier end-to-end jobs/s, on this machine.

    .venv/bin/python bench/throughput.py [--arq-jobs 20000] [--jobs 3000] [--concurrency 32]

1. Bare arq: an arq ``Worker`` process (no-op function, ``max_jobs`` 200,
   ``poll_delay`` --arq-poll-delay, ``keep_result`` 0, JSON payloads as
   Atelier uses) drains --arq-jobs jobs that all become due at one instant.
2. Atelier end to end: ``atelier serve`` (1 process) and ``atelier worker``
   (1 process) on the same private redis-server, the provider simulators in
   ``atelier sandbox`` (a third process) with Replicate completing at once
   (``queue_seconds=0, run_seconds=0``). The bench POSTs --jobs jobs to
   ``/v1/jobs`` with --concurrency requests in flight (each lane one keep-alive
   connection, ``harness.RawHttp``: the load costs the machine little) and counts until every
   job is ``succeeded`` (submit, poll, download into storage, CAS transitions).

Prints both rates and their ratio (target: end to end >= 12 % of bare arq, issue 20), and
how much CPU each process used. Asserts nothing. Logs at WARNING, callbacks off
(--callbacks on makes the simulator call back too, as in sandbox defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from harness import (
    CpuMeter,
    Procs,
    RawHttp,
    atelier_env,
    machine_note,
    percentile,
    processes,
    py_spy,
    start_api,
    start_sandbox,
    start_worker,
)

from orchestrator.infra.redis_server import RedisServer, free_port
from orchestrator.store.queue import connect, dumps, loads
from orchestrator.store.tenants import create_api_key

ARQ_QUEUE = "bench:arq"


# -- bare arq ------------------------------------------------------------------------------

async def noop(ctx: dict[str, object]) -> None:
    return None


def run_arq_worker(redis_url: str, poll_delay: float, max_jobs: int) -> None:
    """Entry point of the bare arq worker process (``--arq-worker``)."""
    from arq import func
    from arq.connections import RedisSettings
    from arq.worker import Worker

    worker = Worker(functions=[func(noop, name="noop")], redis_settings=RedisSettings.from_dsn(redis_url),
                    queue_name=ARQ_QUEUE, poll_delay=poll_delay, max_jobs=max_jobs, keep_result=0,
                    job_serializer=dumps, job_deserializer=loads, handle_signals=True)
    worker.run()


async def bare_arq(procs: Procs, redis_url: str, jobs: int, poll_delay: float,
                   max_jobs: int) -> tuple[float, float, float]:
    """No-op jobs per second drained by one arq worker process; its CPU ms and Redis commands per job."""
    worker = procs.spawn("arq-worker", [sys.executable, __file__, "--arq-worker", redis_url,
                                        "--arq-poll-delay", str(poll_delay), "--arq-max-jobs", str(max_jobs)])
    redis = await connect(redis_url, ARQ_QUEUE)
    try:
        await asyncio.sleep(1.5)  # let the worker start and reach its polling loop
        worker.check()
        # Every job becomes due at the same instant, after all are enqueued (pipelined, as arq stores them).
        due_at = time.time() + 2.0 + jobs / 5_000
        due_ms = int(due_at * 1000)
        for start in range(0, jobs, 2000):
            pipe = redis.pipeline(transaction=False)
            for _ in range(start, min(jobs, start + 2000)):
                job_id = uuid.uuid4().hex
                pipe.psetex(job_key_prefix + job_id, due_ms - int(time.time() * 1000) + expires_extra_ms,
                            serialize_job("noop", (), {}, None, due_ms, serializer=dumps))
                pipe.zadd(ARQ_QUEUE, {job_id: due_ms})
            await pipe.execute()
        if time.time() >= due_at:
            print("  warning: enqueueing took longer than planned; the timer started late", file=sys.stderr)
        commands0 = await redis_commands(redis)
        cpu0 = worker.cpu_seconds()
        await asyncio.sleep(max(0.0, due_at - time.time()))
        while await redis.zcard(ARQ_QUEUE) > 0:
            await asyncio.sleep(0.005)
        elapsed = time.time() - due_at
        cpu_ms = (worker.cpu_seconds() - cpu0) * 1000 / jobs
        commands = (await redis_commands(redis) - commands0) / jobs
        worker.check()
    finally:
        await redis.aclose()
        worker.stop()
    return jobs / elapsed, cpu_ms, commands


async def redis_commands(redis: ArqRedis) -> int:
    """Commands Redis has processed so far (INFO stats)."""
    return int((await redis.info("stats"))["total_commands_processed"])


async def command_calls(redis: ArqRedis) -> Counter[str]:
    """Calls per Redis command so far (INFO commandstats; commands run by Lua scripts included)."""
    stats = await redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


# -- Atelier end to end ------------------------------------------------------------------

async def atelier_end_to_end(procs: Procs, redis_url: str, jobs: int, concurrency: int, callbacks: str,
                             poll_min: float, log_level: str, profile_dir: str | None = None,
                             profile_seconds: float = 20) -> dict[str, float | str]:
    sandbox, sandbox_url = start_sandbox(procs)
    async with httpx.AsyncClient() as sim_client:
        resp = await sim_client.post(f"{sandbox_url}/replicate/_sim/config",
                                     json={"queue_seconds": 0, "run_seconds": 0})
        resp.raise_for_status()
    storage = tempfile.TemporaryDirectory(prefix="atelier-bench-storage-")
    port = free_port()
    env = atelier_env(redis_url=redis_url, storage_url=f"file://{storage.name}", sandbox=1, sandbox_url=sandbox_url,
                      public_url=f"http://127.0.0.1:{port}", poll_min_seconds=poll_min, log_level=log_level,
                      callbacks=callbacks, worker_metrics_port=0)
    redis = await connect(redis_url, "atelier:jobs")
    tenant = "bench"
    api_key = await create_api_key(redis, tenant)
    api = start_api(procs, env, port)
    worker = start_worker(procs, env)
    succeeded_key, failed_key = f"atl:t:{tenant}:st:succeeded", f"atl:t:{tenant}:st:failed"
    body = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
            "input": {"prompt": "a lighthouse at dusk"}}
    latencies: list[float] = []
    ids: list[str] = []
    retries: list[int] = []

    async def finished() -> int:
        return int(await redis.zcard(succeeded_key)) + int(await redis.zcard(failed_key))

    payload = json.dumps(body).encode()

    async def submit_all(n: int) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def one_lane() -> None:
            conn = RawHttp("127.0.0.1", port, {"Authorization": f"Bearer {api_key}",
                                                "Content-Type": "application/json"})
            try:
                while not queue.empty():
                    queue.get_nowait()
                    # An Idempotency-Key makes a retry after a dropped connection safe (as a careful client does).
                    headers = {"Idempotency-Key": uuid.uuid4().hex}
                    t = time.perf_counter()
                    for attempt in range(3):
                        try:
                            status, answer = await conn.request("POST", "/v1/jobs", payload, headers)
                            break
                        except ConnectionError:
                            retries.append(1)
                            if attempt == 2:
                                raise
                    latencies.append(time.perf_counter() - t)
                    if status not in (200, 202):
                        raise RuntimeError(f"POST /v1/jobs answered {status}: {answer[:300]!r}")
                    ids.append(json.loads(answer)["id"])
            finally:
                await conn.close()

        await asyncio.gather(*(one_lane() for _ in range(concurrency)))

    async def wait_for(total: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while await finished() < total:
            procs.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {await finished()} of {total} jobs finished within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def api_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {api_key}"})

    try:
        warm = min(100, concurrency * 2)
        await submit_all(warm)  # warm up the processes' caches and connection pools
        await wait_for(warm, 60)
        async with api_client() as client:
            latencies.clear()
            ids.clear()
            meter = CpuMeter({"api": api.pid, "worker": worker.pid, "sandbox": sandbox.pid, "bench": os.getpid()})
            meter.start()
            commands0 = await redis_commands(redis)
            calls0 = await command_calls(redis)
            cpu0 = {"api": api.cpu_seconds(), "worker": worker.cpu_seconds()}
            if profile_dir:
                py_spy(procs, {"api": api.pid, "worker": worker.pid}, profile_dir, profile_seconds)
            t0 = time.perf_counter()
            await submit_all(jobs)  # (fresh connections: uvicorn closes idle ones after 5 s)
            submitted = time.perf_counter() - t0
            await wait_for(warm + jobs, 600)
            total = time.perf_counter() - t0
            cpu = meter.report()
            commands = (await redis_commands(redis) - commands0) / jobs
            calls = await command_calls(redis)
            calls.subtract(calls0)
            top = ", ".join(f"{name} {n / jobs:.1f}" for name, n in calls.most_common(10))
            api_ms = (api.cpu_seconds() - cpu0["api"]) * 1000 / jobs
            worker_ms = (worker.cpu_seconds() - cpu0["worker"]) * 1000 / jobs
            # What the client sees: every job succeeded, with a stored output.
            statuses: dict[str, int] = {}
            with_outputs = 0
            for start in range(0, len(ids), 1000):
                resp = await client.post("/v1/jobs/query", json={"ids": ids[start:start + 1000]})
                resp.raise_for_status()
                for job in resp.json()["data"]:
                    statuses[job["status"]] = statuses.get(job["status"], 0) + 1
                    with_outputs += bool(job["outputs"])
        stored = sum(1 for p in Path(storage.name).rglob("*") if p.is_file())
        async with httpx.AsyncClient() as sim_client:
            sim = (await sim_client.get(f"{sandbox_url}/replicate/_sim/stats")).json()
    finally:
        await redis.aclose()
        worker.stop()
        api.stop()
        sandbox.stop()
        storage.cleanup()
    return {"rate": jobs / total, "submit_rate": jobs / submitted, "total": total,
            "post_p50": percentile(latencies, 50) * 1000, "post_p99": percentile(latencies, 99) * 1000,
            "statuses": json.dumps(statuses), "with_outputs": with_outputs, "stored_files": stored,
            "sim_requests": json.dumps(sim["requests"]), "cpu": cpu, "commands": commands,
            "api_ms": api_ms, "worker_ms": worker_ms, "retries": len(retries), "top_commands": top}


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine_note()}")
    server = RedisServer().start()
    try:
        with processes(keep_logs=args.keep_logs) as procs:
            runs = [await bare_arq(procs, server.url, args.arq_jobs, args.arq_poll_delay, args.arq_max_jobs)
                    for _ in range(args.arq_runs)]
            arq_rate, arq_cpu_ms, arq_commands = max(runs)
            print(f"bare arq:           {arq_rate:,.0f} no-op jobs/s  (best of {args.arq_runs}: "
                  f"{', '.join(f'{r[0]:,.0f}' for r in runs)}; {args.arq_jobs:,} jobs, 1 worker process, "
                  f"poll_delay {args.arq_poll_delay}, max_jobs {args.arq_max_jobs})")
            print(f"  per job:          worker CPU {arq_cpu_ms:.2f} ms, {arq_commands:.1f} Redis commands")
            server_redis = await connect(server.url, ARQ_QUEUE)
            await server_redis.flushall()
            await server_redis.aclose()
            e2e = await atelier_end_to_end(procs, server.url, args.jobs, args.concurrency, args.callbacks,
                                           args.poll_min, args.log_level, args.py_spy, args.py_spy_seconds)
    finally:
        server.close()
    print(f"atelier end to end: {e2e['rate']:,.0f} jobs/s  ({args.jobs:,} jobs in {e2e['total']:.1f} s: HTTP submit "
          f"-> Replicate simulator -> stored output -> succeeded; 1 API + 1 worker process, "
          f"{args.concurrency} requests in flight, callbacks {args.callbacks})")
    print(f"  POST /v1/jobs:    {e2e['submit_rate']:,.0f} accepted/s while the worker ran, latency p50 "
          f"{e2e['post_p50']:.1f} ms, p99 {e2e['post_p99']:.1f} ms, {e2e['retries']} retried (dropped connection)")
    print(f"  checked:          statuses {e2e['statuses']}, {e2e['with_outputs']} with outputs, "
          f"{e2e['stored_files']} files in storage")
    print(f"  simulator:        requests {e2e['sim_requests']}")
    print(f"  per job:          worker CPU {e2e['worker_ms']:.2f} ms, API CPU {e2e['api_ms']:.2f} ms, "
          f"{e2e['commands']:.1f} Redis commands ({e2e['top_commands']}, ...)")
    print(f"  {e2e['cpu']}")
    ratio = float(e2e["rate"]) / arq_rate
    print(f"ratio:              {100 * ratio:.1f} % of bare arq (target >= 12 %)")
    cpu_ratio = arq_cpu_ms / float(e2e["worker_ms"])
    print(f"  by worker CPU per job (less sensitive to other load on the machine): {100 * cpu_ratio:.1f} %")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arq-jobs", type=int, default=20_000)
    parser.add_argument("--arq-runs", type=int, default=3)
    parser.add_argument("--arq-poll-delay", type=float, default=0.01)
    parser.add_argument("--arq-max-jobs", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--callbacks", choices=["off", "on"], default="off")
    parser.add_argument("--poll-min", type=float, default=0.05, help="ATELIER_POLL_MIN_SECONDS")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the API and the worker into DIR/*.raw")
    parser.add_argument("--py-spy-seconds", type=float, default=20)
    parser.add_argument("--arq-worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arq_worker:
        run_arq_worker(args.arq_worker, args.arq_poll_delay, args.arq_max_jobs)
    else:
        asyncio.run(main(args))
