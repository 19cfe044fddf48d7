"""Result storage: local files or S3, written from a stream with bounded memory.

An output is first spooled (in memory up to 8 MiB, then to a temporary file)
while its size is capped and its sha256 computed; then it is committed under a
deterministic key, so a retried collection overwrites instead of duplicating.
URLs are minted when read: presigned S3 GETs, or API-served local files with an
HMAC-signed expiry. Provider links are never what a client depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

SPOOL_MEMORY = 8 * 1024 * 1024
HEAD_BYTES = 64 * 1024
# LocalStorage writes outputs smaller than this from the event loop, others from a thread (0: always a thread).
INLINE_WRITE_BYTES = 256 * 1024


class OutputTooLarge(Exception):
    pass


@dataclass
class Spooled:
    file: IO[bytes]
    size: int
    sha256: str
    head: bytes


async def spool(chunks: AsyncIterator[bytes], max_bytes: int) -> Spooled:
    """Drain ``chunks`` into a spooled temporary file, enforcing ``max_bytes``."""
    file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 - returned open
    digest = hashlib.sha256()
    size = 0
    head = bytearray()
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise OutputTooLarge(f"output exceeds the {max_bytes}-byte limit")
            digest.update(chunk)
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
            file.write(chunk)
    except BaseException:
        file.close()
        raise
    file.seek(0)
    return Spooled(file, size, digest.hexdigest(), bytes(head))


class Storage:
    """Where outputs live. ``put`` commits a spooled file; ``url`` mints a read URL."""

    async def put(self, key: str, spooled: Spooled, content_type: str) -> None:
        raise NotImplementedError

    async def url(self, key: str, ttl_seconds: int) -> str:
        raise NotImplementedError

    async def read(self, key: str) -> bytes:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Remove a stored output (retention, DELETE /v1/jobs/{id}); a missing one is fine."""
        raise NotImplementedError

    async def check(self) -> None:
        """Raise if the storage cannot be written (used by ``/readyz`` and start-up)."""


class LocalStorage(Storage):
    def __init__(self, root: Path, public_url: str, secret: str) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")
        self.secret = secret.encode()
        root.mkdir(parents=True, exist_ok=True)
        self._resolved_root = root.resolve()

    def path(self, key: str) -> Path:
        path = (self._resolved_root / key).resolve()
        if not path.is_relative_to(self._resolved_root):
            raise ValueError("storage key escapes the storage root")
        return path

    async def put(self, key: str, spooled: Spooled, content_type: str) -> None:
        if spooled.size < INLINE_WRITE_BYTES:
            # A small file (held in memory) lands in the page cache in about 0.1 ms: less than
            # handing it to a thread and back costs (about 0.15 ms of CPU, measured).
            self._put(key, spooled.file)
            return
        await asyncio.to_thread(self._put, key, spooled.file)

    def _put(self, key: str, file: IO[bytes]) -> None:
        # Plain os calls: this runs once per output, and pathlib's and mkstemp's conveniences
        # cost more than the write itself for the typical image.
        target = str(self.path(key))
        parent = os.path.dirname(target)
        try:
            os.mkdir(parent)  # the job's directory: new, in a tenant's directory that exists
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".part-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := file.read(1024 * 1024):
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        # compared as bytes: compare_digest refuses str with non-ASCII characters (a forged URL may carry them)
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires).encode(),
                                                               signature.encode("utf-8", "replace"))

    async def url(self, key: str, ttl_seconds: int) -> str:
        expires = int(time.time()) + ttl_seconds
        return f"{self.public_url}/v1/files/{quote(key)}?expires={expires}&signature={self.signature(key, expires)}"

    async def read(self, key: str) -> bytes:
        return await asyncio.to_thread(self.path(key).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)

    async def check(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None,
                 public_endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"})
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs name the host clients reach (the signature covers it); presigning is offline.
        self.presigner: Any = (boto3.client("s3", endpoint_url=public_endpoint_url, config=config)
                               if public_endpoint_url else self.client)

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, spooled: Spooled, content_type: str) -> None:
        await asyncio.to_thread(
            self.client.upload_fileobj, spooled.file, self.bucket, self.object_key(key),
            ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": spooled.sha256}},
        )

    async def url(self, key: str, ttl_seconds: int) -> str:
        return str(self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.object_key(key)},
            ExpiresIn=min(ttl_seconds, 7 * 24 * 3600),
        ))

    async def read(self, key: str) -> bytes:
        obj = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket, Key=self.object_key(key))
        return bytes(await asyncio.to_thread(obj["Body"].read))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self.object_key(key))

    async def check(self) -> None:
        await asyncio.to_thread(self.client.head_bucket, Bucket=self.bucket)


def open_storage(storage_url: str, *, public_url: str, secret: str, s3_endpoint_url: str | None,
                 s3_public_endpoint_url: str | None = None) -> Storage:
    parts = urlsplit(storage_url)
    if parts.scheme == "file":
        return LocalStorage(Path(parts.path), public_url, secret)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError("ATELIER_STORAGE_URL s3:// needs a bucket: s3://bucket/prefix")
        return S3Storage(parts.netloc, parts.path, s3_endpoint_url, s3_public_endpoint_url)
    raise ValueError(f"ATELIER_STORAGE_URL must be file:///path or s3://bucket/prefix, not {storage_url!r}")
