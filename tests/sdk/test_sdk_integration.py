"""Real clients against a real relay process on loopback (``python -m relay``).

Each test starts its own relay (fixture ``relay``) and two or three clients
in their own data directories, talking through the real transport
(:class:`e2ee.client.TransportLink`: HTTP + WebSocket).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay, reinstall_device

from e2ee.client import Client, ClientOptions
from e2ee.errors import StorageError, UsageError
from e2ee.events import (
    ConnectionStateChanged,
    GroupChanged,
    MessageReceived,
    ReceiptUpdated,
)
from e2ee.history import direct_chat_id, group_chat_id

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
WAIT = 15.0


async def test_one_to_one_with_receipts_over_the_real_relay(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        mid = await alice.send_text("bob", "hello over the wire")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.text == "hello over the wire" and got.message.id == mid
        await wait_for(
            a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "delivered", WAIT
        )
        await bob.mark_read(direct_chat_id("alice"))
        await wait_for(
            a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read", WAIT
        )


async def test_recipient_offline_then_back_and_client_killed_before_ack(
    make_client: MakeClient,
    wait_for: WaitFor,
    relay: Any,
    tmp_path: Path,
    fast_options: Any,
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice:
        for i in range(5):
            await alice.send_text("bob", f"queued {i}")
    # Bob comes online, stores everything, but "dies" before any ack is sent.
    b_events = bob.events()

    async def lost_ack(ids: Any, **kw: Any) -> None:
        from e2ee.transport.errors import ConnectionLost

        raise ConnectionLost("killed")

    bob._link.ack = lost_ack  # type: ignore[method-assign]
    async with bob:
        texts = [
            (await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)).message.text
            for _ in range(5)
        ]
    assert texts == [f"queued {i}" for i in range(5)]
    again = await Client.open(tmp_path / "bob", options=fast_options)
    events = again.events()
    try:
        async with again:
            await asyncio.sleep(1.0)  # the relay redelivers all five; none is new
            history = [m.text for m in again.history.messages(direct_chat_id("alice"))]
            assert history == [f"queued {i}" for i in range(5)]
        seen = [e async for e in events]
        assert not any(isinstance(e, MessageReceived) for e in seen)
    finally:
        await again.close()


async def test_relay_restarted_mid_conversation(
    make_client: MakeClient, wait_for: WaitFor, relay: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await alice.send_text("bob", "before the restart")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await asyncio.to_thread(relay.stop)
        await wait_for(
            a_events, lambda e: isinstance(e, ConnectionStateChanged) and e.state == "offline", WAIT
        )
        queued = await alice.send_text("bob", "written while the relay was down", wait=False)
        await asyncio.to_thread(relay.start)
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.id == queued


async def test_group_with_removed_member_over_the_real_relay(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    b_events, c_events = bob.events(), carol.events()
    async with alice, bob, carol:
        gid = await alice.create_group("team", ["bob", "carol"])
        await wait_for(c_events, lambda e: isinstance(e, GroupChanged), WAIT)
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged), WAIT)
        await alice.send_text(group_chat_id(gid), "hello team")
        for events in (b_events, c_events):
            got = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
            assert got.message.text == "hello team"
        await alice.remove_member(gid, "carol")
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged), WAIT)
        await wait_for(c_events, lambda e: isinstance(e, GroupChanged), WAIT)
        await alice.send_text(group_chat_id(gid), "after carol left")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.text == "after carol left"
        await asyncio.sleep(0.5)
        assert "after carol left" not in [
            m.text for m in carol.history.messages(group_chat_id(gid))
        ]


@pytest.mark.slow
async def test_fifty_megabyte_file(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    source = tmp_path / "video.bin"
    with source.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(50):
            f.write(block)
    b_events = bob.events()
    progress: list[tuple[int, int]] = []
    lags: list[float] = []

    async def watch_loop() -> None:  # the event loop must stay responsive throughout
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - start - 0.01)

    watcher = asyncio.create_task(watch_loop())
    async with alice, bob:
        mid = await alice.send_file(
            "bob", source, mime_type="video/mp4", progress=lambda d, t: progress.append((d, t))
        )
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.type == "attachment"
        out = await bob.download_attachment(mid, tmp_path / "received.bin")
        assert out.stat().st_size == source.stat().st_size
        assert progress and progress[-1][0] == progress[-1][1]
        import hashlib

        def digest(p: Path) -> str:
            h = hashlib.sha256()
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()

        assert await asyncio.to_thread(digest, out) == await asyncio.to_thread(digest, source)
    watcher.cancel()
    assert max(lags) < 0.2, f"event loop blocked for {max(lags):.3f} s"


async def test_typing_reaction_edit_delete_and_timer_over_the_real_relay(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    from e2ee.events import MessageChanged, Typing

    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await alice.wait_connected()
        await alice.send_typing("bob")
        assert (await wait_for(b_events, lambda e: isinstance(e, Typing), WAIT)).typing
        mid = await alice.send_text("bob", "typo heer")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await bob.react(mid, "🎉")
        await wait_for(a_events, lambda e: isinstance(e, MessageChanged), WAIT)
        assert alice.history.reactions(mid) == {"bob": "🎉"}
        await alice.edit(mid, "typo here")
        await wait_for(b_events, lambda e: isinstance(e, MessageChanged), WAIT)
        assert bob.history.search("here")[0].id == mid
        await alice.delete_for_everyone(mid)
        await wait_for(b_events, lambda e: isinstance(e, MessageChanged), WAIT)
        deleted = bob.history.message(mid)
        assert deleted is not None and deleted.deleted and deleted.text is None
        await bob.set_disappearing_timer("alice", 1)
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)
        short = await bob.send_text("alice", "gone soon")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await wait_for(
            a_events, lambda e: isinstance(e, MessageChanged) and e.change == "expired", WAIT
        )
        assert alice.history.message(short) is None


KILLED_CHILD = """
import asyncio, os, sys
from e2ee.client import Client, ClientOptions

