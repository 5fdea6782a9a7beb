"""RelayConnection against a scripted in-process WebSocket server: reconnect policy, close
codes, send/ack correlation. Deterministic: randomness and sleep are injected."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from e2ee.errors import UsageError
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import (
    AuthFailed,
    ConnectionLost,
    DeviceRemoved,
    InvalidRequest,
    MailboxFull,
    NotConnected,
    Replaced,
    Unavailable,
)
from e2ee.transport.frames import (
    Acked,
    Delivery,
    Hint,
    QueueEmpty,
    SendResult,
    ServerError,
    decode_send,
    encode_control,
    encode_deliver,
)
from e2ee.transport.ws import Backoff, ConnectionState, RelayConnection

Script = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]
WAIT = 5.0
MID = bytes(range(16))


class FakeRelay:
    """Each upgrade runs the next script; with none left, refuse with 503."""

    def __init__(self) -> None:
        self.scripts: list[Script | int] = []
        self.upgrades: list[dict[str, str]] = []
        self.server: TestServer | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.upgrades.append(dict(request.headers))
        if not self.scripts:
            return web.json_response({"error": "unavailable"}, status=503)
        script = self.scripts.pop(0)
        if isinstance(script, int):  # refuse the upgrade with this status
            return web.json_response({"error": "no"}, status=script)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await script(ws, request)
        if not ws.closed:
            await ws.close()
        return ws

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/")).rstrip("/")


@pytest.fixture
async def fake() -> AsyncIterator[FakeRelay]:
    relay = FakeRelay()
    app = web.Application()
    app.router.add_get("/v1/ws", relay.handler)
    relay.server = TestServer(app, host="127.0.0.1")
    await relay.server.start_server()
    yield relay
    await relay.server.close()


class Sleeps:
    """An injected sleep that records delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def signer() -> DeviceSigner:
    return DeviceSigner.from_seed(bytes(32), "alice", 1)


def conn_for(fake: FakeRelay, **kw: Any) -> RelayConnection:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("random", lambda: 0.5)
    kw.setdefault("heartbeat", None)
    # The scripted relay checks the signed upgrade headers; first-frame auth is
    # exercised against the real relay (test_transport_relay_integration.py).
    kw.setdefault("frame_auth", False)
    return RelayConnection(fake.url, signer(), **kw)


async def collect_until_closed(conn: RelayConnection) -> list[Any]:
    out = []
    async with asyncio.timeout(WAIT):
        async for event in conn:
            out.append(event)
    return out


def states(events: list[Any]) -> list[tuple[str, int, float | None, int | None]]:
    return [
        (e.state, e.attempt, e.delay, e.close_code)
        for e in events
        if isinstance(e, ConnectionState)
    ]


def hint_then_close(code: int) -> Script:
    async def script(ws: web.WebSocketResponse, _r: web.Request) -> None:
        await ws.send_str(encode_control(Hint(0)))
        await ws.close(code=code)

    return script


async def hold_open(ws: web.WebSocketResponse, _r: web.Request) -> None:
    await ws.send_str(encode_control(Hint(0)))
    async for _ in ws:
        pass


# -- the pure backoff ---------------------------------------------------------------------


