"""Runway API (https://api.dev.runwayml.com), video generation tasks.

Every request carries ``Authorization: Bearer <key>`` and ``X-Runway-Version: 2024-11-06``
(``extra["version"]`` overrides it; Runway versions by this header, not by the path).

Endpoints:

* ``POST /v1/image_to_video`` (``promptImage`` required: ``image_url``, or native
  ``options.promptImage``) and ``POST /v1/text_to_video`` (models that support it, when no
  image is given). Camel-case bodies: ``model, promptText, promptImage, ratio, duration,
  seed, negativePrompt, audio, contentModeration``. The answer is only ``{"id": "<uuid>"}``.
* ``GET /v1/tasks/{id}``: the task.
* ``DELETE /v1/tasks/{id}``: cancels a PENDING/THROTTLED/RUNNING task (deletes a finished one).

Mapping of common inputs: ``prompt`` -> ``promptText`` (<= 1000 UTF-16 units), ``image_url``
-> ``promptImage`` (HTTPS on a host name), ``aspect_ratio`` + ``resolution`` -> ``ratio`` (a
pixel ratio such as ``1280:720`` from the model's list: 16:9 -> 1280:720 or 1920:1080 at
1080p, 4:3 -> 1104:832, 21:9 -> 1584:672 ...; ``resolution`` may also be ``1280x720``),
``duration_seconds`` -> ``duration`` (an integer from the model's list), ``seed`` -> ``seed``,
``negative_prompt`` -> ``negativePrompt`` (Veo models). Model rosters and enums are per model
and strictly checked by Runway, so they are checked here first.

Status mapping: ``PENDING`` and ``THROTTLED`` -> queued (THROTTLED = stored but over the
concurrency limit of the tier; it is normal queueing, not an error, and shows as the job's
``provider_status``), ``RUNNING`` -> running (``progress`` is a 0..1 float -> 0..100),
``SUCCEEDED`` -> succeeded (``output[]``), ``FAILED`` -> failed (``failure``, ``failureCode``;
``SAFETY.*`` codes are ``provider_content_filtered``), ``CANCELLED`` -> canceled. Anything else
is logged and non-terminal.

Traps:

* No idempotency and no task list: an ambiguous create cannot be reconciled (``reconcile``
  returns ``None``), so Atelier fails the job with ``provider_outcome_unknown`` instead of
  paying twice.
* Output URLs are signed CloudFront links that expire within 24-48 h and need no auth header.
  Each GET of the task mints fresh ones, so a download that answers 403 could be repaired by
  fetching the task again; the collector does not do that yet (it reports ``output_expired``),
  which only matters when outputs are collected more than a day after the task finished.
* No per-task callbacks (``supports_callbacks = False``): Atelier polls; Runway asks for no
  more than one update per task every 5 s.
* 400 bodies are ``{"error": "<text>"}``; "not enough credits" is an InsufficientBalance. 429
  (daily generation quota, or rate limiting) is RateLimited.

Cost: a finished task carries ``cost: {credits}`` (what stays charged; 0 when refunded) and an
unfinished one ``estimatedCost`` (runwayml SDK 5.x task types; not in the reference). The final
credits are the task's ``usage``, in USD at ``extra["usd_per_credit"]`` (0.01: Runway's API price
of a credit as remembered, unverified).
"""

from __future__ import annotations

import ipaddress
import logging
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
    ProviderState,
    SubmitResult,
    TaskRef,
    TaskState,
    TaskStatus,
    Usage,
)
from providers.errors import InsufficientBalance, InvalidInput, MalformedResponse, Rejected, TaskNotFound
from providers.http import expect_object, parse_json, raise_for_common_status, send
from providers.usage import credits_in_usd, usage

log = logging.getLogger(__name__)

API_VERSION = "2024-11-06"
# USD per Runway credit (Runway's API price as remembered, unverified; extra["usd_per_credit"] overrides it).
USD_PER_CREDIT = 0.01
IMAGE_TO_VIDEO = "image_to_video"
TEXT_TO_VIDEO = "text_to_video"
MAX_PROMPT_UTF16 = 1000

R6 = ("1280:720", "720:1280", "1104:832", "832:1104", "960:960", "1584:672")
R4 = ("1280:720", "720:1280", "1080:1920", "1920:1080")
GEN4_DURATIONS = tuple(range(2, 11))
VEO_DURATIONS = (4, 6, 8)


@dataclass(frozen=True)
class ModelSpec:
    ratios: tuple[str, ...]
    durations: tuple[int, ...]
    duration_required: bool = False
    prompt_required: bool = False
    seed: bool = True
    veo_extras: bool = False  # negativePrompt, audio, a last frame


