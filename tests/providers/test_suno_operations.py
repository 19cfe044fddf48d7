"""Suno's follow-ups (extend, lyrics, wav, persona; concat nowhere) in both flavours, against the Suno
simulators through the real API and worker: from a real source job to stored outputs, what was sent
checked, and the refusals at acceptance."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.jobs import JobStore
from providers.contract import GenerationRequest, MediaInput, MediaKind, ProviderSettings, SourceMedia
from providers.errors import InvalidInput
from providers.suno import SunoProvider
from tests.helpers import api, sim_stats, submit, wait_for

SANDBOX_AUTH = {"Authorization": "Bearer sandbox-key"}
LYRICS = "[Verse]\nQueues and workers in the night\n[Chorus]\nEvery job comes out right"
MORE = "[Verse 2]\nThe poller wakes, the callbacks call\n[Outro]\nStored and signed, that is all"


async def suno_job(client: httpx.AsyncClient, model: str = "chirp-v4", operation: str = "generate",
                   source: dict[str, Any] | None = None, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"provider": "suno", "kind": "audio", "model": model, "operation": operation,
                            "input": input_fields}
    if source is not None:
        body["source"] = source
    return await submit(client, **body)


async def refused(client: httpx.AsyncClient, status: int = 422, model: str = "chirp-v4", operation: str = "generate",
                  source: dict[str, Any] | None = None, **input_fields: Any) -> str:
    """The field a refused follow-up names (nothing is enqueued)."""
    body: dict[str, Any] = {"provider": "suno", "kind": "audio", "model": model, "operation": operation,
                            "input": input_fields}
    if source is not None:
        body["source"] = source
    resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == status, (operation, input_fields, resp.text)
    assert resp.headers["content-type"] == "application/problem+json"
    field: str = resp.json()["errors"][0]["field"]
    return field


def sim_task(stack: Stack, sim: str, task_id: str) -> Any:
    return stack.simulators[sim].tasks[task_id]  # type: ignore[attr-defined]


async def gateway_dto(stack: Stack, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{stack.simulator_url('suno')}/suno/fetch/{task_id}", headers=SANDBOX_AUTH)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def sunoapi_record(stack: Stack, path: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as raw:
        resp = await raw.get(f"{stack.simulator_url('suno-api')}/api/v1/{path}/record-info",
                             params={"taskId": task_id}, headers=SANDBOX_AUTH)
    assert resp.status_code == 200 and resp.json()["code"] == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def stored(client: httpx.AsyncClient, output: dict[str, Any]) -> bytes:
    resp = await client.get(output["url"])
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).hexdigest() == output["sha256"] and len(resp.content) == output["bytes"]
    return resp.content


async def assert_stored_as_served(client: httpx.AsyncClient, output: dict[str, Any], url: str) -> None:
    async with httpx.AsyncClient() as raw:
        served = await raw.get(url)
    assert served.status_code == 200
    assert await stored(client, output) == served.content


async def provider_state(stack: Stack, job_id: str) -> dict[str, Any]:
    """What the adapter kept of a job's task (the worker stores it verbatim)."""
    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        job = await JobStore(redis).get(job_id)
    finally:
        await redis.aclose()
    assert job is not None
    return dict(job.provider_state)


async def song(client: httpx.AsyncClient, model: str = "chirp-v4") -> dict[str, Any]:
    """A finished custom-mode song: the source of the follow-ups."""
    job = await suno_job(client, model=model, prompt=LYRICS, options={"style": "synthpop", "title": "City Lights"})
    done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert [o["metadata"]["role"] for o in done["outputs"]] == ["audio", "cover", "audio", "cover"]
    return done


def creating(stats: dict[str, Any]) -> dict[str, Any]:
    """The requests that create something at the provider (polls may go on meanwhile)."""
    routes = ("submit", "generate", "extend", "lyrics", "wav", "persona")
    return {"creations": stats["creations"], **{r: stats["requests"].get(r, 0) for r in routes}}


