"""The fault suite's harness: real processes that can be killed, and an audit that proves nothing was lost.

A ``FaultStack`` runs, on loopback:

- a private ``redis-server`` with AOF (``RedisServer(appendonly=True)``), restartable with its data;
- the provider simulators and the API in the test process (``dev_stack(run_worker=False)``);
- one or more ``atelier worker`` processes (``python -m orchestrator.cli worker``), configured
  through ``ATELIER_*`` variables, that the tests kill with SIGKILL and start again;
- a webhook receiver on a fixed port that can go down (port closed) and come back.

``audit()`` then checks every job against its event log, the simulators' creation counters and
the webhooks received, and ``record_figures()`` prints the figures and merges them into
``.atelier/fault-figures.json`` so they can be quoted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook
from starlette.requests import Request
from starlette.responses import Response

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.redis_server import RedisServer, free_port
from providers.sandbox.serve import serving
from tests.helpers import TERMINAL, WebhookReceiver

REPO = Path(__file__).resolve().parents[2]
FIGURES_FILE = REPO / ".atelier" / "fault-figures.json"

# Event types that send a webhook (a job's `webhook_url`), as in orchestrator.webhooks.NOTIFY_STATUSES.
NOTIFY_TYPES = frozenset({"job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out"})

# Settings that make recovery fast enough for tests: a lost job is looked at again one second
# after its work was due, a submission is ambiguous two seconds after it started, and webhooks
# are retried over ~30 s before they would be dead-lettered.
FAST: dict[str, Any] = {
    "log_format": "text",
    "log_level": "WARNING",
    "poll_min_seconds": 0.2,
    "poll_max_seconds": 1.0,
    "sweep_grace_seconds": 1.0,
    "http_timeout_seconds": 2.0,
    "webhook_timeout_seconds": 2.0,
    "webhook_retry_schedule": "0,0.5,1,1,2,2,3,3,5,5,5",
    # The circuit's cool-downs compressed like the retry schedule (5 s doubling to 300 s by default).
    "webhook_circuit_cooldown_seconds": 1.0,
    "webhook_circuit_max_cooldown_seconds": 4.0,
    "worker_max_jobs": 100,
}

# One cheap model per provider with a simulator; `reconciles`: an ambiguous submission can be
# looked up at the provider (so a worker killed mid-submit never fails the job).
MODELS: dict[str, dict[str, Any]] = {
    "replicate": {"kind": "image", "model": "black-forest-labs/flux-schnell", "reconciles": True},
    "kling": {"kind": "video", "model": "kling-v1", "reconciles": True},
    "sora": {"kind": "video", "model": "sora-2", "reconciles": True},
    "fal": {"kind": "image", "model": "fal-ai/flux/schnell", "reconciles": False},
    "minimax": {"kind": "video", "model": "MiniMax-Hailuo-02", "reconciles": False},
    # Ark echoes no prompt: a lost create among like tasks cannot be told apart (AmbiguousMatch).
    "doubao": {"kind": "video", "model": "doubao-seedance-1-0-pro-250528", "reconciles": False},
    # DashScope shows a task's prompt only once it has finished: a lost create among unfinished like
    # tasks is ambiguous until then, and its lookup reads up to 10 tasks; not exact under a storm.
    "dashscope": {"kind": "video", "model": "wan2.2-t2v-plus", "reconciles": False},
}


def job_body(provider: str, tag: str, extra_prompt: str = "", **fields: Any) -> dict[str, Any]:
    """A job request whose prompt is unique (so the simulators can tell a duplicate creation)."""
    spec = MODELS[provider]
    prompt = f"fault suite {tag} {extra_prompt}".strip()
    return {"provider": provider, "kind": spec["kind"], "model": spec["model"], "input": {"prompt": prompt}} | fields


# -- figures -------------------------------------------------------------------------------

def record_figures(scenario: str, figures: dict[str, Any]) -> None:
    """Print ``figures`` and merge them into ``.atelier/fault-figures.json`` (safe under xdist)."""
    figures = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    print(f"\n[fault figures] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(FIGURES_FILE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
        except ValueError:
            data = {}
        data[scenario] = figures
        FIGURES_FILE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- processes -----------------------------------------------------------------------------

class WorkerProcess:
    """One ``atelier worker`` process; its output goes to a log file (shown when a test fails)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        # A metrics port per start: /healthz answers once the worker is up (see ``wait_ready``).
        self.metrics_port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
        log.flush()
        env = self.env | {"ATELIER_WORKER_METRICS_PORT": str(self.metrics_port)}
        self.process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker"], env=env,
                                        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the worker answers /healthz (its Redis connections and arq loops are up)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1.0) as client:
            while time.monotonic() < deadline:
                assert self.alive, f"worker exited at start-up:\n{self.log_tail()}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.metrics_port}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up, arq leases and half-done work stay behind."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.kills += 1

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def exit_codes_note(self) -> str:
        code = self.process.poll() if self.process else None
        return f"running={self.alive} last_exit={code}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class RecordingReceiver(WebhookReceiver):
    """A ``WebhookReceiver`` that also records refused attempts (``failing``: answer 503)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.refused: list[tuple[dict[str, str], bytes]] = []

    async def hook(self, request: Request) -> Response:
        if self.failing:
            self.refused.append((dict(request.headers), await request.body()))
            return Response("receiver is failing", status_code=503)
        return await super().hook(request)


class Receiver:
    """A webhook receiver on a fixed loopback port that can fail (503), go down (port closed) and come
    back."""

    def __init__(self) -> None:
        self.hooks = RecordingReceiver()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._server: contextlib.AbstractAsyncContextManager[str] | None = None

    async def up(self) -> None:
        if self._server is None:
            server = serving(self.hooks.app, port=self.port)
            await server.__aenter__()
            self._server = server

    async def down(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.__aexit__(None, None, None)


# -- the stack -----------------------------------------------------------------------------

@dataclass
class FaultStack:
    stack: Stack
    redis: RedisServer
    workdir: Path
    client: httpx.AsyncClient
    receiver: Receiver
    workers: list[WorkerProcess] = field(default_factory=list)
    redis_restarts: int = 0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # Every job id the API accepted, and what the non-terminal ones were doing at each kill/restart.
    submitted: list[str] = field(default_factory=list)
    # Answers to submissions that were retried: HTTP status codes and transport errors.
    submit_retries: Counter[str] = field(default_factory=Counter)
    in_flight_at_faults: Counter[str] = field(default_factory=Counter)

    # -- workers ---------------------------------------------------------------
    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
        for name, value in self.stack.settings.model_dump(exclude={"providers_file"}).items():
            if isinstance(value, bool):
                env[f"ATELIER_{name.upper()}"] = "true" if value else "false"
            elif isinstance(value, str | int | float) and value is not None:
                env[f"ATELIER_{name.upper()}"] = str(value)
        return env

    def add_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.worker_env(), self.workdir / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        worker.start()
        return worker

    @property
    def kills(self) -> int:
        return sum(w.kills for w in self.workers)

    @property
    def worker_restarts(self) -> int:
        return sum(w.starts - 1 for w in self.workers)

    def worker_logs(self) -> str:
        return "\n".join(f"== worker {i} ({w.exit_codes_note()})\n{w.log_tail()}" for i, w in enumerate(self.workers))

    def assert_workers_alive(self) -> None:
        dead = [i for i, w in enumerate(self.workers) if not w.alive]
        assert not dead, f"worker(s) {dead} exited on their own:\n{self.worker_logs()}"

    async def chaos(self, rng: random.Random, kills: int, every: tuple[float, float],
                    down: tuple[float, float] = (0.0, 0.3)) -> None:
        """Kill a random worker with SIGKILL ``kills`` times at random moments, restarting it each time."""
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(*every))
            worker = rng.choice(self.workers)
            await self.snapshot_in_flight()
            worker.kill()
            await asyncio.sleep(rng.uniform(*down))
            worker.start()
            await worker.wait_ready()

    # -- redis -------------------------------------------------------------------
    async def snapshot_in_flight(self) -> None:
        """Count the accepted jobs that are not finished, by status and phase (figures: what a fault hit)."""
        with contextlib.suppress(httpx.HTTPError):
            for job in (await self.query(list(self.submitted))).values():
                if job["status"] not in TERMINAL:
                    self.in_flight_at_faults[job["status"] + (f"/{job['phase']}" if job["phase"] else "")] += 1

    async def restart_redis(self, down: float = 0.0, *, crash: bool = False) -> None:
        """Stop Redis (SIGTERM: the AOF is flushed; with ``crash``, SIGKILL), stay down ``down`` seconds,
        start it again on the same port and data (the AOF, ``appendfsync everysec``)."""
        await self.snapshot_in_flight()
        await asyncio.to_thread(self.redis.kill if crash else self.redis.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start)
        self.redis_restarts += 1
        self.assert_workers_alive()

    # -- simulators ----------------------------------------------------------------
    def sim_stats(self, provider: str) -> dict[str, Any]:
        sim = self.stack.simulators[provider]
        return sim.stats.as_dict() | {"faults_injected": dict(sim.faults.injected)}

    async def faults(self, provider: str, *faults: dict[str, Any]) -> None:
        async with httpx.AsyncClient() as c:
            resp = await c.post(f"{self.stack.simulator_url(provider)}/_sim/faults", json=list(faults))
            resp.raise_for_status()

    def timings(self, queue: float, run: float) -> None:
        for sim in self.stack.simulators.values():
            sim.config.queue_seconds = queue
            sim.config.run_seconds = run

    # -- jobs ------------------------------------------------------------------------
    async def submit(self, body: dict[str, Any], *, idempotency_key: str | None = None,
                     retry_for: float = 0.0) -> dict[str, Any]:
        """POST a job; with ``retry_for``, transport errors and 5xx are retried (same Idempotency-Key)."""
        deadline = time.monotonic() + retry_for
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        while True:
            try:
                resp = await self.client.post("/v1/jobs", json=body, headers=headers)
                if resp.status_code in (200, 202):
                    job: dict[str, Any] = resp.json()
                    self.submitted.append(job["id"])
                    return job
                if resp.status_code < 500:
                    raise AssertionError(f"submit refused: {resp.status_code} {resp.text}")
                problem = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                problem = exc.__class__.__name__
            self.submit_retries[problem] += 1
            if time.monotonic() >= deadline:
                raise AssertionError(f"submit failed: {problem}")
            await asyncio.sleep(0.1)

    async def query(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 1000):
            resp = await self.client.post("/v1/jobs/query", json={"ids": list(ids[start:start + 1000])})
            resp.raise_for_status()
            found.update({j["id"]: j for j in resp.json()["data"]})
        return found

    async def wait_terminal(self, ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until every job is terminal; on time-out, say which are stuck and where."""
        deadline = time.monotonic() + timeout
        jobs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            try:
                jobs = await self.query(ids)
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
                continue
            if len(jobs) == len(ids) and all(j["status"] in TERMINAL for j in jobs.values()):
                return jobs
            await asyncio.sleep(0.2)
        stuck = [j for j in jobs.values() if j["status"] not in TERMINAL]
        missing = [i for i in ids if i not in jobs]
        sample = [{k: j.get(k) for k in ("id", "provider", "status", "phase", "note", "updated_at")}
                  for j in stuck[:8]]
        raise AssertionError(f"{len(stuck)} jobs not terminal and {len(missing)} missing after {timeout}s: "
                             f"{json.dumps(sample, indent=1)}\n{self.worker_logs()}")

    async def events(self, ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        sem = asyncio.Semaphore(32)

        async def one(job_id: str) -> tuple[str, list[dict[str, Any]]]:
            async with sem:
                resp = await self.client.get(f"/v1/jobs/{job_id}/events")
                resp.raise_for_status()
                return job_id, resp.json()

        return dict(await asyncio.gather(*(one(i) for i in ids)))

    async def wait_webhooks(self, expected: set[tuple[str, str, int]], timeout: float,
                            receiver: Receiver | None = None) -> None:
        """Until ``receiver`` (default: the stack's) accepted every expected ``(job, type, sequence)``."""
        hooks = (receiver or self.receiver).hooks
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if expected <= received_events(hooks):
                return
            await asyncio.sleep(0.1)

    async def audit(self, jobs: dict[str, dict[str, Any]], *, webhooks: bool = True,
                    webhook_timeout: float = 30.0) -> Audit:
        """Check every job's event log, the simulators' creations and the webhooks received."""
        logs = await self.events(jobs)
        audit = Audit(jobs=len(jobs))
        audit.statuses = Counter(j["status"] for j in jobs.values())
        audit.errors = Counter(j["error"]["code"] for j in jobs.values() if j.get("error"))
        for job_id, log in logs.items():
            terminal = [e for e in log if e["status"] in TERMINAL]
            if len(terminal) != 1:
                audit.double_applied.append(f"{job_id}: {len(terminal)} terminal events")
            seqs = [e["sequence"] for e in log]
            if any(b <= a for a, b in zip(seqs, seqs[1:], strict=False)):
                audit.double_applied.append(f"{job_id}: sequences {seqs}")
            if log and log[-1]["status"] != jobs[job_id]["status"]:
                audit.double_applied.append(f"{job_id}: last event {log[-1]['type']} vs {jobs[job_id]['status']}")
        # Creations at the providers: every job's prompt is unique, so any identity created twice
        # is a job paid for twice; and no provider created more tasks than it was given jobs.
        per_provider = Counter(j["provider"] for j in jobs.values())
        for provider, count in per_provider.items():
            stats = self.sim_stats(provider)
            audit.creations[provider] = stats["creations"]
            audit.jobs_per_provider[provider] = count
            audit.duplicates += sum(n - 1 for n in stats["duplicate_identities"].values())
            audit.duplicates += max(0, stats["creations"] - count - audit.allowed_extra.get(provider, 0))
        if webhooks:
            expected = {(job_id, e["type"], e["sequence"]) for job_id, log in logs.items() for e in log
                        if e["type"] in NOTIFY_TYPES and jobs[job_id].get("webhook_url")}
            await self.wait_webhooks(expected, webhook_timeout)
            audit.webhooks_expected = len(expected)
            check_webhooks(audit, self.receiver.hooks, expected,
                           (await self.client.get("/v1/webhook-secret")).json()["secret"])
        return audit


def received_events(hooks: WebhookReceiver) -> set[tuple[str, str, int]]:
    out = set()
    for _, body in list(hooks.deliveries):
        event = json.loads(body)
        out.add((event["data"]["id"], event["type"], event["sequence"]))
    return out


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The Standard Webhooks check (https://www.standardwebhooks.com), written from the spec here, without
    the library's 5-minute freshness window: a long scenario audits deliveries received long before.
    Deliveries still fresh are checked by the ``standardwebhooks`` library too."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [part.split(",", 1)[1] for part in headers["webhook-signature"].split() if part.startswith("v1,")]
    if not any(hmac.compare_digest(expected, g) for g in given):
        raise AssertionError(f"webhook {headers['webhook-id']}: bad signature")
    if time.time() - int(headers["webhook-timestamp"]) < 240:
        Webhook(secret).verify(body, headers)
    event: dict[str, Any] = json.loads(body)
    return event


def check_webhooks(audit: Audit, hooks: WebhookReceiver, expected: set[tuple[str, str, int]], secret: str) -> None:
    """Every expected event received, each verified, each with one stable ``webhook-id``."""
    ids_per_event: dict[tuple[str, str, int], set[str]] = {}
    seen_ids: Counter[str] = Counter()
    for headers, body in hooks.deliveries:
        event = verify_standard_webhook(secret, headers, body)  # raises on a bad signature
        key = (event["data"]["id"], event["type"], event["sequence"])
        ids_per_event.setdefault(key, set()).add(headers["webhook-id"])
        seen_ids[headers["webhook-id"]] += 1
    received = set(ids_per_event)
    audit.webhooks_received = len(hooks.deliveries)
    audit.webhook_redeliveries = sum(n - 1 for n in seen_ids.values())
    audit.events_lost = sorted(f"{j}:{t}:{s}" for j, t, s in expected - received)
    audit.events_unexpected = sorted(f"{j}:{t}:{s}" for j, t, s in received - expected)
    audit.unstable_webhook_ids = sorted(f"{k}: {v}" for k, v in ids_per_event.items() if len(v) > 1)


@dataclass
class Audit:
    jobs: int
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    creations: dict[str, int] = field(default_factory=dict)
    jobs_per_provider: dict[str, int] = field(default_factory=dict)
    # Creations a scenario expects beyond one per job (none so far; kept explicit).
    allowed_extra: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    double_applied: list[str] = field(default_factory=list)
    webhooks_expected: int = 0
    webhooks_received: int = 0
    webhook_redeliveries: int = 0
    events_lost: list[str] = field(default_factory=list)
    events_unexpected: list[str] = field(default_factory=list)
    unstable_webhook_ids: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "provider_creations": self.creations,
            "jobs_per_provider": self.jobs_per_provider,
            "duplicates_found": self.duplicates,
            "double_applied": len(self.double_applied),
            "webhooks_expected": self.webhooks_expected,
            "webhooks_received": self.webhooks_received,
            "webhook_redeliveries_same_id": self.webhook_redeliveries,
            "events_lost": len(self.events_lost),
            "unstable_webhook_ids": len(self.unstable_webhook_ids),
        }

    def assert_clean(self) -> None:
        assert self.duplicates == 0, f"provider tasks created twice: {self.creations} for {self.jobs_per_provider}"
        assert not self.double_applied, f"double-applied or disordered events: {self.double_applied[:10]}"
        assert not self.events_lost, f"{len(self.events_lost)} webhook events lost: {self.events_lost[:10]}"
        assert not self.events_unexpected, f"webhooks for unknown events: {self.events_unexpected[:10]}"
        assert not self.unstable_webhook_ids, f"one event, several webhook-ids: {self.unstable_webhook_ids[:10]}"


@contextlib.asynccontextmanager
async def fault_stack(*, workers: int = 1, **overrides: Any) -> AsyncIterator[FaultStack]:
    """Private AOF Redis, simulators and API here, ``workers`` worker processes; ``overrides``: Settings."""
    redis = RedisServer(appendonly=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="atelier-faults-"))
    receiver = Receiver()
    fs: FaultStack | None = None
    try:
        async with dev_stack(redis_url=redis.url, run_worker=False, **(FAST | overrides)) as stack, \
                httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                                  headers={"Authorization": f"Bearer {stack.api_key}"}) as client:
            fs = FaultStack(stack=stack, redis=redis, workdir=workdir, client=client, receiver=receiver)
            await receiver.up()
            try:
                for _ in range(workers):
                    fs.add_worker()
                for worker in fs.workers:
                    await worker.wait_ready()
                yield fs
            finally:
                for worker in fs.workers:
                    worker.stop()
                await receiver.down()
    finally:
        redis.close()
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
