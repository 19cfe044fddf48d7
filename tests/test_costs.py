"""``cost.reported``: what a provider reported a task used (money, compute seconds, tokens, rendered
outputs or seconds), read by its adapter from the documented field, priced by the model's rule
(``providers.catalog.reported_cost``) and saved by the worker with the change that applies the
status; the price units behind it (``compute_second``, ``token``) and their estimates."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers import catalog
from providers.bfl import BflTask, result_status
from providers.contract import ProviderSettings, Usage
from providers.dashscope import billed_usage
from providers.doubao import images_status as ark_images_status
from providers.doubao import parse_task as ark_task
from providers.gemini import image_tokens
from providers.openai import images_status as openai_images_status
from providers.replicate import ReplicateProvider
from providers.runway import charged
from providers.usage import amount, count, credits_in_usd, usage
from tests.helpers import api, submit, wait_for

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def settings(provider: str, **prices: dict[str, Any]) -> ProviderSettings:
    return ProviderSettings(name=provider, base_url="http://gateway", prices=prices)


# -- price units and their estimates -----------------------------------------------------------

def test_compute_second_and_token_prices_estimate_from_their_defaults() -> None:
    hardware = settings("replicate", **{"owner/model": {"unit": "compute_second", "amount": 0.0014,
                                                        "default_seconds": 30}})
    found = catalog.estimate(hardware, "owner/model", None, 4)  # one run renders all four outputs
    assert found is not None and found.amount == pytest.approx(0.042)
    assert found.rule == "0.0014 USD per compute second x 30 s (a typical run) (operator price)"
    # Without a default the model's own typical run time stands in; with neither there is no estimate.
    listed = catalog.estimate(settings("replicate"), "meta/musicgen", None, None)
    assert listed is not None and listed.amount == pytest.approx(0.0014 * 46)
    bare = settings("replicate", **{"owner/model": {"unit": "compute_second", "amount": 0.0014}})
    assert catalog.estimate(bare, "owner/model", None, None) is None

    tokens = settings("openai", **{"gpt-image-1": {"unit": "token", "amount": 0.00004, "default_tokens": 1056}})
    two = catalog.estimate(tokens, "gpt-image-1", None, 2)  # per output
    assert two is not None and two.amount == pytest.approx(0.00004 * 1056 * 2)
    assert two.rule == "0.00004 USD per token x 1056 tokens (typical per output) x 2 (operator price)"
    no_default = settings("openai", **{"gpt-image-1": {"unit": "token", "amount": 0.00004}})
    assert catalog.estimate(no_default, "gpt-image-1", None, 1) is None

    with pytest.raises(catalog.CatalogError, match="prices.gpt-image-1"):
        catalog.estimate(settings("openai", **{"gpt-image-1": {"unit": "megatoken", "amount": 1}}),
                         "gpt-image-1", None, 1)


def test_every_compute_and_token_price_in_the_catalog_says_its_source_is_unverified() -> None:
    seen = set()
    for provider, file in catalog.shipped().items():
        for model, spec in file.models.items():
            if spec.price is not None and spec.price.unit in ("compute_second", "token"):
                seen.add(spec.price.unit)
                assert spec.price.source and "unverified" in spec.price.source, (provider, model)
    assert seen == {"compute_second", "token"}


# -- reported_cost -------------------------------------------------------------------------------

def test_money_the_provider_reports_wins() -> None:
    found = catalog.reported_cost(settings("runway"), "gen4.5", Usage(cost=0.6, compute_seconds=99))
    assert found == catalog.Estimate(amount=0.6, currency="USD", rule="reported by the provider")
    refunded = catalog.reported_cost(settings("runway"), "no-price-rule", Usage(cost=0.0))
    assert refunded is not None and refunded.amount == 0.0  # a refund is a reported zero, not "unknown"


def test_the_rule_prices_the_quantity_in_its_own_unit() -> None:
    gpu = catalog.reported_cost(settings("replicate"), "meta/musicgen", Usage(compute_seconds=3.804328))
    assert gpu is not None and gpu.amount == pytest.approx(0.0014 * 3.804328, abs=1e-6)
    assert gpu.rule == "0.0014 USD per compute second x 3.80433 s of compute reported by the provider (catalog price)"

    tokens = catalog.reported_cost(settings("doubao"), "doubao-seedance-1-0-pro-250528",
                                   Usage(tokens=246840, outputs=1))
    assert tokens is not None and tokens.amount == pytest.approx(0.6171)
    assert "x 246840 tokens reported" in tokens.rule

    seconds = catalog.reported_cost(settings("dashscope"), "wan2.2-t2v-plus", Usage(outputs=1, seconds=10))
    assert seconds is not None and seconds.amount == pytest.approx(1.0)
    images = catalog.reported_cost(settings("dashscope"), "wan2.2-t2i-flash", Usage(outputs=3))
    assert images is not None and images.amount == pytest.approx(0.075) and images.rule.startswith(
        "0.025 USD per image x 3 reported")

    operator = settings("replicate", **{"meta/musicgen": {"unit": "compute_second", "amount": 0.001}})
    negotiated = catalog.reported_cost(operator, "meta/musicgen", Usage(compute_seconds=10))
    assert negotiated is not None and negotiated.amount == pytest.approx(0.01)
    assert negotiated.rule.endswith("(operator price)")


def test_nothing_to_price_is_none() -> None:
    flux = settings("replicate")  # priced per image; Replicate reports only the run time
    assert catalog.reported_cost(flux, "black-forest-labs/flux-schnell", Usage(compute_seconds=1.2)) is None
    assert catalog.reported_cost(flux, "meta/musicgen", None) is None
    assert catalog.reported_cost(flux, "meta/musicgen", Usage(tokens=5)) is None  # not its unit
    assert catalog.reported_cost(settings("kling"), "kling-v1", Usage(seconds=5)) is None  # no rule
    per_request = settings("x", m={"unit": "request", "amount": 0.5})
    assert catalog.reported_cost(per_request, "m", Usage(outputs=2)) is None  # nothing reported adds to it
    broken = settings("x", m={"unit": "parsec", "amount": 1})
    assert catalog.reported_cost(broken, "m", Usage(outputs=2)) is None  # never a crash in the worker


def test_usage_fields_are_read_defensively() -> None:
    assert [amount(v) for v in (3, "2.5", -1, float("nan"), float("inf"), True, None, "x", [1])] == \
        [3.0, 2.5, None, None, None, None, None, None, None]
    assert [count(v) for v in (2, 2.0, "7", 2.5, -3, False)] == [2, 2, 7, None, None, None]
    assert usage() is None and usage(tokens=None, outputs=None) is None
    assert usage(tokens=3) == Usage(tokens=3)
    assert credits_in_usd(20, 0.01) == pytest.approx(0.2) and credits_in_usd("x", 0.01) is None
    assert credits_in_usd(20, None) is None


# -- what each adapter reads (the documented fields) ---------------------------------------------

def test_adapters_read_the_documented_usage_fields() -> None:
    replicate = ReplicateProvider(ProviderSettings(name="replicate", base_url="http://r"))
    done = replicate.parse_prediction({"status": "succeeded", "output": ["https://r/out.png"],
                                       "metrics": {"predict_time": 3.804328}})
    assert done.usage == Usage(compute_seconds=3.804328)
    running = replicate.parse_prediction({"status": "processing", "metrics": {}})
    assert running.usage is None
    aborted = replicate.parse_prediction({"status": "aborted", "metrics": {"total_time": 0.1}})
    assert aborted.usage is None  # never ran: no predict_time

    gpt = openai_images_status({"data": [{"b64_json": PNG_B64}], "usage": {
        "input_tokens": 31, "output_tokens": 2496, "total_tokens": 2527}}, "gpt-image-1")
    assert gpt.usage == Usage(tokens=2496)
    assert openai_images_status({"data": [{"url": "https://o/x.png"}]}, "dall-e-3").usage is None

    seedream = ark_images_status({"data": [{"url": "https://a/1.jpeg"}, {"error": {"code": "X", "message": "m"}}],
                                  "usage": {"generated_images": 1, "output_tokens": 16384}}, "seedream")
    assert seedream.usage == Usage(outputs=1, tokens=16384)
    seedance = ark_task({"id": "cgt-1", "status": "succeeded", "content": {"video_url": "https://a/v.mp4"},
                         "usage": {"completion_tokens": 246840, "total_tokens": 246840}})
    assert seedance.usage == Usage(tokens=246840)
    assert ark_task({"id": "cgt-1", "status": "running", "usage": {"completion_tokens": 5}}).usage is None

    assert billed_usage({"image_count": 2, "width": 1328}) == Usage(outputs=2)
    assert billed_usage({"video_count": 1, "video_duration": 5, "video_ratio": "1920*1080"}) == \
        Usage(outputs=1, seconds=5)
    assert billed_usage({"output_video_duration": 8}) == Usage(seconds=8)  # the key names vary by model
    assert billed_usage({"video_ratio": "1920*1080"}) is None and billed_usage("x") is None

    assert image_tokens({"candidatesTokenCount": 1300, "candidatesTokensDetails": [
        {"modality": "TEXT", "tokenCount": 10}, {"modality": "IMAGE", "tokenCount": 1290}]}) == Usage(tokens=1290)
    assert image_tokens({"candidatesTokenCount": 1290}) == Usage(tokens=1290)
    assert image_tokens(None) is None

    assert charged({"status": "SUCCEEDED", "cost": {"credits": 60}}, 0.01) == Usage(cost=0.6)
    assert charged({"status": "FAILED", "cost": {"credits": 0}}, 0.01) == Usage(cost=0.0)  # refunded
    assert charged({"status": "RUNNING", "estimatedCost": {"credits": 60.0}}, 0.01) is None

    ready = {"status": "Ready", "result": {"sample": "https://bfl.ai/x.png"}}
    assert result_status(ready, BflTask(cost=4.0)).usage == Usage(cost=0.04)
    assert result_status(ready, BflTask()).usage is None
    moderated = result_status({"status": "Content Moderated"}, BflTask(cost=4.0))
    assert moderated.usage is None  # whether a moderated task is billed is unconfirmed


# -- end to end: the worker records it -----------------------------------------------------------

@pytest.fixture
async def priced(redis_url: str) -> Any:
    """The stack, with an operator's negotiated price for a Runway model (the reported cost still wins)."""
    prices = {"runway": {"prices": {"gen4_turbo": {"unit": "second", "amount": 0.05}}}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=prices) as s:
        yield s


