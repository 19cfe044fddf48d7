"""Shared plumbing of the benchmark scripts (not a benchmark itself).

Each benchmark runs Atelier the way it runs in production: a private
``redis-server``, ``atelier serve`` and ``atelier worker`` as separate
processes, and the provider simulators (``atelier sandbox``, or a bench-owned
simulator process). This module starts and stops those processes and reads
what the benchmarks report about them (CPU seconds, RSS, percentiles).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orchestrator.infra.redis_server import free_port

CLI = [sys.executable, "-m", "orchestrator.cli"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def atelier_env(**settings: Any) -> dict[str, str]:
    """The environment of an Atelier process: ``ATELIER_<NAME>`` for every setting given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update({f"ATELIER_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    return env


@dataclass
class Proc:
    """A child process with its output in a log file (shown if it dies)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False
    watched: bool = True  # ``check()`` raises if it exited

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.watched and not self.stopped and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_status_mb(self.pid, "VmRSS")

    def peak_rss_mb(self) -> float:
        return proc_status_mb(self.pid, "VmHWM")

    def stop(self, timeout: float = 15.0) -> None:
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class Procs:
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None,
              watched: bool = True) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(list(args), env=dict(env or os.environ), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc = Proc(name, popen, log_path, watched=watched)
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        for p in self.procs:
            p.check()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@contextlib.contextmanager
def processes(keep_logs: bool = False) -> Iterator[Procs]:
    """Children started in the block are stopped at its end (their logs kept on request)."""
    tmp = tempfile.mkdtemp(prefix="atelier-bench-")
    procs = Procs(Path(tmp))
    try:
        yield procs
    finally:
        procs.stop_all()
        if keep_logs:
            print(f"(process logs kept in {tmp})")
        else:
            for f in Path(tmp).iterdir():
                f.unlink()
            Path(tmp).rmdir()


def wait_http(url: str, proc: Proc | None = None, timeout: float = 30.0) -> None:
    """Until ``url`` answers (any status), or raise (with the process's log if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check()
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def start_sandbox(procs: Procs) -> tuple[Proc, str]:
    """``atelier sandbox`` on a free port; returns it and its URL."""
    port = free_port()
    proc = procs.spawn("sandbox", [*CLI, "sandbox", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/replicate/_sim/stats", proc)
    return proc, url


def start_api(procs: Procs, env: Mapping[str, str], port: int) -> Proc:
    proc = procs.spawn("api", [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def start_worker(procs: Procs, env: Mapping[str, str], name: str = "worker") -> Proc:
    return procs.spawn(name, [*CLI, "worker", "--metrics-port", "0", "--completion-wait", "2"], env)


def py_spy(procs: Procs, targets: Mapping[str, int], out_dir: str, seconds: float) -> list[Proc]:
    """Sample ``targets`` (name -> pid) with py-spy for ``seconds`` into ``out_dir/<name>.raw``
    (collapsed stacks; view them with any flame-graph tool, or sort them by count)."""
    exe = str(Path(sys.executable).with_name("py-spy"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [procs.spawn(f"py-spy-{name}", [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw",
                                           "-o", str(Path(out_dir) / f"{name}.raw"), "--nonblocking"],
                        watched=False)
            for name, pid in targets.items()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def proc_status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def machine_note() -> str:
    load1, load5, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load1:.2f} (1 min) / {load5:.2f} (5 min) at start"


class CpuMeter:
    """CPU seconds used by each named process between ``start()`` and ``report()``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.before: dict[str, tuple[float, float]] = {}
        self.t0 = 0.0

    def start(self) -> None:
        self.before = {name: cpu_split(pid) for name, pid in self.pids.items()}
        self.t0 = time.perf_counter()

    def report(self) -> str:
        wall = time.perf_counter() - self.t0
        parts = []
        for name, pid in self.pids.items():
            user, system = (now - then for now, then in zip(cpu_split(pid), self.before[name], strict=True))
            parts.append(f"{name} {user + system:.1f}s ({100 * (user + system) / wall:.0f}%; {system:.1f}s system)")
        return f"CPU over {wall:.1f}s wall: " + ", ".join(parts)


class RawHttp:
    """One keep-alive HTTP/1.1 connection that sends requests and reads whole answers, for load
    generation. A benchmark's own client should cost the machine as little as it can: httpx took
    over half a core of this 2-core machine to post 150 jobs/s, CPU the processes measured then
    lacked. It understands what uvicorn answers (Content-Length bodies); nothing more."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body); raises ``ConnectionError`` when the connection failed (send it again)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{extra}Content-Length: {len(body)}\r\n\r\n"
                          .encode() + body)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            data = await self.reader.readexactly(int(fields.get("content-length", "0")))
        except (asyncio.IncompleteReadError, OSError) as exc:
            await self.close()
            raise ConnectionError(str(exc)) from exc
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
