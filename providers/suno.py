"""Suno, through one of its two common third-party shapes (there is no official Suno API).

The shape is deployment configuration, ``ATELIER_SUNO_FLAVOR`` (``settings.extra["flavor"]``),
so clients send the same request either way (models and option names are translated).

``gateway`` -- a new-api / one-api gateway's Suno "task" format (the default)
    POST {base}/suno/submit/music   SunoSubmitReq -> ``{"code":"success","message":"","data":"task_..."}``
    GET  {base}/suno/fetch/{id}     -> ``{"code":"success",...,"data":<TaskDto>}``; unknown id: 400 ``task_not_exist``
    POST {base}/suno/fetch          ``{"ids":[...]}`` -> ``data: [<TaskDto>...]``, unknown ids omitted (``fetch_many``)
    Errors: task errors ``{code,message,data}`` with the error's HTTP status; auth errors
    ``{"error":{message,type,code}}``; 403 ``quota_not_enough``; every final 429 is "upstream saturated".
    Status = the TaskDto's top-level ``status`` (never ``data[].status``: the gateway's 24 h
    timeout sweep leaves stale clip data, new-api #5715): ``""``, ``NOT_START`` (until the
    gateway's first upstream poll, >= 15 s), ``SUBMITTED``, ``QUEUED``, ``UNKNOWN`` -> queued;
    ``IN_PROGRESS`` -> running; ``SUCCESS`` -> succeeded; ``FAILURE`` -> failed (``fail_reason``,
    which ``result_url`` repeats). ``progress`` is only ever "0%" or "100%".
    No cancel endpoint, no callbacks.

``sunoapi`` -- sunoapi.org and its white-label clones (api.box, kie.ai, ...)
    POST {base}/api/v1/generate     -> ``{"code":200,"msg":"success","data":{"taskId":...}}``
    GET  {base}/api/v1/generate/record-info?taskId=  -> ``data: {status, response:{sunoData:[...]}, errorCode,
    errorMessage}`` (camelCase clips)
    The business ``code`` in the body decides, usually with HTTP 200: 400/404/413/422 refused,
    401 auth, 405 and 430 rate limits, **429 insufficient credits** (not a throttle), 455
    maintenance, 500 server error.
    ``PENDING`` -> queued; ``TEXT_SUCCESS``, ``FIRST_SUCCESS`` -> running; ``SUCCESS`` -> succeeded;
    ``CREATE_TASK_FAILED``, ``GENERATE_AUDIO_FAILED``, ``SENSITIVE_WORD_ERROR`` -> failed;
    ``CALLBACK_EXCEPTION`` (their callback to us failed) -> succeeded when every clip has its
    audio, else failed.
    Callbacks: ``callBackUrl`` = our per-job URL; stages ``text``/``first``/``complete`` or
    ``error`` (snake_case clips). Unsigned: the per-job token in the URL authenticates them, and
    they are only hints (the state applied is the one fetched). No cancel endpoint.

Outputs: a task yields several clips (usually two). Each clip gives its audio, then its cover
image where there is one; both carry ``clip_id`` and ``title``, the audio also ``duration``,
``tags``, ``model``, ``lyrics``, ``created_at``.

Input: ``prompt`` is the song description (non-custom mode) or the lyrics (custom mode);
custom mode is ``options.customMode`` (alias ``custom_mode``), implied by a ``style``/``tags``
or ``title`` option. Options (either flavour's name): ``style``/``tags``, ``title``,
``instrumental``/``make_instrumental``; sunoapi only: ``negativeTags`` (also from
``negative_prompt``), ``vocalGender``, ``styleWeight``, ``weirdnessConstraint``, ``audioWeight``,
``personaId``, ``personaModel``; gateway only: ``continue_at``, ``continue_clip_id``,
``task_id``. ``model`` is the gateway's ``mv`` (``chirp-v4``...) or sunoapi's ``model``
(``V4``, ``V4_5``...); the known pairs translate both ways. ``image_url``,
``duration_seconds``, ``aspect_ratio``, ``resolution``, ``seed`` and ``num_outputs`` are refused.

Traps: neither flavour can list tasks, so an ambiguous submission cannot be reconciled (the job
fails with ``provider_outcome_unknown``). A gateway task error means the gateway kept no task and
refunded it (it inserts the row only after the upstream accepted), so a 5xx envelope is safe to
retry; a 5xx without the envelope (a proxy in front) is not.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    ProviderState,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    OutcomeUnknown,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.http import (
    expect_object,
    gateway_quota_exhausted,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
)

log = logging.getLogger(__name__)

FLAVORS = ("gateway", "sunoapi")

# sunoapi.org model names (docs: V4, V4_5, V4_5PLUS, V4_5ALL, V5; some mirrors add V5_5) and Suno's
# own ``mv`` for them. V4_5 and V4_5ALL are both chirp-auk; chirp-auk translates back to V4_5.
SUNOAPI_MODELS = ("V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5")
_MV_OF = {"V4": "chirp-v4", "V4_5": "chirp-auk", "V4_5ALL": "chirp-auk", "V4_5PLUS": "chirp-bluejay",
          "V5": "chirp-crow"}
_SUNOAPI_OF = {"chirp-v4": "V4", "chirp-auk": "V4_5", "chirp-bluejay": "V4_5PLUS", "chirp-crow": "V5"}
_MV = re.compile(r"^chirp-[a-z0-9][a-z0-9.-]*$")

_GATEWAY_STATES: dict[str, ProviderState] = {
    "": "queued", "NOT_START": "queued", "SUBMITTED": "queued", "QUEUED": "queued", "UNKNOWN": "queued",
    "IN_PROGRESS": "running", "SUCCESS": "succeeded", "FAILURE": "failed",
}
_SUNOAPI_STATES: dict[str, ProviderState] = {
    "": "queued", "PENDING": "queued", "TEXT_SUCCESS": "running", "FIRST_SUCCESS": "running",
    "SUCCESS": "succeeded", "CREATE_TASK_FAILED": "failed", "GENERATE_AUDIO_FAILED": "failed",
    "SENSITIVE_WORD_ERROR": "failed",
}
_CALLBACK_STAGES = {"text": "TEXT_SUCCESS", "first": "FIRST_SUCCESS", "complete": "SUCCESS"}

# -- input -----------------------------------------------------------------------------------

# Accepted option name -> (canonical name, type). Both flavours' spellings are accepted.
_OPTIONS: dict[str, tuple[str, str]] = {
    "customMode": ("custom", "bool"), "custom_mode": ("custom", "bool"),
    "instrumental": ("instrumental", "bool"), "make_instrumental": ("instrumental", "bool"),
    "style": ("style", "str"), "tags": ("style", "str"),
    "title": ("title", "str"),
    "negativeTags": ("negative_tags", "str"), "negative_tags": ("negative_tags", "str"),
    "vocalGender": ("vocal_gender", "gender"),
    "styleWeight": ("style_weight", "weight"),
    "weirdnessConstraint": ("weirdness", "weight"),
    "audioWeight": ("audio_weight", "weight"),
    "personaId": ("persona_id", "str"),
    "personaModel": ("persona_model", "persona"),
    "continue_at": ("continue_at", "seconds"),
    "continue_clip_id": ("continue_clip_id", "str"),
    "task_id": ("task_id", "str"),
}
_BOTH = {"custom", "instrumental", "style", "title"}
_ONLY = {
    "sunoapi": {"negative_tags", "vocal_gender", "style_weight", "weirdness", "audio_weight", "persona_id",
                "persona_model"},
    "gateway": {"continue_at", "continue_clip_id", "task_id"},
}
# Set elsewhere in the request, not in options.
_ELSEWHERE = {"prompt": "input.prompt", "gpt_description_prompt": "input.prompt", "mv": "model",
              "model": "model", "callBackUrl": "Atelier (the per-job callback URL)",
              "negative_prompt": "input.negative_prompt"}
# Canonical name -> sunoapi body field.
_SUNOAPI_FIELDS = {"style": "style", "title": "title", "negative_tags": "negativeTags",
                   "vocal_gender": "vocalGender", "style_weight": "styleWeight",
                   "weirdness": "weirdnessConstraint", "audio_weight": "audioWeight",
                   "persona_id": "personaId", "persona_model": "personaModel"}
_UNSUPPORTED = {
    "image_url": "Suno generates from text; audio uploads are a different endpoint",
    "duration_seconds": "Suno chooses the song length",
    "aspect_ratio": "Suno renders audio",
    "resolution": "Suno renders audio",
    "seed": "Suno takes no seed",
    "num_outputs": "Suno renders a fixed number of clips per task (usually two)",
}


@dataclass
class SunoParams:
    """A request, validated and in canonical terms, for one flavour."""

    model: str
    prompt: str
    custom: bool
    instrumental: bool
    values: dict[str, Any] = field(default_factory=dict)
    # Canonical name -> the field the client used (for error messages).
    fields: dict[str, str] = field(default_factory=dict)


def suno_params(flavor: str, job_input: MediaInput, model: str) -> SunoParams:
    """Validate ``job_input``/``model`` for ``flavor``; raises ``InvalidInput`` naming the field."""
    for name, why in _UNSUPPORTED.items():
        if getattr(job_input, name) is not None:
            raise InvalidInput(f"input.{name}", f"not supported by Suno: {why}")
    values: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for key, value in job_input.options.items():
        where = f"input.options.{key}"
        if key in _ELSEWHERE:
            raise InvalidInput(where, f"set this with {_ELSEWHERE[key]}, not in options")
        if key not in _OPTIONS:
            allowed = sorted(k for k, (c, _) in _OPTIONS.items() if c in _BOTH | _ONLY[flavor])
            raise InvalidInput(where, f"not a Suno option here ({flavor} flavour); options: {', '.join(allowed)}")
        canonical, kind = _OPTIONS[key]
        if canonical not in _BOTH | _ONLY[flavor]:
            raise InvalidInput(where, f"not supported by the configured Suno flavour ({flavor})")
        if canonical in fields:
            raise InvalidInput(where, f"give either {fields[canonical].rsplit('.', 1)[-1]} or {key}, not both")
        values[canonical] = _checked(where, kind, value)
        fields[canonical] = where
    if job_input.negative_prompt is not None:
        if flavor != "sunoapi":
            raise InvalidInput("input.negative_prompt", "the Suno gateway format has no negative tags")
        if "negative_tags" in values:
            raise InvalidInput("input.negative_prompt", "give either negative_prompt or options.negativeTags")
        values["negative_tags"] = job_input.negative_prompt
        fields["negative_tags"] = "input.negative_prompt"
    custom = values.pop("custom", None)
    if custom is None:
        custom = "style" in values or "title" in values
    params = SunoParams(model=_model(flavor, model), prompt=job_input.prompt or "", custom=custom,
                        instrumental=values.pop("instrumental", False), values=values, fields=fields)
    if flavor == "sunoapi":
        _check_sunoapi(params)
    else:
        _check_gateway(params)
    return params


def _checked(where: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(where, "must be true or false")
    elif kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(where, "must be a non-empty string")
    elif kind in ("weight", "seconds"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(where, "must be a number")
        if value < 0 or (kind == "weight" and value > 1):
            raise InvalidInput(where, "must be between 0 and 1" if kind == "weight" else "must be >= 0")
    elif kind == "gender":
        if value not in ("m", "f"):
            raise InvalidInput(where, "must be 'm' or 'f'")
    elif kind == "persona" and value not in ("style_persona", "voice_persona"):
        raise InvalidInput(where, "must be 'style_persona' or 'voice_persona'")
    return value


def _model(flavor: str, model: str) -> str:
    if flavor == "sunoapi":
        name = _SUNOAPI_OF.get(model, model)
        if name not in SUNOAPI_MODELS:
            raise InvalidInput("model", f"sunoapi.org models are {', '.join(SUNOAPI_MODELS)} "
                                        f"(or {', '.join(_SUNOAPI_OF)})")
        return name
    mv = _MV_OF.get(model, model)
    if not _MV.match(mv):
        raise InvalidInput("model", "the Suno gateway takes Suno's mv, e.g. chirp-v4, chirp-auk "
                                    f"(or {', '.join(_MV_OF)}); {model!r} has no mv")
    return mv


def _check_sunoapi(p: SunoParams) -> None:
    """sunoapi.org's documented rules for ``POST /api/v1/generate``."""
    if p.custom:
        for name in ("style", "title"):
            if name not in p.values:
                raise InvalidInput(f"input.options.{name}", f"{name} is required in custom mode")
        if not p.prompt and not p.instrumental:
            raise InvalidInput("input.prompt", "the lyrics (prompt) are required in custom mode unless instrumental")
        v4 = p.model == "V4"
        limits = (("prompt", 3000 if v4 else 5000), ("style", 200 if v4 else 1000),
                  ("title", 80 if p.model in ("V4", "V4_5ALL") else 100))
        for name, limit in limits:
            text = p.prompt if name == "prompt" else p.values[name]
            if len(text) > limit:
                where = "input.prompt" if name == "prompt" else p.fields[name]
                raise InvalidInput(where, f"at most {limit} characters with model {p.model} ({len(text)} given)")
    else:
        if not p.prompt:
            raise InvalidInput("input.prompt", "a description (prompt) is required")
        if len(p.prompt) > 500:
            raise InvalidInput("input.prompt", f"at most 500 characters in non-custom mode ({len(p.prompt)} given); "
                                               "set options.customMode with style and title for lyrics")
        for name in p.values:
            raise InvalidInput(p.fields[name], "only used in custom mode (options.customMode true); "
                                               "non-custom mode takes only the prompt and instrumental")
    if "persona_model" in p.values and "persona_id" not in p.values:
        raise InvalidInput(p.fields["persona_model"], "personaModel needs personaId")


