"""The public schema of uploads (``POST /v1/uploads``): a local file kept for use as a job's media input."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class UploadView(BaseModel):
    """A stored upload. ``url`` is what a job names as ``input.image_url`` (or another media input):
    providers fetch it from there until ``expires_at``, when the file is deleted."""

    object: Literal["upload"] = "upload"
    id: str
    url: str = Field(description="Where providers fetch the file; valid until `expires_at`")
    content_type: str = Field(description="The type its bytes show (not the one the client declared)")
    bytes: int
    sha256: str
    filename: str | None = Field(None, description="The name the client gave the file, if any")
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    created_at: datetime
    expires_at: datetime
    note: str | None = Field(None, description="Set when providers may not be able to fetch the URL")
