"""Settling: once a send of ours is committed as sent, the next ack tells the relay it may
forget that send's retry record (e2ee.client.settling).

What a user relies on: a message is stored once by the relay, however its sending is retried,
and a message sent without the user's name never gets the user's name attached afterwards.
Settling must therefore come only after the "sent" commit (a failed commit sends the message
again under the same id, which the relay must still recognise) and never for a sealed send.

Real clients and a real relay process. The client-level tests watch the ack calls on the
client's relay link (a TransportLink that records them and passes only the deliveries' ids on,
so they hold whatever the relay does with ``settled``); the end-to-end tests at the bottom use
the SDK's own link and read what the relay keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay, eventually

from blindpost_wire.names import is_sealed_sender
from e2ee.client import Client, ClientOptions, TransportLink
from e2ee.client.settling import DEFAULT_SETTLE_BACKLOG, Accepted, SettleQueue
from e2ee.errors import UsageError
from e2ee.events import MessageReceived
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import ConnectionLost
from relay.admin import collect_stats
from relay.integrity import DB_NAME

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
WAIT = 15.0

pytestmark = pytest.mark.timeout(180)


def ids(n: int) -> list[bytes]:
    return [bytes([i]) * 16 for i in range(n)]


# -- the queue (pure) --------------------------------------------------------------------


def test_the_queue_hands_out_the_oldest_first_and_drops_the_oldest_when_full() -> None:
    queue = SettleQueue(3)
    a, b, c, d, e = ids(5)
    queue.add([a, b])
    queue.add([c, d, e])  # over the limit: a and b go, they expire at the relay instead
    assert (len(queue), queue.dropped) == (3, 2)
    assert queue.take(2) == [c, d]
    assert queue.take(5) == [e]
    assert queue.take(1) == [] and len(queue) == 0


def test_ids_of_a_failed_ack_go_back_ahead_of_newer_ones_within_the_limit() -> None:
    queue = SettleQueue(3)
    a, b, c, d = ids(4)
    queue.add([a, b])
    taken = queue.take(2)
    queue.add([c, d])  # queued while the ack was on its way
    queue.restore(taken)  # the ack failed: a and b are older than c and d
    assert (queue.dropped, queue.take(3)) == (1, [b, c, d])


def test_a_queue_of_limit_zero_keeps_nothing() -> None:
    queue = SettleQueue(0)
    queue.add(ids(2))
    queue.restore(ids(1))
    assert (len(queue), queue.dropped, queue.limit) == (0, 3, 0)
    with pytest.raises(ValueError):
        SettleQueue(-1)


def test_client_options_bound_the_queue() -> None:
    assert ClientOptions().settle_backlog == DEFAULT_SETTLE_BACKLOG == 10_000
    assert ClientOptions(settle_backlog=0).settle_backlog == 0  # settling off
    with pytest.raises(UsageError):
        ClientOptions(settle_backlog=-1)


def test_the_two_parts_of_a_message_add_up() -> None:
    peers = Accepted((("bob", 1),), ())  # the peers' part, sealed: nothing to settle
    own = Accepted((("alice", 2),), (b"o" * 16,))
    assert peers + own == Accepted((("bob", 1), ("alice", 2)), (b"o" * 16,))


# -- the client: what its acks carry -----------------------------------------------------


def ready(client: Client) -> bool:
    """The client holds a sender certificate (its first key maintenance ran)."""
    return client._outbox.sealing.certificate() is not None


def knows(client: Client, user: str) -> bool:
    """The client holds ``user``'s access key (it can write to them without its name)."""
    return client._outbox.sealing.peer_key(user) is not None


def sender_of(relay: Relay, mid: bytes) -> str:
    """The sender column of a message the relay holds (read-only, WAL-aware)."""
    conn = sqlite3.connect(f"file:{relay.data_dir / DB_NAME}?mode=ro", uri=True)
    try:
        (row,) = conn.execute("SELECT sender FROM messages WHERE msg_id = ?", (mid,))
        return str(row[0])
    finally:
        conn.close()


@dataclasses.dataclass
class AckCall:
    ids: list[bytes]
    settled: list[bytes]
    #: What ``observe`` returned when the ack was made (the sender's committed state).
    seen: Any
    ok: bool = True


