"""Midjourney through the midjourney-proxy API, as new-api gateways (and the proxies themselves) serve it.

There is no official Midjourney API: gateways front a midjourney-proxy (plus / trueai flavour, the
one with ``buttons``) that drives Discord accounts. The base URL is the gateway's origin (plus any
path prefix, e.g. ``.../mj-fast`` for a speed mode); there is no default. Auth: the key in both
``Authorization: Bearer`` (gateways) and ``mj-api-secret`` (a proxy reached directly), or only one
of them with ``extra["auth"]`` = ``bearer`` / ``mj-api-secret``. References: shared/providers
images-wave2.md §8 and replicate-fal-suno-gateways.md §4.2.

Submissions (one model, ``midjourney``; ``options.botType`` MID_JOURNEY or NIJI_JOURNEY):

* ``generate`` -> ``POST /mj/submit/imagine {prompt, base64Array, botType, notifyHook, state}``.
  The common fields become prompt parameters (``aspect_ratio`` -> ``--ar``, ``negative_prompt`` ->
  ``--no``, ``seed`` -> ``--seed``); ``image_url`` and ``options.images`` (image prompts) are
  fetched through the destination guard and sent inline as data URLs. The result is one 2x2 grid.
* Follow-ups on a finished task (``source`` = that job), submitted as ``POST /mj/submit/action
  {taskId, customId}`` with the button the source task offered (its ``buttons`` are kept in the
  job's state when it succeeds): ``upscale`` (grid: ``options.index`` 1-4 = U1-U4; an upscaled
  image: ``options.type`` subtle|creative), ``variation`` (grid: ``options.index``; an upscaled
  image: ``options.strength`` strong|subtle), ``reroll``, ``zoom_out`` (upscaled image:
  ``options.zoom`` 2 or 1.5; another zoom in [1, 2] or a prompt is a Custom Zoom) and ``pan``
  (upscaled image: ``options.direction`` left|right|up|down). A prompt on ``variation``, ``reroll``
  or ``pan`` (or ``options.remix``) asks for remix (``enableRemix``).
* ``describe`` -> ``POST /mj/submit/describe {base64}`` (the source's image, or ``image_url``);
  its outputs are the suggested prompts, one ``text/plain`` output each.
* ``blend`` -> ``POST /mj/submit/blend {base64Array: 2-5, dimensions}`` (the source's image, then
  ``image_url``, then ``options.images``; ``options.dimensions`` or ``aspect_ratio`` 2:3/1:1/3:2).
* ``swap_face`` -> ``POST /mj/insight-face/swap {sourceBase64, targetBase64}``: the face of
  ``options.face`` (an image URL) onto the source's image or ``image_url``.

Submit answers ``{code, description, result, properties}``, usually HTTP 200 whatever the code
(trueai: 400/404): 1 submitted and 22 queued at the proxy are accepted; 21 is either an existing
task (the same upscale again: ``result`` is that task) or "Waiting for window confirm": the child
needs the **modal** step, which the adapter sends at once (``POST /mj/submit/modal {taskId,
prompt?}``). new-api rewrites 21/22 to 1, hiding the modal step: a task polled in ``MODAL`` gets
its modal then (once: ``modal`` in the task's state). 23 (the account's queue is full) waits as
throttled; 24 (banned prompt) fails ``content_policy`` naming ``properties.bannedWord``; 3, 4 and
others are refusals. Gateway errors are ``{description, type: "upstream_error", code}`` (429:
saturated) or OpenAI-style ``{"error": {...}}`` (auth, quota).

Polls: ``GET /mj/task/{id}/fetch``, and ``POST /mj/task/list-by-condition {"ids": [...]}`` (a bare
array, unknown ids omitted) for grouped polls (``fetch_many``, ``extra["batch_fetch_size"]``).
Statuses ``""`` (the gateway's row before its first refresh), ``NOT_START``, ``SUBMITTED`` ->
queued; ``IN_PROGRESS``, ``MODAL`` -> running; ``SUCCESS`` -> succeeded (``imageUrl``; describe:
``properties.finalPrompt``); ``FAILURE`` -> failed (``failReason``; moderation wording ->
``content_policy``, "任务超时" -> ``provider_gateway_timeout``). Progress is ``"NN%"``.

Callbacks: ``notifyHook`` = our per-job URL (token-authenticated; the proxy signs nothing), a POST
of the task object on each change; only hints, and early ones: the proxy calls before the gateway's
row has changed, so a callback pulls the next poll forward but polls keep their usual pace. new-api
strips ``notifyHook`` unless its admin enabled it; ``extra["notify_hook"] = false`` sends none. No
cancel, and no way to find a task by anything but its id: an ambiguous submission fails
``provider_outcome_unknown``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict

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
    TaskState,
    TaskStatus,
)
from providers.errors import (
    AuthFailed,
    CallbackRejected,
    InsufficientBalance,
    InvalidInput,
    MalformedResponse,
    ProviderError,
    RateLimited,
    Rejected,
    TaskNotFound,
    Unavailable,
)
from providers.http import (
    expect_object,
    fetch_input,
    gateway_quota_exhausted,
    parse_json,
    raise_for_common_status,
    retry_after_seconds,
    send,
    sniff_image,
)

log = logging.getLogger(__name__)

MODEL = "midjourney"
BOT_TYPES = ("MID_JOURNEY", "NIJI_JOURNEY")
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PROMPTS = 5
AUTH_MODES = ("both", "bearer", "mj-api-secret")

_STATES: dict[str, ProviderState] = {
    "": "queued", "NOT_START": "queued", "SUBMITTED": "queued",
    "IN_PROGRESS": "running", "MODAL": "running",
    "SUCCESS": "succeeded", "FAILURE": "failed",
}
# Midjourney's and the proxies' refusal wording ("Banned prompt detected", "Request cancelled due to
# image filters", "...against our community standards", 敏感词/违规).
_REFUSAL = re.compile(r"banned|sensitive|image filter|moderat|community (standards|guidelines)|not allowed|"
                      r"blocked|敏感|违规|违禁", re.IGNORECASE)
_TIMEOUT = re.compile(r"任务超时|timed? ?out", re.IGNORECASE)
# Common field -> (Midjourney parameter, how a prompt already sets it).
_PARAM = {"aspect_ratio": ("--ar", re.compile(r"(^|\s)--(ar|aspect)\b")),
          "negative_prompt": ("--no", re.compile(r"(^|\s)--no\b")),
          "seed": ("--seed", re.compile(r"(^|\s)--seed\b"))}
_ZOOM_FLAG = re.compile(r"\s*--zoom\s+\S+")
_NUMBERED = re.compile(r"^\s*(?:[1-9]\ufe0f?\u20e3|\d+[.)])\s*")

# -- buttons ------------------------------------------------------------------------------------
# A follow-up is one of the source task's buttons; group 1 is what the option picks among them.
_UPSCALE_GRID = re.compile(r"^MJ::JOB::upsample::([1-4])::")
_UPSCALE_SINGLE = re.compile(r"^MJ::JOB::upsample_v\d+_2x_(subtle|creative)::")
_VARIATION_GRID = re.compile(r"^MJ::JOB::variation::([1-4])::")
_VARIATION_SINGLE = re.compile(r"^MJ::JOB::(high|low)_variation::")
_REROLL = re.compile(r"^MJ::JOB::(reroll)::")
_ZOOM = re.compile(r"^MJ::Outpaint::(50|75)::")
_CUSTOM_ZOOM = re.compile(r"^MJ::(CustomZoom)::")
_PAN = re.compile(r"^MJ::JOB::pan_(left|right|up|down)::")
_STRENGTH = {"strong": "high", "subtle": "low"}
_ZOOM_BUTTON = {2.0: "50", 1.5: "75"}

# Options per operation (anything else is refused, naming it).
_OPTIONS: dict[str, frozenset[str]] = {
    "generate": frozenset({"botType", "images"}),
    "upscale": frozenset({"index", "type"}),
    "variation": frozenset({"index", "strength", "remix"}),
    "reroll": frozenset({"remix"}),
    "zoom_out": frozenset({"zoom"}),
    "pan": frozenset({"direction", "remix"}),
    "describe": frozenset({"botType"}),
    "blend": frozenset({"botType", "images", "dimensions"}),
    "swap_face": frozenset({"face"}),
}
_PROMPTED = frozenset({"generate", "variation", "reroll", "zoom_out", "pan"})
_WITH_IMAGE = frozenset({"generate", "describe", "blend", "swap_face"})
_DIMENSIONS = {"2:3": "PORTRAIT", "1:1": "SQUARE", "3:2": "LANDSCAPE"}

_IMAGE = frozenset({MediaKind.image})
OPERATIONS = (
    Operation("upscale", source="task", source_kinds=_IMAGE,
              description="U1-U4 of a grid (options.index), or Upscale (Subtle/Creative) of an upscaled image"),
    Operation("variation", source="task", source_kinds=_IMAGE,
              description="V1-V4 of a grid (options.index), or Vary (Strong/Subtle) of an upscaled image"),
    Operation("reroll", source="task", source_kinds=_IMAGE, description="the grid's prompt rendered again"),
    Operation("zoom_out", source="task", source_kinds=_IMAGE,
              description="Zoom Out 2x/1.5x of an upscaled image (options.zoom), or a Custom Zoom"),
    Operation("pan", source="task", source_kinds=_IMAGE,
              description="extends an upscaled image (options.direction left/right/up/down)"),
    Operation("describe", source="optional_media", source_kinds=_IMAGE,
              description="four suggested prompts for an image (text/plain outputs)"),
    Operation("blend", source="optional_media", source_kinds=_IMAGE, description="2-5 images blended"),
    Operation("swap_face", source="optional_media", source_kinds=_IMAGE,
              description="the face of options.face onto the image (insight-face)"),
)
# The task action each operation starts (as the proxy names it).
_ACTION_OF = {"generate": "IMAGINE", "describe": "DESCRIBE", "blend": "BLEND", "swap_face": "SWAP_FACE",
              "upscale": "UPSCALE", "variation": "VARIATION", "reroll": "REROLL", "zoom_out": "ZOOM", "pan": "PAN"}


class MjButton(BaseModel):
    """One of a finished task's buttons (a Discord component: its ``customId`` is task-specific)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    custom_id: str
    label: str = ""
    emoji: str = ""


