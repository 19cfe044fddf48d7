"""``atelier demo``: the offline tour. Starts the dev stack, renders a mix of jobs on the
simulators, shows their progress, verifies every stored file and every webhook, and exits
0 only if all of it worked."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.infra.media import EXTENSIONS
from orchestrator.wire.signing import verify
from providers.sandbox.serve import serving

# (provider, kind, model, input) -- each runs when its provider is configured in the sandbox.
DEMO_JOBS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("replicate", "image", "black-forest-labs/flux-schnell",
     {"prompt": "a lighthouse at dusk, oil painting", "aspect_ratio": "16:9", "num_outputs": 2}),
    ("replicate", "video", "minimax/video-01", {"prompt": "waves rolling onto a beach", "duration_seconds": 6}),
    ("replicate", "audio", "meta/musicgen", {"prompt": "calm piano", "duration_seconds": 8}),
    ("sora", "video", "sora-2", {"prompt": "a paper boat on a stream", "duration_seconds": 4}),
    ("veo", "video", "veo-3.0-generate-001", {"prompt": "timelapse of clouds", "aspect_ratio": "16:9"}),
    ("kling", "video", "kling-v1", {"prompt": "a cat playing piano", "duration_seconds": 5}),
    ("runway", "video", "gen4_turbo", {"prompt": "a drone shot over hills",
                                       "image_url": "https://example.com/hills.png",
                                       "duration_seconds": 5, "aspect_ratio": "16:9"}),
    ("suno", "audio", "chirp-v4", {"prompt": "an upbeat song about orchestration"}),
    ("fal", "image", "fal-ai/flux/dev", {"prompt": "a red fox in snow"}),
    ("fal", "video", "fal-ai/kling-video/v2/master/text-to-video", {"prompt": "a fox running", "duration_seconds": 5}),
    ("openai", "image", "gpt-image-1.5", {"prompt": "a watercolor lighthouse at dawn, no text", "aspect_ratio": "3:2",
                                           "options": {"quality": "medium", "output_format": "png"}}),
    ("gemini", "image", "gemini-2.5-flash-image", {"prompt": "a lighthouse at dusk, watercolor",
                                                   "aspect_ratio": "16:9"}),
    ("midjourney", "image", "midjourney", {"prompt": "a lighthouse on a cliff, watercolour", "aspect_ratio": "3:2"}),
    ("newapi", "video", "kling-v2-1", {"prompt": "a paper boat drifting on a koi pond", "duration_seconds": 5,
                                       "aspect_ratio": "16:9"}),
    ("luma", "video", "ray-2", {"prompt": "a tiger walking through fresh snow", "duration_seconds": 5,
                                "aspect_ratio": "16:9"}),
    ("minimax", "video", "MiniMax-Hailuo-02", {"prompt": "A man picks up a book [Pedestal up]", "duration_seconds": 6,
                                               "resolution": "768p"}),
    ("doubao", "video", "doubao-seedance-1-0-pro-250528", {"prompt": "a kite over a wheat field",
                                                          "duration_seconds": 5, "aspect_ratio": "16:9"}),
    ("doubao", "image", "doubao-seedream-4-0-250828", {"prompt": "a tea house in the rain, ink wash",
                                                       "resolution": "2k"}),
    ("dashscope", "video", "wan2.2-t2v-plus", {"prompt": "a koi pond at night, lanterns", "resolution": "480p",
                                               "aspect_ratio": "16:9"}),
    ("dashscope", "image", "qwen-image", {"prompt": "a poster that says ATELIER in bold letters"}),
    ("xai", "video", "grok-imagine-video", {"prompt": "a hummingbird in slow motion", "duration_seconds": 6}),
    ("jimeng", "video", "jimeng_t2v_v30", {"prompt": "a paper crane unfolding", "duration_seconds": 5,
                                           "aspect_ratio": "16:9"}),
    ("vidu", "video", "viduq2", {"prompt": "a fox walking through a bamboo forest", "duration_seconds": 5}),
    ("ideogram", "image", "ideogram-v3", {"prompt": "a vintage travel poster of Lisbon", "aspect_ratio": "2:3",
                                          "options": {"rendering_speed": "TURBO"}}),
    ("stability", "image", "stable-image-core", {"prompt": "a ceramic mug on a wooden table, studio light",
                                                 "aspect_ratio": "1:1"}),
    ("bfl", "image", "flux-pro-1.1", {"prompt": "a glass greenhouse at sunrise", "aspect_ratio": "16:9"}),
]

# Follow-ups, one per provider that has them: each acts on the demo job of (provider, model) above.
FOLLOW_UPS: list[tuple[str, str, dict[str, Any]]] = [
    ("sora", "sora-2", {"operation": "remix", "input": {"prompt": "the same paper boat, at night"}}),
    ("kling", "kling-v1", {"operation": "extend", "input": {"prompt": "the cat takes a bow"}}),
    ("luma", "ray-2", {"operation": "extend", "input": {"prompt": "the tiger breaks into a run"}}),
    ("suno", "chirp-v4", {"operation": "extend", "input": {"prompt": "a bridge, then the chorus again",
                                                           "options": {"continue_at": 0.5}}}),
    ("midjourney", "midjourney", {"operation": "upscale", "input": {"options": {"index": 2}}}),
    ("ideogram", "ideogram-v3", {"operation": "remix", "input": {"prompt": "the same poster, by night"}}),
    ("stability", "stable-image-core", {"operation": "upscale", "input": {"prompt": "crisp ceramic detail"}}),
    ("xai", "grok-imagine-video", {"operation": "extend", "input": {"prompt": "the hummingbird flies off"}}),
]


class Receiver:
    """A webhook endpoint that verifies every delivery with the tenant's secret."""

    def __init__(self) -> None:
        self.secret = ""
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        if not verify(self.secret, dict(request.headers), body):
            self.bad_signatures += 1
            return Response(status_code=401)
        self.received.append(json.loads(body))
        return Response(status_code=204)


