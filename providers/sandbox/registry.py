"""Which simulator serves which provider (import paths, loaded on demand)."""

from __future__ import annotations

import importlib

from providers.sandbox.base import SimConfig, Simulator

SIMULATORS: dict[str, str] = {
    "replicate": "providers.sandbox.replicate:ReplicateSimulator",
}


def create(provider: str, config: SimConfig | None = None) -> Simulator:
    module_name, _, cls_name = SIMULATORS[provider].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    sim: Simulator = cls(config)
    return sim