class MidjourneyTask(TaskState):
    """The task's action, its buttons once it succeeded (what follow-ups act on), and the modal step:
    ``pending`` when the child waits for it, ``sent`` once it was sent (it is sent only once)."""

    action: str | None = None
    buttons: list[MjButton] | None = None
    modal: Literal["pending", "sent"] | None = None
    final_prompt: str | None = None


class Plan(BaseModel):
    """A validated request: the route and body to submit (images still as URLs to fetch)."""

    model_config = ConfigDict(frozen=True)

    route: str
    body: dict[str, Any]
    images: list[str] = []  # fetched and inlined: base64Array, or base64 / targetBase64 + sourceBase64


class MidjourneyProvider(Provider):
    name = "midjourney"
    kinds = frozenset({MediaKind.image})
    default_base_url = ""  # no official API: a gateway's (or a proxy's) origin must be configured
    default_typical_seconds = {"image": 60}
    supports_cancel = False
    supports_callbacks = True
    callback_auth = "token"
    retention = ("the gateway's /mj/image proxy while the proxy keeps the file (raw Discord CDN links expire "
                 "after about 24 h); tasks kept 30 days by the default proxy store")
    operations = OPERATIONS

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        extra = settings.extra
        self.auth = str(extra.get("auth") or "both")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"[providers.midjourney] extra.auth must be one of {', '.join(AUTH_MODES)}, "
                             f"not {self.auth!r}")
        self.notify_hook = bool(extra.get("notify_hook", True))
        self.batch_fetch_size = max(1, int(extra.get("batch_fetch_size", 50)))

    @property
    def fetch_group_size(self) -> int:
        return self.batch_fetch_size

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"User-Agent": "atelier"}
        if self.auth in ("both", "bearer"):
            headers["Authorization"] = f"Bearer {ctx.api_key}"
        if self.auth in ("both", "mj-api-secret"):
            headers["mj-api-secret"] = ctx.api_key
        return headers

    # -- validation ---------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        plan(request)

    # -- submit -------------------------------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        p = plan(request)
        body = dict(p.body)
        if p.images:
            inline = [await _fetch_image(ctx, url) for url in p.images]
            if p.route == "/mj/submit/describe":
                body["base64"] = inline[0]
            elif p.route == "/mj/insight-face/swap":
                body["targetBase64"], body["sourceBase64"] = inline
            else:
                body["base64Array"] = inline
        if ctx.callback_url and self.notify_hook:
            body["notifyHook"] = ctx.callback_url
        if request.reference:
            body["state"] = request.reference
        answer = await self._submit(ctx, p.route, body)
        task_id = answer.get("result")
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise MalformedResponse("the proxy accepted the submission without a task id",
                                    detail=_excerpt(answer))
        task_id, code = str(task_id), answer["code"]
        properties = _obj(answer.get("properties"))
        action = _ACTION_OF.get(request.operation)
        if code == 21 and _needs_modal(answer):
            final = properties.get("finalPrompt")
            final = final if isinstance(final, str) and final else None
            try:
                sent = await self._confirm(ctx, request, task_id, final)
            except ProviderError as exc:
                if isinstance(exc, Rejected) and not isinstance(exc, AuthFailed | InsufficientBalance):
                    raise  # refused (a banned word in the remix prompt...): the child never runs nor bills
                # The child exists: follow it; the polls send the modal step when they see it waiting.
                log.warning("midjourney: the modal step of task %s did not go through (%s); sent when polled",
                            task_id, exc.message)
                sent = False
            state = MidjourneyTask(action=action, modal="sent" if sent else "pending", final_prompt=final)
            return SubmitResult(task_id=task_id, status="MODAL", state=state, callback_expected=False)
        status = {1: "SUBMITTED", 22: "NOT_START"}.get(code, str(properties.get("status") or "SUBMITTED"))
        # The hook runs ahead of the gateway's row (a poll it triggers may read the old status): it
        # only pulls polls forward, so they keep their usual pace (``callback_expected`` False).
        return SubmitResult(task_id=task_id, status=status, state=MidjourneyTask(action=action),
                            callback_expected=False)

    async def _submit(self, ctx: CallContext, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """One submit route: the accepted answer (codes 1, 21, 22), or the error it stands for."""
        request = ctx.http.build_request("POST", f"{self.base_url}{route}", json=body, headers=self._headers(ctx))
        response = await send(ctx.http, request, creates=True, timeout=ctx.timeout)
        answer = expect_object(_answer(response, creates=True), "submit answer")
        raise_for_code(answer, response)
        return answer

    async def _confirm(self, ctx: CallContext, request: GenerationRequest, task_id: str,
                       final_prompt: str | None) -> bool:
        """Send the modal step of a child that waits for it (``True``); raises what went wrong. A
        second one is refused by the proxy ("关联任务状态错误"): the first went through, so that is
        success too (a resend after an unknown outcome never runs the task twice)."""
        body: dict[str, Any] = {"taskId": task_id}
        prompt = modal_prompt(request, final_prompt)
        if prompt is not None:
            body["prompt"] = prompt
        if ctx.callback_url and self.notify_hook:
            body["notifyHook"] = ctx.callback_url
        try:
            await self._submit(ctx, "/mj/submit/modal", body)
        except Rejected as exc:
            if _obj(exc.detail).get("description") != "关联任务状态错误":
                raise
        return True

    # -- fetch --------------------------------------------------------------------------------
    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/mj/task/{task.task_id}/fetch"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        row = expect_object(_answer(response, creates=False), "task")
        return await self._status(ctx, task, row)

    async def fetch_many(self, ctx: CallContext, tasks: list[TaskRef]) -> dict[str, TaskStatus]:
        """``POST /mj/task/list-by-condition`` in chunks; a task absent from the answer (unknown, another
        key's), unreadable or whose modal step failed is left out: it is then polled on its own."""
        refs = {t.task_id: t for t in tasks}
        ids = list(refs)
        result: dict[str, TaskStatus] = {}
        for start in range(0, len(ids), self.batch_fetch_size):
            chunk = ids[start:start + self.batch_fetch_size]
            request = ctx.http.build_request("POST", f"{self.base_url}/mj/task/list-by-condition",
                                             json={"ids": chunk}, headers=self._headers(ctx))
            rows = _answer(await send(ctx.http, request), creates=False)
            if not isinstance(rows, list):
                raise MalformedResponse("list-by-condition did not answer a list", detail=_excerpt(rows))
            for row in rows:
                task_id = str(row.get("id")) if isinstance(row, dict) else ""
                if task_id not in refs or task_id not in chunk:
                    continue
                try:
                    result[task_id] = await self._status(ctx, refs[task_id], row)
                except ProviderError as exc:
                    log.warning("midjourney: task %s in a grouped poll: %s", task_id, exc.message)
        return result

    async def _status(self, ctx: CallContext, task: TaskRef, row: dict[str, Any]) -> TaskStatus:
        """The row, translated; a child waiting in ``MODAL`` whose modal step was not sent yet (new-api
        hid the "Waiting for window confirm" answer, or sending it failed at submit) gets it now."""
        status = parse_task(row, task.request.operation)
        state = MidjourneyTask.of(task)
        if status.raw_status.upper() == "MODAL" and state.modal != "sent":
            final = state.final_prompt or row.get("promptEn") or row.get("prompt")
            await self._confirm(ctx, task.request, task.task_id, final if isinstance(final, str) and final else None)
            status.task_state = MidjourneyTask(modal="sent")
        return status

    # -- callbacks ----------------------------------------------------------------------------
    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """The proxy signs nothing: the per-job token in the URL authenticates (checked by the API); this
        only reads which task the body is about."""
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise CallbackRejected("Midjourney notifyHook body is not JSON") from exc
        task_id = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise CallbackRejected("Midjourney notifyHook body is not a task object")
        raw = obj.get("status")
        return CallbackHint(task_id=str(task_id), raw_status=raw if isinstance(raw, str) else None)


# -- requests -------------------------------------------------------------------------------------

def plan(request: GenerationRequest) -> Plan:
    """What to submit for ``request``; raises ``InvalidInput`` naming the field."""
    if request.model != MODEL:
        raise InvalidInput("model", f"the Midjourney model is {MODEL!r} (options.botType picks "
                                    f"{' or '.join(BOT_TYPES)})")
    op, given = request.operation, request.input
    options = given.options
    for key in options:
        if key not in _OPTIONS[op]:
            allowed = ", ".join(sorted(_OPTIONS[op])) or "none"
            raise InvalidInput(f"input.options.{key}", f"not an option of {op} (options: {allowed})")
    for name in ("duration_seconds", "resolution"):
        if getattr(given, name) is not None:
            raise InvalidInput(f"input.{name}", "Midjourney renders images; set the size with aspect_ratio")
    if given.num_outputs not in (None, 1):
        raise InvalidInput("input.num_outputs", "Midjourney renders one 2x2 grid per imagine; "
                                                "upscale picks one of its four images")
    if op != "generate":
        for name in ("negative_prompt", "seed"):
            if getattr(given, name) is not None:
                raise InvalidInput(f"input.{name}", f"{op} takes no {name} (it goes in an imagine prompt)")
    if given.prompt is not None and op not in _PROMPTED:
        raise InvalidInput("input.prompt", f"{op} takes no prompt")
    if given.image_url is not None and op not in _WITH_IMAGE:
        raise InvalidInput("input.image_url", f"{op} acts on the source task's image")
    if given.aspect_ratio is not None and op not in ("generate", "blend"):
        raise InvalidInput("input.aspect_ratio", f"{op} keeps the source's aspect ratio")
    bot = options.get("botType", "MID_JOURNEY")
    if bot not in BOT_TYPES:
        raise InvalidInput("input.options.botType", f"one of {', '.join(BOT_TYPES)}")
    if op == "generate":
        images = ([given.image_url] if given.image_url else []) + _urls(options, "images")
        if len(images) > MAX_IMAGE_PROMPTS:
            raise InvalidInput("input.options.images", f"at most {MAX_IMAGE_PROMPTS} image prompts in all")
        return Plan(route="/mj/submit/imagine", body={"prompt": imagine_prompt(given), "botType": bot},
                    images=images)
    source = request.source
    if op not in ("describe", "blend", "swap_face"):
        return _action(request)
    if source is not None and not (source.output_content_type or "image/").startswith("image/"):
        raise InvalidInput("source", f"{op} takes an image; the source output is {source.output_content_type}")
    if op == "blend":
        return _blend(request, bot)
    # describe and swap_face act on one image: the source's (its URL is minted when the follow-up is
    # validated and again when it is submitted) or image_url.
    if source is not None and given.image_url:
        raise InvalidInput("input.image_url", f"{op} takes one image: the source's or image_url")
    image = given.image_url or (source.url if source is not None else None)
    if source is None and image is None:
        raise InvalidInput("input.image_url", f"{op} needs an image: a source job or image_url")
    images = [image] if image else []
    if op == "describe":
        return Plan(route="/mj/submit/describe", body={"botType": bot}, images=images)
    face = _urls(options, "face", single=True)
    if not face:
        raise InvalidInput("input.options.face", "the URL of the image whose face is swapped in")
    return Plan(route="/mj/insight-face/swap", body={}, images=images + face)


def imagine_prompt(given: MediaInput) -> str:
    """The prompt with the common fields as Midjourney parameters (refused if the prompt sets them too)."""
    prompt = (given.prompt or "").strip()
    if not prompt:
        raise InvalidInput("input.prompt", "imagine needs a prompt")
    suffix = []
    if given.aspect_ratio is not None:
        if not re.fullmatch(r"[1-9]\d{0,2}:[1-9]\d{0,2}", given.aspect_ratio):
            raise InvalidInput("input.aspect_ratio", "W:H in whole numbers, e.g. 16:9")
        suffix.append(f"--ar {given.aspect_ratio}")
    if given.negative_prompt is not None:
        suffix.append(f"--no {given.negative_prompt.strip()}")
    if given.seed is not None:
        if not 0 <= given.seed <= 4294967295:
            raise InvalidInput("input.seed", "Midjourney seeds are 0-4294967295")
        suffix.append(f"--seed {given.seed}")
    for name, (flag, pattern) in _PARAM.items():
        if getattr(given, name) is not None and pattern.search(prompt):
            raise InvalidInput(f"input.{name}", f"the prompt already has {flag}: give it once")
    return " ".join([prompt, *suffix])


def _urls(options: Mapping[str, Any], name: str, *, single: bool = False) -> list[str]:
    where = f"input.options.{name}"
    value = options.get(name)
    if value is None:
        return []
    values = [value] if single else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.startswith(("https://", "http://"))
                                               for v in values):
        what = "an http(s) image URL" if single else "a list of http(s) image URLs"
        raise InvalidInput(where, what)
    return list(values)


