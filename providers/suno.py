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
``tags``, ``model``, ``lyrics``, ``created_at``. While polling, the adapter keeps in its task
state the clip id of each output (``output_clips``, in output order) and each clip's seconds
(``clip_seconds``): a follow-up's ``source.output`` picks the clip (an audio or its cover name the
same clip; the output's ``clip_id`` metadata is the fallback for older records).

Input: ``prompt`` is the song description (non-custom mode) or the lyrics (custom mode);
custom mode is ``options.customMode`` (alias ``custom_mode``), implied by a ``style``/``tags``
or ``title`` option. Options (either flavour's name): ``style``/``tags``, ``title``,
``instrumental``/``make_instrumental``; sunoapi only: ``negativeTags`` (also from
``negative_prompt``), ``vocalGender``, ``styleWeight``, ``weirdnessConstraint``, ``audioWeight``,
``personaId``/``persona_id``, ``personaModel``/``persona_model`` (custom mode only, as the docs say;
the id comes from a ``persona`` job); gateway only: ``continue_at``, ``continue_clip_id``,
``task_id`` (raw continuation fields; the ``extend`` operation sets them from a source). ``model``
is the gateway's ``mv`` (``chirp-v4``...) or sunoapi's ``model`` (``V4``, ``V4_5``...); the known
pairs translate both ways. ``image_url``, ``duration_seconds``, ``aspect_ratio``, ``resolution``,
``seed`` and ``num_outputs`` are refused, and so is a ``source`` on ``generate``.

Follow-ups (``Provider.operations`` depends on the flavour, so it is per instance). ``source`` is a
succeeded Suno song job of the same flavour (same key: the worker submits with the source's key);
its ``source.output`` picks the clip. Everything is checked at acceptance (422 naming the field).

==========  ============================================  ==============================================
operation   gateway (new-api + Suno-API)                  sunoapi (sunoapi.org and clones)
==========  ============================================  ==============================================
extend      POST /suno/submit/music, custom mode:         POST /api/v1/generate/extend {defaultParamFlag,
            {mv, make_instrumental, prompt, tags, title,  audioId, continueAt, model, prompt, style,
            continue_at, continue_clip_id, task_id}       title, negativeTags, ..., personaId,
            -> a MUSIC task (clips)                       callBackUrl} -> polled at generate/record-info
lyrics      POST /suno/submit/lyrics {prompt} -> a        POST /api/v1/lyrics {prompt, callBackUrl};
            LYRICS task, data ``{id,status,title,text}``  GET /api/v1/lyrics/record-info
                                                          (``response.lyricsData[{text,title,status}]``)
wav         not offered (new-api serves only MUSIC and    POST /api/v1/wav/generate {taskId, audioId,
            LYRICS: ``invalid_action``)                   callBackUrl}; GET /api/v1/wav/record-info
                                                          (``successFlag``, ``response.audioWavUrl``)
persona     not offered                                   POST /api/v1/generate/generate-persona
                                                          {taskId, audioId, name, description, [style,
                                                          vocalStart, vocalEnd]} -> ``data.personaId``
                                                          at once (no task to poll)
concat      not offered (``invalid_action``)              not offered (no documented endpoint)
==========  ============================================  ==============================================

* ``extend``: ``options.continue_at`` (seconds, alias ``continueAt``) is required, > 0 and before
  the end of the source clip (its ``duration``). Gateway: always custom mode, because Suno-API
  forwards ``continue_at``/``continue_clip_id`` only when there is no ``gpt_description_prompt``,
  and refuses a continuation without ``task_id``; the lyrics of the continuation are the
  ``prompt`` (required unless instrumental); ``continue_clip_id``/``task_id`` options are refused
  (the source names them). sunoapi: ``defaultParamFlag`` is whether custom parameters are given
  (``customMode``, or ``style``/``title``): then ``prompt``, ``style`` and ``title`` are required
  (generate's custom limits per model); without them only ``continue_at`` is taken and the
  source's own parameters are used; no ``instrumental`` field; the model must be the source's
  ("Model version must be consistent with the source music").
* ``lyrics``: no source; only ``input.prompt`` (required; sunoapi: at most 200 words,
  ``extra["lyrics_prompt_max_words"]``, 0 for none); ``model`` is checked but not sent. Each
  complete variation is one ``text/plain`` output (an inline ``data:`` URL; its ``title`` in the
  metadata). sunoapi lyrics statuses: ``PENDING``; ``SUCCESS``; ``CREATE_TASK_FAILED``,
  ``GENERATE_LYRICS_FAILED``, ``SENSITIVE_WORD_ERROR`` failed; ``CALLBACK_EXCEPTION`` succeeded
  when there are lyrics.
* ``wav``: no input; one ``audio/wav`` output (``clip_id`` from ``musicId``). Statuses
  ``PENDING``; ``SUCCESS``; ``CREATE_TASK_FAILED``, ``GENERATE_WAV_FAILED`` failed;
  ``CALLBACK_EXCEPTION`` succeeded when the URL is there. 409 "WAV record already exists" is a
  refusal.
* ``persona``: ``options.name`` and ``options.description`` required; ``style``, ``vocalStart``,
  ``vocalEnd`` optional (window 10-30 s inside the clip). The create call answers with the
  persona, so the job is done at once: one ``text/plain`` output holding the ``personaId`` (metadata
  ``persona_id``, ``name``, ``description``, ``clip_id``), for ``options.persona_id`` of a later
  custom-mode ``generate`` or ``extend``. Its task id is the job id (there is no task).

Sources: the reference (shared/providers replicate-fal-suno-gateways.md §3(a), §3(b));
Suno-API/Suno-API ``api.go`` (``submitGenSong`` continuation fields, ``submitGenLyrics``) and
``entity/po/task_data.go`` (``SunoLyrics``); new-api's ``actionValidate`` (reference §3(a): MUSIC and
LYRICS only, anything else ``invalid_action``); docs.sunoapi.org/suno-api/extend-music,
docs.api.box/suno-api/extend-music, docs.apikley.ru/suno-api/suno-api_extend-music,
docs.sunoapi.org/suno-api/get-music-generation-details and
docs.aibackend.io/suno/get-music-generation-details (operation types generate/extend/...);
docs.sunoapi.org/suno-api/generate-lyrics (and /cn/), .../get-lyrics-generation-details,
.../generate-lyrics-callbacks; docs.sunoapi.org/suno-api/convert-to-wav-format,
.../get-wav-conversion-details (and /cn/), docs.kie.ai/cn/suno-api/get-wav-details,
docs.api.box/suno-api/convert-to-wav-format (409); docs.sunoapi.org/suno-api/generate-persona,
docs.apikley.ru/suno-api/suno-api_generate-persona, docs.kie.ai/cn/suno-api/generate-persona
(vocalStart/vocalEnd/style).

UNCONFIRMED: whether sunoapi honours ``continueAt`` with ``defaultParamFlag`` false (sent anyway);
whether new-api maps its public ``task_...`` id in ``task_id`` to the upstream id (Suno-API only
checks it is not empty); the lyrics prompt limit's unit (the zh page says 200 字, the English pages
"~200 words": configurable); the WAV record's field names (new pages ``successFlag`` +
``response.audioWavUrl``, an older page ``status`` + ``response.audio_wav_url``: both read); the
lyrics record's list (``response.lyricsData`` on the record page, ``data`` in the callback and in
some clones: both read);
generate-persona's answer (``data.personaId``/``name``/``description`` per client code, not shown on
the docs pages) and its ``vocalStart``/``vocalEnd``/``style`` fields (kie.ai only); whether
``callBackUrl``, "required" on the follow-up endpoints, is enforced (sent whenever Atelier has one).

