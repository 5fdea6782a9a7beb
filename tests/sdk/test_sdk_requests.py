"""What the CLI and the TUI asked of the facade (design notes in docs/cli.md, docs/tui.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from e2ee.client import Client
from e2ee.client_errors import IdentityHeld
from e2ee.errors import UsageError
from e2ee.events import GroupChanged, MessageReceived, MessageStored, ReceiptUpdated
from e2ee.history import direct_chat_id
from e2ee.transport.frames import Delivery

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
Mailbox = Callable[..., Awaitable[list[Delivery]]]


async def test_a_send_only_client_sends_and_leaves_deliveries_on_the_relay(
    make_client: MakeClient, wait_for: WaitFor, mailbox: Mailbox, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    async with bob:
        first = await bob.send_text("alice", "for alice's receiver")
        gid = await bob.create_group("team", ["alice"])
    waiting = await mailbox("alice")
    assert len(waiting) == 2  # a message and a group change wait for alice
    await alice.start(receive=False)
    await alice.wait_connected()
    mid = await alice.send_text("bob", "sent by a one-shot command")
    assert await alice.flush(timeout=5) == 0
    await alice.close()
    assert await mailbox("alice") == waiting  # nothing taken from alice's mailbox
    assert alice_history_is_empty(tmp_path)
    bob2 = await Client.open(tmp_path / "bob", options=fast_options)
    b_events = bob2.events()
    async with bob2:
        got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.id == mid
        await bob2.flush(timeout=5)  # the delivered receipt goes to alice's mailbox
    # The next receiving client gets everything, receipts for alice's message included.
    again = await Client.open(tmp_path / "alice", options=fast_options)
    events = again.events()
    async with again:
        received = await wait_for(events, lambda e: isinstance(e, MessageReceived))
        assert received.message.id == first
        changed = await wait_for(events, lambda e: isinstance(e, GroupChanged))
        assert changed.group_id == gid
        receipt = await wait_for(
            events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "delivered"
        )
        assert receipt.message_id == mid


def alice_history_is_empty(tmp_path: Path) -> bool:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "alice" / "blindpost.db")
    try:
        return conn.execute("SELECT count(*) FROM app_messages WHERE outgoing = 0").fetchone() == (
            0,
        )
    finally:
        conn.close()


async def test_chat_summaries_count_unread_and_show_the_newest_message(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        for i in range(3):
            await alice.send_text("bob", f"unread {i}")
        for _ in range(3):
            await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        [summary] = bob.history.chat_summaries()
        assert (summary.chat.id, summary.unread) == (direct_chat_id("alice"), 3)
        assert summary.last_message is not None and summary.last_message.text == "unread 2"
        assert await bob.mark_read(direct_chat_id("alice")) == 3
        assert bob.history.chat_summaries()[0].unread == 0
        assert await bob.mark_read(direct_chat_id("alice")) == 0  # nothing left to mark
        reply = await bob.send_text("alice", "read them")
        newest = bob.history.chat_summaries()[0].last_message
        assert newest is not None and newest.id == reply


async def test_held_users_survive_a_restart_until_accepted(
    make_client: MakeClient, tmp_path: Path, fast_options: Any
) -> None:
    alice = await make_client("alice", strict_trust=True)
    await make_client("bob")
    async with alice:
        with pytest.raises(IdentityHeld):
            await alice.send_text("bob", "held: bob's key is not accepted yet")
        assert await alice.held_users() == {"bob"}
        assert await alice.queued_count() == 1
    again = await Client.open(tmp_path / "alice", options=fast_options)
    try:
        assert await again.held_users() == {"bob"}  # read from the store, not memory
        await again.accept_identity("bob")
        assert await again.held_users() == set()
        async with again:
            await again.flush(timeout=5)
            assert await again.queued_count() == 0
    finally:
        await again.close()


async def test_queued_count_counts_messages_not_receipts(make_client: MakeClient) -> None:
    alice = await make_client("alice")
    await make_client("bob")
    await alice.send_text("bob", "one", wait=False)
    await alice.send_text("bob", "two", wait=False)
    assert await alice.queued_count() == 2
    async with alice:
        assert await alice.flush(timeout=5) == 0
        assert await alice.queued_count() == 0


async def test_own_messages_are_announced_when_stored(make_client: MakeClient) -> None:
    alice = await make_client("alice")
    await make_client("bob")
    events = alice.events()
    mid = await alice.send_text("bob", "queued while offline", wait=False)
    stored = await events.__anext__()
    assert isinstance(stored, MessageStored)
    assert (stored.message.id, stored.message.outgoing, stored.message.status) == (
        mid,
        True,
        "pending",
    )


async def test_pages_after_and_around_a_message(make_client: MakeClient) -> None:
    alice = await make_client("alice")
    await make_client("bob")
    ids = [await alice.send_text("bob", f"m{i}", wait=False) for i in range(10)]
    chat = direct_chat_id("bob")
    history = alice.history
    assert [m.id for m in history.messages(chat, after=ids[2], limit=3)] == ids[3:6]
    assert [m.id for m in history.messages(chat, after=ids[8], limit=5)] == ids[9:]
    assert [m.id for m in history.messages(chat, around=ids[5], limit=4)] == ids[3:7]
    assert [m.id for m in history.messages(chat, around=ids[0], limit=3)] == ids[0:3]
    assert [m.id for m in history.messages(chat, before=ids[2], limit=5)] == ids[0:2]
    with pytest.raises(UsageError):
        history.messages(chat, before=ids[1], after=ids[2])
    with pytest.raises(UsageError):
        history.messages(direct_chat_id("carol"), around=ids[1])
