"""The OpenAI Images adapter against the OpenAI Images simulator, through the real API and worker.

A synchronous provider: the create request answers with the images, so what matters most is that
an answer lost after the image was made (and billed) is never paid for twice.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers.contract import GenerationRequest, MediaInput, MediaKind, ProviderSettings
from providers.errors import InvalidInput
from providers.openai import OpenAIProvider
from providers.sandbox import media
from providers.sandbox.openai_images import ImageJob, OpenAIImagesSimulator
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

RUN = 0.05  # the simulator's run time per image request (seconds)


@pytest.fixture
async def oai(stack: Stack) -> Stack:
    stack.simulators["openai"].config.run_seconds = RUN
    return stack


@pytest.fixture
async def short_timeout(redis_url: str) -> AsyncIterator[Stack]:
    """A stack whose gpt-image-1 requests time out after 1 s, and which serves two gateway families."""
    table = {"openai": {"request_timeout_by_model": {"gpt-image-1": 1.0}, "extra_models": ["flux-*", "seedream-*"]}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=table) as stack:
        stack.simulators["openai"].config.run_seconds = RUN
        yield stack


def sim(stack: Stack) -> OpenAIImagesSimulator:
    simulator = stack.simulators["openai"]
    assert isinstance(simulator, OpenAIImagesSimulator)
    return simulator


async def image_job(client: httpx.AsyncClient, model: str = "gpt-image-1", **fields: Any) -> dict[str, Any]:
    retry = fields.pop("retry_unknown_submissions", False)
    source = fields.pop("source", None)
    body: dict[str, Any] = {"prompt": "a lighthouse at dawn"} | fields
    extra: dict[str, Any] = {"source": source} if source else {}
    return await submit(client, provider="openai", kind="image", model=model, input=body,
                        retry_unknown_submissions=retry, **extra)


def rgba_png(width: int, height: int) -> bytes:
    """A fully transparent RGBA PNG: an edit mask (transparent pixels are the area to edit)."""
    raw = (b"\x00" + b"\x00\x00\x00\x00" * width) * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- success -------------------------------------------------------------------------------

async def test_gpt_image_outputs_are_stored_with_the_bytes_the_simulator_made(oai, monkeypatch):
    made: list[bytes] = []
    render = sim(oai).render

    def recording(job: ImageJob) -> list[bytes]:  # what the simulator rendered, as it rendered it
        images = render(job)
        made.extend(images)
        return images

    monkeypatch.setattr(sim(oai), "render", recording)
    async with api(oai) as client:
        job = await image_job(client, model="gpt-image-1.5", num_outputs=2, aspect_ratio="3:2",
                              options={"quality": "high", "output_format": "png", "user": "user-42"})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        stored = [(await client.get(o["url"])).content for o in done["outputs"]]
    assert done["attempts"] == 1 and done["progress"] == 100
    assert done["provider_task_id"] == job["id"] and done["provider_request_id"].startswith("req_")
    assert [o["sha256"] for o in done["outputs"]] == [sha(b) for b in made] == [sha(b) for b in stored]
    first = done["outputs"][0]
    assert first["content_type"] == "image/png" and (first["width"], first["height"]) == (48, 32)  # 1/32 scale
    meta = first["metadata"]
    assert (meta["model"], meta["size"], meta["quality"], meta["output_format"]) == (
        "gpt-image-1.5", "1536x1024", "high", "png")
    assert meta["usage"]["output_tokens"] == 2 * 6208 and meta["usage"]["total_tokens"] > meta["usage"]["output_tokens"]
    stats = await sim_stats(oai, "openai")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}


async def test_dall_e_3_url_output_is_collected_before_it_expires(oai):
    async with api(oai) as client:
        job = await image_job(client, model="dall-e-3", aspect_ratio="16:9",
                              options={"quality": "hd", "style": "natural"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    ((_, served),) = sim(oai).files.files.items()  # the one image the blob URL pointed at
    (output,) = done["outputs"]
    assert output["sha256"] == sha(served.data) and output["content_type"] == "image/png"
    assert (output["width"], output["height"]) == (56, 32)  # 1792x1024 (16:9 within 5%), at 1/32
    assert output["metadata"]["revised_prompt"].startswith("A detailed, vivid rendering of a lighthouse")
    assert "usage" not in output["metadata"]


async def test_expired_dall_e_url_fails_as_output_expired(oai):
    sim(oai).config.output_ttl_seconds = 0.0
    async with api(oai) as client:
        done = await wait_for(client, (await image_job(client, model="dall-e-3"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired", done
    assert (await sim_stats(oai, "openai"))["creations"] == 1  # made and billed; only the copy was too late


async def test_edit_sends_the_source_jobs_output_more_images_and_a_mask_as_multipart(oai):
    extra_image = media.png("another input", 16, 16)
    async with api(oai) as client:
        source = await wait_for(client, (await submit(client))["id"])  # a replicate image job
        assert source["status"] == "succeeded", source
        src = source["outputs"][0]
        base = oai.simulator_url("openai")
        extra_url = base + sim(oai).files.publish(extra_image, "image/png", "chair.png")
        mask_url = base + sim(oai).files.publish(rgba_png(src["width"], src["height"]), "image/png", "mask.png")
        job = await image_job(client, source={"job_id": source["id"]}, prompt="put the chair by the fox",
                              options={"images": [extra_url], "mask": mask_url, "input_fidelity": "high"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["source"] == {"job_id": source["id"], "output": 0}
    stats = await sim_stats(oai, "openai")
    assert stats["creations"] == 1 and stats["requests"] == {"edit": 1, "download": 2}  # + image and mask
    # The simulator's identity of the edit names the images' digests, in order: the source's stored
    # bytes went first, then the extra image, with the mask and the form fields as sent.
    sent = {"model": "gpt-image-1", "prompt": "put the chair by the fox", "input_fidelity": "high",
            "image": [src["sha256"][:16], sha(extra_image)[:16]], "mask": True}
    assert sim(oai).stats.created_by_identity[OpenAIImagesSimulator._identity("edit", "gpt-image-1", sent)] == 1
    assert done["outputs"][0]["metadata"]["usage"]["input_tokens_details"]["image_tokens"] == 2 * 323


async def test_unreachable_input_image_fails_before_anything_is_sent(oai):
    async with api(oai) as client:
        gone = oai.simulator_url("openai") + "/delivery/nothing/here.png"  # the blob store answers 404
        done = await wait_for(client, (await image_job(client, image_url=gone))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "input_image_unavailable", done
    assert "HTTP 404" in done["error"]["message"]
    assert (await sim_stats(oai, "openai"))["requests"] == {"download": 1}  # no generation, no edit


# -- refusals and errors -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "prompt"),
    [
        ("gpt-image-1", "a riot [sim:refuse]"),  # 400 moderation_blocked, at the input stage
        ("gpt-image-2", "a riot [sim:refuse=output]"),  # the same, after the run time
        ("dall-e-3", "a riot [sim:refuse]"),  # 400 content_policy_violation
    ],
)
async def test_content_refusal_fails_with_content_policy(oai, model, prompt):
    async with api(oai) as client:
        done = await wait_for(client, (await image_job(client, model=model, prompt=prompt))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "content_policy", done
    assert "safety system" in done["error"]["message"] and done["attempts"] == 1
    assert (await sim_stats(oai, "openai"))["creations"] == 0


async def test_rate_limit_then_success_bills_one_generation(oai):
    await sim_faults(oai, "openai", {"kind": "429", "route": "generate", "count": 1, "retry_after": 1})
    async with api(oai) as client:
        job = await image_job(client)
        done = await wait_for(client, job["id"])
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stats = await sim_stats(oai, "openai")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"generate:429": 1}
    assert any(e["type"] == "job.queued" and "rate limit" in (e["note"] or "").lower() for e in events)


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"extra": {"rate_limit_kind": "insufficient_quota"}, "fault": True}, "provider_insufficient_balance"),
        ({"api_keys": ["sk-not-the-sandbox-key"]}, "provider_auth_failed"),
    ],
)
async def test_billing_429_and_refused_key_fail_without_a_generation(oai, setup, code):
    config = sim(oai).config
    config.extra.update(setup.get("extra", {}))
    config.api_keys = setup.get("api_keys", [])
    if setup.get("fault"):
        await sim_faults(oai, "openai", {"kind": "429", "route": "generate", "count": 1})
    async with api(oai) as client:
        done = await wait_for(client, (await image_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    assert (await sim_stats(oai, "openai"))["creations"] == 0


async def test_unverified_organization_fails_the_job_but_keeps_the_key(oai):
    sim(oai).config.extra["unverified_keys"] = ["sandbox-key"]  # refused for gpt-image models only
    async with api(oai) as client:
        refused = await wait_for(client, (await image_job(client, model="gpt-image-2"))["id"])
        served = await wait_for(client, (await image_job(client, model="dall-e-3"))["id"])
    assert refused["status"] == "failed" and refused["error"]["code"] == "provider_organization_unverified"
    assert "must be verified" in refused["error"]["message"]
    assert served["status"] == "succeeded", served  # the same key, still in the pool


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("malformed", "provider_malformed_response"),  # a 200 whose body is cut short
        ("500", "provider_outcome_unknown"),
        ("502", "provider_outcome_unknown"),  # Cloudflare's HTML page
    ],
)
async def test_unreadable_answer_after_the_image_was_made_is_never_resent(oai, fault, code):
    await sim_faults(oai, "openai", {"kind": fault, "route": "generate", "count": 1, "after_effect": True})
    async with api(oai) as client:
        done = await wait_for(client, (await image_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    stats = await sim_stats(oai, "openai")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}


# -- the ambiguous synchronous create ----------------------------------------------------

async def test_timeout_after_the_image_was_made_fails_without_a_second_generation(short_timeout):
    await sim_faults(short_timeout, "openai",
                     {"kind": "timeout", "route": "generate", "after_effect": True, "delay": 2.5})
    async with api(short_timeout) as client:
        done = await wait_for(client, (await image_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert done["attempts"] == 1 and "retry_unknown_submissions" in done["error"]["message"]
    stats = await sim_stats(short_timeout, "openai")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}  # billed once, never resent


async def test_timeout_with_retry_unknown_submissions_is_resent_exactly_once(short_timeout):
    await sim_faults(short_timeout, "openai",
                     {"kind": "timeout", "route": "generate", "after_effect": True, "delay": 2.5})
    async with api(short_timeout) as client:
        done = await wait_for(client, (await image_job(client, retry_unknown_submissions=True))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stats = await sim_stats(short_timeout, "openai")
    assert stats["creations"] == 2 and stats["requests"] == {"generate": 2}
    assert list(stats["duplicate_identities"].values()) == [2]  # the same request, billed twice as opted in


async def test_the_request_timeout_is_per_model(short_timeout):
    # gpt-image-1 gives up after 1 s; gpt-image-1.5 keeps the default and waits for its 1.5 s image.
    async with api(short_timeout) as client:
        done = await wait_for(client, (await image_job(client, model="gpt-image-1.5",
                                                       prompt="slow [sim:run=1.5]"))["id"])
    assert done["status"] == "succeeded", done


# -- models and validation -----------------------------------------------------------------

async def test_gateway_models_are_accepted_when_listed(short_timeout):
    async with api(short_timeout) as client:
        job = await image_job(client, model="seedream-4-0", options={"size": "2K", "response_format": "url"})
        done = await wait_for(client, job["id"])
    # Listed: sent as it is (Seedream's own size); this simulator is OpenAI itself, which knows no such model.
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
    assert (await sim_stats(short_timeout, "openai"))["requests"] == {"generate": 1}


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("gpt-image-3", {}, "model"),
    ("flux-kontext-pro", {}, "model"),  # a gateway's model, not listed in extra_models
    ("dall-e-2", {}, "model"),
    ("gpt-image-1", {"prompt": ""}, "input.prompt"),
    ("dall-e-3", {"prompt": "x" * 4001}, "input.prompt"),
    ("gpt-image-1", {"negative_prompt": "blur"}, "input.negative_prompt"),
    ("gpt-image-1", {"seed": 7}, "input.seed"),
    ("dall-e-3", {"num_outputs": 2}, "input.num_outputs"),
    ("gpt-image-1", {"aspect_ratio": "16:9"}, "input.aspect_ratio"),
    ("gpt-image-1", {"resolution": "2k"}, "input.resolution"),
    ("gpt-image-1", {"resolution": "1792x1024"}, "input.resolution"),
    ("gpt-image-2", {"resolution": "1000x1000"}, "input.resolution"),  # not multiples of 16
    ("gpt-image-2", {"aspect_ratio": "4:1"}, "input.aspect_ratio"),  # beyond 3:1
    ("gpt-image-2", {"aspect_ratio": "1:1", "resolution": "4k"}, "input.resolution"),  # 3840x3840 too large
    ("gpt-image-2", {"aspect_ratio": "16:9", "resolution": "1024x1024"}, "input.resolution"),
    ("gpt-image-1", {"options": {"size": "1792x1024"}}, "input.options.size"),
    ("gpt-image-1", {"options": {"size": "auto"}, "aspect_ratio": "1:1"}, "input.options.size"),
    ("gpt-image-1", {"options": {"quality": "hd"}}, "input.options.quality"),
    ("gpt-image-1", {"options": {"style": "vivid"}}, "input.options.style"),
    ("gpt-image-1", {"options": {"response_format": "url"}}, "input.options.response_format"),
    ("dall-e-3", {"options": {"background": "transparent"}}, "input.options.background"),
    ("dall-e-3", {"options": {"quality": "high"}}, "input.options.quality"),
    ("gpt-image-1", {"options": {"background": "transparent", "output_format": "jpeg"}}, "input.options.background"),
    ("gpt-image-1", {"options": {"output_compression": 80}}, "input.options.output_compression"),  # png
    ("gpt-image-1", {"options": {"output_format": "webp", "output_compression": 101}},
     "input.options.output_compression"),
    ("gpt-image-1", {"options": {"moderation": "off"}}, "input.options.moderation"),
    ("gpt-image-1", {"options": {"input_fidelity": "high"}}, "input.options.input_fidelity"),  # not an edit
    ("gpt-image-1-mini", {"image_url": "https://example.com/a.png", "options": {"input_fidelity": "low"}},
     "input.options.input_fidelity"),
    ("gpt-image-1", {"options": {"stream": True}}, "input.options.stream"),
    ("gpt-image-1", {"options": {"n": 2}}, "input.options.n"),
    ("dall-e-3", {"image_url": "https://example.com/a.png"}, "input.image_url"),
    ("gpt-image-1", {"options": {"images": "https://example.com/a.png"}}, "input.options.images"),
    ("gpt-image-1", {"options": {"images": ["https://example.com/a.png"] * 17}}, "input.options.images"),
    ("gpt-image-1", {"options": {"mask": "https://example.com/m.png"}}, "input.options.mask"),
]


async def test_bad_requests_are_refused_naming_the_field_before_any_request(oai):
    async with api(oai) as client:
        for model, fields, field in BAD_REQUESTS:
            body = {"prompt": "a fox"} | fields
            resp = await client.post("/v1/jobs", json={"provider": "openai", "kind": "image", "model": model,
                                                       "input": body})
            assert resp.status_code == 422, (model, fields, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], (model, fields, resp.text)
        # dall-e-3 cannot edit: a source job's output (its input image) is refused naming the source.
        source = await wait_for(client, (await submit(client))["id"])
        resp = await client.post("/v1/jobs", json={"provider": "openai", "kind": "image", "model": "dall-e-3",
                                                   "input": {"prompt": "a fox"}, "source": {"job_id": source["id"]}})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "source", resp.text
    assert (await sim_stats(oai, "openai"))["requests"] == {}


def plan(model: str, extra_models: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    provider = OpenAIProvider(ProviderSettings(name="openai", base_url="https://api.openai.com",
                                               extra={"extra_models": extra_models or []}))
    options = fields.pop("options", {})
    request = GenerationRequest(kind=MediaKind.image, model=model,
                                input=MediaInput(prompt="a fox", options=options, **fields))
    return provider.plan(request).fields


def test_common_fields_map_to_each_models_own_size_and_n():
    assert plan("gpt-image-1", aspect_ratio="2:3", num_outputs=3) == {
        "model": "gpt-image-1", "prompt": "a fox", "n": 3, "size": "1024x1536"}
    assert plan("dall-e-3", aspect_ratio="9:16")["size"] == "1024x1792"  # 4:7 is within 5% of 9:16
    assert plan("gpt-image-1", options={"size": "auto"})["size"] == "auto"
    assert "size" not in plan("gpt-image-1")  # nothing asked: OpenAI's default
    # gpt-image-2 computes a size in multiples of 16: short side 1024, <N>p (short side) or <N>k (long side).
    assert plan("gpt-image-2", aspect_ratio="16:9")["size"] == "1824x1024"
    assert plan("gpt-image-2", aspect_ratio="16:9", resolution="1440p")["size"] == "2560x1440"
    assert plan("gpt-image-2", aspect_ratio="16:9", resolution="4k")["size"] == "3840x2160"
    assert plan("gpt-image-2", aspect_ratio="9:16", resolution="2k")["size"] == "1152x2048"
    assert plan("gpt-image-2", resolution="2048x1152")["size"] == "2048x1152"
    # A listed gateway model: options pass through (its own sizes), common fields still map.
    assert plan("flux-dev", ["flux-*"], aspect_ratio="21:9", options={"quality": "x"}) == {
        "model": "flux-dev", "prompt": "a fox", "quality": "x", "size": "2384x1024"}
    with pytest.raises(InvalidInput) as refused:
        plan("flux-dev")
    assert refused.value.field == "model"