# ---------------------------------------------------------------------------
# gateway flavour (new-api + Suno-API): extend and lyrics
# ---------------------------------------------------------------------------


async def test_gateway_extend_continues_the_clip_the_source_output_names(stack):
    async with api(stack) as client:
        source = await song(client)
        second_clip = source["outputs"][2]["metadata"]["clip_id"]
        assert second_clip != source["outputs"][0]["metadata"]["clip_id"]
        # Output 3 is the second clip's cover: it names the same clip as its audio.
        job = await suno_job(client, operation="extend", source={"job_id": source["id"], "output": 3},
                             prompt=MORE, options={"tags": "synthpop", "title": "City Lights", "continue_at": 0.5})
        assert job["operation"] == "extend" and job["source"] == {"job_id": source["id"], "output": 3}
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        task_id = done["provider_task_id"]
        dto = await gateway_dto(stack, task_id)
        assert dto["action"] == "MUSIC" and len(dto["data"]) == 2
        assert [o["metadata"]["role"] for o in done["outputs"]] == ["audio", "cover"] * 2
        for i, clip in enumerate(dto["data"]):
            audio, cover = done["outputs"][2 * i], done["outputs"][2 * i + 1]
            assert audio["metadata"]["clip_id"] == cover["metadata"]["clip_id"] == clip["id"]
            assert clip["metadata"]["history"] == [{"id": second_clip, "continue_at": 0.5}]
            await assert_stored_as_served(client, audio, clip["audio_url"])
            await assert_stored_as_served(client, cover, clip["image_large_url"])
        assert not {o["sha256"] for o in done["outputs"]} & {o["sha256"] for o in source["outputs"]}
        # Polling the source kept each output's clip and each clip's length, for follow-ups.
        kept = await provider_state(stack, source["id"])
        assert kept["output_clips"] == [o["metadata"]["clip_id"] for o in source["outputs"]]
        assert kept["clip_seconds"] == {o["metadata"]["clip_id"]: o["metadata"]["duration"]
                                        for o in source["outputs"] if o["metadata"]["role"] == "audio"}
        assert (await provider_state(stack, done["id"]))["clip_id"] == second_clip
    # Custom mode (Suno-API forwards a continuation only then), the clip and the source task named.
    assert sim_task(stack, "suno", task_id).input == {
        "prompt": MORE, "tags": "synthpop", "title": "City Lights", "mv": "chirp-v4", "make_instrumental": False,
        "continue_at": 0.5, "continue_clip_id": second_clip, "task_id": source["provider_task_id"]}


async def test_gateway_lyrics_are_stored_as_text(stack):
    async with api(stack) as client:
        job = await suno_job(client, operation="lyrics", prompt="a song about rain on a tin roof")
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        dto = await gateway_dto(stack, done["provider_task_id"])
        (output,) = done["outputs"]
        text = (await stored(client, output)).decode()
    assert dto["action"] == "LYRICS" and dto["data"]["text"] and text == dto["data"]["text"]
    assert output["content_type"] == "text/plain"
    assert output["metadata"]["role"] == "lyrics" and output["metadata"]["title"] == dto["data"]["title"]
    # The gateway re-serialises SunoSubmitReq (make_instrumental has no omitempty).
    assert sim_task(stack, "suno", done["provider_task_id"]).input == {"prompt": "a song about rain on a tin roof",
                                                                       "make_instrumental": False}


