"""The client facade against a real relay process: every conversation feature.

Real clients (own data directories, real SQLite files, the real transport) talk
through ``python -m relay`` on loopback, one relay per test. What the relay holds is
read the way a device would read it (its mailbox, with its own key); a restart is a
real stop and start of the process; a message the relay "loses" is one taken out of
the recipient's mailbox with the recipient's own key while its client is off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay, eventually, http_as, reinstall_device

from e2ee.client import Client
from e2ee.client_errors import IdentityHeld, UnknownRecipient
from e2ee.events import (
    ConnectionStateChanged,
    DecryptionProblem,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    ReceiptUpdated,
    Typing,
)
from e2ee.history import direct_chat_id, group_chat_id
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import ConnectionLost
from e2ee.transport.frames import Delivery

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
Mailbox = Callable[..., Awaitable[list[Delivery]]]
Signers = dict[tuple[str, int], DeviceSigner]


async def test_text_message_is_sent_received_delivered_and_read(
    make_client: MakeClient, wait_for: WaitFor, mailbox: Mailbox
) -> None:
    alice = await make_client("alice")
    bob = await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        mid = await alice.send_text("bob", "hello bob")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "hello bob" and got.message.sender == "alice"
        assert got.message.id == mid and got.message.chat_id == direct_chat_id("alice")
        delivered = await wait_for(
            a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "delivered"
        )
        assert (delivered.message_id, delivered.user) == (mid, "bob")
        assert await bob.mark_read(direct_chat_id("alice")) == 1
        read = await wait_for(
            a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read"
        )
        assert read.message_id == mid
        stored = alice.history.message(mid)
        assert stored is not None and stored.status == "read"
        assert alice.history.receipts(mid) == {("bob", 1): "read"}
        # And the reply goes the other way, quoting it.
        reply = await bob.send_text("alice", "hi alice", reply_to=mid)
        back = await wait_for(a_events, lambda e: isinstance(e, MessageReceived))
        assert back.message.id == reply and back.message.reply_to == mid
        assert back.message.quote_text == "hello bob"
        b_events2 = b_events
        await wait_for(
            b_events2,
            lambda e: (
                isinstance(e, ReceiptUpdated) and e.status == "delivered" and e.message_id == reply
            ),
        )
    assert await mailbox("bob") == [] and await mailbox("alice") == []


async def test_read_receipts_can_be_turned_off(make_client: MakeClient, wait_for: WaitFor) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await bob.set_read_receipts(False)
        mid = await alice.send_text("bob", "one")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        await wait_for(
            a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "delivered"
        )
        await bob.mark_read(direct_chat_id("alice"))
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(
                a_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read", 0.3
            )
        stored = alice.history.message(mid)
        assert stored is not None and stored.status == "delivered"


async def test_offline_outbox_goes_out_in_order_on_reconnect(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    # Alice composes while not connected at all: the relay is down.
    await asyncio.to_thread(relay.stop)
    async with alice:
        ids = [await alice.send_text("bob", f"m{i}", wait=False) for i in range(5)]
        await asyncio.sleep(0.05)
        assert await alice.queued_count() == 5  # none accepted, none lost
        statuses = [m.status for m in alice.history.messages(direct_chat_id("bob"))]
        assert statuses == ["pending"] * 5
        await asyncio.to_thread(relay.start)
        async with bob:
            texts = []
            for _ in range(5):
                event = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
                texts.append(event.message.text)
            assert texts == [f"m{i}" for i in range(5)]
            assert [m.id for m in bob.history.messages(direct_chat_id("alice"))] == ids
        assert await alice.queued_count() == 0


async def test_recipient_offline_then_back(
    make_client: MakeClient, wait_for: WaitFor, mailbox: Mailbox
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice:
        sent = [await alice.send_text("bob", f"while you were away {i}") for i in range(3)]
    assert [d.id for d in await mailbox("bob")] == [bytes.fromhex(m) for m in sent]
    b_events = bob.events()
    async with bob:
        for i in range(3):
            event = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
            assert event.message.text == f"while you were away {i}"

        async def acknowledged() -> bool:
            return await mailbox("bob") == []

        assert await eventually(acknowledged)  # while still connected, not only at close


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_relay_restart_mid_conversation(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, crash: bool
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await alice.send_text("bob", "before")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        await asyncio.to_thread(relay.restart, crash=crash)  # same port, same data
        await wait_for(
            a_events, lambda e: isinstance(e, ConnectionStateChanged) and e.state == "offline"
        )
        await alice.send_text("bob", "after")  # waits for the reconnect
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "after"


async def test_crash_between_decrypt_and_ack_shows_nothing_twice(
    make_client: MakeClient,
    wait_for: WaitFor,
    mailbox: Mailbox,
    tmp_path: Path,
    fast_options: Any,
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice:
        mid = await alice.send_text("bob", "exactly once")
    b_events = bob.events()

    async def lost_ack(ids: Any, **kw: Any) -> None:  # the process dies before the ack is sent
        raise ConnectionLost("crash")

    bob._link.ack = lost_ack  # type: ignore[method-assign]
    async with bob:
        first = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert first.message.text == "exactly once"
    # Committed locally, never acknowledged: the relay still holds it.
    assert [d.id for d in await mailbox("bob")] == [bytes.fromhex(mid)]
    bob2 = await Client.open(tmp_path / "bob", options=fast_options)
    events2 = bob2.events()

    async def acknowledged() -> bool:
        return await mailbox("bob") == []

    try:
        async with bob2:
            assert await eventually(acknowledged)  # redelivered, recognised, acknowledged
            texts = [m.text for m in bob2.history.messages(direct_chat_id("alice"))]
            assert texts == ["exactly once"]
        seen = [e async for e in events2]
        assert not any(isinstance(e, MessageReceived) for e in seen)
    finally:
        await bob2.close()


async def test_gap_detected_when_relay_drops_a_message(
    make_client: MakeClient,
    wait_for: WaitFor,
    relay: Relay,
    signers: Signers,
    tmp_path: Path,
    fast_options: Any,
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice:
        async with bob:
            await alice.send_text("bob", "one")
            await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        # While Bob's client is off, the relay loses the next two messages: they are
        # taken out of his mailbox (read and acknowledged with his device's key), so
        # the relay never delivers them, exactly as if it had dropped them.
        dropped = [
            await alice.send_text("bob", "two (dropped)"),
            await alice.send_text("bob", "three (dropped)"),
        ]
        async with http_as(relay, signers["bob", 1]) as as_bob:
            waiting = [d.id async for d in as_bob.fetch_all_messages()]
            assert waiting == [bytes.fromhex(m) for m in dropped]
            assert await as_bob.ack(waiting) == 2
        await alice.send_text("bob", "four")
    bob2 = await Client.open(tmp_path / "bob", options=fast_options)
    events = bob2.events()
    try:
        async with bob2:
            gap = await wait_for(events, lambda e: isinstance(e, GapDetected))
            assert (gap.user, gap.missed, gap.chat_id) == ("alice", 2, direct_chat_id("alice"))
            await wait_for(events, lambda e: isinstance(e, MessageReceived))
    finally:
        await bob2.close()
    # The gap is recorded in the chat, just before the message that revealed it, and it
    # is still there when the app opens the data directory again.
    bob3 = await Client.open(tmp_path / "bob", options=fast_options)
    try:
        shown = [(m.type, m.text) for m in bob3.history.messages(direct_chat_id("alice"))]
        assert shown == [
            ("text", "one"),
            ("gap", "2 messages from alice never arrived"),
            ("text", "four"),
        ]
        assert gap.notice is not None and gap.notice.type == "gap"
        assert bob3.history.message(gap.notice.id) == gap.notice
        # A notice is neither unread nor the chat's preview.
        (summary,) = bob3.history.chat_summaries()
        assert summary.unread == 2 and summary.last_message is not None
        assert summary.last_message.text == "four"
    finally:
        await bob3.close()


async def test_typing_reactions_edit_delete(make_client: MakeClient, wait_for: WaitFor) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.wait_connected()
        await alice.send_typing("bob", True)
        typing = await wait_for(b_events, lambda e: isinstance(e, Typing))
        assert typing.user == "alice" and typing.typing
        mid = await alice.send_text("bob", "helo")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        await alice.edit(mid, "hello")
        await wait_for(b_events, lambda e: isinstance(e, MessageChanged) and e.change == "edited")
        edited = bob.history.message(mid)
        assert edited is not None and edited.text == "hello" and edited.edited
        a_events = alice.events()
        await bob.react(mid, "👍")
        await wait_for(a_events, lambda e: isinstance(e, MessageChanged) and e.change == "reaction")
        assert alice.history.reactions(mid) == {"bob": "👍"}
        await alice.delete_for_everyone(mid)
        await wait_for(b_events, lambda e: isinstance(e, MessageChanged) and e.change == "deleted")
        gone = bob.history.message(mid)
        assert gone is not None and gone.deleted and gone.text is None
        assert bob.history.search("hello") == []


async def test_only_the_author_can_edit(make_client: MakeClient, wait_for: WaitFor) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice, bob:
        b_events = bob.events()
        mid = await alice.send_text("bob", "mine")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        from e2ee.errors import UsageError

        with pytest.raises(UsageError):
            await bob.edit(mid, "yours now")


async def test_disappearing_timer_clears_both_sides(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await alice.set_disappearing_timer("bob", 1)
        await wait_for(
            b_events, lambda e: isinstance(e, MessageReceived) and e.message.type == "timer"
        )
        chats = {c.id: c for c in bob.history.chats()}
        assert chats[direct_chat_id("alice")].timer_seconds == 1
        mid = await alice.send_text("bob", "self destruct")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert bob.history.search("destruct")
        await wait_for(
            b_events, lambda e: isinstance(e, MessageChanged) and e.change == "expired", 3
        )
        await wait_for(
            a_events, lambda e: isinstance(e, MessageChanged) and e.change == "expired", 3
        )
        assert bob.history.message(mid) is None and alice.history.message(mid) is None
        assert bob.history.search("destruct") == []


async def test_media_round_trip_and_forward(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, relay: Relay
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    source = tmp_path / "cat.png"
    source.write_bytes(b"\x89PNG" + bytes(range(256)) * 3000)
    b_events, c_events = bob.events(), carol.events()
    async with alice, bob, carol:
        mid = await alice.send_file("bob", source, caption="look")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.type == "attachment" and got.message.text == "look"
        out = await bob.download_attachment(mid, tmp_path / "got.png")
        assert out.read_bytes() == source.read_bytes()
        blobs = relay.blob_files()
        stored = relay.metrics()["blindpost_relay_blob_bytes"]
        assert len(blobs) == 1
        fwd = await bob.forward_attachment(mid, "carol")
        await wait_for(c_events, lambda e: isinstance(e, MessageReceived))
        assert relay.blob_files() == blobs  # no second upload
        assert relay.metrics()["blindpost_relay_blob_bytes"] == stored
        out2 = await carol.download_attachment(fwd, tmp_path / "fwd.png")
        assert out2.read_bytes() == source.read_bytes()
        # A blob tampered with on the relay's disk is refused with a typed error and
        # leaves no file.
        [blob] = blobs
        data = bytearray(blob.read_bytes())
        data[100] ^= 1
        blob.write_bytes(bytes(data))
        from e2ee.media import MediaCorrupt

        with pytest.raises(MediaCorrupt):
            await carol.download_attachment(fwd, tmp_path / "bad.png")
        assert not (tmp_path / "bad.png").exists()


async def test_group_lifecycle_and_removed_member_reads_nothing(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    a_events, b_events, c_events = alice.events(), bob.events(), carol.events()
    async with alice, bob, carol:
        gid = await alice.create_group("friends", ["bob", "carol"])
        created = await wait_for(c_events, lambda e: isinstance(e, GroupChanged))
        assert created.action == "create" and created.members == ("alice", "bob", "carol")
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged))
        await alice.send_text(group_chat_id(gid), "hi all")
        for events in (b_events, c_events):
            got = await wait_for(events, lambda e: isinstance(e, MessageReceived))
            assert got.message.text == "hi all" and got.message.chat_id == group_chat_id(gid)
        await bob.send_text(group_chat_id(gid), "hi from bob")
        got = await wait_for(c_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "hi from bob"
        # Bob is not an admin: he cannot remove carol.
        from e2ee.client_errors import NotAdmin

        with pytest.raises(NotAdmin):
            await bob.remove_member(gid, "carol")
        await alice.remove_member(gid, "carol")
        removed = await wait_for(c_events, lambda e: isinstance(e, GroupChanged))
        assert removed.action == "remove" and "carol" not in removed.members
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged) and e.action == "remove")
        await alice.send_text(group_chat_id(gid), "carol cannot read this")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "carol cannot read this"
        await bob.send_text(group_chat_id(gid), "nor this")
        await asyncio.sleep(0.2)
        texts = [m.text for m in carol.history.messages(group_chat_id(gid))]
        assert "carol cannot read this" not in texts and "nor this" not in texts
        await alice.rename_group(gid, "best friends")
        renamed = await wait_for(b_events, lambda e: isinstance(e, GroupChanged))
        assert renamed.name == "best friends"
        await bob.leave_group(gid)
        left = await wait_for(
            a_events, lambda e: isinstance(e, GroupChanged) and e.action == "leave"
        )
        assert left.members == ("alice",)


async def test_key_change_holds_sending_until_accepted(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, signers: Signers
) -> None:
    from e2ee.store import Changes

    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice:
        async with bob:
            await alice.send_text("bob", "first")
            await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        # Bob reinstalls: a new identity key under the same address (bob.1).
        old_bob = signers["bob", 1]
        new_bob = await make_client("bob", register=False, directory="bob-reinstalled")
        await reinstall_device(relay, old_bob, signers["bob", 1].public_key)
        # The name is Bob's already: the new installation only uploads its keys.
        await asyncio.to_thread(
            new_bob._store.commit, Changes(meta_put={"sdk.account_created": "1"})
        )
        await new_bob.register()
        nb_events = new_bob.events()
        async with new_bob:
            await new_bob.send_text("alice", "it's me, new phone")
            changed = await wait_for(a_events, lambda e: isinstance(e, IdentityChanged))
            assert (changed.user, changed.first_use, changed.held) == ("bob", False, True)
            got = await wait_for(a_events, lambda e: isinstance(e, MessageReceived))
            assert got.message.text == "it's me, new phone"  # shown, but flagged above
            assert await alice.trust_level("bob") == {1: "untrusted"}
            # Nothing goes to the new key until Alice accepts it.
            with pytest.raises(IdentityHeld):
                await alice.send_text("bob", "held until accepted")
            await asyncio.sleep(0.1)
            assert not any(
                m.text == "held until accepted"
                for m in new_bob.history.messages(direct_chat_id("alice"))
            )
            await alice.accept_identity("bob")
            released = await wait_for(nb_events, lambda e: isinstance(e, MessageReceived))
            assert released.message.text == "held until accepted"
            assert await alice.trust_level("bob") == {1: "tofu"}


async def test_strict_mode_holds_first_contact_until_verified(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice = await make_client("alice", strict_trust=True)
    bob = await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        with pytest.raises(IdentityHeld):
            await alice.send_text("bob", "hello?")
        held = await wait_for(a_events, lambda e: isinstance(e, IdentityChanged))
        assert held.user == "bob" and held.held
        numbers = await alice.safety_number("bob")
        assert len(numbers[0][1].digits) == 60
        await alice.verify("bob")  # after comparing the safety number
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "hello?"
        assert await alice.trust_level("bob") == {1: "verified"}


async def test_decryption_problem_is_reported_and_repaired(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "one")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        # Corrupt the next ciphertext in transit (the relay stores and delivers it as is).
        orig_send = alice._link.send

        async def corrupting(mid: bytes, recipients: Any, body: bytes) -> None:
            await orig_send(mid, recipients, body[:-3] + bytes(3))
            alice._link.send = orig_send  # type: ignore[method-assign]

        alice._link.send = corrupting  # type: ignore[method-assign]
        await alice.send_text("bob", "mangled")
        problem = await wait_for(b_events, lambda e: isinstance(e, DecryptionProblem))
        assert problem.user == "alice" and problem.repair == "session_reset"
        assert "mangled" not in problem.explanation
        await alice.send_text("bob", "after repair")
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "after repair"
        # Recorded in the chat where it happened, between the two readable messages.
        shown = [(m.type, m.text) for m in bob.history.messages(direct_chat_id("alice"))]
        assert problem.notice is not None
        assert shown == [
            ("text", "one"),
            ("undecryptable", problem.notice.text),
            ("text", "after repair"),
        ]
        assert problem.notice.text is not None and "could not be read" in problem.notice.text
        assert "mangled" not in problem.notice.text


async def test_identity_change_event_on_first_contact(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "hi")
        first = await wait_for(b_events, lambda e: isinstance(e, IdentityChanged))
        assert first.first_use and not first.held
        numbers = await bob.safety_number("alice")
        mine = await alice.safety_number("bob")
        assert numbers[0][1].digits == mine[0][1].digits
        assert mine[0][1].matches_scanned(numbers[0][1].scannable)
        await bob.verify("alice")
        assert await bob.trust_level("alice") == {1: "verified"}


async def test_added_member_joins_and_reads_new_messages(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    b_events, c_events = bob.events(), carol.events()
    async with alice, bob, carol:
        gid = await alice.create_group("pair", ["bob"])
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged))
        await alice.send_text(group_chat_id(gid), "before carol")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        await alice.add_member(gid, "carol")
        joined = await wait_for(c_events, lambda e: isinstance(e, GroupChanged))
        assert joined.action == "add" and joined.members == ("alice", "bob", "carol")
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged) and e.action == "add")
        await bob.send_text(group_chat_id(gid), "welcome carol")
        got = await wait_for(c_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "welcome carol" and got.message.sender == "bob"
        # Nothing from before she joined; the change that added her is kept (who, what).
        shown = [(m.type, m.sender, m.text) for m in carol.history.messages(group_chat_id(gid))]
        assert shown == [("group", "alice", "added carol"), ("text", "bob", "welcome carol")]
        # A non-admin's forged change is ignored by everyone.
        from e2ee.payload import GroupAction, GroupControl, PayloadType

        forged = GroupControl(
            GroupAction.REMOVE,
            name="pair",
            members=("bob", "carol"),
            admins=("bob",),
            revision=99,
            targets=("alice",),
        )
        await bob._outbox.queue(
            group_chat_id(gid),
            PayloadType.GROUP,
            wait=True,
            group=forged,
            group_targets=["alice", "carol"],
        )
        await asyncio.sleep(0.2)
        assert carol.history.group_members(gid) == {
            "alice": "admin",
            "bob": "member",
            "carol": "member",
        }


async def test_prekeys_replenished_on_connect_without_user_action(
    make_client: MakeClient, relay: Relay, signers: Signers
) -> None:
    await make_client("alice")
    bob = await make_client("bob")
    async with http_as(relay, signers["bob", 1]) as as_bob:
        # Others started sessions with Bob and used up all but three of his one-time
        # prekeys (each bundle fetch hands one out, once).
        async with http_as(relay, signers["alice", 1]) as as_alice:
            for _ in range(await as_bob.key_count() - 3):
                await as_alice.fetch_bundles("bob")
        assert await as_bob.key_count() == 3

        async def replenished() -> bool:
            return await as_bob.key_count() > 3

        async with bob:
            await bob.wait_connected()
            assert await eventually(replenished)
        assert await as_bob.key_count() >= 100  # a new batch was generated and uploaded


async def test_one_process_per_data_directory(
    make_client: MakeClient, tmp_path: Path, relay: Relay
) -> None:
    from e2ee.client_errors import StoreLocked

    alice = await make_client("alice")
    with pytest.raises(StoreLocked):
        await Client.open(tmp_path / "alice")
    await alice.close()
    # The lock went with the first client.
    again = await Client.open(tmp_path / "alice")
    assert again.username == "alice" and again.is_registered
    assert again.relay_url == relay.url
    await again.close()


async def test_every_held_message_fails_its_waiter_with_its_id(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice = await make_client("alice", strict_trust=True)
    await make_client("bob")
    async with alice:
        with pytest.raises(IdentityHeld) as first:
            await alice.send_text("bob", "one")
        with pytest.raises(IdentityHeld) as second:
            await alice.send_text("bob", "two")  # queued behind the first: also told
        assert first.value.message_id != second.value.message_id
        assert {first.value.user, second.value.user} == {"bob"}
        pending = [m.text for m in alice.history.messages(direct_chat_id("bob"))]
        assert pending == ["one", "two"]


async def test_own_fingerprint_is_our_half_of_every_safety_number(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "hi")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        [(_, number)] = await bob.safety_number("alice")
        assert alice.fingerprint in (number.digits[:30], number.digits[30:])
        assert bob.fingerprint in (number.digits[:30], number.digits[30:])
        assert alice.fingerprint != bob.fingerprint and len(alice.identity_key) == 33


async def test_failed_open_releases_the_directory(tmp_path: Path) -> None:
    from e2ee.errors import UsageError
    from e2ee.store.sealing import KdfLimits

    # A relay URL the transport refuses (not the relay's root) is refused before anything
    # is created.
    bad_url = "http://127.0.0.1:1/api"
    with pytest.raises(UsageError, match="relay's root"):
        await Client.create(tmp_path / "alice", "alice", bad_url, kdf_limits=KdfLimits(1, 8192))
    client = await Client.create(
        tmp_path / "alice", "alice", "http://127.0.0.1:1", kdf_limits=KdfLimits(1, 8192)
    )
    await client.close()

    # A link that cannot be built: opening fails after the directory was locked.
    def refuse(signer: object, urls: object) -> Any:
        raise UsageError("no link today")

    with pytest.raises(UsageError, match="no link today"):  # not StoreLocked: open let go
        await Client.open(tmp_path / "alice", link_factory=refuse)
    with pytest.raises(UsageError, match="no link today"):  # again: nothing leaked
        await Client.open(tmp_path / "alice", link_factory=refuse)
    reopened = await Client.open(tmp_path / "alice")
    await reopened.close()


async def test_backlog_drained_and_flush(
    make_client: MakeClient, wait_for: WaitFor, mailbox: Mailbox
) -> None:
    from e2ee.events import BacklogDrained

    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice:
        for i in range(3):
            await alice.send_text("bob", f"backlog {i}", wait=False)
        assert await alice.flush(timeout=5) == 0  # all three accepted by the relay
    b_events = bob.events()
    async with bob:
        drained = await wait_for(b_events, lambda e: isinstance(e, BacklogDrained))
        assert drained.processed == 3
        assert len(bob.history.messages(direct_chat_id("alice"))) == 3
        assert await bob.flush(timeout=5) == 0  # delivered receipts went out
    assert 1 <= len(await mailbox("alice")) <= 3  # delivered receipts, batched


async def test_groups_contacts_and_attachment_info_listings(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    source = tmp_path / "notes.txt"
    source.write_text("secret notes")
    async with alice, bob:
        gid = await alice.create_group("duo", ["bob"])
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged))
        mid = await alice.send_file("bob", source)
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        [group] = await bob.groups()
        assert (group.id, group.name, group.members, group.admins, group.member) == (
            gid,
            "duo",
            ("alice", "bob"),
            ("alice",),
            True,
        )
        contacts = await bob.contacts()
        assert contacts == {"alice": {1: "tofu"}}
        info = bob.history.attachment_info(mid)
        assert info is not None and info.file_name == "notes.txt" and info.size == 12
        assert info.mime_type == "text/plain" and info.available
        assert "key" not in repr(info).lower()


async def test_group_with_an_unknown_member_is_not_created(make_client: MakeClient) -> None:
    alice, _bob = await make_client("alice"), await make_client("bob")
    async with alice:
        with pytest.raises(UnknownRecipient):
            await alice.create_group("team", ["bob", "nosuchuser"])
        assert await alice.groups() == []
