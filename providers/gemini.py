"""Google Gemini native image generation ("Nano Banana") and Imagen 4 (images-wave2.md §7).

The base URL is the origin (``https://generativelanguage.googleapis.com``); the API version is a
path segment, ``extra["api_version"]`` (``v1beta``). Auth: ``x-goog-api-key: <key>``.

**Synchronous**: the create request stays open until the image exists and answers with it inline
(base64), so ``submit`` returns the finished status (``SubmitResult.done``); the outputs are
``data:`` URLs that the worker stores at once. The task id is the ``responseId`` (else the job's
id). No Gemini API call can be looked up afterwards: a timeout, reset or 500/504 after the request
was sent is ``OutcomeUnknown`` and is never resent (no SDK retry either: plain ``send``).

* ``POST /{version}/models/{model}:generateContent``:
  ``{"contents": [{"role": "user", "parts": [{"text"}, {"inline_data": {mime_type, data}}...]}],
  "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {aspectRatio, imageSize,
  personGeneration}, seed, temperature...}}``. ``image_url`` and ``options.images`` are fetched and
  sent inline (the Gemini API takes no image URLs). Per model: aspect ratios (3.1 Flash adds 1:4
  1:8 4:1 4:5 5:4 8:1), ``imageSize`` with an upper-case K (``resolution`` ``1k``/``2k``/``4k`` or
  ``WxH`` -> the size class covering the long side; 0.5K on 3.1 Flash only, 1K only on Lite, never
  sent to 2.5 Flash, which has no size choice), reference images (14 on Gemini 3), one image per
  request (``candidateCount`` > 1 is refused). Vertex-only fields are refused.
* Answer: ``candidates[].content.parts[]``; every non-thought ``inlineData`` (or a gateway's
  ``inline_data``) image part is an output; ``"thought": true`` parts are interim images and are
  skipped. Without an inline image, a gateway's Markdown image in a text part (a ``data:`` URL,
  then an http URL) is taken. ``usageMetadata``, the text parts, ``finishReason``,
  ``modelVersion`` and the ``thoughtSignature`` go in each output's metadata; its image output
  tokens are the task's ``usage``.
* No image in an HTTP 200 (§7.4): ``promptFeedback.blockReason`` (any) and the safety finish
  reasons (``IMAGE_SAFETY``, ``IMAGE_PROHIBITED_CONTENT``, ``SAFETY``, ``PROHIBITED_CONTENT``,
  ``BLOCKLIST``, ``SPII``, ``RECITATION``, ``IMAGE_RECITATION``) fail with ``content_policy``;
  anything else (``NO_IMAGE``, ``IMAGE_OTHER``, ``MAX_TOKENS``, a text-only ``STOP``) with
  ``provider_no_output``.

Imagen 4 (``imagen-4.0-generate-001``, ``-ultra-generate-001``, ``-fast-generate-001``) goes through
``:predict`` in the same adapter: ``{"instances": [{prompt}], "parameters": {sampleCount,
aspectRatio, sampleImageSize, personGeneration, safetySetting, includeRaiReason: true, ...}}`` ->
``predictions[].bytesBase64Encoded``; filtered samples are missing or carry ``raiFilteredReason``
(all filtered: ``content_policy``). The Gemini API deprecated Imagen and the SDK refuses it there
since 2026-08-21; Google serves it on Vertex AI. ``extra["imagen_route"]``: ``gemini`` (default:
``POST /{version}/models/{model}:predict`` on the base URL; a 404 fails ``model_not_found`` saying
so) or ``vertex``: ``POST /{vertex_version}/projects/{vertex_project}/locations/{vertex_location}/
publishers/google/models/{model}:predict`` at ``vertex_base_url`` (default
``https://{location}-aiplatform.googleapis.com``, or the base URL itself when that is not Google's
API host: a gateway or the sandbox), with the key as ``x-goog-api-key`` (Vertex API keys) or, with
``vertex_auth = "bearer"``, as ``Authorization: Bearer``.

Errors are ``{"error": {code, message, status, details}}``: 429 ``RESOURCE_EXHAUSTED`` ->
RateLimited (``RetryInfo.retryDelay``, or ``Retry-After``), except depleted prepaid credits
(InsufficientBalance); 400 ``API_KEY_INVALID``, 401 and 403 -> AuthFailed; 404 ->
``model_not_found``; other 400s -> ``provider_rejected_input``; 503 (overloaded: not accepted) ->
Unavailable; other 5xx -> OutcomeUnknown.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from providers.contract import (
    CallContext,
    GenerationRequest,
    MediaInput,
    MediaKind,
    Provider,
    ProviderOutput,
    SubmitResult,
    TaskRef,
    TaskStatus,
    Usage,
)
from providers.errors import (
    AuthFailed,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    RateLimited,
    Rejected,
    TaskNotFound,
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
from providers.usage import count, usage

API_HOST = "generativelanguage.googleapis.com"
BASE_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
FLASH_31_RATIOS = (*BASE_RATIOS, "1:4", "1:8", "4:1", "4:5", "5:4", "8:1")
SIZE_SIDES = {"0.5K": 512, "1K": 1024, "2K": 2048, "4K": 4096}
GEMINI_PERSON = ("ALLOW_ALL", "ALLOW_ADULT", "ALLOW_NONE")
MODALITIES = ("TEXT", "IMAGE")
# Native options -> where they go in the generateContent request.
IMAGE_CONFIG_OPTIONS = frozenset({"aspectRatio", "imageSize", "personGeneration"})
GENERATION_OPTIONS = frozenset({"responseModalities", "seed", "temperature", "topP", "topK", "thinkingConfig"})
REQUEST_OPTIONS = frozenset({"safetySettings", "systemInstruction"})
GEMINI_VERTEX_ONLY = frozenset({"outputMimeType", "outputCompressionQuality", "prominentPeople"})
# A refusal, not a failure to draw: these fail with content_policy.
SAFETY_FINISH = frozenset({"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "SAFETY",
                           "PROHIBITED_CONTENT", "RECITATION", "BLOCKLIST", "SPII"})

IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
IMAGEN_PERSON = ("dont_allow", "allow_adult", "allow_all")
IMAGEN_SAFETY = ("block_low_and_above", "block_medium_and_above", "block_only_high", "block_none")
IMAGEN_OPTIONS = frozenset({"personGeneration", "safetySetting", "includeSafetyAttributes", "language",
                            "outputOptions", "guidanceScale", "aspectRatio", "sampleImageSize", "addWatermark",
                            "enhancePrompt"})
# Refused by the Gemini API (the SDK rejected them client-side there); Vertex takes them.
IMAGEN_VERTEX_ONLY = frozenset({"negativePrompt", "seed", "addWatermark", "enhancePrompt"})

MAX_INLINE_BYTES = 20 * 1024 * 1024  # the Gemini API's limit on a request's inline data
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")
_WXH = re.compile(r"^(\d+)x(\d+)$")
_VERSION = re.compile(r"^v\d+[a-z0-9]*$")
_DEPLETED = re.compile(r"credits? (are|is|have been) (depleted|exhausted)", re.IGNORECASE)
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\((data:image/[a-z+.-]+;base64,[A-Za-z0-9+/=]+|https?://[^\s)]+)\)")


@dataclass(frozen=True)
class GeminiModel:
    aspect_ratios: tuple[str, ...]
    image_sizes: tuple[str, ...]  # () = no size choice (1024-class output): imageSize is never sent
    max_references: int | None


FLASH_25 = GeminiModel(BASE_RATIOS, (), None)
PRO_3 = GeminiModel(BASE_RATIOS, ("1K", "2K", "4K"), 14)
FLASH_31 = GeminiModel(FLASH_31_RATIOS, ("0.5K", "1K", "2K", "4K"), 14)
GEMINI_MODELS: dict[str, GeminiModel] = {
    "gemini-2.5-flash-image": FLASH_25,
    "gemini-2.5-flash-image-preview": FLASH_25,
    "gemini-3-pro-image": PRO_3,
    "gemini-3-pro-image-preview": PRO_3,
    "gemini-3.1-flash-image": FLASH_31,
    "gemini-3.1-flash-image-preview": FLASH_31,
    "gemini-3.1-flash-lite-image": GeminiModel(BASE_RATIOS, ("1K",), 14),
}
IMAGEN_MODELS: dict[str, tuple[str, ...]] = {  # model -> sampleImageSize values
    "imagen-4.0-generate-001": ("1K", "2K"),
    "imagen-4.0-ultra-generate-001": ("1K", "2K"),
    "imagen-4.0-fast-generate-001": (),
}


@dataclass
class GoogleCall:
    """A validated request: the ``:generateContent`` or ``:predict`` body, and the images to inline."""

    method: Literal["generateContent", "predict"]
    body: dict[str, Any]
    image_urls: list[str] = field(default_factory=list)


class GeminiProvider(Provider):
    name = "gemini"
    kinds = frozenset({MediaKind.image})
    default_base_url = "https://generativelanguage.googleapis.com"
    default_typical_seconds = {"image": 20}
    default_concurrency = 4  # calls held open per key (each holds a worker slot for its whole run)
    synchronous = True
    retention = "none: images come back inline in the response (nothing to download later)"

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        source = request.source
        if source is not None and (request.model in IMAGEN_MODELS or source.kind != MediaKind.image):
            raise InvalidInput("source", "Imagen draws from text only" if request.model in IMAGEN_MODELS
                               else f"Gemini takes an image as input, not a {source.kind}")
        self.build(request.model, request.input)

    def build(self, model: str, job_input: MediaInput) -> GoogleCall:
        """The request for ``job_input``; raises ``InvalidInput`` naming the field."""
        if not job_input.prompt:
            raise InvalidInput("input.prompt", "Gemini and Imagen need a prompt")
        if job_input.duration_seconds is not None:
            raise InvalidInput("input.duration_seconds", "images have no duration")
        if model in GEMINI_MODELS:
            return self._gemini_call(model, GEMINI_MODELS[model], job_input)
        if model in IMAGEN_MODELS:
            return self._imagen_call(model, IMAGEN_MODELS[model], job_input)
        raise InvalidInput("model", f"Gemini image models are {', '.join(GEMINI_MODELS)}; Imagen models are "
                                    f"{', '.join(IMAGEN_MODELS)}")

    def _gemini_call(self, model: str, spec: GeminiModel, job_input: MediaInput) -> GoogleCall:
        options = dict(job_input.options)
        for key in options:
            if key in GEMINI_VERTEX_ONLY:
                raise InvalidInput(f"input.options.{key}", f"'{key}' is accepted only by Vertex AI, not by the "
                                                           "Gemini API")
            if key not in IMAGE_CONFIG_OPTIONS | GENERATION_OPTIONS | REQUEST_OPTIONS | {"images"}:
                raise InvalidInput(f"input.options.{key}", "not a Gemini image generation field")
        if job_input.negative_prompt is not None:
            raise InvalidInput("input.negative_prompt", "Gemini takes no negative prompt: say it in the prompt")
        if job_input.num_outputs not in (None, 1):
            raise InvalidInput("input.num_outputs", "Gemini answers one image per request")
        image_config: dict[str, Any] = {}
        config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
        where: dict[str, str] = {}  # request field -> the job field it came from (for errors)

        def put(target: dict[str, Any], name: str, value: Any, source: str) -> None:
            target[name] = value
            where[name] = source

        if job_input.aspect_ratio is not None:
            put(image_config, "aspectRatio", job_input.aspect_ratio, "input.aspect_ratio")
        if job_input.resolution is not None:
            put(image_config, "imageSize", _size_class(job_input.resolution, "input.resolution"),
                "input.resolution")
        if job_input.seed is not None:
            put(config, "seed", job_input.seed, "input.seed")
        for key, value in options.items():
            if key in IMAGE_CONFIG_OPTIONS:
                put(image_config, key, value, f"input.options.{key}")
            elif key in GENERATION_OPTIONS:
                put(config, key, value, f"input.options.{key}")

        ratio = image_config.get("aspectRatio")
        if ratio is not None and ratio not in spec.aspect_ratios:
            raise InvalidInput(where["aspectRatio"], f"{model} draws {', '.join(spec.aspect_ratios)}")
        size = image_config.get("imageSize")
        if size is not None:
            if not spec.image_sizes:
                if size != "1K":
                    raise InvalidInput(where["imageSize"], f"{model} has no size choice (1024-class images)")
                del image_config["imageSize"]  # its only size: never sent to a model that has no choice
            elif size not in spec.image_sizes:
                raise InvalidInput(where["imageSize"], f"{model} draws {', '.join(spec.image_sizes)} images "
                                                       "(upper-case K)")
        person = image_config.get("personGeneration")
        if person is not None and person not in GEMINI_PERSON:
            raise InvalidInput(where["personGeneration"], f"one of {', '.join(GEMINI_PERSON)}")
        modalities = config["responseModalities"]
        if not isinstance(modalities, list) or "IMAGE" not in modalities \
                or any(m not in MODALITIES for m in modalities):
            raise InvalidInput(where.get("responseModalities", "input.options.responseModalities"),
                               '["IMAGE"] or ["TEXT", "IMAGE"]')
        for key, kind in (("seed", int), ("temperature", (int, float)), ("topP", (int, float)), ("topK", int),
                          ("thinkingConfig", dict)):
            if key in config and (isinstance(config[key], bool) or not isinstance(config[key], kind)):
                raise InvalidInput(where[key], f"'{key}' has the wrong type")

        images = options.get("images", [])
        if not isinstance(images, list) or not all(isinstance(u, str) and u.startswith(("https://", "http://"))
                                                   for u in images):
            raise InvalidInput("input.options.images", "a list of image URLs")
        urls = ([str(job_input.image_url)] if job_input.image_url is not None else []) + images
        if spec.max_references is not None and len(urls) > spec.max_references:
            raise InvalidInput("input.options.images" if images else "input.image_url",
                               f"{model} takes at most {spec.max_references} reference images")
        if image_config:
            config["imageConfig"] = image_config
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": job_input.prompt}]}],
                                "generationConfig": config}
        body.update({key: options[key] for key in REQUEST_OPTIONS if key in options})
        return GoogleCall("generateContent", body, urls)

    def _imagen_call(self, model: str, sizes: tuple[str, ...], job_input: MediaInput) -> GoogleCall:
        vertex = self._imagen_route() == "vertex"
        if job_input.image_url is not None:
            raise InvalidInput("input.image_url", "Imagen draws from text only")
        options = dict(job_input.options)
        for key in options:
            if key == "storageUri":
                raise InvalidInput("input.options.storageUri", "Atelier stores the images: they must come back "
                                                               "inline")
            if key not in IMAGEN_OPTIONS:
                raise InvalidInput(f"input.options.{key}", "not an Imagen parameter")
        params: dict[str, Any] = {}
        where: dict[str, str] = {}

        def put(name: str, value: Any, source: str) -> None:
            params[name] = value
            where[name] = source

        if job_input.num_outputs is not None:
            put("sampleCount", job_input.num_outputs, "input.num_outputs")
        if job_input.aspect_ratio is not None:
            put("aspectRatio", job_input.aspect_ratio, "input.aspect_ratio")
        if job_input.resolution is not None:
            put("sampleImageSize", _size_class(job_input.resolution, "input.resolution"), "input.resolution")
        if job_input.negative_prompt is not None:
            put("negativePrompt", job_input.negative_prompt, "input.negative_prompt")
        if job_input.seed is not None:
            put("seed", job_input.seed, "input.seed")
        for key, value in options.items():
            put(key, value, f"input.options.{key}")

        if not vertex:
            for key in sorted(IMAGEN_VERTEX_ONLY & params.keys()):
                raise InvalidInput(where[key], f"'{key}' is refused by the Gemini API (Vertex AI takes it: "
                                               "extra imagen_route = \"vertex\")")
        if not 1 <= params.get("sampleCount", 1) <= 4:
            raise InvalidInput(where["sampleCount"], "Imagen draws 1 to 4 images per request")
        if params.get("aspectRatio", "1:1") not in IMAGEN_RATIOS:
            raise InvalidInput(where["aspectRatio"], f"Imagen draws {', '.join(IMAGEN_RATIOS)}")
        if "sampleImageSize" in params and params["sampleImageSize"] not in sizes:
            raise InvalidInput(where["sampleImageSize"], f"{model} draws {', '.join(sizes)} images" if sizes
                               else f"{model} has no size choice")
        for key, allowed in (("personGeneration", IMAGEN_PERSON), ("safetySetting", IMAGEN_SAFETY)):
            if key in params:
                value = params[key]
                if not isinstance(value, str) or value.lower() not in allowed:
                    raise InvalidInput(where[key], f"one of {', '.join(allowed)}")
                params[key] = value.lower()  # what the REST docs show
        output = params.get("outputOptions")
        if output is not None and (not isinstance(output, dict)
                                   or output.get("mimeType", "image/png") not in ("image/png", "image/jpeg")):
            raise InvalidInput(where["outputOptions"], "{'mimeType': 'image/png' | 'image/jpeg', "
                                                       "'compressionQuality': 0-100}")
        params["includeRaiReason"] = True  # a filtered sample then says why, instead of going missing
        return GoogleCall("predict", {"instances": [{"prompt": job_input.prompt}], "parameters": params})

    # -- routes --------------------------------------------------------------------------
    def _extra(self, key: str, default: str) -> str:
        return str(self.settings.extra.get(key) or default)

    def _imagen_route(self) -> str:
        route = self._extra("imagen_route", "gemini")
        if route not in ("gemini", "vertex"):
            raise InvalidInput("model", f'[providers.gemini] extra imagen_route is "gemini" or "vertex", '
                                        f"not {route!r}")
        if route == "vertex" and not self.settings.extra.get("vertex_project"):
            raise InvalidInput("model", "Imagen on Vertex AI needs [providers.gemini] extra vertex_project")
        return route

    def _version(self, key: str, default: str) -> str:
        version = self._extra(key, default).strip("/")
        if not _VERSION.match(version):
            raise InvalidInput("model", f"[providers.gemini] extra {key} is an API version such as "
                                        f"{default!r}, not {version!r}")
        return version

    def _endpoint(self, ctx: CallContext, model: str, call: GoogleCall) -> tuple[str, dict[str, str]]:
        headers = {"x-goog-api-key": ctx.api_key, "User-Agent": "atelier"}
        if call.method == "generateContent" or self._imagen_route() == "gemini":
            return f"{self.base_url}/{self._version('api_version', 'v1beta')}/models/{model}:{call.method}", headers
        location = self._extra("vertex_location", "us-central1")
        host = "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
        default_base = f"https://{host}" if self.base_url == self.default_base_url else self.base_url
        base = self._extra("vertex_base_url", default_base).rstrip("/")
        url = (f"{base}/{self._version('vertex_version', 'v1')}/projects/{self._extra('vertex_project', '')}"
               f"/locations/{location}/publishers/google/models/{model}:predict")
        if self._extra("vertex_auth", "api_key") == "bearer":
            headers = {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}
        return url, headers

    # -- the call ------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        call = self.build(request.model, request.input)
        total = 0
        for url in call.image_urls:
            part = await _fetch_image(ctx, url)
            total += len(part["inline_data"]["data"]) * 3 // 4
            if total > MAX_INLINE_BYTES:
                raise Rejected(f"the input images exceed the Gemini API's {MAX_INLINE_BYTES} bytes of inline "
                               "data", code="input_image_unavailable")
            call.body["contents"][0]["parts"].append(part)
        url, headers = self._endpoint(ctx, request.model, call)
        http_request = ctx.http.build_request("POST", url, json=call.body, headers=headers)
        response = await send(ctx.http, http_request, creates=True, timeout=ctx.timeout)
        _raise_for_error(response, request.model)
        body = expect_object(parse_json(response), "answer")
        if call.method == "predict":
            return SubmitResult(task_id=request.reference, status="predicted", done=parse_predictions(body))
        status = parse_generate_content(body)
        response_id = body.get("responseId")
        task_id = response_id if isinstance(response_id, str) and response_id else request.reference
        return SubmitResult(task_id=task_id, request_id=status.request_id, status=status.raw_status, done=status)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        raise TaskNotFound("a Gemini image call is synchronous: there is no task to fetch")


def _size_class(resolution: str, where: str) -> str:
    """``2k`` -> ``2K``; ``WxH`` -> the smallest size class covering the long side."""
    if re.fullmatch(r"[1-8]k", resolution):
        return resolution.upper()
    match = _WXH.match(resolution)
    if match is None:
        raise InvalidInput(where, "Gemini and Imagen sizes are 1k, 2k, 4k (or WxH)")
    side = max(int(match.group(1)), int(match.group(2)))
    for name, limit in SIZE_SIDES.items():
        if side <= limit:
            return name
    raise InvalidInput(where, "Gemini and Imagen draw at most 4096 pixels a side")


# -- answers ---------------------------------------------------------------------------------
def parse_generate_content(body: dict[str, Any]) -> TaskStatus:
    """A ``GenerateContentResponse``: its images, or why there are none (an HTTP 200 either way)."""
    candidates = body.get("candidates") or []
    feedback = body.get("promptFeedback")
    block = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        raise MalformedResponse("Gemini answered candidates that are not a list of objects",
                                detail={"candidates": str(candidates)[:300]})
    usage_metadata = body.get("usageMetadata")
    meta: dict[str, Any] = {"usage_metadata": usage_metadata if isinstance(usage_metadata, dict) else None,
                            "model_version": body.get("modelVersion"), "response_id": body.get("responseId")}
    images: list[tuple[str, str, dict[str, Any]]] = []  # (url, content type, part metadata)
    texts: list[str] = []
    finish = [str(c.get("finishReason")) for c in candidates if c.get("finishReason")]
    for candidate in candidates:
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict) or part.get("thought") is True:
                continue  # Gemini 3's interim "thought" images are not outputs
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            blob = part.get("inlineData") or part.get("inline_data")
            if isinstance(blob, dict):
                mime = blob.get("mimeType") or blob.get("mime_type")
                data = blob.get("data")
                if not isinstance(mime, str) or not mime.startswith("image/") or not isinstance(data, str) \
                        or not data:
                    raise MalformedResponse("Gemini answered an inline part without image data",
                                            detail={"part": str(part)[:300]})
                signature = part.get("thoughtSignature")
                images.append((f"data:{mime};base64,{data}", mime,
                               {"thought_signature": signature} if isinstance(signature, str) else {}))
    if not images:  # a gateway's Markdown image in the text
        for match in _MARKDOWN_IMAGE.finditer("\n".join(texts)):
            url = match.group(1)
            images.append((url, url[5:].split(";")[0] if url.startswith("data:") else "", {}))
    raw = f"blockReason={block}" if block else ",".join(finish) or "no candidates"
    meta |= {"finish_reason": finish[0] if finish else None, "text": "\n".join(texts) or None}
    meta = {k: v for k, v in meta.items() if v is not None}
    if images:
        outputs = [ProviderOutput(url=url, content_type=mime or None, metadata=meta | extra)
                   for url, mime, extra in images]
        return TaskStatus(state="succeeded", raw_status=raw, progress=100, outputs=outputs,
                          request_id=meta.get("response_id"), usage=image_tokens(usage_metadata))
    detail = {"promptFeedback": feedback, "finishReason": finish, "text": meta.get("text"),
              "usageMetadata": meta.get("usage_metadata")}
    if block:
        return TaskStatus(state="failed", raw_status=raw, error_code="content_policy", error_detail=detail,
                          error_message=f"Gemini blocked the prompt ({block})")
    refused = [f for f in finish if f in SAFETY_FINISH]
    if refused:
        return TaskStatus(state="failed", raw_status=raw, error_code="content_policy", error_detail=detail,
                          error_message=f"Gemini refused to draw the image (finishReason {refused[0]})")
    said = f": {meta['text'][:200]}" if "text" in meta else ""
    return TaskStatus(state="failed", raw_status=raw, error_code="provider_no_output", error_detail=detail,
                      error_message=f"Gemini answered without an image (finishReason {raw}){said}")


def image_tokens(usage_metadata: Any) -> Usage | None:
    """The output tokens an image answer bills: the ``IMAGE`` entry of ``candidatesTokensDetails``
    (image output has its own per-token price), else ``candidatesTokenCount``. Blocked answers are
    not charged, so only a success reports usage."""
    if not isinstance(usage_metadata, dict):
        return None
    details = usage_metadata.get("candidatesTokensDetails")
    image = next((d.get("tokenCount") for d in details if isinstance(d, dict) and d.get("modality") == "IMAGE"),
                 None) if isinstance(details, list) else None
    return usage(tokens=count(image if image is not None else usage_metadata.get("candidatesTokenCount")))


def parse_predictions(body: dict[str, Any]) -> TaskStatus:
    """An Imagen ``:predict`` answer: the images, and why the others were filtered."""
    predictions = body.get("predictions") or []
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        raise MalformedResponse("Imagen answered predictions that are not a list of objects",
                                detail={"predictions": str(predictions)[:300]})
    reasons = [str(p["raiFilteredReason"]) for p in predictions if p.get("raiFilteredReason")]
    outputs: list[ProviderOutput] = []
    for prediction in predictions:
        data = prediction.get("bytesBase64Encoded")
        if isinstance(data, str) and data:
            mime = str(prediction.get("mimeType") or "image/png")
            meta: dict[str, Any] = {"rai_filtered_count": len(reasons)} if reasons else {}
            if isinstance(prediction.get("prompt"), str):
                meta["enhanced_prompt"] = prediction["prompt"]
            outputs.append(ProviderOutput(url=f"data:{mime};base64,{data}", content_type=mime, metadata=meta))
    if outputs:
        return TaskStatus(state="succeeded", raw_status="predicted", progress=100, outputs=outputs)
    if reasons:
        return TaskStatus(state="failed", raw_status="filtered", error_code="content_policy",
                          error_message=f"Imagen filtered every image: {reasons[0]}",
                          error_detail={"raiFilteredReasons": reasons})
    return TaskStatus(state="failed", raw_status="no predictions", error_code="provider_no_output",
                      error_message="Imagen answered without an image", error_detail={"body": str(body)[:300]})


# -- input images ------------------------------------------------------------------------------
async def _fetch_image(ctx: CallContext, url: str) -> dict[str, Any]:
    """Download an input image (bounded, destination-guarded) as an ``inline_data`` part: nothing is
    created if this fails."""
    data = (await fetch_input(ctx, url, max_bytes=MAX_INLINE_BYTES, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16], ("image/png", "image/jpeg", "image/webp", "image/heic"))
    if mime is None:
        raise _image_error("the input image is not a PNG, JPEG, WebP or HEIC file")
    return {"inline_data": {"mime_type": mime, "data": base64.b64encode(data).decode()}}


def _image_error(message: str) -> Rejected:
    return Rejected(message, code="input_image_unavailable")


# -- errors ------------------------------------------------------------------------------------
def _details(error: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict) and str(d.get("@type", "")).endswith(kind)] \
        if isinstance(details, list) else []


def retry_delay(error: Mapping[str, Any]) -> float | None:
    """``RetryInfo.retryDelay`` (a protobuf Duration such as ``"19s"``) in seconds."""
    for info in _details(error, "google.rpc.RetryInfo"):
        match = _DURATION.match(str(info.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def _raise_for_error(response: httpx.Response, model: str) -> None:
    status = response.status_code
    if status < 400:
        return
    error = error_body(response, unwrap="error")
    message = str(error.get("message") or f"HTTP {status}")
    if status == 429 and _DEPLETED.search(message):
        raise InsufficientBalance(f"Gemini: {message}", detail=error, status_code=status)
    if status == 429:
        retry = retry_after_seconds(response.headers) or retry_delay(error)
        raise RateLimited(f"Gemini quota exhausted (HTTP 429): {message}", retry_after=retry, detail=error)
    if any(d.get("reason") == "API_KEY_INVALID" for d in _details(error, "google.rpc.ErrorInfo")):
        raise AuthFailed("Gemini refused the API key (API_KEY_INVALID)", detail=error, status_code=status)
    if status == 404:
        where = (" Imagen 4 is no longer served by the Gemini API (deprecated; the google-genai SDK refuses it "
                 "there since 2026-08-21): Google serves it on Vertex AI. Set [providers.gemini] extra "
                 'imagen_route = "vertex" and vertex_project (and vertex_location).') \
            if model in IMAGEN_MODELS else ""
        raise Rejected(f"Gemini does not serve {model}: {message}.{where}", code="model_not_found", detail=error,
                       status_code=status)
    if status in (400, 409, 422):
        raise Rejected(f"Gemini refused the request: {message}", code="provider_rejected_input", detail=error,
                       status_code=status)
    raise_for_common_status(response, creates=True, detail=error)