async def test_gateway_refusals_name_the_field_and_send_nothing(stack):
    async with api(stack) as client:
        source = await song(client)
        lyrics = await wait_for(client, (await suno_job(client, operation="lyrics", prompt="rain"))["id"])
        running = await suno_job(client, prompt="a long song [sim:run=30]")
        other = await wait_for(client, (await submit(client))["id"])  # a replicate image
        assert lyrics["status"] == other["status"] == "succeeded"
        before = creating(await sim_stats(stack, "suno"))
        src = {"job_id": source["id"], "output": 0}
        extend = {"operation": "extend", "source": src, "prompt": MORE}
        cases: list[tuple[dict[str, Any], str]] = [
            # Not offered by the gateway (new-api serves MUSIC and LYRICS only).
            ({"operation": "wav", "source": src}, "operation"),
            ({"operation": "persona", "source": src, "options": {"name": "n", "description": "d"}}, "operation"),
            ({"operation": "concat", "source": src}, "operation"),
            # The source.
            ({"operation": "extend", "prompt": MORE, "options": {"continue_at": 0.5}}, "source"),
            (extend | {"source": {"job_id": other["id"]}, "options": {"continue_at": 0.5}}, "source"),
            (extend | {"source": {"job_id": lyrics["id"]}, "options": {"continue_at": 0.5}}, "source"),
            ({"source": src}, "source"),  # generate takes no source
            ({"operation": "lyrics", "source": src, "prompt": "rain"}, "source"),
            # continue_at: required, a number, inside the clip (the simulator's clips last 1 s).
            (extend | {"options": {}}, "input.options.continue_at"),
            (extend | {"options": {"continue_at": "0.5"}}, "input.options.continue_at"),
            (extend | {"options": {"continue_at": -1}}, "input.options.continue_at"),
            (extend | {"options": {"continue_at": 0}}, "input.options.continue_at"),
            (extend | {"options": {"continue_at": 5}}, "input.options.continue_at"),
            (extend | {"options": {"continueAt": 1.0}}, "input.options.continueAt"),
            # The source names the clip and the task; the gateway continues only in custom mode.
            (extend | {"options": {"continue_at": 0.5, "continue_clip_id": "x"}}, "input.options.continue_clip_id"),
            (extend | {"options": {"continue_at": 0.5, "task_id": "x"}}, "input.options.task_id"),
            (extend | {"options": {"continue_at": 0.5, "custom_mode": False}}, "input.options.custom_mode"),
            (extend | {"prompt": None, "options": {"continue_at": 0.5}}, "input.prompt"),
            (extend | {"options": {"continue_at": 0.5, "negativeTags": "x"}}, "input.options.negativeTags"),
            # lyrics takes a prompt and nothing else.
            ({"operation": "lyrics"}, "input.prompt"),
            ({"operation": "lyrics", "prompt": "rain", "options": {"title": "x"}}, "input.options.title"),
        ]
        for case, field in cases:
            fields = dict(case)
            operation = fields.pop("operation", "generate")
            case_source = fields.pop("source", None)
            got = await refused(client, operation=operation, source=case_source,
                                **{k: v for k, v in fields.items() if v is not None})
            assert got == field, (case, got)
        # A source that has not succeeded is a conflict.
        field = await refused(client, 409, operation="extend", source={"job_id": running["id"]}, prompt=MORE,
                              options={"continue_at": 0.5})
        assert field == "source.job_id"
        assert creating(await sim_stats(stack, "suno")) == before  # (the running job is still being polled)


# ---------------------------------------------------------------------------
# sunoapi flavour (sunoapi.org): extend, lyrics, wav, persona
# ---------------------------------------------------------------------------


@pytest.fixture
async def sunoapi_stack(redis_url):
    async with dev_stack(redis_url=redis_url, suno_flavor="sunoapi", log_format="text") as s:
        yield s


