"""`blindpost` with alice on two devices: what she sends from one shows on the other as hers.

The second device is set up with the SDK's linking primitive (a grant from device 1,
``Client.link_device``), as the ``link`` command does; everything after that is the
installed command against a real relay process. The tests run in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cli_harness import Cli, Relay

from e2ee.client import Client, LinkGrant, NewDeviceKeys
from e2ee.store.sealing import KdfLimits

pytestmark = pytest.mark.timeout(120)


async def _link(cli: Cli) -> None:
    alice = await Client.open(cli.data("alice"))
    try:
        keys = NewDeviceKeys.generate()
        grant = LinkGrant.from_bytes((await alice.devices.add(keys.auth_key)).to_bytes())
    finally:
        await alice.close()
    second = await Client.link_device(
        cli.data("alice2"), grant, keys, kdf_limits=KdfLimits(opslimit=1, memlimit=8192)
    )
    await second.close()


@pytest.fixture(scope="module")
def accounts(cli: Cli, relay: Relay) -> None:
    cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    asyncio.run(_link(cli))
    # Device 2's first run meets device 1 (a request), device 1's run takes it in.
    cli("alice2", "receive", "--timeout", "1")
    cli("alice", "receive", "--timeout", "1")


def test_bobs_message_reaches_both_devices(cli: Cli, accounts: Any) -> None:
    mid = cli("bob", "send", "alice", "to both of you").last_word
    for device in ("alice", "alice2"):
        (message,) = cli(device, "receive", "--json").of_type("message")
        assert (message["id"], message["sender"], message["text"]) == (mid, "bob", "to both of you")


def test_sent_from_device_two_is_alices_on_device_one(cli: Cli, accounts: Any) -> None:
    mid = cli("alice2", "send", "bob", "from my laptop").last_word
    (got,) = cli("bob", "receive", "--json").of_type("message")
    assert (got["id"], got["sender"]) == (mid, "alice")
    shown = cli("alice", "receive", "--json").of_type("message")
    assert [(m["id"], m["sender"], m["sender_device"], m["outgoing"]) for m in shown] == [
        (mid, "alice", 2, True)
    ]
    history = cli("alice", "history", "bob", "--json").records
    mine = [m for m in history if m["id"] == mid]
    assert [(m["sender"], m["outgoing"], m["text"]) for m in mine] == [
        ("alice", True, "from my laptop")
    ]
    # bob's delivered receipt came to device 1 as well.
    assert mine[0]["status"] == "delivered"


def test_read_on_device_one_is_read_on_device_two_with_one_receipt(cli: Cli, accounts: Any) -> None:
    mid = cli("bob", "send", "alice", "read me once").last_word
    cli("alice", "receive", "--timeout", "1")
    cli("alice2", "receive", "--timeout", "1")
    # Both of bob's messages so far (the first one was never read).
    assert "marked 2 message(s) read" in cli("alice", "read", "bob").stdout
    cli("alice2", "receive", "--timeout", "1")
    unread_there = [m for m in cli("alice2", "history", "bob", "--json").records if m["id"] == mid]
    assert unread_there[0]["read_at"] is not None
    assert "marked 0 message(s) read" in cli("alice2", "read", "bob").stdout
    receipts = cli("bob", "receive", "--json").of_type("receipt")
    read = [r for r in receipts if r["status"] == "read" and mid in r["message_ids"]]
    assert [(r["sender"], r["device"]) for r in read] == [("alice", 1)]