def _check_gateway(p: SunoParams) -> None:
    if p.custom:
        if not p.prompt and not p.instrumental:
            raise InvalidInput("input.prompt", "the lyrics (prompt) are required in custom mode unless instrumental")
    else:
        if not p.prompt:
            raise InvalidInput("input.prompt", "a song description (prompt) is required")
        for name in ("style", "title"):
            if name in p.values:
                raise InvalidInput(p.fields[name], "only used in custom mode (options.custom_mode true)")
    if ("continue_at" in p.values) != ("continue_clip_id" in p.values):
        missing = "continue_clip_id" if "continue_at" in p.values else "continue_at"
        raise InvalidInput(f"input.options.{missing}", "continue_at and continue_clip_id go together")


def gateway_body(p: SunoParams) -> dict[str, Any]:
    """new-api's ``SunoSubmitReq`` (unknown fields would be dropped by the gateway)."""
    body: dict[str, Any] = {"mv": p.model, "make_instrumental": p.instrumental}
    if p.custom:
        if p.prompt:
            body["prompt"] = p.prompt
        if "style" in p.values:
            body["tags"] = p.values["style"]
        if "title" in p.values:
            body["title"] = p.values["title"]
    else:
        body["gpt_description_prompt"] = p.prompt
    for name in ("continue_at", "continue_clip_id", "task_id"):
        if name in p.values:
            body[name] = p.values[name]
    return body


