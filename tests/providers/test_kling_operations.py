"""Kling's further families through the real API and worker, against the Kling simulator: image
generation, multi-image-to-video, and the follow-ups extend, lip_sync, effects and try_on (issue 16)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.redis_server import free_port
from orchestrator.store.jobs import JobStore
from providers.sandbox.kling import EFFECT_SCENES
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

IMAGE_A = "https://example.com/a.png"
IMAGE_B = "https://example.com/b.png"
CLOTH = "https://example.com/shirt.png"
AUDIO = "https://example.com/voice.mp3"


def sim(stack: Stack) -> Any:
    return stack.simulators["kling"]


def sim_task(stack: Stack, job: dict[str, Any]) -> Any:
    return sim(stack).tasks[job["provider_task_id"]]


def sent(stack: Stack, job: dict[str, Any]) -> dict[str, Any]:
    """The create body the simulator received for a job, with our callback URL checked and set aside."""
    body = dict(sim_task(stack, job).data["body"])
    callback = body.pop("callback_url")
    assert callback.startswith(f"{stack.api_url}/v1/callbacks/kling?job={job['id']}&token=")
    return body


def served(stack: Stack, job: dict[str, Any]) -> list[str]:
    """The result URLs Kling shows for a job's task (videos or images)."""
    result = sim(stack).task_object(sim_task(stack, job), stack.simulator_url("kling"))["task_result"]
    return [item["url"] for item in result.get("videos") or result["images"]]


async def assert_stored_equals_served(client: httpx.AsyncClient, output: dict[str, Any], served_url: str) -> None:
    async with httpx.AsyncClient() as raw:
        from_kling = await raw.get(served_url)  # a signed CDN URL: no auth
    stored = await client.get(output["url"])
    assert from_kling.status_code == 200 and stored.status_code == 200
    assert (hashlib.sha256(from_kling.content).hexdigest() == output["sha256"]
            == hashlib.sha256(stored.content).hexdigest())


async def assert_all_stored(stack: Stack, client: httpx.AsyncClient, job: dict[str, Any]) -> None:
    urls = served(stack, job)
    assert len(job["outputs"]) == len(urls)
    for output, url in zip(job["outputs"], urls, strict=True):
        await assert_stored_equals_served(client, output, url)


async def sha256_at(url: str) -> str:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(url)
    assert resp.status_code == 200, url
    return hashlib.sha256(resp.content).hexdigest()


async def kling(client: httpx.AsyncClient, kind: str = "video", model: str = "kling-v1-6",
                **body: Any) -> dict[str, Any]:
    return await submit(client, provider="kling", kind=kind, model=model, **({"input": {}} | body))


async def finished(client: httpx.AsyncClient, *jobs: dict[str, Any]) -> list[dict[str, Any]]:
    done = await asyncio.gather(*(wait_for(client, job["id"]) for job in jobs))
    for job in done:
        assert job["status"] == "succeeded", job
    return list(done)


async def provider_state(stack: Stack, job_id: str) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None
    return dict(job.provider_state)


# -- image generation and multi-image-to-video ------------------------------------------------

