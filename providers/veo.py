"""Google Veo through the Gemini API (https://ai.google.dev/gemini-api/docs/video).

The base URL is the origin (``https://generativelanguage.googleapis.com``); the routes carry
the API version, ``/v1beta`` (documented) by default, ``/v1`` with ``extra["api_version"]``
(``ATELIER_VEO_API_VERSION``; whether Google serves Veo on ``v1`` is UNCONFIRMED). Auth:
``x-goog-api-key: <key>``.

Endpoints:

* ``POST /v1beta/models/{model}:predictLongRunning`` with ``{"instances": [{prompt, image,
  lastFrame, referenceImages, video}], "parameters": {aspectRatio, durationSeconds,
  resolution, negativePrompt, personGeneration, sampleCount, enhancePrompt, seed}}`` ->
  ``{"name": "models/{model}/operations/{id}"}`` (the task id; it contains slashes).
* ``GET /v1beta/{operation name}`` -> the long-running operation.
* ``generatedSamples[].video.uri`` (``.../v1beta/files/{id}:download?alt=media``) -> needs the
  API key and answers a redirect to storage; the key is only given for the API's own host
  (the worker drops headers on cross-host redirects). Files are kept 2 days.

Status mapping: ``done`` absent/false -> running (no queued/running distinction, no progress);
``done: true`` with ``error`` (a ``google.rpc.Status``; gRPC codes, not HTTP) -> failed;
``done: true`` with samples -> succeeded; **``done: true`` without ``error`` and without
samples is a failure**: the RAI content filter (``raiMediaFilteredCount`` /
``raiMediaFilteredReasons``, which go into the error) or no output at all.

Validation before anything is sent (per model family): ``durationSeconds`` 4/6/8 on Veo 3.x,
5..8 on Veo 2; ``resolution`` 720p, 1080p (8 s only) and 4k (Veo 3.1, not Lite; 8 s only);
``aspectRatio`` 16:9 | 9:16; 8 s with extension, interpolation or reference images; extension
is 720p only; ``personGeneration`` per mode on Veo 3.x; ``sampleCount`` 1 (Veo 3.x) or 1..2
(Veo 2); Vertex-only parameters are refused. ``image_url`` is fetched and sent inline
(``bytesBase64Encoded``): the Gemini API takes no image URLs. ``seed`` is sent on Veo 3.x (the
docs offer it; the Python SDK refuses it in Gemini mode -- a documented conflict).

No cancel endpoint, no list endpoint (an ambiguous create cannot be reconciled), and the
2026 webhooks are project-level or need a JWT/JWKS scheme whose audience is undocumented: no
callbacks. Errors are ``{"error": {code, message, status, details}}``; 429
``RESOURCE_EXHAUSTED`` carries ``RetryInfo.retryDelay``, except "prepayment credits are
depleted", which is InsufficientBalance (waiting does not bring credit back).
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass
from typing import Any
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
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
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

log = logging.getLogger(__name__)

API_HOST = "generativelanguage.googleapis.com"
API_VERSIONS = ("v1beta", "v1")
ASPECT_RATIOS = ("16:9", "9:16")
PERSON_GENERATION = ("allow_all", "allow_adult", "dont_allow")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
INSTANCE_OPTIONS = frozenset({"image", "lastFrame", "referenceImages", "video"})
PARAMETER_OPTIONS = frozenset({"aspectRatio", "durationSeconds", "resolution", "negativePrompt",
                               "personGeneration", "sampleCount", "enhancePrompt", "seed"})
VERTEX_ONLY = frozenset({"storageUri", "fps", "pubsubTopic", "generateAudio", "compressionQuality",
                         "resizeMode", "mask", "labels", "outputGcsUri"})
_MODEL = re.compile(r"^veo-(\d+)(?:\.(\d+))?-[a-z0-9.-]+$")
_OPERATION = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


@dataclass(frozen=True)
class ModelRules:
    family: str
    durations: tuple[int, ...]
    resolutions: tuple[str, ...]
    max_samples: int
    seed: bool
    # Interpolation (lastFrame), reference images and extension are Veo 3.1 features.
    advanced: bool


def model_rules(model: str) -> ModelRules | None:
    match = _MODEL.match(model)
    if match is None:
        return None
    major, minor = match.group(1), match.group(2) or "0"
    if (major, minor) == ("3", "1"):
        resolutions = ("720p", "1080p") if "lite" in model else ("720p", "1080p", "4k")
        return ModelRules("3.1", (4, 6, 8), resolutions, 1, True, True)
    if major == "3":
        return ModelRules("3", (4, 6, 8), ("720p", "1080p"), 1, True, False)
    if major == "2":
        return ModelRules("2", (5, 6, 7, 8), ("720p",), 2, False, False)
    return None


@dataclass
class VeoRequest:
    """A validated request, before the ``image_url`` (if any) is fetched."""

    instance: dict[str, Any]
    parameters: dict[str, Any]
    image_url: str | None = None

    def body(self) -> dict[str, Any]:
        return {"instances": [self.instance], "parameters": self.parameters}


class VeoProvider(Provider):
    name = "veo"
    default_base_url = "https://generativelanguage.googleapis.com"
    default_typical_seconds = {"video": 90}
    kinds = frozenset({MediaKind.video})
    supports_cancel = False
    supports_callbacks = False
    retention = "2 days (generated files are removed from the server)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port)
        self.api_version = str(settings.extra.get("api_version", "v1beta"))
        if self.api_version not in API_VERSIONS:
            raise ValueError(f"veo api_version is one of {', '.join(API_VERSIONS)}, not {self.api_version!r}")

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self.build(request.model, request.input)

    def build(self, model: str, job_input: MediaInput) -> VeoRequest:
        """The predictLongRunning request for ``job_input``; raises ``InvalidInput`` naming the field."""
        rules = model_rules(model)
        if rules is None:
            raise InvalidInput("model", "Veo models are e.g. 'veo-3.1-generate-preview', "
                                        "'veo-3.0-generate-001' or 'veo-2.0-generate-001'")
        options = job_input.options
        for key in options:
            if key in VERTEX_ONLY:
                raise InvalidInput(f"input.options.{key}", f"'{key}' is accepted only by Vertex AI, "
                                                           "not by the Gemini API")
            if key not in INSTANCE_OPTIONS | PARAMETER_OPTIONS:
                raise InvalidInput(f"input.options.{key}", "not a Veo instance field or parameter")
        instance: dict[str, Any] = {}
        params: dict[str, Any] = {}
        field: dict[str, str] = {}  # parameter -> the request field it came from (for errors)

        def put(name: str, value: Any, source: str) -> None:
            params[name] = value
            field[name] = source

        if job_input.prompt:
            instance["prompt"] = job_input.prompt
        if job_input.negative_prompt is not None:
            put("negativePrompt", job_input.negative_prompt, "input.negative_prompt")
        if job_input.aspect_ratio is not None:
            put("aspectRatio", job_input.aspect_ratio, "input.aspect_ratio")
        if job_input.duration_seconds is not None:
            duration = job_input.duration_seconds
            put("durationSeconds", int(duration) if float(duration).is_integer() else duration,
                "input.duration_seconds")
        if job_input.resolution is not None:
            put("resolution", _resolution_name(job_input.resolution), "input.resolution")
        if job_input.num_outputs is not None:
            put("sampleCount", job_input.num_outputs, "input.num_outputs")
        if job_input.seed is not None:
            if not rules.seed:
                raise InvalidInput("input.seed", f"{model} takes no seed on the Gemini API")
            put("seed", job_input.seed, "input.seed")
        for key, value in options.items():
            if key in PARAMETER_OPTIONS:
                put(key, value, f"input.options.{key}")
            else:
                instance[key] = value
        image_url = str(job_input.image_url) if job_input.image_url is not None else None
        if image_url is not None and "image" in options:
            raise InvalidInput("input.image_url", "give either image_url or options.image")

        self._check_instance(model, rules, instance, has_image_url=image_url is not None)
        self._check_parameters(model, rules, params, field, instance, has_image_url=image_url is not None)
        return VeoRequest(instance=instance, parameters=params, image_url=image_url)

    def _check_instance(self, model: str, rules: ModelRules, instance: dict[str, Any], *,
                        has_image_url: bool) -> None:
        if not instance.get("prompt") and not has_image_url and "image" not in instance \
                and "video" not in instance:
            raise InvalidInput("input.prompt", "Veo needs a prompt (or an input image)")
        for key in ("image", "lastFrame"):
            if key in instance:
                _check_image(instance[key], f"input.options.{key}")
        for key in ("lastFrame", "referenceImages", "video"):
            if key in instance and not rules.advanced:
                raise InvalidInput(f"input.options.{key}", f"{model} does not take '{key}' (a Veo 3.1 feature)")
        if "lastFrame" in instance and "image" not in instance and not has_image_url:
            raise InvalidInput("input.options.lastFrame", "'lastFrame' needs a first frame (image_url or "
                                                          "options.image)")
        refs = instance.get("referenceImages")
        if refs is not None:
            if not isinstance(refs, list) or not 1 <= len(refs) <= 3:
                raise InvalidInput("input.options.referenceImages", "one to three reference images")
            for i, ref in enumerate(refs):
                where = f"input.options.referenceImages.{i}"
                if not isinstance(ref, dict) or ref.get("referenceType", "asset") != "asset":
                    raise InvalidInput(where, "each reference is {'image': {...}, 'referenceType': 'asset'}")
                _check_image(ref.get("image"), f"{where}.image")
        video = instance.get("video")
        if video is not None and not (isinstance(video, dict) and (
                isinstance(video.get("uri"), str) or isinstance(video.get("encodedVideo"), str))):
            raise InvalidInput("input.options.video", "the video to extend is {'uri': <a Veo video uri>} or "
                                                      "{'encodedVideo': <base64>, 'encoding': 'video/mp4'}")

    def _check_parameters(self, model: str, rules: ModelRules, params: dict[str, Any], field: dict[str, str],
                          instance: dict[str, Any], *, has_image_url: bool) -> None:
        if "aspectRatio" in params and params["aspectRatio"] not in ASPECT_RATIOS:
            raise InvalidInput(field["aspectRatio"], "Veo renders 16:9 or 9:16")
        durations = ", ".join(str(d) for d in rules.durations)
        duration = params.get("durationSeconds", 8)
        if isinstance(duration, bool) or not isinstance(duration, int) or duration not in rules.durations:
            raise InvalidInput(field.get("durationSeconds", "input.duration_seconds"),
                               f"{model} renders {durations} seconds")
        resolution = params.get("resolution", "720p")
        if resolution not in rules.resolutions:
            raise InvalidInput(field.get("resolution", "input.resolution"),
                               f"{model} renders {', '.join(rules.resolutions)}")
        if resolution != "720p" and duration != 8:
            raise InvalidInput(field.get("durationSeconds", field.get("resolution", "input.resolution")),
                               f"{resolution} needs 8 seconds")
        special = [k for k in ("video", "lastFrame", "referenceImages") if k in instance]
        if special and duration != 8:
            raise InvalidInput(field.get("durationSeconds", f"input.options.{special[0]}"),
                               f"'{special[0]}' needs 8 seconds")
        if "video" in instance and resolution != "720p":
            raise InvalidInput(field.get("resolution", "input.options.video"), "video extension is 720p only")
        if "personGeneration" in params:
            person = params["personGeneration"]
            if person not in PERSON_GENERATION:
                raise InvalidInput(field["personGeneration"], f"one of {', '.join(PERSON_GENERATION)}")
            if rules.family != "2":
                image_mode = has_image_url or "image" in instance or "referenceImages" in instance
                wanted = "allow_adult" if image_mode else "allow_all"
                if person != wanted:
                    mode = "image-to-video" if image_mode else "text-to-video"
                    raise InvalidInput(field["personGeneration"], f"{model} takes only '{wanted}' for {mode}")
        samples = params.get("sampleCount", 1)
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= rules.max_samples:
            raise InvalidInput(field.get("sampleCount", "input.num_outputs"),
                               f"{model} renders 1 to {rules.max_samples} videos per request"
                               if rules.max_samples > 1 else f"{model} renders one video per request")
        if "seed" in params and not rules.seed:
            raise InvalidInput(field["seed"], f"{model} takes no seed on the Gemini API")
        if "seed" in params and (isinstance(params["seed"], bool) or not isinstance(params["seed"], int)
                                 or not 0 <= params["seed"] <= 2**32 - 1):
            raise InvalidInput(field["seed"], "a seed is an integer from 0 to 4294967295")
        for key, kind in (("negativePrompt", str), ("enhancePrompt", bool)):
            if key in params and not isinstance(params[key], kind):
                raise InvalidInput(field[key], f"'{key}' must be a {kind.__name__}")

    # -- the task ------------------------------------------------------------------------
    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"x-goog-api-key": ctx.api_key, "User-Agent": "atelier"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        veo = self.build(request.model, request.input)
        if veo.image_url is not None:
            veo.instance["image"] = await _fetch_image(ctx, veo.image_url)
        url = f"{self.base_url}/{self.api_version}/models/{request.model}:predictLongRunning"
        http_request = ctx.http.build_request("POST", url, json=veo.body(), headers=self._headers(ctx))
        response = await send(ctx.http, http_request, creates=True)
        _raise_for_error(response, creates=True)
        operation = expect_object(parse_json(response), "operation")
        name = operation.get("name")
        if not isinstance(name, str) or not _OPERATION.match(name) or ".." in name:
            raise MalformedResponse("Veo answered without an operation name", detail=str(operation)[:300])
        status = "done" if operation.get("done") is True else "running"
        return SubmitResult(task_id=name, request_id=_request_id(response), status=status)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        name = task.task_id
        if not _OPERATION.match(name) or ".." in name:
            raise MalformedResponse("the job's Veo operation name is not valid", detail=name[:200])
        url = f"{self.base_url}/{self.api_version}/{name}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        _raise_for_error(response)
        status = self.parse_operation(expect_object(parse_json(response), "operation"))
        status.request_id = _request_id(response)
        return status

    def parse_operation(self, operation: dict[str, Any]) -> TaskStatus:
        done = operation.get("done", False)
        if done is None or done is False:
            return TaskStatus(state="running", raw_status="done=false")
        if done is not True:
            log.warning("veo: operation has done=%r; treating it as still running", done)
            return TaskStatus(state="unknown", raw_status=f"done={done}")
        error = operation.get("error")
        if error is not None:
            err = error if isinstance(error, dict) else {"message": str(error)}
            return TaskStatus(
                state="failed", raw_status="done=true error", error_code="provider_failed",
                error_message=f"Veo failed the generation: {err.get('message') or 'no message'} "
                              f"(gRPC code {err.get('code')})",
                error_detail={"error": err})
        response = operation.get("response")
        response = response if isinstance(response, dict) else {}
        generated = response.get("generateVideoResponse")
        generated = generated if isinstance(generated, dict) else response
        samples = generated.get("generatedSamples") or generated.get("generatedVideos") \
            or response.get("generatedVideos") or []
        filtered_count = generated.get("raiMediaFilteredCount") or 0
        reasons = generated.get("raiMediaFilteredReasons") or []
        outputs = []
        for sample in samples if isinstance(samples, list) else []:
            url = self._sample_url(sample)
            if url is not None:
                meta = {"rai_media_filtered_count": filtered_count} if filtered_count else {}
                outputs.append(ProviderOutput(url=url, content_type="video/mp4", metadata=meta))
        if outputs:
            return TaskStatus(state="succeeded", raw_status="done=true", progress=100, outputs=outputs)
        detail = {"raiMediaFilteredCount": filtered_count, "raiMediaFilteredReasons": reasons}
        if filtered_count or reasons:
            text = " ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons)
            return TaskStatus(
                state="failed", raw_status="done=true filtered", error_code="provider_content_filtered",
                error_message=f"Veo's content filter blocked the video: {text or 'no reason given'}",
                error_detail=detail)
        return TaskStatus(state="failed", raw_status="done=true", error_code="provider_no_output",
                          error_message="Veo finished the operation without a video", error_detail=detail)

    def _sample_url(self, sample: Any) -> str | None:
        video = sample.get("video") if isinstance(sample, dict) else None
        if not isinstance(video, dict):
            return None
        uri = video.get("uri")
        if isinstance(uri, str) and uri.startswith(("https://", "http://")):
            return uri
        if isinstance(uri, str) and uri.startswith("files/"):  # a File name: the SDK downloads it so
            return f"{self.base_url}/{self.api_version}/{uri.split(':')[0]}:download?alt=media"
        encoded = video.get("encodedVideo")
        if isinstance(encoded, str) and encoded:
            return f"data:{video.get('encoding') or 'video/mp4'};base64,{encoded}"
        return None

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        """The Gemini API documents no way to cancel a Veo operation."""
        return False

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """The Gemini API lists no Veo operations: an ambiguous create cannot be found."""
        return None

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port)
        if origin == self._origin or (parts.scheme == "https" and parts.hostname == API_HOST):
            return {"x-goog-api-key": ctx.api_key}
        return {}


def _resolution_name(value: str) -> str:
    """``1920x1080`` -> ``1080p`` (the short side), so WxH requests map to Veo's names."""
    if value == "2160p":
        return "4k"
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None:
        return value
    short = min(int(match.group(1)), int(match.group(2)))
    return {720: "720p", 1080: "1080p", 2160: "4k"}.get(short, value)


