"""The public schema of jobs: what a client sends and what it sees (API responses, webhook payloads).

The client SDK imports this package and nothing else of Atelier, so it stays free of server code.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictBool, field_validator

from atelier_client.wire import limits

MAX_METADATA_BYTES = 4096


class JobStatus(StrEnum):
    queued = "queued"
    submitting = "submitting"
    submitted = "submitted"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    timed_out = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.timed_out})


class JobKind(StrEnum):
    image = "image"
    video = "video"
    audio = "audio"


class Priority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"


def small_metadata(value: dict[str, Any]) -> dict[str, Any]:
    found = limits.problem(value)
    if found is not None:
        raise ValueError(f"metadata{found[0]} {found[1]}")
    if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobInput(BaseModel):
    """Common generation inputs; each adapter maps them to its provider's names.

    ``options`` carries the provider's native parameters, passed through after
    the adapter validated them.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=20_000, examples=["a lighthouse at dusk"])
    negative_prompt: str | None = Field(None, max_length=20_000)
    image_url: AnyHttpUrl | None = Field(None, description="An input image (fetched through the destination guard)")
    duration_seconds: float | None = Field(None, gt=0, le=600, examples=[8])
    aspect_ratio: str | None = Field(None, pattern=r"^\d{1,2}:\d{1,2}$", examples=["16:9"])
    resolution: str | None = Field(None, pattern=r"^(\d{3,4}p|\d{2,5}x\d{2,5}|[1-8]k)$",
                                   description="`720p`, `1080p`, `WxH` or `4k`, as the model accepts",
                                   examples=["720p"])
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    num_outputs: int | None = Field(None, ge=1, le=8)
    options: dict[str, Any] = Field(default_factory=dict, description="The provider's own parameters, checked "
                                    "by its adapter and passed through (64 KB of JSON)",
                                    examples=[{"output_format": "png"}])

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _valid_text(cls, value: str | None) -> str | None:
        if value is not None and limits.problem(value) is not None:
            raise ValueError("contains an unpaired surrogate (\\ud800-\\udfff): send valid Unicode")
        return value

    @field_validator("options")
    @classmethod
    def _bounded_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = limits.problem(value)
        if found is not None:
            raise ValueError(f"options{found[0]} {found[1]}")
        if len(json.dumps(value, separators=(",", ":"))) > limits.MAX_OPTIONS_BYTES:
            raise ValueError(f"options must serialise to at most {limits.MAX_OPTIONS_BYTES} bytes of JSON")
        return value


class SourceRef(BaseModel):
    """The earlier job a follow-up acts on, and which of its outputs (0 = the first)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=r"^job_[A-Za-z0-9_]{1,80}$")
    output: int = Field(0, ge=0, le=99)


class Fallback(BaseModel):
    """Another provider and model to move the job to, with ``input`` fields merged over the
    original request's input (``options`` replaced as a whole when given)."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=40)
    model: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)


MAX_FALLBACKS = 5
ErrorCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,59}$")]


class JobRequest(BaseModel):
    """``POST /v1/jobs``: what to render, where. ``GET /v1/models`` lists each model's accepted inputs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
        "input": {"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9", "num_outputs": 2},
        "metadata": {"order": 42}}]})

    provider: str = Field(min_length=1, max_length=40, description="A provider of `GET /v1/models`",
                          examples=["replicate"])
    kind: JobKind = Field(description="What the job renders", examples=["image"])
    model: str = Field(min_length=1, max_length=200, description="The provider's model name",
                       examples=["black-forest-labs/flux-schnell"])
    input: JobInput = Field(default_factory=JobInput, description="The common inputs, plus the provider's "
                            "own parameters in `options`")
    webhook_url: AnyHttpUrl | None = Field(None, description="Receives the job's signed webhooks (`job.running` "
                                           "and every terminal state)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Yours, returned with the job and its "
                                     "webhooks (4 KB of JSON)", examples=[{"order": 42}])
    priority: Priority = Priority.normal
    # Generation costs money: after an ambiguous submit we fail the job unless the client opts in.
    retry_unknown_submissions: StrictBool = False
    # A follow-up (``upscale``, ``extend``, ``remix``...) of ``source``, or ``generate``; ``generate``
    # with a source takes the source's output as its input image.
    operation: str = Field("generate", pattern=r"^[a-z][a-z0-9_]{0,39}$")
    source: SourceRef | None = None
    # Where to go when this provider provably created nothing (refused before acceptance, no usable
    # key, model sunset, outage before acceptance), or the job failed with a code in ``fallback_on``.
    # Never after an ambiguous submission.
    fallbacks: list[Fallback] = Field(default_factory=list, max_length=MAX_FALLBACKS)
    fallback_on: list[ErrorCode] = Field(default_factory=list, max_length=10,
                                         examples=[["content_policy", "provider_failed"]])
    # A quote: validate and estimate, create nothing (``POST /v1/jobs`` answers 200 with a ``JobQuote``).
    dry_run: StrictBool = False

    @field_validator("fallback_on")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        for code in value:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,59}", code):
                raise ValueError(f"{code!r} is not an error code (lower-case letters, digits and '_')")
        return value

    @field_validator("provider", "model")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if limits.problem(value) is not None:
            raise ValueError("contains an unpaired surrogate (\\ud800-\\udfff): send valid Unicode")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return small_metadata(value)


class JobError(BaseModel):
    code: str
    message: str
    provider_detail: Any = None


Phase = Literal["throttled", "waiting", "collecting", "canceling"]


class OutputView(BaseModel):
    index: int
    url: str
    url_expires_at: datetime | None = None  # the URL stops working then; read the job again for a fresh one
    content_type: str
    bytes: int
    sha256: str
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class CostEstimate(BaseModel):
    """What a job is estimated to cost, from its model's price rule (``rule`` says how)."""

    amount: float
    currency: str = "USD"
    rule: str


