"""Pure pieces checked against independent references (published test vectors, real files)."""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
from standardwebhooks import Webhook

from orchestrator.domain.ids import new_id
from orchestrator.domain.webhooks import new_secret
from orchestrator.infra.media import identify, is_not_media, sniff
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
def test_media_typing_on_real_files(ext, ctype):
    data, _ = media.make(ext, "seed")
    info = identify(io.BytesIO(data))
    assert info.content_type == ctype and not info.notes
    assert (info.width, info.height) != (None, None) or info.duration_seconds
    head = sniff(data[:65536])
    assert head is not None and head.content_type == ctype


def test_a_jfif_jpeg_is_stored_as_jpg():
    from providers.sandbox.stability import jpeg, webp  # real encoders: a JFIF JPEG and a WebP
    assert (identify(io.BytesIO(jpeg("seed", 8, 8))).content_type, identify(io.BytesIO(jpeg("seed", 8, 8))).extension) \
        == ("image/jpeg", "jpg")
    info = identify(io.BytesIO(webp("seed", 8, 8)))
    assert (info.content_type, info.extension) == ("image/webp", "webp")


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _top_boxes(data: bytes) -> dict[bytes, bytes]:
    boxes, at = {}, 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        boxes[kind] = data[at:at + size]
        at += size
    return boxes


def test_output_typing_reads_the_whole_file_and_never_fails_a_paid_job():
    mp4, _ = media.make("mp4", "seed")
    boxes = _top_boxes(mp4)
    moov_last = b"".join(v for k, v in boxes.items() if k != b"moov") + boxes[b"moov"]  # a 'streaming' MP4
    late = identify(io.BytesIO(moov_last))
    early = identify(io.BytesIO(mp4))
    assert late.content_type == "video/mp4" and late.duration_seconds and late.width
    assert (late.width, late.height, late.duration_seconds) == (early.width, early.height, early.duration_seconds)
    avif = _box(b"ftyp", b"avif\x00\x00\x00\x00avifmif1miaf")
    assert identify(io.BytesIO(avif)).content_type == "image/avif"  # not stored as .mp4
    heic = _box(b"ftyp", b"heic\x00\x00\x00\x00mif1heic")
    assert identify(io.BytesIO(heic)).content_type == "image/heic"
    m4a = _box(b"ftyp", b"M4A \x00\x00\x00\x00M4A isom")
    assert identify(io.BytesIO(m4a)).content_type == "audio/mp4"
    bmp = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHH", 40, 3, 2, 1, 24) + b"\x00" * 40
    found = identify(io.BytesIO(bmp))
    assert found.content_type == "image/bmp" and (found.width, found.height) == (3, 2)
    tiff = b"II*\x00" + struct.pack("<I", 8) + b"\x00" * 64
    assert identify(io.BytesIO(tiff)).content_type == "image/tiff"
    unknown = identify(io.BytesIO(b"\x00\x01 opaque render"), "image/x-exotic")
    assert unknown.content_type == "image/x-exotic" and "type_note" in unknown.notes
    assert identify(io.BytesIO(b"\x00\x01 opaque")).content_type == "application/octet-stream"
    assert is_not_media(identify(io.BytesIO(b"<!DOCTYPE html><html><body>error</body></html>"), "text/html"))
    assert identify(io.BytesIO(b"1. a prompt"), "text/plain").content_type == "text/plain"


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