async def test_sunoapi_extend_wav_and_persona_of_a_source_clip(sunoapi_stack):
    stack = sunoapi_stack
    async with api(stack) as client:
        source = await song(client, model="V4_5")
        source_task = source["provider_task_id"]
        first_clip = source["outputs"][0]["metadata"]["clip_id"]
        second_clip = source["outputs"][2]["metadata"]["clip_id"]
        extend = await suno_job(client, model="V4_5", operation="extend", source={"job_id": source["id"], "output": 2},
                                prompt=MORE, options={"style": "synthpop", "title": "City Lights (Extended)",
                                                      "continueAt": 0.5, "vocalGender": "f"})
        wav = await suno_job(client, model="V4_5", operation="wav", source={"job_id": source["id"]})
        persona = await suno_job(client, model="V4_5", operation="persona",
                                 source={"job_id": source["id"], "output": 3},
                                 options={"name": "Night Driver", "description": "a warm synthpop alto"})
        # Without custom parameters the source's own are used (defaultParamFlag false).
        plain = await suno_job(client, model="V4_5", operation="extend", source={"job_id": source["id"]},
                               options={"continue_at": 0.25})
        extend, wav, persona, plain = [await wait_for(client, j["id"]) for j in (extend, wav, persona, plain)]
        assert extend["status"] == wav["status"] == persona["status"] == plain["status"] == "succeeded", (
            extend, wav, persona, plain)

        # extend: the chosen clip continued, polled at generate/record-info.
        record = await sunoapi_record(stack, "generate", extend["provider_task_id"])
        clips = record["response"]["sunoData"]
        assert [o["metadata"]["role"] for o in extend["outputs"]] == ["audio", "cover"] * len(clips)
        for i, clip in enumerate(clips):
            assert extend["outputs"][2 * i]["metadata"]["clip_id"] == clip["id"]
            await assert_stored_as_served(client, extend["outputs"][2 * i], clip["audioUrl"])
            await assert_stored_as_served(client, extend["outputs"][2 * i + 1], clip["imageUrl"])

        # wav: the first clip (output 0) as a WAV file.
        (wav_output,) = wav["outputs"]
        wav_record = await sunoapi_record(stack, "wav", wav["provider_task_id"])
        response = wav_record["response"]
        wav_url = response.get("audioWavUrl") or response.get("audio_wav_url")
        await assert_stored_as_served(client, wav_output, wav_url)
        assert wav_output["content_type"] == "audio/wav" and wav_output["metadata"]["clip_id"] == first_clip
        assert (await stored(client, wav_output))[:4] == b"RIFF"
        # The older record shape (status, audio_wav_url) reads the same; a second WAV of a clip is refused.
        stack.simulators["suno-api"].config.extra["wav_record_style"] = "legacy"  # type: ignore[attr-defined]
        legacy = await suno_job(client, model="V4_5", operation="wav", source={"job_id": source["id"], "output": 2})
        again = await suno_job(client, model="V4_5", operation="wav", source={"job_id": source["id"], "output": 1})
        legacy, again = await wait_for(client, legacy["id"]), await wait_for(client, again["id"])
        assert legacy["status"] == "succeeded", legacy
        legacy_record = await sunoapi_record(stack, "wav", legacy["provider_task_id"])
        await assert_stored_as_served(client, legacy["outputs"][0], legacy_record["response"]["audio_wav_url"])
        assert legacy["outputs"][0]["metadata"]["clip_id"] == second_clip
        assert again["status"] == "failed" and "already exists" in again["error"]["message"], again

        # persona: answered at once; its id is the text output.
        (persona_output,) = persona["outputs"]
        persona_id = (await stored(client, persona_output)).decode()
        assert persona_output["content_type"] == "text/plain" and persona_id
        assert persona_output["metadata"] == {"role": "persona", "persona_id": persona_id, "name": "Night Driver",
                                              "description": "a warm synthpop alto", "clip_id": second_clip}
        assert persona["provider_task_id"] == persona["id"]

        # The persona drives a later custom-mode song.
        styled = await suno_job(client, model="V4_5", prompt=LYRICS,
                                options={"style": "synthpop", "title": "Again", "persona_id": persona_id,
                                         "persona_model": "style_persona"})
        styled = await wait_for(client, styled["id"])
        assert styled["status"] == "succeeded", styled

    sent = dict(sim_task(stack, "suno-api", extend["provider_task_id"]).input)
    assert sent.pop("callBackUrl").startswith(f"{stack.settings.public_url}/v1/callbacks/suno?job={extend['id']}&")
    assert sent == {"defaultParamFlag": True, "audioId": second_clip, "continueAt": 0.5, "model": "V4_5",
                    "prompt": MORE, "style": "synthpop", "title": "City Lights (Extended)", "vocalGender": "f"}
    sent = dict(sim_task(stack, "suno-api", plain["provider_task_id"]).input)
    assert sent.pop("callBackUrl").startswith(f"{stack.settings.public_url}/v1/callbacks/suno?job={plain['id']}&")
    assert sent == {"defaultParamFlag": False, "audioId": first_clip, "continueAt": 0.25, "model": "V4_5"}
    sent = dict(stack.simulators["suno-api"].wav_tasks[wav["provider_task_id"]].input)  # type: ignore[attr-defined]
    assert sent.pop("callBackUrl").startswith(f"{stack.settings.public_url}/v1/callbacks/suno?job={wav['id']}&")
    assert sent == {"taskId": source_task, "audioId": first_clip}
    made = stack.simulators["suno-api"].personas[persona_id]  # type: ignore[attr-defined]
    assert (made["taskId"], made["audioId"], made["name"], made["description"]) == (
        source_task, second_clip, "Night Driver", "a warm synthpop alto")
    styled_sent = sim_task(stack, "suno-api", styled["provider_task_id"]).input
    assert (styled_sent["personaId"], styled_sent["personaModel"], styled_sent["customMode"]) == (
        persona_id, "style_persona", True)


