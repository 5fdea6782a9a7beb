"""RelayStore conformance, run against every backend (SQLite, PostgreSQL and the in-memory twin)
with a fixed clock: retention, tombstones, quotas, batching, restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from relay_testclient import Device, RelayClient
from store_backends import BACKENDS, Backend

from blindpost_wire.names import SEALED_DEVICE_ID, sealed_sender_name
from relay.app import create_app, sweep_once
from relay.config import RelayConfig
from relay.errors import (
    AccountQuotaExceeded,
    Conflict,
    Forbidden,
    MailboxFull,
    MismatchedDevices,
    NotFound,
    PredecessorMissing,
    SenderShareExceeded,
)
from relay.state import STATE_KEY, Clock
from relay.store.base import (
    Address,
    Delivery,
    Envelope,
    KeyUpload,
    RelayStore,
    SenderKeyRow,
    SignedPrekey,
    StoreLimits,
)
from relay.store.sqlite import SCHEMA_VERSION, SqliteRelayStore

DAY = 86_400_000
A = Address("alice", 1)
B = Address("bob", 1)


LIMITS = StoreLimits(
    message_ttl_ms=30 * DAY,
    blob_ttl_ms=30 * DAY,
    dedupe_window_ms=DAY,
    mailbox_max_messages=5,
    mailbox_max_bytes=1000,
)


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.param
    b.prepare(request)
    return b


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[RelayStore]:
    s = await backend.open(tmp_path, LIMITS)
    await s.create_account(A, b"a" * 32, 0)
    await s.create_account(B, b"b" * 32, 0)
    yield s
    await s.close()


def env(body: bytes = b"x", to: Address = B) -> Envelope:
    return Envelope(os.urandom(16), (to,), body)


async def test_unacked_messages_expire_after_ttl(store: RelayStore) -> None:
    e = env()
    await store.submit_send(A, e, 0)
    assert (await store.sweep(30 * DAY - 1)).messages == 0
    assert await store.mailbox_count(B) == 1
    assert (await store.sweep(30 * DAY + 1)).messages == 1
    assert await store.mailbox_count(B) == 0
    assert store.stats().queued == 0


async def test_a_delivered_message_dedupes_until_its_window_then_goes(store: RelayStore) -> None:
    """After every recipient acked, a retry inside the window is answered as a duplicate
    (same id and recipient count; ``stored_at`` only to within a bucket, the exact time is
    forgotten) and stored once; after the window (rounded up to a bucket) the record is gone
    and the same id is stored anew."""
    bucket = DAY // 10
    stored = 3 * bucket + 1234  # not on a bucket boundary
    e = env()
    first = await store.submit_send(A, e, stored)
    assert await store.submit_send(A, e, stored + 5) == first  # queued: the exact receipt
    assert await store.ack(B, [e.message_id]) == 1
    again = await store.submit_send(A, e, stored + 10)
    assert (again.message_id, again.recipients) == (first.message_id, first.recipients)
    assert stored - bucket < again.stored_at <= stored  # coarse
    assert await store.mailbox_count(B) == 0 and store.stats().queued == 0
    assert (await store.sweep(stored + DAY)).dedupe == 0  # window not over for its bucket
    assert (await store.submit_send(A, e, stored + DAY)).stored_at == again.stored_at
    assert await store.mailbox_count(B) == 0
    assert (await store.sweep(stored + DAY + bucket)).dedupe == 1
    late = await store.submit_send(A, e, stored + DAY + bucket + 1)  # window over: stored anew
    assert late.stored_at == stored + DAY + bucket + 1 and await store.mailbox_count(B) == 1


async def test_a_settled_send_leaves_no_dedupe_record(store: RelayStore) -> None:
    """Once its sender settles a send (it will never send it again), the relay keeps nothing
    of it after delivery: settled after the last ack, the record goes; settled while queued,
    retries still find the queued row but the last ack leaves no record; settled in the same
    batch as the last ack, or while another recipient still holds it, none either. Nobody
    settles another sender's message. A retry after settling is stored anew (what a record
    would have prevented), so that is what each case checks."""
    carol = Address("carol", 1)
    await store.create_account(carol, b"c" * 32, 0)
    after_ack, while_queued, same_batch, held, not_yours = (env() for _ in range(5))
    held = Envelope(held.message_id, (B, carol), b"to two")
    for i, e in enumerate((after_ack, while_queued, same_batch, held, not_yours)):
        await store.submit_send(A, e, 10 + i)

    assert await store.ack(B, [after_ack.message_id]) == 1
    assert (await store.submit_send(A, after_ack, 20)).stored_at < 20  # the record answers
    assert await store.ack(A, [], [after_ack.message_id]) == 0  # settled: the record goes

    assert await store.ack(A, [], [while_queued.message_id]) == 0
    assert (await store.submit_send(A, while_queued, 21)).stored_at == 11  # the row answers
    assert await store.ack(B, [while_queued.message_id]) == 1

    acked, settled = await asyncio.gather(
        store.submit_ack(B, [same_batch.message_id]),
        store.submit_ack(A, [], [same_batch.message_id]),
    )
    assert (acked, settled) == (1, 0)

    both = await asyncio.gather(
        store.submit_ack(B, [held.message_id]), store.submit_ack(A, [], [held.message_id])
    )
    assert both == [1, 0]
    assert await store.ack(carol, [held.message_id]) == 1

    assert await store.ack(B, [not_yours.message_id], [not_yours.message_id]) == 1
    assert await store.ack(carol, [], [not_yours.message_id, os.urandom(16)]) == 0

    assert await store.mailbox_count(B) == 0
    # Only not_yours left a record; the sweep after every window counts what is left.
    assert (await store.sweep(10 * DAY)).dedupe == 1
    for e in (after_ack, while_queued, same_batch, held):
        assert (await store.submit_send(A, e, 10 * DAY)).stored_at == 10 * DAY  # stored anew
    assert await store.mailbox_count(B) == 4


async def test_a_delivered_id_is_remembered_for_its_sender_only(store: RelayStore) -> None:
    """The record names no sender, so another sender's reuse of a delivered id is a new
    message; the first sender's retries still find their own record."""
    carol = Address("carol", 1)
    await store.create_account(carol, b"c" * 32, 0)
    e = env()
    first = await store.submit_send(A, e, 7)
    with pytest.raises(Conflict):  # queued: the id is taken
        await store.submit_send(carol, Envelope(e.message_id, (B,), b"squat"), 8)
    await store.ack(B, [e.message_id])
    reuse = await store.submit_send(carol, Envelope(e.message_id, (B,), b"carol's"), 9)
    assert reuse.stored_at == 9
    retry = await store.submit_send(A, e, 10)
    assert (retry.message_id, retry.recipients) == (first.message_id, first.recipients)
    box = await store.fetch_mailbox(B, 0, 10, 10**6)
    assert [(m.sender, m.body) for m in box] == [(carol, b"carol's")]


