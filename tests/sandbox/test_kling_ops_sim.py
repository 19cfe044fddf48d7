"""Kling's further endpoints (images, try-on, extend, lip-sync, effects, multi-image), driven over
real HTTP exactly as Kling's docs tell a client to."""

from __future__ import annotations

import asyncio
import base64
import time
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
from providers.sandbox.kling import KlingSimulator, make_token
from providers.sandbox.media import mp3, png
from providers.sandbox.serve import serving

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MP4_BOX = b"ftyp"
IMAGE = "https://example.com/a.png"
PATHS = {
    "text2video": "/v1/videos/text2video",
    "video-extend": "/v1/videos/video-extend",
    "lip-sync": "/v1/videos/lip-sync",
    "effects": "/v1/videos/effects",
    "multi-image2video": "/v1/videos/multi-image2video",
    "generations": "/v1/images/generations",
    "try-on": "/v1/images/kolors-virtual-try-on",
}


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token()}", "Content-Type": "application/json"}


@dataclass
class Env:
    sim: KlingSimulator
    http: httpx.AsyncClient

    async def create(self, family: str, **body: Any) -> httpx.Response:
        return await self.http.post(PATHS[family], json=body, headers=auth())

    async def task_id(self, family: str, **body: Any) -> str:
        r = await self.create(family, **body)
        assert r.status_code == 200 and r.json()["code"] == 0, r.text
        assert r.json()["data"]["task_status"] == "submitted"
        return str(r.json()["data"]["task_id"])

    async def query(self, family: str, ident: str) -> httpx.Response:
        return await self.http.get(f"{PATHS[family]}/{ident}", headers=auth())

    async def wait(self, family: str, ident: str, within: float = 5) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.query(family, ident)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["code"] == 0 and body["message"] == "SUCCEED"
            if body["data"]["task_status"] in ("succeed", "failed"):
                return dict(body["data"])
            await asyncio.sleep(0.03)
        raise AssertionError("task did not finish")

    async def video(self, **body: Any) -> dict[str, Any]:
        """A finished text-to-video task's video object (the source of extend and lip-sync)."""
        body.setdefault("prompt", "a rabbit reading a newspaper")
        data = await self.wait("text2video", await self.task_id("text2video", **body))
        assert data["task_status"] == "succeed"
        return dict(data["task_result"]["videos"][0])

    async def refused(self, family: str, status: int = 400, code: int = 1201, **body: Any) -> str:
        before = self.sim.stats.creations
        r = await self.create(family, **body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["code"] == code and "data" not in r.json()
        assert self.sim.stats.creations == before
        return str(r.json()["message"])


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = KlingSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, http)


# -- image generation --------------------------------------------------------------------


async def test_image_generation_n_images_in_its_own_namespace(env: Env) -> None:
    task_id = await env.task_id("generations", model_name="kling-v2-1", prompt="a watercolor fox", n=2,
                                resolution="2k", aspect_ratio="1:1", external_task_id="img-1",
                                watermark_info={"enabled": True})
    for other in ("text2video", "try-on", "multi-image2video"):
        missing = await env.query(other, task_id)
        assert missing.status_code == 404 and missing.json()["code"] == 1203
    data = await env.wait("generations", "img-1")  # by external_task_id
    assert data["task_id"] == task_id and data["task_info"] == {"external_task_id": "img-1"}
    assert data["task_status_msg"] == "" and data["final_unit_deduction"] == "2"
    assert data["created_at"] > 10**12 and data["updated_at"] >= data["created_at"]
    images = data["task_result"]["images"]
    assert [i["index"] for i in images] == [0, 1] and "videos" not in data["task_result"]
    bodies = []
    for image in images:
        for key in ("url", "watermark_url"):
            got = await env.http.get(image[key])
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            assert got.content.startswith(PNG_MAGIC)
            bodies.append(got.content)
    assert len(set(bodies)) == 4

    listed = (await env.http.get("/v1/images/generations?pageNum=1&pageSize=10", headers=auth())).json()
    assert [t["task_id"] for t in listed["data"]] == [task_id]
    assert (await env.http.get("/v1/videos/text2video", headers=auth())).json()["data"] == []


