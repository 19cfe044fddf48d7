"""The Midjourney simulator (midjourney-proxy through a new-api gateway), driven over real HTTP.

No official SDK exists for this API, so httpx speaks it as a gateway client would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.midjourney import MidjourneySimulator
from providers.sandbox.serve import serving

KEY = "sk-mjkey"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG_B64 = "data:image/png;base64," + base64.b64encode(media.png("input", 8, 8)).decode()


def make_sim(**extra: Any) -> MidjourneySimulator:
    cfg: dict[str, Any] = {"gateway_tick_seconds": 0.05}
    cfg.update(extra)
    return MidjourneySimulator(SimConfig(queue_seconds=0.05, run_seconds=0.2, api_keys=[KEY, "sk-other"],
                                         extra=cfg))


@pytest.fixture
async def mj() -> AsyncIterator[tuple[MidjourneySimulator, httpx.AsyncClient]]:
    sim = make_sim()
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield sim, client
    await sim.shutdown()


async def until(fn: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 5.0) -> Any:
    deadline = time.time() + within
    while True:
        value = await fn()
        if ok(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        await asyncio.sleep(0.02)


async def just_after_tick(sim: MidjourneySimulator) -> None:
    """Wait for a gateway tick to pass, so the next one is a whole tick away."""
    now = time.time()
    await asyncio.sleep(sim.tick_time(sim.first_tick_after(now)) - now + 0.02)


def png_rows(data: bytes) -> list[bytes]:
    """The RGB rows of an unfiltered 8-bit PNG (what the simulators write)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]


