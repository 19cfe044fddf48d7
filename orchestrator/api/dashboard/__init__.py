"""The web dashboard at ``/dashboard``: server-rendered pages, a session cookie, and a small script.

Templates and static files ship as package data (``pyproject.toml``); nothing is fetched from
elsewhere at runtime. ``pages`` holds the session, jobs, batches and webhooks pages; ``playground``,
``spend`` and ``operations`` one view each.
"""

from fastapi import APIRouter

from orchestrator.api.dashboard import operations, pages, playground, spend

router = APIRouter()
for part in (pages, playground, spend, operations):
    router.include_router(part.router)

__all__ = ["router"]