Traps: neither flavour can list tasks, so an ambiguous submission cannot be reconciled (the job
fails with ``provider_outcome_unknown``). A gateway task error means the gateway kept no task and
refunded it (it inserts the row only after the upstream accepted), so a 5xx envelope is safe to
retry; a 5xx without the envelope (a proxy in front) is not.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from pydantic import ValidationError

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Operation,
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
    "personaId": ("persona_id", "str"), "persona_id": ("persona_id", "str"),
    "personaModel": ("persona_model", "persona"), "persona_model": ("persona_model", "persona"),
    "continue_at": ("continue_at", "seconds"), "continueAt": ("continue_at", "seconds"),
    "continue_clip_id": ("continue_clip_id", "str"),
    "task_id": ("task_id", "str"),
}
_BOTH = frozenset({"custom", "instrumental", "style", "title"})
_SUNOAPI_EXTRAS = frozenset({"negative_tags", "vocal_gender", "style_weight", "weirdness", "audio_weight",
                             "persona_id", "persona_model"})
# The canonical options each flavour takes per operation.
_ALLOWED: dict[tuple[str, str], frozenset[str]] = {
    ("gateway", "generate"): _BOTH | {"continue_at", "continue_clip_id", "task_id"},
    ("sunoapi", "generate"): _BOTH | _SUNOAPI_EXTRAS,
    # Suno-API forwards a continuation only in custom mode; the source names the clip and the task.
    ("gateway", "extend"): _BOTH | {"continue_at"},
    # ``POST /api/v1/generate/extend`` has no ``instrumental`` field.
    ("sunoapi", "extend"): frozenset({"custom", "style", "title", "continue_at"}) | _SUNOAPI_EXTRAS,
}
# Set elsewhere in the request, not in options.
_ELSEWHERE = {"prompt": "input.prompt", "gpt_description_prompt": "input.prompt", "mv": "model",
              "model": "model", "callBackUrl": "Atelier (the per-job callback URL)",
              "negative_prompt": "input.negative_prompt", "audioId": "source.job_id and source.output",
              "defaultParamFlag": "options.customMode"}
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
# persona: option name -> (body field, type).
_PERSONA_OPTIONS: dict[str, tuple[str, str]] = {
    "name": ("name", "str"), "description": ("description", "str"), "style": ("style", "str"),
    "vocalStart": ("vocalStart", "seconds"), "vocal_start": ("vocalStart", "seconds"),
    "vocalEnd": ("vocalEnd", "seconds"), "vocal_end": ("vocalEnd", "seconds"),
}
# kie.ai's generate-persona page: vocalEnd - vocalStart within 10-30 s, defaults 0 and 30 (UNCONFIRMED
# for sunoapi.org, whose page lists only taskId, audioId, name and description).
PERSONA_WINDOW = (10.0, 30.0)
LYRICS_PROMPT_WORDS = 200  # sunoapi.org: "最大字数限制为200字" (200 words or characters: UNCONFIRMED)


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


