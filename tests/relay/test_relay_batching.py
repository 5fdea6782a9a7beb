"""Per-batch work in the relay: commit pacing, the ack DELETE's query plan, one socket write per
connection per committed batch, the store's commit counters in /metrics, and the serving
process's GC settings (docs/performance-relay-journal.md, third session)."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from relay_testclient import Device, RelayClient

import relay.store.sqlite
from relay.app import GC_THRESHOLDS, create_app
from relay.config import ConfigError, RelayConfig
from relay.errors import StorageError
from relay.hub import OPCODE_BINARY, Connection, Hub
from relay.metrics import Metrics
from relay.state import STATE_KEY
from relay.store.base import Address, Delivery, Envelope, StoredMessage, StoreLimits
from relay.store.sqlite import (
    _EXACT_ROWS,
    SqliteRelayStore,
    _ack_delete_sql,
    _padded,
    _row_chunks,
)
from relay.wire import decode_deliver

A = Address("alice", 1)
B = Address("bob", 1)


async def _store(
    tmp_path: Path, interval_ms: float, checkpoint_commits: int = 512, loop_staging: bool = True
) -> SqliteRelayStore:
    store = SqliteRelayStore(
        tmp_path / "db.sqlite3",
        StoreLimits(
            write_batch_interval_ms=interval_ms,
            checkpoint_commits=checkpoint_commits,
            loop_staging=loop_staging,
        ),
    )
    await store.open()
    await store.create_account(A, b"a" * 32, 0)
    await store.create_account(B, b"b" * 32, 0)
    return store


def _env(to: Address = B) -> Envelope:
    return Envelope(os.urandom(16), (to,), b"ciphertext")


# -- commit pacing ------------------------------------------------------------------------


async def test_writes_arriving_within_the_interval_share_one_commit(tmp_path: Path) -> None:
    store = await _store(tmp_path, interval_ms=1500)
    try:
        await store.submit_send(A, _env(), 0)  # the writer was idle: commits at once
        before = store.stats()
        futs = []
        for _ in range(10):  # all submitted well inside the 1.5 s since that commit started
            futs.append(store.submit_send(A, _env(), 0))
            await asyncio.sleep(0.01)
        receipts = await asyncio.gather(*futs)
        after = store.stats()
        assert [r.recipients for r in receipts] == [1] * 10
        assert after.commits - before.commits == 1
        assert after.committed_ops - before.committed_ops == 10
        assert await store.mailbox_count(B) == 11
    finally:
        await store.close()


async def test_an_idle_writer_commits_without_waiting_for_the_interval(tmp_path: Path) -> None:
    store = await _store(tmp_path, interval_ms=1000)
    try:
        await asyncio.sleep(1.2)  # no commit started during the last interval
        t = time.monotonic()
        await store.submit_send(A, _env(), 0)
        # Pacing only spaces commits while writes keep coming; a write after an idle interval
        # is not held back (held back, it would wait the whole second).
        assert time.monotonic() - t < 0.8
    finally:
        await store.close()


async def test_without_pacing_each_awaited_write_is_its_own_commit(tmp_path: Path) -> None:
    store = await _store(tmp_path, interval_ms=0)
    try:
        before = store.stats().commits
        for _ in range(5):
            await store.submit_send(A, _env(), 0)
        assert store.stats().commits - before == 5
    finally:
        await store.close()


# -- staging on the loop -------------------------------------------------------------------


class _Early:
    """An early-delivery listener that records what it was handed, in order."""

    def __init__(self) -> None:
        self.staged_ids: list[bytes] = []
        self.staged_seqs: list[int] = []

    def staged(self, deliveries: Sequence[Delivery], push: bool = True) -> None:
        self.staged_ids.extend(d.message.message_id for d in deliveries)
        self.staged_seqs.extend(d.message.seq for d in deliveries)

    def settled(self, seq: int) -> None:
        pass


async def _until(cond: Callable[[], bool], what: str, ceiling: float = 30.0) -> None:
    deadline = time.monotonic() + ceiling
    while not cond():
        assert time.monotonic() < deadline, f"not seen within {ceiling} s: {what}"
        await asyncio.sleep(0.01)


def _chain(n: int) -> list[Envelope]:
    """``n`` pipelined sends to B, each after the one before (SEND_AFTER)."""
    envs: list[Envelope] = []
    for _ in range(n):
        envs.append(Envelope(os.urandom(16), (B,), b"ct", envs[-1].message_id if envs else None))
    return envs


@pytest.mark.parametrize("loop_staging", [True, False])
async def test_sends_into_an_open_transaction_are_pushed_at_once_and_answered_after_it(
    tmp_path: Path, loop_staging: bool
) -> None:
    # With loop staging the loop checks and stages them itself; without it the writer thread
    # does; a user sees the same either way: pushed in order at once, answered at the commit.
    store = await _store(tmp_path, interval_ms=3000, loop_staging=loop_staging)
    early = _Early()
    store.set_early_delivery_listener(early)
    try:
        await store.submit_send(A, _env(), 0)  # an idle writer commits at once; pacing starts
        before = store.stats()
        envs = _chain(10)
        # Staged into a transaction opened by the writer for it, or opened ahead of it.
        futs = [store.submit_send(A, envs[0], 0)]
        await _until(lambda: len(early.staged_ids) == 2, "the first pushed")
        if loop_staging:
            await _until(lambda: store._txn is not None, "the transaction open to the loop")
        for i, env in enumerate(envs[1:]):
            futs.append(store.submit_send(A, env, 0))
            if i % 3 == 2:
                await asyncio.sleep(0)  # spread over several loop iterations
        await _until(lambda: len(early.staged_ids) == 11, "all ten pushed")
        assert not any(f.done() for f in futs)  # their transaction is still open
        receipts = await asyncio.gather(*futs)
        after = store.stats()
        assert [r.recipients for r in receipts] == [1] * 10
        assert early.staged_ids[1:] == [env.message_id for env in envs]
        assert early.staged_seqs == sorted(early.staged_seqs)
        assert after.commits - before.commits == 1
        staged = after.loop_staged - before.loop_staged
        assert staged in ((9, 10) if loop_staging else (0,))
        stored = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in stored][1:] == [env.message_id for env in envs]
    finally:
        await store.close()


async def test_pipelined_sends_keep_their_order_while_transactions_come_and_go(
    tmp_path: Path,
) -> None:
    # A 20 ms pacing interval and sends every 4 ms open and close transactions all the time,
    # so some sends are staged by the loop and others queued for the writer (while it commits,
    # or has queued writes still to take); a SEND_AFTER never overtakes its predecessor.
    store = await _store(tmp_path, interval_ms=20)
    senders = [Address(f"s{i}", 1) for i in range(4)]
    try:
        for s in senders:
            await store.create_account(s, s.user.encode().ljust(32, b"k"), 0)
        chains = {s: _chain(60) for s in senders}
        futs: list[asyncio.Future[Any]] = []
        for k in range(60):
            for s in senders:
                futs.append(store.submit_send(s, chains[s][k], 0))
            if k % 7 == 0:  # other writes in the queue between the sends
                futs.append(store.submit_ack(B, [os.urandom(16)]))
                futs.append(asyncio.ensure_future(store.touch_device(senders[0], k)))
            if k % 2:
                await asyncio.sleep(0.004)
        await asyncio.gather(*futs)  # no PredecessorMissing, no other error
        stored = await store.fetch_mailbox(B, 0, 1000, 1 << 24)
        for s in senders:
            mine = [m.message_id for m in stored if m.sender == s]
            assert mine == [env.message_id for env in chains[s]]
        assert [m.seq for m in stored] == sorted(m.seq for m in stored)
        assert store.stats().loop_staged > 0
    finally:
        await store.close()


class _CommitGate:
    """Holds the writer inside a transaction's closing statements: a temporary trigger on the
    seq mark calls a function that, while armed, waits until released."""

    def __init__(self, store: SqliteRelayStore) -> None:
        assert store._state is not None
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        conn = store._state.conn  # the writer is idle: nothing else uses it now
        conn.create_function("hold_commit", 0, self._hold)
        conn.execute(
            "CREATE TEMP TRIGGER hold_commit AFTER UPDATE ON main.meta "
            "WHEN NEW.k = 'seq' BEGIN SELECT hold_commit(); END"
        )

    def _hold(self) -> int:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(60)
        return 0


async def test_a_lookup_the_loop_cannot_make_is_left_to_the_writer(tmp_path: Path) -> None:
    # While the writer commits, the loop looks sends up on a read connection of its own; when
    # SQLite refuses that lookup (an authorizer denies reads of the dedupe table there) the
    # loop hands the sends to the writer, which checks them itself once it has committed:
    # every send is answered 200 and stored exactly once, in order.
    store = await _store(tmp_path, interval_ms=50)
    early = _Early()
    store.set_early_delivery_listener(early)
    gate = _CommitGate(store)

    def deny(action: int, arg1: str | None, *_: Any) -> int:
        if action == sqlite3.SQLITE_READ and arg1 == "dedupe":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    reader = store._loop_reader
    assert reader is not None
    try:
        await store.submit_send(A, _env(), 0)
        await _until(lambda: store._txn is None, "the writer idle again")
        reader.set_authorizer(deny)
        gate.armed = True
        held = store.submit_send(A, _env(), 0)
        await _until(gate.entered.is_set, "the writer inside its closing statements")
        before = store.stats().loop_staged
        envs = [_env() for _ in range(5)]
        futs = [store.submit_send(A, env, 0) for env in envs]  # the loop's lookup fails
        await asyncio.sleep(0.1)
        assert not set(early.staged_ids) & {env.message_id for env in envs}
        gate.release.set()
        receipts = await asyncio.wait_for(asyncio.gather(held, *futs), 60)
        assert [r.recipients for r in receipts] == [1] * 6
        assert store.stats().loop_staged == before
        stored = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in stored][2:] == [env.message_id for env in envs]
    finally:
        gate.release.set()
        reader.set_authorizer(None)
        await store.close()


async def test_a_failure_while_the_loop_stages_is_retried_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A send's checks fail unexpectedly on the loop's thread only (the quota check raises
    # there): the writer rolls the transaction back and runs each of its writes again by
    # itself; every send is answered 200 and stored exactly once.
    store = await _store(tmp_path, interval_ms=1000)
    loop_thread = threading.get_ident()
    real_check = relay.store.sqlite.check_quota

    def check_quota(*args: Any) -> None:
        if threading.get_ident() == loop_thread:
            raise RuntimeError("unexpected")
        real_check(*args)

    try:
        await store.submit_send(A, _env(), 0)
        monkeypatch.setattr(relay.store.sqlite, "check_quota", check_quota)
        envs = [_env() for _ in range(5)]
        futs = [store.submit_send(A, envs[0], 0)]
        await _until(lambda: store._txn is not None, "the transaction open to the loop")
        futs += [store.submit_send(A, env, 0) for env in envs[1:]]  # the loop's try fails
        receipts = await asyncio.wait_for(asyncio.gather(*futs), 60)
        assert [r.recipients for r in receipts] == [1] * 5
        stored = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in stored][1:] == [env.message_id for env in envs]
    finally:
        monkeypatch.undo()
        await store.close()


async def test_sends_are_staged_and_pushed_while_the_writer_commits(tmp_path: Path) -> None:
    # While the writer runs a transaction's closing statements (held up here), the next
    # transaction is open to the loop: a send that arrives meanwhile is checked, staged and
    # pushed at once, an ack joins it, and both are answered after their own commit. A send
    # whose check needs a row the caches lack (a recipient not written to yet) goes to the
    # writer, and so does the send after it, so seqs keep the order of submission.
    store = await _store(tmp_path, interval_ms=50)
    carol = Address("carol", 1)
    await store.create_account(carol, b"c" * 32, 0)
    early = _Early()
    store.set_early_delivery_listener(early)
    gate = _CommitGate(store)
    try:
        first = _env()
        await store.submit_send(A, first, 0)
        await _until(lambda: store._txn is None, "the writer idle again")
        gate.armed = True
        held = store.submit_send(A, _env(), 0)  # an idle writer commits at once: held there
        await _until(gate.entered.is_set, "the writer inside its closing statements")
        before = store.stats()
        during = _env()
        fut = store.submit_send(A, during, 0)
        ack = store.submit_ack(B, [first.message_id])
        await _until(lambda: during.message_id in early.staged_ids, "pushed during the commit")
        assert not held.done() and not fut.done() and not ack.done()
        assert store.stats().loop_staged == before.loop_staged + 1
        to_carol, after = _env(carol), _env()
        later = [store.submit_send(A, to_carol, 0), store.submit_send(A, after, 0)]
        await asyncio.sleep(0.1)
        assert to_carol.message_id not in early.staged_ids  # left to the writer...
        assert after.message_id not in early.staged_ids  # ...and so is the send after it
        gate.release.set()
        await asyncio.wait_for(asyncio.gather(held, fut, ack, *later), 60)
        assert ack.result() == 1
        ids = early.staged_ids
        assert ids.index(during.message_id) < ids.index(to_carol.message_id)
        assert ids.index(to_carol.message_id) < ids.index(after.message_id)
        assert early.staged_seqs == sorted(early.staged_seqs)
        assert store.stats().loop_staged == before.loop_staged + 1
        stored = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in stored][1:] == [during.message_id, after.message_id]
        assert [m.message_id for m in await store.fetch_mailbox(carol, 0, 100, 1 << 20)] == [
            to_carol.message_id
        ]
    finally:
        gate.release.set()
        await store.close()


async def test_sends_staged_before_another_process_commits_are_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop stages sends into the next transaction while the writer commits; if another
    # process then commits before the writer's next BEGIN (simulated: the writer's check for
    # such a commit reports one once), the sends were checked against caches that commit may
    # have made stale: the writer runs each again itself. Each is answered 200 and stored once,
    # in order.
    store = await _store(tmp_path, interval_ms=50)
    early = _Early()
    store.set_early_delivery_listener(early)
    gate = _CommitGate(store)
    assert store._state is not None
    state = store._state
    real = state.foreign_commit
    calls = {"n": 0}

    def foreign_once() -> bool:
        calls["n"] += 1
        return real() or calls["n"] == 1

    try:
        await store.submit_send(A, _env(), 0)
        await _until(lambda: store._txn is None, "the writer idle again")
        gate.armed = True
        held = store.submit_send(A, _env(), 0)
        await _until(gate.entered.is_set, "the writer inside its closing statements")
        envs = [_env() for _ in range(4)]
        futs = [store.submit_send(A, env, 0) for env in envs]
        await _until(lambda: envs[-1].message_id in early.staged_ids, "staged by the loop")
        monkeypatch.setattr(state, "foreign_commit", foreign_once)
        gate.release.set()
        receipts = await asyncio.wait_for(asyncio.gather(held, *futs), 60)
        assert calls["n"] >= 1
        assert [r.recipients for r in receipts] == [1] * 5
        stored = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in stored][2:] == [env.message_id for env in envs]
        assert len(stored) == 6
    finally:
        gate.release.set()
        monkeypatch.undo()
        await store.close()


async def test_the_writer_outlives_another_process_holding_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another connection (an operator's tool, say) holds the write lock past the busy timeout:
    # the send that waited for it fails with 503, so does the transaction the writer opens
    # ahead of the next writes (it holds none), and once the lock is free sends are stored.
    monkeypatch.setattr(relay.store.sqlite, "_BUSY_TIMEOUT_MS", 200)
    store = await _store(tmp_path, interval_ms=50)
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        await asyncio.sleep(0.2)  # the writer is idle
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError):
            await asyncio.wait_for(store.submit_send(A, _env(), 0), 60)
        await asyncio.sleep(0.3)  # the writer's next transaction fails to begin as well
        other.execute("COMMIT")
        receipt = await asyncio.wait_for(store.submit_send(A, _env(), 0), 60)
        assert receipt.recipients == 1
        assert await store.mailbox_count(B) == 1
    finally:
        other.close()
        await store.close()


async def test_a_failed_log_sync_fails_its_writes_and_the_next_sync_opens_the_log_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sync thread keeps the write-ahead log open between syncs. When an fdatasync fails
    # (EIO: the disk lost writes), the writes it covered are answered with a storage failure,
    # never a 200, the store reports it, and the next sync runs on a freshly opened log.
    synced: list[int] = []
    opened: list[int] = []
    failing = threading.Event()
    real_sync, real_open = os.fdatasync, os.open

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        if failing.is_set():
            failing.clear()
            raise OSError(5, "Input/output error")
        real_sync(fd)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("-wal"):
            opened.append(fd)
        return fd

    monkeypatch.setattr(relay.store.sqlite.os, "fdatasync", fdatasync)
    monkeypatch.setattr(relay.store.sqlite.os, "open", open_)
    store = await _store(tmp_path, interval_ms=0)
    try:
        for _ in range(3):
            await asyncio.wait_for(store.submit_send(A, _env(), 0), 60)
        assert len(opened) == 1 and len(set(synced)) == 1  # one descriptor for every sync
        failing.set()
        with pytest.raises(StorageError):
            await asyncio.wait_for(store.submit_send(A, _env(), 0), 60)
        assert store.health.write_error is not None
        receipt = await asyncio.wait_for(store.submit_send(A, _env(), 0), 60)
        assert receipt.recipients == 1
        assert len(opened) == 2 and synced[-1] == opened[-1]
        # The failed write's row may be in the database (a sender retries with the same id and
        # the dedupe answers it); every write answered 200 is.
        assert await store.mailbox_count(B) >= 4
    finally:
        await store.close()


# -- acks -----------------------------------------------------------------------------------


async def test_ack_delete_finds_rows_by_index_not_by_scanning_the_mailbox(tmp_path: Path) -> None:
    store = await _store(tmp_path, interval_ms=0)
    await store.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    try:
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + _ack_delete_sql(3),
                [1, b"a" * 16, 2, b"b" * 16, 3, b"c" * 16],
            )
        ]
    finally:
        conn.close()
    assert any("SEARCH mailbox" in step for step in plan), plan
    assert not any(step.startswith("SCAN mailbox") for step in plan), plan


async def test_acks_in_one_batch_remove_exactly_their_rows(tmp_path: Path) -> None:
    store = await _store(tmp_path, interval_ms=0)
    try:
        c = Address("carol", 1)
        await store.create_account(c, b"c" * 32, 0)
        group = Envelope(os.urandom(16), (B, c), b"group")
        ones = [_env() for _ in range(30)]
        for e in (group, *ones):
            await store.submit_send(A, e, 0)
        # One batch: both recipients ack the group message, bob acks half of his 1:1 messages
        # (one of them twice), and an ack for an unknown id.
        futs = [
            store.submit_ack(B, [group.message_id]),
            store.submit_ack(c, [group.message_id]),
            store.submit_ack(B, [e.message_id for e in ones[:15]]),
            store.submit_ack(B, [ones[0].message_id, os.urandom(16)]),
        ]
        assert await asyncio.gather(*futs) == [1, 1, 15, 0]
        assert await store.mailbox_count(B) == 15
        assert await store.mailbox_count(c) == 0
        left = await store.fetch_mailbox(B, 0, 100, 1 << 20)
        assert [m.message_id for m in left] == [e.message_id for e in ones[15:]]
    finally:
        await store.close()


@pytest.mark.parametrize("n", [5, 100, 900])
async def test_a_transactions_rows_of_any_count_are_written_and_found_once_each(
    tmp_path: Path, n: int
) -> None:
    # Batches above _EXACT_ROWS rows are written in power-of-two chunks and looked up with
    # padded IN lists (bounded statement caches): every row goes in once, a resend of any of
    # them is found, an ack of all removes them all, and settled ids are forgotten.
    store = await _store(tmp_path, interval_ms=300)
    try:
        await store.submit_send(A, _env(), 0)  # the writer was idle: commits at once
        envs = [_env() for _ in range(n)]
        receipts = await asyncio.gather(*(store.submit_send(A, e, 0) for e in envs))
        assert [r.recipients for r in receipts] == [1] * n
        assert await store.mailbox_count(B) == n + 1
        held = await store.fetch_mailbox(B, 0, n + 10, 1 << 30)
        assert [m.message_id for m in held[1:]] == [e.message_id for e in envs]
        again = await asyncio.gather(*(store.submit_send(A, e, 0) for e in envs))
        assert [r.stored_at for r in again] == [r.stored_at for r in receipts]  # duplicates
        assert await store.mailbox_count(B) == n + 1
        assert await store.submit_ack(B, [e.message_id for e in envs]) == n
        assert await store.mailbox_count(B) == 1
        await store.submit_ack(A, [], settled=[e.message_id for e in envs])
        await store.submit_send(A, envs[-1], 0)  # its record is gone: stored anew
        assert await store.mailbox_count(B) == 2
    finally:
        await store.close()


@pytest.mark.parametrize("most", [64, 2048])
def test_statement_shapes_come_from_a_small_fixed_set(most: int) -> None:
    shapes: set[int] = set()
    for n in range(1, 5000):
        sizes = _row_chunks(n, most)
        assert sum(sizes) == n and all(0 < k <= most for k in sizes)
        assert sizes[-1] <= _EXACT_ROWS or sizes[-1] & (sizes[-1] - 1) == 0
        shapes.update(sizes)
        padded = _padded(list(range(n)))
        assert padded[:n] == list(range(n)) and set(padded[n:]) <= {n - 1}
        shapes.add(len(padded))
    # 1.._EXACT_ROWS, and the powers of two from 64 to 8192
    assert len(shapes) <= _EXACT_ROWS + 8


# -- pushes -----------------------------------------------------------------------------------


class _Transport:
    def __init__(self, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.buffered = buffered
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


class _Ws:
    async def close(self, code: int = 1000, message: bytes = b"") -> bool:
        return True


def _conn(addr: Address, transport: _Transport) -> Connection:
    conn = Connection(addr, _Ws(), transport)  # type: ignore[arg-type]
    conn.live = True
    return conn


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1]
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        out.append((opcode, data[pos : pos + n]))
        pos += n
    return out


def _delivery(to: Address, seq: int) -> Delivery:
    return Delivery(to, StoredMessage(seq, os.urandom(16), A, 5, b"body-%d" % seq))


async def test_a_batch_reaches_each_socket_in_one_write_in_seq_order() -> None:
    metrics = Metrics()
    hub = Hub(metrics, max_outbound_bytes=1 << 20)
    tb, tc = _Transport(), _Transport()
    c_addr = Address("carol", 1)
    hub.attach(_conn(B, tb))
    carol = _conn(c_addr, tc)
    hub.attach(carol)
    carol.last_seq = 4  # already sent up to 4 (e.g. by its backlog)
    hub.deliver(
        [
            _delivery(B, 3),
            _delivery(c_addr, 4),  # not newer than what carol has: dropped
            _delivery(B, 5),
            _delivery(c_addr, 6),
            _delivery(B, 7),
            _delivery(Address("nobody", 1), 8),
        ]
    )
    assert len(tb.writes) == 1 and len(tc.writes) == 1
    got_b = [(op, decode_deliver(p).seq) for op, p in _frames(tb.writes[0])]
    assert got_b == [(OPCODE_BINARY, 3), (OPCODE_BINARY, 5), (OPCODE_BINARY, 7)]
    assert [decode_deliver(p).body for _, p in _frames(tc.writes[0])] == [b"body-6"]
    assert metrics.delivered == 4
    assert carol.last_seq == 6


async def test_a_socket_over_its_outbound_bound_is_closed_not_written() -> None:
    metrics = Metrics()
    hub = Hub(metrics, max_outbound_bytes=1000)
    slow, fast = _Transport(buffered=5000), _Transport()
    slow_conn = _conn(B, slow)
    hub.attach(slow_conn)
    hub.attach(_conn(A, fast))
    hub.deliver([_delivery(B, 1), _delivery(A, 2), _delivery(B, 3)])
    assert slow.writes == [] and len(fast.writes) == 1
    assert slow_conn.closing and hub.get(B) is None
    assert metrics.ws_slow_disconnects == 1 and metrics.delivered == 1
    await hub.close_all()


# -- observability and process settings -------------------------------------------------


async def _app_client(tmp_path: Path) -> TestClient[Any, Any]:
    cfg = RelayConfig(data_dir=tmp_path, sweep_interval_seconds=0, ws_heartbeat_seconds=0)
    return TestClient(TestServer(create_app(cfg)))


async def test_metrics_count_commits_and_the_operations_in_them(tmp_path: Path) -> None:
    async with await _app_client(tmp_path) as tc:
        client = RelayClient(str(tc.make_url("")).rstrip("/"), tc.session)
        alice, bob = Device("alice_m"), Device("bob_m")
        for d in (alice, bob):
            assert (await client.register(d)).status == 201
        for _ in range(3):
            assert (await client.send(alice, [bob], b"x")).status == 200
        text = (await client.request(None, "GET", "/metrics")).body.decode()
    values = {
        line.split()[0]: int(line.split()[1])
        for line in text.splitlines()
        if line.startswith("blindpost_relay_store_")
        and not line.startswith("blindpost_relay_store_writer_pause")
    }
    assert values["blindpost_relay_store_commits_total"] >= 1
    assert values["blindpost_relay_store_committed_ops_total"] >= 5  # 2 accounts + 3 sends
    assert (
        values["blindpost_relay_store_committed_ops_total"]
        >= values["blindpost_relay_store_commits_total"]
    )
    # Every commit's closing steps are in the writer-pause histogram, in cumulative buckets.
    pause = "blindpost_relay_store_writer_pause_seconds"
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(pause)
    }
    commits = values["blindpost_relay_store_commits_total"]
    assert series[f'{pause}_count{{step="commit"}}'] == commits
    assert series[f'{pause}_bucket{{step="commit",le="+Inf"}}'] == commits
    assert series[f'{pause}_sum{{step="commit"}}'] > 0
    buckets = [v for k, v in series.items() if k.startswith(f'{pause}_bucket{{step="commit"')]
    assert buckets == sorted(buckets)
    assert f'{pause}_count{{step="checkpoint"}}' in series


async def test_serving_tunes_the_collector_and_restores_it_after(tmp_path: Path) -> None:
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    async with await _app_client(tmp_path):
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("n", [1, 7])
def test_ack_delete_sql_has_one_placeholder_per_value(n: int) -> None:
    assert _ack_delete_sql(n).count("?") == 2 * n


def test_commit_pacing_is_an_operator_setting(tmp_path: Path) -> None:
    config = RelayConfig.load(
        env={"BLINDPOST_RELAY_WRITE_BATCH_INTERVAL_MS": "7.5"},
        overrides={"data_dir": tmp_path},
    )
    assert config.write_batch_interval_ms == 7.5
    app = create_app(config)
    store = app[STATE_KEY].store
    assert isinstance(store, SqliteRelayStore)
    assert store.limits.write_batch_interval_ms == 7.5
    with pytest.raises(ConfigError):
        RelayConfig.load(env={}, overrides={"write_batch_interval_ms": -1})


def test_loop_staging_is_an_operator_setting(tmp_path: Path) -> None:
    config = RelayConfig.load(
        env={"BLINDPOST_RELAY_SQLITE_LOOP_STAGING": "0"}, overrides={"data_dir": tmp_path}
    )
    store = create_app(config)[STATE_KEY].store
    assert isinstance(store, SqliteRelayStore)
    assert store.limits.loop_staging is False
    default = create_app(RelayConfig.load(env={}, overrides={"data_dir": tmp_path / "d"}))
    assert default[STATE_KEY].store.limits.loop_staging is True
    with pytest.raises(ConfigError):
        RelayConfig.load(env={}, overrides={"sqlite_loop_staging": 2})


# -- checkpoints beside the writer --------------------------------------------------------


async def _commit_one_by_one(
    store: SqliteRelayStore, n: int, body: bytes = b"ciphertext"
) -> list[bytes]:
    ids = []
    for _ in range(n):
        env = Envelope(os.urandom(16), (B,), body)
        await store.submit_send(A, env, 0)  # awaited: each send is its own commit
        ids.append(env.message_id)
    return ids


def _wal_bytes(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("background_thread_alive", [True, False])
async def test_the_write_ahead_log_starts_over_instead_of_growing(
    tmp_path: Path, background_thread_alive: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """400 commits of 16 KiB bodies: without checkpoints the log would hold them all (6+ MiB);
    with a checkpoint every 4 commits it starts over and stays a few pages long. If the
    background thread is gone, the writer's own fallback (every 32 commits) still bounds it."""
    db = tmp_path / "db.sqlite3"
    store = await _store(tmp_path, interval_ms=0, checkpoint_commits=4)
    try:
        if not background_thread_alive:
            assert store._checkpointer is not None
            store._checkpointer.close()
        ids = await _commit_one_by_one(store, 400, os.urandom(16 * 1024))
        assert store.stats().commits >= 400
        if not background_thread_alive:  # the operator is told why the writer pauses
            assert "no background checkpoint finished" in caplog.text
        # Well under what 400 bodies take (6.25 MiB); how far the checkpoints lag behind
        # the writer depends on how busy the machine is.
        assert _wal_bytes(db) < 400 * 16 * 1024 // 2
        # Everything committed is readable from a fresh connection, in order.
        got = await store.fetch_mailbox(B, 0, 1000, 1 << 30)
        assert [m.message_id for m in got] == ids
    finally:
        await store.close()
    assert _wal_bytes(db) == 0  # closing checkpoints the rest and truncates the log
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 400
    finally:
        conn.close()


