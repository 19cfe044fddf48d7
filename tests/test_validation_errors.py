"""Every invalid field in one answer (issue 18: "errors arrive one field at a time").

The adapters stop at the first field they refuse; ``providers.validation.invalid_inputs`` asks them
again with that field set aside, so a 422 names every field the client has to fix, and never one
that only setting another aside made necessary.
"""

from __future__ import annotations

from providers.contract import GenerationRequest, MediaInput, ProviderSettings
from providers.runway import RunwayProvider
from providers.sora import SoraProvider
from providers.validation import invalid_inputs
from tests.helpers import api


def _sora() -> SoraProvider:
    return SoraProvider(ProviderSettings(name="sora", base_url="http://sora.invalid", api_keys=["k"]))


def test_every_refused_field_is_reported_in_the_adapters_order():
    request = GenerationRequest(kind="video", model="sora-2-pro", input=MediaInput(
        seed=3, negative_prompt="blur", duration_seconds=10, aspect_ratio="4:3", options={"fps": 24}))
    fields = [exc.field for exc in invalid_inputs(_sora(), request)]
    assert fields == ["input.prompt", "input.negative_prompt", "input.seed", "input.options.fps",
                      "input.duration_seconds", "input.aspect_ratio"]


def test_a_valid_request_has_none_and_a_single_mistake_is_reported_once():
    sora = _sora()
    assert invalid_inputs(sora, GenerationRequest(kind="video", model="sora-2", input=MediaInput(
        prompt="a fox", duration_seconds=8, aspect_ratio="16:9"))) == []
    one = invalid_inputs(sora, GenerationRequest(kind="video", model="sora-2", input=MediaInput(
        prompt="a fox", duration_seconds=5)))
    assert [(e.field, e.message) for e in one] == [("input.duration_seconds", "Sora renders 4, 8, 12 seconds, not 5")]


def test_the_model_ends_the_search_and_set_aside_fields_cause_no_new_errors():
    sora = _sora()
    wrong_model = invalid_inputs(sora, GenerationRequest(kind="video", model="veo-3", input=MediaInput(seed=1)))
    assert [e.field for e in wrong_model] == ["model"]  # what the model accepts decides the rest
    # Runway image-to-video with an http image: the image is refused, and setting it aside must not make
    # the request text-to-video (which gen4_turbo does not do): the duration is the only other mistake.
    runway = RunwayProvider(ProviderSettings(name="runway", base_url="http://runway.invalid", api_keys=["k"]))
    request = GenerationRequest(kind="video", model="gen4_turbo", input=MediaInput(
        prompt="hills", image_url="http://example.com/hills.png", duration_seconds=30))
    assert [e.field for e in invalid_inputs(runway, request)] == ["input.image_url", "input.duration_seconds"]


async def test_the_api_names_every_invalid_field_at_once(stack):
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json={
            "provider": "sora", "kind": "video", "model": "sora-2",
            "input": {"prompt": "a paper boat", "seed": 7, "duration_seconds": 5, "aspect_ratio": "1:1",
                      "num_outputs": 2}})
        assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert [e["field"] for e in problem["errors"]] == [
            "input.seed", "input.num_outputs", "input.duration_seconds", "input.aspect_ratio"]
        assert all(e["field"] in problem["detail"] for e in problem["errors"])
        # Schema errors were always reported together; they still are, in the same shape.
        resp = await client.post("/v1/jobs", json={"provider": "sora", "kind": "film", "model": "",
                                                   "input": {"seed": -1}})
        assert resp.status_code == 422
        assert {e["field"] for e in resp.json()["errors"]} == {"kind", "model", "input.seed"}
        # And the query and batch bodies say what they take.
        resp = await client.post("/v1/jobs/query", json={"job_ids": ["job_x"]})
        assert resp.status_code == 422 and {e["field"] for e in resp.json()["errors"]} == {"ids", "job_ids"}
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert schema["JobQuery"]["properties"]["ids"]["description"]
        assert schema["BatchRequest"]["properties"]["jobs"]["description"]
        assert schema["JobQuery"].get("examples") and schema["BatchRequest"].get("examples")
