"""Slow and abandoned request bodies cannot hold the relay's connections (issue 13, item 2).

The attack: many connections each send ``PUT /v1/messages`` with ``Content-Length: 1000000`` and
then one byte every so often. Every one must be closed by the body deadline
(``body_timeout_seconds`` + bytes / ``body_min_bytes_per_second``) or refused up front (per-address
cap on unauthenticated bodies), other clients keep working meanwhile, and nothing logs a
traceback. Run against a real relay process with small settings; the 1,000-socket version is
``bench/relay_abuse.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable

import aiohttp
from relay_harness import RelayProcess
from relay_testclient import Device, RelayClient, b64, new_mid

SLOW = {
    "body_timeout_seconds": "1",
    "body_min_bytes_per_second": "1000",
    "unauthenticated_bodies_per_address": "8",
}
SOCKETS = 50
CEILING = 60.0  # generous bound on a busy machine; the deadline itself is about 1 s


def request_head(client: RelayClient, dev: Device, length: int, **extra: str) -> bytes:
    headers = client.sign(dev, "PUT", "/v1/messages", b"x" * 0)  # signature checked after
    headers.update(extra)
    lines = [
        "PUT /v1/messages HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def trickle(port: int, head: bytes, stop: asyncio.Event) -> tuple[int | None, float]:
    """Send ``head`` then one body byte every 0.3 s until the relay closes the connection.

    Returns:
        (the status of the response the relay sent, if any; seconds until it closed).
    """
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"{")
    data = b""

    async def read_all() -> None:
        nonlocal data
        while chunk := await reader.read(4096):
            data += chunk

    reading = asyncio.ensure_future(read_all())
    try:
        while not reading.done() and not stop.is_set():
            try:
                writer.write(b" ")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait([reading], timeout=0.3)
        await asyncio.wait_for(reading, CEILING)
    except ConnectionError:
        pass
    finally:
        writer.close()
    elapsed = time.monotonic() - start
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, elapsed


async def test_slow_bodies_are_all_closed_and_others_keep_working(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory(SLOW)
    client = RelayClient(relay.url, session)
    attacker = await client.new_device("mallory")
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    stop = asyncio.Event()
    started = time.monotonic()
    heads = [request_head(client, attacker, 1_000_000) for _ in range(SOCKETS)]
    slow = [asyncio.ensure_future(trickle(relay.port, h, stop)) for h in heads]
    # While they trickle, clients from other addresses are served (the attacker's own address
    # has its slots taken: a body from it may get 429 until they are cut off).
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as elsewhere:
        other = RelayClient(relay.url, elsewhere)
        assert (await other.send(alice, [bob], b"still here")).status == 200
        reply = await other.read(bob)
        assert [m["body"] for m in reply.json()["messages"]] == ["c3RpbGwgaGVyZQ=="]
    done, pending = await asyncio.wait(slow, timeout=CEILING)
    stop.set()
    assert not pending, f"{len(pending)} slow sockets still open after {CEILING} s"
    results = [t.result() for t in done]
    statuses = sorted(s for s, _ in results if s is not None)
    # Up to 8 bodies were read (then cut off: 408); the rest were refused before their body.
    assert set(statuses) <= {408, 429}, statuses
    assert statuses.count(408) <= 8
    assert statuses.count(429) >= SOCKETS - 8
    assert time.monotonic() - started < CEILING
    # Still serving, and no traceback for any of it.
    assert (await client.send(alice, [bob], b"after")).status == 200
    assert "Traceback" not in relay.log_text()
    assert "body too slow" in relay.log_text()


async def test_abandoned_bodies_log_no_traceback(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory(SLOW)
    client = RelayClient(relay.url, session)
    dev = await client.new_device("quitter")
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(request_head(client, dev, 1000) + b'{"id":')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    # A request after them is served, which also means the relay handled the five.
    assert (await client.request(dev, "GET", "/v1/devices")).status == 200
    deadline = time.monotonic() + CEILING
    while relay.log_text().count("abandoned") < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert relay.log_text().count("abandoned") == 5
    assert "Traceback" not in relay.log_text()


async def status_before_body(port: int, head: bytes) -> int:
    """Send only the head of a request with a large body; return the status answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        line = await asyncio.wait_for(reader.readline(), CEILING)
        return int(line.split(b" ", 2)[1])
    finally:
        writer.close()


async def test_everything_checkable_is_checked_before_the_body(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory(SLOW)
    client = RelayClient(relay.url, session)
    dev = await client.new_device("early")
    port = relay.port
    # No body byte is ever sent: each answer comes from the headers alone.
    assert await status_before_body(port, request_head(client, dev, 2_000_000)) == 413
    ghost = Device("nobody_here")
    assert await status_before_body(port, request_head(client, ghost, 1000)) == 401
    stale = request_head(client, dev, 1000, **{"X-Blindpost-Timestamp": "1"})
    assert await status_before_body(port, stale) == 401
    no_sig = request_head(client, dev, 1000).replace(b"X-Blindpost-Signature", b"X-Other")
    assert await status_before_body(port, no_sig) == 401
    # With the body's digest declared, a wrong signature is refused before the body too.
    declared = request_head(client, dev, 1000, **{"X-Blindpost-Content-SHA256": "0" * 64})
    assert await status_before_body(port, declared) == 401


def test_new_settings_are_validated() -> None:
    from relay.config import ConfigError, RelayConfig

    for bad in (
        {"body_timeout_seconds": "0"},
        {"body_min_bytes_per_second": "0"},
        {"unauthenticated_bodies_per_address": "0"},
        {"startup_check_seconds": "-1"},
        {"replay_guard": "nowhere"},
        {"nonce_cache_max": "-5"},
    ):
        try:
            RelayConfig.load(env={}, overrides=bad)
        except ConfigError as exc:
            assert next(iter(bad)) in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    ok = RelayConfig.load(env={}, overrides={"replay_guard": "memory", "startup_check_seconds": 0})
    assert ok.replay_guard == "memory" and ok.startup_check_seconds == 0


async def test_replayed_headers_with_a_declared_digest_are_refused_before_the_body(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory(SLOW)
    client = RelayClient(relay.url, session)
    dev = await client.new_device("replayer")
    body = json.dumps({"ids": [b64(new_mid())]}).encode()
    digest = hashlib.sha256(body).hexdigest()
    headers = client.sign(dev, "POST", "/v1/messages/ack", body_sha256=digest)
    headers["X-Blindpost-Content-SHA256"] = digest
    headers["Content-Type"] = "application/json"
    async with session.post(relay.url + "/v1/messages/ack", data=body, headers=headers) as resp:
        assert resp.status == 200
    # The captured headers again, as many times as the attacker likes: each is refused from the
    # headers alone (no body byte sent), so none of them holds a connection.
    lines = ["POST /v1/messages/ack HTTP/1.1", "Host: 127.0.0.1", "Content-Length: 1000"]
    head = ("\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n").encode()
    for _ in range(20):
        assert await status_before_body(relay.port, head) == 401
