"""Metrics and logs on the real stack: the series an operator needs exist after a job, and no log line
carries a provider key, an API key or a signed URL's query string. Also: Redis through Sentinel,
presigned URLs for a public S3 endpoint, and the worker's own metrics port."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.cli.devstack import dev_stack
from orchestrator.domain.job import Job
from orchestrator.infra import logs, metrics
from orchestrator.infra.redis_server import find_redis_server, free_port
from orchestrator.infra.storage import Spooled, open_storage
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from orchestrator.wire.jobs import JobInput, JobKind, JobStatus
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, sim_faults, submit, wait_for
from workers import context
from workers.main import run as run_worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has(samples: Samples, name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= ls for (n, ls) in samples)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


# -- metrics ---------------------------------------------------------------------------------

async def test_metrics_endpoint_exposes_the_series_after_jobs_run(stack):
    before = await scrape(f"{stack.api_url}/metrics")
    receiver = WebhookReceiver(fail_first=1)
    async with serving(receiver.app) as hook_base, api(stack) as client:
        await sim_faults(stack, "replicate", {"kind": "429", "route": "create", "count": 1, "retry_after": 0.2},
                         {"kind": "500", "route": "get", "count": 1})
        job = await submit(client, webhook_url=f"{hook_base}/hook", input={"prompt": "a heron"})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        await receiver.wait(2)
        slow = await submit(client, input={"prompt": "slow [sim:run=30]"})
        await wait_for(client, slow["id"], {"running"})
        assert (await client.post(f"/v1/jobs/{slow['id']}/cancel")).status_code == 200
        forged = await client.post("/v1/callbacks/replicate", content=b'{"id": "x"}',
                                   headers={"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())),
                                            "webhook-signature": "v1,AAAA"})
        assert forged.status_code == 401
    after = await scrape(f"{stack.api_url}/metrics")

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return total(after, name, **labels) - total(before, name, **labels) >= by

    r = {"provider": "replicate"}
    image = {"provider": "replicate", "kind": "image"}
    for status in ("queued", "submitting", "submitted", "running", "succeeded", "canceled"):
        assert grew("atelier_jobs_total", status=status, **image), status
    assert grew("atelier_jobs_throttled_total", **r)
    for histogram in ("atelier_job_queued_seconds", "atelier_job_provider_seconds", "atelier_job_collect_seconds"):
        assert grew(f"{histogram}_count", **image), histogram
        assert has(after, f"{histogram}_bucket", le="+Inf", **image)
    assert grew("atelier_job_polls_count", by=2, **r)
    assert grew("atelier_provider_requests_total", method="POST", endpoint="/v1/models/{model}/predictions",
                status="429", **r)
    assert grew("atelier_provider_requests_total", method="POST", endpoint="/v1/models/{model}/predictions",
                status="201", **r)
    assert grew("atelier_provider_requests_total", method="GET", endpoint="/v1/predictions/{id}", status="500", **r)
    assert grew("atelier_provider_requests_total", method="POST", endpoint="/v1/predictions/{id}/cancel", **r)
    assert grew("atelier_provider_rate_limited_total", **r)
    assert grew("atelier_provider_request_seconds_count", **r)
    assert grew("atelier_webhook_deliveries_total", by=2, outcome="delivered")
    assert grew("atelier_webhook_deliveries_total", outcome="retry")
    assert grew("atelier_webhook_delivery_seconds_count", outcome="delivered")
    assert grew("atelier_callback_verifications_failed_total", provider="replicate", reason="signature")
    # Read from Redis at scrape time.
    for state in ("due", "deferred"):
        for queue in (stack.settings.queue_name, stack.settings.webhook_queue_name):
            assert has(after, "atelier_queue_jobs", queue=queue, state=state)
    assert total(after, "atelier_redis_up") == 1
    for gauge in ("atelier_jobs_active", "atelier_jobs_overdue", "atelier_webhook_deliveries_pending"):
        assert has(after, gauge)
    assert total(after, "atelier_provider_keys", provider="replicate") == 1
    # Labels stay few: no job ids, tenants, models or task ids.
    for (name, labels) in after:
        if name.startswith("atelier_"):
            for _, value in labels:
                assert not value.startswith(("job_", "dev")) and "flux" not in value, (name, labels)


async def test_a_waiting_job_is_a_scheduled_poll_not_a_queue_entry(stack):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "slow [sim:run=30]"})
        await wait_for(client, job["id"], {"running"})
    samples = await scrape(f"{stack.api_url}/metrics")
    assert total(samples, "atelier_jobs_active") >= 1
    # The next poll waits on the replicate key's poll board: no worker slot, no queue entry.
    assert total(samples, "atelier_polls_waiting", provider="replicate", state="scheduled") >= 1


async def test_a_key_that_left_the_pool_is_counted(stack):
    rt = await Runtime.open(stack.settings)
    try:
        provider = rt.registry.get("replicate")
        assert provider is not None
        # Submitted: it must be followed with the key that submitted it (a queued job picks another).
        job = Job(id="job_keyless", tenant="dev", provider="replicate", kind=JobKind.image, model="m",
                  input=JobInput(prompt="x"), key_id="000000000000", status=JobStatus.submitted)
        before = metrics.KEY_MISSING.labels("replicate")._value.get()
        with pytest.raises(keypool.KeyUnavailable, match="no longer configured"):
            context.call_context(rt, provider, job)
        assert metrics.KEY_MISSING.labels("replicate")._value.get() == before + 1
    finally:
        await rt.close()


def test_endpoint_templates_keep_label_cardinality_low():
    t = metrics.endpoint_template
    assert t("/v1/predictions") == "/v1/predictions"
    assert t("/v1/predictions/ufawqhfynnddngldkgtslldrkq/cancel") == "/v1/predictions/{id}/cancel"
    assert t("/v1/models/black-forest-labs/flux-schnell/predictions") == "/v1/models/{model}/predictions"
    assert t("/v1/models/meta/musicgen/predictions") == "/v1/models/{model}/predictions"
    assert t("/v1beta/models/veo-3.0-generate-preview:predictLongRunning") == \
        "/v1beta/models/{model}:predictLongRunning"
    assert t("/v1beta/models/veo-3.0/operations/abc123") == "/v1beta/models/{model}/operations/{id}"
    assert t("/v1/videos/video_68d7512d07848190b3e45da0ecbebcde004da08e1e0678d5/content") == \
        "/v1/videos/{id}/content"
    assert t("/v1/image_to_video") == "/v1/image_to_video"
    assert t("/v1/tasks/17af4c7d-7a6a-4b4c-9b1c-0d6f2f7f6a11") == "/v1/tasks/{id}"
    assert t("/fal-ai/flux/dev", model_first=True) == "/{model}"
    assert t("/fal-ai/flux/dev/requests/764cabcf-b745/status", model_first=True) == "/{model}/requests/{id}/status"
    assert t("/fal-ai/kling-video/v2/master/text-to-video/requests/764cabcf-b745-4b3e/cancel", model_first=True) == \
        "/{model}/requests/{id}/cancel"
    classify = metrics.ProviderClassifier({"replicate": "http://127.0.0.1:9/replicate", "fal": "https://queue.fal.run"})
    assert classify(httpx.URL("http://127.0.0.1:9/replicate/v1/predictions?x=1")) == ("replicate", "/v1/predictions")
    assert classify(httpx.URL("https://replicate.delivery/abc/out.png")) == ("other", "other")
    assert classify(httpx.URL("https://queue.fal.run/fal-ai/flux/dev")) == ("fal", "/{model}")
    classify = metrics.ProviderClassifier({"replicate": "https://api.replicate.com"})
    for n in range(metrics.MAX_ENDPOINTS_PER_PROVIDER + 5):
        classify(httpx.URL(f"https://api.replicate.com/v1/x{chr(97 + n % 26)}{chr(97 + n // 26)}"))
    assert len(classify.seen["replicate"]) == metrics.MAX_ENDPOINTS_PER_PROVIDER
    assert classify(httpx.URL("https://api.replicate.com/v1/zzz"))[1] == "other"


async def test_worker_serves_its_own_metrics_and_health(redis_url):
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text") as stack:
        port = free_port()
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(stack.settings, stop=stop, completion_wait=2.0, metrics_port=port,
                                                metrics_host="127.0.0.1"))
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as plain:
                for _ in range(100):
                    try:
                        if (await plain.get(f"{base}/healthz")).status_code == 200:
                            break
                    except httpx.ConnectError:
                        pass
                    await asyncio.sleep(0.05)
                assert (await plain.get(f"{base}/healthz")).json() == {"status": "ok"}
            async with api(stack) as client:
                job = await submit(client)
                assert (await wait_for(client, job["id"]))["status"] == "succeeded"
            samples = await scrape(f"{base}/metrics")
            assert has(samples, "atelier_jobs_total", provider="replicate", status="succeeded")
            assert has(samples, "atelier_queue_jobs", queue=stack.settings.queue_name, state="due")
            assert has(samples, "process_cpu_seconds_total") or sys.platform != "linux"
        finally:
            stop.set()
            await worker
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.ConnectError):
                await plain.get(f"{base}/healthz")


def test_cli_healthcheck_and_worker_metrics_flag(tmp_path):
    def atelier(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=60)

    dead = atelier("healthcheck", "--url", f"http://127.0.0.1:{free_port()}/healthz", "--timeout", "0.5")
    assert dead.returncode == 1 and "unhealthy" in dead.stderr
    help_text = atelier("worker", "--help").stdout
    assert "--metrics-port" in help_text and "ATELIER_WORKER_METRICS_PORT" in help_text


async def test_cli_healthcheck_against_a_running_api(stack):
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", "healthcheck", "--url",
                         f"http://127.0.0.1:{free_port()}/healthz", "--url", f"{stack.api_url}/healthz"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- logs --------------------------------------------------------------------------------------

DISTINCT_KEY = "r8_Qm9vZGxlc0FyZU5pY2VBbmRTZWNyZXQ1234"
RAW = io.StringIO()
LEAKS = re.compile(r"signature=[^\[&\s]|X-Amz-Signature|X-Amz-Credential|token=[^\[&\s]", re.I)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Logging as `atelier serve`/`worker` configure it (JSON), at DEBUG, captured."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "arq", "uvicorn.access",
                                                              "botocore", "boto3", "urllib3", "s3transfer")}
    logs.configure("json", "DEBUG")
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    # Also the raw records, before the formatter's last-line-of-defence redaction: code must not rely on it.
    raw = logging.StreamHandler(RAW)
    raw.setFormatter(logging.Formatter("%(name)s %(message)s %(job_id)s %(provider)s", defaults={
        "job_id": "", "provider": ""}))
    RAW.seek(0)
    RAW.truncate()
    root.handlers[:] = [handler, raw]
    try:
        yield buffer
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


async def test_no_log_line_carries_a_secret(redis_url, captured_logs):
    receiver = WebhookReceiver(fail_first=1)
    async with dev_stack(redis_url=redis_url, replicate_api_key=DISTINCT_KEY,
                         webhook_retry_schedule="0,0.2") as stack, \
            serving(receiver.app) as hook_base, api(stack) as client:
        job = await submit(client, webhook_url=f"{hook_base}/hook?token=receiver-secret-token",
                           input={"prompt": "a red fox", "num_outputs": 2})
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        for output in done["outputs"]:
            assert (await client.get(output["url"])).status_code == 200  # signed URLs, fetched
        await receiver.wait(1)
        # A job that fails at the provider and a dead-lettered webhook: the error paths log too.
        await sim_faults(stack, "replicate", {"kind": "500", "route": "get", "count": 2})
        failing = await submit(client, webhook_url=f"http://127.0.0.1:{free_port()}/gone?signature=abc",
                               input={"prompt": "x [sim:fail]"})
        await wait_for(client, failing["id"])
        forged = await client.post(f"/v1/callbacks/replicate?job={failing['id']}&token=guess",
                                   content=b"{}", headers={"authorization": f"Bearer {DISTINCT_KEY}"})
        assert forged.status_code == 401
        assert (await client.get("/v1/jobs", headers={"authorization": "Bearer atl_wrong"})).status_code == 401
        for _ in range(100):
            if '"event": "webhook.dead"' in captured_logs.getvalue():
                break
            await asyncio.sleep(0.05)
        api_key = stack.api_key
    lines = [line for line in captured_logs.getvalue().splitlines() if line.strip()]
    assert len(lines) > 10
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    text = "\n".join(lines)
    for secret in (DISTINCT_KEY, "sandbox-key", api_key, "receiver-secret-token"):
        assert secret not in text, f"a log line carries {secret[:6]}..."
    assert not LEAKS.search(text), LEAKS.search(text)
    unredacted = RAW.getvalue()
    assert "job.succeeded" in unredacted
    for secret in (DISTINCT_KEY, "sandbox-key", api_key, "receiver-secret-token"):
        assert secret not in unredacted, f"code logs {secret[:6]}... (only the formatter hid it)"
    assert not LEAKS.search(unredacted), LEAKS.search(unredacted)
    about_jobs = [e for e in entries if "job_id" in e and e["logger"].startswith("atelier")]
    assert any(e.get("event") == "job.succeeded" for e in about_jobs)
    assert any(e.get("event") == "webhook.dead" for e in about_jobs)
    assert any(e.get("event") == "webhook.retry" for e in about_jobs)
    for entry in about_jobs:
        if entry.get("event") != "job.vanished":
            assert {"job_id", "tenant", "provider", "event"} <= set(entry), entry


def test_redaction_of_urls_keys_and_registered_secrets():
    logs.mask_secrets(["fal-key-id:fal-key-secret-value"])
    record = logging.LogRecord("atelier.test", logging.WARNING, __file__, 1,
                               "download https://user:pw@cdn.example.com/a.png?X-Amz-Signature=abc&X-Amz-Credential=k "
                               "failed; auth Key fal-key-id:fal-key-secret-value; retry /v1/files/a?signature=zz",
                               None, None)
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(record)
        assert "pw@" not in line and "X-Amz" not in line and "fal-key-secret-value" not in line
        assert "signature=zz" not in line and "https://cdn.example.com/a.png" in line


def test_atelier_dev_logs_human_readable_text(tmp_path):
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dev", "--port", str(port),
                             "--sandbox-port", str(sandbox_port), "--storage", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        key = next(line.split()[-1] for line in lines if "API key:" in line)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            job = client.post("/v1/jobs", json={"provider": "replicate", "kind": "image",
                                                "model": "black-forest-labs/flux-schnell",
                                                "input": {"prompt": "a fox"}}).json()
            deadline = time.monotonic() + 30
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    job_lines = [line for line in err.splitlines() if f"job_id={job['id']}" in line]
    assert job_lines, err[-2000:]
    for line in job_lines:
        assert not line.startswith("{") and "event=" in line and "provider=replicate" in line and "tenant=" in line


# -- Redis through Sentinel --------------------------------------------------------------------

@pytest.fixture
def sentinel(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Sentinel (redis-server --sentinel) watching the test Redis as primary ``atelier``."""
    primary_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor atelier 127.0.0.1 {primary_port} 1\n")
    proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        import redis as redis_sync

        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_sync.Redis(port=port).sentinel_get_master_addr_by_name("atelier"):
                    break
            except redis_sync.ConnectionError:
                pass
            assert time.monotonic() < deadline, "sentinel did not start"
            time.sleep(0.05)
        yield f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{port}/atelier/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_job_runs_with_redis_through_sentinel(sentinel):
    # The first listed Sentinel is down: the client moves on to the next.
    async with dev_stack(redis_url=sentinel, log_format="text") as stack, api(stack) as client:
        job = await submit(client)
        assert (await wait_for(client, job["id"]))["status"] == "succeeded"
        assert (await client.get("/readyz")).status_code == 200