async def finished(stack: Stack, **body: Any) -> dict[str, Any]:
    async with api(stack) as client:
        job = await submit(client, **body)
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        return done


async def test_compute_seconds_are_priced_for_replicate_and_fal(stack: Stack) -> None:
    replicate = await finished(stack, kind="audio", model="meta/musicgen", input={"prompt": "a waltz [sim:run=0.3]"})
    sim: Any = stack.simulators["replicate"]
    prediction = sim.prediction(sim.tasks[replicate["provider_task_id"]], stack.simulator_url("replicate"))
    seconds = prediction["metrics"]["predict_time"]  # what Replicate serves for the finished prediction
    reported = replicate["cost"]["reported"]
    assert reported["amount"] == pytest.approx(round(0.0014 * seconds, 6)) and reported["currency"] == "USD"
    assert reported["rule"].startswith("0.0014 USD per compute second x ") and "reported by the provider" in \
        reported["rule"]
    assert replicate["cost"]["estimated"]["amount"] == pytest.approx(0.0644)

    fal = await finished(stack, provider="fal", kind="audio", model="fal-ai/stable-audio",
                         input={"prompt": "rain on a roof [sim:run=0.4]"})
    task = stack.simulators["fal"].tasks[fal["provider_task_id"]]  # type: ignore[attr-defined]  # (the sim's own)
    reported = fal["cost"]["reported"]
    assert reported["amount"] == pytest.approx(round(0.00111 * round(task.run_seconds, 4), 6))
    assert "compute second" in reported["rule"] and fal["cost"]["estimated"]["amount"] == pytest.approx(0.0111)


