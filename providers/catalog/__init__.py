"""The model catalog: every model Atelier knows per provider, what it accepts, and its lifecycle.

The catalog is data: one TOML file per provider next to this module, ``providers/catalog/<provider>.toml``
(package data), written from the adapters' own validation constants (``tests/test_catalog.py`` submits one
valid and one invalid request per listed value, so the two agree). Operators add models only
their gateway serves in the provider's TOML table (``[providers.<p>.models."<name>"]``, the same
schema) and retire models there (``retired_models``). What an adapter class says of itself
(kinds, operations, callbacks, cancel, reconcile, typical duration) is read from the class, not
written twice.

A file::

    [provider]
    any_model = true          # the adapter accepts any model name; the listed ones are representative
    note = "..."

    [models."sora-2"]
    sound = true              # the video comes with sound
    typical_seconds = 120     # optional; else the adapter's default for the kind
    price = {unit = "second", amount = 0.1, default_seconds = 4, source = "..."}
                              # see ``Price``: per second, image, output, request, compute_second, token
    lifecycle = {deprecated = "2026-03-01", sunset = "2026-09-24", replacement = "veo/veo-3.1-generate-preview",
                 note = "..."}
    [models."sora-2".video]   # one table per kind the model renders
    requires = ["prompt"]     # common inputs a request must carry
    accepts = ["prompt", "image_url", "duration_seconds", ...]   # common inputs it takes at all
    duration_seconds = [4, 8, 12]        # or {min = 1, max = 15}; absent: any value the provider takes
    aspect_ratio = ["16:9", "9:16"]      # absent: any
    resolution = ["720p", "1280x720"]    # absent: any
    num_outputs = {min = 1, max = 1}
    example = {prompt = "a fox"}         # a minimal valid ``input``

A sunset concerns the provider's own origin: see ``lifecycle_verdict``. A job's ``cost.estimated``
comes from the price rule (``estimate``), its ``cost.reported`` from what the provider reported the
task used, priced by the same rule (``reported_cost``).
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import tomllib
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from providers.contract import Provider, ProviderSettings, Usage
from providers.registry import ADAPTERS

CommonInput = Literal["prompt", "negative_prompt", "image_url", "duration_seconds", "aspect_ratio", "resolution",
                      "seed", "num_outputs"]
KINDS = ("image", "video", "audio")


class CatalogError(ValueError):
    """A catalog file or an operator's ``models`` table does not follow the schema."""


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: int | float
    max: int | float