async def test_an_account_that_sent_leaves_no_row_once_delivered_and_swept(
    store: RelayStore,
) -> None:
    await store.submit_send(A, env(b"12345"), 1)
    assert await store.account_usage("alice") == 5
    await store.ack(B, [m.message_id for m in await store.fetch_mailbox(B, 0, 10, 10**6)])
    await store.sweep(2)
    assert await store.account_usage("alice") == 0
    await store.submit_send(A, env(b"abc"), 3)  # and it counts again from zero
    assert await store.account_usage("alice") == 3


async def test_quota_counts_and_bytes(store: RelayStore) -> None:
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
    store: RelayStore,
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


async def test_a_send_after_a_refused_one_is_refused_and_nothing_overtakes_it(
    store: RelayStore,
) -> None:
    """SEND_AFTER (``Envelope.after``): stored only if the sender's previous message is
    stored (queued, or delivered and remembered for dedupe). Pipelined behind one the store
    refuses, in the same batch or a later one, the rest are refused and stored nothing; sent
    again in order once the refused one is fixed, the mailbox holds the sending order."""
    first = env()
    await store.submit_send(A, first, 1)
    refused = env(to=Address("bob", 2))  # bob has no device 2: mismatched devices
    fixed = refused._replace(recipients=(B,))
    behind = [env(), env(), env()]
    chained = [
        behind[0]._replace(after=refused.message_id),
        behind[1]._replace(after=behind[0].message_id),
        behind[2]._replace(after=behind[1].message_id),
    ]
    results = await asyncio.gather(
        store.submit_send(A, refused, 2),
        *(store.submit_send(A, e, 2) for e in chained),
        return_exceptions=True,
    )
    assert isinstance(results[0], MismatchedDevices)
    assert all(isinstance(r, PredecessorMissing) for r in results[1:])
    assert await store.mailbox_count(B) == 1  # nothing behind the refused one was stored
    # A later batch: still refused until the previous message is stored.
    with pytest.raises(PredecessorMissing):
        await store.submit_send(A, chained[0], 3)
    # In order again: the fixed one, then the rest (each after the one before).
    await store.submit_send(A, fixed, 4)
    for e in chained:
        await store.submit_send(A, e, 4)
    box = await store.fetch_mailbox(B, 0, 100, 10**6)
    want = [first, fixed, *behind]
    assert [m.message_id for m in box] == [e.message_id for e in want]
    # A delivered previous message still counts (its dedupe record); another sender's does not.
    await store.ack(B, [m.message_id for m in box])
    await store.submit_send(A, env()._replace(after=first.message_id), 5)
    await store.create_account(Address("carol", 1), b"c" * 32, 0)
    theirs = env()
    await store.submit_send(Address("carol", 1), theirs, 5)
    with pytest.raises(PredecessorMissing):
        await store.submit_send(A, env()._replace(after=theirs.message_id), 6)
    with pytest.raises(PredecessorMissing):
        await store.submit_send(A, env()._replace(after=os.urandom(16)), 6)
    assert await store.mailbox_count(B) == 2  # the one after ``first`` and carol's


