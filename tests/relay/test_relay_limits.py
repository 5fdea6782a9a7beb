"""Every configurable limit, each against a dedicated relay process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time

import aiohttp
from relay_testclient import RelayClient, b64, drain_until_empty, new_mid, next_frame

from relay.store.base import Envelope
from relay.wire import encode_send

# For tests that leave thousands of one stranger's messages unread (over the default share).
BIG_SHARES = {"mailbox_sender_max_messages": "10000", "mailbox_stranger_max_messages": "10000"}


async def test_request_body_and_message_size_limits(relay_factory, session) -> None:
    relay = relay_factory({"max_request_bytes": "20000", "max_message_bytes": "1000"})
    client = RelayClient(relay.url, session)
    alice = await client.new_device()
    bob = await client.new_device()
    r = await client.send(alice, [bob], b"x" * 1001)
    assert r.status == 413 and r.json()["error"] == "too_large"
    r = await client.send_binary(alice, [bob], b"x" * 1001)
    assert r.status == 413
    r = await client.request(alice, "PUT", "/v1/keys", data=b" " * 20001)
    assert r.status == 413 and r.json()["error"] == "too_large"
    assert (await client.send(alice, [bob], b"x" * 1000)).status == 200
    ws = await client.ws(alice)
    await drain_until_empty(ws)
    await ws.send_bytes(encode_send(Envelope(new_mid(), (bob.addr,), b"y" * 1001)))
    res = await next_frame(ws)
    assert res["type"] == "send_result" and res["status"] == 413
    await ws.close()


async def test_ws_frame_over_limit_closes_1009(relay_factory, session) -> None:
    relay = relay_factory({"ws_max_frame_bytes": "4096"})
    client = RelayClient(relay.url, session)
    dev = await client.new_device()
    ws = await client.ws(dev)
    await drain_until_empty(ws)
    await ws.send_bytes(b"\x02" + b"\x00" * 5000)
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
    await ws.close()


async def test_idle_timeout_closes_4004(relay_factory, session) -> None:
    relay = relay_factory({"ws_idle_timeout_seconds": "1", "ws_heartbeat_seconds": "0"})
    client = RelayClient(relay.url, session)
    dev = await client.new_device()
    ws = await client.ws(dev)
    await drain_until_empty(ws)
    started = time.monotonic()
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4004
    assert 0.5 < time.monotonic() - started < 4
    await ws.close()


async def test_heartbeat_drops_client_that_never_pongs(relay_factory, session) -> None:
    relay = relay_factory({"ws_heartbeat_seconds": "0.5", "ws_idle_timeout_seconds": "60"})
    client = RelayClient(relay.url, session)
    dev = await client.new_device()
    responsive = await client.new_device()
    ws = await client.ws(dev, autoping=False)
    ok = await client.ws(responsive)  # autoping on: answers pings, stays connected
    await drain_until_empty(ws)
    await drain_until_empty(ok)
    # aiohttp answers pings only while receive() runs, so keep reading the responsive socket.
    ok_reader = asyncio.ensure_future(next_frame(ok, timeout=10))
    ended = None
    for _ in range(20):  # bounded: pings are not data; the connection must end
        msg = await ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.PING:
            continue
        ended = msg
        break
    assert ended is not None and ended.type == aiohttp.WSMsgType.CLOSE and ended.data == 4004
    await asyncio.sleep(1.0)  # two more heartbeat periods for the responsive socket
    alice = await client.new_device()
    mid = new_mid()
    await client.send(alice, [responsive], b"still here", mid)
    assert (await ok_reader).message_id == mid
    with contextlib.suppress(aiohttp.ClientError):
        await ws.close()
    await ok.close()


def _slow_headers(
    port: int, interval: float, limit: float, first: bytes = b""
) -> tuple[bool, float]:
    """Send ``first`` (complete requests) and read their responses, then trickle header lines;
    return (closed_by_server, seconds from the first trickled byte until closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        if first:
            sock.sendall(first)
            got = b""
            while got.count(b"HTTP/1.1 200") < first.count(b"GET "):
                chunk = sock.recv(65536)
                assert chunk, "closed before answering the keep-alive requests"
                got += chunk
            time.sleep(interval)  # idle between requests: that alone must not count
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - start < limit:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(interval)
                data = sock.recv(1024)
                if data == b"":
                    return True, time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return True, time.monotonic() - start
    return False, time.monotonic() - start


async def test_slowloris_headers_are_cut_off(relay_factory, session) -> None:
    relay = relay_factory({"header_timeout_seconds": "1"})
    closed, took = await asyncio.to_thread(_slow_headers, relay.port, 0.2, 6.0)
    assert closed and 0.8 < took < 3.0
    async with session.get(relay.url + "/healthz") as resp:  # normal clients unaffected
        assert resp.status == 200


async def test_slowloris_on_a_later_keepalive_request_is_cut_off(relay_factory) -> None:
    relay = relay_factory({"header_timeout_seconds": "1"})
    # Two quick requests on one keep-alive connection, a pause longer than the header timeout
    # (idle keep-alive is not slowloris), then a third request whose headers trickle.
    quick = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
    closed, took = await asyncio.to_thread(_slow_headers, relay.port, 1.3, 6.0, quick)
    assert closed and 0.8 < took < 3.0


async def test_registration_and_send_rate_limits(relay_factory, session) -> None:
    relay = relay_factory(
        {
            "registration_burst": "3",
            "registration_rate": "0.001",
            "send_burst": "2",
            "send_rate": "0.001",
        }
    )
    client = RelayClient(relay.url, session)
    alice = await client.new_device()
    bob = await client.new_device()
    from relay_testclient import Device, new_username

    r = await client.register(Device(new_username()))
    assert r.status == 201
    r = await client.register(Device(new_username()))
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert [(await client.send(alice, [bob], b"x")).status for _ in range(3)] == [200, 200, 429]
    ws = await client.ws(alice)
    await drain_until_empty(ws)
    await ws.send_bytes(encode_send(Envelope(new_mid(), (bob.addr,), b"y")))
    res = await next_frame(ws)
    assert res["status"] == 429 and res["retry_after"] >= 1
    await ws.close()


async def test_mailbox_quota_is_507_and_nothing_is_dropped(relay_factory, session) -> None:
    relay = relay_factory({"mailbox_max_messages": "3"})
    client = RelayClient(relay.url, session)
    alice = await client.new_device()
    bob = await client.new_device()
    mids = [new_mid() for _ in range(3)]
    for mid in mids:
        assert (await client.send(alice, [bob], b"x", mid)).status == 200
    r = await client.send(alice, [bob], b"overflow")
    assert r.status == 507 and r.json()["full"] == [{"user": bob.user, "device": 1}]
    kept = (await client.read(bob)).json()["messages"]
    assert [m["id"] for m in kept] == [b64(m) for m in mids]
    await client.ack(bob, mids[:1])
    assert (await client.send(alice, [bob], b"fits again")).status == 200


async def test_slow_reader_is_disconnected_4002_and_others_unaffected(
    relay_factory, session
) -> None:
    relay = relay_factory(
        {
            "ws_max_outbound_bytes": "262144",
            "ws_slow_grace_seconds": "1",
            **BIG_SHARES,
        }
    )
    client = RelayClient(relay.url, session)
    alice = await client.new_device()
    slow = await client.new_device()
    fast = await client.new_device()
    ws_slow = await client.ws(slow)
    await drain_until_empty(ws_slow)
    ws_fast = await client.ws(fast)
    await drain_until_empty(ws_fast)
    ws_a = await client.ws(alice)
    await drain_until_empty(ws_a)
    body = os.urandom(16_000)
    n = 2000  # 32 MB: far more than the loopback socket buffers hold
    window = 20

    async def send_all() -> None:
        for _ in range(n // window):  # windows keep each commit's burst small
            for _ in range(window):
                env = Envelope(new_mid(), (slow.addr, fast.addr), body)
                await ws_a.send_bytes(encode_send(env))
            for _ in range(window):
                res = await next_frame(ws_a, timeout=30)
                assert res["status"] == 200, res

    async def read_fast() -> int:
        got = 0
        for _ in range(n):
            f = await next_frame(ws_fast, timeout=30)
            assert getattr(f, "body", None) == body, f
            got += 1
        return got

    async def read_slow_once_cut() -> object:
        # The slow device starts reading once the relay has cut it off (it gives a client
        # a few seconds to take the close frame queued behind what it did not read).
        while True:
            async with session.get(relay.url + "/metrics") as resp:
                if "blindpost_relay_ws_slow_disconnects_total 1" in await resp.text():
                    break
            await asyncio.sleep(0.05)
        for _ in range(n + 5):
            msg = await ws_slow.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return None
        return None

    _, fast_got, code = await asyncio.wait_for(
        asyncio.gather(send_all(), read_fast(), read_slow_once_cut()), 180
    )
    assert fast_got == n
    # The slow socket was cut off with close code 4002.
    assert code == 4002
    # Nothing was lost for the slow device: everything is still in its mailbox.
    r = await client.read(slow, limit=1000)
    assert len(json.loads(r.body)["messages"]) >= 1
    for ws in (ws_slow, ws_fast, ws_a):
        await ws.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


async def test_pipelined_sends_are_back_pressured(relay_factory, session) -> None:
    """A client that pipelines far more sends than the store commits at once never has more
    than ws_max_inflight_sends of them queued in the relay; every one is still answered, in
    order, and delivered."""
    relay = relay_factory({"ws_max_inflight_sends": "4", "send_burst": "100000", **BIG_SHARES})
    client = RelayClient(relay.url, session)
    alice = await client.new_device()
    bob = await client.new_device()
    ws_a = await client.ws(alice)
    await drain_until_empty(ws_a)
    n = 1500
    mids = [new_mid() for _ in range(n)]
    frames = [encode_send(Envelope(m, (bob.addr,), b"p" * 200)) for m in mids]

    async def pipeline() -> None:
        for f in frames:  # no waiting for answers: the relay must push back on its own
            await ws_a.send_bytes(f)

    async def answers() -> list[str]:
        got = []
        for _ in range(n):
            res = await next_frame(ws_a, timeout=30)
            assert res["type"] == "send_result" and res["status"] == 200, res
            got.append(res["id"])
        return got

    _, answered = await asyncio.wait_for(asyncio.gather(pipeline(), answers()), 60)
    assert answered == [b64(m) for m in mids]
    async with session.get(relay.url + "/metrics") as resp:
        text = await resp.text()
    assert 1 <= _metric(text, "blindpost_relay_sends_in_flight_peak") <= 4
    assert _metric(text, "blindpost_relay_ws_read_pauses_total") >= 1
    assert _metric(text, "blindpost_relay_sends_in_flight") == 0
    ws_b = await client.ws(bob)
    got = await drain_until_empty(ws_b, timeout=30)
    assert [m.message_id for m in got[:n]] == mids
    for ws in (ws_a, ws_b):
        await ws.close()
