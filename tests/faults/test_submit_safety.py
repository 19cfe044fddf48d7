"""Safe submits and deadlines, with real worker processes (issue 8's "Done means").

- An ambiguous submit timeout never produces two provider tasks: the provider created the task
  and its answer never came (the simulator hangs after creating it), or it created nothing and
  timed out. Providers that can be asked (Replicate, Kling, Sora) are reconciled; fal cannot, and
  fails the job with ``provider_outcome_unknown`` rather than paying twice.
- A job past its deadline is ``timed_out`` (and its task canceled where the provider can).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tests.faults.harness import FaultStack, fault_stack, job_body, record_figures

CREATE_ROUTE = {"replicate": "create", "kling": "create", "sora": "create", "fal": "submit"}

# (case, provider, fault after the task was created?, retry_unknown_submissions, expected status, creations)
CASES: list[tuple[str, str, bool, bool, str, int]] = [
    *[(f"{p}-created-then-timeout", p, True, False, "succeeded", 1) for p in ("replicate", "kling", "sora")],
    *[(f"{p}-nothing-created-timeout", p, False, False, "failed", 0) for p in ("replicate", "kling", "sora")],
    *[(f"{p}-nothing-created-timeout-opted-in", p, False, True, "succeeded", 1)
      for p in ("replicate", "kling", "sora")],
    ("fal-created-then-timeout", "fal", True, False, "failed", 1),
    ("fal-nothing-created-timeout", "fal", False, False, "failed", 0),
]


async def _one_case(fs: FaultStack, case: str, provider: str, after_effect: bool, opt_in: bool) -> dict[str, Any]:
    await fs.faults(provider, {"kind": "timeout", "route": CREATE_ROUTE[provider], "count": 1,
                               "after_effect": after_effect, "delay": 4.0})
    job = await fs.submit(job_body(provider, f"{fs.tag}-{case}", retry_unknown_submissions=opt_in))
    return (await fs.wait_terminal([job["id"]], 60))[job["id"]]


async def test_ambiguous_submit_timeout_never_creates_two_tasks() -> None:
    async with fault_stack(workers=1) as fs:
        fs.timings(queue=0.1, run=0.3)
        by_provider: dict[str, list[tuple[str, str, bool, bool, str, int]]] = {}
        for c in CASES:
            by_provider.setdefault(c[1], []).append(c)
        results: dict[str, dict[str, Any]] = {}

        async def run_provider(cases: list[tuple[str, str, bool, bool, str, int]]) -> None:
            for case, provider, after_effect, opt_in, _, _ in cases:  # one at a time: each takes its fault
                results[case] = await _one_case(fs, case, provider, after_effect, opt_in)

        await asyncio.gather(*(run_provider(cases) for cases in by_provider.values()))
        per_case = {case: _creations(fs, provider, results[case]) for case, provider, *_ in CASES}
        record_figures("ambiguous_submit_timeouts", {
            "cases": len(CASES), "provider_creations": {p: fs.sim_stats(p)["creations"] for p in by_provider},
            "duplicates_found": sum(max(0, n - 1) for n in per_case.values()),
            "outcomes": {case: results[case]["status"] for case, *_ in CASES}})
        for case, _provider, _after, _opt, status, creations in CASES:
            job = results[case]
            assert job["status"] == status, (case, job["status"], job["error"])
            if status == "failed":
                assert job["error"]["code"] == "provider_outcome_unknown", (case, job["error"])
            assert per_case[case] == creations, (case, per_case[case])
        for provider in by_provider:
            assert not fs.sim_stats(provider)["duplicate_identities"], provider


def _creations(fs: FaultStack, provider: str, job: dict[str, Any]) -> int:
    """How many tasks the simulator created for this job (every prompt, and Kling's external id, is unique)."""
    counts = fs.stack.simulators[provider].stats.created_by_identity
    prompt = json.dumps(job["input"]["prompt"])  # quoted: one case's prompt may start another's
    return sum(n for identity, n in counts.items() if prompt in identity or job["id"] in identity)


async def test_job_past_its_deadline_is_timed_out() -> None:
    async with fault_stack(workers=1, job_timeout_seconds=2.0) as fs:
        fs.timings(queue=0.1, run=0.3)
        ids = [(await fs.submit(job_body(p, f"{fs.tag}-{p}", "[sim:run=60]", webhook_url=fs.receiver.url)))["id"]
               for p in ("replicate", "kling", "sora", "fal")]
        started = time.monotonic()
        done = await fs.wait_terminal(ids, 30)
        audit = await fs.audit(done)
        replicate = next(j for j in done.values() if j["provider"] == "replicate")
        sim = fs.stack.simulators["replicate"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sim.tasks[replicate["provider_task_id"]].canceled_at is None:  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)
        record_figures("deadline_timed_out", {"jobs": len(ids), "job_timeout_seconds": 2.0,
                                              "seconds_to_timed_out": round(time.monotonic() - started, 1),
                                              **audit.figures()})
        assert audit.statuses == {"timed_out": len(ids)}, audit.statuses
        assert all(j["error"]["code"] == "timed_out" for j in done.values())
        audit.assert_clean()
        assert sim.tasks[replicate["provider_task_id"]].canceled_at is not None  # type: ignore[attr-defined]
        assert audit.creations == audit.jobs_per_provider