def _check_image(image: Any, where: str) -> None:
    if not isinstance(image, dict) or not isinstance(image.get("bytesBase64Encoded"), str):
        raise InvalidInput(where, "an image is {'bytesBase64Encoded': <base64>, 'mimeType': <type>} "
                                  "(the Gemini API takes no gcsUri or inlineData)")
    if image.get("mimeType") not in IMAGE_TYPES:
        raise InvalidInput(where, f"mimeType is one of {', '.join(IMAGE_TYPES)}")


async def _fetch_image(ctx: CallContext, url: str) -> dict[str, str]:
    """Download ``image_url`` (bounded, destination-guarded) and inline it: nothing is created at Veo if
    this fails."""
    data = (await fetch_input(ctx, url, max_bytes=MAX_IMAGE_BYTES, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16])
    if mime is None:
        raise _image_error("the input image is not a PNG, JPEG or WebP file")
    return {"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": mime}


def _image_error(message: str) -> Rejected:
    return Rejected(message, code="input_image_unavailable")


def _request_id(response: httpx.Response) -> str | None:
    return response.headers.get("x-request-id") or response.headers.get("x-goog-request-id")


def _details(error: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict) and str(d.get("@type", "")).endswith(kind)] \
        if isinstance(details, list) else []


def retry_delay(error: dict[str, Any]) -> float | None:
    """``RetryInfo.retryDelay`` (a protobuf Duration such as ``"19s"``) in seconds."""
    for info in _details(error, "google.rpc.RetryInfo"):
        match = _DURATION.match(str(info.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


_DEPLETED = re.compile(r"credits? (are|is|have been) (depleted|exhausted)", re.IGNORECASE)


def _raise_for_error(response: httpx.Response, *, creates: bool = False) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response, unwrap="error")
    message = str(error.get("message") or f"HTTP {status}")
    if status == 429 and _DEPLETED.search(message):
        # Prepaid credits used up (also a 429 RESOURCE_EXHAUSTED, but no wait brings them back).
        raise InsufficientBalance(f"Veo: {message}", detail=error, status_code=status)
    if status == 429:
        retry = retry_after_seconds(response.headers) or retry_delay(error)
        raise RateLimited(f"Veo quota exhausted (HTTP 429): {message}", retry_after=retry, detail=error)
    if any(d.get("reason") == "API_KEY_INVALID" for d in _details(error, "google.rpc.ErrorInfo")):
        raise AuthFailed("Veo refused the API key", detail=error, status_code=status)
    if creates and status in (400, 404, 409, 422):
        raise Rejected(f"Veo refused the request: {message}", detail=error, status_code=status,
                       code="model_not_found" if status == 404 else "provider_rejected_input")
    raise_for_common_status(response, creates=creates, detail=error)
