"""``POST /v1/uploads``: a local file stored as a job's media input (size cap, type from the bytes,
retention, a URL providers fetch through the destination guard)."""

from __future__ import annotations

import time

import httpx
import redis.asyncio as aioredis

from orchestrator.cli.devstack import dev_stack
from orchestrator.store import keys
from providers.sandbox import media
from tests.helpers import api, submit, wait_for

PNG = media.png("upload", 40, 30)


async def test_an_upload_is_stored_typed_from_its_bytes_and_kept_like_other_inputs(stack):
    async with api(stack) as client:
        # Declared as text: the bytes say PNG, and that is what counts.
        resp = await client.post("/v1/uploads", files={"file": ("../../etc/cat.png", PNG, "text/plain")})
        assert resp.status_code == 201, resp.text
        upload = resp.json()
        assert upload["object"] == "upload" and upload["id"].startswith("upl_")
        assert (upload["content_type"], upload["bytes"], upload["width"], upload["height"]) == ("image/png",
                                                                                               len(PNG), 40, 30)
        assert upload["filename"] == "cat.png" and upload["note"] is None  # the dev stack fetches from loopback
        async with httpx.AsyncClient() as anyone:  # the URL is signed: no API key needed, as for outputs
            fetched = await anyone.get(upload["url"])
        assert fetched.status_code == 200 and fetched.content == PNG
        assert fetched.headers["content-type"] == "image/png"

        redis = aioredis.from_url(stack.settings.redis_url)
        try:
            members = {m.decode(): s for m, s in await redis.zrange(keys.RETENTION, 0, -1, withscores=True)}
        finally:
            await redis.aclose()
        [(member, reaped_at)] = [(m, s) for m, s in members.items() if upload["id"] in m]
        assert member.startswith("input:dev/uploads/")  # reaped like the OpenAI facade's uploaded inputs
        expected = time.time() + stack.settings.job_timeout_seconds + 3600
        assert abs(reaped_at / 1000 - expected) < 60

        # A job names it as its input image, as it would any URL.
        job = await submit(client, provider="bfl", model="flux-kontext-pro",
                           input={"prompt": "as a watercolour", "image_url": upload["url"]})
        assert (await wait_for(client, job["id"]))["status"] == "succeeded"


async def test_uploads_that_are_not_media_or_not_files_are_refused_naming_the_field(stack):
    async with api(stack) as client:
        text = await client.post("/v1/uploads", files={"file": ("notes.png", b"just some words\n" * 20, "image/png")})
        assert text.status_code == 415 and text.headers["content-type"] == "application/problem+json"
        assert text.json()["errors"] == [{"field": "file", "message": text.json()["errors"][0]["message"]}]
        assert "image, video or audio" in text.json()["detail"]

        html = await client.post("/v1/uploads", files={"file": ("x.png", b"<!doctype html><html></html>", "image/png")})
        assert html.status_code == 415

        empty = await client.post("/v1/uploads", files={"file": ("empty.png", b"", "image/png")})
        assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "file"

        wrong_field = await client.post("/v1/uploads", files={"image": ("a.png", PNG, "image/png")})
        assert wrong_field.status_code == 422 and wrong_field.json()["errors"][0]["field"] == "file"

        not_multipart = await client.post("/v1/uploads", json={"file": "a.png"})
        assert not_multipart.status_code == 422 and not_multipart.json()["errors"][0]["field"] == "file"

    async with httpx.AsyncClient(base_url=stack.api_url) as anonymous:
        refused = await anonymous.post("/v1/uploads", files={"file": ("a.png", PNG, "image/png")})
        assert refused.status_code == 401


async def test_the_size_cap_and_a_url_providers_could_not_fetch(redis_url):
    # A small cap, and media fetches held to public addresses (as in production with a loopback public URL).
    async with dev_stack(redis_url=redis_url, log_format="text", max_upload_bytes=4096,
                         fetch_allow_private=False) as stack, api(stack) as client:
        over = await client.post("/v1/uploads", files={"file": ("big.png", PNG + b"\0" * 4096, "image/png")})
        assert over.status_code == 413 and over.headers["content-type"] == "application/problem+json"
        assert over.json()["errors"][0]["field"] == "file" and "4096 bytes" in over.json()["detail"]
        # Far over the cap: refused by its Content-Length before the body is read.
        huge = await client.post("/v1/uploads", files={"file": ("huge.png", PNG + b"\0" * (2 * 1024 * 1024),
                                                                 "image/png")})
        assert huge.status_code == 413

        fits = await client.post("/v1/uploads", files={"file": ("small.png", PNG, "image/png")})
        assert fits.status_code == 201, fits.text
        upload = fits.json()
        assert "providers may not be able to fetch this URL" in upload["note"]  # 127.0.0.1: the guard refuses it
        job = await submit(client, provider="bfl", model="flux-kontext-pro",
                           input={"prompt": "edit", "image_url": upload["url"]})
        failed = await wait_for(client, job["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "input_image_unavailable"
        assert "private or internal address" in failed["error"]["message"]
