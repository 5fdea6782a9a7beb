# Invariants:
# * A blob is stored under its final id only if its bytes hash to that id. Uploads stream into
#   a staging area (a temp file, or staged rows) chunk by chunk, never whole in memory, and the
#   staged copy is deleted on every failure path; reads stream back in chunks of at most
#   CHUNK_SIZE bytes.
# * ``lock`` guards finalize + the metadata update against the sweep's metadata delete + content
#   delete, so a sweep cannot delete a blob an upload has just refreshed. For a store shared by
#   several nodes (PostgreSQL) the lock excludes every node.
# * Handlers see the ``BlobStore`` Protocol only (relay.backends builds the configured one).
"""Content-addressed blob contents: the ``BlobStore`` contract and the filesystem store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

from relay.errors import BadRequest, TooLarge

__all__ = [
    "BLOB_ID_RE",
    "CHUNK_SIZE",
    "BlobFiles",
    "BlobReader",
    "BlobStore",
    "FsBlobStore",
    "Upload",
    "check_blob_id",
]

BLOB_ID_RE = re.compile(r"[0-9a-f]{64}")
CHUNK_SIZE = 256 * 1024


def check_blob_id(blob_id: str) -> str:
    """Return ``blob_id`` if it is 64 lowercase hex characters.

    Raises:
        BadRequest: it is not.
    """
    if BLOB_ID_RE.fullmatch(blob_id) is None:
        raise BadRequest("blob id must be 64 lowercase hex characters")
    return blob_id


class Upload:
    """A fully received, hashed upload, staged until ``finalize`` or ``discard``.

    Attributes:
        blob_id: the SHA-256 of the content (hex), its final id.
        size: bytes received.
        staged: where the backend staged it (a temp file path, an upload id).
    """

    __slots__ = ("blob_id", "size", "staged")

    def __init__(self, blob_id: str, size: int, staged: str) -> None:
        self.blob_id = blob_id
        self.size = size
        self.staged = staged

    def __repr__(self) -> str:
        return f"Upload(id={self.blob_id}, size={self.size})"


class BlobReader(Protocol):
    """One stored blob, read in chunks."""

    size: int

    def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` in chunks of at most ``CHUNK_SIZE``.

        Raises:
            StorageError: the backend failed mid-stream.
        """
        ...


class BlobStore(Protocol):
    """Where blob contents live (metadata and expiry live in the ``RelayStore``)."""

    #: Held around finalize + ``put_blob`` and around the sweep's delete (see the module
    #: invariants); an async context manager.
    lock: contextlib.AbstractAsyncContextManager[Any]

    async def open(self) -> None:
        """Prepare the storage (directories, schema) and drop staged leftovers of a crash.

        Raises:
            StorageError: the backend cannot be reached.
        """

    async def close(self) -> None:
        """Release resources."""

    async def receive(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str
    ) -> Upload:
        """Stream ``chunks`` into the staging area while hashing.

        Args:
            chunks: the request body.
            max_bytes: size limit.
            expected_sha256: the digest the client signed.

        Returns:
            The staged upload (the caller must ``finalize`` or ``discard`` it).

        Raises:
            TooLarge: over ``max_bytes`` (nothing stays staged).
            BadRequest: ``digest_mismatch`` (nothing stays staged).
            StorageError: the backend failed (nothing stays staged, as far as it can tell).
        """

    async def finalize(self, upload: Upload) -> None:
        """Store the upload under its content id (or drop it if that id is stored already).

        Call with ``lock`` held.

        Raises:
            StorageError: the backend failed.
        """

    async def discard(self, upload: Upload) -> None:
        """Delete what is still staged for ``upload`` (nothing after ``finalize``)."""

    def local_path(self, blob_id: str) -> Path | None:
        """The file holding a blob, for a backend on the local filesystem (None otherwise, or
        when it is missing): the server then sends it with sendfile.

        Raises:
            BadRequest: malformed blob id.
        """

    async def open_read(self, blob_id: str) -> BlobReader | None:
        """Return a reader for a stored blob, or None when it is not stored.

        Raises:
            BadRequest: malformed blob id.
            StorageError: the backend failed.
        """

    async def delete(self, blob_ids: Iterable[str]) -> None:
        """Delete blob contents (missing ones are ignored). Call with ``lock`` held.

        Raises:
            StorageError: the backend failed.
        """


class _FileReader:
    """A blob file, read in chunks on the default executor."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        with open(self.path, "rb") as fh:
            fh.seek(start)
            left = end - start
            while left > 0:
                data = await loop.run_in_executor(None, fh.read, min(CHUNK_SIZE, left))
                if not data:
                    return
                left -= len(data)
                yield data


class FsBlobStore:
    """Blob files under ``root``: ``root/ab/abcdef...`` plus ``root/tmp/``.

    Args:
        root: directory for blobs (created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.lock: contextlib.AbstractAsyncContextManager[Any] = asyncio.Lock()

    async def open(self) -> None:
        """Create directories and delete temp files left by a crash."""
        self.prepare()

    async def close(self) -> None:
        """Nothing to release."""

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
        return self.root / check_blob_id(blob_id)[:2] / blob_id

    def local_path(self, blob_id: str) -> Path | None:
        """See ``BlobStore.local_path``."""
        path = self.path_for(blob_id)
        return path if path.is_file() else None

    async def open_read(self, blob_id: str) -> BlobReader | None:
        """See ``BlobStore.open_read``."""
        path = self.path_for(blob_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return _FileReader(path, size)

    async def receive(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str
    ) -> Upload:
        """See ``BlobStore.receive`` (the temp file is fsync'd before it is returned)."""
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
        return Upload(digest, size, str(tmp_path))

    async def finalize(self, upload: Upload) -> None:
        """See ``BlobStore.finalize``: move the temp file to its content address."""
        final = self.path_for(upload.blob_id)
        staged = Path(upload.staged)
        if final.exists():
            staged.unlink(missing_ok=True)
            return
        final.parent.mkdir(exist_ok=True)
        os.replace(staged, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def discard(self, upload: Upload) -> None:
        """See ``BlobStore.discard``."""
        Path(upload.staged).unlink(missing_ok=True)

    async def delete(self, blob_ids: Iterable[str]) -> None:
        """See ``BlobStore.delete``."""
        for blob_id in blob_ids:
            with contextlib.suppress(OSError, BadRequest):
                self.path_for(blob_id).unlink(missing_ok=True)


BlobFiles = FsBlobStore  # the name before blob stores became pluggable
