"""The new-api unified video simulator, driven over real HTTP like a client of the gateway.

No official SDK exists for ``/v1/video/generations``, so httpx speaks it.
"""

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
from providers.sandbox.newapi_video import ENVELOPES, NewApiVideoSimulator
from providers.sandbox.serve import serving

KEY = "sk-videokey"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN = "/v1/video/generations"

# model -> (platform, where the family's raw upstream body keeps the video URL)
MODELS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "kling-v2-1": ("50", lambda d: d["data"]["task_result"]["videos"][0]["url"]),
    "MiniMax-Hailuo-02": ("35", lambda d: None),  # MiniMax's query body has a file_id only
    "doubao-seedance-1-0-pro": ("54", lambda d: d["content"]["video_url"]),
    "wan2.2-t2v-plus": ("17", lambda d: d["output"]["video_url"]),
    "viduq1": ("52", lambda d: d["creations"][0]["url"]),
    "jimeng_vgfm_t2v_l20": ("51", lambda d: d["data"]["video_url"]),
    "grok-imagine-video": ("48", lambda d: d["video"]["url"]),
    "veo3.1": ("24", lambda d: d["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]),
    "some-new-model": ("1", lambda d: d["video_url"]),
}


DONE = {"SUCCESS", "FAILURE", "succeeded", "failed", "completed"}


def is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def make_sim(**extra: Any) -> NewApiVideoSimulator:
    cfg: dict[str, Any] = {"gateway_tick_seconds": 0.05}
    cfg.update(extra)
    return NewApiVideoSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, api_keys=[KEY, "sk-neighbour"],
                                          extra=cfg))


@pytest.fixture
async def gw() -> AsyncIterator[tuple[NewApiVideoSimulator, httpx.AsyncClient]]:
    sim = make_sim()
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
        yield sim, client