def sunoapi_body(p: SunoParams, callback_url: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"customMode": p.custom, "instrumental": p.instrumental, "model": p.model}
    if p.prompt:
        body["prompt"] = p.prompt
    for name, wire in _SUNOAPI_FIELDS.items():
        if name in p.values:
            body[wire] = p.values[name]
    if callback_url:
        body["callBackUrl"] = callback_url
    return body


# -- output ----------------------------------------------------------------------------------

def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and value.startswith(("https://", "http://")) else None


def _clip_outputs(clip_id: Any, audio: str | None, cover: str | None, meta: dict[str, Any]) -> list[ProviderOutput]:
    common = {k: v for k, v in {"clip_id": clip_id, "title": meta.pop("title", None)}.items() if v is not None}
    out: list[ProviderOutput] = []
    if audio:
        details = {k: v for k, v in meta.items() if v not in (None, "")}
        out.append(ProviderOutput(url=audio, content_type="audio/mpeg",
                                  metadata={"role": "audio", **common, **details}))
        if cover:
            out.append(ProviderOutput(url=cover, metadata={"role": "cover", **common}))
    return out


def gateway_outputs(clips: Any, result_url: Any) -> list[ProviderOutput]:
    """Every complete clip of a SUCCESS TaskDto (Suno's own clip objects), audio then cover."""
    outputs: list[ProviderOutput] = []
    for clip in clips if isinstance(clips, list) else []:
        if not isinstance(clip, dict) or clip.get("status") not in (None, "complete"):
            continue
        meta = _obj(clip.get("metadata"))
        outputs += _clip_outputs(clip.get("id"), _url(clip.get("audio_url")),
                                 _url(clip.get("image_large_url")) or _url(clip.get("image_url")),
                                 {"title": clip.get("title"), "duration": meta.get("duration"),
                                  "tags": meta.get("tags"), "model": clip.get("model_name"),
                                  "lyrics": meta.get("prompt"), "created_at": clip.get("created_at")})
    if not outputs and _url(result_url):  # gateways that only fill result_url
        outputs.append(ProviderOutput(url=str(result_url), content_type="audio/mpeg", metadata={"role": "audio"}))
    return outputs


