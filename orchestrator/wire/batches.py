"""The public schema of batches."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from orchestrator.wire.jobs import JobRequest, small_metadata

MAX_BATCH_ITEMS = 10_000


class BatchItem(JobRequest):
    """One job of a batch, with the client's own reference for it."""

    ref: str | None = Field(None, max_length=200)


class BatchRequest(BaseModel):
    """Items are validated one by one, so that invalid ones can be reported instead of failing all."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    webhook_url: AnyHttpUrl | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    atomic: bool = False

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
