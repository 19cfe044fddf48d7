"""The webhook receiver fails, then is down (port closed) for a while, then comes back: every event is
delivered, verified, and carries one stable ``webhook-id`` on every attempt.

Two destinations go through the outage together: the jobs' own ``webhook_url`` (signed with the
tenant's secret) and a registered webhook endpoint (signed with the endpoint's secret).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from orchestrator.store.jobs import JobStore
from tests.faults.harness import (
    MODELS,
    NOTIFY_TYPES,
    Audit,
    FaultStack,
    Receiver,
    check_webhooks,
    fault_stack,
    job_body,
    received_events,
    record_figures,
)

PROVIDERS = list(MODELS)


def _ids_per_event(receiver: Receiver) -> dict[tuple[str, str, int], set[str]]:
    """Every webhook-id seen per event, over refused and accepted attempts."""
    out: dict[tuple[str, str, int], set[str]] = {}
    for headers, body in [*receiver.hooks.refused, *receiver.hooks.deliveries]:
        event = json.loads(body)
        out.setdefault((event["data"]["id"], event["type"], event["sequence"]), set()).add(headers["webhook-id"])
    return out


async def _outage_scenario(name: str, *, jobs: int, failing: float, down: float, timeout: float) -> None:
    started = time.monotonic()
    async with fault_stack(workers=1) as fs:
        fs.timings(queue=0.1, run=0.3)
        endpoint_receiver = Receiver()
        await endpoint_receiver.up()
        try:
            resp = await fs.client.post("/v1/webhook-endpoints", json={"url": endpoint_receiver.url})
            assert resp.status_code == 201, resp.text
            endpoint = resp.json()
            receivers = [fs.receiver, endpoint_receiver]
            for r in receivers:
                r.hooks.failing = True  # phase 1: the receivers answer 503
            failing_since = time.monotonic()
            ids = [(await fs.submit(job_body(PROVIDERS[i % len(PROVIDERS)], f"{fs.tag}-{i}",
                                             webhook_url=fs.receiver.url)))["id"] for i in range(jobs)]
            await _until(lambda: all(any(n > 1 for n in _attempts(r).values()) for r in receivers), failing)
            failed_for = time.monotonic() - failing_since
            for r in receivers:  # phase 2: down, the port closed
                await r.down()
            await asyncio.sleep(down)
            for r in receivers:  # phase 3: back, accepting
                r.hooks.failing = False
                await r.up()
            done = await fs.wait_terminal(ids, timeout)
            audit = await fs.audit(done, webhook_timeout=timeout)
            logs = await fs.events(done)
            expected = {(job_id, e["type"], e["sequence"]) for job_id, log in logs.items() for e in log
                        if e["type"] in NOTIFY_TYPES}
            await fs.wait_webhooks(expected, timeout, endpoint_receiver)
            endpoint_audit = Audit(jobs=len(done))
            check_webhooks(endpoint_audit, endpoint_receiver.hooks, expected, endpoint["secret"])
            attempts = await _recorded_attempts(fs, receivers)
            record_figures(name, {
                "jobs": jobs, "receiver_failing_seconds": round(failed_for, 1), "receiver_down_seconds": down,
                "kills": fs.kills, "redis_restarts": fs.redis_restarts, **audit.figures(),
                "endpoint_events_expected": len(expected),
                "endpoint_events_lost": len(endpoint_audit.events_lost),
                "refused_attempts": sum(len(r.hooks.refused) for r in receivers),
                "events_retried": sum(1 for a in attempts.values() if a > 1),
                "max_attempts_per_delivery": max(attempts.values(), default=0),
                "unstable_webhook_ids": sum(1 for r in receivers for v in _ids_per_event(r).values() if len(v) > 1),
                "seconds": round(time.monotonic() - started, 1)})
            assert audit.statuses == {"succeeded": jobs}
            audit.assert_clean()
            endpoint_audit.assert_clean()
            for r in receivers:
                # The same webhook-id on the refused attempts and on the accepted one, for every event.
                unstable = {k: v for k, v in _ids_per_event(r).items() if len(v) != 1}
                assert not unstable, unstable
                assert received_events(r.hooks) >= {k for k in _ids_per_event(r)}
            assert sum(1 for a in attempts.values() if a > 1) > 0  # the outage was felt: retries happened
        finally:
            await endpoint_receiver.down()


def _attempts(receiver: Receiver) -> dict[str, int]:
    seen: dict[str, int] = {}
    for headers, _ in [*receiver.hooks.refused, *receiver.hooks.deliveries]:
        seen[headers["webhook-id"]] = seen.get(headers["webhook-id"], 0) + 1
    return seen


async def _recorded_attempts(fs: FaultStack, receivers: list[Receiver]) -> dict[str, int]:
    """Attempts recorded by Atelier for every delivery the receivers saw (each one is a record)."""
    ids = {h["webhook-id"] for r in receivers for h, _ in r.hooks.deliveries}
    client = aioredis.from_url(fs.stack.settings.redis_url)
    try:
        out: dict[str, int] = {}
        for delivery_id in ids:
            raw = await client.get(JobStore.delivery_key(delivery_id))
            assert raw is not None, f"no delivery record for {delivery_id}"
            record: dict[str, Any] = json.loads(raw)
            assert record["status"] == "delivered", record
            out[delivery_id] = len(record["attempts"])
        return out
    finally:
        await client.aclose()


async def _until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check():
        await asyncio.sleep(0.05)


@pytest.mark.timeout(300)  # real processes and a timed outage: slow on a loaded 2-core machine
async def test_webhook_receiver_down_then_back_small() -> None:
    await _outage_scenario("webhook_outage_small", jobs=8, failing=2.0, down=2.0, timeout=60)


@pytest.mark.faults
@pytest.mark.timeout(900)
async def test_webhook_receiver_down_then_back_200_jobs() -> None:
    await _outage_scenario("webhook_outage_200", jobs=200, failing=6.0, down=10.0, timeout=240)
