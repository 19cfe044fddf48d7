"""Luma Dream Machine API (https://docs.lumalabs.ai/docs/api): Ray videos and Photon images.

The API lives under ``/dream-machine/v1``; the base URL may name it (the default,
``https://api.lumalabs.ai/dream-machine/v1``) or stop at the host (a sandbox mount, a proxy),
in which case the path is added. Auth: ``Authorization: Bearer <key>``.

Endpoints:

* ``POST /generations/video`` (the SDK's path; ``extra["video_path"] = "/generations"`` selects
  the older path, which takes ``generation_type: "video"``) and ``POST /generations/image``
  (Photon): 201 (200 accepted too) with the generation object, ``request`` echoing the body.
* ``GET /generations/{id}``: the generation. ``GET /generations?limit=&offset=``: the list that
  reconciles an ambiguous create.
* ``DELETE /generations/{id}`` deletes a record; Luma documents no cancel and does not say that
  a delete stops (or refunds) a running generation, so it is not used as one: no cancel.

States ``queued`` -> queued, ``dreaming`` -> running, ``completed`` -> succeeded
(``assets.video``, or ``assets.image`` for Photon; a completed video without one fails
``provider_no_output``), ``failed`` -> failed with ``failure_reason``. Anything else is
non-terminal and logged.

Traps handled:

* Moderation is asynchronous: the create succeeds and the generation later fails with a
  ``failure_reason`` such as "Frame moderation failed" or "Contains blacklisted words": those
  fail ``content_policy``.
* ``duration`` is a string with a unit (``"5s"``, ``"9s"``); resolutions are lowercase.
* Extend is not an endpoint: the ``extend`` follow-up sends ``keyframes.frame0`` of type
  ``generation`` with the source's generation id (kept in the output metadata as
  ``generation_id``); a given ``image_url`` becomes the end frame. ``generate`` puts
  ``image_url`` in ``frame0`` (an image keyframe; Luma fetches it, so http(s) only).
* Errors are FastAPI-style ``{"detail": "<text>"}`` (400) or ``{"detail": [{loc, msg, type}]}``
  (422); low credit is a 400 (or 402) about credits and is InsufficientBalance.
* Callbacks are unsigned full generation objects, possibly repeated per state: the per-job
  token in the callback URL authenticates them and the state applied is the one fetched.
* No client id exists, but ``request.callback_url`` is echoed on every generation, and ours
  names the job (``...?job=<job id>&token=...``): reconcile lists recent generations and
  matches it (so it needs callbacks enabled). The list's order is not documented, so it reads
  up to ``extra["reconcile_pages"]`` pages (5) of 100 rather than stopping at older items.

``extra``: ``video_path`` (``/generations/video`` | ``/generations``), ``reconcile_pages`` (5).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

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
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
)
from providers.http import expect_object, parse_json, raise_for_common_status, retry_after_seconds, send

log = logging.getLogger(__name__)

API_PATH = "/dream-machine/v1"
VIDEO_PATHS = ("/generations/video", "/generations")
VIDEO_MODEL = re.compile(r"^ray-[a-z0-9][a-z0-9.-]*$")
IMAGE_MODEL = re.compile(r"^photon-[a-z0-9][a-z0-9.-]*$")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
RESOLUTIONS = ("540p", "720p", "1080p", "4k")
DURATIONS = (5, 9)
IMAGE_FORMATS = ("jpg", "png")
VIDEO_OPTIONS = frozenset({"loop", "concepts", "keyframes"})
IMAGE_OPTIONS = frozenset({"format", "image_ref", "style_ref", "modify_image_ref", "character_ref"})
PROMPT_MIN, PROMPT_MAX = 3, 5000
LIST_PAGE = 100
# Clock skew allowed between us and Luma when matching creation times.
RECONCILE_SLACK_SECONDS = 30.0

_STATES: dict[str, ProviderState] = {
    "queued": "queued",
    "dreaming": "running",
    "completed": "succeeded",
    "failed": "failed",
}
_MODERATION = re.compile(r"moderat|blacklist", re.IGNORECASE)
_BALANCE = re.compile(r"\b(credits?|balance)\b", re.IGNORECASE)


def _http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


# -- request building (validation happens here, before anything is sent) ------------------

def _common_checks(kind: MediaKind, model: str, given: MediaInput) -> None:
    video = kind == MediaKind.video
    if not (VIDEO_MODEL if video else IMAGE_MODEL).match(model):
        raise InvalidInput("model", f"Luma {kind.value} models are "
                                    f"{'Ray (ray-2, ray-flash-2...)' if video else 'Photon (photon-1...)'}")
    for common in ("negative_prompt", "seed"):
        if getattr(given, common) is not None:
            raise InvalidInput(f"input.{common}", f"Luma has no {common.replace('_', ' ')}")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Luma renders one output per generation")
    allowed = VIDEO_OPTIONS if kind == MediaKind.video else IMAGE_OPTIONS
    for key in given.options:
        if key not in allowed:
            raise InvalidInput(f"input.options.{key}", f"not a Luma {kind.value} parameter Atelier passes on "
                                                       f"(allowed: {', '.join(sorted(allowed))})")
    if given.aspect_ratio is not None and given.aspect_ratio not in ASPECT_RATIOS:
        raise InvalidInput("input.aspect_ratio", f"Luma renders {', '.join(ASPECT_RATIOS)}")


def _check_prompt(prompt: str | None, required: bool) -> None:
    if not prompt:
        if required:
            raise InvalidInput("input.prompt", "Luma needs a prompt here")
        return
    if not PROMPT_MIN <= len(prompt) <= PROMPT_MAX:
        raise InvalidInput("input.prompt", f"Luma prompts are {PROMPT_MIN} to {PROMPT_MAX} characters")


def _keyframe(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in ("image", "generation"):
        raise InvalidInput(field, 'a keyframe is {"type": "image", "url"} or {"type": "generation", "id"}')
    if value["type"] == "image":
        if set(value) != {"type", "url"} or not _http_url(value["url"]):
            raise InvalidInput(field, "an image keyframe is {\"type\": \"image\", \"url\": <http(s) URL>}")
    elif set(value) != {"type", "id"} or not isinstance(value["id"], str) or not value["id"]:
        raise InvalidInput(field, 'a generation keyframe is {"type": "generation", "id": <generation id>}')
    return dict(value)


def source_generation_id(request: GenerationRequest) -> str:
    """The generation an ``extend`` continues: the id its output announced, else the source's task."""
    source = request.source
    if source is None:
        raise InvalidInput("source", "extend continues an earlier Luma video: give source.job_id")
    found = source.output_metadata.get("generation_id") or source.task_id
    if not isinstance(found, str) or not found:
        raise InvalidInput("source", "the source job has no Luma generation id")
    return found


