"""Stability AI, Stable Image v2beta (https://platform.stability.ai/docs/api-reference).

Base URL ``https://api.stability.ai``; ``Authorization: Bearer <key>``. Every POST is
``multipart/form-data`` (text fields go as file-less parts, so a text-only body is multipart too).

Generate is synchronous: the request stays open until the image exists and answers with it.

* ``stable-image-ultra`` -> ``POST /v2beta/stable-image/generate/ultra`` (an input image with
  ``options.strength`` makes it image-to-image), ``stable-image-core`` -> ``/generate/core``
  (text-to-image only), ``sd3.5-large``, ``sd3.5-large-turbo``, ``sd3.5-medium`` ->
  ``/generate/sd3`` with ``model`` (and ``mode`` ``image-to-image`` when an image is given).
* Common fields: ``prompt`` (1-10,000 characters), ``negative_prompt``, ``aspect_ratio`` (``21:9
  16:9 3:2 5:4 1:1 4:5 2:3 9:16 9:21``, text-to-image only), ``seed`` (0-4294967294), one image
  per request; ``image_url`` (or a ``source`` job's output) is fetched and sent as ``image``.
  ``options``: ``output_format`` (png, jpeg, webp), ``style_preset`` (ultra, core), ``strength``
  (0-1, with an image), ``cfg_scale`` (sd3, 1-10).
* ``Accept: image/*`` (the default; ``extra["accept"] = "application/json"`` asks for JSON): the
  answer is the image bytes with ``finish-reason`` and ``seed`` headers, or ``{image: base64,
  finish_reason, seed}``. Either becomes a ``data:`` output, stored by the worker at once.
  ``finish-reason: CONTENT_FILTERED`` inside the 200 is a refusal (the image is a blurred
  placeholder, not charged): the job fails ``content_policy`` and nothing is stored.
* No id, no lookup, no idempotency key: the task id is the job's id, ``fetch`` of such a task
  raises ``TaskNotFound``, and a timeout or a 500/502/504 after the request was sent is
  ``OutcomeUnknown`` (never resent unless the job opted in).

Two follow-up operations run on Stability's asynchronous routes (``source``: any provider's stored
image, fetched and sent as the file): ``upscale`` -> ``POST /v2beta/stable-image/upscale/creative``
(``image``, ``prompt``; options ``creativity``, ``style_preset``, ``output_format``) and
``replace_background`` -> ``POST /v2beta/stable-image/edit/replace-background-and-relight``
(``subject_image``; the prompt is the ``background_prompt``; options ``background_reference`` and
``light_reference`` (URLs, fetched), ``foreground_prompt``, ``light_source_direction``,
``light_source_strength``, ``preserve_original_subject``, ``original_background_depth``,
``keep_original_background``, ``output_format``). They answer ``{"id": <64 hex>}``; ``GET
/v2beta/results/{id}`` (same key) is 202 while running and 200 with the image when done (headers
only are read here: the output is that URL, collected with the key), ``CONTENT_FILTERED`` ->
``content_policy``, a 5xx with Stability's error body -> failed; a 404 after the task was seen
running means the result expired (kept 24 h) -> ``output_expired``. These tasks are polled, so the
adapter is not ``synchronous``: only the generate routes answer with ``done``.

Errors (``{"id", "name", "errors": [...]}``, or ``message``): 400/413/422 ->
``provider_rejected_input``, 401 -> AuthFailed, 402 -> InsufficientBalance, 403
``content_moderation`` -> ``content_policy`` (other 403 -> AuthFailed), 404 -> ``model_not_found``,
429 (150 requests per 10 s, then the key is locked out for 60 s) -> RateLimited after
``Retry-After`` or 60 s.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaKind,
    Operation,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.http import (
    error_body,
    expect_object,
    fetch_input,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
    sniff_image,
)

# model -> (generate route, the sd3 route's ``model`` field)
MODELS: dict[str, tuple[str, str | None]] = {
    "stable-image-ultra": ("ultra", None),
    "stable-image-core": ("core", None),
    "sd3.5-large": ("sd3", "sd3.5-large"),
    "sd3.5-large-turbo": ("sd3", "sd3.5-large-turbo"),
    "sd3.5-medium": ("sd3", "sd3.5-medium"),
}
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
LIGHT_DIRECTIONS = ("left", "right", "above", "below")
MAX_SEED = 4294967294
MAX_PROMPT = 10_000
MAX_IMAGE_BYTES = 10 * 1024 * 1024
RATE_LIMIT_PAUSE = 60.0  # a 429 locks the key out for 60 s
ASYNC_ROUTES = {"upscale": "upscale/creative", "replace_background": "edit/replace-background-and-relight"}
GENERATE_OPTIONS = {"ultra": frozenset({"output_format", "style_preset", "strength"}),
                    "core": frozenset({"output_format", "style_preset"}),
                    "sd3": frozenset({"output_format", "strength", "cfg_scale"})}
UPSCALE_OPTIONS = frozenset({"output_format", "creativity", "style_preset"})
RELIGHT_OPTIONS = frozenset({"output_format", "background_reference", "light_reference", "foreground_prompt",
                             "light_source_direction", "light_source_strength", "preserve_original_subject",
                             "original_background_depth", "keep_original_background"})
_FILE_OPTIONS = ("background_reference", "light_reference")
_FRACTIONS = ("strength", "creativity", "light_source_strength", "preserve_original_subject",
              "original_background_depth")
_IMAGE = frozenset({MediaKind.image})


@dataclass
class Call:
    """A validated request: the route, its text fields, and the files to fetch (part name, URL)."""

    path: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str | None]] = field(default_factory=list)  # URL None: the source's (unknown yet)

    @property
    def synchronous(self) -> bool:
        return "/generate/" in self.path


class StabilityTask(TaskState):
    """An asynchronous result's record: whether it was seen running (a later 404 means it expired)."""

    seen_running: bool = False


