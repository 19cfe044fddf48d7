"""The public schema of the model catalog (``GET /v1/models``)."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, Field


class NumberRange(BaseModel):
    """Every value from ``min`` to ``max`` (inclusive)."""

    min: int | float
    max: int | float


class ModelInputs(BaseModel):
    """The common inputs (``input.*`` of a job request) a model accepts for one kind.

    A constraint that is ``null`` means any value the provider takes (passed on, checked there);
    an input missing from ``accepts`` is refused (422 naming it).
    """

    requires: list[str] = Field(description="Common inputs a request must carry")
    accepts: list[str] = Field(description="Common inputs the model takes at all")
    image_input: bool = Field(description="Whether it takes an input image (image_url, or a source job's output)")
    duration_seconds: list[int | float] | NumberRange | None = None
    aspect_ratio: list[str] | None = None
    resolution: list[str] | None = None
    num_outputs: NumberRange | None = None
    example: dict[str, Any] = Field(default_factory=dict, description="A minimal valid `input`")


class ModelLifecycle(BaseModel):
    """``status``: ``active``, ``deprecated`` (still served), ``sunset`` (shut down at the provider's own
    origin; served here only through a gateway, with a note on the job) or ``retired`` (refused here).
    ``available``: whether this server takes jobs for it now."""

    status: Literal["active", "deprecated", "sunset", "retired"]
    available: bool
    deprecated: date | None = None
    sunset: date | None = None
    replacement: str | None = Field(None, description="`provider/model` to use instead")
    note: str | None = None


class PriceRule(BaseModel):
    """``amount`` per ``unit`` (a second of video or audio, an image or output, a request, a second of
    the provider's compute time, one output token); a job's `cost.estimated` applies it, and
    `cost.reported` prices what the provider reported with it. ``origin``: the catalog's list price, or
    the operator's own."""

    unit: Literal["second", "image", "output", "request", "compute_second", "token"]
    amount: float
    currency: str
    default_seconds: float | None = Field(None, description="The duration assumed when a request gives none "
                                                            "(for `compute_second`: the run time)")
    default_tokens: int | None = Field(None, description="`token` prices: the output tokens one output "
                                                         "typically bills (the estimate's assumption)")
    origin: Literal["catalog", "operator"]
    source: str | None = None


class MeasuredDurations(BaseModel):
    """Run times (submission to success, outputs stored) of this deployment's latest succeeded jobs."""

    count: int = Field(description="How many recent successes were measured (at most 200)")
    p50_seconds: float
    p90_seconds: float


class ModelView(BaseModel):
    object: Literal["model"] = "model"
    id: str = Field(description="`provider/model`")
    provider: str
    model: str
    kinds: list[Literal["image", "video", "audio"]]
    inputs: dict[str, ModelInputs] = Field(description="Per kind")
    operations: list[str] = Field(description="`generate` and the follow-ups the model offers")
    sound: bool = Field(False, description="A video rendered with its own sound track")
    supports_callbacks: bool
    supports_cancel: bool
    supports_reconcile: bool = Field(description="An ambiguous submission can be looked up at the provider")
    typical_seconds: dict[str, float] = Field(description="Typical run time per kind (this deployment's setting)")
    measured: MeasuredDurations | None = Field(None, description="Measured on this deployment; null before a "
                                                                 "job of the model succeeded")
    lifecycle: ModelLifecycle
    price: PriceRule | None = Field(None, description="null: no price rule known (jobs carry no estimate)")
    configured: bool = Field(description="Whether the provider is configured on this server")
    source: Literal["catalog", "operator"] = Field(description="Shipped with Atelier, or added by the operator")
    any_model: bool = Field(description="The provider takes models the catalog does not list (these are "
                                        "representative)")
    provider_note: str | None = None
    note: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelView]