async def until(fn: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 5.0) -> Any:
    deadline = time.time() + within
    while True:
        value = await fn()
        if ok(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        await asyncio.sleep(0.02)


async def submit(client: httpx.AsyncClient, model: str = "kling-v2-1", prompt: str = "a koi pond in rain",
                 **kw: Any) -> str:
    resp = await client.post(GEN, json={"model": model, "prompt": prompt, **kw})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return str(body.get("id") or body["task_id"])


async def get(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"{GEN}/{task_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def dto(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    body = await get(client, task_id)
    assert body["code"] == "success" and body["message"] == ""
    return dict(body["data"])


async def finished(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return dict(await until(lambda: dto(client, task_id), lambda d: d["status"] in DONE))


def status_of(body: dict[str, Any], envelope: str) -> str:
    if envelope in ("task_dto", "legacy_dto", "realtime"):
        return str(body["data"]["status"])
    return str(body["status"])


def media_of(body: dict[str, Any], envelope: str) -> Any:
    """Where each envelope keeps the video: result_url, url, video_url, metadata.url or raw data."""
    return {
        "task_dto": lambda: body["data"]["result_url"],
        "legacy_dto": lambda: body["data"]["data"]["data"]["task_result"]["videos"][0]["url"],
        "realtime": lambda: body["data"]["url"],
        "openapi_doc": lambda: body["url"],
        "sora_doc": lambda: body["video_url"],
        "openai_video": lambda: body["metadata"]["url"],
    }[envelope]()


async def test_submit_and_task_dto_lifecycle(gw: Any) -> None:
    sim, client = gw
    resp = await client.post(GEN, json={"model": "kling-v2-1", "prompt": "a koi pond", "duration": "10",
                                        "size": "1280x720", "metadata": {"mode": "pro", "model": "cheap"}})
    created = resp.json()
    assert re.fullmatch(r"task_[A-Za-z0-9]{32}", created["id"]) and created["task_id"] == created["id"]
    assert created["object"] == "video" and created["status"] == "queued" and created["progress"] == 0
    assert json.loads(resp.headers["x-new-api-other-ratios"]) == {"seconds": 10}
    seen: list[str] = []

    async def poll() -> dict[str, Any]:
        row = await dto(client, created["id"])
        if not seen or seen[-1] != row["status"]:
            seen.append(row["status"])
        return row

    done = await until(poll, lambda d: d["status"] in DONE)
    order = ["NOT_START", "SUBMITTED", "IN_PROGRESS", "SUCCESS"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "SUCCESS"
    assert done["platform"] == "50" and done["progress"] == "100%" and done["fail_reason"] == ""
    assert done["action"] == "textGenerate" and done["properties"]["origin_model_name"] == "kling-v2-1"
    assert done["finish_time"] >= done["start_time"] >= done["submit_time"] > 0  # seconds
    assert done["data"]["data"]["task_status"] == "succeed"
    assert done["data"]["data"]["task_result"]["videos"][0] == {
        "id": done["data"]["data"]["task_result"]["videos"][0]["id"], "url": done["result_url"], "duration": "10"}
    video = await client.get(done["result_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and is_mp4(video.content)
    assert sim.tasks[created["id"]].data["metadata"] == {"mode": "pro"}  # metadata.model is dropped


async def test_every_model_is_routed_with_its_raw_upstream_body(gw: Any) -> None:
    sim, client = gw
    ids = {model: await submit(client, model, image="https://example.com/first.png") for model in MODELS}
    sim.config.extra["envelope"] = "task_dto"  # also Veo, which "auto" answers in real time
    for model, task_id in ids.items():
        platform, raw_url = MODELS[model]
        done = await finished(client, task_id)
        assert done["status"] == "SUCCESS" and done["platform"] == platform and done["action"] == "generate"
        if model == "MiniMax-Hailuo-02":
            assert done["data"]["status"] == "Success" and done["data"]["file_id"]
        else:
            assert raw_url(done["data"]) == done["result_url"], model
        assert is_mp4((await client.get(done["result_url"])).content)
    contents = {(await client.get((await dto(client, t))["result_url"])).content for t in ids.values()}
    assert len(contents) == len(MODELS)  # distinct bytes per task
    assert (await client.get("/_sim/stats")).json()["creations"] == len(MODELS)


@pytest.mark.parametrize("envelope", ENVELOPES)
async def test_each_envelope_exposes_the_media(envelope: str) -> None:
    sim = make_sim(envelope=envelope)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        resp = await client.post(GEN, json={"model": "kling-v2-1", "prompt": "a paper boat"})
        created = resp.json()
        if envelope == "openapi_doc":
            assert created == {"task_id": created["task_id"], "status": "queued"}  # no "id"
        task_id = created.get("id") or created["task_id"]
        done = await until(lambda: get(client, task_id), lambda b: status_of(b, envelope) in DONE)
        assert status_of(done, envelope) in ("SUCCESS", "succeeded", "completed")
        media = media_of(done, envelope)
        assert is_mp4((await client.get(media)).content)
        if envelope == "legacy_dto":
            assert "result_url" not in done["data"] and done["data"]["progress"] == "100%"
        if envelope == "openai_video":
            assert done["object"] == "video" and done["progress"] == 100 and done["completed_at"] > 0
        if envelope == "openapi_doc":
            assert done["format"] == "mp4" and done["metadata"]["width"] == 1280 and done["error"] is None


async def test_envelope_follows_the_model(gw: Any) -> None:
    sim, client = gw
    sim.config.extra["envelopes_by_model"] = {"viduq1": "sora_doc"}
    veo, kling, vidu = (await submit(client, "veo3.1"), await submit(client, "kling-v2-1"),
                        await submit(client, "viduq1"))
    live = await get(client, veo)
    assert set(live["data"]) == {"error", "format", "metadata", "status", "task_id", "url"}
    assert live["data"]["status"] in ("queued", "processing", "succeeded")
    assert "platform" in (await get(client, kling))["data"]
    sora = await until(lambda: get(client, vidu), lambda b: b["status"] in DONE)
    assert sora["status"] == "completed" and sora["progress"] == 100 and is_mp4(
        (await client.get(sora["video_url"])).content)


async def test_not_start_empty_and_unknown_are_queued_states() -> None:
    sim = make_sim(gateway_tick_seconds=1.0, initial_status="")
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = await submit(client)
        first_tick = sim.tick_time(sim.first_tick_after(sim.tasks[task_id].created_at))
        row = await dto(client, task_id)
        sim.config.extra["envelope"] = "openai_video"
        video = await get(client, task_id)
        sim.config.extra["envelope"] = "openapi_doc"
        doc = await get(client, task_id)
        if time.time() < first_tick:
            assert row["status"] == "" and row["progress"] == "0%" and "result_url" not in row
            assert video["status"] == "unknown" and video["progress"] == 0 and "metadata" not in video
            assert doc["status"] == "unknown" and doc["url"] == ""
        sim.config.extra.update(envelope="task_dto", initial_status="NOT_START")
        if time.time() < first_tick:
            assert (await dto(client, task_id))["status"] == "NOT_START"
        done = await until(lambda: dto(client, task_id), lambda d: d["status"] in DONE, within=3)
        assert done["status"] == "SUCCESS"


async def test_status_changes_only_on_gateway_ticks() -> None:
    tick = 0.4
    sim = make_sim(gateway_tick_seconds=tick, envelopes_by_model={"veo3.1": "realtime"})
    sim.config.queue_seconds = sim.config.run_seconds = 0.02
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        # Submit just after a tick: the upstream finishes long before the gateway looks again.
        now = time.time()
        await asyncio.sleep(sim.tick_time(sim.first_tick_after(now)) - now + 0.02)
        lazy, live = await submit(client), await submit(client, "veo3.1")
        changes: list[tuple[float, str]] = []

        async def poll() -> str:
            status = (await dto(client, lazy))["status"]
            if not changes or changes[-1][1] != status:
                changes.append((time.time(), status))
            return status

        await asyncio.sleep(0.15)
        realtime = (await get(client, live))["data"]
        assert realtime["status"] == "succeeded" and realtime["url"]  # no tick lag for real-time channels
        await until(poll, lambda s: s == "SUCCESS", within=3)
        assert [s for _, s in changes] == ["NOT_START", "SUCCESS"]  # intermediate states never stored
        when = changes[-1][0]
        offset = (when - sim.t0) % tick
        assert offset < 0.2  # observed just after a tick boundary, not when the upstream finished
        done = await dto(client, lazy)
        assert done["updated_at"] >= int(sim.tick_time(sim.first_tick_after(sim.tasks[lazy].created_at)))


async def test_failures_carry_the_upstream_reason(gw: Any) -> None:
    sim, client = gw
    sim.config.extra["envelope"] = "task_dto"
    cases = {
        "kling": await submit(client, "kling-v2-1", "x [sim:fail]"),
        "doubao": await submit(client, "doubao-seedance-1-0-pro", "x [sim:fail=Quota of the model exhausted]"),
        "veo": await submit(client, "veo3.1", "x [sim:moderated]"),
        "grok": await submit(client, "grok-imagine-video", "x [sim:moderated]"),
        "jimeng": await submit(client, "jimeng_vgfm_t2v_l20", "x [sim:moderated]"),
        "wan": await submit(client, "wan2.2-t2v-plus", "x [sim:moderated]"),
    }
    rows = {k: await finished(client, t) for k, t in cases.items()}
    for name, row in rows.items():
        assert row["status"] == "FAILURE" and row["progress"] == "100%" and row["fail_reason"], name
        assert row["result_url"] == row["fail_reason"], name  # GetResultURL falls back to the reason
    assert rows["kling"]["fail_reason"] == rows["kling"]["data"]["data"]["task_status_msg"]
    assert rows["doubao"]["data"]["error"]["message"] == "Quota of the model exhausted"
    veo = rows["veo"]["data"]["response"]["generateVideoResponse"]
    assert veo["raiMediaFilteredCount"] == 1 and "error" not in rows["veo"]["data"]  # no error object
    assert rows["grok"]["data"]["status"] == "done" and "url" not in rows["grok"]["data"]["video"]
    assert rows["jimeng"]["data"]["code"] == 50511
    assert rows["wan"]["data"]["output"]["code"] == "DataInspectionFailed"
    sim.config.extra["envelope"] = "openai_video"
    video = await get(client, cases["kling"])
    assert video["status"] == "failed" and video["error"]["message"] == rows["kling"]["fail_reason"]
    sim.config.extra["envelope"] = "realtime"
    live = (await get(client, cases["veo"]))["data"]
    assert live["status"] == "failed" and live["error"]["message"] == rows["veo"]["fail_reason"]


async def test_stuck_and_lost_tasks_end_in_the_sweep_with_stale_data() -> None:
    sim = make_sim(gateway_task_timeout_seconds=0.5)
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        stuck = await submit(client, "wan2.2-t2v-plus", "x [sim:stuck]")
        lost = await submit(client, "viduq1", "x [sim:lost]")
        swept = await until(lambda: dto(client, stuck), lambda d: d["status"] == "FAILURE", within=3)
        assert swept["fail_reason"].startswith("任务超时")
        assert swept["data"]["output"]["task_status"] == "RUNNING"  # read the top-level status, not data
        gone = await until(lambda: dto(client, lost), lambda d: d["status"] == "FAILURE", within=3)
        assert gone["data"]["state"] == "queueing"


async def test_gateway_errors(gw: Any) -> None:
    sim, client = gw
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anon:
        missing = await anon.post(GEN, json={"model": "kling-v2-1", "prompt": "x"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "new_api_error"
    no_model = await client.post(GEN, json={"prompt": "x"})
    assert no_model.status_code == 503 and no_model.json()["error"]["code"] == "model_not_found"
    sim.config.extra["models"] = ["kling-v2-1"]
    assert (await client.post(GEN, json={"model": "viduq1", "prompt": "x"})).status_code == 503
    del sim.config.extra["models"]
    no_prompt = await client.post(GEN, json={"model": "viduq1", "prompt": ""})
    assert no_prompt.status_code == 400 and no_prompt.json() == {"code": "invalid_request",
                                                                 "message": "prompt is required", "data": None}
    assert (await client.post(GEN, json={"model": "viduq1", "prompt": "x", "duration": "long"})).status_code == 400
    saturated = await client.post(GEN, json={"model": "viduq1", "prompt": "x [sim:saturated]"})
    assert saturated.status_code == 429
    assert saturated.json() == {"code": "fail_to_fetch_task", "message": "当前分组上游负载已饱和，请稍后再试",
                                "data": None}
    quota = await client.post(GEN, json={"model": "viduq1", "prompt": "x [sim:quota]"})
    assert quota.status_code == 403 and quota.json()["code"] == "quota_not_enough"
    rejected = await client.post(GEN, json={"model": "viduq1", "prompt": "x [sim:rejected]"})
    assert rejected.status_code == 400 and json.loads(rejected.json()["message"])["code"] == "InvalidParameter"
    assert (await client.get("/_sim/stats")).json()["creations"] == 0
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "submit", "retry_after": 2}])
    throttled = await client.post(GEN, json={"model": "viduq1", "prompt": "again"})
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "2"
    form = await client.post(GEN, data={"model": "viduq1", "prompt": "again", "seconds": "4",
                                        "metadata": json.dumps({"movement_amplitude": "large"})},
                             files={"input_reference": ("ref.png", b"\x89PNG....", "image/png")})
    assert form.status_code == 200
    task_id = form.json()["id"]
    assert sim.tasks[task_id].data["seconds"] == 4 and sim.tasks[task_id].data["action"] == "generate"
    theirs = await client.get(f"{GEN}/{task_id}", headers={"Authorization": "Bearer sk-neighbour"})
    assert theirs.status_code == 400 and theirs.json()["code"] == "task_not_exist"
    await client.post("/_sim/faults", json=[{"kind": "malformed", "route": "fetch"}])
    malformed = await client.get(f"{GEN}/{task_id}")
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        malformed.json()
    assert (await client.get("/_sim/stats")).json()["creations"] == 1


async def test_output_urls_expire() -> None:
    sim = make_sim()
    sim.config.output_ttl_seconds = 0.4
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as client:
        task_id = await submit(client, "doubao-seedance-1-0-pro")
        done = await until(lambda: dto(client, task_id), lambda d: d["status"] == "SUCCESS")
        assert (await client.get(done["result_url"])).status_code == 200
        await asyncio.sleep(0.5)
        assert (await client.get(done["result_url"])).status_code == 404
        again = await submit(client, "grok-imagine-video")
        fresh = await until(lambda: dto(client, again), lambda d: d["status"] == "SUCCESS")
        await client.post("/_sim/expire-files")
        assert (await client.get(fresh["result_url"])).status_code == 404