IMAGE_REFUSALS: list[tuple[dict[str, Any], int, int]] = [
    ({}, 400, 1201),  # prompt is required
    ({"prompt": "x" * 2501}, 400, 1201),
    ({"n": 10}, 400, 1201),
    ({"n": 0}, 400, 1201),
    ({"n": "2"}, 400, 1201),
    ({"aspect_ratio": "5:4"}, 400, 1201),
    ({"resolution": "4k"}, 400, 1201),
    ({"image_fidelity": 1.5}, 400, 1201),
    ({"image": "data:image/png;base64,iVBORw0KGgo="}, 400, 1201),
    ({"image": IMAGE, "negative_prompt": "blur"}, 400, 1201),
    ({"image": IMAGE, "image_reference": "face", "model_name": "kling-v2-1"}, 400, 1201),
    ({"image_reference": "subject", "model_name": "kling-v1-5"}, 400, 1201),
    ({"model_name": "kling-v2-6"}, 404, 1203),  # a video model
]


async def test_image_generation_validation(env: Env) -> None:
    for body, status, code in IMAGE_REFUSALS:
        await env.refused("generations", status, code, **({"prompt": "a fox"} | body if body else {}))


async def test_image_reference_and_negative_prompt_knob(env: Env) -> None:
    raw = base64.b64encode(png("ref")).decode()
    await env.task_id("generations", model_name="kling-v1-5", prompt="a fox", image=raw, image_reference="face",
                      human_fidelity=0.45, image_fidelity=0.5)
    env.sim.config.extra["negative_prompt_with_image"] = True
    await env.task_id("generations", prompt="a fox", image=IMAGE, negative_prompt="blur")


async def test_resource_packs_count_separately_and_images_hold_n_slots(env: Env) -> None:
    env.sim.config.extra["concurrency"] = {"image": 3, "video": 1, "try-on": 1}
    env.sim.config.run_seconds = 1.0
    await env.task_id("generations", prompt="a", n=2)
    r = await env.create("generations", prompt="b", n=2)  # 2 + 2 > 3
    assert r.status_code == 429 and r.json()["code"] == 1303
    await env.task_id("generations", prompt="c", n=1)  # 2 + 1 fits
    await env.task_id("text2video", prompt="the video pack is not full")
    await env.task_id("try-on", human_image=IMAGE, cloth_image=IMAGE)
    over = await env.create("try-on", human_image=IMAGE, cloth_image=IMAGE)
    assert over.status_code == 429 and over.json()["code"] == 1303


# -- virtual try-on -------------------------------------------------------------------


async def test_virtual_try_on(env: Env) -> None:
    person = base64.b64encode(png("person")).decode()
    task_id = await env.task_id("try-on", model_name="kolors-virtual-try-on-v1-5", human_image=person,
                                cloth_image="https://example.com/shirt.png", external_task_id="tryon-1")
    data = await env.wait("try-on", "tryon-1")
    assert data["task_id"] == task_id
    (image,) = data["task_result"]["images"]
    got = await env.http.get(image["url"])
    assert image["index"] == 0 and got.content.startswith(PNG_MAGIC)

    # Unsupported garment combinations fail the task, not the request.
    bad = await env.task_id("try-on", human_image=IMAGE,
                            cloth_image="https://example.com/two-shirts.png#[sim:fail=Unsupported garments]")
    failed = await env.wait("try-on", bad)
    assert failed["task_status"] == "failed" and failed["task_status_msg"] == "Unsupported garments"

    await env.refused("try-on", human_image=IMAGE)
    await env.refused("try-on", cloth_image=IMAGE, human_image="data:image/png;base64,AAAA")
    await env.refused("try-on", 404, 1203, model_name="kolors-virtual-try-on-v9", human_image=IMAGE,
                      cloth_image=IMAGE)

    env.sim.config.extra["try_on_external_task_id"] = False  # the UNCONFIRMED variant: ignored
    quiet = await env.task_id("try-on", human_image=IMAGE, cloth_image=IMAGE, external_task_id="tryon-2")
    assert (await env.query("try-on", "tryon-2")).status_code == 404
    assert (await env.wait("try-on", quiet))["task_info"] == {}


# -- video extend -----------------------------------------------------------------------


