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
