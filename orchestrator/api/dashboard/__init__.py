"""The web dashboard at ``/dashboard``: server-rendered pages, a session cookie, and a small script.

Templates and static files ship as package data (``pyproject.toml``); nothing is fetched from
elsewhere at runtime.
"""

from orchestrator.api.dashboard.pages import router

__all__ = ["router"]
