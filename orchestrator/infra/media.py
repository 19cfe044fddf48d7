"""Recognise media files from their first bytes: type, and dimensions/duration where cheap."""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass
class MediaInfo:
    content_type: str
    extension: str
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None


def sniff(head: bytes) -> MediaInfo | None:
    """Identify ``head`` (the first few KB of a file); ``None`` if it is not a media type we know."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        w, h = struct.unpack(">II", head[16:24])
        return MediaInfo("image/png", "png", w, h)
    if head.startswith(b"\xff\xd8\xff"):
        return MediaInfo("image/jpeg", "jpg", *_jpeg_size(head))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return MediaInfo("image/webp", "webp")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return MediaInfo("audio/wav", "wav", duration_seconds=_wav_duration(head))
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        w, h = struct.unpack("<HH", head[6:10])
        return MediaInfo("image/gif", "gif", w, h)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return MediaInfo("audio/mp4", "m4a")
        ctype, ext = ("video/quicktime", "mov") if brand == b"qt  " else ("video/mp4", "mp4")
        return MediaInfo(ctype, ext, *_mp4_info(head))
    if head[:4] == b"\x1aE\xdf\xa3":
        return MediaInfo("video/webm", "webm")
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return MediaInfo("audio/mpeg", "mp3")
    if head[:4] == b"OggS":
        return MediaInfo("audio/ogg", "ogg")
    if head[:4] == b"fLaC":
        return MediaInfo("audio/flac", "flac")
    return None


def _jpeg_size(data: bytes) -> tuple[int | None, int | None]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None, None
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None, None


def _wav_duration(data: bytes) -> float | None:
    i = 12
    byte_rate = None
    while i + 8 <= len(data):
        cid, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        if cid == b"fmt " and i + 16 <= len(data):
            byte_rate = struct.unpack("<I", data[i + 16:i + 20])[0]
        if cid == b"data" and byte_rate:
            return round(size / byte_rate, 3)
        i += 8 + size + (size & 1)
    return None


def _mp4_info(data: bytes) -> tuple[int | None, int | None, float | None]:
    """Width, height (first ``tkhd`` with a size) and duration (``mvhd``), if ``moov`` is in ``data``."""
    width = height = None
    duration = None
    pos = data.find(b"mvhd")
    if pos >= 4 and pos + 28 <= len(data):
        version = data[pos + 4]
        if version == 0:
            timescale, dur = struct.unpack(">II", data[pos + 16:pos + 24])
        else:
            timescale, dur = struct.unpack(">IQ", data[pos + 24:pos + 36]) if pos + 36 <= len(data) else (0, 0)
        if timescale:
            duration = round(dur / timescale, 3)
    start = 0
    while (pos := data.find(b"tkhd", start)) >= 0:
        version = data[pos + 4] if pos + 4 < len(data) else 0
        off = pos + (80 if version == 0 else 92)
        if off + 8 > len(data):
            break
        w, h = struct.unpack(">II", data[off:off + 8])
        if w and h:
            width, height = w >> 16, h >> 16
            break
        start = pos + 4
    return width, height, duration


EXTENSIONS = {
    "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif", "audio/wav": "wav",
    "audio/mp4": "m4a", "video/quicktime": "mov", "video/mp4": "mp4", "video/webm": "webm",
    "audio/mpeg": "mp3", "audio/ogg": "ogg", "audio/flac": "flac",
}
