"""Suno simulators in the two third-party shapes Atelier can talk to.

Written from the documented wire formats (shared/providers
replicate-fal-suno-gateways.md §3 and §4, and the provider pages cited below), not from
our adapters. Every music task yields ``clips_per_task`` clips (2 by default), each a real
MP3 (``media.mp3``) plus a real PNG cover, distinct per clip, at URLs that stop working
after ``output_ttl_seconds`` (counted from the task's completion).

``SunoGatewaySimulator`` — a new-api gateway with a Suno-API channel (§3a, §4.3):

- ``POST /suno/submit/music`` and ``POST /suno/submit/lyrics`` (``SunoSubmitReq``:
  ``prompt, gpt_description_prompt, mv, title, tags, continue_at, task_id,
  continue_clip_id, make_instrumental``; unknown fields dropped; ``mv`` defaults
  to ``chirp-v3-0``) -> ``{"code":"success","message":"","data":"task_..."}``.
  Lyrics (``LYRICS``) answer text, not audio. Extend is a ``MUSIC`` submit with
  ``continue_clip_id`` and ``continue_at`` (seconds, a float). The gateway first wants the
  origin task: ``continue_clip_id`` without ``task_id`` -> 400 ``invalid_request`` "task id
  is empty", a ``task_id`` that is not one of the caller's tasks -> 400 ``task_not_exist``
  "task_origin_not_exist" (new-api relay/channel/task/suno/adaptor.go
  ``ValidateRequestAndSetAction`` and relay_task.go ``OriginTaskID``, same in the 2025 and
  2026 versions read; ``continue_requires_task_id``). Then the upstream refuses a clip it
  does not know or that is not ``complete`` yet, and a missing or negative ``continue_at``
  (``extra["continue_refusal_status"]``, 400, reaches the client as ``fail_to_fetch_task``
  carrying the upstream body); the new clips' ``metadata.history`` names the source clip.
  The gateway serves no other action: ``actionValidate`` knows only MUSIC and LYRICS, so
  concat (an upstream Suno-API route the gateway does not forward), WAV and persona are
  ``invalid_action``.
  Errors: 400 ``invalid_request`` (``invalid_action``, ``prompt_empty``, bad JSON, a
  ``continue_at`` that is not a number),
  upstream failures as ``fail_to_fetch_task``, every final 429 as
  "当前分组上游负载已饱和，请稍后再试"; auth as OpenAI-style 401.
- ``GET /suno/fetch/{id}`` -> ``{"code":"success","message":"","data":<TaskDto>}``;
  unknown/foreign id -> 400 ``task_not_exist``.
- ``POST /suno/fetch {"ids":[...]}`` -> ``data: [TaskDto...]`` (row order, unknown
  and foreign ids silently omitted, empty ``ids`` -> ``[]``).
- Stored statuses ``NOT_START`` (until the gateway's first tick, see
  ``gateway.py``) -> ``SUBMITTED`` -> ``QUEUED`` -> ``IN_PROGRESS`` ->
  ``SUCCESS | FAILURE``; ``progress`` only ``"0%"`` or ``"100%"``; ``data`` the raw
  upstream clip array (``LYRICS``: ``{id,status,title,text}``), ``null`` before the
  first poll; clip ``status`` ``submitted|queued|streaming|complete|error``; while
  streaming a clip's ``audio_url`` is a partial ``/audiopipe/?item_id=`` stream,
  and the first clip may already be ``complete`` while the task is ``IN_PROGRESS``.
  ``result_url`` is absent, except that failed tasks carry their ``fail_reason``
  there. The 24 h timeout sweep marks unfinished rows ``FAILURE`` but leaves
  their stale ``data``.

``SunoApiSimulator`` — sunoapi.org (and white-label clones api.box, kie.ai, ...) (§3b).
Every answer is the envelope ``{"code":<int>,"msg":"...","data":...}``, HTTP 200 unless
``http_status_mirrors_code``:

- ``POST /api/v1/generate`` (``prompt, customMode, instrumental, model,
  callBackUrl, style, title, negativeTags, vocalGender, personaId, personaModel, ...``) ->
  ``data: {"taskId":"..."}``. In custom mode a ``personaId`` must be one made by
  generate-persona (else code 400 "personaId ... does not exist"; UNCONFIRMED code/text);
  outside custom mode it is not used ("Only available when Custom Mode is enabled"), and a
  ``personaModel: "voice_persona"`` id (Suno Voice, not simulated) is not checked.
- ``GET /api/v1/generate/record-info?taskId=`` (generate and extend tasks) -> ``data:
  {taskId, parentMusicId, param (a JSON *string*, the request without callBackUrl),
  response: {taskId, sunoData:[{id, audioUrl, sourceAudioUrl, streamAudioUrl,
  sourceStreamAudioUrl, imageUrl, sourceImageUrl, prompt, modelName, title, tags,
  createTime, duration}]} | null, status, type, operationType, errorCode, errorMessage}``.
  ``type``/``operationType``: ``GENERATE``/``generate``, ``EXTEND``/``extend`` (the docs list
  the operationType values generate, extend, upload_cover, upload_extend; ``type`` for an
  extension is UNCONFIRMED). ``parentMusicId``: ``""``, or the extended ``audioId``
  (UNCONFIRMED). Unknown (or lyrics/WAV) ``taskId`` -> code 400.
- ``GET /api/v1/generate/credit`` -> ``data: <credits>``.
- Statuses ``PENDING -> TEXT_SUCCESS -> FIRST_SUCCESS -> SUCCESS``, or
  ``CREATE_TASK_FAILED``, ``GENERATE_AUDIO_FAILED``, ``SENSITIVE_WORD_ERROR``,
  ``CALLBACK_EXCEPTION`` (generation done, sunoData complete).
- ``POST /api/v1/generate/extend`` (``defaultParamFlag`` bool, ``audioId``, ``model``,
  ``callBackUrl``, ``continueAt``, ``prompt``, ``style``, ``title``, ``negativeTags``,
  ``vocalGender``, ``styleWeight``, ``weirdnessConstraint``, ``audioWeight``, ``personaId``,
  ``personaModel``) -> ``data: {"taskId"}``, polled with generate's record-info, the same
  staged callbacks (text/first/complete/error, snake_case clips), new clip ids and
  distinct audio. ``defaultParamFlag: true``: ``prompt``, ``style``, ``title`` and
  ``continueAt`` required (400), custom-mode length limits (413);
  ``false``: only ``audioId`` (+ ``model``), title/style/lyrics inherited from the source.
  Refused with code 400 (codes and texts UNCONFIRMED): an ``audioId`` no task made; a clip
  whose task is not ``SUCCESS``/``CALLBACK_EXCEPTION`` (pending or failed); a ``model``
  other than the source's ("Model version must be consistent with the source music");
  ``continueAt`` not a number, or not ``0 < continueAt < duration`` of the source clip
  (the docs: "greater than 0 and less than the ... audio duration"; the reported
  ``duration`` is ``clip_duration_seconds``, 1.0 by default like the MP3 itself).
- ``POST /api/v1/lyrics`` (``prompt`` required, at most 200 words -> else 413 (code
  UNCONFIRMED); ``callBackUrl`` documented as required -> 422 "Please enter callBackUrl."
  unless ``followup_requires_callback_url`` is false) -> ``data: {"taskId"}``.
  ``GET /api/v1/lyrics/record-info?taskId=`` -> ``data: {taskId, param, response: {taskId,
  data: [{text, title, status: "complete"|"failed", errorMessage}]} | null, status,
  type: "LYRICS", errorCode, errorMessage}``; statuses ``PENDING -> SUCCESS`` or
  ``CREATE_TASK_FAILED``, ``GENERATE_LYRICS_FAILED``, ``SENSITIVE_WORD_ERROR``,
  ``CALLBACK_EXCEPTION``. Text only, no audio; ``lyrics_variants`` (2) variants. One
  callback: ``{"code":200,"msg":"All generated successfully.","data":{"callbackType":
  "complete","taskId":...,"data":[variants]}}`` (note camelCase ``taskId``), on failure
  ``callbackType`` "error" (failure body UNCONFIRMED). DISAGREEMENT: the list is ``data``
  (zh page, kie.ai, current callback page) or ``lyricsData`` (older English pages):
  ``lyrics_list_key``.
- ``POST /api/v1/wav/generate`` (``taskId`` and ``audioId`` of a finished music task,
  ``callBackUrl`` required like lyrics) -> ``data: {"taskId"}``; refused with 400 for a
  missing/unknown ``taskId``, an ``audioId`` not of that task, a task not finished; 409
  "WAV record already exists" when that ``audioId`` was already converted (the docs list
  409 "WAV record already exists"; when it applies is UNCONFIRMED;
  ``wav_conflict_on_repeat``). ``GET /api/v1/wav/record-info?taskId=`` -> ``data: {taskId,
  musicId, musicIndex, callbackUrl, completeTime, response: {audioWavUrl} | null,
  successFlag, createTime, errorCode, errorMessage}``; ``successFlag`` ``PENDING ->
  SUCCESS`` or ``GENERATE_WAV_FAILED``, ``CALLBACK_EXCEPTION`` (``CREATE_TASK_FAILED`` is
  documented, not produced). The WAV is real (``media.tagged_wav``), distinct per
  conversion, and expires like the other outputs. One callback ``{"code":200,"msg":
  "success","data":{"audioWavUrl":...,"task_id":...}}``, no ``callbackType`` documented.
  DISAGREEMENT: older pages spell ``status``/``audio_wav_url``: ``wav_record_style``.
- ``POST /api/v1/generate/generate-persona`` (``taskId``, ``audioId``, ``name``,
  ``description`` required; optional ``vocalStart``/``vocalEnd`` (defaults 0 and 30, window
  10-30 s inside the audio), ``style``) -> synchronous ``data: {personaId, name,
  description}``; free, so not counted in ``stats.creations``. Refused with 400: missing
  fields (``musicId`` is not a substitute for ``audioId``), unknown task, clip not of the
  task, task not finished ("will return a failure"), a V3_5 source ("V4 and above"), a bad
  window (an explicit window must fit in ``clip_duration_seconds``); 409 for a second
  persona from the same ``audioId`` ("Each audio ID can only generate a Persona once";
  code UNCONFIRMED).
- No concat: sunoapi.org documents none, so ``/api/v1/generate/concat`` (like any unknown
  path or wrong method under ``/api``) answers code 404 "Invalid request method or path".
- Business codes in the body: 400 params, 401 auth ("You do not have access
  permissions"), 404 path, 405 rate limit, 409 conflict, 413 prompt/style/title too long,
  422 missing ``callBackUrl``, 429 insufficient credits (not a throttle!), 430 call
  frequency too high, 455 maintenance, 500. Injected faults keep their real HTTP status
  and carry the envelope (429 -> code 430). Refused requests create nothing and cost
  nothing.
- Music callbacks (POST JSON, unsigned, snake_case clips) to ``callBackUrl`` at each
  stage: ``text`` (``data: []``), ``first`` (first clip complete), ``complete``
  (all clips); on failure ``{"code":400|500|501,"msg",...,"data":{"callbackType":
  "error","task_id","error"}}``. All callbacks are retried on non-2xx / network errors
  after ``callback_retry_delays``.

Sources (crawled copies; 2025-2026): https://docs.sunoapi.org/suno-api/extend-music,
https://docs.api.box/suno-api/extend-music, https://docs.kie.ai/suno-api/extend-music,
https://docs.api.box/suno-api/upload-and-extend-audio (continueAt range),
https://docs.aibackend.io/suno/get-music-generation-details (operationType values),
https://docs.sunoapi.org/suno-api/generate-lyrics,
https://docs.sunoapi.org/cn/suno-api/generate-lyrics (prompt <= 200 words, callBackUrl
required), https://docs.sunoapi.org/suno-api/get-lyrics-generation-details,
https://docs.sunoapi.org/cn/suno-api/get-lyrics-generation-details,
https://docs.kie.ai/suno-api/get-lyrics-details,
https://docs.sunoapi.org/suno-api/generate-lyrics-callbacks,
https://docs.api.box/suno-api/generate-lyrics-callbacks,
https://docs.sunoapi.org/suno-api/convert-to-wav-format,
https://docs.sunoapi.org/suno-api/get-wav-conversion-details,
https://docs.sunoapi.org/cn/suno-api/get-wav-conversion-details,
https://docs.kie.ai/suno-api/get-wav-details,
https://docs.sunoapi.org/suno-api/convert-to-wav-format-callbacks,
https://docs.sunoapi.org/suno-api/generate-persona.md,
https://docs.sunoapi.org/cn/suno-api/generate-persona.md,
https://docs.apikley.ru/suno-api/suno-api_generate-persona,
https://dog-test.kie.ai/cn/suno-api/generate-persona-cn (response example).
UNCONFIRMED besides the above: the codes and texts of every follow-up refusal, credit
costs, the ``type`` of an extension record, failure callback bodies of lyrics and WAV,
and whether a real service checks ``continueAt`` against the clip at submit time.

Directives (in prompt, style or title): ``[sim:fail]`` audio generation fails
(gateway: clips ``error``; lyrics: ``GENERATE_LYRICS_FAILED``); ``[sim:queue=S]``,
``[sim:run=S]``; gateway only:
``[sim:filtered]`` moderation failure, ``[sim:partial]`` one clip complete and one
failed (task ``FAILURE``), ``[sim:stuck]`` upstream streams forever,
``[sim:unknown]`` upstream reports ``UNKNOWN``, ``[sim:lost]`` upstream forgets the
task (``NOT_START`` until the sweep), ``[sim:saturated]`` submit 429,
``[sim:rejected]`` upstream refuses (500); sunoapi only: ``[sim:sensitive]``
``SENSITIVE_WORD_ERROR``, ``[sim:create_failed]`` ``CREATE_TASK_FAILED``,
``[sim:callback_exception]``, ``[sim:stuck]`` stays ``TEXT_SUCCESS`` (lyrics:
``PENDING``), ``[sim:credits]`` 429, ``[sim:maintenance]`` 455, ``[sim:frequency]`` 430,
``[sim:ratelimit]`` 405 (generate, extend, lyrics); ``[sim:partial]`` on lyrics: the last
variant ``failed`` in a ``SUCCESS`` task; ``[sim:wav_fail]`` on a song: the song succeeds,
its WAV conversions end ``GENERATE_WAV_FAILED``.

Fault route names: gateway ``submit``, ``fetch``, ``batch_fetch``; sunoapi
``generate``, ``record_info``, ``credit``, ``extend``, ``lyrics``, ``lyrics_record_info``,
``wav``, ``wav_record_info``, ``persona`` (creating routes also take ``after_effect``
faults); both ``stream`` (``/audiopipe/``) and ``download`` (file URLs).

``SimConfig.extra``: ``clips_per_task`` (2); gateway: see ``gateway.py``,
``continue_refusal_status`` (400; the upstream's status for a refused continuation is not
documented, 500 answers ``internal_error``), ``continue_requires_task_id`` (true);
sunoapi: ``http_status_mirrors_code`` (false), ``require_callback_url`` (false; generate
and extend), ``followup_requires_callback_url`` (true; lyrics and WAV),
``credits`` (None = unlimited), ``credit_cost`` (12), ``extend_credit_cost``
(= credit_cost), ``lyrics_credit_cost`` and ``wav_credit_cost`` (0.4 each; UNCONFIRMED),
``rate_limit_per_10s`` (None), ``failure_callback_type`` ("error"; the api.box docs say
"failed"), ``create_time_format`` ("string" or "ms"), ``callback_retry_delays``
([0.2, 0.5, 1.0]; the docs say 1, 5, 15 min), ``callback_timeout_seconds`` (15),
``callback_exception_on_failure`` (false: when true, a task whose callbacks all
failed ends ``CALLBACK_EXCEPTION``), ``clip_duration_seconds`` (1.0: the reported clip
``duration``, which bounds ``continueAt`` and persona windows), ``lyrics_variants`` (2),
``lyrics_list_key`` ("data" or "lyricsData"), ``wav_record_style`` ("current":
``successFlag``/``audioWavUrl``; "legacy": ``status``/``audio_wav_url``, also in the
callback), ``wav_conflict_on_repeat`` (true).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, bearer, directives
from providers.sandbox.gateway import NewApiGateway, Snapshot, read_json_object

MP3_SECONDS = 1.0  # length of media.mp3's tone


def _clip_count(config: SimConfig) -> int:
    return max(1, int(config.extra.get("clips_per_task", 2)))


def _publish(sim: Simulator, task: SimTask, key: str, ext: str, seed: str, name: str) -> str:
    """Publish one output file per task and key; its lifetime counts from the task's finish."""
    paths: dict[str, str] = task.data.setdefault("files", {})
    if key not in paths:
        if ext == "png":
            data, ctype = media.jpeg_like_cover(seed), "image/png"
        else:
            data, ctype = media.make(ext, seed)
        _publish_bytes(sim, task, key, data, ctype, name)
    return paths[key]