def sunoapi_outputs(clips: Any) -> list[ProviderOutput]:
    """``response.sunoData`` of record-info (camelCase), audio then cover per clip."""
    outputs: list[ProviderOutput] = []
    for clip in clips if isinstance(clips, list) else []:
        if not isinstance(clip, dict):
            continue
        outputs += _clip_outputs(clip.get("id"), _url(clip.get("audioUrl")) or _url(clip.get("sourceAudioUrl")),
                                 _url(clip.get("imageUrl")) or _url(clip.get("sourceImageUrl")),
                                 {"title": clip.get("title"), "duration": clip.get("duration"),
                                  "tags": clip.get("tags"), "model": clip.get("modelName"),
                                  "lyrics": clip.get("prompt"), "created_at": clip.get("createTime")})
    return outputs


def _percent(value: Any) -> int | None:
    if isinstance(value, str) and value.endswith("%"):
        value = value[:-1]
    try:
        return max(0, min(100, int(float(value))))
    except (TypeError, ValueError):
        return None


# -- the adapter -----------------------------------------------------------------------------

class SunoTask(TaskState):
    """The flavour (gateway or sunoapi) the task was submitted through: only that one can read it."""

    flavor: str | None = None


class SunoProvider(Provider):
    name = "suno"
    default_base_url = ""  # no official API: the gateway's or sunoapi's origin must be configured
    default_typical_seconds = {"audio": 60}
    kinds = frozenset({MediaKind.audio})
    supports_cancel = False
    callback_auth = "token"
    retention = ("sunoapi.org: 14 days (some pages say 15); gateway: whatever the upstream CDN keeps "
                 "(undocumented)")
    # Task ids per ``POST /suno/fetch`` in ``fetch_many`` (gateway flavour).
    batch_fetch_size: ClassVar[int] = 50

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        flavor = str(settings.extra.get("flavor") or "gateway")
        if flavor not in FLAVORS:
            raise ValueError(f"ATELIER_SUNO_FLAVOR must be one of {', '.join(FLAVORS)}, not {flavor!r}")
        self.flavor = flavor

    @property
    def supports_callbacks(self) -> bool:  # type: ignore[override]  # per instance: only sunoapi calls back
        return self.flavor == "sunoapi"

    @property
    def fetch_group_size(self) -> int:
        return self.batch_fetch_size if self.flavor == "gateway" else 1

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        suno_params(self.flavor, request.input, request.model)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    def _check_flavor(self, task: TaskRef) -> None:
        submitted = SunoTask.of(task).flavor
        if submitted and submitted != self.flavor:
            raise Rejected(f"this task was submitted through the Suno {submitted} flavour, "
                           f"but ATELIER_SUNO_FLAVOR is now {self.flavor}")

    # -- submit ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        params = suno_params(self.flavor, request.input, request.model)
        if self.flavor == "sunoapi":
            url = f"{self.base_url}/api/v1/generate"
            body = sunoapi_body(params, ctx.callback_url)
        else:
            url = f"{self.base_url}/suno/submit/music"
            body = gateway_body(params)
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True)
        if self.flavor == "sunoapi":
            data = expect_object(_sunoapi_data(response, creates=True), "generate response data")
            task_id = data.get("taskId")
        else:
            task_id = _gateway_data(response, creates=True)
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("Suno accepted the submission without a task id",
                                    detail={"body": response.text[:300]})
        return SubmitResult(task_id=task_id, state=SunoTask(flavor=self.flavor))

    # -- fetch -------------------------------------------------------------------------
    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        self._check_flavor(task)
        task_id = task.task_id
        if self.flavor == "sunoapi":
            url = f"{self.base_url}/api/v1/generate/record-info"
            request = ctx.http.build_request("GET", url, params={"taskId": task_id}, headers=self._headers(ctx))
            response = await send(ctx.http, request)
            return self.parse_record(expect_object(_sunoapi_data(response, creates=False), "record-info data"))
        url = f"{self.base_url}/suno/fetch/{task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        return self.parse_task(expect_object(_gateway_data(response, creates=False), "task"))

    async def fetch_many(self, ctx: CallContext, tasks: list[TaskRef]) -> dict[str, TaskStatus]:
        """Statuses of many tasks, keyed by provider task id (all submitted with ``ctx.api_key``).

        Gateway: ``POST /suno/fetch`` in chunks of ``batch_fetch_size``. sunoapi: one fetch each.
        A task the provider did not return (unknown, another key's, unreadable) is absent: poll
        it on its own to get its error.
        """
        result: dict[str, TaskStatus] = {}
        if self.flavor != "gateway":
            for task in tasks:
                try:
                    result[task.task_id] = await self.fetch(ctx, task)
                except (AuthFailed, InsufficientBalance):
                    raise
                except (TaskNotFound, MalformedResponse, Rejected):
                    continue
            return result
        ids = list(dict.fromkeys(t.task_id for t in tasks if (SunoTask.of(t).flavor or "gateway") == "gateway"))
        url = f"{self.base_url}/suno/fetch"
        size = max(1, self.batch_fetch_size)
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            request = ctx.http.build_request("POST", url, json={"ids": chunk}, headers=self._headers(ctx))
            response = await send(ctx.http, request)
            items = _gateway_data(response, creates=False)
            if items is None:
                items = []
            if not isinstance(items, list):
                raise MalformedResponse("Suno gateway batch fetch did not return a list",
                                        detail={"data": str(items)[:200]})
            wanted = set(chunk)
            for item in items:
                if not isinstance(item, dict) or item.get("task_id") not in wanted:
                    continue
                try:
                    result[item["task_id"]] = self.parse_task(item)
                except MalformedResponse as exc:
                    log.warning("suno: unreadable task in a batch fetch: %s", exc.message)
        return result

    def parse_task(self, dto: dict[str, Any]) -> TaskStatus:
        """A gateway TaskDto. Only the top-level status counts (``data`` may be stale)."""
        raw = dto.get("status")
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise MalformedResponse("Suno gateway task has no readable status", detail={"status": str(raw)[:100]})
        state = _GATEWAY_STATES.get(raw.upper())
        if state is None:
            log.warning("suno gateway: unknown task status %r; still waiting", raw)
        status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(dto.get("progress")))
        if state == "succeeded":
            status.outputs = gateway_outputs(dto.get("data"), dto.get("result_url"))
            status.progress = 100
            if not status.outputs:
                status.state = "failed"
                status.error_code = "provider_no_output"
                status.error_message = "the Suno gateway reported success without any complete clip"
        elif state == "failed":
            reason = str(dto.get("fail_reason") or "")
            result_url = dto.get("result_url")
            if not reason and isinstance(result_url, str) and not _url(result_url):
                reason = result_url  # GetResultURL falls back to fail_reason
            status.error_code = "provider_gateway_timeout" if reason.startswith("任务超时") else "provider_failed"
            status.error_message = (f"Suno task failed: {reason}" if reason
                                    else "the Suno gateway reported the task failed")
            status.error_detail = {"status": raw, "fail_reason": reason or None, "clip_errors": _clip_errors(dto)}
        return status

    def parse_record(self, record: dict[str, Any]) -> TaskStatus:
        """sunoapi.org's record-info ``data``."""
        raw = record.get("status")
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise MalformedResponse("sunoapi record has no readable status", detail={"status": str(raw)[:100]})
        response = _obj(record.get("response"))
        clips = response.get("sunoData")
        state = _SUNOAPI_STATES.get(raw.upper())
        if raw.upper() == "CALLBACK_EXCEPTION":
            # Only their callback to us failed; the generation may be complete.
            complete = isinstance(clips, list) and bool(clips) and all(
                isinstance(c, dict) and (_url(c.get("audioUrl")) or _url(c.get("sourceAudioUrl"))) for c in clips)
            state = "succeeded" if complete else "failed"
        if state is None:
            log.warning("sunoapi: unknown task status %r; still waiting", raw)
        status = TaskStatus(state=state or "unknown", raw_status=raw)
        if state == "succeeded":
            status.outputs = sunoapi_outputs(clips)
            status.progress = 100
            if not status.outputs:
                status.state = "failed"
                status.error_code = "provider_no_output"
                status.error_message = "sunoapi.org reported success without any audio"
        elif state == "failed":
            message = record.get("errorMessage") or response.get("errorMessage")
            status.error_code = "provider_content_filtered" if raw == "SENSITIVE_WORD_ERROR" else "provider_failed"
            status.error_message = f"Suno task {raw}: {message}" if message else f"Suno task {raw}"
            status.error_detail = {"status": raw, "errorCode": record.get("errorCode"), "errorMessage": message}
        return status

    # -- callbacks ---------------------------------------------------------------------
    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """sunoapi.org signs nothing (the per-job token in the URL is checked by the API): only parse."""
        if self.flavor != "sunoapi":
            raise CallbackRejected("the Suno gateway does not send callbacks")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Suno callback body is not JSON") from exc
        data = payload.get("data") if isinstance(payload, dict) else None
        data = _obj(data)
        task_id = data.get("task_id") or data.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise CallbackRejected("Suno callback names no task")
        stage = data.get("callbackType")
        return CallbackHint(task_id=task_id, raw_status=_CALLBACK_STAGES.get(str(stage)))


