"""The client SDK's original import path, kept for code written against earlier versions:
``from orchestrator.client import Client`` still works. New code imports ``atelier_client`` (clients/python)."""

from orchestrator.sdk.client import *  # noqa: F403
from orchestrator.sdk.client import __all__  # noqa: F401
