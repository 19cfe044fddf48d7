"""Transitions fan out to the tenant's endpoints as they are when the change is applied.

``Jobs.transition`` keeps the endpoints it last read per tenant and the store's
compare-and-set script checks, in the same step as the change, that they are
still the tenant's (``endpoints_fingerprint``); a stale copy makes the step write
nothing, and the deliveries are made again from a fresh read.
"""

from __future__ import annotations

import json

from orchestrator.cli.devstack import Stack
from orchestrator.services.runtime import Runtime
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import Conflict, JobStore, endpoints_fingerprint
from orchestrator.wire.jobs import JobStatus
from providers.sandbox.serve import serving
from tests.helpers import api, submit, wait_for
from tests.test_webhook_endpoints import Receiver, make_endpoint


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