def video_body(request: GenerationRequest, legacy_path: bool) -> dict[str, Any]:
    """The create body of a Ray video (``generate`` or ``extend``); raises ``InvalidInput``."""
    given = request.input
    _common_checks(MediaKind.video, request.model, given)
    body: dict[str, Any] = {"model": request.model}
    if legacy_path:
        body["generation_type"] = "video"
    if given.prompt:
        body["prompt"] = given.prompt
    if given.aspect_ratio is not None:
        body["aspect_ratio"] = given.aspect_ratio
    if given.resolution is not None:
        resolution = given.resolution.lower()
        if resolution not in RESOLUTIONS:
            raise InvalidInput("input.resolution", f"Luma renders {', '.join(RESOLUTIONS)}")
        body["resolution"] = resolution
    if given.duration_seconds is not None:
        seconds = given.duration_seconds
        if not float(seconds).is_integer() or int(seconds) not in DURATIONS:
            raise InvalidInput("input.duration_seconds", "Luma renders 5 or 9 seconds")
        body["duration"] = f"{int(seconds)}s"

    opts = given.options
    loop = opts.get("loop", False)
    if not isinstance(loop, bool):
        raise InvalidInput("input.options.loop", "loop is true or false")
    if "loop" in opts:
        body["loop"] = loop
    if "concepts" in opts:
        concepts = opts["concepts"]
        if not isinstance(concepts, list) or not all(isinstance(c, dict) and set(c) == {"key"} and
                                                     isinstance(c["key"], str) for c in concepts):
            raise InvalidInput("input.options.concepts", 'concepts is a list of {"key": "<concept>"}')
        body["concepts"] = concepts

    native = opts.get("keyframes", {})
    if not isinstance(native, dict) or set(native) - {"frame0", "frame1"}:
        raise InvalidInput("input.options.keyframes", "keyframes is an object with frame0 and/or frame1")
    frames = {name: _keyframe(f"input.options.keyframes.{name}", kf) for name, kf in native.items()}
    # extend: the source generation is the start; an image_url given with it is the end frame.
    image_frame = "frame0"
    if request.operation == "extend":
        if "frame0" in frames:
            raise InvalidInput("input.options.keyframes.frame0", "extend sets frame0 to the source generation")
        frames["frame0"] = {"type": "generation", "id": source_generation_id(request)}
        image_frame = "frame1"
    if given.image_url is not None:
        if image_frame in frames:
            raise InvalidInput("input.image_url", f"give the {image_frame} keyframe once (image_url or "
                                                  "options.keyframes)")
        if not _http_url(given.image_url):
            raise InvalidInput("input.image_url", "Luma fetches keyframe images itself: give an http(s) URL")
        frames[image_frame] = {"type": "image", "url": given.image_url}
    if loop and frames:
        kinds = {kf["type"] for kf in frames.values()}
        if "generation" in kinds or "frame1" in frames:
            raise InvalidInput("input.options.loop", "Luma cannot loop an extended or interpolated video, "
                                                     "nor one with an end frame")
    if frames:
        body["keyframes"] = {name: frames[name] for name in ("frame0", "frame1") if name in frames}
    _check_prompt(given.prompt, required=not frames)
    return body


