"""``atelier batch ...`` and ``atelier jobs ...``, run as real processes against the real stack."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.cli import main
from orchestrator.sdk.client import AsyncClient

IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
         "input": {"prompt": "a fox"}}
VIDEO = {"provider": "replicate", "kind": "video", "model": "minimax/video-01", "input": {"prompt": "sea"}}
AUDIO = {"provider": "replicate", "kind": "audio", "model": "meta/musicgen", "input": {"prompt": "piano"}}
FAL = {"provider": "fal", "kind": "image", "model": "fal-ai/flux/dev", "input": {"prompt": "a fox in snow"}}


async def atelier(stack: Any, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 90) -> subprocess.CompletedProcess[str]:
    base = {"ATELIER_URL": stack.api_url, "ATELIER_API_KEY": stack.api_key} if stack else {}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
        env={**os.environ, **base, **(env or {})}, timeout=timeout)


def jsonl(path: Path, *lines: dict[str, Any] | str) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_results(path: Path) -> dict[int, dict[str, Any]]:
    return {r["line"]: r for r in map(json.loads, path.read_text().splitlines())}


async def test_batch_submit_reports_bad_lines_and_exits_1(stack, tmp_path):
    source = jsonl(tmp_path / "jobs.jsonl",
                   IMAGE | {"ref": "fox"},                                          # 1
                   "",                                                              # 2 blank: skipped
                   '{"ref": "broken", "provider": "replicate",',                    # 3 malformed JSON
                   IMAGE | {"ref": "nope", "provider": "nope"},                     # 4 unknown provider
                   IMAGE | {"ref": "neg", "input": {"prompt": "x", "duration_seconds": -1}},  # 5 invalid field
                   VIDEO | {"ref": "sea"},                                          # 6
                   IMAGE | {"ref": "fails", "input": {"prompt": "x [sim:fail]"}},  # 7 fails at the provider
                   "[1, 2]")                                                        # 8 not an object
    out = tmp_path / "results.jsonl"
    run = await atelier(stack, "batch", "submit", str(source), "--wait", "--out", str(out), "--chunk", "2")
    assert run.returncode == 1, run.stderr
    results = read_results(out)
    assert list(results) == [1, 3, 4, 5, 6, 7, 8]  # one result per (non-blank) input line, in order
    assert {n: r["status"] for n, r in results.items()} == {
        1: "succeeded", 3: "invalid", 4: "invalid", 5: "invalid", 6: "succeeded", 7: "failed", 8: "invalid"}
    assert results[4]["problem"]["field"] == "provider" and "nope" in results[4]["problem"]["message"]
    assert results[5]["problem"]["field"] == "input.duration_seconds"
    assert "JSON" in results[3]["problem"]["message"] and results[3]["job_id"] is None
    assert results[7]["error"]["code"] and results[7]["outputs"] == []
    assert results[1]["ref"] == "fox" and results[1]["job_id"].startswith("job_") and results[1]["outputs"]
    assert results[6]["outputs"][0].startswith("http")
    # 5 locally valid lines in chunks of 2: three batches, and the output says so
    assert len({r["batch_id"] for r in results.values() if r["batch_id"]}) == 3
    assert "3 batches" in run.stderr
    for where in ("line 3:", "line 4 (ref nope): provider", "line 5 (ref neg): input.duration_seconds", "line 8:"):
        assert where in run.stderr, run.stderr


async def test_batch_submit_all_good_downloads_outputs(stack, tmp_path):
    source = jsonl(tmp_path / "jobs.jsonl",
                   IMAGE | {"ref": "fox", "input": {"prompt": "a fox", "num_outputs": 2}},
                   VIDEO | {"ref": "sea"},
                   AUDIO,
                   FAL | {"ref": "fal fox/1"})
    out, files = tmp_path / "results.jsonl", tmp_path / "files"
    run = await atelier(stack, "batch", "submit", str(source), "--wait", "--out", str(out), "--download", str(files),
                        "--idempotency-key", "cli-1")
    assert run.returncode == 0, run.stderr
    results = read_results(out)
    assert [r["status"] for r in results.values()] == ["succeeded"] * 4
    assert "replicate" in run.stderr and "fal" in run.stderr  # the progress shows each provider
    names = sorted(p.name for p in files.iterdir())
    audio_job = results[3]["job_id"]
    assert names == sorted(["fox-0.png", "fox-1.png", "sea-0.mp4", f"{audio_job}-0.mp3",
                            *(Path(f).name for f in results[4]["files"])])
    assert results[4]["files"][0].startswith(str(files / "fal_fox_1-0"))
    async with AsyncClient(stack.api_url, stack.api_key) as client:
        for r in results.values():
            job = await client.get(r["job_id"])
            assert len(r["files"]) == len(job.outputs) == len(r["outputs"])
            for path, output in zip(r["files"], job.outputs, strict=True):
                assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == output.sha256
    # the same key again: the same batch, nothing submitted twice
    again = await atelier(stack, "batch", "submit", str(source), "--idempotency-key", "cli-1")
    assert again.returncode == 0, again.stderr
    assert [json.loads(r)["job_id"] for r in again.stdout.splitlines()] == [r["job_id"] for r in results.values()]


@pytest.fixture
def cli(stack, capsys):
    """The same ``main()`` the ``atelier`` script runs, in-process (spawning a process per command is slow)."""
    async def run(*args: str, key: str | None = None, url: str | None = None) -> tuple[int, str, str]:
        argv = [*args, "--url", url or stack.api_url, "--api-key", key or stack.api_key]
        code = await asyncio.to_thread(main, argv)
        out, err = capsys.readouterr()
        return code, out, err
    return run


async def test_batch_submit_atomic(stack, tmp_path, cli, redis_url):
    source = jsonl(tmp_path / "jobs.jsonl", IMAGE | {"ref": "ok"}, IMAGE | {"ref": "bad", "model": "??"}, IMAGE)
    code, out, err = await cli("batch", "submit", str(source), "--atomic")
    assert code == 1 and "line 2 (ref bad): model" in err and "nothing submitted" in err
    results = [json.loads(r) for r in out.splitlines()]
    assert [(r["line"], r["status"]) for r in results] == [(1, "rejected"), (2, "invalid"), (3, "rejected")]
    broken = jsonl(tmp_path / "broken.jsonl", IMAGE, "{")
    code, out, err = await cli("batch", "submit", str(broken), "--atomic")
    assert code == 1 and "line 2: not valid JSON" in err
    assert [json.loads(r)["status"] for r in out.splitlines()] == ["rejected", "invalid"]
    code, _, err = await cli("batch", "submit", str(source), "--atomic", "--chunk", "2")
    assert code == 2 and "one batch" in err
    assert redis.Redis.from_url(redis_url).keys("atl:job:*") == []  # nothing was created


async def test_jobs_and_batch_status_commands(stack, tmp_path, cli):
    async with AsyncClient(stack.api_url, stack.api_key) as client:
        job = await client.submit(IMAGE)
        slow = await client.submit(IMAGE | {"input": {"prompt": "slow [sim:run=30]"}})
        batch = await client.submit_batch([IMAGE | {"ref": "one"}])
    code, out, err = await cli("jobs", "wait", job.id)
    assert code == 0 and json.loads(out)["status"] == "succeeded" and f"{job.id}: running" in err
    code, out, _ = await cli("jobs", "get", job.id)
    assert code == 0 and json.loads(out)["id"] == job.id
    code, out, _ = await cli("jobs", "list", "--status", "succeeded", "--limit", "5")
    assert code == 0 and job.id in out and slow.id not in out and out.startswith("ID")
    code, out, _ = await cli("jobs", "list", "--limit", "1", "--json")
    assert code == 0 and len(out.splitlines()) == 1 and json.loads(out)["id"] == batch.items[0].job_id
    code, out, _ = await cli("jobs", "cancel", slow.id)
    assert code == 0 and json.loads(out)["status"] == "canceled"
    code, _, err = await cli("jobs", "cancel", job.id)
    assert code == 1 and "409" in err and "succeeded" in err
    code, out, _ = await cli("batch", "status", batch.id)
    assert code == 0 and json.loads(out)["id"] == batch.id

    code, _, err = await cli("jobs", "get", "job_nope")
    assert code == 1 and "404" in err and "job_nope" in err
    code, _, err = await cli("batch", "status", batch.id, key="atl_wrong")
    assert code == 1 and "401" in err
    code, _, err = await cli("jobs", "list", url="http://127.0.0.1:9")
    assert code == 1 and "cannot connect" in err
    source = jsonl(tmp_path / "jobs.jsonl", IMAGE)
    code, _, err = await cli("batch", "submit", str(source), "--download", str(tmp_path / "d"))
    assert code == 2 and "--wait" in err
    code, _, err = await cli("batch", "submit", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "cannot read" in err