def _blend(request: GenerationRequest, bot: str) -> Plan:
    given = request.input
    images = [request.source.url or ""] if request.source is not None else []
    images += ([given.image_url] if given.image_url else []) + _urls(given.options, "images")
    if not 2 <= len(images) <= MAX_IMAGE_PROMPTS:
        raise InvalidInput("input.options.images", f"blend takes 2-{MAX_IMAGE_PROMPTS} images in all (the "
                                                   f"source's, image_url, options.images); {len(images)} given")
    dimensions = given.options.get("dimensions")
    if dimensions is not None and given.aspect_ratio is not None:
        raise InvalidInput("input.aspect_ratio", "give either aspect_ratio or options.dimensions")
    if given.aspect_ratio is not None:
        if given.aspect_ratio not in _DIMENSIONS:
            raise InvalidInput("input.aspect_ratio", f"blend renders {', '.join(_DIMENSIONS)}")
        dimensions = _DIMENSIONS[given.aspect_ratio]
    if dimensions is not None and dimensions not in _DIMENSIONS.values():
        raise InvalidInput("input.options.dimensions", f"one of {', '.join(_DIMENSIONS.values())}")
    return Plan(route="/mj/submit/blend", body={"botType": bot, "dimensions": dimensions or "SQUARE"},
                images=[i for i in images if i])


