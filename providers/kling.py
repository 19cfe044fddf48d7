"""Kling's API (https://api-singapore.klingai.com): videos, images and their follow-ups, directly or
(text-to-video and image-to-video only) through a new-api gateway.

Every endpoint family is its own namespace: a task is created with ``POST {path}`` and read with
``GET {path}/{task_id}`` on the *same* path, so the family is kept in the task state
(``KlingTask.family``). What selects the family:

============================================  ====================================  ===============
job                                           family path                           result
============================================  ====================================  ===============
video ``generate``, no image                  ``/v1/videos/text2video``             ``videos[]``
video ``generate`` with ``image_url``         ``/v1/videos/image2video``            ``videos[]``
(or ``options.image``/``image_tail``)
video ``generate`` with ``options.images``    ``/v1/videos/multi-image2video``      ``videos[]``
video ``extend`` (source: a Kling video)      ``/v1/videos/video-extend``           ``videos[]``
video ``lip_sync`` (source: any video)        ``/v1/videos/lip-sync`` (legacy)      ``videos[]``
video ``effects``                             ``/v1/videos/effects``                ``videos[]``
image ``generate``                            ``/v1/images/generations``            ``images[]``
image ``try_on``                              ``/v1/images/kolors-virtual-try-on``  ``images[]``
============================================  ====================================  ===============

Every create body also gets ``callback_url`` (our per-job URL) and ``external_task_id`` (= the
job id; not on lip-sync, whose legacy body documents none). Options named below are the only
ones each family passes on (an unknown one is refused, naming it); ``model_name``,
``callback_url`` and ``external_task_id`` are Atelier's. Images are passed as given: Kling
takes an http(s) URL or raw Base64 (a ``data:`` prefix is refused here, the documented trap);
a source job's output goes as its stored URL.

* **text/image-to-video** (models ``kling-v1``, ``kling-v1-6``, ``kling-v2-master``,
  ``kling-v2-1-master``, ``kling-v2-5-turbo``, ``kling-v2-6``, ``kling-v3``; image-to-video
  also ``kling-v1-5``, ``kling-v2-1``): ``prompt``, ``negative_prompt``, ``image_url`` ->
  ``image``, ``duration_seconds`` -> ``duration`` (a string: "5"/"10", "3".."15" on v3),
  ``aspect_ratio`` (text-to-video); options ``mode``, ``cfg_scale``, ``sound``,
  ``image_tail``, ``camera_control``, ``watermark_info``... pass through after checks. A
  ``generate`` with a source takes the source's *image* as ``image``.
* **multi-image-to-video** (``kling-v1-6``): ``options.images`` (1-4 image URLs, after
  ``image_url`` or the source image if given) -> ``image_list[{image}]``; ``prompt`` required;
  ``negative_prompt``, ``duration_seconds``/``options.duration``, ``aspect_ratio`` (16:9, 9:16,
  1:1), ``options.mode``, ``options.watermark_info``.
* **image generation** (kind ``image``; ``kling-v1``, ``kling-v1-5``, ``kling-v2``,
  ``kling-v2-new``, ``kling-v2-1``, ``kling-v3``, ``kling-image-o1``): ``prompt`` (required,
  <= 2500), ``negative_prompt`` (not with a reference image), ``image_url`` (or a source image,
  or ``options.image``) -> ``image``, ``num_outputs`` or ``options.n`` -> ``n`` (1-9: one output
  per image; a task of n images takes n of Kling's image slots), ``aspect_ratio`` (16:9, 9:16,
  1:1, 4:3, 3:4, 3:2, 2:3, 21:9), ``resolution`` or ``options.resolution`` (1k, 2k); options
  ``image_reference`` (subject|face, kling-v1-5 with an image), ``image_fidelity`` and
  ``human_fidelity`` (0-1), ``watermark_info``.
* **extend** (operation; source: the Kling video job to continue, made by ``kling-v1``,
  ``kling-v1-5`` or ``kling-v1-6``; the job's model is the source's): the source's Kling video
  id -> ``video_id`` (learnt while polling the source: ``KlingTask.video_ids``, also the
  output's ``id``); ``prompt``, ``negative_prompt``, ``options.cfg_scale`` (0-1),
  ``options.watermark_info``. Each call adds about 4-5 s, at most 3 minutes in all.
* **lip_sync** (operation; source: any stored video; model: any Kling video model, not sent):
  a Kling source with a known video id -> ``input.video_id``, any other video ->
  ``input.video_url`` (the stored output's URL; Kling wants mp4/mov, 2-10 s, <= 100 MB).
  Then exactly one of: ``options.text`` (<= 120 characters) with ``options.voice_id`` and
  optionally ``options.voice_language`` (zh|en) and ``options.voice_speed`` (0.8-2.0) ->
  ``input.mode: text2video`` and those fields; ``options.audio_url`` (http(s)) ->
  ``input.mode: audio2video, audio_type: url, audio_url``; ``options.audio_file`` (raw
  Base64) -> ``audio_type: file, audio_file``. Everything is nested under ``input``.
* **effects** (operation; no source or a source image; model: any Kling video model):
  ``options.effect_scene`` -> ``effect_scene``; the images are the source's output, then
  ``image_url``, then ``options.images``, in that order: one -> ``input.image``
  (single-image scenes), two -> ``input.images`` (dual-image scenes such as ``hug_pro``);
  ``duration_seconds``/``options.duration`` -> ``input.duration`` ("5"/"10"). The older dual
  scenes (``heart_gesture``) also get ``input.model_name`` (the job's model) and
  ``input.mode`` (``options.mode``, default std). Known scenes (``extra["effect_scenes"]``,
  ``{scene: single|dual|dual_legacy}``, over the documented default) must get their number of
  images; retired ones (``extra["retired_effect_scenes"]``, default hug, kiss, fight,
  magic_match_tree) are refused; any other scene goes by the number of images given.
* **try_on** (operation, kind ``image``; ``kolors-virtual-try-on-v1``,
  ``kolors-virtual-try-on-v1-5``): the person is ``image_url`` or the source image ->
  ``human_image``; the garment ``options.cloth_image`` (URL or raw Base64) -> ``cloth_image``.

Status: ``GET {path}/{task_id}``; the same path takes the ``external_task_id`` instead of the
task id, which is how ``reconcile`` finds a task after an ambiguous submit (never for
lip-sync, which gets no external id). No cancel endpoint is documented.

Auth: ``Authorization: Bearer <JWT>``, HS256 signed with the secret key, claims ``iss`` =
access key, ``exp`` = now + 1800, ``nbf`` = now - 5; cached per access key and rebuilt when
less than 5 minutes are left. **Gateway mode**: when the pool key is not the access key
(``ATELIER_KLING_API_KEY`` is a gateway's ``sk-...`` key), it is sent as ``Bearer <key>``;
only text- and image-to-video go through a gateway (the rest is refused at acceptance when no
access key is configured, and at submission with a gateway key).

Responses are an envelope ``{code, message, request_id, data}``; ``code`` 0 is success.
Status mapping: ``submitted`` -> queued, ``processing`` -> running, ``succeed`` -> succeeded
(``data.task_result.videos[{id, url, duration}]`` or ``images[{index, url}]``: signed CDN
URLs, fetched without auth, cleared after 30 days; a video's ``id`` is kept in the output
metadata and in the task state for follow-ups, ``task_info.parent_video.id`` as
``parent_video_id``), ``failed`` -> failed with ``task_status_msg``. Anything else is logged
and non-terminal.

Traps handled:

* A failed task still answers ``code: 0, message: "SUCCEED"``; only ``task_status`` says so.
* Business codes matter more than HTTP statuses (1102 was seen as HTTP 400 and 429):
  1000-1004 (JWT) and 1304 (IP allow-list) -> AuthFailed; 1101/1102 (arrears, balance) ->
  InsufficientBalance (not retried); 1302 (rate) and 1303 (concurrency over the resource
  pack) -> RateLimited, so the job waits; 1301 content policy -> Rejected
  ``provider_content_filtered``; 1200/1201 -> ``provider_rejected_input``; 1203 -> model
  unknown on create, task unknown on fetch; 5000/5002 on create -> OutcomeUnknown.
* Callbacks are unsigned bare task objects: the per-job token in the callback URL
  authenticates them and the state applied is the one fetched.
* Lip-sync nests its parameters under ``input``, unlike every other family; effects nest
  their images and duration there too.

Through a new-api gateway (base URL = the gateway's Kling mount, e.g.
``https://gateway.example.com/kling``) the same paths answer other shapes, recognised from
the response itself: create returns an OpenAI-style video object (``id``/``task_id``,
``status: queued``); fetch returns ``{code: "success", message, data: <TaskDto>}`` with
``status`` ``NOT_START`` (and ``""``/``unknown`` before the gateway's first poll; queued),
``SUBMITTED``/``QUEUED`` (queued), ``IN_PROGRESS`` (running), ``SUCCESS`` (``result_url``, or
the raw Kling body in ``data``) and ``FAILURE`` (``fail_reason``; the gateway's own 24 h
timeout sweep ends up here as ``provider_gateway_timeout``). Task errors are
``{code: "<string>", message, data: null}`` (Kling's own body may be embedded in
``message``), auth errors ``{"error": {...}}``; a used-up gateway quota (``quota_not_enough``,
``insufficient_user_quota``... with 401/403) is InsufficientBalance, not AuthFailed. A
gateway never calls back and cannot look a task up by our external id, so neither is used
in gateway mode.

``extra``: ``access_key``/``secret_key`` (Kling's key pair), ``effect_scenes``,
``retired_effect_scenes``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import mimetypes
import re
import time
import warnings
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

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
    SourceMedia,
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

TEXT2VIDEO = "text2video"
IMAGE2VIDEO = "image2video"
MULTI_IMAGE2VIDEO = "multi-image2video"
VIDEO_EXTEND = "video-extend"
LIP_SYNC = "lip-sync"
EFFECTS = "effects"
IMAGE_GENERATIONS = "generations"
TRY_ON = "kolors-virtual-try-on"
IMAGE_FAMILIES = frozenset({IMAGE_GENERATIONS, TRY_ON})
# What a new-api gateway relays (its Kling route knows only these two).
GATEWAY_FAMILIES = frozenset({TEXT2VIDEO, IMAGE2VIDEO})
# Families whose documented create body has no external_task_id (so reconcile cannot find their tasks).
NO_EXTERNAL_ID = frozenset({LIP_SYNC})
# The families that generate a video from scratch (what video-extend can continue).
GENERATED_VIDEO_FAMILIES = frozenset({TEXT2VIDEO, IMAGE2VIDEO, MULTI_IMAGE2VIDEO, VIDEO_EXTEND})
_OPERATION_FAMILIES = {"extend": VIDEO_EXTEND, "lip_sync": LIP_SYNC, "effects": EFFECTS, "try_on": TRY_ON}
_OPERATION_KINDS = {"extend": MediaKind.video, "lip_sync": MediaKind.video, "effects": MediaKind.video,
                    "try_on": MediaKind.image}
T2V_MODELS = frozenset({"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master",
                        "kling-v2-5-turbo", "kling-v2-6", "kling-v3"})
I2V_MODELS = T2V_MODELS | {"kling-v1-5", "kling-v2-1"}
VIDEO_MODELS = tuple(sorted(I2V_MODELS))
MULTI_IMAGE_MODELS = ("kling-v1-6",)
IMAGE_MODELS = ("kling-v1", "kling-v1-5", "kling-v2", "kling-v2-new", "kling-v2-1", "kling-v3", "kling-image-o1")
TRY_ON_MODELS = ("kolors-virtual-try-on-v1", "kolors-virtual-try-on-v1-5")
# video-extend takes only videos of Kling v1.0/v1.5/v1.6 models; each call adds about 4-5 s, 3 min at most.
EXTENDABLE_MODELS = ("kling-v1", "kling-v1-5", "kling-v1-6")
EXTEND_MIN_SECONDS = 4.0
MAX_EXTENDED_SECONDS = 180.0
IMAGE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9")
IMAGE_RESOLUTIONS = ("1k", "2k")
MAX_IMAGES = 9
MAX_MULTI_IMAGES = 4
LIP_SYNC_TEXT = 120
VOICE_LANGUAGES = ("zh", "en")
VOICE_SPEED = (0.8, 2.0)
# Effect scenes by the images they take; the list changes often, so operators extend it in
# ``extra["effect_scenes"]``. "dual_legacy" scenes also take input.model_name and input.mode.
EFFECT_SCENES: dict[str, str] = {"hug_pro": "dual", "kiss_pro": "dual", "fight_pro": "dual",
                                 "heart_gesture_pro": "dual", "cheers_2026": "dual", "heart_gesture": "dual_legacy"}
EFFECT_SCENE_KINDS = ("single", "dual", "dual_legacy")
RETIRED_EFFECT_SCENES = ("hug", "kiss", "fight", "magic_match_tree")
_SCENE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The options each family passes on (text/image-to-video pass any identifier on, after checks).
IMAGE_OPTIONS = frozenset({"n", "resolution", "image", "image_reference", "image_fidelity", "human_fidelity",
                           "watermark_info"})
MULTI_IMAGE_OPTIONS = frozenset({"images", "mode", "duration", "watermark_info"})
EXTEND_OPTIONS = frozenset({"cfg_scale", "watermark_info"})
LIP_SYNC_OPTIONS = frozenset({"text", "voice_id", "voice_language", "voice_speed", "audio_url", "audio_file"})
EFFECTS_OPTIONS = frozenset({"effect_scene", "images", "duration", "mode"})
TRY_ON_OPTIONS = frozenset({"cloth_image"})
_VIDEO = frozenset({MediaKind.video})
_IMAGE = frozenset({MediaKind.image})
# Older models render 5 or 10 s; kling-v3 takes "3" .. "15" (Kling's capability map).
DURATIONS: dict[str, tuple[str, ...]] = {"kling-v3": tuple(str(n) for n in range(3, 16))}
LEGACY_DURATIONS = ("5", "10")
SOUND_MODELS = frozenset({"kling-v2-6", "kling-v3"})
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
MODES = ("std", "pro")
MAX_PROMPT = 2500
# Set by Atelier itself; a client may not override them through options.
RESERVED_OPTIONS = {"model_name": "model", "model": "model", "callback_url": None, "external_task_id": None}

JWT_TTL = 1800
JWT_REFRESH_MARGIN = 300

_KLING_STATES: dict[str, ProviderState] = {
    "submitted": "queued",
    "processing": "running",
    "succeed": "succeeded",
    "failed": "failed",
}
# new-api task rows. NOT_START (and "" or "unknown" as some routes render it) is the row
# before the gateway's first poll of Kling.
_GATEWAY_STATES: dict[str, ProviderState] = {
    "": "queued",
    "NOT_START": "queued",
    "unknown": "queued",
    "SUBMITTED": "queued",
    "QUEUED": "queued",
    "IN_PROGRESS": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
}


# -- request building (validation happens here, before anything is sent) ------------------

def family_for(job_input: MediaInput) -> str:
    """text2video or image2video (a video ``generate`` without ``options.images``)."""
    opts = job_input.options
    return IMAGE2VIDEO if job_input.image_url or opts.get("image") or opts.get("image_tail") else TEXT2VIDEO


def family_of(request: GenerationRequest) -> str:
    """The endpoint family a request goes to (see the module's table); nothing is checked here."""
    if request.operation in _OPERATION_FAMILIES:
        return _OPERATION_FAMILIES[request.operation]
    if request.kind == MediaKind.image:
        return IMAGE_GENERATIONS
    if "images" in request.input.options:
        return MULTI_IMAGE2VIDEO
    return family_for(request.input)


def family_path(family: str) -> str:
    """The create path of a family, under which its tasks are read (each is its own namespace)."""
    return f"/v1/{'images' if family in IMAGE_FAMILIES else 'videos'}/{family}"


def kling_body(model: str, job_input: MediaInput) -> tuple[str, dict[str, Any]]:
    """``(family, create body)`` for a job; raises ``InvalidInput`` naming the field."""
    family = family_for(job_input)
    models = T2V_MODELS if family == TEXT2VIDEO else I2V_MODELS
    if model not in models:
        raise InvalidInput("model", f"Kling {family} models are {', '.join(sorted(models))}")
    opts = dict(job_input.options)
    for key in opts:
        if key in RESERVED_OPTIONS:
            target = RESERVED_OPTIONS[key]
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use '{target}' instead" if target
                               else "set by Atelier")
    if job_input.seed is not None:
        raise InvalidInput("input.seed", "Kling video has no seed parameter")
    if job_input.resolution is not None:
        raise InvalidInput("input.resolution", "Kling has no resolution parameter; use options.mode (std or pro)")
    if job_input.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Kling renders one video per task")

    body: dict[str, Any] = {"model_name": model}
    if job_input.prompt is not None:
        body["prompt"] = job_input.prompt
    if job_input.negative_prompt is not None:
        body["negative_prompt"] = job_input.negative_prompt
    if job_input.duration_seconds is not None:
        seconds = job_input.duration_seconds
        allowed = DURATIONS.get(model, LEGACY_DURATIONS)
        if not float(seconds).is_integer() or str(int(seconds)) not in allowed:
            raise InvalidInput("input.duration_seconds", f"{model} renders {_seconds(allowed)} seconds")
        body["duration"] = str(int(seconds))
    if job_input.aspect_ratio is not None:
        if family == IMAGE2VIDEO:
            raise InvalidInput("input.aspect_ratio", "Kling image-to-video follows the image's aspect ratio")
        if job_input.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("input.aspect_ratio", f"Kling renders {', '.join(ASPECT_RATIOS)}")
        body["aspect_ratio"] = job_input.aspect_ratio
    if job_input.image_url is not None:
        body["image"] = str(job_input.image_url)

    _check_options(model, family, opts)
    body.update(opts)
    if "duration" in opts:
        body["duration"] = str(opts["duration"])
    _check_prompts(family, body)
    return family, body