async def test_sunoapi_lyrics_are_stored_as_text(sunoapi_stack):
    stack = sunoapi_stack
    async with api(stack) as client:
        job = await suno_job(client, model="V4_5", operation="lyrics", prompt="a song about peaceful night in the city")
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        record = await sunoapi_record(stack, "lyrics", done["provider_task_id"])
        response = record["response"]
        listed = response["lyricsData"] if "lyricsData" in response else response["data"]  # the docs use both
        variations = [v for v in listed if v["status"] == "complete"]
        assert done["outputs"] and len(done["outputs"]) == len(variations)
        for output, variation in zip(done["outputs"], variations, strict=True):
            assert output["content_type"] == "text/plain" and output["metadata"]["title"] == variation["title"]
            assert (await stored(client, output)).decode() == variation["text"]
        # The English record-info page names the list lyricsData: read the same.
        stack.simulators["suno-api"].config.extra["lyrics_list_key"] = "lyricsData"  # type: ignore[attr-defined]
        other = await wait_for(client, (await suno_job(client, model="V4_5", operation="lyrics", prompt="rain"))["id"])
        assert other["status"] == "succeeded", other
        listed = (await sunoapi_record(stack, "lyrics", other["provider_task_id"]))["response"]["lyricsData"]
        assert [(await stored(client, o)).decode() for o in other["outputs"]] == [v["text"] for v in listed]
    sent = dict(stack.simulators["suno-api"].lyrics_tasks[done["provider_task_id"]].input)  # type: ignore[attr-defined]
    assert sent.pop("callBackUrl").startswith(f"{stack.settings.public_url}/v1/callbacks/suno?job={job['id']}&")
    assert sent == {"prompt": "a song about peaceful night in the city"}


