"""The OpenAI facade (``/openai/v1``) driven by the official ``openai`` package against the real stack.

Every call goes over loopback HTTP to the real API, worker, Redis, simulators and storage; the
videos and images are ordinary Atelier jobs, checked through ``/v1/jobs/{id}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
import zlib
from typing import Any

import httpx
import openai
import pytest

from orchestrator.cli.devstack import Stack
from orchestrator.services.runtime import Runtime
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key
from tests.helpers import api

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Sora methods


def facade(stack: Stack, key: str | None = None) -> openai.AsyncOpenAI:
    # No retries: a retried create would be a second paid job; the facade says when one is safe.
    return openai.AsyncOpenAI(base_url=f"{stack.api_url}/openai/v1", api_key=key or stack.api_key,
                              max_retries=0, timeout=60)


async def job_of(stack: Stack, job_id: str) -> dict[str, Any]:
    async with api(stack) as client:
        resp = await client.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job


def rgba_png(width: int, height: int) -> bytes:
    """A transparent RGBA PNG (an edit's mask needs an alpha channel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00\x00\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


async def test_images_generate_b64_and_url_on_two_providers(stack):
    async with facade(stack) as client:
        raw = await client.images.with_raw_response.generate(
            model="gpt-image-1", prompt="a lighthouse at dusk", n=2, size="1024x1024",
            response_format="b64_json", quality="low")
        images = raw.parse()
        job = await job_of(stack, raw.headers["x-atelier-job-id"])
        assert job["provider"] == "openai" and job["model"] == "gpt-image-1" and job["status"] == "succeeded"
        assert job["input"]["num_outputs"] == 2 and job["input"]["options"] == {"quality": "low"}
        assert images.data is not None and len(images.data) == 2
        got = [hashlib.sha256(base64.b64decode(item.b64_json or "")).hexdigest() for item in images.data]
        assert got == [o["sha256"] for o in job["outputs"]]
        assert images.created == int(images.created) and images.output_format == "png"

        raw = await client.images.with_raw_response.generate(
            model="replicate/black-forest-labs/flux-schnell", prompt="a red fox", size="1024x1024",
            response_format="url")
        images = raw.parse()
        job = await job_of(stack, raw.headers["x-atelier-job-id"])
        assert job["provider"] == "replicate" and job["model"] == "black-forest-labs/flux-schnell"
        assert images.data is not None and len(images.data) == 1 and images.data[0].url
        async with httpx.AsyncClient() as plain:
            body = (await plain.get(images.data[0].url)).content  # the signed storage URL, no API key
        assert hashlib.sha256(body).hexdigest() == job["outputs"][0]["sha256"]


async def test_videos_create_and_poll_and_download_for_sora_veo_and_kling(stack):
    cases = [("sora-2", "4", "1280x720", "sora"), ("veo-3.1-generate-preview", "8", "1280x720", "veo"),
             ("kling/kling-v2-1-master", "5", "1280x720", "kling")]
    async with facade(stack) as client:

        async def render(model: str, seconds: str, size: str) -> Any:
            return await client.videos.create_and_poll(model=model, prompt="a paper boat on a pond",
                                                       seconds=seconds, size=size,  # type: ignore[arg-type]
                                                       poll_interval_ms=200)

        videos = await asyncio.gather(*(render(m, s, z) for m, s, z, _ in cases))
        for video, (model, seconds, size, provider) in zip(videos, cases, strict=True):
            assert video.status == "completed", video
            assert video.object == "video" and video.progress == 100 and video.error is None
            # a bare name goes back for the default provider (kling-* is Kling's)
            assert (video.model, video.seconds, video.size) == (model.removeprefix("kling/"), seconds, size)
            assert video.completed_at is not None and video.completed_at >= video.created_at
            assert video.expires_at is not None and video.prompt == "a paper boat on a pond"
            job = await job_of(stack, video.id)
            assert job["provider"] == provider and job["kind"] == "video" and job["status"] == "succeeded"
            assert job["input"]["duration_seconds"] == float(seconds)
            content = await client.videos.download_content(video.id)
            assert hashlib.sha256(content.content).hexdigest() == job["outputs"][0]["sha256"]
            assert content.response.headers["content-type"] == job["outputs"][0]["content_type"]
        # Kling takes only the aspect ratio (it has no resolution); Sora and Veo the exact size.
        kling = (await job_of(stack, videos[2].id))["input"]
        assert kling["aspect_ratio"] == "16:9" and kling["resolution"] is None
        assert (await job_of(stack, videos[0].id))["input"]["resolution"] == "1280x720"


async def test_videos_list_delete_and_remix(stack):
    async with facade(stack) as client:
        first = await client.videos.create_and_poll(model="sora-2", prompt="a cat", poll_interval_ms=200)
        assert first.status == "completed"
        remix = await client.videos.remix(first.id, prompt="the same cat at night")
        assert remix.remixed_from_video_id == first.id and remix.status in ("queued", "in_progress")
        remix = await client.videos.poll(remix.id, poll_interval_ms=200)
        assert remix.status == "completed" and remix.model == "sora-2"
        job = await job_of(stack, remix.id)
        assert job["operation"] == "remix" and job["source"]["job_id"] == first.id

        running = await client.videos.create(model="veo-3.1-generate-preview", prompt="waves")
        with pytest.raises(openai.ConflictError) as caught:  # not finished: cannot be deleted yet
            await client.videos.delete(running.id)
        assert error_of(caught.value)["code"] == "video_not_finished"

        page = await client.videos.list(limit=2)
        assert [v.id for v in page.data] == [running.id, remix.id] and page.has_more
        seen = [v.id async for v in client.videos.list(limit=2)]  # the SDK follows the cursor
        assert seen == [running.id, remix.id, first.id]
        oldest = await client.videos.list(order="asc", limit=10)
        assert [v.id for v in oldest.data] == [first.id, remix.id, running.id] and not oldest.has_more

        deleted = await client.videos.delete(first.id)
        assert deleted.deleted and deleted.id == first.id and deleted.object == "video.deleted"
        with pytest.raises(openai.NotFoundError) as caught:
            await client.videos.retrieve(first.id)
        assert error_of(caught.value)["param"] == "video_id"
        async with api(stack) as plain:
            assert (await plain.get(f"/v1/jobs/{first.id}")).status_code == 404  # the same job, gone

        with pytest.raises(openai.BadRequestError) as caught:  # Veo has no remix
            await client.videos.remix(running.id, prompt="x")
        assert error_of(caught.value)["code"] == "unsupported_operation"
        await client.videos.poll(running.id, poll_interval_ms=200)


async def test_bad_requests_are_openai_shaped_4xx(stack):
    async with facade(stack) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.videos.create(model="no-such-model", prompt="x")
        error = error_of(caught.value)
        assert (error["param"], error["code"], error["type"]) == ("model", "model_not_found", "invalid_request_error")
        assert caught.value.response.headers["x-should-retry"] == "false"

        with pytest.raises(openai.BadRequestError) as caught:
            await client.videos.create(model="sora-2", prompt="x", size="640x480")  # type: ignore[arg-type]
        assert error_of(caught.value)["param"] == "size"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.videos.create(model="sora-2", prompt="x", size="huge")  # type: ignore[arg-type]
        assert error_of(caught.value)["param"] == "size"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.videos.create(model="kling-v2-1-master", prompt="x", seconds="7")  # type: ignore[arg-type]
        assert error_of(caught.value)["param"] == "seconds"
        with pytest.raises(openai.BadRequestError) as caught:  # an uploaded input must be an image
            await client.videos.create(model="kling-v2-1", prompt="x",
                                       input_reference=("ref.png", b"hello", "text/plain"))
        error = error_of(caught.value)
        assert (error["param"], error["code"]) == ("input_reference", "invalid_image_format")
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(model="gpt-image-1", prompt="x", image=("a.png", b"hello", "image/png"))
        assert error_of(caught.value)["param"] == "image"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="midjourney-v9", prompt="x")
        assert error_of(caught.value)["param"] == "model"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="gpt-image-1", prompt="x", n=99)
        assert error_of(caught.value)["param"] == "n"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="gpt-image-1", prompt="x", size="1000x333")
        assert error_of(caught.value)["param"] == "size"
        with pytest.raises(openai.NotFoundError):
            await client.videos.retrieve("job_nope")
        with pytest.raises(openai.NotFoundError):  # a route the facade does not serve
            await client.models.list()
    async with facade(stack, key="atl_not_a_key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.videos.list()
        assert error_of(caught.value)["code"] == "invalid_api_key"
    async with api(stack) as plain:  # the JSON form of POST /videos, and nothing was enqueued by the refusals
        resp = await plain.post("/openai/v1/videos", json={"model": "sora-2", "prompt": "x", "seconds": "4"})
        assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
        assert resp.headers["openai-poll-after-ms"]
        resp = await plain.post("/openai/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
        assert len((await plain.get("/v1/jobs")).json()["data"]) == 1


async def test_tenant_walls_and_idempotency(stack):
    redis = await connect(stack.settings.redis_url, stack.settings.queue_name)
    other_key = await create_api_key(redis, "other-tenant")
    await redis.aclose()
    async with facade(stack) as mine, facade(stack, other_key) as theirs:
        video = await mine.videos.create(model="sora-2", prompt="mine", extra_headers={"Idempotency-Key": "k1"})
        again = await mine.videos.create(model="sora-2", prompt="mine", extra_headers={"Idempotency-Key": "k1"})
        assert again.id == video.id
        with pytest.raises(openai.ConflictError):
            await mine.videos.create(model="sora-2", prompt="other", extra_headers={"Idempotency-Key": "k1"})
        for call in (theirs.videos.retrieve, theirs.videos.delete, theirs.videos.download_content):
            with pytest.raises(openai.NotFoundError):
                await call(video.id)
        with pytest.raises(openai.NotFoundError):
            await theirs.videos.remix(video.id, prompt="theirs")
        assert (await theirs.videos.list()).data == []
        done = await mine.videos.poll(video.id, poll_interval_ms=200)
        assert done.status == "completed"


async def test_image_wait_is_bounded_and_failures_are_not_retried(stack):
    async with facade(stack) as client:
        with pytest.raises(openai.APIStatusError) as caught:  # still rendering when the wait ends
            await client.images.generate(model="replicate/black-forest-labs/flux-schnell", prompt="x [sim:run=4]",
                                         extra_headers={"Prefer": "wait=1"})
        assert caught.value.status_code == 504 and caught.value.response.headers["x-should-retry"] == "false"
        error = error_of(caught.value)
        assert error["code"] == "timeout" and "job_" in error["message"]
        job_id = error["message"].split("Atelier job ")[1].split()[0]
        async with api(stack) as plain:
            assert (await plain.get(f"/v1/jobs/{job_id}")).json()["status"] in ("queued", "submitting", "submitted",
                                                                              "running")
        with pytest.raises(openai.APIStatusError) as caught:  # the provider failed the render
            await client.images.generate(model="replicate/black-forest-labs/flux-schnell", prompt="x [sim:fail]")
        error = error_of(caught.value)
        assert caught.value.status_code == 502 and error["code"] == "provider_failed"
        assert error["type"] == "server_error" and "Atelier job job_" in error["message"]
        assert caught.value.response.headers["x-should-retry"] == "false"


async def test_video_input_reference_from_a_url_or_an_earlier_job(stack):
    async with facade(stack) as client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1", prompt="a boat", size="1024x1024")
        image_job = await job_of(stack, raw.headers["x-atelier-job-id"])
        # The SDK takes only a file as input_reference (it asserts so): a reference object goes in extra_body,
        # which the SDK sends as the form fields input_reference[file_id] / input_reference[image_url].
        from_job = await client.videos.create(model="kling-v2-1", prompt="the boat sails",
                                              extra_body={"input_reference": {"file_id": image_job["id"]}})
        from_url = await client.videos.create(model="sora-2", prompt="the boat sails", size="1280x720",
                                              extra_body={"input_reference": {
                                                  "image_url": image_job["outputs"][0]["url"]}})
        for video in (from_job, from_url):
            assert (await client.videos.poll(video.id, poll_interval_ms=200)).status == "completed"
        job = await job_of(stack, from_job.id)
        assert job["source"] == {"job_id": image_job["id"], "output": 0} and job["operation"] == "generate"
        assert (await job_of(stack, from_url.id))["input"]["image_url"] == image_job["outputs"][0]["url"]


async def test_uploads_image_edits_and_a_video_input_reference_file(stack):
    async with facade(stack) as client:
        raw = await client.images.with_raw_response.generate(model="gpt-image-1", prompt="a boat", size="1024x1024")
        generated = raw.parse()
        assert generated.data
        png = base64.b64decode(generated.data[0].b64_json or "")
        first = (await job_of(stack, raw.headers["x-atelier-job-id"]))["outputs"][0]
        mask = rgba_png(first["width"], first["height"])
        raw = await client.images.with_raw_response.edit(
            model="gpt-image-1", prompt="the boat in red",
            image=[("a.png", png, "image/png"), ("b.png", png, "image/png")], mask=("m.png", mask, "image/png"),
            response_format="b64_json", input_fidelity="high")
        edited = raw.parse()
        job = await job_of(stack, raw.headers["x-atelier-job-id"])
        assert job["status"] == "succeeded" and job["input"]["image_url"]
        assert len(job["input"]["options"]["images"]) == 1 and job["input"]["options"]["mask"]
        assert job["input"]["options"]["input_fidelity"] == "high"
        assert edited.data and hashlib.sha256(base64.b64decode(edited.data[0].b64_json or "")).hexdigest() == (
            job["outputs"][0]["sha256"])
        async with httpx.AsyncClient() as plain:  # the stored input, as the provider was handed it
            assert (await plain.get(job["input"]["image_url"])).content == png

        with pytest.raises(openai.BadRequestError) as caught:  # one image and no mask beyond OpenAI's models
            await client.images.edit(model="replicate/black-forest-labs/flux-schnell", prompt="x",
                                     image=[("a.png", png, "image/png"), ("b.png", png, "image/png")])
        assert error_of(caught.value)["param"] == "image"
        edited = await client.images.edit(model="replicate/black-forest-labs/flux-schnell", prompt="x",
                                          image=("a.png", png, "image/png"), response_format="url")
        assert edited.data and edited.data[0].url

        video = await client.videos.create_and_poll(model="kling-v2-1", prompt="the boat sails",
                                                    input_reference=("ref.png", png, "image/png"),
                                                    poll_interval_ms=200)
        assert video.status == "completed"
        job = await job_of(stack, video.id)
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(job["input"]["image_url"])).content == png

    # Uploaded inputs are on the retention schedule like outputs: reaped once it passes.
    rt = await Runtime.open(stack.settings)
    try:
        await rt.reaper.reap(time.time() + 8 * 24 * 3600, limit=1000)
    finally:
        await rt.close()
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(job["input"]["image_url"])).status_code == 404