def suno_params(flavor: str, job_input: MediaInput, model: str, operation: str = "generate") -> SunoParams:
    """Validate ``job_input``/``model`` of a ``generate`` or ``extend`` for ``flavor``; raises
    ``InvalidInput`` naming the field."""
    _refuse_common(job_input, set(), operation)
    allowed = _ALLOWED[flavor, operation]
    flavour_wide = _ALLOWED[flavor, "generate"] | _ALLOWED[flavor, "extend"]
    values: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for key, value in job_input.options.items():
        where = f"input.options.{key}"
        if key in _ELSEWHERE:
            raise InvalidInput(where, f"set this with {_ELSEWHERE[key]}, not in options")
        if key not in _OPTIONS:
            names = sorted(k for k, (c, _) in _OPTIONS.items() if c in allowed)
            what = "option here" if operation == "generate" else f"{operation} option"
            raise InvalidInput(where, f"not a Suno {what} ({flavor} flavour); options: {', '.join(names)}")
        canonical, kind = _OPTIONS[key]
        if canonical not in allowed:
            if operation == "extend" and canonical in ("continue_clip_id", "task_id"):
                raise InvalidInput(where, "extend continues the source's clip: source.job_id and source.output "
                                          "name it")
            if canonical in flavour_wide:
                raise InvalidInput(where, f"not used by {operation} in the Suno {flavor} flavour")
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
    if operation == "extend" and flavor == "gateway":
        if custom is False:
            raise InvalidInput(fields["custom"], "the gateway continues a clip only in custom mode (lyrics in "
                                                 "input.prompt, options.tags and title)")
        custom = True
    if custom is None:
        custom = "style" in values or "title" in values
    params = SunoParams(model=_model(flavor, model), prompt=job_input.prompt or "", custom=custom,
                        instrumental=values.pop("instrumental", False), values=values, fields=fields)
    if operation == "extend":
        if "continue_at" not in params.values:
            raise InvalidInput("input.options.continue_at", "extend needs continue_at: the second of the source "
                                                            "clip to continue from")
        if flavor == "sunoapi":
            _check_sunoapi_extend(params)
        elif not params.prompt and not params.instrumental:
            raise InvalidInput("input.prompt", "the lyrics of the continuation (prompt) are required unless "
                                               "options.instrumental")
    elif flavor == "sunoapi":
        _check_sunoapi(params)
    else:
        _check_gateway(params)
    return params


def _refuse_common(job_input: MediaInput, allowed: set[str], operation: str) -> None:
    """The common fields Suno never takes (and, for the follow-ups, those the operation does not)."""
    for name in _UNSUPPORTED:
        if getattr(job_input, name) is not None:
            raise InvalidInput(f"input.{name}", f"not supported by Suno: {_UNSUPPORTED[name]}")
    if operation in ("generate", "extend"):
        return
    for name in ("prompt", "negative_prompt"):
        if getattr(job_input, name) is not None and name not in allowed:
            hint = " (give options.name and options.description)" if operation == "persona" else ""
            raise InvalidInput(f"input.{name}", f"{operation} takes no {name.replace('_', ' ')}{hint}")


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


def _check_custom_limits(p: SunoParams) -> None:
    """sunoapi.org's per-model limits of custom mode (generate and extend)."""
    v4 = p.model == "V4"
    limits = (("prompt", 3000 if v4 else 5000), ("style", 200 if v4 else 1000),
              ("title", 80 if p.model in ("V4", "V4_5ALL") else 100))
    for name, limit in limits:
        text = p.prompt if name == "prompt" else p.values[name]
        if len(text) > limit:
            where = "input.prompt" if name == "prompt" else p.fields[name]
            raise InvalidInput(where, f"at most {limit} characters with model {p.model} ({len(text)} given)")


