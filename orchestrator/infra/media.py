"""What a stored output is: its type from the whole spooled file, and dimensions or duration where
the format says them. Never a reason to fail a job that was paid for (issue 13, defect 8).

Libraries do the reading: ``puremagic`` (file signatures: AVIF, HEIC, TIFF, BMP, WebM... and the
ISO-BMFF brands that tell an M4A from an MP4), ``imagesize`` (image dimensions from headers, every
common format) and ``mutagen`` (durations of MP3, OGG, FLAC, M4A and MP4, wherever ``moov`` sits).
``ffprobe`` fills in video dimensions and WebM durations when it is installed. A type none of them
knows is stored as the provider's declared type (or ``application/octet-stream``) with a note.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

import imagesize
import mutagen
import puremagic

GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})
# A web page or an API error body where a file was due: the provider served something else.
NOT_MEDIA = ("text/html", "application/json", "application/xml", "text/xml")


@dataclass
class MediaInfo:
    content_type: str
    extension: str
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


# ISO-BMFF major brands: the container is shared by MP4 video, M4A audio, AVIF and HEIC images.
_BRANDS = {
    b"avif": ("image/avif", "avif"), b"avis": ("image/avif", "avif"),
    b"heic": ("image/heic", "heic"), b"heix": ("image/heic", "heic"), b"heim": ("image/heic", "heic"),
    b"heis": ("image/heic", "heic"), b"mif1": ("image/heif", "heif"), b"msf1": ("image/heif", "heif"),
    b"M4A ": ("audio/mp4", "m4a"), b"M4B ": ("audio/mp4", "m4a"), b"M4P ": ("audio/mp4", "m4a"),
    b"qt  ": ("video/quicktime", "mov"), b"3gp4": ("video/3gpp", "3gp"), b"3gp5": ("video/3gpp", "3gp"),
    b"3g2a": ("video/3gpp2", "3g2"),
}


# The commonest outputs' signatures, checked before puremagic (whose scan of its whole database was
# 5 % of a worker's CPU per image job in bench/throughput.py).
_COMMON = ((b"\x89PNG\r\n\x1a\n", "image/png", "png"), (b"\xff\xd8\xff", "image/jpeg", "jpg"),
           (b"GIF87a", "image/gif", "gif"), (b"GIF89a", "image/gif", "gif"), (b"RIFF", "image/webp", "webp"))


def _signature(file: IO[bytes]) -> tuple[str, str] | None:
    """``(content type, extension)`` from the file's signature, if any library knows it."""
    file.seek(0)
    head = file.read(12)
    if head[4:8] == b"ftyp":
        file.seek(0)
        return _BRANDS.get(head[8:12], ("video/mp4", "mp4"))
    for magic, ctype, ext in _COMMON:  # most outputs: known without the signature database's full scan
        if head.startswith(magic) and (ctype != "image/webp" or head[8:12] == b"WEBP"):
            file.seek(0)
            return _normal(ctype, ext)
    file.seek(0)
    try:
        found = puremagic.magic_stream(file)
    except (puremagic.PureError, ValueError, OSError):
        return None
    finally:
        file.seek(0)
    for match in found:
        if match.mime_type:
            ext = match.extension.lstrip(".") or (mimetypes.guess_extension(match.mime_type) or ".bin")[1:]
            return _normal(match.mime_type, ext)
    return None


def _normal(ctype: str, ext: str) -> tuple[str, str]:
    """One name per type (signature databases disagree on aliases)."""
    aliases = {"audio/x-wav": "audio/wav", "audio/wave": "audio/wav", "audio/x-flac": "audio/flac",
               "audio/mp3": "audio/mpeg", "audio/x-m4a": "audio/mp4", "image/jpg": "image/jpeg",
               "image/x-ms-bmp": "image/bmp", "image/x-bmp": "image/bmp", "image/x-tiff": "image/tiff",
               "video/x-matroska": "video/webm" if ext == "webm" else "video/x-matroska"}
    ctype = aliases.get(ctype, ctype)
    # One extension per known type too (a JPEG may be matched as ``.jfif`` or ``.jpe``).
    return ctype, EXTENSIONS.get(ctype) or {"tif": "tiff", "heif": "heic"}.get(ext, ext)


def identify(file: IO[bytes], declared: str | None = None) -> MediaInfo:
    """The type of the spooled ``file`` (read from its start, seeked back), with what is cheap to know."""
    found = _signature(file)
    declared_type = (declared or "").split(";")[0].strip().lower()
    if found is None:
        if declared_type == "text/plain":  # text outputs (Midjourney's describe, Suno's lyrics) have no signature
            return MediaInfo("text/plain", "txt")
        if declared_type and declared_type not in GENERIC_TYPES:
            ext = EXTENSIONS.get(declared_type) or (mimetypes.guess_extension(declared_type) or ".bin").lstrip(".")
            return MediaInfo(declared_type, ext, notes={"type_note": "type as the provider declared it "
                                                        "(the file's signature is not one Atelier knows)"})
        return MediaInfo("application/octet-stream", "bin",
                         notes={"type_note": "unknown file type; stored as it came"})
    ctype, ext = found
    info = MediaInfo(ctype, ext)
    if ctype.startswith("image/"):
        _image_size(file, info)
    elif ctype.startswith(("audio/", "video/")):
        _duration(file, info)
        if ctype.startswith("video/"):
            _video_size(file, info)
    file.seek(0)
    return info


