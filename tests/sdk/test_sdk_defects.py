"""Defects found in use (issue 15), each fixed and held here, with a real relay.

1. After a contact reinstalls and the user accepts the new key, the contact's
   first receive reported a gap of every message ever sent to them.
2. A full recipient mailbox (relay 507) made ``send`` retry until the caller's
   timeout; it now fails at once with a typed error.
3. Delete-for-everyone left the deleted text in replies quoting it.
4. A genuine message refused for its sender's decrypt work budget was
   acknowledged as unreadable (lost); it is now deferred and decrypted later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sdk_relay import Relay, reinstall_device

from e2ee.client import Client
from e2ee.client_errors import IdentityHeld, RecipientMailboxFull, SendFailed
from e2ee.events import GapDetected, IdentityChanged, MessageChanged, MessageReceived
from e2ee.history import direct_chat_id
from e2ee.store import Changes

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
Signers = dict[tuple[str, int], Any]


async def test_accepting_a_reinstalled_contact_reports_no_gap_to_them(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, signers: Signers
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events = alice.events()
    async with alice:
        async with bob:
            b_events = bob.events()
            for n in range(5):
                await alice.send_text("bob", f"old {n}")
            for _ in range(5):
                await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        # Bob reinstalls device 1: a new identity key under the same address.
        old_bob = signers["bob", 1]
        new_bob = await make_client("bob", register=False, directory="bob-reinstalled")
        await reinstall_device(relay, old_bob, signers["bob", 1].public_key)
        await asyncio.to_thread(
            new_bob._store.commit, Changes(meta_put={"sdk.account_created": "1"})
        )
        await new_bob.register()
        nb_events = new_bob.events()
        async with new_bob:
            await new_bob.send_text("alice", "new phone")
            await wait_for(a_events, lambda e: isinstance(e, IdentityChanged) and e.held)
            with pytest.raises(IdentityHeld):
                await alice.send_text("bob", "held until accepted")
            await alice.accept_identity("bob")
            first = await wait_for(
                nb_events, lambda e: isinstance(e, MessageReceived | GapDetected)
            )
            assert isinstance(first, MessageReceived), first  # no gap of 5 (or 6)
            assert first.message.text == "held until accepted"
            assert first.message.counter == 1
            await alice.send_text("bob", "and the next one")
            second = await wait_for(
                nb_events, lambda e: isinstance(e, MessageReceived | GapDetected)
            )
            assert isinstance(second, MessageReceived) and second.message.counter == 2
            chat = await asyncio.to_thread(new_bob.history.messages, direct_chat_id("alice"))
            assert [m.type for m in chat if not m.outgoing] == ["text", "text"]


async def test_a_full_mailbox_fails_the_send_with_a_typed_error(
    make_client: MakeClient, relay: Relay
) -> None:
    relay.settings["mailbox_max_messages"] = "2"
    relay.restart()
    alice = await make_client("alice")
    await make_client("bob")  # never receives: its mailbox fills up
    async with alice:
        await alice.send_text("bob", "one")
        await alice.send_text("bob", "two")
        # Bounded only so a regression (retrying forever) fails instead of hanging.
        with pytest.raises(RecipientMailboxFull) as raised:
            await asyncio.wait_for(alice.send_text("bob", "three"), 25)
        error = raised.value
        assert isinstance(error, SendFailed)  # `except SendFailed` keeps working
        assert error.full == (("bob", 1),)
        assert "mailbox of bob is full" in str(error)
        assert error.message_id is not None
        stored = await asyncio.to_thread(alice.history.message, error.message_id)
        assert stored is not None and stored.status == "failed"
        assert await alice.queued_count() == 0  # not retried behind the caller's back


async def test_delete_for_everyone_clears_the_quoted_text_on_both_sides(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        secret = await alice.send_text("bob", "a secret")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        reply = await bob.send_text("alice", "about that", reply_to=secret)
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived))
        own_reply = await alice.send_text("bob", "me too", reply_to=secret)
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        for client, mid in ((alice, reply), (alice, own_reply), (bob, reply)):
            quoted = await asyncio.to_thread(client.history.message, mid)
            assert quoted is not None and quoted.quote_text == "a secret"

        await alice.delete_for_everyone(secret)
        cleared = await wait_for(
            b_events, lambda e: isinstance(e, MessageChanged) and e.change == "quote_deleted"
        )
        assert cleared.message_id in (reply, own_reply)
        await wait_for(
            b_events,
            lambda e: (
                isinstance(e, MessageChanged)
                and e.change == "quote_deleted"
                and e.message_id != cleared.message_id
            ),
        )
        for client in (alice, bob):
            for mid in (reply, own_reply):
                found = await asyncio.to_thread(client.history.message, mid)
                assert found is not None and found.quote_text is None, (client, mid)
                assert found.reply_to == secret  # still a reply, without the text
            hits = await asyncio.to_thread(client.history.search, "secret")
            assert hits == []


async def test_a_message_refused_for_its_senders_work_budget_arrives_later(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    """A genuine message from a peer in debt (the core's decrypt work budget,
    issue 19) is not acknowledged as unreadable: it is decrypted once the
    budget has refilled, shown once, and no notice says it was lost."""
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice, bob:
        b_events = bob.events()
        await alice.send_text("bob", "first")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        # Put alice about one second of refill into debt on bob's side, as forged
        # messages in her name (from a hostile relay) would.
        engine = bob._ctx.engine
        now = bob._ctx.now_ms()
        meter = engine.budgets.admit("alice", now, 0)
        meter.used = int(engine.budgets.available("alice", now)) + engine.limits.work_refill_per_s
        engine.budgets.settle(meter, succeeded=False)
        assert engine.budgets.available("alice", now) < 0
        await alice.send_text("bob", "sent while in debt")
        got = await wait_for(
            b_events, lambda e: isinstance(e, MessageReceived | GapDetected), timeout=90
        )
        assert isinstance(got, MessageReceived), got
        assert got.message.text == "sent while in debt"
        chat = await asyncio.to_thread(bob.history.messages, direct_chat_id("alice"))
        assert [m.text for m in chat] == ["first", "sent while in debt"]
        assert all(m.type == "text" for m in chat)  # no undecryptable notice row
