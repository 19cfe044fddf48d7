"""Pure pieces checked against independent references (published test vectors, real files)."""

from __future__ import annotations

import base64
import json

import pytest
from standardwebhooks import Webhook

from orchestrator.domain.ids import new_id
from orchestrator.domain.webhooks import new_secret
from orchestrator.infra.media import sniff
from orchestrator.infra.settings import Settings
from orchestrator.wire.signing import sign, verify
from providers.contract import ProviderSettings
from providers.replicate import ReplicateProvider, output_urls, tqdm_progress
from providers.sandbox import media


def test_signature_matches_replicate_published_vector():
    # From replicate-python tests/test_webhooks.py (a Standard Webhooks signature).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_accepted_by_standardwebhooks_library():
    secret = new_secret()
    body = json.dumps({"type": "job.succeeded"}).encode()
    import time

    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
               "webhook-signature": sign(secret, "msg_1", ts, body)}
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ")
    assert not verify(new_secret(), headers, body)


def test_ids_sort_by_creation_time():
    ids = [new_id("job", at_ms=t) for t in (1, 1_000, 1_700_000_000_000, 1_800_000_000_000)]
    assert ids == sorted(ids) and all(len(i) == 30 for i in ids)


@pytest.mark.parametrize(("ext", "ctype"), [("png", "image/png"), ("wav", "audio/wav"), ("mp3", "audio/mpeg"),
                                           ("mp4", "video/mp4")])
def test_media_sniffing_on_real_files(ext, ctype):
    data, _ = media.make(ext, "seed")
    info = sniff(data[:65536])
    assert info is not None and info.content_type == ctype
    assert sniff(b"<html>error</html>") is None


def test_replicate_output_shapes_and_progress():
    assert output_urls("https://replicate.delivery/a.png") == ["https://replicate.delivery/a.png"]
    assert output_urls(["https://x/a.png", "https://x/b.png"]) == ["https://x/a.png", "https://x/b.png"]
    assert output_urls({"video": "https://x/v.mp4", "meta": {"n": 1}, "text": "hello"}) == ["https://x/v.mp4"]
    assert output_urls("data:image/png;base64," + base64.b64encode(b"x").decode())
    assert tqdm_progress("Using seed\n 4%|▍         | 2/50 [00:00<00:02]\n 50%|█████     | 25/50 [00:01<00:01]") == 50
    assert tqdm_progress(None) is None


def test_replicate_status_mapping_handles_traps():
    p = ReplicateProvider(ProviderSettings(name="replicate", base_url="https://api.replicate.com"))
    removed = p.parse_prediction({"status": "succeeded", "output": None, "data_removed": True})
    assert removed.state == "failed" and removed.error_code == "output_expired"
    assert p.parse_prediction({"status": "aborted"}).state == "canceled"
    assert p.parse_prediction({"status": "warming_up"}).state == "unknown"  # never mapped to failure
    failed = p.parse_prediction({"status": "failed", "error": "NSFW"})
    assert failed.state == "failed" and failed.error_message == "NSFW"


def test_settings_contract(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_REPLICATE_API_KEY", "r8_a, r8_b")
    monkeypatch.setenv("ATELIER_REPLICATE_BASE_URL", "https://gateway.example.com/replicate")
    monkeypatch.setenv("ATELIER_STORAGE_URL", "relative/dir")
    s = Settings()
    cfg = s.provider_settings()["replicate"]
    assert cfg.api_keys == ["r8_a", "r8_b"] and cfg.base_url == "https://gateway.example.com/replicate"
    assert s.storage_url == "file://" + str((tmp_path.cwd() / "relative/dir").resolve())
    assert s.provider_settings()["sora"].base_url == "https://api.openai.com"
    assert "suno" not in s.provider_settings()  # no default origin: must be configured
    monkeypatch.setenv("ATELIER_SANDBOX", "1")
    sandboxed = Settings().provider_settings()
    assert sandboxed["sora"].base_url == "http://127.0.0.1:8790/sora" and sandboxed["sora"].api_keys
    assert sandboxed["replicate"].base_url == "https://gateway.example.com/replicate"  # explicit URL wins


def test_settings_toml_file(monkeypatch, tmp_path):
    cfg = tmp_path / "atelier.toml"
    cfg.write_text('[providers.fal]\napi_keys = ["k1", "k2"]\njob_timeout_seconds = 60\n'
                   'typical_seconds = { image = 3 }\n')
    monkeypatch.setenv("ATELIER_CONFIG_FILE", str(cfg))
    fal = Settings().provider_settings()["fal"]
    assert fal.api_keys == ["k1", "k2"] and fal.job_timeout_seconds == 60 and fal.typical_seconds["image"] == 3