async def test_sunoapi_refusals_name_the_field_and_send_nothing(sunoapi_stack):
    stack = sunoapi_stack
    async with api(stack) as client:
        source = await song(client, model="V4_5")
        before = creating(await sim_stats(stack, "suno-api"))
        src = {"job_id": source["id"], "output": 0}
        custom = {"style": "synthpop", "title": "More", "continue_at": 0.5}
        cases: list[tuple[dict[str, Any], str]] = [
            ({"operation": "concat", "source": src}, "operation"),
            # extend: the source's model, custom parameters complete, no instrumental, continue_at inside.
            ({"operation": "extend", "model": "V5", "source": src, "prompt": MORE, "options": custom}, "model"),
            ({"operation": "extend", "source": src, "prompt": MORE, "options": custom | {"title": None}},
             "input.options.title"),
            ({"operation": "extend", "source": src, "options": custom}, "input.prompt"),
            ({"operation": "extend", "source": src, "prompt": MORE, "options": custom | {"instrumental": True}},
             "input.options.instrumental"),
            ({"operation": "extend", "source": src, "prompt": MORE, "options": {"continue_at": 0.5}}, "input.prompt"),
            ({"operation": "extend", "source": src, "options": {"continue_at": 0.5, "vocalGender": "f"}},
             "input.options.vocalGender"),
            ({"operation": "extend", "source": src, "prompt": MORE, "options": custom | {"continue_at": 2}},
             "input.options.continue_at"),
            ({"operation": "extend", "source": src, "prompt": MORE, "options": custom | {"continue_at": None}},
             "input.options.continue_at"),
            # wav takes nothing but its source; persona needs a name and a description.
            ({"operation": "wav", "source": src, "prompt": "x"}, "input.prompt"),
            ({"operation": "wav"}, "source"),
            ({"operation": "persona", "source": src, "options": {"name": "n"}}, "input.options.description"),
            ({"operation": "persona", "source": src, "options": {"name": "n", "description": "d", "vocalEnd": 5}},
             "input.options.vocalEnd"),
            ({"operation": "persona", "source": src, "options": {"name": "n", "description": "d", "pitch": 1}},
             "input.options.pitch"),
            # A persona is applied in custom mode only; lyrics prompts are short.
            ({"prompt": "a song", "options": {"persona_id": "p"}}, "input.options.persona_id"),
            ({"operation": "lyrics", "prompt": "word " * 201}, "input.prompt"),
        ]
        for case, field in cases:
            fields = dict(case)
            operation = fields.pop("operation", "generate")
            case_source = fields.pop("source", None)
            model = fields.pop("model", "V4_5")
            if "options" in fields:
                fields["options"] = {k: v for k, v in fields["options"].items() if v is not None}
            got = await refused(client, model=model, operation=operation, source=case_source, **fields)
            assert got == field, (case, got)
        assert creating(await sim_stats(stack, "suno-api")) == before


def test_a_source_of_the_other_flavour_is_refused():
    adapter = SunoProvider(ProviderSettings(name="suno", base_url="http://suno.invalid", api_keys=["k"],
                                            extra={"flavor": "sunoapi"}))
    source = SourceMedia(provider="suno", model="chirp-v4", kind=MediaKind.audio, task_id="task_1",
                         state={"flavor": "gateway", "action": "music", "output_clips": ["c1", "c1"]},
                         output_metadata={"clip_id": "c1", "duration": 30.0})
    request = GenerationRequest(kind=MediaKind.audio, model="V4", operation="wav", source=source)
    with pytest.raises(InvalidInput) as refused_:
        adapter.validate(request)
    assert refused_.value.field == "source" and "gateway flavour" in refused_.value.message
    # The same source in its own flavour names clip c1.
    gateway = SunoProvider(ProviderSettings(name="suno", base_url="http://suno.invalid", api_keys=["k"]))
    plan = gateway.plan(GenerationRequest(kind=MediaKind.audio, model="chirp-v4", operation="extend", source=source,
                                          input=MediaInput(prompt=MORE, options={"continue_at": 12.5})), None)
    assert (plan.path, plan.body["continue_clip_id"], plan.body["task_id"]) == ("/suno/submit/music", "c1", "task_1")
    assert [o.name for o in gateway.operations] == ["extend", "lyrics"]
    assert [o.name for o in adapter.operations] == ["extend", "lyrics", "wav", "persona"]
