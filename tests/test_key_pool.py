"""Provider key pools: a refused or out-of-balance key leaves the pool for every process, jobs move
to the keys left (or fail clearly), operators list and restore keys, and a 429 pauses its key."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime

import pytest
from redis.asyncio import Redis

from orchestrator.cli import main as cli_main
from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.domain.job import Job
from orchestrator.store import keypool
from orchestrator.store.throttle import Limits, Throttle
from orchestrator.wire.jobs import JobInput, JobKind, JobStatus
from tests.helpers import api, sim_faults, submit, wait_for
from workers.main import run as run_worker

KEY_A, KEY_B = "r8_pool_key_alpha", "r8_pool_key_bravo"


def a_job(job_id: str, provider: str = "replicate", status: JobStatus = JobStatus.queued) -> Job:
    return Job(id=job_id, tenant="dev", provider=provider, kind=JobKind.image, model="m",
               input=JobInput(prompt="x"), status=status)


async def keys_out(stack: Stack) -> dict[tuple[str, str], keypool.KeyOut]:
    redis = Redis.from_url(stack.settings.redis_url)
    try:
        return await keypool.all_out(redis)
    finally:
        await redis.aclose()


async def test_refused_key_leaves_the_pool_and_the_job_runs_on_the_other(redis_url, caplog):
    async with dev_stack(redis_url=redis_url, run_worker=False, replicate_api_key=f"{KEY_A},{KEY_B}",
                         log_format="text") as stack, api(stack) as client:
        job = await submit(client)
        # The key the pool picks for this job is the one the provider refuses.
        bad = keypool.pick([KEY_A, KEY_B], a_job(job["id"]))
        good = KEY_B if bad == KEY_A else KEY_A
        sim = stack.simulators["replicate"]
        sim.config.api_keys = [good]
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(stack.settings, stop=stop, completion_wait=1))
        try:
            with caplog.at_level(logging.ERROR, logger="atelier.worker"):
                done = await wait_for(client, job["id"], timeout=20)
            later = await wait_for(client, (await submit(client, input={"prompt": "next"}))["id"], timeout=20)
        finally:
            stop.set()
            await worker
        out = await keys_out(stack)
    assert done["status"] == "succeeded", done
    assert sim.keys_by_task[done["provider_task_id"]] == {good}  # type: ignore[attr-defined]
    assert done["attempts"] == 2
    # The next job goes straight to the key left in the pool.
    assert later["status"] == "succeeded" and later["attempts"] == 1
    assert sim.keys_by_task[later["provider_task_id"]] == {good}  # type: ignore[attr-defined]
    assert sim.stats.creations == 2
    assert set(out) == {("replicate", keypool.key_id(bad))}
    record = out[("replicate", keypool.key_id(bad))]
    assert record.reason == keypool.AUTH_FAILED and record.until is None and record.code == "provider_auth_failed"
    alerts = [r for r in caplog.records if getattr(r, "event", None) == "key.out_of_pool"]
    assert len(alerts) == 1 and alerts[0].levelno == logging.ERROR
    assert alerts[0].key_id == keypool.key_id(bad) and alerts[0].reason == keypool.AUTH_FAILED  # type: ignore[attr-defined]
    assert bad not in alerts[0].getMessage()


async def test_every_key_refused_fails_the_job_with_a_clear_error(redis_url):
    async with dev_stack(redis_url=redis_url, replicate_api_key=f"{KEY_A},{KEY_B}",
                         log_format="text") as stack, api(stack) as client:
        sim = stack.simulators["replicate"]
        sim.config.api_keys = ["r8_some_other_account"]
        first = await wait_for(client, (await submit(client))["id"], timeout=20)
        second = await wait_for(client, (await submit(client, input={"prompt": "again"}))["id"], timeout=20)
        exposition = (await client.get("/metrics")).text
    # The job that met the refusals says so; a later one finds no key left.
    assert first["error"]["code"] == "provider_auth_failed" and second["error"]["code"] == "no_usable_key"
    assert "no usable replicate API key" in first["error"]["message"]
    for job in (first, second):
        assert job["status"] == "failed", job
        message = job["error"]["message"]
        assert keypool.key_id(KEY_A) in message and keypool.key_id(KEY_B) in message
        assert "refused the key" in message and KEY_A not in message and KEY_B not in message
    assert set(first["error"]["provider_detail"]["keys_out"]) == {keypool.key_id(KEY_A), keypool.key_id(KEY_B)}
    for key in (KEY_A, KEY_B):  # operators see which keys are out, and why, on /metrics
        assert (f'atelier_provider_key_out_of_pool{{key_id="{keypool.key_id(key)}",provider="replicate",'
                f'reason="auth_failed"}} 1.0') in exposition
    # The first job tried each key once; the second found no key left and was never submitted.
    assert first["attempts"] == 2 and second["attempts"] == 0 and sim.stats.creations == 0


async def test_out_of_balance_key_comes_back_after_the_recheck_time(redis_url):
    async with dev_stack(redis_url=redis_url, sora_api_key="sk-balance-one,sk-balance-two",
                         key_recheck_seconds=2.0, log_format="text") as stack, api(stack) as client:
        stack.simulators["sora"].config.extra["sora_429_kind"] = "insufficient_quota"
        await sim_faults(stack, "sora", {"kind": "429", "route": "create", "count": 1})
        job = await submit(client, provider="sora", kind="video", model="sora-2",
                           input={"prompt": "a lighthouse", "duration_seconds": 4})
        deadline = time.monotonic() + 10
        while not (out := await keys_out(stack)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        done = await wait_for(client, job["id"], timeout=20)
        assert len(out) == 1, out
        (provider, kid), record = next(iter(out.items()))
        assert record.until is not None
        await asyncio.sleep(max(0.0, record.until - time.time()) + 0.2)
        after = await keys_out(stack)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert provider == "sora" and record.reason == keypool.NO_BALANCE
    assert record.code == "provider_insufficient_balance" and "quota" in record.message
    assert record.until - record.at == pytest.approx(2.0)
    assert after == {}  # back in the pool


async def test_a_queued_job_leaves_a_key_that_is_out_but_a_submitted_one_keeps_it(stack):
    from orchestrator.services.runtime import Runtime
    from workers import context

    rt = await Runtime.open(stack.settings)
    try:
        provider = rt.registry.get("replicate")
        assert provider is not None
        [key] = provider.settings.api_keys
        provider.settings.api_keys = [key, "r8_second_pool_key"]
        out = {keypool.key_id(key): keypool.KeyOut("auth_failed", "provider_auth_failed", "refused", time.time())}
        queued = a_job("job_q").model_copy(update={"key_id": keypool.key_id(key)})
        assert context.call_context(rt, provider, queued, out).api_key == "r8_second_pool_key"
        submitted = queued.model_copy(update={"status": JobStatus.submitted})
        assert context.call_context(rt, provider, submitted, out).api_key == key
        with pytest.raises(keypool.NoUsableKey, match="every key in the pool is out"):
            keypool.pick([key], queued, out)
    finally:
        await rt.close()


def test_provider_keys_cli_lists_and_restores(redis_url, monkeypatch, capsys):
    monkeypatch.setenv("ATELIER_REDIS_URL", redis_url)
    monkeypatch.setenv("ATELIER_REPLICATE_API_KEY", f"{KEY_A},{KEY_B}")
    kid_a, kid_b = keypool.key_id(KEY_A), keypool.key_id(KEY_B)

    async def take_out() -> None:
        redis = Redis.from_url(redis_url)
        await keypool.take_out(redis, "replicate", kid_a, reason=keypool.AUTH_FAILED, code="provider_auth_failed",
                               message="provider refused the credentials (HTTP 401)")
        await keypool.take_out(redis, "kling", "0123456789ab", reason=keypool.NO_BALANCE,
                               code="provider_insufficient_balance", message="1102", recheck_seconds=600)
        await redis.aclose()

    asyncio.run(take_out())
    assert cli_main(["provider-keys", "list"]) == 0
    table = capsys.readouterr().out
    line_a = next(line for line in table.splitlines() if kid_a in line)
    line_b = next(line for line in table.splitlines() if kid_b in line)
    assert "out" in line_a.split() and "auth_failed" in line_a and "HTTP 401" in line_a
    assert "in" in line_b.split()
    assert KEY_A not in table and KEY_B not in table
    assert "no longer configured" in next(line for line in table.splitlines() if "0123456789ab" in line)

    assert cli_main(["provider-keys", "list", "--json"]) == 0
    rows = {(r["provider"], r["key_id"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[("replicate", kid_a)]["state"] == "out" and rows[("replicate", kid_b)]["state"] == "in"
    assert rows[("kling", "0123456789ab")]["back_at"] and not rows[("kling", "0123456789ab")]["configured"]

    assert cli_main(["provider-keys", "restore", "replicate", kid_a]) == 0
    assert "back in the pool" in capsys.readouterr().out
    assert cli_main(["provider-keys", "list", "--json"]) == 0
    rows = {(r["provider"], r["key_id"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[("replicate", kid_a)]["state"] == "in"
    assert cli_main(["provider-keys", "restore", "replicate", kid_a]) == 1
    assert "not out of the pool" in capsys.readouterr().err
    assert cli_main(["provider-keys"]) == 2
    # The installed command, as an operator runs it.
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "provider-keys", "list"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "ATELIER_REDIS_URL": redis_url,
                                                     "ATELIER_REPLICATE_API_KEY": KEY_B})
    assert out.returncode == 0, out.stderr
    assert kid_b in out.stdout and KEY_B not in out.stdout


async def test_429_with_retry_after_pauses_the_key_for_every_job(stack):
    await sim_faults(stack, "replicate", {"kind": "429", "route": "create", "count": 1, "retry_after": 2})
    sim = stack.simulators["replicate"]
    async with api(stack) as client:
        first = await submit(client, input={"prompt": "first"})
        deadline = time.monotonic() + 10
        while not sim.faults.injected["create:429"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        refused_at = time.time()
        second = await submit(client, input={"prompt": "second"})
        seen_throttled = False
        while time.monotonic() < deadline:
            view = (await client.get(f"/v1/jobs/{second['id']}")).json()
            seen_throttled = seen_throttled or view["phase"] == "throttled"
            if view["status"] != "queued":
                break
            await asyncio.sleep(0.05)
        jobs = [await wait_for(client, j["id"], timeout=20) for j in (first, second)]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert seen_throttled
    # No rpm limit is configured: only the pause held the second job back.
    started = datetime.fromisoformat(jobs[1]["timestamps"]["submitting"]).timestamp()
    assert started >= refused_at + 1.5, started - refused_at
    assert sim.stats.requests["create"] == 3 and sim.stats.creations == 2


async def test_pause_pushes_the_budget_forward_and_never_back(redis_url):
    redis = Redis.from_url(redis_url)
    try:
        throttle = Throttle(redis, {"replicate": Limits(rpm=600, burst=5), "fal": Limits()})
        assert await throttle.wait_ms("replicate", "k1") == 0
        await throttle.pause("replicate", "k1", 2.0)
        assert 1800 <= await throttle.wait_ms("replicate", "k1") <= 2000
        await throttle.pause("replicate", "k1", 0.5)  # a shorter pause does not shorten the longer one
        assert await throttle.wait_ms("replicate", "k1") >= 1800
        assert await throttle.wait_ms("replicate", "k2") == 0  # other keys go on
        await throttle.pause("fal", "k1", 1.0)  # without an rpm limit too
        assert 800 <= await throttle.wait_ms("fal", "k1") <= 1000
        ttl = await redis.pttl("atl:rate:replicate:k1")
        assert 2000 < ttl < 5000
    finally:
        await redis.aclose()


async def test_a_key_revoked_while_its_jobs_wait_leaves_the_pool_when_a_poll_is_refused(redis_url):
    async with dev_stack(redis_url=redis_url, replicate_api_key=f"{KEY_A},{KEY_B}", poll_min_seconds=0.1,
                         log_format="text") as stack, api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=3]"})
        await wait_for(client, job["id"], {"submitted", "running"})
        used = keypool.pick([KEY_A, KEY_B], a_job(job["id"]))
        sim = stack.simulators["replicate"]
        sim.config.api_keys = [KEY_B if used == KEY_A else KEY_A]  # the provider revokes the key
        done = await wait_for(client, job["id"], timeout=20)
        out = await keys_out(stack)
    # Only the key that submitted can follow the task: the job fails, and the key leaves the pool.
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed", done
    assert set(out) == {("replicate", keypool.key_id(used))}
