"""Webhook endpoints: CRUD and tenant walls, event filters, secret rotation, deliveries (list, replay,
recover), dead letters, auto-disable, Retry-After, and the destination guard.

Receivers are real HTTP servers on loopback; every delivery is verified with the
``standardwebhooks`` library. No name outside loopback is ever resolved: guard
tests use IP literals and ``localhost``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.destinations import address_problem, url_problem, webhook_client
from orchestrator.infra.redis_server import free_port
from orchestrator.store.endpoints import Endpoints
from orchestrator.store.jobs import JobStore
from orchestrator.store.tenants import create_api_key
from providers.sandbox.serve import serving
from tests.helpers import api, submit, wait_for
from workers.delivery import post, retry_delay

FAST = {"log_format": "text", "webhook_retry_schedule": "0,0.1,0.1"}


class Receiver:
    """Records every call (time, headers, body); ``answer`` decides the response (default 204)."""

    def __init__(self, answer: Callable[[int], Response] | None = None) -> None:
        self.calls: list[tuple[float, dict[str, str], bytes]] = []
        self.answer = answer or (lambda n: Response(status_code=204))
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.calls.append((time.monotonic(), dict(request.headers), await request.body()))
        return self.answer(len(self.calls))

    def events(self, secret: str | None = None) -> list[dict[str, Any]]:
        if secret is None:
            return [json.loads(body) for _, _, body in self.calls]
        return [Webhook(secret).verify(body, headers) for _, headers, body in self.calls]

    def types(self) -> list[str]:
        return sorted(e["type"] for e in self.events())

    async def wait(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.calls) >= count, f"got {len(self.calls)} calls, wanted {count}"


async def make_endpoint(client: httpx.AsyncClient, url: str, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/webhook-endpoints", json={"url": url} | body)
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


async def wait_until(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def deliveries(client: httpx.AsyncClient, endpoint_id: str, **params: Any) -> list[dict[str, Any]]:
    resp = await client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", params=params)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


# -- CRUD, tenants, filters ------------------------------------------------------------------------

async def test_endpoint_crud_and_tenant_walls(stack: Stack, redis_url: str) -> None:
    r = redis.asyncio.Redis.from_url(redis_url)
    other_key = await create_api_key(r, "other-tenant")
    await r.aclose()
    async with api(stack) as mine, api(stack, other_key) as theirs:
        created = await make_endpoint(mine, "http://127.0.0.1:9/hook", events=["job.succeeded"],
                                      description="orders")
        ep = created["id"]
        assert ep.startswith("ep_") and created["secret"].startswith("whsec_")
        assert created["events"] == ["job.succeeded"] and created["enabled"] and created["failing_since"] is None
        got = (await mine.get(f"/v1/webhook-endpoints/{ep}")).json()
        assert got["url"] == "http://127.0.0.1:9/hook" and "secret" not in got
        assert (await mine.get(f"/v1/webhook-endpoints/{ep}/secret")).json()["secret"] == created["secret"]
        second = await make_endpoint(mine, "http://127.0.0.1:9/other")
        listed = (await mine.get("/v1/webhook-endpoints")).json()
        assert [e["id"] for e in listed["data"]] == [second["id"], ep] and second["events"] == []
        page = (await mine.get("/v1/webhook-endpoints", params={"limit": 1})).json()
        assert [e["id"] for e in page["data"]] == [second["id"]] and page["next_cursor"] == second["id"]
        rest = (await mine.get("/v1/webhook-endpoints", params={"cursor": page["next_cursor"]})).json()
        assert [e["id"] for e in rest["data"]] == [ep] and rest["next_cursor"] is None

        patched = await mine.patch(f"/v1/webhook-endpoints/{ep}",
                                   json={"events": ["job.failed", "batch.completed"], "description": None,
                                         "enabled": False})
        assert patched.status_code == 200, patched.text
        p = patched.json()
        assert p["events"] == ["job.failed", "batch.completed"] and p["description"] is None
        assert not p["enabled"] and p["disabled_reason"] == "disabled through the API" and p["disabled_at"]
        again = (await mine.patch(f"/v1/webhook-endpoints/{ep}", json={"enabled": True})).json()
        assert again["enabled"] and again["disabled_reason"] is None and again["disabled_at"] is None

        bad = await mine.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/", "events": ["job.exploded"]})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "events.0"
        bad = await mine.post("/v1/webhook-endpoints", json={"url": "ftp://127.0.0.1/"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "url"
        bad = await mine.patch(f"/v1/webhook-endpoints/{ep}", json={"url": None})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "url"

        for method, path in [("GET", f"/v1/webhook-endpoints/{ep}"), ("PATCH", f"/v1/webhook-endpoints/{ep}"),
                             ("DELETE", f"/v1/webhook-endpoints/{ep}"),
                             ("GET", f"/v1/webhook-endpoints/{ep}/secret"),
                             ("POST", f"/v1/webhook-endpoints/{ep}/secret/rotate"),
                             ("GET", f"/v1/webhook-endpoints/{ep}/deliveries"),
                             ("POST", f"/v1/webhook-endpoints/{ep}/recover?since=2020-01-01T00:00:00Z")]:
            resp = await theirs.request(method, path, json={} if method == "PATCH" else None)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.headers["content-type"] == "application/problem+json"
        assert (await theirs.get("/v1/webhook-endpoints")).json()["data"] == []

        assert (await mine.delete(f"/v1/webhook-endpoints/{ep}")).status_code == 204
        assert (await mine.get(f"/v1/webhook-endpoints/{ep}")).status_code == 404
        assert (await mine.delete(f"/v1/webhook-endpoints/{ep}")).status_code == 404
        assert [e["id"] for e in (await mine.get("/v1/webhook-endpoints")).json()["data"]] == [second["id"]]


async def test_event_filters_disabled_endpoints_and_batch_events(stack: Stack) -> None:
    everything, succeeded_only, disabled, batches_only = Receiver(), Receiver(), Receiver(), Receiver()
    async with serving(everything.app) as a, serving(succeeded_only.app) as b, serving(disabled.app) as c, \
            serving(batches_only.app) as d, api(stack) as client:
        all_ep = await make_endpoint(client, f"{a}/hook")
        ok_ep = await make_endpoint(client, f"{b}/hook", events=["job.succeeded"])
        await make_endpoint(client, f"{c}/hook", enabled=False)
        batch_ep = await make_endpoint(client, f"{d}/hook", events=["batch.completed"])
        job = await submit(client, input={"prompt": "a heron"})
        failed = await submit(client, input={"prompt": "x [sim:fail]"})
        await wait_for(client, job["id"])
        await wait_for(client, failed["id"])
        resp = await client.post("/v1/batches", json={"jobs": [
            {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
             "input": {"prompt": "a moth"}}]})
        assert resp.status_code == 202, resp.text
        batch_id = resp.json()["id"]
        await batches_only.wait(1)
        await everything.wait(7)  # 2 + 2 job events, 2 for the batch's job, batch.completed (+ progress)
        await asyncio.sleep(0.5)  # anything else would have arrived by now

    events = everything.events(all_ep["secret"])  # raises unless every signature verifies
    by_job: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["type"].startswith("job."):
            by_job.setdefault(e["data"]["id"], []).append(e)
    assert sorted(e["type"] for e in by_job[job["id"]]) == ["job.running", "job.succeeded"]
    assert sorted(e["type"] for e in by_job[failed["id"]]) == ["job.failed", "job.running"]
    for evs in by_job.values():
        seqs = [e["sequence"] for e in sorted(evs, key=lambda e: e["type"] != "job.running")]
        assert seqs == sorted(seqs) and all(e["data"]["sequence"] == e["sequence"] for e in evs)
    completed = [e for e in events if e["type"] == "batch.completed"]
    assert len(completed) == 1 and completed[0]["data"]["id"] == batch_id
    assert completed[0]["data"]["counts"]["succeeded"] == 1

    ok_events = succeeded_only.events(ok_ep["secret"])
    assert {e["type"] for e in ok_events} == {"job.succeeded"} and len(ok_events) == 2  # the job's, the batch's
    assert disabled.calls == []
    assert [e["type"] for e in batches_only.events(batch_ep["secret"])] == ["batch.completed"]
    with pytest.raises(WebhookVerificationError):  # each endpoint signs with its own secret
        Webhook(ok_ep["secret"]).verify(everything.calls[0][2], everything.calls[0][1])


async def test_secret_rotation_signs_with_old_and_new_during_grace(stack: Stack) -> None:
    receiver = Receiver()
    async with serving(receiver.app) as base, api(stack) as client:
        ep = await make_endpoint(client, f"{base}/hook", events=["job.succeeded"])
        first = ep["secret"]
        rotated = await client.post(f"/v1/webhook-endpoints/{ep['id']}/secret/rotate")
        assert rotated.status_code == 200, rotated.text
        second = rotated.json()["secret"]
        assert second != first and second.startswith("whsec_")
        expiry = datetime.fromisoformat(rotated.json()["previous_secrets_expire_at"][0])
        assert timedelta(hours=23) < expiry - datetime.now(UTC) <= timedelta(hours=24)
        assert (await client.get(f"/v1/webhook-endpoints/{ep['id']}/secret")).json()["secret"] == second

        job = await submit(client)
        await wait_for(client, job["id"])
        await receiver.wait(1)
        _, headers, body = receiver.calls[0]
        assert len(headers["webhook-signature"].split(" ")) == 2
        for secret in (first, second):  # a receiver on either secret accepts it
            assert Webhook(secret).verify(body, headers)["data"]["id"] == job["id"]

        # No grace for the second secret: it stops signing at once (the first keeps its 24 h).
        third = (await client.post(f"/v1/webhook-endpoints/{ep['id']}/secret/rotate",
                                   json={"grace_period_seconds": 0})).json()["secret"]
        job = await submit(client)
        await wait_for(client, job["id"])
        await receiver.wait(2)
        _, headers, body = receiver.calls[1]
        assert Webhook(third).verify(body, headers) and Webhook(first).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(second).verify(body, headers)
        bad = await client.post(f"/v1/webhook-endpoints/{ep['id']}/secret/rotate",
                                json={"grace_period_seconds": -1})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "grace_period_seconds"


async def test_retry_after_is_honoured_with_a_stable_webhook_id(stack: Stack) -> None:
    def answer(n: int) -> Response:
        return Response("busy", status_code=503, headers={"Retry-After": "2"}) if n == 1 else Response("ok")

    receiver = Receiver(answer)
    async with serving(receiver.app) as base, api(stack) as client:
        ep = await make_endpoint(client, f"{base}/hook", events=["job.succeeded"])
        job = await submit(client)
        await wait_for(client, job["id"])
        await receiver.wait(2)
        (t1, h1, b1), (t2, h2, b2) = receiver.calls
        # The dev stack's schedule says 0.5 s (±20 %) before the second attempt; the receiver asked for 2 s.
        assert 1.9 <= t2 - t1 < 8.0, t2 - t1
        assert h1["webhook-id"] == h2["webhook-id"] and b1 == b2
        Webhook(ep["secret"]).verify(b2, h2)
        delivered: list[dict[str, Any]] = []
        for _ in range(50):  # the attempt is recorded just after the receiver answered
            delivered = await deliveries(client, ep["id"], status="delivered")
            if delivered:
                break
            await asyncio.sleep(0.1)
        assert [d["id"] for d in delivered] == [h1["webhook-id"]]
        attempts = delivered[0]["attempts"]
        assert [a["status_code"] for a in attempts] == [503, 200]
        assert attempts[0]["response_excerpt"] == "busy" and all(a["latency_ms"] >= 0 for a in attempts)


def test_retry_delay_bounds() -> None:
    schedule = [0, 5, 300, 36000]
    assert 4.0 <= retry_delay(schedule, 1, None) <= 6.0
    assert retry_delay(schedule, 1, 60) == 60  # the receiver asked for longer
    assert 240 <= retry_delay(schedule, 2, 1) <= 360  # never sooner than the schedule
    assert retry_delay(schedule, 1, 10**9) == 36000  # bounded by the longest step


# -- deliveries: dead letters, replay, recover, auto-disable ---------------------------------------

async def test_dead_letters_replay_and_recover(redis_url: str) -> None:
    up = False

    def answer(n: int) -> Response:
        return Response("ok") if up else Response("down for maintenance", status_code=500)

    receiver = Receiver(answer)
    async with dev_stack(redis_url=redis_url, **FAST) as stack, serving(receiver.app) as base, \
            api(stack) as client:
        started = datetime.now(UTC)
        ep = await make_endpoint(client, f"{base}/hook")
        job = await submit(client)
        await wait_for(client, job["id"])

        async def all_dead() -> list[dict[str, Any]] | None:
            dead = await deliveries(client, ep["id"], status="dead")
            return dead if len(dead) == 2 else None

        dead = await wait_until(all_dead)
        assert [d["event_type"] for d in dead] == ["job.succeeded", "job.running"]  # newest first
        assert all(len(d["attempts"]) == 3 and d["next_attempt_at"] is None for d in dead)
        assert {a["status_code"] for d in dead for a in d["attempts"]} == {500}
        assert dead[0]["attempts"][0]["response_excerpt"] == "down for maintenance"
        assert await deliveries(client, ep["id"], status="pending") == []
        assert len(receiver.calls) == 6
        ids_seen = {h["webhook-id"] for _, h, _ in receiver.calls}
        assert ids_seen == {d["id"] for d in dead}

        page = (await client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries", params={"limit": 1})).json()
        assert [d["id"] for d in page["data"]] == [dead[0]["id"]] and page["next_cursor"] == dead[0]["id"]
        page = (await client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries",
                                 params={"limit": 1, "cursor": page["next_cursor"]})).json()
        assert [d["id"] for d in page["data"]] == [dead[1]["id"]] and page["next_cursor"] is None
        one = (await client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries/{dead[0]['id']}")).json()
        assert one["payload"]["type"] == "job.succeeded" and one["payload"]["data"]["id"] == job["id"]
        assert one["job_id"] == job["id"] and one["sequence"] == one["payload"]["sequence"]
        missing = await client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries/msg_nope")
        assert missing.status_code == 404

        up = True
        replayed = await client.post(f"/v1/webhook-endpoints/{ep['id']}/deliveries/{dead[0]['id']}/replay")
        assert replayed.status_code == 202, replayed.text
        assert replayed.json()["status"] == "pending"
        await receiver.wait(7)
        _, headers, body = receiver.calls[6]
        assert headers["webhook-id"] == dead[0]["id"]  # the same id, a new attempt series
        assert Webhook(ep["secret"]).verify(body, headers)["type"] == "job.succeeded"

        async def delivered(delivery_id: str) -> dict[str, Any] | None:
            d = (await client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries/{delivery_id}")).json()
            return d if d["status"] == "delivered" else None

        done = await wait_until(lambda: delivered(dead[0]["id"]))
        assert [a["status_code"] for a in done["attempts"]] == [500, 500, 500, 200]
        again = await client.post(f"/v1/webhook-endpoints/{ep['id']}/deliveries/{dead[0]['id']}/replay")
        assert again.status_code == 202  # a delivered one can be sent again too
        await receiver.wait(8)

        future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        nothing = (await client.post(f"/v1/webhook-endpoints/{ep['id']}/recover", params={"since": future})).json()
        assert nothing["recovered"] == 0
        recovered = await client.post(f"/v1/webhook-endpoints/{ep['id']}/recover",
                                      params={"since": started.isoformat()})
        assert recovered.status_code == 202, recovered.text
        assert recovered.json()["delivery_ids"] == [dead[1]["id"]] and not recovered.json()["more"]
        await receiver.wait(9)
        assert receiver.calls[8][1]["webhook-id"] == dead[1]["id"]
        await wait_until(lambda: delivered(dead[1]["id"]))
        assert await deliveries(client, ep["id"], status="dead") == []
        assert len(await deliveries(client, ep["id"], status="delivered")) == 2
        bad = await client.post(f"/v1/webhook-endpoints/{ep['id']}/recover", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "since"

        # Deleting the endpoint takes its delivery records with it.
        assert (await client.delete(f"/v1/webhook-endpoints/{ep['id']}")).status_code == 204
        r = redis.asyncio.Redis.from_url(redis_url)
        assert not await r.exists(*(f"atl:wh:{d['id']}" for d in dead))
        assert not await r.keys(f"atl:ep:{ep['id']}*")
        await r.aclose()


async def test_endpoint_failing_continuously_is_disabled(redis_url: str) -> None:
    receiver = Receiver(lambda n: Response("nope", status_code=500))
    healthy = Receiver()
    async with dev_stack(redis_url=redis_url, log_format="text", webhook_retry_schedule="0,0.3,0.3,0.3,0.3,0.3",
                         webhook_disable_after_seconds=0.5) as stack, \
            serving(receiver.app) as base, serving(healthy.app) as ok_base, api(stack) as client:
        ep = await make_endpoint(client, f"{base}/hook", events=["job.succeeded"])
        fine = await make_endpoint(client, f"{ok_base}/hook", events=["job.succeeded"])
        job = await submit(client)
        await wait_for(client, job["id"])

        async def disabled() -> dict[str, Any] | None:
            e = (await client.get(f"/v1/webhook-endpoints/{ep['id']}")).json()
            return e if not e["enabled"] else None

        e = await wait_until(disabled)
        assert e["disabled_reason"].startswith("every delivery failed for") and "HTTP 500" in e["disabled_reason"]
        assert e["disabled_at"] and e["failing_since"]
        [dead] = await deliveries(client, ep["id"], status="dead")
        assert dead["note"] == "the endpoint was disabled after failing continuously"
        assert 2 <= len(dead["attempts"]) < 6  # disabled before the schedule ran out
        calls = len(receiver.calls)

        # A disabled endpoint gets nothing; the healthy one still gets everything.
        job = await submit(client)
        await wait_for(client, job["id"])
        await healthy.wait(2)
        await asyncio.sleep(0.5)
        assert len(receiver.calls) == calls
        assert len(await deliveries(client, ep["id"])) == 1
        assert (await client.get(f"/v1/webhook-endpoints/{fine['id']}")).json()["enabled"]
        refused = await client.post(f"/v1/webhook-endpoints/{ep['id']}/deliveries/{dead['id']}/replay")
        assert refused.status_code == 409 and "disabled" in refused.json()["detail"]

        back = (await client.patch(f"/v1/webhook-endpoints/{ep['id']}", json={"enabled": True})).json()
        assert back["enabled"] and back["disabled_reason"] is None and back["failing_since"] is None


# -- destination guard ------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                  "100.100.100.200", "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1",
                                  "fd00:ec2::254", "::ffff:127.0.0.1", "2002:7f00:1::1", "64:ff9b::a00:1"])
def test_refused_addresses(host: str) -> None:
    import ipaddress

    assert address_problem(ipaddress.ip_address(host)) is not None


async def test_url_guard_without_resolving_public_names() -> None:
    assert "metadata" in (await url_problem("http://169.254.169.254/latest/meta-data", allow_private=False) or "")
    assert "loopback" in (await url_problem("http://localhost:8080/hook", allow_private=False) or "")
    assert "loopback" in (await url_problem("http://[::1]/hook", allow_private=False) or "")
    assert "private" in (await url_problem("https://10.0.0.1/hook", allow_private=False) or "")
    assert await url_problem("https://93.184.215.14/hook", allow_private=False) is None  # public literal
    assert await url_problem("http://10.0.0.1/hook", allow_private=True) is None


async def test_delivery_time_guard_refuses_before_connecting() -> None:
    """The guarded client checks where it connects, whatever was checked at registration."""
    receiver = Receiver()
    async with serving(receiver.app) as base, webhook_client(5, allow_private=False) as client:
        port = base.rsplit(":", 1)[1]
        for url in (f"{base}/hook", f"http://localhost:{port}/hook"):
            out = await post(client, url, b"{}", {"content-type": "application/json"}, 5)
            assert out.status_code is None and out.error is not None and "destination refused" in out.error, out
        assert receiver.calls == []
    async with serving(receiver.app) as base, webhook_client(5, allow_private=True) as client:
        out = await post(client, f"{base}/hook", b"{}", {}, 5)
        assert out.ok and len(receiver.calls) == 1


async def test_guard_refuses_private_destinations_everywhere(redis_url: str) -> None:
    receiver = Receiver()
    async with dev_stack(redis_url=redis_url, webhook_allow_private=False, **FAST) as stack, \
            serving(receiver.app) as base, api(stack) as client:
        for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/hook", "http://localhost:8080/hook"):
            resp = await client.post("/v1/webhook-endpoints", json={"url": url})
            assert resp.status_code == 422, (url, resp.text)
            assert resp.json()["errors"] == [{"field": "url", "message": resp.json()["errors"][0]["message"]}]
        resp = await client.post("/v1/jobs", json={"provider": "replicate", "kind": "image",
                                                   "model": "black-forest-labs/flux-schnell",
                                                   "input": {"prompt": "x"}, "webhook_url": "http://10.0.0.1/h"})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "webhook_url"
        assert "private" in resp.json()["detail"]
        item = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
                "input": {"prompt": "x"}}
        resp = await client.post("/v1/batches", json={"jobs": [item], "webhook_url": "http://127.0.0.1:1/"})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "webhook_url"
        resp = await client.post("/v1/batches", json={"atomic": True, "jobs": [
            item, item | {"webhook_url": "http://169.254.169.254/"}]})
        assert resp.status_code == 422
        assert [(p["index"], p["field"]) for p in resp.json()["invalid"]] == [(1, "webhook_url")]
        patch_target = await make_endpoint(client, "https://93.184.215.14/hook", events=["job.succeeded"])
        resp = await client.patch(f"/v1/webhook-endpoints/{patch_target['id']}", json={"url": f"{base}/hook"})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "url"

        # DNS rebinding: the endpoint's name now leads to loopback. Stand-in: point the stored URL there
        # directly, past the registration check; the delivery-time check still refuses to connect.
        endpoints = Endpoints(JobStore(redis.asyncio.Redis.from_url(redis_url)))

        def rebind(e: Any) -> bool:
            e.url = f"{base}/hook"
            return True

        assert await endpoints.update("dev", patch_target["id"], rebind)
        await endpoints.redis.aclose()
        job = await submit(client)
        await wait_for(client, job["id"])

        async def dead() -> list[dict[str, Any]] | None:
            found = await deliveries(client, patch_target["id"], status="dead")
            return found or None

        [d] = await wait_until(dead)
        assert all("destination refused" in (a["error"] or "") for a in d["attempts"]), d["attempts"]
        assert "loopback" in d["attempts"][0]["error"]
        assert receiver.calls == []


async def test_allow_private_accepts_private_destinations(stack: Stack) -> None:
    assert stack.settings.webhook_allow_private  # the dev stack (and so the tests) turn it on
    async with api(stack) as client:
        for url in ("http://10.0.0.1/hook", "http://localhost:8080/hook", f"http://127.0.0.1:{free_port()}/h"):
            resp = await client.post("/v1/webhook-endpoints", json={"url": url})
            assert resp.status_code == 201, resp.text
