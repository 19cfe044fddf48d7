"""Callback latency benchmark: provider callback -> client webhook delivered, p50/p99 at a steady job rate.

    .venv/bin/python bench/callback_latency.py [--rate 100] [--seconds 30] [--run-seconds 2]

``atelier serve`` and ``atelier worker`` (1 process each, as separate processes)
run against a private redis-server, with the provider simulators in ``atelier
sandbox``. The bench submits Replicate jobs at --rate per second (open loop)
for --seconds, each with a ``webhook_url`` pointing at a receiver in this
process that timestamps every arrival. The simulator runs each prediction for
--run-seconds and sends its signed ``start`` and ``completed`` webhooks to
``/v1/callbacks/replicate``; Atelier fetches the prediction, stores the output
and sends ``job.succeeded`` to the client.

Latency = arrival of ``job.succeeded`` at the receiver minus the prediction's
``completed_at`` (read back from the simulator; every process shares the
machine's clock). Polling stays on as a safety net (first poll after
``4 x ATELIER_POLL_MIN_SECONDS``, 8 s by default) so it does not race the
callback. Target: p99 <= 100 ms on loopback. Also printed: the split at the
job's own ``succeeded`` timestamp, and ``start`` -> ``job.running``. Every
webhook's signature is verified after the run. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from harness import (
    CpuMeter,
    atelier_env,
    machine_note,
    percentile,
    processes,
    py_spy,
    start_api,
    start_sandbox,
    start_worker,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.infra.redis_server import RedisServer, free_port
from orchestrator.store.jobs import JobStore
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from orchestrator.wire.signing import verify
from providers.sandbox.serve import serving


@dataclass
class Arrival:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The client's webhook endpoint: timestamps and keeps every delivery."""

    arrivals: list[Arrival] = field(default_factory=list)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            at = time.time()
            body = await request.body()
            self.arrivals.append(Arrival(at, dict(request.headers), body))
            return Response(status_code=204)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


