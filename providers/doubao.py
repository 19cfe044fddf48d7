"""ByteDance Volcengine Ark (Doubao): Seedance video tasks and synchronous Seedream images.

The API lives under ``/api/v3``; the base URL may name it (the default, China's
``https://ark.cn-beijing.volces.com/api/v3``; BytePlus ModelArk is
``https://ark.ap-southeast.bytepluses.com/api/v3`` with its own model ids and keys) or stop at
the host (a sandbox mount, a proxy), in which case the path is added. Auth:
``Authorization: Bearer <ARK_API_KEY>``. ``model`` may also be an endpoint id (``ep-...``).

Video (``seedance`` models), a task:

* ``POST /contents/generations/tasks`` ``{model, content[], callback_url, ...}`` -> ``{"id": "cgt-..."}``.
  ``content[]`` is one ``text`` item and ``image_url`` items: ``image_url`` -> role
  ``first_frame``; ``options.last_frame`` -> ``last_frame`` (with a first frame: Ark requires
  both roles); ``options.reference_images`` (1-4) -> ``reference_image`` (never mixed with frames).
  ``aspect_ratio`` -> ratio, ``duration_seconds`` -> duration, ``resolution`` -> resolution
  (480p/720p/1080p), ``seed``, and ``options`` ``frames``/``camera_fixed``/``watermark`` are the
  generation parameters: 1.0 models take them only as ``--ratio 16:9 --duration 5 ...`` flags at
  the end of the text, models from 1.5 on as top-level fields (``extra["body_param_models"]``:
  fnmatch patterns of the models sent fields; whether a model takes both is UNCONFIRMED, so one
  style is used per model). A flag the prompt already carries for a parameter Atelier sets is
  removed from the text. ``generate_audio``/``draft`` exist only as fields; ``return_last_frame``,
  ``service_tier``, ``execution_expires_after`` are passed as they are.
* ``GET .../tasks/{id}``: ``queued`` -> queued, ``running`` -> running (new-api's ``pending`` and
  ``processing`` too), ``succeeded`` -> ``content.video_url`` (and ``last_frame_url``, a second
  output), ``failed`` -> ``error{code, message}``, ``expired`` (a flex task not started within
  ``execution_expires_after``) -> failed ``provider_expired``, ``cancelled`` -> canceled. A finished
  task's ``usage.completion_tokens`` (what Seedance bills) is the task's ``usage``.
* Cancel: ``DELETE .../tasks/{id}`` cancels a *queued* task only; on a finished task it deletes
  the record, so the task is read first and a DELETE is sent only while it is queued.
* Callbacks: the task object, unsigned, POSTed on each status change: the per-job token in the
  callback URL authenticates it, and the state applied is the one fetched.
* Reconcile: no client id exists and the prompt is not echoed. ``GET .../tasks?filter.model=``
  lists the last 7 days (order UNCONFIRMED: either is read); a task matches when its echoed
  parameters (ratio, resolution, duration/frames, seed, service tier) equal the ones sent and it
  was created after the submission started (else within ``extra["reconcile_slack_seconds"]``, 5,
  before it: clock skew). Only a single match is taken: with two, either could be another job's,
  and the job fails ``provider_outcome_unknown`` instead (a ``seed`` per job makes matches unique).

Images (``seedream``/``seededit`` models): ``POST /images/generations`` answers synchronously, so
the submit carries the result (``SubmitResult.done``), the task id is the job's id and there is
nothing to fetch, cancel or look up (an ambiguous call fails ``provider_outcome_unknown``).
``image_url`` and ``options.images`` -> ``image``; ``resolution`` a ``1K/2K/4K`` label or
``WIDTHxHEIGHT`` and ``aspect_ratio`` -> ``size``; ``num_outputs`` > 1 -> ``sequential_image_generation:
"auto"`` with ``max_images`` (Ark may return fewer); ``seed`` on 3.0 models only. ``data[]`` items
are ``url`` (signed TOS URLs valid 24 h, collected at once and never re-encoded) or ``b64_json``
(-> ``data:`` URLs, stored at once). A 200 may hold failed members (``{"error": {code, message}}``):
the good images are kept (each output's metadata lists the failed ones); when all failed the job
fails with the first error (``content_policy`` for moderation). ``usage.generated_images`` (only
the images made are billed) and ``usage.output_tokens`` are the task's ``usage``.

Errors ``{"error": {code, message, param, type}}`` (also inside a 200): ``*SensitiveContentDetected*``
and ``*RiskDetection`` -> ``content_policy``; 429 and ``RateLimitExceeded*``/``QuotaExceeded``/
``ServerOverloaded``/``SetLimitExceeded`` -> RateLimited; ``AccountOverdueError`` -> InsufficientBalance;
``AuthenticationError`` -> AuthFailed; ``ModelNotOpen``/``InvalidEndpointOrModel.NotFound``/
``ServiceNotOpen``/``InvalidEndpoint.*`` -> ``model_not_found``; ``AccessDenied``/``OperationDenied*``
-> ``provider_forbidden`` (the key stays: it may serve other models); other 400s ->
``provider_rejected_input``; 404 on a read -> TaskNotFound; 5xx after a create -> OutcomeUnknown.

``extra``: ``body_param_models`` (fnmatch patterns), ``reconcile_slack_seconds`` (5),
``reconcile_pages`` (3).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

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
    TaskStatus,
)
from providers.errors import (
    AmbiguousMatch,
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send
from providers.usage import count, usage

log = logging.getLogger(__name__)

API_PATH = "/api/v3"
TASKS = "/contents/generations/tasks"
IMAGES = "/images/generations"
VIDEO_MODEL = re.compile(r"seedance|^ep-")
IMAGE_MODEL = re.compile(r"seedream|seededit|^ep-")
SEED_IMAGE_MODEL = re.compile(r"-3-0-|^ep-")  # Seedream 3.0 / SeedEdit 3.0 document seed and guidance_scale
# Models from 1.5 on take the generation parameters as top-level fields (1.0 only as text flags).
BODY_PARAM_MODELS = ("*seedance-1-5-*", "*seedance-2-*")
RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive")
RESOLUTIONS = ("480p", "720p", "1080p")
LABELS = {"1K": 1024, "2K": 2048, "4K": 4096}
MAX_SEED = 2**32 - 1
MAX_REFERENCES = 4
LIST_PAGE = 100
# The generation parameters, their text flag and the aliases Ark reads in a prompt.
FLAGS = {"ratio": ("ratio", "rt"), "duration": ("duration", "dur"), "frames": ("frames",),
         "resolution": ("resolution", "rs"), "seed": ("seed",), "camera_fixed": ("camerafixed", "cf"),
         "watermark": ("watermark", "wm")}
BODY_ONLY = ("generate_audio", "draft")
TASK_FIELDS = ("return_last_frame", "service_tier", "execution_expires_after")
VIDEO_OPTIONS = frozenset({"last_frame", "reference_images", "frames", "camera_fixed", "watermark", *BODY_ONLY,
                           *TASK_FIELDS})
IMAGE_OPTIONS = frozenset({"images", "size", "response_format", "watermark", "output_format", "guidance_scale",
                           "optimize_prompt_options"})
# Set by Atelier (from the common fields) or never passed through.
RESERVED = {"model": "model", "content": "prompt and image_url", "callback_url": None, "prompt": "prompt",
            "image": "image_url", "ratio": "aspect_ratio", "duration": "duration_seconds",
            "resolution": "resolution", "seed": "seed", "n": "num_outputs", "stream": None,
            "sequential_image_generation": "num_outputs", "sequential_image_generation_options": "num_outputs"}
# Echoed by a task object: what reconcile compares.
ECHOED = ("ratio", "resolution", "duration", "frames", "seed", "service_tier", "generate_audio")

_STATES: dict[str, ProviderState] = {
    "queued": "queued",
    "pending": "queued",
    "running": "running",
    "processing": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "expired": "failed",
    "cancelled": "canceled",
}
RATE_CODES = ("RateLimitExceeded", "QuotaExceeded", "ServerOverloaded", "SetLimitExceeded")
MODEL_CODES = ("ModelNotOpen", "InvalidEndpointOrModel", "InvalidEndpoint", "ServiceNotOpen",
               "OperationDenied.ServiceNotOpen")
_CONTENT = re.compile(r"SensitiveContentDetected|RiskDetection")


def content_refusal(code: str) -> bool:
    return bool(_CONTENT.search(code))


def _image_ref(field: str, value: Any) -> str:
    """An image Ark fetches: an http(s) URL, a ``data:image/...;base64,`` URL or an ``asset://`` id."""
    ok = isinstance(value, str) and (
        (value.startswith("data:image/") and ";base64," in value) or value.startswith("asset://")
        or (urlsplit(value).scheme in ("http", "https") and bool(urlsplit(value).hostname)))
    if not ok:
        raise InvalidInput(field, "an image is an http(s) URL, a data:image/...;base64 URL or an asset:// id")
    return str(value)


