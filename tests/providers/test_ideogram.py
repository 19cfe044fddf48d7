"""The Ideogram adapter against the Ideogram simulator, through the real API and worker.

Ideogram's 3.0 routes are synchronous: the create request answers with short-lived image URLs
(collected at once), unsafe images come back inside the 200, and an answer lost after the images
were made (and billed) is never paid for twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers.contract import GenerationRequest, MediaInput, MediaKind, ProviderSettings, SourceMedia
from providers.ideogram import Call, IdeogramProvider
from providers.sandbox import media
from providers.sandbox.ideogram import IdeogramSimulator
from providers.sandbox.stability import Form
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

RUN = 0.05  # the simulator's hold time per request (seconds)


@pytest.fixture
async def ideo(stack: Stack) -> Stack:
    sim(stack).config.run_seconds = RUN
    return stack


@pytest.fixture
async def short_timeout(redis_url: str) -> AsyncIterator[Stack]:
    """A stack whose Ideogram requests time out after 1 s."""
    table = {"ideogram": {"request_timeout_seconds": 1.0}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=table) as stack:
        sim(stack).config.run_seconds = RUN
        yield stack


def sim(stack: Stack) -> IdeogramSimulator:
    simulator = stack.simulators["ideogram"]
    assert isinstance(simulator, IdeogramSimulator)
    return simulator


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def ideogram_job(client: httpx.AsyncClient, operation: str = "generate", **fields: Any) -> dict[str, Any]:
    extra = {key: fields.pop(key) for key in ("source", "retry_unknown_submissions") if key in fields}
    body: dict[str, Any] = {"prompt": "a neon sign that says OPEN"} | fields
    return await submit(client, provider="ideogram", kind="image", model="ideogram-v3", operation=operation,
                        input={k: v for k, v in body.items() if v is not None}, **extra)


def served(stack: Stack) -> dict[str, bytes]:
    """The images the simulator served, by sha256."""
    return {sha(f.data): f.data for f in sim(stack).files.files.values()}


def record_forms(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[Form]:
    """Every form the simulator validated, as it parsed it."""
    forms: list[Form] = []
    validate = sim(stack)._validate

    def recording(op: Any, form: Form, v4: bool = False) -> Any:
        forms.append(form)
        return validate(op, form, v4)

    monkeypatch.setattr(sim(stack), "_validate", recording)
    return forms


def part_data(form: Form, name: str) -> bytes:
    part = form.part(name)
    assert part is not None, name
    return part.data


# -- success ---------------------------------------------------------------------------------

async def test_generate_stores_the_short_lived_images_at_once(ideo: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    sim(ideo).config.output_ttl_seconds = 3.0  # the URLs die 3 s after the answer: collected before that
    forms = record_forms(ideo, monkeypatch)
    async with api(ideo) as client:
        job = await ideogram_job(client, num_outputs=2, aspect_ratio="16:9", seed=42,
                                 options={"rendering_speed": "TURBO", "magic_prompt": "ON",
                                          "style_type": "REALISTIC", "color_palette": {"name": "PASTEL"}})
        done = await wait_for(client, job["id"])
        stored = [(await client.get(o["url"])).content for o in done["outputs"]]
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] == job["id"] and done["attempts"] == 1 and done["progress"] == 100
    assert [o["sha256"] for o in done["outputs"]] == [sha(b) for b in stored]
    assert {o["sha256"] for o in done["outputs"]} == set(served(ideo))  # exactly the two images served
    first = done["outputs"][0]
    assert first["content_type"] == "image/png" and (first["width"], first["height"]) == (82, 46)  # 1312x736 / 16
    meta = first["metadata"]
    assert meta["resolution"] == "1312x736" and meta["seed"] == 42 and meta["style_type"] == "REALISTIC"
    assert meta["prompt"].startswith("a neon sign that says OPEN. A richly detailed")  # Magic Prompt's rewrite
    assert meta["expires_at"] > 0 and meta["operation"] == "generate"
    (form,) = forms
    assert {p.name: p.data.decode() for p in form.parts} == {
        "prompt": "a neon sign that says OPEN", "seed": "42", "num_images": "2", "aspect_ratio": "16x9",
        "rendering_speed": "TURBO", "magic_prompt": "ON", "style_type": "REALISTIC",
        "color_palette": '{"name": "PASTEL"}'}
    assert all(p.filename is None for p in form.parts)  # multipart, text parts only
    stats = await sim_stats(ideo, "ideogram")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1, "download": 2}


async def test_unsafe_images_inside_a_200_are_not_outputs(ideo: Stack) -> None:
    async with api(ideo) as client:
        some = await ideogram_job(client, prompt="a beach [sim:unsafe=1]", num_outputs=3)
        every = await ideogram_job(client, prompt="a beach [sim:unsafe]", num_outputs=2)
        refused = await ideogram_job(client, prompt="a beach [sim:safety]")
        some, every, refused = [await wait_for(client, j["id"]) for j in (some, every, refused)]
    assert some["status"] == "succeeded" and len(some["outputs"]) == 2, some
    assert [o["metadata"]["index"] for o in some["outputs"]] == [1, 2]
    assert all(o["metadata"]["unsafe_images_withheld"] == 1 for o in some["outputs"])
    assert every["status"] == "failed" and every["error"]["code"] == "content_policy", every
    assert "every image as unsafe (2 of 2)" in every["error"]["message"]
    assert refused["status"] == "failed" and refused["error"]["code"] == "content_policy", refused
    assert "safety check" in refused["error"]["message"]
    assert (await sim_stats(ideo, "ideogram"))["creations"] == 2  # the 422 generated nothing


async def test_expired_result_url_fails_as_output_expired(ideo: Stack) -> None:
    sim(ideo).config.output_ttl_seconds = 0.0  # dead before the collect step gets to it
    async with api(ideo) as client:
        done = await wait_for(client, (await ideogram_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired", done
    assert (await sim_stats(ideo, "ideogram"))["creations"] == 1  # made and billed; only the copy was late


# -- refusals and errors -----------------------------------------------------------------------

async def test_rate_limit_then_success_bills_one_generation(ideo: Stack) -> None:
    await sim_faults(ideo, "ideogram", {"kind": "429", "route": "generate", "count": 1, "retry_after": 1})
    async with api(ideo) as client:
        done = await wait_for(client, (await ideogram_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stats = await sim_stats(ideo, "ideogram")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"generate:429": 1}


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"extra": {"image_quota": 0}}, "provider_insufficient_balance"),  # 402
        ({"api_keys": ["not-the-sandbox-key"]}, "provider_auth_failed"),  # 401
    ],
)
async def test_account_refusals_fail_without_a_generation(ideo: Stack, setup: dict[str, Any], code: str) -> None:
    sim(ideo).config.extra.update(setup.get("extra", {}))
    sim(ideo).config.api_keys = setup.get("api_keys", [])
    async with api(ideo) as client:
        done = await wait_for(client, (await ideogram_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    assert (await sim_stats(ideo, "ideogram"))["creations"] == 0


@pytest.mark.parametrize(("fault", "code"), [("malformed", "provider_malformed_response"),
                                             ("500", "provider_outcome_unknown")])
async def test_unreadable_answer_after_the_images_were_made_is_never_resent(ideo: Stack, fault: str,
                                                                            code: str) -> None:
    await sim_faults(ideo, "ideogram", {"kind": fault, "route": "generate", "after_effect": True})
    async with api(ideo) as client:
        done = await wait_for(client, (await ideogram_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    stats = await sim_stats(ideo, "ideogram")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}


async def test_timeout_after_the_images_were_made_fails_without_a_second_generation(short_timeout: Stack) -> None:
    await sim_faults(short_timeout, "ideogram",
                     {"kind": "timeout", "route": "generate", "after_effect": True, "delay": 2.5})
    async with api(short_timeout) as client:
        done = await wait_for(client, (await ideogram_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert done["attempts"] == 1 and "retry_unknown_submissions" in done["error"]["message"]
    stats = await sim_stats(short_timeout, "ideogram")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}  # billed once, never resent


# -- operations ----------------------------------------------------------------------------------

async def test_remix_sends_a_replicate_sources_stored_image(ideo: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    forms = record_forms(ideo, monkeypatch)
    async with api(ideo) as client:
        source = await wait_for(client, (await submit(client))["id"])  # a replicate image job
        assert source["status"] == "succeeded", source
        job = await ideogram_job(client, "remix", source={"job_id": source["id"]}, prompt="the fox as a neon sign",
                                 aspect_ratio="3:2", negative_prompt="blur", options={"image_weight": 70})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["operation"] == "remix", done
    assert done["source"] == {"job_id": source["id"], "output": 0}
    assert done["outputs"][0]["metadata"]["resolution"] == "1248x832"
    (form,) = forms
    image = form.part("image")
    assert image is not None and image.filename == "image.png"
    assert sha(image.data) == source["outputs"][0]["sha256"]  # the source's stored bytes, as a file part
    assert (form.text("prompt"), form.text("image_weight"), form.text("aspect_ratio"), form.text("negative_prompt")) \
        == ("the fox as a neon sign", "70", "3x2", "blur")
    assert (await sim_stats(ideo, "ideogram"))["requests"] == {"remix": 1, "download": 1}


async def test_reframe_replace_background_and_inpaint_from_an_ideogram_source(
        ideo: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    async with api(ideo) as client:
        source = await wait_for(client, (await ideogram_job(client, prompt="a red mug"))["id"])
        assert source["status"] == "succeeded", source
        out = source["outputs"][0]
        base = ideo.simulator_url("ideogram")
        mask_url = base + sim(ideo).files.publish(media.png("mask", out["width"], out["height"]), "image/png", "m.png")
        bad_mask = base + sim(ideo).files.publish(media.png("mask", 8, 8), "image/png", "small.png")
        photo_url = base + sim(ideo).files.publish(media.png("photo", 48, 48), "image/png", "photo.png")
        forms = record_forms(ideo, monkeypatch)
        ref = {"job_id": source["id"]}
        jobs = [
            await ideogram_job(client, "reframe", source=ref, prompt=None, resolution="1536x640",
                               options={"rendering_speed": "QUALITY"}),
            await ideogram_job(client, "replace_background", source=ref, prompt="a marble countertop",
                               num_outputs=2),
            await ideogram_job(client, "inpaint", source=ref, prompt="a blue mug", options={"mask": mask_url}),
            await ideogram_job(client, "remix", image_url=photo_url, prompt="as a watercolour"),
            await ideogram_job(client, "inpaint", source=ref, prompt="a blue mug", options={"mask": bad_mask}),
        ]
        reframed, replaced, inpainted, remixed, mismatched = await asyncio.gather(
            *(wait_for(client, j["id"]) for j in jobs))
    for done in (reframed, replaced, inpainted, remixed):
        assert done["status"] == "succeeded", done
    assert reframed["outputs"][0]["metadata"]["resolution"] == "1536x640"
    assert len(replaced["outputs"]) == 2
    assert mismatched["status"] == "failed" and mismatched["error"]["code"] == "provider_rejected_input", mismatched
    assert "mask: must have the same dimensions" in mismatched["error"]["message"]
    by_route = {(f.text("resolution"), f.text("prompt")): f for f in forms}
    assert by_route[("1536x640", None)].text("rendering_speed") == "QUALITY"
    assert part_data(by_route[(None, "as a watercolour")], "image") == media.png("photo", 48, 48)
    stats = await sim_stats(ideo, "ideogram")
    assert {k: stats["requests"][k] for k in ("reframe", "replace_background", "inpaint", "remix")} == {
        "reframe": 1, "replace_background": 1, "inpaint": 2, "remix": 1}
    assert stats["creations"] == 1 + 4  # the source, then every operation but the refused inpaint


async def test_follow_ups_and_inputs_are_refused_naming_the_field(ideo: Stack) -> None:
    async with api(ideo) as client:
        image = await wait_for(client, (await submit(client))["id"])
        running = await submit(client, input={"prompt": "a slow fox [sim:run=30]"})

        async def refused(operation: str, body: dict[str, Any], status: int, field: str) -> None:
            payload = {"provider": "ideogram", "kind": "image", "model": "ideogram-v3", "operation": operation,
                       "input": {"prompt": "x"}} | body
            resp = await client.post("/v1/jobs", json=payload)
            assert resp.status_code == status, (operation, body, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], (operation, body, resp.text)

        src = {"source": {"job_id": image["id"]}}
        await refused("upscale", src, 422, "operation")
        await refused("remix", {}, 422, "source")  # no image at all
        await refused("remix", {"source": {"job_id": running["id"]}}, 409, "source.job_id")  # not finished
        await refused("remix", src | {"input": {"prompt": "x", "image_url": "https://example.com/a.png"}}, 422,
                      "input.image_url")  # two images
        await refused("generate", src, 422, "source")  # generate takes no input image
        await refused("reframe", src | {"input": {}}, 422, "input.resolution")
        await refused("reframe", src | {"input": {"prompt": "x", "resolution": "1024x1024"}}, 422, "input.prompt")
        await refused("inpaint", src, 422, "input.options.mask")
        await refused("replace_background", src | {"input": {"prompt": "x", "negative_prompt": "y"}}, 422,
                      "input.negative_prompt")
        await refused("remix", src | {"input": {"prompt": "x", "options": {"custom_model_uri": "m"}}}, 422,
                      "input.options.custom_model_uri")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"prompt": ""}, "input.prompt"),
            ({"aspect_ratio": "7:5"}, "input.aspect_ratio"),
            ({"resolution": "1000x1000"}, "input.resolution"),
            ({"aspect_ratio": "1:1", "resolution": "1024x1024"}, "input.resolution"),
            ({"seed": 2**31}, "input.seed"),
            ({"options": {"rendering_speed": "FAST"}}, "input.options.rendering_speed"),
            ({"options": {"num_images": 2}}, "input.options.num_images"),
            ({"options": {"image_weight": 50}}, "input.options.image_weight"),
            ({"options": {"style_codes": ["AABBCCDD"], "style_type": "GENERAL"}}, "input.options.style_codes"),
            ({"options": {"style_reference_images": "ftp://x/a.png"}}, "input.options.style_reference_images"),
        ]
        for fields, field in cases:
            await refused("generate", {"input": {"prompt": "x"} | fields}, 422, field)
        resp = await client.post("/v1/jobs", json={"provider": "ideogram", "kind": "image", "model": "ideogram-v2",
                                                   "input": {"prompt": "x"}})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "model", resp.text
    assert (await sim_stats(ideo, "ideogram"))["requests"] == {}


def test_operations_map_to_their_routes_and_fields() -> None:
    provider = IdeogramProvider(ProviderSettings(name="ideogram", base_url="https://api.ideogram.ai"))
    source = SourceMedia(provider="replicate", model="m", kind=MediaKind.image, url="https://files/x.png")

    def plan(operation: str, source: SourceMedia | None = source, **fields: Any) -> Call:
        request = GenerationRequest(kind=MediaKind.image, model="ideogram-v3", operation=operation, source=source,
                                    input=MediaInput(**fields))
        return provider.plan(request)

    call = plan("replace_background", prompt="a beach", seed=7, num_outputs=2,
                options={"style_codes": ["0a1b2c3d", "DEADBEEF"]})
    assert call.route.path == "replace-background" and call.image == "https://files/x.png"
    assert call.fields == [("prompt", "a beach"), ("seed", "7"), ("num_images", "2"),
                           ("style_codes", "0a1b2c3d"), ("style_codes", "DEADBEEF")]
    inpaint = plan("inpaint", prompt="x", options={"mask": "https://m/mask.png",
                                                   "style_reference_images": ["https://r/1.png", "https://r/2.png"]})
    assert inpaint.route.path == "inpaint" and inpaint.files == [
        ("mask", "https://m/mask.png"), ("style_reference_images", "https://r/1.png"),
        ("style_reference_images", "https://r/2.png")]
    generate = plan("generate", source=None, prompt="x", resolution="1024x1024")
    assert generate.route.path == "generate" and generate.image is None
    assert ("resolution", "1024x1024") in generate.fields
