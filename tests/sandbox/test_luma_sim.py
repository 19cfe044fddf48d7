"""The Luma Dream Machine simulator, driven over real HTTP as Luma's docs (and its SDK) describe."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.luma import LumaSimulator
from providers.sandbox.serve import serving

KEY = "luma-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
API = "/dream-machine/v1"
IMAGE = "https://example.com/first.jpg"


@dataclass
class Env:
    sim: LumaSimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, path: str = "/generations/video", **body: Any) -> httpx.Response:
        return await self.http.post(API + path, json={"model": "ray-2", "prompt": "a tiger in snow"} | body,
                                    headers=AUTH)

    async def get(self, gen_id: str) -> httpx.Response:
        return await self.http.get(f"{API}/generations/{gen_id}", headers=AUTH)

    async def wait(self, gen_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            body: dict[str, Any] = (await self.get(gen_id)).json()
            if body["state"] in ("completed", "failed"):
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("generation did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = LumaSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


class Receiver:
    """A callback endpoint that records what it is sent and answers ``statuses`` in turn (then 200)."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses = list(statuses)

        async def hook(request: Request) -> Response:
            self.bodies.append(await request.json())
            self.headers.append(dict(request.headers))
            return JSONResponse({}, status_code=self.statuses.pop(0) if self.statuses else 200)

        self.app = Starlette(routes=[Route("/hooks/luma/{job}", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5.0) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.bodies) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # give unexpected extras a chance to arrive


async def test_video_lifecycle_and_assets(env: Env) -> None:
    body: dict[str, Any] = {"prompt": "a tiger in snow [sim:run=0.5]", "aspect_ratio": "16:9", "resolution": "720p",
                            "duration": "5s", "loop": False,
                            "keyframes": {"frame0": {"type": "image", "url": IMAGE}},
                            "concepts": [{"key": "dolly_zoom"}]}
    r = await env.create(**body)
    assert r.status_code == 201, r.text
    gen = r.json()
    assert uuid.UUID(gen["id"]).version == 4
    assert gen["state"] == "queued" and gen["assets"] is None and gen["failure_reason"] is None
    assert gen["generation_type"] == "video" and gen["model"] == "ray-2"
    assert gen["request"] == {"model": "ray-2"} | body
    assert gen["created_at"].endswith("Z")

    state = "queued"
    while state == "queued":
        state = (await env.get(gen["id"])).json()["state"]
    assert state == "dreaming"
    done = await env.wait(gen["id"])
    assert done["state"] == "completed"
    video, thumb = done["assets"]["video"], done["assets"]["image"]
    assert video.startswith(env.base + "/dream_machine/") and video.endswith("_result.mp4")
    got = await env.http.get(video)
    assert got.status_code == 200 and got.headers["content-type"] == "video/mp4" and got.content[4:8] == b"ftyp"
    assert (await env.http.get(thumb)).content[:4] == b"\x89PNG"
    assert (await env.get(gen["id"])).json()["assets"]["video"] == video  # fixed per generation

    other = (await env.create(prompt="another tiger")).json()["id"]
    other_video = (await env.wait(other))["assets"]["video"]
    assert (await env.http.get(other_video)).content != got.content
    assert env.sim.stats.creations == 2


async def test_older_create_path_and_image_route(env: Env) -> None:
    r = await env.create("/generations", generation_type="video", model="ray-flash-2")
    assert r.status_code == 201 and r.json()["request"]["generation_type"] == "video"
    r = await env.create("/generations", generation_type="image")
    assert r.status_code == 400 and r.json() == {"detail": "Unknown request type"}

    img = await env.http.post(f"{API}/generations/image", headers=AUTH, json={
        "model": "photon-1", "prompt": "a teapot", "aspect_ratio": "1:1", "format": "png",
        "image_ref": [{"url": IMAGE, "weight": 0.8}]})
    assert img.status_code == 201, img.text
    done = await env.wait(img.json()["id"])
    assert done["generation_type"] == "image" and done["assets"]["video"] is None
    assert (await env.http.get(done["assets"]["image"])).content[:4] == b"\x89PNG"
    bad = await env.http.post(f"{API}/generations/image", headers=AUTH, json={"model": "ray-2", "prompt": "x y z"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "model"]


async def test_official_sdk_speaks_to_the_simulator(env: Env) -> None:
    lumaai = pytest.importorskip("lumaai", reason="the lumaai SDK is a dev dependency")
    client = lumaai.AsyncLumaAI(auth_token=KEY, base_url=env.base + API, max_retries=0)
    async with client:
        gen = await client.generations.create(model="ray-2", prompt="a tiger walking through fresh snow",
                                              aspect_ratio="16:9", resolution="720p", duration="5s",
                                              callback_url="https://atelier.example.com/hooks/luma/job_1?t=s")
        assert gen.state == "queued" and gen.id
        while gen.state not in ("completed", "failed"):
            await asyncio.sleep(0.05)
            assert gen.id is not None
            gen = await client.generations.get(gen.id)
        assert gen.state == "completed" and gen.assets is not None and gen.assets.video
        image = await client.generations.image.create(model="photon-flash-1", prompt="a teapot on a table")
        assert image.generation_type == "image"

        page = await client.generations.list(limit=1, offset=0)
        assert page.count == 1 and page.has_more is True and page.generations[0].id == image.id
        assert gen.id is not None
        await client.generations.delete(gen.id)
        with pytest.raises(lumaai.NotFoundError):
            await client.generations.get(gen.id)
        with pytest.raises(lumaai.BadRequestError):
            await client.generations.create(model="ray-2", prompt="no")
        with pytest.raises(lumaai.AuthenticationError):
            await lumaai.AsyncLumaAI(auth_token="wrong", base_url=env.base + API,
                                     max_retries=0).generations.get(image.id or "")


INVALID: list[tuple[dict[str, Any], int, str]] = [
    ({"prompt": None}, 400, "Prompt is required"),
    ({"prompt": "hi"}, 400, "too short"),
    ({"prompt": "x" * 5001}, 400, "too long"),
    ({"keyframes": {}}, 400, "No keyframes provided"),
    ({"keyframes": {"frame0": {"type": "image", "url": "ftp://example.com/a.jpg"}}}, 400, "image URL"),
    ({"loop": True, "keyframes": {"frame1": {"type": "image", "url": IMAGE}}}, 400, "end frame"),
    ({"keyframes": {"frame0": {"type": "generation", "id": str(uuid.uuid4())}}}, 400, "not found"),
    ({"model": "ray-3"}, 422, "model"),
    ({"model": None}, 422, "model"),
    ({"aspect_ratio": "2:1"}, 422, "aspect_ratio"),
    ({"duration": 5}, 422, "duration"),
    ({"duration": "10s"}, 422, "duration"),
    ({"resolution": "720"}, 422, "resolution"),
    ({"loop": "yes"}, 422, "loop"),
    ({"callback_url": "not a url"}, 422, "callback_url"),
    ({"keyframes": {"frame0": {"type": "video", "url": IMAGE}}}, 422, "keyframes"),
]


async def test_validation(env: Env) -> None:
    for body, status, detail in INVALID:
        r = await env.create(**body)
        assert r.status_code == status, (body, r.text)
        got = r.json()["detail"]
        if status == 400:
            assert isinstance(got, str) and detail in got, body
        else:  # FastAPI-style list: an adapter must read detail as a string or a list
            assert isinstance(got, list) and got[0]["loc"][1] == detail and got[0]["msg"], body
    assert env.sim.stats.creations == 0
    env.sim.config.extra["resolutions"] = {"ray-flash-2": ["540p", "720p"]}
    assert (await env.create(model="ray-flash-2", resolution="4k")).status_code == 422
    assert (await env.create(model="ray-2", resolution="4k")).status_code == 201


async def test_extend_reverse_and_interpolate_need_completed_videos(env: Env) -> None:
    first = (await env.create(prompt="a tiger walks")).json()["id"]
    early = await env.create(keyframes={"frame0": {"type": "generation", "id": first}})
    assert early.status_code == 400 and "not a completed video" in early.json()["detail"]
    await env.wait(first)

    extend = await env.create(prompt="the tiger runs", keyframes={"frame0": {"type": "generation", "id": first}})
    assert extend.status_code == 201, extend.text
    assert extend.json()["request"]["keyframes"]["frame0"] == {"type": "generation", "id": first}
    second = (await env.wait(extend.json()["id"]))["id"]

    ok: list[dict[str, Any]] = [
        {"keyframes": {"frame1": {"type": "generation", "id": first}}},
        {"keyframes": {"frame0": {"type": "generation", "id": first}, "frame1": {"type": "generation", "id": second}}},
        {"keyframes": {"frame0": {"type": "generation", "id": first}, "frame1": {"type": "image", "url": IMAGE}}},
        {"prompt": None, "keyframes": {"frame0": {"type": "generation", "id": first}}},
    ]
    for body in ok:
        assert (await env.create(**body)).status_code == 201, body
    refused: list[tuple[dict[str, Any], str]] = [
        ({"loop": True, "keyframes": {"frame0": {"type": "generation", "id": first}}}, "for extend"),
        ({"loop": True, "keyframes": {"frame1": {"type": "generation", "id": first}}}, "extend-reverse"),
        ({"loop": True, "keyframes": {"frame0": {"type": "generation", "id": first},
                                      "frame1": {"type": "generation", "id": second}}}, "interpolation"),
    ]
    for body, detail in refused:
        r = await env.create(**body)
        assert r.status_code == 400 and detail in r.json()["detail"], body

    image = await env.http.post(f"{API}/generations/image", headers=AUTH,
                                json={"model": "photon-1", "prompt": "a still"})
    await env.wait(image.json()["id"])
    r = await env.create(keyframes={"frame0": {"type": "generation", "id": image.json()["id"]}})
    assert r.status_code == 400


async def test_asynchronous_failures_and_moderation(env: Env) -> None:
    env.sim.config.extra["blacklisted_words"] = ["forbidden"]
    cases = {
        "x [sim:moderation]": "Frame moderation failed",
        "a forbidden scene": "Contains blacklisted words",
        "x [sim:blacklisted]": "Contains blacklisted words",
        "x [sim:fail=Failed to read user input frames]": "Failed to read user input frames",
    }
    ids = {}
    for prompt in cases:
        r = await env.create(prompt=prompt)
        assert r.status_code == 201  # moderation is never a 4xx at create
        ids[prompt] = r.json()["id"]
    for prompt, reason in cases.items():
        done = await env.wait(ids[prompt])
        assert done["state"] == "failed" and done["failure_reason"] == reason and done["assets"] is None
    generic = await env.wait((await env.create(prompt="x [sim:fail]")).json()["id"])
    assert generic["failure_reason"]

    no_video = await env.wait((await env.create(prompt="x [sim:no_video]")).json()["id"])
    assert no_video["state"] == "completed" and no_video["assets"]["video"] is None


async def test_callbacks_on_each_state(env: Env) -> None:
    rx = Receiver()
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/hooks/luma/job_123?t=secret"
        gen = (await env.create(callback_url=url)).json()
        await rx.wait_for(2)
        assert [b["state"] for b in rx.bodies] == ["dreaming", "completed"]
        final = rx.bodies[-1]
        assert final["id"] == gen["id"] and final["request"]["callback_url"] == url
        assert final["assets"]["video"].startswith(env.base)
        assert final == (await env.get(gen["id"])).json()  # the same object as GET
        assert not any("signature" in k for k in rx.headers[-1])

        rx.bodies.clear()
        await env.create(prompt="x [sim:moderation]", callback_url=url)
        await rx.wait_for(2)
        assert [b["state"] for b in rx.bodies] == ["dreaming", "failed"]
        assert rx.bodies[-1]["failure_reason"] == "Frame moderation failed"

        rx.bodies.clear()
        await env.create(prompt="x [sim:callback=duplicate]", callback_url=url)
        await rx.wait_for(4)
        assert [b["state"] for b in rx.bodies] == ["dreaming", "dreaming", "completed", "completed"]

        # A generation deleted while queued sends nothing more.
        rx.bodies.clear()
        gone = (await env.create(prompt="x [sim:queue=0.3]", callback_url=url)).json()["id"]
        assert (await env.http.delete(f"{API}/generations/{gone}", headers=AUTH)).status_code == 204
        await asyncio.sleep(0.7)
        assert rx.bodies == []


async def test_callback_retries_until_200(env: Env) -> None:
    rx = Receiver(statuses=(500, 204, 500))
    async with serving(rx.app) as rx_base:
        gen = (await env.create(callback_url=f"{rx_base}/hooks/luma/job_9")).json()["id"]
        await rx.wait_for(5)
        assert [b["state"] for b in rx.bodies] == ["dreaming"] * 4 + ["completed"]
        attempts = [e["attempt"] for e in env.sim.callback_log if e["id"] == gen]
        assert attempts == [1, 2, 3, 4, 1]

        env.sim.config.extra["callback_retries"] = 1
        rx.bodies.clear()
        rx.statuses = [500] * 10
        await env.create(callback_url=f"{rx_base}/hooks/luma/job_10")
        await rx.wait_for(4)
        assert len(rx.bodies) == 4  # two tries for each state, then Luma gives up


async def test_rate_limits_and_injected_429(env: Env) -> None:
    env.sim.config.extra["concurrency"] = {"video": 1}
    assert (await env.create()).status_code == 201
    r = await env.create()
    assert r.status_code == 429 and "concurrent" in r.json()["detail"] and "retry-after" not in r.headers
    image = await env.http.post(f"{API}/generations/image", headers=AUTH, json={"model": "photon-1",
                                                                                 "prompt": "a teapot"})
    assert image.status_code == 201  # image models have their own limits

    env.sim.config.extra.update(concurrency={}, creates_per_minute={"video": 2}, retry_after=30)
    r = await env.create()
    assert r.status_code == 201
    r = await env.create()
    assert r.status_code == 429 and "per minute" in r.json()["detail"] and r.headers["retry-after"] == "30"
    env.sim.config.extra["creates_per_minute"] = {}

    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 2}])
    r = await env.create()
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and isinstance(r.json()["detail"], str)
    assert (await env.create()).status_code == 201
    assert env.sim.stats.creations == 4


