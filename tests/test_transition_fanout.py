"""Transitions fan out to the tenant's endpoints as they are when the change is applied.

``Jobs.transition`` keeps the endpoints it last read per tenant and the store's
compare-and-set script checks, in the same step as the change, that they are
still the tenant's (``endpoints_fingerprint``); a stale copy makes the step write
nothing, and the deliveries are made again from a fresh read.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from orchestrator.cli.devstack import Stack
from orchestrator.domain.ids import new_id
from orchestrator.domain.transitions import IllegalTransition
from orchestrator.infra.destinations import webhook_client
from orchestrator.services.runtime import Runtime
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import Conflict, JobStore, endpoints_fingerprint
from orchestrator.wire.jobs import JobStatus, utcnow
from providers.sandbox.serve import serving
from tests.helpers import api, submit, wait_for
from tests.test_webhook_endpoints import Receiver, make_endpoint
from workers.delivery import DirectDeliveries


def test_fingerprint_ignores_order_and_marks_none() -> None:
    assert endpoints_fingerprint([]) == "0"
    assert endpoints_fingerprint([b"a", b"b"]) == endpoints_fingerprint(["b", "a"])
    assert endpoints_fingerprint([b"a"]) != endpoints_fingerprint([b"a", b"b"])


async def test_endpoint_added_after_the_worker_saw_none_gets_the_next_events(stack: Stack) -> None:
    receiver = Receiver()
    async with serving(receiver.app) as base, api(stack) as client:
        before = await submit(client)  # the worker now knows the tenant has no endpoints
        await wait_for(client, before["id"])
        ep = await make_endpoint(client, f"{base}/hook")
        after = await submit(client)
        assert (await wait_for(client, after["id"]))["status"] == "succeeded"
        await receiver.wait(2)
        events = receiver.events(ep["secret"])
        assert sorted(e["type"] for e in events) == ["job.running", "job.succeeded"]
        assert {e["data"]["id"] for e in events} == {after["id"]}

        # Disabled (a changed endpoint): nothing more arrives.
        resp = await client.patch(f"/v1/webhook-endpoints/{ep['id']}", json={"enabled": False})
        assert resp.status_code == 200, resp.text
        third = await submit(client)
        await wait_for(client, third["id"])
        assert len(receiver.calls) == 2


async def test_stale_endpoints_write_nothing_then_retry_from_a_fresh_read(stack: Stack) -> None:
    receiver = Receiver()
    rt = await Runtime.open(stack.settings)
    try:
        async with serving(receiver.app) as base, api(stack) as client:
            job = await submit(client, input={"prompt": "a slow heron [sim:run=30]"})
            await wait_for(client, job["id"], {"submitted", "running"})
            tenant = (await rt.store.get(job["id"])).tenant  # type: ignore[union-attr]
            fingerprint, known = await rt.jobs._endpoints(tenant)
            assert fingerprint == "0" and known == []
            ep = await make_endpoint(client, f"{base}/hook")  # after this process read the endpoints
            raw = await rt.redis.hvals(JobStore.endpoints_key(tenant))  # type: ignore[misc]
            assert endpoints_fingerprint(raw) != "0"
            assert Endpoints.key(tenant) == JobStore.endpoints_key(tenant)

            for _ in range(5):  # (a poll may change the job between the read and the transition)
                current = await rt.store.get(job["id"])
                assert current is not None
                try:
                    done = await rt.jobs.transition(current, JobStatus.canceled, note="canceled by the test")
                    break
                except Conflict:
                    continue
            else:
                raise AssertionError("the job kept changing")
            assert done.version == current.version + 1  # one write: the stale attempt wrote nothing
            events = await rt.store.events(job["id"])
            assert [e.type for e in events].count("job.canceled") == 1
            await receiver.wait(1)
            delivered = receiver.events(ep["secret"])
            assert [e["type"] for e in delivered if e["data"]["id"] == job["id"]] == ["job.canceled"]
            assert json.loads(receiver.calls[-1][2])["data"]["status"] == "canceled"
    finally:
        await rt.close()


async def test_a_write_passing_through_a_status_logs_both_events_in_one_step(stack: Stack) -> None:
    """``transition(..., via=...)``: what a create call that answered "running" does (workers/submit.py)."""
    rt = await Runtime.open(stack.settings)
    try:
        async with api(stack) as client:
            model = await rt.store.get((await submit(client))["id"])
        assert model is not None
        now = utcnow()
        job = model.model_copy(update={"id": new_id("job"), "status": JobStatus.queued, "timestamps": {"queued": now},
                                       "provider_task_id": None, "outputs": [], "phase": None, "ledger": None})
        job, created = await rt.store.create(job, active_at=time.time() + 3600)  # queued for no worker
        assert created
        job = await rt.jobs.transition(job, JobStatus.submitting, attempts=1)
        with pytest.raises(IllegalTransition):  # submitting -> running must pass through submitted
            await rt.jobs.transition(job, JobStatus.running, via=JobStatus.queued)
        with pytest.raises(IllegalTransition):
            await rt.jobs.transition(job, JobStatus.succeeded, via=JobStatus.submitted)

        running = await rt.jobs.transition(job, JobStatus.running, via=JobStatus.submitted, provider_task_id="t-1")
        stored = await rt.store.get(job.id)
        assert stored is not None and stored.version == running.version == job.version + 2
        assert stored.status == JobStatus.running and stored.provider_task_id == "t-1"
        assert {"submitted", "running"} <= set(stored.timestamps)
        events = await rt.store.events(job.id)
        assert [(e.type, e.sequence) for e in events] == [
            ("job.created", 1), ("job.submitting", 2), ("job.submitted", 3), ("job.running", 4)]
        assert await rt.store.events(job.id, after=3) == events[3:]  # a stream resuming after 3 gets the rest
        assert await rt.redis.zscore(JobStore.tenant_key(job.tenant, JobStatus.running), job.id) is not None
        assert await rt.redis.zscore(JobStore.tenant_key(job.tenant, JobStatus.submitting), job.id) is None
    finally:
        await rt.close()


async def test_a_worker_attempts_the_deliveries_it_admits_without_the_queue(stack: Stack) -> None:
    """``DirectDeliveries``: an admitted delivery is attempted by the process that admitted it; past its
    limit (or stopping) deliveries go to the queue as before."""
    receiver = Receiver()
    direct = DirectDeliveries(limit=4)
    rt = await Runtime.open(stack.settings, deliver_now=direct)
    http = webhook_client(5.0, allow_private=True)
    direct.bind({"rt": rt, "webhook_http": http})
    try:
        async with serving(receiver.app) as base, api(stack) as client:
            ep = await make_endpoint(client, f"{base}/hook")
            model = await rt.store.get((await submit(client))["id"])  # its own webhooks go to the endpoint
            await receiver.wait(2)
            assert model is not None
            job = model.model_copy(update={"id": new_id("job"), "status": JobStatus.queued, "ledger": None,
                                           "timestamps": {"queued": utcnow()}, "provider_task_id": None})
            job, _ = await rt.store.create(job, active_at=time.time() + 3600)  # queued for no worker
            job = await rt.jobs.transition(job, JobStatus.submitting, attempts=1)
            queued_before = await rt.redis.zcard(stack.settings.webhook_queue_name)
            await rt.jobs.transition(job, JobStatus.running, via=JobStatus.submitted, provider_task_id="t-2")
            assert len(direct.tasks) == 1  # started here, at once
            assert await rt.redis.zcard(stack.settings.webhook_queue_name) == queued_before == 0
            await asyncio.wait_for(asyncio.gather(*direct.tasks), 10)
            await receiver.wait(3)
            (mine,) = [e for e in receiver.events(ep["secret"]) if e["data"]["id"] == job.id]
            assert mine["type"] == "job.running"

            assert DirectDeliveries(limit=0)("dl_x", 0) is False  # full: the caller queues it
            await direct.drain(1.0)
            assert direct("dl_x", 0) is False  # stopping: queued
    finally:
        await http.aclose()
        await rt.close()
