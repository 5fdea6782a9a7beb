"""Delivery over the WebSocket: hint, ordered backlog, empty marker, live pushes, acks."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import pytest
from relay_testclient import Device, RelayClient, b64, drain_until_empty, new_mid, next_frame

from relay.store.base import Address, Envelope
from relay.wire import encode_send


async def test_hint_backlog_in_order_then_empty_then_live(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    mids = [new_mid() for _ in range(20)]
    for i, mid in enumerate(mids):
        assert (await client.send(alice, [bob], b"m%d" % i, mid)).status == 200
    ws = await client.ws(bob)
    hint = await next_frame(ws)
    assert hint == {"type": "hint", "waiting": 20}
    backlog = []
    for _ in range(20):
        backlog.append(await next_frame(ws))
    assert [m.message_id for m in backlog] == mids
    assert [m.body for m in backlog] == [b"m%d" % i for i in range(20)]
    assert all(a.seq < b.seq for a, b in itertools.pairwise(backlog))
    assert backlog[0].sender == Address(alice.user, 1)
    assert await next_frame(ws) == {"type": "empty"}
    live_mid = new_mid()
    await client.send(alice, [bob], b"live", live_mid)
    live = await next_frame(ws)
    assert live.message_id == live_mid and live.seq > backlog[-1].seq
    await ws.close()


async def test_disconnect_mid_drain_redelivers_unacked_in_order(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    mids = [new_mid() for _ in range(10)]
    for mid in mids:
        await client.send(alice, [bob], b"x", mid)
    ws = await client.ws(bob)
    await next_frame(ws)  # hint
    first = [await next_frame(ws) for _ in range(4)]
    # Ack two of them over the socket (with a ref so we know it committed), then drop.
    await ws.send_str(
        json.dumps({"type": "ack", "ids": [b64(m.message_id) for m in first[:2]], "ref": "a1"})
    )
    for _ in range(20):
        f = await next_frame(ws)
        if isinstance(f, dict) and f.get("type") == "acked":
            assert f == {"type": "acked", "ref": "a1", "count": 2}
            break
    await ws.close()
    ws2 = await client.ws(bob)
    again = await drain_until_empty(ws2)
    assert [m.message_id for m in again] == mids[2:]
    await ws2.close()


async def test_one_connection_per_device_old_one_closed_4001(client: RelayClient) -> None:
    bob = await client.new_device()
    ws1 = await client.ws(bob)
    await drain_until_empty(ws1)
    ws2 = await client.ws(bob)
    await drain_until_empty(ws2)
    closed = await ws1.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
    # The new connection gets live pushes.
    alice = await client.new_device()
    mid = new_mid()
    await client.send(alice, [bob], b"to new", mid)
    assert (await next_frame(ws2)).message_id == mid
    await ws1.close()
    await ws2.close()


async def test_send_over_websocket_pipelined(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    ws_a = await client.ws(alice)
    await drain_until_empty(ws_a)
    ws_b = await client.ws(bob)
    await drain_until_empty(ws_b)
    mids = [new_mid() for _ in range(50)]
    for i, mid in enumerate(mids):
        await ws_a.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"w%d" % i)))
    results = [await next_frame(ws_a) for _ in mids]
    assert {r["id"] for r in results} == {b64(m) for m in mids}
    assert all(r["type"] == "send_result" and r["status"] == 200 for r in results)
    got = [await next_frame(ws_b) for _ in mids]
    # Pipelined sends from one socket are committed and delivered in send order.
    assert [m.message_id for m in got] == mids
    # Errors come back as send_result with the HTTP error body; bad frames as error frames.
    ghost = Address(bob.user, 99)
    await ws_a.send_bytes(encode_send(Envelope(new_mid(), (ghost,), b"x")))
    r = await next_frame(ws_a)
    assert r["status"] == 409 and r["error"] == "mismatched_devices"
    await ws_a.send_bytes(b"\x07junk")
    assert (await next_frame(ws_a))["type"] == "error"
    await ws_a.send_str("{not json")
    assert (await next_frame(ws_a))["type"] == "error"
    await ws_a.close()
    await ws_b.close()


async def test_websocket_auth_rejected_before_upgrade(client: RelayClient) -> None:
    bob = await client.new_device()
    headers = client.sign(bob, "GET", "/v1/ws")
    headers["X-Blindpost-Nonce"] = "AAAAAAAAAAAAAAAAAAAAAA=="  # not what was signed
    try:
        await client.session.ws_connect(client.base + "/v1/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 401
    else:
        raise AssertionError("upgrade should be refused")


async def test_removed_device_socket_closed_4003(client: RelayClient) -> None:
    bob1 = await client.new_device()
    bob2 = await client.add_device(bob1, 2)
    ws = await client.ws(bob2)
    await drain_until_empty(ws)
    assert (await client.request(bob1, "DELETE", "/v1/devices/2")).status == 200
    closed = await ws.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4003
    await ws.close()


async def test_concurrent_sends_during_drain_lose_nothing(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    for _ in range(300):
        await client.send_binary(alice, [bob], b"pre")
    ws = await client.ws(bob)

    async def sender() -> list[bytes]:
        sent = []
        for _ in range(100):
            mid = new_mid()
            assert (await client.send_binary(alice, [bob], b"during", mid)).status == 200
            sent.append(mid)
        return sent

    task = asyncio.ensure_future(sender())
    seen = []
    empty_seen = False
    for _ in range(1000):
        f = await next_frame(ws)
        if isinstance(f, dict):
            if f["type"] == "empty":
                empty_seen = True
            continue
        seen.append(f)
        if len(seen) == 400:
            break
    sent = await task
    assert empty_seen
    seqs = [m.seq for m in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == 400
    assert [m.message_id for m in seen if m.body == b"during"] == sent
    await ws.close()


async def test_hint_is_first_even_if_client_talks_first_and_deep_json_is_an_error(
    client: RelayClient,
) -> None:
    bob = await client.new_device()
    ws = await client.ws(bob)
    await ws.send_str("[" * 100_000)  # before reading anything
    assert (await next_frame(ws))["type"] == "hint"
    frames = [await next_frame(ws) for _ in range(2)]
    assert sorted(f["type"] for f in frames) == ["empty", "error"]
    # The socket still works.
    alice = await client.new_device()
    mid = new_mid()
    await client.send(alice, [bob], b"after", mid)
    assert (await next_frame(ws)).message_id == mid
    await ws.close()
    r = await client.request(bob, "POST", "/v1/messages/ack", data=b"[" * 100_000)
    assert r.status == 400 and r.json()["error"] == "invalid_request"


def _auth_frame(client: RelayClient, dev: Device, **override: object) -> str:
    """The signed upgrade headers as a first-frame auth document (docs/relay-api.md 5)."""
    headers = client.sign(dev, "GET", "/v1/ws")
    doc: dict[str, object] = {"type": "auth"}
    doc.update({k.removeprefix("X-Blindpost-").lower(): v for k, v in headers.items()})
    doc.update(override)
    return json.dumps(doc)


async def _bare_ws(client: RelayClient) -> aiohttp.ClientWebSocketResponse:
    return await client.session.ws_connect(client.base + "/v1/ws", autoclose=False)


async def test_first_frame_auth_delivers_like_header_auth(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    waiting = new_mid()
    assert (await client.send(alice, [bob], b"queued", waiting)).status == 200
    ws = await _bare_ws(client)
    await ws.send_str(_auth_frame(client, bob))
    backlog = await drain_until_empty(ws)
    assert [m.message_id for m in backlog] == [waiting]
    live = new_mid()
    assert (await client.send(alice, [bob], b"live", live)).status == 200
    assert (await next_frame(ws)).message_id == live
    await ws.close()


async def test_first_frame_auth_refuses_bad_replayed_or_missing_auth(client: RelayClient) -> None:
    dev = await client.new_device()
    other = await client.new_device()
    good = _auth_frame(client, dev)
    cases = [
        _auth_frame(client, dev, signature=json.loads(_auth_frame(client, other))["signature"]),
        _auth_frame(client, dev, user=other.user),
        '{"type":"ack","ids":[]}',
        "not json",
    ]
    for frame in cases:
        ws = await _bare_ws(client)
        await ws.send_str(frame)
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401, (frame, msg)
        await ws.close()
    ws = await _bare_ws(client)
    await ws.send_str(good)
    assert (await next_frame(ws))["type"] == "hint"
    await ws.close()
    replay = await _bare_ws(client)
    await replay.send_str(good)  # the same nonce again
    msg = await replay.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401
    await replay.close()


async def test_no_auth_frame_in_time_closes_4401(relay_factory, session) -> None:
    relay = relay_factory({"header_timeout_seconds": "1"})
    client = RelayClient(relay.url, session)
    ws = await _bare_ws(client)
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401
    await ws.close()


async def test_a_sender_settles_its_sends_over_the_socket_and_over_http(
    client: RelayClient,
) -> None:
    """A delivered send's retry is answered from its dedupe record until the sender settles
    it (an ack frame's ``settled``, or the same field over HTTP); after that the relay has
    forgotten it, so the same id is stored anew. Malformed settle lists get a 400."""
    alice, bob = await client.new_device(), await client.new_device()
    by_ws, by_http = new_mid(), new_mid()
    for mid in (by_ws, by_http):
        first = await client.send(alice, [bob], b"once", mid)
        assert first.status == 200
        assert (await client.ack(bob, [mid])).json() == {"acked": 1}
        again = await client.send(alice, [bob], b"once", mid)
        assert again.status == 200 and again.json()["recipients"] == 1
        assert (await client.read(bob)).json()["messages"] == []  # the record answered

    ws = await client.ws(alice)
    await drain_until_empty(ws)
    await ws.send_str(json.dumps({"type": "ack", "settled": [b64(by_ws)], "ref": "s1"}))
    assert await next_frame(ws) == {"type": "acked", "ref": "s1", "count": 0}
    r = await client.request(
        alice, "POST", "/v1/messages/ack", json_body={"ids": [], "settled": [b64(by_http)]}
    )
    assert r.status == 200 and r.json() == {"acked": 0}
    for mid in (by_ws, by_http):
        assert (await client.send(alice, [bob], b"anew", mid)).status == 200
    assert [m["body"] for m in (await client.read(bob)).json()["messages"]] == [
        b64(b"anew"),
        b64(b"anew"),
    ]

    bad = [
        {"ids": [], "settled": []},
        {"settled": [b64(new_mid()) for _ in range(1001)]},
        {"settled": "AAAA"},
        {"settled": [b64(b"short")]},
    ]
    for body in bad:
        r = await client.request(alice, "POST", "/v1/messages/ack", json_body=body)
        assert r.status == 400, body
        await ws.send_str(json.dumps({"type": "ack", **body, "ref": "bad"}))
        frame = await next_frame(ws)
        assert frame["type"] == "error" and frame["error"] == "invalid_request", (body, frame)
        # The refusal names the ack it refuses, so the client fails that ack at once.
        assert frame["ref"] == "bad" and frame["status"] == 400, (body, frame)
    await ws.close()


@pytest.mark.parametrize("direct", ["1", "0"])
async def test_sends_and_acks_on_one_socket_are_taken_in_order(
    relay_factory, session, direct: str
) -> None:
    """With or without the direct frame path (ws_direct_frames): a socket's pipelined sends are
    answered in order, interleaved acks with refs are confirmed in order, a bad frame among
    them is refused without disturbing the rest, and every acked message is gone."""
    relay = relay_factory({"ws_direct_frames": direct, "send_burst": "1000"})
    client = RelayClient(relay.url, session)
    alice, bob = await client.new_device(), await client.new_device()
    ws_a, ws_b = await client.ws(alice), await client.ws(bob)
    await drain_until_empty(ws_a)
    await drain_until_empty(ws_b)
    n = 40
    mids = [new_mid() for _ in range(n)]
    for i, mid in enumerate(mids):
        await ws_a.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"o%d" % i)))
        if i == n // 2:
            await ws_a.send_bytes(b"\x07junk")
    answers = [await next_frame(ws_a) for _ in range(n + 1)]
    refused = [a for a in answers if a["type"] == "error"]
    assert [r["error"] for r in refused] == ["unknown_op"]
    assert [a["id"] for a in answers if a["type"] == "send_result"] == [b64(m) for m in mids]
    got = []
    for i in range(n):
        msg = await next_frame(ws_b)
        got.append(msg.message_id)
        await ws_b.send_str(
            json.dumps({"type": "ack", "ids": [b64(msg.message_id)], "ref": f"r{i}"})
        )
    assert got == mids
    acked = [await next_frame(ws_b) for _ in range(n)]
    assert acked == [{"type": "acked", "ref": f"r{i}", "count": 1} for i in range(n)]
    async with session.get(relay.url + "/metrics") as resp:
        text = await resp.text()
    direct_frames = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("blindpost_relay_ws_frames_direct_total ")
    )
    if direct == "1":
        assert direct_frames > 0  # the installed aiohttp gets the direct path
    else:
        assert direct_frames == 0
    for ws in (ws_a, ws_b):
        await ws.close()
    again = await client.ws(bob)
    assert await drain_until_empty(again) == []
    await again.close()
