"""The Replicate simulator, driven over real HTTP: with the official ``replicate`` client, then raw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from providers.sandbox.base import SimConfig
from providers.sandbox.replicate import MODELS, ReplicateSimulator
from providers.sandbox.serve import serving

KEY = "r8_" + "k" * 37
HDR = {"Authorization": f"Bearer {KEY}"}
FLUX = "black-forest-labs/flux-schnell"
SDXL = "stability-ai/sdxl"
SDXL_VERSION = MODELS[SDXL].versions[1]
TERMINAL = ("succeeded", "failed", "canceled", "aborted")


@dataclass
class Env:
    sim: ReplicateSimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, prompt: str | None = "a fox", model: str = FLUX,
                     headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        inp = {} if prompt is None else {"prompt": prompt}
        return await self.http.post(f"/v1/models/{model}/predictions", json={"input": inp} | body,
                                    headers=headers)

    async def get(self, pid: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/predictions/{pid}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, pid: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if (body := await self.get(pid))["status"] in TERMINAL:
                return body
            await asyncio.sleep(0.03)
        raise AssertionError(f"{pid} did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = ReplicateSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR, timeout=10) as http:
        yield Env(sim, base, http)


# -- the official client ------------------------------------------------------------


def official_client_session(base: str) -> dict[str, Any]:
    """Everything a user of the ``replicate`` package does, against the simulator (blocking calls)."""
    client = replicate.Client(api_token=KEY, base_url=base)
    client.poll_interval = 0.05
    seen: dict[str, Any] = {}

    model = client.models.get(FLUX)
    seen["model"] = (model.owner, model.name, model.visibility)
    assert model.latest_version is not None
    seen["required"] = model.latest_version.openapi_schema["components"]["schemas"]["Input"]["required"]
    sdxl = client.models.get(SDXL)
    seen["sdxl_versions"] = [v.id for v in sdxl.versions.list()]
    seen["sdxl_version"] = sdxl.versions.get(SDXL_VERSION).id

    made = client.models.predictions.create(FLUX, input={"prompt": "a fox", "num_outputs": 2})
    seen["created"] = made.status
    made.wait()
    seen["finished"] = (made.status, made.output, made.progress and made.progress.percentage)
    by_version = client.predictions.create(version=SDXL_VERSION, input={"prompt": "a hut"})
    by_version.reload()
    seen["by_version"] = (by_version.model, by_version.version, by_version.status)

    # A user cancel of a starting prediction, then of a processing one: both read "canceled".
    starting = client.models.predictions.create(FLUX, input={"prompt": "slow [sim:queue=5]"})
    starting.cancel()
    seen["cancel_starting"] = starting.status
    starting.reload()
    seen["cancel_starting_reloaded"] = starting.status
    processing = client.models.predictions.create(FLUX, input={"prompt": "long [sim:queue=0.05] [sim:run=5]"})
    while processing.status == "starting":
        time.sleep(0.05)
        processing.reload()
    processing.cancel()
    seen["cancel_processing"] = processing.status

    page = client.predictions.list()  # parses every listed prediction, canceled ones included
    seen["listed"] = [p.id for p in page]
    seen["expected"] = [processing.id, starting.id, by_version.id, made.id]

    seen["run"] = client.run(FLUX, input={"prompt": "a run"})
    seen["run_version"] = client.run(f"{SDXL}:{SDXL_VERSION}", input={"prompt": "a pinned run"})

    errors: dict[str, ReplicateError] = {}
    for name, call in {
        "unknown_model": lambda: client.models.predictions.create("nobody/nothing", input={"prompt": "x"}),
        "unknown_version": lambda: client.predictions.create(version="0" * 64, input={"prompt": "x"}),
        "no_prompt": lambda: client.models.predictions.create(FLUX, input={"seed": 1}),
        "unknown_model_get": lambda: client.models.get("nobody/nothing"),
    }.items():
        try:
            call()
        except ReplicateError as exc:
            errors[name] = exc
    seen["errors"] = errors
    return seen


async def test_the_official_client_drives_the_simulator(env: Env) -> None:
    seen = await asyncio.to_thread(official_client_session, env.base)

    assert seen["model"] == ("black-forest-labs", "flux-schnell", "public")
    assert seen["required"] == ["prompt"]
    assert seen["sdxl_versions"] == list(MODELS[SDXL].versions) and seen["sdxl_version"] == SDXL_VERSION
    assert seen["created"] == "starting"
    status, output, progress = seen["finished"]
    assert status == "succeeded" and progress == 1.0
    assert isinstance(output, list) and len(output) == 2
    assert (await env.http.get(output[0])).content.startswith(b"\x89PNG")
    assert seen["by_version"] == (SDXL, SDXL_VERSION, "starting")

    assert seen["cancel_starting"] == seen["cancel_starting_reloaded"] == "canceled"
    assert seen["cancel_processing"] == "canceled"
    assert seen["listed"][:4] == seen["expected"]  # newest first

    run_output = seen["run"]  # Prefer: wait, so run() gets the finished prediction in one call
    assert isinstance(run_output, list) and run_output[0].startswith(env.base)
    assert isinstance(seen["run_version"], list) and len(seen["run_version"]) == 1

    errors = seen["errors"]
    assert set(errors) == {"unknown_model", "unknown_version", "no_prompt", "unknown_model_get"}
    assert errors["unknown_model"].status == 404 and errors["unknown_model_get"].status == 404
    assert errors["unknown_version"].status == 422
    assert errors["unknown_version"].title == "Invalid version or not permitted"
    assert errors["no_prompt"].status == 422 and errors["no_prompt"].title == "Input validation failed"
    assert errors["no_prompt"].detail == "- input: prompt is required\n"
    assert env.sim.stats.creations == 6  # the refused requests created nothing


async def test_the_official_client_pages_through_the_list(env: Env) -> None:
    env.sim.config.extra["list_page_size"] = 2
    ids = [(await env.create(f"item {i}")).json()["id"] for i in range(5)]

    def pages() -> list[list[str]]:
        client = replicate.Client(api_token=KEY, base_url=env.base)
        return [[p.id for p in page] for page in replicate.paginate(client.predictions.list)]

    assert await asyncio.to_thread(pages) == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


# -- listing ------------------------------------------------------------------------


async def test_list_pages_newest_first_and_cursors_hold_their_place(env: Env) -> None:
    env.sim.config.extra["list_page_size"] = 3
    ids = [(await env.create(f"p{i}")).json()["id"] for i in range(7)]
    newest_first = ids[::-1]

    first = (await env.http.get("/v1/predictions")).json()
    assert [p["id"] for p in first["results"]] == newest_first[:3]
    assert first["previous"] is None
    assert first["next"].startswith(f"{env.base}/v1/predictions?cursor=")
    assert all(p["source"] == "api" for p in first["results"])

    later = (await env.create("created while paging")).json()["id"]  # does not shift the pages
    second = (await env.http.get(first["next"])).json()
    assert [p["id"] for p in second["results"]] == newest_first[3:6]
    third = (await env.http.get(second["next"])).json()
    assert [p["id"] for p in third["results"]] == newest_first[6:]
    assert third["next"] is None

    back = (await env.http.get(second["previous"])).json()
    assert [p["id"] for p in back["results"]] == newest_first[:3]
    assert [p["id"] for p in (await env.http.get(back["previous"])).json()["results"]] == [later]

    bad = await env.http.get("/v1/predictions", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and bad.json()["status"] == 400


async def test_list_filters_by_creation_time_across_pages(env: Env) -> None:
    env.sim.config.extra["list_page_size"] = 2
    old = [(await env.create(f"old {i}")).json() for i in range(2)]
    window = [(await env.create(f"new {i}")).json() for i in range(5)]
    after = window[0]["created_at"]  # inclusive
    before = window[4]["created_at"]  # exclusive

    got: list[str] = []
    url: str | None = f"/v1/predictions?created_after={after}&created_before={before}"
    while url:
        page = (await env.http.get(url)).json()
        got += [p["id"] for p in page["results"]]
        url = page["next"]  # the cursor carries the filters
    assert got == [p["id"] for p in window[3::-1]]
    assert not {p["id"] for p in old} & set(got)

    since = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    assert (await env.http.get("/v1/predictions", params={"created_after": since})).json() == {
        "previous": None, "next": None, "results": []}
    assert (await env.http.get("/v1/predictions", params={"created_after": "yesterday"})).status_code == 400


async def test_more_than_a_page_in_the_window_by_default() -> None:
    """The reconcile case of issue 13: 100 a page, so a match can sit on page 2."""
    sim = ReplicateSimulator(SimConfig(queue_seconds=5, run_seconds=5, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR) as http:
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        target = (await http.post(f"/v1/models/{FLUX}/predictions", json={"input": {"prompt": "mine"}})).json()
        for i in range(100):
            await http.post(f"/v1/models/{FLUX}/predictions", json={"input": {"prompt": f"other {i}"}})
        first = (await http.get("/v1/predictions", params={"created_after": since})).json()
        assert len(first["results"]) == 100 and target["id"] not in {p["id"] for p in first["results"]}
        second = (await http.get(first["next"])).json()
        assert [p["id"] for p in second["results"]] == [target["id"]] and second["next"] is None


# -- cancel -------------------------------------------------------------------------


async def test_user_cancel_is_canceled_and_cancel_after_is_aborted(env: Env) -> None:
    starting = (await env.create("wait [sim:queue=5]")).json()["id"]
    r = await env.http.post(f"/v1/predictions/{starting}/cancel")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "canceled" and body["started_at"] <= body["completed_at"]
    assert body["metrics"]["predict_time"] == 0 and "output" not in body

    running = (await env.create("run [sim:run=5]")).json()["id"]
    await asyncio.sleep(0.2)
    assert (await env.get(running))["status"] == "processing"
    body = (await env.http.post(f"/v1/predictions/{running}/cancel")).json()
    assert body["status"] == "canceled" and body["metrics"]["predict_time"] > 0

    done = (await env.create("quick")).json()["id"]
    finished = await env.wait(done)
    again = (await env.http.post(f"/v1/predictions/{done}/cancel")).json()
    assert again["status"] == "succeeded" and again["completed_at"] == finished["completed_at"]

    # A Cancel-After deadline: aborted if it passes before the start, canceled after it.
    early = (await env.create("late start [sim:queue=5]", headers={"Cancel-After": "200ms"})).json()["id"]
    aborted = await env.wait(early)
    assert aborted["status"] == "aborted" and "started_at" not in aborted
    late = (await env.create("long run [sim:run=5]", headers={"Cancel-After": "0.3s"})).json()["id"]
    assert (await env.wait(late))["status"] == "canceled"
    refused = await env.create("x", headers={"Cancel-After": "soon"})
    assert refused.status_code == 422 and refused.json()["detail"]
    assert (await env.http.post("/v1/predictions/nope/cancel")).status_code == 404


# -- refusals -----------------------------------------------------------------------


async def test_refuses_what_replicate_refuses(env: Env) -> None:
    unknown = await env.create(model="nobody/nothing")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json() == {"detail": "The requested resource could not be found.", "status": 404}
    assert (await env.create(model=SDXL)).status_code == 404  # not official: it needs a version

    versions = {"unknown": "f" * 64, "not hex": f"{SDXL}:latest",
                "another model's": f"{FLUX}:{SDXL_VERSION}"}
    for version in versions.values():
        r = await env.http.post("/v1/predictions", json={"version": version, "input": {"prompt": "x"}})
        assert r.status_code == 422, version
        assert r.json()["title"] == "Invalid version or not permitted" and r.json()["detail"]

    no_prompt = await env.create(prompt=None)
    assert no_prompt.status_code == 422
    assert no_prompt.json() == {
        "detail": "- input: prompt is required\n", "status": 422, "title": "Input validation failed",
        "invalid_fields": [{"type": "required", "field": "input", "description": "prompt is required"}]}
    wrong_type = await env.http.post(f"/v1/models/{FLUX}/predictions", json={"input": {"prompt": 42}})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["invalid_fields"][0]["field"] == "input.prompt"
    no_input = await env.http.post(f"/v1/models/{FLUX}/predictions", json={"webhook": "https://x"})
    assert no_input.status_code == 422 and no_input.json()["title"] == "Input validation failed"
    not_json = await env.http.post(f"/v1/models/{FLUX}/predictions", content=b"{")
    assert not_json.status_code == 400 and not_json.json()["status"] == 400
    assert env.sim.stats.creations == 0

    # SDXL's prompt has a default, so its versions run without one.
    r = await env.http.post("/v1/predictions", json={"version": SDXL_VERSION, "input": {}})
    assert r.status_code == 201 and r.json()["version"] == SDXL_VERSION and r.json()["model"] == SDXL


async def test_auth_and_throttle_problems(env: Env) -> None:
    r = await env.create(headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert r.json() == {"detail": "You did not pass a valid authentication token", "status": 401,
                        "title": "Unauthenticated"}
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 2}])
    r = await env.create()
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["detail"].startswith("Request was throttled")
    r = await env.create()
    assert r.status_code == 201 and r.headers["ratelimit-remaining"] == "599"
    assert r.headers["location"] == f"{env.base}/v1/predictions/{r.json()['id']}"


# -- models -------------------------------------------------------------------------


async def test_model_and_version_routes(env: Env) -> None:
    model = (await env.http.get(f"/v1/models/{FLUX}")).json()
    assert model["url"] == f"https://replicate.com/{FLUX}" and model["run_count"] == 0
    latest = model["latest_version"]
    assert len(latest["id"]) == 64 and latest["cog_version"]
    assert latest["openapi_schema"]["components"]["schemas"]["Output"]["type"] == "array"

    await env.create()
    assert (await env.http.get(f"/v1/models/{FLUX}")).json()["run_count"] == 1
    video = (await env.http.get("/v1/models/minimax/video-01")).json()
    assert video["latest_version"]["openapi_schema"]["components"]["schemas"]["Output"]["format"] == "uri"

    listed = (await env.http.get(f"/v1/models/{SDXL}/versions")).json()
    assert listed["next"] is None and [v["id"] for v in listed["results"]] == list(MODELS[SDXL].versions)
    assert listed["results"][0]["created_at"] > listed["results"][1]["created_at"]  # newest first
    one = (await env.http.get(f"/v1/models/{SDXL}/versions/{SDXL_VERSION}")).json()
    assert one == listed["results"][1]

    for path in ("/v1/models/nobody/nothing", "/v1/models/nobody/nothing/versions",
                 f"/v1/models/{FLUX}/versions/{SDXL_VERSION}"):
        assert (await env.http.get(path)).status_code == 404, path

    env.sim.config.extra["models"] = {"acme/clip-maker": {"required": ["prompt", "image"]}}
    assert (await env.http.get("/v1/models/acme/clip-maker")).status_code == 200
    r = await env.create(model="acme/clip-maker")
    assert r.status_code == 422 and r.json()["detail"] == "- input: image is required\n"


# -- the rest of the documented behaviour -------------------------------------------


async def test_prefer_wait_and_data_removal(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.3
    r = await env.create("wait for me", headers={"Prefer": "wait=5"})
    assert r.status_code == 201 and r.headers["preference-applied"] == "wait=5"
    body = r.json()
    assert body["status"] == "succeeded" and isinstance(body["output"], list)
    assert body["metrics"]["predict_time"] == pytest.approx(0.2)
    assert "100%|" in body["logs"]

    assert (await env.http.get(body["output"][0])).status_code == 200
    await asyncio.sleep(0.4)
    removed = await env.get(body["id"])
    assert removed["status"] == "succeeded" and removed["output"] is None and removed["data_removed"] is True
    assert (await env.http.get(body["output"][0])).status_code == 404
