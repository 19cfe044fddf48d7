"""Alibaba Model Studio (DashScope): Wan video, Wan and Qwen-Image images.

The API lives under ``/api/v1``; the base URL may name it or stop at the host. The host picks
the region, and keys are bound to theirs: Singapore ``https://dashscope-intl.aliyuncs.com`` (the
default), Beijing ``https://dashscope.aliyuncs.com``, Virginia ``https://dashscope-us.aliyuncs.com``
(a key of another region answers 401 ``InvalidApiKey``). Auth: ``Authorization: Bearer sk-...``;
``extra["workspace"]`` adds ``X-DashScope-WorkSpace`` (RAM sub-account keys need it).

Video (Wan), an asynchronous task, created with ``X-DashScope-Async: enable`` (without it
DashScope answers an "access denied" that looks like a key problem):

* ``POST /services/aigc/video-generation/video-synthesis``: ``*-t2v-*`` models (``input.prompt``,
  ``parameters.size`` as ``"W*H"``: ``resolution`` 480p/720p/1080p with ``aspect_ratio``, or a
  ``WxH`` resolution) and ``*-i2v-*`` models (``image_url`` -> ``input.img_url``,
  ``parameters.resolution`` ``480P``/``720P``/``1080P``; the image decides the shape).
* ``POST /services/aigc/image2video/video-synthesis``: ``*-kf2v-*`` models (``image_url`` ->
  ``input.first_frame_url``, ``options.last_frame_url``).
* ``duration_seconds`` -> ``parameters.duration``, ``seed``, ``negative_prompt``; ``options``
  ``prompt_extend`` (on by default at DashScope: ``actual_prompt`` shows the rewrite), ``watermark``,
  ``audio``, ``audio_url``, ``shot_type``, ``template``.

Images, per model as DashScope serves them (``MODEL_ROUTES``; ``extra["model_routes"]``
overrides, since new-api and Alibaba disagree for ``qwen-image``: CONFLICT):

* ``text2image``: ``POST /services/aigc/text2image/image-synthesis`` (async, same header): Wan t2i
  models and ``qwen-image``/``qwen-image-plus``; ``size`` ``"W*H"``, ``n`` (1-4; 1 for qwen-image).
* ``multimodal``: ``POST /services/aigc/multimodal-generation/generation``, synchronous (the async
  header is refused there): ``qwen-image-edit*``, ``qwen-image-max``, ``qwen-image-2.0*``,
  ``z-image-turbo``, Wan 2.6/2.7 image models. ``input.messages[0].content`` holds ``{image}`` parts
  (``image_url``, ``options.images``) then ``{text}``; the answer's
  ``output.choices[].message.content[].image`` URLs are the outputs (``SubmitResult.done``; the task
  id is the job's id, nothing to fetch, cancel or look up afterwards).

Tasks: ``GET /tasks/{task_id}``: ``PENDING``/``SUSPENDED`` -> queued, ``RUNNING`` -> running,
``SUCCEEDED`` -> ``output.video_url`` or ``output.results[].url`` (an item may carry
``code``/``message`` instead: the good images are kept, each output's metadata lists the failed
ones; none -> failed), ``FAILED`` -> ``output.code``/``message`` (HTTP 200), ``CANCELED`` ->
canceled, ``UNKNOWN`` -> the id is gone: ``TaskNotFound`` once the task is older than
``extra["task_ttl_seconds"]`` (24 h, DashScope's retention), else still queued. A finished task's
(and a sync answer's) ``usage`` (``image_count``; ``video_count``, ``video_duration``) is its usage. Cancel:
``POST /tasks/{task_id}/cancel`` (``PENDING`` only; a started task is refused and runs on).
Reconcile (no client id exists): ``GET /tasks?start_time=&end_time=&model_name=`` (times are
naive China-time ``YYYYMMDDhhmmss``, UTC+``extra["time_zone_hours"]`` = 8, UNCONFIRMED for the
other regions), then each candidate is read: one whose echoed ``orig_prompt`` differs is not
ours, one that echoes ours is taken; a single unfinished one (no prompt yet) is taken too, several
are read again later (the lookup is retried) rather than risk another job's task.

Errors ``{request_id, code, message}`` (no ``output``; also inside an HTTP 200):
``DataInspectionFailed`` (and ``*DataInspection*``) -> ``content_policy``; ``Throttling*`` (429, or
400 as one client saw) -> RateLimited; ``Arrearage``/``InsufficientBalance``/
``AllocationQuota.FreeTierOnly`` -> InsufficientBalance; ``InvalidApiKey`` -> AuthFailed; ``AccessDenied``
about (a)synchronous calls -> ``provider_wrong_route`` (the model table is wrong: see
``model_routes``); other ``AccessDenied*`` -> ``provider_forbidden`` (the key stays); ``ModelNotFound``
or "Model not exist." -> ``model_not_found``; other 400s -> ``provider_rejected_input``; 5xx after a
create -> OutcomeUnknown.

``extra``: ``workspace``, ``model_routes`` ({model: "text2image" | "multimodal"}),
``task_ttl_seconds`` (86400), ``time_zone_hours`` (8), ``reconcile_slack_seconds`` (5).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from providers.contract import (
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
    Usage,
)
from providers.errors import (
    AmbiguousMatch,
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send
from providers.usage import amount, count, usage

log = logging.getLogger(__name__)

API_PATH = "/api/v1"
VIDEO_PATH = "/services/aigc/video-generation/video-synthesis"
KF2V_PATH = "/services/aigc/image2video/video-synthesis"
T2I_PATH = "/services/aigc/text2image/image-synthesis"
SYNC_PATH = "/services/aigc/multimodal-generation/generation"

Route = Literal["t2v", "i2v", "kf2v", "text2image", "multimodal"]
VIDEO_MODEL = re.compile(r"^wanx?\d[\w.]*-(t2v|i2v|kf2v)(-|$)")
# images-wave2.md §6.2. CONFLICT: new-api sends every qwen-image model to the sync route; Alibaba
# documents qwen-image and qwen-image-plus as asynchronous.
MODEL_ROUTES: dict[str, Route] = {
    **dict.fromkeys(("wan2.2-t2i-flash", "wan2.2-t2i-plus", "wanx2.1-t2i-turbo", "wanx2.1-t2i-plus",
                     "wan2.5-t2i-preview", "qwen-image", "qwen-image-plus"), "text2image"),
    **dict.fromkeys(("qwen-image-edit", "qwen-image-edit-plus", "qwen-image-max", "qwen-image-2.0",
                     "qwen-image-2.0-pro", "z-image-turbo", "wan2.6-t2i", "wan2.6-image", "wan2.7-image",
                     "wan2.7-image-pro"), "multimodal"),
}
PATHS: dict[Route, str] = {"t2v": VIDEO_PATH, "i2v": VIDEO_PATH, "kf2v": KF2V_PATH, "text2image": T2I_PATH,
                           "multimodal": SYNC_PATH}
TIERS = ("480p", "720p", "1080p")
# Wan text-to-video sizes per tier and aspect ratio ("W*H": a star, not an x).
T2V_SIZES: dict[str, dict[str, str]] = {
    "480p": {"16:9": "832*480", "9:16": "480*832", "1:1": "624*624"},
    "720p": {"16:9": "1280*720", "9:16": "720*1280", "1:1": "960*960", "4:3": "1088*832", "3:4": "832*1088"},
    "1080p": {"16:9": "1920*1080", "9:16": "1080*1920", "1:1": "1440*1440", "4:3": "1632*1248",
              "3:4": "1248*1632"},
}
QWEN_IMAGE_SIZES = {"16:9": "1664*928", "4:3": "1472*1104", "1:1": "1328*1328", "3:4": "1104*1472",
                    "9:16": "928*1664"}
SIZE = re.compile(r"^(\d{3,4})[x*](\d{3,4})$")
MAX_SEED = 2**31 - 1
MAX_NEGATIVE = 500
LIST_PAGE = 100
RECONCILE_READS = 10  # candidate tasks read to compare their echoed prompt
VIDEO_OPTIONS = frozenset({"prompt_extend", "watermark", "audio", "audio_url", "shot_type", "template",
                           "last_frame_url"})
IMAGE_OPTIONS = frozenset({"prompt_extend", "watermark", "images", "size"})
RESERVED = {"model": "model", "input": None, "parameters": None, "prompt": "prompt", "img_url": "image_url",
            "first_frame_url": "image_url", "negative_prompt": "negative_prompt", "resolution": "resolution",
            "duration": "duration_seconds", "seed": "seed", "n": "num_outputs", "messages": "prompt and image_url"}

_STATES: dict[str, ProviderState] = {
    "PENDING": "queued",
    "SUSPENDED": "queued",
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "CANCELED": "canceled",
}
_ROUTE_REFUSED = re.compile(r"does not support (a)?synchronous calls", re.IGNORECASE)


def content_refusal(code: str) -> bool:
    return "DataInspection" in code


def _image_ref(field: str, value: Any) -> str:
    ok = isinstance(value, str) and (value.startswith(("data:image/", "oss://"))
                                     or (urlsplit(value).scheme in ("http", "https")
                                         and bool(urlsplit(value).hostname)))
    if not ok:
        raise InvalidInput(field, "an image is an http(s) URL, a data:image/...;base64 URL or an oss:// URL")
    return str(value)


def _check_options(given: MediaInput, allowed: frozenset[str], what: str) -> None:
    for key in given.options:
        if key in RESERVED:
            target = RESERVED[key]
            raise InvalidInput(f"input.options.{key}", f"set by Atelier; use '{target}' instead" if target
                               else "set by Atelier")
        if key not in allowed:
            raise InvalidInput(f"input.options.{key}", f"not a DashScope {what} parameter Atelier passes on "
                                                       f"(allowed: {', '.join(sorted(allowed))})")
    for key in ("prompt_extend", "watermark", "audio"):
        if key in given.options and not isinstance(given.options[key], bool):
            raise InvalidInput(f"input.options.{key}", f"{key} is true or false")


def _common(given: MediaInput, body_input: dict[str, Any], parameters: dict[str, Any]) -> None:
    if given.negative_prompt is not None:
        if len(given.negative_prompt) > MAX_NEGATIVE:
            raise InvalidInput("input.negative_prompt", f"at most {MAX_NEGATIVE} characters")
        body_input["negative_prompt"] = given.negative_prompt
    if given.seed is not None:
        if not 0 <= given.seed <= MAX_SEED:
            raise InvalidInput("input.seed", f"DashScope seeds are 0 to {MAX_SEED}")
        parameters["seed"] = given.seed
    for key in ("prompt_extend", "watermark"):
        if key in given.options:
            parameters[key] = given.options[key]


def _whole(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


@dataclass(frozen=True)
class Call:
    """One create call: the route, its body, and whether DashScope answers it synchronously."""

    route: Route
    body: dict[str, Any]

    @property
    def sync(self) -> bool:
        return self.route == "multimodal"


# -- video requests -----------------------------------------------------------------------

def video_call(model: str, given: MediaInput) -> Call:
    """A Wan video create; raises ``InvalidInput`` naming the field."""
    match = VIDEO_MODEL.match(model)
    if match is None:
        raise InvalidInput("model", "DashScope video models are Wan t2v, i2v or kf2v models (wan2.2-t2v-plus, "
                                    "wan2.2-i2v-plus, wanx2.1-kf2v-plus...)")
    route: Route = "t2v" if match.group(1) == "t2v" else "i2v" if match.group(1) == "i2v" else "kf2v"
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Wan renders one video per task")
    _check_options(given, VIDEO_OPTIONS, "video")
    opts = given.options
    body_input: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    if given.prompt:
        if model.startswith(("wanx2.1", "wan2.2")) and len(given.prompt) > 800:
            raise InvalidInput("input.prompt", f"{model} takes prompts of at most 800 characters")
        body_input["prompt"] = given.prompt
    elif route == "t2v":
        raise InvalidInput("input.prompt", "Wan text-to-video needs a prompt")
    _common(given, body_input, parameters)
    if route == "t2v":
        if given.image_url is not None:
            raise InvalidInput("input.image_url", f"{model} is text-to-video; image-to-video is an i2v model")
        size = _t2v_size(given)
        if size is not None:
            parameters["size"] = size
    else:
        if given.image_url is None:
            raise InvalidInput("input.image_url", f"{model} starts from an image: give image_url")
        body_input["img_url" if route == "i2v" else "first_frame_url"] = _image_ref("input.image_url",
                                                                                   given.image_url)
        if given.aspect_ratio is not None:
            raise InvalidInput("input.aspect_ratio", "Wan image-to-video follows the image's aspect ratio")
        if given.resolution is not None:
            if given.resolution.lower() not in TIERS:
                raise InvalidInput("input.resolution", "Wan image-to-video renders 480P, 720P or 1080P")
            parameters["resolution"] = given.resolution.upper()
    if "last_frame_url" in opts:
        if route != "kf2v":
            raise InvalidInput("input.options.last_frame_url", "a last frame needs a kf2v model "
                                                               "(wanx2.1-kf2v-plus)")
        body_input["last_frame_url"] = _image_ref("input.options.last_frame_url", opts["last_frame_url"])
    if given.duration_seconds is not None:
        if not _whole(given.duration_seconds) or given.duration_seconds <= 0:
            raise InvalidInput("input.duration_seconds", "Wan takes a whole number of seconds (per model: "
                                                         "wan2.1/2.2 5, wan2.5 5 or 10...)")
        parameters["duration"] = int(given.duration_seconds)
    if "audio" in opts:
        parameters["audio"] = opts["audio"]
    if "shot_type" in opts:
        if opts["shot_type"] not in ("single", "multi"):
            raise InvalidInput("input.options.shot_type", "shot_type is single or multi")
        parameters["shot_type"] = opts["shot_type"]
    if "audio_url" in opts:
        body_input["audio_url"] = _http("input.options.audio_url", opts["audio_url"])
    if "template" in opts:
        if not isinstance(opts["template"], str) or not opts["template"]:
            raise InvalidInput("input.options.template", "template is an effect template's name")
        body_input["template"] = opts["template"]
    body: dict[str, Any] = {"model": model, "input": body_input}
    if parameters:
        body["parameters"] = parameters
    return Call(route, body)


def _t2v_size(given: MediaInput) -> str | None:
    resolution, ratio = given.resolution, given.aspect_ratio
    explicit = SIZE.match(resolution or "")
    if explicit is not None:
        if ratio is not None:
            raise InvalidInput("input.aspect_ratio", "give either a WxH resolution or an aspect ratio")
        return f"{explicit.group(1)}*{explicit.group(2)}"
    if resolution is None and ratio is None:
        return None
    tier = (resolution or "1080p").lower()
    if tier not in T2V_SIZES:
        raise InvalidInput("input.resolution", "Wan text-to-video renders 480p, 720p, 1080p or a WxH size")
    sizes = T2V_SIZES[tier]
    if (ratio or "16:9") not in sizes:
        raise InvalidInput("input.aspect_ratio", f"Wan renders {', '.join(sizes)} at {tier}")
    return sizes[ratio or "16:9"]


def _http(field: str, value: Any) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, "an http(s) URL")
    return str(value)


# -- image requests -----------------------------------------------------------------------

def image_call(model: str, route: Route | None, given: MediaInput) -> Call:
    """A Wan / Qwen-Image image create on the model's route; raises ``InvalidInput`` naming the field."""
    if route not in ("text2image", "multimodal"):
        raise InvalidInput("model", f"DashScope image models are {', '.join(sorted(MODEL_ROUTES))} (others "
                                    "through the model_routes setting)")
    if given.duration_seconds is not None:
        raise InvalidInput("input.duration_seconds", "images have no duration")
    prompt = given.prompt or ""
    if not prompt.strip():
        raise InvalidInput("input.prompt", "DashScope image models need a prompt")
    _check_options(given, IMAGE_OPTIONS, "image")
    opts = given.options
    body_input: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    _common(given, body_input, parameters)
    size = _image_size(model, given)
    if size is not None:
        parameters["size"] = size
    n = given.num_outputs or 1
    refs = opts.get("images", [])
    if not isinstance(refs, list):
        raise InvalidInput("input.options.images", "images is a list of image URLs")
    images = [_image_ref(f"input.options.images[{i}]", url) for i, url in enumerate(refs)]
    if given.image_url is not None:
        images.insert(0, _image_ref("input.image_url", given.image_url))
    if route == "text2image":
        if images:
            field = "input.image_url" if given.image_url is not None else "input.options.images"
            raise InvalidInput(field, f"{model} renders from text only (editing is qwen-image-edit)")
        most = 1 if model.startswith("qwen-image") else 4
        if not 1 <= n <= most:
            raise InvalidInput("input.num_outputs", f"{model} renders 1 to {most} images per task")
        body_input["prompt"] = prompt
        if n > 1:
            parameters["n"] = n
    else:
        if "edit" in model and not images:
            raise InvalidInput("input.image_url", f"{model} edits images: give image_url or options.images")
        if not 1 <= n <= 6:
            raise InvalidInput("input.num_outputs", f"{model} renders 1 to 6 images per call")
        if n > 1:
            parameters["n"] = n
        if "negative_prompt" in body_input:  # the multimodal route takes it as a parameter
            parameters["negative_prompt"] = body_input.pop("negative_prompt")
        content = [{"image": url} for url in images] + [{"text": prompt}]
        body_input["messages"] = [{"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "input": body_input}
    if parameters:
        body["parameters"] = parameters
    return Call(route, body)


def _image_size(model: str, given: MediaInput) -> str | None:
    """``"W*H"`` from ``options.size``, a ``WxH`` resolution, or an aspect ratio."""
    resolution, ratio = given.resolution, given.aspect_ratio
    explicit = SIZE.match(resolution or "")
    if resolution is not None and explicit is None:
        raise InvalidInput("input.resolution", "DashScope image sizes are WIDTHxHEIGHT (sent as W*H)")
    if "size" in given.options:
        native = given.options["size"]
        if resolution is not None or ratio is not None:
            raise InvalidInput("input.options.size", "give the size once (options.size, or resolution and "
                                                     "aspect_ratio)")
        if not isinstance(native, str) or not SIZE.match(native):
            raise InvalidInput("input.options.size", 'size is "W*H", e.g. "1024*1024"')
        return native.replace("x", "*")
    if explicit is not None:
        if ratio is not None:
            raise InvalidInput("input.aspect_ratio", "give either a WxH resolution or an aspect ratio")
        return f"{explicit.group(1)}*{explicit.group(2)}"
    if ratio is None:
        return None
    if model in ("qwen-image", "qwen-image-plus"):
        if ratio not in QWEN_IMAGE_SIZES:
            raise InvalidInput("input.aspect_ratio", f"{model} renders {', '.join(QWEN_IMAGE_SIZES)}")
        return QWEN_IMAGE_SIZES[ratio]
    match = re.fullmatch(r"(\d+):(\d+)", ratio)
    if match is None or not int(match.group(1)) or not int(match.group(2)):
        raise InvalidInput("input.aspect_ratio", "an aspect ratio such as 16:9")
    r = int(match.group(1)) / int(match.group(2))
    return f"{round(1024 * math.sqrt(r) / 16) * 16}*{round(1024 / math.sqrt(r) / 16) * 16}"


# -- the adapter ------------------------------------------------------------------------

class DashScopeTask(TaskState):
    """The route a task was created on, and when (an ``UNKNOWN`` task is gone only after 24 h)."""

    route: str | None = None
    submitted_at: float | None = None


class DashScopeProvider(Provider):
    name = "dashscope"
    default_base_url = "https://dashscope-intl.aliyuncs.com"
    default_typical_seconds = {"video": 180, "image": 30}
    # Alibaba caps concurrent tasks per model and account (2 for wan2.1); a multimodal image call
    # holds its slot for its whole run.
    default_concurrency = 4
    kinds = frozenset({MediaKind.video, MediaKind.image})
    # Video and text2image are tasks; the multimodal image route answers the create itself (done).
    synchronous = False
    supports_cancel = True
    supports_callbacks = False
    retention = "output URLs (signed OSS) and task ids 24 h"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self.api = self.base_url if self.base_url.endswith(API_PATH) else self.base_url + API_PATH
        extra = settings.extra
        self.model_routes: dict[str, Route] = {**MODEL_ROUTES, **dict(extra.get("model_routes", {}))}
        self.workspace = str(extra.get("workspace") or "")
        self.task_ttl = float(extra.get("task_ttl_seconds", 86400.0))
        self.china_time = timezone(timedelta(hours=float(extra.get("time_zone_hours", 8))))
        self.reconcile_slack = float(extra.get("reconcile_slack_seconds", 5.0))

    def build(self, request: GenerationRequest) -> Call:
        """The create call of a request; raises ``InvalidInput`` naming the field."""
        if request.kind == MediaKind.image:
            return image_call(request.model, self.model_routes.get(request.model), request.input)
        return video_call(request.model, request.input)

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.build(request)

    def _headers(self, ctx: CallContext, *, asynchronous: bool = False) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier", "Accept": "application/json"}
        if asynchronous:
            headers["X-DashScope-Async"] = "enable"
        if self.workspace:
            headers["X-DashScope-WorkSpace"] = self.workspace
        return headers

    async def _call(self, ctx: CallContext, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await send(ctx.http, ctx.http.build_request(method, self.api + path, headers=self._headers(ctx),
                                                               **kwargs))
        return _answer(response, creates=False)

    # -- the task ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        call = self.build(request)
        started = time.time()
        headers = self._headers(ctx, asynchronous=not call.sync)
        response = await send(ctx.http, ctx.http.build_request("POST", self.api + PATHS[call.route], json=call.body,
                                                               headers=headers),
                              creates=True, timeout=ctx.timeout)
        payload = _answer(response, creates=True)
        request_id = _str_or_none(payload.get("request_id"))
        if call.sync:
            done = multimodal_status(payload)
            done.request_id = request_id
            return SubmitResult(task_id=request.reference, request_id=request_id, status=done.raw_status, done=done,
                                state=DashScopeTask(route=call.route))
        output = payload.get("output")
        task_id = output.get("task_id") if isinstance(output, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("DashScope created a task without a task_id", detail=_excerpt(payload))
        assert isinstance(output, dict)
        return SubmitResult(task_id=task_id, request_id=request_id, status=_str_or_none(output.get("task_status")),
                            state=DashScopeTask(route=call.route, submitted_at=started))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        state = DashScopeTask.of(task)
        if state.route == "multimodal":
            raise TaskNotFound("a DashScope multimodal call is synchronous: there is no task to fetch")
        payload = await self._call(ctx, "GET", f"/tasks/{task.task_id}")
        status = parse_task(payload, task.request.kind)
        if status.raw_status == "UNKNOWN":
            age = time.time() - (state.submitted_at or 0.0)
            if age > self.task_ttl:
                raise TaskNotFound(f"DashScope no longer knows the task (UNKNOWN {age:.0f} s after it was created; "
                                   "task ids live 24 h)", detail=_excerpt(payload))
        return status

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        if DashScopeTask.of(task).route == "multimodal":
            return False  # the call is over: nothing runs at DashScope
        try:
            await self._call(ctx, "POST", f"/tasks/{task.task_id}/cancel")
        except Rejected as exc:
            if exc.code not in ("provider_rejected_input", "provider_rejected"):
                raise  # the key, the balance: not about the task's state
            raise Rejected(f"DashScope cancels only PENDING tasks; this one has started and will finish (and "
                           f"bill): {exc.message}", detail=exc.detail, status_code=exc.status_code) from exc
        return True

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Find the task of a lost create: the task list by model and time, then the echoed prompt."""
        call = self.build(request)
        if call.sync:
            return None  # a synchronous call leaves nothing to look up
        now = time.time()
        params = {"model_name": request.model, "start_time": self._stamp(since - self.reconcile_slack),
                  "end_time": self._stamp(now + self.reconcile_slack), "page_no": 1, "page_size": LIST_PAGE}
        listing = await self._call(ctx, "GET", "/tasks", params=params)
        items = listing.get("data")
        if not isinstance(items, list):
            raise MalformedResponse("DashScope's task list has no data", detail=_excerpt(listing))
        submitted = [(self._time(item.get("submit_time")), item["task_id"]) for item in items
                     if isinstance(item, dict) and isinstance(item.get("task_id"), str)
                     and item.get("model_name", request.model) == request.model]
        after = sorted((t, i) for t, i in submitted if t is not None and since <= t <= now + self.reconcile_slack)
        before = sorted(((t, i) for t, i in submitted if t is not None and since - self.reconcile_slack <= t < since),
                        reverse=True)
        prompt = request.input.prompt or ""
        unconfirmed: list[str] = []
        for _, task_id in (after or before)[:RECONCILE_READS]:
            echoed = _echoed_prompt(await self._call(ctx, "GET", f"/tasks/{task_id}"))
            if echoed == prompt:
                return SubmitResult(task_id=task_id, state=DashScopeTask(route=call.route, submitted_at=since))
            if echoed is None:
                unconfirmed.append(task_id)  # not finished (or failed): no prompt to compare
        found = [SubmitResult(task_id=task_id, state=DashScopeTask(route=call.route, submitted_at=since))
                 for task_id in unconfirmed]
        if len(found) > 1:  # either could be another job's (no prompt shown until they finish)
            raise AmbiguousMatch(f"{len(found)} unfinished DashScope tasks could be the lost one", found)
        return found[0] if found else None

    def _stamp(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.china_time).strftime("%Y%m%d%H%M%S")

    def _time(self, value: Any) -> float | None:
        """A DashScope time (``2025-07-27 21:00:01.123``, China time without a zone) as a timestamp."""
        try:
            return datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=self.china_time).timestamp()
        except ValueError:
            return None

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        return {}  # signed OSS URLs: no auth (and never the API key)


# -- responses ------------------------------------------------------------------------

def parse_task(payload: dict[str, Any], kind: MediaKind) -> TaskStatus:
    """A ``GET /tasks/{id}`` answer, translated (``UNKNOWN`` as queued: the caller decides by age)."""
    output = payload.get("output")
    raw = output.get("task_status") if isinstance(output, dict) else None
    if not isinstance(raw, str) or not isinstance(output, dict):
        raise MalformedResponse("DashScope task has no task_status", detail=_excerpt(payload))
    request_id = _str_or_none(payload.get("request_id"))
    if raw == "UNKNOWN":
        return TaskStatus(state="queued", raw_status=raw, request_id=request_id)
    state = _STATES.get(raw)
    if state is None:
        log.warning("dashscope: unknown task status %r; treating it as still in progress", raw)
        return TaskStatus(state="unknown", raw_status=raw, request_id=request_id)
    status = TaskStatus(state=state, raw_status=raw, request_id=request_id)
    task_id = output.get("task_id")
    if state == "succeeded":
        common: dict[str, Any] = {"task_id": task_id}
        if isinstance(payload.get("usage"), dict):
            common["usage"] = payload["usage"]
        status.usage = billed_usage(payload.get("usage"))
        if kind == MediaKind.video:
            url = output.get("video_url")
            prompts = {k: output[k] for k in ("orig_prompt", "actual_prompt") if isinstance(output.get(k), str)}
            if _http_url(url):
                status.outputs = [ProviderOutput(url=str(url), content_type="video/mp4", metadata=common | prompts)]
            failures: list[dict[str, Any]] = []
        else:
            status.outputs, failures = _results(output.get("results"), common)
        if not status.outputs:
            return _none_made(status, failures, output)
        status.progress = 100
    elif state == "failed":
        code, message = str(output.get("code") or ""), str(output.get("message") or "")
        status.error_code = _failure_code(code)
        status.error_message = f"DashScope {code}: {message}" if code else "DashScope reported the task failed"
        status.error_detail = {"task_id": task_id, "code": output.get("code"), "message": output.get("message")}
    return status


def _results(results: Any, common: dict[str, Any]) -> tuple[list[ProviderOutput], list[dict[str, Any]]]:
    """The images of a SUCCEEDED image task, and the members that failed inside it."""
    images: list[tuple[int, str, dict[str, Any]]] = []
    failures: list[dict[str, Any]] = []
    for index, item in enumerate(results if isinstance(results, list) else []):
        if not isinstance(item, dict):
            continue
        if _http_url(item.get("url")):
            prompts = {k: item[k] for k in ("orig_prompt", "actual_prompt") if isinstance(item.get(k), str)}
            images.append((index, str(item["url"]), prompts))
        elif item.get("code"):
            failures.append({"index": index, "code": item.get("code"), "message": item.get("message")})
    failed = {"failed": failures} if failures else {}
    return [ProviderOutput(url=url, metadata=common | prompts | {"index": index} | failed)
            for index, url, prompts in images], failures


def _none_made(status: TaskStatus, failures: list[dict[str, Any]], output: dict[str, Any]) -> TaskStatus:
    status.state = "failed"
    if failures:
        code = str(failures[0]["code"])
        status.error_code = _failure_code(code)
        status.error_message = f"DashScope {code}: {failures[0]['message']} (every image failed)"
        status.error_detail = {"failed": failures}
    else:
        status.error_code = "provider_no_output"
        status.error_message = "DashScope reported success without an output URL"
        status.error_detail = {"task_id": output.get("task_id")}
    return status


def multimodal_status(payload: dict[str, Any]) -> TaskStatus:
    """The synchronous multimodal answer as a finished task."""
    output = payload.get("output")
    choices = output.get("choices") if isinstance(output, dict) else None
    if not isinstance(choices, list):
        raise MalformedResponse("DashScope answered without output.choices", detail=_excerpt(payload))
    assert isinstance(output, dict)
    common: dict[str, Any] = {}
    if isinstance(payload.get("usage"), dict):
        common["usage"] = payload["usage"]
    urls = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        urls += [part["image"] for part in content if isinstance(part, dict) and _http_url(part.get("image"))] \
            if isinstance(content, list) else []
    metric = output.get("task_metric", output.get("task_metrics"))  # singular here, plural on tasks
    failed = metric.get("FAILED") if isinstance(metric, dict) else None
    if not urls:
        return TaskStatus(state="failed", raw_status="no_image", error_code="provider_no_output",
                          error_message="DashScope answered without any image"
                                        + (f" ({failed} failed)" if failed else ""),
                          error_detail={"task_metric": metric})
    extra = {"failed_count": failed} if _whole(failed) and failed else {}
    outputs = [ProviderOutput(url=url, metadata=common | extra | {"index": i}) for i, url in enumerate(urls)]
    return TaskStatus(state="succeeded", raw_status="partially_succeeded" if extra else "succeeded", progress=100,
                      outputs=outputs, usage=billed_usage(payload.get("usage")))


def billed_usage(used: Any) -> Usage | None:
    """What DashScope bills a finished task for: ``image_count`` images made (billing = count x unit
    price), or ``video_count`` videos of ``video_duration`` seconds. The key names vary by model
    (``output_image_count``, ``output_video_duration``): both are read."""
    if not isinstance(used, dict):
        return None
    outputs = count(_first(used, "image_count", "output_image_count", "video_count"))
    return usage(outputs=outputs, seconds=amount(_first(used, "video_duration", "output_video_duration")))


def _first(values: dict[str, Any], *keys: str) -> Any:
    return next((values[key] for key in keys if values.get(key) is not None), None)


def _echoed_prompt(payload: dict[str, Any]) -> str | None:
    """The prompt a task echoes (``orig_prompt``, once it has results), else ``None``."""
    output = payload.get("output")
    if not isinstance(output, dict):
        return None
    if isinstance(output.get("orig_prompt"), str):
        return str(output["orig_prompt"])
    results = output.get("results")
    first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
    return str(first["orig_prompt"]) if isinstance(first.get("orig_prompt"), str) else None


def _failure_code(code: str) -> str:
    if content_refusal(code):
        return "content_policy"
    if code.startswith(("InvalidParameter", "InvalidURL", "InvalidFile", "InvalidImage", "BadRequest")):
        return "provider_rejected_input"
    return "provider_failed"


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


# -- errors ---------------------------------------------------------------------------

def _answer(response: httpx.Response, *, creates: bool) -> dict[str, Any]:
    """The answer as an object once neither its HTTP status nor a top-level ``code`` says it failed."""
    if response.status_code >= 500:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:300]})
    try:
        body = response.json()
    except ValueError:
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        body = parse_json(response)  # 2xx and not JSON: MalformedResponse
    answer = expect_object(body, "answer")
    code = answer.get("code")
    if isinstance(code, str) and code and "output" not in answer:  # also inside an HTTP 200
        raise dashscope_error(code, str(answer.get("message") or ""), response, creates=creates,
                              detail={k: answer.get(k) for k in ("request_id", "code", "message")})
    raise_for_common_status(response, creates=creates, detail=_excerpt(answer))
    return answer


def dashscope_error(code: str, message: str, response: httpx.Response, *, creates: bool,
                    detail: Any) -> ProviderError:
    """What DashScope's error ``code`` means (its HTTP status varies: Throttling was seen as a 400)."""
    status = response.status_code
    text = f"DashScope {code}: {message}"
    if content_refusal(code):
        return Rejected(text, code="content_policy", detail=detail, status_code=status)
    if code in ("Arrearage", "InsufficientBalance", "AllocationQuota.FreeTierOnly"):
        return InsufficientBalance(text, detail=detail, status_code=status)
    if code.startswith("Throttling") or status == 429:
        return RateLimited(f"{text} (waiting)", retry_after=retry_after_seconds(response.headers), detail=detail,
                           status_code=status)
    if code == "InvalidApiKey" or status == 401:
        return AuthFailed(f"{text} (a key of another region's host?)", detail=detail, status_code=status)
    if code.startswith("AccessDenied") and _ROUTE_REFUSED.search(message):
        return Rejected(f"{text} (the model is served on the other route: see the model_routes setting)",
                        code="provider_wrong_route", detail=detail, status_code=status)
    if code == "ModelNotFound" or "model not exist" in message.lower():
        return Rejected(text, code="model_not_found", detail=detail, status_code=status)
    if "AccessDenied" in code:
        return Rejected(text, code="provider_forbidden", detail=detail, status_code=status)
    if status in (404, 410) and not creates:
        return TaskNotFound(text, detail=detail, status_code=status)
    code_for = "provider_rejected_input" if status == 400 or _failure_code(code) != "provider_failed" \
        else "provider_rejected"
    return Rejected(text, code=code_for, detail=detail, status_code=status)


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str)[:300]}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
