"""The client package (clients/python): its wire schemas are the server's, it installs alone in a fresh
virtualenv, its README example runs against a real stack, and its calls (run, upload, webhook
endpoints, verify_webhook) work end to end."""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import Distribution, distribution
from pathlib import Path
from typing import Any

import atelier_client
import atelier_client.wire
import pytest
from atelier_client import (
    AsyncClient,
    BatchWebhookEvent,
    Client,
    ConflictError,
    InvalidRequestError,
    JobEvent,
    JobStatus,
    JobView,
    JobWebhookEvent,
    NotFoundError,
    OtherWebhookEvent,
    UploadView,
    WaitTimeoutError,
    WebhookVerificationError,
    verify_webhook,
)
from atelier_client.wire.signing import sign
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

import orchestrator.wire
from providers.sandbox import media
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
         "input": {"prompt": "a fox"}}


# -- the wire schemas: one contract, two copies ------------------------------------------------------

def _wire_modules(package: Any) -> dict[str, Any]:
    return {m.name: importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__)}


def _models(module: Any) -> dict[str, type[BaseModel]]:
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__}


def _constants(module: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(module).items()
            if name.isupper() and isinstance(value, int | float | str | tuple | frozenset)}


def test_the_client_carries_the_servers_wire_schemas_exactly():
    server, client = _wire_modules(orchestrator.wire), _wire_modules(atelier_client.wire)
    fix = "copy them over with `make client-wire` (clients/python/atelier_client/wire is a copy of orchestrator/wire)"
    assert sorted(client) == sorted(server), f"the client's wire modules differ from the server's: {fix}"
    compared = 0
    for name, module in server.items():
        theirs, ours = _models(module), _models(client[name])
        assert sorted(ours) == sorted(theirs), f"wire/{name}.py: the models differ: {fix}"
        for model_name, model in theirs.items():
            for mode in ("validation", "serialization"):
                assert ours[model_name].model_json_schema(mode=mode) == model.model_json_schema(mode=mode), \
                    f"wire/{name}.py {model_name} ({mode} schema) differs: {fix}"
                compared += 1
        assert _constants(client[name]) == _constants(module), f"wire/{name}.py: constants differ: {fix}"
    assert compared > 40  # jobs, batches, webhooks, models, uploads, events...
    # The schemas match, and so do the validators behind them (metadata nested too deep is refused by both).
    from orchestrator.wire.jobs import JobRequest as ServerRequest
    deep: dict[str, Any] = {}
    for _ in range(20):
        deep = {"a": deep}
    bad = {"provider": "p", "kind": "image", "model": "m", "metadata": deep}
    for model in (ServerRequest, atelier_client.JobRequest):
        with pytest.raises(ValueError, match="nested more than 16 levels"):
            model.model_validate(bad)


def test_the_sdk_path_is_the_client_package():
    from orchestrator.sdk import client as sdk

    assert sdk.Client is Client and sdk.verify_webhook is verify_webhook
    assert set(atelier_client.__all__) <= set(dir(sdk))


# -- a fresh virtualenv ----------------------------------------------------------------------------

def _closure(names: list[str]) -> list[Distribution]:
    """The installed distributions ``names`` need (their requirements, recursively, for this platform)."""
    found: dict[str, Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        dist = found[name] = distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def _declared(pyproject: Path) -> list[str]:
    text = pyproject.read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block is not None
    return [Requirement(r).name for r in re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)]


