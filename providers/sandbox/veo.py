"""Google Veo simulator (Gemini API, ``generativelanguage.googleapis.com/v1beta`` and ``/v1``).

Written from Google's documented wire format (shared/providers/video-sora-veo-kling-runway.md
§2), not from our adapter. The Atelier base URL is the simulator's origin; routes keep
Google's API-version prefix. ``v1beta`` is the documented one; the same routes also answer
under ``/v1`` (the stable version a client can choose, e.g. google-genai's
``HttpOptions(api_version="v1")``), and each answer names the version it was asked through:
file URIs (``/{version}/files/...``), the response ``@type``
(``google.ai.generativelanguage.{version}.PredictLongRunningResponse``) and error messages.
Whether Google serves Veo on ``v1`` is UNCONFIRMED: ``extra["veo_api_versions"]`` lists the
versions whose ``predictLongRunning`` knows the Veo models (default both; any other gets
Google's 404 "not found for API version ..."). Shown with ``v1beta`` below:

- ``POST /v1beta/models/{model}:predictLongRunning`` with ``{"instances": [{prompt, image,
  lastFrame, referenceImages, video}], "parameters": {...}, "webhookConfig": {...}}``
  answers **200** ``{"name": "models/{model}/operations/{id}"}``.
- ``GET /v1beta/models/{model}/operations/{id}``: the operation. Running: ``{"name"}`` only
  (``done`` absent; ``extra["veo_emit_done_false"]`` adds ``"done": false``). Terminal
  variants: samples (``response.generateVideoResponse.generatedSamples[].video.uri``),
  ``error {code: <gRPC code>, message}``, and the RAI content filter (``done: true``, no
  error, no samples, ``raiMediaFilteredCount``/``raiMediaFilteredReasons``).
- ``GET /v1beta/files/{id}:download?alt=media`` (key required): **302** to a signed storage
  URL (``/veo-storage/{id}.mp4?Expires=&Signature=``, valid ``veo_redirect_ttl_seconds``)
  that serves the MP4; ``GET /v1beta/files/{id}``: the File resource with
  ``expirationTime``. Files are kept ``output_ttl_seconds`` after generation (2 days when
  the simulator builds its own config), then 403 "...or it may not exist".
- Project webhooks: ``POST/GET /v1beta/webhooks``, ``GET/PATCH/DELETE /v1beta/webhooks/{id}``
  (also under ``/v1``, the doc's CONFLICT); ``video.generated`` events signed per Standard
  Webhooks with the ``new_signing_secret`` returned once on create. Per-request
  ``webhookConfig.uris`` override them and are signed with an RS256 JWT in
  ``webhook-signature``, verifiable with ``GET /.well-known/jwks.json``. No event is sent for
  failed or filtered operations (there is no documented failure event).

Auth: ``x-goog-api-key`` header or ``?key=``. No key: 403 PERMISSION_DENIED ("Method doesn't
allow unregistered callers..."); a wrong key: 400 INVALID_ARGUMENT ``API_KEY_INVALID``; only
an ``Authorization: Bearer`` that is not an OAuth token: 401 UNAUTHENTICATED.

Validation (400 INVALID_ARGUMENT, Google's envelope): unknown model -> 404 NOT_FOUND;
unknown top-level fields; exactly one instance; ``durationSeconds`` per model (Veo 3.x:
4/6/8 -- a 5 is refused with the real, misleading "between 4 and 8, inclusive" message;
Veo 2: 5..8); ``resolution`` per model (``1080p``/``4k`` need 8 s; ``4k`` only on 3.1);
``aspectRatio`` 16:9 | 9:16; 8 s with extension, interpolation (``lastFrame``) or
``referenceImages``; extension is 720p only; ``personGeneration`` per mode on Veo 3.x;
``sampleCount`` per model; Vertex-only parameters (``storageUri``, ``generateAudio``...);
images must be ``{bytesBase64Encoded, mimeType}`` (no ``gcsUri``/``inlineData``).

Errors: ``{"error": {"code", "message", "status", "details"?}}``; 429 RESOURCE_EXHAUSTED with
QuotaFailure and (when the fault has a delay) RetryInfo ``retryDelay``; 500 INTERNAL, 503
UNAVAILABLE, 504 DEADLINE_EXCEEDED; 502 is Google's HTML error page.

Prompt directives: ``[sim:filtered]`` (RAI filter, no video), ``[sim:partial]`` (one of
``sampleCount`` > 1 samples filtered), ``[sim:fail]`` / ``[sim:fail=<gRPC code>]``
(``done: true`` with ``error``; 13 INTERNAL by default, 3 = safety block),
``[sim:queue=S]``, ``[sim:run=S]``.

``SimConfig.extra`` knobs: ``veo_models`` (model -> rules, see ``MODELS``),
``veo_api_versions`` (["v1beta", "v1"]), ``veo_emit_done_false``,
``veo_redirect_ttl_seconds`` (default 300), ``veo_rejected_parameters`` (Vertex-only names),
``veo_retry_after_header`` (also send ``Retry-After`` on 429; default False),
``webhook_retry_delays``, ``webhook_duplicates``.

Fault route names: ``create``, ``get``, ``file`` (the API's download redirect and File
metadata), ``download`` (the storage bytes), ``webhooks``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, directives, new_id, route_path
from providers.sandbox.sora import (
    Background,
    CutoffFileStore,
    DueTimers,
    LastFaultPlan,
    standard_webhook_signature,
)

API_HOST_ISSUER = "https://generativelanguage.googleapis.com"
API_VERSIONS = ("v1beta", "v1")
DEFAULT_RETENTION_SECONDS = 2 * 24 * 3600

_V3_DURATIONS = [4, 6, 8]
MODELS: dict[str, dict[str, Any]] = {
    "veo-3.1-generate-preview": {"family": "3.1", "durations": _V3_DURATIONS,
                                 "resolutions": ["720p", "1080p", "4k"], "max_samples": 1},
    "veo-3.1-fast-generate-preview": {"family": "3.1", "durations": _V3_DURATIONS,
                                      "resolutions": ["720p", "1080p", "4k"], "max_samples": 1},
    "veo-3.1-lite-generate-preview": {"family": "3.1", "durations": _V3_DURATIONS,
                                      "resolutions": ["720p", "1080p"], "max_samples": 1},
    "veo-3.0-generate-001": {"family": "3", "durations": _V3_DURATIONS,
                             "resolutions": ["720p", "1080p"], "max_samples": 1},
    "veo-3.0-fast-generate-001": {"family": "3", "durations": _V3_DURATIONS,
                                  "resolutions": ["720p", "1080p"], "max_samples": 1},
    "veo-2.0-generate-001": {"family": "2", "durations": [5, 6, 7, 8], "resolutions": ["720p"],
                             "max_samples": 2},
}
ASPECT_RATIOS = ("16:9", "9:16")
PERSON_GENERATION = ("allow_all", "allow_adult", "dont_allow")
VERTEX_ONLY = [
    "storageUri", "fps", "pubsubTopic", "generateAudio", "compressionQuality", "resizeMode", "mask",
]
TOP_LEVEL_FIELDS = {"instances", "parameters", "webhookConfig", "webhook_config", "model"}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED"}
MSG_NO_KEY = ("Method doesn't allow unregistered callers (callers without established identity). Please use "
              "API Key or other form of API consumer identity to call this API.")
MSG_BAD_KEY = "API key not valid. Please pass a valid API key."
MSG_UNAUTHENTICATED = ("Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                       "cookie or other valid authentication credential. See "
                       "https://developers.google.com/identity/sign-in/web/devconsole-project.")
MSG_QUOTA = ("You exceeded your current quota, please check your plan and billing details. For more "
             "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.")
MSG_500 = ("An internal error has occurred. Please retry or report in "
           "https://developers.generativeai.google/guide/troubleshooting")
MSG_AUDIO_FILTER = ("We encountered an issue with the audio for your prompt. Please try a different prompt. "
                    "You have not been charged for this attempt.")
MSG_FILTER = ("Veo could not generate 1 videos based on the prompt provided. You will not be charged for "
              "blocked videos. Support codes: 42237218")
GRPC_MESSAGES = {
    3: "The prompt was blocked by our safety policy.",
    13: "Video generation failed due to an internal error. Please try again later.",
}
_GOOGLE_502 = (
    "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 502 (Server Error)!!1</title>\n"
    "  <p><b>502.</b> <ins>That\u2019s an error.</ins>\n  <p>The server encountered a temporary error and "
    "could not complete your request.<p>Please try again in 30 seconds.  "
    "<ins>That\u2019s all we know.</ins>\n"
)


def _api_version(request: Request) -> str:
    """The API version the client called (the first path segment below the mount point)."""
    return route_path(request).split("/", 2)[1]


def _response_type(version: str) -> str:
    return f"type.googleapis.com/google.ai.generativelanguage.{version}.PredictLongRunningResponse"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class GoogleError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


def _unsupported(name: str) -> GoogleError:
    return GoogleError(400, f"`{name}` isn't supported by this model. Please remove it or refer to the "
                            "Gemini API documentation for supported usage.")


@dataclass
class StaticWebhook:
    id: str
    uri: str
    subscribed_events: list[str]
    secrets: list[str]
    created_at: float
    updated_at: float
    state: str = "enabled"
    display_name: str | None = None

    def resource(self, new_secret: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": f"webhooks/{self.id}", "id": self.id, "uri": self.uri,
                                "subscribed_events": self.subscribed_events, "state": self.state,
                                "create_time": _rfc3339(self.created_at),
                                "update_time": _rfc3339(self.updated_at)}
        if new_secret is not None:
            body["new_signing_secret"] = new_secret
        return body


class VeoSimulator(Simulator):
    name = "veo"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config or SimConfig(output_ttl_seconds=DEFAULT_RETENTION_SECONDS))
        self.faults: LastFaultPlan = LastFaultPlan()
        self.files: CutoffFileStore = CutoffFileStore(self.config)
        self.tasks: dict[str, SimTask] = {}  # by operation id
        self.file_index: dict[str, tuple[str, int]] = {}  # file id -> (operation id, sample index)
        self.webhooks: dict[str, StaticWebhook] = {}
        self.webhook_attempts: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._storage_key = secrets.token_bytes(32)
        self._origin = ""  # the origin clients use (for URIs in webhook events)
        self._jwk_private: rsa.RSAPrivateKey | None = None
        self.jwk_kid = "sim-" + secrets.token_hex(8)
        self.timers = DueTimers(self._on_finished)
        self.background = Background()
        self.app.router.lifespan_context = self._lifespan

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.timers.aclose()
        await self.background.aclose()

    def extra(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    def models(self) -> dict[str, dict[str, Any]]:
        models: dict[str, dict[str, Any]] = self.extra("veo_models", MODELS)
        return models

    # -- wire format -------------------------------------------------------
    def google_error(self, status: int, message: str, details: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None) -> Response:
        err: dict[str, Any] = {"code": status, "message": message,
                               "status": STATUS_NAMES.get(status, "UNKNOWN")}
        if details:
            err["details"] = details
        return JSONResponse({"error": err}, status_code=status, headers=headers,
                            media_type="application/json; charset=UTF-8")

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 502:
            return Response(_GOOGLE_502, status_code=502, media_type="text/html; charset=UTF-8",
                            headers=headers)
        if status == 429:
            return self.rate_limited(None, "predictLongRunning")
        message = {500: MSG_500, 503: "The model is overloaded. Please try again later.",
                   504: "Deadline expired before operation could complete."}.get(status, message)
        return self.google_error(status, message, headers=headers)

    def rate_limited(self, retry_after: float | None, model: str) -> Response:
        details: list[dict[str, Any]] = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/predict_long_running_requests",
                "quotaId": "PredictLongRunningRequestsPerMinutePerProjectPerModel",
                "quotaDimensions": {"location": "global", "model": model}, "quotaValue": "2"}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        ]
        headers: dict[str, str] = {}
        if retry_after is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{retry_after:g}s"})
            if self.extra("veo_retry_after_header", False):
                headers["Retry-After"] = str(max(1, round(retry_after)))
        return self.google_error(429, MSG_QUOTA, details, headers)

    async def fault(self, route: str, *, after_effect: bool = False) -> Response | None:
        response = await super().fault(route, after_effect=after_effect)
        fault = self.faults.last
        if response is not None and fault is not None and fault.kind == "429":
            return self.rate_limited(fault.retry_after, "veo")
        return response

    def expired_file_response(self) -> Response:
        return Response(b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchKey</Code><Message>The "
                        b"specified key does not exist.</Message></Error>", status_code=404,
                        media_type="application/xml; charset=UTF-8")

    # -- operations --------------------------------------------------------
    def _outcome(self, task: SimTask) -> str:
        return task.outcome if task.outcome in ("fail", "filtered", "partial") else "succeed"

    def operation(self, task: SimTask, origin: str, version: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        name = f"models/{task.data['model']}/operations/{task.id}"
        if task.phase(now) != "done":
            if self.extra("veo_emit_done_false", False):
                return {"name": name, "done": False}
            return {"name": name}
        outcome = self._outcome(task)
        if outcome == "fail":
            code = int(task.data.get("grpc_code") or 13)
            message = GRPC_MESSAGES.get(code, "Video generation failed.")
            return {"name": name, "done": True, "error": {"code": code, "message": message}}
        gen: dict[str, Any] = {}
        files: list[str] = task.data["files"]
        filtered = len(files) if outcome == "filtered" else int(outcome == "partial" and len(files) > 1)
        delivered = files[: len(files) - filtered]
        if delivered:
            gen["generatedSamples"] = [{"video": {"uri": self.file_uri(origin, version, f)}} for f in delivered]
        if filtered:
            reason = MSG_FILTER if task.data["family"] == "2" else MSG_AUDIO_FILTER
            gen["raiMediaFilteredCount"] = filtered
            gen["raiMediaFilteredReasons"] = [reason]
        response = {"@type": _response_type(version), "generateVideoResponse": gen}
        return {"name": name, "done": True, "response": response}

    def file_uri(self, origin: str, version: str, file_id: str) -> str:
        return f"{origin}/{version}/files/{file_id}:download?alt=media"

    def delivered_files(self, task: SimTask) -> list[str]:
        """The file ids a terminal operation actually hands out."""
        if task.phase() != "done" or self._outcome(task) in ("fail", "filtered"):
            return []
        files: list[str] = task.data["files"]
        return files[:-1] if self._outcome(task) == "partial" and len(files) > 1 else files

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/veo-storage/{file_id}.mp4", self.storage, methods=["GET"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
        ]
        for version in API_VERSIONS:
            routes += [
                Route(f"/{version}/models/{{model}}:predictLongRunning", self.predict_long_running,
                      methods=["POST"]),
                Route(f"/{version}/models/{{model}}/operations/{{op}}", self.get_operation, methods=["GET"]),
                Route(f"/{version}/files/{{file_id}}:download", self.download_file, methods=["GET"]),
                Route(f"/{version}/files/{{file_id}}", self.get_file, methods=["GET"]),
                Route(f"/{version}/webhooks", self.create_webhook, methods=["POST"]),
                Route(f"/{version}/webhooks", self.list_webhooks, methods=["GET"]),
                Route(f"/{version}/webhooks/{{id}}", self.get_webhook, methods=["GET"]),
                Route(f"/{version}/webhooks/{{id}}", self.patch_webhook, methods=["PATCH"]),
                Route(f"/{version}/webhooks/{{id}}", self.delete_webhook, methods=["DELETE"]),
            ]
        return routes

    def _auth(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            if request.headers.get("authorization"):
                return self.google_error(401, MSG_UNAUTHENTICATED, [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                     "domain": "googleapis.com",
                     "metadata": {"service": "generativelanguage.googleapis.com",
                                  "method": f"google.ai.generativelanguage.{_api_version(request)}"
                                            ".PredictionService"}}])
            return self.google_error(403, MSG_NO_KEY)
        if not self.config.key_ok(key):
            return self.google_error(400, MSG_BAD_KEY, [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": MSG_BAD_KEY}])
        return None

    async def _json(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            msg = "Invalid JSON payload received. Unexpected token."
            raise GoogleError(400, msg, [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                          "fieldViolations": [{"description": msg}]}]) from exc

    async def predict_long_running(self, request: Request) -> Response:
        model = request.path_params["model"]
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        version = _api_version(request)
        try:
            served = version in self.extra("veo_api_versions", API_VERSIONS)
            rules = self.models().get(model) if served else None
            if rules is None:
                raise GoogleError(404, f"models/{model} is not found for API version {version}, or is not "
                                       "supported for predictLongRunning. Call ListModels to see the list of "
                                       "available models and their supported methods.")
            body = await self._json(request)
            instance, params, hook = self._validate(rules, body)
        except GoogleError as exc:
            return self.google_error(exc.status, exc.message, exc.details)
        prompt = instance.get("prompt") if isinstance(instance.get("prompt"), str) else None
        d = directives(prompt)
        samples = int(params.get("sampleCount", 1))
        op_id = new_id(length=12)
        files = [new_id(length=12) for _ in range(samples)]
        self._origin = self.origin(request)
        data: dict[str, Any] = {"model": model, "family": rules["family"], "files": files, "api_version": version}
        if d.get("fail"):
            data["grpc_code"] = d["fail"]
        if hook is not None:
            data["webhook"] = hook
        task = SimTask.create(op_id, self.config, prompt, data=data)
        self.tasks[op_id] = task
        for i, file_id in enumerate(files):
            self.file_index[file_id] = (op_id, i)
        self.record_creation(model + json.dumps(body, sort_keys=True))
        self.timers.schedule(task.finished_at, op_id)
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"name": f"models/{model}/operations/{op_id}"},
                            media_type="application/json; charset=UTF-8")

    def _validate(self, rules: dict[str, Any], body: Any) -> tuple[dict[str, Any], dict[str, Any],
                                                                   dict[str, Any] | None]:
        if not isinstance(body, dict):
            raise GoogleError(400, "Invalid JSON payload received. Expected an object.")
        for key in body:
            if key not in TOP_LEVEL_FIELDS:
                desc = f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
                raise GoogleError(400, desc, [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                               "fieldViolations": [{"description": desc}]}])
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
            raise GoogleError(400, "* PredictLongRunningRequest.instances: exactly one instance is required.")
        inst: dict[str, Any] = instances[0]
        params = body.get("parameters", {})
        if not isinstance(params, dict):
            raise GoogleError(400, "Invalid value at 'parameters': expected an object.")
        family = rules["family"]
        rejected: list[str] = self.extra("veo_rejected_parameters", VERTEX_ONLY)
        for name in params:
            if name in rejected:
                raise _unsupported(name)

        prompt = inst.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise GoogleError(400, "Invalid value at 'instances[0].prompt': expected a string.")
        has_image = inst.get("image") is not None
        has_last = inst.get("lastFrame") is not None
        refs = inst.get("referenceImages")
        video = inst.get("video")
        if not prompt and not has_image and video is None:
            raise GoogleError(400, "A text prompt or an input image is required.")
        for key in ("image", "lastFrame"):
            if inst.get(key) is not None:
                self._check_image(inst[key], f"instances[0].{key}")
        if has_last and not has_image:
            raise GoogleError(400, "`lastFrame` requires `image` (the first frame).")
        if refs is not None:
            if family != "3.1":
                raise _unsupported("referenceImages")
            if not isinstance(refs, list) or not 1 <= len(refs) <= 3:
                raise GoogleError(400, "`referenceImages` must contain between 1 and 3 images.")
            for i, ref in enumerate(refs):
                if not isinstance(ref, dict) or ref.get("referenceType", "asset") != "asset":
                    raise GoogleError(400, "Unsupported referenceType at "
                                           f"'instances[0].referenceImages[{i}]'. Supported values: asset.")
                self._check_image(ref.get("image"), f"instances[0].referenceImages[{i}].image")
        if video is not None:
            if family != "3.1":
                raise _unsupported("video")
            self._check_video(video)

        aspect = params.get("aspectRatio", "16:9")
        if aspect not in ASPECT_RATIOS:
            raise GoogleError(400, f"Unsupported aspect ratio: {aspect}. Supported values are: "
                                   f"{', '.join(ASPECT_RATIOS)}.")
        resolution = params.get("resolution", "720p")
        if resolution not in rules["resolutions"]:
            raise GoogleError(400, f"Unsupported resolution: {resolution}. Supported values for this model "
                                   f"are: {', '.join(rules['resolutions'])}.")
        durations: list[int] = rules["durations"]
        raw_duration = params.get("durationSeconds", 8)
        try:
            if isinstance(raw_duration, bool):
                raise ValueError
            duration = int(raw_duration)
            if duration != float(raw_duration) or duration not in durations:
                raise ValueError
        except (TypeError, ValueError) as exc:
            lo, hi = min(durations), max(durations)
            raise GoogleError(400, "The number value for `durationSeconds` is out of bound. Please provide a "
                                   f"value between {lo} and {hi}, inclusive.") from exc
        if resolution != "720p" and duration != 8:
            raise GoogleError(400, f"Resolution {resolution} is only supported with `durationSeconds` 8.")
        if (video is not None or has_last or refs is not None) and duration != 8:
            raise GoogleError(400, "`durationSeconds` must be 8 for video extension, interpolation "
                                   "(`lastFrame`) or `referenceImages`.")
        if video is not None and resolution != "720p":
            raise GoogleError(400, "Video extension only supports resolution 720p.")

        person = params.get("personGeneration")
        if person is not None:
            if person not in PERSON_GENERATION:
                raise GoogleError(400, f"Unsupported personGeneration value: {person}. Supported values are: "
                                       f"{', '.join(PERSON_GENERATION)}.")
            if family != "2":
                image_mode = has_image or refs is not None
                wanted = "allow_adult" if image_mode else "allow_all"
                if person != wanted:
                    mode = "image-to-video" if image_mode else "text-to-video"
                    raise GoogleError(400, f"`personGeneration` {person} isn't supported for {mode} on this "
                                           f"model. Use {wanted}.")
        samples = params.get("sampleCount", 1)
        max_samples = int(rules["max_samples"])
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= max_samples:
            raise GoogleError(400, "The number value for `sampleCount` is out of bound. Please provide a "
                                   f"value between 1 and {max_samples}, inclusive.")
        for key, kind in (("negativePrompt", str), ("enhancePrompt", bool), ("seed", int)):
            if key in params and not isinstance(params[key], kind):
                raise GoogleError(400, f"Invalid value at 'parameters.{key}'.")
        hook = body.get("webhookConfig", body.get("webhook_config"))
        if hook is not None:
            uris = hook.get("uris") if isinstance(hook, dict) else None
            if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
                raise GoogleError(400, "`webhookConfig.uris` must be a non-empty list of URIs.")
            meta = hook.get("user_metadata", hook.get("userMetadata"))
            hook = {"uris": uris, "user_metadata": meta if isinstance(meta, dict) else None}
        return inst, {**params, "sampleCount": samples}, hook

    def _check_image(self, image: Any, where: str) -> None:
        if not isinstance(image, dict):
            raise GoogleError(400, f"Invalid value at '{where}': expected an object.")
        if "gcsUri" in image:
            raise GoogleError(400, f"`gcsUri` isn't supported by the Gemini API ('{where}'). Send the image "
                                   "as bytesBase64Encoded.")
        if "inlineData" in image or "fileUri" in image:
            raise _unsupported("inlineData" if "inlineData" in image else "fileUri")
        data = image.get("bytesBase64Encoded")
        if not isinstance(data, str) or not data:
            raise GoogleError(400, f"Missing '{where}.bytesBase64Encoded'.")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise GoogleError(400, f"Invalid value at '{where}.bytesBase64Encoded': Base64 decoding "
                                   "failed.") from exc
        if image.get("mimeType") not in IMAGE_TYPES:
            raise GoogleError(400, f"Unsupported MIME type at '{where}.mimeType': {image.get('mimeType')}. "
                                   f"Supported types are: {', '.join(IMAGE_TYPES)}.")

    def _check_video(self, video: Any) -> None:
        if not isinstance(video, dict):
            raise GoogleError(400, "Invalid value at 'instances[0].video': expected an object.")
        if "encodedVideo" in video:
            return
        uri = video.get("uri")
        file_id = uri.rsplit("/files/", 1)[-1].split(":")[0].split("?")[0] if isinstance(uri, str) else ""
        entry = self.file_index.get(file_id)
        task = self.tasks.get(entry[0]) if entry else None
        if task is None or file_id not in self.delivered_files(task) or self._file_gone(task):
            raise GoogleError(400, "The input video must be a video generated by Veo that has not expired.")

    def _op_task(self, request: Request) -> SimTask | None:
        task = self.tasks.get(request.path_params["op"])
        if task is None or task.data["model"] != request.path_params["model"]:
            return None
        return task

    async def get_operation(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self._op_task(request)
        if task is None:
            return self.google_error(404, "Requested entity was not found.")
        return JSONResponse(self.operation(task, self.origin(request), _api_version(request)),
                            media_type="application/json; charset=UTF-8")

    # -- files -------------------------------------------------------------
    def _file_gone(self, task: SimTask, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return (now >= task.finished_at + self.config.output_ttl_seconds
                or task.finished_at <= self.files.cutoff)

    def _file(self, file_id: str) -> SimTask | None:
        """The operation a live file belongs to, or None (unknown, not generated yet, or past retention)."""
        entry = self.file_index.get(file_id)
        task = self.tasks.get(entry[0]) if entry else None
        if task is None or file_id not in self.delivered_files(task) or self._file_gone(task):
            return None
        return task

    def _no_file(self, file_id: str) -> Response:
        return self.google_error(403, f"You do not have permission to access the File {file_id} or it may "
                                      "not exist.")

    def _sign(self, file_id: str, expires: int) -> str:
        return hmac.new(self._storage_key, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    async def download_file(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("file")) is not None:
            return injected
        file_id = request.path_params["file_id"]
        if self._file(file_id) is None:
            return self._no_file(file_id)
        expires = math.ceil(time.time() + float(self.extra("veo_redirect_ttl_seconds", 300)))
        location = f"{self.origin(request)}/veo-storage/{file_id}.mp4?Expires={expires}&Signature=" \
                   f"{self._sign(file_id, expires)}"
        return RedirectResponse(location, status_code=302)

    async def get_file(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("file")) is not None:
            return injected
        file_id = request.path_params["file_id"]
        task = self._file(file_id)
        if task is None:
            return self._no_file(file_id)
        data = self._bytes(file_id)
        origin, version = self.origin(request), _api_version(request)
        return JSONResponse({
            "name": f"files/{file_id}", "mimeType": "video/mp4", "sizeBytes": str(len(data)),
            "createTime": _rfc3339(task.finished_at), "updateTime": _rfc3339(task.finished_at),
            "expirationTime": _rfc3339(task.finished_at + self.config.output_ttl_seconds),
            "sha256Hash": base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode(),
            "uri": f"{origin}/{version}/files/{file_id}", "downloadUri": self.file_uri(origin, version, file_id),
            "state": "ACTIVE", "source": "GENERATED"}, media_type="application/json; charset=UTF-8")

    def _bytes(self, file_id: str) -> bytes:
        return media.mp4(f"veo:{file_id}")

    async def storage(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        file_id = request.path_params["file_id"]
        q = request.query_params
        try:
            expires = int(q.get("Expires", ""))
        except ValueError:
            expires = 0
        if not hmac.compare_digest(self._sign(file_id, expires), q.get("Signature", "")):
            return Response(b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SignatureDoesNotMatch</Code>"
                            b"<Message>Access denied.</Message></Error>", status_code=403,
                            media_type="application/xml; charset=UTF-8")
        if time.time() > expires:
            return Response(b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code><Message>"
                            b"Invalid argument.</Message><Details>The provided token has expired.</Details>"
                            b"</Error>", status_code=400, media_type="application/xml; charset=UTF-8")
        if self._file(file_id) is None:
            return self.expired_file_response()
        return Response(self._bytes(file_id), media_type="video/mp4")

    # -- webhooks ----------------------------------------------------------
    def _private_key(self) -> rsa.RSAPrivateKey:
        if self._jwk_private is None:
            self._jwk_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._jwk_private

    async def jwks(self, request: Request) -> Response:
        jwk = json.loads(RSAAlgorithm.to_jwk(self._private_key().public_key()))
        jwk.update({"kid": self.jwk_kid, "use": "sig", "alg": "RS256"})
        return JSONResponse({"keys": [jwk]})

    async def _webhooks_guard(self, request: Request) -> Response | None:
        if (denied := self._auth(request)) is not None:
            return denied
        return await self.fault("webhooks")

    async def create_webhook(self, request: Request) -> Response:
        if (denied := await self._webhooks_guard(request)) is not None:
            return denied
        try:
            body = await self._json(request)
            uri, events = self._webhook_fields(body, partial=False)
        except GoogleError as exc:
            return self.google_error(exc.status, exc.message, exc.details)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        now = time.time()
        hook = StaticWebhook(id=new_id(length=12), uri=uri or "", subscribed_events=events or [],
                             secrets=[secret], created_at=now, updated_at=now,
                             display_name=body.get("name") if isinstance(body.get("name"), str) else None)
        self.webhooks[hook.id] = hook
        return JSONResponse(hook.resource(new_secret=secret))

    def _webhook_fields(self, body: Any, partial: bool) -> tuple[str | None, list[str] | None]:
        if not isinstance(body, dict):
            raise GoogleError(400, "Invalid JSON payload received. Expected an object.")
        uri = body.get("uri")
        events = body.get("subscribed_events", body.get("subscribedEvents"))
        if (uri is not None or not partial) and (not isinstance(uri, str) or not uri.startswith(("http://",
                                                                                                 "https://"))):
            raise GoogleError(400, "`uri` is required and must be an http(s) URL.")
        if (events is not None or not partial) and (
                not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events)):
            raise GoogleError(400, "`subscribed_events` is required and must be a non-empty list.")
        return uri, events

    async def list_webhooks(self, request: Request) -> Response:
        if (denied := await self._webhooks_guard(request)) is not None:
            return denied
        return JSONResponse({"webhooks": [h.resource() for h in self.webhooks.values()]})

    async def get_webhook(self, request: Request) -> Response:
        if (denied := await self._webhooks_guard(request)) is not None:
            return denied
        hook = self.webhooks.get(request.path_params["id"])
        if hook is None:
            return self.google_error(404, "Requested entity was not found.")
        return JSONResponse(hook.resource())

    async def patch_webhook(self, request: Request) -> Response:
        if (denied := await self._webhooks_guard(request)) is not None:
            return denied
        hook = self.webhooks.get(request.path_params["id"])
        if hook is None:
            return self.google_error(404, "Requested entity was not found.")
        try:
            body = await self._json(request)
            uri, events = self._webhook_fields(body, partial=True)
        except GoogleError as exc:
            return self.google_error(exc.status, exc.message, exc.details)
        if uri is not None:
            hook.uri = uri
        if events is not None:
            hook.subscribed_events = events
        if body.get("state") in ("enabled", "disabled"):
            hook.state = body["state"]
        hook.updated_at = time.time()
        return JSONResponse(hook.resource())

    async def delete_webhook(self, request: Request) -> Response:
        if (denied := await self._webhooks_guard(request)) is not None:
            return denied
        if self.webhooks.pop(request.path_params["id"], None) is None:
            return self.google_error(404, "Requested entity was not found.")
        return JSONResponse({})

    def _on_finished(self, op_id: str) -> None:
        task = self.tasks.get(op_id)
        if task is None:
            return
        files = self.delivered_files(task)
        if not files:
            return  # no documented event for failed or filtered generations
        origin = self._origin
        event: dict[str, Any] = {
            "type": "video.generated", "version": "v1", "timestamp": _rfc3339(time.time()),
            "data": {"id": op_id, "output_file_uri": self.file_uri(origin, task.data["api_version"], files[0]),
                     "file_name": f"files/{files[0]}"}}
        hook = task.data.get("webhook")
        if hook is not None:
            event["data"]["user_metadata"] = hook["user_metadata"]
            for uri in hook["uris"]:
                self.background.spawn(self._deliver(uri, event, None))
            return
        for static in list(self.webhooks.values()):
            if static.state == "enabled" and "video.generated" in static.subscribed_events:
                self.background.spawn(self._deliver(static.uri, event, static))

    def _jwt(self, uri: str, msg_id: str, ts: int, body: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        claims = {"iss": API_HOST_ISSUER, "aud": uri, "iat": ts, "exp": ts + 300, "webhook_id": msg_id,
                  "body_sha256": digest}
        return jwt.encode(claims, self._private_key(), algorithm="RS256", headers={"kid": self.jwk_kid})

    async def _deliver(self, uri: str, event: dict[str, Any], static: StaticWebhook | None) -> None:
        body = json.dumps(event).encode()
        msg_id = "msg_" + new_id(length=24)
        for _ in range(1 + int(self.extra("webhook_duplicates", 0))):
            await self._deliver_once(uri, event, body, msg_id, static)

    async def _deliver_once(self, uri: str, event: dict[str, Any], body: bytes, msg_id: str,
                            static: StaticWebhook | None) -> None:
        delays: list[float] = list(self.extra("webhook_retry_delays", [0.5, 1.0, 2.0, 4.0]))
        for attempt in range(len(delays) + 1):
            ts = int(time.time())
            if static is not None:
                signature = " ".join(standard_webhook_signature(s, msg_id, ts, body) for s in static.secrets)
            else:
                signature = self._jwt(uri, msg_id, ts, body)
            headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "webhook-signature": signature}
            status: int | None = None
            try:
                resp = await self.background.client.post(uri, content=body, headers=headers)
                status = resp.status_code
            except httpx.HTTPError:
                pass
            self.webhook_attempts.append({"webhook_id": msg_id, "uri": uri, "operation": event["data"]["id"],
                                          "attempt": attempt + 1, "status": status})
            if status is not None and 200 <= status < 300:
                return
            if attempt < len(delays):
                await asyncio.sleep(delays[attempt])