async def test_list_paging_newest_first_and_reconcile_by_callback_url(env: Env) -> None:
    ids = [(await env.create(prompt=f"clip {i}", callback_url=f"https://a.example/hooks/luma/job_{i}?t=s"))
           .json()["id"] for i in range(5)]
    first = (await env.http.get(f"{API}/generations", params={"limit": 2}, headers=AUTH)).json()
    assert [g["id"] for g in first["generations"]] == ids[::-1][:2]
    assert first["count"] == 2 and first["has_more"] is True and first["limit"] == 2 and first["offset"] == 0
    last = (await env.http.get(f"{API}/generations", params={"limit": 2, "offset": 4}, headers=AUTH)).json()
    assert [g["id"] for g in last["generations"]] == [ids[0]] and last["has_more"] is False
    bad = await env.http.get(f"{API}/generations", params={"limit": 0}, headers=AUTH)
    assert bad.status_code == 422

    # A create whose answer was lost: the generation exists and is found by its echoed callback_url.
    await env.http.post("/_sim/faults", json=[{"kind": "504", "route": "create", "after_effect": True}])
    lost = await env.create(prompt="clip lost", callback_url="https://a.example/hooks/luma/job_lost?t=s")
    assert lost.status_code == 504
    listing = (await env.http.get(f"{API}/generations", params={"limit": 10}, headers=AUTH)).json()
    found = [g for g in listing["generations"] if g["request"]["callback_url"].split("?")[0].endswith("/job_lost")]
    assert len(found) == 1 and env.sim.stats.creations == 6

    env.sim.config.extra["list_order"] = "oldest"
    oldest = (await env.http.get(f"{API}/generations", params={"limit": 1}, headers=AUTH)).json()
    assert oldest["generations"][0]["id"] == ids[0]


