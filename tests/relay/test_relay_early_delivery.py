"""Early delivery: an online recipient gets a message as soon as its send is checked, while the
transaction that stores it is still open; the sender's 200 still waits for the commit.

What a user relies on (docs/delivery.md): the sender's 200 / ``send_result`` 200 means stored
durably; a recipient may get a message that its relay then failed to store (the commit failed,
or the relay died before it), and then gets it again, with the same message id, when the
sender resends it; nothing the relay answered with 200 is lost; an acknowledged message is not
delivered again once the ack is answered; seqs only increase, also across a crash.

Each test holds a transaction open on purpose: with ``write_batch_interval_ms`` a write that
comes within the interval after the previous commit started is staged (and pushed) at once but
committed at the interval's end, so "before the commit" is seconds long, not a race.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from relay_harness import RelayProcess
from relay_testclient import (
    Device,
    RelayClient,
    b64,
    drain_until_empty,
    new_mid,
    next_frame,
)

from relay.store.base import Envelope, StoredMessage
from relay.wire import encode_send

HELD_MS = "10000"  # a transaction that takes a write inside this interval stays open this long
# The paced relays record no last-seen times: a device's first request in a period writes one
# in the background, and that write would start a pacing window of its own before the test's.
HELD = {"write_batch_interval_ms": HELD_MS, "device_seen_granularity_seconds": "0"}
CEILING = 60.0
DISK_LIMIT = 1024 * 1024  # RLIMIT_FSIZE of the relay process (test_relay_disk_full.py)


async def _open(client: RelayClient, dev: Device) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws(dev, heartbeat=None)
    assert await drain_until_empty(ws) == []
    return ws


async def _frames(ws: aiohttp.ClientWebSocketResponse, name: str, log: list[Any]) -> None:
    """Append every frame of ``ws`` to ``log`` as (name, frame), in arrival order."""
    while True:
        frame = await next_frame(ws, CEILING)
        if isinstance(frame, aiohttp.WSMessage):
            return
        log.append((name, frame))


async def _until(log: list[Any], want: Callable[[Any], bool]) -> Any:
    for _ in range(int(CEILING * 20)):
        for entry in log:
            if want(entry):
                return entry
        await asyncio.sleep(0.05)
    raise AssertionError(f"not seen: {log}")


def _delivered(name: str, mid: bytes) -> Callable[[Any], bool]:
    return lambda e: e[0] == name and isinstance(e[1], StoredMessage) and e[1].message_id == mid


def _answered(name: str, kind: str, key: str, value: str) -> Callable[[Any], bool]:
    return lambda e: (
        e[0] == name and isinstance(e[1], dict) and e[1].get("type") == kind and e[1][key] == value
    )


async def test_recipient_gets_it_before_the_commit_and_its_ack_rides_along(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory(HELD)
    client = RelayClient(relay.url, session)
    alice, bob = await client.new_device("alice"), await client.new_device("bob")
    # The first write after an idle interval commits at once; it starts the interval.
    assert (await client.send(alice, [bob], b"first")).status == 200
    alice_ws, bob_ws = await _open(client, alice), await client.ws(bob, heartbeat=None)
    assert [m.body for m in await drain_until_empty(bob_ws)] == [b"first"]
    log: list[Any] = []
    readers = [
        asyncio.ensure_future(_frames(alice_ws, "alice", log)),
        asyncio.ensure_future(_frames(bob_ws, "bob", log)),
    ]
    try:
        mid = new_mid()
        await alice_ws.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"early")))
        _, got = await _until(log, _delivered("bob", mid))
        # Pushed from the open transaction: bob acks it before alice has her answer.
        await bob_ws.send_str(json.dumps({"type": "ack", "ids": [b64(mid)], "ref": "r1"}))
        await _until(log, _answered("alice", "send_result", "id", b64(mid)))
        await _until(log, _answered("bob", "acked", "ref", "r1"))
        order = [(name, f.get("type") if isinstance(f, dict) else "deliver") for name, f in log]
        assert order.index(("bob", "deliver")) < order.index(("alice", "send_result")), order
        result = next(f for name, f in log if name == "alice")
        acked = next(f for name, f in log if name == "bob" and isinstance(f, dict))
        assert result["status"] == 200 and acked["count"] == 1, (result, acked)
        assert got.body == b"early" and got.sender.user == alice.user
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    await bob_ws.close()
    await alice_ws.close()
    # Committed and acknowledged in one transaction: a new connection gets only the first.
    again = await client.ws(bob)
    assert [m.body for m in await drain_until_empty(again)] == [b"first"]
    await again.close()


async def test_a_crash_before_the_commit_means_a_resend_with_a_higher_seq(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Bob got m2 early and acknowledged m1 and m2, all in the open transaction; the relay dies
    before its commit. Alice never got her 200 for m2 and resends it with the same id: bob gets
    m1 again (its ack was never stored) with its seq, and m2 again with a seq above every seq
    he saw before; once acknowledged, nothing is left and nothing comes again."""
    data = tmp_path / "crash"
    relay = relay_factory(HELD, data)
    client = RelayClient(relay.url, session)
    alice, bob = await client.new_device("alice"), await client.new_device("bob")
    bob_ws = await _open(client, bob)
    m1, m2 = new_mid(), new_mid()
    assert (await client.send(alice, [bob], b"one", m1)).status == 200  # commits at once
    first = await next_frame(bob_ws, CEILING)
    assert isinstance(first, StoredMessage) and first.message_id == m1
    pending = asyncio.ensure_future(client.send(alice, [bob], b"two", m2))  # held open
    second = await next_frame(bob_ws, CEILING)
    assert isinstance(second, StoredMessage) and second.message_id == m2
    assert second.seq > first.seq
    await bob_ws.send_str(json.dumps({"type": "ack", "ids": [b64(m1), b64(m2)], "ref": "r"}))
    relay.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(relay.proc.wait, 10)
    outcome = await asyncio.gather(pending, return_exceptions=True)
    assert isinstance(outcome[0], BaseException), outcome  # no 200 for m2
    frame = await bob_ws.receive(timeout=CEILING)
    assert frame.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )

    relay = relay_factory(None, data)
    client = RelayClient(relay.url, session)
    bob_ws = await client.ws(bob, heartbeat=None)
    backlog = await drain_until_empty(bob_ws)
    assert [(m.message_id, m.seq) for m in backlog] == [(m1, first.seq)]
    assert (await client.send(alice, [bob], b"two", m2)).status == 200
    again = await next_frame(bob_ws, CEILING)
    assert isinstance(again, StoredMessage) and again.message_id == m2 and again.body == b"two"
    assert again.seq > second.seq
    await bob_ws.send_str(json.dumps({"type": "ack", "ids": [b64(m1), b64(m2)], "ref": "r"}))
    acked = await next_frame(bob_ws, CEILING)
    assert acked == {"type": "acked", "ref": "r", "count": 2}
    await bob_ws.close()
    last = await client.ws(bob)
    assert await drain_until_empty(last) == []
    await last.close()
    assert "Traceback" not in relay.log_text()


