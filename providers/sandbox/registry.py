"""Which simulator serves which provider (import paths, loaded on demand)."""

from __future__ import annotations

import importlib

from providers.sandbox.base import SimConfig, Simulator

# Mounted under /{name} by the sandbox server; a provider's sandbox base URL is that path.
SIMULATORS: dict[str, str] = {
    "replicate": "providers.sandbox.replicate:ReplicateSimulator",
    "sora": "providers.sandbox.sora:SoraSimulator",
    "veo": "providers.sandbox.veo:VeoSimulator",
    "kling": "providers.sandbox.kling:KlingSimulator",
    "runway": "providers.sandbox.runway:RunwaySimulator",
    "fal": "providers.sandbox.fal:FalSimulator",
    "suno": "providers.sandbox.suno:SunoGatewaySimulator",  # new-api gateway task format
    "suno-api": "providers.sandbox.suno:SunoApiSimulator",  # sunoapi.org format
    "gateway-kling": "providers.sandbox.gateway:KlingGatewaySimulator",  # Kling through a new-api gateway
    "openai": "providers.sandbox.openai_images:OpenAIImagesSimulator",
    "gemini": "providers.sandbox.gemini:GeminiImageSimulator",
    "midjourney": "providers.sandbox.midjourney:MidjourneySimulator",  # midjourney-proxy through new-api
    "newapi": "providers.sandbox.newapi_video:NewApiVideoSimulator",  # new-api unified video tasks
    "luma": "providers.sandbox.luma:LumaSimulator",
    "minimax": "providers.sandbox.minimax:MinimaxSimulator",
    "doubao": "providers.sandbox.doubao:DoubaoSimulator",
    "dashscope": "providers.sandbox.dashscope:DashScopeSimulator",
    "xai": "providers.sandbox.xai:XaiSimulator",
    "jimeng": "providers.sandbox.jimeng:JimengSimulator",
    "vidu": "providers.sandbox.vidu:ViduSimulator",
    "ideogram": "providers.sandbox.ideogram:IdeogramSimulator",
    "stability": "providers.sandbox.stability:StabilitySimulator",
    "bfl": "providers.sandbox.bfl:BflSimulator",
}


def create(provider: str, config: SimConfig | None = None) -> Simulator:
    module_name, _, cls_name = SIMULATORS[provider].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    sim: Simulator = cls(config)
    return sim
