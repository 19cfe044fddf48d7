"""The public schema of jobs: what a client sends and what it sees (API responses, webhook payloads).

The client SDK imports this package and nothing else of Atelier, so it stays free of server code.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from orchestrator.wire import limits

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

    prompt: str | None = Field(None, max_length=20_000)
    negative_prompt: str | None = Field(None, max_length=20_000)
    image_url: AnyHttpUrl | None = None
    duration_seconds: float | None = Field(None, gt=0, le=600)
    aspect_ratio: str | None = Field(None, pattern=r"^\d{1,2}:\d{1,2}$")
    resolution: str | None = Field(None, pattern=r"^(\d{3,4}p|\d{2,5}x\d{2,5}|[1-8]k)$")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    num_outputs: int | None = Field(None, ge=1, le=8)
    options: dict[str, Any] = Field(default_factory=dict)

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


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=40)
    kind: JobKind
    model: str = Field(min_length=1, max_length=200)
    input: JobInput = Field(default_factory=JobInput)
    webhook_url: AnyHttpUrl | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.normal
    # Generation costs money: after an ambiguous submit we fail the job unless the client opts in.
    retry_unknown_submissions: bool = False
    # A follow-up (``upscale``, ``extend``, ``remix``...) of ``source``, or ``generate``; ``generate``
    # with a source takes the source's output as its input image.
    operation: str = Field("generate", pattern=r"^[a-z][a-z0-9_]{0,39}$")
    source: SourceRef | None = None

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
    """``estimated`` at acceptance from the catalog's price rule (``null`` when the model has none)."""

    estimated: CostEstimate | None = None


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
    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=1000)


class JobQueryResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    not_found: list[str]