async def main():
    client = await Client.open(sys.argv[1], options=ClientOptions(ack_delay=0.2))
    async def die(ids, **kw):
        os._exit(9)  # killed after the commit, before the ack leaves
    client._link.ack = die
    async with client:
        await asyncio.sleep(30)

asyncio.run(main())
"""


async def test_client_process_killed_between_commit_and_ack(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    import subprocess
    import sys

    alice, bob = await make_client("alice"), await make_client("bob")
    await bob.close()  # bob's process is not running
    async with alice:
        for i in range(4):
            await alice.send_text("bob", f"survives {i}")
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    child = await asyncio.create_subprocess_exec(sys.executable, str(script), str(tmp_path / "bob"))
    assert await asyncio.wait_for(child.wait(), 60) == 9
    again = await Client.open(tmp_path / "bob", options=fast_options)
    before = {m.id for m in again.history.messages(direct_chat_id("alice"))}
    assert before  # the child committed at least one message before it died
    events = again.events()
    try:
        async with again:
            fresh = []
            while len(before) + len(fresh) < 4:
                event = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
                fresh.append(event.message.id)
            await asyncio.sleep(0.5)  # redelivered duplicates are acknowledged silently
            texts = [m.text for m in again.history.messages(direct_chat_id("alice"))]
        assert texts == [f"survives {i}" for i in range(4)]  # nothing lost, nothing twice
        assert not before & set(fresh)  # nothing shown twice
    finally:
        await again.close()
    del subprocess


async def test_key_change_over_the_real_relay_holds_until_accepted(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, signers: Any
) -> None:
    """Bob reinstalls device 1 (new identity key, same address); Alice is told and holds."""
    from e2ee.client_errors import IdentityHeld
    from e2ee.events import IdentityChanged
    from e2ee.store import Changes

    alice, bob = await make_client("alice"), await make_client("bob")
    a_events = alice.events()
    async with alice:
        async with bob:
            await alice.send_text("bob", "before the reinstall")
        old_bob = signers["bob", 1]
        new_bob = await make_client("bob", register=False, directory="bob-reinstalled")
        await reinstall_device(relay, old_bob, signers["bob", 1].public_key)
        await asyncio.to_thread(
            new_bob._store.commit, Changes(meta_put={"sdk.account_created": "1"})
        )
        await new_bob.register()  # uploads the new installation's keys
        nb_events = new_bob.events()
        async with new_bob:
            await new_bob.send_text("alice", "new phone, same me")
            changed = await wait_for(a_events, lambda e: isinstance(e, IdentityChanged), WAIT)
            assert (changed.user, changed.first_use, changed.held) == ("bob", False, True)
            with pytest.raises(IdentityHeld):
                await alice.send_text("bob", "held until accepted")
            assert await alice.trust_level("bob") == {1: "untrusted"}
            await alice.accept_identity("bob")
            got = await wait_for(nb_events, lambda e: isinstance(e, MessageReceived), WAIT)
            assert got.message.text == "held until accepted"


BATCH_CHILD = """
import asyncio, sys
from e2ee.client import Client
from e2ee.events import MessageReceived

