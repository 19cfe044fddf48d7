"""``atelier run``, ``atelier jobs download`` and ``atelier webhooks ...``, run as real processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from providers.sandbox import media
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for
from tests.test_cli import atelier


def _env(stack) -> dict[str, str]:
    return {"ATELIER_URL": stack.api_url, "ATELIER_API_KEY": stack.api_key}


async def test_run_submits_follows_downloads_and_exits_with_the_outcome(stack, tmp_path):
    env = _env(stack)
    out = await asyncio.to_thread(atelier, "run", "--provider", "replicate", "--model",
                                  "black-forest-labs/flux-schnell", "--prompt", "a fox", "--download",
                                  str(tmp_path / "renders"), env=env)
    assert out.returncode == 0, out.stderr
    files = [Path(line) for line in out.stdout.splitlines()]
    assert len(files) == 1 and files[0].parent == tmp_path / "renders" and files[0].stat().st_size > 0
    job_id = files[0].name.rsplit("-", 1)[0]  # {job id}-{index}{ext}; the kind came from the catalog
    assert f"job {job_id} succeeded" in out.stderr
    async with api(stack) as client:
        job = await wait_for(client, job_id)
    assert job["kind"] == "image" and hashlib.sha256(files[0].read_bytes()).hexdigest() == job["outputs"][0]["sha256"]

    failed = await asyncio.to_thread(atelier, "run", "--provider", "replicate", "--model",
                                     "black-forest-labs/flux-schnell", "--prompt", "[sim:fail]", "--json", env=env)
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    error = json.loads(failed.stdout)["error"]
    assert f"failed: {error['code']}: {error['message']}" in failed.stderr

    invalid = await asyncio.to_thread(atelier, "run", "--provider", "replicate", "--kind", "image", "--model",
                                      "black-forest-labs/flux-schnell", "--input", '{"seed": -1}', env=env)
    assert invalid.returncode == 1 and "422" in invalid.stderr and "seed" in invalid.stderr
    unknown = await asyncio.to_thread(atelier, "run", "--provider", "replicate", "--model", "someone/new-model",
                                      "--prompt", "x", env=env)
    assert unknown.returncode == 2 and "--kind" in unknown.stderr
    slow = await asyncio.to_thread(atelier, "run", "--provider", "replicate", "--model",
                                   "black-forest-labs/flux-schnell", "--prompt", "slow [sim:run=30]", "--timeout",
                                   "1", env=env)
    assert slow.returncode == 1 and "keeps running" in slow.stderr and "atelier jobs wait" in slow.stderr


async def test_run_uploads_a_local_image_as_the_input(stack, tmp_path):
    picture = tmp_path / "me.png"
    picture.write_bytes(media.png("cli", 32, 32))
    out = await asyncio.to_thread(atelier, "run", "--provider", "bfl", "--model", "flux-kontext-pro", "--prompt",
                                  "as a watercolour", "--image", str(picture), "--json", env=_env(stack))
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and "uploaded me.png (image/png" in out.stderr
    assert "/uploads/upl_" in job["input"]["image_url"]
    missing = await asyncio.to_thread(atelier, "run", "--provider", "bfl", "--model", "flux-kontext-pro", "--prompt",
                                      "x", "--image", str(tmp_path / "nope.png"), env=_env(stack))
    assert missing.returncode == 2 and "no such file" in missing.stderr


async def test_jobs_download_writes_each_output(stack, tmp_path):
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "two foxes", "num_outputs": 2})
        done = await wait_for(client, job["id"])
        pending = await submit(client, input={"prompt": "slow [sim:run=30]"})
    out = await asyncio.to_thread(atelier, "jobs", "download", job["id"], "--dir", str(tmp_path / "d"),
                                  env=_env(stack))
    assert out.returncode == 0, out.stderr
    files = sorted(Path(line) for line in out.stdout.splitlines())
    assert [f.name.split(".")[0] for f in files] == [f"{job['id']}-0", f"{job['id']}-1"]
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == [o["sha256"] for o in done["outputs"]]
    nothing = await asyncio.to_thread(atelier, "jobs", "download", pending["id"], env=_env(stack))
    assert nothing.returncode == 1 and "has no outputs" in nothing.stderr
    unknown = await asyncio.to_thread(atelier, "jobs", "download", "job_nope", env=_env(stack))
    assert unknown.returncode == 1 and "404" in unknown.stderr


async def test_webhooks_commands_manage_endpoints_and_deliveries(stack):
    env = _env(stack)
    receiver = WebhookReceiver()
    async with serving(receiver.app) as hook:
        created = await asyncio.to_thread(atelier, "webhooks", "create", f"{hook}/hook", "--event", "job.succeeded",
                                          "--description", "cli", env=env)
        assert created.returncode == 0, created.stderr
        endpoint = json.loads(created.stdout)
        assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["job.succeeded"]
        listed = await asyncio.to_thread(atelier, "webhooks", "list", env=env)
        assert endpoint["id"] in listed.stdout and "job.succeeded" in listed.stdout

        async with api(stack) as client:
            job = await submit(client)
            await wait_for(client, job["id"])
        await receiver.wait(1)
        deliveries = await asyncio.to_thread(atelier, "webhooks", "deliveries", endpoint["id"], "--json", env=env)
        [delivery] = [json.loads(line) for line in deliveries.stdout.splitlines()]
        assert delivery["job_id"] == job["id"] and delivery["event_type"] == "job.succeeded"
        path = f"/v1/webhook-endpoints/{endpoint['id']}/deliveries/{delivery['id']}"
        async with api(stack) as client:  # the receiver answered; the attempt is recorded right after
            for _ in range(200):
                if (await client.get(path)).json()["status"] == "delivered":
                    break
                await asyncio.sleep(0.05)
        shown = await asyncio.to_thread(atelier, "webhooks", "delivery", endpoint["id"], delivery["id"], env=env)
        assert json.loads(shown.stdout)["status"] == "delivered" and json.loads(shown.stdout)["payload"]
        replayed = await asyncio.to_thread(atelier, "webhooks", "replay", endpoint["id"], delivery["id"], env=env)
        assert replayed.returncode == 0, replayed.stderr
        await receiver.wait(2)
        assert receiver.deliveries[-1][0]["webhook-id"] == delivery["id"]

        rotated = await asyncio.to_thread(atelier, "webhooks", "rotate", endpoint["id"], "--grace", "60", env=env)
        assert json.loads(rotated.stdout)["secret"] != endpoint["secret"]
        recovered = await asyncio.to_thread(atelier, "webhooks", "recover", endpoint["id"], "--since", "1h", env=env)
        assert recovered.returncode == 0 and json.loads(recovered.stdout)["recovered"] == 0
        bad_since = await asyncio.to_thread(atelier, "webhooks", "recover", endpoint["id"], "--since", "yesterday",
                                            env=env)
        assert bad_since.returncode == 2 and "ISO 8601" in bad_since.stderr
        disabled = await asyncio.to_thread(atelier, "webhooks", "update", endpoint["id"], "--disable", env=env)
        assert json.loads(disabled.stdout)["enabled"] is False
        refused = await asyncio.to_thread(atelier, "webhooks", "recover", endpoint["id"], "--since", "1h", env=env)
        assert refused.returncode == 1 and "409" in refused.stderr and "enable it first" in refused.stderr
        deleted = await asyncio.to_thread(atelier, "webhooks", "delete", endpoint["id"], env=env)
        assert deleted.returncode == 0
        gone = await asyncio.to_thread(atelier, "webhooks", "get", endpoint["id"], env=env)
        assert gone.returncode == 1 and "404" in gone.stderr
