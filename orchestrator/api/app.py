"""The HTTP API (FastAPI): ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from orchestrator.api import (
    batches,
    callbacks,
    dashboard,
    jobs,
    misc,
    models,
    observability,
    openapi,
    problems,
    streams,
    uploads,
    usage,
    waiting,
    webhook_endpoints,
)
from orchestrator.api.facades import fal as fal_facade
from orchestrator.api.facades import openai as openai_facade
from orchestrator.api.facades import replicate as replicate_facade
from orchestrator.api.limits import BodySizeLimit
from orchestrator.infra.settings import Settings
from orchestrator.services.runtime import Runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = await Runtime.open(settings)
        try:
            yield
        finally:
            await waiting.close_waiters(app.state)  # before the runtime's Redis goes
            await app.state.runtime.close()

    app = FastAPI(
        title="Atelier",
        version="0.1.0",
        summary="One API, one job ID and signed webhooks for hosted image, video and music generation.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # openapi.install serves them with local assets (no CDN)
    )
    problems.install(app)
    openapi.install(app)  # /openapi.json completed (errors as problem+json, examples), /docs, /redoc
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(streams.router)
    app.include_router(webhook_endpoints.router)
    app.include_router(uploads.router)
    app.include_router(misc.router)
    app.include_router(callbacks.router)
    app.include_router(observability.router)
    app.include_router(openai_facade.router)  # /openai/v1: OpenAI Images and Videos over Atelier jobs
    app.include_router(replicate_facade.facade)  # /replicate/v1: Replicate predictions over Atelier jobs
    app.include_router(fal_facade.router)  # /fal: fal's queue API over Atelier jobs
    app.include_router(dashboard.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes,
                       overrides={"/v1/batches": settings.max_batch_request_bytes,
                                  "/v1/uploads": uploads.body_limit(settings.max_upload_bytes),
                                  "/openai/v1/": openai_facade.MAX_BODY_BYTES})
    return app
