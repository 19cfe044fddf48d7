"""``atelier models [--provider P] [--kind K] [--json]``: the model catalog as a table.

Read with the server's configuration (the TOML file's ``models`` and ``retired_models``, base URLs
from the environment), so it shows what ``GET /v1/models`` answers on this deployment.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.api.models import all_models
from orchestrator.cli.client import CliError
from orchestrator.infra.settings import Settings
from orchestrator.wire.models import ModelInputs, ModelView, NumberRange
from providers.registry import Registry


def add_models_command(sub: Any) -> None:
    p = sub.add_parser("models", help="the model catalog: what each model accepts, its lifecycle")
    p.add_argument("--provider", help="only this provider's models")
    p.add_argument("--kind", choices=("image", "video", "audio"), help="only models of this kind")
    p.add_argument("--operation", help="only models offering this operation")
    p.add_argument("--json", action="store_true", help="one JSON object per model (GET /v1/models' schema)")
    p.set_defaults(run=cmd_models)


def _values(value: list[Any] | NumberRange | None) -> str:
    if value is None:
        return "any"
    if isinstance(value, NumberRange):
        return f"{value.min:g}-{value.max:g}"
    return ", ".join(f"{v:g}" if isinstance(v, int | float) else str(v) for v in value)


def _inputs(inputs: ModelInputs) -> tuple[str, str, str, str]:
    def field(name: str, value: list[Any] | NumberRange | None) -> str:
        return _values(value) if name in inputs.accepts else "-"
    return (field("duration_seconds", inputs.duration_seconds), field("aspect_ratio", inputs.aspect_ratio),
            field("resolution", inputs.resolution), field("num_outputs", inputs.num_outputs))


def _lifecycle(model: ModelView) -> str:
    life = model.lifecycle
    if life.status == "active":
        return "active"
    text = life.status + (f" {life.sunset}" if life.status == "sunset" and life.sunset else "")
    text += "" if life.available else ", refused"
    return text + (f" -> {life.replacement}" if life.replacement else "")


def _price(model: ModelView) -> str:
    price = model.price
    if price is None:
        return "-"
    unit = {"second": "s", "image": "image", "output": "output", "request": "request"}[price.unit]
    return f"{price.amount:g} {price.currency}/{unit}" + (" *" if price.origin == "operator" else "")


def cmd_models(args: argparse.Namespace) -> int:
    try:
        settings = Settings()
        models = all_models(Registry(settings.provider_settings()))
    except Exception as exc:  # pydantic's message names the variable
        raise CliError(f"invalid configuration: {exc}") from exc
    models = [m for m in models if (args.provider is None or m.provider == args.provider)
              and (args.kind is None or args.kind in m.kinds)
              and (args.operation is None or args.operation in m.operations)]
    if args.json:
        for model in models:
            print(json.dumps(model.model_dump(mode="json")))
        return 0
    if not models:
        raise CliError("no model matches")
    table = Table(title=f"Atelier model catalog ({len(models)} models)", show_lines=False)
    for column in ("provider", "model", "kind", "operations", "duration s", "aspect ratio", "resolution",
                   "outputs", "image in", "cb/cancel/reconcile", "typical s", "price", "lifecycle"):
        table.add_column(column, overflow="fold")
    for m in models:
        flags = "/".join("yes" if f else "no" for f in (m.supports_callbacks, m.supports_cancel, m.supports_reconcile))
        for kind, inputs in m.inputs.items():
            duration, aspect, resolution, outputs = _inputs(inputs)
            table.add_row(m.provider, m.model + (" *" if m.source == "operator" else ""), kind,
                          ", ".join(m.operations), duration, aspect, resolution, outputs,
                          "yes" if inputs.image_input else "no", flags, f"{m.typical_seconds.get(kind, 0):g}",
                          _price(m), _lifecycle(m))
    Console(width=max(160, Console().width)).print(table)
    print("* the operator's (model or price); 'any': any value the provider takes; '-': not accepted")
    return 0