# -- wire helpers ------------------------------------------------------------------------------

def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _gateway_data(response: httpx.Response, *, creates: bool) -> Any:
    """``data`` of a new-api ``{"code":"success","message","data"}`` envelope; errors mapped."""
    body = _json(response)
    status = response.status_code
    code: Any = None
    message = ""
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):  # auth/system errors, OpenAI style
            code = body["error"].get("code") or body["error"].get("type")
            message = str(body["error"].get("message") or "")
        elif "code" in body:
            code = body.get("code")
            message = str(body.get("message") or "")
    if status < 400 and code == "success":
        return body.get("data") if isinstance(body, dict) else None
    detail = {"http_status": status, "code": code, "message": message[:500]} if code is not None \
        else {"http_status": status, "body": response.text[:300]}
    what = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status == 429:
        raise RateLimited(f"Suno gateway is saturated or rate limited ({what})",
                          retry_after=retry_after_seconds(response.headers), detail=detail)
    if gateway_quota_exhausted(code, message):
        raise InsufficientBalance(f"Suno gateway: insufficient quota ({what})", detail=detail, status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"Suno gateway refused the key ({what})", detail=detail, status_code=status)
    if not creates and code == "task_not_exist":
        raise TaskNotFound(f"Suno gateway does not know this task ({what})", detail=detail, status_code=status)
    if code is None:
        if status < 400:
            parse_json(response)  # raises MalformedResponse when it is not JSON
            raise MalformedResponse("Suno gateway answered without its {code,message,data} envelope",
                                    detail=detail, status_code=status)
        raise_for_common_status(response, creates=creates, detail=detail)
    if status < 400:
        if creates:
            raise Rejected(f"Suno gateway refused the submission ({what})", detail=detail, status_code=status)
        raise MalformedResponse(f"Suno gateway answered an error envelope ({what})", detail=detail)
    if status >= 500:
        # The gateway's own error: it kept no task (rows are inserted only after the upstream
        # accepted) and refunded the submission, so nothing exists to follow or to pay for.
        raise Unavailable(f"Suno gateway could not reach its upstream ({what})", detail=detail, status_code=status)
    if status in (404, 410) and not creates:
        raise TaskNotFound(f"Suno gateway does not know this task ({what})", detail=detail, status_code=status)
    raise Rejected(f"Suno gateway refused the request ({what})", detail=detail, status_code=status)