def _action(request: GenerationRequest) -> Plan:
    """A follow-up on the source task: the button it offered for what was asked."""
    op, given, source = request.operation, request.input, request.source
    options = given.options
    if source is None or not source.task_id:
        raise InvalidInput("source", f"{op} acts on an earlier Midjourney job: give source.job_id")
    buttons = MidjourneyTask.model_validate(source.state).buttons or []
    if not buttons:
        raise InvalidInput("source", "the source task has no buttons to act on (not a finished Midjourney "
                                     "image task)")
    remix = options.get("remix")
    if remix is not None and not isinstance(remix, bool):
        raise InvalidInput("input.options.remix", "true or false")
    if remix is False and given.prompt is not None:
        raise InvalidInput("input.prompt", "a new prompt needs remix (options.remix false was given)")
    if op == "upscale":
        custom_id = _indexed(buttons, options, _UPSCALE_GRID, _UPSCALE_SINGLE, "type", ("subtle", "creative"),
                             {"subtle": "subtle", "creative": "creative"}, "an upscaled image")
    elif op == "variation":
        custom_id = _indexed(buttons, options, _VARIATION_GRID, _VARIATION_SINGLE, "strength",
                             tuple(_STRENGTH), _STRENGTH, "an upscaled image")
    elif op == "reroll":
        custom_id = _one(buttons, _REROLL, "reroll", "source", "reroll acts on a grid (the source has no 🔄 button)")
    elif op == "pan":
        direction = options.get("direction")
        if direction not in ("left", "right", "up", "down"):
            raise InvalidInput("input.options.direction", "left, right, up or down")
        custom_id = _one(buttons, _PAN, str(direction), "input.options.direction",
                         "pan acts on an upscaled image: the source has no pan buttons (upscale it first)")
    else:  # zoom_out
        zoom = options.get("zoom", 2)
        if isinstance(zoom, bool) or not isinstance(zoom, int | float) or not 1.0 <= zoom <= 2.0:
            raise InvalidInput("input.options.zoom", "a number from 1 to 2 (2 and 1.5 are Zoom Out 2x/1.5x)")
        if float(zoom) in _ZOOM_BUTTON and given.prompt is None:
            custom_id = _one(buttons, _ZOOM, _ZOOM_BUTTON[float(zoom)], "source",
                             "zoom out acts on an upscaled image: the source has no Zoom Out buttons")
        else:
            custom_id = _one(buttons, _CUSTOM_ZOOM, "CustomZoom", "source",
                             "zoom out acts on an upscaled image: the source has no Custom Zoom button")
    body: dict[str, Any] = {"taskId": source.task_id, "customId": custom_id}
    if op in ("variation", "reroll", "pan") and (remix or given.prompt is not None):
        body["enableRemix"] = True
    return Plan(route="/mj/submit/action", body=body)