class JobCost(BaseModel):
    """What the job costs, each ``{amount, currency, rule}``.

    ``estimated``: at acceptance, from the model's price rule (``null`` when the model has none).
    ``reported``: from what the provider reported (money charged, compute seconds, tokens, rendered
    outputs or seconds) priced by the same rule, where the provider reports anything.
    ``final``: once the job finished: ``reported`` when known, else the estimate; zero when nothing
    was billed (refused or failed before the provider created anything, canceled before submission).
    """

    estimated: CostEstimate | None = None
    reported: CostEstimate | None = None
    final: CostEstimate | None = None


class AttemptView(BaseModel):
    """One provider a job was sent to (or skipped), and how that ended: a job that fell back has one
    per provider, the last naming the one that produced the outputs."""

    provider: str
    model: str
    key_id: str | None = None  # the pool key's fingerprint, never the key
    outcome: str  # "succeeded", "running", or the error code that moved the job on
    message: str | None = None
    cost: CostEstimate | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class QueueView(BaseModel):
    """Where a waiting job stands: in one of Atelier's lines for its provider key (``at: atelier``,
    ``line``: ``slot`` for the key's concurrency cap, ``request_budget`` for its requests per minute),
    or in the provider's own queue (``at: provider``, ``line: provider``) where the provider reports a
    position (fal).

    ``position``: 1 is next. ``ahead``: jobs that go first (in a slot line: those waiting ahead plus
    the tasks holding the key's slots; at the provider: what it reports). ``eta_seconds``: a rough
    estimate of when the job finishes, from the model's measured run times on this deployment (its
    p50); ``null`` until some of its jobs have finished.
    """

    at: Literal["atelier", "provider"]
    line: Literal["slot", "request_budget", "provider"]
    position: int = Field(ge=1)
    ahead: int = Field(ge=0)
    eta_seconds: float | None = None


class JobQuote(BaseModel):
    """A dry run's answer: the request as validated and what it would cost (nothing was created)."""

    object: Literal["quote"] = "quote"
    request: JobRequest
    cost: CostEstimate | None
    note: str | None = None


class JobView(BaseModel):
    """A job as clients see it (API responses and webhook payloads)."""

    object: Literal["job"] = "job"
    id: str
    status: JobStatus
    phase: Phase | None = None
    provider: str
    kind: JobKind
    model: str
    input: JobInput
    priority: Priority
    progress: int | None
    outputs: list[OutputView]
    error: JobError | None
    provider_task_id: str | None
    provider_request_id: str | None
    provider_status: str | None
    note: str | None
    attempts: int
    metadata: dict[str, Any]
    webhook_url: str | None
    batch_id: str | None
    ref: str | None = None
    operation: str = "generate"
    source: SourceRef | None = None
    created_at: datetime
    updated_at: datetime
    timestamps: dict[str, datetime]
    deadline_at: datetime | None
    sequence: int
    expires_at: datetime | None = None  # when the finished job and its stored outputs are deleted
    cost: JobCost | None = None
    fallbacks: list[Fallback] = Field(default_factory=list)  # the entries not yet used
    fallback_on: list[str] = Field(default_factory=list)
    provider_attempts: list[AttemptView] = Field(default_factory=list)
    queue: QueueView | None = None  # while it waits in a line at Atelier or in the provider's queue


class JobEvent(BaseModel):
    """One entry of a job's event log; ``sequence`` is the job version it produced."""

    sequence: int
    type: str
    status: JobStatus
    at: datetime
    progress: int | None = None
    error: JobError | None = None
    note: str | None = None


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    next_cursor: str | None


class JobQuery(BaseModel):
    """``POST /v1/jobs/query``: many jobs in one call."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"ids": ["job_01jd8x3k2m4n5p6q7r8s9t0v1w", "job_01jd8x3k2m4n5p6q7r8s9t0v1x"]}]})

    ids: list[str] = Field(min_length=1, max_length=1000,
                           description="Job ids (`job_...`), 1 to 1,000; duplicates are answered once. Ids that "
                                       "are unknown or another tenant's come back in `not_found`.",
                           examples=[["job_01jd8x3k2m4n5p6q7r8s9t0v1w"]])


class JobQueryResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    not_found: list[str]