def _publish_bytes(sim: Simulator, task: SimTask, key: str, data: bytes, ctype: str, name: str) -> str:
    """Like ``_publish`` for bytes made by the caller (published once per task and key)."""
    paths: dict[str, str] = task.data.setdefault("files", {})
    if key not in paths:
        ttl = max(0.0, task.finished_at + sim.config.output_ttl_seconds - time.time())
        paths[key] = sim.files.publish(data, ctype, name, ttl=ttl)
    return paths[key]


def _audiopipe_route(sim: Simulator, clips: dict[str, str]) -> Route:
    """Suno's streaming URLs: a partial MP3 of a clip that is still being generated."""

    async def audiopipe(request: Request) -> Response:
        if (injected := await sim.fault("stream")) is not None:
            return injected
        item = request.query_params.get("item_id", "")
        if item not in clips:
            return Response(b"Not Found", status_code=404, media_type="text/plain")
        data = media.mp3(item)
        return Response(data[: len(data) // 2], media_type="audio/mpeg")

    return Route("/audiopipe/", audiopipe, methods=["GET"])


def _song_prompt(text: str, instrumental: bool) -> str:
    if instrumental:
        return ""
    return text or "[Verse]\nSimulated lines under simulated lights\n[Chorus]\nSing it once again"


# ---------------------------------------------------------------------------
# new-api gateway, Suno task format
# ---------------------------------------------------------------------------

SUNO_SUBMIT_FIELDS = ("gpt_description_prompt", "prompt", "mv", "title", "tags", "continue_at",
                      "task_id", "continue_clip_id", "make_instrumental")


class SunoGatewaySimulator(NewApiGateway):
    """A new-api gateway (``/suno/*``) whose upstream is a Suno-API service."""

    name = "newapi-suno"
    platform = "suno"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.clips: dict[str, str] = {}
        super().__init__(config)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/suno/submit/{action}", self.submit, methods=["POST"]),
            Route("/suno/fetch/{task_id}", self.fetch_one, methods=["GET"]),
            Route("/suno/fetch", self.fetch_many, methods=["POST"]),
            _audiopipe_route(self, self.clips),
        ]

    # -- submit ------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("submit")) is not None:
            return injected
        action = request.path_params["action"].upper()
        if action not in ("MUSIC", "LYRICS"):
            return self.task_error(400, "invalid_request", "invalid_action")
        raw = await read_json_object(request)
        if raw is None:
            return self.task_error(400, "invalid_request", "invalid character in request body")
        # The gateway re-serialises SunoSubmitReq: unknown fields are dropped.
        req: dict[str, Any] = {k: raw[k] for k in SUNO_SUBMIT_FIELDS if raw.get(k) is not None}
        req["make_instrumental"] = bool(raw.get("make_instrumental", False))
        if action == "LYRICS" and not str(req.get("prompt") or ""):
            return self.task_error(400, "invalid_request", "prompt_empty")
        if action == "MUSIC" and not req.get("mv"):
            req["mv"] = "chirp-v3-0"
        continue_at = req.get("continue_at")
        if continue_at is not None and (isinstance(continue_at, bool) or not isinstance(continue_at, int | float)):
            # SunoSubmitReq.ContinueAt is a float64: anything else fails the gateway's JSON binding.
            kind = {"str": "string", "list": "array", "dict": "object"}.get(type(continue_at).__name__, "bool")
            return self.task_error(400, "invalid_request", f"json: cannot unmarshal {kind} into Go struct "
                                   "field SunoSubmitReq.continue_at of type float64")
        if req.get("continue_clip_id") and self.config.extra.get("continue_requires_task_id", True):
            # new-api's Suno adaptor: a continuation names its origin task, which the relay then
            # looks up among the caller's own tasks (relay_task.go OriginTaskID).
            if not req.get("task_id"):
                return self.task_error(400, "invalid_request", "task id is empty")
            if not isinstance(req["task_id"], str) or self.own_task(req["task_id"], user) is None:
                return self.task_error(400, "task_not_exist", "task_origin_not_exist")
        if action == "MUSIC" and "continue_clip_id" in req:
            problem = self._continuation_problem(req, self.origin(request))
            if problem is not None:
                status = int(self.config.extra.get("continue_refusal_status", 400))
                code = "invalid_request" if status < 500 else "internal_error"
                upstream = json.dumps({"code": code, "message": problem, "data": None})
                return self.task_error(status, "fail_to_fetch_task", upstream)
        text = " ".join(str(req.get(k) or "") for k in ("gpt_description_prompt", "prompt", "title", "tags"))
        traps = directives(text)
        if "saturated" in traps:
            return self.task_error(429, "fail_to_fetch_task", "upstream 429")
        if "rejected" in traps:
            upstream = json.dumps({"code": "internal_error", "message": "task failed", "data": None})
            return self.task_error(500, "fail_to_fetch_task", upstream)
        upstream_id = str(uuid.uuid4())
        model = f"suno_{action.lower()}"
        task = SimTask.create(self.new_task_id(upstream_id), self.config, text, input=req,
                          data={"action": action, "model": model, "upstream_id": upstream_id,
                                "quota": 150000 if action == "MUSIC" else 5000})
        if action == "LYRICS":  # Suno-API answers only once the lyrics exist
            task.queue_seconds = task.run_seconds = 0.0
        else:
            ids = [str(uuid.uuid4()) for _ in range(_clip_count(self.config))]
            task.data["clips"] = ids
            for cid in ids:
                self.clips[cid] = task.id
        self.add_task(task, user)
        self.record_creation(action + json.dumps(req, sort_keys=True))
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        return self.success(task.id, headers={"X-New-Api-Other-Ratios": "{}"})

    def _continuation_problem(self, req: dict[str, Any], origin: str) -> str | None:
        """Why the upstream refuses to continue ``continue_clip_id`` (None: it accepts)."""
        clip = req["continue_clip_id"]
        source = self.tasks.get(self.clips.get(clip, "")) if isinstance(clip, str) else None
        if source is None:
            return f"continue_clip_id {clip} not found"
        source.data.setdefault("origin", origin)
        snap = self.upstream(source, time.time())
        clips = snap.data if snap is not None and isinstance(snap.data, list) else []
        if not any(c["id"] == clip and c["status"] == "complete" for c in clips):
            return f"clip {clip} is not complete"
        if req.get("continue_at") is None or req["continue_at"] < 0:
            return "continue_at must be a number of seconds >= 0"
        return None

    # -- upstream (Suno-API) view ----------------------------------------------
    def upstream(self, task: SimTask, at: float) -> Snapshot | None:
        if task.outcome == "lost":
            return None
        if task.data["action"] == "LYRICS":
            return self._lyrics(task)
        phase = task.phase(at)
        q, r = task.queue_seconds, task.run_seconds
        if phase == "queued":
            if at < task.created_at + q / 2:
                return Snapshot("SUBMITTED", task.created_at, self._clips(task, ["submitted"] * 99))
            return Snapshot("QUEUED", task.created_at + q / 2, self._clips(task, ["queued"] * 99))
        if task.outcome == "filtered":
            reason = "Song Description flagged for moderation (simulated)"
            clips = self._clips(task, ["error"] * 99, error=reason)
            return Snapshot("FAILURE", task.started_at, clips, fail_reason=reason,
                            finish_time=task.started_at)
        if phase == "running" or task.outcome in ("stuck", "unknown"):
            half = task.started_at + r / 2
            states = ["streaming"] * 99
            if task.outcome not in ("stuck", "unknown") and at >= half:
                states[0] = "complete"
            status = "UNKNOWN" if task.outcome == "unknown" else "IN_PROGRESS"
            since = task.started_at if at < half or task.outcome in ("stuck", "unknown") else half
            return Snapshot(status, since, self._clips(task, states), start_time=task.started_at)
        if task.outcome in ("fail", "partial"):
            reason = "Unable to generate audio (simulated)"
            states = ["error"] * 99
            if task.outcome == "partial":
                states[0] = "complete"
            clips = self._clips(task, states, error=reason)
            return Snapshot("FAILURE", task.finished_at, clips, fail_reason=reason,
                            start_time=task.started_at, finish_time=task.finished_at)
        return Snapshot("SUCCESS", task.finished_at, self._clips(task, ["complete"] * 99),
                        start_time=task.started_at, finish_time=task.finished_at)

    def _lyrics(self, task: SimTask) -> Snapshot:
        failed = task.outcome == "fail"
        data = {"id": task.data["upstream_id"], "status": "error" if failed else "complete",
                "title": "Simulated Lyrics", "text": "" if failed else _song_prompt("", False)}
        return Snapshot("FAILURE" if failed else "SUCCESS", task.created_at, data,
                        start_time=task.created_at, finish_time=task.created_at)

    def _clips(self, task: SimTask, states: list[str], error: str = "") -> list[dict[str, Any]]:
        req = task.input
        origin = task.data["origin"]
        mv = str(req.get("mv") or "chirp-v3-0")
        title = str(req.get("title") or "Simulated Song")
        gdp = req.get("gpt_description_prompt")
        lyrics = _song_prompt(str(req.get("prompt") or ""), bool(req.get("make_instrumental")))
        created = datetime.fromtimestamp(task.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        history = None
        if req.get("continue_clip_id"):  # the clip this one continues (a shape of the simulator's own)
            history = [{"id": req["continue_clip_id"], "continue_at": req.get("continue_at")}]
        clips = []
        for i, cid in enumerate(task.data["clips"]):
            state = states[i]
            audio = image = image_large = ""
            if state == "complete":
                audio = origin + _publish(self, task, f"audio{i}", "mp3", cid, f"{cid}.mp3")
            elif state == "streaming":
                audio = f"{origin}/audiopipe/?item_id={cid}"
            if state in ("streaming", "complete"):
                image = origin + _publish(self, task, f"image{i}", "png", cid, f"image_{cid}.png")
                image_large = origin + _publish(self, task, f"image_large{i}", "png", cid,
                                                f"image_large_{cid}.png")
            clips.append({
                "id": cid, "video_url": "", "audio_url": audio, "image_url": image,
                "image_large_url": image_large, "is_video_pending": False,
                "major_model_version": mv.removeprefix("chirp-").replace("-", "."),
                "model_name": mv, "is_liked": False, "user_id": task.data["upstream_id"],
                "display_name": "simulated", "handle": "simulated", "is_handle_updated": False,
                "is_trashed": False, "reaction": None, "created_at": created, "status": state,
                "title": title, "play_count": 0, "upvote_count": 0, "is_public": False,
                "metadata": {
                    "tags": str(req.get("tags") or ""), "prompt": lyrics,
                    "gpt_description_prompt": gdp, "audio_prompt_id": None, "history": history,
                    "concat_history": None, "type": "gen",
                    "duration": MP3_SECONDS if state == "complete" else None,
                    "refund_credits": False if state == "error" else None, "stream": True,
                    "error_type": "upstream_error" if state == "error" and error else None,
                    "error_message": error if state == "error" else None,
                },
            })
        return clips

    # -- fetch -------------------------------------------------------------
    async def fetch_one(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("fetch")) is not None:
            return injected
        task = self.own_task(request.path_params["task_id"], user)
        if task is None:
            return self.task_error(400, "task_not_exist", "task_not_exist")
        task.data.setdefault("origin", self.origin(request))
        return self.success(self.task_dto(task, self.view(task)))

    async def fetch_many(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("batch_fetch")) is not None:
            return injected
        body = await read_json_object(request)
        ids = body.get("ids") if body is not None else None
        if body is None or (ids is not None and not isinstance(ids, list)):
            return self.task_error(400, "invalid_request", "invalid request body: ids must be an array")
        found = [t for i in dict.fromkeys(x for x in (ids or []) if isinstance(x, str))
                 if (t := self.own_task(i, user)) is not None]
        found.sort(key=lambda t: int(t.data["row_id"]))  # database order, not request order
        origin = self.origin(request)
        now = time.time()
        out = []
        for task in found:
            task.data.setdefault("origin", origin)
            out.append(self.task_dto(task, self.view(task, now)))
        return self.success(out)


# ---------------------------------------------------------------------------
# sunoapi.org
# ---------------------------------------------------------------------------

SUNOAPI_MODELS = {"V3_5": "chirp-v3-5", "V4": "chirp-v4", "V4_5": "chirp-auk", "V4_5PLUS": "chirp-bluejay",
                  "V4_5ALL": "chirp-auk", "V5": "chirp-crow", "V5_5": "chirp-v5-5"}
SUNOAPI_MESSAGES = {400: "Invalid parameters", 401: "You do not have access permissions",
                    404: "Invalid request method or path", 405: "Rate limit exceeded",
                    409: "Conflict", 413: "Theme or prompt too long", 429: "Insufficient credits",
                    430: "Your call frequency is too high. Please try again later.",
                    455: "System maintenance", 500: "Server error"}
SUNOAPI_FAILURES = {
    "CREATE_TASK_FAILED": (500, "Failed to create the generation task (simulated)"),
    "SENSITIVE_WORD_ERROR": (400, "Content contains prohibited words (simulated)"),
    "GENERATE_AUDIO_FAILED": (501, "Audio generation failed."),
    "GENERATE_LYRICS_FAILED": (500, "Lyrics generation failed (simulated)"),
    "GENERATE_WAV_FAILED": (500, "WAV conversion failed (simulated)"),
}
SUNOAPI_DONE = ("SUCCESS", "CALLBACK_EXCEPTION")  # generation finished, results present
_SIM_DIRECTIVE = re.compile(r"\[sim:[^\]]*\]")

Bodies = Callable[[SimTask], list[tuple[float, dict[str, Any]]]]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class SunoApiSimulator(Simulator):
    """sunoapi.org's ``/api/v1/generate`` family with staged callbacks, and its follow-ups
    (extend, lyrics, WAV conversion, persona)."""

    name = "sunoapi"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.clips: dict[str, str] = {}  # clip (audio) id -> music task id (generate or extend)
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}  # music tasks: generate and extend
        self.lyrics_tasks: dict[str, SimTask] = {}
        self.wav_tasks: dict[str, SimTask] = {}
        self.wav_by_audio: dict[str, str] = {}
        self.personas: dict[str, dict[str, Any]] = {}
        self.persona_by_audio: dict[str, str] = {}
        self.used_credits: float = 0
        self.recent: dict[str, deque[float]] = {}
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.callbacks_sent = 0
        self.callback_log: deque[dict[str, Any]] = deque(maxlen=1000)

    # -- envelope ------------------------------------------------------------
    def reply(self, code: int, msg: str | None = None, data: Any = None,
              headers: dict[str, str] | None = None, http_status: int | None = None) -> Response:
        body = {"code": code, "msg": msg if msg is not None else SUNOAPI_MESSAGES.get(code, "error"),
                "data": data}
        if http_status is None:
            mirror = self.config.extra.get("http_status_mirrors_code", False)
            http_status = code if mirror and code != 200 else 200
        return JSONResponse(body, status_code=http_status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        # Injected (transport-level) faults keep their HTTP status; the body is the usual envelope.
        code = 430 if status == 429 else (455 if status == 503 else 500)
        return self.reply(code, None, None, headers=headers, http_status=status)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/v1/generate", self.generate, methods=["POST"]),
            Route("/api/v1/generate/record-info", self.record_info, methods=["GET"]),
            Route("/api/v1/generate/credit", self.credit, methods=["GET"]),
            Route("/api/v1/generate/extend", self.extend, methods=["POST"]),
            Route("/api/v1/generate/generate-persona", self.generate_persona, methods=["POST"]),
            Route("/api/v1/lyrics", self.lyrics, methods=["POST"]),
            Route("/api/v1/lyrics/record-info", self.lyrics_record_info, methods=["GET"]),
            Route("/api/v1/wav/generate", self.wav, methods=["POST"]),
            Route("/api/v1/wav/record-info", self.wav_record_info, methods=["GET"]),
            _audiopipe_route(self, self.clips),
            # Anything else under /api (concat, a wrong method on a known path, ...): the envelope's 404.
            Route("/api/{rest:path}", self.unknown_path,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        if not self.config.key_ok(bearer(request)):
            return self.reply(401)
        return None

    def _throttled(self, request: Request) -> bool:
        limit = self.config.extra.get("rate_limit_per_10s")
        if not limit:
            return False
        window = self.recent.setdefault(bearer(request) or "", deque())
        now = time.time()
        while window and window[0] <= now - 10:
            window.popleft()
        if len(window) >= int(limit):
            return True
        window.append(now)
        return False

    async def unknown_path(self, request: Request) -> Response:
        return self.reply(404)

    # -- shared checks -------------------------------------------------------
    def _cost(self, operation: str) -> float:
        extra = self.config.extra
        if operation == "generate":
            return float(extra.get("credit_cost", 12))
        if operation == "extend":
            return float(extra.get("extend_credit_cost", extra.get("credit_cost", 12)))
        return float(extra.get(f"{operation}_credit_cost", 0.4))

    def _charge(self, operation: str) -> bool:
        """Take the operation's credits; False (nothing taken) when the balance is too low."""
        credits = self.config.extra.get("credits")
        cost = self._cost(operation)
        if credits is not None and self.used_credits + cost > float(credits) + 1e-9:
            return False
        self.used_credits += cost
        return True

    def _trap_refusal(self, text: str) -> Response | None:
        traps = directives(text)
        for trap, code in (("credits", 429), ("maintenance", 455), ("frequency", 430), ("ratelimit", 405)):
            if trap in traps:
                return self.reply(code)
        return None

    def _callback_problem(self, body: dict[str, Any], required: bool) -> tuple[int, str] | None:
        url = body.get("callBackUrl")
        if url is not None and not isinstance(url, str):
            return 400, "callBackUrl must be a string"
        if not url and required:
            return 422, "Please enter callBackUrl."
        return None

    def _persona_problem(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """A ``personaId`` (custom parameters only) must name a persona made with generate-persona.

        ``personaModel: "voice_persona"`` ids come from the Suno Voice API, which is not simulated."""
        persona = body.get("personaId")
        if persona is None or persona == "":
            return None
        if not isinstance(persona, str):
            return 400, "personaId must be a string"
        if body.get("personaModel") == "voice_persona":
            return None
        if persona not in self.personas:
            return 400, f"personaId {persona} does not exist"
        return None

    def _clip_duration(self) -> float:
        return float(self.config.extra.get("clip_duration_seconds", MP3_SECONDS))

    def _time(self, ts: float) -> Any:
        if self.config.extra.get("create_time_format", "string") == "ms":
            return int(ts * 1000)
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")

    def _source_clip(self, audio_id: str) -> SimTask | None:
        return self.tasks.get(self.clips.get(audio_id, ""))

    # -- generate ------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        refused, body = await self._creating_request(request, "generate")
        if refused is not None:
            return refused
        problem = self._validate(body)
        if problem is None and body["customMode"]:
            problem = self._persona_problem(body)
        if problem is not None:
            return self.reply(*problem)
        text = " ".join(str(body.get(k) or "") for k in ("prompt", "style", "title"))
        if (refused := self._trap_refusal(text)) is not None:
            return refused
        if not self._charge("generate"):
            return self.reply(429)
        task = SimTask.create(secrets.token_hex(16), self.config, text, input=body,
                              data={"clips": [secrets.token_hex(16) for _ in range(_clip_count(self.config))],
                                    "origin": self.origin(request)})
        for cid in task.data["clips"]:
            self.clips[cid] = task.id
        self.tasks[task.id] = task
        self.record_creation(json.dumps(body, sort_keys=True))
        url = body.get("callBackUrl")
        if isinstance(url, str) and url:
            self._schedule_callbacks(task, url, self.callback_bodies, "music")
        if (injected := await self.fault("generate", after_effect=True)) is not None:
            return injected
        return self.reply(200, "success", {"taskId": task.id})

    def _validate(self, body: dict[str, Any]) -> tuple[int, str] | None:
        for name in ("customMode", "instrumental"):
            if not isinstance(body.get(name), bool):
                return 400, f"{name} is required and must be a boolean"
        model = body.get("model")
        if model not in SUNOAPI_MODELS:
            return 400, f"model must be one of {', '.join(SUNOAPI_MODELS)}"
        problem = self._callback_problem(body, bool(self.config.extra.get("require_callback_url", False)))
        if problem is not None:
            return problem
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            return 400, "prompt must be a string"
        if body["customMode"]:
            for name in ("style", "title"):
                if not isinstance(body.get(name), str) or not body[name]:
                    return 400, f"{name} is required in custom mode"
            if not body["instrumental"] and not prompt:
                return 400, "prompt is required in custom mode unless instrumental"
            return self._length_problem(body, str(model))
        if not prompt:
            return 400, "prompt is required"
        if len(prompt) > 500:
            return 413, "prompt exceeds 500 characters"
        return None

    @staticmethod
    def _length_problem(body: dict[str, Any], model: str) -> tuple[int, str] | None:
        """Custom-parameter limits: V3_5/V4 prompt 3000, style 200; others 5000, 1000; title 80
        (V3_5, V4, V4_5ALL) or 100."""
        old = model in ("V3_5", "V4")
        limits = (("prompt", 3000 if old else 5000), ("style", 200 if old else 1000),
                  ("title", 80 if old or model == "V4_5ALL" else 100))
        for name, limit in limits:
            if len(str(body.get(name) or "")) > limit:
                return 413, f"{name} exceeds {limit} characters"
        return None

    async def _creating_request(self, request: Request, route: str) -> tuple[Response | None, dict[str, Any]]:
        """What every creating route checks first, in sunoapi's order: the key, an injected fault, the
        call frequency (code 430), a JSON object body. ``(refusal, {})`` or ``(None, body)``."""
        if (denied := self._auth(request)) is not None:
            return denied, {}
        if (injected := await self.fault(route)) is not None:
            return injected, {}
        if self._throttled(request):
            return self.reply(430), {}
        body = await read_json_object(request)
        if body is None:
            return self.reply(400, "Request body must be a JSON object"), {}
        return None, body

    async def _created(self, task: SimTask, body: dict[str, Any], route: str,
                       callbacks: Callable[[SimTask], list[tuple[float, dict[str, Any]]]],
                       callback_kind: str) -> Response:
        """What every follow-up route does once its task exists: count the creation, schedule the
        documented callbacks, an injected after-effect fault, then ``{"taskId"}``."""
        self.record_creation(f"{route}:" + json.dumps(body, sort_keys=True))
        url = body.get("callBackUrl")
        if isinstance(url, str) and url:
            self._schedule_callbacks(task, url, callbacks, callback_kind)
        if (injected := await self.fault(route, after_effect=True)) is not None:
            return injected
        return self.reply(200, "success", {"taskId": task.id})

    # -- extend --------------------------------------------------------------
    async def extend(self, request: Request) -> Response:
        refused, body = await self._creating_request(request, "extend")
        if refused is not None:
            return refused
        problem = self._validate_extend(body)
        if problem is not None:
            return self.reply(*problem)
        audio = str(body["audioId"])
        source = self._source_clip(audio)
        if source is None:
            return self.reply(400, f"audioId {audio} does not exist")
        source_status = self.status(source)
        if source_status not in SUNOAPI_DONE:
            return self.reply(400, f"the music of audioId {audio} is {source_status}, not complete")
        source_spec = self._spec(source)
        if body["model"] != source_spec.get("model"):
            return self.reply(400, f"model must be consistent with the source music ({source_spec.get('model')})")
        continue_at = body.get("continueAt")
        duration = self._clip_duration()
        if continue_at is not None and not 0 < continue_at < duration:
            return self.reply(400, f"continueAt must be greater than 0 and less than the source audio's "
                                   f"duration ({duration:g} s)")
        if body["defaultParamFlag"] and (problem := self._persona_problem(body)) is not None:
            return self.reply(*problem)
        text = " ".join(str(body.get(k) or "") for k in ("prompt", "style", "title"))
        if (refused := self._trap_refusal(text)) is not None:
            return refused
        if not self._charge("extend"):
            return self.reply(429)
        if body["defaultParamFlag"]:
            spec = {"model": body["model"], "customMode": True,
                    "instrumental": bool(source_spec.get("instrumental")),
                    "prompt": body["prompt"], "style": body["style"], "title": body["title"]}
        else:  # the source's own parameters
            spec = {k: source_spec.get(k) for k in ("customMode", "instrumental", "prompt", "style", "title")}
            spec["model"] = body["model"]
        task = SimTask.create(secrets.token_hex(16), self.config, text, input=body,
                              data={"clips": [secrets.token_hex(16) for _ in range(_clip_count(self.config))],
                                    "origin": self.origin(request), "operation": "extend",
                                    "parent_music_id": audio, "spec": spec})
        for cid in task.data["clips"]:
            self.clips[cid] = task.id
        self.tasks[task.id] = task
        return await self._created(task, body, "extend", self.callback_bodies, "music")

    def _validate_extend(self, body: dict[str, Any]) -> tuple[int, str] | None:
        if not isinstance(body.get("defaultParamFlag"), bool):
            return 400, "defaultParamFlag is required and must be a boolean"
        if not isinstance(body.get("audioId"), str) or not body["audioId"]:
            return 400, "audioId is required"
        model = body.get("model")
        if model not in SUNOAPI_MODELS:
            return 400, f"model must be one of {', '.join(SUNOAPI_MODELS)}"
        problem = self._callback_problem(body, bool(self.config.extra.get("require_callback_url", False)))
        if problem is not None:
            return problem
        continue_at = body.get("continueAt")
        if continue_at is not None and not _is_number(continue_at):
            return 400, "continueAt must be a number of seconds"
        for name in ("prompt", "style", "title"):
            if body.get(name) is not None and not isinstance(body[name], str):
                return 400, f"{name} must be a string"
        if body["defaultParamFlag"]:
            for name in ("prompt", "style", "title"):
                if not body.get(name):
                    return 400, f"{name} is required when defaultParamFlag is true"
            if continue_at is None:
                return 400, "continueAt is required when defaultParamFlag is true"
            return self._length_problem(body, str(model))
        return None

    # -- record-info ---------------------------------------------------------
    def status(self, task: SimTask, now: float | None = None) -> str:
        now = time.time() if now is None else now
        phase = task.phase(now)
        if phase == "queued":
            return "PENDING"
        if task.outcome == "create_failed":
            return "CREATE_TASK_FAILED"
        if task.outcome == "sensitive":
            return "SENSITIVE_WORD_ERROR"
        if phase == "running" or task.outcome == "stuck":
            if task.outcome == "stuck" or now < task.started_at + task.run_seconds / 2:
                return "TEXT_SUCCESS"
            return "FIRST_SUCCESS"
        if task.outcome == "fail":
            return "GENERATE_AUDIO_FAILED"
        if task.outcome == "callback_exception" or task.data.get("callback_failed"):
            return "CALLBACK_EXCEPTION"
        return "SUCCESS"

    @staticmethod
    def _spec(task: SimTask) -> dict[str, Any]:
        """The song parameters of a music task: its request, or for an extension the effective ones."""
        spec: dict[str, Any] = task.data.get("spec") or task.input
        return spec

    def clip_list(self, task: SimTask, status: str, snake: bool) -> list[dict[str, Any]]:
        req = self._spec(task)
        origin = task.data["origin"]
        model = SUNOAPI_MODELS.get(str(req.get("model")), "chirp-v4")
        lyrics = _song_prompt(str(req.get("prompt") or "") if req.get("customMode") else "",
                              bool(req.get("instrumental")))
        created = self._time(task.created_at)
        done = {"TEXT_SUCCESS": 0, "FIRST_SUCCESS": 1}.get(status, len(task.data["clips"]))
        out = []
        for i, cid in enumerate(task.data["clips"]):
            ready = i < done
            audio = origin + _publish(self, task, f"audio{i}", "mp3", cid, f"{cid}.mp3") if ready else ""
            image = origin + _publish(self, task, f"image{i}", "png", cid, f"{cid}.png")
            stream = f"{origin}/audiopipe/?item_id={cid}"
            clip = {"id": cid, "audioUrl": audio, "sourceAudioUrl": audio, "streamAudioUrl": stream,
                    "sourceStreamAudioUrl": stream, "imageUrl": image, "sourceImageUrl": image,
                    "prompt": lyrics, "modelName": model,
                    "title": str(req.get("title") or "Simulated Song"),
                    "tags": str(req.get("style") or ""), "createTime": created,
                    "duration": self._clip_duration() if ready else None}
            if snake:
                renames = {"audioUrl": "audio_url", "sourceAudioUrl": "source_audio_url",
                           "streamAudioUrl": "stream_audio_url",
                           "sourceStreamAudioUrl": "source_stream_audio_url", "imageUrl": "image_url",
                           "sourceImageUrl": "source_image_url", "modelName": "model_name"}
                clip = {renames.get(k, k): v for k, v in clip.items()}
            out.append(clip)
        return out

    def record(self, task: SimTask, now: float | None = None) -> dict[str, Any]:
        status = self.status(task, now)
        response: dict[str, Any] | None = None
        if status in ("TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS", "CALLBACK_EXCEPTION"):
            response = {"taskId": task.id, "sunoData": self.clip_list(task, status, snake=False)}
        elif status == "GENERATE_AUDIO_FAILED":
            response = {"taskId": task.id, "sunoData": []}
        code, message = SUNOAPI_FAILURES.get(status, (None, None))
        param = {k: v for k, v in task.input.items() if k != "callBackUrl"}
        operation = str(task.data.get("operation", "generate"))
        return {"taskId": task.id, "parentMusicId": str(task.data.get("parent_music_id", "")),
                "param": json.dumps(param, ensure_ascii=False), "response": response, "status": status,
                "type": operation.upper(), "operationType": operation,
                "errorCode": code, "errorMessage": message}

    async def record_info(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("record_info")) is not None:
            return injected
        task_id = request.query_params.get("taskId")
        if not task_id:
            return self.reply(400, "taskId is required")
        task = self.tasks.get(task_id)
        if task is None:
            return self.reply(400, "taskId does not exist")
        return self.reply(200, "success", self.record(task))

    async def credit(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("credit")) is not None:
            return injected
        credits = self.config.extra.get("credits")
        left: float = 10_000_000 if credits is None else max(0.0, float(credits) - self.used_credits)
        left = round(left, 2)
        return self.reply(200, "success", int(left) if left == int(left) else left)

    # -- lyrics --------------------------------------------------------------
    async def lyrics(self, request: Request) -> Response:
        refused, body = await self._creating_request(request, "lyrics")
        if refused is not None:
            return refused
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self.reply(400, "prompt is required")
        if len(prompt.split()) > 200:
            return self.reply(413, "prompt exceeds 200 words")
        required = bool(self.config.extra.get("followup_requires_callback_url", True))
        if (problem := self._callback_problem(body, required)) is not None:
            return self.reply(*problem)
        if (refused := self._trap_refusal(prompt)) is not None:
            return refused
        if not self._charge("lyrics"):
            return self.reply(429)
        task = SimTask.create(secrets.token_hex(16), self.config, prompt, input=body,
                              data={"origin": self.origin(request)})
        self.lyrics_tasks[task.id] = task
        return await self._created(task, body, "lyrics", self.lyrics_callback_bodies, "lyrics")

    def lyrics_status(self, task: SimTask, now: float | None = None) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "PENDING"
        if task.outcome == "create_failed":
            return "CREATE_TASK_FAILED"
        if task.outcome == "sensitive":
            return "SENSITIVE_WORD_ERROR"
        if phase == "running" or task.outcome == "stuck":
            return "PENDING"
        if task.outcome == "fail":
            return "GENERATE_LYRICS_FAILED"
        if task.outcome == "callback_exception" or task.data.get("callback_failed"):
            return "CALLBACK_EXCEPTION"
        return "SUCCESS"

    def lyrics_variants(self, task: SimTask) -> list[dict[str, Any]]:
        """The lyrics variants of a finished task (``[sim:partial]``: the last one failed)."""
        count = max(1, int(self.config.extra.get("lyrics_variants", 2)))
        topic = " ".join(_SIM_DIRECTIVE.sub(" ", str(task.input.get("prompt") or "")).split())
        title = " ".join(topic.split()[:4]).title() or "Untitled"
        out = []
        for i in range(count):
            if task.outcome == "partial" and i == count - 1:
                out.append({"text": "", "title": "", "status": "failed",
                            "errorMessage": "Lyrics variant generation failed (simulated)"})
                continue
            text = (f"[Verse]\nA song about {topic}\nSung in take {i + 1} of {task.id[:8]}\n"
                    f"[Chorus]\n{title}, {title}\nOnce again for version {i + 1}")
            out.append({"text": text, "title": f"{title} ({i + 1})" if i else title,
                        "status": "complete", "errorMessage": ""})
        return out

    def lyrics_record(self, task: SimTask, now: float | None = None) -> dict[str, Any]:
        status = self.lyrics_status(task, now)
        key = str(self.config.extra.get("lyrics_list_key", "data"))
        response = ({"taskId": task.id, key: self.lyrics_variants(task)} if status in SUNOAPI_DONE else None)
        code, message = SUNOAPI_FAILURES.get(status, (None, None))
        param = {k: v for k, v in task.input.items() if k != "callBackUrl"}
        return {"taskId": task.id, "param": json.dumps(param, ensure_ascii=False), "response": response,
                "status": status, "type": "LYRICS", "errorCode": code, "errorMessage": message}

    async def lyrics_record_info(self, request: Request) -> Response:
        return await self._record_info(request, "lyrics_record_info", self.lyrics_tasks, self.lyrics_record)

    async def _record_info(self, request: Request, route: str, tasks: dict[str, SimTask],
                           record: Callable[[SimTask], dict[str, Any]]) -> Response:
        """``GET .../record-info?taskId=``: the same envelope and refusals on every follow-up family."""
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault(route)) is not None:
            return injected
        task_id = request.query_params.get("taskId")
        if not task_id:
            return self.reply(400, "taskId is required")
        task = tasks.get(task_id)
        if task is None:
            return self.reply(400, "taskId does not exist")
        return self.reply(200, "success", record(task))

    def lyrics_callback_bodies(self, task: SimTask) -> list[tuple[float, dict[str, Any]]]:
        """Lyrics have one callback stage, ``complete`` (or ``error``), keyed ``taskId`` (camelCase)."""
        key = str(self.config.extra.get("lyrics_list_key", "data"))
        failure = {"create_failed": "CREATE_TASK_FAILED", "sensitive": "SENSITIVE_WORD_ERROR",
                   "fail": "GENERATE_LYRICS_FAILED"}.get(task.outcome)
        if task.outcome == "stuck":
            return []
        if failure is not None:
            code, message = SUNOAPI_FAILURES[failure]
            when = task.finished_at if failure == "GENERATE_LYRICS_FAILED" else task.started_at
            ctype = str(self.config.extra.get("failure_callback_type", "error"))
            return [(when, {"code": code, "msg": message,
                            "data": {"callbackType": ctype, "taskId": task.id, key: None}})]
        return [(task.finished_at, {"code": 200, "msg": "All generated successfully.",
                                    "data": {"callbackType": "complete", "taskId": task.id,
                                             key: self.lyrics_variants(task)}})]

    # -- WAV conversion --------------------------------------------------------
    async def wav(self, request: Request) -> Response:
        refused, body = await self._creating_request(request, "wav")
        if refused is not None:
            return refused
        for name in ("taskId", "audioId"):
            if not isinstance(body.get(name), str) or not body[name]:
                return self.reply(400, f"{name} is required")
        required = bool(self.config.extra.get("followup_requires_callback_url", True))
        if (problem := self._callback_problem(body, required)) is not None:
            return self.reply(*problem)
        source = self.tasks.get(body["taskId"])
        if source is None:
            return self.reply(400, f"taskId {body['taskId']} does not exist")
        audio = body["audioId"]
        if audio not in source.data["clips"]:
            return self.reply(400, f"audioId {audio} is not a track of task {source.id}")
        source_status = self.status(source)
        if source_status not in SUNOAPI_DONE:
            return self.reply(400, f"the music of task {source.id} is {source_status}, not complete")
        if self.config.extra.get("wav_conflict_on_repeat", True) and audio in self.wav_by_audio:
            return self.reply(409, "WAV record already exists")
        if not self._charge("wav"):
            return self.reply(429)
        task = SimTask.create(secrets.token_hex(16), self.config, None, input=body,
                              data={"origin": self.origin(request), "music_id": audio,
                                    "music_index": source.data["clips"].index(audio), "source": source.id})
        if source.outcome == "wav_fail":  # directive on the source song: its conversions fail
            task.outcome = "fail"
        self.wav_tasks[task.id] = task
        self.wav_by_audio[audio] = task.id
        return await self._created(task, body, "wav", self.wav_callback_bodies, "wav")

    def wav_status(self, task: SimTask, now: float | None = None) -> str:
        if task.phase(now) != "done":
            return "PENDING"
        if task.outcome == "fail":
            return "GENERATE_WAV_FAILED"
        if task.data.get("callback_failed"):
            return "CALLBACK_EXCEPTION"
        return "SUCCESS"

    def _wav_keys(self) -> tuple[str, str]:
        """(status field, URL field): the current docs' ``successFlag``/``audioWavUrl``, or the older
        ``status``/``audio_wav_url``."""
        if self.config.extra.get("wav_record_style", "current") == "legacy":
            return "status", "audio_wav_url"
        return "successFlag", "audioWavUrl"

    def wav_url(self, task: SimTask) -> str:
        music_id = str(task.data["music_id"])
        path = task.data.get("files", {}).get("wav")
        if path is None:  # a real WAV, distinct per conversion task
            data = media.tagged_wav(f"{task.id}:{music_id}", seconds=MP3_SECONDS)
            path = _publish_bytes(self, task, "wav", data, "audio/wav", f"{music_id}.wav")
        return str(task.data["origin"]) + str(path)

    def wav_record(self, task: SimTask, now: float | None = None) -> dict[str, Any]:
        status = self.wav_status(task, now)
        flag_key, url_key = self._wav_keys()
        code, message = SUNOAPI_FAILURES.get(status, (None, None))
        return {"taskId": task.id, "musicId": task.data["music_id"], "musicIndex": task.data["music_index"],
                "callbackUrl": str(task.input.get("callBackUrl") or ""),
                "completeTime": None if status == "PENDING" else self._time(task.finished_at),
                "response": {url_key: self.wav_url(task)} if status in SUNOAPI_DONE else None,
                flag_key: status, "createTime": self._time(task.created_at),
                "errorCode": code, "errorMessage": message}

    async def wav_record_info(self, request: Request) -> Response:
        return await self._record_info(request, "wav_record_info", self.wav_tasks, self.wav_record)

    def wav_callback_bodies(self, task: SimTask) -> list[tuple[float, dict[str, Any]]]:
        """One callback when the conversion ends; no ``callbackType`` is documented for WAV."""
        _, url_key = self._wav_keys()
        if task.outcome == "fail":
            code, message = SUNOAPI_FAILURES["GENERATE_WAV_FAILED"]
            return [(task.finished_at, {"code": code, "msg": message,
                                        "data": {url_key: None, "task_id": task.id}})]
        return [(task.finished_at, {"code": 200, "msg": "success",
                                    "data": {url_key: self.wav_url(task), "task_id": task.id}})]

    # -- persona -------------------------------------------------------------
    async def generate_persona(self, request: Request) -> Response:
        refused, body = await self._creating_request(request, "persona")
        if refused is not None:
            return refused
        problem = self._persona_request_problem(body)
        if problem is not None:
            return self.reply(*problem)
        audio = body["audioId"]
        if audio in self.persona_by_audio:
            return self.reply(409, f"a Persona was already generated for audioId {audio}")
        persona = {"personaId": secrets.token_hex(16), "name": body["name"], "description": body["description"]}
        self.personas[persona["personaId"]] = {**persona, "taskId": body["taskId"], "audioId": audio,
                                               "style": body.get("style")}
        self.persona_by_audio[audio] = persona["personaId"]
        # Free of charge, so not a paid creation (stats.creations stays as it is).
        if (injected := await self.fault("persona", after_effect=True)) is not None:
            return injected
        return self.reply(200, "success", persona)

    def _persona_request_problem(self, body: dict[str, Any]) -> tuple[int, str] | None:
        for name in ("taskId", "audioId", "name", "description"):
            if not isinstance(body.get(name), str) or not body[name]:
                return 400, f"{name} is required"
        start, end = body.get("vocalStart"), body.get("vocalEnd")
        for name, value in (("vocalStart", start), ("vocalEnd", end)):
            if value is not None and not _is_number(value):
                return 400, f"{name} must be a number of seconds"
        source = self.tasks.get(body["taskId"])
        if source is None:
            return 400, f"taskId {body['taskId']} does not exist"
        if body["audioId"] not in source.data["clips"]:
            return 400, f"audioId {body['audioId']} is not a track of task {source.id}"
        source_status = self.status(source)
        if source_status not in SUNOAPI_DONE:
            return 400, f"the music of task {source.id} is {source_status}, not complete"
        if self._spec(source).get("model") == "V3_5":
            return 400, "Persona generation needs music made with V4 or a later model"
        lo = 0.0 if start is None else float(start)
        hi = 30.0 if end is None else float(end)
        if lo < 0 or not 10 <= hi - lo <= 30:
            return 400, "vocalEnd - vocalStart must be between 10 and 30 seconds, vocalStart >= 0"
        if (start is not None or end is not None) and hi > self._clip_duration():
            return 400, f"vocalStart and vocalEnd must lie within the audio's duration ({self._clip_duration():g} s)"
        return None

    # -- callbacks -----------------------------------------------------------
    async def shutdown(self) -> None:
        """Cancel callback deliveries still pending (call before the event loop closes)."""
        pending = list(self._callback_tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _schedule_callbacks(self, task: SimTask, url: str, bodies: Bodies, label: str) -> None:
        t = asyncio.get_running_loop().create_task(self._run_callbacks(task, url, bodies, label))
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    def callback_bodies(self, task: SimTask) -> list[tuple[float, dict[str, Any]]]:
        """The callbacks a music task (generate or extend) sends: (when, body), in order."""
        failure = {"create_failed": "CREATE_TASK_FAILED", "sensitive": "SENSITIVE_WORD_ERROR",
                   "fail": "GENERATE_AUDIO_FAILED"}.get(task.outcome)
        ctype = str(self.config.extra.get("failure_callback_type", "error"))

        def error_body(status: str) -> dict[str, Any]:
            code, message = SUNOAPI_FAILURES[status]
            return {"code": code, "msg": message,
                    "data": {"callbackType": ctype, "task_id": task.id, "error": message}}

        if failure in ("CREATE_TASK_FAILED", "SENSITIVE_WORD_ERROR"):
            return [(task.started_at, error_body(failure))]
        text = {"code": 200, "msg": "Text generation completed successfully.",
                "data": {"callbackType": "text", "task_id": task.id, "data": []}}
        out: list[tuple[float, dict[str, Any]]] = [(task.started_at, text)]
        if task.outcome == "stuck":
            return out
        half = task.started_at + task.run_seconds / 2
        out.append((half, {"code": 200, "msg": "First audio generated successfully.",
                           "data": {"callbackType": "first", "task_id": task.id,
                                    "data": self.clip_list(task, "FIRST_SUCCESS", snake=True)}}))
        if failure == "GENERATE_AUDIO_FAILED":
            out.append((task.finished_at, error_body(failure)))
        else:
            out.append((task.finished_at, {"code": 200, "msg": "All generated successfully.",
                                           "data": {"callbackType": "complete", "task_id": task.id,
                                                    "data": self.clip_list(task, "SUCCESS", snake=True)}}))
        return out

    async def _run_callbacks(self, task: SimTask, url: str, bodies: Bodies, label: str) -> None:
        timeout = float(self.config.extra.get("callback_timeout_seconds", 15.0))
        planned = bodies(task)
        all_failed = bool(planned)
        async with self.callback_client(timeout) as client:
            for i, (when, _) in enumerate(planned):
                await asyncio.sleep(max(0.0, when - time.time()))
                # Rebuilt at send time so URLs and the failure shape follow the config of that moment.
                body = bodies(task)[i][1]
                if await self._deliver(client, url, body, label):
                    all_failed = False
        if all_failed and self.config.extra.get("callback_exception_on_failure", False):
            task.data["callback_failed"] = True

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: dict[str, Any], label: str) -> bool:
        delays = [0.0, *(float(d) for d in self.config.extra.get("callback_retry_delays", [0.2, 0.5, 1.0]))]
        payload = json.dumps(body, ensure_ascii=False).encode()
        data = body.get("data")
        kind = data.get("callbackType", label) if isinstance(data, dict) else label
        for delay in delays:
            await asyncio.sleep(delay)
            status: int | None = None
            try:
                resp = await client.post(url, content=payload, headers={"content-type": "application/json"})
                status = resp.status_code
            except httpx.HTTPError:
                pass
            self.callbacks_sent += 1
            self.callback_log.append({"url": url, "callbackType": kind, "kind": label, "status": status})
            if status is not None and 200 <= status < 300:
                return True
        return False