def _sunoapi_data(response: httpx.Response, *, creates: bool) -> Any:
    """``data`` of sunoapi.org's ``{"code","msg","data"}`` envelope; the body ``code`` decides."""
    body = _json(response)
    if isinstance(body, dict):
        code = body.get("code")
        if isinstance(code, str) and code.isdigit():
            code = int(code)
        if isinstance(code, int) and not isinstance(code, bool):
            if code == 200 and response.status_code < 400:
                return body.get("data")
            if code != 200:
                raise _sunoapi_error(code, str(body.get("msg") or ""), response, creates=creates)
    detail = {"http_status": response.status_code, "body": response.text[:300]}
    raise_for_common_status(response, creates=creates, detail=detail)
    parse_json(response)
    raise MalformedResponse("sunoapi answered without its {code,msg,data} envelope", detail=detail)


def _sunoapi_error(code: int, msg: str, response: httpx.Response, *, creates: bool) -> ProviderError:
    detail = {"code": code, "msg": msg[:500], "http_status": response.status_code}
    what = f"sunoapi code {code}" + (f": {msg}" if msg else "")
    if code == 401:
        return AuthFailed(f"sunoapi refused the key ({what})", detail=detail, status_code=401)
    if code == 429:
        return InsufficientBalance(f"insufficient Suno credits ({what})", detail=detail, status_code=429)
    if code in (405, 430):
        return RateLimited(f"sunoapi rate limit ({what})", retry_after=retry_after_seconds(response.headers),
                           detail=detail, status_code=response.status_code)
    if code == 455:
        return Unavailable(f"sunoapi is under maintenance ({what})", detail=detail, status_code=455)
    if not creates and code in (400, 404) and re.search(r"not (exist|found)", msg, re.IGNORECASE):
        return TaskNotFound(f"sunoapi does not know this task ({what})", detail=detail, status_code=code)
    if code >= 500:
        if creates:
            return OutcomeUnknown(f"sunoapi answered a server error to the submission ({what})",
                                  detail=detail, status_code=code)
        return Unavailable(f"sunoapi server error ({what})", detail=detail, status_code=code)
    return Rejected(f"sunoapi refused the request ({what})", detail=detail, status_code=code)


def _clip_errors(dto: dict[str, Any]) -> list[str]:
    errors = []
    clips = dto.get("data")
    for clip in clips if isinstance(clips, list) else []:
        meta = _obj(clip.get("metadata")) if isinstance(clip, dict) else {}
        if meta.get("error_message"):
            errors.append(str(meta["error_message"]))
    return errors
