"""The explicit list of provider adapters, and building them from settings."""

from __future__ import annotations

from providers.contract import Provider, ProviderSettings
from providers.dashscope import DashScopeProvider
from providers.doubao import DoubaoProvider
from providers.fal import FalProvider
from providers.gemini import GeminiProvider
from providers.kling import KlingProvider
from providers.luma import LumaProvider
from providers.midjourney import MidjourneyProvider
from providers.minimax import MinimaxProvider
from providers.newapi import NewApiProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.runway import RunwayProvider
from providers.sora import SoraProvider
from providers.suno import SunoProvider
from providers.veo import VeoProvider

ADAPTERS: dict[str, type[Provider]] = {
    "dashscope": DashScopeProvider,
    "doubao": DoubaoProvider,
    "fal": FalProvider,
    "gemini": GeminiProvider,
    "kling": KlingProvider,
    "luma": LumaProvider,
    "midjourney": MidjourneyProvider,
    "minimax": MinimaxProvider,
    "newapi": NewApiProvider,
    "openai": OpenAIProvider,
    "replicate": ReplicateProvider,
    "runway": RunwayProvider,
    "sora": SoraProvider,
    "suno": SunoProvider,
    "veo": VeoProvider,
}


class Registry:
    """The configured adapters, by provider name."""

    def __init__(self, settings: dict[str, ProviderSettings]) -> None:
        self.providers: dict[str, Provider] = {
            name: ADAPTERS[name](cfg) for name, cfg in settings.items() if name in ADAPTERS
        }

    def get(self, name: str) -> Provider | None:
        return self.providers.get(name)

    def names(self) -> list[str]:
        return sorted(self.providers)