def image_body(request: GenerationRequest) -> dict[str, Any]:
    """The create body of a Photon image; raises ``InvalidInput``."""
    given = request.input
    _common_checks(MediaKind.image, request.model, given)
    for common in ("duration_seconds", "resolution"):
        if getattr(given, common) is not None:
            raise InvalidInput(f"input.{common}", f"Photon images have no {common.replace('_', ' ')}")
    _check_prompt(given.prompt, required=True)
    body: dict[str, Any] = {"model": request.model, "prompt": given.prompt}
    if given.aspect_ratio is not None:
        body["aspect_ratio"] = given.aspect_ratio
    opts = dict(given.options)
    if "format" in opts and opts["format"] not in IMAGE_FORMATS:
        raise InvalidInput("input.options.format", "format is jpg or png")
    for key in ("image_ref", "style_ref"):
        refs = opts.get(key, [])
        if not isinstance(refs, list) or not all(_image_ref(r) for r in refs):
            raise InvalidInput(f"input.options.{key}", f'{key} is a list of {{"url": <http(s) URL>, "weight"}}')
    if "modify_image_ref" in opts and not _image_ref(opts["modify_image_ref"]):
        raise InvalidInput("input.options.modify_image_ref", 'modify_image_ref is {"url": <http(s) URL>, "weight"}')
    if "character_ref" in opts:
        identity = opts["character_ref"].get("identity0") if isinstance(opts["character_ref"], dict) else None
        images = identity.get("images") if isinstance(identity, dict) else None
        if not isinstance(images, list) or not images or not all(_http_url(u) for u in images):
            raise InvalidInput("input.options.character_ref",
                               'character_ref is {"identity0": {"images": [<http(s) URL>...]}}')
    if given.image_url is not None:  # a reference image (e.g. a source job's output)
        if not _http_url(given.image_url):
            raise InvalidInput("input.image_url", "Luma fetches reference images itself: give an http(s) URL")
        opts["image_ref"] = [{"url": given.image_url}, *opts.get("image_ref", [])]
    body.update(opts)
    return body


def _image_ref(value: Any) -> bool:
    return (isinstance(value, dict) and _http_url(value.get("url")) and set(value) <= {"url", "weight"}
            and isinstance(value.get("weight", 0.0), int | float) and not isinstance(value.get("weight"), bool))


