"""Sealed sender for an account on several devices: real relay process, real clients, its
real SQLite files.

What a user relies on: alice on two devices writes to bob (and to a group), and the relay
holds no sender for the message bob gets; bob sees it as alice's, alice's other device gets
its copy, in order, each message once; a send interrupted between the two parts goes out
again without a duplicate.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay

from blindpost_wire.names import is_sealed_sender
from e2ee.client import Client, LinkGrant, NewDeviceKeys, TransportLink
from e2ee.client.sync import own_message_id
from e2ee.client_errors import ConnectionLost
from e2ee.events import MessageReceived, MessageStored
from e2ee.history import direct_chat_id, group_chat_id
from e2ee.messaging.rows import OutboxRow, from_columns
from e2ee.store.sealing import KdfLimits
from e2ee.transport.auth import DeviceSigner
from relay.integrity import DB_NAME

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
WAIT = 15.0
FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)

pytestmark = pytest.mark.timeout(240)


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def ready(client: Client) -> bool:
    return client._outbox.sealing.certificate() is not None


def knows(client: Client, user: str) -> bool:
    return client._outbox.sealing.peer_key(user) is not None


def queued(relay: Relay) -> list[tuple[bytes, str, str]]:
    """(message id, sender column, recipient user) of every message the relay holds."""
    conn = sqlite3.connect(f"file:{relay.data_dir / DB_NAME}?mode=ro", uri=True)
    try:
        return [
            (bytes(r[0]), r[1], r[2])
            for r in conn.execute(
                "SELECT m.msg_id, m.sender, u.username FROM messages m"
                " JOIN mailbox x ON x.msg_pk = m.pk JOIN devices d ON d.pk = x.device_pk"
                " JOIN users u ON u.pk = d.user_pk"
            )
        ]
    finally:
        conn.close()


async def link(alice: Client, folder: Path, options: Any) -> Client:
    keys = NewDeviceKeys.generate()
    grant = LinkGrant.from_bytes((await alice.devices.add(keys.auth_key)).to_bytes())
    return await Client.link_device(folder, grant, keys, options=options, kdf_limits=FAST_KDF)


async def texts_received(events: AsyncIterator[Any], wait_for: WaitFor, n: int) -> list[Any]:
    got = []
    for _ in range(n):
        got.append(await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT))
    return got


async def contacts(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, options: Any, *names: str
) -> tuple[Client, Client, list[Client]]:
    """alice on two devices and ``names`` on one, all contacts of alice (keys exchanged).
    Returns them started (the caller closes them)."""
    alice = await make_client("alice")
    alice2 = await link(alice, tmp_path / "alice2", options)
    others = [await make_client(n) for n in names]
    for client in (alice, alice2, *others):
        await client.start()
    await until(lambda: all(ready(c) for c in (alice, *others)))
    await alice2.flush(WAIT)
    await until(lambda: 2 in alice._ctx.engine.session_devices("alice"))
    for other in others:
        events = other.events()
        await alice.send_text(other.username, f"hi {other.username}")
        await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
        a_events = alice.events()
        await other.send_text("alice", "hi alice")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived), WAIT)
    await until(lambda: all(knows(alice, o.username) for o in others))
    return alice, alice2, others


def no_sender_for(rows: Sequence[tuple[bytes, str, str]], mid: bytes, users: set[str]) -> None:
    """The message ``mid`` is held for ``users`` under a sealed pseudonym, never as alice's;
    alice's other device's part is held under its own id, unlinkable to ``mid``."""
    for_them = [(s, u) for m, s, u in rows if m == mid]
    assert {u for _, u in for_them} == users, rows
    assert all(is_sealed_sender(s, 0) for s, _ in for_them), for_them
    own = [(s, u) for m, s, u in rows if m == own_message_id(mid)]
    assert own == [("alice", "alice")], rows


async def test_a_multi_device_sender_is_hidden_and_her_other_device_keeps_up(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    alice, alice2, (bob, carol) = await contacts(
        make_client, wait_for, tmp_path, fast_options, "bob", "carol"
    )
    gid = await alice.create_group("club", ["bob", "carol"])
    await alice.send_text(group_chat_id(gid), "group hello")
    await alice.flush(WAIT)
    # Everyone but alice's first device goes offline: what she sends now waits on the relay.
    for client in (alice2, bob, carol):
        await client.close()
    log_mark = len(relay.log_text())
    texts = [f"sealed {i}" for i in range(5)]
    mids = [await alice.send_text("bob", text) for text in texts]
    group_mid = await alice.send_text(group_chat_id(gid), "sealed group")
    assert await alice.flush(WAIT) == 0
    rows = queued(relay)
    for mid in mids:
        no_sender_for(rows, bytes.fromhex(mid), {"bob"})
    no_sender_for(rows, bytes.fromhex(group_mid), {"bob", "carol"})
    assert gid.encode() not in relay.data_dir.joinpath(DB_NAME).read_bytes()
    # In the relay's log: one sealed PUT per message to the contacts, naming nobody; alice's
    # name only on her own socket's lines (the relay sees who is online).
    lines = relay.log_text()[log_mark:].splitlines()
    assert sum("/v1/messages/sealed" in line for line in lines) == len(mids) + 1
    naming = [line for line in lines if "alice" in line]
    assert all(" ws " in f" {line} " for line in naming), naming

    # Bob gets them as alice's, in order, once each; so does the group.
    bob = await Client.open(tmp_path / "bob", options=fast_options)
    b_events = bob.events()
    async with bob:
        got = await texts_received(b_events, wait_for, len(texts) + 1)
        assert [(g.message.sender, g.message.text) for g in got] == [
            ("alice", t) for t in [*texts, "sealed group"]
        ]
        history = [m.text for m in bob.history.messages(direct_chat_id("alice"))]
        assert history == ["hi bob", "hi alice", *texts]
    # alice's other device gets her copies: sent by her, in order, each once.
    alice2 = await Client.open(tmp_path / "alice2", options=fast_options)
    a2_events = alice2.events()
    async with alice2:
        await wait_for(
            a2_events,
            lambda e: isinstance(e, MessageStored) and e.message.id == group_mid,
            WAIT,
        )
        mine = [m for m in alice2.history.messages(direct_chat_id("bob")) if m.outgoing]
        assert [(m.text, m.sender) for m in mine] == [(t, "alice") for t in ["hi bob", *texts]]
        in_group = [m.text for m in alice2.history.messages(group_chat_id(gid))]
        assert in_group[-2:] == ["group hello", "sealed group"]
    await alice.close()


class CutBeforeOwnPart(TransportLink):
    """A connection that breaks, while ``armed``, right after the relay accepted the
    contacts' part of a message: the part for alice's own other device never leaves."""

    armed = True
    cuts = 0  # own parts cut so far

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> None:
        if CutBeforeOwnPart.armed and {u for u, _ in recipients} == {"alice"}:
            CutBeforeOwnPart.cuts += 1
            raise ConnectionLost("gone between the two parts")
        await super().send(message_id, recipients, body, after=after)


async def test_a_send_cut_between_its_two_parts_goes_again_without_a_duplicate(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    alice, alice2, (bob,) = await contacts(make_client, wait_for, tmp_path, fast_options, "bob")
    await alice.close()

    def cut(signer: DeviceSigner, urls: Sequence[str]) -> TransportLink:
        return CutBeforeOwnPart(signer, urls)

    b_events, a2_events = bob.events(), alice2.events()
    alice = await Client.open(tmp_path / "alice", options=fast_options, link_factory=cut)
    async with alice:
        await until(lambda: alice.connected)
        mid = await alice.send_text("bob", "cut in two", wait=False)
        # Bob has it (the first part was accepted, and again on every retry, under the
        # same id); the entry stays queued: alice's other device has no copy yet.
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.id == mid
        await until(lambda: CutBeforeOwnPart.cuts >= 2)  # at least one retry of the entry
        queued_ids = [from_columns(OutboxRow, r).id for r in alice.history.pending_outbox()]
        assert mid in queued_ids
        assert alice2.history.message(mid) is None
    CutBeforeOwnPart.armed = False
    # alice restarts (her entry still queued): both parts go again under the same ids.
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    async with alice:
        assert await alice.flush(WAIT) == 0
        mine = await wait_for(
            a2_events, lambda e: isinstance(e, MessageStored) and e.message.id == mid, WAIT
        )
        assert mine.message.text == "cut in two"
        after = await alice.send_text("bob", "after the cut")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.text == "after the cut"
        # alice's other device gets its copy as a message of its own, after bob's part.
        await wait_for(
            a2_events, lambda e: isinstance(e, MessageStored) and e.message.id == after, WAIT
        )
    texts = [m.text for m in bob.history.messages(direct_chat_id("alice")) if not m.outgoing]
    assert texts == ["hi bob", "cut in two", "after the cut"]
    mine = [m.text for m in alice2.history.messages(direct_chat_id("bob")) if m.outgoing]
    assert mine == ["hi bob", "cut in two", "after the cut"]
    await bob.close()
    await alice2.close()


async def test_a_contact_writes_unnamed_to_an_account_on_two_devices(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    alice, alice2, (bob,) = await contacts(make_client, wait_for, tmp_path, fast_options, "bob")
    for client in (alice, alice2):
        await client.close()
    mid = await bob.send_text("alice", "to both of alice's devices")
    senders = {s for m, s, _ in queued(relay) if m == bytes.fromhex(mid)}
    await bob.close()
    assert senders and all(is_sealed_sender(s, 0) for s in senders), senders


async def test_a_rotation_on_one_device_reaches_the_other(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    """alice rotates her access key on one device: her next message gives bob the new key and
    her other device its copy, carrying the key too, so bob's messages to her go unnamed."""
    alice, alice2, (bob,) = await contacts(make_client, wait_for, tmp_path, fast_options, "bob")
    old = alice._outbox.sealing.access_key()
    assert old == alice2._outbox.sealing.access_key()  # one key for the account
    await alice.sealed.rotate_access_key()
    assert alice._outbox.sealing.access_key() != old
    a2_events, b_events = alice2.events(), bob.events()
    sent = await alice.send_text("bob", "my new key rides along")
    await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
    await wait_for(a2_events, lambda e: isinstance(e, MessageStored) and e.message.id == sent, WAIT)
    assert alice2._outbox.sealing.access_key() == alice._outbox.sealing.access_key()
    # alice2 refreshes (it registers the same verifier again) and writes to bob too.
    await alice2._outbox.sealing.refresh()
    await alice2.send_text("bob", "from the laptop")
    await wait_for(b_events, lambda e: isinstance(e, MessageReceived), WAIT)
    for client in (alice, alice2):
        await client.close()
    mid = await bob.send_text("alice", "unnamed to both devices")
    senders = {s for m, s, _ in queued(relay) if m == bytes.fromhex(mid)}
    await bob.close()
    assert senders and all(is_sealed_sender(s, 0) for s in senders), senders
