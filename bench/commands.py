"""The Redis commands one job costs, in order, by process (Redis MONITOR), on this machine.

    .venv/bin/python bench/commands.py [--jobs 1] [--warm 20] [--callbacks off|on] [--kind image]

Runs ``atelier serve``, ``atelier worker`` and ``atelier sandbox`` (Replicate completing at once)
on a private redis-server, warms them up with --warm jobs, then watches Redis with MONITOR while
--jobs more jobs (posted at once) run to ``succeeded``. Prints every command (commands a Lua script runs indented
under it) with the process that sent it, then the count per process and per job. It is the
count ``bench/throughput.py`` reports as "Redis commands per job", taken apart step by step.
Asserts nothing; the periodic work of the worker (sweeper, poll board ticks) shows up too, as it
does in the throughput count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx
from harness import atelier_env, processes, start_api, start_sandbox, start_worker

from orchestrator.infra.redis_server import RedisServer, free_port
from orchestrator.store.tenants import create_api_key

LINE = re.compile(r'^[\d.]+ \[\d+ (?P<client>[^\]]+)\] (?P<command>.*)$')
BODY = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
        "input": {"prompt": "a lighthouse at dusk"}}


def port_owners(redis_port: int, pids: dict[str, int]) -> dict[str, str]:
    """``ip:port`` of each connection to Redis -> the name of the process holding it (``ss -tnp``)."""
    names = {str(pid): name for name, pid in pids.items()}
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=False).stdout
    owners: dict[str, str] = {}
    for row in out.splitlines():
        parts = row.split()
        if len(parts) < 6 or not parts[4].endswith(f":{redis_port}"):
            continue
        found = re.search(r"pid=(\d+)", row)
        if found:
            owners[parts[3]] = names.get(found.group(1), f"pid {found.group(1)}")
    return owners


async def watch(port: int, seen: list[str]) -> None:
    """Append every line Redis's MONITOR sends to ``seen`` (a connection of its own, not counted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        while line := await reader.readline():
            seen.append(line.decode(errors="replace").rstrip("\r\n").removeprefix("+"))
    finally:
        writer.close()


def short(command: str, width: int = 150) -> str:
    return command if len(command) <= width else command[:width] + " ..."


async def run(args: argparse.Namespace) -> None:
    server = RedisServer().start()
    storage = tempfile.TemporaryDirectory(prefix="atelier-bench-storage-")
    try:
        with processes() as procs:
            sandbox, sandbox_url = start_sandbox(procs)
            port = free_port()
            env = atelier_env(redis_url=server.url, storage_url=f"file://{storage.name}", sandbox=1,
                              sandbox_url=sandbox_url, public_url=f"http://127.0.0.1:{port}",
                              callbacks=args.callbacks, log_level="WARNING", worker_metrics_port=0)
            from orchestrator.store.queue import connect
            redis = await connect(server.url, "atelier:jobs")
            api_key = await create_api_key(redis, "bench")
            api = start_api(procs, env, port)
            worker = start_worker(procs, env)
            body = dict(BODY, kind=args.kind)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                         headers={"Authorization": f"Bearer {api_key}"}) as client:
                await client.post(f"{sandbox_url}/replicate/_sim/config", json={"queue_seconds": 0, "run_seconds": 0})

                async def finished() -> int:  # read by this script's own connection (not counted)
                    return sum([int(await redis.zcard(f"atl:t:bench:st:{s}")) for s in ("succeeded", "failed")])

                async def run_jobs(n: int) -> None:
                    target = await finished() + n
                    await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(n)))
                    deadline = time.monotonic() + 60
                    while await finished() < target:
                        if time.monotonic() > deadline:
                            raise RuntimeError("jobs did not finish within 60 s")
                        await asyncio.sleep(0.02)

                await run_jobs(args.warm)
                await asyncio.sleep(1.0)
                seen: list[str] = []
                monitor = asyncio.create_task(watch(server.port, seen))
                await asyncio.sleep(0.3)
                await run_jobs(args.jobs)
                await asyncio.sleep(args.settle)
                owners = port_owners(server.port, {"api": api.pid, "worker": worker.pid, "bench": os.getpid()})
                monitor.cancel()
            await redis.aclose()
    finally:
        storage.cleanup()
        server.stop()
    per_process: Counter[str] = Counter()
    current = ""
    for raw in seen:
        m = LINE.match(raw)
        if not m:
            continue
        client, command = m.group("client"), m.group("command")
        if client == "lua":
            print(f"      {short(command)}")
            per_process[current] += 1
            continue
        current = owners.get(client, f"bench/{client}")
        if current.startswith("bench"):
            continue  # this script's own polling of the job's status
        print(f"{current:>7}  {short(command)}")
        per_process[current] += 1
    total = sum(per_process.values())
    print()
    for name, n in per_process.most_common():
        print(f"{name}: {n} commands ({n / args.jobs:.1f} per job)")
    print(f"all: {total} commands, {total / args.jobs:.1f} per job ({args.jobs} jobs, Lua commands counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to keep watching after the jobs finish")
    parser.add_argument("--callbacks", default="off")
    parser.add_argument("--kind", default="image")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
