"""What a new user meets first: ``atelier dev`` as a real process, and operator commands pointed at
the wrong Redis (issue 18, "What a new user tripped on")."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from orchestrator.infra.redis_server import free_port
from tests.test_cli import atelier


def _children(pid: int, name: str) -> list[int]:
    """The processes called ``name`` whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition(") ")
        if comm.split("(", 1)[-1] == name and int(rest.split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_banner(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"atelier dev exited early:\n{''.join(lines)}")
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return "".join(lines)
    raise AssertionError(f"no banner within {timeout}s:\n{''.join(lines)}")


def test_dev_prints_its_exports_and_sigterm_stops_its_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "dev", "--port", str(free_port()), "--sandbox-port",
         str(free_port()), "--storage", str(tmp_path / "store")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = _read_banner(proc)
        exports = dict(re.findall(r"(ATELIER_[A-Z_]+)=(\S+)", banner.split("export ", 1)[1].splitlines()[0]))
        assert set(exports) == {"ATELIER_URL", "ATELIER_API_KEY", "ATELIER_REDIS_URL"}, banner
        assert "private-address guard OFF" in banner and "ATELIER_WEBHOOK_ALLOW_PRIVATE=true" in banner
        servers = _children(proc.pid, "redis-server")
        assert len(servers) == 1, banner

        # The exports make the other commands talk to this stack: a key made with them works on its API.
        made = atelier("keys", "create", "--tenant", "other", env={**env, **exports})
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        seen = httpx.get(f"{exports['ATELIER_URL']}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert seen.status_code == 200 and seen.json()["data"] == []
        listed = atelier("jobs", "list", env={**env, **exports})
        assert listed.returncode == 0, listed.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped" in (proc.stdout.read() if proc.stdout else "")
        deadline = time.monotonic() + 10
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(servers[0]), "atelier dev left its private redis-server running after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_operator_commands_refuse_a_redis_without_atelier_data(redis_url):
    """An empty Redis (the default URL next to `atelier dev`) is not written to without --init."""
    r = redis.Redis.from_url(redis_url)
    env = {"ATELIER_REDIS_URL": redis_url}
    refused = atelier("keys", "create", "--tenant", "other", env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "holds no Atelier data" in refused.stderr and "ATELIER_REDIS_URL" in refused.stderr
    assert "--init" in refused.stderr and "atelier dev" in refused.stderr
    retention = atelier("tenants", "retention", "--tenant", "other", "--seconds", "60", env=env)
    assert retention.returncode == 1 and "holds no Atelier data" in retention.stderr
    assert r.keys("*") == []  # nothing was written

    # Reads go on, saying which Redis they read.
    listed = atelier("quarantine", "list", env=env)
    assert listed.returncode == 0 and "no quarantined records" in listed.stdout
    assert "holds no Atelier data" in listed.stderr

    # --init starts a deployment on it; from then on no flag is needed.
    made = atelier("keys", "create", "--tenant", "other", "--init", env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("atl_") and "new deployment" in made.stderr
    assert r.exists("atl:deployment")
    again = atelier("keys", "create", "--tenant", "third", env=env)
    assert again.returncode == 0 and again.stdout.strip().startswith("atl_"), again.stderr
    assert atelier("tenants", "retention", "--tenant", "other", "--seconds", "60", env=env).returncode == 0
    assert "holds no Atelier data" not in atelier("quarantine", "list", env=env).stderr


async def test_a_redis_an_atelier_server_used_is_recognised(redis_url, stack):
    """The API and workers mark their Redis when they start; an older deployment's atl: keys count too."""
    r = redis.Redis.from_url(redis_url)
    assert r.exists("atl:deployment")
    env = {"ATELIER_REDIS_URL": redis_url}
    made = await asyncio.to_thread(atelier, "keys", "create", "--tenant", "other", env=env)
    assert made.returncode == 0, made.stderr
    r.delete("atl:deployment")  # a deployment from before the marker: its keys say enough
    made = await asyncio.to_thread(atelier, "keys", "create", "--tenant", "third", env=env)
    assert made.returncode == 0, made.stderr
