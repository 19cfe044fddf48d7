"""The sunoapi.org simulator's follow-up operations, driven over loopback HTTP as the docs describe them:
extend, lyrics, WAV conversion, persona, and the paths it does not serve (concat)."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.suno import SunoApiSimulator

KEY = "sk-testkey"
AUTH = {"Authorization": f"Bearer {KEY}"}
DONE = ("SUCCESS", "CALLBACK_EXCEPTION", "CREATE_TASK_FAILED", "GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR",
        "GENERATE_LYRICS_FAILED", "GENERATE_WAV_FAILED")


def is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


async def until(fn: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float = 8.0) -> Any:
    deadline = time.time() + within
    while True:
        value = await fn()
        if ok(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        await asyncio.sleep(0.03)


class Receiver:
    """Collects callback bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/cb", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        self.bodies.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        await until(lambda: asyncio.sleep(0, len(self.bodies)), lambda n: n >= count)
        return self.bodies


@dataclass
class Api:
    sim: SunoApiSimulator
    http: httpx.AsyncClient

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(path, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def get(self, path: str, task_id: str) -> dict[str, Any]:
        r = await self.http.get(path, params={"taskId": task_id})
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def created(self, path: str, body: dict[str, Any]) -> str:
        out = await self.post(path, body)
        assert out["code"] == 200 and out["msg"] == "success", out
        return str(out["data"]["taskId"])

    async def refused(self, path: str, body: dict[str, Any], code: int = 400) -> str:
        """A refusal in the envelope (HTTP 200) that creates nothing; returns its message."""
        before = (self.sim.stats.creations, len(self.sim.tasks), len(self.sim.lyrics_tasks),
                  len(self.sim.wav_tasks), len(self.sim.personas), self.sim.used_credits)
        out = await self.post(path, body)
        assert out["code"] == code and out["data"] is None, (body, out)
        assert out["msg"]
        after = (self.sim.stats.creations, len(self.sim.tasks), len(self.sim.lyrics_tasks),
                 len(self.sim.wav_tasks), len(self.sim.personas), self.sim.used_credits)
        assert after == before, body
        return str(out["msg"])

    async def music(self, task_id: str) -> dict[str, Any]:
        """The finished record of a generate or extend task."""
        async def poll() -> dict[str, Any]:
            out = await self.get("/api/v1/generate/record-info", task_id)
            assert out["code"] == 200, out
            return dict(out["data"])
        return dict(await until(poll, lambda d: d["status"] in DONE))

    async def song(self, **overrides: Any) -> dict[str, Any]:
        body = {"prompt": "[Verse] neon rain", "customMode": True, "instrumental": False, "model": "V4_5",
                "style": "synthwave", "title": "Neon Rain"} | overrides
        return await self.music(await self.created("/api/v1/generate", body))


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    sim = SunoApiSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.15, api_keys=[KEY],
                                     extra={"callback_retry_delays": [0.05]}))
    async with serving(sim.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http:
        yield Api(sim, http)
    await sim.shutdown()


# ---------------------------------------------------------------------------
# extend
# ---------------------------------------------------------------------------


async def test_extend_custom_parameters_gives_new_clips(api: Api) -> None:
    api.sim.config.extra["clip_duration_seconds"] = 120.0
    source = await api.song()
    clip = source["response"]["sunoData"][1]
    receiver = Receiver()
    async with serving(receiver.app) as cb:
        body = {"defaultParamFlag": True, "audioId": clip["id"], "prompt": "[Bridge] the rain stops",
                "style": "synthwave, brighter", "title": "Neon Rain (Extended)", "continueAt": 60,
                "model": "V4_5", "callBackUrl": f"{cb}/cb", "vocalGender": "f"}
        task_id = await api.created("/api/v1/generate/extend", body)
        done = await api.music(task_id)
        bodies = await receiver.wait_for(3)
    assert done["status"] == "SUCCESS" and done["operationType"] == "extend"
    assert done["parentMusicId"] == clip["id"] and done["errorCode"] is None
    param = json.loads(done["param"])  # a JSON string, without callBackUrl
    assert param["continueAt"] == 60 and param["audioId"] == clip["id"] and "callBackUrl" not in param
    new = done["response"]["sunoData"]
    assert len(new) == 2 and not {c["id"] for c in new} & {c["id"] for c in source["response"]["sunoData"]}
    for c in new:
        assert c["title"] == "Neon Rain (Extended)" and c["tags"] == "synthwave, brighter"
        assert c["prompt"] == "[Bridge] the rain stops" and c["modelName"] == "chirp-auk"
    extended = await api.http.get(new[0]["audioUrl"])
    original = await api.http.get(clip["audioUrl"])
    assert is_mp3(extended.content) and extended.content != original.content
    assert [b["data"]["callbackType"] for b in bodies] == ["text", "first", "complete"]
    assert {c["id"] for c in bodies[2]["data"]["data"]} == {c["id"] for c in new}
    assert all(b["data"]["task_id"] == task_id for b in bodies)

    # Original parameters: only audioId (and model); title, style and lyrics come from the source.
    again = await api.music(await api.created("/api/v1/generate/extend", {
        "defaultParamFlag": False, "audioId": new[0]["id"], "model": "V4_5"}))
    assert again["status"] == "SUCCESS" and again["parentMusicId"] == new[0]["id"]
    assert again["response"]["sunoData"][0]["title"] == "Neon Rain (Extended)"
    stats = (await api.http.get("/_sim/stats")).json()
    assert stats["creations"] == 3 and stats["duplicate_identities"] == {}


async def test_extend_refusals(api: Api) -> None:
    source = await api.song()  # clip_duration_seconds: 1.0 (the MP3's length)
    clip = source["response"]["sunoData"][0]["id"]
    ok = {"defaultParamFlag": True, "audioId": clip, "prompt": "[Outro]", "style": "synthwave",
          "title": "Neon Rain II", "continueAt": 0.5, "model": "V4_5"}
    path = "/api/v1/generate/extend"
    assert "does not exist" in await api.refused(path, ok | {"audioId": "0" * 32})
    for outside in (0, 1.0, 60, -3):
        assert "continueAt" in await api.refused(path, ok | {"continueAt": outside})
    assert "continueAt" in await api.refused(path, ok | {"continueAt": "0.5"})
    for name in ("prompt", "style", "title", "continueAt"):
        assert name in await api.refused(path, {k: v for k, v in ok.items() if k != name})
    assert "defaultParamFlag" in await api.refused(path, {k: v for k, v in ok.items() if k != "defaultParamFlag"})
    assert "audioId" in await api.refused(path, ok | {"audioId": ""})
    assert "consistent" in await api.refused(path, ok | {"model": "V5"})
    await api.refused(path, ok | {"model": "V9"})
    await api.refused(path, ok | {"title": "t" * 101}, 413)
    await api.refused(path, ok | {"personaId": "nobody"})
    await api.refused(path, ok | {"prompt": "x [sim:credits]"}, 429)
    # A clip of a task that is still generating, or that failed, cannot be extended.
    pending = await api.created("/api/v1/generate", {"prompt": "slow [sim:queue=5]", "customMode": False,
                                                     "instrumental": False, "model": "V4_5"})
    pending_clip = api.sim.tasks[pending].data["clips"][0]
    assert "not complete" in await api.refused(path, ok | {"audioId": pending_clip})
    failed = await api.music(await api.created("/api/v1/generate", {
        "prompt": "x [sim:fail]", "customMode": False, "instrumental": False, "model": "V4_5"}))
    failed_clip = api.sim.tasks[failed["taskId"]].data["clips"][0]
    assert "GENERATE_AUDIO_FAILED" in await api.refused(path, ok | {"audioId": failed_clip})
    # Default parameters need neither continueAt nor the texts, and pass in range.
    assert await api.created(path, {"defaultParamFlag": False, "audioId": clip, "model": "V4_5",
                                    "continueAt": 0.25})
    api.sim.config.extra["require_callback_url"] = True
    assert await api.refused(path, ok, 422) == "Please enter callBackUrl."


# ---------------------------------------------------------------------------
# lyrics
# ---------------------------------------------------------------------------


async def test_lyrics_text_variants_and_callback(api: Api) -> None:
    receiver = Receiver()
    async with serving(receiver.app) as cb:
        prompt = "a quiet night in the city [sim:run=0.6]"
        task_id = await api.created("/api/v1/lyrics", {"prompt": prompt, "callBackUrl": f"{cb}/cb"})
        first = await api.get("/api/v1/lyrics/record-info", task_id)
        assert first["code"] == 200 and first["data"]["status"] == "PENDING" and first["data"]["response"] is None

        async def poll() -> dict[str, Any]:
            return dict((await api.get("/api/v1/lyrics/record-info", task_id))["data"])

        done = await until(poll, lambda d: d["status"] != "PENDING")
        (callback,) = await receiver.wait_for(1)
    assert done["status"] == "SUCCESS" and done["type"] == "LYRICS" and done["errorCode"] is None
    assert json.loads(done["param"]) == {"prompt": prompt}
    variants = done["response"]["data"]
    assert done["response"]["taskId"] == task_id and len(variants) == 2
    for v in variants:
        assert set(v) == {"text", "title", "status", "errorMessage"}
        assert v["status"] == "complete" and "[Verse]" in v["text"] and v["title"]
    assert variants[0]["text"] != variants[1]["text"]
    assert callback["code"] == 200 and callback["data"]["callbackType"] == "complete"
    assert callback["data"]["taskId"] == task_id and callback["data"]["data"] == variants
    # A lyrics task is not a music task, and the other way round.
    assert (await api.get("/api/v1/generate/record-info", task_id))["code"] == 400
    assert (await api.get("/api/v1/lyrics/record-info", "nope"))["code"] == 400
    assert api.sim.stats.creations == 1

    api.sim.config.extra["lyrics_list_key"] = "lyricsData"  # the English page's spelling
    assert "lyricsData" in (await api.get("/api/v1/lyrics/record-info", task_id))["data"]["response"]


async def test_lyrics_failures_and_refusals(api: Api) -> None:
    path = "/api/v1/lyrics"
    cb = "http://127.0.0.1:9/cb"
    expected = {"fail": ("GENERATE_LYRICS_FAILED", 500), "sensitive": ("SENSITIVE_WORD_ERROR", 400),
                "create_failed": ("CREATE_TASK_FAILED", 500)}
    ids = {trap: await api.created(path, {"prompt": f"rain [sim:{trap}]", "callBackUrl": cb}) for trap in expected}
    partial = await api.created(path, {"prompt": "rain [sim:partial]", "callBackUrl": cb})
    for trap, (status, code) in expected.items():
        data = await until(lambda t=trap: api.get("/api/v1/lyrics/record-info", ids[t]),
                           lambda d: d["data"]["status"] != "PENDING")
        assert data["data"]["status"] == status and data["data"]["errorCode"] == code
        assert data["data"]["response"] is None
    data = await until(lambda: api.get("/api/v1/lyrics/record-info", partial),
                       lambda d: d["data"]["status"] != "PENDING")
    assert data["data"]["status"] == "SUCCESS"
    assert [v["status"] for v in data["data"]["response"]["data"]] == ["complete", "failed"]

    assert "prompt" in await api.refused(path, {"callBackUrl": cb})
    await api.refused(path, {"prompt": "   ", "callBackUrl": cb})
    await api.refused(path, {"prompt": "word " * 201, "callBackUrl": cb}, 413)
    assert await api.refused(path, {"prompt": "rain"}, 422) == "Please enter callBackUrl."
    await api.refused(path, {"prompt": "rain [sim:maintenance]", "callBackUrl": cb}, 455)
    api.sim.config.extra["followup_requires_callback_url"] = False
    assert await api.created(path, {"prompt": "rain"})


# ---------------------------------------------------------------------------
# WAV conversion
# ---------------------------------------------------------------------------


async def test_wav_conversion_serves_a_real_expiring_wav(api: Api) -> None:
    api.sim.config.output_ttl_seconds = 1.5
    source = await api.song()
    clips = source["response"]["sunoData"]
    receiver = Receiver()
    api.sim.config.run_seconds = 0.6  # long enough to see PENDING first
    async with serving(receiver.app) as cb:
        ids = [await api.created("/api/v1/wav/generate", {"taskId": source["taskId"], "audioId": c["id"],
                                                          "callBackUrl": f"{cb}/cb"}) for c in clips]
        pending = (await api.get("/api/v1/wav/record-info", ids[0]))["data"]
        assert pending["successFlag"] == "PENDING" and pending["response"] is None
        assert pending["completeTime"] is None

        async def poll(task_id: str) -> dict[str, Any]:
            return dict((await api.get("/api/v1/wav/record-info", task_id))["data"])

        records = [await until(lambda t=t: poll(t), lambda d: d["successFlag"] != "PENDING") for t in ids]
        bodies = await receiver.wait_for(2)
    files = []
    for i, (rec, clip) in enumerate(zip(records, clips, strict=True)):
        assert rec["successFlag"] == "SUCCESS" and rec["musicId"] == clip["id"] and rec["musicIndex"] == i
        assert rec["taskId"] == ids[i] and rec["callbackUrl"].endswith("/cb") and rec["completeTime"]
        assert rec["createTime"] and rec["errorCode"] is None and "audio_wav_url" not in rec["response"]
        got = await api.http.get(rec["response"]["audioWavUrl"])
        assert got.status_code == 200 and got.headers["content-type"] == "audio/wav"
        assert got.content[:4] == b"RIFF" and got.content[8:12] == b"WAVE"
        with wave.open(io.BytesIO(got.content)) as w:
            assert w.getnframes() > 0
        files.append(got.content)
    assert files[0] != files[1]
    by_task = {b["data"]["task_id"]: b for b in bodies}
    assert by_task[ids[0]]["code"] == 200 and "callbackType" not in by_task[ids[0]]["data"]
    assert by_task[ids[0]]["data"]["audioWavUrl"] == records[0]["response"]["audioWavUrl"]
    assert api.sim.stats.creations == 3  # the song and two conversions
    api.sim.config.extra["wav_record_style"] = "legacy"  # the older page: status / audio_wav_url
    legacy = (await api.get("/api/v1/wav/record-info", ids[0]))["data"]
    assert legacy["status"] == "SUCCESS" and "successFlag" not in legacy and legacy["response"]["audio_wav_url"]
    await asyncio.sleep(max(0.0, api.sim.wav_tasks[ids[0]].finished_at + 1.6 - time.time()))
    assert (await api.http.get(records[0]["response"]["audioWavUrl"])).status_code == 404


async def test_wav_refusals_and_failure(api: Api) -> None:
    path = "/api/v1/wav/generate"
    cb = "http://127.0.0.1:9/cb"
    source = await api.song()
    clip = source["response"]["sunoData"][0]["id"]
    ok = {"taskId": source["taskId"], "audioId": clip, "callBackUrl": cb}
    for name in ("taskId", "audioId"):
        assert name in await api.refused(path, {k: v for k, v in ok.items() if k != name})
    assert await api.refused(path, ok | {"callBackUrl": None}, 422) == "Please enter callBackUrl."
    assert "does not exist" in await api.refused(path, ok | {"taskId": "0" * 32})
    other = await api.song(title="Other")
    assert "not a track" in await api.refused(path, ok | {"audioId": other["response"]["sunoData"][0]["id"]})
    slow = await api.created("/api/v1/generate", {"prompt": "x [sim:queue=5]", "customMode": False,
                                                  "instrumental": False, "model": "V4_5"})
    assert "not complete" in await api.refused(path, {"taskId": slow, "audioId": api.sim.tasks[slow].data["clips"][0],
                                                      "callBackUrl": cb})
    lyrics = await api.created("/api/v1/lyrics", {"prompt": "rain", "callBackUrl": cb})
    await api.refused(path, ok | {"taskId": lyrics})
    first = await api.created(path, ok)
    assert "already exists" in await api.refused(path, ok, 409)
    assert (await api.get("/api/v1/generate/record-info", first))["code"] == 400  # not a music task
    # The song's [sim:wav_fail] makes its conversions fail.
    doomed = await api.song(prompt="[Verse] x [sim:wav_fail]")
    assert doomed["status"] == "SUCCESS"
    wav_id = await api.created(path, {"taskId": doomed["taskId"],
                                      "audioId": doomed["response"]["sunoData"][0]["id"], "callBackUrl": cb})
    rec = await until(lambda: api.get("/api/v1/wav/record-info", wav_id),
                      lambda d: d["data"]["successFlag"] != "PENDING")
    assert rec["data"]["successFlag"] == "GENERATE_WAV_FAILED" and rec["data"]["response"] is None
    assert rec["data"]["errorCode"] == 500 and rec["data"]["errorMessage"]


# ---------------------------------------------------------------------------
# persona
# ---------------------------------------------------------------------------


async def test_persona_is_synchronous_and_gates_persona_id(api: Api) -> None:
    source = await api.song()
    clips = source["response"]["sunoData"]
    body = {"taskId": source["taskId"], "audioId": clips[0]["id"], "name": "Neon Singer",
            "description": "Airy synth-pop vocals"}
    out = await api.post("/api/v1/generate/generate-persona", body)
    assert out["code"] == 200 and out["msg"] == "success"
    persona = out["data"]
    assert set(persona) == {"personaId", "name", "description"} and persona["name"] == "Neon Singer"
    assert api.sim.stats.creations == 1  # persona generation is free: not a paid creation
    path = "/api/v1/generate/generate-persona"
    assert "already" in await api.refused(path, body, 409)  # one persona per audio id

    custom = {"prompt": "[Verse] again", "customMode": True, "instrumental": False, "model": "V4_5",
              "style": "synthwave", "title": "With Persona"}
    assert await api.created("/api/v1/generate", custom | {"personaId": persona["personaId"]})
    assert "does not exist" in await api.refused("/api/v1/generate", custom | {"personaId": "persona_123"})
    # Outside custom mode the field is not used; a Suno Voice id is not checked.
    assert await api.created("/api/v1/generate", {"prompt": "calm", "customMode": False, "instrumental": False,
                                                  "model": "V4_5", "personaId": "persona_123"})
    assert await api.created("/api/v1/generate", custom | {"personaId": "voice_1", "personaModel": "voice_persona"})
    extend = {"defaultParamFlag": True, "audioId": clips[1]["id"], "prompt": "[Outro]", "style": "s",
              "title": "t", "continueAt": 0.5, "model": "V4_5"}
    assert await api.created("/api/v1/generate/extend", extend | {"personaId": persona["personaId"]})


async def test_persona_refusals(api: Api) -> None:
    path = "/api/v1/generate/generate-persona"
    source = await api.song()
    clip = source["response"]["sunoData"][0]["id"]
    ok = {"taskId": source["taskId"], "audioId": clip, "name": "N", "description": "D"}
    for name in ("taskId", "audioId", "name", "description"):
        assert name in await api.refused(path, {k: v for k, v in ok.items() if k != name})
    await api.refused(path, {k: v for k, v in ok.items() if k != "audioId"} | {"musicId": clip})
    assert "does not exist" in await api.refused(path, ok | {"taskId": "0" * 32})
    other = await api.song(title="Other")
    assert "not a track" in await api.refused(path, ok | {"audioId": other["response"]["sunoData"][0]["id"]})
    old = await api.song(model="V3_5")
    assert "V4" in await api.refused(path, {**ok, "taskId": old["taskId"],
                                            "audioId": old["response"]["sunoData"][0]["id"]})
    slow = await api.created("/api/v1/generate", {"prompt": "x [sim:queue=5]", "customMode": False,
                                                  "instrumental": False, "model": "V4_5"})
    assert "not complete" in await api.refused(path, {**ok, "taskId": slow,
                                                      "audioId": api.sim.tasks[slow].data["clips"][0]})
    # The analysed window: 10-30 s, inside the audio (1 s by default, so any explicit window is out).
    assert "duration" in await api.refused(path, ok | {"vocalStart": 0, "vocalEnd": 20})
    api.sim.config.extra["clip_duration_seconds"] = 120.0
    for start, end in ((0, 5), (10, 45), (-1, 15), (30, 20)):
        assert "10 and 30" in await api.refused(path, ok | {"vocalStart": start, "vocalEnd": end})
    assert "duration" in await api.refused(path, ok | {"vocalStart": 100, "vocalEnd": 125})
    await api.refused(path, ok | {"vocalStart": "3"})
    assert (await api.post(path, ok | {"vocalStart": 12.5, "vocalEnd": 37.5}))["code"] == 200


# ---------------------------------------------------------------------------
# unknown paths, faults, credits
# ---------------------------------------------------------------------------


async def test_concat_and_unknown_paths_answer_404_in_the_envelope(api: Api) -> None:
    for method, path in (("POST", "/api/v1/generate/concat"), ("POST", "/api/v1/suno/concat"),
                         ("GET", "/api/v1/generate"), ("POST", "/api/v1/lyrics/record-info")):
        r = await api.http.request(method, path, json={"clipId": "x"})
        assert r.status_code == 200 and r.json() == {"code": 404, "msg": "Invalid request method or path",
                                                     "data": None}, path
    api.sim.config.extra["http_status_mirrors_code"] = True
    assert (await api.http.post("/api/v1/generate/concat", json={})).status_code == 404
    assert api.sim.stats.creations == 0


async def test_faults_credits_and_auth_on_the_new_routes(api: Api) -> None:
    source = await api.song()
    clip = source["response"]["sunoData"][0]["id"]
    cb = "http://127.0.0.1:9/cb"
    await api.http.post("/_sim/faults", json=[{"kind": "429", "route": "extend", "retry_after": 2},
                                              {"kind": "503", "route": "wav_record_info"},
                                              {"kind": "500", "route": "lyrics", "after_effect": True},
                                              {"kind": "500", "route": "persona"}])
    busy = await api.http.post("/api/v1/generate/extend", json={"defaultParamFlag": False, "audioId": clip,
                                                                 "model": "V4_5"})
    assert busy.status_code == 429 and busy.json()["code"] == 430 and busy.headers["retry-after"] == "2"
    down = await api.http.get("/api/v1/wav/record-info", params={"taskId": "x"})
    assert down.status_code == 503 and down.json()["code"] == 455
    ambiguous = await api.http.post("/api/v1/lyrics", json={"prompt": "rain", "callBackUrl": cb})
    assert ambiguous.status_code == 500 and ambiguous.json()["code"] == 500
    assert len(api.sim.lyrics_tasks) == 1  # the request took effect before failing
    failed = await api.http.post("/api/v1/generate/generate-persona", json={
        "taskId": source["taskId"], "audioId": clip, "name": "N", "description": "D"})
    assert failed.status_code == 500 and not api.sim.personas
    injected = (await api.http.get("/_sim/stats")).json()["faults_injected"]
    assert set(injected) == {"extend:429", "wav_record_info:503", "lyrics:500", "persona:500"}

    # Credits: extend costs like a song (12), lyrics and WAV 0.4 each; 429 means "insufficient credits".
    api.sim.used_credits = 0
    api.sim.config.extra["credits"] = 12.5
    assert await api.created("/api/v1/lyrics", {"prompt": "sun", "callBackUrl": cb})
    assert await api.created("/api/v1/wav/generate", {"taskId": source["taskId"], "audioId": clip, "callBackUrl": cb})
    assert (await api.http.get("/api/v1/generate/credit")).json()["data"] == 11.7
    extend = {"defaultParamFlag": False, "audioId": clip, "model": "V4_5"}
    await api.refused("/api/v1/generate/extend", extend, 429)
    api.sim.config.extra["credits"] = 12.8
    assert await api.created("/api/v1/generate/extend", extend)
    assert (await api.http.get("/api/v1/generate/credit")).json()["data"] == 0
    await api.refused("/api/v1/lyrics", {"prompt": "moon", "callBackUrl": cb}, 429)

    for method, path in (("POST", "/api/v1/generate/extend"), ("POST", "/api/v1/lyrics"),
                         ("GET", "/api/v1/lyrics/record-info"), ("POST", "/api/v1/wav/generate"),
                         ("GET", "/api/v1/wav/record-info"), ("POST", "/api/v1/generate/generate-persona")):
        r = await api.http.request(method, path, json={}, params={"taskId": "x"},
                                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 200 and r.json()["code"] == 401, path