def _check_sunoapi(p: SunoParams) -> None:
    """sunoapi.org's documented rules for ``POST /api/v1/generate``."""
    if p.custom:
        for name in ("style", "title"):
            if name not in p.values:
                raise InvalidInput(f"input.options.{name}", f"{name} is required in custom mode")
        if not p.prompt and not p.instrumental:
            raise InvalidInput("input.prompt", "the lyrics (prompt) are required in custom mode unless instrumental")
        _check_custom_limits(p)
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


def _check_sunoapi_extend(p: SunoParams) -> None:
    """``POST /api/v1/generate/extend``: custom parameters (``defaultParamFlag`` true) need prompt,
    style, title and continueAt; without them the source's own parameters are used."""
    if p.custom:
        for name in ("style", "title"):
            if name not in p.values:
                raise InvalidInput(f"input.options.{name}", f"{name} is required when extending with custom "
                                                            "parameters")
        if not p.prompt:
            raise InvalidInput("input.prompt", "the lyrics of the continuation (prompt) are required when "
                                               "extending with custom parameters")
        _check_custom_limits(p)
    else:
        if p.prompt:
            raise InvalidInput("input.prompt", "extend without custom parameters continues with the source's own "
                                               "lyrics and style; set options.style and title for new lyrics")
        for name in p.values:
            if name != "continue_at":
                raise InvalidInput(p.fields[name], "only used with custom parameters (options.customMode true, "
                                                   "with style and title); otherwise the source's are used")
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


def sunoapi_extend_body(p: SunoParams, clip_id: str, callback_url: str | None) -> dict[str, Any]:
    """``POST /api/v1/generate/extend``: ``defaultParamFlag`` is whether custom parameters are given."""
    body: dict[str, Any] = {"defaultParamFlag": p.custom, "audioId": clip_id,
                            "continueAt": p.values["continue_at"], "model": p.model}
    if p.prompt:
        body["prompt"] = p.prompt
    for name, wire in _SUNOAPI_FIELDS.items():
        if name in p.values:
            body[wire] = p.values[name]
    if callback_url:
        body["callBackUrl"] = callback_url
    return body


def lyrics_prompt(flavor: str, job_input: MediaInput, max_words: int = LYRICS_PROMPT_WORDS) -> str:
    """The prompt of a ``lyrics`` request (nothing else is taken); raises ``InvalidInput``."""
    _refuse_common(job_input, {"prompt"}, "lyrics")
    for key in job_input.options:
        raise InvalidInput(f"input.options.{key}", "lyrics takes only input.prompt (no options)")
    prompt = (job_input.prompt or "").strip()
    if not prompt:
        raise InvalidInput("input.prompt", "lyrics needs a prompt: what the song is about")
    if flavor == "sunoapi" and max_words and len(prompt.split()) > max_words:
        raise InvalidInput("input.prompt", f"at most {max_words} words for sunoapi.org's lyrics "
                                           f"({len(prompt.split())} given)")
    return job_input.prompt or ""


def persona_options(job_input: MediaInput, clip_seconds: float | None) -> dict[str, Any]:
    """The body fields of ``generate-persona`` from a ``persona`` request's options."""
    _refuse_common(job_input, set(), "persona")
    values: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for key, value in job_input.options.items():
        where = f"input.options.{key}"
        if key not in _PERSONA_OPTIONS:
            raise InvalidInput(where, "persona takes options name, description, style, vocalStart, vocalEnd")
        wire, kind = _PERSONA_OPTIONS[key]
        if wire in values:
            raise InvalidInput(where, f"give either {fields[wire].rsplit('.', 1)[-1]} or {key}, not both")
        values[wire] = _checked(where, kind, value)
        fields[wire] = where
    for wire in ("name", "description"):
        if wire not in values:
            raise InvalidInput(f"input.options.{wire}", f"persona needs a {wire}")
    if "vocalStart" in values or "vocalEnd" in values:
        start, end = values.get("vocalStart", 0.0), values.get("vocalEnd", PERSONA_WINDOW[1])
        where = fields.get("vocalEnd") or fields["vocalStart"]
        low, high = PERSONA_WINDOW
        if not low <= end - start <= high:
            raise InvalidInput(where, f"the vocal window (vocalStart to vocalEnd, defaults 0 and 30) must last "
                                      f"{low:g} to {high:g} seconds ({end - start:g} given)")
        if clip_seconds is not None and end > clip_seconds:
            raise InvalidInput(where, f"the vocal window must lie within the source clip, which lasts "
                                      f"{clip_seconds:g} s")
    return values


