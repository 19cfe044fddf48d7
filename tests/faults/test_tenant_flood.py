"""A hostile or careless tenant floods Atelier while another tenant works (issue 13).

Tenant A sends bodies built to break things (nested 250 deep, lone surrogates, oversized options,
garbage to the callback routes), registers 50 webhook endpoints that accept connections and never
answer, and submits a 5,000-item batch. Tenant B meanwhile runs 100 ordinary jobs over the
simulated providers. All of B's jobs succeed, each with its webhooks, nothing is created twice,
and no request of A's gets a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.store.tenants import create_api_key
from tests.faults.harness import MODELS, fault_stack, job_body, record_figures

B_PROVIDERS = [p for p in MODELS if p != "fal"]  # A's batch runs on fal: its creations are A's


def hostile_bodies() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of requests no tenant or provider should be able to 500 with."""
    deep: Any = "x"
    for _ in range(250):
        deep = {"a": deep}
    job = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell"}
    json_h = {"content-type": "application/json"}
    bodies = [
        ("POST", "/v1/jobs", json.dumps(job | {"input": {"prompt": "p", "options": deep}}).encode(), json_h),
        ("POST", "/v1/jobs", json.dumps(job | {"input": {"prompt": "p"}, "metadata": deep}).encode(), json_h),
        ("POST", "/v1/jobs", b'{"provider": "replicate", "kind": "image", "model": "m", '
                             b'"input": {"prompt": "\\ud800"}}', json_h),
        ("POST", "/v1/jobs", json.dumps(job | {"input": {"prompt": "p", "options": {"k": "v" * 300_000}}}).encode(),
         json_h),
        ("POST", "/v1/jobs", b"[" * 100_000, json_h),
        ("POST", "/v1/batches", json.dumps({"jobs": [job | {"input": {"options": deep}}]}).encode(), json_h),
        ("POST", "/v1/callbacks/kling?job=job_x&token=t", b"[" * 1_000_000, json_h),
        ("POST", "/v1/callbacks/replicate?job=job_x&token=t", b"{}",
         json_h | {"webhook-id": "msg_1", "webhook-timestamp": "9" * 5000, "webhook-signature": "v1,AAAA"}),
        ("POST", "/v1/callbacks/minimax?job=job_x&token=t", b'{"challenge": ' + b"[" * 50_000 + b"}", json_h),
    ]
    return bodies


@pytest.mark.faults
@pytest.mark.timeout(1800)
async def test_a_flooding_tenant_does_not_hold_back_another_tenants_jobs() -> None:
    started = time.monotonic()
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    dead = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with fault_stack(workers=2, fal_concurrency=4, webhook_timeout_seconds=2.0) as fs:
            fs.timings(queue=0.2, run=0.5)
            r = aioredis.Redis.from_url(fs.stack.settings.redis_url)
            key_a = await create_api_key(r, "flood-a")
            async with httpx.AsyncClient(base_url=fs.stack.api_url, timeout=60,
                                         headers={"Authorization": f"Bearer {key_a}"}) as a:
                for i in range(50):
                    resp = await a.post("/v1/webhook-endpoints", json={"url": f"{dead}/hook/{i}"})
                    assert resp.status_code == 201, resp.text
                items = [{"provider": "fal", "kind": "image", "model": MODELS["fal"]["model"],
                          "input": {"prompt": f"flood item {i}"}} for i in range(5000)]
                resp = await a.post("/v1/batches", json={"jobs": items})
                assert resp.status_code == 202, resp.text
                batch_id = resp.json()["id"]

                answers: Counter[int] = Counter()

                async def hostile() -> None:
                    for _ in range(20):
                        for method, path, body, headers in hostile_bodies():
                            answers[(await a.request(method, path, content=body, headers=headers)).status_code] += 1

                flood = asyncio.create_task(hostile())
                b_started = time.monotonic()
                b_ids = [(await fs.submit(job_body(B_PROVIDERS[i % len(B_PROVIDERS)], f"{fs.tag}-b{i}",
                                                   webhook_url=fs.receiver.url)))["id"] for i in range(100)]
                done = await fs.wait_terminal(b_ids, 600)
                b_seconds = time.monotonic() - b_started
                await flood
                audit = await fs.audit(done, webhook_timeout=60)
                lags = [(_ts(j["timestamps"][j["status"]]) - _ts(j["created_at"])) for j in done.values()]
                batch = (await a.get(f"/v1/batches/{batch_id}")).json()
                pending = int(await r.zcard("atl:wh:due"))
                parked = int(await r.zcard("atl:whq:parked"))
            await r.aclose()
            record_figures("tenant_flood", {
                **audit.figures(), "b_seconds_all_100": round(b_seconds, 1),
                "b_job_seconds_p50": round(statistics.median(lags), 2),
                "b_job_seconds_max": round(max(lags), 2),
                "a_batch_done_meanwhile": batch["done"], "a_deliveries_pending": pending,
                "a_deliveries_parked": parked, "hostile_answers": dict(answers),
                "seconds": round(time.monotonic() - started, 1)})
    finally:
        server.close()
        for writer in silent:
            writer.close()
    assert all(j["status"] == "succeeded" for j in done.values()), Counter(j["status"] for j in done.values())
    audit.assert_clean()
    assert not [code for code in answers if code >= 500], answers
    assert sum(answers.values()) == 20 * len(hostile_bodies())


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
