"""``/v1/models``: the model catalog (``providers/catalog``), with what this server makes of it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.problems import Problem
from orchestrator.services.runtime import Runtime
from orchestrator.wire.models import (
    MeasuredDurations,
    ModelInputs,
    ModelLifecycle,
    ModelList,
    ModelView,
    NumberRange,
    PriceRule,
)
from providers import catalog
from providers.contract import Provider, ProviderSettings
from providers.registry import ADAPTERS, Registry

router = APIRouter(prefix="/v1/models", tags=["models"])


def _adapters(registry: Registry) -> list[tuple[Provider, bool]]:
    """Every provider: the configured adapter, or one with its defaults (listed as not configured)."""
    result = []
    for name, cls in sorted(ADAPTERS.items()):
        configured = registry.get(name)
        if configured is not None:
            result.append((configured, True))
        else:
            result.append((cls(ProviderSettings(name=name, base_url=cls.default_base_url or "http://unset",
                                                typical_seconds=dict(cls.default_typical_seconds))), False))
    return result


def _range(value: catalog.Range | None) -> NumberRange | None:
    return None if value is None else NumberRange(min=value.min, max=value.max)


def view(entry: catalog.CatalogModel, adapter: Provider, configured: bool) -> ModelView:
    life = entry.spec.lifecycle
    today = datetime.now(UTC).date()
    verdict = catalog.lifecycle_verdict(adapter.settings, entry.name, today)
    status: Literal["active", "deprecated", "sunset", "retired"] = "active"
    if entry.retired:
        status = "retired"
    elif life.sunset is not None and life.sunset <= today:
        status = "sunset"
    elif life.deprecated is not None and life.deprecated <= today:
        status = "deprecated"
    inputs = {}
    for kind, spec in entry.kinds().items():
        duration = spec.duration_seconds
        inputs[kind] = ModelInputs(
            requires=list(spec.requires), accepts=list(spec.accepts), image_input="image_url" in spec.accepts,
            duration_seconds=_range(duration) if isinstance(duration, catalog.Range) else duration,
            aspect_ratio=spec.aspect_ratio, resolution=spec.resolution, num_outputs=_range(spec.num_outputs),
            example=spec.example)
    price, origin = catalog.price_rule(adapter.settings, entry.name)
    provider_info = catalog.shipped().get(entry.provider)
    return ModelView(
        id=f"{entry.provider}/{entry.name}", provider=entry.provider, model=entry.name, kinds=list(entry.kinds()),
        inputs=inputs, operations=list(entry.operations), sound=entry.spec.sound,
        supports_callbacks=entry.supports_callbacks, supports_cancel=entry.supports_cancel,
        supports_reconcile=entry.supports_reconcile, typical_seconds=entry.typical_seconds,
        lifecycle=ModelLifecycle(status=status, available=configured and verdict.refusal is None,
                                 deprecated=life.deprecated, sunset=life.sunset, replacement=life.replacement,
                                 note=life.note),
        price=None if price is None else PriceRule(
            unit=price.unit, amount=price.amount, currency=price.currency, default_seconds=price.default_seconds,
            default_tokens=price.default_tokens, origin=origin, source=price.source),
        configured=configured, source=entry.source, any_model=entry.any_model,
        provider_note=provider_info.provider.note if provider_info else None, note=entry.spec.note)


def all_models(registry: Registry) -> list[ModelView]:
    """The whole catalog as this server sees it (the CLI's ``atelier models`` prints the same)."""
    try:
        return [view(entry, adapter, configured) for adapter, configured in _adapters(registry)
                for entry in catalog.entries(adapter)]
    except catalog.CatalogError as exc:
        raise Problem(500, "Invalid model catalog", str(exc)) from exc


@router.get("", response_model=ModelList)
async def list_models(rt: RuntimeDep, _tenant: TenantDep, provider: str | None = None,
                      kind: Literal["image", "video", "audio"] | None = None,
                      operation: str | None = None) -> ModelList:
    """Every model Atelier knows, per provider: kinds, operations, the inputs it accepts and their allowed
    values, callbacks/cancel/reconcile, the typical duration and its lifecycle."""
    models = [m for m in all_models(rt.registry)
              if (provider is None or m.provider == provider) and (kind is None or kind in m.kinds)
              and (operation is None or operation in m.operations)]
    return ModelList(data=await with_measured(rt, models))


async def with_measured(rt: Runtime, models: list[ModelView]) -> list[ModelView]:
    """The models with this deployment's measured p50/p90 (one Redis round trip)."""
    measured = await rt.durations.measured((m.provider, m.model) for m in models)
    return [m.model_copy(update={"measured": MeasuredDurations(
                count=found.count, p50_seconds=found.p50_seconds, p90_seconds=found.p90_seconds)})
            if (found := measured.get((m.provider, m.model))) is not None else m for m in models]


@router.get("/{provider}/{model:path}", response_model=ModelView)
async def get_model(provider: str, model: str, rt: RuntimeDep, _tenant: TenantDep) -> ModelView:
    """One model (its name may contain `/`: `GET /v1/models/replicate/black-forest-labs/flux-schnell`)."""
    found = next((m for m in all_models(rt.registry) if m.provider == provider and m.model == model), None)
    if found is None:
        raise Problem(404, "Not found", f"the catalog has no model {model!r} for provider {provider!r}")
    return (await with_measured(rt, [found]))[0]
