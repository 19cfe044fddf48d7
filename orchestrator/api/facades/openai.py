"""The OpenAI facade under ``/openai/v1``: Images and Videos over Atelier jobs.

Point the official ``openai`` package at it (``base_url=<atelier>/openai/v1``, ``api_key=<an
Atelier API key>``). See ``openai_shared`` for model naming, sizes and errors.
"""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.api.facades import openai_images, openai_videos
from orchestrator.api.facades.openai_shared import OpenAIError, OpenAIRoute

# Request bodies under /openai/v1 may carry input images (edits, input_reference; each at most 50 MB).
MAX_BODY_BYTES = 64 * 1024 * 1024

router = APIRouter(include_in_schema=False)
router.include_router(openai_images.router)
router.include_router(openai_videos.router)

fallback = APIRouter(prefix="/openai/v1", route_class=OpenAIRoute, include_in_schema=False)


@fallback.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(path: str) -> None:
    """Anything else under ``/openai/v1`` (files, chat...): an OpenAI-shaped 404."""
    raise OpenAIError(404, f"Atelier's OpenAI facade has no route /{path} (it serves images/generations, "
                           "images/edits and videos)", code="unknown_url")


router.include_router(fallback)
