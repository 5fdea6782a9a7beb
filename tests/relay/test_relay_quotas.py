"""Abuse limits of issue 13 (part B), each performing the attack against a real relay process:
mailbox flood, prekey drain, user enumeration, disk use."""

from __future__ import annotations

from relay_testclient import RelayClient, b64, drain_until_empty, new_mid, next_frame

from relay.store.base import Envelope
from relay.wire import encode_send

SHARES = {
    "mailbox_max_messages": "20",
    "mailbox_sender_max_messages": "8",
    "mailbox_stranger_max_messages": "5",
}


async def test_mailbox_flood_stops_at_the_senders_share_and_alice_gets_through(
    relay_factory, session
) -> None:
    """One account floods bob's mailbox: it stops at its (stranger) share with 507
    sender_share_exceeded, over HTTP and WebSocket alike, nothing of the refused sends is
    stored, and alice's messages are still accepted and delivered to bob."""
    relay = relay_factory(SHARES)
    client = RelayClient(relay.url, session)
    flooder = await client.new_device("flood")
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    accepted = refused = 0
    for _ in range(50):
        r = await client.send_binary(flooder, [bob], b"spam")
        if r.status == 200:
            accepted += 1
        else:
            assert r.status == 507, r.body
            assert r.json()["error"] == "sender_share_exceeded"
            assert r.json()["full"] == [{"user": bob.user, "device": 1}]
            refused += 1
    assert (accepted, refused) == (5, 45)
    ws = await client.ws(flooder)
    await drain_until_empty(ws)
    mid = new_mid()
    await ws.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"more spam")))
    res = await next_frame(ws)
    assert res["type"] == "send_result" and res["id"] == b64(mid)
    assert res["status"] == 507 and res["error"] == "sender_share_exceeded"
    await ws.close()

    hello = [new_mid() for _ in range(5)]
    for m in hello:
        assert (await client.send(alice, [bob], b"hello", m)).status == 200
    inbox = await client.ws(bob)
    got = await drain_until_empty(inbox)
    await inbox.close()
    assert [g.sender.user for g in got] == [flooder.user] * 5 + [alice.user] * 5
    assert [g.message_id for g in got][5:] == hello
    # Bob answers the flooder once: its share grows to the answered one (8), no further.
    assert (await client.send(bob, [flooder], b"stop it")).status == 200
    statuses = [(await client.send(flooder, [bob], b"spam")).status for _ in range(5)]
    assert statuses == [200, 200, 200, 507, 507]