async def test_image_generation_gives_n_outputs_and_a_stored_image_can_be_the_reference(stack):
    async with api(stack) as client:
        (job,) = await finished(client, await kling(client, kind="image", model="kling-v2-1", input={
            "prompt": "a watercolor fox in a birch forest", "num_outputs": 3, "aspect_ratio": "1:1",
            "resolution": "2k", "options": {"watermark_info": {"enabled": False}}}))
        await assert_all_stored(stack, client, job)
        # Its second image as the reference of a kling-v1-5 face-reference image (generate with a source).
        (ref,) = await finished(client, await kling(client, kind="image", model="kling-v1-5",
                                                    source={"job_id": job["id"], "output": 1}, input={
            "prompt": "the same fox, as an oil painting", "options": {"n": 2, "image_reference": "face",
                                                                     "human_fidelity": 0.6}}))
        await assert_all_stored(stack, client, ref)
    assert [o["content_type"] for o in job["outputs"]] == ["image/png"] * 3
    assert [o["metadata"]["index"] for o in job["outputs"]] == [0, 1, 2]
    assert len({o["sha256"] for o in job["outputs"]}) == 3  # three images, not one thrice
    assert sim_task(stack, job).data["family"] == "generations"
    assert sent(stack, job) == {"model_name": "kling-v2-1", "prompt": "a watercolor fox in a birch forest", "n": 3,
                                "resolution": "2k", "aspect_ratio": "1:1", "watermark_info": {"enabled": False},
                                "external_task_id": job["id"]}
    body = sent(stack, ref)
    assert await sha256_at(body.pop("image")) == job["outputs"][1]["sha256"]  # the stored copy, as a URL
    assert body == {"model_name": "kling-v1-5", "prompt": "the same fox, as an oil painting", "n": 2,
                    "image_reference": "face", "human_fidelity": 0.6, "external_task_id": ref["id"]}
    assert len(ref["outputs"]) == 2
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 2 and stats["requests"]["get"] >= 2  # polled on /v1/images/generations


async def test_options_images_route_a_video_to_multi_image_to_video(stack):
    async with api(stack) as client:
        (job,) = await finished(client, await kling(client, input={
            "prompt": "the two characters meet in a cafe", "image_url": IMAGE_A, "duration_seconds": 10,
            "aspect_ratio": "9:16", "options": {"images": [IMAGE_B, "iVBORw0KGgo="], "mode": "pro"}}))
        await assert_all_stored(stack, client, job)
    assert sim_task(stack, job).data["family"] == "multi-image2video"
    assert sent(stack, job) == {"model_name": "kling-v1-6", "prompt": "the two characters meet in a cafe",
                                "image_list": [{"image": IMAGE_A}, {"image": IMAGE_B}, {"image": "iVBORw0KGgo="}],
                                "duration": "10", "aspect_ratio": "9:16", "mode": "pro",
                                "external_task_id": job["id"]}
    assert job["outputs"][0]["content_type"] == "video/mp4"


# -- extend --------------------------------------------------------------------------------------

async def test_extend_continues_the_source_by_its_kling_video_id_and_again(stack):
    async with api(stack) as client:
        (source,) = await finished(client, await kling(client, input={"prompt": "a lighthouse at dusk",
                                                                       "duration_seconds": 5}))
        video_id = sim(stack).task_object(sim_task(stack, source), "")["task_result"]["videos"][0]["id"]
        # What the adapter learnt while polling the source, kept for follow-ups.
        assert (await provider_state(stack, source["id"]))["video_ids"] == [video_id]
        assert source["outputs"][0]["metadata"]["id"] == video_id
        (extended,) = await finished(client, await kling(client, operation="extend", source={"job_id": source["id"]},
                                                         input={"prompt": "the camera pulls back to the sea",
                                                                "options": {"cfg_scale": 0.4}}))
        await assert_all_stored(stack, client, extended)
        (again,) = await finished(client, await kling(client, operation="extend", source={"job_id": extended["id"]},
                                                      input={}))
        await assert_all_stored(stack, client, again)
    assert sim_task(stack, extended).data["family"] == "video-extend"
    assert sent(stack, extended) == {"video_id": video_id, "prompt": "the camera pulls back to the sea",
                                     "cfg_scale": 0.4, "external_task_id": extended["id"]}
    output = extended["outputs"][0]
    assert output["metadata"]["parent_video_id"] == video_id and output["metadata"]["duration"] == "9.6"
    assert output["sha256"] != source["outputs"][0]["sha256"]
    # An extension is itself extendable: by the id learnt while polling the extension.
    assert sent(stack, again) == {"video_id": output["metadata"]["id"], "external_task_id": again["id"]}
    assert again["outputs"][0]["metadata"]["duration"] == "14.1"


# -- lip-sync ------------------------------------------------------------------------------------

