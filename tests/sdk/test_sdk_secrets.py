"""Secrets and message text never reach a repr (STYLE.md principle 7)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from e2ee.client import Client, TransportLink
from e2ee.events import MessageReceived
from e2ee.history import direct_chat_id
from e2ee.transport.auth import DeviceSigner

MakeClient = Callable[..., Awaitable[Client]]


async def test_client_history_and_events_hide_text_and_keys(
    make_client: MakeClient, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "the launch code is 0000")
        event = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        for text in (repr(event), repr(event.message), repr(alice), repr(bob.history)):
            assert "launch code" not in text
        stored = bob.history.messages(direct_chat_id("alice"))
        assert stored[0].text == "the launch code is 0000"  # the data is there...
        assert "launch" not in repr(stored)  # ...but not in its repr


def test_transport_link_repr_has_no_key() -> None:
    seed = bytes(range(32))
    signer = DeviceSigner.from_seed(seed, "alice", 1)
    link = TransportLink(signer, "http://127.0.0.1:1")
    text = repr(link)
    assert seed.hex() not in text and "alice" in text