@dataclass(frozen=True)
class SourceClip:
    """The clip of a Suno source job a follow-up acts on."""

    task_id: str
    clip_id: str
    seconds: float | None
    model: str


def source_clip(flavor: str, request: GenerationRequest) -> SourceClip:
    """The clip ``source.output`` names (from the clip ids learnt while polling the source, else the
    output's metadata); raises ``InvalidInput`` naming the field."""
    op, source = request.operation, request.source
    if source is None:
        raise InvalidInput("source", f"{op} acts on a Suno song: give source.job_id")
    try:
        state = SunoTask.model_validate(dict(source.state))
    except ValidationError:
        state = SunoTask()
    if state.flavor and state.flavor != flavor:
        raise InvalidInput("source", f"the source ran through the Suno {state.flavor} flavour; this server "
                                     f"talks to the {flavor} flavour, which cannot see that task")
    if (state.action or "music") != "music":
        raise InvalidInput("source", f"{op} acts on a song; the source job is a Suno {state.action} job")
    if not source.task_id:
        raise InvalidInput("source", "the source job has no Suno task")
    clips = state.output_clips or []
    clip = clips[source.output_index] if source.output_index < len(clips) else None
    clip = clip or source.output_metadata.get("clip_id")
    if not isinstance(clip, str) or not clip:
        raise InvalidInput("source.output", f"output {source.output_index} of the source job names no Suno clip")
    seconds = (state.clip_seconds or {}).get(clip)
    if seconds is None:
        announced = source.output_metadata.get("duration")
        if isinstance(announced, int | float) and not isinstance(announced, bool) and announced > 0:
            seconds = float(announced)
    return SourceClip(task_id=source.task_id, clip_id=clip, seconds=seconds, model=source.model)


@dataclass
class SunoPlan:
    """What a request sends: the path, the body, the kind of task it creates and the source clip."""

    path: str
    body: dict[str, Any]
    action: str  # music (generate, extend) | lyrics | wav | persona
    clip_id: str | None = None


# -- output ----------------------------------------------------------------------------------

def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and value.startswith(("https://", "http://")) else None


def _text_url(text: str) -> str:
    """Text as an inline output (stored as ``text/plain``)."""
    return "data:text/plain;charset=utf-8;base64," + base64.b64encode(text.encode()).decode()


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


def clips_state(outputs: list[ProviderOutput]) -> SunoTask | None:
    """The clip id of each output (in output order) and each clip's length, kept for follow-ups."""
    ids = [str(o.metadata.get("clip_id") or "") for o in outputs]
    if not any(ids):
        return None
    seconds: dict[str, float] = {}
    for output, clip in zip(outputs, ids, strict=True):
        duration = output.metadata.get("duration")
        if clip and isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
            seconds[clip] = float(duration)
    return SunoTask(output_clips=ids, clip_seconds=seconds or None)


def lyrics_outputs(items: Any) -> list[ProviderOutput]:
    """Each complete lyrics variation as a ``text/plain`` output (its title in the metadata). The
    gateway's ``data`` is one ``{id,status,title,text}`` object (Suno-API's ``SunoLyrics``);
    sunoapi's ``lyricsData`` a list of ``{text,title,status,errorMessage}``."""
    outputs: list[ProviderOutput] = []
    for item in items if isinstance(items, list) else [items]:
        if not isinstance(item, dict) or item.get("status") not in (None, "", "complete"):
            continue
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            continue
        meta: dict[str, Any] = {"role": "lyrics"}
        if isinstance(item.get("title"), str) and item["title"]:
            meta["title"] = item["title"]
        if isinstance(item.get("id"), str) and item["id"]:
            meta["lyrics_id"] = item["id"]
        outputs.append(ProviderOutput(url=_text_url(text), content_type="text/plain", metadata=meta))
    return outputs


def wav_outputs(record: dict[str, Any], clip_id: str | None) -> list[ProviderOutput]:
    """The WAV of ``wav/record-info`` (``response.audioWavUrl``; older pages ``audio_wav_url``)."""
    response = _obj_or_json(record.get("response"))
    url = _url(response.get("audioWavUrl")) or _url(response.get("audio_wav_url"))
    if not url:
        return []
    clip = record.get("musicId") or clip_id
    meta = {"role": "wav", **({"clip_id": clip} if clip else {})}
    return [ProviderOutput(url=url, content_type="audio/wav", metadata=meta)]


