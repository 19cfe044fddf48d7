"""Google Gemini image generation ("Nano Banana") and Imagen 4 simulator.

Written from Google's documented wire format (shared/providers/images-wave2.md §7, and §0.3
on synchronous providers), not from an adapter. The Atelier base URL is the simulator's
origin; routes keep Google's paths:

- ``POST /v1beta/models/{model}:generateContent`` (Gemini API; ``x-goog-api-key`` or
  ``?key=``; also under ``/v1``, the default version of google-genai 3.x). Models:
  ``gemini-2.5-flash-image`` (+ ``-preview``), ``gemini-3-pro-image`` (+ ``-preview``),
  ``gemini-3.1-flash-image`` (+ ``-preview``), ``gemini-3.1-flash-lite-image``.
- ``POST /{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent``
  (Vertex; ``Authorization: Bearer``, or an API key in express mode).
- ``POST /{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:predict``:
  Imagen 4 (``imagen-4.0-generate-001``, ``-ultra-generate-001``, ``-fast-generate-001``).
  The Gemini API deprecated Imagen (earliest shutdown 2026-08-17) and the SDK refuses it
  there, so ``POST /v1beta/models/{imagen}:predict`` (or ``/v1/...``) answers 404 NOT_FOUND
  like any model the API does not serve, unless ``extra["imagen_on_gemini_api"]``.

**Synchronous**: the request stays open for the run time (``SimConfig.run_seconds`` or
``[sim:run=S]``), then answers. A request that produces images is billed once, at that
moment (``Stats.record_creation``), before any after-effect fault: a ``timeout`` or ``500``
injected with ``after_effect`` shows a billed generation whose client never got the image.

``generateContent`` request: ``contents[].parts[]`` with ``text`` and ``inline_data`` /
``inlineData`` images (``mime_type``/``mimeType``: png, jpeg, webp, heic, heif; valid
base64); ``generationConfig.responseModalities`` (``["IMAGE"]`` or ``["TEXT", "IMAGE"]``;
without ``IMAGE`` the model answers in words; absent: both); ``imageConfig``:
``aspectRatio`` per model (3.1 Flash adds 1:4 1:8 4:1 4:5 5:4 8:1), ``imageSize`` with an
upper-case ``K`` per model (``0.5K`` 3.1 Flash only, ``1K`` only on Lite, none on 2.5 Flash),
``personGeneration``; ``outputMimeType``/``outputCompressionQuality``/``prominentPeople`` on
Vertex only. Both lowerCamel and snake_case field names are accepted (proto JSON); unknown
fields, ``candidateCount`` > 1 and more reference images than the model takes answer 400.

Response (camelCase): ``candidates[0].content.parts`` with an optional text part (when
``TEXT`` is asked for), optional ``"thought": true`` interim images, then the image as
``inlineData {mimeType: image/png, data}`` (Gemini 3 models add ``thoughtSignature``);
``finishReason: STOP``; ``usageMetadata`` with ``promptTokensDetails`` and
``candidatesTokensDetails`` (modality ``IMAGE``; 1290 tokens per image on 2.5 Flash, the
others illustrative); ``modelVersion``; ``responseId``.

HTTP 200 with no image (§7.4), by prompt directive: ``[sim:block]`` / ``[sim:block=REASON]``
(``promptFeedback.blockReason``: SAFETY, OTHER, BLOCKLIST, PROHIBITED_CONTENT, IMAGE_SAFETY;
no candidates, answered at once); ``[sim:finish=REASON]`` (after the run time, a candidate
with that ``finishReason`` -- IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT, IMAGE_RECITATION,
IMAGE_OTHER, NO_IMAGE, SAFETY, PROHIBITED_CONTENT, RECITATION, BLOCKLIST, SPII, OTHER,
MAX_TOKENS -- and only a refusal text part, or no ``content`` when TEXT was not asked for);
``[sim:text_only]`` (``STOP`` with only text). None of these is billed. Also
``[sim:thought=N]`` (N interim thought images, Gemini 3 models, at most 2), ``[sim:drop]``
(bill, then close the connection without an answer) and ``[sim:run=S]``.

Imagen ``:predict``: ``{"instances": [{"prompt"}], "parameters": {sampleCount 1-4,
aspectRatio, sampleImageSize (not on -fast), personGeneration, safetySetting, outputOptions
{mimeType, compressionQuality}, includeRaiReason, enhancePrompt, ...}}`` answers
``{"predictions": [{"bytesBase64Encoded", "mimeType"[, "prompt"]}]}``. ``[sim:filtered]`` /
``[sim:filtered=K]`` filters all / K samples: missing from the list, or
``{"raiFilteredReason"}`` entries with ``includeRaiReason`` (all filtered and no reason: ``{}``).
``storageUri`` is accepted and ignored (bytes stay inline). Upper-case enum values are
accepted unless ``extra["imagen_strict_enum_case"]``.

Errors use ``{"error": {"code", "message", "status", "details"?}}``: 400 INVALID_ARGUMENT,
403 PERMISSION_DENIED (no key), 400 ``API_KEY_INVALID`` (wrong key), 401 UNAUTHENTICATED
(Vertex without a valid bearer), 404 NOT_FOUND (model), 429 RESOURCE_EXHAUSTED with
QuotaFailure and (when a delay is known) RetryInfo ``retryDelay`` -- injected, or when more
than ``extra["images_per_minute"]`` images were asked of a model in the last 60 s -- 500
INTERNAL, 503 UNAVAILABLE ("The model is overloaded"), 504 DEADLINE_EXCEEDED.

``SimConfig.extra`` knobs (defaults): ``imagen_on_gemini_api`` (False),
``image_size_on_flash_2_5`` ("reject" | "ignore": the reference leaves it UNCONFIRMED),
``images_per_minute`` (None), ``retry_after_header`` (False: also send ``Retry-After`` on
429), ``snake_case_inline_data`` (False: answer ``inline_data``/``mime_type`` as some
gateways do), ``imagen_strict_enum_case`` (False).

Fault route names: ``generate`` (generateContent), ``predict`` (Imagen).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, Simulator, bearer, directives, route_path
from providers.sandbox.openai_images import DroppedConnection, MinuteWindow
from providers.sandbox.sora import LastFaultPlan, jpeg
from providers.sandbox.veo import (
    MSG_500,
    MSG_BAD_KEY,
    MSG_NO_KEY,
    MSG_QUOTA,
    MSG_UNAUTHENTICATED,
    STATUS_NAMES,
    GoogleError,
)

BASE_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
FLASH_31_RATIOS = (*BASE_RATIOS, "1:4", "1:8", "4:1", "4:5", "5:4", "8:1")
SIDES = {"0.5K": 512, "1K": 1024, "2K": 2048, "4K": 4096}
INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
PERSON_GENERATION = ("ALLOW_ALL", "ALLOW_ADULT", "ALLOW_NONE")
BLOCK_REASONS = ("SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY")
FINISH_REASONS = ("IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE",
                  "SAFETY", "PROHIBITED_CONTENT", "RECITATION", "BLOCKLIST", "SPII", "OTHER", "MAX_TOKENS")
MODALITIES = ("TEXT", "IMAGE", "AUDIO", "MODALITY_UNSPECIFIED")
SCALE = 32  # simulated images are 1/32 of the real size (real, decodable, small)
INPUT_IMAGE_TOKENS = 258
TOP_LEVEL = {"contents", "generationConfig", "safetySettings", "systemInstruction", "tools", "toolConfig",
             "cachedContent", "labels"}
PART_FIELDS = {"text", "inlineData", "fileData", "thought", "thoughtSignature", "functionCall",
               "functionResponse", "executableCode", "codeExecutionResult", "videoMetadata", "mediaResolution"}
GENERATION_FIELDS = {"responseModalities", "imageConfig", "temperature", "topP", "topK", "candidateCount",
                     "maxOutputTokens", "seed", "stopSequences", "thinkingConfig", "responseMimeType",
                     "presencePenalty", "frequencyPenalty", "mediaResolution"}
IMAGE_CONFIG_FIELDS = {"aspectRatio", "imageSize", "personGeneration"}
VERTEX_IMAGE_CONFIG_FIELDS = {"outputMimeType", "outputCompressionQuality", "prominentPeople",
                              "imageOutputOptions"}

IMAGEN_MODELS: dict[str, tuple[str, ...]] = {  # model -> sampleImageSize values
    "imagen-4.0-generate-001": ("1K", "2K"),
    "imagen-4.0-ultra-generate-001": ("1K", "2K"),
    "imagen-4.0-fast-generate-001": (),
}
IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
IMAGEN_PARAMETERS = {"sampleCount", "aspectRatio", "negativePrompt", "guidanceScale", "seed", "safetySetting",
                     "personGeneration", "includeSafetyAttributes", "includeRaiReason", "language",
                     "outputOptions", "addWatermark", "sampleImageSize", "enhancePrompt", "storageUri"}
SAFETY_SETTINGS = ("block_low_and_above", "block_medium_and_above", "block_only_high", "block_none")
IMAGEN_PERSON = ("dont_allow", "allow_adult", "allow_all")
MSG_RAI = ("Unable to show generated images. All images were filtered out because they violated Vertex AI's "
           "usage guidelines. You will not be charged for blocked images. Try rephrasing the prompt. If you "
           "think this was an error, send feedback. Support codes: 58061214")
MSG_OVERLOADED = "The model is overloaded. Please try again later."
_CAMEL = re.compile(r"_([a-z])")


@dataclass(frozen=True)
class ImageModel:
    aspect_ratios: tuple[str, ...]
    image_sizes: tuple[str, ...]  # () = no size choice (1024-class output)
    max_references: int | None
    thinking: bool  # Gemini 3: interim thought images, thoughtSignature
    tokens: dict[str, int] = field(default_factory=lambda: {"0.5K": 747, "1K": 1120, "2K": 1120, "4K": 2000})


FLASH_25 = ImageModel(BASE_RATIOS, (), None, False, {"1K": 1290})
PRO_3 = ImageModel(BASE_RATIOS, ("1K", "2K", "4K"), 14, True)
FLASH_31 = ImageModel(FLASH_31_RATIOS, ("0.5K", "1K", "2K", "4K"), 14, True)
MODELS: dict[str, ImageModel] = {
    "gemini-2.5-flash-image": FLASH_25,
    "gemini-2.5-flash-image-preview": FLASH_25,
    "gemini-3-pro-image": PRO_3,
    "gemini-3-pro-image-preview": PRO_3,
    "gemini-3.1-flash-image": FLASH_31,
    "gemini-3.1-flash-image-preview": FLASH_31,
    "gemini-3.1-flash-lite-image": ImageModel(BASE_RATIOS, ("1K",), 14, False),
}


def camel(name: str) -> str:
    """``inline_data`` -> ``inlineData`` (proto JSON takes either spelling)."""
    return _CAMEL.sub(lambda m: m.group(1).upper(), name)


def camel_keys(obj: dict[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
    """``obj`` with lowerCamel keys; an unknown field is Google's 400."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = camel(key)
        if name not in allowed:
            at = f" at '{where}'" if where else ""
            raise GoogleError(400, f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.',
                              [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                "fieldViolations": [{"field": where, "description": f'Invalid JSON payload '
                                                     f'received. Unknown name "{key}"{at}: Cannot find field.'}]}])
        out[name] = value
    return out