async def test_reopen_keeps_state_and_seq(backend: Backend, tmp_path: Path) -> None:
    s = await backend.open(tmp_path)
    await s.create_account(A, b"a" * 32, 0)
    await s.create_account(B, b"b" * 32, 0)
    await s.submit_send(A, env(), 0)
    s2 = await backend.restart(s, tmp_path)
    try:
        await s2.submit_send(A, env(), 0)
        seqs = [m.seq for m in await s2.fetch_mailbox(B, 0, 10, 10**6)]
        assert len(seqs) == 2 and seqs[0] < seqs[1]
        assert s2.stats().queued == 2
    finally:
        await s2.close()


async def test_seqs_never_repeat_after_everything_was_acked_and_the_store_reopened(
    backend: Backend, tmp_path: Path
) -> None:
    """The mailbox is empty when the store closes, so only the stored high-water mark tells the
    reopened store where seqs stand; a repeated seq would make a device's delivery order
    ambiguous."""
    s = await backend.open(tmp_path)
    await s.create_account(A, b"a" * 32, 0)
    await s.create_account(B, b"b" * 32, 0)
    sent = [env() for _ in range(3)]
    for e in sent:
        await s.submit_send(A, e, 0)
    first = [m.seq for m in await s.fetch_mailbox(B, 0, 10, 10**6)]
    assert await s.ack(B, [e.message_id for e in sent]) == 3
    s2 = await backend.restart(s, tmp_path)
    try:
        await s2.submit_send(A, env(), 0)
        (later,) = [m.seq for m in await s2.fetch_mailbox(B, 0, 10, 10**6)]
        assert later > max(first)
    finally:
        await s2.close()


class FixedClock(Clock):
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.now


async def test_sweeper_deletes_expired_blob_files(backend: Backend, tmp_path: Path) -> None:
    clock = FixedClock()
    cfg = RelayConfig(
        data_dir=tmp_path, sweep_interval_seconds=0, blob_ttl_seconds=10, auth_window_seconds=10**9
    )
    store = backend.make(tmp_path, StoreLimits(blob_ttl_ms=10_000))
    app: web.Application = create_app(cfg, clock=clock, store=store)
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


async def test_same_id_twice_in_one_batch_is_stored_once(store: RelayStore) -> None:
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


async def test_a_batch_mixing_stored_ids_and_new_ones(store: RelayStore) -> None:
    """A reconnecting client resends what it never saw confirmed, next to new sends, in one
    batch: each resend answers with its first receipt and is stored once, another sender's
    reuse of a stored id is refused, the new sends are stored, in order; nothing is counted
    twice."""
    old = [env(bytes([i])) for i in range(3)]  # the mailbox quota here is 5 messages
    receipts = [await store.submit_send(A, e, 10 + i) for i, e in enumerate(old)]
    accepted = store.stats().accepted
    new = [env(b"n%d" % i) for i in range(2)]
    clash = Envelope(old[0].message_id, (A,), b"other sender")
    got = await asyncio.gather(
        store.submit_send(A, new[0], 20),
        store.submit_send(A, old[1], 21),
        store.submit_send(B, clash, 22),
        store.submit_send(A, new[1], 23),
        store.submit_send(A, old[2], 24),
        return_exceptions=True,
    )
    assert got[1] == receipts[1] and got[4] == receipts[2]
    assert getattr(got[2], "code", None) == "message_id_conflict"
    assert [r.stored_at for r in (got[0], got[3])] == [20, 23]  # type: ignore[union-attr]
    box = await store.fetch_mailbox(B, 0, 100, 10**6)
    assert [m.message_id for m in box] == [e.message_id for e in old + new]
    assert [m.body for m in box] == [e.body for e in old + new]
    assert store.stats().accepted == accepted + 2
    assert store.stats().queued == 5
    again = Envelope(new[0].message_id, (B,), new[0].body)  # and later, alone
    assert await store.submit_send(A, again, 30) == got[0]
    assert await store.mailbox_count(B) == 5


async def test_two_sqlite_writers_on_one_file_stay_consistent(tmp_path: Path) -> None:
    """Two stores sharing one database (a running relay and an operator command, which opens
    the file as one more writer): each sees the other's commits in its caches: seqs keep
    increasing, quotas count both, devices and dedupe agree."""
    path = tmp_path / "db.sqlite3"
    lim = StoreLimits(mailbox_max_messages=3)
    one, two = SqliteRelayStore(path, lim), SqliteRelayStore(path, lim)
    await one.open()
    await two.open()
    try:
        await one.create_account(A, b"a" * 32, 0)
        await one.create_account(B, b"b" * 32, 0)
        first = env()
        await one.submit_send(A, first, 1)  # fills one's caches for B
        await two.submit_send(A, env(), 2)
        await one.submit_send(A, env(), 3)
        with pytest.raises(MailboxFull):  # one's quota cache saw two's message
            await two.submit_send(A, env(), 4)
        with pytest.raises(MailboxFull):
            await one.submit_send(A, env(), 4)
        assert (await two.submit_send(A, first, 5)).stored_at == 1  # deduplicated across
        seqs = [m.seq for m in await two.fetch_mailbox(B, 0, 10, 10**6)]
        assert len(seqs) == 3 and seqs == sorted(set(seqs))
        await two.add_device(Address("bob", 2), b"c" * 32, 6)
        assert await one.ack(B, [first.message_id]) == 1
        with pytest.raises(MismatchedDevices):  # one's directory cache saw the new device
            await one.submit_send(A, env(), 7)
    finally:
        await one.close()
        await two.close()


