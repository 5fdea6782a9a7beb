# Invariants:
# * Content lives in rows of at most CHUNK_SIZE bytes (``blob_chunks``), so an upload is written
#   and a download read one chunk at a time: neither is ever whole in memory. Chunk n holds bytes
#   [n * CHUNK_SIZE, (n + 1) * CHUNK_SIZE).
# * An upload stages its chunks under its own upload id (committed chunk by chunk, so no long
#   transaction holds back vacuum); finalize renames them to the content id and records the
#   size in one transaction, so a blob id is either complete or absent. Staged rows of an upload
#   that failed are deleted at once; those of a node that died are deleted once older than
#   ``STALE_UPLOAD_MS``.
# * ``lock`` is a session-level advisory lock: it excludes every node sharing the database.
# * Every failure surfaces as StorageError (relay.store.pg_common.storage_errors).
"""Blob contents in PostgreSQL, so any relay node can serve any blob: ``PgBlobStore``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from relay.blobs import CHUNK_SIZE, BlobReader, Upload, check_blob_id
from relay.errors import BadRequest, StorageError, TooLarge
from relay.store.pg_common import PgSettings, lock_key, open_pool, storage_errors

__all__ = ["STALE_UPLOAD_MS", "PgBlobStore"]

log = logging.getLogger("relay.blobs")

# An upload is staged while its body streams in; one staged this long ago belongs to a node
# that died mid-upload (a live upload of the largest blob takes minutes, not a day).
STALE_UPLOAD_MS = 24 * 3600 * 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _PgLock:
    """An asyncio lock that also holds a PostgreSQL advisory lock on a connection of its own,
    so it excludes the other nodes too."""

    def __init__(self, store: PgBlobStore, key: int) -> None:
        self._store = store
        self._key = key
        self._local = asyncio.Lock()
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            pool = self._store.pool()
            with storage_errors("take the blob lock"):
                conn = await pool.acquire()
                try:
                    await conn.execute("SELECT pg_advisory_lock($1)", self._key)
                except BaseException:
                    await pool.release(conn)
                    raise
            self._conn = conn
        except BaseException:
            self._local.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                pool = self._store.pool()
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", self._key)
                    await pool.release(conn)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    # A session that cannot unlock is closed: closing releases its locks.
                    conn.terminate()
                    await pool.release(conn)
        finally:
            self._local.release()


class _RowReader:
    """A stored blob read chunk row by chunk row."""

    def __init__(self, store: PgBlobStore, blob_id: str, size: int) -> None:
        self._store = store
        self._blob_id = blob_id
        self.size = size

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        end = min(end, self.size)
        if start >= end:
            return
        pool = self._store.pool()
        for n in range(start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
            with storage_errors("read blob"):
                data = await pool.fetchval(
                    "SELECT data FROM blob_chunks WHERE id = $1 AND n = $2", self._blob_id, n
                )
            if data is None:  # deleted by a sweep while being read
                raise StorageError("blob vanished while being read")
            base = n * CHUNK_SIZE
            yield bytes(data[max(start - base, 0) : end - base])


class PgBlobStore:
    """``BlobStore`` in PostgreSQL tables (chunked rows), shared by every node.

    Args:
        settings: how to reach PostgreSQL (the same database as the relay store).
    """

    def __init__(self, settings: PgSettings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self.lock: contextlib.AbstractAsyncContextManager[Any] = _PgLock(
            self, lock_key(settings.schema, "blobs")
        )

    def pool(self) -> asyncpg.Pool:
        """The open pool.

        Raises:
            StorageError: the store is not open.
        """
        if self._pool is None:
            raise StorageError("blob store is closed")
        return self._pool

    async def open(self) -> None:
        """Connect, migrate the schema and delete stale staged uploads.

        Raises:
            StorageError: PostgreSQL is unreachable.
        """
        self._pool = await open_pool(self._settings)
        await self._drop_stale_uploads()

    async def close(self) -> None:
        """Close the connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._settings.timeout_seconds)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                pool.terminate()

    def local_path(self, blob_id: str) -> Path | None:
        """See ``BlobStore.local_path``: never local."""
        check_blob_id(blob_id)
        return None

    async def open_read(self, blob_id: str) -> BlobReader | None:
        """See ``BlobStore.open_read``."""
        check_blob_id(blob_id)
        with storage_errors("read blob"):
            size = await self.pool().fetchval(
                "SELECT size FROM blob_content WHERE id = $1", blob_id
            )
        return None if size is None else _RowReader(self, blob_id, int(size))

    async def receive(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str
    ) -> Upload:
        """See ``BlobStore.receive``: each full chunk is committed as a staged row."""
        pool = self.pool()
        upload_id = "upload:" + secrets.token_hex(16)
        hasher = hashlib.sha256()
        size = 0
        n = 0
        buf = bytearray()
        try:
            with storage_errors("stage blob"):
                await pool.execute(
                    "INSERT INTO blob_uploads(upload_id, started_ms) VALUES ($1, $2)",
                    upload_id,
                    _now_ms(),
                )
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"blob exceeds {max_bytes} bytes")
                hasher.update(chunk)
                buf += chunk
                while len(buf) >= CHUNK_SIZE:
                    await self._stage(upload_id, n, bytes(buf[:CHUNK_SIZE]))
                    del buf[:CHUNK_SIZE]
                    n += 1
            if buf:
                await self._stage(upload_id, n, bytes(buf))
            digest = hasher.hexdigest()
            if digest != expected_sha256:
                raise BadRequest(
                    "body does not match X-Blindpost-Content-SHA256", code="digest_mismatch"
                )
        except BaseException:
            await asyncio.shield(self._drop_staged(upload_id))
            raise
        return Upload(digest, size, upload_id)

    async def _stage(self, upload_id: str, n: int, data: bytes) -> None:
        with storage_errors("stage blob"):
            await self.pool().execute(
                "INSERT INTO blob_chunks(id, n, data) VALUES ($1, $2, $3)", upload_id, n, data
            )

    async def _drop_staged(self, upload_id: str) -> None:
        """Best effort: a failure leaves the rows to ``_drop_stale_uploads``."""
        try:
            async with self.pool().acquire() as conn, conn.transaction():
                await conn.execute("DELETE FROM blob_chunks WHERE id = $1", upload_id)
                await conn.execute("DELETE FROM blob_uploads WHERE upload_id = $1", upload_id)
        except (StorageError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            log.warning("could not delete a staged upload; a later sweep will")

    async def finalize(self, upload: Upload) -> None:
        """See ``BlobStore.finalize``: rename the staged chunks to the content id."""
        blob_id = check_blob_id(upload.blob_id)
        with storage_errors("finalize blob"):
            async with self.pool().acquire() as conn, conn.transaction():
                exists = await conn.fetchval("SELECT 1 FROM blob_content WHERE id = $1", blob_id)
                if exists is None:
                    chunks = await conn.fetchval(
                        "WITH moved AS (UPDATE blob_chunks SET id = $2 WHERE id = $1 RETURNING 1) "
                        "SELECT count(*) FROM moved",
                        upload.staged,
                        blob_id,
                    )
                    await conn.execute(
                        "INSERT INTO blob_content(id, size, chunks) VALUES ($1, $2, $3)",
                        blob_id,
                        upload.size,
                        int(chunks),
                    )
                else:
                    await conn.execute("DELETE FROM blob_chunks WHERE id = $1", upload.staged)
                await conn.execute("DELETE FROM blob_uploads WHERE upload_id = $1", upload.staged)

    async def discard(self, upload: Upload) -> None:
        """See ``BlobStore.discard``."""
        await self._drop_staged(upload.staged)

    async def delete(self, blob_ids: Iterable[str]) -> None:
        """See ``BlobStore.delete``; also deletes the staged rows of uploads that a node which
        died left behind (older than ``STALE_UPLOAD_MS``)."""
        ids = list(blob_ids)
        with storage_errors("delete blobs"):
            async with self.pool().acquire() as conn, conn.transaction():
                if ids:
                    await conn.execute("DELETE FROM blob_chunks WHERE id = ANY($1::text[])", ids)
                    await conn.execute("DELETE FROM blob_content WHERE id = ANY($1::text[])", ids)
        await self._drop_stale_uploads()

    async def _drop_stale_uploads(self) -> None:
        with storage_errors("delete stale uploads"):
            async with self.pool().acquire() as conn, conn.transaction():
                stale = [
                    r[0]
                    for r in await conn.fetch(
                        "DELETE FROM blob_uploads WHERE started_ms < $1 RETURNING upload_id",
                        _now_ms() - STALE_UPLOAD_MS,
                    )
                ]
                if stale:
                    await conn.execute("DELETE FROM blob_chunks WHERE id = ANY($1::text[])", stale)
        if stale:
            log.info("deleted %d stale staged uploads", len(stale))
