"""The SQLite store in-process with a fixed clock: retention, tombstones, quotas, restart."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from relay_testclient import Device, RelayClient

from relay.app import STATE_KEY, Clock, create_app, sweep_once
from relay.config import RelayConfig
from relay.errors import MailboxFull, MismatchedDevices
from relay.store.base import Address, Delivery, Envelope
from relay.store.sqlite import SqliteLimits, SqliteRelayStore

DAY = 86_400_000
A = Address("alice", 1)
B = Address("bob", 1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteRelayStore]:
    s = SqliteRelayStore(
        tmp_path / "db.sqlite3",
        SqliteLimits(
            message_ttl_ms=30 * DAY,
            blob_ttl_ms=30 * DAY,
            dedupe_window_ms=DAY,
            mailbox_max_messages=5,
            mailbox_max_bytes=1000,
        ),
    )
    await s.open()
    await s.create_account(A, b"a" * 32, 0)
    await s.create_account(B, b"b" * 32, 0)
    yield s
    await s.close()


def env(body: bytes = b"x", to: Address = B) -> Envelope:
    return Envelope(os.urandom(16), (to,), body)


async def test_unacked_messages_expire_after_ttl(store: SqliteRelayStore) -> None:
    e = env()
    await store.submit_send(A, e, 0)
    assert (await store.sweep(30 * DAY - 1)).messages == 0
    assert await store.mailbox_count(B) == 1
    assert (await store.sweep(30 * DAY + 1)).messages == 1
    assert await store.mailbox_count(B) == 0
    assert store.stats().queued == 0


async def test_tombstone_dedupes_until_window_then_goes(store: SqliteRelayStore) -> None:
    e = env()
    first = await store.submit_send(A, e, 0)
    assert await store.ack(B, [e.message_id]) == 1
    assert await store.submit_send(A, e, 10) == first  # still deduplicated
    assert await store.mailbox_count(B) == 0
    await store.sweep(DAY + 1)
    again = await store.submit_send(A, e, DAY + 2)  # window over: stored anew
    assert again.stored_at == DAY + 2 and await store.mailbox_count(B) == 1


async def test_quota_counts_and_bytes(store: SqliteRelayStore) -> None:
    for _ in range(5):
        await store.submit_send(A, env(), 0)
    with pytest.raises(MailboxFull):
        await store.submit_send(A, env(), 0)
    msgs = await store.fetch_mailbox(B, 0, 100, 10**6)
    await store.ack(B, [m.message_id for m in msgs])
    with pytest.raises(MailboxFull):
        await store.submit_send(A, env(b"z" * 1001), 0)
    await store.submit_send(A, env(b"z" * 1000), 0)


async def test_failed_send_changes_nothing_and_batch_neighbours_commit(
    store: SqliteRelayStore,
) -> None:
    delivered: list[Delivery] = []
    store.set_delivery_listener(delivered.extend)
    good = [store.submit_send(A, env(), 1) for _ in range(4)]
    bad = store.submit_send(A, env(to=Address("bob", 2)), 1)
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], MismatchedDevices)
    assert all(r.recipients == 1 for r in results[:-1])  # type: ignore[union-attr]
    assert [d.message.seq for d in delivered] == sorted(d.message.seq for d in delivered)
    assert len(delivered) == 4 and await store.mailbox_count(B) == 4


async def test_reopen_keeps_state_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    s = SqliteRelayStore(path)
    await s.open()
    await s.create_account(A, b"a" * 32, 0)
    await s.create_account(B, b"b" * 32, 0)
    await s.submit_send(A, env(), 0)
    await s.close()
    s2 = SqliteRelayStore(path)
    await s2.open()
    try:
        await s2.submit_send(A, env(), 0)
        seqs = [m.seq for m in await s2.fetch_mailbox(B, 0, 10, 10**6)]
        assert len(seqs) == 2 and seqs[0] < seqs[1]
        assert s2.stats().queued == 2
    finally:
        await s2.close()


class FixedClock(Clock):
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.now


async def test_sweeper_deletes_expired_blob_files(tmp_path: Path) -> None:
    clock = FixedClock()
    cfg = RelayConfig(
        data_dir=tmp_path, sweep_interval_seconds=0, blob_ttl_seconds=10, auth_window_seconds=10**9
    )
    app: web.Application = create_app(cfg, clock=clock)
    async with TestClient(TestServer(app)) as tc:
        client = RelayClient(str(tc.make_url("")).rstrip("/"), tc.session)
        dev = Device("blobber")
        assert (await client.register(dev)).status == 201
        up = await client.upload_blob(dev, b"ciphertext")
        blob_id = up.json()["id"]
        path = tmp_path / "blobs" / blob_id[:2] / blob_id
        assert path.exists()
        clock.now += 11_000
        await sweep_once(app[STATE_KEY])
        assert not path.exists()
        assert (await client.request(dev, "GET", f"/v1/blobs/{blob_id}")).status == 404
        assert app[STATE_KEY].store.stats().blob_bytes == 0


async def test_same_id_twice_in_one_batch_is_stored_once(store: SqliteRelayStore) -> None:
    e = env()
    other_sender = Envelope(e.message_id, (A,), b"y")
    first, second, clash = await asyncio.gather(
        store.submit_send(A, e, 5),
        store.submit_send(A, e, 6),
        store.submit_send(B, other_sender, 7),
        return_exceptions=True,
    )
    assert first == second and first.stored_at == 5  # type: ignore[union-attr]
    assert getattr(clash, "code", None) == "message_id_conflict"
    assert await store.mailbox_count(B) == 1 and await store.mailbox_count(A) == 0