def _occurrences(directory: Path, needle: bytes) -> int:
    """How often ``needle`` occurs in the database file and its log (if any)."""
    return sum(
        p.read_bytes().count(needle) for p in directory.iterdir() if p.name.startswith("db.")
    )


async def _wait_for(what: str, check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_sqlite_file_keeps_no_trace_of_a_delivered_message(tmp_path: Path) -> None:
    """Once every recipient acked and a sweep ran, the bytes of the database file (free pages
    included) and of its log hold the sender's username only as often as its account does,
    and neither the message ids nor the bodies; while the messages were queued they did (the
    check can see them)."""
    path = tmp_path / "db.sqlite3"
    sender, carol = Address("zq-sender-7f3a", 3), Address("carol", 1)
    name = sender.user.encode()
    lim = StoreLimits(dedupe_window_ms=DAY)
    store = SqliteRelayStore(path, lim)
    await store.open()
    for who in (sender, B, carol):
        await store.create_account(who, b"k" * 32, 0)
    await store.close()
    account_only = _occurrences(tmp_path, name)
    assert account_only > 0  # the account itself (users table and its index)

    store = SqliteRelayStore(path, lim)
    await store.open()
    envs = [Envelope(os.urandom(16), (B, carol), b"body-%03d-" % i * 40) for i in range(40)]
    try:
        for i, e in enumerate(envs):
            await store.submit_send(sender, e, 1000 + i)
        await store.ack(B, [e.message_id for e in envs])
        await store.ack(carol, [e.message_id for e in envs[:-1]])
    finally:
        await store.close()
    assert _occurrences(tmp_path, name) > account_only  # the queued message names it
    assert _occurrences(tmp_path, envs[-1].message_id) > 0

    store = SqliteRelayStore(path, lim)
    await store.open()
    try:
        await store.ack(carol, [envs[-1].message_id])
        await store.sweep(2000)
        # A running relay: the writer empties the log after the sweep while idle.
        wal = tmp_path / "db.sqlite3-wal"
        await _wait_for("the log emptied", lambda: not wal.exists() or wal.stat().st_size == 0)
        assert _occurrences(tmp_path, name) == account_only
        for e in envs:
            assert _occurrences(tmp_path, e.message_id) == 0
            assert _occurrences(tmp_path, e.body[:12]) == 0
        retry = await store.submit_send(sender, envs[0], 3000)  # still deduplicated
        assert retry.recipients == 2 and await store.mailbox_count(B) == 0
    finally:
        await store.close()
    assert _occurrences(tmp_path, name) == account_only


async def test_sqlite_forgets_a_message_once_every_recipient_acked_or_left(tmp_path: Path) -> None:
    """Ciphertext, sender and time stay on disk only while a mailbox still holds the message:
    after the last ack, or after the last recipient device is removed, only the dedupe record
    remains."""
    path = tmp_path / "db.sqlite3"
    carol = Address("carol", 1)
    store = SqliteRelayStore(path, LIMITS)
    await store.open()

    def rows() -> dict[bytes, tuple[str, bytes]]:
        with contextlib.closing(sqlite3.connect(path)) as c:
            return {
                bytes(m): (s, b)
                for m, s, b in c.execute("SELECT msg_id, sender, body FROM messages")
            }

    def records() -> int:
        with contextlib.closing(sqlite3.connect(path)) as c:
            return int(c.execute("SELECT count(*) FROM dedupe").fetchone()[0])

    try:
        for who in (A, B, carol):
            await store.create_account(who, b"k" * 32, 0)
        both = Envelope(os.urandom(16), (B, carol), b"to bob and carol")
        to_carol = Envelope(os.urandom(16), (carol,), b"to carol")
        await store.submit_send(A, both, 1)
        await store.submit_send(A, to_carol, 2)
        assert await store.ack(B, [both.message_id]) == 1
        assert rows()[both.message_id] == ("alice", b"to bob and carol")  # carol has not acked
        assert await store.ack(carol, [both.message_id]) == 1
        assert both.message_id not in rows() and records() == 1
        assert (await store.submit_send(A, both, 3)).recipients == 2  # the record dedupes
        assert to_carol.message_id in rows()
        await store.remove_device(carol)
        assert rows() == {} and records() == 2
    finally:
        await store.close()


async def test_sqlite_schema_1_database_migrates(tmp_path: Path) -> None:
    """A database of schema 1 (body-less rows kept as dedupe tombstones, no auto-vacuum) is
    migrated at open: tombstones deleted, queued messages kept (and forgotten when acked),
    incremental auto-vacuum switched on."""
    path = tmp_path / "db.sqlite3"
    store = SqliteRelayStore(path, LIMITS)
    await store.open()
    await store.create_account(A, b"a" * 32, 0)
    await store.create_account(B, b"b" * 32, 0)
    queued, delivered = env(b"queued"), env(b"delivered")
    await store.submit_send(A, queued, 1)
    await store.close()
    with contextlib.closing(
        sqlite3.connect(path, isolation_level=None)
    ) as c:  # as schema 1 left it
        c.execute("DROP TABLE settle")  # schema 3's (its trigger goes with it)
        c.execute("DROP TRIGGER mailbox_forget")
        c.execute("DROP TABLE dedupe")
        c.execute("DROP TABLE dedupe_secret")
        c.execute("ALTER TABLE messages DROP COLUMN dkey")
        c.execute("ALTER TABLE messages DROP COLUMN dexp")
        c.execute(
            "CREATE TRIGGER mailbox_drop_body AFTER DELETE ON mailbox BEGIN "
            "UPDATE messages SET body=NULL WHERE pk=OLD.msg_pk AND body IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM mailbox WHERE msg_pk=OLD.msg_pk); END"
        )
        c.execute(
            "INSERT INTO messages(msg_id, sender, sender_device, stored_ms, n_recipients, body) "
            "VALUES (?, 'alice', 1, 2, 1, NULL)",
            (delivered.message_id,),
        )
        c.execute("UPDATE meta SET v=1 WHERE k='schema_version'")
        c.execute("PRAGMA journal_mode=DELETE")
        c.execute("PRAGMA auto_vacuum=NONE")
        c.execute("VACUUM")
        assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = SqliteRelayStore(path, LIMITS)
    await store.open()
    try:
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
            version = c.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()[0]
            assert version == SCHEMA_VERSION
            assert c.execute("SELECT count(*) FROM messages WHERE body IS NULL").fetchone()[0] == 0
        assert [m.body for m in await store.fetch_mailbox(B, 0, 10, 10**6)] == [b"queued"]
        assert await store.ack(B, [queued.message_id]) == 1
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        # The tombstone is gone: the id is free again (the recipient's client drops a copy).
        assert (await store.submit_send(A, delivered, 5)).stored_at == 5
    finally:
        await store.close()


async def test_sqlite_sweep_gives_free_pages_back(tmp_path: Path) -> None:
    """A drained backlog leaves most pages free: the sweeper returns them to the file system,
    a bounded number per sweep, until at most an eighth of the file is free."""
    path = tmp_path / "db.sqlite3"
    many = 100_000
    lim = StoreLimits(
        mailbox_max_messages=many, sender_max_messages=many, stranger_max_messages=many
    )
    store = SqliteRelayStore(path, lim)
    await store.open()
    try:
        await store.create_account(A, b"a" * 32, 0)
        await store.create_account(B, b"b" * 32, 0)
        envs = [env(os.urandom(2000)) for _ in range(3000)]
        await asyncio.gather(*(store.submit_send(A, e, 1) for e in envs))
        await store.ack(B, [e.message_id for e in envs])

        def pages() -> tuple[int, int]:
            with contextlib.closing(sqlite3.connect(path)) as c:
                free, total = c.execute(
                    "SELECT freelist_count, page_count FROM pragma_freelist_count, "
                    "pragma_page_count"
                ).fetchone()
            return int(free), int(total)

        free, before = pages()
        assert free * 2 > before  # the drained backlog left most of the file free
        for _ in range(10):
            await store.sweep(3)
        free, total = pages()
        assert free <= max(2048, total // 8) and total < before
    finally:
        await store.close()
    assert path.stat().st_size == total * 4096  # the file itself shrank (checkpointed at close)


SHARE_LIMITS = StoreLimits(
    mailbox_max_messages=10,
    mailbox_max_bytes=10_000,
    sender_max_messages=4,
    sender_max_bytes=400,
    stranger_max_messages=2,
    stranger_max_bytes=200,
)


async def test_one_sender_cannot_fill_a_mailbox_others_still_get_through(
    backend: Backend, tmp_path: Path
) -> None:
    """The mailbox-flood attack at store level: a stranger stops at its small share of bob's
    mailbox with sender_share_exceeded (nothing stored) while carol's messages are accepted;
    once bob has written to alice she gets the larger share; acks and a restart keep the
    shares exact."""
    carol = Address("carol", 1)
    s = await backend.open(tmp_path, SHARE_LIMITS)
    try:
        for addr in (A, B, carol):
            await s.create_account(addr, addr.user[0].encode() * 32, 0)
        flood = [env() for _ in range(2)]
        for e in flood:
            await s.submit_send(A, e, 1)
        with pytest.raises(SenderShareExceeded) as info:
            await s.submit_send(A, env(), 2)
        assert info.value.status == 507 and info.value.code == "sender_share_exceeded"
        assert info.value.to_json()["full"] == [{"user": "bob", "device": 1}]
        with pytest.raises(SenderShareExceeded):  # bytes count too: 150 + 60 > 200
            await s.submit_send(carol, env(b"c" * 150), 2)
            await s.submit_send(carol, env(b"c" * 60), 2)
        assert await s.mailbox_count(B) == 3  # alice's 2 and carol's first one
        await s.submit_send(B, env(to=A), 3)  # bob answers alice: her share is 4 now
        s = await backend.restart(s, tmp_path, SHARE_LIMITS)
        await s.submit_send(A, env(), 4)
        await s.submit_send(A, env(), 4)
        with pytest.raises(SenderShareExceeded):
            await s.submit_send(A, env(), 5)
        assert await s.ack(B, [flood[0].message_id]) == 1
        await s.submit_send(A, env(), 6)  # the ack freed one message of alice's share
        with pytest.raises(SenderShareExceeded):
            await s.submit_send(A, env(), 6)
        # Carol is still a stranger to bob: bob answering alice changed nothing for her.
        await s.submit_send(carol, env(b"c"), 7)
        with pytest.raises(SenderShareExceeded):
            await s.submit_send(carol, env(b"c"), 7)
        assert await s.mailbox_count(B) == 6
    finally:
        await s.close()


async def test_own_devices_are_exempt_from_the_sender_share(
    backend: Backend, tmp_path: Path
) -> None:
    """Self-sync to an account's other devices is bounded by the mailbox quota only."""
    s = await backend.open(tmp_path, SHARE_LIMITS)
    try:
        await s.create_account(A, b"a" * 32, 0)
        a2 = Address("alice", 2)
        await s.add_device(a2, b"c" * 32, 0)
        for _ in range(10):
            await s.submit_send(A, env(to=a2), 1)
        with pytest.raises(MailboxFull):
            await s.submit_send(A, env(to=a2), 1)
    finally:
        await s.close()


QUOTA_LIMITS = StoreLimits(account_max_bytes=1000, mailbox_max_bytes=10_000)


async def test_account_quota_counts_pending_bodies_and_held_blobs(
    backend: Backend, tmp_path: Path
) -> None:
    """An account's stored bytes (bodies still waiting in a mailbox, once each, plus the blobs
    it holds) stay under account_max_bytes; reads, acks, deletes and restarts keep the count
    exact."""
    s = await backend.open(tmp_path, QUOTA_LIMITS)
    carol = Address("carol", 1)
    try:
        for addr in (A, B, carol):
            await s.create_account(addr, addr.user[0].encode() * 32, 0)
        group = Envelope(os.urandom(16), (B, carol), b"g" * 400)  # stored once: 400 bytes
        await s.submit_send(A, group, 1)
        assert await s.account_usage("alice") == 400
        assert await s.put_blob("a" * 64, 500, 1, "alice") is True
        assert await s.account_usage("alice") == 900
        with pytest.raises(AccountQuotaExceeded) as info:
            await s.submit_send(A, env(b"x" * 101), 2)
        assert info.value.status == 507 and info.value.code == "account_quota_exceeded"
        with pytest.raises(AccountQuotaExceeded):
            await s.put_blob("b" * 64, 101, 2, "alice")
        assert not await s.blob_exists("b" * 64)
        await s.submit_send(A, env(b"x" * 100), 2)  # exactly fits
        s = await backend.restart(s, tmp_path, QUOTA_LIMITS)
        assert await s.account_usage("alice") == 1000
        assert await s.ack(B, [group.message_id]) == 1
        assert await s.account_usage("alice") == 1000  # carol has not read it yet
        assert await s.ack(carol, [group.message_id]) == 1
        assert await s.account_usage("alice") == 600
        # Bob uploads the same content: both hold it; alice's delete keeps the blob for bob.
        assert await s.put_blob("a" * 64, 500, 3, "bob") is False
        with pytest.raises(NotFound):
            await s.delete_blob("a" * 64, "carol")
        assert await s.delete_blob("a" * 64, "alice") is False
        assert await s.blob_exists("a" * 64)
        assert await s.account_usage("alice") == 100
        with pytest.raises(NotFound):
            await s.delete_blob("a" * 64, "alice")
        assert await s.delete_blob("a" * 64, "bob") is True
        assert not await s.blob_exists("a" * 64)
        assert await s.account_usage("bob") == 0
        await s.submit_send(A, env(b"x" * 900), 4)
        assert await s.account_usage("alice") == 1000
    finally:
        await s.close()


async def test_sqlite_counts_pending_bodies_of_a_database_from_before_quotas(
    tmp_path: Path,
) -> None:
    """A database written before per-account accounting existed gets its pending bodies
    counted when opened, so the quota holds from the first start of the new relay."""
    path = tmp_path / "db.sqlite3"
    store = SqliteRelayStore(path, QUOTA_LIMITS)
    await store.open()
    await store.create_account(A, b"a" * 32, 0)
    await store.create_account(B, b"b" * 32, 0)
    await store.submit_send(A, env(b"x" * 300), 1)
    await store.close()
    with sqlite3.connect(path) as conn:  # as an older relay would have left it
        for trigger in ("insert", "dropped", "deleted"):
            conn.execute(f"DROP TRIGGER account_sent_{trigger}")
        conn.execute("DROP TABLE account_bytes")
    store = SqliteRelayStore(path, QUOTA_LIMITS)
    await store.open()
    try:
        assert await store.account_usage("alice") == 300
        with pytest.raises(AccountQuotaExceeded):
            await store.submit_send(A, env(b"x" * 701), 2)
    finally:
        await store.close()


async def test_invites_are_single_use_expire_and_survive_restarts(
    backend: Backend, tmp_path: Path
) -> None:
    s = await backend.open(tmp_path)
    code, old = b"\x01" * 32, b"\x02" * 32
    try:
        await s.create_invite(code, 10, 1000)
        await s.create_invite(old, 20, 30)
        s = await backend.restart(s, tmp_path)
        with pytest.raises(Forbidden) as info:
            await s.create_account(A, b"a" * 32, 40, invite=old)  # expired at 30
        assert info.value.code == "invite_invalid"
        with pytest.raises(Forbidden):
            await s.create_account(A, b"a" * 32, 40, invite=b"\x03" * 32)  # unknown
        assert await s.list_devices("alice") == []  # nothing was created
        await s.create_account(A, b"a" * 32, 50, invite=code)
        with pytest.raises(Forbidden):
            await s.create_account(B, b"b" * 32, 60, invite=code)  # used
        with pytest.raises(Conflict):  # a taken name does not spend the invite's check
            await s.create_account(A, b"a" * 32, 60, invite=code)
        listed = await s.list_invites()
        assert [(i.id, i.created_at, i.expires_at, i.used_by, i.used_at) for i in listed] == [
            ("01" * 6, 10, 1000, "alice", 50),
            ("02" * 6, 20, 30, None, None),
        ]
    finally:
        await s.close()


async def test_bans_are_stored_per_existing_user(backend: Backend, tmp_path: Path) -> None:
    s = await backend.open(tmp_path)
    try:
        await s.create_account(A, b"a" * 32, 0)
        await s.create_account(B, b"b" * 32, 0)
        assert await s.set_banned("alice", True, 1) is True
        assert await s.set_banned("alice", True, 2) is True  # idempotent
        assert await s.set_banned("nobody", True, 1) is False
        s = await backend.restart(s, tmp_path)
        assert await s.banned_users() == frozenset({"alice"})
        assert await s.set_banned("alice", False, 3) is True
        assert await s.banned_users() == frozenset()
    finally:
        await s.close()


async def test_recovery_verifier_is_replaced_and_survives_restarts(
    backend: Backend, tmp_path: Path
) -> None:
    s = await backend.open(tmp_path)
    try:
        await s.create_account(A, b"a" * 32, 0)
        assert await s.recovery_verifier("alice") is None
        assert await s.set_recovery_verifier("alice", b"1" * 32) is True
        assert await s.set_recovery_verifier("alice", b"2" * 32) is True  # replaces
        assert await s.set_recovery_verifier("nobody", b"1" * 32) is False
        s = await backend.restart(s, tmp_path)
        assert await s.recovery_verifier("alice") == b"2" * 32
        assert await s.recovery_verifier("nobody") is None
    finally:
        await s.close()


async def test_provisioning_slot_hands_its_grant_out_once_and_expires(
    backend: Backend, tmp_path: Path
) -> None:
    from relay.store.base import ProvisionSlot, ProvisionTake

    s = await backend.open(tmp_path)
    try:
        token, other = b"t" * 32, b"u" * 32
        slot = ProvisionSlot(b"s" * 16, b"k" * 32, expires_ms=1000, filled=False)
        assert await s.open_provision(slot, token, now_ms=0, max_live=2) is True
        assert await s.provision(b"s" * 16, 10) == slot
        assert await s.provision(b"x" * 16, 10) is None
        # Before a grant: found, nothing to take; a wrong token reads as not found.
        assert await s.take_provision(b"s" * 16, token, 10) == ProvisionTake(True, None)
        assert await s.take_provision(b"s" * 16, other, 10) == ProvisionTake(False, None)
        assert await s.fill_provision(b"x" * 16, b"g", 10) == "missing"
        assert await s.fill_provision(b"s" * 16, b"grant", 10) == "stored"
        assert await s.fill_provision(b"s" * 16, b"other", 10) == "filled"
        s = await backend.restart(s, tmp_path)
        assert (await s.provision(b"s" * 16, 10)) == ProvisionSlot(b"s" * 16, b"k" * 32, 1000, True)
        assert await s.take_provision(b"s" * 16, other, 10) == ProvisionTake(False, None)
        assert await s.take_provision(b"s" * 16, token, 10) == ProvisionTake(True, b"grant")
        assert await s.take_provision(b"s" * 16, token, 10) == ProvisionTake(False, None)
        # The live bound, then expiry: an expired slot is gone for every call, grant and all.
        for i in range(2):
            live = ProvisionSlot(bytes([i]) * 16, b"k" * 32, 1000, False)
            assert await s.open_provision(live, token, 20, max_live=2) is True
        extra = ProvisionSlot(b"e" * 16, b"k" * 32, 1000, False)
        assert await s.open_provision(extra, token, 20, max_live=2) is False
        assert await s.fill_provision(b"\0" * 16, b"grant", 30) == "stored"
        assert await s.provision(b"\0" * 16, 1000) is None
        assert await s.take_provision(b"\0" * 16, token, 1000) == ProvisionTake(False, None)
        assert await s.fill_provision(b"\1" * 16, b"grant", 1000) == "missing"
        assert await s.sweep_provisions(1000) == 2
        assert await s.sweep_provisions(1000) == 0
        assert await s.open_provision(extra, token, 1000, max_live=2) is True  # room again
    finally:
        await s.close()


async def test_device_name_and_last_seen_are_kept(backend: Backend, tmp_path: Path) -> None:
    s = await backend.open(tmp_path)
    try:
        await s.create_account(A, b"a" * 32, 0)
        await s.add_device(Address("alice", 2), b"b" * 32, 5, b"sealed name")
        await s.touch_device(Address("alice", 2), 3_600_000)
        await s.touch_device(Address("alice", 9), 3_600_000)  # unknown: nothing happens
        s = await backend.restart(s, tmp_path)
        listed = await s.list_devices("alice")
        assert [(d.device_id, d.name, d.last_seen) for d in listed] == [
            (1, None, None),
            (2, b"sealed name", 3_600_000),
        ]
    finally:
        await s.close()


async def test_sender_keys_and_access_verifiers_survive_restarts(
    backend: Backend, tmp_path: Path
) -> None:
    """Sealed sender's rows: the first writer of a key id wins (nodes racing agree); access
    verifiers are replaced and removed; both survive a restart."""
    s = await backend.open(tmp_path)
    try:
        await s.create_account(A, b"a" * 32, 0)
        await s.create_account(B, b"b" * 32, 0)
        assert await s.sender_keys() == []
        assert await s.add_sender_key(SenderKeyRow(1, b"s" * 32, 10, None)) is True
        assert await s.add_sender_key(SenderKeyRow(1, b"t" * 32, 11, None)) is False
        assert await s.add_sender_key(SenderKeyRow(2, b"u" * 32, 12, b"e" * 64)) is True
        assert await s.set_access_verifier("alice", b"1" * 32) is True
        assert await s.set_access_verifier("alice", b"2" * 32) is True
        assert await s.set_access_verifier("bob", b"3" * 32) is True
        assert await s.set_access_verifier("bob", None) is True
        assert await s.set_access_verifier("nobody", b"1" * 32) is False
        s = await backend.restart(s, tmp_path)
        assert await s.sender_keys() == [
            SenderKeyRow(1, b"s" * 32, 10, None),
            SenderKeyRow(2, b"u" * 32, 12, b"e" * 64),
        ]
        assert await s.access_verifiers(["alice", "bob", "nobody"]) == {"alice": b"2" * 32}
        assert "s" * 32 not in repr(await s.sender_keys())
    finally:
        await s.close()


async def test_sqlite_database_from_before_device_names_gets_the_columns(tmp_path: Path) -> None:
    s = SqliteRelayStore(tmp_path / "relay.sqlite3")
    await s.open()
    await s.create_account(A, b"a" * 32, 0)
    await s.close()
    conn = sqlite3.connect(tmp_path / "relay.sqlite3")
    conn.execute("ALTER TABLE devices DROP COLUMN name")
    conn.execute("ALTER TABLE devices DROP COLUMN seen_ms")
    conn.commit()
    conn.close()
    s = SqliteRelayStore(tmp_path / "relay.sqlite3")
    await s.open()
    try:
        await s.add_device(Address("alice", 2), b"b" * 32, 5, b"n")
        listed = await s.list_devices("alice")
        assert [(d.device_id, d.name) for d in listed] == [(1, None), (2, b"n")]
    finally:
        await s.close()


async def test_identity_key_is_the_uploaded_one(store: RelayStore) -> None:
    assert await store.identity_key(A) is None
    ident = b"\x05" + b"i" * 32
    spk = SignedPrekey(1, b"\x05" + b"p" * 32, b"s" * 64)
    await store.upload_keys(A, KeyUpload(ident, 7, spk, ()))
    assert await store.identity_key(A) == ident
    assert await store.identity_key(Address("alice", 2)) is None


async def test_a_sealed_send_is_stored_under_its_pseudonym_as_a_stranger(
    store: RelayStore,
) -> None:
    """A sealed message's row names no account: the pseudonym, device 0; it is held to the
    stranger share and writes no "answered" relation."""
    sealed = Address(sealed_sender_name(b"\x07" * 32), SEALED_DEVICE_ID)
    e = env(b"sealed")
    receipt = await store.submit_send(sealed, e, 5)
    assert receipt.recipients == 1
    assert await store.submit_send(sealed, e, 6) == receipt  # a retry is a duplicate
    (msg,) = await store.fetch_mailbox(B, 0, 10, 1 << 20)
    assert msg.sender == sealed and msg.body == b"sealed"
    await store.ack(B, [e.message_id])
    assert await store.mailbox_count(B) == 0