async def test_lip_sync_by_kling_video_id_or_by_the_stored_url_of_any_video(stack):
    async with api(stack) as client:
        kling_video, luma_video = await finished(
            client, await kling(client, input={"prompt": "a news anchor at a desk"}),
            await submit(client, provider="luma", kind="video", model="ray-2",
                         input={"prompt": "a singer on a stage"}))
        options = {"text": "Good evening, here is the news.", "voice_id": "genshin_vindi2", "voice_language": "en",
                   "voice_speed": 1.2}
        spoken, sung, failing = await asyncio.gather(
            kling(client, operation="lip_sync", source={"job_id": kling_video["id"]}, input={"options": options}),
            kling(client, operation="lip_sync", source={"job_id": luma_video["id"]},
                  input={"options": {"audio_url": AUDIO}}),
            kling(client, operation="lip_sync", source={"job_id": kling_video["id"]},
                  input={"options": {"text": "oops [sim:fail=there is no human in the video]", "voice_id": "v1"}}))
        spoken, sung = await finished(client, spoken, sung)
        failed = await wait_for(client, failing["id"])
        await assert_all_stored(stack, client, spoken)
        await assert_all_stored(stack, client, sung)
    video_id = kling_video["outputs"][0]["metadata"]["id"]
    assert sim_task(stack, spoken).data["family"] == "lip-sync"
    # Everything nested under input; no external_task_id (the legacy body documents none).
    assert sent(stack, spoken) == {"input": {"video_id": video_id, "mode": "text2video", **options}}
    assert spoken["outputs"][0]["metadata"]["parent_video_id"] == video_id
    body = sent(stack, sung)
    assert await sha256_at(body["input"].pop("video_url")) == luma_video["outputs"][0]["sha256"]
    assert body == {"input": {"mode": "audio2video", "audio_type": "url", "audio_url": AUDIO}}
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_failed"
    assert "there is no human in the video" in failed["error"]["message"]
    assert (await sim_stats(stack, "kling"))["creations"] == 4


# -- effects -------------------------------------------------------------------------------------

async def test_effects_on_a_source_image_on_two_images_and_on_a_legacy_scene(stack):
    sim(stack).config.extra["effect_scenes"] = {**EFFECT_SCENES, "bloombloom": "single"}
    async with api(stack) as client:
        (image,) = await finished(client, await kling(client, kind="image", model="kling-v1",
                                                      input={"prompt": "a portrait of a gardener"}))
        single, dual, legacy = await finished(
            client,
            await kling(client, operation="effects", source={"job_id": image["id"]},
                        input={"options": {"effect_scene": "bloombloom"}}),
            await kling(client, operation="effects",
                        input={"duration_seconds": 10, "options": {"effect_scene": "hug_pro",
                                                                   "images": [IMAGE_A, IMAGE_B]}}),
            await kling(client, operation="effects", model="kling-v1-5", input={
                "image_url": IMAGE_A, "options": {"effect_scene": "heart_gesture", "images": [IMAGE_B],
                                                  "mode": "pro", "duration": "5"}}))
        for job in (single, dual, legacy):
            await assert_all_stored(stack, client, job)
    body = sent(stack, single)
    assert await sha256_at(body["input"].pop("image")) == image["outputs"][0]["sha256"]
    assert body == {"effect_scene": "bloombloom", "input": {}, "external_task_id": single["id"]}
    assert sent(stack, dual) == {"effect_scene": "hug_pro", "input": {"images": [IMAGE_A, IMAGE_B], "duration": "10"},
                                 "external_task_id": dual["id"]}
    assert sent(stack, legacy) == {"effect_scene": "heart_gesture", "external_task_id": legacy["id"], "input": {
        "images": [IMAGE_A, IMAGE_B], "duration": "5", "model_name": "kling-v1-5", "mode": "pro"}}
    assert {sim_task(stack, job).data["family"] for job in (single, dual, legacy)} == {"effects"}
    assert dual["outputs"][0]["metadata"]["duration"] == "10.1"


# -- try-on --------------------------------------------------------------------------------------

