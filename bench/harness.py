"""Shared plumbing of the benchmark scripts (not a benchmark itself).

Each benchmark runs Atelier the way it runs in production: a private
``redis-server``, ``atelier serve`` and ``atelier worker`` as separate
processes, and the provider simulators (``atelier sandbox``, or a bench-owned
simulator process). This module starts and stops those processes and reads
what the benchmarks report about them (CPU seconds, RSS, percentiles).
"""

from __future__ import annotations

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