async def main():
    client = await Client.open(sys.argv[1])
    events = client.events()
    async with client:
        async for event in events:
            if isinstance(event, MessageReceived):
                print(event.message.id, flush=True)

asyncio.run(main())
"""


async def test_client_process_killed_while_a_backlog_is_processed_in_batches(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    """SIGKILL lands inside the batched drain of a backlog: nothing lost, nothing twice."""
    import signal
    import sys

    total = 60
    alice, bob = await make_client("alice"), await make_client("bob")
    await bob.close()
    async with alice:
        for i in range(total):
            await alice.send_text("bob", f"backlog {i:02d}", wait=i == total - 1)
        await alice.flush(WAIT)
    script = tmp_path / "batch_child.py"
    script.write_text(BATCH_CHILD)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tmp_path / "bob"), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    shown = [(await asyncio.wait_for(child.stdout.readline(), WAIT)).decode().strip()]
    child.send_signal(signal.SIGKILL)  # somewhere in the middle of the drain
    rest, _ = await asyncio.wait_for(child.communicate(), WAIT)
    shown += rest.decode().split()
    again = await Client.open(tmp_path / "bob", options=fast_options)
    before = {m.id for m in again.history.messages(direct_chat_id("alice"), limit=100)}
    assert set(shown) <= before  # shown only once committed
    events = again.events()
    try:
        async with again:
            fresh: list[str] = []
            while len(before) + len(fresh) < total:
                event = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
                fresh.append(event.message.id)
            await asyncio.sleep(0.3)  # redelivered duplicates are acknowledged silently
            texts = [m.text for m in again.history.messages(direct_chat_id("alice"), limit=100)]
        assert texts == [f"backlog {i:02d}" for i in range(total)]  # nothing lost or twice
        assert not before & set(fresh)  # nothing shown twice
    finally:
        await again.close()


async def test_send_only_client_sends_over_http_and_takes_nothing(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with bob:
        waiting = await bob.send_text("alice", "stays in alice's mailbox")
        await alice.start(receive=False)  # no WebSocket: PUT /v1/messages
        mid = await alice.send_text("bob", "from a one-shot sender")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.id == mid
        await alice.close()
    again = await Client.open(tmp_path / "alice", options=fast_options)
    events = again.events()
    try:
        async with again:
            got = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
            assert got.message.id == waiting
    finally:
        await again.close()


async def test_transfer_progress_is_reported_on_the_event_loop_thread(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    import threading

    alice, bob = await make_client("alice"), await make_client("bob")
    source = tmp_path / "note.bin"
    source.write_bytes(os.urandom(300_000))
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    b_events = bob.events()
    async with alice, bob:
        mid = await alice.send_file(
            "bob", source, progress=lambda done, total: threads.add(threading.get_ident())
        )
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await bob.download_attachment(
            mid,
            tmp_path / "got.bin",
            progress=lambda done, total: threads.add(threading.get_ident()),
        )
    assert threads == {loop_thread}  # documented: never called from a worker thread
    assert (tmp_path / "got.bin").read_bytes() == source.read_bytes()


class DiskFillsUp:
    """Bob's SQLite connection on a disk that fills up in the middle of a backlog.

    The first inbox transaction (:meth:`SQLiteProtocolStore.batch`, at most
    ``_INBOX_BATCH`` = 200 deliveries) commits normally, slowly (0.3 s), so the
    rest of the backlog is waiting when the next batch is taken; from the next
    one on, ``COMMIT`` fails as SQLite reports a full disk, until the process
    restarts.

    Failure injection at the one place the OS would inject it (the COMMIT, where
    SQLite writes and syncs); everything above it -- the store's rollback, the
    client's handling, the relay -- is the real thing.
    """

    def __init__(self, conn: sqlite3.Connection, store: Any) -> None:
        self._conn = conn
        self._store = store
        self.commits = 0
        self.full = False
        self.failed = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self._store.in_batch:
            self.commits += 1
            if self.commits == 1:
                time.sleep(0.3)
            if self.full:
                self.failed += 1
                raise sqlite3.OperationalError("database or disk is full")
            self.full = True
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_inbox_transaction_that_fails_to_commit_loses_nothing_and_shows_nothing_twice(
    make_client: MakeClient,
    wait_for: WaitFor,
    mailbox: Any,
    tmp_path: Path,
    fast_options: Any,
) -> None:
    """A backlog is stored in batches (group commit: acked only after its commit).

    The disk fills up after the first transaction: what it committed is shown
    once and acknowledged; nothing of the failed ones is shown or acknowledged
    (the group change among them), so the relay keeps them and delivers them
    again after the restart, where they are shown once. History ends with every
    message once, in order.
    """
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice:
        # More than one batch (200) before the group change: the first transaction
        # holds only messages from here.
        before = [await alice.send_text("bob", f"m{i:03d}", wait=False) for i in range(250)]
        gid = await alice.create_group("pair", ["bob"])
        after = [await alice.send_text("bob", f"m{i:03d}", wait=False) for i in range(250, 300)]
        assert await alice.flush(WAIT) == 0
    disk = DiskFillsUp(bob._store._conn, bob._store)
    bob._store._conn = disk
    events = bob.events()
    shown: list[str] = []
    groups: list[GroupChanged] = []
    await bob.start()
    while True:
        event = await wait_for(
            events,
            lambda e: (
                isinstance(e, MessageReceived | GroupChanged)
                or (isinstance(e, ConnectionStateChanged) and e.reason.startswith("storage"))
            ),
        )
        if isinstance(event, ConnectionStateChanged):
            break  # the failed transaction: the client let go of the connection
        if isinstance(event, GroupChanged):
            groups.append(event)
        else:
            shown.append(event.message.id)
    # Close while connected again (the relay delivered the rest again, and the disk
    # is still full), so close() flushes every acknowledgement the client holds.
    await wait_for(
        events, lambda e: isinstance(e, ConnectionStateChanged) and e.state == "connected"
    )
    await bob.close()
    assert disk.failed >= 1
    committed = len(shown)
    assert 1 <= committed <= 200 and shown == before[:committed]  # each once, in order
    assert groups == []
    # Acknowledged: exactly what was committed; the failed transactions' stay queued.
    rest = before[committed:] + after
    queued = [d.id.hex() for d in await mailbox("bob")]
    assert [m for m in queued if m in set(rest)] == rest
    assert len(queued) == len(rest) + 1  # and the group change

    again = await Client.open(tmp_path / "bob", options=fast_options)
    assert [m.id for m in again.history.messages(direct_chat_id("alice"), limit=400)] == shown
    events = again.events()
    fresh: list[str] = []
    try:
        async with again:
            while len(fresh) < len(rest):
                event = await wait_for(events, lambda e: isinstance(e, MessageReceived))
                fresh.append(event.message.id)
            history = again.history.messages(direct_chat_id("alice"), limit=400)
            assert [g.id for g in await again.groups()] == [gid]
        assert fresh == rest  # the failed transactions' messages came again, shown once
        assert [m.text for m in history] == [f"m{i:03d}" for i in range(300)]
        assert await mailbox("bob") == []
    finally:
        await again.close()


@pytest.mark.parametrize("send_batch", [1, 100])
async def test_many_concurrent_sends_from_one_client_arrive_once_and_in_order(
    make_client: MakeClient, wait_for: WaitFor, fast_options: ClientOptions, send_batch: int
) -> None:
    """Concurrent sends share compose, encrypt and "sent" transactions (group
    commits of at most ``send_batch`` sends; 1: one transaction each).

    Each caller still gets its own id, a refused one (to ourselves) fails alone,
    and every recipient gets its messages once, in sending order, with nothing
    left queued.
    """
    options = dataclasses.replace(fast_options, send_batch=send_batch)
    alice = await make_client("alice", options=options)
    bob, carol = await make_client("bob"), await make_client("carol")
    b_events, c_events = bob.events(), carol.events()
    async with alice, bob, carol:
        await alice.send_text("bob", "hello")  # sessions exist: no bundle fetch races
        await alice.send_text("carol", "hello")
        targets = ["bob" if i % 3 else "carol" for i in range(150)]
        calls = [alice.send_text(to, f"m{i:03d}") for i, to in enumerate(targets)]
        calls.insert(75, alice.send_text("alice", "to myself"))
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = results.pop(75)
        assert isinstance(refused, UsageError)
        assert all(isinstance(r, str) for r in results)
        assert len(set(results)) == 150
        want = {
            user: [(results[i], f"m{i:03d}") for i, to in enumerate(targets) if to == user]
            for user in ("bob", "carol")
        }
        for user, events in (("bob", b_events), ("carol", c_events)):
            got = []
            while len(got) < len(want[user]) + 1:
                event = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
                got.append((event.message.id, event.message.text))
            assert got[1:] == want[user]  # once each, in sending order
        for user in ("bob", "carol"):
            sent = alice.history.messages(direct_chat_id(user), limit=200)
            assert [(m.id, m.text) for m in sent[1:]] == want[user]
            assert all(m.status != "pending" for m in sent)
        assert await alice.flush(WAIT) == 0


class FirstCommitHeldNextFails:
    """Alice's SQLite connection: the first batch ``COMMIT`` waits for :attr:`release`,
    the second fails as SQLite reports a full disk, later ones pass.

    Failure injection at the one place the OS would inject it; everything above
    it (the store's rollback, the client, the relay) is the real thing.
    """

    def __init__(self, conn: sqlite3.Connection, store: Any) -> None:
        self._conn = conn
        self._store = store
        self.release = threading.Event()
        self.commits = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self._store.in_batch:
            self.commits += 1
            if self.commits == 1:
                self.release.wait(WAIT)
            elif self.commits == 2:
                raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def until(check: Callable[[], bool]) -> None:
    """Wait (generously) until ``check()`` holds."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_compose_transaction_that_fails_commits_nothing_and_fails_every_caller(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    """Sends queued while a compose transaction is written share the next one; if
    its COMMIT fails, every caller in it gets StorageError, and none of them is
    stored or sent. The sends before and after it are unaffected."""
    alice, bob = await make_client("alice"), await make_client("bob")
    # Not started yet: the sends are only composed (the outbox sends them once started).
    disk = FirstCommitHeldNextFails(alice._store._conn, alice._store)
    alice._store._conn = disk
    first = asyncio.create_task(alice.send_text("bob", "first", wait=False))
    await until(lambda: disk.commits == 1)  # its transaction is being committed
    lost = [asyncio.create_task(alice.send_text("bob", f"lost {i}", wait=False)) for i in range(30)]
    await until(lambda: len(alice._outbox._drafts) == 30)  # all queued behind it
    disk.release.set()
    first_id = await first
    results = await asyncio.gather(*lost, return_exceptions=True)
    assert disk.commits == 2
    assert all(isinstance(r, StorageError) for r in results)
    async with alice:
        after = await alice.send_text("bob", "after")
        sent = alice.history.messages(direct_chat_id("bob"), limit=100)
        assert [m.id for m in sent] == [first_id, after]
        assert await alice.flush(WAIT) == 0
    b_events = bob.events()
    async with bob:
        got = [
            (await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)).message.id
            for _ in range(2)
        ]
        assert got == [first_id, after]
        history = bob.history.messages(direct_chat_id("alice"), limit=100)
        assert [m.text for m in history] == ["first", "after"]


def test_send_batch_must_be_at_least_one() -> None:
    with pytest.raises(UsageError):
        ClientOptions(send_batch=0)


async def test_queued_sends_encrypted_ahead_go_to_a_device_added_meanwhile(
    make_client: MakeClient,
    wait_for: WaitFor,
    relay: Relay,
    signers: Any,
    tmp_path: Path,
    fast_options: Any,
) -> None:
    """Queued sends are encrypted ahead in one transaction for the devices known
    then; when the relay answers that a device was added, they are encrypted
    again for every device, and each device gets each message once, in order."""
    from sdk_relay import http_as

    from e2ee.store import Changes

    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "hello")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    bob = await Client.open(tmp_path / "bob", options=fast_options)
    try:
        queued = [await alice.send_text("bob", f"q{i:02d}", wait=False) for i in range(20)]
        # Bob adds a second device while Alice's messages wait in her outbox.
        bob2 = await make_client("bob", register=False, directory="bob2", device_id=2)
        async with http_as(relay, signers["bob", 1]) as http:
            await http.add_device(2, signers["bob", 2].public_key)
        await asyncio.to_thread(bob2._store.commit, Changes(meta_put={"sdk.account_created": "1"}))
        await bob2.register()
        async with alice:
            assert await alice.flush(WAIT) == 0
        for device in (bob, bob2):
            events = device.events()
            async with device:
                got = [
                    (await wait_for(events, lambda e: isinstance(e, MessageReceived))).message
                    for _ in range(20)
                ]
            assert [(m.id, m.text) for m in got] == [(q, f"q{i:02d}") for i, q in enumerate(queued)]
    finally:
        await alice.close()
        await bob.close()
