"""An honest client that writes faster than its account's send budget (``account_send_rate``)
loses nothing: the relay answers 429 with Retry-After, the SDK's outbox keeps the messages and
sends them as the budget refills, in order. Real clients, a real relay process."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_harness import LOOSE_LIMITS, RelayProcess

from e2ee.client import Client
from e2ee.events import MessageReceived

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    """A relay of its own with a tiny account send budget (2/s after 4)."""
    proc = RelayProcess(
        tmp_path / "relay",
        {**LOOSE_LIMITS, "account_send_rate": "2", "account_send_burst": "4"},
    ).start()
    yield proc
    proc.stop()


async def test_a_client_over_its_account_send_budget_loses_nothing(
    make_client: MakeClient, wait_for: WaitFor, relay: RelayProcess
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    texts = [f"message {i}" for i in range(12)]
    async with alice, bob:
        for text in texts:
            await alice.send_text("bob", text)
        got = []
        while len(got) < len(texts):
            event = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), 60)
            got.append(event.message.text)
    assert got == texts  # each once, in order
    with urllib.request.urlopen(relay.url + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    refused = re.search(r"^blindpost_relay_ws_sends_rate_limited_total (\d+)$", metrics, re.M)
    assert refused and int(refused.group(1)) >= 1, "the budget was never met"


async def test_pipelined_sends_over_the_budget_keep_their_order(
    make_client: MakeClient, wait_for: WaitFor, relay: RelayProcess
) -> None:
    """Queued together, the messages go out pipelined (several on the socket, each naming
    the one before it). The relay refuses one in the middle (429) with later ones in flight;
    those are refused too, and all of them go again in order as the budget refills: Bob
    gets each once, in order."""
    from e2ee.transport.errors import PredecessorMissing, RateLimited

    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    refused: dict[bytes, type[BaseException]] = {}
    send = alice._link.send

    async def recording(mid: bytes, recipients: Any, body: bytes, **kw: Any) -> None:
        try:
            await send(mid, recipients, body, **kw)
        except Exception as exc:
            refused.setdefault(mid, type(exc))
            raise

    alice._link.send = recording  # type: ignore[method-assign]
    texts = [f"message {i}" for i in range(12)]
    # Queued before alice starts: all twelve go out at once.
    ids = [await alice.send_text("bob", text, wait=False) for text in texts]
    async with alice, bob:
        got = []
        while len(got) < len(texts):
            event = await wait_for(b_events, lambda e: isinstance(e, MessageReceived), 60)
            got.append((event.message.id, event.message.text))
    assert got == list(zip(ids, texts, strict=True))  # each once, in order
    assert RateLimited in refused.values()
    first = min(ids.index(mid.hex()) for mid, kind in refused.items() if kind is RateLimited)
    behind = [refused.get(bytes.fromhex(mid)) for mid in ids[first + 1 :]]
    assert behind and all(kind in (PredecessorMissing, RateLimited) for kind in behind)