async def test_a_failed_commit_after_the_push_is_a_503_and_the_resend_comes_again(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    """The disk fills (the relay's RLIMIT_FSIZE, as in test_relay_disk_full.py): a message
    already pushed to bob fails to commit and alice gets 503. Bob's ack of it changes nothing
    stored; alice's resend with the same id, once there is room, is stored, delivered again and
    acknowledged: everything alice got a 200 for reaches bob, and the mailbox ends empty."""
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice, bob = await client.new_device("alice"), await client.new_device("bob")
    bob_ws = await _open(client, bob)
    pid = relay.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (DISK_LIMIT, hard))
    accepted: list[bytes] = []
    failed: bytes | None = None
    try:
        for _ in range(60):
            mid = new_mid()
            reply = await client.send(alice, [bob], os.urandom(200_000), mid)
            if reply.status != 200:
                assert reply.status == 503, reply.body
                failed = mid
                break
            accepted.append(mid)
        assert failed is not None
        seen: list[StoredMessage] = []
        while failed not in {m.message_id for m in seen}:
            frame = await next_frame(bob_ws, CEILING)
            assert isinstance(frame, StoredMessage), frame
            seen.append(frame)
        # Pushed before its commit failed; bob acknowledges everything he got.
        await bob_ws.send_str(
            json.dumps({"type": "ack", "ids": [b64(m.message_id) for m in seen], "ref": "a"})
        )
        answer = await next_frame(bob_ws, CEILING)
        assert isinstance(answer, dict) and answer["type"] in ("acked", "error"), answer
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    for _ in range(int(CEILING * 10)):  # room again once the readiness probe commits
        async with session.get(relay.url + "/healthz/ready") as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.1)
    if answer["type"] == "error":  # that ack failed with the disk: send it again
        await bob_ws.send_str(
            json.dumps({"type": "ack", "ids": [b64(m) for m in accepted], "ref": "b"})
        )
        answer = await next_frame(bob_ws, CEILING)
        assert answer == {"type": "acked", "ref": "b", "count": len(accepted)}, answer
    else:
        assert answer["count"] == len(accepted), answer  # the failed one was never stored
    assert (await client.send(alice, [bob], b"resent", failed)).status == 200
    again = await next_frame(bob_ws, CEILING)
    assert isinstance(again, StoredMessage) and again.message_id == failed
    assert again.seq > max(m.seq for m in seen)
    await bob_ws.send_str(json.dumps({"type": "ack", "ids": [b64(failed)], "ref": "c"}))
    assert await next_frame(bob_ws, CEILING) == {"type": "acked", "ref": "c", "count": 1}
    await bob_ws.close()
    last = await client.ws(bob)
    assert await drain_until_empty(last) == []
    await last.close()
    assert "Traceback" not in relay.log_text()


