"""The Suno simulators, driven over real HTTP the way the documented clients call them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.suno import SunoApiSimulator, SunoGatewaySimulator

KEY = "sk-testkey"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = b"\x89PNG\r\n\x1a\n"


def is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def config(**extra: Any) -> SimConfig:
    base: dict[str, Any] = {"gateway_tick_seconds": 0.1}
    base.update(extra)
    return SimConfig(queue_seconds=0.2, run_seconds=0.3, api_keys=[KEY, "sk-other"], extra=base)


async def until(fn: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 5.0) -> Any:
    deadline = time.time() + within
    while True:
        value = await fn()
        if ok(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        await asyncio.sleep(0.03)


# ---------------------------------------------------------------------------
# new-api gateway
# ---------------------------------------------------------------------------


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[SunoGatewaySimulator, httpx.AsyncClient]]:
    sim = SunoGatewaySimulator(config())
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield sim, client


async def submit_music(client: httpx.AsyncClient, prompt: str = "[Verse] city lights", **kw: Any) -> str:
    body = {"prompt": prompt, "tags": "synthpop", "title": "City Lights", "mv": "chirp-v3-5", **kw}
    resp = await client.post("/suno/submit/music", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["code"] == "success" and out["message"] == ""
    return str(out["data"])


async def fetch(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/suno/fetch/{task_id}")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == "success"
    return dict(body["data"])


async def test_gateway_music_succeeds_with_real_media(gateway: Any) -> None:
    sim, client = gateway
    task_id = await submit_music(client)
    assert re.fullmatch(r"task_[A-Za-z0-9]{32}", task_id)
    first = await fetch(client, task_id)
    assert first["status"] == "NOT_START" and first["progress"] == "0%" and first["data"] is None
    assert first["platform"] == "suno" and first["action"] == "MUSIC" and first["task_id"] == task_id
    seen: list[str] = []

    async def poll() -> dict[str, Any]:
        dto = await fetch(client, task_id)
        if not seen or seen[-1] != dto["status"]:
            seen.append(dto["status"])
        return dto

    done = await until(poll, lambda d: d["status"] in ("SUCCESS", "FAILURE"))
    order = ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "SUCCESS"
    assert done["progress"] == "100%" and done["fail_reason"] == "" and "result_url" not in done
    assert done["finish_time"] >= done["start_time"] > 0
    clips = done["data"]
    assert len(clips) == 2 and len({c["id"] for c in clips}) == 2
    blobs = []
    for clip in clips:
        assert clip["status"] == "complete" and clip["title"] == "City Lights"
        assert clip["metadata"]["duration"] > 0 and clip["metadata"]["tags"] == "synthpop"
        audio = await client.get(clip["audio_url"])
        assert audio.status_code == 200 and is_mp3(audio.content)
        assert audio.headers["content-type"] == "audio/mpeg"
        image = await client.get(clip["image_url"])
        assert image.status_code == 200 and image.content.startswith(PNG)
        blobs.append(audio.content)
    assert blobs[0] != blobs[1]


async def test_gateway_holds_not_start_until_its_tick() -> None:
    sim = SunoGatewaySimulator(config(gateway_tick_seconds=1.0))
    sim.config.queue_seconds, sim.config.run_seconds = 0.0, 0.05
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = await submit_music(client)
        task = sim.tasks[task_id]
        first_tick = sim.tick_time(sim.first_tick_after(task.created_at))
        if first_tick - time.time() < 0.4:  # too close to a tick: use the next task instead
            await asyncio.sleep(max(0.0, first_tick - time.time()) + 0.01)
            task_id = await submit_music(client)
            task = sim.tasks[task_id]
            first_tick = sim.tick_time(sim.first_tick_after(task.created_at))
        await asyncio.sleep(max(0.0, first_tick - time.time() - 0.25))
        assert task.phase() == "done"  # the upstream has finished ...
        dto = await fetch(client, task_id)
        assert dto["status"] == "NOT_START"  # ... but the gateway has not polled it yet
        await asyncio.sleep(max(0.0, first_tick - time.time()) + 0.01)
        dto = await fetch(client, task_id)
        assert dto["status"] == "SUCCESS" and dto["progress"] == "100%"
        assert dto["updated_at"] == int(first_tick)


async def test_gateway_batch_fetch_own_tasks_in_row_order(gateway: Any) -> None:
    sim, client = gateway
    a = await submit_music(client, "first song")
    b = await submit_music(client, "second song")
    other = await client.post("/suno/submit/music", json={"prompt": "x"},
                              headers={"Authorization": "Bearer sk-other"})
    foreign = other.json()["data"]
    resp = await client.post("/suno/fetch", json={"ids": [b, "task_missing", foreign, a], "action": "MUSIC"})
    body = resp.json()
    assert resp.status_code == 200 and body["code"] == "success"
    assert [t["task_id"] for t in body["data"]] == [a, b]
    empty = await client.post("/suno/fetch", json={"ids": []})
    assert empty.json() == {"code": "success", "message": "", "data": []}
    bad = await client.post("/suno/fetch", content=b"not json")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
    mine = await client.get(f"/suno/fetch/{foreign}")
    assert mine.status_code == 400
    assert mine.json() == {"code": "task_not_exist", "message": "task_not_exist", "data": None}


async def test_gateway_lyrics_and_validation(gateway: Any) -> None:
    sim, client = gateway
    bad_action = await client.post("/suno/submit/video", json={"prompt": "x"})
    assert bad_action.status_code == 400
    assert bad_action.json() == {"code": "invalid_request", "message": "invalid_action", "data": None}
    empty = await client.post("/suno/submit/lyrics", json={"prompt": ""})
    assert empty.status_code == 400 and empty.json()["message"] == "prompt_empty"
    resp = await client.post("/suno/submit/lyrics", json={"prompt": "a song about rain"})
    task_id = resp.json()["data"]
    done = await until(lambda: fetch(client, task_id), lambda d: d["status"] == "SUCCESS")
    assert done["action"] == "LYRICS" and done["progress"] == "100%"
    assert done["data"]["status"] == "complete" and done["data"]["text"]


async def test_gateway_failure_puts_reason_in_result_url(gateway: Any) -> None:
    sim, client = gateway
    task_id = await submit_music(client, "doomed [sim:fail]")
    done = await until(lambda: fetch(client, task_id), lambda d: d["status"] in ("SUCCESS", "FAILURE"))
    assert done["status"] == "FAILURE" and done["progress"] == "100%"
    assert done["fail_reason"] and done["result_url"] == done["fail_reason"]
    assert all(c["status"] == "error" and c["metadata"]["error_message"] for c in done["data"])
    partial_id = await submit_music(client, "half [sim:partial]")
    part = await until(lambda: fetch(client, partial_id), lambda d: d["status"] in ("SUCCESS", "FAILURE"))
    assert part["status"] == "FAILURE"
    assert [c["status"] for c in part["data"]] == ["complete", "error"]
    assert is_mp3((await client.get(part["data"][0]["audio_url"])).content)


async def test_gateway_streaming_clip_is_partial(gateway: Any) -> None:
    sim, client = gateway
    task_id = await submit_music(client, "slow [sim:run=3]")
    dto = await until(lambda: fetch(client, task_id), lambda d: d["status"] == "IN_PROGRESS")
    clip = dto["data"][0]
    assert clip["status"] == "streaming" and "/audiopipe/" in clip["audio_url"]
    assert dto["progress"] == "0%"
    partial = await client.get(clip["audio_url"])
    assert partial.status_code == 200 and is_mp3(partial.content)


async def test_gateway_timeout_sweep_keeps_stale_data() -> None:
    sim = SunoGatewaySimulator(config(gateway_task_timeout_seconds=0.6))
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        stuck = await submit_music(client, "forever [sim:stuck]")
        lost = await submit_music(client, "gone [sim:lost]")
        unknown = await submit_music(client, "odd [sim:unknown]")
        running = await until(lambda: fetch(client, unknown), lambda d: d["status"] != "NOT_START")
        assert running["status"] in ("SUBMITTED", "QUEUED", "UNKNOWN")
        for task_id in (stuck, lost, unknown):
            dto = await until(partial(fetch, client, task_id), lambda d: d["status"] == "FAILURE", 3)
            assert dto["progress"] == "100%" and dto["fail_reason"].startswith("任务超时")
            assert dto["result_url"] == dto["fail_reason"]
            if task_id == lost:
                assert dto["data"] is None
            else:  # the raw upstream data still says the clips are streaming
                assert {c["status"] for c in dto["data"]} == {"streaming"}


async def test_gateway_auth_rejections(gateway: Any) -> None:
    sim, client = gateway
    url = str(client.base_url)
    async with httpx.AsyncClient(base_url=url) as anon:
        missing = await anon.post("/suno/submit/music", json={"prompt": "x"})
        assert missing.status_code == 401
        err = missing.json()["error"]
        assert err["type"] == "new_api_error" and err["message"]
        wrong = await anon.get("/suno/fetch/task_x", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "new_api_error"
        # new-api strips "sk-" and a "-<channel id>" suffix; a bare key works too.
        ok = await anon.post("/suno/submit/music", json={"prompt": "x"},
                             headers={"Authorization": f"{KEY}-7"})
        assert ok.status_code == 200 and ok.json()["code"] == "success"


async def test_gateway_faults_and_traps(gateway: Any) -> None:
    sim, client = gateway
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "submit", "retry_after": 3}])
    throttled = await client.post("/suno/submit/music", json={"prompt": "x"})
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "3"
    assert throttled.json()["message"] == "当前分组上游负载已饱和，请稍后再试"
    await client.post("/_sim/faults", json=[{"kind": "502", "route": "fetch"}])
    bad = await client.get("/suno/fetch/task_any")
    assert bad.status_code == 502 and bad.json()["data"] is None
    saturated = await client.post("/suno/submit/music", json={"prompt": "x [sim:saturated]"})
    assert saturated.status_code == 429 and saturated.json()["code"] == "fail_to_fetch_task"
    rejected = await client.post("/suno/submit/music", json={"prompt": "x [sim:rejected]"})
    assert rejected.status_code == 500 and "internal_error" in rejected.json()["message"]
    assert (await client.get("/_sim/stats")).json()["creations"] == 0
    # Ambiguous outcome: the task exists although the client saw a 500.
    await client.post("/_sim/faults", json=[{"kind": "500", "route": "submit", "after_effect": True}])
    ambiguous = await client.post("/suno/submit/music", json={"prompt": "y"})
    assert ambiguous.status_code == 500
    assert (await client.get("/_sim/stats")).json()["creations"] == 1


async def test_gateway_output_urls_expire() -> None:
    sim = SunoGatewaySimulator(config())
    sim.config.output_ttl_seconds = 0.5
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = await submit_music(client)
        done = await until(lambda: fetch(client, task_id), lambda d: d["status"] == "SUCCESS")
        audio_url = done["data"][0]["audio_url"]
        assert (await client.get(audio_url)).status_code == 200
        await asyncio.sleep(0.6)
        assert (await client.get(audio_url)).status_code == 404


async def test_gateway_legacy_upstream_ids() -> None:
    sim = SunoGatewaySimulator(config(public_task_ids=False))
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = await submit_music(client)
        assert re.fullmatch(r"[0-9a-f-]{36}", task_id)
        assert (await fetch(client, task_id))["task_id"] == task_id


# ---------------------------------------------------------------------------
# sunoapi.org
# ---------------------------------------------------------------------------


class Receiver:
    """A tiny callback receiver; ``fail_first`` answers 500 that many times."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hits = 0
        self.fail_first = fail_first
        self.app = Starlette(routes=[Route("/cb", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        self.hits += 1
        if self.hits <= self.fail_first:
            return Response(status_code=500)
        self.bodies.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})


@pytest.fixture
async def sunoapi() -> AsyncIterator[tuple[SunoApiSimulator, httpx.AsyncClient]]:
    sim = SunoApiSimulator(config())
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield sim, client
    await sim.shutdown()


def generate_body(prompt: str = "A calm piano track", **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "customMode": False, "instrumental": False, "model": "V4_5", **kw}


async def record(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get("/api/v1/generate/record-info", params={"taskId": task_id})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == 200, body
    return dict(body["data"])


async def test_sunoapi_success_with_staged_callbacks(sunoapi: Any) -> None:
    sim, client = sunoapi
    receiver = Receiver()
    async with serving(receiver.app) as cb:
        resp = await client.post("/api/v1/generate", json=generate_body(callBackUrl=f"{cb}/cb"))
        body = resp.json()
        assert resp.status_code == 200 and body["code"] == 200 and body["msg"] == "success"
        task_id = body["data"]["taskId"]
        seen: list[str] = []

        async def poll() -> dict[str, Any]:
            data = await record(client, task_id)
            if not seen or seen[-1] != data["status"]:
                seen.append(data["status"])
            return data

        done = await until(poll, lambda d: d["status"] not in ("PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS"))
        order = ["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"]
        assert seen[0] == "PENDING" and seen[-1] == "SUCCESS" and seen == sorted(seen, key=order.index)
        assert isinstance(done["param"], str) and json.loads(done["param"])["model"] == "V4_5"
        assert done["errorCode"] is None and done["response"]["taskId"] == task_id
        clips = done["response"]["sunoData"]
        assert len(clips) == 2
        for clip in clips:
            audio = await client.get(clip["audioUrl"])
            assert audio.status_code == 200 and is_mp3(audio.content)
            assert (await client.get(clip["imageUrl"])).content.startswith(PNG)
            assert clip["duration"] > 0 and clip["title"] and clip["modelName"]
        await until(lambda: asyncio.sleep(0, len(receiver.bodies)), lambda n: n >= 3)
    kinds = [b["data"]["callbackType"] for b in receiver.bodies]
    assert kinds == ["text", "first", "complete"]
    assert all(b["code"] == 200 and b["data"]["task_id"] == task_id for b in receiver.bodies)
    assert receiver.bodies[0]["data"]["data"] == []
    first = receiver.bodies[1]["data"]["data"]
    assert first[0]["audio_url"] and not first[1]["audio_url"]
    complete = receiver.bodies[2]["data"]["data"]
    assert {c["id"] for c in complete} == {c["id"] for c in clips}
    assert is_mp3((await client.get(complete[1]["audio_url"])).content)


async def test_sunoapi_failures_and_error_callback(sunoapi: Any) -> None:
    sim, client = sunoapi
    receiver = Receiver()
    async with serving(receiver.app) as cb:
        expected = {"fail": ("GENERATE_AUDIO_FAILED", 501), "sensitive": ("SENSITIVE_WORD_ERROR", 400),
                    "create_failed": ("CREATE_TASK_FAILED", 500)}
        ids = {}
        for trap in expected:
            resp = await client.post("/api/v1/generate",
                                     json=generate_body(f"song [sim:{trap}]", callBackUrl=f"{cb}/cb"))
            ids[trap] = resp.json()["data"]["taskId"]
        for trap, (status, code) in expected.items():
            data = await until(partial(record, client, ids[trap]),
                               lambda d: d["status"] not in ("PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS"))
            assert data["status"] == status and data["errorCode"] == code and data["errorMessage"]
        await until(lambda: asyncio.sleep(0, [b for b in receiver.bodies
                                              if b["data"]["callbackType"] == "error"]),
                    lambda errs: len(errs) == 3)
    errors = {b["data"]["task_id"]: b for b in receiver.bodies if b["data"]["callbackType"] == "error"}
    for trap, (_, code) in expected.items():
        assert errors[ids[trap]]["code"] == code


async def test_sunoapi_validation_and_business_codes(sunoapi: Any) -> None:
    sim, client = sunoapi
    cases = [
        ({"prompt": "x", "model": "V4_5", "instrumental": False}, 400),
        (generate_body(customMode=True, title="t"), 400),
        (generate_body("x" * 501), 413),
        (generate_body(model="V9"), 400),
        (generate_body("x [sim:credits]"), 429),
        (generate_body("x [sim:maintenance]"), 455),
        (generate_body("x [sim:frequency]"), 430),
    ]
    for body, code in cases:
        resp = await client.post("/api/v1/generate", json=body)
        assert resp.status_code == 200, body
        assert resp.json()["code"] == code and resp.json()["msg"], body
    custom = generate_body("[Verse] la", customMode=True, style="Classical", title="Peace")
    assert (await client.post("/api/v1/generate", json=custom)).json()["code"] == 200
    instrumental = generate_body("", customMode=True, instrumental=True, style="Ambient", title="Calm")
    assert (await client.post("/api/v1/generate", json=instrumental)).json()["code"] == 200
    sim.config.extra["http_status_mirrors_code"] = True
    mirrored = await client.post("/api/v1/generate", json=generate_body("x" * 501))
    assert mirrored.status_code == 413 and mirrored.json()["code"] == 413
    assert (await client.get("/_sim/stats")).json()["creations"] == 2


async def test_sunoapi_credits_and_rate_limit(sunoapi: Any) -> None:
    sim, client = sunoapi
    sim.config.extra.update(credits=24, credit_cost=12)
    assert (await client.get("/api/v1/generate/credit")).json()["data"] == 24
    codes = [(await client.post("/api/v1/generate", json=generate_body(f"s{i}"))).json()["code"]
             for i in range(3)]
    assert codes == [200, 200, 429]
    assert (await client.get("/api/v1/generate/credit")).json()["data"] == 0
    sim.config.extra.update(credits=None, rate_limit_per_10s=2)
    codes = [(await client.post("/api/v1/generate", json=generate_body(f"r{i}"))).json()["code"]
             for i in range(3)]
    assert codes == [200, 200, 430]


async def test_sunoapi_auth_and_unknown_task(sunoapi: Any) -> None:
    sim, client = sunoapi
    resp = await client.get("/api/v1/generate/record-info", params={"taskId": "nope"},
                            headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 200 and resp.json()["code"] == 401
    missing = await client.post("/api/v1/generate", json=generate_body(), headers={"Authorization": ""})
    assert missing.json()["code"] == 401
    unknown = await client.get("/api/v1/generate/record-info", params={"taskId": "nope"})
    assert unknown.json()["code"] == 400


async def test_sunoapi_fault_injection(sunoapi: Any) -> None:
    sim, client = sunoapi
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "generate", "retry_after": 2},
                                            {"kind": "503", "route": "record_info"}])
    throttled = await client.post("/api/v1/generate", json=generate_body())
    assert throttled.status_code == 429 and throttled.json()["code"] == 430
    assert throttled.headers["retry-after"] == "2"
    down = await client.get("/api/v1/generate/record-info", params={"taskId": "x"})
    assert down.status_code == 503 and down.json()["code"] == 455
    await client.post("/_sim/faults", json=[{"kind": "malformed", "route": "generate"}])
    malformed = await client.post("/api/v1/generate", json=generate_body())
    with pytest.raises(ValueError):
        malformed.json()
    assert (await client.get("/_sim/stats")).json()["creations"] == 0


