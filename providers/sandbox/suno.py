"""Suno simulators in the two third-party shapes Atelier can talk to.

Written from the documented wire formats (shared/providers
replicate-fal-suno-gateways.md §3 and §4), not from our adapters. Every task
yields ``clips_per_task`` clips (2 by default), each a real MP3 (``media.mp3``)
plus a real PNG cover, distinct per clip, at URLs that stop working after
``output_ttl_seconds`` (counted from the task's completion).

``SunoGatewaySimulator`` — a new-api gateway with a Suno-API channel (§3a, §4.3):

- ``POST /suno/submit/music`` and ``POST /suno/submit/lyrics`` (``SunoSubmitReq``:
  ``prompt, gpt_description_prompt, mv, title, tags, continue_at, task_id,
  continue_clip_id, make_instrumental``; unknown fields dropped; ``mv`` defaults
  to ``chirp-v3-0``) -> ``{"code":"success","message":"","data":"task_..."}``.
  Lyrics (``LYRICS``) answer text, not audio. Extend is a ``MUSIC`` submit with
  ``continue_clip_id`` and ``continue_at`` (seconds, a float): the upstream refuses a clip it
  does not know or that is not ``complete`` yet, and a missing or negative ``continue_at``
  (``extra["continue_refusal_status"]``, 400, reaches the client as ``fail_to_fetch_task``
  carrying the upstream body); the new clips' ``metadata.history`` names the source clip.
  The gateway serves no other action: concat, WAV and persona are ``invalid_action``.
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

``SunoApiSimulator`` — sunoapi.org (and white-label clones) (§3b):

- ``POST /api/v1/generate`` (``prompt, customMode, instrumental, model,
  callBackUrl, style, title, negativeTags, vocalGender, ...``) ->
  ``{"code":200,"msg":"success","data":{"taskId":"..."}}``.
- ``GET /api/v1/generate/record-info?taskId=`` -> ``data: {taskId, parentMusicId,
  param (a JSON *string*), response: {taskId, sunoData:[{id, audioUrl,
  sourceAudioUrl, streamAudioUrl, sourceStreamAudioUrl, imageUrl,
  sourceImageUrl, prompt, modelName, title, tags, createTime, duration}]} | null,
  status, type, operationType, errorCode, errorMessage}``.
- ``GET /api/v1/generate/credit`` -> ``data: <credits>``.
- Statuses ``PENDING -> TEXT_SUCCESS -> FIRST_SUCCESS -> SUCCESS``, or
  ``CREATE_TASK_FAILED``, ``GENERATE_AUDIO_FAILED``, ``SENSITIVE_WORD_ERROR``,
  ``CALLBACK_EXCEPTION`` (generation done, sunoData complete).
- Business codes in the body: 400 params, 401 auth ("You do not have access
  permissions"), 404 path, 405 rate limit, 413 prompt/style/title too long, 422
  missing ``callBackUrl`` (only with ``require_callback_url``), 429 insufficient
  credits (not a throttle!), 430 call frequency too high, 455 maintenance, 500.
  HTTP status 200 unless ``http_status_mirrors_code``. Injected faults keep their
  real HTTP status and carry the envelope (429 -> code 430).
- Callbacks (POST JSON, unsigned, snake_case clips) to ``callBackUrl`` at each
  stage: ``text`` (``data: []``), ``first`` (first clip complete), ``complete``
  (all clips); on failure ``{"code":400|500|501,"msg",...,"data":{"callbackType":
  "error","task_id","error"}}``. Retried on non-2xx / network errors after
  ``callback_retry_delays``.

Directives (in prompt, style or title): ``[sim:fail]`` audio generation fails
(gateway: clips ``error``); ``[sim:queue=S]``, ``[sim:run=S]``; gateway only:
``[sim:filtered]`` moderation failure, ``[sim:partial]`` one clip complete and one
failed (task ``FAILURE``), ``[sim:stuck]`` upstream streams forever,
``[sim:unknown]`` upstream reports ``UNKNOWN``, ``[sim:lost]`` upstream forgets the
task (``NOT_START`` until the sweep), ``[sim:saturated]`` submit 429,
``[sim:rejected]`` upstream refuses (500); sunoapi only: ``[sim:sensitive]``
``SENSITIVE_WORD_ERROR``, ``[sim:create_failed]`` ``CREATE_TASK_FAILED``,
``[sim:callback_exception]``, ``[sim:stuck]`` stays ``TEXT_SUCCESS``,
``[sim:credits]`` 429, ``[sim:maintenance]`` 455, ``[sim:frequency]`` 430,
``[sim:ratelimit]`` 405.

Fault route names: gateway ``submit``, ``fetch``, ``batch_fetch``; sunoapi
``generate``, ``record_info``, ``credit``; both ``stream`` (``/audiopipe/``) and
``download`` (file URLs).

The reference documents no sunoapi.org route beyond generate, record-info and credit
(``personaId``/``personaModel`` are optional generate fields, passed through), so this
simulator serves no extend, concat, lyrics, WAV or persona route in that shape.

``SimConfig.extra``: ``clips_per_task`` (2); gateway: see ``gateway.py``, and
``continue_refusal_status`` (400; the upstream's status for a refused continuation is not
documented, 500 answers ``internal_error``);
sunoapi: ``http_status_mirrors_code`` (false), ``require_callback_url`` (false),
``credits`` (None = unlimited), ``credit_cost`` (12), ``rate_limit_per_10s``
(None), ``failure_callback_type`` ("error"; the api.box docs say "failed"),
``create_time_format`` ("string" or "ms"), ``callback_retry_delays``
([0.2, 0.5, 1.0]; the docs say 1, 5, 15 min), ``callback_timeout_seconds`` (15),
``callback_exception_on_failure`` (false: when true, a task whose callbacks all
failed ends ``CALLBACK_EXCEPTION``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import deque
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
                    413: "Theme or prompt too long", 429: "Insufficient credits",
                    430: "Your call frequency is too high. Please try again later.",
                    455: "System maintenance", 500: "Server error"}
SUNOAPI_FAILURES = {
    "CREATE_TASK_FAILED": (500, "Failed to create the generation task (simulated)"),
    "SENSITIVE_WORD_ERROR": (400, "Content contains prohibited words (simulated)"),
    "GENERATE_AUDIO_FAILED": (501, "Audio generation failed."),
}


class SunoApiSimulator(Simulator):
    """sunoapi.org's ``/api/v1/generate`` family with staged callbacks."""

    name = "sunoapi"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.clips: dict[str, str] = {}
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.used_credits = 0
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
            _audiopipe_route(self, self.clips),
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

    # -- generate ------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("generate")) is not None:
            return injected
        if self._throttled(request):
            return self.reply(430)
        body = await read_json_object(request)
        if body is None:
            return self.reply(400, "Request body must be a JSON object")
        problem = self._validate(body)
        if problem is not None:
            return self.reply(*problem)
        text = " ".join(str(body.get(k) or "") for k in ("prompt", "style", "title"))
        traps = directives(text)
        for trap, code in (("credits", 429), ("maintenance", 455), ("frequency", 430), ("ratelimit", 405)):
            if trap in traps:
                return self.reply(code)
        credits = self.config.extra.get("credits")
        cost = int(self.config.extra.get("credit_cost", 12))
        if credits is not None and self.used_credits + cost > int(credits):
            return self.reply(429)
        self.used_credits += cost
        task = SimTask.create(secrets.token_hex(16), self.config, text, input=body,
                          data={"clips": [secrets.token_hex(16) for _ in range(_clip_count(self.config))],
                                "origin": self.origin(request)})
        for cid in task.data["clips"]:
            self.clips[cid] = task.id
        self.tasks[task.id] = task
        self.record_creation(json.dumps(body, sort_keys=True))
        url = body.get("callBackUrl")
        if isinstance(url, str) and url:
            self._schedule_callbacks(task, url)
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
        url = body.get("callBackUrl")
        if url is not None and not isinstance(url, str):
            return 400, "callBackUrl must be a string"
        if not url and self.config.extra.get("require_callback_url", False):
            return 422, "Please enter callBackUrl."
        old = model in ("V3_5", "V4")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            return 400, "prompt must be a string"
        if body["customMode"]:
            for name in ("style", "title"):
                if not isinstance(body.get(name), str) or not body[name]:
                    return 400, f"{name} is required in custom mode"
            if not body["instrumental"] and not prompt:
                return 400, "prompt is required in custom mode unless instrumental"
            limits = (("prompt", 3000 if old else 5000), ("style", 200 if old else 1000),
                      ("title", 80 if old or model == "V4_5ALL" else 100))  # docs: V4, V4_5ALL 80
            for name, limit in limits:
                if len(str(body.get(name) or "")) > limit:
                    return 413, f"{name} exceeds {limit} characters"
        else:
            if not prompt:
                return 400, "prompt is required"
            if len(prompt) > 500:
                return 413, "prompt exceeds 500 characters"
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

    def clip_list(self, task: SimTask, status: str, snake: bool) -> list[dict[str, Any]]:
        req = task.input
        origin = task.data["origin"]
        model = SUNOAPI_MODELS.get(str(req.get("model")), "chirp-v4")
        lyrics = _song_prompt(str(req.get("prompt") or "") if req.get("customMode") else "",
                              bool(req.get("instrumental")))
        fmt = self.config.extra.get("create_time_format", "string")
        created: Any = (int(task.created_at * 1000) if fmt == "ms"
                        else datetime.fromtimestamp(task.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S"))
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
                    "duration": MP3_SECONDS if ready else None}
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
        return {"taskId": task.id, "parentMusicId": "", "param": json.dumps(param, ensure_ascii=False),
                "response": response, "status": status, "type": "GENERATE", "operationType": "generate",
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
        left = 10_000_000 if credits is None else max(0, int(credits) - self.used_credits)
        return self.reply(200, "success", left)

    # -- callbacks -----------------------------------------------------------
    async def shutdown(self) -> None:
        """Cancel callback deliveries still pending (call before the event loop closes)."""
        pending = list(self._callback_tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _schedule_callbacks(self, task: SimTask, url: str) -> None:
        t = asyncio.get_running_loop().create_task(self._run_callbacks(task, url))
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    def callback_bodies(self, task: SimTask) -> list[tuple[float, dict[str, Any]]]:
        """The callbacks a task sends: (when, body), in order."""
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

    async def _run_callbacks(self, task: SimTask, url: str) -> None:
        timeout = float(self.config.extra.get("callback_timeout_seconds", 15.0))
        all_failed = True
        async with self.callback_client(timeout) as client:
            for i, (when, _) in enumerate(self.callback_bodies(task)):
                await asyncio.sleep(max(0.0, when - time.time()))
                # Rebuilt at send time so URLs and the failure shape follow the config of that moment.
                body = self.callback_bodies(task)[i][1]
                if await self._deliver(client, url, body):
                    all_failed = False
        if all_failed and self.config.extra.get("callback_exception_on_failure", False):
            task.data["callback_failed"] = True

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> bool:
        delays = [0.0, *(float(d) for d in self.config.extra.get("callback_retry_delays", [0.2, 0.5, 1.0]))]
        payload = json.dumps(body, ensure_ascii=False).encode()
        for delay in delays:
            await asyncio.sleep(delay)
            status: int | None = None
            try:
                resp = await client.post(url, content=payload, headers={"content-type": "application/json"})
                status = resp.status_code
            except httpx.HTTPError:
                pass
            self.callbacks_sent += 1
            self.callback_log.append({"url": url, "callbackType": body["data"]["callbackType"],
                                      "status": status})
            if status is not None and 200 <= status < 300:
                return True
        return False