async def test_extend_a_kling_video_and_extend_again(env: Env) -> None:
    source = await env.video(model_name="kling-v1-6")
    task_id = await env.task_id("video-extend", video_id=source["id"], prompt="the camera pulls back",
                                external_task_id="ext-1")
    assert (await env.query("text2video", task_id)).status_code == 404
    data = await env.wait("video-extend", "ext-1")
    assert data["task_info"]["parent_video"] == source
    assert data["task_info"]["external_task_id"] == "ext-1"
    (video,) = data["task_result"]["videos"]
    assert video["duration"] == "9.6" and video["id"] != source["id"]
    got = await env.http.get(video["url"])
    assert got.content[4:8] == MP4_BOX
    assert got.content != (await env.http.get(source["url"])).content

    again = await env.wait("video-extend", await env.task_id("video-extend", video_id=video["id"]))
    assert again["task_result"]["videos"][0]["duration"] == "14.1"
    assert again["task_info"]["parent_video"]["id"] == video["id"]


async def test_extend_refusals(env: Env) -> None:
    assert "does not exist" in await env.refused("video-extend", video_id="0b1c7c5e-unknown")
    await env.refused("video-extend")  # video_id is required
    newer = await env.video(model_name="kling-v2-6")
    assert "extension" in await env.refused("video-extend", video_id=newer["id"])

    # Not finished yet: the video does not exist.
    running = await env.task_id("text2video", prompt="slow [sim:queue=5]")
    await env.refused("video-extend", video_id=env.sim.tasks[running].data["video_id"])
    failed_id = await env.task_id("text2video", prompt="x [sim:fail]")
    await env.wait("text2video", failed_id)
    await env.refused("video-extend", video_id=env.sim.tasks[failed_id].data["video_id"])

    # At most 3 minutes after extension.
    env.sim.config.extra["durations"] = {"kling-v1": ["5", "10", "176"]}
    long = await env.video(duration="176")
    assert "3 minutes" in await env.refused("video-extend", video_id=long["id"])

    # Older than the retention window; the code is a knob (UNCONFIRMED).
    env.sim.config.extra.update(video_retention_seconds=0.0, extend_reject_code=1203)
    source = await env.video()
    await env.refused("video-extend", 404, 1203, video_id=source["id"])


# -- lip-sync -------------------------------------------------------------------------------


async def test_lip_sync_text_and_audio(env: Env) -> None:
    source = await env.video()
    tts = await env.task_id("lip-sync", input={"video_id": source["id"], "mode": "text2video",
                                               "text": "Hello there", "voice_id": "girlfriend_1_speech02",
                                               "voice_language": "en", "voice_speed": 1.2})
    assert (await env.query("video-extend", tts)).status_code == 404
    data = await env.wait("lip-sync", tts)
    assert data["task_info"]["parent_video"] == source
    (video,) = data["task_result"]["videos"]
    assert video["duration"] == source["duration"]
    assert (await env.http.get(video["url"])).content[4:8] == MP4_BOX

    uploaded = "https://example.com/talking.mp4"
    by_url = await env.task_id("lip-sync", input={"video_url": uploaded, "mode": "audio2video",
                                                  "audio_type": "url", "audio_url": "https://e.com/v.mp3"})
    done = await env.wait("lip-sync", by_url)
    assert done["task_info"]["parent_video"] == {"id": "", "url": uploaded, "duration": ""}
    audio = base64.b64encode(mp3("voice")).decode()
    by_file = await env.task_id("lip-sync", input={"video_id": source["id"], "mode": "audio2video",
                                                   "audio_type": "file", "audio_file": audio})
    assert (await env.wait("lip-sync", by_file))["task_status"] == "succeed"

    # The lip-synced video is a Kling video (it could be lip-synced again) but not extendable.
    await env.refused("video-extend", video_id=video["id"])