def is_not_media(info: MediaInfo) -> bool:
    return info.content_type in NOT_MEDIA


def _image_size(file: IO[bytes], info: MediaInfo) -> None:
    file.seek(0)
    with contextlib.suppress(Exception):  # a header imagesize cannot read leaves the size unknown
        width, height = imagesize.get(file)
        if width > 0 and height > 0:
            info.width, info.height = int(width), int(height)


def _duration(file: IO[bytes], info: MediaInfo) -> None:
    file.seek(0)
    with contextlib.suppress(Exception):  # mutagen reads MP3, OGG, FLAC, WAV, M4A, MP4 (moov anywhere)
        parsed = mutagen.File(file)
        length = getattr(getattr(parsed, "info", None), "length", None)
        if isinstance(length, int | float) and length > 0:
            info.duration_seconds = round(float(length), 3)


def _video_size(file: IO[bytes], info: MediaInfo) -> None:
    """Width and height from the ISO-BMFF track header (``moov/trak/tkhd``, wherever ``moov`` is), else
    from ffprobe when installed (WebM, Matroska)."""
    with contextlib.suppress(Exception):
        size = _mp4_track_size(file)
        if size is not None:
            info.width, info.height = size
            return
    probed = _ffprobe(file)
    if probed:
        info.width = info.width or probed.get("width")
        info.height = info.height or probed.get("height")
        if info.duration_seconds is None and probed.get("duration"):
            info.duration_seconds = round(float(probed["duration"]), 3)


def _boxes(file: IO[bytes], start: int, end: int) -> list[tuple[bytes, int, int]]:
    """``(type, payload start, payload end)`` of the ISO-BMFF boxes between ``start`` and ``end``."""
    found: list[tuple[bytes, int, int]] = []
    at = start
    while at + 8 <= end and len(found) < 1000:
        file.seek(at)
        header = file.read(16)
        size, kind = struct.unpack(">I4s", header[:8])
        payload = at + 8
        if size == 1:
            size = struct.unpack(">Q", header[8:16])[0]
            payload = at + 16
        elif size == 0:
            size = end - at
        if size < 8:
            break
        found.append((kind, payload, min(at + size, end)))
        at += size
    return found


def _mp4_track_size(file: IO[bytes]) -> tuple[int, int] | None:
    file.seek(0, 2)
    end = file.tell()
    for kind, start, stop in _boxes(file, 0, end):
        if kind != b"moov":
            continue
        for trak, t_start, t_stop in _boxes(file, start, stop):
            if trak != b"trak":
                continue
            for box, b_start, _ in _boxes(file, t_start, t_stop):
                if box == b"tkhd":
                    file.seek(b_start)
                    data = file.read(96)
                    offset = 84 if data[0] == 1 else 72  # version 1 has 64-bit times
                    width, height = struct.unpack(">II", data[offset + 4:offset + 12])
                    if width >> 16 and height >> 16:
                        return width >> 16, height >> 16
    return None


def _ffprobe(file: IO[bytes]) -> dict[str, Any]:
    binary = shutil.which("ffprobe")
    if binary is None:
        return {}
    file.seek(0)
    with tempfile.NamedTemporaryFile(suffix=".media") as copy:
        shutil.copyfileobj(file, copy)
        copy.flush()
        try:
            out = subprocess.run([binary, "-v", "error", "-show_entries", "stream=width,height:format=duration",
                                  "-of", "json", copy.name], capture_output=True, timeout=20, check=False)
            parsed = json.loads(out.stdout or b"{}")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return {}
    streams = [s for s in parsed.get("streams", []) if s.get("width")]
    result: dict[str, Any] = {"duration": (parsed.get("format") or {}).get("duration")}
    if streams:
        result["width"], result["height"] = int(streams[0]["width"]), int(streams[0]["height"])
    return result


def sniff(head: bytes) -> MediaInfo | None:
    """The type of a file from its first bytes (serving stored files); ``None`` when unknown."""
    import io

    found = _signature(io.BytesIO(head))
    return MediaInfo(*found) if found is not None else None


EXTENSIONS = {
    "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif", "audio/wav": "wav",
    "audio/mp4": "m4a", "video/quicktime": "mov", "video/mp4": "mp4", "video/webm": "webm",
    "audio/mpeg": "mp3", "audio/ogg": "ogg", "audio/flac": "flac", "image/avif": "avif", "image/heic": "heic",
    "image/tiff": "tiff", "image/bmp": "bmp", "text/plain": "txt",
}
