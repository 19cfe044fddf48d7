"""The public schema of batches."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictBool, field_validator

from orchestrator.wire.jobs import CostEstimate, JobRequest, small_metadata

MAX_BATCH_ITEMS = 10_000


class BatchItem(JobRequest):
    """One job of a batch, with the client's own reference for it."""

    ref: str | None = Field(None, max_length=200,
                            description="Your own reference for the item, echoed in its job (`ref`) and in the "
                                        "batch's invalid items", examples=["order-42"])


class BatchRequest(BaseModel):
    """Items are validated one by one, so that invalid ones can be reported instead of failing all."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "jobs": [
            {"ref": "a", "provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
             "input": {"prompt": "a lighthouse at dusk"}},
            {"ref": "b", "provider": "fal", "kind": "image", "model": "fal-ai/flux/schnell",
             "input": {"prompt": "a lighthouse at dawn"}},
        ],
        "metadata": {"campaign": "spring"},
    }]})

    jobs: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_BATCH_ITEMS,
        description=f"1 to {MAX_BATCH_ITEMS:,} job requests, each a `POST /v1/jobs` body (`JobRequest`) with an "
                    "optional `ref`. Each is validated on its own: an invalid one is reported in `invalid` "
                    "(`index`, `ref`, `field`, `message`) and not enqueued, unless `atomic`.",
        examples=[[{"ref": "a", "provider": "replicate", "kind": "image",
                    "model": "black-forest-labs/flux-schnell", "input": {"prompt": "a lighthouse at dusk"}}]])
    webhook_url: AnyHttpUrl | None = Field(None, description="Receives `batch.progress` and `batch.completed`")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Yours, kept with the batch (4 KB of JSON)")
    atomic: StrictBool = Field(False, description="Refuse the whole batch (422) when any item is invalid")
    # A quote: validate every item and estimate each and the total; nothing is created.
    dry_run: StrictBool = False

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return small_metadata(value)


class ItemProblem(BaseModel):
    index: int
    ref: str | None = None
    field: str
    message: str


class BatchView(BaseModel):
    object: Literal["batch"] = "batch"
    id: str
    status: Literal["running", "completed"]
    total: int
    invalid_count: int
    counts: dict[str, int]
    done: int
    progress: int
    canceled: bool
    webhook_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None


class BatchItemRef(BaseModel):
    index: int
    ref: str | None
    job_id: str


class BatchCreated(BatchView):
    items: list[BatchItemRef]
    invalid: list[ItemProblem]


class BatchPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchView]
    next_cursor: str | None


class ItemQuote(BaseModel):
    index: int
    ref: str | None
    provider: str
    model: str
    cost: CostEstimate | None


class BatchQuote(BaseModel):
    """A batch dry run's answer: each valid item's estimate and the total (items without a price rule
    count as zero and are listed in ``unpriced``). Nothing was created."""

    object: Literal["batch_quote"] = "batch_quote"
    items: list[ItemQuote]
    invalid: list[ItemProblem]
    total: CostEstimate
    unpriced: list[int]
