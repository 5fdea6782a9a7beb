"""Relay nodes linked through a real Redis: several relay processes sharing one store.

What a user relies on (docs/architecture.md, "Relay nodes"): two devices connected to
different nodes exchange messages as if there were one relay (live and offline, in seq order,
each exactly once); a device has one live connection across all nodes (4001); removing a
device closes its socket on every node; a signed request is accepted once by the whole cluster;
a lost wake-up only delays a push by the safety poll; a node that loses Redis refuses what needs
Redis with 503 + Retry-After and recovers by itself.

The nodes are separate relay processes on one PostgreSQL database (a fresh one per test) and
one Redis (a fresh key prefix per test).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis
from redis_support import REDIS_URL, ThrowawayRedis, node_settings
from relay_harness import RelayProcess
from relay_testclient import (
    Device,
    RelayClient,
    b64,
    drain_until_empty,
    new_mid,
    new_username,
    next_frame,
    unb64,
)

from blindpost_wire.registration import solve_pow
from relay.store.base import Envelope, StoredMessage
from relay.wire import decode_deliver, encode_send

_NODE_RE = re.compile(r"relay node ([0-9a-f]+) linked")

NodeFactory = Callable[..., list[RelayProcess]]


@pytest.fixture
def start_nodes(tmp_path: Path, postgres_database: str) -> Iterator[NodeFactory]:
    """Start ``n`` relay nodes on one PostgreSQL database and one Redis prefix."""
    started: list[RelayProcess] = []

    def factory(
        n: int, prefix: str, url: str = REDIS_URL, *, same_port: bool = False, **settings: str
    ) -> list[RelayProcess]:
        nodes: list[RelayProcess] = []
        for _ in range(n):
            relay = RelayProcess(
                tmp_path / f"node{len(started)}",
                {
                    **node_settings(postgres_database, prefix, url),
                    "redis_poll_seconds": "30",  # wake-ups, not the poll, push in these tests
                    **settings,
                },
            )
            if same_port and nodes:
                relay.port = nodes[0].port
            relay.start()
            started.append(relay)
            nodes.append(relay)
        return nodes

    yield factory
    codes = [relay.stop() for relay in started if relay.running]
    # Every node shuts down cleanly (wakes flushed, presence released) and never hit an
    # unexpected error.
    assert codes == [0] * len(codes)
    for relay in started:
        assert "Traceback" not in relay.log_text(), relay.log_text()[-3000:]


def node_id(relay: RelayProcess) -> str:
    match = _NODE_RE.search(relay.log_text())
    assert match, relay.log_text()[-2000:]
    return match.group(1)


async def receive_messages(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[StoredMessage]:
    out: list[StoredMessage] = []
    while len(out) < n:
        f = await next_frame(ws, timeout=15)
        if isinstance(f, StoredMessage):
            out.append(f)
        else:
            assert isinstance(f, dict) and f.get("type") in {"send_result", "acked"}, f
    return out


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing more arrives (no duplicate push)."""
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=0.5)


async def metric(client: RelayClient, name: str) -> int:
    async with client.session.get(client.base + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} (\d+)$", text, re.M)
    assert match, name
    return int(match.group(1))