def test_sentinel_urls_parse():
    from orchestrator.store.queue import SentinelTarget

    target = SentinelTarget.parse("rediss+sentinel://app:p%40ss@s1:26379,[::1]:26380/primary/3?sentinel_password=x")
    assert target.sentinels == [("s1", 26379), ("::1", 26380)]
    assert (target.master, target.db, target.username, target.password, target.sentinel_password, target.ssl) == \
        ("primary", 3, "app", "p@ss", "x", True)
    for bad in ("redis+sentinel://s1/primary", "redis+sentinel://s1:26379/", "redis+sentinel://s1:26379/m/x"):
        with pytest.raises(ValueError):
            SentinelTarget.parse(bad)


# -- S3 behind another address for clients -----------------------------------------------------

async def test_presigned_urls_name_the_public_s3_endpoint(moto_s3_server, tmp_path):
    port = moto_s3_server.rsplit(":", 1)[1]
    public = f"http://localhost:{port}"
    storage = open_storage("s3://renders/out", public_url="http://x", secret="s", s3_endpoint_url=moto_s3_server,
                           s3_public_endpoint_url=public)
    from orchestrator.infra.storage import spool

    async def chunks() -> Any:
        yield b"\x89PNG\r\n\x1a\n" + b"\0" * 64

    spooled: Spooled = await spool(chunks(), 1024)
    with spooled.file:
        await storage.put("t/j/0.png", spooled, "image/png")
    url = await storage.url("t/j/0.png", 60)
    assert url.startswith(f"{public}/renders/out/t/j/0.png?") and "X-Amz-Signature" in url
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(url)).content.startswith(b"\x89PNG")


@pytest.fixture
def moto_s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="renders")
    yield url
    server.stop()
