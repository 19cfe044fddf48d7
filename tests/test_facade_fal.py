"""The fal queue facade (``/fal``) driven by the official ``fal_client`` package against the real stack.

Every call goes over loopback HTTP to the real API, worker, Redis, simulators and storage; the
requests are ordinary Atelier jobs, checked through ``/v1/jobs/{id}``.

Pointing ``fal_client`` at Atelier: the key is an Atelier API key (``SyncClient(key=...)``,
``AsyncClient(key=...)`` or ``FAL_KEY``; sent as ``Authorization: Key <key>``). The queue URL is
the module constant ``fal_client.client.QUEUE_URL_FORMAT``, built once at import as
``https://`` + ``FAL_QUEUE_RUN_HOST`` + ``/``: the environment variable can change the host but not
the scheme, and the API here is plain HTTP on loopback, so the tests set the constant to
``<atelier>/fal/`` (``monkeypatch``, undone after each test). ``submit`` uses it; the handle it
returns follows the URLs Atelier answered with; ``status``/``result``/``cancel`` by request id
rebuild them from the constant. The module-level ``fal_client.submit`` etc. share one client that
keeps the first key it read, so each test makes its own client.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from tests.helpers import api


@pytest.fixture
def queue_url(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"{stack.api_url}/fal/"
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", url)
    return url


async def job_of(stack: Stack, job_id: str) -> dict[str, Any]:
    async with api(stack) as plain:
        resp = await plain.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job


async def sha256_of(url: str) -> str:
    async with httpx.AsyncClient() as plain:  # the signed storage URL, no API key
        resp = await plain.get(url)
        assert resp.status_code == 200, url
        return hashlib.sha256(resp.content).hexdigest()


async def test_submit_status_result_on_fal_kling_and_replicate_models(stack, queue_url):
    client = fal_client.AsyncClient(key=stack.api_key)
    image = await client.submit("fal-ai/flux/schnell", {"prompt": "a red fox", "num_images": 2,
                                                        "image_size": "square_hd"})
    assert image.request_id.startswith("job_")
    # fal's request URLs name owner/app only (the sub-path is dropped)
    assert image.status_url == f"{queue_url}fal-ai/flux/requests/{image.request_id}/status"
    video = await client.submit("kling/kling-v2-1-master", {"prompt": "a paper boat", "duration": "5"})
    other = await client.submit("replicate/black-forest-labs/flux-schnell", {"prompt": "a fox", "go_fast": True})

    result = await image.get(interval=0.05)
    job = await job_of(stack, image.request_id)
    assert (job["provider"], job["model"], job["kind"], job["status"]) == ("fal", "fal-ai/flux/schnell", "image",
                                                                          "succeeded")
    # fal's own input reaches fal as sent: num_images is read by the catalog too, image_size passes through
    assert job["input"]["num_outputs"] == 2 and job["input"]["options"] == {"image_size": "square_hd"}
    assert len(result["images"]) == 2 and result["prompt"] == "a red fox"
    assert [await sha256_of(f["url"]) for f in result["images"]] == [o["sha256"] for o in job["outputs"]]
    assert all(f["content_type"].startswith("image/") and f["width"] and f["file_size"] for f in result["images"])

    # status and result by request id (rebuilt from the queue URL, as after a restart)
    status = await client.status("kling/kling-v2-1-master", video.request_id, with_logs=True)
    assert isinstance(status, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    result = await client.result("kling/kling-v2-1-master", video.request_id)
    job = await job_of(stack, video.request_id)
    assert (job["provider"], job["kind"], job["input"]["duration_seconds"]) == ("kling", "video", 5)
    assert await sha256_of(result["video"]["url"]) == job["outputs"][0]["sha256"]
    assert result["video"]["content_type"] == job["outputs"][0]["content_type"]
    done = await client.status("kling/kling-v2-1-master", video.request_id, with_logs=True)
    assert isinstance(done, fal_client.Completed) and done.error is None and "inference_time" in done.metrics
    assert done.logs and any("succeeded" in line["message"] for line in done.logs)
    assert all({"message", "level", "timestamp"} <= set(line) for line in done.logs)

    result = await other.get(interval=0.05)
    job = await job_of(stack, other.request_id)
    assert (job["provider"], job["model"]) == ("replicate", "black-forest-labs/flux-schnell")
    assert job["input"]["options"] == {"go_fast": True} and len(result["images"]) == 1


async def test_subscribe_reports_queue_position_logs_and_updates(stack, queue_url, monkeypatch):
    monkeypatch.setenv("FAL_KEY", stack.api_key)
    client = fal_client.SyncClient()  # the key from FAL_KEY, as fal_client's users set it
    async with api(stack) as plain:  # the raw submit and status, as fal's queue API answers them
        resp = await plain.post("/fal/fal-ai/flux/schnell", json={"prompt": "first"},
                                headers={"Authorization": f"Key {stack.api_key}"})
        assert resp.status_code == 200 and resp.json()["status"] == "IN_QUEUE", resp.text
        body = resp.json()
        assert {"request_id", "response_url", "status_url", "cancel_url", "queue_position"} <= set(body)
        status = await plain.get(body["status_url"], params={"logs": "1"},
                                 headers={"Authorization": f"Key {stack.api_key}"})
        assert status.status_code in (200, 202) and status.json()["status"] in ("IN_QUEUE", "IN_PROGRESS",
                                                                                "COMPLETED")

    updates: list[Any] = []
    enqueued: list[str] = []

    def subscribe() -> Any:
        return client.subscribe("fal-ai/flux/schnell", {"prompt": "a lighthouse [sim:run=1]"}, with_logs=True,
                                interval=0.05, on_enqueue=enqueued.append, on_queue_update=updates.append)

    result = await asyncio.to_thread(subscribe)
    assert enqueued and enqueued[0].startswith("job_") and len(result["images"]) == 1
    assert isinstance(updates[-1], fal_client.Completed) and updates[-1].logs
    assert all(isinstance(u, (fal_client.Queued, fal_client.InProgress)) for u in updates[:-1])
    assert all(u.position >= 0 for u in updates if isinstance(u, fal_client.Queued))
    job = await job_of(stack, enqueued[0])
    assert job["status"] == "succeeded" and await sha256_of(result["images"][0]["url"]) == job["outputs"][0]["sha256"]


async def test_queue_position_counts_the_tenants_jobs_queued_before(redis_url):
    # Without a worker every job stays queued in Atelier: IN_QUEUE, behind the tenant's earlier ones.
    async with dev_stack(redis_url=redis_url, log_format="text", run_worker=False) as stack:
        redis = await connect(stack.settings.redis_url, stack.settings.queue_name)
        other_key = await create_api_key(redis, "other-tenant")
        await redis.aclose()
        async with api(stack) as plain, api(stack, other_key) as theirs:
            await theirs.post("/fal/fal-ai/flux/schnell", json={"prompt": "another tenant's"})
            waiting = [(await plain.post("/fal/fal-ai/flux/schnell", json={"prompt": f"wait {n}"})).json()
                       for n in range(3)]
            assert [w["queue_position"] for w in waiting] == [0, 1, 2]
            await plain.post(f"/v1/jobs/{waiting[0]['request_id']}/cancel")
            statuses = [(await plain.get(w["status_url"])) for w in waiting[1:]]
            assert [s.status_code for s in statuses] == [202, 202]
            assert [(s.json()["status"], s.json()["queue_position"]) for s in statuses] == [("IN_QUEUE", 0),
                                                                                          ("IN_QUEUE", 1)]


async def test_cancel_failures_and_tenant_walls(stack, queue_url):
    client = fal_client.AsyncClient(key=stack.api_key)
    slow = await client.submit("fal-ai/flux/schnell", {"prompt": "slow [sim:run=30]"})
    await slow.cancel()
    assert (await job_of(stack, slow.request_id))["status"] == "canceled"
    with pytest.raises(fal_client.FalClientHTTPError) as caught:  # already finished: fal's 400
        await client.cancel("fal-ai/flux/schnell", slow.request_id)
    assert caught.value.status_code == 400
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await slow.get(interval=0.05)
    assert caught.value.status_code == 499 and caught.value.error_type == "client_cancelled"
    status = await slow.status()
    assert isinstance(status, fal_client.Completed) and status.error_type == "client_cancelled"

    failing = await client.submit("fal-ai/flux/schnell", {"prompt": "x [sim:fail]"})
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await failing.get(interval=0.05)
    assert caught.value.status_code == 502 and caught.value.error_type == "provider_error"
    assert (await job_of(stack, failing.request_id))["status"] == "failed"

    redis = await connect(stack.settings.redis_url, stack.settings.queue_name)
    other_key = await create_api_key(redis, "other-tenant")
    await redis.aclose()
    theirs = fal_client.AsyncClient(key=other_key)
    for call in (theirs.status, theirs.cancel):
        with pytest.raises(fal_client.FalClientHTTPError) as caught:
            await call("fal-ai/flux/schnell", failing.request_id)
        assert caught.value.status_code == 404


async def test_errors_are_fal_shaped_and_nothing_is_enqueued(stack, queue_url):
    client = fal_client.AsyncClient(key=stack.api_key)
    refusals: list[tuple[str, dict[str, Any], list[str]]] = [
        ("kling/no-such-kling-model", {"prompt": "x"}, ["path", "app_id"]),
        ("kling/kling-v2-1-master", {"prompt": "x", "duration": 7}, ["body", "duration"]),
        ("kling/kling-v2-1-master", {"prompt": "x", "num_images": 99}, ["body", "num_images"]),
        ("fal-ai/flux/schnell", {"negative_prompt": "x"}, ["body", "prompt"]),  # fal's flux requires a prompt
    ]
    for app, arguments, where in refusals:
        with pytest.raises(fal_client.FalClientHTTPError) as caught:
            await client.submit(app, arguments)
        assert caught.value.status_code == 422, (app, caught.value.response.text)
        detail = caught.value.response.json()["detail"]
        assert isinstance(detail, list) and detail[0]["loc"] == where and detail[0]["msg"], detail
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.submit("kling/kling-v3", {"prompt": "x"}, headers={"Atelier-Kind": "audio"})
    assert caught.value.response.json()["detail"][0]["loc"] == ["header", "Atelier-Kind"]
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.submit("fal-ai/flux/schnell", {"prompt": "x"}, webhook_url="ftp://example.com/hook")
    assert caught.value.status_code == 422
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.status("fal-ai/flux/schnell", "job_nope")
    assert caught.value.status_code == 404 and caught.value.message == "Request not found"
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await fal_client.AsyncClient(key="atl_not_a_key").submit("fal-ai/flux/schnell", {"prompt": "x"})
    assert caught.value.status_code == 401 and caught.value.error_type == "unauthorized"

    async with api(stack) as plain:
        resp = await plain.post("/fal/fal-ai/flux/schnell", content=b"[1, 2]",
                                headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["detail"] == "Request body must be a JSON object"
        resp = await plain.get("/fal/fal-ai/flux/schnell")
        assert resp.status_code == 404 and isinstance(resp.json()["detail"], str)
        assert (await plain.get("/v1/jobs")).json()["data"] == []  # nothing was enqueued

        # Idempotency-Key as on /v1/jobs; a reuse with another body is a 422 (fal_client retries 409s).
        body = {"prompt": "once"}
        first = await plain.post("/fal/fal-ai/flux/schnell", json=body, headers={"Idempotency-Key": "k1"})
        again = await plain.post("/fal/fal-ai/flux/schnell", json=body, headers={"Idempotency-Key": "k1"})
        assert first.json()["request_id"] == again.json()["request_id"]
        other = await plain.post("/fal/fal-ai/flux/schnell", json={"prompt": "twice"},
                                 headers={"Idempotency-Key": "k1"})
        assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        # before it finished, the result is fal's 400
        early = await plain.get(first.json()["response_url"])
        assert early.status_code in (200, 400)
        # a request's URL posted to is refused, never taken as a new submission to an app of that name
        resp = await plain.post(first.json()["cancel_url"], json={})
        assert resp.status_code == 405 and resp.json()["error_type"] == "method_not_allowed"
        assert len((await plain.get("/v1/jobs")).json()["data"]) == 1
