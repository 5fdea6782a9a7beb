# Invariants: a blob file exists under its final name only if its bytes hash to that name;
# uploads stream to a temp file (never held in memory) and the temp file is deleted on every
# failure path; finalize and expiry run under one lock so a sweep cannot delete a blob that an
# upload has just refreshed.
"""Content-addressed blob files on disk with streamed, size-bounded uploads."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from relay.errors import BadRequest, TooLarge

__all__ = ["BLOB_ID_RE", "CHUNK_SIZE", "BlobFiles", "Upload"]

BLOB_ID_RE = re.compile(r"[0-9a-f]{64}")
CHUNK_SIZE = 256 * 1024


class Upload:
    """A fully received, hashed upload sitting in a temp file."""

    __slots__ = ("blob_id", "size", "tmp_path")

    def __init__(self, blob_id: str, size: int, tmp_path: Path) -> None:
        self.blob_id = blob_id
        self.size = size
        self.tmp_path = tmp_path


class BlobFiles:
    """Blob files under ``root``: ``root/ab/abcdef...`` plus ``root/tmp/``.

    Args:
        root: directory for blobs (created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.lock = asyncio.Lock()

    def prepare(self) -> None:
        """Create directories and delete temp files left by a crash."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path_for(self, blob_id: str) -> Path:
        """Return the final path of a blob id (which must match ``BLOB_ID_RE``).

        Raises:
            BadRequest: not a 64-character lowercase hex id.
        """
        if BLOB_ID_RE.fullmatch(blob_id) is None:
            raise BadRequest("blob id must be 64 lowercase hex characters")
        return self.root / blob_id[:2] / blob_id

    async def receive(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str
    ) -> Upload:
        """Stream ``chunks`` to a temp file while hashing.

        Args:
            chunks: the request body.
            max_bytes: size limit.
            expected_sha256: the digest the client signed.

        Returns:
            The upload (caller must ``finalize`` or ``discard`` it).

        Raises:
            TooLarge: over ``max_bytes`` (temp file deleted).
            BadRequest: ``digest_mismatch`` (temp file deleted).
        """
        tmp_path = self.tmp / secrets.token_hex(16)
        hasher = hashlib.sha256()
        size = 0
        loop = asyncio.get_running_loop()
        try:
            with open(tmp_path, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"blob exceeds {max_bytes} bytes")
                    hasher.update(chunk)
                    fh.write(chunk)
                fh.flush()
                await loop.run_in_executor(None, os.fsync, fh.fileno())
            digest = hasher.hexdigest()
            if digest != expected_sha256:
                raise BadRequest(
                    "body does not match X-Blindpost-Content-SHA256", code="digest_mismatch"
                )
        except BaseException:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            raise
        return Upload(digest, size, tmp_path)

    def finalize(self, upload: Upload) -> None:
        """Move the upload to its content address (or drop it if already stored)."""
        final = self.path_for(upload.blob_id)
        if final.exists():
            upload.tmp_path.unlink(missing_ok=True)
            return
        final.parent.mkdir(exist_ok=True)
        os.replace(upload.tmp_path, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, blob_ids: Iterable[str]) -> None:
        """Delete blob files (missing files are ignored)."""
        for blob_id in blob_ids:
            with contextlib.suppress(OSError, BadRequest):
                self.path_for(blob_id).unlink(missing_ok=True)