def dimensions(side: int, ratio: str) -> tuple[int, int]:
    """Pixel size of an image of ``side``-class area at aspect ratio ``a:b`` (multiples of 8)."""
    a, _, b = ratio.partition(":")
    w = side * math.sqrt(int(a) / int(b))
    h = side * side / w
    return max(8, round(w / 8) * 8), max(8, round(h / 8) * 8)


@dataclass
class GenerateRequest:
    model: str
    spec: ImageModel
    prompt: str
    input_images: int
    modalities: tuple[str, ...]
    aspect_ratio: str
    image_size: str
    mime_type: str
    identity: str


class GeminiImageSimulator(Simulator):
    name = "gemini"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.faults: LastFaultPlan = LastFaultPlan()
        self.window = MinuteWindow()

    def extra(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def google_error(self, status: int, message: str, details: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None) -> Response:
        err: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
        if details:
            err["details"] = details
        return JSONResponse({"error": err}, status_code=status, headers=headers,
                            media_type="application/json; charset=UTF-8")

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            return self.rate_limited(None, "gemini")
        message = {500: MSG_500, 503: MSG_OVERLOADED,
                   504: "Deadline expired before operation could complete."}.get(status, message)
        return self.google_error(status, message, headers=headers)

    def rate_limited(self, retry_after: float | None, model: str) -> Response:
        details: list[dict[str, Any]] = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                "quotaDimensions": {"location": "global", "model": model}}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        ]
        headers: dict[str, str] = {}
        if retry_after is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{math.ceil(retry_after)}s"})
            if self.extra("retry_after_header", False):
                headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return self.google_error(429, MSG_QUOTA, details, headers)

    async def fault(self, route: str, *, after_effect: bool = False) -> Response | None:
        response = await super().fault(route, after_effect=after_effect)
        fault = self.faults.last
        if response is not None and fault is not None and fault.kind == "429":
            return self.rate_limited(fault.retry_after, "gemini")
        return response

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for version in ("v1beta", "v1"):
            routes += [
                Route(f"/{version}/models/{{model}}:generateContent", self.generate_content, methods=["POST"]),
                Route(f"/{version}/models/{{model}}:predict", self.predict, methods=["POST"]),
            ]
        for version in ("v1", "v1beta1"):
            vertex = f"/{version}/projects/{{project}}/locations/{{location}}/publishers/google/models/{{model}}"
            routes += [
                Route(vertex + ":generateContent", self.vertex_generate_content, methods=["POST"]),
                Route(vertex + ":predict", self.vertex_predict, methods=["POST"]),
            ]
        return routes

    def _api_key_auth(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            if request.headers.get("authorization"):
                return self.google_error(401, MSG_UNAUTHENTICATED)
            return self.google_error(403, MSG_NO_KEY)
        if not self.config.key_ok(key):
            return self.google_error(400, MSG_BAD_KEY, [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
        return None

    def _vertex_auth(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key")  # express mode
        if key is not None and self.config.key_ok(key):
            return None
        if not self.config.key_ok(bearer(request)):
            return self.google_error(401, MSG_UNAUTHENTICATED)
        return None

    def _not_found(self, model: str, method: str, vertex: bool, request: Request) -> GoogleError:
        if vertex:
            p = request.path_params
            return GoogleError(404, f"Publisher Model `projects/{p['project']}/locations/{p['location']}/publishers/"
                                    f"google/models/{model}` was not found or your project does not have access to "
                                    "it. Please ensure you are using a valid model version.")
        version = route_path(request).split("/")[1]
        return GoogleError(404, f"models/{model} is not found for API version {version}, or is not supported for "
                                f"{method}. Call ListModels to see the list of available models and their supported "
                                "methods.")

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise GoogleError(400, "Invalid JSON payload received. Unexpected token.")
        return body

    async def generate_content(self, request: Request) -> Response:
        if (denied := self._api_key_auth(request)) is not None:
            return denied
        return await self._generate(request, vertex=False)

    async def vertex_generate_content(self, request: Request) -> Response:
        if (denied := self._vertex_auth(request)) is not None:
            return denied
        return await self._generate(request, vertex=True)

    async def predict(self, request: Request) -> Response:
        if (denied := self._api_key_auth(request)) is not None:
            return denied
        return await self._predict(request, vertex=False)

    async def vertex_predict(self, request: Request) -> Response:
        if (denied := self._vertex_auth(request)) is not None:
            return denied
        return await self._predict(request, vertex=True)

    # -- generateContent -------------------------------------------------------
    async def _generate(self, request: Request, *, vertex: bool) -> Response:
        if (injected := await self.fault("generate")) is not None:
            return injected
        model = request.path_params["model"]
        try:
            spec = MODELS.get(model)
            if spec is None:
                raise self._not_found(model, "generateContent", vertex, request)
            job = self.parse_generate(model, spec, await self._json(request), vertex)
        except GoogleError as exc:
            return self.google_error(exc.status, exc.message, exc.details)
        if (limited := self._admit(model, 1)) is not None:
            return limited
        d = directives(job.prompt)
        if "block" in d:
            return JSONResponse(self._blocked(job, d["block"] or "SAFETY"))
        await asyncio.sleep(float(d.get("run") or self.config.run_seconds))
        if "finish" in d:
            return JSONResponse(self._no_image(job, d["finish"] or "IMAGE_SAFETY"))
        if "text_only" in d or "IMAGE" not in job.modalities:
            return JSONResponse(self._no_image(job, "STOP"))
        body = self._with_image(job, min(2, int(d.get("thought") or 1)) if "thought" in d else 0)
        self.record_creation(job.identity)
        if "drop" in d:
            return DroppedConnection()
        if (injected := await self.fault("generate", after_effect=True)) is not None:
            return injected
        return JSONResponse(body)

    def parse_generate(self, model: str, spec: ImageModel, raw: dict[str, Any], vertex: bool) -> GenerateRequest:
        body = camel_keys(raw, "", TOP_LEVEL)
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise GoogleError(400, "* GenerateContentRequest.contents: contents is not specified\n")
        texts: list[str] = []
        images: list[bytes] = []
        for i, content in enumerate(contents):
            if not isinstance(content, dict):
                raise GoogleError(400, f"Invalid value at 'contents[{i}]': expected a Content object.")
            role = content.get("role", "user")
            if role not in ("user", "model"):
                raise GoogleError(400, "Please use a valid role: user, model.")
            parts = content.get("parts")
            if not isinstance(parts, list) or not parts:
                raise GoogleError(400, f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be "
                                       "empty.\n")
            for j, raw_part in enumerate(parts):
                if not isinstance(raw_part, dict):
                    raise GoogleError(400, f"Invalid value at 'contents[{i}].parts[{j}]': expected a Part object.")
                part = camel_keys(raw_part, f"contents[{i}].parts[{j}]", PART_FIELDS)
                if isinstance(part.get("text"), str) and role == "user":
                    texts.append(part["text"])
                if "inlineData" in part:
                    images.append(self._inline_image(part["inlineData"], f"contents[{i}].parts[{j}].inline_data"))
        if spec.max_references is not None and len(images) > spec.max_references:
            raise GoogleError(400, f"Too many input images: {len(images)}. {model} accepts at most "
                                   f"{spec.max_references} reference images.")

        config_raw = body.get("generationConfig") or {}
        if not isinstance(config_raw, dict):
            raise GoogleError(400, "Invalid value at 'generation_config': expected a GenerationConfig object.")
        config = camel_keys(config_raw, "generation_config", GENERATION_FIELDS)
        modalities = config.get("responseModalities") or ["TEXT", "IMAGE"]
        for k, modality in enumerate(modalities if isinstance(modalities, list) else [modalities]):
            if modality not in MODALITIES:
                raise GoogleError(400, f"Invalid value at 'generation_config.response_modalities[{k}]' "
                                       "(type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig."
                                       f'Modality), "{modality}"')
            if modality == "AUDIO":
                raise GoogleError(400, "Model does not support the requested response modalities: audio")
        if isinstance(config.get("candidateCount"), int) and config["candidateCount"] > 1:
            raise GoogleError(400, f"Multiple candidates is not enabled for models/{model}")

        allowed = IMAGE_CONFIG_FIELDS | (VERTEX_IMAGE_CONFIG_FIELDS if vertex else set())
        image_config_raw = config.get("imageConfig") or {}
        if not isinstance(image_config_raw, dict):
            raise GoogleError(400, "Invalid value at 'generation_config.image_config': expected an ImageConfig.")
        image_config = camel_keys(image_config_raw, "generation_config.image_config", allowed)
        ratio = image_config.get("aspectRatio", "1:1")
        if ratio not in spec.aspect_ratios:
            raise GoogleError(400, f"Unsupported aspect ratio: {ratio!r}. Supported aspect ratios for {model} are: "
                                   f"{', '.join(spec.aspect_ratios)}.")
        size = image_config.get("imageSize")
        if size is not None:
            if not spec.image_sizes:
                if self.extra("image_size_on_flash_2_5", "reject") != "ignore":
                    raise GoogleError(400, f"Image size is not supported for {model}.")
                size = None
            elif size not in spec.image_sizes:
                hint = " (use an upper-case K)" if isinstance(size, str) and size.upper() in spec.image_sizes else ""
                raise GoogleError(400, f"Unsupported image size: {size!r}{hint}. Supported image sizes for {model} "
                                       f"are: {', '.join(spec.image_sizes)}.")
        person = image_config.get("personGeneration")
        if person is not None and person not in PERSON_GENERATION:
            raise GoogleError(400, f"Invalid value at 'generation_config.image_config.person_generation', "
                                   f'"{person}"')
        mime = image_config.get("outputMimeType", "image/png")
        if mime not in ("image/png", "image/jpeg"):
            raise GoogleError(400, f"Unsupported output mime type: {mime}.")
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
        return GenerateRequest(model, spec, "\n".join(texts), len(images), tuple(modalities), ratio,
                               size or "1K", mime, f"generateContent:{model}:{digest}")

    @staticmethod
    def _inline_image(blob: Any, where: str) -> bytes:
        data_field = camel_keys(blob, where, {"mimeType", "data", "displayName"}) if isinstance(blob, dict) else {}
        mime, data = data_field.get("mimeType"), data_field.get("data")
        if not isinstance(mime, str) or not isinstance(data, str):
            raise GoogleError(400, f"* GenerateContentRequest.{where}: inline_data needs mime_type and data.\n")
        if mime not in INPUT_TYPES:
            raise GoogleError(400, f"Unsupported MIME type: {mime}")
        try:
            return base64.b64decode(data, altchars=b"-_" if "-" in data or "_" in data else None, validate=True)
        except (binascii.Error, ValueError):
            raise GoogleError(400, f"Invalid value at '{where}.data' (TYPE_BYTES), Base64 decoding failed for "
                                   f'"{data[:40]}"') from None

    def _admit(self, model: str, images: int) -> Response | None:
        limit = self.extra("images_per_minute", None)
        wait, _ = self.window.admit(model, images, None if limit is None else int(limit))
        return self.rate_limited(wait, model) if wait else None

    def _inline(self, data: bytes, mime: str) -> dict[str, Any]:
        encoded = base64.b64encode(data).decode()
        if self.extra("snake_case_inline_data", False):
            return {"inline_data": {"mime_type": mime, "data": encoded}}
        return {"inlineData": {"mimeType": mime, "data": encoded}}

    def _usage(self, job: GenerateRequest, image_tokens: int, text_tokens: int, thoughts: int) -> dict[str, Any]:
        prompt_text = max(1, math.ceil(len(job.prompt) / 4))
        prompt_images = INPUT_IMAGE_TOKENS * job.input_images
        details = [{"modality": "TEXT", "tokenCount": prompt_text}]
        if prompt_images:
            details.append({"modality": "IMAGE", "tokenCount": prompt_images})
        usage: dict[str, Any] = {"promptTokenCount": prompt_text + prompt_images, "promptTokensDetails": details,
                                 "totalTokenCount": prompt_text + prompt_images + image_tokens + text_tokens + thoughts}
        if image_tokens or text_tokens:
            usage["candidatesTokenCount"] = image_tokens + text_tokens
            out = [{"modality": "IMAGE", "tokenCount": image_tokens}] if image_tokens else []
            usage["candidatesTokensDetails"] = out + ([{"modality": "TEXT", "tokenCount": text_tokens}]
                                                      if text_tokens else [])
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return usage

    def _envelope(self, job: GenerateRequest, **fields: Any) -> dict[str, Any]:
        return {**fields, "modelVersion": job.model, "responseId": secrets.token_urlsafe(16)}

    def _blocked(self, job: GenerateRequest, reason: str) -> dict[str, Any]:
        reason = reason if reason in BLOCK_REASONS else "SAFETY"
        return self._envelope(job, promptFeedback={"blockReason": reason}, usageMetadata=self._usage(job, 0, 0, 0))

    def _no_image(self, job: GenerateRequest, reason: str) -> dict[str, Any]:
        """A 200 whose candidate has no image: a refusal or a text-only answer."""
        reason = reason if reason in (*FINISH_REASONS, "STOP") else "IMAGE_SAFETY"
        candidate: dict[str, Any] = {"finishReason": reason, "index": 0}
        text_tokens = 0
        if "TEXT" in job.modalities or reason == "STOP":
            text = ("I can describe the scene in words instead: " + job.prompt[:80]) if reason == "STOP" else \
                "I'm unable to create this image. Please try a different request."
            candidate["content"] = {"role": "model", "parts": [{"text": text}]}
            text_tokens = max(1, len(text) // 4)
        return self._envelope(job, candidates=[candidate], usageMetadata=self._usage(job, 0, text_tokens, 0))

    def _with_image(self, job: GenerateRequest, thoughts: int) -> dict[str, Any]:
        side = SIDES[job.image_size]
        w, h = dimensions(side, job.aspect_ratio)
        parts: list[dict[str, Any]] = []
        text_tokens = 0
        if "TEXT" in job.modalities:
            parts.append({"text": "Here is the image you asked for."})
            text_tokens = 8
        seed = secrets.token_hex(8)
        thought_count = thoughts if job.spec.thinking else 0
        for k in range(thought_count):
            parts.append({**self._inline(media.png(f"thought:{seed}:{k}", 8, 8), "image/png"), "thought": True})
        sw, sh = max(1, w // SCALE), max(1, h // SCALE)
        data = jpeg(seed, sw, sh) if job.mime_type == "image/jpeg" else media.png(seed, sw, sh)
        image = self._inline(data, job.mime_type)
        if job.spec.thinking:
            image["thoughtSignature"] = base64.b64encode(secrets.token_bytes(48)).decode()
        parts.append(image)
        tokens = job.spec.tokens.get(job.image_size, 1290)
        thinking_tokens = (150 + tokens * thought_count) if job.spec.thinking else 0
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
        return self._envelope(job, candidates=[candidate],
                              usageMetadata=self._usage(job, tokens, text_tokens, thinking_tokens))

    # -- Imagen :predict ---------------------------------------------------------
    async def _predict(self, request: Request, *, vertex: bool) -> Response:
        if (injected := await self.fault("predict")) is not None:
            return injected
        model = request.path_params["model"]
        try:
            sizes = IMAGEN_MODELS.get(model)
            if sizes is None or not (vertex or self.extra("imagen_on_gemini_api", False)):
                raise self._not_found(model, "predict", vertex, request)
            prompt, params = self.parse_predict(model, sizes, await self._json(request))
        except GoogleError as exc:
            return self.google_error(exc.status, exc.message, exc.details)
        count = int(params.get("sampleCount", 1))
        if (limited := self._admit(model, count)) is not None:
            return limited
        d = directives(prompt)
        await asyncio.sleep(float(d.get("run") or self.config.run_seconds))
        filtered = count if d.get("filtered") == "" else min(count, int(d.get("filtered") or 0))
        options = params.get("outputOptions") or {}
        mime = options.get("mimeType", "image/png")
        side = SIDES[str(params.get("sampleImageSize", "1K"))]
        w, h = dimensions(side, str(params.get("aspectRatio", "1:1")))
        predictions: list[dict[str, Any]] = []
        seed = secrets.token_hex(8)
        for i in range(count - filtered):
            sw, sh = max(1, w // SCALE), max(1, h // SCALE)
            data = jpeg(f"{seed}:{i}", sw, sh) if mime == "image/jpeg" else media.png(f"{seed}:{i}", sw, sh)
            item: dict[str, Any] = {"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": mime}
            if params.get("enhancePrompt"):
                item["prompt"] = "A high-quality photograph: " + prompt
            predictions.append(item)
        if params.get("includeRaiReason"):
            predictions += [{"raiFilteredReason": MSG_RAI}] * filtered
        if count > filtered:
            digest = hashlib.sha256(json.dumps([model, prompt, params], sort_keys=True).encode()).hexdigest()[:16]
            self.record_creation(f"predict:{model}:{digest}")
        if "drop" in d:
            return DroppedConnection()
        if (injected := await self.fault("predict", after_effect=True)) is not None:
            return injected
        return JSONResponse({"predictions": predictions} if predictions else {})

    def parse_predict(self, model: str, sizes: tuple[str, ...], body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
            raise GoogleError(400, "Exactly one instance is required.")
        prompt = instances[0].get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise GoogleError(400, "The prompt is required.")
        params_raw = body.get("parameters") or {}
        if not isinstance(params_raw, dict):
            raise GoogleError(400, "Invalid value at 'parameters': expected an object.")
        params = camel_keys(params_raw, "parameters", IMAGEN_PARAMETERS)
        count = params.get("sampleCount", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4:
            raise GoogleError(400, f"sampleCount must be between 1 and 4, got {count}.")
        if params.get("aspectRatio", "1:1") not in IMAGEN_RATIOS:
            raise GoogleError(400, f"Unsupported aspect ratio: {params['aspectRatio']!r}. Supported aspect ratios "
                                   f"are: {', '.join(IMAGEN_RATIOS)}.")
        if "sampleImageSize" in params and params["sampleImageSize"] not in sizes:
            raise GoogleError(400, f"sampleImageSize {params['sampleImageSize']!r} is not supported by {model}.")
        strict = bool(self.extra("imagen_strict_enum_case", False))
        for name, allowed in (("safetySetting", SAFETY_SETTINGS), ("personGeneration", IMAGEN_PERSON)):
            value = params.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or (value if strict else value.lower()) not in allowed:
                raise GoogleError(400, f"Invalid value for parameters.{name}: {value!r}. Supported values are: "
                                       f"{', '.join(allowed)}.")
        options = params.get("outputOptions") or {}
        if not isinstance(options, dict) or options.get("mimeType", "image/png") not in ("image/png", "image/jpeg"):
            raise GoogleError(400, "outputOptions.mimeType must be image/png or image/jpeg.")
        return prompt, params