async def test_a_large_fan_out_waits_for_its_commit_and_later_pushes_keep_seq_order(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A message to more than 64 devices is pushed after its commit (its sender is answered
    first, as before early delivery); a 1:1 message sent right after it, in the same open
    transaction, to one of those devices does not overtake it: each socket still gets its
    frames in increasing seq."""
    data = tmp_path / "fanout"
    setup = relay_factory(None, data)  # 66 registrations, committed without pacing
    client = RelayClient(setup.url, session)
    alice = await client.new_device("alice")
    crowd = [await client.new_device("crowd") for _ in range(65)]
    setup.stop()
    relay = relay_factory(HELD, data)
    client = RelayClient(relay.url, session)
    assert (await client.send(alice, [crowd[0]], b"start")).status == 200  # starts the interval
    sockets = [await client.ws(dev, heartbeat=None) for dev in crowd]
    for ws in sockets:
        await drain_until_empty(ws)
    alice_ws = await _open(client, alice)
    log: list[Any] = []
    readers = [
        asyncio.ensure_future(_frames(alice_ws, "alice", log)),
        asyncio.ensure_future(_frames(sockets[0], "first", log)),
    ]
    try:
        group, direct = new_mid(), new_mid()
        everyone = tuple(dev.addr for dev in crowd)
        await alice_ws.send_bytes(encode_send(Envelope(group, everyone, b"to all")))
        await alice_ws.send_bytes(encode_send(Envelope(direct, (crowd[0].addr,), b"to one")))
        await _until(log, _delivered("first", direct))
        order = [
            (name, f.message_id if isinstance(f, StoredMessage) else f.get("id")) for name, f in log
        ]
        # The group message came first, after alice's answer for it (its commit).
        assert order.index(("alice", b64(group))) < order.index(("first", group)), order
        assert order.index(("first", group)) < order.index(("first", direct)), order
        seqs = [f.seq for name, f in log if name == "first"]
        assert seqs == sorted(seqs) and len(seqs) == 2, seqs
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    for ws in sockets[1:]:  # everyone else got the group message too
        got = await next_frame(ws, CEILING)
        assert isinstance(got, StoredMessage) and got.message_id == group
        await ws.close()
    await sockets[0].close()
    await alice_ws.close()
