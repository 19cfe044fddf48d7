"""In-flight benchmark: many jobs waiting minutes at a provider, on one key with a request budget.

    .venv/bin/python bench/inflight.py [--jobs 100000] [--budget 50] [--callbacks both|off|on]
    .venv/bin/python bench/inflight.py --jobs 10000          # a quicker run

What runs: a private redis-server, ``atelier serve`` and one ``atelier worker``
(separate processes), and a Replicate simulator in its own process that
enforces a per-key limit of --budget status reads per second (token bucket,
1 s burst; beyond it ``429`` with ``Retry-After``), as Replicate does for its
non-create endpoints (3,000/min). Creates and downloads are not limited by the
simulator. Atelier is configured with the same budget (``ATELIER_REPLICATE_RPM``
and ``rpm`` in the TOML file) and ``typical_seconds = {video = --typical}``.

1. Fill: --jobs video jobs in batches of 10,000 (``POST /v1/batches``); wait until
   every job is accepted by the provider. The predictions run "forever".
2. Wait: the simulator finishes --finish-rate predictions per second (oldest
   first, like a FIFO render farm) for --window seconds, while every other job
   keeps waiting; then --grace more seconds for Atelier to notice the last ones.
   Meanwhile the bench reads random jobs through ``GET /v1/jobs/{id}``.

Printed per variant (without, then with, provider callbacks): Redis memory per
job (``used_memory`` delta / jobs after the fill), worker RSS, status reads
(polls) per job, 429s received, the worker's arq jobs in progress while all
wait, API p99 for ``GET /v1/jobs/{id}``, and the detection delay (provider
completion -> Atelier saw the outputs, ``outputs_ready_at``) p50/p99 against
two references for the budget: "round robin" (every waiting job read once per
jobs/budget seconds: p50 = jobs/(2*budget)) and "oracle" (only finished jobs read,
in completion order, at the budget). Targets (issue 8): <= 4 KB Redis per job,
worker RSS <= 300 MB, API p99 <= 50 ms, zero 429s, delay <= 2x the budget's
ideal, p99 <= 1 s with callbacks. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from harness import (
    CpuMeter,
    Procs,
    atelier_env,
    machine_note,
    percentile,
    processes,
    start_api,
    start_worker,
    wait_http,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from orchestrator.infra.redis_server import RedisServer, free_port
from orchestrator.infra.settings import Settings
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from providers.sandbox.base import SimConfig, SimTask, bearer
from providers.sandbox.replicate import ReplicateSimulator
from providers.sandbox.serve import serving

FOREVER = 10 * 365 * 86400.0
MODEL = "minimax/video-01"
TENANT = "bench"


# -- the simulated provider (its own process) ---------------------------------------------

class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class BudgetedReplicate(ReplicateSimulator):
    """Replicate's simulator with a per-key status-read limit, callbacks sent from one scheduler
    (not one coroutine per prediction, so 100,000 of them cost nothing while they wait), and a
    control route that decides when predictions finish."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.buckets: dict[str, TokenBucket] = {}
        self.counts: Counter[str] = Counter()
        self.planned: dict[str, float] = {}
        self.hooks: dict[str, tuple[str, list[str], str]] = {}  # task id -> (url, events, origin)
        self.heap: list[tuple[float, str, str]] = []
        self.wake = asyncio.Event()
        self.dispatcher: asyncio.Task[None] | None = None
        self.sending: set[asyncio.Task[None]] = set()
        super().__init__(SimConfig(queue_seconds=0.0, run_seconds=FOREVER))

    def routes(self) -> list[BaseRoute]:
        return [Route("/_bench/plan", self.plan, methods=["POST"]),
                Route("/_bench/stats", self.bench_stats, methods=["GET"]),
                Route("/_bench/planned", self.planned_tasks, methods=["GET"]),
                *super().routes()]

    def _limited(self, request: Request) -> Response | None:
        self.counts["reads"] += 1
        key = bearer(request) or ""
        wait = self.buckets.setdefault(key, TokenBucket(self.budget)).take()
        if wait <= 0:
            return None
        self.counts["reads_429"] += 1
        return self.error_response(429, "throttled", {"Retry-After": str(max(1, math.ceil(wait)))})

    async def get_prediction(self, request: Request) -> Response:
        return self._limited(request) or await super().get_prediction(request)

    async def list_predictions(self, request: Request) -> Response:
        return self._limited(request) or await super().list_predictions(request)

    async def create_version(self, request: Request) -> Response:
        self.counts["creates"] += 1
        return await super().create_version(request)

    async def create_official(self, request: Request) -> Response:
        self.counts["creates"] += 1
        return await super().create_official(request)

    # -- callbacks from one scheduler ------------------------------------------------
    def _schedule_webhooks(self, task: SimTask, url: str, events: list[str], origin: str) -> None:
        self.hooks[task.id] = (url, events, origin)
        if "start" in events:
            self._push(task.started_at, "start", task.id)
        if self.dispatcher is None:
            self.dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    def _push(self, at: float, kind: str, task_id: str) -> None:
        heapq.heappush(self.heap, (at, kind, task_id))
        self.wake.set()

    async def _dispatch(self) -> None:
        while True:
            now = time.time()
            while self.heap and self.heap[0][0] <= now:
                _, kind, task_id = heapq.heappop(self.heap)
                hook = self.hooks.get(task_id)
                task = self.tasks.get(task_id)
                if hook is None or task is None:
                    continue
                url, events, origin = hook
                if kind == "completed":
                    if task.phase(now) != "done":
                        continue
                    del self.hooks[task_id]
                self.counts[f"webhooks_{kind}"] += 1
                sender = asyncio.create_task(self._send(url, task, origin))
                self.sending.add(sender)
                sender.add_done_callback(self.sending.discard)
            self.wake.clear()
            timeout = min(1.0, self.heap[0][0] - time.time()) if self.heap else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.001, timeout))

    async def _send(self, url: str, task: SimTask, origin: str) -> None:
        async with self.callback_client(10) as client:
            await self._post_webhook(client, url, task, origin)

    # -- control -----------------------------------------------------------------------
    async def plan(self, request: Request) -> Response:
        """``{"start": t, "rate": r, "count": k}``: the k oldest predictions finish at t, t + 1/r, ..."""
        body = await request.json()
        start, rate, count = float(body["start"]), float(body["rate"]), int(body["count"])
        oldest = sorted(self.tasks.values(), key=lambda t: t.created_at)[:count]
        for i, task in enumerate(oldest):
            finish = start + i / rate
            task.run_seconds = finish - task.created_at - task.queue_seconds
            self.planned[task.id] = finish
            hook = self.hooks.get(task.id)
            if hook is not None and "completed" in hook[1]:
                self._push(finish, "completed", task.id)
        return JSONResponse({"planned": len(oldest)})

    async def bench_stats(self, request: Request) -> Response:
        return JSONResponse({**self.counts, "tasks": len(self.tasks), "creations": self.stats.creations,
                             "downloads": self.stats.requests.get("download", 0)})

    async def planned_tasks(self, request: Request) -> Response:
        return JSONResponse(self.planned)