async def test_delete(env: Env) -> None:
    gen_id = (await env.create()).json()["id"]
    video = (await env.wait(gen_id))["assets"]["video"]
    r = await env.http.delete(f"{API}/generations/{gen_id}", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert (await env.get(gen_id)).status_code == 404
    assert (await env.http.delete(f"{API}/generations/{gen_id}", headers=AUTH)).status_code == 404
    assert (await env.http.get(video)).status_code == 404
    listing = (await env.http.get(f"{API}/generations", headers=AUTH)).json()
    assert listing["generations"] == [] and listing["has_more"] is False
    r = await env.create(keyframes={"frame0": {"type": "generation", "id": gen_id}})
    assert r.status_code == 400 and "not found" in r.json()["detail"]


async def test_assets_expire(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    gen_id = (await env.create()).json()["id"]
    video = (await env.wait(gen_id))["assets"]["video"]
    assert (await env.http.get(video)).status_code == 200
    await asyncio.sleep(0.45)
    assert (await env.http.get(video)).status_code == 404
    assert (await env.get(gen_id)).json()["assets"]["video"] == video  # the dead URL is still shown

    env.sim.config.output_ttl_seconds = 3600
    fresh = (await env.wait((await env.create()).json()["id"]))["assets"]["video"]
    assert (await env.http.get(fresh)).status_code == 200
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(fresh)).status_code == 404


async def test_credits_charge_completed_generations_only(env: Env) -> None:
    env.sim.config.extra.update(credit_balance=250, prices={"video": 100, "image": 2})
    assert (await env.http.get(f"{API}/credits", headers=AUTH)).json() == {"credit_balance": 250}
    ok = (await env.create()).json()["id"]
    failed = (await env.create(prompt="x [sim:moderation]")).json()["id"]
    r = await env.create()
    assert r.status_code == 400 and "credits" in r.json()["detail"]  # 2 x 100 held by active ones
    await env.wait(ok)
    await env.wait(failed)
    assert (await env.http.get(f"{API}/credits", headers=AUTH)).json() == {"credit_balance": 150}
    env.sim.config.extra["low_balance_status"] = 402
    await env.create()
    assert (await env.create()).status_code == 402


async def test_auth_and_unknown_routes(env: Env) -> None:
    r = await env.http.post(f"{API}/generations/video", json={"model": "ray-2", "prompt": "abc"})
    assert r.status_code == 401 and r.json()["detail"]
    r = await env.http.get(f"{API}/generations", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert (await env.get(str(uuid.uuid4()))).status_code == 404
    r = await env.http.get(f"{API}/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = await env.http.post(f"{API}/generations/video", content=b"{not json", headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert env.sim.stats.creations == 0
