"""Follow-up jobs: an ``operation`` on a ``source`` job (the provider's own task, or a stored output
handed to another provider), validated with the field named, through the real API and worker."""

from __future__ import annotations

import redis.asyncio

from orchestrator.cli.devstack import Stack
from orchestrator.store.tenants import create_api_key
from tests.helpers import api, submit, wait_for


async def sora_video(client, prompt: str = "a fox in the snow") -> dict:
    job = await submit(client, provider="sora", kind="video", model="sora-2", input={"prompt": prompt})
    return await wait_for(client, job["id"], timeout=60)


async def test_sora_remix_acts_on_the_source_task_with_its_key(stack: Stack) -> None:
    async with api(stack) as client:
        source = await sora_video(client)
        assert source["status"] == "succeeded", source
        remix = await submit(client, provider="sora", kind="video", model="sora-2", operation="remix",
                             source={"job_id": source["id"]}, input={"prompt": "the same fox, at night"})
        assert remix["operation"] == "remix" and remix["source"] == {"job_id": source["id"], "output": 0}
        done = await wait_for(client, remix["id"], timeout=60)
    assert done["status"] == "succeeded", done
    sim = stack.simulators["sora"]
    task = sim.tasks[done["provider_task_id"]]  # type: ignore[attr-defined]
    assert task.data["remixed_from"] == source["provider_task_id"]
    assert done["outputs"][0]["content_type"] == "video/mp4"


async def test_generate_with_a_source_hands_its_stored_output_to_another_provider(stack: Stack) -> None:
    async with api(stack) as client:
        image = await submit(client, input={"prompt": "a red fox, portrait"})
        image = await wait_for(client, image["id"])
        assert image["status"] == "succeeded", image
        video = await submit(client, provider="kling", kind="video", model="kling-v2-1",
                             source={"job_id": image["id"]}, input={"prompt": "the fox turns its head"})
        assert video["source"]["job_id"] == image["id"] and video["operation"] == "generate"
        done = await wait_for(client, video["id"], timeout=60)
    assert done["status"] == "succeeded", done
    task = stack.simulators["kling"].tasks[done["provider_task_id"]]  # type: ignore[attr-defined]
    assert task.data["family"] == "image2video"  # the source's output became the input image


async def test_follow_ups_are_refused_with_the_field_named(stack: Stack) -> None:
    async with api(stack) as client:
        running = await submit(client, provider="sora", kind="video", model="sora-2",
                               input={"prompt": "a slow one [sim:run=30]"})
        image = await wait_for(client, (await submit(client, input={"prompt": "a cat"}))["id"])
        other = await create_api_key(redis.asyncio.Redis.from_url(stack.settings.redis_url), "other")

        async def refused(body: dict, status: int, field: str) -> None:
            resp = await client.post("/v1/jobs", json={"provider": "sora", "kind": "video", "model": "sora-2",
                                                       "input": {"prompt": "x"}} | body)
            assert resp.status_code == status, resp.text
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["errors"][0]["field"] == field, resp.json()

        await refused({"operation": "upscale"}, 422, "operation")
        await refused({"operation": "remix"}, 422, "source")  # a remix needs its source
        await refused({"operation": "remix", "source": {"job_id": running["id"]}}, 409, "source.job_id")
        await refused({"operation": "remix", "source": {"job_id": image["id"]}}, 422, "source")  # not a sora task
        await refused({"source": {"job_id": image["id"], "output": 5}}, 422, "source.output")
        await refused({"source": {"job_id": "job_doesnotexist"}}, 404, "source.job_id")
        async with api(stack, other) as stranger:
            resp = await stranger.post("/v1/jobs", json={"provider": "kling", "kind": "video", "model": "kling-v2-1",
                                                         "source": {"job_id": image["id"]}, "input": {"prompt": "x"}})
            assert resp.status_code == 404, resp.text  # another tenant's job does not exist for this one



async def test_an_openai_image_then_a_kling_image_to_video_of_it(stack: Stack) -> None:
    """Issue 14's cross-provider chain: a synchronous image, then a video made from its stored copy."""
    async with api(stack) as client:
        image = await submit(client, provider="openai", kind="image", model="gpt-image-1",
                             input={"prompt": "a red fox, portrait"})
        image = await wait_for(client, image["id"])
        assert image["status"] == "succeeded" and image["outputs"][0]["content_type"] == "image/png", image
        video = await submit(client, provider="kling", kind="video", model="kling-v2-1",
                             source={"job_id": image["id"]}, input={"prompt": "the fox turns its head"})
        done = await wait_for(client, video["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["source"] == {"job_id": image["id"], "output": 0}
    assert stack.simulators["kling"].tasks[done["provider_task_id"]].data["family"] == "image2video"  # type: ignore[attr-defined]
