"""Bad input gets a clear problem+json and nothing is enqueued; tenants are walled."""

from __future__ import annotations

import httpx
import pytest
import redis

from orchestrator.store.tenants import create_api_key
from tests.helpers import api, submit, wait_for

GOOD = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
        "input": {"prompt": "a fox"}}


def _count_state(url: str) -> tuple[int, int]:
    r = redis.Redis.from_url(url)
    jobs = len(r.keys("atl:job:*"))
    queued = [m for m in r.zrange("atelier:jobs", 0, -1) if not m.startswith(b"cron:")]
    return jobs, len(queued)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (GOOD | {"provider": "dalle"}, "provider"),
        (GOOD | {"model": "not a model!"}, "model"),
        (GOOD | {"kind": "hologram"}, "kind"),
        (GOOD | {"input": {"prompt": "x", "duration_seconds": -3}}, "input.duration_seconds"),
        (GOOD | {"input": {"prompt": "x", "colour": "red"}}, "input.colour"),
        (GOOD | {"input": {"prompt": "x", "num_outputs": 99}}, "input.num_outputs"),
        (GOOD | {"input": {"options": {"bad key": 1}}}, "input.options.bad key"),
        (GOOD | {"webhook_url": "not-a-url"}, "webhook_url"),
        (GOOD | {"metadata": {"blob": "x" * 5000}}, "metadata"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "model"),
    ],
)
async def test_invalid_fields_are_named_and_nothing_is_enqueued(stack, redis_url, body, field):
    before = _count_state(redis_url)
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["status"] == 422 and field in [e["field"] for e in problem["errors"]]
    assert field in problem["detail"]
    assert _count_state(redis_url) == before


async def test_malformed_json_and_oversized_body(stack, redis_url):
    before = _count_state(redis_url)
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", content=b'{"provider": "replicate",',
                                 headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["title"] == "Malformed JSON"
        big = GOOD | {"input": {"prompt": "x" * (2 * 1024 * 1024)}}
        resp = await client.post("/v1/jobs", json=big)
        assert resp.status_code == 413 and resp.headers["content-type"] == "application/problem+json"

        async def chunks():  # no Content-Length: the limit applies while streaming
            yield b'{"provider": "replicate", "input": {"prompt": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}}'

        resp = await client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
    assert _count_state(redis_url) == before


async def test_authentication(stack):
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        resp = await client.post("/v1/jobs", json=GOOD)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        resp = await client.get("/v1/jobs", headers={"Authorization": "Bearer atl_wrong"})
        assert resp.status_code == 401 and resp.json()["detail"] == "the API key is not valid"
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_idempotency_key(stack, redis_url):
    async with api(stack) as client:
        first = await client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "order-42"})
        again = await client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "order-42"})
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"]
        other = GOOD | {"input": {"prompt": "a wolf"}}
        clash = await client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "order-42"})
        assert clash.status_code == 409 and clash.json()["job_id"] == first.json()["id"]
        await wait_for(client, first.json()["id"])
    stats = stack.simulators["replicate"].stats
    assert stats.creations == 1


async def test_tenants_are_walled(stack, redis_url):
    r = redis.asyncio.Redis.from_url(redis_url)
    other_key = await create_api_key(r, "other-tenant")
    await r.aclose()
    async with api(stack) as mine, api(stack, other_key) as theirs:
        job = await submit(mine)
        for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                             ("GET", f"/v1/jobs/{job['id']}/events")]:
            resp = await theirs.request(method, path)
            assert resp.status_code == 404, (method, path)
            assert job["id"] in resp.json()["detail"] and "prompt" not in resp.text
        assert (await theirs.get("/v1/jobs")).json()["data"] == []
        assert (await mine.get("/v1/jobs")).json()["data"][0]["id"] == job["id"]
        assert (await theirs.get("/v1/webhook-secret")).json() != (await mine.get("/v1/webhook-secret")).json()


async def test_list_filters_and_cursor(stack):
    async with api(stack) as client:
        ids = [(await submit(client, input={"prompt": f"p{i}"}))["id"] for i in range(5)]
        for job_id in ids:
            await wait_for(client, job_id)
        failed = await submit(client, input={"prompt": "broken [sim:fail]"})
        failed = await wait_for(client, failed["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "provider_failed"
        assert "CUDA" in failed["error"]["message"]

        page = (await client.get("/v1/jobs", params={"limit": 2})).json()
        seen = [j["id"] for j in page["data"]]
        while page["next_cursor"]:
            page = (await client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]})).json()
            seen += [j["id"] for j in page["data"]]
        assert seen == [failed["id"], *reversed(ids)]
        only_failed = (await client.get("/v1/jobs", params={"status": "failed"})).json()["data"]
        assert [j["id"] for j in only_failed] == [failed["id"]]
        assert (await client.get("/v1/jobs", params={"provider": "fal"})).json()["data"] == []
        resp = await client.get("/v1/jobs", params={"status": "exploded"})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "status"


async def test_unknown_job_is_404_problem(stack):
    async with api(stack) as client:
        resp = await client.get("/v1/jobs/job_doesnotexist")
        assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
