"""The MiniMax Hailuo (V1) simulator, driven over real HTTP as MiniMax's docs describe."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.media import png
from providers.sandbox.minimax import MinimaxSimulator
from providers.sandbox.serve import serving

KEY = "mm-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = "https://example.com/first.jpg"


def data_png(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png("frame", width, height)).decode()


@dataclass
class Env:
    sim: MinimaxSimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        payload = {"model": "MiniMax-Hailuo-02", "prompt": "A man reads a book [Static shot]"} | body
        return await self.http.post("/v1/video_generation", json=payload, headers=AUTH if headers is None else headers)

    async def task_id(self, **body: Any) -> str:
        r = await self.create(**body)
        assert r.status_code == 200 and r.json()["base_resp"]["status_code"] == 0, r.text
        task_id: str = r.json()["task_id"]
        return task_id

    async def query(self, task_id: str) -> dict[str, Any]:
        r = await self.http.get("/v1/query/video_generation", params={"task_id": task_id}, headers=AUTH)
        assert r.status_code == 200
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, task_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            body = await self.query(task_id)
            if body["status"] in ("Success", "Fail"):
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("task did not finish")

    async def retrieve(self, file_id: str) -> dict[str, Any]:
        r = await self.http.get("/v1/files/retrieve", params={"file_id": file_id}, headers=AUTH)
        assert r.status_code == 200
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = MinimaxSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


class Receiver:
    """A callback endpoint. ``mode``: how it answers the challenge (echo, wrong, slow, error)."""

    def __init__(self, mode: str = "echo", delay: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.mode = mode

        async def hook(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            if "challenge" not in body:
                return JSONResponse({"ok": True})
            if self.mode == "slow":
                await asyncio.sleep(delay)
            if self.mode == "error":
                return JSONResponse({"error": "no"}, status_code=500)
            echoed = body["challenge"] if self.mode in ("echo", "slow") else "something-else"
            return JSONResponse({"challenge": echoed})

        self.app = Starlette(routes=[Route("/hooks/minimax/{job}", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5.0) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.bodies) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # give unexpected extras a chance to arrive


async def test_text_to_video_query_then_retrieve(env: Env) -> None:
    r = await env.create(prompt="A man reads [sim:queue=0.6] [sim:run=0.3]", prompt_optimizer=False)
    assert r.status_code == 200
    assert r.json()["base_resp"] == {"status_code": 0, "status_msg": "success"}
    task_id = r.json()["task_id"]
    assert task_id.isdigit()

    seen: list[str] = []
    deadline = time.time() + 5
    while time.time() < deadline:
        body = await env.query(task_id)
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in ("Success", "Fail"):
            break
        assert body["file_id"] == "" and body["base_resp"]["status_code"] == 0
        await asyncio.sleep(0.03)
    assert seen == ["Preparing", "Queueing", "Processing", "Success"]
    assert isinstance(body["file_id"], str) and body["file_id"].isdigit()  # a string here ...
    assert (body["video_width"], body["video_height"]) == (1366, 768)

    got = await env.retrieve(body["file_id"])
    file = got["file"]
    assert file["file_id"] == int(body["file_id"])  # ... and an integer in files/retrieve
    assert file["filename"] == "output.mp4" and file["purpose"] == "video_generation"
    assert got["base_resp"]["status_code"] == 0
    url = file["download_url"]
    assert {"Expires", "OSSAccessKeyId", "Signature"} <= set(parse_qs(urlsplit(url).query))
    video = await env.http.get(url)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"

    again = (await env.retrieve(body["file_id"]))["file"]["download_url"]
    assert again != url and (await env.http.get(again)).content == video.content  # a fresh URL per call
    assert env.sim.stats.requests["retrieve"] == 2 and env.sim.stats.creations == 1

    other = await env.wait(await env.task_id(prompt="another"))
    other_url = (await env.retrieve(other["file_id"]))["file"]["download_url"]
    assert (await env.http.get(other_url)).content != video.content

    missing = await env.retrieve("123")
    assert missing["base_resp"]["status_code"] == 2013 and "file" not in missing


async def test_image_to_video_first_and_last_frame(env: Env) -> None:
    task_id = await env.task_id(first_frame_image=IMAGE, last_frame_image=data_png(640, 360),
                                duration=6, resolution="1080P", callback_url=None)
    done = await env.wait(task_id)
    assert done["status"] == "Success" and (done["video_width"], done["video_height"]) == (1920, 1080)
    await env.task_id(model="I2V-01", prompt=None, first_frame_image=data_png(400, 400))
    await env.task_id(model="MiniMax-Hailuo-2.3-Fast", first_frame_image=IMAGE, resolution="512P", duration=10)
    await env.task_id(model="S2V-01", subject_reference=[{"type": "character", "image": [IMAGE]}])
    env.sim.config.extra["last_frame_models"] = ["MiniMax-Hailuo-02", "MiniMax-Hailuo-2.3"]
    await env.task_id(model="MiniMax-Hailuo-2.3", first_frame_image=IMAGE, last_frame_image=IMAGE)


async def test_parameter_errors_are_2013_inside_http_200(env: Env) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "Hailuo-3"}, "model"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"duration": 5}, "duration"),
        ({"duration": 10, "resolution": "1080P"}, "1080P"),
        ({"resolution": "512P"}, "resolution"),  # 512P is image-to-video only
        ({"resolution": "720P"}, "resolution"),
        ({"model": "T2V-01", "duration": 10}, "duration"),
        ({"model": "T2V-01", "first_frame_image": IMAGE}, "first_frame_image"),
        ({"model": "I2V-01"}, "first_frame_image"),
        ({"model": "MiniMax-Hailuo-2.3-Fast"}, "first_frame_image"),
        ({"model": "MiniMax-Hailuo-2.3", "first_frame_image": IMAGE, "last_frame_image": IMAGE}, "last_frame_image"),
        ({"first_frame_image": "ftp://example.com/a.png"}, "first_frame_image"),
        ({"first_frame_image": "data:image/gif;base64,R0lGOD"}, "first_frame_image"),
        ({"first_frame_image": data_png(300, 600)}, "short side"),
        ({"first_frame_image": data_png(1000, 320)}, "aspect ratio"),
        ({"model": "S2V-01", "subject_reference": [{"type": "object", "image": [IMAGE]}]}, "subject_reference"),
        ({"subject_reference": [{"type": "character", "image": [IMAGE]}]}, "subject_reference"),
        ({"prompt_optimizer": "yes"}, "prompt_optimizer"),
        ({"callback_url": "hooks/minimax"}, "callback_url"),
    ]
    for body, field in cases:
        r = await env.create(**body)
        assert r.status_code == 200, body
        got = r.json()
        assert "task_id" not in got, body
        assert got["base_resp"]["status_code"] == 2013 and field in got["base_resp"]["status_msg"], (body, got)
    r = await env.http.post("/v1/video_generation", content=b"{nope", headers=AUTH)
    assert r.status_code == 200 and r.json()["base_resp"]["status_code"] == 2013
    assert env.sim.stats.creations == 0


async def test_account_errors_inside_http_200(env: Env) -> None:
    async def code(r: httpx.Response) -> int:
        assert r.status_code == 200 and "task_id" not in r.json()
        status_code: int = r.json()["base_resp"]["status_code"]
        return status_code

    assert await code(await env.create(headers={})) == 1004
    assert await code(await env.create(headers={"Authorization": "Bearer other"})) == 1004
    env.sim.config.extra["other_region_keys"] = ["cn-key"]
    assert await code(await env.create(headers={"Authorization": "Bearer cn-key"})) == 2049
    env.sim.config.api_keys.append("cn-key")
    assert await code(await env.create(headers={"Authorization": "Bearer cn-key"})) == 2049
    q = await env.http.get("/v1/query/video_generation", params={"task_id": "1"})
    assert q.json()["base_resp"]["status_code"] == 1004

    assert await code(await env.create(prompt="a man [sim:sensitive]")) == 1026
    env.sim.config.extra["sensitive_words"] = ["gore"]
    assert await code(await env.create(prompt="gore everywhere")) == 1026

    env.sim.config.extra["balance"] = 1
    await env.task_id()
    assert await code(await env.create()) == 1008
    env.sim.config.extra["balance"] = None

    env.sim.config.extra["rpm"] = 2
    await env.task_id()
    assert await code(await env.create()) == 1002  # 2 creates in the last minute already
    env.sim.config.extra["rpm"] = None
    assert env.sim.stats.creations == 2

    env.sim.config.extra["http_status_errors"] = True
    r = await env.create(headers={})
    assert r.status_code == 401 and r.json()["base_resp"]["status_code"] == 1004


async def test_injected_faults(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[
        {"kind": "429", "route": "create", "retry_after": 2},
        {"kind": "503", "route": "query"},
    ])
    r = await env.create()
    assert r.status_code == 200 and r.json()["base_resp"]["status_code"] == 1002 and "task_id" not in r.json()
    task_id = await env.task_id()  # then success, one creation
    r = await env.http.get("/v1/query/video_generation", params={"task_id": task_id}, headers=AUTH)
    assert r.status_code == 503 and r.json()["base_resp"]["status_code"] != 0
    assert (await env.query(task_id))["base_resp"]["status_code"] == 0
    assert env.sim.stats.creations == 1


async def test_failures_carry_the_code_in_base_resp(env: Env) -> None:
    out = await env.task_id(prompt="x [sim:output_sensitive] [sim:run=0.6]")
    await asyncio.sleep(0.2)
    running = await env.query(out)
    assert running["status"] == "Processing" and running["base_resp"]["status_code"] == 0
    failed = await env.wait(out)
    assert failed["status"] == "Fail" and failed["file_id"] == ""
    assert failed["base_resp"]["status_code"] == 1027 and failed["base_resp"]["status_msg"]
    other = await env.wait(await env.task_id(prompt="x [sim:fail=1033]"))
    assert other["status"] == "Fail" and other["base_resp"]["status_code"] == 1033
    generic = await env.wait(await env.task_id(prompt="x [sim:fail]"))
    assert generic["base_resp"]["status_code"] == 1000
    unknown = await env.query("999")
    assert unknown["base_resp"]["status_code"] == 2013 and "status" not in unknown


async def test_download_urls_expire_and_are_signed(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    done = await env.wait(await env.task_id())
    url = (await env.retrieve(done["file_id"]))["file"]["download_url"]
    assert (await env.http.get(url)).status_code == 200
    tampered = url.replace("Expires=", "Expires=9")
    r = await env.http.get(tampered)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    await asyncio.sleep(0.45)
    r = await env.http.get(url)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    assert r.headers["content-type"] == "application/xml"
    fresh = (await env.retrieve(done["file_id"]))["file"]["download_url"]
    assert (await env.http.get(fresh)).status_code == 200  # retrieve right before downloading

    env.sim.config.output_ttl_seconds = 3600
    url2 = (await env.retrieve(done["file_id"]))["file"]["download_url"]
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(url2)).status_code == 403

    env.sim.config.extra["fresh_url_per_retrieve"] = False
    env.sim.config.output_ttl_seconds = 0.3
    pinned_task = await env.wait(await env.task_id())
    pinned = (await env.retrieve(pinned_task["file_id"]))["file"]["download_url"]
    await asyncio.sleep(0.35)
    assert (await env.retrieve(pinned_task["file_id"]))["file"]["download_url"] == pinned
    assert (await env.http.get(pinned)).status_code == 403


async def test_callback_handshake_then_lowercase_statuses(env: Env) -> None:
    rx = Receiver("echo")
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/hooks/minimax/job_1?t=secret"
        task_id = await env.task_id(callback_url=url)
        await rx.wait_for(3)
        challenge = rx.bodies[0]
        assert set(challenge) == {"challenge"} and challenge["challenge"]
        assert [b.get("status") for b in rx.bodies[1:]] == ["processing", "success"]
        final = rx.bodies[-1]
        assert final["task_id"] == task_id and final["base_resp"]["status_code"] == 0
        assert final["file_id"] == (await env.query(task_id))["file_id"]
        assert not any("signature" in k for k in rx.headers[-1])
        assert env.sim.handshakes[-1]["ok"] is True

        rx.bodies.clear()
        await env.task_id(prompt="x [sim:output_sensitive]", callback_url=url)
        await rx.wait_for(3)
        assert [b.get("status") for b in rx.bodies[1:]] == ["processing", "failed"]
        assert rx.bodies[-1]["base_resp"]["status_code"] == 1027 and rx.bodies[-1]["file_id"] == ""


@pytest.mark.parametrize("mode", ["wrong", "slow", "error"])
async def test_failed_handshake_means_no_callbacks(env: Env, mode: str) -> None:
    env.sim.config.extra["challenge_timeout"] = 0.3
    rx = Receiver(mode, delay=0.6)
    async with serving(rx.app) as rx_base:
        task_id = await env.task_id(callback_url=f"{rx_base}/hooks/minimax/job_2")
        done = await env.wait(task_id)
        assert done["status"] == "Success"  # the task runs on; only its callback is not registered
        await asyncio.sleep(0.3)
        assert len(rx.bodies) == 1 and "challenge" in rx.bodies[0]
        assert env.sim.handshakes[-1]["ok"] is False


async def test_failed_handshake_can_fail_the_task(env: Env) -> None:
    env.sim.config.extra["challenge_failure"] = "fail_task"
    rx = Receiver("wrong")
    async with serving(rx.app) as rx_base:
        done = await env.wait(await env.task_id(callback_url=f"{rx_base}/hooks/minimax/job_3"))
        assert done["status"] == "Fail" and done["base_resp"]["status_code"] == 2013


async def test_lost_create_answer_is_only_revealed_by_the_callback(env: Env) -> None:
    rx = Receiver("echo")
    async with serving(rx.app) as rx_base:
        await env.http.post("/_sim/faults", json=[{"kind": "504", "route": "create", "after_effect": True}])
        r = await env.create(callback_url=f"{rx_base}/hooks/minimax/job_lost")
        assert r.status_code == 504
        assert env.sim.stats.creations == 1
        # V1 has no list endpoint ...
        listing = await env.http.get("/v1/query/video_generation", headers=AUTH)
        assert listing.json()["base_resp"]["status_code"] == 2013
        assert (await env.http.get("/v1/video_generation", headers=AUTH)).status_code == 405
        # ... but the per-job callback URL hears of the task.
        await rx.wait_for(3)
        task_id = rx.bodies[-1]["task_id"]
        assert (await env.query(task_id))["status"] == "Success"
