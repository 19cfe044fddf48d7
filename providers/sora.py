"""OpenAI Sora: the Videos API (https://developers.openai.com/api/reference/resources/videos).

The base URL is the origin (``https://api.openai.com``); the routes carry ``/v1``. OpenAI shut
the Sora API down on 2026-09-24, but gateways keep the route shape, so this adapter is usually
pointed at one with ``ATELIER_SORA_BASE_URL``. Auth: ``Authorization: Bearer <key>``.

Endpoints:

* ``POST /v1/videos`` (JSON ``{model, prompt, seconds, size, input_reference}``) -> ``Video``.
* ``GET /v1/videos/{id}`` -> ``Video``; the ``openai-poll-after-ms`` header is the next-poll hint.
* ``GET /v1/videos?order=desc&limit=&after=`` -> list page; reconciles an ambiguous create
  (matched on prompt, model, seconds/size and creation time).
* ``GET /v1/videos/{id}/content`` -> the MP4 (Bearer). The output URL; **404 until completed**,
  so it is only announced once the video is ``completed``.

Statuses: ``queued`` -> queued, ``in_progress`` -> running, ``completed`` -> succeeded,
``failed`` -> failed (``error: {code, message}``). Gateway spellings (``pending``,
``processing``, ``succeeded``, ``cancelled``...) are mapped too; anything else is non-terminal
and logged. There is no cancel endpoint (``DELETE`` only removes finished videos), and video
webhooks are configured per project, not per request: no callbacks.

Validation before anything is sent: ``seconds`` is a *string* of ``"4"``, ``"8"``, ``"12"``
(``"16"``/``"20"`` when ``extra["extended"]``, the newer guide's values); ``size`` is
``720x1280``/``1280x720`` (``sora-2``), plus ``1024x1792``/``1792x1024`` on ``*-pro`` models
(and ``1920x1080``/``1080x1920`` on pro when extended). One video per request; no seed and no
negative prompt. Error bodies are ``{"error": {message, type, param, code}}``; a 429 with
``insufficient_quota`` is a billing refusal, not a rate limit. Downloads expire (``expires_at``,
at most an hour after generation).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Operation,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import InsufficientBalance, InvalidInput, MalformedResponse, RateLimited, Rejected
from providers.http import (
    error_body,
    expect_object,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
)

log = logging.getLogger(__name__)

_MODEL = re.compile(r"^sora-[a-z0-9][a-z0-9.-]*$")
SECONDS = ("4", "8", "12")
EXTENDED_SECONDS = ("16", "20")
SIZES = ("720x1280", "1280x720")
PRO_SIZES = ("1024x1792", "1792x1024")
HD_SIZES = ("1920x1080", "1080x1920")
OPTIONS = frozenset({"seconds", "size", "input_reference"})
LIST_PAGE = 100
LIST_MAX_PAGES = 5
# Clock skew allowed between us and the provider when matching creation times.
RECONCILE_SLACK_SECONDS = 30.0

_STATES = {
    "queued": "queued",
    "in_progress": "running",
    "completed": "succeeded",
    "failed": "failed",
    # Spellings of gateways (new-api and similar) that mirror the route shape.
    "pending": "queued",
    "submitted": "queued",
    "processing": "running",
    "running": "running",
    "succeeded": "succeeded",
    "cancelled": "canceled",
    "canceled": "canceled",
}


def _is_pro(model: str) -> bool:
    return "-pro" in model


class SoraProvider(Provider):
    name = "sora"
    default_base_url = "https://api.openai.com"
    default_typical_seconds = {"video": 120}
    kinds = frozenset({MediaKind.video})
    supports_cancel = False
    supports_callbacks = False
    retention = "downloads expire at expires_at (at most 1 hour after generation)"
    operations = (Operation("remix", source="task", source_kinds=frozenset({MediaKind.video}),
                            description="a completed source video again with a new prompt "
                                        "(POST /v1/videos/{id}/remix)"),)

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)
        self._extended = bool(settings.extra.get("extended", False))

    # -- validation ----------------------------------------------------------------------
    def allowed_seconds(self) -> tuple[str, ...]:
        return SECONDS + EXTENDED_SECONDS if self._extended else SECONDS

    def allowed_sizes(self, model: str) -> tuple[str, ...]:
        if not _is_pro(model):
            return SIZES
        return SIZES + PRO_SIZES + (HD_SIZES if self._extended else ())

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if not _MODEL.match(request.model):
            raise InvalidInput("model", "Sora models are 'sora-2', 'sora-2-pro' or a dated snapshot of them")
        if request.operation == "remix":
            self.remix_body(request)
        else:
            self.build_body(request.model, request.input)

    def remix_body(self, request: GenerationRequest) -> dict[str, Any]:
        """A remix takes only a new prompt; the source video gives everything else."""
        given = request.input
        if not given.prompt:
            raise InvalidInput("input.prompt", "a remix needs the new prompt")
        others = [name for name, value in given.fields().items() if name != "prompt"] + list(given.options)
        if others:
            raise InvalidInput(f"input.{others[0]}", "a remix takes only a prompt (the source sets the rest)")
        return {"prompt": given.prompt}

    def build_body(self, model: str, job_input: MediaInput) -> dict[str, Any]:
        """The create body for ``job_input``; raises ``InvalidInput`` naming the field."""
        if not job_input.prompt:
            raise InvalidInput("input.prompt", "Sora needs a prompt")
        for common in ("negative_prompt", "seed"):
            if getattr(job_input, common) is not None:
                raise InvalidInput(f"input.{common}", f"Sora has no {common.replace('_', ' ')}")
        if job_input.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", "Sora renders one video per request")
        for key in job_input.options:
            if key not in OPTIONS:
                raise InvalidInput(f"input.options.{key}",
                                   f"not a Sora create parameter (allowed: {', '.join(sorted(OPTIONS))})")
        body: dict[str, Any] = {"model": model, "prompt": job_input.prompt}
        seconds = self._seconds(job_input)
        if seconds is not None:
            body["seconds"] = seconds
        size = self._size(model, job_input)
        if size is not None:
            body["size"] = size
        reference = self._reference(job_input)
        if reference is not None:
            body["input_reference"] = reference
        return body

    def _seconds(self, job_input: MediaInput) -> str | None:
        allowed = self.allowed_seconds()
        listed = ", ".join(allowed)
        if "seconds" in job_input.options:
            value = job_input.options["seconds"]
            if not isinstance(value, str) or value not in allowed:
                raise InvalidInput("input.options.seconds", f"Sora 'seconds' is one of the strings {listed}")
            return value
        if job_input.duration_seconds is None:
            return None
        duration = job_input.duration_seconds
        text = str(int(duration)) if float(duration).is_integer() else str(duration)
        if text not in allowed:
            raise InvalidInput("input.duration_seconds", f"Sora renders {listed} seconds, not {duration:g}")
        return text

    def _size(self, model: str, job_input: MediaInput) -> str | None:
        allowed = self.allowed_sizes(model)
        listed = ", ".join(allowed)
        aspect = job_input.aspect_ratio
        if aspect is not None and aspect not in ("16:9", "9:16"):
            raise InvalidInput("input.aspect_ratio", "Sora renders 16:9 (landscape) or 9:16 (portrait)")
        if "size" in job_input.options:
            value = job_input.options["size"]
            if not isinstance(value, str) or value not in allowed:
                raise InvalidInput("input.options.size", f"{model} renders sizes {listed}")
            return value
        resolution = job_input.resolution
        if resolution is None:
            if aspect is None:
                return None
            return "1280x720" if aspect == "16:9" else "720x1280"
        landscape = aspect == "16:9"
        named = {"720p": ("1280x720", "720x1280"), "1080p": ("1920x1080", "1080x1920")}
        if resolution in named:
            size = named[resolution][0 if landscape else 1]
        elif re.fullmatch(r"\d+x\d+", resolution):
            size = resolution
            width, height = (int(v) for v in size.split("x"))
            if aspect is not None and (width > height) != landscape:
                raise InvalidInput("input.resolution", f"{size} does not have the aspect ratio {aspect}")
        else:
            raise InvalidInput("input.resolution", f"{model} renders sizes {listed}")
        if size not in allowed:
            raise InvalidInput("input.resolution", f"{model} renders sizes {listed}, not {size}")
        return size

    def _reference(self, job_input: MediaInput) -> dict[str, Any] | None:
        if "input_reference" in job_input.options:
            ref = job_input.options["input_reference"]
            keys = [k for k in ("image_url", "file_id") if isinstance(ref, dict) and isinstance(ref.get(k), str)]
            if not isinstance(ref, dict) or len(keys) != 1 or set(ref) != set(keys):
                raise InvalidInput("input.options.input_reference",
                                   "an object with exactly one of 'image_url' or 'file_id'")
            if job_input.image_url is not None:
                raise InvalidInput("input.image_url", "give either image_url or options.input_reference")
            return dict(ref)
        if job_input.image_url is not None:
            return {"image_url": str(job_input.image_url)}
        return None

    # -- the task ------------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        url = f"{self.base_url}/v1/videos"
        if request.operation == "remix" and request.source is not None and request.source.task_id:
            url, body = f"{url}/{request.source.task_id}/remix", self.remix_body(request)
        else:
            body = self.build_body(request.model, request.input)
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True)
        _raise_for_error(response, creates=True)
        video = expect_object(parse_json(response), "video")
        task_id = _video_id(video)
        if task_id is None:
            raise MalformedResponse("Sora created a video without an id", detail=_excerpt(video))
        return SubmitResult(task_id=task_id, request_id=response.headers.get("x-request-id"),
                            status=str(video.get("status")))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/v1/videos/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        _raise_for_error(response)
        status = self.parse_video(expect_object(parse_json(response), "video"))
        status.request_id = response.headers.get("x-request-id")
        status.poll_after = _poll_after(response.headers.get("openai-poll-after-ms"))
        return status

    def parse_video(self, video: dict[str, Any]) -> TaskStatus:
        raw = video.get("status")
        task_id = _video_id(video)
        if not isinstance(raw, str) or task_id is None:
            raise MalformedResponse("Sora video has no status or id", detail=_excerpt(video))
        state = _STATES.get(raw)
        if state is None:
            log.warning("sora: unknown video status %r; treating it as still running", raw)
        progress = video.get("progress")
        status = TaskStatus(state=state or "unknown", raw_status=raw,  # type: ignore[arg-type]
                            progress=int(progress) if isinstance(progress, int | float) else None)
        if status.progress is not None:
            status.progress = max(0, min(100, status.progress))
        if state == "succeeded":
            metadata = {k: video[k] for k in ("model", "seconds", "size", "expires_at") if video.get(k) is not None}
            status.outputs = [ProviderOutput(url=self.content_url(task_id), content_type="video/mp4",
                                             metadata=metadata)]
            status.progress = 100
        elif state == "failed":
            raw_error = video.get("error")
            error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
            code = str(error.get("code") or "")
            status.error_code = "provider_content_filtered" if "moderation" in code else "provider_failed"
            status.error_message = str(error.get("message") or "Sora reported the video failed")
            if code:
                status.error_message = f"{status.error_message} ({code})"
            status.error_detail = {"error": video.get("error")}
        elif state == "canceled":
            status.error_code = "provider_canceled"
            status.error_message = f"the provider reports the video {raw}"
        return status

    def content_url(self, task_id: str) -> str:
        return f"{self.base_url}/v1/videos/{task_id}/content"

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        """OpenAI has no cancel endpoint (``DELETE`` only removes completed or failed videos)."""
        return False

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Find a video created since the attempt began with our prompt, model, seconds and size."""
        wanted = self.build_body(request.model, request.input)
        after: str | None = None
        candidates: list[dict[str, Any]] = []
        for _ in range(LIST_MAX_PAGES):
            params: dict[str, str | int] = {"order": "desc", "limit": LIST_PAGE}
            if after:
                params["after"] = after
            response = await send(ctx.http, ctx.http.build_request("GET", f"{self.base_url}/v1/videos",
                                                                     params=params, headers=self._headers(ctx)))
            _raise_for_error(response)
            page = expect_object(parse_json(response), "video list")
            data = page.get("data")
            if not isinstance(data, list):
                raise MalformedResponse("Sora video list has no data", detail=_excerpt(page))
            older = False
            for video in data:
                if not isinstance(video, dict):
                    continue
                created = video.get("created_at")
                if isinstance(created, int | float) and created < since - RECONCILE_SLACK_SECONDS:
                    older = True
                    continue
                if _same_request(video, wanted):
                    candidates.append(video)
            last = page.get("last_id")
            if older or not page.get("has_more") or not isinstance(last, str):
                break
            after = last
        with_prompt = [v for v in candidates if v.get("prompt") is not None]
        if with_prompt:
            # Closest to our attempt: an identical earlier job's video was created before it.
            found = min(with_prompt, key=lambda v: abs(float(v.get("created_at") or 0) - since))
        elif len(candidates) == 1:
            found = candidates[0]  # an API version without ``prompt`` on videos: only an unambiguous match
        else:
            return None
        task_id = _video_id(found)
        return SubmitResult(task_id=task_id, status=str(found.get("status"))) if task_id else None

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        parts = urlsplit(url)
        if (parts.scheme, parts.hostname or "", parts.port) == self._origin:
            return {"Authorization": f"Bearer {ctx.api_key}"}
        return {}


