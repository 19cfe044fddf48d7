"""The xAI Grok Imagine video simulator, driven over HTTP as xAI's REST clients do."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.xai import XaiSimulator

KEY = "xai-sandbox-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = {"url": "https://example.com/boat.jpg"}


def body(prompt: str = "a paper boat drifting down a rainy street", **kw: Any) -> dict[str, Any]:
    return {"model": "grok-imagine-video", "prompt": prompt, "duration": 6, "aspect_ratio": "16:9",
            "resolution": "720p"} | kw


@dataclass
class Env:
    sim: XaiSimulator
    http: httpx.AsyncClient

    async def create(self, payload: dict[str, Any], endpoint: str = "generations",
                     headers: dict[str, str] | None = None) -> httpx.Response:
        hdrs = AUTH if headers is None else headers
        return await self.http.post(f"/v1/videos/{endpoint}", json=payload, headers=hdrs)

    async def request_id(self, payload: dict[str, Any], endpoint: str = "generations") -> str:
        r = await self.create(payload, endpoint)
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["request_id"]  # no status until the first poll
        return str(r.json()["request_id"])

    async def wait(self, request_id: str, within: float = 5) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.http.get(f"/v1/videos/{request_id}", headers=AUTH)
            assert r.status_code == 200, r.text
            got: dict[str, Any] = r.json()
            if got.get("status") not in (None, "pending"):
                return got
            await asyncio.sleep(0.03)
        raise AssertionError("request did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = XaiSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, http)


async def test_generation_success_real_mp4(env: Env) -> None:
    request_id = await env.request_id(body(image=IMAGE))
    assert str(uuid.UUID(request_id)) == request_id
    pending = (await env.http.get(f"/v1/videos/{request_id}", headers=AUTH)).json()
    assert pending == {"status": "pending"}
    done = await env.wait(request_id)
    assert done["status"] == "done" and done["model"] == "grok-imagine-video" and done["progress"] == 100
    video = done["video"]
    assert video["duration"] == 6 and video["respect_moderation"] is True
    assert "/xai-vidgen-bucket/xai-video-" in video["url"] and video["url"].endswith(".mp4")
    assert isinstance(done["usage"]["cost_in_usd_ticks"], int) and done["usage"]["cost_in_usd_ticks"] > 0
    got = await env.http.get(video["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "video/mp4" and got.content[4:8] == b"ftyp"

    other = await env.wait(await env.request_id(body("another")))
    assert (await env.http.get(other["video"]["url"])).content != got.content
    assert env.sim.stats.creations == 2


async def test_edits_and_extensions_need_a_video(env: Env) -> None:
    source = {"url": "https://example.com/clip.mp4"}
    for endpoint in ("edits", "extensions"):
        assert (await env.wait(await env.request_id(body(video=source), endpoint)))["status"] == "done"
        r = await env.create(body(), endpoint)
        assert r.status_code == 422 and "video" in r.json()["error"]


async def test_invalid_requests(env: Env) -> None:
    r = await env.create({"model": "grok-imagine-video"})
    assert r.status_code == 422 and "missing field `prompt`" in r.json()["error"]
    r = await env.create(body(image="https://example.com/boat.jpg"))  # an object {url}, not a string
    assert r.status_code == 422 and "image" in r.json()["error"]
    for bad, word in ((body(duration=16), "duration"), (body(duration="6"), "duration"),
                      (body(aspect_ratio="21:9"), "aspect_ratio"), (body(resolution="1080p"), "resolution")):
        r = await env.create(bad)
        assert r.status_code == 400 and word in r.json()["error"], bad
        assert r.json()["code"] == "Client specified an invalid argument"
    r = await env.create(body(model="grok-imagine-video-9"))
    assert r.status_code == 404 and "grok-imagine-video-9" in r.json()["error"]
    assert env.sim.stats.creations == 0

    env.sim.config.extra["allow_1080p"] = True
    assert (await env.create(body(resolution="1080p"))).status_code == 200


async def test_flat_image_url_is_ignored_unless_configured(env: Env) -> None:
    plain = await env.request_id(body(image_url="https://example.com/boat.jpg"))
    assert env.sim.tasks[plain].input["image"] is None  # an unknown field: silently text-to-video
    env.sim.config.extra["flat_image_url"] = True
    flat = await env.request_id(body(image_url="https://example.com/boat.jpg"))
    assert env.sim.tasks[flat].input["image"] == IMAGE


async def test_bad_key_is_400(env: Env) -> None:
    r = await env.create(body(), headers={"Authorization": "Bearer xai-wrong-key"})
    assert r.status_code == 400
    assert r.json()["code"] == "Client specified an invalid argument"
    assert r.json()["error"].startswith("Incorrect API key provided: xa***ey")
    r = await env.http.get(f"/v1/videos/{uuid.uuid4()}")
    assert r.status_code == 400 and "No API key" in r.json()["error"]
    env.sim.config.extra["error_style"] = "openai"
    r = await env.create(body(), headers={"Authorization": "Bearer xai-wrong-key"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["message"].startswith("Incorrect API key") and err["type"]


async def test_failed_moderated_and_expired(env: Env) -> None:
    failed = await env.wait(await env.request_id(body("x [sim:fail]")))
    assert failed == {"status": "failed", "video": {"duration": 0, "respect_moderation": True}, "model": "",
                      "error": {"code": "internal_error", "message": "Video generation failed"}}
    # Moderation: done, but no URL.
    moderated = await env.wait(await env.request_id(body("x [sim:moderated]")))
    assert moderated["status"] == "done" and "url" not in moderated["video"]
    assert moderated["video"]["respect_moderation"] is False
    assert (await env.wait(await env.request_id(body("x [sim:expired]"))))["status"] == "expired"
    done = await env.request_id(body())
    assert (await env.wait(done))["status"] == "done"
    env.sim.config.extra["result_ttl_seconds"] = 0
    assert (await env.wait(done))["status"] == "expired"


async def test_unknown_request_is_404(env: Env) -> None:
    r = await env.http.get(f"/v1/videos/{uuid.uuid4()}", headers=AUTH)
    assert r.status_code == 404 and r.json()["code"] == "Some requested entity was not found"


async def test_pending_shapes(env: Env) -> None:
    env.sim.config.extra["pending_shape"] = "progress"
    rid = await env.request_id(body("x [sim:queue=0] [sim:run=1]"))
    await asyncio.sleep(0.2)
    got = (await env.http.get(f"/v1/videos/{rid}", headers=AUTH)).json()
    assert got["status"] == "pending" and 0 < got["progress"] < 100
    env.sim.config.extra["pending_shape"] = "request_id"
    assert (await env.http.get(f"/v1/videos/{rid}", headers=AUTH)).json() == {"request_id": rid}


async def test_429_then_success_with_one_creation(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 1}])
    r = await env.create(body())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["code"] == "Some resource has been exhausted"
    assert (await env.create(body())).status_code == 200
    assert env.sim.stats.creations == 1
    env.sim.config.extra["max_pending"] = 1
    assert (await env.create(body())).status_code == 429


async def test_ambiguous_create_cannot_be_recovered(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "create", "after_effect": True}])
    r = await env.create(body())
    assert r.status_code == 502 and r.json()["error"]
    assert env.sim.stats.creations == 1  # billed, and there is no list endpoint to find it
    assert (await env.http.get("/v1/videos", headers=AUTH)).status_code in (404, 405)


async def test_video_url_expires(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.3
    done = await env.wait(await env.request_id(body()))
    assert (await env.http.get(done["video"]["url"])).status_code == 200
    await asyncio.sleep(0.4)
    assert (await env.http.get(done["video"]["url"])).status_code == 404
    env.sim.config.output_ttl_seconds = 3600
    fresh = await env.wait(await env.request_id(body()))
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(fresh["video"]["url"])).status_code == 404