def _venv_with(tmp: Path, dists: list[Distribution]) -> Path:
    """A new virtualenv (no system site-packages) holding ``dists`` (linked from this one), nothing else."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for dist in dists:
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            target = Path(str(dist.locate_file(top)))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)
    return venv


def _example(readme: Path) -> str:
    found = re.search(r"## Example.*?```python\n(.*?)```", readme.read_text(), re.S)
    assert found is not None, "the client README has an ## Example with a python block"
    return found.group(1)


@pytest.mark.timeout(300)
async def test_the_client_installs_alone_and_its_readme_example_runs(stack, tmp_path):
    declared = _declared(CLIENT / "pyproject.toml")
    assert sorted(declared) == ["httpx", "pydantic"]
    source = tmp_path / "src"  # built from a copy: a build leaves build/ and *.egg-info behind
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = await asyncio.to_thread(_venv_with, tmp_path, _closure(declared))
    python = str(venv / "bin" / "python")

    def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ATELIER_", "VIRTUAL_ENV"))}
        return subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=kw.pop("cwd", tmp_path),
                              env=env | kw.pop("env", {}), **kw)

    # Its dependencies are there (linked), so pip resolves them without fetching; only the build backend
    # comes from the package index, as for any source install.
    installed = await asyncio.to_thread(run, python, "-m", "pip", "install", "--quiet", str(source))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    check = await asyncio.to_thread(run, python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout
    probe = ("import sys, atelier_client, pathlib; "
             "print(pathlib.Path(atelier_client.__file__).parent.name, pathlib.Path(atelier_client.__file__)"
             ".with_name('py.typed').exists(), sorted(m for m in ('orchestrator', 'providers', 'fastapi', 'redis', "
             "'starlette', 'rich') if any(k == m or k.startswith(m + '.') for k in sys.modules)))")
    probed = await asyncio.to_thread(run, python, "-c", probe)
    assert probed.returncode == 0, probed.stderr
    assert probed.stdout.split(None, 2) == ["atelier_client", "True", "[]\n"]
    server = await asyncio.to_thread(run, python, "-c", "import orchestrator")
    assert server.returncode != 0  # nothing of the server came along

    script = tmp_path / "example.py"
    script.write_text(_example(CLIENT / "README.md"))
    env = {"ATELIER_URL": stack.api_url, "ATELIER_API_KEY": stack.api_key}
    ran = await asyncio.to_thread(run, python, str(script), env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "fox: succeeded" in ran.stdout
    saved = [Path(tmp_path, line.removeprefix("saved ")) for line in ran.stdout.splitlines()
             if line.startswith("saved ")]
    assert len(saved) == 1 and saved[0].is_file() and saved[0].stat().st_size > 0
    assert len(list((tmp_path / "renders").iterdir())) == 2  # the fox, and its edit


# -- the calls, against the real stack --------------------------------------------------------------

async def test_run_returns_the_finished_job_and_reports_each_update(stack):
    def scenario() -> None:
        with Client(stack.api_url, stack.api_key) as c:
            updates: list[Any] = []
            job = c.run(IMAGE, on_update=updates.append, timeout=30)
            assert job.status == JobStatus.succeeded and job.outputs
            assert [u.status for u in updates][-1] == JobStatus.succeeded
            assert all(isinstance(u, JobEvent) for u in updates)
            # A failure is returned, not raised: the caller reads status and error.
            failed = c.run(IMAGE | {"input": {"prompt": "[sim:fail]"}}, timeout=30)
            assert failed.status == JobStatus.failed and failed.error is not None
            # The same key is the same job, even through run.
            again = c.run(IMAGE, idempotency_key="run-twice", timeout=30)
            assert c.run(IMAGE, idempotency_key="run-twice", timeout=30).id == again.id
            with pytest.raises(WaitTimeoutError):
                c.run(IMAGE | {"input": {"prompt": "slow [sim:run=30]"}}, timeout=0.5)
            with pytest.raises(InvalidRequestError) as refused:
                c.run(IMAGE | {"provider": "nope"})
            assert refused.value.errors[0]["field"] == "provider"

    await asyncio.to_thread(scenario)
    async with AsyncClient(stack.api_url, stack.api_key) as c:
        job = await c.run(IMAGE, timeout=30, stream=False, poll_interval=0.1)
        assert job.status == JobStatus.succeeded


async def test_upload_then_use_it_as_a_jobs_input_image(stack, tmp_path):
    picture = media.png("upload", 64, 48)
    path = tmp_path / "photo.png"
    path.write_bytes(picture)
    async with AsyncClient(stack.api_url, stack.api_key) as c:
        upload = await c.upload(path)
        assert isinstance(upload, UploadView) and upload.filename == "photo.png"
        assert (upload.content_type, upload.bytes, upload.width, upload.height) == ("image/png", len(picture), 64, 48)
        job = await c.run({"provider": "bfl", "kind": "image", "model": "flux-kontext-pro",
                           "input": {"prompt": "as a watercolour", "image_url": upload.url}}, timeout=30)
        assert job.status == JobStatus.succeeded, job.error
        sent = stack.simulators["bfl"].tasks[job.provider_task_id].input
        assert base64.b64decode(sent["input_image"]) == picture  # the provider got our file's bytes
        from_bytes = await c.upload(picture)  # bytes, without a name of their own
        assert from_bytes.filename == "upload" and from_bytes.sha256 == upload.sha256 and from_bytes.id != upload.id


async def test_webhook_endpoints_through_the_client_and_typed_events(stack):
    receiver = WebhookReceiver()
    async with serving(receiver.app) as hook, AsyncClient(stack.api_url, stack.api_key) as c:
        created = await c.create_webhook_endpoint(f"{hook}/hook", events=["job.succeeded", "batch.completed"],
                                                  description="tests")
        assert created.secret.startswith("whsec_") and created.events == ["job.succeeded", "batch.completed"]
        assert [e.id for e in (await c.list_webhook_endpoints()).data] == [created.id]
        job = await c.run(IMAGE, timeout=30)
        batch = await c.submit_batch([IMAGE])  # its job succeeds too, then the batch completes
        await c.wait_batch(batch.id, timeout=30, poll_interval=0.1)
        await receiver.wait(3)
        events = [verify_webhook(created.secret, h, b) for h, b in receiver.deliveries]
        job_events = [e for e in events if isinstance(e, JobWebhookEvent)]
        assert sorted(e.type for e in job_events) == ["job.succeeded", "job.succeeded"]
        job_event = next(e for e in job_events if e.data.id == job.id)
        assert isinstance(job_event.data, JobView) and job_event.data.outputs and job_event.sequence > 0
        [batch_event] = [e for e in events if isinstance(e, BatchWebhookEvent)]
        assert batch_event.type == "batch.completed" and batch_event.data.id == batch.id

        page = await c.list_webhook_deliveries(created.id)
        assert sorted(d.event_type for d in page.data) == ["batch.completed", "job.succeeded", "job.succeeded"]
        delivered = next(d for d in page.data if d.job_id == job.id)
        deadline = time.monotonic() + 10
        while (await c.get_webhook_delivery(created.id, delivered.id)).status != "delivered":
            assert time.monotonic() < deadline, "the delivery was not recorded as delivered"
            await asyncio.sleep(0.05)
        replayed = await c.replay_webhook_delivery(created.id, delivered.id)
        assert replayed.id == delivered.id
        await receiver.wait(4)
        assert receiver.deliveries[-1][0]["webhook-id"] == delivered.id  # the same message, sent again

        rotated = await c.rotate_webhook_endpoint_secret(created.id, grace_period_seconds=60)
        assert rotated.secret != created.secret and len(rotated.previous_secrets_expire_at) == 1
        assert (await c.get_webhook_endpoint_secret(created.id)).secret == rotated.secret
        recovery = await c.recover_webhook_deliveries(created.id, datetime(2020, 1, 1, tzinfo=UTC))
        assert recovery.recovered == 0 and not recovery.more  # nothing is dead
        updated = await c.update_webhook_endpoint(created.id, {"enabled": False})
        assert not updated.enabled
        with pytest.raises(ConflictError):
            await c.replay_webhook_delivery(created.id, delivered.id)  # disabled: enable it first
        await c.delete_webhook_endpoint(created.id)
        with pytest.raises(NotFoundError):
            await c.get_webhook_endpoint(created.id)


def test_verify_webhook_types_refuses_and_tolerates():
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    job = {"type": "job.running", "timestamp": "2026-01-01T00:00:00+00:00", "sequence": 3, "data": {"id": "x"}}
    other = {"type": "account.updated", "timestamp": "2026-01-01T00:00:00+00:00", "data": {"plan": "pro"}}

    def signed(body: dict[str, Any], at: int | None = None) -> tuple[dict[str, str], bytes]:
        raw = json.dumps(body).encode()
        stamp = at or int(time.time())
        return {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(stamp),
                "Webhook-Signature": sign(secret, "msg_1", stamp, raw)}, raw

    assert isinstance(verify_webhook(secret, *signed(other)), OtherWebhookEvent)  # a newer event type
    with pytest.raises(WebhookVerificationError, match="not an Atelier event"):
        verify_webhook(secret, *signed(job))  # signed, but its data is not a job
    headers, raw = signed(other, at=int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError, match="stale"):
        verify_webhook(secret, headers, raw)
    assert verify_webhook(secret, headers, raw, tolerance=None).type == "account.updated"