def serve_simulator(port: int, budget: float) -> None:
    """Entry point of the simulator process (``--serve-sim``)."""
    sim = BudgetedReplicate(budget)

    async def run() -> None:
        async with serving(Starlette(routes=[Mount("/replicate", app=sim.app)]), port=port):
            await asyncio.Event().wait()

    asyncio.run(run())


# -- the benchmark ------------------------------------------------------------------------

def budget_support(rpm: float, config_file: str) -> str:
    """Whether this Atelier knows the request-budget settings the bench sets."""
    env_known = "replicate_rpm" in Settings.model_fields
    try:
        cfg = Settings(sandbox=True, config_file=Path(config_file)).provider_settings()["replicate"]
        file_rpm = getattr(cfg, "rpm", None)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        file_rpm = f"error: {exc}"
    return (f"ATELIER_REPLICATE_RPM={rpm:g} ({'a known setting' if env_known else 'NOT a known setting'}), "
            f"TOML rpm -> provider settings rpm={file_rpm}")


async def redis_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def command_calls(redis: Any) -> Counter[str]:
    """Calls per Redis command so far (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


async def count_status(redis: Any, *statuses: str) -> int:
    return sum([int(await redis.zcard(f"atl:t:{TENANT}:st:{s}")) for s in statuses])


async def in_progress(redis: Any) -> int:
    """arq jobs being run (not counting arq's cron markers, which hold no slot)."""
    n = 0
    async for key in redis.scan_iter(match="arq:in-progress:*", count=5000):
        n += b":cron:" not in key
    return n


def key_pattern(key: str) -> str:
    """``atl:job:job_01J...:ev`` -> ``atl:job:*:ev``: ids become ``*``, numbers ``#``."""
    parts = []
    for part in key.split(":"):
        if part.isdigit():
            parts.append("#")
        elif len(part) >= 10 and any(c.isdigit() for c in part):
            parts.append("*")
        else:
            parts.append(part)
    return ":".join(parts)


async def memory_by_key(redis: Any, jobs: int, sample: int = 50_000) -> list[str]:
    """Redis memory by key pattern (``MEMORY USAGE`` of up to ``sample`` keys, scaled to all)."""
    total_keys = int(await redis.dbsize())
    keys: list[str] = []
    async for key in redis.scan_iter(count=5000):
        keys.append(key.decode() if isinstance(key, bytes) else key)
        if len(keys) >= sample:
            break
    scale = total_keys / max(1, len(keys))
    usage: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for start in range(0, len(keys), 2000):
        pipe = redis.pipeline(transaction=False)
        chunk = keys[start:start + 2000]
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(chunk, await pipe.execute(), strict=True):
            usage[key_pattern(key)] += int(used or 0)
            counts[key_pattern(key)] += 1
    return [f"{pattern} x{counts[pattern] * scale:,.0f}: {used * scale / jobs:,.0f} B/job"
            for pattern, used in usage.most_common(12)]


def oracle_delays(finishes: list[float], budget: float) -> list[float]:
    """Delays if only finished jobs were read, in completion order, at the budget."""
    delays, free_at = [], 0.0
    for c in sorted(finishes):
        free_at = max(c, free_at + 1 / budget)
        delays.append(free_at - c)
    return delays


def fmt_s(values: list[float], censored: int = 0) -> str:
    if not values:
        return f"none noticed ({censored} not noticed)"
    p50, p99 = percentile(values, 50), percentile(values, 99)
    tail = f", {censored} not noticed by the end (p99 is then a lower bound)" if censored else ""
    return f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {max(values):.2f} s (n={len(values)}{tail})"


async def run_variant(args: argparse.Namespace, callbacks: bool) -> None:
    label = "with callbacks" if callbacks else "without callbacks"
    print(f"\n=== {args.jobs:,} jobs in flight, one key, budget {args.budget:g} req/s, {label} ===", flush=True)
    server = RedisServer().start()
    storage = tempfile.TemporaryDirectory(prefix="atelier-bench-storage-")
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115 - removed below
    rpm = args.budget * 60
    config.write(f"[providers.replicate]\ntypical_seconds = {{ video = {args.typical:g} }}\nrpm = {rpm:g}\n")
    config.close()
    try:
        with processes(keep_logs=args.keep_logs) as procs:
            await _run(args, callbacks, procs, server, storage.name, config.name, rpm)
    finally:
        server.close()
        storage.cleanup()
        os.unlink(config.name)


async def _run(args: argparse.Namespace, callbacks: bool, procs: Procs, server: RedisServer, storage: str,
               config_file: str, rpm: float) -> None:
    sim_port = free_port()
    sim = procs.spawn("simulator", [sys.executable, __file__, "--serve-sim", str(sim_port),
                                    "--budget", str(args.budget)])
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait_http(f"{sim_url}/replicate/_bench/stats", sim)
    port = free_port()
    env = atelier_env(redis_url=server.url, storage_url=f"file://{storage}", sandbox=1, sandbox_url=sim_url,
                      public_url=f"http://127.0.0.1:{port}", callbacks="on" if callbacks else "off",
                      config_file=config_file, replicate_rpm=rpm, log_level=args.log_level,
                      worker_metrics_port=0)
    print(f"budget setting: {budget_support(rpm, config_file)}")
    redis = await connect(server.url, "atelier:jobs")
    api_key = await create_api_key(redis, TENANT)
    api = start_api(procs, env, port)
    worker = start_worker(procs, env)
    simc = httpx.AsyncClient(base_url=f"{sim_url}/replicate", timeout=60)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                               headers={"Authorization": f"Bearer {api_key}"})
    try:
        await asyncio.sleep(2)
        mem0 = await redis_memory(redis)

        # 1. Fill.
        t_fill = time.time()
        job_ids: list[str] = []
        accept_seconds = []
        for start in range(0, args.jobs, 10_000):
            items = [{"provider": "replicate", "kind": "video", "model": MODEL, "ref": f"r{i}",
                      "input": {"prompt": f"shot {i}: a lighthouse at dusk"}}
                     for i in range(start, min(args.jobs, start + 10_000))]
            t = time.perf_counter()
            resp = await client.post("/v1/batches", json={"jobs": items})
            accept_seconds.append(time.perf_counter() - t)
            resp.raise_for_status()
            job_ids += [item["job_id"] for item in resp.json()["items"]]
        print(f"fill: {len(job_ids):,} jobs accepted in {len(accept_seconds)} batch request(s), "
              f"{sum(accept_seconds):.1f} s", flush=True)
        last_print = time.time()
        last_change, last_count = time.time(), -1
        while True:
            procs.check()
            waiting = await count_status(redis, "submitted", "running")
            failed = await count_status(redis, "failed", "canceled", "timed_out")
            if waiting + failed >= args.jobs:
                break
            if waiting + failed > last_count:
                last_change, last_count = time.time(), waiting + failed
            elif time.time() - last_change > args.fill_stall:
                queued = await count_status(redis, "queued", "submitting")
                print(f"fill: STALLED: no job reached the provider for {args.fill_stall:.0f} s; {queued:,} still "
                      f"queued or submitting after {time.time() - t_fill:.0f} s (going on without them)")
                break
            if time.time() - t_fill > args.fill_timeout:
                print(f"fill: gave up after {args.fill_timeout:.0f} s with {waiting:,} at the provider")
                break
            if time.time() - last_print > 30:
                print(f"  ... {waiting:,} at the provider after {time.time() - t_fill:.0f} s", flush=True)
                last_print = time.time()
            await asyncio.sleep(1)
        t0 = time.time()
        fill_stats = (await simc.get("/_bench/stats")).json()
        mem_filled = await redis_memory(redis)
        breakdown = await memory_by_key(redis, args.jobs)
        print(f"fill: {waiting:,} jobs waiting at the provider ({failed} failed) after {t0 - t_fill:.0f} s "
              f"({waiting / max(1e-9, t0 - t_fill):.0f} submits/s); during the fill: "
              f"{fill_stats.get('reads', 0):,} status reads, {fill_stats.get('reads_429', 0):,} answered 429, "
              f"{fill_stats.get('webhooks_start', 0):,} start callbacks", flush=True)

        # 2. Wait: the oldest `finishing` predictions finish at --finish-rate; the rest keep running.
        finishing = min(waiting, int(args.finish_rate * args.window))
        first_finish = t0 + args.lead
        await simc.post("/_bench/plan", json={"start": first_finish, "rate": args.finish_rate, "count": finishing})
        planned: dict[str, float] = (await simc.get("/_bench/planned")).json()
        pipe = redis.pipeline(transaction=False)
        for task_id in planned:
            pipe.get(f"atl:ptask:replicate:{task_id}")
        owners = [o.decode() if isinstance(o, bytes) else o for o in await pipe.execute()]
        finish_of_job = {job: planned[task] for task, job in zip(planned, owners, strict=True) if job}
        end = first_finish + finishing / args.finish_rate + args.grace
        print(f"wait: {finishing:,} predictions finish from t0+{args.lead:g} s at {args.finish_rate:g}/s "
              f"(over {finishing / args.finish_rate:.0f} s), then up to {args.grace:.0f} s grace; the other "
              f"{waiting - finishing:,} keep running", flush=True)

        api_latencies: list[float] = []
        api_errors: list[int] = []
        stop = asyncio.Event()

        async def sample_api() -> None:
            i = 0
            started = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(max(0.0, started + i / args.api_rate - time.perf_counter()))
                i += 1
                t = time.perf_counter()
                try:
                    r = await client.get(f"/v1/jobs/{random.choice(job_ids)}")
                    api_latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        api_errors.append(r.status_code)
                except httpx.HTTPError:
                    api_errors.append(0)

        reads_per_second: list[float] = []
        rss: list[float] = []
        progress: list[int] = []

        async def sample_system() -> None:
            last = (time.perf_counter(), fill_stats.get("reads", 0))
            n = 0
            while not stop.is_set():
                await asyncio.sleep(1.0)
                stats = (await simc.get("/_bench/stats")).json()
                now = time.perf_counter()
                reads_per_second.append((stats.get("reads", 0) - last[1]) / (now - last[0]))
                last = (now, stats.get("reads", 0))
                rss.append(worker.rss_mb())
                n += 1
                if n % 10 == 0:
                    progress.append(await in_progress(redis))

        meter = CpuMeter({"api": api.pid, "worker": worker.pid, "simulator": sim.pid, "redis": server.process.pid
                          if server.process else 0, "bench": os.getpid()})
        meter.start()
        calls0 = await command_calls(redis)
        samplers = [asyncio.create_task(sample_api()), asyncio.create_task(sample_system())]
        noticed: dict[str, float] = {}
        last_print = time.time()
        while time.time() < end:
            procs.check()
            await asyncio.sleep(2)
            pending = [j for j in finish_of_job if j not in noticed]
            for start in range(0, len(pending), 2000):
                chunk = pending[start:start + 2000]
                pipe = redis.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hget(f"atl:job:{job_id}", "d")
                for job_id, raw in zip(chunk, await pipe.execute(), strict=True):
                    seen = noticed_at(raw)
                    if seen is not None:
                        noticed[job_id] = seen
            if time.time() > first_finish + finishing / args.finish_rate and len(noticed) >= len(finish_of_job):
                break
            if time.time() - last_print > 30:
                print(f"  ... t0+{time.time() - t0:.0f} s: {len(noticed):,} of {len(finish_of_job):,} finished "
                      f"predictions noticed", flush=True)
                last_print = time.time()
        stop.set()
        await asyncio.gather(*samplers)
        wait_seconds = time.time() - t0
        cpu = meter.report()
        calls = await command_calls(redis)
        calls.subtract(calls0)
        redis_rate = (f"{sum(calls.values()) / wait_seconds:,.0f} commands/s ("
                      + ", ".join(f"{name} {n / wait_seconds:,.0f}/s" for name, n in calls.most_common(8)) + ")")
        wait_stats = (await simc.get("/_bench/stats")).json()
        mem_end = await redis_memory(redis)
        peak_rss = worker.peak_rss_mb()
        end_rss = worker.rss_mb()
    finally:
        await simc.aclose()
        await client.aclose()
        await redis.aclose()

    # 3. Report.
    delays = [noticed[j] - finish_of_job[j] for j in noticed]
    censored = len(finish_of_job) - len(noticed)
    reads = wait_stats.get("reads", 0) - fill_stats.get("reads", 0)
    r429 = wait_stats.get("reads_429", 0) - fill_stats.get("reads_429", 0)
    per_job_mem = (mem_filled - mem0) / args.jobs
    rr_p50, rr_p99 = waiting / (2 * args.budget), 0.99 * waiting / args.budget
    oracle = oracle_delays(list(finish_of_job.values()), args.budget)
    print(f"Redis memory per job:  {per_job_mem / 1024:.2f} KB after the fill ({(mem_filled - mem0) / 2**20:.0f} MB "
          f"for {args.jobs:,} jobs), {(mem_end - mem0) / args.jobs / 1024:.2f} KB at the end   (target <= 4 KB)")
    print(f"  by key (after the fill): {'; '.join(breakdown)}")
    print(f"worker RSS:            {end_rss:.0f} MB at the end, peak {peak_rss:.0f} MB   (target <= 300 MB)")
    print(f"status reads (polls):  {reads:,} in {wait_seconds:.0f} s of waiting = {reads / waiting:.2f} per "
          f"waiting job ({reads / wait_seconds:.1f}/s on average, busiest second "
          f"{max(reads_per_second, default=0):.0f}/s; "
          f"budget {args.budget:g}/s); {fill_stats.get('reads', 0):,} more during the fill")
    print(f"429s received:         {r429:,} while waiting, {fill_stats.get('reads_429', 0):,} during the fill   "
          f"(target 0)")
    print(f"worker slots:          at most {max(progress, default=0)} arq jobs in progress while "
          f"{waiting:,} jobs waited (samples every 10 s: {progress[:12]}{' ...' if len(progress) > 12 else ''})")
    print(f"GET /v1/jobs/{{id}}:     p50 {percentile(api_latencies, 50) * 1000:.1f} ms, "
          f"p99 {percentile(api_latencies, 99) * 1000:.1f} ms, max {max(api_latencies, default=0) * 1000:.0f} ms "
          f"({len(api_latencies):,} requests at {args.api_rate:g}/s, {len(api_errors)} errors)   (target p99 <= 50 ms)")
    print(f"detection delay:       {fmt_s(delays, censored)}")
    print(f"  ideal, round robin:  p50 {rr_p50:.2f} s, p99 {rr_p99:.2f} s (every waiting job read once per "
          f"{waiting / args.budget:.0f} s)")
    print(f"  ideal, oracle:       p50 {percentile(oracle, 50):.2f} s, p99 {percentile(oracle, 99):.2f} s (only "
          f"finished jobs read, at the budget)")
    if delays:
        print(f"  measured / round-robin ideal: p50 {percentile(delays, 50) / rr_p50:.2f}x, p99 "
              f"{percentile(delays, 99) / rr_p99:.2f}x   (target <= 2x; with callbacks p99 <= 1 s)")
    print(f"Redis while waiting:   {redis_rate}")
    print(f"simulator:             {json.dumps(wait_stats)}")
    print(cpu, flush=True)


