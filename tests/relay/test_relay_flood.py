"""Mailbox flood at the sender's maximum rate (issue 13), performed against a real relay process:
one account floods a victim from several devices at once, over WebSockets and HTTP, while a
second sender writes to the same victim.

What a user relies on: the second sender's messages are all accepted and delivered; the flooding
account, whatever the number of its devices, is refused with 429 (Retry-After) beyond its
account-wide budget (``account_send_*``) or beyond its share of the write queue
(``account_max_inflight_sends``); nothing refused is stored, everything accepted is delivered.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from relay_testclient import Device, RelayClient, b64, drain_until_empty, new_mid

from relay.store.base import Envelope, StoredMessage
from relay.wire import decode_deliver, encode_send

# Shares and mailbox quotas far above the flood, so only the send limits can refuse it.
BIG_SHARES = {
    "mailbox_max_messages": "100000",
    "mailbox_sender_max_messages": "100000",
    "mailbox_stranger_max_messages": "100000",
}


async def pipeline(
    ws: aiohttp.ClientWebSocketResponse, victim: Device, n: int, body: bytes
) -> dict[str, dict[str, Any]]:
    """Write ``n`` SENDs without waiting, then collect every send_result (by message id)."""
    mids = [new_mid() for _ in range(n)]
    for mid in mids:
        await ws.send_bytes(encode_send(Envelope(mid, (victim.addr,), body)))
    results: dict[str, dict[str, Any]] = {}
    while len(results) < n:
        msg = await ws.receive(timeout=60)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        doc = json.loads(msg.data)
        if doc.get("type") == "send_result":
            results[doc["id"]] = doc
    assert set(results) == {b64(m) for m in mids}
    return results


async def open_ws(client: RelayClient, dev: Device) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws(dev)
    await drain_until_empty(ws)
    return ws


async def receive_from(ws: aiohttp.ClientWebSocketResponse, expected: int) -> list[StoredMessage]:
    """Receive until ``expected`` messages arrived; then check that no more come."""
    got: list[StoredMessage] = []
    while len(got) < expected:
        msg = await ws.receive(timeout=30)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        got.append(decode_deliver(msg.data))
    try:
        extra = await ws.receive(timeout=0.5)
    except TimeoutError:
        return got
    raise AssertionError(f"more than the accepted messages arrived: {extra}")


async def test_an_account_flooding_from_many_devices_is_refused_429_and_alice_gets_through(
    relay_factory, session
) -> None:
    """Three devices of one account pipeline sends to bob over WebSockets while a fourth sends
    over HTTP: together they get exactly the account's burst accepted (the per-device rate,
    4,000 per device, would have let all of them through) and 429 with Retry-After for the
    rest. Alice, sending to bob at the same time, has every message accepted and delivered,
    and bob receives exactly the accepted messages."""
    burst = 12
    relay = relay_factory(
        {**BIG_SHARES, "account_send_rate": "0.001", "account_send_burst": str(burst)}
    )
    client = RelayClient(relay.url, session)
    bob = await client.new_device("bob")
    alice = await client.new_device("alice")
    flood = await client.new_device("flood")
    devices = [flood] + [await client.add_device(flood, n) for n in (2, 3, 4)]
    sockets = [await open_ws(client, dev) for dev in devices[:3]]
    alice_ws = await open_ws(client, alice)

    async def http_flood() -> list[int]:
        statuses = []
        for _ in range(8):
            r = await client.send_binary(devices[3], [bob], b"flood")
            if r.status == 429:
                assert r.json()["error"] == "rate_limited"
                assert int(r.headers["Retry-After"]) >= 1
            statuses.append(r.status)
        return statuses

    *ws_results, http_statuses, alice_results = await asyncio.wait_for(
        asyncio.gather(
            *(pipeline(ws, bob, 8, b"flood") for ws in sockets),
            http_flood(),
            pipeline(alice_ws, bob, 10, b"hello"),
        ),
        120,
    )
    ws_statuses = [doc["status"] for results in ws_results for doc in results.values()]
    for results in ws_results:
        for doc in results.values():
            if doc["status"] == 429:
                assert doc["error"] == "rate_limited" and doc["retry_after"] >= 1
    statuses = ws_statuses + http_statuses
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) == burst
    assert statuses.count(429) == 4 * 8 - burst
    assert [doc["status"] for doc in alice_results.values()] == [200] * 10

    bob_ws = await client.ws(bob)
    got = await drain_until_empty(bob_ws, timeout=30)
    await bob_ws.close()
    assert sum(m.sender.user == alice.user for m in got) == 10
    assert sum(m.sender.user == flood.user for m in got) == burst
    assert {b64(m.message_id) for m in got if m.sender.user == alice.user} == set(alice_results)
    accepted_ws = {
        mid for results in ws_results for mid, doc in results.items() if doc["status"] == 200
    }
    assert accepted_ws <= {b64(m.message_id) for m in got}
    for ws in (*sockets, alice_ws):
        await ws.close()


async def test_one_account_cannot_fill_the_write_queue(relay_factory, session) -> None:
    """With commits paced slowly (a transaction at most every 1.5 s), a flooding account that
    pipelines from two devices holds at most account_max_inflight_sends sends in the write
    queue: the others are refused with 429 at once (never queued), while alice's sends, queued
    beside them, are all accepted; every accepted message is delivered, each once."""
    relay = relay_factory(
        {
            **BIG_SHARES,
            "account_max_inflight_sends": "3",
            "write_batch_interval_ms": "1500",
        }
    )
    client = RelayClient(relay.url, session)
    bob = await client.new_device("bob")
    alice = await client.new_device("alice")
    flood = await client.new_device("flood")
    second = await client.add_device(flood, 2)
    sockets = [await open_ws(client, dev) for dev in (flood, second)]
    alice_ws = await open_ws(client, alice)
    bob_ws = await open_ws(client, bob)

    *flood_results, alice_results = await asyncio.wait_for(
        asyncio.gather(
            *(pipeline(ws, bob, 6, b"flood") for ws in sockets),
            pipeline(alice_ws, bob, 3, b"hello"),
        ),
        120,
    )
    flood_docs = [doc for results in flood_results for doc in results.values()]
    refused = [doc for doc in flood_docs if doc["status"] != 200]
    assert refused, "the flood never met the in-flight bound"
    for doc in refused:
        assert doc["status"] == 429 and doc["error"] == "rate_limited", doc
        assert doc["retry_after"] >= 1 and "awaiting their commit" in doc["message"]
    assert [doc["status"] for doc in alice_results.values()] == [200] * 3
    accepted = set(alice_results) | {
        mid for results in flood_results for mid, doc in results.items() if doc["status"] == 200
    }
    got = await receive_from(bob_ws, len(accepted))
    assert sorted(b64(m.message_id) for m in got) == sorted(accepted)
    for ws in (*sockets, alice_ws, bob_ws):
        await ws.close()
