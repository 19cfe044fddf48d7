"""The job record as Atelier keeps it, and what the worker records for its own bookkeeping.

``Job`` holds internal fields a client never sees (the tenant, storage keys, the per-job
callback token, the worker's bookkeeping, the adapter's task state); ``JobView`` in
``orchestrator.wire`` is what a client sees. A record written by an earlier version (whose
worker bookkeeping and adapter state shared one ``provider_data`` dict) still reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from orchestrator.wire.jobs import (
    AttemptView,
    Fallback,
    JobCost,
    JobError,
    JobInput,
    JobKind,
    JobRequest,
    JobStatus,
    Phase,
    Priority,
    SourceRef,
    utcnow,
)
from providers.contract import GenerationRequest, MediaInput, MediaKind, ProviderOutput, SourceMedia, TaskRef


class Output(BaseModel):
    """One stored output file. ``key`` is our storage key; the URL is minted when read."""

    index: int
    key: str
    content_type: str
    bytes: int
    sha256: str
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class ReconcileRetry(BaseModel):
    """A pending look-up of the task an ambiguous submission of ``attempt`` may have created."""

    attempt: int
    tries: int
    reason: str = ""


class LedgerHold(BaseModel):
    """What the job holds against its tenant's budgets, and where it counts in the usage figures.

    ``day`` (UTC, at acceptance) names the budget periods and the usage day; ``held``: micro-USD
    reserved (the estimate) until the job settles; ``dims``: the usage groups it is counted in.
    """

    day: str
    held: int = 0
    dims: list[str] = Field(default_factory=list)
    settled: bool = False
    key: str | None = None  # the submitting API key's SHA-256 (its own budgets count the job too)


# Keys of the pre-split ``provider_data`` dict that were the worker's, not the adapter's.
_WORKER_KEYS = {"submit_started": "submit_started_at", "reconcile_retry": "reconcile", "collects": "collects",
                "callback_expected": "callback_expected", "outputs_ready_at": "outputs_ready_at"}


class Job(BaseModel):
    """The record of one job, as stored in Redis."""

    @model_validator(mode="before")
    @classmethod
    def _split_provider_data(cls, data: Any) -> Any:
        """Read a record of an earlier version: its ``provider_data`` held both the worker's bookkeeping
        and the adapter's state."""
        if isinstance(data, dict) and "provider_data" in data:
            data = dict(data)
            legacy = dict(data.pop("provider_data") or {})
            for old, new in _WORKER_KEYS.items():
                if old in legacy:
                    data.setdefault(new, legacy.pop(old))
            data.setdefault("provider_state", legacy)
        return data

    id: str
    tenant: str
    status: JobStatus = JobStatus.queued
    provider: str
    kind: JobKind
    model: str
    input: JobInput
    webhook_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.normal
    retry_unknown_submissions: bool = False
    idempotency_key: str | None = None
    batch_id: str | None = None
    ref: str | None = None
    operation: str = "generate"
    source: SourceRef | None = None

    provider_task_id: str | None = None
    provider_request_id: str | None = None
    provider_status: str | None = None
    # Where the provider says the task stands in its queue (fal's 0-indexed ``queue_position``), while
    # it says so; the view's ``queue`` shows it.
    provider_queue_position: int | None = None
    # The adapter's own state of the task (``SubmitResult.state``): only the adapter reads it.
    provider_state: dict[str, Any] = Field(default_factory=dict)
    provider_outputs: list[ProviderOutput] = Field(default_factory=list)

    # -- the worker's bookkeeping (never shown, never given to an adapter) --------------
    # When the current attempt's submission began (Unix seconds): how long to wait before looking
    # at a submission that left no outcome, and where a reconcile starts looking.
    submit_started_at: float | None = None
    # A reconcile of this attempt failed transiently and is due again.
    reconcile: ReconcileRetry | None = None
    # Collections scheduled so far (each has its own arq id ``collect:{job}:{n}``).
    collects: int = 0
    # A callback is expected, so polls are only a safety net (slower, read last).
    callback_expected: bool = False
    # When the provider's outputs were seen (for the collection-time metric).
    outputs_ready_at: float | None = None
    # Which pool key submitted the job (a fingerprint, never the key itself).
    key_id: str | None = None

    progress: int | None = None
    phase: Phase | None = None
    note: str | None = None
    cost: JobCost | None = None
    ledger: LedgerHold | None = None

    # Fallbacks: the entries not yet used, the codes that move the job on after a failure, the
    # request's own input (each entry's ``input`` is merged over it), the providers tried so far.
    fallbacks: list[Fallback] = Field(default_factory=list)
    fallback_on: list[str] = Field(default_factory=list)
    original_input: JobInput | None = None
    provider_attempts: list[AttemptView] = Field(default_factory=list)
    # Create calls the current provider refused as unavailable (not rate limits): the job gives up at
    # ``ATELIER_SUBMIT_MAX_ATTEMPTS`` (then a fallback may take it).
    refusals: int = 0
    outputs: list[Output] = Field(default_factory=list)
    error: JobError | None = None
    attempts: int = 0
    polls: int = 0
    poll_seq: int = 0
    poll_errors: int = 0
    callback_token: str = ""

    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    timestamps: dict[str, datetime] = Field(default_factory=dict)
    deadline_at: datetime | None = None
    # When a finished job's records and outputs are reaped (set when it finishes).
    expires_at: datetime | None = None
    version: int = 0


class BatchRecord(BaseModel):
    """The stored, unchanging part of a batch; counts live beside it in Redis."""

    id: str
    tenant: str
    created_at: datetime
    webhook_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    items: int
    invalid_count: int = 0
    idempotency_key: str | None = None


def generation_request(job: Job | JobRequest, source: SourceMedia | None = None) -> GenerationRequest:
    """What an adapter is told to render for a job, or to validate for a request (never the record
    itself). The reference is the job's id, which adapters may send as the provider's external id.

    ``generate`` with a source takes the source's stored output as its input image (unless the
    request names one).
    """
    given = job.input
    image_url = str(given.image_url) if given.image_url is not None else None
    if job.operation == "generate" and source is not None and image_url is None:
        image_url = source.url
    return GenerationRequest(
        kind=MediaKind(job.kind.value), model=job.model, reference=job.id if isinstance(job, Job) else "",
        operation=job.operation, source=source,
        input=MediaInput(prompt=given.prompt, negative_prompt=given.negative_prompt, image_url=image_url,
                         duration_seconds=given.duration_seconds, aspect_ratio=given.aspect_ratio,
                         resolution=given.resolution, seed=given.seed, num_outputs=given.num_outputs,
                         options=given.options))


def source_media(source: Job, output: int, url: str | None = None) -> SourceMedia:
    """What a follow-up's adapter is told of its source job (``url``: where its output can be fetched)."""
    stored = source.outputs[output]
    announced = source.provider_outputs[output].metadata if output < len(source.provider_outputs) else {}
    return SourceMedia(provider=source.provider, model=source.model, kind=MediaKind(source.kind.value),
                       task_id=source.provider_task_id, state=source.provider_state, output_index=output,
                       output_content_type=stored.content_type, output_metadata={**announced, **stored.metadata},
                       url=url)


def task_ref(job: Job) -> TaskRef:
    """The task ``job`` follows at its provider (only for a job that has one)."""
    if not job.provider_task_id:
        raise ValueError(f"job {job.id} has no provider task")
    return TaskRef(task_id=job.provider_task_id, request=generation_request(job), state=job.provider_state)