def iso_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ms_line(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"p50 {percentile(values, 50) * 1000:.0f} ms, p90 {percentile(values, 90) * 1000:.0f} ms, "
            f"p99 {percentile(values, 99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms (n={len(values)})")


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine_note()}")
    receiver = Receiver()
    server = RedisServer().start()
    storage = tempfile.TemporaryDirectory(prefix="atelier-bench-storage-")
    try:
        with processes(keep_logs=args.keep_logs) as procs:
            sandbox, sandbox_url = start_sandbox(procs)
            sim = httpx.AsyncClient(base_url=f"{sandbox_url}/replicate", headers={"Authorization": "Bearer bench"})
            resp = await sim.post("/_sim/config", json={"queue_seconds": args.queue_seconds,
                                                        "run_seconds": args.run_seconds})
            resp.raise_for_status()
            port = free_port()
            env = atelier_env(redis_url=server.url, storage_url=f"file://{storage.name}", sandbox=1,
                              sandbox_url=sandbox_url, public_url=f"http://127.0.0.1:{port}", callbacks="on",
                              poll_min_seconds=args.poll_min, worker_poll_delay=args.worker_poll_delay,
                              log_level=args.log_level, worker_metrics_port=0, webhook_allow_private="true",
                              webhook_endpoint_concurrency=args.endpoint_concurrency,
                              webhook_endpoint_concurrency_max=args.endpoint_concurrency_max)
            redis = await connect(server.url, "atelier:jobs")
            api_key = await create_api_key(redis, "bench")
            api = start_api(procs, env, port)
            workers = [start_worker(procs, env, f"worker{i}") for i in range(args.workers)]
            async with serving(receiver.app()) as receiver_url, httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=60,
                    headers={"Authorization": f"Bearer {api_key}"}) as client:
                secret = (await client.get("/v1/webhook-secret")).json()["secret"]
                body = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
                        "input": {"prompt": "a lighthouse at dusk"}, "webhook_url": f"{receiver_url}/hook"}
                post_latencies: list[float] = []
                failures: list[str] = []
                submitted: set[str] = set()

                async def submit() -> None:
                    t = time.perf_counter()
                    try:
                        r = await client.post("/v1/jobs", json=body)
                        r.raise_for_status()
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        return
                    post_latencies.append(time.perf_counter() - t)
                    submitted.add(r.json()["id"])

                def succeeded() -> int:
                    return sum(1 for a in receiver.arrivals if b'"type":"job.succeeded"' in a.body)

                # Warm up (connections, caches, the simulator's webhook secret), then forget it.
                await asyncio.gather(*(submit() for _ in range(10)))
                warm_deadline = time.monotonic() + args.run_seconds + args.queue_seconds + 30
                while succeeded() < len(submitted) and time.monotonic() < warm_deadline:
                    await asyncio.sleep(0.2)
                receiver.arrivals.clear()
                post_latencies.clear()
                submitted.clear()

                total = int(args.rate * args.seconds)
                assert server.process is not None
                meter = CpuMeter({"api": api.pid, **{w.name: w.pid for w in workers}, "sandbox": sandbox.pid,
                                  "bench": os.getpid(), "redis": server.process.pid})
                meter.start()
                if args.py_spy:
                    py_spy(procs, {"api": api.pid, **{w.name: w.pid for w in workers}}, args.py_spy,
                           min(args.seconds, 60))
                tasks = []
                t0 = time.perf_counter()
                for i in range(total):  # open loop: the schedule does not wait for answers
                    await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
                    tasks.append(asyncio.create_task(submit()))
                await asyncio.gather(*tasks)
                submit_seconds = time.perf_counter() - t0
                deadline = time.monotonic() + args.run_seconds + args.queue_seconds + args.drain_seconds
                while time.monotonic() < deadline:
                    procs.check()
                    if succeeded() >= total - len(failures):
                        break
                    await asyncio.sleep(0.2)
                cpu = meter.report()

                # Read back each prediction's completed_at / started_at from the simulator.
                events: dict[str, dict[str, tuple[float, dict[str, object]]]] = {}
                bad_signatures = 0
                for a in receiver.arrivals:
                    if not verify(secret, a.headers, a.body, tolerance=None):
                        bad_signatures += 1
                    payload = json.loads(a.body)
                    data = payload["data"]
                    if data["id"] in submitted:  # (not a late warm-up job)
                        events.setdefault(data["id"], {})[payload["type"]] = (a.at, data)
                sem = asyncio.Semaphore(16)

                async def prediction(task_id: str) -> dict[str, object]:
                    async with sem:
                        r = await sim.get(f"/v1/predictions/{task_id}")
                        r.raise_for_status()
                        result: dict[str, object] = r.json()
                        return result

                job_ids = [j for j, ev in events.items() if "job.succeeded" in ev]
                predictions = await asyncio.gather(*(
                    prediction(str(events[j]["job.succeeded"][1]["provider_task_id"])) for j in job_ids))
                sim_stats = (await sim.get("/_sim/stats")).json()
                await sim.aclose()
                # The worker's own record of each attempt: how long its POST took, seen from the worker.
                store = JobStore(redis)
                records = [await store.get_delivery(i) for i in {a.headers["webhook-id"] for a in receiver.arrivals}]
                attempts = [a for d in records if d is not None for a in d.attempts]
                post_ms = [a.latency_ms / 1000 for a in attempts]
                retried = sum(1 for d in records if d is not None and len(d.attempts) > 1)
            await redis.aclose()
    finally:
        server.close()
        storage.cleanup()

    end_to_end, detect, deliver, running = [], [], [], []
    for job_id, pred in zip(job_ids, predictions, strict=True):
        arrived, data = events[job_id]["job.succeeded"]
        completed = iso_ts(str(pred["completed_at"]))
        succeeded_at = iso_ts(str(data["timestamps"]["succeeded"]))  # type: ignore[index]
        end_to_end.append(arrived - completed)
        detect.append(succeeded_at - completed)
        deliver.append(arrived - succeeded_at)
        if "job.running" in events[job_id] and pred.get("started_at"):
            running.append(events[job_id]["job.running"][0] - iso_ts(str(pred["started_at"])))
    print(f"rate: {args.rate:g} jobs/s for {args.seconds:g} s ({total} jobs; submitting took {submit_seconds:.1f} s, "
          f"POST p50 {percentile(post_latencies, 50) * 1000:.0f} ms, p99 "
          f"{percentile(post_latencies, 99) * 1000:.0f} ms, {len(failures)} failed)")
    print(f"setup: 1 API + {args.workers} worker process(es), simulator run {args.run_seconds:g} s (queue "
          f"{args.queue_seconds:g} s), ATELIER_WORKER_POLL_DELAY={args.worker_poll_delay:g}, "
          f"ATELIER_POLL_MIN_SECONDS={args.poll_min:g}, logs at {args.log_level}")
    print(f"job.succeeded webhooks received: {len(job_ids)} of {total}; {len(receiver.arrivals)} deliveries in all, "
          f"{bad_signatures} with a bad signature")
    print(f"provider completed -> client webhook delivered: {ms_line(end_to_end)}   (target p99 <= 100 ms)")
    print(f"  completed -> job succeeded (callback, fetch, store): {ms_line(detect)}")
    print(f"  job succeeded -> webhook arrived (delivery queue):   {ms_line(deliver)}")
    print(f"provider started -> job.running webhook delivered:   {ms_line(running)}")
    print(f"webhook attempts as the worker timed its POST: {ms_line(post_ms)}; {retried} deliveries retried")
    print(f"simulator requests: {json.dumps(sim_stats['requests'])}")
    print(cpu)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="jobs per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to submit")
    parser.add_argument("--run-seconds", type=float, default=2.0, help="simulated prediction run time")
    parser.add_argument("--queue-seconds", type=float, default=0.2, help="simulated time before it starts")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-poll-delay", type=float, default=0.05, help="ATELIER_WORKER_POLL_DELAY")
    parser.add_argument("--poll-min", type=float, default=2.0, help="ATELIER_POLL_MIN_SECONDS")
    parser.add_argument("--drain-seconds", type=float, default=120.0, help="how long to wait for stragglers")
    parser.add_argument("--endpoint-concurrency", type=int, default=None,
                        help="ATELIER_WEBHOOK_ENDPOINT_CONCURRENCY (unset: the default)")
    parser.add_argument("--endpoint-concurrency-max", type=int, default=None,
                        help="ATELIER_WEBHOOK_ENDPOINT_CONCURRENCY_MAX (unset: the default; equal to the first: fixed)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the API and the workers into DIR/*.raw")
    asyncio.run(main(parser.parse_args()))