LIP_SYNC_REFUSALS: list[tuple[dict[str, Any] | None, str]] = [
    (None, "input: must not be null"),
    ({"video_url": "https://e.com/v.mp4"}, "input.mode: must not be null"),
    ({"video_url": "https://e.com/v.mp4", "mode": "audio2video"}, "Audio type is null"),
    ({"video_url": "https://e.com/v.mp4", "mode": "audio2video", "audio_type": "file",
          "audio_file": "data:audio/mp3;base64,AAAA"}, "data:"),
    ({"video_url": "https://e.com/v.mp4", "mode": "audio2video", "audio_type": "url"}, "audio_url"),
    ({"video_url": "https://e.com/v.mp4", "mode": "text2video", "voice_id": "v"}, "input.text"),
    ({"video_url": "https://e.com/v.mp4", "mode": "text2video", "text": "x" * 121, "voice_id": "v"}, "120"),
    ({"video_url": "https://e.com/v.mp4", "mode": "text2video", "text": "hi"}, "input.voice_id"),
    ({"video_url": "https://e.com/v.mp4", "mode": "text2video", "text": "hi", "voice_id": "v",
          "voice_speed": 3}, "voice_speed"),
    ({"video_url": "https://e.com/v.mp4", "mode": "sing"}, "input.mode"),
    ({"mode": "audio2video", "audio_type": "url", "audio_url": "https://e.com/a.mp3"}, "video_id"),
    ({"video_id": "nope", "video_url": "https://e.com/v.mp4", "mode": "text2video"}, "exactly one"),
    ({"video_id": "unknown-video", "mode": "text2video"}, "does not exist"),
]


async def test_lip_sync_validation(env: Env) -> None:
    for inp, message in LIP_SYNC_REFUSALS:
        assert message in await env.refused("lip-sync", input=inp), inp


# -- effects -----------------------------------------------------------------------------------


async def test_effects_scenes(env: Env) -> None:
    task_id = await env.task_id("effects", effect_scene="hug_pro", external_task_id="fx-1",
                                input={"images": [IMAGE, "https://example.com/b.png"], "duration": "10"})
    data = await env.wait("effects", "fx-1")
    assert data["task_id"] == task_id and data["task_result"]["videos"][0]["duration"] == "10.1"
    assert (await env.http.get(data["task_result"]["videos"][0]["url"])).content[4:8] == MP4_BOX

    assert "exactly 2" in await env.refused("effects", effect_scene="kiss_pro", input={"images": [IMAGE]})
    assert "not supported" in await env.refused("effects", effect_scene="hug",  # retired 2026-01-30
                                                input={"images": [IMAGE, IMAGE]})
    await env.refused("effects", input={"images": [IMAGE, IMAGE]})  # effect_scene is required
    await env.refused("effects", effect_scene="hug_pro", input={"images": [IMAGE, IMAGE], "duration": "7"})
    await env.refused("effects", effect_scene="heart_gesture", input={"images": [IMAGE, IMAGE]})
    await env.task_id("effects", effect_scene="heart_gesture",
                      input={"images": [IMAGE, IMAGE], "model_name": "kling-v1-6", "mode": "std"})

    # The scene list is configuration: a single-image scene takes input.image.
    env.sim.config.extra["effect_scenes"] = {"squish": "single"}
    single = await env.task_id("effects", effect_scene="squish", input={"image": IMAGE})
    assert (await env.wait("effects", single))["task_status"] == "succeed"
    await env.refused("effects", effect_scene="squish", input={"images": [IMAGE, IMAGE]})
    await env.refused("effects", effect_scene="hug_pro", input={"images": [IMAGE, IMAGE]})


# -- multi-image to video -------------------------------------------------------------------


async def test_multi_image_to_video(env: Env) -> None:
    raw = base64.b64encode(png("second")).decode()
    task_id = await env.task_id("multi-image2video", image_list=[{"image": IMAGE}, {"image": raw}],
                                prompt="the two characters meet in a cafe", mode="pro", duration="10",
                                aspect_ratio="9:16")
    data = await env.wait("multi-image2video", task_id)
    assert data["task_result"]["videos"][0]["duration"] == "10.1" and data["final_unit_deduction"] == "7"
    assert env.sim.tasks[task_id].input == {"model_name": "kling-v1-6", "mode": "pro", "duration": "10"}


