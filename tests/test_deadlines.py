"""Job deadlines per provider and per model: one rule for single jobs and batch items."""

from __future__ import annotations

from datetime import datetime

import pytest

from orchestrator.cli.devstack import dev_stack
from orchestrator.domain.deadlines import job_timeout
from orchestrator.infra.settings import Settings
from orchestrator.wire.jobs import JobKind, JobRequest
from providers.contract import ProviderSettings
from tests.helpers import api, submit, wait_for

FAST = "black-forest-labs/flux-schnell"


def seconds_to_deadline(job: dict[str, str]) -> float:
    return (datetime.fromisoformat(job["deadline_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()


def test_model_entry_then_longest_pattern_then_provider_then_default():
    cfg = ProviderSettings(name="replicate", base_url="https://r.example", job_timeout_seconds=900,
                           job_timeout_by_model={"minimax/video-01": 1800, "minimax/*": 600, "*": 60,
                                                 "google/veo-*": 5400})

    def timeout(model: str, provider: ProviderSettings | None = cfg) -> float:
        return job_timeout(JobRequest(provider="replicate", kind=JobKind.video, model=model), provider, 10800)

    assert timeout("minimax/video-01") == 1800  # exact name
    assert timeout("minimax/hailuo-02") == 600  # "minimax/*" is longer than "*"
    assert timeout("google/veo-3") == 5400
    assert timeout("anything/else") == 60
    cfg.job_timeout_by_model = {}
    assert timeout("minimax/video-01") == 900  # the provider's
    assert timeout("minimax/video-01", None) == 10800  # the global default


def test_toml_table_and_its_validation(monkeypatch, tmp_path):
    cfg = tmp_path / "atelier.toml"
    cfg.write_text('[providers.replicate]\njob_timeout_seconds = 900\n'
                   'job_timeout_by_model = { "minimax/video-01" = 1800, "google/veo-*" = 5400 }\n')
    monkeypatch.setenv("ATELIER_CONFIG_FILE", str(cfg))
    replicate = Settings().provider_settings()["replicate"]
    assert replicate.job_timeout_by_model == {"minimax/video-01": 1800.0, "google/veo-*": 5400.0}
    assert "job_timeout_by_model" not in replicate.extra
    cfg.write_text('[providers.replicate]\njob_timeout_by_model = { "minimax/video-01" = "soon" }\n')
    with pytest.raises(ValueError, match=r"job_timeout_by_model: 'minimax/video-01' must be a positive number"):
        Settings().provider_settings()
    monkeypatch.setenv("ATELIER_KEY_RECHECK_SECONDS", "60")
    monkeypatch.delenv("ATELIER_CONFIG_FILE")
    assert Settings().key_recheck_seconds == 60


async def test_per_model_deadline_is_set_and_enforced(redis_url):
    table = {"replicate": {"job_timeout_by_model": {FAST: 1.5, "stability-ai/*": 600}}}
    async with dev_stack(redis_url=redis_url, providers_file=table, job_timeout_seconds=3600,
                         log_format="text") as stack, api(stack) as client:
        slow = await submit(client, input={"prompt": "a long render [sim:run=30]"})
        patterned = await submit(client, model="stability-ai/sdxl", input={"prompt": "x [sim:run=30]"})
        other = await submit(client, model="black-forest-labs/flux-dev", input={"prompt": "x [sim:run=30]"})
        resp = await client.post("/v1/batches", json={"jobs": [
            {"provider": "replicate", "kind": "image", "model": FAST, "input": {"prompt": "b [sim:run=30]"}},
            {"provider": "replicate", "kind": "image", "model": "owner/model", "input": {"prompt": "c"}}]})
        assert resp.status_code == 202, resp.text
        items = [(await client.get(f"/v1/jobs/{i['job_id']}")).json() for i in resp.json()["items"]]
        timed_out = await wait_for(client, slow["id"], timeout=15)
        for job_id in (patterned["id"], other["id"], *(i["id"] for i in items)):
            await client.post(f"/v1/jobs/{job_id}/cancel")
    assert seconds_to_deadline(slow) == pytest.approx(1.5, abs=0.01)
    assert seconds_to_deadline(patterned) == pytest.approx(600, abs=0.01)
    assert seconds_to_deadline(other) == pytest.approx(3600, abs=0.01)
    assert [round(seconds_to_deadline(i), 2) for i in items] == [1.5, 3600]
    assert timed_out["status"] == "timed_out" and timed_out["error"]["code"] == "timed_out"
