"""The Replicate facade (``/replicate/v1``) driven by the official ``replicate`` package against the real stack.

Every call goes over loopback HTTP to the real API, worker, Redis, simulators and storage; the
predictions are ordinary Atelier jobs, checked through ``/v1/jobs/{id}``. The API runs in the test's
event loop, so the SDK's blocking calls (``create``, ``wait``, ``run``...) run in a thread.

The SDK appends ``/v1/...`` to its ``base_url``: ``<atelier>/replicate`` is the natural base URL,
and ``<atelier>/replicate/v1`` works too (both are exercised). Over plain HTTP ``run`` returns the
output URLs as strings: the SDK wraps only ``https:`` and ``data:`` URLs in ``FileOutput``.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError

from orchestrator.cli.devstack import Stack
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from tests.helpers import api

# The version id Replicate's simulator gives flux-dev (providers/sandbox/replicate.py).
VERSION = hashlib.sha256(b"black-forest-labs/flux-dev:v1").hexdigest()


def client(stack: Stack, key: str | None = None, base: str = "/replicate") -> replicate.Client:
    return replicate.Client(api_token=key or stack.api_key, base_url=f"{stack.api_url}{base}")


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


def error_of(exc: ReplicateError) -> dict[str, Any]:
    assert exc.status is not None and exc.title and exc.detail, exc
    return {"status": exc.status, "title": exc.title, "detail": exc.detail}


async def test_create_and_wait_on_replicate_kling_and_fal_models(stack):
    sdk = client(stack)
    deeper = client(stack, base="/replicate/v1")  # the base URL as the facade's prefix: served too
    cases = [
        (sdk, "black-forest-labs/flux-schnell", {"prompt": "a red fox", "num_outputs": 2, "go_fast": True},
         "replicate", "black-forest-labs/flux-schnell", "image"),
        (deeper, "kling/kling-v3", {"prompt": "a paper boat", "duration": 5, "aspect_ratio": "16:9"},
         "kling", "kling-v3", "video"),
        (sdk, "fal/fal-ai/flux/schnell", {"prompt": "a lighthouse", "num_images": 1}, "fal", "fal-ai/flux/schnell",
         "image"),
    ]

    def render(sdk: replicate.Client, version: str, given: dict[str, Any]) -> Any:
        prediction = sdk.predictions.create(version=version, input=given)
        assert prediction.status == "starting" and prediction.output is None
        prediction.wait()
        return prediction

    predictions = await asyncio.gather(*(asyncio.to_thread(render, s, v, i) for s, v, i, *_ in cases))
    for prediction, (_, version, given, provider, model, kind) in zip(predictions, cases, strict=True):
        assert prediction.status == "succeeded", prediction
        assert prediction.error is None and prediction.version == version and prediction.input == given
        assert prediction.model == version and prediction.urls and prediction.urls["get"].endswith(prediction.id)
        assert prediction.created_at and prediction.completed_at and prediction.started_at
        assert prediction.metrics and prediction.metrics["total_time"] >= prediction.metrics["predict_time"] >= 0
        job = await job_of(stack, prediction.id)
        assert (job["provider"], job["model"], job["kind"], job["status"]) == (provider, model, kind, "succeeded")
        outputs = prediction.output if isinstance(prediction.output, list) else [prediction.output]
        assert [await sha256_of(url) for url in outputs] == [o["sha256"] for o in job["outputs"]]
        assert "succeeded" in (prediction.logs or "")
    flux, kling, fal = [await job_of(stack, p.id) for p in predictions]
    # Replicate's own input reaches Replicate unchanged; its common names are Atelier's common inputs.
    assert flux["input"]["num_outputs"] == 2 and flux["input"]["options"] == {"go_fast": True}
    assert isinstance(predictions[0].output, list) and len(predictions[0].output) == 2
    # Another provider reads the common inputs: a duration makes Kling's two-kind model render a video.
    assert kling["input"]["duration_seconds"] == 5 and kling["input"]["aspect_ratio"] == "16:9"
    assert isinstance(predictions[1].output, str)  # one video: a URL, as Replicate's video models answer
    # A name with no common meaning in Replicate's vocabulary reaches the provider as its own (fal's num_images).
    assert fal["input"]["prompt"] == "a lighthouse" and fal["input"]["options"] == {"num_images": 1}


async def test_run_waits_with_prefer_wait_and_the_models_route(stack):
    sdk = client(stack)

    def run_both() -> tuple[Any, Any]:
        # owner/name: POST /models/{owner}/{name}/predictions with "Prefer: wait"
        by_model = sdk.run("black-forest-labs/flux-schnell", input={"prompt": "a fox"})
        # owner/name:version: POST /predictions {"version": <id>}, then GET .../versions/{id}
        by_version = sdk.run(f"black-forest-labs/flux-dev:{VERSION}", input={"prompt": "a fox"}, wait=5)
        return by_model, by_version

    by_model, by_version = await asyncio.to_thread(run_both)
    assert isinstance(by_model, list) and len(by_model) == 1 and by_model[0].startswith(stack.api_url)
    assert isinstance(by_version, list) and len(by_version) == 1
    async with api(stack) as plain:
        jobs = (await plain.get("/v1/jobs")).json()["data"]
    assert [(j["provider"], j["model"], j["status"]) for j in jobs] == [
        ("replicate", VERSION, "succeeded"), ("replicate", "black-forest-labs/flux-schnell", "succeeded")]

    # async_run too; a failed render raises the SDK's ModelError with the job's error
    assert len(await sdk.async_run("black-forest-labs/flux-schnell", input={"prompt": "a cat"})) == 1
    with pytest.raises(ModelError) as caught:
        await sdk.async_run("black-forest-labs/flux-schnell", input={"prompt": "a cat [sim:fail]"})
    assert caught.value.prediction.status == "failed" and caught.value.prediction.error

    # A wait that ends first answers "starting" (so run() polls on), never a half-done "processing".
    async with api(stack) as plain:
        resp = await plain.post("/replicate/v1/predictions", headers={"Prefer": "wait=1"},
                                json={"version": "black-forest-labs/flux-schnell",
                                      "input": {"prompt": "slow [sim:run=3]"}})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["status"] == "starting" and resp.headers["Preference-Applied"] == "wait=1"
        assert resp.headers["Location"] == body["urls"]["get"]
        resp = await plain.post("/replicate/v1/models/black-forest-labs/flux-schnell/predictions",
                                headers={"Prefer": "wait"}, json={"input": {"prompt": "fast"}})
        assert resp.status_code == 201 and resp.json()["status"] == "succeeded", resp.text
    prediction = await sdk.predictions.async_get(body["id"])
    await prediction.async_wait()
    assert prediction.status == "succeeded" and prediction.output


async def test_cancel_list_pages_and_tenant_walls(stack):
    sdk = client(stack)
    redis = await connect(stack.settings.redis_url, stack.settings.queue_name)
    other_key = await create_api_key(redis, "other-tenant")
    await redis.aclose()
    theirs = client(stack, other_key)

    def create_five() -> list[replicate.prediction.Prediction]:
        return [sdk.predictions.create(version="black-forest-labs/flux-schnell",
                                       input={"prompt": f"slow {n} [sim:run=30]"}) for n in range(5)]

    created = await asyncio.to_thread(create_five)
    ids = [p.id for p in reversed(created)]  # newest first

    def cancel_first() -> replicate.prediction.Prediction:
        prediction = created[0]
        prediction.cancel()
        return prediction

    canceled = await asyncio.to_thread(cancel_first)
    assert canceled.status == "canceled" and canceled.completed_at
    assert (await job_of(stack, canceled.id))["status"] == "canceled"
    again = await sdk.predictions.async_cancel(canceled.id)  # a finished prediction is answered as it is
    assert again.status == "canceled"

    page = await asyncio.to_thread(sdk.predictions.list)
    assert [p.id for p in page.results] == ids and page.next is None and page.previous is None
    # Pages of two, following the cursor URLs the SDK is given (``limit`` is Atelier's; Replicate's is 100).
    first = await sdk.predictions.async_list(f"{stack.api_url}/replicate/v1/predictions?limit=2")
    assert [p.id for p in first.results] == ids[:2] and first.previous is None and first.next
    second = await sdk.predictions.async_list(first.next)
    assert [p.id for p in second.results] == ids[2:4] and second.previous and second.next
    third = await sdk.predictions.async_list(second.next)
    assert [p.id for p in third.results] == ids[4:] and third.next is None
    back = await sdk.predictions.async_list(third.previous)
    assert [p.id for p in back.results] == ids[2:4]
    back = await sdk.predictions.async_list(back.previous)
    assert [p.id for p in back.results] == ids[:2] and back.previous is None

    # Another tenant sees none of it.
    assert (await theirs.predictions.async_list()).results == []
    for call in (theirs.predictions.async_get, theirs.predictions.async_cancel):
        with pytest.raises(ReplicateError) as caught:
            await call(created[1].id)
        assert error_of(caught.value)["status"] == 404
    for prediction in created[1:]:
        await sdk.predictions.async_cancel(prediction.id)


async def test_errors_are_replicate_shaped_and_nothing_is_enqueued(stack):
    sdk = client(stack)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"version": "no-such-model"}, "version"),  # not owner/name
        ({"version": "kling/no-such-kling-model"}, "version"),  # Kling does not have it
        ({"version": "kling/kling-v2-1:abc"}, "version"),  # Atelier's Kling has no versions
        ({"version": "kling/kling-v2-1-master", "input": {"prompt": "x", "duration": 7}}, "input.duration"),
        ({"version": "fal/fal-ai/flux/schnell", "input": {"prompt": "x", "num_outputs": 99}}, "input.num_outputs"),
        ({"version": "kling/kling-v3", "input": {"prompt": "x", "aspect_ratio": "wide"}}, "input.aspect_ratio"),
        ({"version": "black-forest-labs/flux-schnell", "input": {"prompt": "x"}, "colour": "red"}, "colour"),
        ({"version": "black-forest-labs/flux-schnell", "webhook_events_filter": ["everything"]},
         "webhook_events_filter.0"),
    ]
    async with api(stack) as plain:
        for body, field in refusals:
            resp = await plain.post("/replicate/v1/predictions", json={"input": {"prompt": "x"}} | body)
            assert resp.status_code == 422, (body, resp.text)
            assert resp.headers["content-type"] == "application/problem+json"
            problem = resp.json()
            assert problem["status"] == 422 and problem["title"] == "Input validation failed" and problem["detail"]
            assert problem["invalid_fields"][0]["field"] == field, (body, problem)
        resp = await plain.post("/replicate/v1/predictions", content=b"{nope",
                                headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["status"] == 400
        resp = await plain.post("/replicate/v1/predictions", headers={"Atelier-Kind": "audio"},
                                json={"version": "kling/kling-v3", "input": {"prompt": "x"}})
        assert resp.status_code == 422 and resp.json()["invalid_fields"][0]["field"] == "Atelier-Kind"
        resp = await plain.get("/replicate/v1/trainings")
        assert resp.status_code == 404 and resp.json()["status"] == 404
        assert (await plain.get("/v1/jobs")).json()["data"] == []  # nothing was enqueued

        # Idempotency-Key as on /v1/jobs: the same body answers the same prediction, another is refused.
        body = {"version": "black-forest-labs/flux-schnell", "input": {"prompt": "once"}}
        first = await plain.post("/replicate/v1/predictions", json=body, headers={"Idempotency-Key": "k1"})
        again = await plain.post("/replicate/v1/predictions", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
        other = await plain.post("/replicate/v1/predictions", headers={"Idempotency-Key": "k1"},
                                 json={**body, "input": {"prompt": "twice"}})
        assert other.status_code == 422 and other.json()["invalid_fields"][0]["field"] == "Idempotency-Key"

    with pytest.raises(ReplicateError) as caught:
        await sdk.predictions.async_get("job_nope")
    assert error_of(caught.value)["status"] == 404
    with pytest.raises(ReplicateError) as caught:
        await sdk.predictions.async_create(version="black-forest-labs/flux-schnell", input={"prompt": "x"},
                                           webhook="ftp://example.com/hook")
    assert error_of(caught.value)["status"] == 422
    with pytest.raises(ReplicateError) as caught:
        await client(stack, "atl_not_a_key").predictions.async_list()
    problem = error_of(caught.value)
    assert problem["status"] == 401 and problem["title"] == "Unauthenticated"