async def test_try_on_dresses_the_source_person_in_the_garment(stack):
    async with api(stack) as client:
        (person,) = await finished(client, await kling(client, kind="image", model="kling-v2",
                                                       input={"prompt": "a person standing, full body"}))
        (dressed,) = await finished(client, await kling(client, kind="image", model="kolors-virtual-try-on-v1-5",
                                                        operation="try_on", source={"job_id": person["id"]},
                                                        input={"options": {"cloth_image": CLOTH}}))
        await assert_all_stored(stack, client, dressed)
    assert sim_task(stack, dressed).data["family"] == "kolors-virtual-try-on"
    body = sent(stack, dressed)
    assert await sha256_at(body.pop("human_image")) == person["outputs"][0]["sha256"]
    assert body == {"model_name": "kolors-virtual-try-on-v1-5", "cloth_image": CLOTH,
                    "external_task_id": dressed["id"]}
    (output,) = dressed["outputs"]
    assert output["content_type"] == "image/png" and output["sha256"] != person["outputs"][0]["sha256"]


# -- ambiguous submissions in the new families ---------------------------------------------------

async def test_ambiguous_creates_are_reconciled_in_their_own_namespace_or_fail_without_resubmitting(stack):
    async with api(stack) as client:
        (video,) = await finished(client, await kling(client, input={"prompt": "a talking parrot"}))
        # Kling creates the task, then the answer is lost (HTTP 500 / code 5000 after the effect).
        await sim_faults(stack, "kling", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
        (image,) = await finished(client, await kling(client, kind="image", model="kling-v1",
                                                      input={"prompt": "a parrot", "num_outputs": 2}))
        await sim_faults(stack, "kling", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
        lip = await wait_for(client, (await kling(client, operation="lip_sync", source={"job_id": video["id"]},
                                                  input={"options": {"audio_url": AUDIO}}))["id"])
    # Image generation is looked up by external_task_id under /v1/images/generations: one creation.
    assert sim_task(stack, image).data["external_task_id"] == image["id"] and len(image["outputs"]) == 2
    # Legacy lip-sync carries no external id, so nothing can be looked up: failed, never sent again.
    assert lip["status"] == "failed" and lip["error"]["code"] == "provider_outcome_unknown"
    stats = await sim_stats(stack, "kling")
    assert stats["creations"] == 3 and stats["duplicate_identities"] == {}


# -- refusals ------------------------------------------------------------------------------------

async def test_follow_ups_and_new_families_are_refused_at_acceptance_with_the_field_named(stack):
    async with api(stack) as client:
        v16, v2, image, luma = await finished(
            client,
            await kling(client, input={"prompt": "a river"}),
            await kling(client, model="kling-v2-master", input={"prompt": "a river"}),
            await kling(client, kind="image", model="kling-v1", input={"prompt": "a face"}),
            await submit(client, provider="luma", kind="video", model="ray-2", input={"prompt": "a river"}))
        running = await kling(client, input={"prompt": "a slow river [sim:run=30]"})
        await wait_for(client, running["id"], {"submitted", "running"})
        creations = (await sim_stats(stack, "kling"))["creations"]

        def follow(op: str, job: dict[str, Any] | None, **body: Any) -> dict[str, Any]:
            return {"operation": op, **({"source": {"job_id": job["id"]}} if job else {}), **body}

        speech = {"text": "hello there", "voice_id": "v1"}
        refused: list[tuple[dict[str, Any], int, str]] = [
            # extend
            (follow("extend", None), 422, "source"),
            (follow("extend", luma), 422, "source"),  # another provider's video
            (follow("extend", v16, kind="image"), 422, "kind"),  # an extension is a video
            (follow("extend", image), 422, "source"),  # a Kling image, not a video
            (follow("extend", running), 409, "source.job_id"),  # not succeeded
            (follow("extend", v2, model="kling-v2-master"), 422, "operation"),  # not offered for v2 models
            (follow("extend", v2), 422, "source"),  # a v2 video cannot be extended
            (follow("extend", v16, model="kling-v1"), 422, "model"),  # the source's model continues it
            (follow("extend", v16, input={"options": {"cfg_scale": 2}}), 422, "input.options.cfg_scale"),
            (follow("extend", v16, input={"image_url": IMAGE_A}), 422, "input.image_url"),
            (follow("extend", v16, input={"options": {"camera_control": {}}}), 422, "input.options.camera_control"),
            # lip_sync
            (follow("lip_sync", None, input={"options": speech}), 422, "source"),
            (follow("lip_sync", image, input={"options": speech}), 422, "source"),
            (follow("lip_sync", v16), 422, "input.options.text"),
            (follow("lip_sync", v16, input={"options": {**speech, "text": "x" * 121}}), 422, "input.options.text"),
            (follow("lip_sync", v16, input={"options": {"text": "hi"}}), 422, "input.options.voice_id"),
            (follow("lip_sync", v16, input={"options": {**speech, "voice_speed": 2.5}}), 422,
             "input.options.voice_speed"),
            (follow("lip_sync", v16, input={"options": {**speech, "voice_speed": 0.7}}), 422,
             "input.options.voice_speed"),
            (follow("lip_sync", v16, input={"options": {**speech, "voice_language": "fr"}}), 422,
             "input.options.voice_language"),
            (follow("lip_sync", v16, input={"options": {**speech, "audio_url": AUDIO}}), 422,
             "input.options.audio_url"),
            (follow("lip_sync", v16, input={"options": {"audio_url": "ftp://example.com/a.mp3"}}), 422,
             "input.options.audio_url"),
            (follow("lip_sync", v16, input={"options": {"audio_url": AUDIO, "voice_speed": 1.0}}), 422,
             "input.options.voice_speed"),
            (follow("lip_sync", v16, input={"options": {"audio_file": "data:audio/mpeg;base64,AAAA"}}), 422,
             "input.options.audio_file"),
            (follow("lip_sync", v16, input={"prompt": "say hi", "options": speech}), 422, "input.prompt"),
            (follow("lip_sync", v16, kind="image", model="kling-v1", input={"options": speech}), 422, "kind"),
            # effects
            (follow("effects", None, input={"image_url": IMAGE_A, "options": {"effect_scene": "hug"}}), 422,
             "input.options.effect_scene"),  # retired
            (follow("effects", None, input={"image_url": IMAGE_A}), 422, "input.options.effect_scene"),
            (follow("effects", None, input={"image_url": IMAGE_A, "options": {"effect_scene": "hug_pro"}}), 422,
             "input.image_url"),  # a dual-image scene with one image
            (follow("effects", None, input={"options": {"effect_scene": "hug_pro", "images": [IMAGE_A] * 3}}), 422,
             "input.options.images"),
            (follow("effects", None, input={"options": {"effect_scene": "some_scene"}}), 422, "input.image_url"),
            (follow("effects", None, input={"duration_seconds": 7, "options": {"effect_scene": "hug_pro",
                                                                                "images": [IMAGE_A, IMAGE_B]}}),
             422, "input.duration_seconds"),
            (follow("effects", None, input={"options": {"effect_scene": "hug_pro", "images": [IMAGE_A, IMAGE_B],
                                                        "duration": "7"}}), 422, "input.options.duration"),
            (follow("effects", None, input={"options": {"effect_scene": "hug_pro", "images": [IMAGE_A, IMAGE_B],
                                                        "mode": "pro"}}), 422, "input.options.mode"),
            (follow("effects", v16, input={"options": {"effect_scene": "bloombloom"}}), 422, "source"),  # a video
            (follow("effects", None, model="kolors-virtual-try-on-v1", kind="image"), 422, "operation"),
            # try_on
            (follow("try_on", image, kind="image", model="kling-v1", input={"options": {"cloth_image": CLOTH}}),
             422, "operation"),  # only the Kolors models
            (follow("try_on", image, model="kolors-virtual-try-on-v1", input={"options": {"cloth_image": CLOTH}}),
             422, "kind"),
            (follow("try_on", image, kind="image", model="kolors-virtual-try-on-v1"), 422, "input.options.cloth_image"),
            (follow("try_on", image, kind="image", model="kolors-virtual-try-on-v1",
                    input={"options": {"cloth_image": "data:image/png;base64,AAAA"}}), 422,
             "input.options.cloth_image"),
            (follow("try_on", None, kind="image", model="kolors-virtual-try-on-v1",
                    input={"options": {"cloth_image": CLOTH}}), 422, "input.image_url"),
            (follow("try_on", v16, kind="image", model="kolors-virtual-try-on-v1",
                    input={"options": {"cloth_image": CLOTH}}), 422, "source"),  # a video, not a person
            # image generation
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "options": {"n": 10}}}, 422,
             "input.options.n"),
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "aspect_ratio": "5:4"}}, 422,
             "input.aspect_ratio"),
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "resolution": "4k"}}, 422,
             "input.resolution"),
            ({"kind": "image", "model": "kling-v1", "input": {}}, 422, "input.prompt"),
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "duration_seconds": 5}}, 422,
             "input.duration_seconds"),
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "negative_prompt": "blur",
                                                              "image_url": IMAGE_A}}, 422, "input.negative_prompt"),
            ({"kind": "image", "model": "kling-v2", "input": {"prompt": "x", "image_url": IMAGE_A,
                                                              "options": {"image_reference": "face"}}}, 422,
             "input.options.image_reference"),
            ({"kind": "image", "model": "kling-v1", "input": {"prompt": "x", "image_url": IMAGE_A,
                                                              "options": {"image_fidelity": 1.5}}}, 422,
             "input.options.image_fidelity"),
            ({"kind": "image", "model": "kolors-virtual-try-on-v1", "input": {"prompt": "x"}}, 422, "model"),
            ({"kind": "image", "model": "kling-v1", "source": {"job_id": v16["id"]}, "input": {"prompt": "x"}},
             422, "source"),  # generate takes a source image, not a video
            # multi-image-to-video
            ({"model": "kling-v1", "input": {"prompt": "x", "options": {"images": [IMAGE_A]}}}, 422, "model"),
            ({"input": {"prompt": "x", "options": {"images": [IMAGE_A] * 5}}}, 422, "input.options.images"),
            ({"input": {"options": {"images": [IMAGE_A]}}}, 422, "input.prompt"),
            ({"input": {"prompt": "x", "options": {"images": ["data:image/png;base64,AAAA"]}}}, 422,
             "input.options.images"),
            ({"input": {"prompt": "x", "options": {"images": [IMAGE_A], "image_tail": IMAGE_B}}}, 422,
             "input.options.image_tail"),
        ]
        for overrides, status, field in refused:
            body = {"provider": "kling", "kind": "video", "model": "kling-v1-6", "input": {}} | overrides
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == status, (overrides, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["errors"][0]["field"] == field, (overrides, resp.json())
    assert (await sim_stats(stack, "kling"))["creations"] == creations  # nothing refused reached Kling


async def test_a_gateway_is_only_given_text_and_image_to_video(redis_url):
    port = free_port()
    async with dev_stack(redis_url=redis_url, sandbox_port=port, log_format="text",
                         kling_base_url=f"http://127.0.0.1:{port}/gateway-kling/kling",
                         kling_api_key="sk-atelier0gateway0key") as stack, api(stack) as client:
        cases = [({"kind": "image", "model": "kling-v1"}, "kind"),
                 ({"input": {"prompt": "x", "options": {"images": [IMAGE_A]}}}, "input.options.images"),
                 ({"operation": "effects", "input": {"options": {"effect_scene": "hug_pro",
                                                                 "images": [IMAGE_A, IMAGE_B]}}}, "operation")]
        for overrides, field in cases:
            body = {"provider": "kling", "kind": "video", "model": "kling-v1-6", "input": {"prompt": "x"}} | overrides
            resp = await client.post("/v1/jobs", json=body)
            assert resp.status_code == 422, resp.text
            assert resp.json()["errors"][0]["field"] == field and "gateway" in resp.json()["errors"][0]["message"]
        done = await wait_for(client, (await kling(client, input={"prompt": "a cat"}))["id"])
    assert done["status"] == "succeeded", done  # text-to-video still goes through
