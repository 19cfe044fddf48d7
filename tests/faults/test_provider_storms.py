"""Provider storms (429, 5xx, timeouts, malformed bodies) and callbacks that are duplicated, reordered,
late or forged: final states are correct and nothing is applied twice.

"Nothing double-applied": each job's event log has exactly one terminal event, its sequence numbers
strictly increase, exactly one terminal webhook per job arrives (de-duplicated by ``webhook-id``),
and each provider created exactly one task per job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.store.jobs import JobStore
from orchestrator.wire.signing import sign
from tests.faults.harness import MODELS, FaultStack, fault_stack, job_body, record_figures

PROVIDERS = list(MODELS)


def storm(scale: float) -> dict[str, list[dict[str, Any]]]:
    """Faults per simulator route, about ``scale`` times over. Ambiguous submissions (the provider created
    the task, then the answer failed) only where the provider can be asked what it created (``reconciles``);
    the others get faults that provably created nothing (429, 503) on submit."""

    def n(k: float) -> int:
        return max(1, round(k * scale))

    ambiguous = [{"kind": "500", "count": n(2), "after_effect": True},
                 {"kind": "timeout", "count": n(1), "after_effect": True, "delay": 3.0}]
    refused = [{"kind": "429", "count": n(3), "retry_after": 1}, {"kind": "429", "count": n(1)},
               {"kind": "503", "count": n(1)}]
    status = [{"kind": "429", "count": n(3)}, {"kind": "500", "count": n(2)}, {"kind": "502", "count": n(1)},
              {"kind": "timeout", "count": n(1), "delay": 3.0},
              {"kind": "malformed", "count": 2}]  # 3 in a row on one job would (rightly) fail it
    # A key that takes few tasks at once (DashScope: 4) meets a storm in proportion: its jobs retry in turn.
    light = {p for p in MODELS if p == "dashscope"}

    def create(provider: str) -> list[dict[str, Any]]:
        faults = refused + ambiguous if MODELS[provider]["reconciles"] else refused
        return [f | {"route": "create"} | ({"count": max(1, f["count"] // 4)} if provider in light else {})
                for f in faults]

    return {
        "replicate": [*create("replicate"),
                      {"kind": "malformed", "route": "create", "count": n(1), "after_effect": True},
                      *[f | {"route": "get"} for f in status],
                      {"kind": "503", "route": "download", "count": 1}],
        "kling": [*create("kling"), *[f | {"route": "get"} for f in status],
                  {"kind": "500", "route": "download", "count": 1}],
        "sora": [*create("sora"), *[f | {"route": "get"} for f in status],
                 {"kind": "502", "route": "content", "count": 1}],
        "fal": [*[f | {"route": "submit"} for f in refused], *[f | {"route": "status"} for f in status],
                {"kind": "500", "route": "result", "count": n(1)}, {"kind": "503", "route": "download", "count": 1}],
        # MiniMax's file lookup (the download_url) is a request of its own, stormed too.
        "minimax": [*create("minimax"), *[f | {"route": "query"} for f in status],
                    {"kind": "503", "route": "retrieve", "count": n(1)},
                    {"kind": "500", "route": "download", "count": 1}],
        "doubao": [*create("doubao"), *[f | {"route": "get"} for f in status],
                   {"kind": "502", "route": "download", "count": 1}],
        # Its lookup of a lost create reads up to 10 tasks on the same route: a full status storm on
        # 4 slots exhausts the lookup's tries (the job then fails provider_outcome_unknown, safely).
        "dashscope": [*create("dashscope"),
                      *[f | {"route": "get", "count": max(1, f["count"] // 4)} for f in status],
                      {"kind": "503", "route": "download", "count": 1}],
    }


async def _storm_scenario(name: str, *, jobs: int, scale: float, timeout: float) -> None:
    started = time.monotonic()
    async with fault_stack(workers=1) as fs:
        fs.timings(queue=0.2, run=0.5)
        plan = storm(scale)
        for provider, faults in plan.items():
            await fs.faults(provider, *faults)
        expected: dict[str, str] = {}
        for i in range(jobs):
            provider = PROVIDERS[i % len(PROVIDERS)]
            # Some renders fail at the provider: the storm must not turn them into anything else.
            fails = i % 7 == 0 and provider != "fal"
            job = await fs.submit(job_body(provider, f"{fs.tag}-{i}", "[sim:fail]" if fails else "",
                                           webhook_url=fs.receiver.url))
            expected[job["id"]] = "failed" if fails else "succeeded"
        ids = list(expected)
        done = await fs.wait_terminal(ids, timeout)
        audit = await fs.audit(done)
        injected = {p: sum(fs.sim_stats(p)["faults_injected"].values()) for p in plan}
        record_figures(name, {
            "jobs": jobs, "faults_planned": sum(f["count"] for fl in plan.values() for f in fl),
            "faults_injected": injected, **audit.figures(),
            "submit_attempts_max": max(j["attempts"] for j in done.values()),
            "seconds": round(time.monotonic() - started, 1)})
        wrong = [(j["provider"], expected[j["id"]], j["status"], j["error"]) for j in done.values()
                 if j["status"] != expected[j["id"]]]
        assert not wrong, wrong
        assert all(j["error"]["code"] == "provider_failed" for j in done.values() if j["status"] == "failed"), \
            [j["error"] for j in done.values() if j["error"]]
        audit.assert_clean()
        assert audit.creations == audit.jobs_per_provider
        assert sum(injected.values()) >= jobs // 2  # the storm did hit


async def test_provider_storm_small() -> None:
    await _storm_scenario("provider_storm_small", jobs=16, scale=0.5, timeout=90)


@pytest.mark.faults
@pytest.mark.timeout(1200)
async def test_provider_storm_400_jobs() -> None:
    await _storm_scenario("provider_storm_400", jobs=400, scale=15, timeout=600)


# -- callbacks -------------------------------------------------------------------------------

async def _callback_token(fs: FaultStack, job_id: str) -> str:
    client = aioredis.from_url(fs.stack.settings.redis_url)
    try:
        raw = await client.hget(JobStore.job_key(job_id), "d")
        token: str = json.loads(raw)["callback_token"]
        return token
    finally:
        await client.aclose()


def _replicate_headers(secret: str, body: bytes, msg_id: str, at: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if at is None else at
    return {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body)}


async def test_callbacks_duplicated_reordered_late_and_forged() -> None:
    # Polls are a few seconds apart: the callbacks (genuine or not) are what moves the jobs.
    async with fault_stack(workers=1, poll_min_seconds=2.0, poll_max_seconds=4.0) as fs:
        fs.timings(queue=0.3, run=1.5)
        specs = [("kling", "[sim:callback=duplicate]"), ("kling", "[sim:callback=reorder]"),
                 ("kling", "[sim:callback=drop]"), ("kling", ""), ("replicate", ""), ("replicate", ""),
                 ("fal", ""), ("fal", "")]
        ids = [(await fs.submit(job_body(p, f"{fs.tag}-{i}", d, webhook_url=fs.receiver.url)))["id"]
               for i, (p, d) in enumerate(specs)]
        jobs = await fs.query(ids)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(j["provider_task_id"] for j in jobs.values()):
            await asyncio.sleep(0.05)
            jobs = await fs.query(ids)
        url = f"{fs.stack.api_url}/v1/callbacks"
        evil = "https://evil.example/owned.mp4"
        outcomes: dict[str, int] = {}
        async with httpx.AsyncClient(timeout=10) as raw:

            async def post(kind: str, provider: str, body: bytes, *, params: dict[str, str] | None = None,
                           headers: dict[str, str] | None = None, expect: int, ack: str | None = None) -> None:
                resp = await raw.post(f"{url}/{provider}", content=body, params=params,
                                      headers=headers or {"content-type": "application/json"})
                assert resp.status_code == expect, (kind, resp.status_code, resp.text)
                if ack is not None:
                    assert resp.json()["status"].startswith(ack), (kind, resp.json())
                outcomes[kind] = outcomes.get(kind, 0) + 1

            kling_job = jobs[ids[3]]
            token = await _callback_token(fs, kling_job["id"])
            lie = json.dumps({"task_id": kling_job["provider_task_id"], "task_status": "succeed",
                              "task_result": {"videos": [{"id": "x", "url": evil, "duration": "5"}]}}).encode()
            # Forged: no token, a wrong token, another job's token.
            await post("forged_kling_no_token", "kling", lie, params={"job": kling_job["id"]}, expect=401)
            await post("forged_kling_wrong_token", "kling", lie, params={"job": kling_job["id"], "token": "x" * 32},
                       expect=401)
            other_token = await _callback_token(fs, ids[0])
            await post("forged_kling_other_jobs_token", "kling", lie,
                       params={"job": kling_job["id"], "token": other_token}, expect=401)
            # Right token, lying body: only a hint; the status fetched from Kling decides.
            await post("lying_kling_valid_token", "kling", lie, params={"job": kling_job["id"], "token": token},
                       expect=200, ack="accepted")
            # Right token, someone else's task: ignored.
            other_task = json.dumps({"task_id": "999999", "task_status": "succeed"}).encode()
            await post("kling_task_mismatch", "kling", other_task, params={"job": kling_job["id"], "token": token},
                       expect=200, ack="ignored")
            # Replicate: a bad signature, a stale (replayed) timestamp, no signature at all.
            rep_job = jobs[ids[4]]
            rep_secret = fs.stack.simulators["replicate"].webhook_secret  # type: ignore[attr-defined]
            rep_lie = json.dumps({"id": rep_job["provider_task_id"], "status": "succeeded", "output": [evil]}).encode()
            await post("forged_replicate_bad_signature", "replicate", rep_lie,
                       headers=_replicate_headers("whsec_" + "A" * 32, rep_lie, "msg_forged"), expect=401)
            await post("replayed_replicate_stale", "replicate", rep_lie,
                       headers=_replicate_headers(rep_secret, rep_lie, "msg_old", int(time.time()) - 3600), expect=401)
            await post("forged_replicate_unsigned", "replicate", rep_lie, expect=401)
            await post("lying_replicate_signed", "replicate", rep_lie,
                       headers=_replicate_headers(rep_secret, rep_lie, "msg_lie"), expect=200)
            # fal: unsigned and wrongly signed webhooks.
            fal_job = jobs[ids[6]]
            fal_lie = json.dumps({"request_id": fal_job["provider_task_id"], "status": "OK",
                                  "payload": {"images": [{"url": evil}]}}).encode()
            await post("forged_fal_unsigned", "fal", fal_lie, expect=401)
            await post("forged_fal_bad_signature", "fal", fal_lie, headers={
                "content-type": "application/json", "x-fal-webhook-request-id": fal_job["provider_task_id"],
                "x-fal-webhook-user-id": "u", "x-fal-webhook-timestamp": str(int(time.time())),
                "x-fal-webhook-signature": "00" * 64}, expect=401)

            done = await fs.wait_terminal(ids, 60)
            # Late: callbacks for finished jobs, genuine in form, change nothing.
            late = json.dumps({"task_id": kling_job["provider_task_id"], "task_status": "processing"}).encode()
            await post("late_kling", "kling", late, params={"job": kling_job["id"], "token": token},
                       expect=200, ack="ignored")
            late_rep = json.dumps({"id": rep_job["provider_task_id"], "status": "processing"}).encode()
            await post("late_replicate", "replicate", late_rep,
                       headers=_replicate_headers(rep_secret, late_rep, "msg_late"), expect=200, ack="ignored")
        await asyncio.sleep(1.0)  # let anything the late callbacks could have caused happen
        after = await fs.query(ids)
        audit = await fs.audit(after)
        kling = fs.stack.simulators["kling"]
        record_figures("callbacks_dup_reorder_late_forged", {
            "jobs": len(ids), "hostile_callbacks": sum(outcomes.values()),
            "rejected_401": sum(n for k, n in outcomes.items() if k.startswith(("forged", "replayed"))),
            "provider_callbacks_sent": {"kling": kling.callbacks_sent,  # type: ignore[attr-defined]
                                        "replicate": fs.stack.simulators["replicate"].webhooks_sent},  # type: ignore[attr-defined]
            **audit.figures()})
        assert {j["status"] for j in after.values()} == {"succeeded"}, {j["id"]: j["error"] for j in after.values()}
        assert after == {k: v | {"outputs": after[k]["outputs"]} for k, v in done.items()}  # nothing changed late
        audit.assert_clean()
        assert audit.creations == audit.jobs_per_provider
        async with httpx.AsyncClient() as plain:
            for job in after.values():
                assert job["outputs"] and job["attempts"] == 1
                for output in job["outputs"]:
                    assert output["url"].startswith(fs.stack.api_url) and "evil" not in json.dumps(output)
                body = (await plain.get(job["outputs"][0]["url"])).content
                assert hashlib.sha256(body).hexdigest() == job["outputs"][0]["sha256"]
