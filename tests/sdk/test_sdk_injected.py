"""Time and randomness are parameters of the client (STYLE.md, principle 4).

Message ids come from the injected ``random_bytes``; the reconnect delay comes
from the one reconnect policy (``Backoff``) with the injected ``jitter``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest
from sdk_relay import Relay

from e2ee.client import Client, ClientOptions
from e2ee.errors import UsageError
from e2ee.events import ConnectionStateChanged

MakeClient = Callable[..., Awaitable[Client]]


async def test_message_and_group_ids_come_from_the_injected_source(
    make_client: MakeClient,
) -> None:
    counter = itertools.count(1)

    def ids(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    await make_client("bob")
    alice = await make_client("alice", random_bytes=ids)
    mid = await alice.send_text("bob", "hello", wait=False)
    assert mid == (1).to_bytes(16, "big").hex()
    stored = await asyncio.to_thread(alice.history.message, mid)
    assert stored is not None and stored.text == "hello"


async def test_reconnect_delay_uses_backoff_with_the_injected_jitter(
    make_client: MakeClient, relay: Relay, wait_for: Callable[..., Awaitable[object]]
) -> None:
    alice = await make_client(
        "alice", jitter=lambda: 0.5, options=ClientOptions(backoff_base=0.2, backoff_max=0.4)
    )
    relay.stop()
    events = alice.events()
    await alice.start()
    offline = [
        await wait_for(
            events, lambda e: isinstance(e, ConnectionStateChanged) and e.state == "offline"
        )
        for _ in range(3)
    ]
    # Full jitter over min(cap, base * 2**(n-1)): 0.5 * (0.2, 0.4, 0.4).
    assert [e.retry_in for e in offline] == [0.1, 0.2, 0.2]  # type: ignore[attr-defined]


def test_client_options_refuse_a_backoff_that_cannot_work() -> None:
    with pytest.raises(UsageError):
        ClientOptions(backoff_base=0)
    with pytest.raises(UsageError):
        ClientOptions(backoff_base=2.0, backoff_max=1.0)
