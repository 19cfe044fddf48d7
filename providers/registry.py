"""The explicit list of provider adapters, and building them from settings."""

from __future__ import annotations

from providers.bfl import BflProvider
from providers.contract import Provider, ProviderSettings
from providers.dashscope import DashScopeProvider
from providers.doubao import DoubaoProvider
from providers.fal import FalProvider
from providers.gemini import GeminiProvider
from providers.ideogram import IdeogramProvider
from providers.jimeng import JimengProvider
from providers.kling import KlingProvider
from providers.luma import LumaProvider
from providers.midjourney import MidjourneyProvider
from providers.minimax import MinimaxProvider
from providers.newapi import NewApiProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.runway import RunwayProvider
from providers.sora import SoraProvider
from providers.stability import StabilityProvider
from providers.suno import SunoProvider
from providers.veo import VeoProvider
from providers.vidu import ViduProvider
from providers.xai import XaiProvider

ADAPTERS: dict[str, type[Provider]] = {
    "bfl": BflProvider,
    "dashscope": DashScopeProvider,
    "doubao": DoubaoProvider,
    "fal": FalProvider,
    "gemini": GeminiProvider,
    "ideogram": IdeogramProvider,
    "jimeng": JimengProvider,
    "kling": KlingProvider,
    "luma": LumaProvider,
    "midjourney": MidjourneyProvider,
    "minimax": MinimaxProvider,
    "newapi": NewApiProvider,
    "openai": OpenAIProvider,
    "replicate": ReplicateProvider,
    "runway": RunwayProvider,
    "sora": SoraProvider,
    "stability": StabilityProvider,
    "suno": SunoProvider,
    "veo": VeoProvider,
    "vidu": ViduProvider,
    "xai": XaiProvider,
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