def _find(buttons: list[MjButton], pattern: re.Pattern[str]) -> dict[str, str]:
    """The buttons matching ``pattern``, by what group 1 says (first one wins)."""
    found: dict[str, str] = {}
    for button in buttons:
        m = pattern.match(button.custom_id)
        if m is not None:
            found.setdefault(m.group(1), button.custom_id)
    return found


def _one(buttons: list[MjButton], pattern: re.Pattern[str], key: str, field: str, missing: str) -> str:
    found = _find(buttons, pattern)
    if key not in found:
        raise InvalidInput(field, missing if not found else f"the source has no such button "
                                                            f"(it offers {', '.join(sorted(found))})")
    return found[key]


def _indexed(buttons: list[MjButton], options: Mapping[str, Any], grid_pattern: re.Pattern[str],
             single_pattern: re.Pattern[str], kind_option: str, kinds: tuple[str, ...],
             kind_button: dict[str, str], single_name: str) -> str:
    """U/V of a grid by ``options.index``, or the upscaled image's button by ``options.<kind_option>``."""
    index, kind = options.get("index"), options.get(kind_option)
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 4):
        raise InvalidInput("input.options.index", "1-4: the image of the grid (1 top left, 2 top right, 3, 4)")
    if kind is not None and kind not in kinds:
        raise InvalidInput(f"input.options.{kind_option}", f"one of {', '.join(kinds)}")
    grid, single = _find(buttons, grid_pattern), _find(buttons, single_pattern)
    if grid:
        if kind is not None:
            raise InvalidInput(f"input.options.{kind_option}", f"only for {single_name}; the source is a grid")
        if index is None:
            raise InvalidInput("input.options.index", "the source is a grid of four: options.index (1-4) "
                                                      "picks the image")
        if str(index) not in grid:
            raise InvalidInput("input.options.index", f"the source has no button for image {index}")
        return grid[str(index)]
    if index is not None:
        raise InvalidInput("input.options.index", f"the source has no button with an index (it is {single_name}, "
                                                  "not a grid)")
    wanted = kind_button[kind or kinds[0]]
    if wanted not in single:
        raise InvalidInput(f"input.options.{kind_option}" if kind else "source",
                           "the source task offers no such button")
    return single[wanted]


