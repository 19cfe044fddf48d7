"""Suno's follow-up operations where the reference documents them: extend (continuation) and lyrics
through the new-api gateway, and what neither flavour serves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.suno import SunoApiSimulator, SunoGatewaySimulator

KEY = "sk-testkey"
AUTH = {"Authorization": f"Bearer {KEY}"}


def is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


@dataclass
class Gateway:
    sim: SunoGatewaySimulator
    http: httpx.AsyncClient

    async def submit(self, action: str = "music", **body: Any) -> httpx.Response:
        return await self.http.post(f"/suno/submit/{action}", json=body)

    async def task(self, action: str = "music", **body: Any) -> str:
        r = await self.submit(action, **body)
        assert r.status_code == 200 and r.json()["code"] == "success", r.text
        return str(r.json()["data"])

    async def done(self, task_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.http.get(f"/suno/fetch/{task_id}")
            assert r.status_code == 200, r.text
            dto = dict(r.json()["data"])
            if dto["status"] in ("SUCCESS", "FAILURE"):
                return dto
            await asyncio.sleep(0.03)
        raise AssertionError(f"task {task_id} did not finish")

    async def song(self, **body: Any) -> dict[str, Any]:
        """A finished song (the source of an extension)."""
        body = {"prompt": "[Verse] city lights", "tags": "synthpop", "title": "City Lights", "mv": "chirp-v3-5"} | body
        dto = await self.done(await self.task(**body))
        assert dto["status"] == "SUCCESS"
        return dto

    async def refused(self, status: int = 400, **body: Any) -> dict[str, Any]:
        before = self.sim.stats.creations
        r = await self.submit(**body)
        assert r.status_code == status, (body, r.text)
        assert self.sim.stats.creations == before
        out = r.json()
        assert out["data"] is None
        return dict(out)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    sim = SunoGatewaySimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, api_keys=[KEY],
                                         extra={"gateway_tick_seconds": 0.05}))
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http:
        yield Gateway(sim, http)


async def test_extend_continues_a_complete_clip(gateway: Gateway) -> None:
    source = await gateway.song()
    clip = source["data"][1]
    task_id = await gateway.task(prompt="[Verse 2] the lights go out", tags="synthpop", title="City Lights",
                                 mv="chirp-v3-5", continue_clip_id=clip["id"], continue_at=30.5,
                                 task_id=source["task_id"])
    done = await gateway.done(task_id)
    assert done["status"] == "SUCCESS" and done["action"] == "MUSIC" and done["progress"] == "100%"
    new_clips = done["data"]
    assert len(new_clips) == 2 and not {c["id"] for c in new_clips} & {c["id"] for c in source["data"]}
    for new in new_clips:
        assert new["status"] == "complete" and new["metadata"]["type"] == "gen"
        assert new["metadata"]["history"] == [{"id": clip["id"], "continue_at": 30.5}]
        assert new["metadata"]["prompt"] == "[Verse 2] the lights go out"
    audio = await gateway.http.get(new_clips[0]["audio_url"])
    original = await gateway.http.get(clip["audio_url"])
    assert audio.status_code == 200 and is_mp3(audio.content) and audio.content != original.content
    assert gateway.sim.tasks[task_id].input["continue_clip_id"] == clip["id"]
    # An extended clip is a clip like any other: it can be continued again.
    again = await gateway.done(await gateway.task(prompt="[Outro]", continue_clip_id=new_clips[0]["id"],
                                                  continue_at=0, task_id=task_id))
    assert again["data"][0]["metadata"]["history"][0]["id"] == new_clips[0]["id"]
    assert (await gateway.http.get("/_sim/stats")).json()["duplicate_identities"] == {}


async def test_extend_refusals(gateway: Gateway) -> None:
    source = await gateway.song()
    clip = source["data"][0]["id"]
    origin = source["task_id"]

    # The gateway itself (new-api's Suno adaptor and relay) wants the origin task, one of the caller's.
    assert (await gateway.refused(prompt="x", continue_clip_id=clip, continue_at=10))["message"] == \
        "task id is empty"
    foreign = await gateway.refused(prompt="x", continue_clip_id=clip, continue_at=10, task_id="task_nope")
    assert (foreign["code"], foreign["message"]) == ("task_not_exist", "task_origin_not_exist")

    unknown = await gateway.refused(prompt="x", continue_clip_id="6c1b8a2e-0000-4000-8000-000000000000",
                                    continue_at=10, task_id=origin)
    assert unknown["code"] == "fail_to_fetch_task"
    upstream = json.loads(unknown["message"])  # the upstream's own body, passed through
    assert upstream["code"] == "invalid_request" and "not found" in upstream["message"]

    assert "continue_at" in (await gateway.refused(prompt="x", continue_clip_id=clip, task_id=origin))["message"]
    assert "continue_at" in (await gateway.refused(prompt="x", continue_clip_id=clip, continue_at=-1,
                                                   task_id=origin))["message"]
    wrong_type = await gateway.refused(prompt="x", continue_clip_id=clip, continue_at="30", task_id=origin)
    assert wrong_type["code"] == "invalid_request" and "continue_at" in wrong_type["message"]

    # A clip that is not complete (still generating, or failed) cannot be continued.
    pending = await gateway.task(prompt="slow [sim:queue=5]")
    pending_clip = gateway.sim.tasks[pending].data["clips"][0]
    not_yet = await gateway.refused(prompt="x", continue_clip_id=pending_clip, continue_at=5, task_id=pending)
    assert "not complete" in json.loads(not_yet["message"])["message"]
    failed = await gateway.done(await gateway.task(prompt="x [sim:fail]"))
    assert failed["status"] == "FAILURE"
    await gateway.refused(prompt="x", continue_clip_id=failed["data"][0]["id"], continue_at=5,
                          task_id=failed["task_id"])

    gateway.sim.config.extra["continue_refusal_status"] = 500
    server_side = await gateway.refused(500, prompt="x", continue_clip_id="nope", continue_at=5, task_id=origin)
    assert json.loads(server_side["message"])["code"] == "internal_error"


async def test_lyrics_are_a_text_result(gateway: Gateway) -> None:
    done = await gateway.done(await gateway.task("lyrics", prompt="a song about rain"))
    assert done["status"] == "SUCCESS" and done["action"] == "LYRICS"
    assert done["properties"]["upstream_model_name"] == "suno_lyrics"
    lyrics = done["data"]
    assert lyrics["status"] == "complete" and lyrics["title"] and "[Verse]" in lyrics["text"]
    assert "audio_url" not in lyrics
    failed = await gateway.done(await gateway.task("lyrics", prompt="rain [sim:fail]"))
    assert failed["status"] == "FAILURE" and failed["data"]["text"] == ""


@pytest.mark.parametrize("action", ["concat", "wav", "persona", "extend"])
async def test_gateway_serves_only_music_and_lyrics(gateway: Gateway, action: str) -> None:
    r = await gateway.submit(action, clip_id="x", prompt="x")
    assert r.status_code == 400
    assert r.json() == {"code": "invalid_request", "message": "invalid_action", "data": None}


async def test_sunoapi_passes_persona_fields_through() -> None:
    sim = SunoApiSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, api_keys=[KEY]))
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http:
        body = {"prompt": "A calm piano track", "customMode": False, "instrumental": False, "model": "V4_5",
                "personaId": "persona_123", "personaModel": "style_persona"}
        r = await http.post("/api/v1/generate", json=body)
        assert r.status_code == 200 and r.json()["code"] == 200
        task_id = r.json()["data"]["taskId"]
        info = (await http.get("/api/v1/generate/record-info", params={"taskId": task_id})).json()["data"]
        param = json.loads(info["param"])
        assert (param["personaId"], param["personaModel"]) == ("persona_123", "style_persona")
    await sim.shutdown()