def _video_id(video: dict[str, Any]) -> str | None:
    value = video.get("id") or video.get("task_id")  # gateways add ``task_id``
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:-]+", value) else None


def _same_request(video: dict[str, Any], wanted: dict[str, Any]) -> bool:
    model = video.get("model")
    if isinstance(model, str) and model != wanted["model"] and not model.startswith(wanted["model"] + "-"):
        return False
    if "prompt" in video and video["prompt"] is not None and video["prompt"] != wanted["prompt"]:
        return False
    return all(video.get(key) in (None, wanted[key]) for key in ("seconds", "size") if key in wanted)


def _poll_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value) / 1000.0) if value else None
    except ValueError:
        return None


def _excerpt(body: Any) -> str:
    return str(body)[:300]


_BILLING_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})


def _raise_for_error(response: httpx.Response, *, creates: bool = False) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response, unwrap="error")
    code = str(error.get("code") or "")
    message = str(error.get("message") or f"HTTP {status}")
    if code in _BILLING_CODES or error.get("type") in _BILLING_CODES:
        # 429 insufficient_quota (no credit left), 400 billing_hard_limit_reached: the account, not the request.
        raise InsufficientBalance(f"Sora refused the request: {message}", detail=error, status_code=status)
    if status == 429:
        retry_ms = response.headers.get("retry-after-ms")
        retry = _poll_after(retry_ms) if retry_ms else retry_after_seconds(response.headers)
        raise RateLimited("Sora rate limit (HTTP 429)", retry_after=retry, detail=error)
    if creates and status in (400, 404, 409, 422):
        raise Rejected(f"Sora refused the video: {message}", detail=error, status_code=status,
                       code=("provider_content_filtered" if "moderation" in code
                             else "model_not_found" if code == "model_not_found" else "provider_rejected_input"))
    raise_for_common_status(response, creates=creates, detail=error)