def modal_prompt(request: GenerationRequest, final_prompt: str | None) -> str | None:
    """The modal step's prompt: the follow-up's (remix), or the task's with ``--zoom`` for a Custom
    Zoom; ``None`` keeps the task's prompt."""
    prompt = request.input.prompt
    if request.operation != "zoom_out":
        return prompt
    zoom = request.input.options.get("zoom", 2)
    base = _ZOOM_FLAG.sub("", prompt or final_prompt or "").strip()
    return f"{base} --zoom {float(zoom):g}".strip()


async def _fetch_image(ctx: CallContext, url: str) -> str:
    """An input image, downloaded (bounded, destination-guarded) and inlined as a data URL: nothing
    is created at the provider if this fails."""
    data = (await fetch_input(ctx, url, max_bytes=MAX_IMAGE_BYTES, code="input_image_unavailable"))[0]
    mime = sniff_image(data[:16], ("image/png", "image/jpeg", "image/webp", "image/gif"))
    if mime is None:
        raise Rejected("the input image is not a PNG, JPEG, WebP or GIF file", code="input_image_unavailable")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- answers --------------------------------------------------------------------------------------

def _answer(response: httpx.Response, *, creates: bool) -> Any:
    """The JSON body, with every error shape mapped: gateway errors ``{description, type, code}``,
    OpenAI-style ``{"error": {...}}`` and bare statuses. Proxy submit answers (any HTTP status:
    trueai sends 400/404 with a ``code``) come back for ``raise_for_code``."""
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, RecursionError):
        raise_for_common_status(response, creates=creates, detail={"body_excerpt": response.text[:200]})
        return parse_json(response)  # a 2xx that is not JSON: MalformedResponse
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        message = str(error.get("message") or "")
        detail = {"error": {k: error.get(k) for k in ("message", "type", "code")}}
        if gateway_quota_exhausted(error.get("code"), message):
            raise InsufficientBalance(f"the gateway says the key's quota is used up ({message})", detail=detail,
                                      status_code=status)
        raise_for_common_status(response, creates=creates, detail=detail)
        raise Rejected(f"the gateway refused the request ({message})", detail=detail, status_code=status)
    if isinstance(body, dict) and body.get("type") == "upstream_error":
        raise _gateway_error(body, response, creates=creates)
    if isinstance(body, dict) and creates and isinstance(body.get("code"), int) and "description" in body:
        return body  # a proxy submit answer: the code decides
    raise_for_common_status(response, creates=creates, detail=_excerpt(body))
    return body