MULTI_IMAGE_REFUSALS: list[tuple[dict[str, Any], int, int]] = [
    ({"prompt": ""}, 400, 1201),
    ({"image_list": []}, 400, 1201),
    ({"image_list": [{"image": IMAGE}] * 5}, 400, 1201),
    ({"image_list": [{"url": IMAGE}]}, 400, 1201),
    ({"aspect_ratio": "4:3"}, 400, 1201),
    ({"duration": "7"}, 400, 1201),
    ({"model_name": "kling-v2-6"}, 404, 1203),
]


async def test_multi_image_validation(env: Env) -> None:
    valid = {"prompt": "meet", "image_list": [{"image": IMAGE}, {"image": IMAGE}]}
    for body, status, code in MULTI_IMAGE_REFUSALS:
        await env.refused("multi-image2video", status, code, **(valid | body))


# -- shared envelope, auth and traps ----------------------------------------------------


async def test_every_route_needs_the_jwt(env: Env) -> None:
    for path in PATHS.values():
        r = await env.http.post(path, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["code"] == 1001, path
        r = await env.http.get(f"{path}/123", headers={"Authorization": "Bearer not-a-jwt"})
        assert r.status_code == 401 and r.json()["code"] == 1002, path
        r = await env.http.get(path, headers={"Authorization": f"Bearer {make_token(secret_key='wrong')}"})
        assert r.status_code == 401 and r.json()["code"] == 1000, path
    assert env.sim.stats.creations == 0


async def test_failed_inside_code_zero_and_request_level_traps(env: Env) -> None:
    failed = await env.wait("generations", await env.task_id("generations", prompt="a fox [sim:filtered]"))
    assert failed["task_status"] == "failed" and "risk control" in failed["task_status_msg"]
    assert failed["task_result"] == {} and failed["final_unit_deduction"] == "0"
    fx = await env.task_id("effects", effect_scene="hug_pro",
                           input={"images": [IMAGE, "https://example.com/b.png?q=[sim:fail]"]})
    assert (await env.wait("effects", fx))["task_status"] == "failed"

    await env.refused("generations", 429, 1102, prompt="x [sim:balance]")
    await env.refused("lip-sync", 400, 1301, input={"video_url": "https://e.com/v.mp4", "mode": "text2video",
                                                    "text": "[sim:blocked]", "voice_id": "v"})
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "create", "after_effect": True}])
    r = await env.create("try-on", human_image=IMAGE, cloth_image=IMAGE, external_task_id="amb-1")
    assert r.status_code == 502 and r.json()["code"] == 5000
    assert (await env.query("try-on", "amb-1")).json()["data"]["task_status"] in ("submitted", "processing")
    dup = await env.create("generations", prompt="x", external_task_id="amb-1")  # unique per account
    assert dup.status_code == 400 and dup.json()["code"] == 1201


async def test_output_urls_expire(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.3
    data = await env.wait("generations", await env.task_id("generations", prompt="a fox", n=2))
    url = data["task_result"]["images"][1]["url"]
    assert (await env.http.get(url)).status_code == 200
    assert (await env.http.get(url.replace("-1_raw", "-2_raw"))).status_code == 404  # never signed
    await asyncio.sleep(0.35)
    assert (await env.http.get(url)).status_code == 404


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

        async def hook(request: Request) -> Response:
            self.bodies.append(await request.json())
            return JSONResponse({"ok": True})

        self.app = Starlette(routes=[Route("/cb", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.bodies) >= n:
                break
            await asyncio.sleep(0.02)


async def test_callbacks_carry_the_bare_task_object(env: Env) -> None:
    rx = Receiver()
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/cb?token=per-job-secret"
        image_task = await env.task_id("generations", prompt="a fox", n=2, callback_url=url)
        await rx.wait_for(2)
        assert [(b["task_id"], b["task_status"]) for b in rx.bodies] == [(image_task, "processing"),
                                                                         (image_task, "succeed")]
        assert "code" not in rx.bodies[-1] and len(rx.bodies[-1]["task_result"]["images"]) == 2

        rx.bodies.clear()
        source = await env.video()
        await env.task_id("video-extend", video_id=source["id"], callback_url=url)
        await rx.wait_for(2)
        assert [b["task_status"] for b in rx.bodies] == ["processing", "succeed"]
        assert rx.bodies[-1]["task_info"]["parent_video"]["id"] == source["id"]
