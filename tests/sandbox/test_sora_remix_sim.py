"""Sora's remix (``POST /v1/videos/{id}/remix``), driven over real HTTP and with the official SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.sora import SoraSimulator

KEY = "sk-test-sora-remix-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MP4_BOX = b"ftyp"


@dataclass
class Env:
    sim: SoraSimulator
    base: str
    http: httpx.AsyncClient

    async def video(self, **body: Any) -> dict[str, Any]:
        r = await self.http.post("/v1/videos", json={"prompt": "a teal coupe at dusk", **body})
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def remix(self, video_id: str, **body: Any) -> httpx.Response:
        return await self.http.post(f"/v1/videos/{video_id}/remix", json=body)

    async def wait(self, video_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            r = await self.http.get(f"/v1/videos/{video_id}")
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("completed", "failed"):
                return dict(r.json())
            await asyncio.sleep(0.02)
        raise AssertionError(f"video {video_id} did not finish")

    async def completed(self, **body: Any) -> dict[str, Any]:
        done = await self.wait((await self.video(**body))["id"])
        assert done["status"] == "completed"
        return done


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = SoraSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.15, api_keys=[KEY],
                                  extra={"sora_poll_after_ms": 20}))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as http:
        yield Env(sim, base, http)


async def test_remix_creates_a_new_video_from_a_completed_one(env: Env) -> None:
    src = await env.completed(model="sora-2-pro", seconds="8", size="1792x1024")
    r = await env.remix(src["id"], prompt="the same shot at night, in the rain")
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
    assert int(r.headers["openai-poll-after-ms"]) == 20
    remix = r.json()
    assert remix["id"].startswith("video_") and remix["id"] != src["id"]
    assert (remix["object"], remix["status"], remix["progress"]) == ("video", "queued", 0)
    assert remix["remixed_from_video_id"] == src["id"]
    assert (remix["model"], remix["seconds"], remix["size"]) == ("sora-2-pro", "8", "1792x1024")
    assert remix["prompt"] == "the same shot at night, in the rain"
    assert "completed_at" not in remix and "error" not in remix  # absent until terminal

    done = await env.wait(remix["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["remixed_from_video_id"] == src["id"] and done["expires_at"] > done["completed_at"]
    remixed = await env.http.get(f"/v1/videos/{remix['id']}/content")
    original = await env.http.get(f"/v1/videos/{src['id']}/content")
    assert remixed.headers["content-type"] == "video/mp4" and remixed.content[4:8] == MP4_BOX
    assert remixed.content != original.content
    thumb = await env.http.get(f"/v1/videos/{remix['id']}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200 and thumb.content[8:12] == b"WEBP"

    # The source is unchanged; a remix can itself be remixed; the list shows the lineage.
    assert (await env.http.get(f"/v1/videos/{src['id']}")).json()["remixed_from_video_id"] is None
    again = (await env.remix(remix["id"], prompt="and now in snow")).json()
    assert again["remixed_from_video_id"] == remix["id"]
    listed = (await env.http.get("/v1/videos", params={"order": "asc"})).json()["data"]
    assert [(v["id"], v["remixed_from_video_id"]) for v in listed] == [
        (src["id"], None), (remix["id"], src["id"]), (again["id"], remix["id"])]
    stats = (await env.http.get("/_sim/stats")).json()
    assert stats["creations"] == 3 and stats["duplicate_identities"] == {}


async def test_remix_as_multipart_and_same_prompt_on_two_sources(env: Env) -> None:
    a, b = await env.completed(), await env.completed(prompt="another coupe")
    r = await env.http.post(f"/v1/videos/{a['id']}/remix", files={"prompt": (None, "in the rain")})
    assert r.status_code == 200 and r.json()["remixed_from_video_id"] == a["id"]
    r = await env.remix(b["id"], prompt="in the rain")
    assert r.status_code == 200 and r.json()["remixed_from_video_id"] == b["id"]
    # Two sources, one prompt: two different requests, not a duplicate creation.
    assert env.sim.stats.created_by_identity.most_common(1)[0][1] == 1


async def test_only_a_completed_source_can_be_remixed(env: Env) -> None:
    queued = await env.video(prompt="slow [sim:queue=5]")
    r = await env.remix(queued["id"], prompt="x")
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "video_id", "invalid_value")
    assert "completed" in error["message"]

    failed = await env.wait((await env.video(prompt="x [sim:fail]"))["id"])
    assert failed["status"] == "failed"
    assert (await env.remix(failed["id"], prompt="x")).status_code == 400

    unknown = await env.remix("video_does_not_exist", prompt="x")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"].startswith("Video with id")
    src = await env.completed()
    assert (await env.http.delete(f"/v1/videos/{src['id']}")).status_code == 200
    assert (await env.remix(src["id"], prompt="x")).status_code == 404
    assert env.sim.stats.creations == 3  # the three sources, no remix


async def test_remix_request_validation_and_moderation(env: Env) -> None:
    src = await env.completed()
    before = env.sim.stats.creations
    missing = (await env.remix(src["id"])).json()["error"]
    assert (missing["param"], missing["code"]) == ("prompt", "missing_required_parameter")
    wrong = (await env.remix(src["id"], prompt=42)).json()["error"]
    assert (wrong["param"], wrong["code"]) == ("prompt", "invalid_type")
    blocked = await env.remix(src["id"], prompt="something [sim:blocked]")
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "moderation_blocked"
    no_key = await env.http.post(f"/v1/videos/{src['id']}/remix", json={"prompt": "x"},
                                 headers={"Authorization": ""})
    assert no_key.status_code == 401
    assert env.sim.stats.creations == before

    moderated = (await env.remix(src["id"], prompt="x [sim:moderation]")).json()
    done = await env.wait(moderated["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "moderation_blocked"
    assert done["remixed_from_video_id"] == src["id"]


async def test_remix_faults(env: Env) -> None:
    src = await env.completed()
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "remix", "retry_after": 2}])
    limited = await env.remix(src["id"], prompt="x")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "2" and limited.headers["retry-after-ms"] == "2000"
    assert env.sim.stats.creations == 1

    # Ambiguous: the remix exists although the answer is a gateway error page.
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "remix", "after_effect": True}])
    lost = await env.remix(src["id"], prompt="after the 502")
    assert lost.status_code == 502 and lost.headers["content-type"].startswith("text/html")
    newest = (await env.http.get("/v1/videos", params={"limit": 1})).json()["data"][0]
    assert newest["remixed_from_video_id"] == src["id"] and newest["prompt"] == "after the 502"
    assert env.sim.stats.creations == 2


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
async def test_remix_with_the_official_sdk(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=f"{env.base}/v1", api_key=KEY, max_retries=0)
    try:
        src = await client.videos.create_and_poll(prompt="a teal coupe", model="sora-2", seconds="4",
                                                  size="1280x720")
        assert src.status == "completed"
        remix = await client.videos.remix(src.id, prompt="the coupe is now red")
        assert remix.status == "queued" and remix.remixed_from_video_id == src.id
        assert (remix.model, remix.seconds, remix.size) == ("sora-2", "4", "1280x720")
        done = await client.videos.poll(remix.id)
        assert done.status == "completed" and done.remixed_from_video_id == src.id
        content = await client.videos.download_content(remix.id)
        assert content.content[4:8] == MP4_BOX

        pending = await client.videos.create(prompt="slow [sim:queue=5]")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.videos.remix(pending.id, prompt="x")
        assert refused.value.param == "video_id" and refused.value.code == "invalid_value"
        with pytest.raises(openai.NotFoundError):
            await client.videos.remix("video_nope", prompt="x")
    finally:
        await client.close()
    assert env.sim.stats.creations == 3