def _table(jobs: dict[str, dict[str, Any]], webhooks: int) -> Table:
    table = Table(title=f"Atelier demo - {webhooks} signed webhooks received and verified")
    for col in ("job", "provider", "kind", "model", "operation", "status", "progress"):
        table.add_column(col)
    colours = {"succeeded": "green", "failed": "red", "canceled": "yellow", "timed_out": "red"}
    for job in jobs.values():
        status = job["status"]
        progress = f"{job['progress']}%" if job.get("progress") is not None else ""
        table.add_row(job["id"], job["provider"], job["kind"], job["model"], job.get("operation") or "generate",
                      f"[{colours.get(status, 'cyan')}]{status}[/]", progress)
    return table


async def run_demo(storage_dir: Path, timeout: float = 180.0, *, verbose: bool = False,
                   console: Console | None = None) -> int:
    """The table of jobs (live on a terminal), each output with its check, and the summary;
    ``verbose`` adds every job's final JSON."""
    # Piped, rich would wrap at 80 columns: wide enough for whole job ids and model names instead.
    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=max(console.width, 140))
    storage_dir.mkdir(parents=True, exist_ok=True)
    receiver = Receiver()
    async with serving(receiver.app) as hook_url, dev_stack(
        storage_url=f"file://{storage_dir.resolve()}", log_format="text", log_level="WARNING",
    ) as stack:
        console.print(f"API {stack.api_url}   simulators {stack.sandbox_url}   storage {storage_dir.resolve()}",
                      soft_wrap=True)
        console.print(f"dashboard {stack.api_url}/dashboard   (while the demo runs; sign in with API key "
                      f"{stack.api_key})", soft_wrap=True)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {stack.api_key}"}) as api:
            receiver.secret = (await api.get("/v1/webhook-secret")).json()["secret"]
            jobs = await _submit_all(api, stack, hook_url + "/hook", console)
            submitted = len(jobs)
            if not jobs:
                console.print("[red]no demo job could be submitted[/]")
                return 1
            ok = await _follow(api, jobs, receiver, console, timeout)
            follow_ups = await _submit_follow_ups(api, jobs, hook_url + "/hook", console)
            # every demo job and follow-up must be accepted (a refusal was printed above)
            demo_jobs = _configured(stack)
            wanted = [f for f in FOLLOW_UPS if any((j[0], j[2]) == f[:2] for j in demo_jobs)]
            ok = ok and submitted == len(demo_jobs) and len(follow_ups) == len(wanted)
            jobs |= follow_ups
            ok = await _follow(api, jobs, receiver, console, timeout) and ok
            if not console.is_terminal:  # no live table was drawn: the final one, once
                console.print(_table(jobs, len(receiver.received)))
            return await _report(api, stack, jobs, receiver, storage_dir, console, ok, verbose=verbose)


async def _submit_all(api: httpx.AsyncClient, stack: Stack, hook: str, console: Console) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    for provider, kind, model, inp in _configured(stack):
        body = {"provider": provider, "kind": kind, "model": model, "input": inp, "webhook_url": hook,
                "metadata": {"demo": True}}
        resp = await api.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            console.print(f"[red]submit {provider}/{model} refused: {resp.status_code} {resp.text}[/]")
            continue
        job = resp.json()
        jobs[job["id"]] = job
    return jobs


