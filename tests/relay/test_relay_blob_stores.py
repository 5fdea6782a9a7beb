"""BlobStore conformance, run against the filesystem store and the PostgreSQL store: streamed
content-addressed uploads, nothing left staged on a failure, ranged streamed reads, deletes;
and the PostgreSQL blob lock excluding another node."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from store_backends import pg_settings

from relay.blobs import CHUNK_SIZE, BlobStore, FsBlobStore
from relay.blobs_postgres import PgBlobStore
from relay.errors import BadRequest, TooLarge


async def _fs_leftovers(store: BlobStore, tmp_path: Path) -> int:
    return len(list((tmp_path / "blobs" / "tmp").iterdir()))


async def _pg_leftovers(store: BlobStore, tmp_path: Path) -> int:
    settings = pg_settings(tmp_path)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(f"SET search_path = {settings.schema}")
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM blob_uploads) + "
                "(SELECT count(*) FROM blob_chunks WHERE id LIKE 'upload:%')"
            )
        )
    finally:
        await conn.close()


Stores = tuple[BlobStore, Callable[[], Awaitable[int]]]


@pytest.fixture(params=["fs", "postgres"])
async def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "fs":
        store: BlobStore = FsBlobStore(tmp_path / "blobs")
        leftovers = _fs_leftovers
    else:
        request.getfixturevalue("postgres_test_dsn")
        store = PgBlobStore(pg_settings(tmp_path))
        leftovers = _pg_leftovers
    await store.open()
    yield store, lambda: leftovers(store, tmp_path)
    await store.close()


async def chunked(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(store: BlobStore, blob_id: str, start: int = 0, end: int | None = None) -> bytes:
    reader = await store.open_read(blob_id)
    assert reader is not None
    parts = [c async for c in reader.read(start, reader.size if end is None else end)]
    assert all(0 < len(c) <= CHUNK_SIZE for c in parts)  # streamed, never whole
    return b"".join(parts)


async def put(store: BlobStore, data: bytes) -> str:
    upload = await store.receive(chunked(data), 10**9, hashlib.sha256(data).hexdigest())
    async with store.lock:
        await store.finalize(upload)
    await store.discard(upload)
    return upload.blob_id


async def test_upload_is_content_addressed_and_reads_back_in_ranges(blob_store: Stores) -> None:
    store, leftovers = blob_store
    data = os.urandom(3 * CHUNK_SIZE + 12345)  # chunks: 3 full and a partial one
    blob_id = await put(store, data)
    assert blob_id == hashlib.sha256(data).hexdigest()
    reader = await store.open_read(blob_id)
    assert reader is not None and reader.size == len(data)
    assert await read_all(store, blob_id) == data
    for start, end in [(0, 1), (CHUNK_SIZE - 3, CHUNK_SIZE + 3), (100, 2 * CHUNK_SIZE + 7)]:
        assert await read_all(store, blob_id, start, end) == data[start:end]
    assert await read_all(store, blob_id, len(data) - 5) == data[-5:]
    assert await put(store, data) == blob_id  # the same content again: stored once
    assert await read_all(store, blob_id) == data
    assert await leftovers() == 0
    assert await store.open_read("0" * 64) is None
    with pytest.raises(BadRequest):
        await store.open_read("../etc/passwd")


async def test_failed_uploads_leave_nothing_staged(blob_store: Stores) -> None:
    store, leftovers = blob_store
    data = os.urandom(2 * CHUNK_SIZE + 1)
    with pytest.raises(BadRequest) as info:
        await store.receive(chunked(data), 10**9, hashlib.sha256(b"other").hexdigest())
    assert info.value.code == "digest_mismatch"
    with pytest.raises(TooLarge):
        await store.receive(chunked(data), CHUNK_SIZE, hashlib.sha256(data).hexdigest())

    async def broken() -> AsyncIterator[bytes]:
        yield data[:CHUNK_SIZE]
        yield data[CHUNK_SIZE : 2 * CHUNK_SIZE]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.receive(broken(), 10**9, hashlib.sha256(data).hexdigest())
    assert await leftovers() == 0
    assert await store.open_read(hashlib.sha256(data).hexdigest()) is None


async def test_delete_removes_content_and_ignores_unknown_ids(blob_store: Stores) -> None:
    store, _ = blob_store
    keep = await put(store, b"keep me")
    gone = await put(store, os.urandom(CHUNK_SIZE + 1))
    async with store.lock:
        await store.delete([gone, "f" * 64])
    assert await store.open_read(gone) is None
    assert await read_all(store, keep) == b"keep me"


async def test_empty_blob(blob_store: Stores) -> None:
    store, _ = blob_store
    blob_id = await put(store, b"")
    reader = await store.open_read(blob_id)
    assert reader is not None and reader.size == 0
    assert [c async for c in reader.read(0, 0)] == []


@pytest.mark.usefixtures("postgres_test_dsn")
async def test_the_postgres_blob_lock_excludes_another_node(tmp_path: Path) -> None:
    """Node two cannot enter the blob lock while node one holds it (so a sweep on one node
    never deletes what an upload on another has just refreshed); it enters once it is free."""
    one, two = PgBlobStore(pg_settings(tmp_path)), PgBlobStore(pg_settings(tmp_path))
    await one.open()
    await two.open()
    entered = asyncio.Event()

    async def second() -> None:
        async with two.lock:
            entered.set()

    try:
        async with one.lock:
            task = asyncio.create_task(second())
            settings = pg_settings(tmp_path)
            conn = await asyncpg.connect(settings.dsn)
            try:
                # Wait (bounded) until node two's session is queued on the advisory lock.
                for _ in range(1500):
                    waiting = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted AND database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database())"
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.02)
                assert waiting == 1 and not entered.is_set()
            finally:
                await conn.close()
        await asyncio.wait_for(task, 30)
        assert entered.is_set()
    finally:
        await one.close()
        await two.close()
