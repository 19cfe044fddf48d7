"""A job through the real API, worker, Redis, simulator and storage, with a verified webhook."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from standardwebhooks import Webhook

from orchestrator.cli.devstack import dev_stack
from orchestrator.infra.redis_server import free_port
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for


async def test_image_job_end_to_end_with_signed_webhook(stack):
    receiver = WebhookReceiver()
    async with serving(receiver.app) as hook_base, api(stack) as client:
        job = await submit(client, webhook_url=f"{hook_base}/hook", metadata={"order": 7},
                           input={"prompt": "a red fox", "num_outputs": 2, "seed": 3})
        assert job["id"].startswith("job_") and job["status"] == "queued"
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["provider_task_id"] and done["attempts"] == 1 and done["progress"] == 100
        assert set(done["timestamps"]) == {"queued", "submitting", "submitted", "running", "succeeded"}
        assert done["metadata"] == {"order": 7}
        assert len(done["outputs"]) == 2
        for output in done["outputs"]:
            body = (await client.get(output["url"])).content
            assert hashlib.sha256(body).hexdigest() == output["sha256"]
            assert output["bytes"] == len(body) and output["content_type"] == "image/png"
            assert output["width"] == 32 and output["height"] == 32
        assert len({o["sha256"] for o in done["outputs"]}) == 2  # distinct files, not one copied

        await receiver.wait(2)
        secret = (await client.get("/v1/webhook-secret")).json()["secret"]
        verifier = Webhook(secret)
        events = []
        for headers, body in receiver.deliveries:
            events.append(verifier.verify(body, headers))  # raises on a bad signature
        assert [e["type"] for e in events] == ["job.running", "job.succeeded"]
        assert events[-1]["data"]["id"] == job["id"]
        assert events[-1]["data"]["outputs"][0]["sha256"] == done["outputs"][0]["sha256"]
        assert events[0]["sequence"] < events[1]["sequence"]
        assert len({h["webhook-id"] for h, _ in receiver.deliveries}) == 2

        log = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
        assert [e["type"] for e in log] == ["job.created", "job.submitting", "job.submitted", "job.running",
                                            "job.succeeded"]
        seqs = [e["sequence"] for e in log]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.parametrize(("model", "ctype"), [("minimax/video-01", "video/mp4"), ("meta/musicgen", "audio/mpeg")])
async def test_video_and_audio_outputs(stack, model, ctype):
    kind = "video" if ctype.startswith("video") else "audio"
    async with api(stack) as client:
        job = await submit(client, kind=kind, model=model, input={"prompt": "x", "duration_seconds": 5})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        assert output["content_type"] == ctype
        if kind == "video":
            assert (output["width"], output["height"], output["duration_seconds"]) == (64, 64, 1.0)


async def test_version_model_and_input_mapping(stack):
    version = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"  # a real stability-ai/sdxl version
    async with api(stack) as client:
        job = await submit(client, model=f"stability-ai/sdxl:{version}",
                           input={"prompt": "p", "negative_prompt": "n", "seed": 9, "aspect_ratio": "1:1",
                                  "options": {"guidance_scale": 3.5}})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded"
    sim = stack.simulators["replicate"]
    task = sim.tasks[done["provider_task_id"]]  # type: ignore[attr-defined]
    assert task.input == {"prompt": "p", "negative_prompt": "n", "seed": 9, "aspect_ratio": "1:1",
                          "guidance_scale": 3.5}
    assert task.data["version"] == version


async def test_cancel_running_job_tells_provider(stack):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=30]"})
        await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled"
        for _ in range(50):
            job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if job["note"] == "the provider was told to stop the task":
                break
            import asyncio
            await asyncio.sleep(0.1)
        assert job["note"] == "the provider was told to stop the task"
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200  # idempotent
    async with httpx.AsyncClient() as c:
        pred = (await c.get(f"{stack.simulator_url('replicate')}/v1/predictions/{job['provider_task_id']}",
                            headers={"Authorization": "Bearer sandbox-key"})).json()
    assert pred["status"] == "canceled"


async def test_cancel_queued_and_finished(stack):
    async with api(stack) as client:
        job = await submit(client)
        done = await wait_for(client, job["id"])
        resp = await client.post(f"/v1/jobs/{done['id']}/cancel")
        assert resp.status_code == 409
        assert resp.headers["content-type"] == "application/problem+json"


@pytest.fixture
def moto_s3() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="renders")
    yield url
    server.stop()


async def test_outputs_in_s3_via_moto_server(redis_url, moto_s3):
    async with dev_stack(redis_url=redis_url, storage_url="s3://renders/atelier", s3_endpoint_url=moto_s3,
                         log_format="text") as stack, api(stack) as client:
        job = await submit(client, kind="video", model="minimax/video-01", input={"prompt": "sea"})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        assert output["url"].startswith(moto_s3 + "/renders/atelier/") and "X-Amz-Signature" in output["url"]
        async with httpx.AsyncClient() as plain:
            body = (await plain.get(output["url"])).content
        assert hashlib.sha256(body).hexdigest() == output["sha256"]
        head = boto3.client("s3", endpoint_url=moto_s3).head_object(
            Bucket="renders", Key=f"atelier/dev/{job['id']}/0.mp4")
        assert head["ContentType"] == "video/mp4" and head["Metadata"]["sha256"] == output["sha256"]
