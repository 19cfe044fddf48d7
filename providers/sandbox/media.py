"""Real, small media files for the simulators.

Every simulated output is a genuine file of its type (a decodable PNG, WAV,
MP3 or H.264 MP4), and differs per task so that checksums prove the right
bytes travelled to the right job.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
import zlib
from functools import cache
from importlib import resources


def _seed_bytes(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).digest()


def png(seed: str, width: int = 32, height: int = 32) -> bytes:
    """A solid-colour RGB PNG whose colour is derived from ``seed``."""
    r, g, b = _seed_bytes(seed)[:3]
    row = b"\x00" + bytes([r, g, b]) * width
    raw = row * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def wav(seed: str, seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A mono 16-bit sine tone whose pitch is derived from ``seed``."""
    freq = 220 + _seed_bytes(seed)[0] * 2
    frames = bytearray()
    for i in range(int(seconds * rate)):
        frames += struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return buf.getvalue()


def tagged_wav(seed: str, seconds: float = 1.0, rate: int = 8000) -> bytes:
    """``wav(seed)`` plus a trailing RIFF ``LIST/INFO`` chunk naming ``seed``.

    ``wav`` alone takes its pitch from one byte of the seed, so two seeds can give the same
    file; the comment chunk (which decoders skip) makes every seed's file distinct.
    """
    data = wav(seed, seconds, rate)
    comment = seed.encode()[:200] + b"\x00"
    if len(comment) % 2:
        comment += b"\x00"
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(comment)) + comment
    body = data[8:] + b"LIST" + struct.pack("<I", len(info)) + info
    return b"RIFF" + struct.pack("<I", len(body)) + body


@cache
def _fixture(name: str) -> bytes:
    return resources.files("providers.sandbox").joinpath("media", name).read_bytes()


def mp4(seed: str) -> bytes:
    """A 1 s, 64x64 H.264 MP4 (faststart) with a trailing ``free`` box naming ``seed``.

    A ``free`` box is legal anywhere at top level, so players still decode the file
    while its sha256 differs per task.
    """
    tag = seed.encode()[:200]
    return _fixture("sample.mp4") + struct.pack(">I", 8 + len(tag)) + b"free" + tag


def mp3(seed: str) -> bytes:
    """A 1 s MP3 tone followed by an ID3v1 tag carrying ``seed`` as its title."""
    title = seed.encode()[:30].ljust(30, b"\x00")
    return _fixture("sample.mp3") + b"TAG" + title + b"\x00" * 30 + b"\x00" * 30 + b"2026" + b"\x00" * 30 + b"\xff"


def jpeg_like_cover(seed: str) -> bytes:
    """Cover art for music clips: a PNG (simulators label it ``image/png``)."""
    return png("cover:" + seed, 48, 48)


MEDIA_TYPES = {
    "png": "image/png",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "mp4": "video/mp4",
}


def make(ext: str, seed: str) -> tuple[bytes, str]:
    """Bytes and content type of a sample file with extension ``ext``."""
    makers = {"png": png, "wav": wav, "mp3": mp3, "mp4": mp4}
    return makers[ext](seed), MEDIA_TYPES[ext]