async def test_the_background_checkpoint_copies_the_log_into_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint thread does the copy: after a request, pages committed so far are in the
    database file itself (a second reader that ignores the log would see them)."""
    # Only this test's request may start a pass: on a busy machine 20 commits can outlast the
    # time-based trigger, whose pass would copy the pages before the size is read.
    monkeypatch.setattr(relay.store.sqlite, "_CHECKPOINT_SECONDS", 3600.0)
    db = tmp_path / "db.sqlite3"
    store = await _store(tmp_path, interval_ms=0, checkpoint_commits=1_000_000)
    try:
        await _commit_one_by_one(store, 20)
        size_before = db.stat().st_size
        checkpointer = store._checkpointer
        assert checkpointer is not None and not checkpointer.finished
        checkpointer.request()
        await _wait_for(lambda: checkpointer.finished)
        assert db.stat().st_size > size_before  # the new pages now live in the main file
    finally:
        await store.close()


def test_the_checkpoint_interval_is_an_operator_setting(tmp_path: Path) -> None:
    config = RelayConfig.load(
        env={"BLINDPOST_RELAY_WAL_CHECKPOINT_COMMITS": "32"}, overrides={"data_dir": tmp_path}
    )
    store = create_app(config)[STATE_KEY].store
    assert isinstance(store, SqliteRelayStore)
    assert store.limits.checkpoint_commits == 32
    with pytest.raises(ConfigError, match="wal_checkpoint_commits must be positive"):
        RelayConfig.load(env={}, overrides={"wal_checkpoint_commits": 0})