async def wait_for(pred: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_messages_cross_nodes_live_in_order_once_with_one_redis_call_each(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1 = start_nodes(2, redis_prefix)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    bob = await c0.new_device("bob")
    ws_b = await c1.ws(bob)
    assert await drain_until_empty(ws_b) == []
    mids = [new_mid() for _ in range(40)]
    for i, mid in enumerate(mids):
        assert (await c0.send(alice, [bob], b"m%d" % i, mid)).status == 200
    got = await receive_messages(ws_b, len(mids))
    assert [m.message_id for m in got] == mids
    assert [m.body for m in got] == [b"m%d" % i for i in range(40)]
    await assert_quiet(ws_b)
    # Measured: Redis round trips the sending node made per delivered message (at most 1: the
    # wake script looks up presence and publishes in one call; the woken node reads the store).
    calls = await metric(c0, "blindpost_relay_redis_wake_calls_total")
    assert 1 <= calls <= len(mids)
    assert await metric(c0, "blindpost_relay_redis_woken_devices_total") == len(mids)
    assert await metric(c1, "blindpost_relay_messages_delivered_total") == len(mids)
    # Small messages travel in the wake-up: the woken node pushed every one without a store read.
    assert await metric(c1, "blindpost_relay_redis_carried_pushes_total") == len(mids)
    assert await metric(c1, "blindpost_relay_redis_push_reads_total") == 0
    # A recipient on the sender's own node costs no Redis call at all.
    ws_a = await c0.ws(alice)
    assert await drain_until_empty(ws_a) == []
    assert (await c1.send(bob, [alice], b"back")).status == 200
    assert [m.body for m in await receive_messages(ws_a, 1)] == [b"back"]
    carol = await c0.new_device("carol")
    assert (await c0.send(carol, [alice], b"same node")).status == 200
    assert [m.body for m in await receive_messages(ws_a, 1)] == [b"same node"]
    assert await metric(c0, "blindpost_relay_redis_wake_calls_total") == calls
    for ws in (ws_a, ws_b):
        await ws.close()


@pytest.mark.parametrize("carry", ["0", "64"])
async def test_messages_too_big_to_carry_are_read_from_the_store_in_order_once(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession, carry: str
) -> None:
    # redis_wake_body_bytes = 0: wake-ups carry no message; 64: only the small ones fit, so
    # carried and read pushes interleave for one socket.
    n0, n1 = start_nodes(2, redis_prefix, redis_wake_body_bytes=carry)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    bob = await c0.new_device("bob")
    ws_b = await c1.ws(bob)
    assert await drain_until_empty(ws_b) == []
    bodies = [b"s%d" % i if i % 3 else bytes(200) + b"%d" % i for i in range(30)]
    mids = [new_mid() for _ in bodies]
    for body, mid in zip(bodies, mids, strict=True):
        assert (await c0.send(alice, [bob], body, mid)).status == 200
    got = await receive_messages(ws_b, len(mids))
    assert [m.message_id for m in got] == mids
    assert [m.body for m in got] == bodies
    await assert_quiet(ws_b)
    carried = await metric(c1, "blindpost_relay_redis_carried_pushes_total")
    if carry == "0":
        assert carried == 0
    else:
        small = sum(1 for b in bodies if len(b) < 10)
        assert 0 < carried <= small
    assert await metric(c1, "blindpost_relay_redis_push_reads_total") >= 1
    await ws_b.close()


async def test_carried_messages_from_two_nodes_reach_a_third_in_seq_order_once(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    # Two senders on two nodes race to one recipient on a third: wake-ups from the two nodes
    # arrive in any order, so a carried message is pushed only when it is the socket's next
    # seq; the others are read from the store. Every message arrives once, in seq order.
    n0, n1, n2 = start_nodes(3, redis_prefix)
    c = [RelayClient(n.url, session) for n in (n0, n1, n2)]
    alice = await c[0].new_device("alice")
    carol = await c[1].new_device("carol")
    bob = await c[0].new_device("bob")
    ws_b = await c[2].ws(bob)
    assert await drain_until_empty(ws_b) == []

    async def burst(client: RelayClient, sender: Device, tag: bytes) -> list[bytes]:
        mids = [new_mid() for _ in range(25)]
        for i, mid in enumerate(mids):
            assert (await client.send(sender, [bob], tag + b"%d" % i, mid)).status == 200
        return mids

    sent_a, sent_c = await asyncio.gather(burst(c[0], alice, b"a"), burst(c[1], carol, b"c"))
    got = await receive_messages(ws_b, 50)
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    ids = [m.message_id for m in got]
    assert [i for i in ids if i in set(sent_a)] == sent_a
    assert [i for i in ids if i in set(sent_c)] == sent_c
    await assert_quiet(ws_b)
    assert await metric(c[2], "blindpost_relay_redis_carried_pushes_total") > 0
    await ws_b.close()


async def test_offline_recipient_gets_its_backlog_on_another_node_then_live(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1, n2 = start_nodes(3, redis_prefix)
    c = [RelayClient(n.url, session) for n in (n0, n1, n2)]
    alice = await c[0].new_device("alice")
    bob = await c[0].new_device("bob")
    first = [new_mid() for _ in range(5)]
    for mid in first:
        assert (await c[0].send(alice, [bob], b"offline", mid)).status == 200
    ws_b = await c[2].ws(bob)
    assert [m.message_id for m in await drain_until_empty(ws_b)] == first
    later = [new_mid() for _ in range(5)]
    for i, mid in enumerate(later):
        assert (await c[i % 2].send(alice, [bob], b"live", mid)).status == 200
    assert [m.message_id for m in await receive_messages(ws_b, 5)] == later
    await assert_quiet(ws_b)
    await ws_b.close()


async def test_presence_is_refreshed_while_connected_and_expires_when_the_node_dies(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1 = start_nodes(2, redis_prefix)
    c1 = RelayClient(n1.url, session)
    bob = await RelayClient(n0.url, session).new_device("bob")
    ws_b = await c1.ws(bob)
    await drain_until_empty(ws_b)
    r = Redis.from_url(REDIS_URL)
    key = f"{redis_prefix}presence:1:{bob.user}"
    try:
        value = await r.get(key)
        assert value is not None and value.decode().split(" ")[0] == node_id(n1)
        # Refreshed: its TTL (2 s) goes back up while the socket stays (heartbeat 0.5 s). A
        # refresh shows as a TTL above the one read just before it (the first read may come
        # right after a refresh, at the full TTL, which no later read can exceed).
        last = await r.pttl(key)

        async def refreshed() -> bool:
            nonlocal last
            now = await r.pttl(key)
            went_up, last = now > last, now
            return went_up

        await wait_for(refreshed, "a presence refresh")
        n1.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while await r.exists(key):
            assert time.monotonic() < deadline, "the dead node's presence never expired"
            await asyncio.sleep(0.1)
        # A graceful close releases at once.
        c0 = RelayClient(n0.url, session)
        ws = await c0.ws(bob)
        await drain_until_empty(ws)
        assert await r.exists(key)
        await ws.close()
        await wait_for(lambda: _absent(r, key), "the released presence")
    finally:
        await r.aclose()


async def _absent(r: Redis, key: str) -> bool:
    return not await r.exists(key)


async def test_one_live_connection_per_device_across_nodes(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1, n2 = start_nodes(3, redis_prefix)
    c = [RelayClient(n.url, session) for n in (n0, n1, n2)]
    alice = await c[0].new_device("alice")
    bob = await c[0].new_device("bob")
    old = await c[0].ws(bob)
    await drain_until_empty(old)
    new = await c[1].ws(bob)
    await drain_until_empty(new)
    closed = await old.receive(timeout=10)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
    mid = new_mid()
    assert (await c[2].send(alice, [bob], b"to the new socket", mid)).status == 200
    assert [m.message_id for m in await receive_messages(new, 1)] == [mid]
    # Crossing attaches on two nodes at once: exactly one socket survives.
    for _ in range(5):
        a, b = await asyncio.gather(c[0].ws(bob), c[2].ws(bob))
        closed = await new.receive(timeout=10)  # the previous survivor is replaced
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
        reads = {asyncio.ensure_future(_until_close(ws)): ws for ws in (a, b)}
        done, pending = await asyncio.wait(reads, timeout=15, return_when="FIRST_COMPLETED")
        assert len(done) == 1, "no socket of the two crossing attaches was closed"
        assert next(iter(done)).result() == 4001
        (reader,) = pending
        new = reads[reader]
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        while True:  # the survivor stays open (its hint and empty marker may still come)
            try:
                msg = await new.receive(timeout=0.5)
            except TimeoutError:
                break
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
    await new.close()


async def _until_close(ws: aiohttp.ClientWebSocketResponse) -> object:
    """Read a socket (hint, empty marker...) until it is closed; return the close code."""
    while True:
        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return msg.data


async def test_removed_device_is_closed_and_refused_on_every_node(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1 = start_nodes(2, redis_prefix)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    owner = await c0.new_device("owner")
    second = await c0.add_device(owner, 2)
    # Node 1 caches the second device's key and holds its socket.
    assert (await c1.request(second, "GET", "/v1/devices")).status == 200
    ws = await c1.ws(second)
    await drain_until_empty(ws)
    assert (await c0.request(owner, "DELETE", "/v1/devices/2")).status == 200
    closed = await ws.receive(timeout=10)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4003
    assert (await c1.request(second, "GET", "/v1/devices")).status == 401


async def test_a_signed_request_is_accepted_once_by_the_whole_cluster(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1 = start_nodes(2, redis_prefix)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    headers = c0.sign(alice, "GET", "/v1/devices")
    async with session.get(n0.url + "/v1/devices", headers=headers) as resp:
        assert resp.status == 200
    async with session.get(n1.url + "/v1/devices", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "auth_replay"
    # And after the node that accepted it restarts.
    n0.restart()
    async with session.get(n0.url + "/v1/devices", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "auth_replay"
    assert (await c1.request(alice, "GET", "/v1/devices")).status == 200


async def test_a_challenge_from_one_node_registers_through_another(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """Behind a load balancer, GET /v1/registration and POST /v1/accounts may reach different
    nodes: the registration key comes from the secret the nodes' Redis replay guard shares."""
    n0, n1 = start_nodes(2, redis_prefix, registration="pow", registration_pow_difficulty="4")
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    info = await c0.registration()
    dev = Device(new_username("carol"))
    nonce = solve_pow(info["challenge"], dev.user, info["difficulty"])
    reply = await c1.register(dev, pow={"challenge": info["challenge"], "nonce": nonce})
    assert reply.status == 201, reply.body


async def test_a_lost_wake_up_is_pushed_by_the_safety_poll(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """The recipient's presence entry is deleted behind the nodes' back (and not refreshed in
    the test's time: heartbeat 60 s), so the sender's wake-up finds nobody: the poll of 0.5 s
    pushes every message anyway, in order, once."""
    n0, n1 = start_nodes(
        2,
        redis_prefix,
        redis_heartbeat_seconds="60",
        redis_presence_ttl_seconds="120",
        redis_poll_seconds="0.5",
    )
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    bob = await c0.new_device("bob")
    ws_b = await c1.ws(bob)
    await drain_until_empty(ws_b)
    r = Redis.from_url(REDIS_URL)
    try:
        assert await r.delete(f"{redis_prefix}presence:1:{bob.user}") == 1
    finally:
        await r.aclose()
    mids = [new_mid() for _ in range(10)]
    for mid in mids:
        assert (await c0.send(alice, [bob], b"x", mid)).status == 200
    assert [m.message_id for m in await receive_messages(ws_b, 10)] == mids
    await assert_quiet(ws_b)
    await ws_b.close()


async def test_redis_restarted_mid_stream_503_then_recovery_without_restart(
    start_nodes: NodeFactory,
    throwaway_redis: ThrowawayRedis,
    session: aiohttp.ClientSession,
) -> None:
    """Our own redis-server (the shared one is never restarted) is killed while a stream of
    sends runs on node 0 to a recipient on node 1: sends get 503 with Retry-After while it is
    down, new sockets are refused with 503, and once it is back (empty: no persistence) both
    nodes recover by themselves; every send answered 200 reaches the recipient, in order, once."""
    n0, n1 = start_nodes(2, "bp-restart:", url=throwaway_redis.url, redis_timeout_seconds="0.5")
    pids = (n0.proc.pid, n1.proc.pid)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    bob = await c0.new_device("bob")
    ws_b = await c1.ws(bob)
    await drain_until_empty(ws_b)
    accepted: list[bytes] = []
    refused = 0
    phase = "before"
    while True:
        mid = new_mid()
        r = await c0.send(alice, [bob], b"s", mid)
        if r.status == 200:
            accepted.append(mid)
            if phase == "down":
                phase = "after"
        else:
            assert r.status == 503, r.body
            assert int(r.headers["Retry-After"]) >= 1
            refused += 1
            if phase == "down" and refused == 3:
                # New sockets are refused too while Redis is away.
                async with session.get(
                    n1.url + "/v1/ws", headers=c1.sign(alice, "GET", "/v1/ws")
                ) as resp:
                    assert resp.status == 503 and "Retry-After" in resp.headers
                throwaway_redis.start()
        if phase == "before" and len(accepted) == 20:
            throwaway_redis.stop()
            phase = "down"
        if phase == "after" and len(accepted) >= 40:
            break
        await asyncio.sleep(0.02)
    assert refused >= 3
    got = await receive_messages(ws_b, len(accepted))
    assert [m.message_id for m in got] == accepted
    await assert_quiet(ws_b)
    # Same processes, and a new socket works again across nodes.
    assert (n0.proc.pid, n1.proc.pid) == pids and n0.running and n1.running
    await ws_b.close()
    ws = await c0.ws(bob)
    assert [m.message_id for m in await drain_until_empty(ws)] == accepted  # none acked yet
    mid = new_mid()
    assert (await c1.send(alice, [bob], b"again", mid)).status == 200
    assert [m.message_id for m in await receive_messages(ws, 1)] == [mid]
    await ws.close()


async def test_group_fan_out_reaches_members_on_all_three_nodes_in_order_once(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    nodes = start_nodes(3, redis_prefix)
    c = [RelayClient(n.url, session) for n in nodes]
    sender = await c[0].new_device("sender")
    members = [await c[i % 3].new_device(f"m{i}") for i in range(6)]
    offline = await c[1].new_device("offline")
    sockets = []
    for i, member in enumerate(members):  # two members on each node, one beside the sender
        ws = await c[i % 3].ws(member)
        assert await drain_until_empty(ws) == []
        sockets.append(ws)
    mids = [new_mid() for _ in range(30)]
    for i, mid in enumerate(mids):
        r = await c[i % 3].send(sender, [*members, offline], b"group %d" % i, mid)
        assert r.status == 200 and r.json()["recipients"] == 7
    for ws in sockets:
        got = await receive_messages(ws, len(mids))
        assert [m.message_id for m in got] == mids
        assert [m.body for m in got] == [b"group %d" % i for i in range(30)]
    for ws in sockets:
        await assert_quiet(ws)
    # The offline member comes back on a node other than where it registered.
    back = await c[2].ws(offline)
    assert [m.message_id for m in await drain_until_empty(back)] == mids
    for ws in [*sockets, back]:
        await ws.close()


async def test_sigkill_of_the_recipients_node_five_times_loses_and_duplicates_nothing(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """2,000 messages from alice to bob while bob's node is SIGKILLed 5 times (and restarted):
    bob's client moves to a surviving node each time (the test client: the SDK takes one relay
    URL today). Every send answered 200 reaches bob; none is delivered again after its ack was
    confirmed; none is stored twice (a retried id keeps its one seq); each connection receives
    in increasing seq."""
    total, kills = 2000, 5
    nodes = start_nodes(3, redis_prefix)
    clients = [RelayClient(n.url, session) for n in nodes]
    alice = await clients[0].new_device("alice")
    bob = await clients[0].new_device("bob")
    bodies: dict[bytes, bytes] = {}
    confirmed: set[bytes] = set()
    seen: dict[bytes, int] = {}  # id -> seq over every connection of bob
    ack_confirmed: set[bytes] = set()
    violations: list[str] = []
    bob_node = 2
    bob_sockets: list[int] = []  # the node of each socket bob opened
    done_sending = asyncio.Event()

    async def bob_session(node: int) -> bool:
        """Receive and ack until the socket dies (False) or, once sending is done, until the
        backlog is drained and every confirmed id was seen (True)."""
        try:
            ws = await clients[node].ws(bob)
        except aiohttp.ClientError:
            return False
        bob_sockets.append(node)
        last, n, drained = 0, 0, False
        pending: dict[str, bytes] = {}
        try:
            while True:
                if done_sending.is_set() and drained and confirmed <= seen.keys():
                    return True
                try:
                    msg = await ws.receive(timeout=2)
                except TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    m = decode_deliver(msg.data)
                    if m.seq <= last:
                        violations.append(f"seq {m.seq} after {last}")
                    last = m.seq
                    if bodies.get(m.message_id) != m.body:
                        violations.append("unknown or corrupted delivery")
                    if m.message_id in ack_confirmed:
                        violations.append(f"{b64(m.message_id)} delivered after its ack")
                    if seen.setdefault(m.message_id, m.seq) != m.seq:
                        violations.append(f"{b64(m.message_id)} stored twice")
                    n += 1
                    pending[f"r{n}"] = m.message_id
                    await ws.send_str(
                        json.dumps({"type": "ack", "ids": [b64(m.message_id)], "ref": f"r{n}"})
                    )
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    doc = json.loads(msg.data)
                    if doc["type"] == "acked":
                        ack_confirmed.add(pending.pop(doc["ref"]))
                    drained = drained or doc["type"] == "empty"
                else:
                    return False  # the node died under us
        except (aiohttp.ClientError, ConnectionError):
            return False
        finally:
            await ws.close()

    async def bob_loop() -> None:
        nonlocal bob_node
        while not await bob_session(bob_node):
            # Move to another node that runs (the killed one is being restarted).
            for step in (1, 2, 3):
                candidate = (bob_node + step) % 3
                if nodes[candidate].running:
                    bob_node = candidate
                    break
            await asyncio.sleep(0.05)

    async def alice_sends(node: int, mids: list[bytes]) -> list[bytes]:
        """Send ``mids`` pipelined over one socket; return those not answered 200."""
        unanswered = dict.fromkeys(mids)
        try:
            ws = await clients[node].ws(alice)
        except aiohttp.ClientError:
            return mids
        try:
            for mid in mids:
                frame = encode_send(Envelope(mid, (bob.addr,), bodies[mid]))
                await ws.send_bytes(frame)
            while unanswered:
                msg = await ws.receive(timeout=15)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                doc = json.loads(msg.data)
                if doc.get("type") == "send_result" and doc["status"] == 200:
                    mid = unb64(doc["id"])
                    unanswered.pop(mid, None)
                    confirmed.add(mid)
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            await ws.close()
        return list(unanswered)

    async def kill_and_restart(node: int) -> None:
        nodes[node].stop(signal.SIGKILL)
        await asyncio.to_thread(nodes[node].start)

    receiver = asyncio.ensure_future(bob_loop())
    restarts: list[asyncio.Task[None]] = []
    mids = [new_mid() for _ in range(total)]
    for i, mid in enumerate(mids):
        bodies[mid] = b"msg %d" % i
    chunk = 50
    next_kill = total // (kills + 1)
    for start in range(0, total, chunk):
        todo = mids[start : start + chunk]
        while todo:
            sender_node = next(
                i for i in ((bob_node + 1) % 3, (bob_node + 2) % 3, bob_node) if nodes[i].running
            )
            todo = await alice_sends(sender_node, todo)
        if len(restarts) < kills and len(confirmed) >= next_kill:
            next_kill += total // (kills + 1)
            while not ack_confirmed:  # bob is receiving on his node
                await asyncio.sleep(0.01)
            # One node down at a time (a slow machine restarts slowly): bob always has
            # another running node to move to.
            await asyncio.gather(*restarts)
            restarts.append(asyncio.ensure_future(kill_and_restart(bob_node)))
    await asyncio.gather(*restarts)
    assert len(restarts) == kills
    assert confirmed == set(mids)
    done_sending.set()
    await asyncio.wait_for(receiver, 120)
    assert violations == []
    assert set(seen) == confirmed
    # Bob's socket was on the killed node each time, and moved to another one.
    assert len(bob_sockets) >= kills + 1
    assert all(a != b for a, b in itertools.pairwise(bob_sockets))


async def test_nodes_on_one_host_share_one_port_with_reuse_port(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """More cores on one host = more nodes (the design that replaced ``workers=N``): with
    reuse_port=1 two full nodes on PostgreSQL + Redis listen on one port, the kernel spreads
    connections over them, and clients reach each other whichever node each one landed on:
    HTTP sends to devices on both nodes, and WebSocket SENDs from a socket on one node to a
    socket on the other, both ways, in order and once."""
    n0, n1 = start_nodes(2, redis_prefix, same_port=True, reuse_port="1")
    assert n0.port == n1.port and n0.running and n1.running
    client = RelayClient(n0.url, session)
    alice = await client.new_device("alice")
    devices = [await client.new_device(f"d{i}") for i in range(16)]
    sockets = []
    for dev in devices:  # each WebSocket is a new TCP connection: the kernel picks a node
        ws = await client.ws(dev)
        assert await drain_until_empty(ws) == []
        sockets.append(ws)

    def holders(relay: RelayProcess) -> set[str]:
        return set(re.findall(r"ws open user=(\w+) ", relay.log_text()))

    # A node writes its "ws open" line to its log file on its own schedule: wait for all 16.
    await wait_for(
        lambda: holders(n0) | holders(n1) == {d.user for d in devices},
        "every socket's open line in the nodes' logs",
    )
    held = [holders(n0), holders(n1)]
    assert held[0] and held[1], "the kernel gave every socket to one node"  # p = 2**-15
    mid = new_mid()
    r = await client.send(alice, devices, b"to both nodes", mid)
    assert r.status == 200 and r.json()["recipients"] == 16
    for ws in sockets:
        assert [m.message_id for m in await receive_messages(ws, 1)] == [mid]
    # Socket to socket across the two nodes, both ways: one device held by each node.
    i0 = next(i for i, d in enumerate(devices) if d.user in held[0])
    i1 = next(i for i, d in enumerate(devices) if d.user in held[1])
    for src, dst in ((i0, i1), (i1, i0)):
        mids = [new_mid() for _ in range(5)]
        for k, m in enumerate(mids):
            env = Envelope(m, (devices[dst].addr,), b"over the port %d" % k)
            await sockets[src].send_bytes(encode_send(env))
        for m in mids:  # each SEND is answered, in order, on the sender's socket
            answer = await next_frame(sockets[src], timeout=15)
            assert answer["type"] == "send_result" and answer["status"] == 200, answer
            assert unb64(answer["id"]) == m
        got = await receive_messages(sockets[dst], len(mids))
        assert [m.message_id for m in got] == mids
        assert [m.sender for m in got] == [devices[src].addr] * len(mids)
    for ws in sockets:
        await assert_quiet(ws)
        await ws.close()


async def test_a_blob_uploaded_via_one_node_downloads_via_another(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    n0, n1 = start_nodes(2, redis_prefix)
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    alice = await c0.new_device("alice")
    data = os.urandom(300_000)
    up = await c0.upload_blob(alice, data)
    assert up.status == 201, up.body
    blob_id = up.json()["id"]
    down = await c1.request(alice, "GET", f"/v1/blobs/{blob_id}")
    assert down.status == 200 and down.body == data


async def test_an_accounts_send_budget_is_shared_by_its_devices_on_every_node(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """A flooding account whose devices are on two nodes (one pipelining over a WebSocket on
    node 0, one sending over HTTP to node 1) gets exactly its account burst accepted in all,
    and 429 for the rest; alice, on node 1, still gets every message through to bob."""
    burst = 20
    n0, n1 = start_nodes(
        2,
        redis_prefix,
        account_send_rate="0.001",
        account_send_burst=str(burst),
        mailbox_sender_max_messages="10000",
        mailbox_stranger_max_messages="10000",
    )
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    bob = await c0.new_device("bob")
    alice = await c1.new_device("alice")
    flood = await c0.new_device("flood")
    second = await c0.add_device(flood, 2)
    ws = await c0.ws(flood)
    await drain_until_empty(ws)

    async def over_ws() -> list[int]:
        mids = [new_mid() for _ in range(15)]
        for mid in mids:
            await ws.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"flood")))
        statuses: dict[str, int] = {}
        while len(statuses) < len(mids):
            doc = await next_frame(ws, timeout=30)
            if isinstance(doc, dict) and doc.get("type") == "send_result":
                statuses[doc["id"]] = doc["status"]
        return list(statuses.values())

    async def over_http() -> list[int]:
        return [(await c1.send_binary(second, [bob], b"flood")).status for _ in range(15)]

    from_ws, from_http = await asyncio.wait_for(asyncio.gather(over_ws(), over_http()), 120)
    statuses = from_ws + from_http
    assert statuses.count(200) == burst and statuses.count(429) == 30 - burst
    for i in range(5):
        assert (await c1.send(alice, [bob], b"hi %d" % i)).status == 200
    bob_ws = await c1.ws(bob)
    got = await drain_until_empty(bob_ws, timeout=30)
    assert sum(m.sender.user == flood.user for m in got) == burst
    assert [m.body for m in got if m.sender.user == alice.user] == [b"hi %d" % i for i in range(5)]
    for sock in (ws, bob_ws):
        await sock.close()


async def test_sealed_sender_keys_and_token_budgets_are_shared_by_every_node(
    start_nodes: NodeFactory, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    """Both nodes sign certificates with the one key in PostgreSQL (the first node to need
    one makes it), and one delivery token's sealed-send budget is spent across both nodes."""
    from blindpost_wire.sealed import DELIVERY_TOKEN_HEADER, token_header, token_verifier

    burst = 4
    n0, n1 = start_nodes(2, redis_prefix, sealed_token_rate="0.001", sealed_token_burst=str(burst))
    c0, c1 = RelayClient(n0.url, session), RelayClient(n1.url, session)
    bob = await c0.new_device("bob")
    token = os.urandom(16)
    r = await c0.request(
        bob, "PUT", "/v1/access", json_body={"verifier": b64(token_verifier(token))}
    )
    assert r.status == 200
    keys = [(await c.request(bob, "GET", "/v1/sender-keys")).json()["keys"] for c in (c0, c1)]
    assert keys[0] == keys[1] and len(keys[0]) == 1

    async def sealed(client: RelayClient) -> int:
        frame = encode_send(Envelope(new_mid(), (bob.addr,), b"sealed"))
        reply = await client.request(
            None,
            "PUT",
            "/v1/messages/sealed",
            data=frame,
            content_type="application/vnd.blindpost.send",
            headers={DELIVERY_TOKEN_HEADER: token_header({bob.user: token})},
        )
        return reply.status

    statuses = [await sealed(c) for c in (c0, c1, c0, c1, c0, c1)]
    assert statuses.count(200) == burst and statuses.count(429) == 6 - burst