async def test_sunoapi_callback_retries_and_callback_exception(sunoapi: Any) -> None:
    sim, client = sunoapi
    sim.config.extra["callback_retry_delays"] = [0.05, 0.05]
    receiver = Receiver(fail_first=1)
    async with serving(receiver.app) as cb:
        resp = await client.post("/api/v1/generate", json=generate_body(callBackUrl=f"{cb}/cb"))
        task_id = resp.json()["data"]["taskId"]
        await until(lambda: asyncio.sleep(0, len(receiver.bodies)), lambda n: n >= 3)
    assert receiver.hits == 4  # the first text callback was retried once
    assert [b["data"]["callbackType"] for b in receiver.bodies] == ["text", "first", "complete"]
    assert (await record(client, task_id))["status"] == "SUCCESS"
    # Nobody listening, and the option on: the task ends CALLBACK_EXCEPTION with its songs.
    sim.config.extra["callback_exception_on_failure"] = True
    resp = await client.post("/api/v1/generate",
                             json=generate_body("z", callBackUrl="http://127.0.0.1:9/cb"))
    lost_id = resp.json()["data"]["taskId"]
    data = await until(lambda: record(client, lost_id), lambda d: d["status"] == "CALLBACK_EXCEPTION", 6)
    assert len(data["response"]["sunoData"]) == 2
    trap = await client.post("/api/v1/generate", json=generate_body("w [sim:callback_exception]"))
    trapped = await until(lambda: record(client, trap.json()["data"]["taskId"]),
                          lambda d: d["status"] not in ("PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS"))
    assert trapped["status"] == "CALLBACK_EXCEPTION"


async def test_sunoapi_output_urls_expire(sunoapi: Any) -> None:
    sim, client = sunoapi
    sim.config.output_ttl_seconds = 0.4
    resp = await client.post("/api/v1/generate", json=generate_body())
    task_id = resp.json()["data"]["taskId"]
    done = await until(lambda: record(client, task_id), lambda d: d["status"] == "SUCCESS")
    url = done["response"]["sunoData"][0]["audioUrl"]
    assert (await client.get(url)).status_code == 200
    await asyncio.sleep(0.5)
    assert (await client.get(url)).status_code == 404