def persona_status(state: SunoTask) -> TaskStatus:
    """A persona is answered by the create call: its record is the task's result."""
    record = state.persona or {}
    persona_id = record.get("personaId")
    if not isinstance(persona_id, str) or not persona_id:
        raise MalformedResponse("this Suno persona job kept no personaId")
    meta = {"role": "persona", "persona_id": persona_id,
            **{k: record[k] for k in ("name", "description") if isinstance(record.get(k), str)},
            **({"clip_id": state.clip_id} if state.clip_id else {})}
    return TaskStatus(state="succeeded", raw_status="SUCCESS", progress=100,
                      outputs=[ProviderOutput(url=_text_url(persona_id), content_type="text/plain", metadata=meta)])


def _percent(value: Any) -> int | None:
    if isinstance(value, str) and value.endswith("%"):
        value = value[:-1]
    try:
        return max(0, min(100, int(float(value))))
    except (TypeError, ValueError):
        return None


# -- the adapter -----------------------------------------------------------------------------

class SunoTask(TaskState):
    """The adapter's record of a task: the flavour it was submitted through (only that one can read
    it), what it is, and what follow-ups need of it."""

    flavor: str | None = None
    # music (generate, extend) | lyrics | wav | persona; none: music (records older than follow-ups).
    action: str | None = None
    # The source clip of an extend, wav or persona.
    clip_id: str | None = None
    # Learnt while polling a song: the clip id of each output in output order, each clip's seconds.
    output_clips: list[str] | None = None
    clip_seconds: dict[str, float] | None = None
    # persona: what generate-persona answered (personaId, name, description).
    persona: dict[str, Any] | None = None


_OPERATIONS: dict[str, tuple[Operation, ...]] = {
    "gateway": (
        Operation("extend", source="task", source_kinds=frozenset({MediaKind.audio}),
                  description="continue a clip of a Suno song from options.continue_at "
                              "(POST /suno/submit/music with continue_clip_id, continue_at, task_id)"),
        Operation("lyrics", source="none",
                  description="song lyrics from a prompt, stored as text/plain (POST /suno/submit/lyrics)"),
    ),
    "sunoapi": (
        Operation("extend", source="task", source_kinds=frozenset({MediaKind.audio}),
                  description="continue a clip of a Suno song from options.continue_at "
                              "(POST /api/v1/generate/extend)"),
        Operation("lyrics", source="none",
                  description="song lyrics from a prompt, stored as text/plain (POST /api/v1/lyrics)"),
        Operation("wav", source="task", source_kinds=frozenset({MediaKind.audio}),
                  description="the WAV file of a clip of a Suno song (POST /api/v1/wav/generate)"),
        Operation("persona", source="task", source_kinds=frozenset({MediaKind.audio}),
                  description="a persona from a clip of a Suno song; its personaId (text/plain output) is "
                              "for options.persona_id (POST /api/v1/generate/generate-persona)"),
    ),
}
# Where each kind of task is read (sunoapi flavour; the gateway reads every task at /suno/fetch).
_SUNOAPI_RECORDS = {"music": "/api/v1/generate/record-info", "lyrics": "/api/v1/lyrics/record-info",
                    "wav": "/api/v1/wav/record-info"}