def _check_options(model: str, family: str, opts: dict[str, Any]) -> None:
    def bad(key: str, message: str) -> InvalidInput:
        return InvalidInput(f"input.options.{key}", message)

    for key in opts:
        if not key.replace("_", "").isalnum():
            raise bad(key, "Kling parameter names are identifiers")
    if "mode" in opts and opts["mode"] not in MODES:
        raise bad("mode", "mode is std or pro")
    if "duration" in opts:
        allowed = DURATIONS.get(model, LEGACY_DURATIONS)
        value = opts["duration"]
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value) not in allowed:
            raise bad("duration", f"{model} takes duration {' or '.join(repr(d) for d in allowed)}")
    if "aspect_ratio" in opts:
        if family == IMAGE2VIDEO:
            raise bad("aspect_ratio", "Kling image-to-video follows the image's aspect ratio")
        if opts["aspect_ratio"] not in ASPECT_RATIOS:
            raise bad("aspect_ratio", f"aspect_ratio is one of {', '.join(ASPECT_RATIOS)}")
    if "cfg_scale" in opts:
        value = opts["cfg_scale"]
        if model.startswith("kling-v2"):
            raise bad("cfg_scale", f"{model} does not support cfg_scale (Kling v2.x models)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise bad("cfg_scale", "cfg_scale is a number from 0 to 1")
    if "sound" in opts:
        if opts["sound"] not in ("on", "off"):
            raise bad("sound", "sound is on or off")
        if model not in SOUND_MODELS:
            raise bad("sound", f"sound needs {' or '.join(sorted(SOUND_MODELS))}")
    if "watermark_info" in opts:
        wm = opts["watermark_info"]
        if not isinstance(wm, dict) or not isinstance(wm.get("enabled", False), bool):
            raise bad("watermark_info", 'watermark_info is {"enabled": true|false}')
    if "camera_control" in opts and not isinstance(opts["camera_control"], dict):
        raise bad("camera_control", "camera_control is an object {type, config}")
    for key in ("image", "image_tail"):
        if key in opts:
            if family == TEXT2VIDEO:
                raise bad(key, "images are for image-to-video")
            _check_image(f"input.options.{key}", opts[key])
    if opts.get("image_tail"):
        clash = [k for k in ("static_mask", "dynamic_masks", "camera_control") if opts.get(k)]
        if clash:
            raise bad("image_tail", f"image_tail cannot be combined with {', '.join(clash)}")


def _check_image(field: str, value: Any) -> None:
    """An image Kling takes: an http(s) URL (Kling fetches it) or raw Base64, never a ``data:`` URL."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, "an image is an http(s) URL or raw Base64")
    if value.startswith("data:"):
        raise InvalidInput(field, "Kling takes raw Base64 without a 'data:' prefix")
    if not _http_url(value) and not _is_base64(value):
        raise InvalidInput(field, "an image is an http(s) URL or raw Base64")


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _check_prompts(family: str, body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    multi_custom = body.get("multi_shot") is True and body.get("shot_type") == "customize"
    if family == TEXT2VIDEO and not (isinstance(prompt, str) and prompt.strip()) and not multi_custom:
        raise InvalidInput("input.prompt", "Kling text-to-video needs a prompt")
    for key in ("prompt", "negative_prompt"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_PROMPT):
            raise InvalidInput(f"input.{key}", f"{key} is a string of at most {MAX_PROMPT} characters")


def _seconds(allowed: tuple[str, ...]) -> str:
    return " or ".join(allowed) if len(allowed) <= 2 else f"{allowed[0]} to {allowed[-1]}"


# -- the other families -------------------------------------------------------------------

def _only_fields(given: MediaInput, allowed: Collection[str], what: str) -> None:
    """Refuse the common fields a family has no use for (``num_outputs`` 1 is always fine)."""
    for name, value in given.fields().items():
        if name in allowed or (name == "num_outputs" and value == 1):
            continue
        raise InvalidInput(f"input.{name}", f"{what} takes no {name.replace('_', ' ')}")


def _options(given: MediaInput, allowed: Collection[str], what: str) -> dict[str, Any]:
    """The options, each one a parameter the family passes on (Atelier's own are refused)."""
    opts = dict(given.options)
    for key in opts:
        if key in RESERVED_OPTIONS:
            target = RESERVED_OPTIONS[key]
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use '{target}' instead" if target
                               else "set by Atelier")
        if key not in allowed:
            raise InvalidInput(f"input.options.{key}", f"not a {what} parameter Atelier passes on "
                                                       f"(allowed: {', '.join(sorted(allowed))})")
    return opts


def _text(field: str, value: Any, *, required: bool, limit: int = MAX_PROMPT) -> str | None:
    if value is None or value == "":
        if required:
            raise InvalidInput(field, "required here")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(field, f"a string of at most {limit} characters")
    if required and not value.strip():
        raise InvalidInput(field, "required here")
    return value


def _number(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidInput(field, f"a number from {low:g} to {high:g}")
    return float(value)


def _check_watermark(opts: Mapping[str, Any]) -> None:
    if "watermark_info" in opts:
        wm = opts["watermark_info"]
        if not isinstance(wm, dict) or set(wm) - {"enabled"} or not isinstance(wm.get("enabled", False), bool):
            raise InvalidInput("input.options.watermark_info", 'watermark_info is {"enabled": true|false}')


def _duration(given: MediaInput, opts: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> str | None:
    """``duration_seconds`` or ``options.duration`` (not both) as Kling's string enum."""
    if given.duration_seconds is not None:
        if "duration" in opts:
            raise InvalidInput("input.options.duration", "give the duration once (input.duration_seconds "
                                                         "or options.duration)")
        seconds = given.duration_seconds
        if not float(seconds).is_integer() or str(int(seconds)) not in allowed:
            raise InvalidInput("input.duration_seconds", f"{what} renders {_seconds(allowed)} seconds")
        return str(int(seconds))
    if "duration" in opts:
        value = opts["duration"]
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value) not in allowed:
            raise InvalidInput("input.options.duration", f"{what} takes duration "
                                                         f"{' or '.join(repr(d) for d in allowed)}")
        return str(value)
    return None


def _image_list(field: str, value: Any, most: int) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > most:
        raise InvalidInput(field, f"a list of 1 to {most} images (http(s) URLs or raw Base64)")
    for item in value:
        _check_image(field, item)
    return list(value)


def _source_url(request: GenerationRequest) -> str:
    """The source's stored output URL (minted at submission; empty while a request is only validated)."""
    if request.source is None:
        return ""
    return request.source.url or ""


def source_video_id(source: SourceMedia) -> str | None:
    """The Kling video id of a source job's output: learnt while polling it (the task state), else
    the id its output announced; ``None`` for any other provider's video or a gateway's task."""
    if source.provider != "kling" or source.state.get("gateway"):
        return None
    ids = source.state.get("video_ids")
    found = ids[source.output_index] if isinstance(ids, list) and source.output_index < len(ids) else None
    found = found or source.output_metadata.get("id")
    return found if isinstance(found, str) and found else None


def image_generation_body(request: GenerationRequest) -> dict[str, Any]:
    """``POST /v1/images/generations``; raises ``InvalidInput`` naming the field."""
    model, given = request.model, request.input
    if model not in IMAGE_MODELS:
        hint = " (Kolors try-on models take operation try_on)" if model in TRY_ON_MODELS else ""
        raise InvalidInput("model", f"Kling image models are {', '.join(IMAGE_MODELS)}{hint}")
    what = "Kling image generation"
    _only_fields(given, ("prompt", "negative_prompt", "image_url", "aspect_ratio", "resolution", "num_outputs"), what)
    opts = _options(given, IMAGE_OPTIONS, what)
    body: dict[str, Any] = {"model_name": model, "prompt": _text("input.prompt", given.prompt, required=True)}
    negative = _text("input.negative_prompt", given.negative_prompt, required=False)

    image, image_field = given.image_url, "input.image_url"
    if "image" in opts:
        if image is not None:
            raise InvalidInput("input.options.image", "give the reference image once (input.image_url, a source "
                                                      "image or options.image)")
        image, image_field = opts.pop("image"), "input.options.image"
    if image is not None:
        _check_image(image_field, image)
        body["image"] = image
        if negative is not None:
            raise InvalidInput("input.negative_prompt", "Kling takes no negative prompt with a reference image")
    if negative is not None:
        body["negative_prompt"] = negative

    count, count_field = given.num_outputs, "input.num_outputs"
    if "n" in opts:
        if count is not None:
            raise InvalidInput("input.options.n", "give the count once (input.num_outputs or options.n)")
        count, count_field = opts.pop("n"), "input.options.n"
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES:
            raise InvalidInput(count_field, f"Kling renders 1 to {MAX_IMAGES} images per task")
        body["n"] = count

    resolution, resolution_field = given.resolution, "input.resolution"
    if "resolution" in opts:
        if resolution is not None:
            raise InvalidInput("input.options.resolution", "give the resolution once (input.resolution or "
                                                           "options.resolution)")
        resolution, resolution_field = opts.pop("resolution"), "input.options.resolution"
    if resolution is not None:
        if resolution not in IMAGE_RESOLUTIONS:
            raise InvalidInput(resolution_field, f"Kling images are {' or '.join(IMAGE_RESOLUTIONS)}")
        body["resolution"] = resolution
    if given.aspect_ratio is not None:
        if given.aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise InvalidInput("input.aspect_ratio", f"Kling images are {', '.join(IMAGE_ASPECT_RATIOS)}")
        body["aspect_ratio"] = given.aspect_ratio

    if "image_reference" in opts:
        if opts["image_reference"] not in ("subject", "face"):
            raise InvalidInput("input.options.image_reference", "image_reference is subject or face")
        if model != "kling-v1-5" or image is None:
            raise InvalidInput("input.options.image_reference", "image_reference needs kling-v1-5 and a reference "
                                                                "image")
    for name in ("image_fidelity", "human_fidelity"):
        if name in opts:
            _number(f"input.options.{name}", opts[name], 0, 1)
    _check_watermark(opts)
    body.update(opts)
    return body


def multi_image_body(request: GenerationRequest) -> dict[str, Any]:
    """``POST /v1/videos/multi-image2video`` (a video ``generate`` with ``options.images``)."""
    model, given = request.model, request.input
    what = "Kling multi-image-to-video"
    if model not in MULTI_IMAGE_MODELS:
        raise InvalidInput("model", f"{what} (options.images) runs on {', '.join(MULTI_IMAGE_MODELS)}")
    _only_fields(given, ("prompt", "negative_prompt", "image_url", "duration_seconds", "aspect_ratio",
                         "num_outputs"), what)
    opts = _options(given, MULTI_IMAGE_OPTIONS, what)
    first = [str(given.image_url)] if given.image_url is not None else []
    images = first + _image_list("input.options.images", opts["images"], MAX_MULTI_IMAGES - len(first))
    body: dict[str, Any] = {"model_name": model, "image_list": [{"image": image} for image in images],
                            "prompt": _text("input.prompt", given.prompt, required=True)}
    if (negative := _text("input.negative_prompt", given.negative_prompt, required=False)) is not None:
        body["negative_prompt"] = negative
    if (duration := _duration(given, opts, LEGACY_DURATIONS, what)) is not None:
        body["duration"] = duration
    if given.aspect_ratio is not None:
        if given.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("input.aspect_ratio", f"{what} renders {', '.join(ASPECT_RATIOS)}")
        body["aspect_ratio"] = given.aspect_ratio
    if "mode" in opts:
        if opts["mode"] not in MODES:
            raise InvalidInput("input.options.mode", "mode is std or pro")
        body["mode"] = opts["mode"]
    _check_watermark(opts)
    if "watermark_info" in opts:
        body["watermark_info"] = opts["watermark_info"]
    return body


def extend_body(request: GenerationRequest) -> dict[str, Any]:
    """``POST /v1/videos/video-extend``: continue the source job's Kling video."""
    source, given = request.source, request.input
    if source is None:
        raise InvalidInput("source", "extend continues an earlier Kling video: give source.job_id")
    family = source.state.get("family")
    if source.state.get("gateway") or (family is not None and family not in GENERATED_VIDEO_FAMILIES):
        made = "through a gateway" if source.state.get("gateway") else f"by {family}"
        raise InvalidInput("source", f"Kling extends the videos its models generated; the source was made {made}")
    if source.model not in EXTENDABLE_MODELS:
        raise InvalidInput("source", f"Kling extends only videos of {', '.join(EXTENDABLE_MODELS)}; the source "
                                     f"was made with {source.model}")
    if request.model != source.model:
        raise InvalidInput("model", f"extend continues the source video with its model, {source.model}")
    video_id = source_video_id(source)
    if video_id is None:
        raise InvalidInput("source", "the source job's output has no Kling video id")
    try:
        seconds = float(source.output_metadata.get("duration") or 0)
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds + EXTEND_MIN_SECONDS > MAX_EXTENDED_SECONDS:
        raise InvalidInput("source", f"the source video is {seconds:g} s long; Kling extends videos up to "
                                     f"{MAX_EXTENDED_SECONDS:g} s in all (each extension adds 4-5 s)")
    what = "Kling video extension"
    _only_fields(given, ("prompt", "negative_prompt", "num_outputs"), what)
    opts = _options(given, EXTEND_OPTIONS, what)
    body: dict[str, Any] = {"video_id": video_id}
    for name in ("prompt", "negative_prompt"):
        if (text := _text(f"input.{name}", getattr(given, name), required=False)) is not None:
            body[name] = text
    if "cfg_scale" in opts:
        body["cfg_scale"] = _number("input.options.cfg_scale", opts["cfg_scale"], 0, 1)
    _check_watermark(opts)
    if "watermark_info" in opts:
        body["watermark_info"] = opts["watermark_info"]
    return body


def lip_sync_body(request: GenerationRequest) -> dict[str, Any]:
    """``POST /v1/videos/lip-sync`` (legacy; everything nested under ``input``)."""
    source, given = request.source, request.input
    if source is None:
        raise InvalidInput("source", "lip_sync acts on a video: give source.job_id")
    what = "Kling lip-sync"
    _only_fields(given, ("num_outputs",), what)
    opts = _options(given, LIP_SYNC_OPTIONS, what)
    video_id = source_video_id(source)
    inp: dict[str, Any] = {"video_id": video_id} if video_id else {"video_url": _source_url(request)}

    ways = [key for key in ("text", "audio_url", "audio_file") if key in opts]
    if not ways:
        raise InvalidInput("input.options.text", "lip_sync needs options.text (spoken with options.voice_id) or "
                                                 "an audio track: options.audio_url or options.audio_file")
    if len(ways) > 1:
        raise InvalidInput(f"input.options.{ways[1]}", f"give one of options.text, options.audio_url and "
                                                       f"options.audio_file, not {ways[0]} and {ways[1]}")
    if ways[0] == "text":
        inp["mode"] = "text2video"
        inp["text"] = _text("input.options.text", opts["text"], required=True, limit=LIP_SYNC_TEXT)
        voice = opts.get("voice_id")
        if not isinstance(voice, str) or not voice.strip():
            raise InvalidInput("input.options.voice_id", "text-to-speech needs a voice_id (one of Kling's voices)")
        inp["voice_id"] = voice
        if "voice_language" in opts:
            if opts["voice_language"] not in VOICE_LANGUAGES:
                raise InvalidInput("input.options.voice_language", "voice_language is zh or en")
            inp["voice_language"] = opts["voice_language"]
        if "voice_speed" in opts:
            _number("input.options.voice_speed", opts["voice_speed"], *VOICE_SPEED)
            inp["voice_speed"] = opts["voice_speed"]
        return {"input": inp}
    for key in ("voice_id", "voice_language", "voice_speed"):
        if key in opts:
            raise InvalidInput(f"input.options.{key}", f"{key} is for text-to-speech (options.text), not an audio "
                                                       "track")
    inp["mode"] = "audio2video"
    if ways[0] == "audio_url":
        if not _http_url(opts["audio_url"]):
            raise InvalidInput("input.options.audio_url", "audio_url is an http(s) URL (mp3, wav, m4a or aac)")
        inp.update(audio_type="url", audio_url=opts["audio_url"])
    else:
        audio = opts["audio_file"]
        if not isinstance(audio, str) or not audio or audio.startswith("data:") or not _is_base64(audio):
            raise InvalidInput("input.options.audio_file", "audio_file is raw Base64 (no 'data:' prefix)")
        inp.update(audio_type="file", audio_file=audio)
    return {"input": inp}


def effects_body(request: GenerationRequest, scenes: Mapping[str, str], retired: Collection[str]) -> dict[str, Any]:
    """``POST /v1/videos/effects``: a scene applied to one image or two."""
    given = request.input
    what = "Kling video effects"
    _only_fields(given, ("image_url", "duration_seconds", "num_outputs"), what)
    opts = _options(given, EFFECTS_OPTIONS, what)
    scene = opts.get("effect_scene")
    if not isinstance(scene, str) or not _SCENE_NAME.match(scene):
        raise InvalidInput("input.options.effect_scene", "effects needs options.effect_scene (a Kling scene name "
                                                         "such as hug_pro)")
    if scene in retired:
        raise InvalidInput("input.options.effect_scene", f"Kling retired the effect scene {scene!r}")
    images = [_source_url(request)] if request.source is not None else []
    if given.image_url is not None:
        images.append(str(given.image_url))
    if "images" in opts:
        images += _image_list("input.options.images", opts["images"], 2)
    field = "input.options.images" if "images" in opts else "input.image_url"
    kind = scenes.get(scene)
    if kind is None:  # a scene Atelier does not know: by the number of images
        if len(images) not in (1, 2):
            raise InvalidInput(field, "an effect takes one image (single-image scenes) or two (dual-image scenes): "
                                      "a source image, input.image_url and/or options.images")
        kind = "single" if len(images) == 1 else "dual"
    elif kind == "single" and len(images) != 1:
        raise InvalidInput(field, f"the scene {scene!r} takes one image (a source image or input.image_url), "
                                  f"not {len(images)}")
    elif kind != "single" and len(images) != 2:
        raise InvalidInput(field, f"the scene {scene!r} takes exactly two images (options.images, or a source "
                                  f"image and input.image_url), not {len(images)}")
    inp: dict[str, Any] = {"image": images[0]} if kind == "single" else {"images": images}
    if (duration := _duration(given, opts, LEGACY_DURATIONS, what)) is not None:
        inp["duration"] = duration
    if kind == "dual_legacy":
        mode = opts.get("mode", "std")
        if mode not in MODES:
            raise InvalidInput("input.options.mode", "mode is std or pro")
        inp.update(model_name=request.model, mode=mode)
    elif "mode" in opts:
        raise InvalidInput("input.options.mode", f"the scene {scene!r} takes no mode (only the older dual-image "
                                                 "scenes such as heart_gesture do)")
    return {"effect_scene": scene, "input": inp}


def try_on_body(request: GenerationRequest) -> dict[str, Any]:
    """``POST /v1/images/kolors-virtual-try-on``: the person (image_url or source) wearing the garment."""
    given = request.input
    what = "Kling virtual try-on"
    _only_fields(given, ("image_url", "num_outputs"), what)
    opts = _options(given, TRY_ON_OPTIONS, what)
    if given.image_url is not None and request.source is not None:
        raise InvalidInput("input.image_url", "the person is the source image or input.image_url, not both")
    if given.image_url is not None:
        person = str(given.image_url)
        _check_image("input.image_url", person)
    elif request.source is not None:
        person = _source_url(request)
    else:
        raise InvalidInput("input.image_url", "try_on needs the person's image: input.image_url or a source image")
    if "cloth_image" not in opts:
        raise InvalidInput("input.options.cloth_image", "try_on needs the garment's image in options.cloth_image "
                                                        "(an http(s) URL or raw Base64)")
    _check_image("input.options.cloth_image", opts["cloth_image"])
    return {"model_name": request.model, "human_image": person, "cloth_image": opts["cloth_image"]}


# -- the adapter ------------------------------------------------------------------------

class KlingTask(TaskState):
    """The API family the task lives in (each is its own namespace), whether a gateway took it, and the
    ids of its videos once it succeeded (what ``extend`` and ``lip_sync`` send as ``video_id``)."""

    family: str | None = None
    gateway: bool | None = None
    video_ids: list[str] | None = None


class KlingProvider(Provider):
    name = "kling"
    default_base_url = "https://api-singapore.klingai.com"
    default_typical_seconds = {"video": 180, "image": 30}
    kinds = frozenset({MediaKind.video, MediaKind.image})
    supports_cancel = False
    supports_callbacks = True
    callback_auth = "token"
    retention = "30 days (generated videos and images are cleared; result links are signed CDN URLs)"
    operations = (
        Operation("extend", source="task", source_kinds=_VIDEO, models=EXTENDABLE_MODELS,
                  description="continue a Kling v1.x video by 4-5 s (POST /v1/videos/video-extend with its "
                              "video_id; the job's model is the source's)"),
        Operation("lip_sync", source="media", source_kinds=_VIDEO, models=VIDEO_MODELS,
                  description="a video's lips moved to options.text (voice_id, voice_language, voice_speed) or "
                              "to options.audio_url / audio_file (POST /v1/videos/lip-sync; a Kling source goes "
                              "by its video_id, any other by its stored URL)"),
        Operation("effects", source="optional_media", source_kinds=_IMAGE, models=VIDEO_MODELS,
                  description="an effect scene (options.effect_scene) on one image (source or image_url) or two "
                              "(options.images) (POST /v1/videos/effects)"),
        Operation("try_on", source="optional_media", source_kinds=_IMAGE, models=TRY_ON_MODELS,
                  description="Kolors virtual try-on: the person (source or image_url) wearing "
                              "options.cloth_image (POST /v1/images/kolors-virtual-try-on)"),
    )

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)
        self._tokens: dict[str, tuple[str, float]] = {}
        scenes = settings.extra.get("effect_scenes") or {}
        if not isinstance(scenes, dict) or any(kind not in EFFECT_SCENE_KINDS for kind in scenes.values()):
            raise ValueError(f"kling extra.effect_scenes is {{scene: {' | '.join(EFFECT_SCENE_KINDS)}}}")
        self.effect_scenes: dict[str, str] = {**EFFECT_SCENES, **scenes}
        self.retired_effect_scenes = frozenset(str(s) for s in settings.extra.get("retired_effect_scenes",
                                                                                   RETIRED_EFFECT_SCENES))

    # -- auth ---------------------------------------------------------------
    def gateway_mode(self, ctx: CallContext) -> bool:
        """A pool key other than Kling's access key is a gateway's Bearer key."""
        return ctx.api_key != str(self.settings.extra.get("access_key") or "")

    def token(self, now: float | None = None) -> str:
        """Kling's API token: an HS256 JWT, reused until less than 5 minutes are left."""
        access_key = str(self.settings.extra.get("access_key") or "")
        secret_key = str(self.settings.extra.get("secret_key") or "")
        now = time.time() if now is None else now
        cached = self._tokens.get(access_key)
        if cached is not None and cached[1] - now > JWT_REFRESH_MARGIN:
            return cached[0]
        issued = int(now)
        claims = {"iss": access_key, "exp": issued + JWT_TTL, "nbf": issued - 5}
        with warnings.catch_warnings():  # short (sandbox) secrets are still what Kling would check
            warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
            token = jwt.encode(claims, secret_key, algorithm="HS256", headers={"typ": "JWT"})
        self._tokens[access_key] = (token, float(issued + JWT_TTL))
        return token

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        bearer = ctx.api_key if self.gateway_mode(ctx) else self.token()
        return {"Authorization": f"Bearer {bearer}", "User-Agent": "atelier"}

    # -- validation -----------------------------------------------------------
    def build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """``(family, create body)`` for a request (without ``callback_url``/``external_task_id``);
        raises ``InvalidInput`` naming the field."""
        operation, kind = request.operation, request.kind
        wanted = _OPERATION_KINDS.get(operation)
        if wanted is not None and kind != wanted:
            raise InvalidInput("kind", f"Kling {operation} renders {wanted.value}, not {kind.value}")
        source = request.source
        if operation == "generate" and source is not None and source.kind != MediaKind.image:
            raise InvalidInput("source", f"Kling takes a source image as the input image, not a {source.kind.value}; "
                                         "to continue a Kling video use operation 'extend'")
        family = family_of(request)
        if family == VIDEO_EXTEND:
            return family, extend_body(request)
        if family == LIP_SYNC:
            return family, lip_sync_body(request)
        if family == EFFECTS:
            return family, effects_body(request, self.effect_scenes, self.retired_effect_scenes)
        if family == TRY_ON:
            return family, try_on_body(request)
        if family == IMAGE_GENERATIONS:
            return family, image_generation_body(request)
        if family == MULTI_IMAGE2VIDEO:
            return family, multi_image_body(request)
        return kling_body(request.model, request.input)

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        family, _ = self.build(request)
        if family not in GATEWAY_FAMILIES and not self.settings.extra.get("access_key"):
            field = ("operation" if request.operation != "generate" else
                     "kind" if request.kind == MediaKind.image else "input.options.images")
            raise InvalidInput(field, f"Kling {family} is only reached directly (with Kling's access and secret "
                                      "keys); this server reaches Kling through a gateway")

    # -- the task ------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        family, body = self.build(request)
        gateway = self.gateway_mode(ctx)
        if gateway and family not in GATEWAY_FAMILIES:
            raise Rejected(f"Kling {family} is only reached directly, not through a gateway key",
                           code="provider_rejected_input")
        if family not in NO_EXTERNAL_ID:
            body["external_task_id"] = request.reference
        if ctx.callback_url and not gateway:
            body["callback_url"] = ctx.callback_url
        url = f"{self.base_url}{family_path(family)}"
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        payload = _json_or_error(response, creates=True)
        raise_for_error(response, payload, creates=True)
        if isinstance(payload.get("code"), int):  # Kling's envelope
            task = expect_object(payload.get("data"), "task")
            task_id = task.get("task_id")
            status = task.get("task_status")
            request_id = payload.get("request_id")
        else:  # a gateway: an OpenAI-style video object, or {code: "success", data: "<task id>"}
            inner = payload.get("data")
            task = inner if isinstance(inner, dict) else payload
            task_id = task.get("task_id") or task.get("id") or (inner if isinstance(inner, str) else None)
            status = task.get("status")
            request_id = None
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise MalformedResponse("Kling created a task without a task_id", detail=payload)
        # A gateway never calls back: poll at the normal pace.
        return SubmitResult(task_id=str(task_id), request_id=_str_or_none(request_id),
                            status=None if status is None else str(status),
                            state=KlingTask(family=family, gateway=not isinstance(payload.get("code"), int) or None),
                            callback_expected=False if gateway else None)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        family = KlingTask.of(task).family or family_of(task.request)
        url = f"{self.base_url}{family_path(family)}/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        payload = _json_or_error(response, creates=False)
        raise_for_error(response, payload, creates=False)
        return parse_task_response(payload, family)

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Query the task by our ``external_task_id`` (the job's reference); gateways cannot do this."""
        family = family_of(request)
        if self.gateway_mode(ctx) or family in NO_EXTERNAL_ID:
            return None
        url = f"{self.base_url}{family_path(family)}/{request.reference}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        payload = _json_or_error(response, creates=False)
        try:
            raise_for_error(response, payload, creates=False)
        except TaskNotFound:
            return None
        task = payload.get("data")
        if not isinstance(task, dict) or not isinstance(task.get("task_id"), str | int):
            return None
        info = task.get("task_info")
        external = info.get("external_task_id") if isinstance(info, dict) else None
        if external not in (None, "", request.reference):
            return None
        return SubmitResult(task_id=str(task["task_id"]), request_id=_str_or_none(payload.get("request_id")),
                            status=_str_or_none(task.get("task_status")), state=KlingTask(family=family))

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Kling signs nothing: the per-job token in the URL authenticates; this only parses."""
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Kling callback body is not JSON") from exc
        if isinstance(obj, dict) and isinstance(obj.get("data"), dict) and "task_id" in obj["data"]:
            obj = obj["data"]  # tolerate an enveloped body
        if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str | int):
            raise CallbackRejected("Kling callback body is not a task object")
        return CallbackHint(task_id=str(obj["task_id"]), raw_status=_str_or_none(obj.get("task_status")))

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """Kling's CDN links are signed (no auth). A gateway's own content URLs take its key."""
        parts = urlsplit(url)
        if self.gateway_mode(ctx) and (parts.scheme, parts.hostname or "", parts.port) == self._origin:
            return {"Authorization": f"Bearer {ctx.api_key}"}
        return {}


# -- responses ------------------------------------------------------------------------

def parse_task_response(payload: dict[str, Any], family: str = TEXT2VIDEO) -> TaskStatus:
    """A status answer in any of the shapes Kling or a new-api gateway give, for a task of ``family``."""
    code = payload.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        task = expect_object(payload.get("data"), "task")
        return parse_kling_task(task, request_id=_str_or_none(payload.get("request_id")), family=family)
    if code == "success":
        return parse_gateway_task(expect_object(payload.get("data"), "gateway task"))
    if "task_status" in payload:  # a bare task object (the callback shape)
        return parse_kling_task(payload, family=family)
    raise MalformedResponse("Kling answered a status in an unknown shape", detail=_excerpt(payload))


def parse_kling_task(task: dict[str, Any], request_id: str | None = None, family: str = TEXT2VIDEO) -> TaskStatus:
    raw = task.get("task_status")
    if not isinstance(raw, str):
        raise MalformedResponse("Kling task has no task_status", detail=_excerpt(task))
    state = _KLING_STATES.get(raw)
    if state is None:
        log.warning("kling: unknown task_status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, request_id=request_id)
    if state == "succeeded":
        status.progress = 100
        images = family in IMAGE_FAMILIES
        status.outputs = _images(task) if images else _videos(task)
        if not status.outputs:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = f"Kling reported success without {'an image' if images else 'a video'}"
        elif not images:  # what a follow-up (extend, lip_sync) sends as video_id
            status.task_state = KlingTask(video_ids=[str(o.metadata.get("id", "")) for o in status.outputs])
    elif state == "failed":
        message = str(task.get("task_status_msg") or "Kling reported the task failed")
        status.error_code = _failure_code(message)
        status.error_message = message
        status.error_detail = {"task_id": task.get("task_id"), "task_status_msg": task.get("task_status_msg")}
    return status


def parse_gateway_task(row: dict[str, Any]) -> TaskStatus:
    """A new-api TaskDto: trust its top-level ``status``, never the raw upstream ``data``."""
    raw = row.get("status")
    raw = "" if raw is None else str(raw)
    state = _GATEWAY_STATES.get(raw)
    if state is None:
        log.warning("kling via gateway: unknown task status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(row.get("progress")))
    upstream = row.get("data")
    upstream_task = upstream.get("data") if isinstance(upstream, dict) else None
    if state == "succeeded":
        status.progress = 100
        status.outputs = _videos(upstream_task) if isinstance(upstream_task, dict) else []
        result_url = row.get("result_url")
        if not status.outputs and isinstance(result_url, str) and result_url.startswith(("https://", "http://")):
            status.outputs = [ProviderOutput(url=result_url, content_type="video/mp4")]
        if not status.outputs:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "the gateway reported success without a video URL"
    elif state == "failed":
        reason = str(row.get("fail_reason") or "")
        if not reason and isinstance(upstream_task, dict):
            reason = str(upstream_task.get("task_status_msg") or "")
        timed_out = "超时" in reason or "timeout" in reason.lower()
        status.error_code = "provider_gateway_timeout" if timed_out else _failure_code(reason)
        status.error_message = (f"the gateway gave up on the task: {reason}" if timed_out
                                else reason or "the gateway reported the task failed")
        status.error_detail = {"task_id": row.get("task_id"), "fail_reason": row.get("fail_reason")}
    return status


def _videos(task: dict[str, Any]) -> list[ProviderOutput]:
    """``task_result.videos[{id, url, duration}]``; an extension's or lip-sync's ``task_info.parent_video``
    id is kept as ``parent_video_id``."""
    result = task.get("task_result")
    videos = result.get("videos") if isinstance(result, dict) else None
    info = task.get("task_info")
    parent = info.get("parent_video") if isinstance(info, dict) else None
    parent_id = parent.get("id") if isinstance(parent, dict) else None
    outputs = []
    for video in videos if isinstance(videos, list) else []:
        if isinstance(video, dict) and isinstance(video.get("url"), str) and video["url"]:
            meta = {k: str(video[k]) for k in ("id", "duration") if video.get(k) not in (None, "")}
            if isinstance(parent_id, str) and parent_id:
                meta["parent_video_id"] = parent_id
            outputs.append(ProviderOutput(url=video["url"], content_type="video/mp4", metadata=meta))
    return outputs


def _images(task: dict[str, Any]) -> list[ProviderOutput]:
    """``task_result.images[{index, url}]`` (the raw image, not its ``watermark_url``), in index order."""
    result = task.get("task_result")
    images = result.get("images") if isinstance(result, dict) else None
    found = []
    for position, image in enumerate(images if isinstance(images, list) else []):
        if isinstance(image, dict) and isinstance(image.get("url"), str) and image["url"]:
            index = image.get("index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else position
            content_type = mimetypes.guess_type(urlsplit(image["url"]).path)[0]
            found.append((index, ProviderOutput(url=image["url"], content_type=content_type,
                                                metadata={"index": index})))
    return [output for _, output in sorted(found, key=lambda pair: pair[0])]


def _failure_code(message: str) -> str:
    """Kling's failed tasks carry only text; its risk-control refusals get their own code."""
    return "provider_content_filtered" if "risk control" in message.lower() else "provider_failed"


def _percent(value: Any) -> int | None:
    try:
        return max(0, min(100, int(float(str(value).rstrip("%")))))
    except (TypeError, ValueError):
        return None


# -- errors ---------------------------------------------------------------------------

def _json_or_error(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The body as an object; a non-JSON error body is mapped by its HTTP status."""
    try:
        body = response.json()
    except ValueError:
        if response.status_code == 404 and creates:
            raise Rejected("the Kling base URL does not serve /v1/videos (through a new-api gateway "
                           "it is the gateway's Kling mount, e.g. https://gateway.example.com/kling)",
                           detail={"body_excerpt": response.text[:200]}, status_code=404) from None
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    return expect_object(body, "response")


def raise_for_error(response: httpx.Response, payload: dict[str, Any], *, creates: bool) -> None:
    """Raise the provider error a Kling or gateway answer stands for (nothing if it is a success)."""
    code = payload.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        if code != 0:
            raise kling_error(code, str(payload.get("message") or ""), response, creates=creates,
                              detail=_detail(payload))
        raise_for_common_status(response, creates=creates, detail=_detail(payload))
        return
    if isinstance(code, str) and code != "success":
        raise _gateway_error(code, str(payload.get("message") or ""), response, creates=creates,
                             detail=_detail(payload))
    error = payload.get("error")
    if isinstance(error, dict):  # OpenAI-style errors of gateways (auth, distribution)
        detail = {"error": {k: error.get(k) for k in ("message", "type", "code")}}
        if response.status_code != 429 and gateway_quota_exhausted(error.get("code"), str(error.get("message") or "")):
            raise InsufficientBalance(f"the gateway says the key's quota is used up: {error.get('message')}",
                                      detail=detail, status_code=response.status_code)
        if error.get("code") == "model_not_found":
            raise Rejected(f"the gateway serves no channel for this model: {error.get('message')}",
                           code="model_not_found", detail=detail, status_code=response.status_code)
        raise_for_common_status(response, creates=creates, detail=detail)
        raise Rejected(f"the gateway refused the request: {error.get('message')}", detail=detail,
                       status_code=response.status_code)
    raise_for_common_status(response, creates=creates, detail=_excerpt(payload))


def kling_error(code: int, message: str, response: httpx.Response, *, creates: bool,
                detail: Any = None) -> ProviderError:
    """Kling's business codes, which decide what an error means (not the HTTP status)."""
    status = response.status_code
    text = f"Kling {code}: {message}" if message else f"Kling error {code}"
    if 1000 <= code <= 1004:
        return AuthFailed(f"{text} (the API token was refused)", detail=detail, status_code=status)
    if code == 1304:
        return AuthFailed(f"{text} (IP allow-list)", detail=detail, status_code=status)
    if code in (1101, 1102):
        return InsufficientBalance(f"{text} (resource pack or balance exhausted; not retried)",
                                   detail=detail, status_code=status)
    if code in (1302, 1303):
        reason = "rate limit" if code == 1302 else "concurrency limit of the resource pack"
        return RateLimited(f"{text} ({reason}; waiting)", retry_after=retry_after_seconds(response.headers),
                           detail=detail, status_code=status)
    if code == 1203 and not creates:
        return TaskNotFound(text, detail=detail, status_code=status)
    if code >= 5000:
        if code == 5001 or not creates:
            return Unavailable(text, detail=detail, status_code=status)
        return OutcomeUnknown(f"{text} after a submission", detail=detail, status_code=status)
    return Rejected(text, detail=detail, status_code=status, code={
        1100: "provider_account_error",
        1103: "provider_forbidden",
        1200: "provider_rejected_input",
        1201: "provider_rejected_input",
        1203: "model_not_found",
        1300: "provider_policy",
        1301: "provider_content_filtered",
    }.get(code, "provider_rejected"))


def _gateway_error(code: str, message: str, response: httpx.Response, *, creates: bool,
                   detail: Any) -> ProviderError:
    """new-api task errors ``{code: "<string>", message, data: null}``."""
    status = response.status_code
    try:
        upstream = json.loads(message)
    except ValueError:
        upstream = None
    if isinstance(upstream, dict) and isinstance(upstream.get("code"), int):  # Kling's body, relayed
        return kling_error(upstream["code"], str(upstream.get("message") or ""), response, creates=creates,
                           detail=detail)
    if code == "task_not_exist" and not creates:
        return TaskNotFound(f"the gateway does not know this task ({message})", detail=detail, status_code=status)
    if status != 429 and gateway_quota_exhausted(code, message):
        return InsufficientBalance(f"the gateway says the key's quota is used up: {code}: {message}",
                                   detail=detail, status_code=status)
    try:
        raise_for_common_status(response, creates=creates, detail=detail)
    except ProviderError as exc:
        exc.message = f"{exc.message}: {code}: {message}"
        return exc
    return Rejected(f"the gateway refused the request: {code}: {message}", detail=detail, status_code=status)


def _detail(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload[k] for k in ("code", "message", "request_id") if k in payload}


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str)[:300]}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
