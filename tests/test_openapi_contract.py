"""The OpenAPI contract, checked by schemathesis against the real API (issue 18).

Every operation of ``/openapi.json`` is called with generated requests (its examples, the coverage
phase's edge cases and fuzzed ones, valid and invalid) over loopback HTTP, against a real Redis,
with a valid API key, and each answer goes through all of schemathesis' checks: no server error,
every status code and content type documented, the body matching its schema, valid data accepted,
invalid data refused, the ``Allow`` header, missing auth refused... ``/docs`` and ``/redoc`` are
checked to load every asset from Atelier itself.

The stack runs without its worker: generated requests carry webhook URLs and media inputs on
public hosts, and a worker would deliver to and fetch from them. The API's contract does not need
the worker; jobs stay queued.

Run by hand with more examples: ``ATELIER_CONTRACT_EXAMPLES=100 .venv/bin/python -m pytest -q
tests/test_openapi_contract.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from orchestrator.api.app import create_app
from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.redis_server import RedisServer
from orchestrator.infra.settings import Settings
from orchestrator.store import keys
from orchestrator.store.tenants import hash_key

MAX_EXAMPLES = int(os.environ.get("ATELIER_CONTRACT_EXAMPLES", "8"))

# Whether a request is valid here depends on more than its JSON Schema can say: for these operations a
# schema-valid request may be refused with a 4xx problem naming the field (positive_data_acceptance
# otherwise expects 2xx). Each with why the schema cannot say it.
SEMANTIC_REFUSALS: dict[tuple[str, str], tuple[list[str], str]] = {
    ("POST", "/v1/jobs"): (["422"], "the model catalog and the provider's adapter decide which provider, "
                                    "model, kind and inputs go together (GET /v1/models lists them)"),
    ("POST", "/v1/batches"): (["422"], "an atomic batch refuses itself when the catalog refuses an item"),
    ("GET", "/v1/usage"): (["422"], "the period spans at most 400 days and `from` comes before `to`"),
    ("POST", "/v1/uploads"): (["415", "422"], "the file's bytes must be an image, video or audio file"),
}

# Facades answer in their provider's error shape (OpenAI, Replicate, fal), not problem+json; their
# contract is the official SDKs' tests (tests/test_facade_*.py). They are not in /openapi.json either.
FACADES = r"^/(openai|replicate|fal)/"


class BackgroundStack:
    """``dev_stack`` on its own event loop in a thread: schemathesis' pytest integration calls the API
    synchronously (requests), which would block a loop shared with the server."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.ready = threading.Event()
        self.stack: Stack | None = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        try:
            async with dev_stack(redis_url=self.redis_url, run_worker=False, log_format="text") as stack:
                self.loop, self.stop, self.stack = asyncio.get_running_loop(), asyncio.Event(), stack
                self.ready.set()
                await self.stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self.error = exc
            self.ready.set()

    def __enter__(self) -> Stack:
        self.thread.start()
        self.ready.wait(60)
        if self.stack is None:
            raise RuntimeError(f"the API did not start: {self.error!r}")
        return self.stack

    def __exit__(self, *_: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def contract_stack(redis_server: RedisServer) -> Iterator[Stack]:
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    with BackgroundStack(redis_server.url) as stack:
        # API_KEY for the stack's tenant, stored as create_api_key stores one (hashed)
        client, digest = redis.Redis.from_url(redis_server.url), hash_key(API_KEY)
        client.hset(keys.api_key(digest), mapping={"tenant": "dev", "created_at": "2026-01-01T00:00:00+00:00",
                                                   "prefix": API_KEY[:8]})
        client.sadd(keys.tenant_api_keys("dev"), digest)
        yield stack


def contract_config() -> schemathesis.Config:
    operations: list[dict[str, Any]] = [
        {"include-name": f"{method} {path}", "checks": {"positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "403", "404", "409", *statuses]}}}
        for (method, path), (statuses, _why) in SEMANTIC_REFUSALS.items()]
    return schemathesis.Config.from_dict({"request-timeout": 10, "operations": operations})


# The document is built from the app at collection time (schemathesis' pytest integration parametrizes
# at import; its fixture-based loader does not run on pytest 9.2); the test below checks that the API
# serves this same document.
DOCUMENT = create_app(Settings(redis_url="redis://127.0.0.1:1")).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=contract_config()).exclude(path_regex=FACADES)


# The API key the generated requests carry. Known at collection (the examples phase builds its cases
# then) and given through an auth provider, not a header on each call, so that schemathesis knows it
# is the key: it also sends requests without it, or with a wrong one, and expects a 401.
API_KEY = "atl_contract_" + secrets.token_urlsafe(24)


@schema.auth(refresh_interval=None)
class AtelierApiKey:
    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
        return API_KEY

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_every_operation_keeps_its_contract(case: schemathesis.Case, contract_stack: Stack) -> None:
    case.call_and_validate(base_url=contract_stack.api_url)


def test_the_api_serves_the_document_under_test(contract_stack: Stack) -> None:
    assert httpx.get(f"{contract_stack.api_url}/openapi.json").json() == DOCUMENT


def test_the_schema_declares_auth_errors_sse_and_examples(contract_stack: Stack) -> None:
    doc = httpx.get(f"{contract_stack.api_url}/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "API key" in scheme["description"]
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert submit["security"] == [{"ApiKey": []}]
    assert {"400", "401", "404", "409", "413", "415", "422", "503"} <= set(submit["responses"])
    for status in ("401", "422"):
        assert set(submit["responses"][status]["content"]) == {"application/problem+json"}
    assert submit["requestBody"]["content"]["application/json"]["example"]["provider"] == "replicate"
    assert submit["responses"]["202"]["content"]["application/json"]["example"]["object"] == "job"
    query = doc["paths"]["/v1/jobs/query"]["post"]
    assert "ids" in query["requestBody"]["content"]["application/json"]["example"]
    assert "ids" in doc["components"]["schemas"]["JobQuery"]["properties"]
    assert "example" in doc["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]
    for path in ("/v1/jobs/{job_id}/stream", "/v1/batches/{batch_id}/stream"):
        assert set(doc["paths"][path]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert not any(re.match(FACADES, path) for path in doc["paths"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_atelier(contract_stack: Stack, page: str) -> None:
    with httpx.Client(base_url=contract_stack.api_url, timeout=10) as client:
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
        assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
        assert any(u.endswith(".js") for u in assets), html.text
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from another origin"
        for url in assets:
            resp = client.get(url)
            assert resp.status_code == 200 and len(resp.content) > 1000, url
        assert "/openapi.json" in html.text