def noticed_at(raw: bytes | str | None) -> float | None:
    """When Atelier saw the provider's outputs (``outputs_ready_at``), else ``None``."""
    if raw is None:
        return None
    job = json.loads(raw)
    seen = job.get("outputs_ready_at", (job.get("provider_data") or {}).get("outputs_ready_at"))
    return float(seen) if seen is not None else None


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine_note()}")
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.callbacks]
    for callbacks in variants:
        await run_variant(args, callbacks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--budget", type=float, default=50.0, help="status reads per second for the key")
    parser.add_argument("--callbacks", choices=["both", "off", "on"], default="both")
    parser.add_argument("--typical", type=float, default=300.0, help="typical_seconds for video (the TOML file)")
    parser.add_argument("--finish-rate", type=float, default=None,
                        help="predictions finishing per second while waiting (default: budget / 2)")
    parser.add_argument("--window", type=float, default=120.0, help="seconds during which predictions finish")
    parser.add_argument("--lead", type=float, default=10.0, help="seconds after the fill before the first finishes")
    parser.add_argument("--grace", type=float, default=None,
                        help="seconds to wait after the last finish (default: jobs / budget, at most 900)")
    parser.add_argument("--api-rate", type=float, default=20.0, help="GET /v1/jobs/{id} per second while waiting")
    parser.add_argument("--fill-timeout", type=float, default=3600.0)
    parser.add_argument("--fill-stall", type=float, default=120.0,
                        help="stop filling when no job reached the provider for this long")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--serve-sim", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sim:
        serve_simulator(args.serve_sim, args.budget)
    else:
        args.finish_rate = args.finish_rate or args.budget / 2
        args.grace = args.grace if args.grace is not None else min(900.0, args.jobs / args.budget)
        asyncio.run(main(args))
