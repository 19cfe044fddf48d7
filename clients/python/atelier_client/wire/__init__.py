"""Atelier's public wire format as this client knows it: request and response schemas, webhook events
and Standard Webhooks signing.

A copy of the server's ``orchestrator.wire`` (with this package's import paths); the server's test
``tests/test_client_package.py`` compares the JSON schemas of both and fails on any difference.
"""
