"""The model catalog: ``GET /v1/models``, its agreement with the adapters' validation (every listed
value is taken, values outside the lists are refused naming the field), the lifecycle at acceptance
(sunset at the provider's origin vs behind a gateway vs ``retired_models``), and ``atelier models``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from providers import catalog
from providers.contract import ProviderSettings
from tests.helpers import api

IMG = "https://example.com/a.png"
# A value of each common input, for the inputs a model does not accept at all.
PROBE = {"prompt": "a fox", "negative_prompt": "blur", "image_url": IMG, "seed": 7, "duration_seconds": 5,
         "aspect_ratio": "16:9", "resolution": "720p", "num_outputs": 2}
SORA_REPLACEMENT = "veo/veo-3.1-generate-preview"


@pytest.fixture
async def api_only(redis_url: str) -> AsyncIterator[Stack]:
    """The API and the simulators, no worker: accepted jobs stay queued (the walk submits hundreds)."""
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text") as s:
        yield s


def job(provider: str, model: str, kind: str, given: dict[str, Any]) -> dict[str, Any]:
    return {"provider": provider, "kind": kind, "model": model, "input": given}


def refused_field(resp: httpx.Response) -> str:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    return str(body["errors"][0]["field"]) if body.get("errors") else str(body.get("detail"))


# -- routes -------------------------------------------------------------------------------

async def test_models_routes_filters_and_schema(api_only: Stack) -> None:
    async with api(api_only) as client:
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        ids = {m["id"] for m in models["data"]}
        shipped = {f"{p}/{m}" for p, f in catalog.shipped().items() for m in f.models}
        assert ids == shipped and len(ids) > 100
        providers = {m["provider"] for m in models["data"]}
        assert {"sora", "veo", "kling", "runway", "replicate", "fal", "suno", "openai"} <= providers

        sora = (await client.get("/v1/models", params={"provider": "sora"})).json()["data"]
        assert [m["model"] for m in sora] == ["sora-2", "sora-2-pro"]
        one = sora[0]
        assert one["kinds"] == ["video"] and one["operations"] == ["generate", "remix"]
        assert one["inputs"]["video"]["duration_seconds"] == [4, 8, 12]
        assert one["inputs"]["video"]["aspect_ratio"] == ["16:9", "9:16"]
        assert one["inputs"]["video"]["num_outputs"] == {"min": 1, "max": 1}
        assert one["inputs"]["video"]["image_input"] is True
        assert (one["supports_callbacks"], one["supports_cancel"], one["supports_reconcile"]) == (False, False, True)
        assert one["sound"] is True and one["typical_seconds"]["video"] > 0
        # The simulators are "elsewhere": the sunset model stays available, marked as such.
        assert one["lifecycle"] == {"status": "sunset", "available": True, "deprecated": None,
                                    "sunset": "2026-09-24", "replacement": SORA_REPLACEMENT,
                                    "note": one["lifecycle"]["note"]}

        audio = (await client.get("/v1/models", params={"kind": "audio"})).json()["data"]
        assert audio and all("audio" in m["kinds"] for m in audio)
        assert {m["provider"] for m in audio} >= {"suno", "replicate", "fal"}
        remix = (await client.get("/v1/models", params={"operation": "remix"})).json()["data"]
        assert {m["provider"] for m in remix} == {"sora", "ideogram"}
        both = (await client.get("/v1/models", params={"provider": "kling", "kind": "image"})).json()["data"]
        assert both and all(m["provider"] == "kling" and "image" in m["kinds"] for m in both)
        assert (await client.get("/v1/models", params={"provider": "nobody"})).json()["data"] == []
        assert (await client.get("/v1/models", params={"kind": "smell"})).status_code == 422

        slashed = await client.get("/v1/models/replicate/black-forest-labs/flux-schnell")
        assert slashed.status_code == 200, slashed.text
        flux = slashed.json()
        assert flux["id"] == "replicate/black-forest-labs/flux-schnell" and flux["any_model"] is True
        assert "representative" in flux["provider_note"]
        fal = await client.get("/v1/models/fal/fal-ai/kling-video/v2/master/text-to-video")
        assert fal.status_code == 200 and fal.json()["kinds"] == ["video"]
        missing = await client.get("/v1/models/sora/sora-9")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")

        spec = (await client.get("/openapi.json")).json()
        assert "/v1/models" in spec["paths"] and "/v1/models/{provider}/{model}" in spec["paths"]
        assert {"ModelView", "ModelInputs", "ModelLifecycle", "ModelList"} <= set(spec["components"]["schemas"])

    async with httpx.AsyncClient(base_url=api_only.api_url) as anonymous:
        assert (await anonymous.get("/v1/models")).status_code == 401
        assert (await anonymous.get("/v1/models/sora/sora-2")).status_code == 401


# -- the catalog and the adapters agree ------------------------------------------------------

def cases() -> list[tuple[str, str, str, catalog.KindSpec]]:
    return [(provider, model, kind, spec) for provider, file in sorted(catalog.shipped().items())
            for model, entry in file.models.items() for kind, spec in entry.kinds().items()]


def _listed(spec: catalog.KindSpec) -> list[tuple[str, Any]]:
    """Every listed value of every constrained input, each on its own."""
    values: list[tuple[str, Any]] = []
    duration = spec.duration_seconds
    if isinstance(duration, catalog.Range):
        values += [("duration_seconds", duration.min), ("duration_seconds", duration.max)]
    elif duration:
        values += [("duration_seconds", d) for d in duration]
    values += [("aspect_ratio", a) for a in spec.aspect_ratio or []]
    values += [("resolution", r) for r in spec.resolution or []]
    if spec.num_outputs is not None:
        values += [("num_outputs", spec.num_outputs.min), ("num_outputs", spec.num_outputs.max)]
    return values


def _outside(spec: catalog.KindSpec) -> list[tuple[str, Any]]:
    """A value outside each constrained input's allowed values (within the API's own bounds)."""
    values: list[tuple[str, Any]] = []
    duration = spec.duration_seconds
    if isinstance(duration, catalog.Range):
        values.append(("duration_seconds", duration.max + 1))
    elif duration:
        values.append(("duration_seconds", 97))
    if spec.aspect_ratio:
        values.append(("aspect_ratio", "7:3"))
    if spec.resolution:
        values.append(("resolution", "123x45"))
    if spec.num_outputs is not None and spec.num_outputs.max < 8:
        values.append(("num_outputs", int(spec.num_outputs.max) + 1))
    return values


async def test_every_catalog_model_takes_its_values_and_refuses_others(api_only: Stack) -> None:
    """For every model and kind: its example and every listed value are accepted (202), a value outside
    the lists, an input it does not accept, or a missing required one is a 422 naming that field."""
    problems: list[str] = []
    count = 0
    async with api(api_only) as client:
        for provider, model, kind, spec in cases():
            assert spec.example, f"{provider}/{model} {kind}: no example"
            assert set(spec.requires) <= set(spec.accepts) or spec.requires == ["image_url"]
            where = f"{provider}/{model} ({kind})"

            valid = [("example", None, spec.example)]
            valid += [(f"{f}={v!r}", f, spec.example | {f: v}) for f, v in _listed(spec)]
            for label, _, given in valid:
                resp = await client.post("/v1/jobs", json=job(provider, model, kind, given))
                count += 1
                if resp.status_code != 202:
                    problems.append(f"{where}: {label} refused: {resp.text[:300]}")

            invalid = [(f"{f}={v!r}", f, spec.example | {f: v}) for f, v in _outside(spec)]
            invalid += [(f"{f} not accepted", f, spec.example | {f: PROBE[f]})
                        for f in catalog.KindSpec.model_fields["accepts"].default if f not in spec.accepts]
            invalid += [(f"{f} missing", f, {k: v for k, v in spec.example.items() if k != f})
                        for f in spec.requires]
            for label, field, given in invalid:
                resp = await client.post("/v1/jobs", json=job(provider, model, kind, given))
                count += 1
                if resp.status_code != 422:
                    problems.append(f"{where}: {label} answered {resp.status_code}, not 422")
                elif (named := refused_field(resp)) != f"input.{field}" and not (
                        field == "image_url" and named == "model" and label.endswith(("accepted", "missing"))):
                    # An adapter may blame the model for taking no (or needing an) input image:
                    # "pick an image-to-video model" (Jimeng's text-only req_keys, Kling's i2v-only models).
                    problems.append(f"{where}: {label} refused naming {named!r}, not input.{field}")
    assert not problems, f"{len(problems)} disagreements:\n" + "\n".join(problems)
    assert count > 500


# -- lifecycle at acceptance ---------------------------------------------------------------

SORA_2 = job("sora", "sora-2", "video", {"prompt": "a lighthouse at dusk"})


async def test_sunset_model_refused_at_the_providers_origin(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text",
                         sora_base_url="https://api.openai.com", sora_api_key="sk-test") as stack, \
            api(stack) as client:
        resp = await client.post("/v1/jobs", json=SORA_2)
        assert refused_field(resp) == "model"
        message = resp.json()["errors"][0]["message"]
        assert "2026-09-24" in message and SORA_REPLACEMENT in message
        # A batch item is refused the same way (nothing enqueued).
        batch = await client.post("/v1/batches", json={"jobs": [SORA_2]})
        assert batch.status_code == 202 and batch.json()["invalid"][0]["field"] == "model"
        view = (await client.get("/v1/models/sora/sora-2")).json()
        assert view["lifecycle"]["status"] == "sunset" and view["lifecycle"]["available"] is False
        # The adapter itself still takes the request: only the lifecycle refuses it.
        other = await client.post("/v1/jobs", json=job("veo", "veo-3.1-generate-preview", "video",
                                                       {"prompt": "a lighthouse at dusk"}))
        assert other.status_code == 202, other.text


async def test_sunset_model_behind_a_gateway_carries_a_note(api_only: Stack) -> None:
    async with api(api_only) as client:
        resp = await client.post("/v1/jobs", json=SORA_2)
        assert resp.status_code == 202, resp.text
        note = resp.json()["note"]
        assert note.startswith("deprecated:") and "2026-09-24" in note and SORA_REPLACEMENT in note
        assert (await client.get(f"/v1/jobs/{resp.json()['id']}")).json()["note"] == note
        batch = await client.post("/v1/batches", json={"jobs": [SORA_2, job(
            "replicate", "black-forest-labs/flux-schnell", "image", {"prompt": "a fox"})]})
        assert batch.status_code == 202, batch.text
        jobs = (await client.get(f"/v1/batches/{batch.json()['id']}/jobs")).json()["data"]
        notes = {j["provider"]: j["note"] for j in jobs}
        assert notes["sora"] == note and notes["replicate"] is None


async def test_retired_models_and_operator_models(redis_url: str) -> None:
    providers_file = {"sora": {
        "retired_models": ["sora-2-pro"],
        "models": {"sora-2-gateway-hd": {
            "sound": True, "note": "our gateway's own build",
            "lifecycle": {"deprecated": "2026-01-01", "replacement": "sora/sora-2"},
            "video": {"requires": ["prompt"], "accepts": ["prompt", "duration_seconds"],
                      "duration_seconds": [4, 8, 12], "example": {"prompt": "a fox"}}}},
    }}
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text",
                         providers_file=providers_file) as stack, api(stack) as client:
        pro = job("sora", "sora-2-pro", "video", {"prompt": "a lighthouse"})
        resp = await client.post("/v1/jobs", json=pro)
        assert refused_field(resp) == "model" and "retired" in resp.json()["errors"][0]["message"]
        assert (await client.post("/v1/jobs", json=SORA_2)).status_code == 202  # not retired: a note

        listed = (await client.get("/v1/models", params={"provider": "sora"})).json()["data"]
        by_name = {m["model"]: m for m in listed}
        assert by_name["sora-2-pro"]["lifecycle"] | {"note": None} == {
            "status": "retired", "available": False, "deprecated": None, "sunset": "2026-09-24",
            "replacement": SORA_REPLACEMENT, "note": None}
        own = by_name["sora-2-gateway-hd"]
        assert own["source"] == "operator" and own["note"] == "our gateway's own build"
        assert own["operations"] == ["generate", "remix"] and own["lifecycle"]["status"] == "deprecated"
        assert own["inputs"]["video"]["accepts"] == ["prompt", "duration_seconds"]
        taken = await client.post("/v1/jobs", json=job("sora", "sora-2-gateway-hd", "video", {"prompt": "x"}))
        assert taken.status_code == 202, taken.text
        assert "deprecated since 2026-01-01" in taken.json()["note"] and "sora/sora-2" in taken.json()["note"]


def test_lifecycle_verdicts() -> None:
    def settings(base_url: str, **kw: Any) -> ProviderSettings:
        return ProviderSettings(name="openai", base_url=base_url, **kw)

    origin, gateway = settings("https://api.openai.com/"), settings("https://gateway.example.com/openai")
    assert catalog.lifecycle_verdict(origin, "dall-e-3").refusal is not None
    assert "openai/gpt-image-1.5" in str(catalog.lifecycle_verdict(origin, "dall-e-3").refusal)
    assert catalog.lifecycle_verdict(gateway, "dall-e-3").note is not None
    # Before the sunset date the model is taken anywhere, without a note.
    assert catalog.lifecycle_verdict(origin, "dall-e-3", today=dt.date(2026, 5, 11)) == catalog.Verdict()
    assert catalog.lifecycle_verdict(origin, "gpt-image-1.5") == catalog.Verdict()
    assert catalog.lifecycle_verdict(origin, "not-in-the-catalog") == catalog.Verdict()
    retired = settings("https://gateway.example.com", retired_models=["gpt-image-1"])
    assert "retired" in str(catalog.lifecycle_verdict(retired, "gpt-image-1").refusal)
    with pytest.raises(catalog.CatalogError, match="models"):
        catalog.lifecycle_verdict(settings("https://x", models={"m": {"video": {"durations": [1]}}}), "m")


# -- the CLI -------------------------------------------------------------------------------

def atelier(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=60)


def test_cli_models_table_and_json(tmp_path: Any) -> None:
    out = atelier("models", "--provider", "sora")
    assert out.returncode == 0, out.stderr
    assert "sora-2-pro" in out.stdout and "4, 8, 12" in out.stdout and "16:9, 9:16" in out.stdout
    assert "refused" in out.stdout  # the default base URL: OpenAI's own, closed
    assert "0.1 USD/s" in out.stdout and "2 models" in out.stdout

    audio = atelier("models", "--kind", "audio", "--json")
    rows = [json.loads(line) for line in audio.stdout.splitlines()]
    assert audio.returncode == 0 and rows and all("audio" in r["kinds"] for r in rows)

    config = tmp_path / "atelier.toml"
    config.write_text('[providers.sora]\nbase_url = "https://gateway.example.com"\n'
                      '[providers.sora.models."sora-2-own"]\nvideo = {example = {prompt = "x"}}\n')
    gateway = atelier("models", "--provider", "sora", "--json", env={"ATELIER_CONFIG_FILE": str(config)})
    rows = [json.loads(line) for line in gateway.stdout.splitlines()]
    by_name = {r["model"]: r for r in rows}
    assert by_name["sora-2"]["lifecycle"]["available"] is True and by_name["sora-2-own"]["source"] == "operator"

    none = atelier("models", "--provider", "nobody")
    assert none.returncode == 1 and "no model" in none.stderr


# -- measured durations --------------------------------------------------------------------

async def test_measured_p50_p90_from_this_deployments_finished_jobs(stack: Stack) -> None:
    from tests.helpers import submit, wait_for

    path = "/v1/models/replicate/black-forest-labs/flux-schnell"
    async with api(stack) as client:
        assert (await client.get(path)).json()["measured"] is None
        for _ in range(2):
            done = await wait_for(client, (await submit(client))["id"])
            assert done["status"] == "succeeded", done
        measured = (await client.get(path)).json()["measured"]
        assert measured["count"] == 2 and 0 < measured["p50_seconds"] <= measured["p90_seconds"] < 30
        listed = (await client.get("/v1/models", params={"provider": "replicate"})).json()["data"]
        assert {m["model"]: m["measured"] for m in listed}["black-forest-labs/flux-schnell"] == measured
        assert {m["model"]: m["measured"] for m in listed}["black-forest-labs/flux-dev"] is None


def test_percentiles_are_nearest_rank() -> None:
    from orchestrator.store.durations import _percentile

    values = [float(v) for v in range(1, 11)]
    assert (_percentile(values, 0.5), _percentile(values, 0.9)) == (5.0, 9.0)
    assert _percentile([3.0], 0.9) == 3.0


# -- cost.estimated from the price rules -------------------------------------------------------

async def test_jobs_carry_an_estimate_from_the_price_rule(redis_url: str) -> None:
    prices = {"sora": {"prices": {"sora-2-pro": {"unit": "second", "amount": 0.25, "source": "our contract"}}}}
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text",
                         providers_file=prices) as stack, api(stack) as client:
        async def cost(provider: str, model: str, kind: str, **given: Any) -> Any:
            resp = await client.post("/v1/jobs", json=job(provider, model, kind, {"prompt": "a fox"} | given))
            assert resp.status_code == 202, resp.text
            got = (await client.get(f"/v1/jobs/{resp.json()['id']}")).json()["cost"]
            assert got == resp.json()["cost"]
            return got["estimated"]

        sora = await cost("sora", "sora-2", "video", duration_seconds=8)
        assert sora == {"amount": 0.8, "currency": "USD", "rule": "0.1 USD per second x 8 s (catalog price)"}
        veo = await cost("veo", "veo-3.1-generate-preview", "video")  # no duration: the default 8 s
        assert veo["amount"] == pytest.approx(3.2) and "default duration" in veo["rule"]
        flux = await cost("replicate", "black-forest-labs/flux-schnell", "image", num_outputs=2)
        assert flux["amount"] == pytest.approx(0.006) and flux["rule"].endswith("x 2 (catalog price)")
        assert await cost("kling", "kling-v1", "video") is None  # no price rule known
        pro = await cost("sora", "sora-2-pro", "video", duration_seconds=12)
        assert pro["amount"] == pytest.approx(3.0) and "operator price" in pro["rule"]

        rule = (await client.get("/v1/models/sora/sora-2-pro")).json()["price"]
        assert rule == {"unit": "second", "amount": 0.25, "currency": "USD", "default_seconds": None,
                        "default_tokens": None, "origin": "operator", "source": "our contract"}
        listed = (await client.get("/v1/models/sora/sora-2")).json()["price"]
        assert listed["origin"] == "catalog" and listed["amount"] == 0.1 and listed["default_seconds"] == 4

        batch = await client.post("/v1/batches", json={"jobs": [job("sora", "sora-2", "video", {"prompt": "x"})]})
        jobs = (await client.get(f"/v1/batches/{batch.json()['id']}/jobs")).json()["data"]
        assert jobs[0]["cost"]["estimated"]["amount"] == pytest.approx(0.4)  # 4 s by default


def test_every_price_rule_estimates() -> None:
    for provider, file in catalog.shipped().items():
        settings = ProviderSettings(name=provider, base_url="http://gateway")
        for model, spec in file.models.items():
            if spec.price is None:
                continue
            found = catalog.estimate(settings, model, 5, 1)
            assert found is not None and found.amount > 0 and found.currency == "USD", (provider, model)
