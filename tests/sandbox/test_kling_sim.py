"""The Kling simulator, driven over real HTTP exactly as Kling's docs tell a client to."""

from __future__ import annotations

import asyncio
import base64
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.kling import KlingSimulator
from providers.sandbox.media import png
from providers.sandbox.serve import serving

AK, SK = "sandbox-ak", "sandbox-sk"
MP4_BOX = b"ftyp"


def token(ak: str = AK, sk: str = SK, exp_in: int = 1800, nbf_in: int = -5, **extra: Any) -> str:
    """The API token exactly as Kling's Python sample builds it."""
    now = int(time.time())
    payload = {"iss": ak, "exp": now + exp_in, "nbf": now + nbf_in, **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short sandbox secret
        return jwt.encode(payload, sk, headers={"alg": "HS256", "typ": "JWT"})


def auth(**kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**kw)}", "Content-Type": "application/json"}


@dataclass
class Env:
    sim: KlingSimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, family: str = "text2video", **body: Any) -> httpx.Response:
        body.setdefault("prompt", "a rabbit reading a newspaper")
        return await self.http.post(f"/v1/videos/{family}", json=body, headers=auth())

    async def query(self, task_id: str, family: str = "text2video") -> httpx.Response:
        return await self.http.get(f"/v1/videos/{family}/{task_id}", headers=auth())

    async def wait(self, task_id: str, family: str = "text2video", within: float = 10) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.query(task_id, family)
            assert r.status_code == 200, r.text
            data: dict[str, Any] = r.json()["data"]
            if data["task_status"] in ("succeed", "failed"):
                return data
            await asyncio.sleep(0.05)
        raise AssertionError("task did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = KlingSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


async def test_text2video_success_real_mp4(env: Env) -> None:
    r = await env.create(model_name="kling-v2-6", duration="5", mode="pro", external_task_id="job-1",
                         prompt="a rabbit [sim:queue=0.3] [sim:run=0.5]")
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 0 and body["message"] == "SUCCEED" and body["request_id"]
    data = body["data"]
    assert data["task_status"] == "submitted"
    assert data["task_id"].isdigit()
    assert data["task_info"] == {"external_task_id": "job-1"}
    assert data["created_at"] > 10**12  # milliseconds

    seen = set()
    while True:
        d = (await env.query(data["task_id"])).json()["data"]
        seen.add(d["task_status"])
        if d["task_status"] == "succeed":
            break
        await asyncio.sleep(0.03)
    assert {"submitted", "processing", "succeed"} <= seen
    video = d["task_result"]["videos"][0]
    assert video["duration"] == "5.1" and isinstance(video["duration"], str)
    assert d["final_unit_deduction"] == "3.5"
    assert d["updated_at"] >= d["created_at"]
    assert "watermark_url" not in video

    got = await env.http.get(video["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
    assert got.content[4:8] == MP4_BOX

    # Another task gives different bytes.
    other = (await env.create()).json()["data"]["task_id"]
    d2 = await env.wait(other)
    got2 = await env.http.get(d2["task_result"]["videos"][0]["url"])
    assert got2.content[4:8] == MP4_BOX and got2.content != got.content


async def test_image2video_is_its_own_namespace(env: Env) -> None:
    r = await env.create("image2video", image="https://example.com/cat.png", prompt="",
                         watermark_info={"enabled": True})
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["task_id"]
    missing = await env.query(task_id, "text2video")
    assert missing.status_code == 404 and missing.json()["code"] == 1203
    d = await env.wait(task_id, "image2video")
    video = d["task_result"]["videos"][0]
    assert d["watermark_info"] == {"enabled": True}
    wm = await env.http.get(video["watermark_url"])
    assert wm.status_code == 200 and wm.content[4:8] == MP4_BOX


async def test_failed_task_inside_code_zero_envelope(env: Env) -> None:
    task_id = (await env.create(prompt="a cat [sim:fail]")).json()["data"]["task_id"]
    await env.wait(task_id)
    body = (await env.query(task_id)).json()
    assert body["code"] == 0 and body["message"] == "SUCCEED"
    assert body["data"]["task_status"] == "failed"
    assert body["data"]["task_status_msg"]
    assert body["data"]["task_result"] == {}

    filtered = (await env.create(prompt="x [sim:filtered]")).json()["data"]["task_id"]
    d = await env.wait(filtered)
    assert d["task_status"] == "failed" and "risk control" in d["task_status_msg"]

    custom = (await env.create(prompt="x [sim:fail=Image too small]")).json()["data"]["task_id"]
    assert (await env.wait(custom))["task_status_msg"] == "Image too small"


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        (None, 1001),
        ("Bearer not-a-jwt", 1002),
        ("Basic abc", 1002),
        ({"sk": "wrong-secret"}, 1000),
        ({"ak": "someone-else"}, 1000),
        ({"exp_in": -10}, 1004),
        ({"nbf_in": 60}, 1003),
    ],
)
async def test_auth_rejections(env: Env, auth: str | dict[str, Any] | None, code: int) -> None:
    # Tokens are built when the test runs, not at collection: exp/nbf are relative to now.
    if isinstance(auth, dict):
        auth = f"Bearer {token(**auth)}"
    headers = {"Authorization": auth} if auth else {}
    r = await env.http.post("/v1/videos/text2video", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == code and body["message"] and body["request_id"]
    assert env.sim.stats.creations == 0


async def test_token_without_exp_is_invalid_and_key_pairs_from_api_keys(env: Env) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_exp = jwt.encode({"iss": AK}, SK, algorithm="HS256")
    r = await env.http.get("/v1/videos/text2video", headers={"Authorization": f"Bearer {no_exp}"})
    assert r.status_code == 401 and r.json()["code"] == 1002

    env.sim.config.api_keys = ["ak-2:sk-2"]
    r = await env.http.get("/v1/videos/text2video", headers=auth(ak="ak-2", sk="sk-2"))
    assert r.status_code == 200 and r.json()["code"] == 0


@pytest.mark.parametrize(
    ("family", "body", "status", "code"),
    [
        ("text2video", {"duration": "7"}, 400, 1201),
        ("text2video", {"duration": "7", "model_name": "kling-v2-6"}, 400, 1201),
        ("text2video", {"mode": "turbo"}, 400, 1201),
        ("text2video", {"aspect_ratio": "4:3"}, 400, 1201),
        ("text2video", {"cfg_scale": 2}, 400, 1201),
        ("text2video", {"prompt": ""}, 400, 1201),
        ("text2video", {"prompt": "x" * 2501}, 400, 1201),
        ("text2video", {"model_name": "kling-v9"}, 404, 1203),
        ("text2video", {"model_name": "kling-v1-5"}, 404, 1203),  # image-to-video only
        ("image2video", {}, 400, 1201),
        ("image2video", {"image": "data:image/png;base64,iVBORw0KGgo="}, 400, 1201),
        ("image2video", {"image": "not base64 at all!"}, 400, 1201),
        ("image2video", {"image": "https://e.com/a.png", "image_tail": "https://e.com/b.png",
                         "camera_control": {"type": "simple"}}, 400, 1201),
    ],
)
async def test_validation(env: Env, family: str, body: dict[str, Any], status: int, code: int) -> None:
    r = await env.create(family, **body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and "data" not in r.json()
    assert env.sim.stats.creations == 0


async def test_documented_durations_and_raw_base64_image(env: Env) -> None:
    assert (await env.create(model_name="kling-v3", duration="7")).json()["code"] == 0
    assert (await env.create(duration="10", mode="std")).json()["code"] == 0
    raw_png_b64 = base64.b64encode(png("seed")).decode()
    r = await env.create("image2video", image=raw_png_b64, model_name="kling-v2-1")
    assert r.status_code == 200 and r.json()["code"] == 0


async def test_bad_json_body(env: Env) -> None:
    r = await env.http.post("/v1/videos/text2video", content=b"{nope", headers=auth())
    assert r.status_code == 400 and r.json()["code"] == 1200


async def test_external_task_id_query_and_uniqueness(env: Env) -> None:
    first = await env.create(external_task_id="atelier-job-42")
    task_id = first.json()["data"]["task_id"]
    by_ext = (await env.query("atelier-job-42")).json()
    assert by_ext["code"] == 0 and by_ext["data"]["task_id"] == task_id
    assert by_ext["data"]["task_info"]["external_task_id"] == "atelier-job-42"

    dup = await env.create(external_task_id="atelier-job-42")
    assert dup.status_code == 400 and dup.json()["code"] == 1201
    # Unique per account, across families too.
    dup2 = await env.create("image2video", image="https://e.com/a.png", external_task_id="atelier-job-42")
    assert dup2.status_code == 400 and dup2.json()["code"] == 1201
    stats = (await env.http.get("/_sim/stats")).json()
    assert stats["creations"] == 1 and stats["duplicate_identities"] == {}


async def test_ambiguous_create_reconciled_by_external_task_id(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "create", "after_effect": True}])
    r = await env.create(external_task_id="job-ambiguous")
    assert r.status_code == 502 and r.json()["code"] == 5000
    found = await env.query("job-ambiguous")
    assert found.status_code == 200 and found.json()["data"]["task_status"] in ("submitted", "processing")
    assert env.sim.stats.creations == 1


async def test_business_429_codes(env: Env) -> None:
    r = await env.create(prompt="x [sim:balance]")
    assert r.status_code == 429 and r.json()["code"] == 1102
    r = await env.create(prompt="x [sim:ratelimit]")
    assert r.status_code == 429 and r.json()["code"] == 1302
    r = await env.create(prompt="x [sim:concurrency]")
    assert r.status_code == 429 and r.json()["code"] == 1303
    r = await env.create(prompt="x [sim:blocked]")
    assert r.status_code == 400 and r.json()["code"] == 1301
    assert env.sim.stats.creations == 0

    env.sim.config.extra["balance_http_status"] = 400  # the CONFLICT some projects observed
    r = await env.create(prompt="x [sim:balance]")
    assert r.status_code == 400 and r.json()["code"] == 1102


async def test_concurrency_limit_and_balance(env: Env) -> None:
    env.sim.config.extra["concurrency"] = 2
    env.sim.config.run_seconds = 0.4
    assert (await env.create()).json()["code"] == 0
    assert (await env.create()).json()["code"] == 0
    over = await env.create()
    assert over.status_code == 429
    assert over.json() | {"request_id": ""} == {
        "code": 1303, "message": "parallel task over resource pack limit", "request_id": ""}
    await asyncio.sleep(0.6)  # both finished: slots free again
    assert (await env.create()).json()["code"] == 0

    env.sim.config.extra.update(concurrency=None, balance_units=env.sim.units_used + 1)
    assert (await env.create(mode="std", duration="5")).json()["code"] == 0  # 1 unit
    broke = await env.create()
    assert broke.status_code == 429 and broke.json()["code"] == 1102


async def test_injected_faults_use_kling_envelope(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[
        {"kind": "429", "route": "create", "retry_after": 2},
        {"kind": "503", "route": "get"},
        {"kind": "malformed", "route": "get"},
    ])
    r = await env.create()
    assert r.status_code == 429 and r.json()["code"] == 1302 and r.headers["retry-after"] == "2"
    env.sim.config.extra["fault_429_code"] = 1303
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create"}])
    r = await env.create()
    assert r.status_code == 429 and r.json()["code"] == 1303 and "retry-after" not in r.headers
    task_id = (await env.create()).json()["data"]["task_id"]
    r = await env.query(task_id)
    assert r.status_code == 503 and r.json()["code"] == 5001
    r = await env.query(task_id)
    with pytest.raises(ValueError):
        r.json()
    assert (await env.query(task_id)).json()["code"] == 0


async def test_unknown_route_and_method(env: Env) -> None:
    r = await env.http.delete("/v1/videos/text2video/123", headers=auth())
    assert r.status_code == 404 and r.json()["code"] == 1202
    r = await env.http.get("/v1/videos/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["code"] == 1202


async def test_list_pagination_newest_first(env: Env) -> None:
    ids = [(await env.create(prompt=f"clip {i}")).json()["data"]["task_id"] for i in range(5)]
    page1 = (await env.http.get("/v1/videos/text2video?pageNum=1&pageSize=2", headers=auth())).json()
    assert page1["code"] == 0 and [t["task_id"] for t in page1["data"]] == ids[::-1][:2]
    page3 = (await env.http.get("/v1/videos/text2video?pageNum=3&pageSize=2", headers=auth())).json()
    assert [t["task_id"] for t in page3["data"]] == [ids[0]]
    page9 = (await env.http.get("/v1/videos/text2video?pageNum=9&pageSize=2", headers=auth())).json()
    assert page9["data"] == []
    other = (await env.http.get("/v1/videos/image2video", headers=auth())).json()
    assert other["data"] == []
    bad = await env.http.get("/v1/videos/text2video?pageSize=501", headers=auth())
    assert bad.status_code == 400 and bad.json()["code"] == 1201


async def test_output_urls_expire_and_are_signed(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.5
    task_id = (await env.create()).json()["data"]["task_id"]
    url = (await env.wait(task_id))["task_result"]["videos"][0]["url"]
    assert (await env.http.get(url)).status_code == 200
    tampered = url.replace("x-exp=", "x-exp=9")
    assert (await env.http.get(tampered)).status_code == 404
    await asyncio.sleep(0.6)
    assert (await env.http.get(url)).status_code == 404
    # The URL is the task's stored result: re-querying does not refresh it.
    again = (await env.query(task_id)).json()["data"]["task_result"]["videos"][0]["url"]
    assert again == url

    env.sim.config.output_ttl_seconds = 3600
    fresh = (await env.create()).json()["data"]["task_id"]
    url2 = (await env.wait(fresh))["task_result"]["videos"][0]["url"]
    assert (await env.http.get(url2)).status_code == 200
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(url2)).status_code == 404


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

        async def hook(request: Request) -> Response:
            self.bodies.append(await request.json())
            self.headers.append(dict(request.headers))
            return JSONResponse({"ok": True})

        self.app = Starlette(routes=[Route("/kling/cb", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.bodies) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # give unexpected extras a chance to arrive


async def test_callbacks_on_each_status_change(env: Env) -> None:
    rx = Receiver()
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/kling/cb?token=secret-per-job"
        ok = (await env.create(callback_url=url, external_task_id="cb-1")).json()["data"]["task_id"]
        await rx.wait_for(2)
        assert [b["task_status"] for b in rx.bodies] == ["processing", "succeed"]
        final = rx.bodies[-1]
        assert "code" not in final and "data" not in final  # the bare task object
        assert final["task_id"] == ok and final["task_info"]["external_task_id"] == "cb-1"
        assert final["task_result"]["videos"][0]["url"].startswith(env.base)
        assert not any(k.startswith("webhook-") or "signature" in k for k in rx.headers[-1])

        rx.bodies.clear()
        await env.create(prompt="x [sim:fail]", callback_url=url)
        await rx.wait_for(2)
        assert [b["task_status"] for b in rx.bodies] == ["processing", "failed"]
        assert rx.bodies[-1]["task_status_msg"]


async def test_callback_faults(env: Env) -> None:
    rx = Receiver()
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/kling/cb"
        await env.create(prompt="x [sim:callback=reorder]", callback_url=url)
        await rx.wait_for(2)
        assert [b["task_status"] for b in rx.bodies] == ["succeed", "processing"]

        rx.bodies.clear()
        await env.create(prompt="x [sim:callback=duplicate]", callback_url=url)
        await rx.wait_for(4)
        assert [b["task_status"] for b in rx.bodies] == ["processing", "processing", "succeed", "succeed"]

        rx.bodies.clear()
        env.sim.config.extra["callback_on_submit"] = True
        await env.create(callback_url=url)
        await rx.wait_for(3)
        assert [b["task_status"] for b in rx.bodies] == ["submitted", "processing", "succeed"]

        rx.bodies.clear()
        dropped = await env.create(prompt="x [sim:callback=drop]", callback_url=url)
        await env.wait(dropped.json()["data"]["task_id"])
        await asyncio.sleep(0.2)
        assert rx.bodies == []