def _gateway_error(body: dict[str, Any], response: httpx.Response, *, creates: bool) -> ProviderError:
    """new-api's own Midjourney errors: ``{"description", "type": "upstream_error", "code"}``."""
    status = response.status_code
    description = str(body.get("description") or "").strip()
    detail = {"description": description, "code": body.get("code"), "http_status": status}
    if status == 429 or body.get("code") == 30:
        return RateLimited(f"the gateway is saturated ({description})",
                           retry_after=retry_after_seconds(response.headers), detail=detail, status_code=status)
    if gateway_quota_exhausted(body.get("code"), description):
        return InsufficientBalance(f"the gateway says the key's quota is used up ({description})", detail=detail,
                                   status_code=status)
    if not creates and "task_no_found" in description:
        return TaskNotFound(f"the gateway does not know this task ({description})", detail=detail,
                            status_code=status)
    if status == 400:
        return Rejected(f"the gateway refused the request ({description})", code="provider_rejected_input",
                        detail=detail, status_code=status)
    try:
        raise_for_common_status(response, creates=creates, detail=detail)
    except ProviderError as exc:
        exc.message = f"{exc.message}: {description}"
        return exc
    return MalformedResponse(f"the gateway answered an error with HTTP {status} ({description})", detail=detail)


def raise_for_code(answer: dict[str, Any], response: httpx.Response) -> None:
    """A proxy submit answer: 1, 21, 22 pass; the others are what nothing was created for."""
    code, description = answer.get("code"), str(answer.get("description") or "")
    properties = _obj(answer.get("properties"))
    detail = {"code": code, "description": description, "properties": properties}
    if code in (1, 21, 22):
        return
    if code == 23:
        raise RateLimited(f"the Midjourney account's queue is full ({description})",
                          retry_after=retry_after_seconds(response.headers), detail=detail, status_code=None)
    if code == 24:
        word = properties.get("bannedWord")
        named = f"the banned word {word!r}" if word else "a banned word"
        raise Rejected(f"Midjourney refused the prompt: it contains {named} ({description})", code="content_policy",
                       detail=detail)
    if code == 9:
        raise Unavailable(f"the Midjourney proxy failed to submit the task ({description})", detail=detail)
    if code == 4 and gateway_quota_exhausted(None, description):
        raise InsufficientBalance(f"the gateway says the key's quota is used up ({description})", detail=detail)
    if not isinstance(code, int) or isinstance(code, bool):
        raise MalformedResponse("the proxy's answer has no readable code", detail=_excerpt(answer))
    refused = "the task acted on is unknown to the proxy" if code == 3 else "the proxy refused the submission"
    raise Rejected(f"{refused} (code {code}: {description})", detail=detail,
                   code="provider_rejected_input" if code == 4 else "provider_rejected")


