"""The ``atelier`` command line, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tests.helpers import api, wait_for


def atelier(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_keys_create_prints_a_key_once(redis_url):
    # --init: the Redis is empty (tests/test_cli_dev.py: without it, an empty Redis is refused)
    out = atelier("keys", "create", "--tenant", "studio-7", "--init", env={"ATELIER_REDIS_URL": redis_url})
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("atl_") and "shown only this once" in out.stderr
    bad = atelier("keys", "create", "--tenant", "no spaces", env={"ATELIER_REDIS_URL": redis_url})
    assert bad.returncode == 1 and "tenant names" in bad.stderr


async def test_submit_and_get_against_a_running_server(stack):
    env = {"ATELIER_URL": stack.api_url, "ATELIER_API_KEY": stack.api_key}
    out = await asyncio.to_thread(atelier, "submit", "--provider", "replicate", "--kind", "image", "--model",
                                  "black-forest-labs/flux-schnell", "--prompt", "a fox", "--wait", env=env)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded"
    got = await asyncio.to_thread(atelier, "get", job["id"], env=env)
    assert json.loads(got.stdout)["id"] == job["id"]
    bad = await asyncio.to_thread(atelier, "submit", "--provider", "nope", "--kind", "image", "--model", "m",
                                  env=env)
    assert bad.returncode == 1 and "422" in bad.stderr and "provider" in bad.stderr
    refused = await asyncio.to_thread(atelier, "get", job["id"], env={**env, "ATELIER_API_KEY": "atl_x"})
    assert refused.returncode == 1 and "401" in refused.stderr
    down = await asyncio.to_thread(atelier, "get", job["id"], env={**env, "ATELIER_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "cannot connect" in down.stderr
    async with api(stack) as client:
        assert (await wait_for(client, job["id"]))["status"] == "succeeded"


def test_demo_runs_offline_and_passes(tmp_path):
    out = atelier("demo", "--storage", str(tmp_path / "store"), "--timeout", "90", timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "demo passed" in out.stdout and "sha256 ok" in out.stdout
    # Piped (no terminal): the table once, closed before the next line; no job JSON unless --verbose.
    lines = out.stdout.splitlines()
    assert sum("Atelier demo - " in line for line in lines) == 1, out.stdout
    bottom = [line for line in lines if "┘" in line]
    assert len(bottom) == 1 and bottom[0].rstrip().endswith("┘"), bottom
    assert '"provider_task_id"' not in out.stdout and "--verbose" in out.stdout
    assert len(lines) < 250, f"{len(lines)} lines"