def test_backoff_full_jitter_bounds() -> None:
    b = Backoff(0.5, 8.0, random=lambda: 0.999)
    assert [b.ceiling(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert b.delay(3) == pytest.approx(0.999 * 2)
    assert Backoff(0.5, 8.0, random=lambda: 0.0).delay(5) == 0.0
    assert Backoff(1, 30).ceiling(10_000) == 30  # no overflow
    with pytest.raises(UsageError):
        Backoff(0, 1)
    with pytest.raises(UsageError):
        Backoff(2, 1)


# -- reconnect policy ---------------------------------------------------------------------------


async def test_upgrade_is_signed_fresh_each_attempt(fake: FakeRelay) -> None:
    fake.scripts = [hint_then_close(1001), hint_then_close(4001)]
    conn = conn_for(fake)
    async with conn:
        await collect_until_closed(conn)
    assert len(fake.upgrades) == 2
    nonces = {h["X-Blindpost-Nonce"] for h in fake.upgrades}
    assert len(nonces) == 2
    assert all(
        h["X-Blindpost-User"] == "alice" and h["X-Blindpost-Device"] == "1" for h in fake.upgrades
    )


async def test_1001_reconnects_then_4001_stops(fake: FakeRelay) -> None:
    fake.scripts = [hint_then_close(1001), hint_then_close(4001)]
    sleeps = Sleeps()
    conn = conn_for(fake, sleep=sleeps, backoff_base=2.0)
    async with conn:
        events = await collect_until_closed(conn)
    assert states(events) == [
        ("connecting", 0, None, None),
        ("connected", 0, None, None),
        ("reconnecting", 1, 1.0, 1001),  # 0.5 * min(cap, 2.0 * 2**0)
        ("connecting", 1, None, None),
        ("connected", 0, None, None),
        ("closed", 0, None, 4001),
    ]
    assert isinstance(events[-1].error, Replaced)
    assert [e for e in events if isinstance(e, Hint)] == [Hint(0), Hint(0)]
    assert sleeps.delays == [1.0]


async def test_4003_stops(fake: FakeRelay) -> None:
    fake.scripts = [hint_then_close(4003)]
    conn = conn_for(fake)
    async with conn:
        events = await collect_until_closed(conn)
    assert events[-1].close_code == 4003 and isinstance(events[-1].error, DeviceRemoved)
    assert len(fake.upgrades) == 1


async def test_backoff_grows_while_the_relay_is_down_and_gives_up(fake: FakeRelay) -> None:
    fake.scripts = []  # every upgrade gets 503
    sleeps = Sleeps()
    conn = conn_for(fake, sleep=sleeps, backoff_base=1.0, backoff_cap=4.0, max_attempts=5)
    async with conn:
        events = await collect_until_closed(conn)
    assert sleeps.delays == [0.5, 1.0, 2.0, 2.0, 2.0]  # 0.5 * min(4, 1 * 2**(n-1))
    reconnecting = [
        e for e in events if isinstance(e, ConnectionState) and e.state == "reconnecting"
    ]
    assert [e.attempt for e in reconnecting] == [1, 2, 3, 4, 5]
    assert events[-1].state == "closed" and events[-1].error.status == 503


async def test_flapping_connection_keeps_backing_off(fake: FakeRelay) -> None:
    """A connection that drops at once does not reset the attempt counter."""
    fake.scripts = [hint_then_close(1011), hint_then_close(1011), hint_then_close(4001)]
    sleeps = Sleeps()
    conn = conn_for(fake, sleep=sleeps, backoff_base=1.0, stable_after=60.0)
    async with conn:
        await collect_until_closed(conn)
    assert sleeps.delays == [0.5, 1.0]


async def test_stable_connection_resets_the_counter(fake: FakeRelay) -> None:
    fake.scripts = [hint_then_close(1011), hint_then_close(1011), hint_then_close(4001)]
    sleeps = Sleeps()
    ticks = iter(range(0, 1000, 100))  # every connection "lasts" 100 s
    conn = conn_for(
        fake,
        sleep=sleeps,
        backoff_base=1.0,
        stable_after=60.0,
        monotonic=lambda: float(next(ticks)),
    )
    async with conn:
        await collect_until_closed(conn)
    assert sleeps.delays == [0.5, 0.5]


async def test_401_on_upgrade_is_final(fake: FakeRelay) -> None:
    fake.scripts = [401]
    conn = conn_for(fake)
    async with conn:
        events = await collect_until_closed(conn)
    assert states(events)[-1][0] == "closed"
    assert isinstance(events[-1].error, AuthFailed)
    with pytest.raises(AuthFailed):
        await conn.wait_connected()


async def test_no_reconnect_option(fake: FakeRelay) -> None:
    fake.scripts = [hint_then_close(1001)]
    conn = conn_for(fake, reconnect=False)
    async with conn:
        events = await collect_until_closed(conn)
    assert [s[0] for s in states(events)] == ["connecting", "connected", "closed"]
    assert events[-1].close_code == 1001


async def test_close_while_waiting_to_reconnect(fake: FakeRelay) -> None:
    fake.scripts = []
    forever = asyncio.Event()

    async def slow_sleep(_delay: float) -> None:
        await forever.wait()

    conn = conn_for(fake, sleep=slow_sleep)
    await conn.start()
    async with asyncio.timeout(WAIT):
        while conn.state.state != "reconnecting":
            await conn.next_event()
    await conn.close()
    events = await collect_until_closed(conn)
    assert events[-1].state == "closed" and events[-1].close_code == 1000
    assert conn.state.state == "closed"


# -- sends and acks -----------------------------------------------------------------------------


async def test_send_and_ack_correlation(fake: FakeRelay) -> None:
    received: list[bytes] = []

    async def script(ws: web.WebSocketResponse, _r: web.Request) -> None:
        await ws.send_str(encode_control(Hint(1)))
        await ws.send_bytes(encode_deliver(Delivery(3, MID, "bob", 2, 99, b"body")))
        await ws.send_str(encode_control(QueueEmpty()))
        await ws.send_bytes(b"\x09garbage")  # malformed: ignored, connection stays up
        await ws.send_str('{"type":"future_thing"}')  # unknown: ignored
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                frame = decode_send(msg.data)
                received.append(frame.id)
                if frame.id == MID:
                    await ws.send_str(
                        encode_control(SendResult(frame.id, 200, recipients=1, stored_at=5))
                    )
                else:
                    await ws.send_str(
                        encode_control(
                            SendResult(
                                frame.id,
                                507,
                                error="mailbox_full",
                                message="full",
                                fields={"full": [{"user": "bob", "device": 2}]},
                            )
                        )
                    )
            elif msg.type == WSMsgType.TEXT:
                doc = json.loads(msg.data)
                await ws.send_str(encode_control(Acked(doc["ref"], len(doc["ids"]))))
                await ws.close(code=4001)

    fake.scripts = [script]
    conn = conn_for(fake)
    async with conn:
        await conn.wait_connected()
        ok = await conn.send(MID, [("bob", 2)], b"hello")
        other = os.urandom(16)
        full = await conn.send(other, [("bob", 2)], b"hello")
        async with asyncio.timeout(WAIT):
            receipt = await ok
            with pytest.raises(MailboxFull) as exc:
                await full
        assert (receipt.id, receipt.recipients, receipt.stored_at) == (MID, 1, 5)
        assert exc.value.full == (("bob", 2),)
        acked = await conn.ack([MID], ref="mine")
        async with asyncio.timeout(WAIT):
            assert await acked == 1
        events = await collect_until_closed(conn)
    kinds = [type(e).__name__ for e in events if not isinstance(e, ConnectionState)]
    assert kinds == ["Hint", "Delivery", "QueueEmpty", "SendResult", "SendResult", "Acked"]
    assert received == [MID, other]


async def test_ack_frame_carries_settled_sends(fake: FakeRelay) -> None:
    """``settled`` goes in the ack frame the relay reads; an ack may settle only, and the
    ``acked`` answer to it resolves the caller's future as any ack's does."""
    frames: list[dict[str, Any]] = []

    async def script(ws: web.WebSocketResponse, _r: web.Request) -> None:
        await ws.send_str(encode_control(Hint(0)))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                doc = json.loads(msg.data)
                frames.append(doc)
                await ws.send_str(encode_control(Acked(doc["ref"], len(doc.get("ids", [])))))

    fake.scripts = [script]
    other = os.urandom(16)
    conn = conn_for(fake)
    async with conn:
        await conn.wait_connected()
        async with asyncio.timeout(WAIT):
            assert await (await conn.ack([MID], ref="both", settled=[other])) == 1
            assert await (await conn.ack([], ref="only", settled=[other, MID])) == 0
            assert await (await conn.ack([MID], ref="plain")) == 1
        with pytest.raises(UsageError):
            await conn.ack([], settled=[])
        with pytest.raises(UsageError):
            await conn.ack([], settled=[b"short"])
    mid, oth = base64.b64encode(MID).decode(), base64.b64encode(other).decode()
    assert frames == [
        {"type": "ack", "ids": [mid], "settled": [oth], "ref": "both"},
        {"type": "ack", "settled": [oth, mid], "ref": "only"},
        {"type": "ack", "ids": [mid], "ref": "plain"},
    ]


async def test_pending_send_fails_when_the_socket_drops(fake: FakeRelay) -> None:
    got_frame = asyncio.Event()

    async def script(ws: web.WebSocketResponse, _r: web.Request) -> None:
        await ws.send_str(encode_control(Hint(0)))
        async for _msg in ws:
            got_frame.set()
            await ws.close(code=1011)  # never answers

    fake.scripts = [script]
    conn = conn_for(fake, reconnect=False)
    async with conn:
        await conn.wait_connected()
        fut = await conn.send(MID, [("bob", 1)], b"x")
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(WAIT):
                await fut
        assert got_frame.is_set()
        await collect_until_closed(conn)
        with pytest.raises(NotConnected):
            await conn.send(MID, [("bob", 1)], b"x")


async def test_not_connected_and_bad_arguments(fake: FakeRelay) -> None:
    conn = conn_for(fake)
    with pytest.raises(NotConnected):
        await conn.send(MID, [("bob", 1)], b"x")
    with pytest.raises(UsageError):
        await conn.send(b"short", [("bob", 1)], b"x")
    with pytest.raises(UsageError):
        await conn.ack([])
    await conn.close()
    assert conn.state.state == "closed"


def test_repr_has_no_secrets() -> None:
    s = DeviceSigner.from_seed(b"\x07" * 32, "alice", 1)
    text = repr(RelayConnection("http://127.0.0.1:1", s))
    assert "alice" in text and (b"\x07" * 32).hex() not in text


async def test_a_refused_ack_fails_its_future_at_once(fake: FakeRelay) -> None:
    """The relay answers a refused ack frame with an error frame carrying the ack's ref (and
    the HTTP status): the caller's future fails with that typed error, it does not wait for
    the socket to drop; an error frame without a ref (an older relay) fails no ack."""
    refused: dict[str, ServerError] = {
        "full": ServerError("storage_unavailable", "storage failure", 503, "full"),
        "old": ServerError("invalid_request", "ids must not be empty", 400, "old"),
    }

    async def script(ws: web.WebSocketResponse, _r: web.Request) -> None:
        await ws.send_str(encode_control(Hint(0)))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                ref = json.loads(msg.data)["ref"]
                if ref in refused:
                    await ws.send_str(encode_control(ServerError("noise", "no ref here")))
                    await ws.send_str(encode_control(refused[ref]))
                else:
                    await ws.send_str(encode_control(Acked(ref, 1)))

    fake.scripts = [script]
    conn = conn_for(fake)
    async with conn:
        await conn.wait_connected()
        async with asyncio.timeout(WAIT):
            with pytest.raises(Unavailable):
                await (await conn.ack([MID], ref="full"))
            with pytest.raises(InvalidRequest) as info:
                await (await conn.ack([], ref="old", settled=[MID]))
            assert info.value.code == "invalid_request"
            assert await (await conn.ack([MID], ref="fine")) == 1  # the socket goes on