def quadrants(png: bytes) -> list[bytes]:
    rows = png_rows(png)
    w, h = len(rows[0]) // 3, len(rows)
    return [rows[y][3 * x:3 * x + 3] for y, x in ((h // 4, w // 4), (h // 4, 3 * w // 4),
                                                  (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))]


async def submit(client: httpx.AsyncClient, route: str, **body: Any) -> dict[str, Any]:
    resp = await client.post(f"/mj/{route}", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def fetch(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/mj/task/{task_id}/fetch")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def finished(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return dict(await until(lambda: fetch(client, task_id), lambda t: t["status"] in ("SUCCESS", "FAILURE")))


async def imagined(client: httpx.AsyncClient, prompt: str = "a red fox --ar 1:1", **kw: Any) -> dict[str, Any]:
    sub = await submit(client, "submit/imagine", prompt=prompt, **kw)
    assert sub["code"] == 1, sub
    done = await finished(client, sub["result"])
    assert done["status"] == "SUCCESS", done
    return done


def button(task: dict[str, Any], prefix: str, label: str | None = None) -> str:
    return str(next(b["customId"] for b in task["buttons"]
                    if b["customId"].startswith(prefix) and (label is None or b["label"] == label)))


async def test_imagine_then_upscale_the_second_quadrant(mj: Any) -> None:
    sim, client = mj
    sub = await submit(client, "submit/imagine", prompt="a red fox --ar 1:1", botType="NIJI_JOURNEY",
                       state="job-1")
    assert sub["code"] == 1 and sub["description"] == "提交成功"
    assert re.fullmatch(r"\d{16}", sub["result"]) and sub["properties"]["discordInstanceId"]
    task_id = sub["result"]
    seen: list[str] = []

    async def poll() -> dict[str, Any]:
        row = await fetch(client, task_id)
        if not seen or seen[-1] != row["status"]:
            seen.append(row["status"])
        return row

    done = await until(poll, lambda t: t["status"] in ("SUCCESS", "FAILURE"))
    order = ["", "NOT_START", "SUBMITTED", "IN_PROGRESS", "SUCCESS"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "SUCCESS"
    assert done["action"] == "IMAGINE" and done["progress"] == "100%" and done["failReason"] == ""
    assert done["prompt"] == "a red fox --ar 1:1" and done["state"] == "job-1"
    assert done["botType"] == "" and done["customId"] == "" and done["videoUrls"] is None  # never filled
    assert 10**12 < done["submitTime"] <= done["startTime"] <= done["finishTime"]  # milliseconds
    assert done["properties"] == {"finalPrompt": "a red fox --ar 1:1", "finalZhPrompt": ""}
    ids = [b["customId"] for b in done["buttons"]]
    job = ids[0].split("::")[-1]
    assert ids == [*(f"MJ::JOB::upsample::{i}::{job}" for i in range(1, 5)), f"MJ::JOB::reroll::0::{job}::SOLO",
                   *(f"MJ::JOB::variation::{i}::{job}" for i in range(1, 5))]
    assert done["imageUrl"].endswith(f"/mj/image/{task_id}")  # the gateway forwards the image
    grid = (await client.get(done["imageUrl"])).content
    tiles = quadrants(grid)
    assert len(set(tiles)) == 4

    up = await submit(client, "submit/action", taskId=task_id, customId=button(done, "MJ::JOB::upsample::", "U2"))
    assert up["code"] == 1 and up["result"] != task_id
    child = await finished(client, up["result"])
    assert child["status"] == "SUCCESS" and child["action"] == "UPSCALE"
    assert child["description"] == f"/up {task_id} U2"
    single = (await client.get(child["imageUrl"])).content
    assert set(quadrants(single)) == {tiles[1]}  # the upscale is quadrant 2
    assert any(b["customId"].startswith("MJ::JOB::upsample_v6_2x_subtle::1::") for b in child["buttons"])
    assert any(b["customId"].startswith("MJ::Outpaint::50::1::") for b in child["buttons"])
    again = await submit(client, "submit/action", taskId=task_id, customId=button(done, "MJ::JOB::upsample::", "U2"))
    assert again["code"] == 21 and again["description"] == "任务已存在" and again["result"] == up["result"]
    assert again["properties"]["status"] == "SUCCESS"
    stats = (await client.get("/_sim/stats")).json()
    assert stats["creations"] == 2 and stats["duplicate_identities"] == {}


async def test_variation_with_remix_needs_the_modal_step() -> None:
    sim = make_sim(remix_mode=True)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        done = await imagined(client, "a lighthouse")
        act = await submit(client, "submit/action", taskId=done["id"],
                           customId=button(done, "MJ::JOB::variation::", "V1"))
        assert act["code"] == 21 and act["description"] == "Waiting for window confirm"
        assert act["properties"] == {"finalPrompt": "a lighthouse", "remix": True}
        child_id = act["result"]
        waiting = await until(lambda: fetch(client, child_id), lambda t: t["status"] == "MODAL")
        assert waiting["progress"] == "0%" and waiting["action"] == "VARIATION"
        await asyncio.sleep(0.2)  # nothing happens until the modal arrives
        assert (await fetch(client, child_id))["status"] == "MODAL"
        modal = await submit(client, "submit/modal", taskId=child_id, prompt="a lighthouse at dawn")
        assert modal["code"] == 1 and modal["result"] == child_id
        child = await finished(client, child_id)
        assert child["status"] == "SUCCESS" and child["promptEn"] == "a lighthouse at dawn"
        assert len(set(quadrants((await client.get(child["imageUrl"])).content))) == 4
        twice = await submit(client, "submit/modal", taskId=child_id, prompt="again")
        assert twice["code"] == 4 and twice["description"] == "关联任务状态错误"
        # new-api rewrites 21 -> 1: the answer hides the modal step, the status does not.
        sim.config.extra["rewrite_codes"] = True
        hidden = await submit(client, "submit/action", taskId=done["id"],
                              customId=button(done, "MJ::JOB::variation::", "V2"))
        assert hidden["code"] == 1
        assert (await until(lambda: fetch(client, hidden["result"]),
                            lambda t: t["status"] != ""))["status"] == "MODAL"
        assert (await client.get("/_sim/stats")).json()["creations"] == 3
    await sim.shutdown()


async def test_upscale_follow_ups_custom_zoom_region_and_unsupported(mj: Any) -> None:
    sim, client = mj
    sim.config.extra["rewrite_codes"] = True
    done = await imagined(client)
    up = await submit(client, "submit/action", taskId=done["id"], customId=button(done, "MJ::JOB::upsample::", "U1"))
    upscaled = await finished(client, up["result"])
    # Without remix, variations and zoom out run straight away.
    zoom = await submit(client, "submit/action", taskId=upscaled["id"], customId=button(upscaled, "MJ::Outpaint::50"))
    assert zoom["code"] == 1 and (await finished(client, zoom["result"]))["action"] == "ZOOM"
    # Custom zoom always needs the modal, and new-api does not hide its 21.
    custom = await submit(client, "submit/action", taskId=upscaled["id"],
                          customId=button(upscaled, "MJ::CustomZoom::"))
    assert custom["code"] == 21
    no_zoom = await submit(client, "submit/modal", taskId=custom["result"], prompt="a red fox --ar 1:1")
    assert no_zoom["code"] == 4
    ok = await submit(client, "submit/modal", taskId=custom["result"], prompt="a red fox --ar 1:1 --zoom 1.5")
    assert ok["code"] == 1 and (await finished(client, custom["result"]))["status"] == "SUCCESS"
    region = await submit(client, "submit/action", taskId=upscaled["id"], customId=button(upscaled, "MJ::Inpaint::"))
    assert region["code"] == 21
    assert (await submit(client, "submit/modal", taskId=region["result"]))["code"] == 4  # no mask
    masked = await submit(client, "submit/modal", taskId=region["result"], maskBase64=PNG_B64)
    assert masked["code"] == 1
    heart = await submit(client, "submit/action", taskId=upscaled["id"], customId=button(upscaled, "MJ::BOOKMARK::"))
    assert heart["code"] == 4
    foreign = await submit(client, "submit/action", taskId=upscaled["id"],
                           customId=button(done, "MJ::JOB::variation::"))
    assert foreign["code"] == 4  # customIds belong to the task they came with


async def test_describe_returns_prompts_and_picreader_needs_modal(mj: Any) -> None:
    sim, client = mj
    sub = await submit(client, "submit/describe", base64=PNG_B64)
    assert sub["code"] == 1
    done = await finished(client, sub["result"])
    assert done["status"] == "SUCCESS" and done["action"] == "DESCRIBE" and done["prompt"] == ""
    text = done["properties"]["finalPrompt"]
    lines = text.split("\n\n")
    assert [line[:3] for line in lines] == ["1️⃣", "2️⃣", "3️⃣", "4️⃣"] and done["promptEn"] == text
    image = await client.get(done["imageUrl"])
    assert image.content == base64.b64decode(PNG_B64.split(",", 1)[1])  # the input image
    pick = await submit(client, "submit/action", taskId=sub["result"], customId="MJ::Job::PicReader::2")
    assert pick["code"] == 21
    assert (await submit(client, "submit/modal", taskId=pick["result"]))["code"] == 1  # empty prompt: keep it
    chosen = await finished(client, pick["result"])
    assert chosen["status"] == "SUCCESS" and chosen["promptEn"] == lines[1].split(" ", 1)[1]
    all_of_them = await submit(client, "submit/action", taskId=sub["result"], customId="MJ::Job::PicReader::all")
    assert all_of_them["code"] == 4
    assert (await submit(client, "submit/describe"))["code"] == 4
    assert (await submit(client, "submit/describe", base64="data:image/png;base64,@@"))["code"] == 4


async def test_queue_codes_22_and_23() -> None:
    sim = make_sim(concurrency=1, queue_size=1)
    sim.config.run_seconds = 0.4
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        first = await submit(client, "submit/imagine", prompt="first")
        second = await submit(client, "submit/imagine", prompt="second")
        third = await submit(client, "submit/imagine", prompt="third")
        assert first["code"] == 1
        assert second["code"] == 22 and second["description"] == "排队中，前面还有1个任务"
        assert second["properties"]["numberOfQueues"] == 1
        assert third["code"] == 23 and third["description"] == "队列已满，请稍后尝试" and third["result"] is None
        waiting = await until(lambda: fetch(client, second["result"]), lambda t: t["status"] != "")
        assert waiting["status"] == "NOT_START"  # waiting for the busy slot
        forced = await submit(client, "submit/imagine", prompt="any [sim:queue_full]")
        assert forced["code"] == 23
        a, b = await finished(client, first["result"]), await finished(client, second["result"])
        assert b["startTime"] >= a["finishTime"]
        # new-api's rewrite turns "queued" into plain success.
        sim.config.extra["rewrite_codes"] = True
        await submit(client, "submit/imagine", prompt="busy")
        hidden = await submit(client, "submit/imagine", prompt="queued but says 1")
        assert hidden["code"] == 1
        assert sim.proxy_object(sim.tasks[hidden["result"]], time.time())["status"] == "NOT_START"
        assert (await client.get("/_sim/stats")).json()["creations"] == 4
    await sim.shutdown()


async def test_banned_prompts_answer_24(mj: Any) -> None:
    sim, client = mj
    banned = await submit(client, "submit/imagine", prompt="a knight covered in blood [sim:banned=blood]")
    assert banned["code"] == 24 and banned["description"] == "可能包含敏感词" and banned["result"] is None
    assert banned["properties"]["bannedWord"] == "blood" and "knight" in banned["properties"]["promptEn"]
    sim.config.extra["banned_words"] = ["gore"]
    listed = await submit(client, "submit/imagine", prompt="Gore and glory")
    assert listed["code"] == 24 and listed["properties"]["bannedWord"] == "gore"
    assert (await submit(client, "submit/imagine", prompt="gorevale valley"))["code"] == 1  # whole words only
    sim.config.extra["trueai_http_status"] = True
    strict = await client.post("/mj/submit/imagine", json={"prompt": "gore"})
    assert strict.status_code == 400 and strict.json()["code"] == 24
    missing = await client.post("/mj/submit/action", json={"taskId": "1712345678901234", "customId": "MJ::x"})
    assert missing.status_code == 404 and missing.json()["code"] == 3
    assert (await client.get("/_sim/stats")).json()["creations"] == 1


async def test_gateway_row_lags_and_list_by_condition() -> None:
    sim = make_sim(gateway_tick_seconds=0.6)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        await just_after_tick(sim)
        a = (await submit(client, "submit/imagine", prompt="alpha"))["result"]
        b = (await submit(client, "submit/imagine", prompt="beta"))["result"]
        other = await client.post("/mj/submit/imagine", json={"prompt": "theirs"},
                                  headers={"Authorization": "Bearer sk-other"})
        theirs = other.json()["result"]
        body = {"ids": [b, "1700000000000000", theirs, a]}
        rows = (await client.post("/mj/task/list-by-condition", json=body)).json()
        assert isinstance(rows, list) and [r["id"] for r in rows] == [a, b]  # row order; others omitted
        if time.time() < sim.tick_time(sim.first_tick_after(sim.tasks[a].created_at)):
            assert rows[0]["status"] == "" and rows[0]["progress"] == "0%" and rows[0]["buttons"] is None
        # The proxy finished long before the gateway's next tick copies it.
        await until(lambda: asyncio.sleep(0, sim.proxy_object(sim.tasks[b], time.time())["status"]),
                    lambda s: s == "SUCCESS")
        if time.time() < sim.tick_time(sim.first_tick_after(sim.tasks[b].created_at)):
            assert (await fetch(client, b))["status"] == ""
        rows = await until(lambda: client.post("/mj/task/list-by-condition", json=body),
                           lambda r: all(t["status"] == "SUCCESS" for t in r.json()), within=4)
        assert len(rows.json()) == 2
        assert (await client.post("/mj/task/list-by-condition", json={"ids": []})).json() == []
        bad = await client.post("/mj/task/list-by-condition", json={"ids": "x"})
        assert bad.status_code == 400 and bad.json()["type"] == "upstream_error"
        foreign = await client.get(f"/mj/task/{theirs}/fetch")
        assert foreign.status_code == 400
        assert foreign.json() == {"description": "task_no_found ", "type": "upstream_error", "code": 4}
    await sim.shutdown()


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.queries: list[str] = []
        self.app = Starlette(routes=[Route("/hook", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        self.queries.append(request.url.query)
        self.bodies.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})


async def test_notify_hook_posts_each_change_ahead_of_the_gateway() -> None:
    sim = make_sim(gateway_tick_seconds=0.6)
    receiver = Receiver()
    async with serving(receiver.app) as hook, serving(sim.app) as url, \
            httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        await just_after_tick(sim)
        task_id = (await submit(client, "submit/imagine", prompt="a heron",
                                notifyHook=f"{hook}/hook?token=t0k3n"))["result"]
        failed_id = (await submit(client, "submit/imagine", prompt="a heron [sim:fail]",
                                  notifyHook=f"{hook}/hook?token=f41l"))["result"]
        await until(lambda: asyncio.sleep(0, [b["status"] for b in receiver.bodies]),
                    lambda s: s.count("SUCCESS") + s.count("FAILURE") == 2)
        mine = [b for b in receiver.bodies if b["id"] == task_id]
        assert mine[0]["status"] == "SUBMITTED" and mine[-1]["status"] == "SUCCESS"
        progress = [int(b["progress"].rstrip("%")) for b in mine if b["status"] == "IN_PROGRESS"]
        assert progress == sorted(progress) and len(progress) >= 2  # never backwards
        last = mine[-1]
        assert last["buttons"] and "/delivery/" in last["imageUrl"]  # the proxy's raw CDN URL
        assert last["properties"]["notifyHook"].endswith("token=t0k3n") and last["finishTime"] > 10**12
        fail = [b for b in receiver.bodies if b["id"] == failed_id][-1]
        assert fail["status"] == "FAILURE" and fail["progress"] == "" and fail["failReason"]
        assert set(receiver.queries) == {"token=t0k3n", "token=f41l"}
        assert {e["http_status"] for e in sim.notify_log} == {200}  # one attempt each, all delivered
        if time.time() < sim.tick_time(sim.first_tick_after(sim.tasks[task_id].created_at)):
            assert (await fetch(client, task_id))["status"] == ""  # the hint ran ahead of the row
        row = await until(lambda: fetch(client, failed_id), lambda t: t["status"] == "FAILURE", within=4)
        assert row["progress"] == "100%" and row["failReason"] == fail["failReason"]
        sim.config.extra["notify_enabled"] = False  # new-api's default strips notifyHook
        before = len(receiver.bodies)
        quiet = (await submit(client, "submit/imagine", prompt="quiet", notifyHook=f"{hook}/hook"))["result"]
        await until(lambda: asyncio.sleep(0, sim.proxy_object(sim.tasks[quiet], time.time())["status"]),
                    lambda s: s == "SUCCESS")
        await asyncio.sleep(0.1)
        assert len(receiver.bodies) == before and all(e["task"] != quiet for e in sim.notify_log)
    await sim.shutdown()


async def test_failures_and_proxy_timeout(mj: Any) -> None:
    sim, client = mj
    sim.config.extra["proxy_task_timeout_seconds"] = 0.3
    custom = (await submit(client, "submit/imagine", prompt="x [sim:fail=Banned prompt detected]"))["result"]
    plain = (await submit(client, "submit/imagine", prompt="x [sim:fail]"))["result"]
    stuck = (await submit(client, "submit/imagine", prompt="x [sim:stuck]"))["result"]
    first = await finished(client, custom)
    assert first["status"] == "FAILURE" and first["failReason"] == "Banned prompt detected"
    assert first["progress"] == "100%"
    assert first["buttons"] == [] and first["imageUrl"] == ""
    assert (await finished(client, plain))["failReason"] == "[Invalid parameter] Invalid value"
    assert (await finished(client, stuck))["failReason"] == "任务超时"
    on_failed = await submit(client, "submit/action", taskId=plain, customId="MJ::JOB::upsample::1::x")
    assert on_failed["code"] == 4 and on_failed["description"] == "关联任务状态错误"
    unknown = await submit(client, "submit/action", taskId="1700000000000000", customId="MJ::JOB::upsample::1::x")
    assert unknown["code"] == 3


async def test_auth_validation_and_faults(mj: Any) -> None:
    sim, client = mj
    url = str(client.base_url)
    async with httpx.AsyncClient(base_url=url) as anon:
        assert (await anon.post("/mj/submit/imagine", json={"prompt": "x"})).status_code == 401
        wrong = await anon.post("/mj/submit/imagine", json={"prompt": "x"}, headers={"mj-api-secret": "sk-nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "new_api_error"
        secret = await anon.post("/mj/submit/imagine", json={"prompt": "x"}, headers={"mj-api-secret": KEY})
        assert secret.json()["code"] == 1
        legacy = await anon.post("/mj/submit/imagine", json={"prompt": "x"},
                                 headers={"Authorization": "midjourney-proxy", "mj-api-secret": KEY})
        assert legacy.json()["code"] == 1
    assert (await submit(client, "submit/imagine", prompt=" "))["description"] == "prompt不能为空"
    broken = await client.post("/mj/submit/imagine", content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["code"] == 4
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "submit", "retry_after": 3}])
    throttled = await client.post("/mj/submit/imagine", json={"prompt": "retry me"})
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "3"
    assert throttled.json()["code"] == 30 and throttled.json()["type"] == "upstream_error"
    assert (await submit(client, "submit/imagine", prompt="retry me"))["code"] == 1
    await client.post("/_sim/faults", json=[{"kind": "502", "route": "submit", "after_effect": True}])
    assert (await client.post("/mj/submit/imagine", json={"prompt": "ambiguous"})).status_code == 502
    stats = (await client.get("/_sim/stats")).json()
    assert stats["creations"] == 4 and stats["faults_injected"] == {"submit:429": 1, "submit:502": 1}


async def test_blend_and_face_swap(mj: Any) -> None:
    sim, client = mj
    blend = await submit(client, "submit/blend", base64Array=[PNG_B64, PNG_B64], dimensions="LANDSCAPE")
    done = await finished(client, blend["result"])
    assert done["action"] == "BLEND" and done["description"] == f"/blend {blend['result']} 2"
    rows = png_rows((await client.get(done["imageUrl"])).content)
    assert (len(rows[0]) // 3, len(rows)) == (96, 64)
    assert (await submit(client, "submit/blend", base64Array=[PNG_B64]))["description"] == "base64List参数错误"
    assert (await submit(client, "submit/blend", base64Array=[PNG_B64] * 2, dimensions="WIDE"))["code"] == 4
    swap = await submit(client, "insight-face/swap", sourceBase64=PNG_B64, targetUrl="https://example.com/t.png")
    face = await finished(client, swap["result"])
    assert face["action"] == "SWAP_FACE" and face["status"] == "SUCCESS"
    assert len(set(quadrants((await client.get(face["imageUrl"])).content))) == 1
    assert (await submit(client, "insight-face/swap", sourceBase64=PNG_B64))["code"] == 4


async def test_images_expire_behind_the_gateway_proxy(mj: Any) -> None:
    sim, client = mj
    sim.config.output_ttl_seconds = 0.5
    done = await imagined(client)
    forwarded = done["imageUrl"]
    assert (await client.get(forwarded)).status_code == 200
    sim.config.extra["forward_image_url"] = False
    raw = (await fetch(client, done["id"]))["imageUrl"]
    assert "/delivery/" in raw and (await client.get(raw)).status_code == 200
    await asyncio.sleep(0.6)
    assert (await client.get(raw)).status_code == 404
    gone = await client.get(forwarded)
    assert gone.status_code == 404 and gone.json() == {"error": "Not Found"}
    assert (await client.get("/mj/image/1700000000000000")).status_code == 400
