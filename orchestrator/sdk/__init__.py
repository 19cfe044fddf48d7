"""The Python client SDK: depends only on ``orchestrator.wire``, httpx and pydantic."""