def _configured(stack: Stack) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The demo jobs whose provider has a simulator and an adapter."""
    from providers.registry import ADAPTERS

    return [job for job in DEMO_JOBS if job[0] in stack.simulators and job[0] in ADAPTERS]


async def _submit_follow_ups(api: httpx.AsyncClient, jobs: dict[str, dict[str, Any]], hook: str,
                             console: Console) -> dict[str, dict[str, Any]]:
    """One follow-up job per provider that has them, on that provider's succeeded demo job."""
    sources = {(j["provider"], j["model"]): j for j in jobs.values() if j["status"] == "succeeded"}
    follow_ups: dict[str, dict[str, Any]] = {}
    for provider, model, overrides in FOLLOW_UPS:
        source = sources.get((provider, model))
        if source is None:
            continue
        body = {"provider": provider, "kind": source["kind"], "model": model, "source": {"job_id": source["id"]},
                "webhook_url": hook, "metadata": {"demo": True}} | overrides
        resp = await api.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            console.print(f"[red]follow-up {provider} {overrides['operation']} refused: {resp.status_code} "
                          f"{resp.text}[/]")
            continue
        job = resp.json()
        follow_ups[job["id"]] = job
    return follow_ups


async def _follow(api: httpx.AsyncClient, jobs: dict[str, dict[str, Any]], receiver: Receiver,
                  console: Console, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    terminal = {"succeeded", "failed", "canceled", "timed_out"}
    # Live only on a terminal: piped, rich prints the last frame without its closing newline.
    with (Live(_table(jobs, len(receiver.received)), console=console, refresh_per_second=8)
          if console.is_terminal else contextlib.nullcontext()) as live:
        while time.monotonic() < deadline:
            for job_id in list(jobs):
                jobs[job_id] = (await api.get(f"/v1/jobs/{job_id}")).json()
            if live is not None:
                live.update(_table(jobs, len(receiver.received)))
            if all(j["status"] in terminal for j in jobs.values()):
                # Give the last webhooks a moment to arrive.
                expected = sum(1 for j in jobs.values() if j["status"] == "succeeded") * 2
                if len(receiver.received) >= expected or time.monotonic() > deadline:
                    return True
            await asyncio.sleep(0.25)
    return False


async def _report(api: httpx.AsyncClient, stack: Stack, jobs: dict[str, dict[str, Any]], receiver: Receiver,
                  storage_dir: Path, console: Console, finished: bool, *, verbose: bool = False) -> int:
    ok = finished
    console.rule("outputs, each checked against its recorded sha256")
    for job in jobs.values():
        if verbose:
            console.rule(f"{job['id']} - {job['provider']} {job['kind']}")
            console.print_json(json.dumps(job))
        else:
            console.print(f"{job['id']}  {job['provider']}/{job['model']} {job.get('operation') or 'generate'}: "
                          f"{job['status']}", highlight=False, soft_wrap=True)
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            console.print(f"  [red]{error.get('code', job['status'])}: {error.get('message', '')}[/]")
            ok = False
            continue
        for output in job["outputs"]:
            path = storage_dir / job_storage_key(job, output)
            data = path.read_bytes() if path.exists() else b""
            served = (await api.get(output["url"])).content
            good = hashlib.sha256(data).hexdigest() == output["sha256"] == hashlib.sha256(served).hexdigest()
            ok = ok and good
            mark = "[green]sha256 ok[/]" if good else "[red]sha256 MISMATCH[/]"
            console.print(f"  output {output['index']}: {output['content_type']}, {output['bytes']} bytes -> "
                          f"{path} {mark}", highlight=False, soft_wrap=True)
    events = {(e["data"]["id"], e["type"]) for e in receiver.received}
    missing = [(j["id"], "job." + j["status"]) for j in jobs.values() if (j["id"], "job." + j["status"]) not in events]
    console.rule("summary")
    succeeded = sum(1 for j in jobs.values() if j["status"] == "succeeded")
    console.print(f"{succeeded}/{len(jobs)} jobs succeeded; {len(receiver.received)} webhooks verified, "
                  f"{receiver.bad_signatures} with bad signatures; terminal webhooks missing: {len(missing)}")
    ok = ok and not missing and receiver.bad_signatures == 0
    console.print("[green]demo passed[/]" if ok else "[red]demo failed[/]")
    if not verbose:
        console.print("(each job's final JSON: atelier demo --verbose)")
    return 0 if ok else 1


def job_storage_key(job: dict[str, Any], output: dict[str, Any]) -> str:
    """Where local storage keeps an output: ``<tenant>/<job id>/<index>.<ext>`` (tenant ``dev``)."""
    ext = EXTENSIONS[output["content_type"]]
    return f"dev/{job['id']}/{output['index']}.{ext}"