# -- the adapter ------------------------------------------------------------------------

class LumaProvider(Provider):
    name = "luma"
    default_base_url = "https://api.lumalabs.ai/dream-machine/v1"
    default_typical_seconds = {"video": 120, "image": 20}
    kinds = frozenset({MediaKind.video, MediaKind.image})
    supports_cancel = False
    supports_callbacks = True
    callback_auth = "token"
    retention = ("not documented: assets stay on storage.cdn-luma.com (unsigned URLs) until the "
                 "generation is deleted")
    operations = (Operation("extend", source="task", source_kinds=frozenset({MediaKind.video}),
                            models=("ray-*",),
                            description="continue a completed Luma video (keyframe frame0 of type generation; "
                                        "image_url becomes the end frame)"),)

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self.api = self.base_url if self.base_url.endswith(API_PATH) else self.base_url + API_PATH
        self.video_path = str(settings.extra.get("video_path", VIDEO_PATHS[0]))
        if self.video_path not in VIDEO_PATHS:
            raise ValueError(f"luma extra.video_path is one of {', '.join(VIDEO_PATHS)}")
        self.reconcile_pages = int(settings.extra.get("reconcile_pages", 5))

    def build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """``(create path, body)`` for a request; raises ``InvalidInput`` naming the field."""
        if request.kind == MediaKind.image:
            return "/generations/image", image_body(request)
        return self.video_path, video_body(request, legacy_path=self.video_path == "/generations")

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        source = request.source
        if request.operation == "generate" and source is not None and source.kind != MediaKind.image:
            raise InvalidInput("source", f"Luma takes an image as the start frame, not a {source.kind.value}; "
                                         "to continue a Luma video use operation 'extend'")
        self.build(request)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier", "Accept": "application/json"}

    # -- the task ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        path, body = self.build(request)
        if ctx.callback_url:
            body["callback_url"] = ctx.callback_url
        response = await send(ctx.http, ctx.http.build_request("POST", self.api + path, json=body,
                                                               headers=self._headers(ctx)),
                              creates=True, timeout=ctx.timeout)
        _raise_for_error(response, creates=True)
        generation = expect_object(parse_json(response), "generation")
        gen_id = generation.get("id")
        if not isinstance(gen_id, str) or not gen_id:
            raise MalformedResponse("Luma created a generation without an id", detail=_excerpt(generation))
        return SubmitResult(task_id=gen_id, status=_str_or_none(generation.get("state")))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.api}/generations/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        _raise_for_error(response, creates=False)
        return parse_generation(expect_object(parse_json(response), "generation"), task.request.kind)

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """List recent generations and find the one whose echoed ``callback_url`` names this job."""
        if not ctx.callback_url:
            return None  # nothing we sent identifies the generation
        for page in range(self.reconcile_pages):
            params = {"limit": LIST_PAGE, "offset": page * LIST_PAGE}
            response = await send(ctx.http, ctx.http.build_request("GET", f"{self.api}/generations", params=params,
                                                                   headers=self._headers(ctx)))
            _raise_for_error(response, creates=False)
            listing = expect_object(parse_json(response), "generation list")
            items = listing.get("generations")
            if not isinstance(items, list):
                raise MalformedResponse("Luma's generation list has no generations", detail=_excerpt(listing))
            for item in items:
                if isinstance(item, dict) and _made_for(item, request.reference, since):
                    return SubmitResult(task_id=str(item["id"]), status=_str_or_none(item.get("state")),
                                        callback_expected=True)
            if not listing.get("has_more") or not items:
                break
        return None

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Luma signs nothing: the per-job token in the URL authenticates; this only parses."""
        try:
            generation = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Luma callback body is not JSON") from exc
        if not isinstance(generation, dict) or not isinstance(generation.get("id"), str):
            raise CallbackRejected("Luma callback body is not a generation")
        return CallbackHint(task_id=generation["id"], raw_status=_str_or_none(generation.get("state")))

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        return {}  # storage.cdn-luma.com serves plain, unsigned URLs


# -- responses ------------------------------------------------------------------------

def parse_generation(generation: dict[str, Any], kind: MediaKind) -> TaskStatus:
    """A generation object (get, list item or callback body), translated."""
    raw, gen_id = generation.get("state"), generation.get("id")
    if not isinstance(raw, str) or not isinstance(gen_id, str):
        raise MalformedResponse("Luma generation has no state or id", detail=_excerpt(generation))
    state = _STATES.get(raw)
    if state is None:
        log.warning("luma: unknown generation state %r; treating it as still in progress", raw)
        return TaskStatus(state="unknown", raw_status=raw)
    status = TaskStatus(state=state, raw_status=raw)
    if state == "succeeded":
        assets = generation.get("assets")
        url = assets.get("image" if kind == MediaKind.image else "video") if isinstance(assets, dict) else None
        if not _http_url(url):
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = f"Luma completed the generation without its {kind.value} asset"
            status.error_detail = {"id": gen_id, "assets": assets}
            return status
        metadata = {"generation_id": gen_id} | {k: generation[k] for k in ("generation_type", "model")
                                                 if isinstance(generation.get(k), str)}
        path = urlsplit(str(url)).path
        content_type = "video/mp4" if kind == MediaKind.video else mimetypes.guess_type(path)[0]
        status.outputs = [ProviderOutput(url=str(url), content_type=content_type, metadata=metadata)]
        status.progress = 100
    elif state == "failed":
        reason = str(generation.get("failure_reason") or "Luma reported the generation failed")
        status.error_code = "content_policy" if _MODERATION.search(reason) else "provider_failed"
        status.error_message = reason
        status.error_detail = {"id": gen_id, "failure_reason": generation.get("failure_reason")}
    return status


def _made_for(generation: dict[str, Any], job_id: str, since: float) -> bool:
    """Whether a listed generation was created for ``job_id`` (its echoed callback URL) in this attempt."""
    request = generation.get("request")
    callback = request.get("callback_url") if isinstance(request, dict) else None
    if not isinstance(callback, str) or not isinstance(generation.get("id"), str):
        return False
    if parse_qs(urlsplit(callback).query).get("job") != [job_id]:
        return False
    try:
        created = datetime.fromisoformat(str(generation.get("created_at"))).timestamp()
    except ValueError:
        return True  # an unreadable time does not disprove the match the job id made
    return created >= since - RECONCILE_SLACK_SECONDS


# -- errors ---------------------------------------------------------------------------

def _luma_error(response: httpx.Response) -> tuple[str, set[str], Any]:
    """``(message, fields named, detail)`` of an error: ``{"detail": str | [{loc, msg, type}]}``."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:200] or f"HTTP {response.status_code}", set(), {"body_excerpt": response.text[:200]}
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail, set(), body
    if isinstance(detail, list):
        fields, parts = set(), []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc") or [] if p != "body")
                fields.add(loc)
                parts.append(f"{item.get('msg')}" + (f" ({loc})" if loc else ""))
        return "; ".join(parts) or _excerpt(body), fields, body
    return _excerpt(body), set(), body


def _raise_for_error(response: httpx.Response, *, creates: bool) -> None:
    status = response.status_code
    if status < 400:
        return
    message, fields, detail = _luma_error(response)
    if status == 429:
        raise RateLimited(f"Luma rate limit (HTTP 429): {message}", retry_after=retry_after_seconds(response.headers),
                          detail=detail)
    if status in (400, 402) and _BALANCE.search(message):
        raise InsufficientBalance(f"Luma refused the generation: {message}", detail=detail, status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"Luma refused the API key (HTTP {status}): {message}", detail=detail, status_code=status)
    if creates and status in (400, 409, 422):
        code = "model_not_found" if "model" in fields else "provider_rejected_input"
        raise Rejected(f"Luma refused the generation: {message}", code=code, detail=detail, status_code=status)
    raise_for_common_status(response, creates=creates, detail=detail)


def _excerpt(value: Any) -> str:
    return json.dumps(value, default=str)[:300]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