def _needs_modal(answer: dict[str, Any]) -> bool:
    """Code 21 is both "任务已存在" (an existing task) and "Waiting for window confirm" (the modal step)."""
    properties = _obj(answer.get("properties"))
    return properties.get("remix") is True or "window confirm" in str(answer.get("description") or "").lower()


def parse_task(row: dict[str, Any], operation: str = "generate") -> TaskStatus:
    """A task object (the gateway's row, or the proxy's own)."""
    raw = row.get("status")
    raw = "" if raw is None else raw
    if not isinstance(raw, str):
        raise MalformedResponse("the Midjourney task has no readable status", detail=_excerpt(row))
    state = _STATES.get(raw.upper())
    if state is None:
        log.warning("midjourney: unknown task status %r; still waiting", raw)
    status = TaskStatus(state=state or "unknown", raw_status=raw, progress=_percent(row.get("progress")))
    action = str(row.get("action") or _ACTION_OF.get(operation, ""))
    if state == "succeeded":
        status.progress = 100
        status.outputs = _outputs(row, action)
        status.task_state = MidjourneyTask(action=action or None, buttons=_buttons(row.get("buttons")))
        if not status.outputs:
            status.state = "failed"
            status.error_code = "provider_no_output"
            status.error_message = ("Midjourney's describe succeeded without any prompt" if action == "DESCRIBE"
                                    else "Midjourney reported success without an image")
    elif state == "failed":
        reason = str(row.get("failReason") or "").strip()
        status.error_code = ("content_policy" if _REFUSAL.search(reason)
                             else "provider_gateway_timeout" if _TIMEOUT.search(reason) else "provider_failed")
        status.error_message = f"Midjourney task failed: {reason}" if reason else "Midjourney reported the task failed"
        status.error_detail = {"status": raw, "failReason": reason or None, "action": action or None}
    return status


def _outputs(row: dict[str, Any], action: str) -> list[ProviderOutput]:
    meta = {k: v for k, v in {"action": action, "task_id": row.get("id")}.items() if v}
    if action == "DESCRIBE":
        text = _obj(row.get("properties")).get("finalPrompt") or row.get("promptEn") or row.get("prompt")
        prompts = [p for p in (_NUMBERED.sub("", p).strip() for p in str(text or "").split("\n\n")) if p]
        return [ProviderOutput(url="data:text/plain;base64," + base64.b64encode(p.encode()).decode(),
                               content_type="text/plain", metadata={**meta, "index": i})
                for i, p in enumerate(prompts, start=1)]
    url = row.get("imageUrl")
    prompt = row.get("promptEn") or row.get("prompt")
    if prompt:
        meta["prompt"] = prompt
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return [ProviderOutput(url=url, metadata=meta)]
    return []


def _buttons(value: Any) -> list[MjButton] | None:
    if not isinstance(value, list):
        return None
    return [MjButton(custom_id=b["customId"], label=str(b.get("label") or ""), emoji=str(b.get("emoji") or ""))
            for b in value if isinstance(b, dict) and isinstance(b.get("customId"), str) and b["customId"]]


def _percent(value: Any) -> int | None:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        return max(0, min(100, int(float(str(value).strip().rstrip("%")))))
    except ValueError:
        return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _excerpt(value: Any) -> dict[str, str]:
    return {"body_excerpt": json.dumps(value, default=str, ensure_ascii=False)[:300]}