_SUNOAPI_LYRICS_STATES: dict[str, ProviderState] = {
    "": "queued", "PENDING": "queued", "SUCCESS": "succeeded", "CREATE_TASK_FAILED": "failed",
    "GENERATE_LYRICS_FAILED": "failed", "SENSITIVE_WORD_ERROR": "failed",
}
_SUNOAPI_WAV_STATES: dict[str, ProviderState] = {
    "": "queued", "PENDING": "queued", "SUCCESS": "succeeded", "CREATE_TASK_FAILED": "failed",
    "GENERATE_WAV_FAILED": "failed",
}


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
        # sunoapi's lyrics prompt limit, in words (0: none); see LYRICS_PROMPT_WORDS.
        self.lyrics_prompt_words = int(settings.extra.get("lyrics_prompt_max_words", LYRICS_PROMPT_WORDS))

    @property
    def supports_callbacks(self) -> bool:  # type: ignore[override]  # per instance: only sunoapi calls back
        return self.flavor == "sunoapi"

    @property
    def operations(self) -> tuple[Operation, ...]:  # type: ignore[override]  # per instance: by flavour
        return _OPERATIONS[self.flavor]

    @property
    def fetch_group_size(self) -> int:
        return self.batch_fetch_size if self.flavor == "gateway" else 1

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.plan(request, None)

    def plan(self, request: GenerationRequest, callback_url: str | None) -> SunoPlan:
        """What ``request`` sends in this flavour; raises ``InvalidInput`` naming the field."""
        sunoapi = self.flavor == "sunoapi"
        op = request.operation
        if op == "generate":
            if request.source is not None:
                raise InvalidInput("source", "Suno's generate takes no source; to continue a clip of a Suno "
                                             "song use operation 'extend'")
            params = suno_params(self.flavor, request.input, request.model)
            if sunoapi:
                return SunoPlan("/api/v1/generate", sunoapi_body(params, callback_url), "music")
            return SunoPlan("/suno/submit/music", gateway_body(params), "music")
        if op == "lyrics":
            _model(self.flavor, request.model)  # not sent: Suno writes lyrics with one model
            body: dict[str, Any] = {"prompt": lyrics_prompt(self.flavor, request.input, self.lyrics_prompt_words)}
            if sunoapi and callback_url:
                body["callBackUrl"] = callback_url
            return SunoPlan("/api/v1/lyrics" if sunoapi else "/suno/submit/lyrics", body, "lyrics")
        clip = source_clip(self.flavor, request)
        if op == "extend":
            params = suno_params(self.flavor, request.input, request.model, operation="extend")
            where, at = params.fields["continue_at"], params.values["continue_at"]
            if at <= 0:
                raise InvalidInput(where, "must be after the start of the source clip (> 0 seconds)")
            if clip.seconds is not None and at >= clip.seconds:
                raise InvalidInput(where, f"must be within the source clip, which lasts {clip.seconds:g} s "
                                          f"({at:g} given)")
            if sunoapi:
                if _SUNOAPI_OF.get(clip.model, clip.model) != params.model:
                    raise InvalidInput("model", f"sunoapi.org extends with the source's model "
                                                f"({_SUNOAPI_OF.get(clip.model, clip.model)}), not {params.model}")
                return SunoPlan("/api/v1/generate/extend", sunoapi_extend_body(params, clip.clip_id, callback_url),
                                "music", clip.clip_id)
            params.values |= {"continue_clip_id": clip.clip_id, "task_id": clip.task_id}
            return SunoPlan("/suno/submit/music", gateway_body(params), "music", clip.clip_id)
        _model(self.flavor, request.model)  # not sent: the source clip decides
        ids = {"taskId": clip.task_id, "audioId": clip.clip_id}
        if op == "wav":
            _refuse_common(request.input, set(), "wav")
            for key in request.input.options:
                raise InvalidInput(f"input.options.{key}", "wav takes no options: the source clip is converted")
            return SunoPlan("/api/v1/wav/generate", ids | ({"callBackUrl": callback_url} if callback_url else {}),
                            "wav", clip.clip_id)
        if op == "persona":
            return SunoPlan("/api/v1/generate/generate-persona", ids | persona_options(request.input, clip.seconds),
                            "persona", clip.clip_id)
        raise InvalidInput("operation", f"the Suno {self.flavor} flavour has no {op!r}")

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    def _check_flavor(self, task: TaskRef) -> None:
        submitted = SunoTask.of(task).flavor
        if submitted and submitted != self.flavor:
            raise Rejected(f"this task was submitted through the Suno {submitted} flavour, "
                           f"but ATELIER_SUNO_FLAVOR is now {self.flavor}")

    # -- submit ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        self.validate_operation(request)
        plan = self.plan(request, ctx.callback_url)
        response = await send(ctx.http, ctx.http.build_request("POST", self.base_url + plan.path, json=plan.body,
                                                               headers=self._headers(ctx)), creates=True)
        state = SunoTask(flavor=self.flavor, action=plan.action, clip_id=plan.clip_id)
        if self.flavor == "sunoapi":
            data = expect_object(_sunoapi_data(response, creates=True), f"{plan.path} response data")
            if plan.action == "persona":
                return self._persona_created(request, data, plan, state, response)
            task_id = data.get("taskId")
        else:
            task_id = _gateway_data(response, creates=True)
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("Suno accepted the submission without a task id",
                                    detail={"body": response.text[:300]})
        return SubmitResult(task_id=task_id, state=state)

    def _persona_created(self, request: GenerationRequest, data: dict[str, Any], plan: SunoPlan, state: SunoTask,
                         response: httpx.Response) -> SubmitResult:
        """generate-persona answers with the persona at once: the job is done (its id is the task id)."""
        persona_id = data.get("personaId")
        if not isinstance(persona_id, str) or not persona_id:
            raise MalformedResponse("sunoapi answered generate-persona without a personaId",
                                    detail={"body": response.text[:300]})
        record = {"personaId": persona_id,
                  "name": data.get("name") if isinstance(data.get("name"), str) else plan.body["name"],
                  "description": (data.get("description") if isinstance(data.get("description"), str)
                                  else plan.body["description"])}
        state = state.model_copy(update={"persona": record})
        return SubmitResult(task_id=request.reference or persona_id, state=state, done=persona_status(state))

    # -- fetch -------------------------------------------------------------------------
    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        self._check_flavor(task)
        state = SunoTask.of(task)
        action = state.action or "music"
        if action == "persona":
            return persona_status(state)
        task_id = task.task_id
        if self.flavor == "sunoapi":
            path = _SUNOAPI_RECORDS.get(action)
            if path is None:
                raise MalformedResponse(f"this Suno task is of an unknown kind ({action})")
            request = ctx.http.build_request("GET", self.base_url + path, params={"taskId": task_id},
                                             headers=self._headers(ctx))
            response = await send(ctx.http, request)
            record = expect_object(_sunoapi_data(response, creates=False), "record-info data")
            if action == "lyrics":
                return self.parse_lyrics_record(record)
            if action == "wav":
                return self.parse_wav_record(record, state.clip_id)
            return self.parse_record(record)
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
        """A gateway TaskDto (a song, or lyrics when ``action`` is ``LYRICS``). Only the top-level
        status counts (``data`` may be stale)."""
        raw = dto.get("status")
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise MalformedResponse("Suno gateway task has no readable status", detail={"status": str(raw)[:100]})
        lyrics = str(dto.get("action") or "").upper() == "LYRICS"
        state = _GATEWAY_STATES.get(raw.upper())
        if state is None:
            log.warning("suno gateway: unknown task status %r; still waiting", raw)
        status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(dto.get("progress")))
        if state == "succeeded":
            status.progress = 100
            if lyrics:
                status.outputs = lyrics_outputs(dto.get("data"))
            else:
                status.outputs = gateway_outputs(dto.get("data"), dto.get("result_url"))
                status.task_state = clips_state(status.outputs)
            if not status.outputs:
                status.state = "failed"
                status.error_code = "provider_no_output"
                status.error_message = ("the Suno gateway reported success without any lyrics" if lyrics
                                        else "the Suno gateway reported success without any complete clip")
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
        """sunoapi.org's ``generate/record-info`` ``data`` (a generate or an extend)."""
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
            status.task_state = clips_state(status.outputs)
            status.progress = 100
            if not status.outputs:
                status.state = "failed"
                status.error_code = "provider_no_output"
                status.error_message = "sunoapi.org reported success without any audio"
        elif state == "failed":
            self._record_failed(status, record, response)
        return status

    def parse_lyrics_record(self, record: dict[str, Any]) -> TaskStatus:
        """``lyrics/record-info`` ``data``: ``response.lyricsData`` once ``SUCCESS``."""
        response = _obj_or_json(record.get("response"))
        found = lyrics_outputs(response.get("lyricsData") or response.get("data"))
        return self._simple_record(record, response, _SUNOAPI_LYRICS_STATES, found, "lyrics")

    def parse_wav_record(self, record: dict[str, Any], clip_id: str | None) -> TaskStatus:
        """``wav/record-info`` ``data``: ``response.audioWavUrl`` once ``successFlag`` is ``SUCCESS``
        (an older page: ``status`` and ``audio_wav_url``)."""
        response = _obj_or_json(record.get("response"))
        return self._simple_record(record, response, _SUNOAPI_WAV_STATES, wav_outputs(record, clip_id), "WAV file")

    def _simple_record(self, record: dict[str, Any], response: dict[str, Any], states: dict[str, ProviderState],
                       found: list[ProviderOutput], what: str) -> TaskStatus:
        raw = record.get("successFlag") if record.get("successFlag") is not None else record.get("status")
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise MalformedResponse("sunoapi record has no readable status", detail={"status": str(raw)[:100]})
        state = states.get(raw.upper())
        if raw.upper() == "CALLBACK_EXCEPTION":  # only their callback to us failed
            state = "succeeded" if found else "failed"
        if state is None:
            log.warning("sunoapi: unknown %s task status %r; still waiting", what, raw)
        status = TaskStatus(state=state or "unknown", raw_status=raw)
        if state == "succeeded":
            status.outputs = found
            status.progress = 100
            if not found:
                status.state = "failed"
                status.error_code = "provider_no_output"
                status.error_message = f"sunoapi.org reported success without the {what}"
        elif state == "failed":
            self._record_failed(status, record, response)
        return status

    @staticmethod
    def _record_failed(status: TaskStatus, record: dict[str, Any], response: dict[str, Any]) -> None:
        raw = status.raw_status
        message = record.get("errorMessage") or response.get("errorMessage")
        status.state = "failed"
        status.error_code = "provider_content_filtered" if raw == "SENSITIVE_WORD_ERROR" else "provider_failed"
        status.error_message = f"Suno task {raw}: {message}" if message else f"Suno task {raw}"
        status.error_detail = {"status": raw, "errorCode": record.get("errorCode"), "errorMessage": message}

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


def _obj_or_json(value: Any) -> dict[str, Any]:
    """An object, or one encoded as a JSON string (as ``param`` is in record-info)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return _obj(value)


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
