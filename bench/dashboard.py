"""Dashboard page-load budget: the jobs page of a tenant with 10,000 jobs, first render and filters.

    .venv/bin/python bench/dashboard.py [--jobs 10000] [--repeat 40]

What runs: a private redis-server and the API (``create_app``, served by uvicorn in this process) with
no worker, so the jobs stay where the bench puts them: --jobs jobs in batches of 5,000 through
``POST /v1/batches`` (replicate images, fal images, kling videos; 1,000 of them canceled), signed in
to the dashboard with the tenant's API key.

Measured: server time (from the request reaching the app to the last byte of the response leaving
it, by an ASGI wrapper around the app) of ``GET /dashboard/jobs``: the first render after start-up,
then --repeat renders of the plain page and of each filter (status, provider, kind, model, batch,
time); p50 and p99 per page. Target (issue 19): under 300 ms server time. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from harness import machine_note, percentile

from orchestrator.api.app import create_app
from orchestrator.infra.redis_server import RedisServer
from orchestrator.infra.settings import Settings
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from providers.sandbox.serve import serving

TENANT = "bench"
TARGET_MS = 300.0
MIXES = [  # (share, provider, kind, model)
    (0.7, "replicate", "image", "black-forest-labs/flux-schnell"),
    (0.2, "fal", "image", "fal-ai/flux/schnell"),
    (0.1, "kling", "video", "kling-v1-6"),
]


class ServerTimer:
    """ASGI wrapper: the server time of each ``GET`` by path and query."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.times: dict[str, list[float]] = defaultdict(list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            query = scope.get("query_string", b"").decode()
            self.times[scope["path"] + ("?" + query if query else "")].append(
                (time.perf_counter() - started) * 1000)


def items(n: int, offset: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        k = (offset + i) % 10
        _, provider, kind, model = MIXES[0] if k < 7 else MIXES[1] if k < 9 else MIXES[2]
        out.append({"ref": f"item-{offset + i}", "provider": provider, "kind": kind, "model": model,
                    "input": {"prompt": f"bench tile {offset + i}"}})
    return out


async def fill(client: httpx.AsyncClient, jobs: int) -> list[str]:
    batches = []
    for offset in range(0, jobs, 5000):
        resp = await client.post("/v1/batches", json={"jobs": items(min(5000, jobs - offset), offset)})
        resp.raise_for_status()
        batches.append(resp.json()["id"])
    # Some canceled jobs (a batch's cancel is a worker's step, and no worker runs: one by one).
    listed = (await client.get(f"/v1/batches/{batches[-1]}/jobs", params={"limit": 1000})).json()["data"]
    for start in range(0, len(listed), 50):
        answers = await asyncio.gather(*(client.post(f"/v1/jobs/{j['id']}/cancel") for j in listed[start:start + 50]))
        for answer in answers:
            answer.raise_for_status()
    return batches


async def run(args: argparse.Namespace) -> None:
    print(f"dashboard bench: {args.jobs} jobs in one tenant; {machine_note()}")
    server = RedisServer().start()
    storage = tempfile.TemporaryDirectory(prefix="atelier-bench-")
    try:
        settings = Settings(redis_url=server.url, storage_url=f"file://{storage.name}", sandbox=True,
                            log_format="text", log_level="WARNING", max_batch_request_bytes=64 * 1024 * 1024)
        redis = await connect(settings.redis_url, settings.queue_name)
        api_key = await create_api_key(redis, TENANT)
        timer = ServerTimer(create_app(settings))
        async with serving(timer) as url, httpx.AsyncClient(base_url=url, timeout=300) as client:
            client.headers["Authorization"] = f"Bearer {api_key}"
            t0 = time.perf_counter()
            batches = await fill(client, args.jobs)
            print(f"filled in {time.perf_counter() - t0:.1f} s ({len(batches)} batches; 1,000 jobs canceled); "
                  f"Redis {int((await redis.info('memory'))['used_memory']) / 2**20:.0f} MB")
            del client.headers["Authorization"]
            signed = await client.post("/dashboard/login", data={"api_key": api_key})
            assert signed.status_code == 303, signed.text
            after = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
            pages = {
                "jobs (no filter)": "/dashboard/jobs",
                "status=canceled": "/dashboard/jobs?status=canceled",
                "status=succeeded (none)": "/dashboard/jobs?status=succeeded",
                "provider=kling (10%)": "/dashboard/jobs?provider=kling",
                "kind=video (10%)": "/dashboard/jobs?kind=video",
                "model=fal-ai/flux/schnell": "/dashboard/jobs?model=fal-ai%2Fflux%2Fschnell",
                "model=absent (reads 5,000)": "/dashboard/jobs?model=nobody%2Fnothing",
                "batch (first)": f"/dashboard/jobs?batch={batches[0]}",
                "provider=fal&status=queued": "/dashboard/jobs?provider=fal&status=queued",
                "created after a minute ago": f"/dashboard/jobs?after={after}",
            }
            first = await client.get(pages["jobs (no filter)"])
            assert first.status_code == 200 and first.text.count('<tr id="row-') == 50, first.text[:500]
            first_ms = timer.times[pages["jobs (no filter)"]][-1]
            timer.times.clear()
            for _ in range(args.repeat):
                for path in pages.values():
                    resp = await client.get(path)
                    assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
            print(f"first render after start-up: {first_ms:.1f} ms server time")
            print(f"{'page':<30} {'rows':>5} {'p50 ms':>8} {'p99 ms':>8}  (server time, {args.repeat} renders each)")
            worst = 0.0
            for name, path in pages.items():
                resp = await client.get(path)
                rows = resp.text.count('<tr id="row-')
                times = timer.times[path]
                p50, p99 = percentile(times, 50), percentile(times, 99)
                worst = max(worst, p99)
                print(f"{name:<30} {rows:>5} {p50:>8.1f} {p99:>8.1f}")
            verdict = "meets" if worst < TARGET_MS and first_ms < TARGET_MS else "MISSES"
            print(f"worst p99 {worst:.1f} ms: {verdict} the {TARGET_MS:.0f} ms target")
        await redis.aclose()
    finally:
        server.close()
        storage.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
