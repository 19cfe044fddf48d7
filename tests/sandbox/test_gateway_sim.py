"""The new-api gateway simulator (Kling channel), driven over real HTTP like a client of new-api."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from providers.sandbox.base import SimConfig
from providers.sandbox.gateway import KlingGatewaySimulator
from providers.sandbox.serve import serving

KEY = "sk-gatewaykey"
AUTH = {"Authorization": f"Bearer {KEY}"}


def is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def make_sim(**extra: Any) -> KlingGatewaySimulator:
    cfg: dict[str, Any] = {"gateway_tick_seconds": 0.1}
    cfg.update(extra)
    return KlingGatewaySimulator(SimConfig(queue_seconds=0.2, run_seconds=0.3,
                                           api_keys=[KEY, "sk-neighbour"], extra=cfg))


async def until(fn: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 5.0) -> Any:
    deadline = time.time() + within
    while True:
        value = await fn()
        if ok(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        await asyncio.sleep(0.03)


@pytest.fixture
async def gw() -> AsyncIterator[tuple[KlingGatewaySimulator, httpx.AsyncClient]]:
    sim = make_sim()
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield sim, client


async def dto(client: httpx.AsyncClient, task_id: str, path: str = "/v1/video/generations") -> dict[str, Any]:
    resp = await client.get(f"{path}/{task_id}")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == "success" and body["message"] == ""
    return dict(body["data"])


async def openai_video(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/videos/{task_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def submit(client: httpx.AsyncClient, prompt: str = "a corgi surfing", **kw: Any) -> dict[str, Any]:
    resp = await client.post("/v1/video/generations", json={"model": "kling-v1", "prompt": prompt, **kw})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def test_unified_submit_poll_and_download() -> None:
    # Ticks of a second: the read just after the submit comes before the first one even on a loaded
    # machine (with the fixture's 0.1 s, four test processes on two cores saw SUBMITTED there).
    sim = make_sim(gateway_tick_seconds=1.0)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        await _unified_submit_poll_and_download(client)


async def _unified_submit_poll_and_download(client: httpx.AsyncClient) -> None:
    created = await submit(client, duration=5)
    task_id = created["id"]
    assert re.fullmatch(r"task_[A-Za-z0-9]{32}", task_id) and created["task_id"] == task_id
    assert created["object"] == "video" and created["status"] == "queued" and created["progress"] == 0
    assert created["model"] == "kling-v1" and created["created_at"] > 0
    # Before the gateway's first poll: NOT_START, "unknown", Kling's submit body as data.
    row = await dto(client, task_id)
    assert row["status"] == "NOT_START" and row["progress"] == "0%" and row["platform"] == "50"
    assert row["action"] == "textGenerate" and row["data"]["data"]["task_status"] == "submitted"
    early = await openai_video(client, task_id)
    assert early["status"] == "unknown" and early["progress"] == 0
    not_ready = await client.get(f"/v1/videos/{task_id}/content")
    assert not_ready.status_code == 400
    # The gateway may have ticked meanwhile (a loaded machine): any not-finished status will do.
    assert re.search(r"current status: (NOT_START|SUBMITTED|QUEUED|IN_PROGRESS)$",
                     not_ready.json()["error"]["message"])
    seen: list[str] = []

    async def poll() -> dict[str, Any]:
        d = await dto(client, task_id)
        if not seen or seen[-1] != d["status"]:
            seen.append(d["status"])
        return d

    done = await until(poll, lambda d: d["status"] in ("SUCCESS", "FAILURE"))
    order = ["NOT_START", "SUBMITTED", "IN_PROGRESS", "SUCCESS"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "SUCCESS"
    assert done["progress"] == "100%" and done["fail_reason"] == ""
    kling = done["data"]
    assert kling["code"] == 0 and kling["data"]["task_status"] == "succeed"
    assert kling["data"]["task_result"]["videos"][0]["url"] == done["result_url"]
    video = await client.get(done["result_url"])
    assert video.status_code == 200 and is_mp4(video.content)
    ov = await openai_video(client, task_id)
    assert ov["status"] == "completed" and ov["progress"] == 100
    assert ov["metadata"]["url"] == done["result_url"] and ov["seconds"] == "5.1"
    assert ov["created_at"] > 10**12  # new-api copies Kling's millisecond timestamps
    proxied = await client.get(f"/v1/videos/{task_id}/content")
    assert proxied.status_code == 200 and proxied.content == video.content


async def test_kling_native_routes(gw: Any) -> None:
    sim, client = gw
    resp = await client.post("/kling/v1/videos/text2video",
                             json={"model_name": "kling-v2-master", "prompt": "a fox", "duration": "10",
                                   "aspect_ratio": "16:9"})
    assert resp.status_code == 200
    created = resp.json()
    assert created["object"] == "video" and created["model"] == "kling-v2-master"
    row = await dto(client, created["id"], "/kling/v1/videos/text2video")
    assert row["action"] == "textGenerate" and row["properties"]["origin_model_name"] == "kling-v2-master"
    i2v = await client.post("/kling/v1/videos/image2video",
                            json={"model_name": "kling-v1", "prompt": "move", "image": "https://x/y.png"})
    i2v_row = await dto(client, i2v.json()["id"], "/kling/v1/videos/image2video")
    assert i2v_row["action"] == "generate"
    done = await until(lambda: dto(client, created["id"], "/kling/v1/videos/text2video"),
                       lambda d: d["status"] == "SUCCESS")
    assert done["data"]["data"]["task_result"]["videos"][0]["duration"] == "10.1"


async def test_openai_videos_route_json_and_multipart(gw: Any) -> None:
    sim, client = gw
    resp = await client.post("/v1/videos", json={"model": "kling-v1", "prompt": "rain", "seconds": "5"})
    assert resp.status_code == 200 and resp.json()["object"] == "video"
    form = await client.post("/v1/videos", data={"model": "kling-v1-6", "prompt": "snow", "seconds": "10"},
                             files={"input_reference": ("ref.png", b"\x89PNG....", "image/png")})
    assert form.status_code == 200, form.text
    row = await dto(client, form.json()["id"])
    assert row["action"] == "generate" and row["properties"]["upstream_model_name"] == "kling-v1-6"


async def test_failed_task_reason_and_openai_shape(gw: Any) -> None:
    sim, client = gw
    task_id = (await submit(client, "broken [sim:fail]"))["id"]
    done = await until(lambda: dto(client, task_id), lambda d: d["status"] in ("SUCCESS", "FAILURE"))
    assert done["status"] == "FAILURE" and done["progress"] == "100%"
    assert done["fail_reason"] == done["data"]["data"]["task_status_msg"] != ""
    assert done["result_url"] == done["fail_reason"]
    ov = await openai_video(client, task_id)
    # Kling says code 0 even for failed tasks, so new-api's converter adds no error object.
    assert ov["status"] == "failed" and "error" not in ov


async def test_timeout_sweep_with_stale_data() -> None:
    sim = make_sim(gateway_task_timeout_seconds=0.7)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        stuck = (await submit(client, "endless [sim:stuck]"))["id"]
        lost = (await submit(client, "vanished [sim:lost]"))["id"]
        running = await until(lambda: dto(client, stuck), lambda d: d["status"] == "IN_PROGRESS")
        assert running["progress"] == "30%" and running["start_time"] > 0
        swept = await until(lambda: dto(client, stuck), lambda d: d["status"] == "FAILURE", 3)
        assert swept["fail_reason"].startswith("任务超时") and swept["progress"] == "100%"
        assert swept["data"]["data"]["task_status"] == "processing"  # stale upstream body (issue #5715)
        assert (await openai_video(client, stuck))["status"] == "failed"
        gone = await until(lambda: dto(client, lost), lambda d: d["status"] == "FAILURE", 3)
        assert gone["data"]["data"]["task_status"] == "submitted"


async def test_submit_errors_and_auth(gw: Any) -> None:
    sim, client = gw
    url = str(client.base_url)
    async with httpx.AsyncClient(base_url=url) as anon:
        missing = await anon.post("/v1/video/generations", json={"model": "kling-v1", "prompt": "x"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "new_api_error"
        wrong = await anon.get("/v1/videos/task_x", headers={"Authorization": "Bearer sk-nope"})
        assert wrong.status_code == 401
    no_prompt = await client.post("/v1/video/generations", json={"model": "kling-v1", "prompt": " "})
    assert no_prompt.status_code == 400 and no_prompt.json()["code"] == "invalid_request"
    no_channel = await client.post("/v1/video/generations", json={"model": "veo-3", "prompt": "x"})
    assert no_channel.status_code == 503 and "error" in no_channel.json()
    gen = "/v1/video/generations"
    balance = await client.post(gen, json={"model": "kling-v1", "prompt": "x [sim:balance]"})
    assert balance.status_code == 429
    assert balance.json() == {"code": "fail_to_fetch_task", "message": "当前分组上游负载已饱和，请稍后再试",
                              "data": None}
    unsafe = await client.post(gen, json={"model": "kling-v1", "prompt": "x [sim:unsafe]"})
    assert unsafe.status_code == 400 and unsafe.json()["code"] == "fail_to_fetch_task"
    assert json.loads(unsafe.json()["message"])["code"] == 1301
    assert (await client.get("/_sim/stats")).json()["creations"] == 0
    mine = (await submit(client))["id"]
    theirs = await client.get(f"{gen}/{mine}", headers={"Authorization": "Bearer sk-neighbour"})
    assert theirs.status_code == 400
    assert theirs.json() == {"code": "task_not_exist", "message": "task_not_exist", "data": None}
    assert (await client.get("/v1/videos/task_unknown/content")).status_code == 404


async def test_fault_injection(gw: Any) -> None:
    sim, client = gw
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "submit", "retry_after": 5},
                                            {"kind": "503", "route": "fetch"}])
    throttled = await client.post("/v1/video/generations", json={"model": "kling-v1", "prompt": "x"})
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "5"
    assert throttled.json()["data"] is None
    task_id = (await submit(client))["id"]
    unavailable = await client.get(f"/v1/video/generations/{task_id}")
    assert unavailable.status_code == 503
    await client.post("/_sim/faults", json=[{"kind": "502", "route": "submit", "after_effect": True}])
    ambiguous = await client.post("/v1/video/generations", json={"model": "kling-v1", "prompt": "twice?"})
    assert ambiguous.status_code == 502
    assert (await client.get("/_sim/stats")).json()["creations"] == 2


async def test_output_expiry_breaks_the_proxy() -> None:
    sim = make_sim()
    sim.config.output_ttl_seconds = 0.4
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = (await submit(client))["id"]
        done = await until(lambda: dto(client, task_id), lambda d: d["status"] == "SUCCESS")
        assert (await client.get(done["result_url"])).status_code == 200
        await asyncio.sleep(0.5)
        assert (await client.get(done["result_url"])).status_code == 404
        proxied = await client.get(f"/v1/videos/{task_id}/content")
        assert proxied.status_code == 502