def _check_options(given: MediaInput, allowed: frozenset[str], kind: str) -> None:
    for key in given.options:
        if key in RESERVED:
            target = RESERVED[key]
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use '{target}' instead" if target
                               else "set by Atelier")
        if key not in allowed:
            raise InvalidInput(f"input.options.{key}", f"not an Ark {kind} parameter Atelier passes on "
                                                       f"(allowed: {', '.join(sorted(allowed))})")


def _bool_option(opts: Mapping[str, Any], key: str) -> bool | None:
    if key not in opts:
        return None
    if not isinstance(opts[key], bool):
        raise InvalidInput(f"input.options.{key}", f"{key} is true or false")
    return bool(opts[key])


def _whole(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


# -- video requests -----------------------------------------------------------------------

def video_params(given: MediaInput) -> dict[str, Any]:
    """The generation parameters of a Seedance job (flags or fields), typed as a task echoes them."""
    opts = given.options
    params: dict[str, Any] = {}
    if given.aspect_ratio is not None:
        if given.aspect_ratio not in RATIOS:
            raise InvalidInput("input.aspect_ratio", f"Seedance renders {', '.join(RATIOS)}")
        params["ratio"] = given.aspect_ratio
    if given.resolution is not None:
        resolution = given.resolution.lower()
        if resolution not in RESOLUTIONS:
            raise InvalidInput("input.resolution", f"Seedance renders {', '.join(RESOLUTIONS)}")
        params["resolution"] = resolution
    if given.duration_seconds is not None:
        if not _whole(given.duration_seconds) or given.duration_seconds <= 0:
            raise InvalidInput("input.duration_seconds", "Seedance takes a whole number of seconds (per model, "
                                                         "e.g. 5 or 10)")
        params["duration"] = int(given.duration_seconds)
    if "frames" in opts:
        frames = opts["frames"]
        if not _whole(frames) or frames < 25 or (int(frames) - 25) % 4:
            raise InvalidInput("input.options.frames", "frames is 25 + 4n")
        if "duration" in params:
            raise InvalidInput("input.options.frames", "give either duration_seconds or frames")
        params["frames"] = int(frames)
    if given.seed is not None:
        if not -1 <= given.seed <= MAX_SEED:
            raise InvalidInput("input.seed", f"Seedance seeds are -1 (random) to {MAX_SEED}")
        params["seed"] = given.seed
    for key in ("camera_fixed", "watermark", *BODY_ONLY):
        value = _bool_option(opts, key)
        if value is not None:
            params[key] = value
    return params


def _content_images(given: MediaInput) -> list[dict[str, Any]]:
    opts = given.options
    items: list[dict[str, Any]] = []

    def item(url: str, role: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": url}, "role": role}

    if given.image_url is not None:
        items.append(item(_image_ref("input.image_url", given.image_url), "first_frame"))
    if "last_frame" in opts:
        if given.image_url is None:
            raise InvalidInput("input.options.last_frame", "a last frame needs the first frame (image_url)")
        items.append(item(_image_ref("input.options.last_frame", opts["last_frame"]), "last_frame"))
    if "reference_images" in opts:
        refs = opts["reference_images"]
        if not isinstance(refs, list) or not 1 <= len(refs) <= MAX_REFERENCES:
            raise InvalidInput("input.options.reference_images", f"reference_images is a list of 1 to "
                                                                 f"{MAX_REFERENCES} images")
        if items:
            raise InvalidInput("input.options.reference_images", "reference images cannot be combined with a "
                                                                 "first or last frame (image_url)")
        items += [item(_image_ref(f"input.options.reference_images[{i}]", url), "reference_image")
                  for i, url in enumerate(refs)]
    return items


def strip_flags(text: str, params: set[str]) -> str:
    """The prompt without the ``--flag value`` pairs of the parameters Atelier sets."""
    names = [alias for key in params if key in FLAGS for alias in FLAGS[key]]
    if not names:
        return text
    pattern = re.compile(r"\s*--(?:" + "|".join(sorted(names, key=len, reverse=True)) + r")\s+\S+(?=\s|$)")
    return pattern.sub("", text).strip()


def _flag_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def video_body(model: str, given: MediaInput, body_style: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(create body, generation parameters)`` of a Seedance job; raises ``InvalidInput`` naming the field."""
    if not VIDEO_MODEL.search(model):
        raise InvalidInput("model", "Ark video models are Seedance models (doubao-seedance-1-0-pro-250528, "
                                    "seedance-1-0-pro-250528 on BytePlus...) or endpoint ids (ep-...)")
    if given.negative_prompt is not None:
        raise InvalidInput("input.negative_prompt", "Seedance has no negative prompt")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Seedance renders one video per task")
    _check_options(given, VIDEO_OPTIONS, "video")
    params = video_params(given)
    if not body_style:
        for key in BODY_ONLY:
            if key in params:
                raise InvalidInput(f"input.options.{key}", f"{model} takes its parameters as text flags; {key} "
                                                           "needs a model from Seedance 1.5 on")
    images = _content_images(given)
    prompt = strip_flags(given.prompt or "", set(params))
    if not prompt and not images:
        raise InvalidInput("input.prompt", "Seedance text-to-video needs a prompt")
    text = prompt
    if not body_style:
        flags = " ".join(f"--{FLAGS[key][0]} {_flag_value(value)}" for key, value in params.items())
        text = f"{prompt} {flags}".strip()
    body: dict[str, Any] = {"model": model, "content": [{"type": "text", "text": text}, *images]}
    if body_style:
        body.update(params)
    opts = given.options
    if _bool_option(opts, "return_last_frame") is not None:
        body["return_last_frame"] = opts["return_last_frame"]
    if "service_tier" in opts:
        if opts["service_tier"] not in ("default", "flex"):
            raise InvalidInput("input.options.service_tier", "service_tier is default or flex")
        body["service_tier"] = params["service_tier"] = opts["service_tier"]
    if "execution_expires_after" in opts:
        seconds = opts["execution_expires_after"]
        if not _whole(seconds) or seconds <= 0:
            raise InvalidInput("input.options.execution_expires_after", "a whole number of seconds")
        body["execution_expires_after"] = int(seconds)
    return body, params


# -- image requests -----------------------------------------------------------------------

def image_size(model: str, given: MediaInput) -> str | None:
    """Ark's ``size``: a label (1K/2K/4K), ``WIDTHxHEIGHT``, or computed from the aspect ratio."""
    resolution, ratio = given.resolution, given.aspect_ratio
    label = resolution.upper() if resolution is not None and resolution.upper() in LABELS else None
    explicit = re.fullmatch(r"(\d{2,5})[x*](\d{2,5})", resolution or "")
    if resolution is not None and label is None and explicit is None:
        raise InvalidInput("input.resolution", "Seedream takes 1K, 2K, 4K or WIDTHxHEIGHT")
    if "size" in given.options:
        if resolution is not None or ratio is not None:
            raise InvalidInput("input.options.size", "give the size once (options.size, or resolution and "
                                                     "aspect_ratio)")
        if not isinstance(given.options["size"], str):
            raise InvalidInput("input.options.size", "size is a label or WIDTHxHEIGHT")
        return str(given.options["size"])
    if ratio is None:
        return label or (f"{explicit.group(1)}x{explicit.group(2)}" if explicit else None)
    if explicit is not None:
        raise InvalidInput("input.aspect_ratio", "give either a WIDTHxHEIGHT resolution or an aspect ratio")
    match = re.fullmatch(r"(\d+):(\d+)", ratio)
    if match is None or not int(match.group(1)) or not int(match.group(2)):
        raise InvalidInput("input.aspect_ratio", "an aspect ratio such as 16:9")
    side = LABELS[label] if label else (1024 if SEED_IMAGE_MODEL.search(model) else 2048)
    r = int(match.group(1)) / int(match.group(2))
    width, height = round(side * math.sqrt(r) / 16) * 16, round(side / math.sqrt(r) / 16) * 16
    return f"{width}x{height}"


def image_body(model: str, given: MediaInput) -> dict[str, Any]:
    """The ``images/generations`` body of a Seedream job; raises ``InvalidInput`` naming the field."""
    if not IMAGE_MODEL.search(model):
        raise InvalidInput("model", "Ark image models are Seedream/SeedEdit models (doubao-seedream-4-0-250828, "
                                    "seedream-4-0-250828 on BytePlus...) or endpoint ids (ep-...)")
    for common in ("negative_prompt", "duration_seconds"):
        if getattr(given, common) is not None:
            raise InvalidInput(f"input.{common}", f"Seedream has no {common.replace('_', ' ')}")
    if not (given.prompt or "").strip():
        raise InvalidInput("input.prompt", "Seedream needs a prompt")
    _check_options(given, IMAGE_OPTIONS, "image")
    opts = given.options
    body: dict[str, Any] = {"model": model, "prompt": given.prompt, "response_format": "url"}
    refs = opts.get("images", [])
    if not isinstance(refs, list):
        raise InvalidInput("input.options.images", "images is a list of image URLs")
    images = [_image_ref(f"input.options.images[{i}]", url) for i, url in enumerate(refs)]
    if given.image_url is not None:
        images.insert(0, _image_ref("input.image_url", given.image_url))
    if images:
        body["image"] = images[0] if len(images) == 1 else images
    size = image_size(model, given)
    if size is not None:
        body["size"] = size
    seeded = bool(SEED_IMAGE_MODEL.search(model))
    for key in ("seed", "guidance_scale"):
        value = given.seed if key == "seed" else opts.get(key)
        if value is None:
            continue
        field = "input.seed" if key == "seed" else f"input.options.{key}"
        if not seeded:
            raise InvalidInput(field, f"{key} is for Seedream 3.0 / SeedEdit 3.0 models, not {model}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(field, f"{key} is a number")
        body[key] = value
    n = given.num_outputs or 1
    if n > 1:
        if seeded and not model.startswith("ep-"):
            raise InvalidInput("input.num_outputs", f"{model} renders one image per request")
        if n > 15:
            raise InvalidInput("input.num_outputs", "Seedream renders at most 15 images per request")
        body["sequential_image_generation"] = "auto"
        body["sequential_image_generation_options"] = {"max_images": n}
    if "response_format" in opts:
        if opts["response_format"] not in ("url", "b64_json"):
            raise InvalidInput("input.options.response_format", "response_format is url or b64_json")
        body["response_format"] = opts["response_format"]
    if "output_format" in opts and opts["output_format"] not in ("png", "jpeg"):
        raise InvalidInput("input.options.output_format", "output_format is png or jpeg")
    if _bool_option(opts, "watermark") is not None:
        body["watermark"] = opts["watermark"]
    body.update({k: opts[k] for k in ("output_format", "optimize_prompt_options") if k in opts})
    return body


# -- the adapter ------------------------------------------------------------------------

class DoubaoProvider(Provider):
    name = "doubao"
    default_base_url = "https://ark.cn-beijing.volces.com/api/v3"
    default_typical_seconds = {"video": 90, "image": 20}
    # Seedance's commonly quoted limit is 10 concurrent tasks per model (UNCONFIRMED); an image call
    # holds its slot for its whole run.
    default_concurrency = 10
    kinds = frozenset({MediaKind.video, MediaKind.image})
    # Images are synchronous (their submit carries the result); videos are tasks.
    synchronous = False
    supports_cancel = True
    supports_callbacks = True
    callback_auth = "token"
    retention = ("video and image URLs are signed TOS links valid 24 h; task records 7 days (a cancelled "
                 "one 24 h)")

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self.api = self.base_url if self.base_url.endswith(API_PATH) else self.base_url + API_PATH
        self.body_param_models = tuple(settings.extra.get("body_param_models", BODY_PARAM_MODELS))
        self.reconcile_slack = float(settings.extra.get("reconcile_slack_seconds", 5.0))
        self.reconcile_pages = int(settings.extra.get("reconcile_pages", 3))

    def body_style(self, model: str) -> bool:
        """Whether ``model`` is sent its generation parameters as fields (else as text flags)."""
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.body_param_models)

    def build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """``(path, body)`` of the create call; raises ``InvalidInput`` naming the field."""
        if request.kind == MediaKind.image:
            return IMAGES, image_body(request.model, request.input)
        return TASKS, video_body(request.model, request.input, self.body_style(request.model))[0]

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.build(request)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier", "Accept": "application/json"}

    async def _call(self, ctx: CallContext, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await send(ctx.http, ctx.http.build_request(method, self.api + path, headers=self._headers(ctx),
                                                               **kwargs))
        return _answer(response, creates=False)

    # -- the task ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        path, body = self.build(request)
        image = request.kind == MediaKind.image
        if ctx.callback_url and not image:
            body["callback_url"] = ctx.callback_url
        response = await send(ctx.http, ctx.http.build_request("POST", self.api + path, json=body,
                                                               headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        payload = _answer(response, creates=True)
        request_id = response.headers.get("x-request-id")
        if image:
            done = images_status(payload, request.model)
            done.request_id = request_id
            return SubmitResult(task_id=request.reference, request_id=request_id, status=done.raw_status, done=done,
                                callback_expected=False)
        task_id = payload.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("Ark created a task without an id", detail=_excerpt(payload))
        return SubmitResult(task_id=task_id, request_id=request_id, status="queued")

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        if task.request.kind == MediaKind.image:
            raise TaskNotFound("a Seedream image call is synchronous: there is no task to fetch")
        return parse_task(await self._call(ctx, "GET", f"{TASKS}/{task.task_id}"))

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        """DELETE cancels a queued task, but deletes a finished one's record: read it first."""
        if task.request.kind == MediaKind.image:
            return False  # the call is over: nothing runs at Ark
        current = await self._call(ctx, "GET", f"{TASKS}/{task.task_id}")
        status = current.get("status")
        if status in ("queued", "pending"):
            await self._call(ctx, "DELETE", f"{TASKS}/{task.task_id}")
            return True
        if status in ("running", "processing"):
            raise Rejected("Ark cancels only queued tasks: this one is running and will finish (and bill)")
        return True  # finished already: nothing runs there (and its record is kept)

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Find a task created for this submission in the task list (no client id exists)."""
        if request.kind == MediaKind.image:
            return None  # a synchronous call leaves nothing to look up
        _, sent = video_body(request.model, request.input, self.body_style(request.model))
        after: list[dict[str, Any]] = []
        before: list[dict[str, Any]] = []
        async for item in self._recent_tasks(ctx, request.model, since - self.reconcile_slack):
            created = item["created_at"]
            if created > time.time() + self.reconcile_slack or any(item.get(k) != v for k, v in sent.items()
                                                                   if k in ECHOED and (k, v) != ("seed", -1)):
                continue
            (after if created >= math.floor(since) else before).append(item)
        # Only an unambiguous match: another job's task with the same parameters must never be taken.
        candidates = after or before
        found = [SubmitResult(task_id=item["id"], status=_str_or_none(item.get("status")),
                              callback_expected=bool(ctx.callback_url)) for item in candidates]
        if len(found) > 1:  # Ark echoes no prompt: like tasks cannot be told apart here
            raise AmbiguousMatch(f"{len(found)} Ark tasks match the lost create", found)
        return found[0] if found else None

    async def _recent_tasks(self, ctx: CallContext, model: str, oldest: float) -> AsyncIterator[dict[str, Any]]:
        """Tasks of ``model`` created at ``oldest`` or later, read from the recent end of the list
        whichever way Ark orders it (newest first is UNCONFIRMED)."""
        params: dict[str, Any] = {"page_size": LIST_PAGE}
        if not model.startswith("ep-"):  # a task names the model behind an endpoint, not the endpoint
            params["filter.model"] = model
        page, step = 1, 1
        for _ in range(self.reconcile_pages):
            listing = await self._call(ctx, "GET", TASKS, params=params | {"page_num": page})
            if not isinstance(listing.get("items"), list):
                raise MalformedResponse("Ark's task list has no items", detail=_excerpt(listing))
            items = [t for t in listing["items"] if isinstance(t, dict) and isinstance(t.get("id"), str)
                     and _whole(t.get("created_at"))]
            if not items:
                return
            total = listing.get("total")
            pages = math.ceil(total / LIST_PAGE) if isinstance(total, int) else 1
            if page == 1 and items[0]["created_at"] < items[-1]["created_at"] and pages > 1:
                page, step = pages, -1  # oldest first: the recent ones are at the end
                continue
            for item in items:
                if item["created_at"] >= oldest:
                    yield item
            page += step
            if min(t["created_at"] for t in items) < oldest or page < 1 or (step == 1 and len(items) < LIST_PAGE):
                return

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Ark signs nothing: the per-job token in the URL authenticates; this only parses."""
        try:
            task = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Ark callback body is not JSON") from exc
        if not isinstance(task, dict) or not isinstance(task.get("id"), str) or not task["id"]:
            raise CallbackRejected("Ark callback body is not a task")
        return CallbackHint(task_id=task["id"], raw_status=_str_or_none(task.get("status")))

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        return {}  # signed TOS URLs: no auth (and never the API key)


# -- responses ------------------------------------------------------------------------

def parse_task(task: dict[str, Any]) -> TaskStatus:
    """A Seedance task object (get, list item or callback body), translated."""
    raw, task_id = task.get("status"), task.get("id")
    if not isinstance(raw, str) or not isinstance(task_id, str):
        raise MalformedResponse("Ark task has no status or id", detail=_excerpt(task))
    state = _STATES.get(raw)
    if state is None:
        log.warning("doubao: unknown task status %r; treating it as still in progress", raw)
        return TaskStatus(state="unknown", raw_status=raw)
    status = TaskStatus(state=state, raw_status=raw)
    used = task.get("usage")
    if state in ("succeeded", "failed", "canceled") and isinstance(used, dict):
        status.usage = usage(tokens=count(used.get("completion_tokens")))  # Seedance bills by tokens
    if state == "succeeded":
        content = task.get("content")
        video = content.get("video_url") if isinstance(content, dict) else None
        if not _http_url(video):
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "Ark reported success without a video_url"
            status.error_detail = {"id": task_id, "content": content}
            return status
        assert isinstance(content, dict)
        metadata = {"task_id": task_id} | {k: task[k] for k in ("model", "seed", "resolution", "ratio", "duration",
                                                                 "frames", "framespersecond")
                                           if task.get(k) is not None}
        status.outputs = [ProviderOutput(url=str(video), content_type="video/mp4", metadata=metadata)]
        if _http_url(content.get("last_frame_url")):
            status.outputs.append(ProviderOutput(url=str(content["last_frame_url"]), content_type="image/png",
                                                 metadata={"task_id": task_id, "frame": "last"}))
        status.progress = 100
    elif raw == "expired":
        status.error_code = "provider_expired"
        status.error_message = "Ark expired the task before it ran (execution_expires_after passed)"
        status.error_detail = {"id": task_id}
    elif state == "failed":
        error = task["error"] if isinstance(task.get("error"), dict) else {}
        code, message = str(error.get("code") or ""), str(error.get("message") or "")
        status.error_code = _failure_code(code)
        status.error_message = f"Ark {code}: {message}" if code else "Ark reported the task failed"
        status.error_detail = {"id": task_id, "error": task.get("error")}
    return status


def images_status(body: dict[str, Any], model: str) -> TaskStatus:
    """A synchronous images answer as a finished task: the good images, whatever failed beside them."""
    data = body.get("data")
    if not isinstance(data, list):
        raise MalformedResponse("Ark answered the images request without a data list", detail=_excerpt(body))
    common: dict[str, Any] = {"model": body.get("model") or model}
    created = body.get("created", body.get("created_at"))  # the SDK's type says created_at (CONFLICT)
    if created is not None:
        common["created"] = created
    used = body.get("usage")
    if isinstance(used, dict):
        common["usage"] = used
    # Only the images made are billed (a failed member of a group is not).
    billed = usage(outputs=count(used.get("generated_images")),
                   tokens=count(used.get("output_tokens"))) if isinstance(used, dict) else None
    images: list[tuple[int, str, str | None, dict[str, Any]]] = []
    failures: list[dict[str, Any]] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            continue
        error, b64, url = item.get("error"), item.get("b64_json"), item.get("url")
        extra = {"size": item["size"]} if isinstance(item.get("size"), str) else {}
        if isinstance(error, dict):
            failures.append({"index": index, "code": error.get("code"), "message": error.get("message")})
        elif isinstance(b64, str) and b64:
            content_type = _sniff(b64)
            images.append((index, f"data:{content_type};base64,{b64}", content_type, extra))
        elif _http_url(url):
            images.append((index, str(url), None, extra))  # signed: used exactly as given
    if images:
        outputs = [ProviderOutput(url=url, content_type=content_type,
                                  metadata=common | extra | {"index": index} | ({"failed": failures} if failures
                                                                                 else {}))
                   for index, url, content_type, extra in images]
        raw = "partially_succeeded" if failures else "succeeded"
        return TaskStatus(state="succeeded", raw_status=raw, progress=100, outputs=outputs, usage=billed)
    if failures:
        first = failures[0]
        code = str(first["code"] or "")
        return TaskStatus(state="failed", raw_status="failed", error_code=_failure_code(code),
                          error_message=f"Ark {code}: {first['message']} ({len(failures)} of {len(failures)} "
                                        "images failed)",
                          error_detail={"failed": failures})
    return TaskStatus(state="failed", raw_status="no_image", error_code="provider_no_output",
                      error_message="Ark answered the images request without any image")


def _failure_code(code: str) -> str:
    if content_refusal(code):
        return "content_policy"
    if code.startswith(("InvalidParameter", "MissingParameter")):
        return "provider_rejected_input"
    return "provider_failed"


def _sniff(b64: str) -> str:
    try:
        head = base64.b64decode(b64[:16] + "=" * (-len(b64[:16]) % 4))
    except (binascii.Error, ValueError):
        return "image/jpeg"
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"  # Seedream 4.x always answers JPEG


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


# -- errors ---------------------------------------------------------------------------

def _answer(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The answer as an object once neither its HTTP status nor an ``error`` in it says it failed."""
    if response.status_code >= 500:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:300]})
    try:
        body = response.json()
    except ValueError:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    answer = expect_object(body, "answer")
    error = answer.get("error")
    # An error envelope, also inside an HTTP 200 (a task object's own ``error`` is its outcome).
    if isinstance(error, dict) and error.get("code") and not isinstance(answer.get("status"), str):
        raise ark_error(str(error["code"]), str(error.get("message") or ""), response, creates=creates,
                        detail={"error": {k: error.get(k) for k in ("code", "message", "param", "type")}})
    raise_for_common_status(response, creates=creates, detail=_excerpt(answer))
    return answer


def ark_error(code: str, message: str, response: httpx.Response, *, creates: bool, detail: Any) -> ProviderError:
    """What Ark's error ``code`` means (the HTTP status only where the code says nothing more)."""
    status = response.status_code
    text = f"Ark {code}: {message}"
    if content_refusal(code):
        return Rejected(text, code="content_policy", detail=detail, status_code=status)
    if status == 429 or code.startswith(RATE_CODES):
        return RateLimited(f"{text} (waiting)", retry_after=retry_after_seconds(response.headers), detail=detail,
                           status_code=status)
    if code.startswith("AccountOverdue"):
        return InsufficientBalance(text, detail=detail, status_code=status)
    if code == "AuthenticationError" or status == 401:
        return AuthFailed(f"{text} (a key of the other region's host?)", detail=detail, status_code=status)
    if code.startswith(MODEL_CODES):
        return Rejected(text, code="model_not_found", detail=detail, status_code=status)
    if code.startswith(("AccessDenied", "OperationDenied")):
        return Rejected(text, code="provider_forbidden", detail=detail, status_code=status)
    if status in (404, 410) and not creates:
        return TaskNotFound(text, detail=detail, status_code=status)
    if status == 403:
        return AuthFailed(text, detail=detail, status_code=status)
    code_for = "provider_rejected_input" if status == 400 else "provider_rejected"
    return Rejected(text, code=code_for, detail=detail, status_code=status)


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str)[:300]}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
