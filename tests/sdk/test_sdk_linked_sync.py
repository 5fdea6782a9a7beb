"""Messaging across linked devices: real relay process, real clients, real SQLite files.

alice on two devices (the second linked with the SDK's own grant), bob and carol on one.
What a user relies on: a contact's message reaches both of alice's devices; what alice
sends from one device shows on the other as sent by her; reading on one device marks
it read on the other and the contact gets one read receipt; a group with a
multi-device member works both ways; trust decisions follow.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from e2ee import payload
from e2ee.client import Client, LinkGrant, NewDeviceKeys
from e2ee.client.sync import own_copy
from e2ee.errors import UsageError
from e2ee.events import (
    Event,
    GroupChanged,
    MessageChanged,
    MessageReceived,
    MessageStored,
    ReceiptUpdated,
)
from e2ee.messaging.rows import OutboxRow
from e2ee.payload import Payload, PayloadType
from e2ee.store.sealing import KdfLimits

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
WAIT = 15.0


async def link(alice: Client, folder: Path, options: Any) -> Client:
    """A second device of alice's account, from a grant (the linking flow's primitive)."""
    keys = NewDeviceKeys.generate()
    grant = LinkGrant.from_bytes((await alice.devices.add(keys.auth_key)).to_bytes())
    return await Client.link_device(folder, grant, keys, options=options, kdf_limits=FAST_KDF)


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for a condition on local state (no event says it), with a generous ceiling."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def introduced(device1: Client, device2: Client) -> None:
    """Device 2 met device 1 (its first connect sends a request device 1 sessions from)."""
    await device2.flush(WAIT)
    user = device1.username
    await until(lambda: device2._ctx.me.device_id in device1._ctx.engine.session_devices(user))


async def next_event(
    wait_for: WaitFor, events: AsyncIterator[Event], predicate: Callable[[Event], bool]
) -> Any:
    return await wait_for(events, predicate, WAIT)


async def test_both_devices_get_bobs_message_and_share_what_alice_sends(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await link(alice, tmp_path / "alice2", fast_options)
    events1, events2, bob_events = alice.events(), alice2.events(), bob.events()
    async with alice, alice2, bob:
        await introduced(alice, alice2)
        mid = await bob.send_text("alice", "to both of you")
        for events in (events1, events2):
            got = await next_event(wait_for, events, lambda e: isinstance(e, MessageReceived))
            assert (got.message.id, got.message.sender) == (mid, "bob")

        # alice writes from device 2: bob gets it, device 1 keeps it as sent by alice.
        sent = await alice2.send_text("bob", "from my laptop")
        got = await next_event(wait_for, bob_events, lambda e: isinstance(e, MessageReceived))
        assert (got.message.id, got.message.sender, got.message.text) == (
            sent,
            "alice",
            "from my laptop",
        )
        mine = await next_event(
            wait_for, events1, lambda e: isinstance(e, MessageStored) and e.message.id == sent
        )
        assert (mine.message.sender, mine.message.outgoing) == ("alice", True)
        row = alice.history.message(sent)
        assert row is not None
        assert (row.sender, row.outgoing, row.text, row.chat_id) == (
            "alice",
            True,
            "from my laptop",
            "dm:bob",
        )
        # bob's delivered receipt reaches both of alice's devices and moves it on each.
        for client, events in ((alice, events1), (alice2, events2)):
            await next_event(
                wait_for,
                events,
                lambda e: (
                    isinstance(e, ReceiptUpdated)
                    and e.message_id == sent
                    and e.status == "delivered"
                ),
            )
            found = client.history.message(sent)
            assert found is not None and found.status == "delivered"


async def test_reading_on_one_device_marks_read_on_the_other_and_sends_one_receipt(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await link(alice, tmp_path / "alice2", fast_options)
    events2, bob_events = alice2.events(), bob.events()
    async with alice, alice2, bob:
        await introduced(alice, alice2)
        mid = await bob.send_text("alice", "read me once")
        await until(lambda: alice.history.message(mid) is not None)
        await until(lambda: alice2.history.message(mid) is not None)

        assert await alice.mark_read("dm:bob") == 1
        changed = await next_event(
            wait_for, events2, lambda e: isinstance(e, MessageChanged) and e.change == "read"
        )
        assert changed.message_id == mid
        found = alice2.history.message(mid)
        assert found is not None and found.read_at is not None
        assert await alice2.mark_read("dm:bob") == 0  # nothing left unread there

        read = await next_event(
            wait_for, bob_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read"
        )
        assert (read.message_id, read.user, read.device) == (mid, "alice", 1)
        # Both devices said "delivered"; device 1 said "read".
        expected = {("alice", 1): "read", ("alice", 2): "delivered"}
        await until(lambda: bob.history.receipts(mid) == expected)
        # Device 2 sends nothing more about it: whatever it queued reaches bob before this
        # later message (one mailbox, in order), and the status stays "delivered".
        ping = await alice2.send_text("bob", "ping")
        await until(lambda: bob.history.message(ping) is not None)
        assert bob.history.receipts(mid) == expected


async def test_a_group_with_a_member_on_two_devices(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    events1, bob_events, carol_events = alice.events(), bob.events(), carol.events()
    async with alice, bob, carol:
        gid = await alice.create_group("climbers", ["bob", "carol"])
        # Linked after the group was made: device 2 learns it from device 1's answer.
        alice2 = await link(alice, tmp_path / "alice2", fast_options)
        events2 = alice2.events()
        async with alice2:
            await _group_with_two_devices(
                wait_for, alice, alice2, bob, gid, events1, events2, bob_events, carol_events
            )


async def _group_with_two_devices(
    wait_for: WaitFor,
    alice: Client,
    alice2: Client,
    bob: Client,
    gid: str,
    events1: AsyncIterator[Event],
    events2: AsyncIterator[Event],
    bob_events: AsyncIterator[Event],
    carol_events: AsyncIterator[Event],
) -> None:
    synced = await next_event(wait_for, events2, lambda e: isinstance(e, GroupChanged))
    assert (synced.group_id, synced.action) == (gid, "sync")
    assert set(synced.members) == {"alice", "bob", "carol"}
    await introduced(alice, alice2)

    # bob writes to the group: every device of every member reads it.
    mid = await bob.send_text(f"group:{gid}", "hello climbers")
    for events in (events1, events2, carol_events):
        got = await next_event(wait_for, events, lambda e: isinstance(e, MessageReceived))
        assert (got.message.id, got.message.text) == (mid, "hello climbers")

    # alice writes from device 2: bob and carol read it, device 1 keeps it as hers.
    sent = await alice2.send_text(f"group:{gid}", "from the laptop")
    for events in (bob_events, carol_events):
        got = await next_event(
            wait_for, events, lambda e: isinstance(e, MessageReceived) and e.message.id == sent
        )
        assert (got.message.sender, got.message.text) == ("alice", "from the laptop")
    mine = await next_event(
        wait_for, events1, lambda e: isinstance(e, MessageStored) and e.message.id == sent
    )
    assert (mine.message.sender, mine.message.outgoing, mine.message.chat_id) == (
        "alice",
        True,
        f"group:{gid}",
    )

    # A change made on device 1 reaches device 2 (membership syncs).
    await alice.remove_member(gid, "carol")
    changed = await next_event(
        wait_for, events2, lambda e: isinstance(e, GroupChanged) and e.action == "remove"
    )
    assert set(changed.members) == {"alice", "bob"}
    assert set(alice2.history.group_members(gid)) == {"alice", "bob"}


async def test_trust_decisions_follow_to_the_other_device(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await link(alice, tmp_path / "alice2", fast_options)
    async with alice, alice2, bob:
        await introduced(alice, alice2)
        mid = await bob.send_text("alice", "hi")
        await until(lambda: alice2.history.message(mid) is not None)
        assert (await alice2.contacts())["bob"] == {1: "tofu"}
        await alice.verify("bob")
        await alice.flush(WAIT)
        deadline = asyncio.get_running_loop().time() + WAIT
        while (await alice2.contacts())["bob"] != {1: "verified"}:
            assert asyncio.get_running_loop().time() < deadline, "trust did not follow"
            await asyncio.sleep(0.02)


async def test_a_new_device_gets_contacts_trust_and_timers_and_timers_follow(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice, bob:
        await alice.send_text("bob", "hello")
        await alice.verify("bob")
        await alice.set_disappearing_timer("bob", 3600)
        # Linked later: device 2 asks device 1 for our contacts at its first connect.
        alice2 = await link(alice, tmp_path / "alice2", fast_options)
        events2 = alice2.events()
        async with alice2:
            await until_async(lambda: _contact_is(alice2, "bob", {1: "verified"}))
            assert _timer(alice2, "bob") == 3600
            # A timer set on device 2 later reaches device 1 as a transcript.
            await alice2.set_disappearing_timer("bob", 60)
            await next_event(
                wait_for,
                events2,
                lambda e: isinstance(e, ReceiptUpdated) and e.status == "sent",
            )
            await until(lambda: _timer(alice, "bob") == 60)


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _contact_is(client: Client, user: str, expected: dict[int, str]) -> bool:
    return (await client.contacts()).get(user) == expected


def _timer(client: Client, user: str) -> int | None:
    chats = {c.id: c for c in client.history.chats()}
    chat = chats.get(f"dm:{user}")
    return None if chat is None else chat.timer_seconds


async def test_after_removing_our_other_device_read_marks_and_sends_go_on(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await link(alice, tmp_path / "alice2", fast_options)
    bob_events = bob.events()
    async with alice, bob:
        async with alice2:
            await introduced(alice, alice2)
        await alice.devices.remove(2)
        mid = await bob.send_text("alice", "read me")
        await until(lambda: alice.history.message(mid) is not None)
        # Device 1 still holds a session with device 2: the READ sync meets the relay's
        # answer that it is gone, drops the session and has nobody left to tell.
        assert await alice.mark_read("dm:bob") == 1
        assert await alice.flush(WAIT) == 0
        assert alice._ctx.engine.session_devices("alice") == []
        read = await next_event(
            wait_for, bob_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read"
        )
        assert read.message_id == mid
        sent = await alice.send_text("bob", "after the removal")
        got = await next_event(wait_for, bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.id == sent


def test_which_outbox_entries_our_devices_get_a_transcript_of() -> None:
    def entry(kind: PayloadType, mode: str = "pairwise", **kw: Any) -> OutboxRow:
        body = Payload(kind, os.urandom(16), 5, **kw)
        return OutboxRow(
            body.message_id.hex(),
            1,
            "dm:bob",
            mode,
            '["bob"]',
            kind=kind.name.lower(),
            payload=payload.encode(body),
        )

    text = entry(PayloadType.TEXT, text="hi")
    copy = own_copy(text)
    assert copy is not None
    decoded = payload.decode(copy)
    assert decoded.transcript is not None and decoded.transcript.to_user == "bob"
    assert decoded.transcript.content == payload.decode(text.payload or b"")
    assert own_copy(entry(PayloadType.TYPING, typing=True)) is None
    assert own_copy(entry(PayloadType.SESSION_RESET)) is None
    # A payload at the size limit has no room for the wrapping: recipients only.
    size = payload.MAX_PAYLOAD_BYTES
    while True:  # the longest text whose payload still fits
        try:
            huge = entry(PayloadType.TEXT, text="x" * size)
            break
        except UsageError:
            size -= 1
    assert own_copy(huge) is None