# Runway's documented models per endpoint (runwayml SDK union types, 2026-07). The roster
# changes often: add a model here with its ratios and durations.
MODELS: dict[str, dict[str, ModelSpec]] = {
    IMAGE_TO_VIDEO: {
        "gen4_turbo": ModelSpec(R6, GEN4_DURATIONS),
        "gen4.5": ModelSpec(R6, GEN4_DURATIONS, duration_required=True, prompt_required=True),
        "veo3.1": ModelSpec(R4, VEO_DURATIONS, veo_extras=True),
        "veo3.1_fast": ModelSpec(R4, VEO_DURATIONS, veo_extras=True),
        "veo3": ModelSpec(R4, (8,), duration_required=True, seed=False),
    },
    TEXT_TO_VIDEO: {
        "gen4.5": ModelSpec(("1280:720", "720:1280"), GEN4_DURATIONS, duration_required=True,
                            prompt_required=True),
        "veo3.1": ModelSpec(R4, VEO_DURATIONS, prompt_required=True, veo_extras=True),
        "veo3.1_fast": ModelSpec(R4, VEO_DURATIONS, prompt_required=True, veo_extras=True),
    },
}
# Native parameters a client may pass in ``options`` (camel-case, as Runway names them).
NATIVE_OPTIONS = frozenset({"promptImage", "promptText", "ratio", "duration", "seed", "negativePrompt",
                            "audio", "contentModeration"})

_STATES: dict[str, ProviderState] = {
    "PENDING": "queued",
    "THROTTLED": "queued",
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "CANCELLED": "canceled",
}


# -- request building (validation happens here, before anything is sent) ------------------