class Recording(TransportLink):
    """The real link, recording every send and ack. While :attr:`failing`, an ack fails as a
    lost connection would; otherwise its deliveries' ids go on to the relay (``settled`` is
    only recorded: these tests hold whatever the relay does with it)."""

    failing = False

    def __init__(self, signer: DeviceSigner, urls: Sequence[str]) -> None:
        super().__init__(signer, urls)
        self.acks: list[AckCall] = []
        self.sends: list[bytes] = []
        self.observe: Callable[[], Any] = lambda: None

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> None:
        self.sends.append(message_id)
        await super().send(message_id, recipients, body, after=after)

    async def ack(self, ids: Sequence[bytes], *, settled: Sequence[bytes] = ()) -> None:
        call = AckCall(list(ids), list(settled), self.observe())
        self.acks.append(call)
        if self.failing:
            call.ok = False
            raise ConnectionLost("ack lost")
        if ids:
            await super().ack(ids)

    def settled(self, mid: bytes) -> list[AckCall]:
        """The successful acks that settled ``mid``."""
        return [c for c in self.acks if c.ok and mid in c.settled]


async def reopen(tmp_path: Path, name: str, options: ClientOptions) -> tuple[Client, Recording]:
    """Open a registered client's data directory again, over a :class:`Recording` link."""
    links: list[Recording] = []

    def factory(signer: DeviceSigner, urls: Sequence[str]) -> Recording:
        links.append(Recording(signer, urls))
        return links[-1]

    client = await Client.open(tmp_path / name, options=options, link_factory=factory)
    return client, links[0]


def status(client: Client, mid: str) -> str | None:
    message = client.history.message(mid)
    return None if message is None else message.status


