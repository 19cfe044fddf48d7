"""Fairness between tenants: one tenant's big batch on a provider key, or its dead webhook
endpoints, cannot hold back another tenant's work for long (issue 13, defect 3)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta

import redis.asyncio as aioredis
from arq.constants import job_key_prefix

from orchestrator.cli.devstack import dev_stack
from orchestrator.domain.ids import new_id
from orchestrator.domain.webhooks import Delivery, destination
from orchestrator.services.runtime import Runtime
from orchestrator.store.tenants import create_api_key
from orchestrator.wire.jobs import utcnow
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for
from workers.sweep import sweep

IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell"}


class CountingReceiver:
    """A plain ASGI webhook receiver that answers 204 after ``delay`` seconds, noting each delivery's
    webhook-id as its attempt starts and the most attempts under way at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active = 0
        self.most = 0
        self.arrivals: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            self.arrivals.append(dict(scope["headers"])[b"webhook-id"].decode())
            await asyncio.sleep(self.delay)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.active -= 1


async def test_a_big_batch_does_not_hold_back_another_tenants_job_on_the_same_key(redis_url):
    # Two slots on the key, 400 of tenant A's jobs waiting for them (about 40 s of work): tenant B's
    # single job, submitted behind them, takes one of the next slots, not the 401st.
    async with dev_stack(redis_url=redis_url, replicate_concurrency=2, poll_min_seconds=0.05,
                         log_format="text") as stack:
        r = aioredis.Redis.from_url(redis_url)
        key_a = await create_api_key(r, "fair-a")
        await r.aclose()
        async with api(stack, key_a) as a, api(stack) as b:
            items = [IMAGE | {"input": {"prompt": f"batch item {i} [sim:run=0.15]"}} for i in range(400)]
            resp = await a.post("/v1/batches", json={"jobs": items})
            assert resp.status_code == 202, resp.text
            batch_id = resp.json()["id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the line forms: A's jobs wait for the key's two slots
                page = (await a.get(f"/v1/batches/{batch_id}/jobs", params={"status": "queued"})).json()
                if len(page["data"]) >= 20 and any(j["phase"] == "throttled" for j in page["data"]):
                    break
                await asyncio.sleep(0.1)
            asked = time.monotonic()
            job = await submit(b, **IMAGE, input={"prompt": "tenant b's one job [sim:run=0.15]"})
            done = await wait_for(b, job["id"], timeout=30)
            waited = time.monotonic() - asked
            batch = (await a.get(f"/v1/batches/{batch_id}")).json()
            await a.post(f"/v1/batches/{batch_id}/cancel")
    assert done["status"] == "succeeded", done
    assert waited < 10, f"tenant B's job took {waited:.1f} s behind tenant A's batch"
    finished = sum(batch["counts"].get(s, 0) for s in ("succeeded", "failed"))
    assert finished < 100, f"{finished} of A's jobs finished before B's one job: B did not get its turn"


async def test_tenants_take_turns_in_a_keys_request_budget_line(redis_url):
    # 2 requests/s: 60 of tenant A's submissions line up for the key's budget (30 s of it); tenant
    # B's one job, arriving behind them, is told its turn is about one interval away, not 30 s.
    async with dev_stack(redis_url=redis_url, replicate_rpm=120, poll_min_seconds=5,
                         log_format="text") as stack:
        r = aioredis.Redis.from_url(redis_url)
        key_a = await create_api_key(r, "budget-a")
        await r.aclose()
        async with api(stack, key_a) as a, api(stack) as b:
            items = [IMAGE | {"input": {"prompt": f"budget item {i} [sim:run=0.1]"}} for i in range(60)]
            resp = await a.post("/v1/batches", json={"jobs": items})
            assert resp.status_code == 202, resp.text
            await asyncio.sleep(2.0)  # the line forms
            asked = time.monotonic()
            job = await submit(b, **IMAGE, input={"prompt": "tenant b's turn [sim:run=0.1]"})
            started = await wait_for(b, job["id"], {"submitted", "running", "succeeded"}, timeout=30)
            waited = time.monotonic() - asked
            events = (await b.get(f"/v1/jobs/{job['id']}/events")).json()
            await a.post(f"/v1/batches/{resp.json()['id']}/cancel")
    assert started["status"] in ("submitted", "running", "succeeded")
    ahead = [int(m.group(1)) for e in events if (m := re.search(r"\((\d+) jobs ahead", e.get("note") or ""))]
    assert all(n <= 2 for n in ahead), f"tenant B's job joined the budget line behind {ahead} jobs"
    assert waited < 15, f"tenant B's job waited {waited:.1f} s for the key's budget behind tenant A's batch"


async def test_dead_endpoints_of_one_tenant_do_not_delay_another_tenants_webhook(redis_url):
    # Tenant A: 50 endpoints on a receiver that accepts connections and never answers (each attempt
    # waits out the timeout) and 40 jobs: thousands of deliveries that can only fail. Tenant B's one
    # job's webhooks still arrive within seconds; A's destinations are circuit-broken, not retried
    # in a loop, and none of A's deliveries is attempted twice at once.
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    dead = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    receiver = WebhookReceiver()
    try:
        async with serving(receiver.app) as hooks, \
                dev_stack(redis_url=redis_url, webhook_timeout_seconds=2.0, worker_max_jobs=60,
                          webhook_retry_schedule="0,1,2,4,8", poll_min_seconds=0.1, log_format="text") as stack:
            r = aioredis.Redis.from_url(redis_url)
            key_a = await create_api_key(r, "flood-a")
            async with api(stack, key_a) as a, api(stack) as b:
                for i in range(50):
                    resp = await a.post("/v1/webhook-endpoints", json={"url": f"{dead}/hook/{i}"})
                    assert resp.status_code == 201, resp.text
                a_jobs = [(await submit(a, input={"prompt": f"a {i}"}))["id"] for i in range(40)]
                for job_id in a_jobs[-5:]:
                    await wait_for(a, job_id, timeout=60)
                pending = int(await r.zcard("atl:wh:due"))
                job = await submit(b, input={"prompt": "tenant b"}, webhook_url=f"{hooks}/hook")
                done = await wait_for(b, job["id"], timeout=30)
                finished = time.monotonic()
                await receiver.wait(2, timeout=30)  # job.running and job.succeeded
                delay = time.monotonic() - finished
                parked = int(await r.zcard("atl:whq:parked"))
            await r.aclose()
    finally:
        server.close()
        for writer in silent:
            writer.close()
    assert done["status"] == "succeeded"
    assert pending > 1000, f"only {pending} of tenant A's deliveries were pending: the flood did not build"
    assert delay < 10, f"tenant B's webhook arrived {delay:.1f} s after its job finished"
    assert parked > 0  # A's deliveries wait outside the queue while their circuits are open


async def test_the_sweeper_queues_an_overdue_delivery_once(redis_url):
    # Overdue but queued (a long queue, a slow receiver): left alone, however often the sweeper looks.
    # Lost (its queue entry gone): queued again, once.
    async with dev_stack(redis_url=redis_url, run_worker=False, sweep_grace_seconds=0.0,
                         log_format="text") as stack:
        rt = await Runtime.open(stack.settings)
        try:
            delivery = Delivery(id=new_id("msg"), tenant="sweep-test", url="http://127.0.0.1:9/hook",
                                event_type="job.succeeded", sequence=1, payload="{}",
                                next_attempt_at=utcnow() - timedelta(minutes=5))
            assert await rt.store.create_delivery(delivery)
            await rt.queue.deliver(delivery.id, 0, defer=600)

            async def entries() -> list[str]:
                queued = await rt.redis.zrange(rt.settings.webhook_queue_name, 0, -1)
                return [q.decode() for q in queued if delivery.id in q.decode()]

            for _ in range(3):
                await rt.store.touch_due_delivery(delivery.id, time.time() - 60)  # overdue again
                await sweep({"rt": rt})
            assert await entries() == [f"wh:{delivery.id}:0"]
            await rt.redis.zrem(rt.settings.webhook_queue_name, f"wh:{delivery.id}:0")
            await rt.redis.delete(f"{job_key_prefix}wh:{delivery.id}:0")  # the entry is lost
            for _ in range(3):
                await rt.store.touch_due_delivery(delivery.id, time.time() - 60)
                await sweep({"rt": rt})
            assert await entries() == [f"wh:{delivery.id}:0"]
        finally:
            await rt.close()


async def test_a_freed_place_goes_to_the_oldest_waiting_delivery_of_its_destination(redis_url):
    # Two places at the destination, fixed (start and most; each attempt takes 30 ms), 20 deliveries
    # admitted at once (a line builds, whatever the machine's load), then 20 newcomers while it
    # drains. Each finished attempt hands its place to the oldest waiting one, so they start in the
    # order they came (a newcomer cannot take a freed place first), never more than two at once,
    # each once.
    receiver = CountingReceiver(delay=0.03)
    arrivals = receiver.arrivals

    async with serving(receiver) as hooks, \
            dev_stack(redis_url=redis_url, webhook_endpoint_concurrency=2, webhook_endpoint_concurrency_max=2,
                      log_format="text") as stack:
        rt = await Runtime.open(stack.settings)
        try:
            admitted = []
            waiting = 0
            dest = destination(Delivery(id="x", tenant="line-test", url=f"{hooks}/hook", event_type="e",
                                        sequence=0, payload="{}"))
            for i in range(40):
                delivery = Delivery(id=new_id("msg"), tenant="line-test", url=f"{hooks}/hook",
                                    event_type="job.succeeded", sequence=i, payload="{}")
                assert await rt.store.create_delivery(delivery)
                await rt.webhook_gates.admit([delivery], int(time.time() * 1000))
                admitted.append(delivery.id)
                if i >= 19:  # the burst is in: newcomers from now on
                    waiting = max(waiting, int(await rt.redis.zcard("atl:whq:dest:" + dest + ":waiting")))
                    await asyncio.sleep(0.01)
            deadline = time.monotonic() + 30
            delivered = []
            while time.monotonic() < deadline:  # until each is recorded (after its answer)
                delivered = [await rt.store.get_delivery(d) for d in admitted]
                if all(d is not None and d.status != "pending" for d in delivered):
                    break
                await asyncio.sleep(0.05)
        finally:
            await rt.close()
    assert waiting >= 5, f"the line never built (at most {waiting} waiting)"
    assert sorted(arrivals) == sorted(admitted), "every delivery arrives, once"
    assert receiver.most <= 2, f"{receiver.most} attempts at once at a destination allowed two"
    # two places work side by side (one may stall a moment on a loaded machine while the other goes
    # on): each starts within three steps of its place in the line (a newcomer taking a freed place
    # first would start a whole line, 5 or more, ahead of its place)
    out_of_line = [(i, arrivals.index(d)) for i, d in enumerate(admitted) if abs(arrivals.index(d) - i) > 3]
    assert not out_of_line, f"(place in line, place in arrivals): {out_of_line}"
    assert all(d is not None and d.status == "delivered" and len(d.attempts) == 1 for d in delivered)


async def test_a_destinations_limit_grows_while_it_answers_quickly_and_falls_back_when_it_answers_slowly(redis_url):
    # Starting at two places, at most six: 60 deliveries at once to a receiver answering in 10 ms take
    # more than two places at once (the limit grows with each quick success while at least as many
    # as the limit wait), never more than six. Then six at once to the same receiver answering in
    # 1.2 s (slow: over half the 2 s timeout): each slow success halves the limit, back to the two it
    # started with; all are delivered, once.
    receiver = CountingReceiver(delay=0.01)
    arrivals = receiver.arrivals

    async with serving(receiver) as hooks, \
            dev_stack(redis_url=redis_url, webhook_endpoint_concurrency=2, webhook_endpoint_concurrency_max=6,
                      webhook_timeout_seconds=2.0, log_format="text") as stack:
        rt = await Runtime.open(stack.settings)
        try:
            def new_delivery(i: int) -> Delivery:
                return Delivery(id=new_id("msg"), tenant="adaptive", url=f"{hooks}/hook",
                                event_type="job.succeeded", sequence=i, payload="{}")

            limit_key = f"atl:whq:dest:{destination(new_delivery(0))}:limit"

            async def deliver_all(deliveries: list[Delivery]) -> list[Delivery | None]:
                for d in deliveries:
                    assert await rt.store.create_delivery(d)
                await rt.webhook_gates.admit(deliveries, int(time.time() * 1000))
                deadline = time.monotonic() + 60
                stored: list[Delivery | None] = []
                while time.monotonic() < deadline:  # until each is recorded delivered (after its answer)
                    stored = [await rt.store.get_delivery(d.id) for d in deliveries]
                    if all(d is not None and d.status != "pending" for d in stored):
                        break
                    await asyncio.sleep(0.1)
                return stored

            quick = await deliver_all([new_delivery(i) for i in range(60)])
            most_quick, limit_quick = receiver.most, int(await rt.redis.get(limit_key) or 0)
            receiver.delay, receiver.most = 1.2, 0
            slow = await deliver_all([new_delivery(i) for i in range(6)])
            limit_slow = int(await rt.redis.get(limit_key) or 0)
        finally:
            await rt.close()
    assert 2 < most_quick <= 6, f"{most_quick} at once (start 2, at most 6)"
    assert limit_quick == 6, limit_quick
    assert limit_slow == 2, f"six slow answers left the limit at {limit_slow}"
    assert len(arrivals) == len(set(arrivals)) == 66, "each delivered once"
    assert all(d is not None and d.status == "delivered" and len(d.attempts) == 1 for d in quick + slow)