class StabilityProvider(Provider):
    name = "stability"
    kinds = _IMAGE
    default_base_url = "https://api.stability.ai"
    default_typical_seconds = {"image": 10}
    default_concurrency = 10  # a synchronous generation holds its slot for its whole run
    synchronous = False  # generate is; the follow-ups are polled
    retention = "generated images answered inline (stored at once); asynchronous results kept 24 hours"
    operations = (
        Operation("upscale", source="media", source_kinds=_IMAGE,
                  description="creative upscale of the source image (asynchronous)"),
        Operation("replace_background", source="media", source_kinds=_IMAGE,
                  description="replace background and relight: the source's subject on the prompt's background "
                              "(asynchronous)"),
    )

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        json_answers = str(settings.extra.get("accept", "")).startswith("application/json")
        self._accept = "application/json" if json_answers else "image/*"
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.plan(request)

    def plan(self, request: GenerationRequest) -> Call:
        """The call for ``request``; raises ``InvalidInput`` naming the field."""
        if request.model not in MODELS:
            raise InvalidInput("model", f"Stability models are {', '.join(MODELS)}")
        given = request.input
        if given.duration_seconds is not None:
            raise InvalidInput("input.duration_seconds", "an image has no duration")
        if given.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", "Stability renders one image per request")
        if given.resolution is not None:
            raise InvalidInput("input.resolution", "Stability takes an aspect_ratio, not a resolution")
        if given.seed is not None and given.seed > MAX_SEED:
            raise InvalidInput("input.seed", f"Stability seeds are 0 to {MAX_SEED}")
        if given.prompt is not None and len(given.prompt) > MAX_PROMPT:
            raise InvalidInput("input.prompt", f"at most {MAX_PROMPT} characters")
        call = self._generate(request) if request.operation == "generate" else self._follow_up(request)
        for name in ("negative_prompt", "seed"):
            value = getattr(given, name)
            if value is not None:
                call.fields.append((name, str(value)))
        return call

    def _generate(self, request: GenerationRequest) -> Call:
        given, source = request.input, request.source
        route, sd3_model = MODELS[request.model]
        if not given.prompt or not given.prompt.strip():
            raise InvalidInput("input.prompt", "Stability needs a prompt")
        call = Call(f"/v2beta/stable-image/generate/{route}", [("prompt", given.prompt)])
        if sd3_model is not None:
            call.fields.append(("model", sd3_model))
        self._options(request, GENERATE_OPTIONS[route], call)
        # A source's stored output is the input image (its URL is only known at submit).
        image = given.image_url
        where = "source" if source is not None and image in (None, source.url) else "input.image_url"
        if image is not None or source is not None:
            if route == "core":
                raise InvalidInput(where, "stable-image-core is text-to-image only: use stable-image-ultra or an "
                                          "sd3.5 model for image-to-image")
            if given.aspect_ratio is not None:
                raise InvalidInput("input.aspect_ratio", "image-to-image keeps the input image's aspect ratio")
            if "strength" not in given.options:
                raise InvalidInput("input.options.strength", "image-to-image needs a strength from 0 to 1")
            if route == "sd3":
                call.fields.append(("mode", "image-to-image"))
            call.files.append(("image", image))
        elif "strength" in given.options:
            raise InvalidInput("input.options.strength", "strength applies to image-to-image (give an image)")
        if given.aspect_ratio is not None:
            if given.aspect_ratio not in ASPECT_RATIOS:
                raise InvalidInput("input.aspect_ratio", f"one of {', '.join(ASPECT_RATIOS)}")
            call.fields.append(("aspect_ratio", given.aspect_ratio))
        return call

    def _follow_up(self, request: GenerationRequest) -> Call:
        given, source = request.input, request.source
        assert source is not None  # the base validation requires the source of a "media" operation
        if given.image_url is not None:
            raise InvalidInput("input.image_url", f"{request.operation} acts on the source job's image")
        if given.aspect_ratio is not None:
            raise InvalidInput("input.aspect_ratio", f"{request.operation} keeps the source's aspect ratio")
        call = Call(f"/v2beta/stable-image/{ASYNC_ROUTES[request.operation]}")
        if request.operation == "upscale":
            if not given.prompt or not given.prompt.strip():
                raise InvalidInput("input.prompt", "a creative upscale needs a prompt describing the image")
            call.fields.append(("prompt", given.prompt))
            call.files.append(("image", source.url))
            self._options(request, UPSCALE_OPTIONS, call)
            return call
        if given.prompt:
            call.fields.append(("background_prompt", given.prompt))
        elif "background_reference" not in given.options:
            raise InvalidInput("input.prompt", "replace_background needs the background: a prompt or "
                                               "options.background_reference")
        call.files.append(("subject_image", source.url))
        self._options(request, RELIGHT_OPTIONS, call)
        return call

    def _options(self, request: GenerationRequest, allowed: frozenset[str], call: Call) -> None:
        for key, value in request.input.options.items():
            where = f"input.options.{key}"
            if key not in allowed:
                raise InvalidInput(where, f"not a Stability option of {request.model} {request.operation} "
                                          f"(allowed: {', '.join(sorted(allowed))})")
            if key in _FILE_OPTIONS:
                if not isinstance(value, str) or not value.startswith(("https://", "http://")):
                    raise InvalidInput(where, "an http(s) URL of an image")
                call.files.append((key, value))
                continue
            if key in _FRACTIONS or key == "cfg_scale":
                low, high = (1.0, 10.0) if key == "cfg_scale" else (0.0, 1.0)
                if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                    raise InvalidInput(where, f"a number from {low:g} to {high:g}")
            elif key == "keep_original_background":
                if not isinstance(value, bool):
                    raise InvalidInput(where, "true or false")
                value = "true" if value else "false"
            elif key == "output_format" and value not in OUTPUT_FORMATS:
                raise InvalidInput(where, f"one of {', '.join(OUTPUT_FORMATS)}")
            elif key == "light_source_direction" and value not in LIGHT_DIRECTIONS:
                raise InvalidInput(where, f"one of {', '.join(LIGHT_DIRECTIONS)}")
            elif not isinstance(value, str | int | float) or isinstance(value, bool):
                raise InvalidInput(where, "a string or a number")
            call.fields.append((key, str(value)))

    # -- the calls -----------------------------------------------------------------------
    def _headers(self, ctx: CallContext, accept: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier", "Accept": accept}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        call = self.plan(request)
        source_url = request.source.url if request.source is not None else None
        parts: list[tuple[str, tuple[str | None, str | bytes] | tuple[str, bytes, str]]] = [
            (name, (None, value)) for name, value in call.fields]
        for name, url in call.files:
            url = url or source_url
            if url is None:
                raise Rejected("the source job's output has no URL to fetch", code="source_unavailable")
            parts.append((name, await _fetch_image(ctx, url, "the source image" if url == source_url else name)))
        accept = self._accept if call.synchronous else "application/json"
        http_request = ctx.http.build_request("POST", self.base_url + call.path, files=parts,
                                              headers=self._headers(ctx, accept))
        response = await send(ctx.http, http_request, creates=True, timeout=ctx.timeout)
        _raise_for_error(response)
        request_id = response.headers.get("x-request-id")
        if call.synchronous:
            done = _generated(response, request.operation)
            return SubmitResult(task_id=request.reference, request_id=request_id, status=done.raw_status, done=done)
        body = expect_object(parse_json(response), "Stability submission")
        task_id = body.get("id")
        if not isinstance(task_id, str) or not task_id or len(task_id) > 128:
            raise MalformedResponse("Stability accepted the request without a generation id", detail=str(body)[:300])
        return SubmitResult(task_id=task_id, request_id=request_id, status="in-progress", state=StabilityTask())

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        if task.request.operation == "generate":
            raise TaskNotFound("Stability's generate routes answer the request itself: there is no task to fetch")
        url = self._result_url(task.task_id)
        response = await self._result(ctx, url)
        status = response.status_code
        if status == 202:
            return TaskStatus(state="running", raw_status="in-progress", task_state=StabilityTask(seen_running=True))
        if status == 404:
            if StabilityTask.of(task).seen_running:
                return TaskStatus(state="failed", raw_status="not_found", error_code="output_expired",
                                  error_message="Stability no longer has the result (results are kept 24 hours)",
                                  error_detail=error_body(response))
            raise TaskNotFound("Stability does not know this generation (HTTP 404)", detail=error_body(response),
                               status_code=status)
        if status >= 400:
            error = error_body(response)
            if status == 500 and "name" in error:
                return TaskStatus(state="failed", raw_status=str(error["name"]), error_code="provider_failed",
                                  error_message=f"Stability: {_message(error, status)}", error_detail=error)
            _raise_for_error(response, creates=False)
        if response.headers.get("content-type", "").startswith("image/"):
            finish = response.headers.get("finish-reason") or "SUCCESS"
            seed = response.headers.get("seed")
            content_type: str | None = response.headers["content-type"].split(";")[0].strip()
        else:
            result = expect_object(parse_json(response), "Stability result")
            finish, seed = _finish(result), result.get("seed")
            content_type = _json_image_type(response)
        refused = _refusal(finish, task.request.operation)
        if refused is not None:
            return refused
        metadata = {"operation": task.request.operation, "finish_reason": finish}
        if seed is not None:
            metadata["seed"] = str(seed)
        return TaskStatus(state="succeeded", raw_status=finish, progress=100,
                          outputs=[ProviderOutput(url=url, content_type=content_type, metadata=metadata)])

    def _result_url(self, generation_id: str) -> str:
        return f"{self.base_url}/v2beta/results/{generation_id}"

    async def _result(self, ctx: CallContext, url: str) -> httpx.Response:
        """``GET /v2beta/results/{id}``, reading the body unless it is the image (collected later)."""
        request = ctx.http.build_request("GET", url, headers=self._headers(ctx, "image/*"))
        try:
            response = await ctx.http.send(request, stream=True)
            try:
                image = response.status_code == 200 and response.headers.get("content-type", "").startswith("image/")
                if not image:
                    await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise Unavailable(f"Stability result request failed: {exc.__class__.__name__}") from exc
        return response

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """A result is fetched from the API with the key that created it (``Accept: image/*``)."""
        parts = urlsplit(url)
        if (parts.scheme, parts.hostname or "", parts.port) == self._origin and "/v2beta/results/" in parts.path:
            return self._headers(ctx, "image/*")
        return {}


# -- answers ------------------------------------------------------------------------------------

def _generated(response: httpx.Response, operation: str) -> TaskStatus:
    """A synchronous generation's answer as a finished task (bytes, or JSON with base64)."""
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("image/"):
        finish = response.headers.get("finish-reason") or "SUCCESS"
        seed: Any = response.headers.get("seed")
        refused = _refusal(finish, operation)
        if refused is not None:
            return refused
        data = response.content
    elif ctype.startswith("application/json"):
        body = expect_object(parse_json(response), "Stability answer")
        finish, seed = _finish(body), body.get("seed")
        refused = _refusal(finish, operation)
        if refused is not None:
            return refused
        data = _base64_image(body)
    else:
        raise MalformedResponse(f"Stability answered {ctype or 'no content type'} instead of an image",
                                detail={"body_excerpt": response.text[:200]})
    mime = sniff_image(data[:16])
    if mime is None:
        raise MalformedResponse("Stability answered bytes that are not a PNG, JPEG or WebP image")
    metadata: dict[str, Any] = {"operation": operation, "finish_reason": finish}
    if seed is not None:
        metadata["seed"] = str(seed)
    output = ProviderOutput(url=f"data:{mime};base64,{base64.b64encode(data).decode()}", content_type=mime,
                            metadata=metadata)
    return TaskStatus(state="succeeded", raw_status=finish, progress=100, outputs=[output])


def _refusal(finish: str, operation: str) -> TaskStatus | None:
    """The failed status a finish reason other than ``SUCCESS`` means (``None`` for a success)."""
    if finish == "SUCCESS":
        return None
    if finish == "CONTENT_FILTERED":
        return TaskStatus(state="failed", raw_status=finish, error_code="content_policy",
                          error_message=f"Stability's content filter blurred the {operation} result "
                                        "(CONTENT_FILTERED); it was not stored",
                          error_detail={"finish_reason": finish})
    return TaskStatus(state="failed", raw_status=finish, error_code="provider_failed",
                      error_message=f"Stability finished with {finish}", error_detail={"finish_reason": finish})


def _finish(body: Mapping[str, Any]) -> str:
    finish = body.get("finish_reason") or body.get("finishReason")
    artifacts = body.get("artifacts")
    if finish is None and isinstance(artifacts, list) and artifacts and isinstance(artifacts[0], dict):
        finish = artifacts[0].get("finishReason") or artifacts[0].get("finish_reason")
    return str(finish or "SUCCESS")


def _base64_image(body: Mapping[str, Any]) -> bytes:
    """The image of a JSON answer: ``image``, ``result`` or ``artifacts[0].base64`` (sources differ)."""
    b64 = body.get("image") or body.get("result")
    artifacts = body.get("artifacts")
    if b64 is None and isinstance(artifacts, list) and artifacts and isinstance(artifacts[0], dict):
        b64 = artifacts[0].get("base64")
    if not isinstance(b64, str) or not b64:
        raise MalformedResponse("Stability's JSON answer carries no image", detail=sorted(body)[:20])
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponse("Stability answered an image that is not valid base64") from exc


def _json_image_type(response: httpx.Response) -> str | None:
    """``application/json; type=image/png`` -> ``image/png``."""
    for param in response.headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name == "type" and value.startswith("image/"):
            return value
    return None


async def _fetch_image(ctx: CallContext, url: str, what: str) -> tuple[str, bytes, str]:
    """An input image as a multipart file (at most 10 MB): nothing is sent to Stability if this fails."""
    data = (await fetch_input(ctx, url, max_bytes=MAX_IMAGE_BYTES, what=what, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16])
    if mime is None:
        raise Rejected(f"{what} is not a JPEG, PNG or WebP image", code="input_image_unavailable")
    return f"image.{mime.removeprefix('image/')}", data, mime


def _message(error: Mapping[str, Any], status: int) -> str:
    errors = error.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:300]
    return str(error.get("message") or error.get("name") or error.get("body") or f"HTTP {status}")[:300]


def _raise_for_error(response: httpx.Response, *, creates: bool = True) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response)
    message = _message(error, status)
    if status == 403 and error.get("name") == "content_moderation":
        raise Rejected(f"Stability's content moderation refused the request: {message}", code="content_policy",
                       detail=error, status_code=status)
    if status == 429:
        raise RateLimited(f"Stability rate limit: {message}",
                          retry_after=retry_after_seconds(response.headers, RATE_LIMIT_PAUSE), detail=error)
    if status == 402:
        raise InsufficientBalance(f"Stability refused the request: {message}", detail=error, status_code=status)
    if status in (401, 403):
        raise AuthFailed(f"Stability refused the key (HTTP {status}): {message}", detail=error, status_code=status)
    if status in (400, 404, 413, 415, 422):
        raise Rejected(f"Stability refused the request: {message}", detail=error, status_code=status,
                       code="model_not_found" if status == 404 else "provider_rejected_input")
    raise_for_common_status(response, creates=creates, detail=error)