async def until(check: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# Our name on every send: whether a send goes sealed depends on the access keys the contacts
# exchanged, which these tests do not want to depend on (the sealed case has its own test).
NAMED = dataclasses.replace(
    ClientOptions(backoff_base=0.02, backoff_max=0.1, expiry_interval=0.05, ack_delay=0.005),
    sealed_sender=False,
)


async def test_a_sent_message_is_settled_after_its_commit_on_an_ack_of_its_own(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """Alice only sends (nothing arrives for her to acknowledge): her message's id still goes
    to the relay to settle, on an ack of its own, ``ack_delay`` after the "sent" commit."""
    await make_client("bob")  # registered, never started: nothing comes back to alice
    await (await make_client("alice", options=NAMED)).close()
    options = dataclasses.replace(NAMED, ack_delay=0.3)
    alice, link = await reopen(tmp_path, "alice", options)
    loop = asyncio.get_running_loop()
    async with alice:
        mid = await alice.send_text("bob", "hello", wait=True)
        committed_at = loop.time()
        link.observe = lambda: (status(alice, mid), loop.time())
        await until(lambda: bool(link.settled(bytes.fromhex(mid))))
    (call,) = link.settled(bytes.fromhex(mid))
    seen_status, called_at = call.seen
    assert seen_status == "sent"  # committed before the relay was told
    assert call.ids == [] and call.settled == [bytes.fromhex(mid)]
    assert called_at - committed_at >= 0.25  # waited ack_delay for company, as acks do
    assert link.sends == [bytes.fromhex(mid)]


async def test_settled_ids_ride_on_the_next_delivery_ack_and_outlive_a_lost_one(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    """An ack that does not reach the relay keeps what it carried; the next one carries the
    deliveries to acknowledge and the sends to settle together."""
    bob = await make_client("bob", options=NAMED)
    await (await make_client("alice", options=NAMED)).close()
    alice, link = await reopen(tmp_path, "alice", NAMED)
    a_events = alice.events()
    link.failing = True
    async with alice, bob:
        sent = bytes.fromhex(await alice.send_text("bob", "one", wait=True))
        await until(lambda: any(sent in c.settled for c in link.acks))  # tried, lost
        hello = bytes.fromhex(await bob.send_text("alice", "hi alice"))
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await until(lambda: any(hello in c.ids for c in link.acks))  # tried, lost
        link.failing = False
        await bob.send_text("alice", "again")  # a delivery: alice acks again
        await until(lambda: any(c.ok for c in link.acks))
        first = next(c for c in link.acks if c.ok)
        assert hello in first.ids and sent in first.settled
        assert not any(c.ok for c in link.acks[: link.acks.index(first)])
        assert len(link.settled(sent)) == 1


class FailSentCommit:
    """Alice's SQLite connection: the first transaction that writes her outbox entry
    :attr:`mid` as "sent" fails at COMMIT, as SQLite reports a full disk; later ones pass.

    Failure injection at the one place the OS would inject it; the store's rollback, the
    client and the relay above it are the real thing.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.mid = ""
        self.failures = 0
        self._doomed = False

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self._doomed:
            self._doomed = False
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        params = args[0] if args else ()
        if not self.failures and "app_outbox" in sql and self.mid in params and "sent" in params:
            self._doomed = True
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_send_whose_sent_commit_failed_is_sent_again_and_settled_only_after(
    make_client: MakeClient, mailbox: Any, tmp_path: Path
) -> None:
    """The relay accepts the message, committing "sent" fails: the message stays queued and
    goes again under the same id, which the relay still recognises (it was not settled), so
    bob's mailbox holds it once. Its id is settled once, after the commit that stood."""
    await make_client("bob")
    await (await make_client("alice", options=NAMED)).close()
    alice, link = await reopen(tmp_path, "alice", NAMED)
    disk = FailSentCommit(alice._store._conn)
    alice._store._conn = disk  # type: ignore[assignment]
    # Composed before the client starts (only committed to the outbox, not sent yet).
    disk.mid = await alice.send_text("bob", "stored once", wait=False)
    mid = bytes.fromhex(disk.mid)
    link.observe = lambda: status(alice, disk.mid)
    async with alice:
        await until(lambda: bool(link.settled(mid)))
        assert await alice.flush(WAIT) == 0
    assert disk.failures == 1
    assert link.sends.count(mid) == 2  # accepted, commit failed, sent again: same id
    assert [c.seen for c in link.acks if mid in c.settled] == ["sent"]
    assert [d.id for d in await mailbox("bob")] == [mid]


async def test_a_message_sent_without_our_name_is_never_settled(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    """Settling a sealed send from alice's device would tell the relay who sent it. A message
    to a contact whose access key she holds goes sealed and is never settled; one to a
    stranger goes with her name and is."""
    alice, bob = await make_client("alice"), await make_client("bob")
    await make_client("carol")  # a stranger to alice: no access key, so her name goes
    b_events, a_events = bob.events(), alice.events()
    async with alice, bob:
        await until(lambda: ready(alice) and ready(bob))
        await alice.send_text("bob", "hi bob")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await bob.send_text("alice", "hi alice")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert knows(alice, "bob")
    await bob.close()
    alice, link = await reopen(tmp_path, "alice", fast_options)
    async with alice:
        await until(lambda: ready(alice))
        sealed = bytes.fromhex(await alice.send_text("bob", "sealed", wait=True))
        assert is_sealed_sender(sender_of(relay, sealed), 0)  # bob is offline: it waits
        named = bytes.fromhex(await alice.send_text("carol", "named", wait=True))
        await until(lambda: bool(link.settled(named)))  # later than the sealed one's would be
    assert sealed not in link.sends  # it went as PUT /v1/messages/sealed
    assert not any(sealed in c.settled for c in link.acks)


# -- end to end: the relay forgets -------------------------------------------------------
# These need a relay that takes ``settled`` (docs/relay-api.md, the ack frame).


def retry_records(relay: Relay) -> int:
    """The relay's de-duplication records (``blindpost-relay admin stats``)."""
    return int(collect_stats(relay.data_dir)["dedupe_records"])


def queued_deliveries(relay: Relay) -> int:
    return int(collect_stats(relay.data_dir)["queued_deliveries"])


@pytest.mark.parametrize("backlog", [DEFAULT_SETTLE_BACKLOG, 0])
async def test_settled_sends_leave_no_retry_record_at_the_relay(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, backlog: int
) -> None:
    """Alice and bob write to each other (messages and delivered receipts, all with their
    names). Once everything is delivered, the relay keeps a retry record of none of it; with
    settling off (backlog 0) it keeps one per message until its window ends."""
    options = dataclasses.replace(NAMED, settle_backlog=backlog)
    alice = await make_client("alice", options=options)  # over the SDK's own link
    bob = await make_client("bob", options=options)
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        for i in range(3):
            await alice.send_text("bob", f"to bob {i}")
        await bob.send_text("alice", "to alice")
        for _ in range(3):
            await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)

        async def delivered() -> bool:
            return queued_deliveries(relay) == 0

        assert await eventually(delivered)
        if backlog:

            async def forgotten() -> bool:
                return retry_records(relay) == 0

            assert await eventually(forgotten)
        else:  # every message was acked (none queued), so each left its record
            assert retry_records(relay) >= 4  # the four messages, and receipts


async def test_a_send_only_client_settles_over_http(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay
) -> None:
    """A client without a live connection still settles what it sends, over HTTP."""
    alice = await make_client("alice", options=NAMED)
    bob = await make_client("bob", options=NAMED)
    b_events = bob.events()
    async with bob:
        await alice.start(receive=False)
        try:
            for i in range(3):
                await alice.send_text("bob", f"from a sender {i}", wait=True)
            for _ in range(3):
                await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)

            async def forgotten() -> bool:
                # Bob's receipts wait in alice's mailbox (she never receives), settled by bob.
                return retry_records(relay) == 0

            assert await eventually(forgotten)
        finally:
            await alice.close()