class KindSpec(BaseModel):
    """What a model accepts for one kind. A constraint that is absent means any value the provider takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requires: list[Literal["prompt", "image_url", "duration_seconds"]] = []
    accepts: list[CommonInput] = ["prompt", "negative_prompt", "image_url", "duration_seconds", "aspect_ratio",
                                  "resolution", "seed", "num_outputs"]
    duration_seconds: list[int | float] | Range | None = None
    aspect_ratio: list[str] | None = None
    resolution: list[str] | None = None
    num_outputs: Range | None = None
    example: dict[str, Any] = {}


class Lifecycle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deprecated: dt.date | None = None
    sunset: dt.date | None = None
    replacement: str | None = None  # "provider/model", or a model of the same provider
    note: str | None = None


class Price(BaseModel):
    """A model's price rule: ``amount`` per ``unit``. Operators override it with negotiated prices in
    ``[providers.<p>.prices]``.

    Units: ``second`` of rendered video or audio; ``image``/``output`` rendered; ``request``;
    ``compute_second``: a second of the provider's billed run time on its hardware (Replicate's
    ``metrics.predict_time``, fal's ``metrics.inference_time``); ``token``: one billed output token
    (OpenAI's GPT image models, Ark's Seedance, Gemini's image output: ``amount`` is the price of a
    single token, e.g. 0.00004 for 40 USD per million).

    What the estimate at acceptance assumes where a request does not say: ``default_seconds``, the
    duration a per-``second`` model renders when a request gives none, or the run time of a
    ``compute_second`` model (else the model's ``typical_seconds``); ``default_tokens``, the output
    tokens one output typically bills (a ``token`` price without it gives no estimate).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["second", "image", "output", "request", "compute_second", "token"]
    amount: float
    currency: str = "USD"
    default_seconds: float | None = None
    default_tokens: int | None = None
    source: str | None = None


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: KindSpec | None = None
    video: KindSpec | None = None
    audio: KindSpec | None = None
    sound: bool = False  # a video rendered with sound
    typical_seconds: float | None = None
    lifecycle: Lifecycle = Lifecycle()
    price: Price | None = None
    note: str | None = None

    def kinds(self) -> dict[str, KindSpec]:
        return {kind: spec for kind in KINDS if (spec := getattr(self, kind)) is not None}


class ProviderInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    any_model: bool = False
    note: str | None = None


class ProviderFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderInfo = ProviderInfo()
    models: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class CatalogModel:
    """One model as the catalog lists it, with what its adapter class says of itself."""

    provider: str
    name: str
    spec: ModelSpec
    source: Literal["catalog", "operator"]
    operations: tuple[str, ...]
    supports_callbacks: bool
    supports_cancel: bool
    supports_reconcile: bool
    typical_seconds: dict[str, float]  # per kind
    any_model: bool
    retired: bool = False  # listed in the operator's ``retired_models``

    def kinds(self) -> dict[str, KindSpec]:
        return self.spec.kinds()


@dataclass(frozen=True)
class Verdict:
    """What the lifecycle says of a request: refuse it (``refusal``), or take it with a ``note``."""

    refusal: str | None = None
    note: str | None = None


@functools.cache
def shipped() -> dict[str, ProviderFile]:
    """The catalog files shipped with the package, by provider."""
    result = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        name = entry.name.removesuffix(".toml")
        result[name] = parse(tomllib.loads(entry.read_text(encoding="utf-8")), f"providers/catalog/{entry.name}")
    return result


def parse(data: dict[str, Any], where: str) -> ProviderFile:
    try:
        return ProviderFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise CatalogError(f"{where}: {loc}: {err.get('msg')}") from exc


def operator_models(settings: ProviderSettings) -> dict[str, ModelSpec]:
    """The models an operator added in ``[providers.<p>.models]``."""
    if not settings.models:
        return {}
    return parse({"models": settings.models}, f"[providers.{settings.name}] models").models


def has_reconcile(adapter: type[Provider]) -> bool:
    return inspect.getattr_static(adapter, "reconcile") is not inspect.getattr_static(Provider, "reconcile")


def at_default_origin(adapter: type[Provider], settings: ProviderSettings) -> bool:
    """Whether the provider is reached at its own origin (not a gateway, not the simulator)."""
    default = adapter.default_base_url.rstrip("/")
    return bool(default) and settings.base_url.rstrip("/") == default


_ENTRIES: weakref.WeakKeyDictionary[Provider, list[CatalogModel]] = weakref.WeakKeyDictionary()


def entries(adapter: Provider) -> list[CatalogModel]:
    """Every model of ``adapter``'s provider: the shipped ones, then the operator's (which win)."""
    cached = _ENTRIES.get(adapter)
    if cached is None:
        cached = _ENTRIES[adapter] = _entries(adapter)
    return cached


def _entries(adapter: Provider) -> list[CatalogModel]:
    cls = type(adapter)
    settings = adapter.settings
    shipped_file = shipped().get(cls.name, ProviderFile())
    models: dict[str, tuple[ModelSpec, Literal["catalog", "operator"]]] = {
        name: (spec, "catalog") for name, spec in shipped_file.models.items()}
    models.update({name: (spec, "operator") for name, spec in operator_models(settings).items()})
    retired = set(settings.retired_models)
    result = []
    for name, (spec, source) in models.items():
        typical = {kind: spec.typical_seconds or adapter.typical_seconds(kind, name) for kind in spec.kinds()}
        result.append(CatalogModel(
            provider=cls.name, name=name, spec=spec, source=source,
            operations=("generate", *(op.name for op in adapter.operations if op.offered_for(name))),
            supports_callbacks=bool(adapter.supports_callbacks), supports_cancel=bool(adapter.supports_cancel),
            supports_reconcile=has_reconcile(cls), typical_seconds=typical,
            any_model=shipped_file.provider.any_model, retired=name in retired,
        ))
    return result


def find(adapter: Provider, model: str) -> CatalogModel | None:
    return next((m for m in entries(adapter) if m.name == model), None)


def model_spec(settings: ProviderSettings, model: str) -> ModelSpec | None:
    """The catalog's entry for ``model`` (the operator's, else the shipped one), or ``None``."""
    raw = settings.models.get(model)
    if raw is not None:
        return parse({"models": {model: raw}}, f"[providers.{settings.name}] models").models[model]
    shipped_file = shipped().get(settings.name)
    return shipped_file.models.get(model) if shipped_file is not None else None


def lifecycle_verdict(settings: ProviderSettings, model: str, today: dt.date | None = None) -> Verdict:
    """Whether a request for ``model`` may be taken, and the note it carries.

    A sunset concerns the provider's own origin: at the default base URL a sunset model is refused
    (naming the replacement); behind a gateway (``ATELIER_<P>_BASE_URL`` elsewhere, the simulators
    included) it stays available with a note, unless the operator lists it in ``retired_models``.
    A model only deprecated is taken with a note everywhere.
    """
    spec = model_spec(settings, model)
    life = spec.lifecycle if spec is not None else Lifecycle()
    instead = f"; use {life.replacement} instead" if life.replacement else ""
    if model in settings.retired_models:
        return Verdict(refusal=f"{model} is retired on this server{instead}")
    today = today or dt.datetime.now(dt.UTC).date()
    adapter = ADAPTERS.get(settings.name)
    if life.sunset is not None and life.sunset <= today:
        why = f" ({life.note})" if life.note else ""
        if adapter is not None and at_default_origin(adapter, settings):
            return Verdict(refusal=f"{model} was shut down at the provider's origin on {life.sunset}{why}{instead}")
        return Verdict(note=f"deprecated: {model} was shut down at the provider's origin on {life.sunset}; "
                            f"served here through the configured base URL{instead}")
    if life.deprecated is not None and life.deprecated <= today:
        when = f", sunset on {life.sunset}" if life.sunset else ""
        return Verdict(note=f"deprecated: {model} is deprecated since {life.deprecated}{when}{instead}")
    return Verdict()


@dataclass(frozen=True)
class Estimate:
    amount: float
    currency: str
    rule: str


def price_rule(settings: ProviderSettings, model: str) -> tuple[Price | None, str]:
    """The model's price rule and where it comes from: the operator's ``prices``, else the catalog."""
    raw = settings.prices.get(model)
    if raw is not None:
        try:
            return Price.model_validate(raw), "operator"
        except ValidationError as exc:
            raise CatalogError(f"[providers.{settings.name}] prices.{model}: {exc.errors()[0].get('msg')}") from exc
    spec = model_spec(settings, model)
    return (spec.price if spec is not None else None), "catalog"


def _per(price: Price) -> str:
    """``0.0014 USD per compute second``: the rule as a person reads it."""
    return f"{_money(price.amount)} {price.currency} per {price.unit.replace('_', ' ')}"


def _money(amount: float) -> str:
    """A price as people write it: ``0.1``, ``0.000975``, ``0.00004`` (never ``4e-05``)."""
    return f"{amount:.10f}".rstrip("0").rstrip(".") or "0"


def estimate(settings: ProviderSettings, model: str, duration_seconds: float | None,
             num_outputs: int | None) -> Estimate | None:
    """What a request is estimated to cost, or ``None`` when its model has no price rule (or the rule
    needs a quantity nobody gives: a per-second price without a duration or a default, a
    ``compute_second`` price without a typical run time, a ``token`` price without ``default_tokens``).

    A ``compute_second`` price is charged once per request (one run renders every output); a ``token``
    price per output."""
    price, origin = price_rule(settings, model)
    if price is None:
        return None
    count = num_outputs or 1
    times = f" x {count}" if count > 1 else ""
    unit = _per(price)
    if price.unit == "second":
        seconds = duration_seconds or price.default_seconds
        if seconds is None:
            return None
        given = "" if duration_seconds else " (the default duration)"
        quantity, rule = seconds * count, f"{unit} x {seconds:g} s{given}{times}"
    elif price.unit == "compute_second":
        spec = model_spec(settings, model)
        seconds = price.default_seconds or (spec.typical_seconds if spec is not None else None)
        if seconds is None:
            return None
        quantity, rule = seconds, f"{unit} x {seconds:g} s (a typical run)"
    elif price.unit == "token":
        if price.default_tokens is None:
            return None
        quantity = price.default_tokens * count
        rule = f"{unit} x {price.default_tokens} tokens (typical per output){times}"
    elif price.unit in ("image", "output"):
        quantity, rule = count, f"{unit} x {count}"
    else:
        quantity, rule = 1, unit
    return Estimate(amount=round(price.amount * quantity, 6), currency=price.currency,
                    rule=f"{rule} ({origin} price)")


def reported_cost(settings: ProviderSettings, model: str, usage: Usage | None) -> Estimate | None:
    """What a task cost by what its provider reported (``cost.reported``), or ``None``.

    Money the provider says it charged wins as it is. Otherwise the model's price rule prices the
    quantity the provider reported in the rule's own unit: ``compute_second`` x ``compute_seconds``,
    ``token`` x ``tokens``, ``second`` x ``seconds``, ``image``/``output`` x ``outputs``. A rule per
    ``request``, a rule in a unit the provider did not report, or no rule: ``None`` (the estimate
    stands).
    """
    if usage is None:
        return None
    if usage.cost is not None:
        return Estimate(amount=round(usage.cost, 6), currency=usage.currency, rule="reported by the provider")
    try:
        price, origin = price_rule(settings, model)
    except CatalogError:
        return None
    if price is None:
        return None
    unit = _per(price)
    reported: dict[str, tuple[float | None, str]] = {
        "compute_second": (usage.compute_seconds, "s of compute"), "token": (usage.tokens, "tokens"),
        "second": (usage.seconds, "s"), "image": (usage.outputs, ""), "output": (usage.outputs, "")}
    quantity, measure = reported.get(price.unit, (None, ""))
    if quantity is None:
        return None
    what = f"{quantity:g} {measure}".rstrip()
    return Estimate(amount=round(price.amount * quantity, 6), currency=price.currency,
                    rule=f"{unit} x {what} reported by the provider ({origin} price)")