def runway_request(model: str, job_input: MediaInput) -> tuple[str, dict[str, Any]]:
    """``(endpoint, create body)``; raises ``InvalidInput`` naming the offending field."""
    opts = dict(job_input.options)
    for key in opts:
        if key not in NATIVE_OPTIONS:
            raise InvalidInput(f"input.options.{key}", f"Runway options are {', '.join(sorted(NATIVE_OPTIONS))}")
    has_image = job_input.image_url is not None or "promptImage" in opts
    endpoint = IMAGE_TO_VIDEO if has_image else TEXT_TO_VIDEO
    spec = MODELS[endpoint].get(model)
    if spec is None:
        if not has_image and model in MODELS[IMAGE_TO_VIDEO]:
            raise InvalidInput("input.image_url", f"{model} is image-to-video only: it needs image_url")
        known = sorted(set(MODELS[IMAGE_TO_VIDEO]) | set(MODELS[TEXT_TO_VIDEO]))
        raise InvalidInput("model", f"Runway {endpoint} models are {', '.join(sorted(MODELS[endpoint]))} "
                                    f"(known: {', '.join(known)})")
    if job_input.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Runway renders one video per task")

    body: dict[str, Any] = {"model": model}
    if job_input.prompt is not None:
        body["promptText"] = job_input.prompt
    if job_input.image_url is not None:
        _check_asset_url("input.image_url", str(job_input.image_url))
        body["promptImage"] = str(job_input.image_url)
    if job_input.negative_prompt is not None:
        if not spec.veo_extras:
            raise InvalidInput("input.negative_prompt", f"{model} has no negative prompt")
        body["negativePrompt"] = job_input.negative_prompt
    if job_input.seed is not None:
        if not spec.seed:
            raise InvalidInput("input.seed", f"{model} takes no seed")
        body["seed"] = job_input.seed
    if job_input.duration_seconds is not None:
        seconds = job_input.duration_seconds
        if not float(seconds).is_integer() or int(seconds) not in spec.durations:
            raise InvalidInput("input.duration_seconds", f"{model} renders {_durations(spec)} seconds")
        body["duration"] = int(seconds)
    body["ratio"] = pick_ratio(model, spec, job_input.aspect_ratio, job_input.resolution)

    _check_options(model, spec, opts)
    body.update(opts)
    if "duration" not in body and spec.duration_required:
        if len(spec.durations) != 1:
            raise InvalidInput("input.duration_seconds", f"{model} needs a duration: {_durations(spec)} seconds")
        body["duration"] = spec.durations[0]
    text = body.get("promptText")
    if text is None and spec.prompt_required:
        raise InvalidInput("input.prompt", f"{model} needs a prompt")
    if text is not None and (not isinstance(text, str) or not text.strip()
                             or len(text.encode("utf-16-le")) // 2 > MAX_PROMPT_UTF16):
        raise InvalidInput("input.prompt", f"the prompt is a non-empty text of at most {MAX_PROMPT_UTF16} "
                                           "UTF-16 code units")
    return endpoint, body


def pick_ratio(model: str, spec: ModelSpec, aspect_ratio: str | None, resolution: str | None) -> str:
    """Runway's pixel ``ratio`` for a common aspect ratio and resolution, from the model's list."""
    candidates = list(spec.ratios)
    if resolution and "x" in resolution:
        ratio = resolution.replace("x", ":")
        if ratio not in candidates:
            raise InvalidInput("input.resolution", f"{model} renders {', '.join(candidates)}")
        if aspect_ratio and not _same_shape(ratio, aspect_ratio):
            raise InvalidInput("input.aspect_ratio", f"{aspect_ratio} does not match resolution {resolution}")
        return ratio
    if aspect_ratio:
        candidates = [r for r in candidates if _same_shape(r, aspect_ratio)]
        if not candidates:
            shapes = sorted({_shape_name(r) for r in spec.ratios})
            raise InvalidInput("input.aspect_ratio", f"{model} renders aspect ratios {', '.join(shapes)}")
    if resolution:
        tier = resolution.lower()
        matching = [r for r in candidates if _tier(r) == tier]
        if not matching:
            tiers = sorted({_tier(r) for r in candidates})
            raise InvalidInput("input.resolution", f"{model} renders {', '.join(tiers)} here")
        candidates = matching
    return candidates[0]


def _check_options(model: str, spec: ModelSpec, opts: dict[str, Any]) -> None:
    def bad(key: str, message: str) -> InvalidInput:
        return InvalidInput(f"input.options.{key}", message)

    if "ratio" in opts and opts["ratio"] not in spec.ratios:
        raise bad("ratio", f"{model} takes ratio {', '.join(spec.ratios)}")
    if "duration" in opts:
        value = opts["duration"]
        if isinstance(value, bool) or not isinstance(value, int) or value not in spec.durations:
            raise bad("duration", f"{model} takes duration {_durations(spec)} (an integer)")
    if "seed" in opts:
        value = opts["seed"]
        if not spec.seed:
            raise bad("seed", f"{model} takes no seed")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**32 - 1:
            raise bad("seed", "seed is an integer from 0 to 4294967295")
    for key in ("negativePrompt", "audio"):
        if key in opts and not spec.veo_extras:
            raise bad(key, f"{model} does not take {key}")
    if "audio" in opts and not isinstance(opts["audio"], bool):
        raise bad("audio", "audio is true or false")
    if "contentModeration" in opts:
        cm = opts["contentModeration"]
        if not isinstance(cm, dict) or cm.get("publicFigureThreshold", "auto") not in ("auto", "low"):
            raise bad("contentModeration", 'contentModeration is {"publicFigureThreshold": "auto" | "low"}')
    if "promptImage" in opts:
        image = opts["promptImage"]
        if isinstance(image, str):
            _check_asset_url("input.options.promptImage", image)
        elif isinstance(image, list) and image:
            positions = ("first", "last") if spec.veo_extras else ("first",)
            for i, item in enumerate(image):
                if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
                    raise bad(f"promptImage.{i}", "each image is {uri, position}")
                if item.get("position", "first") not in positions:
                    raise bad(f"promptImage.{i}.position", f"position is {' or '.join(positions)} for {model}")
                _check_asset_url(f"input.options.promptImage.{i}.uri", item["uri"])
        else:
            raise bad("promptImage", "promptImage is a URI or a list of {uri, position}")


def _check_asset_url(field: str, uri: str) -> None:
    """Runway fetches HTTPS URLs on a host name (not an IP); data: and runway:// URIs also work."""
    if uri.startswith(("data:image/", "runway://")):
        return
    parts = urlsplit(uri)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInput(field, "Runway fetches images over HTTPS only (or takes a data:image URI)")
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return
    raise InvalidInput(field, "Runway needs an image URL on a host name, not an IP address")


def _ratio_numbers(ratio: str) -> tuple[int, int]:
    w, _, h = ratio.partition(":")
    return int(w), int(h)


def _same_shape(ratio: str, aspect: str) -> bool:
    w, h = _ratio_numbers(ratio)
    a, b = _ratio_numbers(aspect)
    if not (w and h and a and b):
        return False
    return abs((w / h) / (a / b) - 1) < 0.03


def _shape_name(ratio: str) -> str:
    w, h = _ratio_numbers(ratio)
    for name in ("16:9", "9:16", "4:3", "3:4", "1:1", "21:9", "5:3", "3:5"):
        if _same_shape(ratio, name):
            return name
    return ratio


def _tier(ratio: str) -> str:
    """Runway's output tier of a pixel ratio (Gen-4's 720p family includes 1104:832, 960:960 ...)."""
    return "1080p" if max(_ratio_numbers(ratio)) >= 1920 else "720p"


def _durations(spec: ModelSpec) -> str:
    d = spec.durations
    if len(d) > 3 and list(d) == list(range(d[0], d[-1] + 1)):
        return f"{d[0]} to {d[-1]}"
    return " or ".join(str(x) for x in d)


# -- the adapter ------------------------------------------------------------------------

class RunwayTask(TaskState):
    """The endpoint that created the task (kept for support requests; Runway reads every task at one URL)."""

    endpoint: str | None = None


class RunwayProvider(Provider):
    name = "runway"
    default_base_url = "https://api.dev.runwayml.com"
    default_typical_seconds = {"video": 60}
    kinds = frozenset({MediaKind.video})
    supports_cancel = True
    supports_callbacks = False
    retention = "output URLs expire within 24-48 hours (fetching the task again mints fresh ones)"

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        version = str(self.settings.extra.get("version") or API_VERSION)
        return {"Authorization": f"Bearer {ctx.api_key}", "X-Runway-Version": version, "User-Agent": "atelier"}

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        runway_request(request.model, request.input)

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        endpoint, body = runway_request(request.model, request.input)
        url = f"{self.base_url}/v1/{endpoint}"
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True)
        _raise_for_status(response, creates=True)
        created = expect_object(parse_json(response), "task")
        task_id = created.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("Runway created a task without an id", detail=created)
        return SubmitResult(task_id=task_id, request_id=response.headers.get("apigw-requestid"),
                            state=RunwayTask(endpoint=endpoint))

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/v1/tasks/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        _raise_for_status(response, creates=False)
        body = expect_object(parse_json(response), "task")
        status = parse_task(body)
        if status.state in ("succeeded", "failed", "canceled"):
            status.usage = charged(body, self.settings.extra.get("usd_per_credit", USD_PER_CREDIT))
        return status

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        url = f"{self.base_url}/v1/tasks/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("DELETE", url, headers=self._headers(ctx)))
        try:
            _raise_for_status(response, creates=False)
        except TaskNotFound:
            return True  # already gone at Runway: nothing is running there
        return True

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Runway has neither idempotency keys nor a task list: an ambiguous create cannot be found."""
        return None


def charged(task: dict[str, Any], usd_per_credit: Any) -> Usage | None:
    """What a finished task says it charged: ``cost.credits`` (the runwayml SDK's task types: 0 when
    fully refunded), in USD at ``usd_per_credit``."""
    cost = task.get("cost")
    return usage(cost=credits_in_usd(cost.get("credits"), usd_per_credit)) if isinstance(cost, dict) else None


def parse_task(task: dict[str, Any]) -> TaskStatus:
    raw = task.get("status")
    if not isinstance(raw, str):
        raise MalformedResponse("Runway task has no status", detail={"body_excerpt": str(task)[:300]})
    state = _STATES.get(raw)
    if state is None:
        log.warning("runway: unknown task status %r; treating it as still in progress", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw)
    if raw == "RUNNING":
        progress = task.get("progress")
        if isinstance(progress, int | float) and not isinstance(progress, bool):
            status.progress = max(0, min(100, round(progress * 100)))
    elif state == "succeeded":
        output = task.get("output")
        urls = [u for u in output if isinstance(u, str) and u] if isinstance(output, list) else []
        status.progress = 100
        status.outputs = [ProviderOutput(url=u) for u in urls]
        if not urls:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = "Runway reported success without output URLs"
    elif state == "failed":
        code = task.get("failureCode")
        failure = str(task.get("failure") or "Runway reported the task failed")
        status.error_code = ("provider_content_filtered" if isinstance(code, str) and code.startswith("SAFETY")
                             else "provider_failed")
        status.error_message = f"{failure} ({code})" if code else failure
        status.error_detail = {"failure": task.get("failure"), "failureCode": code}
    elif state == "canceled":
        status.error_code = "provider_canceled"
        status.error_message = "Runway reports the task was cancelled or deleted"
    return status


def _raise_for_status(response: httpx.Response, *, creates: bool) -> None:
    if response.status_code < 400:
        return
    detail = _error_body(response)
    message = str(detail.get("error") or "")
    if response.status_code == 400:
        if "credit" in message.lower():
            raise InsufficientBalance(f"Runway: {message}", detail=detail, status_code=400)
        raise Rejected(f"Runway refused the request: {message}", code="provider_rejected_input", detail=detail,
                       status_code=400)
    raise_for_common_status(response, creates=creates, detail=detail)


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """Runway errors are ``{"error": "<human text>"}`` (plus ``issues`` on validation errors)."""
    try:
        body = response.json()
    except ValueError:
        return {"body_excerpt": response.text[:300]}
    return body if isinstance(body, dict) else {"body": body}
