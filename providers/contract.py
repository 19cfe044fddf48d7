"""The provider contract: what an adapter is given, what it returns, and the base class.

``providers`` is a leaf: these small types are all an adapter sees of a job. The
orchestrator turns its stored job record into a ``GenerationRequest`` (what to
render) and a ``TaskRef`` (which task to follow, with the adapter's own state)
and never hands an adapter the record itself. What the worker keeps for its own
bookkeeping (when a submission started, retries, whether a callback is expected)
is none of an adapter's business, and an adapter's state is none of the worker's:
the worker stores ``SubmitResult.state`` verbatim and gives it back in ``TaskRef``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict

from providers.errors import CallbackRejected, InvalidInput


class MediaKind(StrEnum):
    image = "image"
    video = "video"
    audio = "audio"


@dataclass(frozen=True)
class MediaInput:
    """The common generation inputs (already validated by the API); ``options`` carries the
    provider's native parameters, which the adapter checks and passes through."""

    prompt: str | None = None
    negative_prompt: str | None = None
    image_url: str | None = None
    duration_seconds: float | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    seed: int | None = None
    num_outputs: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The common fields that are set (``options`` aside), in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "options" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SourceMedia:
    """The earlier job a follow-up acts on (``operation`` + ``source`` in the request).

    ``task_id``, ``state`` and ``output_metadata`` are what its provider said of it (only meaningful
    to the same adapter: Midjourney's buttons, a Suno clip id, a Kling video id); ``url`` is a URL of
    the stored output that any provider can fetch (minted when the follow-up is submitted; ``None``
    while a request is only validated).
    """

    provider: str
    model: str
    kind: MediaKind
    task_id: str | None = None
    state: Mapping[str, Any] = field(default_factory=dict)
    output_index: int = 0
    output_content_type: str | None = None
    output_metadata: Mapping[str, Any] = field(default_factory=dict)
    url: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What to render. ``reference`` is unique per job: an adapter may send it as the provider's
    external id (Kling's ``external_task_id``) so that an ambiguous submission can be looked up.
    ``operation`` is ``generate`` or one of the adapter's ``operations``; ``source`` the job it acts on."""

    kind: MediaKind
    model: str
    input: MediaInput = field(default_factory=MediaInput)
    reference: str = ""
    operation: str = "generate"
    source: SourceMedia | None = None


SourceUse = Literal["none", "optional_media", "media", "task"]


@dataclass(frozen=True)
class Operation:
    """A follow-up an adapter offers besides ``generate``.

    ``source``: what it takes from the source job. ``task``: the provider's own task (same provider;
    submitted with the key that created the source); ``media``: a stored output (any provider; its
    URL is in ``SourceMedia.url``); ``none``: no source. ``models``: fnmatch patterns of the models
    that offer it (all when empty).
    """

    name: str
    source: SourceUse = "task"
    source_kinds: frozenset[MediaKind] = frozenset()  # the source output kinds it takes (any when empty)
    models: tuple[str, ...] = ()
    description: str = ""

    def offered_for(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)



class TaskState(BaseModel):
    """An adapter's own record of a task (status URLs, the API family it was created in, ...).

    Each adapter subclasses it with typed fields; the worker stores it as a dict and never
    reads it. Unknown keys are ignored, so a record written by an older adapter still reads.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def of(cls, task: TaskRef) -> Self:
        return cls.model_validate(task.state)


@dataclass(frozen=True)
class TaskRef:
    """A task at the provider: its id, what was asked, and the adapter's state (see ``TaskState``)."""

    task_id: str
    request: GenerationRequest
    state: Mapping[str, Any] = field(default_factory=dict)


class ProviderOutput(BaseModel):
    """An output as the provider announced it (before Atelier stored it)."""

    url: str
    content_type: str | None = None
    metadata: dict[str, Any] = {}


@dataclass(frozen=True)
class SubmitResult:
    """The provider accepted the task. ``callback_expected`` is ``False`` when no callback will come
    whatever URL was given (e.g. through a gateway), ``None`` to go by whether one was given.

    ``done``: the task's status when the create call answered with it: a synchronous provider's
    outputs (``data:`` URLs for inline bytes, stored at once), or a task already finished.
    A synchronous provider with no id of its own uses ``request.reference`` as the task id.
    """

    task_id: str
    request_id: str | None = None
    status: str | None = None
    state: TaskState | None = None
    callback_expected: bool | None = None
    done: TaskStatus | None = None


ProviderState = Literal["queued", "running", "succeeded", "failed", "canceled", "unknown"]


@dataclass
class Usage:
    """What the provider reported a task used, as far as it reports anything (each field optional).

    ``cost``: money it says it charged (in ``currency``); ``compute_seconds``: billed run time
    (Replicate's ``metrics.predict_time``, fal's ``metrics.inference_time``); ``tokens``: billed
    output tokens (OpenAI images, Ark, Gemini); ``outputs``/``seconds``: what was rendered (DashScope's
    ``image_count``, ``video_duration``). The catalog's price rule turns it into ``cost.reported``.
    """

    cost: float | None = None
    currency: str = "USD"
    compute_seconds: float | None = None
    tokens: int | None = None
    outputs: int | None = None
    seconds: float | None = None


@dataclass
class TaskStatus:
    """The provider's view of a task, translated."""

    state: ProviderState
    raw_status: str
    progress: int | None = None
    outputs: list[ProviderOutput] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    error_detail: Any = None
    # The provider's hint for the next poll (seconds), e.g. ``openai-poll-after-ms``.
    poll_after: float | None = None
    request_id: str | None = None
    # Where the provider says the task stands in its queue (fal), while queued.
    queue_position: int | None = None
    # The adapter's state learnt from this status (e.g. Midjourney's buttons), kept for follow-ups.
    task_state: TaskState | None = None
    # What the provider reported the task used (cost, compute time, tokens), where it reports it.
    usage: Usage | None = None


@dataclass
class CallbackHint:
    """What a verified callback says: which task (and, where the body says it, the raw status).

    It is only a hint: the worker fetches the task's state from the provider.
    """

    task_id: str | None = None
    raw_status: str | None = None
    # A handshake to answer as it is (MiniMax's ``{"challenge": ...}``), once the callback's
    # authentication passed; nothing else is done with such a callback.
    reply: dict[str, Any] | None = None


@dataclass
class CallContext:
    """What one call needs: the HTTP client, the chosen key and our callback URL."""

    http: httpx.AsyncClient
    api_key: str
    # At submit: the URL the provider should call back. In ``verify_callback``: the URL as it was
    # called (path and query; a provider that signs the URL rather than the body checks it).
    callback_url: str | None = None
    # Seconds a create request may take for this model (``request_timeout_seconds`` /
    # ``request_timeout_by_model``); pass it to ``providers.http.send``. ``None``: the client's default.
    timeout: float | None = None
    # For media inputs a tenant named (``image_url``): the destination-guarded client (see
    # ``providers.http.fetch_input``); ``None`` falls back to ``http``.
    media_http: httpx.AsyncClient | None = None


@dataclass
class ProviderSettings:
    """Configuration of one provider (built from Atelier's settings by the orchestrator)."""

    name: str
    base_url: str
    api_keys: list[str] = field(default_factory=list)
    timeout_seconds: float = 30.0
    # Typical run time per kind or per model, used for the first poll and for ordering polls.
    typical_seconds: dict[str, float] = field(default_factory=dict)
    poll_initial_seconds: float | None = None
    poll_max_seconds: float = 30.0
    job_timeout_seconds: float = 3600.0
    # Per-model deadlines (seconds): exact model names, or fnmatch patterns such as "minimax/*".
    job_timeout_by_model: dict[str, float] = field(default_factory=dict)
    concurrency: int | None = None  # tasks in flight per API key
    rpm: float | None = None  # requests per minute per API key
    # Seconds one create request may take, per model (exact names or fnmatch patterns): a synchronous
    # image can take minutes at high quality.
    request_timeout_by_model: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # The operator's additions to the model catalog (``[providers.<p>.models."<name>"]``, the schema of
    # ``providers/catalog/*.toml``) and the models refused on this server whatever the catalog says.
    models: dict[str, Any] = field(default_factory=dict)
    retired_models: list[str] = field(default_factory=list)
    prices: dict[str, Any] = field(default_factory=dict)  # negotiated prices per model (the catalog's Price)

    def request_timeout(self, model: str) -> float:
        by_model = self.request_timeout_by_model
        if model in by_model:
            return by_model[model]
        patterns = [p for p in by_model if fnmatch.fnmatchcase(model, p)]
        return by_model[max(patterns, key=len)] if patterns else self.timeout_seconds


class Provider:
    """Base class of the adapters. Subclasses set the class attributes and override methods."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[MediaKind]]
    supports_cancel: ClassVar[bool] = False
    supports_callbacks: ClassVar[bool] = False
    # How callbacks are authenticated: the provider's signature, or our per-job token in the URL.
    callback_auth: ClassVar[Literal["signature", "token"]] = "token"
    retention: ClassVar[str] = ""
    # Where the provider lives, and its defaults (operators override them per provider).
    default_base_url: ClassVar[str] = ""
    default_typical_seconds: ClassVar[dict[str, float]] = {}  # per kind or per model
    default_concurrency: ClassVar[int | None] = None  # tasks in flight per key; synchronous providers set one
    # The create call answers with the result (no task to poll): ``SubmitResult.done`` is always set.
    synchronous: ClassVar[bool] = False
    # Follow-ups besides ``generate`` (which may take a source's output as its input image).
    operations: ClassVar[tuple[Operation, ...]] = ()

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")

    # -- validation (before anything is enqueued) -------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise ``InvalidInput`` naming the field when the provider would refuse the request."""
        if request.kind not in self.kinds:
            kinds = ", ".join(sorted(self.kinds))
            raise InvalidInput("kind", f"{self.name} renders {kinds}, not {request.kind}")
        self.validate_operation(request)

    def operation(self, name: str, model: str) -> Operation | None:
        """The follow-up ``name`` as offered for ``model`` (``generate`` is every adapter's)."""
        if name == "generate":
            return Operation("generate", source="optional_media")
        return next((op for op in self.operations if op.name == name and op.offered_for(model)), None)

    def validate_operation(self, request: GenerationRequest) -> None:
        """The operation exists for the model, and the source is what it takes."""
        op = self.operation(request.operation, request.model)
        if op is None:
            offered = ["generate", *(o.name for o in self.operations if o.offered_for(request.model))]
            raise InvalidInput("operation", f"{self.name} {request.model} offers {', '.join(offered)}, "
                                            f"not {request.operation!r}")
        source = request.source
        if source is None:
            if op.source in ("media", "task"):
                raise InvalidInput("source", f"{request.operation} acts on an earlier job: give source.job_id")
            return
        if op.source == "none":
            raise InvalidInput("source", f"{request.operation} takes no source")
        if op.source == "task" and source.provider != self.name:
            raise InvalidInput("source", f"{request.operation} acts on a {self.name} task; the source job ran "
                                         f"on {source.provider}")
        if op.source_kinds and source.kind not in op.source_kinds:
            kinds = ", ".join(sorted(op.source_kinds))
            raise InvalidInput("source", f"{request.operation} takes a {kinds} source, not {source.kind}")

    # -- the task ----------------------------------------------------------
    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        raise NotImplementedError

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        raise NotImplementedError

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        """Ask the provider to stop; ``False`` when it has no way to be told."""
        return False

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Find the task an ambiguous submit may have created (``None`` if none or unknowable)."""
        return None

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Authenticate a callback (``callback_auth == "signature"``) and say which task it is about.

        Raise ``CallbackRejected`` when it does not verify. Token-authenticated
        providers only parse: the API checks the per-job token.
        """
        raise CallbackRejected(f"{self.name} does not send callbacks")

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        """Headers for fetching an output URL (auth only where the provider requires it)."""
        return {}

    def typical_seconds(self, kind: str, model: str) -> float:
        """A task's typical run time: its model's entry in ``typical_seconds``, else its kind's."""
        typical = self.settings.typical_seconds
        return typical[model] if model in typical else typical.get(str(kind), 60.0)

    @property
    def fetch_group_size(self) -> int:
        """Tasks one status request can read (``fetch_many``); 1 when the provider reads one at a time."""
        return 1

    async def fetch_many(self, ctx: CallContext, tasks: list[TaskRef]) -> dict[str, TaskStatus]:
        """Statuses of up to ``fetch_group_size`` tasks, keyed by task id (all submitted with
        ``ctx.api_key``). A task missing from the answer is polled on its own."""
        return {task.task_id: await self.fetch(ctx, task) for task in tasks}