async def test_tokens_outputs_and_money_are_reported(priced: Stack) -> None:
    stack = priced
    seedance = await finished(stack, provider="doubao", kind="video", model="doubao-seedance-1-0-pro-250528",
                              input={"prompt": "a kitten yawns", "duration_seconds": 5, "resolution": "1080p"})
    ark: Any = stack.simulators["doubao"]
    tokens = ark.task_object(ark.tasks[seedance["provider_task_id"]], stack.simulator_url("doubao"))["usage"][
        "completion_tokens"]
    assert seedance["cost"]["reported"]["amount"] == pytest.approx(round(0.0000025 * tokens, 6))
    assert f"x {tokens} tokens reported by the provider" in seedance["cost"]["reported"]["rule"]

    images = await finished(stack, provider="dashscope", kind="image", model="wan2.2-t2i-flash",
                            input={"prompt": "a tea house", "num_outputs": 2})
    assert images["cost"]["reported"] == {"amount": 0.05, "currency": "USD",
                                          "rule": "0.025 USD per image x 2 reported by the provider (catalog price)"}

    # A synchronous provider (the create call answers with the result): recorded on the same path.
    gpt = await finished(stack, provider="openai", kind="image", model="gpt-image-1", input={"prompt": "a mug"})
    assert gpt["cost"]["reported"]["rule"].startswith("0.00004 USD per token x ")
    assert gpt["cost"]["reported"]["amount"] > 0

    runway = await finished(stack, provider="runway", kind="video", model="gen4_turbo",
                            input={"prompt": "a fox", "image_url": "https://example.com/a.png",
                                   "duration_seconds": 5})
    credits = stack.simulators["runway"].tasks[runway["provider_task_id"]].data["credits"]  # type: ignore[attr-defined]
    assert runway["cost"]["reported"] == {"amount": pytest.approx(credits * 0.01), "currency": "USD",
                                          "rule": "reported by the provider"}
    assert runway["cost"]["estimated"]["rule"].endswith("(operator price)")


async def test_a_provider_reporting_nothing_leaves_reported_null(stack: Stack) -> None:
    kling = await finished(stack, provider="kling", kind="video", model="kling-v1", input={"prompt": "a fox"})
    assert kling["cost"]["reported"] is None
    # Replicate reports the run time, but this model is priced per image: nothing to price it with.
    flux = await finished(stack, input={"prompt": "a fox", "num_outputs": 2})
    assert flux["cost"]["reported"] is None and flux["cost"]["estimated"]["amount"] == pytest.approx(0.006)
