"""The ``atelier`` command: a composition root (it builds the server, the worker, the dev stack and
the client from settings; nothing imports it)."""

from orchestrator.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
