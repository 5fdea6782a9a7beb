"""The transport against a real relay process on 127.0.0.1 (see conftest.py).

Each test uses fresh usernames on the shared relay; tests that stop or reconfigure a relay
start their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import (
    AuthFailed,
    BlobDigestMismatch,
    DeviceRemoved,
    InvalidRequest,
    MismatchedDevices,
    NotFound,
    PredecessorMissing,
    Replaced,
    UsernameTaken,
)
from e2ee.transport.frames import Delivery, Hint, QueueEmpty, SendResult
from e2ee.transport.http import RelayClient
from e2ee.transport.ws import ConnectionState, RelayConnection

Factory = Callable[..., RelayClient]
WAIT = 10.0  # upper bound for any single awaited event; tests never sleep


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def key_upload(otpk_ids: list[int]) -> dict[str, Any]:
    """A syntactically valid key upload (the relay is blind: lengths are all it checks)."""
    return {
        "identity_key": b64(b"\x05" + os.urandom(32)),
        "registration_id": 1234,
        "signed_prekey": {
            "id": 1,
            "public_key": b64(b"\x05" + os.urandom(32)),
            "signature": b64(os.urandom(64)),
        },
        "one_time_prekeys": [
            {"id": i, "public_key": b64(b"\x05" + os.urandom(32))} for i in otpk_ids
        ],
    }


async def next_of(conn: RelayConnection, kind: type, *, skip: tuple[type, ...] = ()) -> Any:
    """The next event of type ``kind``; non-final states and ``skip`` types are passed over,
    anything else fails the test."""
    async with asyncio.timeout(WAIT):
        while True:
            event = await conn.next_event()
            if isinstance(event, kind):
                return event
            if isinstance(event, skip) or (
                isinstance(event, ConnectionState) and event.state != "closed"
            ):
                continue
            raise AssertionError(f"expected {kind.__name__}, got {event!r}")


async def until_state(conn: RelayConnection, state: str) -> ConnectionState:
    async with asyncio.timeout(WAIT):
        while True:
            event = await conn.next_event()
            if isinstance(event, ConnectionState) and event.state == state:
                return event


@pytest.fixture
async def pair(
    device: Factory, new_user: Callable[[], str]
) -> AsyncIterator[tuple[RelayClient, RelayClient]]:
    alice, bob = device(new_user()), device(new_user())
    await alice.register()
    await bob.register()
    yield alice, bob


async def test_health_and_accounts(device: Factory, new_user: Callable[[], str]) -> None:
    name = new_user()
    first = device(name, 1)
    assert await first.healthz() is True
    registered = await first.register()
    assert (registered.username, registered.device_id) == (name, 1)

    second_signer = DeviceSigner.from_seed(os.urandom(32), name, 2)
    added = await first.add_device(2, second_signer.public_key)
    assert added.device_id == 2
    devices = await first.list_devices()
    assert [d.device_id for d in devices] == [1, 2]
    assert not any(d.has_keys for d in devices)

    with pytest.raises(UsernameTaken) as taken:
        await device(name, 3).register()
    assert taken.value.status == 409 and taken.value.code == "username_taken"

    assert await first.remove_device(2) is True
    with pytest.raises(NotFound):
        await first.remove_device(2)


async def test_keys_and_one_time_prekey_handed_out_once(
    pair: tuple[RelayClient, RelayClient],
) -> None:
    alice, bob = pair
    assert await alice.upload_keys(key_upload([7, 8])) == 2
    assert await alice.key_count() == 2
    seen = []
    for _ in range(3):
        bundles = await bob.fetch_bundles(alice.username)
        assert [b["device_id"] for b in bundles] == [1]
        otpk = bundles[0]["one_time_prekey"]
        seen.append(None if otpk is None else otpk["id"])
    assert sorted(seen[:2]) == [7, 8]  # each one-time prekey exactly once...
    assert seen[2] is None  # ...then the pool is empty
    assert await alice.key_count() == 0
    single = await bob.fetch_bundles(alice.username, 1)
    assert single[0]["signed_prekey"]["id"] == 1
    with pytest.raises(NotFound) as missing:
        await bob.fetch_bundles(alice.username, 5)
    assert missing.value.code == "unknown_device"


async def test_message_over_http_then_websocket_ack_and_reconnect(
    pair: tuple[RelayClient, RelayClient],
) -> None:
    alice, bob = pair
    mid = os.urandom(16)
    receipt = await alice.send(mid, [(bob.username, 1)], b"ciphertext-1")
    assert receipt.id == mid and receipt.recipients == 1
    again = await alice.send(mid, [(bob.username, 1)], b"ciphertext-1")  # idempotent retry
    assert again.stored_at == receipt.stored_at

    async with RelayConnection.from_client(bob) as conn:
        assert await next_of(conn, Hint) == Hint(1)
        delivery = await next_of(conn, Delivery)
        assert (delivery.id, delivery.sender, delivery.device, delivery.body) == (
            mid,
            alice.username,
            1,
            b"ciphertext-1",
        )
        assert delivery.stored_at == receipt.stored_at
        assert isinstance(await next_of(conn, QueueEmpty), QueueEmpty)
        ack = await conn.ack([delivery.id])
        async with asyncio.timeout(WAIT):
            assert await ack == 1

    async with RelayConnection.from_client(bob) as conn:
        assert await next_of(conn, Hint) == Hint(0)  # acked: nothing comes back
        assert isinstance(await next_of(conn, QueueEmpty), QueueEmpty)


async def test_live_send_over_websocket(pair: tuple[RelayClient, RelayClient]) -> None:
    alice, bob = pair
    async with (
        RelayConnection.from_client(alice) as a_conn,
        RelayConnection.from_client(bob) as b_conn,
    ):
        await next_of(b_conn, QueueEmpty, skip=(Hint,))
        await a_conn.wait_connected()
        mids = [os.urandom(16) for _ in range(20)]
        futures = [await a_conn.send(m, [(bob.username, 1)], m * 2) for m in mids]  # pipelined
        async with asyncio.timeout(WAIT):
            receipts = await asyncio.gather(*futures)
        assert [r.id for r in receipts] == mids
        got = [await next_of(b_conn, Delivery) for _ in mids]
        assert {d.id for d in got} == set(mids)
        assert all(d.body == d.id * 2 for d in got)
        assert [d.seq for d in got] == sorted(d.seq for d in got)
        async with asyncio.timeout(WAIT):
            assert await (await b_conn.ack([d.id for d in got])) == len(mids)
        # the send_result events are surfaced too
        results = []
        while len(results) < len(mids):
            event = await a_conn.next_event()
            if isinstance(event, SendResult):
                results.append(event)
        assert all(r.ok for r in results)


async def test_mismatched_devices_http_and_websocket(
    pair: tuple[RelayClient, RelayClient],
    device: Factory,
) -> None:
    alice, bob = pair
    bob2 = DeviceSigner.from_seed(os.urandom(32), bob.username, 2)
    await bob.add_device(2, bob2.public_key)
    with pytest.raises(MismatchedDevices) as exc:
        await alice.send(
            os.urandom(16),
            [(bob.username, 1), (bob.username, 9), ("nobody_" + bob.username[:20], 1)],
            b"x",
        )
    assert exc.value.missing_devices == {bob.username: (2,)}
    assert exc.value.stale_devices == {bob.username: (9,)}
    assert exc.value.unknown_users == ("nobody_" + bob.username[:20],)

    async with RelayConnection.from_client(alice) as conn:
        await conn.wait_connected()
        fut = await conn.send(os.urandom(16), [(bob.username, 1)], b"x")
        with pytest.raises(MismatchedDevices) as exc2:
            async with asyncio.timeout(WAIT):
                await fut
        assert exc2.value.missing_devices == {bob.username: (2,)}


async def test_pipelined_sends_behind_a_refused_one_are_refused_and_keep_order(
    pair: tuple[RelayClient, RelayClient],
) -> None:
    """SEND_AFTER on a real relay: pipelined behind a send the relay refuses (a stale
    device list), each later one (naming the one before it) is refused too and stored
    nothing; sent again in order, the mailbox holds them in sending order. Over HTTP too."""
    alice, bob = pair
    async with (
        RelayConnection.from_client(alice) as a_conn,
        RelayConnection.from_client(bob) as b_conn,
    ):
        await next_of(b_conn, QueueEmpty, skip=(Hint,))
        await a_conn.wait_connected()
        to_bob = [(bob.username, 1)]
        first, refused, *rest = [os.urandom(16) for _ in range(6)]
        chain = [first, refused, *rest]
        futures = [await a_conn.send(first, to_bob, b"0")]
        futures.append(await a_conn.send(refused, [(bob.username, 9)], b"1", after=first))
        for before, mid in zip(chain[1:], rest, strict=False):
            futures.append(await a_conn.send(mid, to_bob, b"n", after=before))
        async with asyncio.timeout(WAIT):
            answers = await asyncio.gather(*futures, return_exceptions=True)
        assert not isinstance(answers[0], BaseException)
        assert isinstance(answers[1], MismatchedDevices)
        assert all(isinstance(a, PredecessorMissing) and a.retryable for a in answers[2:])
        # Again, in order: the fixed one, then the rest, still pipelined.
        futures = [await a_conn.send(refused, to_bob, b"1", after=first)]
        for before, mid in zip(chain[1:], rest, strict=False):
            futures.append(await a_conn.send(mid, to_bob, b"n", after=before))
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*futures)
        got = [await next_of(b_conn, Delivery) for _ in chain]
        assert [d.id for d in got] == chain
    # The HTTP send body is the same frame.
    with pytest.raises(PredecessorMissing):
        await alice.send(os.urandom(16), to_bob, b"x", after=os.urandom(16))
    await alice.send(os.urandom(16), to_bob, b"x", after=rest[-1])


async def test_http_mailbox_fetch_and_ack(pair: tuple[RelayClient, RelayClient]) -> None:
    alice, bob = pair
    mids = [os.urandom(16) for _ in range(5)]
    for i, m in enumerate(mids):
        await alice.send(
            m, [(bob.username, 1)], bytes([i]) * 10, encoding="json" if i % 2 else "binary"
        )
    page = await bob.fetch_messages(limit=3)
    assert page.more and [d.id for d in page.messages] == mids[:3]
    rest = [d async for d in bob.fetch_all_messages(limit=2)]
    assert [d.id for d in rest] == mids
    assert [d.body for d in rest] == [bytes([i]) * 10 for i in range(5)]
    assert await bob.ack(mids) == 5
    assert await bob.ack(mids) == 0  # idempotent
    assert (await bob.fetch_messages()).messages == ()


async def test_stale_timestamp_is_auth_failed(device: Factory, new_user: Callable[[], str]) -> None:
    name = new_user()
    good = device(name)
    await good.register()
    ten_minutes_ago = lambda: time.time_ns() // 1_000_000 - 600_000  # noqa: E731
    skewed = RelayClient(good.base_url, name, 1, good.signer, clock_ms=ten_minutes_ago)
    try:
        with pytest.raises(AuthFailed) as exc:
            await skewed.key_count()
        assert exc.value.status == 401 and exc.value.code == "auth_stale" and exc.value.stale
        # The WebSocket gives up on refused auth instead of retrying forever: a refused
        # auth frame (close 4401, the default) and a refused signed upgrade (401) alike.
        for frame_auth in (True, False):
            conn = RelayConnection(
                good.base_url, good.signer, clock_ms=ten_minutes_ago, frame_auth=frame_auth
            )
            async with conn:
                closed = await until_state(conn, "closed")
            assert isinstance(closed.error, AuthFailed), frame_auth
            assert closed.error.status == 401
    finally:
        await skewed.close()
    unknown = device(new_user())  # never registered
    with pytest.raises(AuthFailed) as exc2:
        await unknown.key_count()
    assert exc2.value.code == "auth_invalid"


@pytest.mark.parametrize("frame_auth", [True, False], ids=["auth-frame", "auth-headers"])
async def test_both_auth_modes_get_hint_backlog_and_live_pushes(
    pair: tuple[RelayClient, RelayClient], frame_auth: bool
) -> None:
    alice, bob = pair
    await alice.send(os.urandom(16), [(bob.username, 1)], b"queued")
    conn = RelayConnection(bob.base_url, bob.signer, frame_auth=frame_auth)
    async with conn:
        assert await next_of(conn, Hint) == Hint(1)  # the relay's first frame, in both modes
        assert (await next_of(conn, Delivery)).body == b"queued"
        assert isinstance(await next_of(conn, QueueEmpty), QueueEmpty)
        await alice.send(os.urandom(16), [(bob.username, 1)], b"live")
        assert (await next_of(conn, Delivery)).body == b"live"


async def test_second_connection_replaces_first(pair: tuple[RelayClient, RelayClient]) -> None:
    _, bob = pair
    async with RelayConnection.from_client(bob) as first:
        await first.wait_connected()
        async with RelayConnection.from_client(bob) as second:
            closed = await until_state(first, "closed")
            assert closed.close_code == 4001 and isinstance(closed.error, Replaced)
            await second.wait_connected()
            assert second.connected and not first.connected


async def test_removed_device_stops(pair: tuple[RelayClient, RelayClient]) -> None:
    alice, _ = pair
    async with RelayConnection.from_client(alice) as conn:
        await conn.wait_connected()
        await alice.remove_device(1)
        closed = await until_state(conn, "closed")
        assert closed.close_code == 4003 and isinstance(closed.error, DeviceRemoved)


async def test_relay_restart_reconnects_and_replays_backlog(
    start_relay: Callable[..., Any],
    tmp_path: Path,
    new_user: Callable[[], str],
) -> None:
    relay = start_relay()
    async with (
        RelayClient(
            relay.url, (a := new_user()), 1, DeviceSigner.from_seed(os.urandom(32), a, 1)
        ) as alice,
        RelayClient(
            relay.url, (b := new_user()), 1, DeviceSigner.from_seed(os.urandom(32), b, 1)
        ) as bob,
    ):
        await alice.register()
        await bob.register()
        delays: list[float] = []
        restarted = asyncio.Event()

        async def fake_sleep(delay: float) -> None:
            delays.append(delay)
            await restarted.wait()  # "sleep" until the relay is back

        conn = RelayConnection.from_client(
            bob, sleep=fake_sleep, random=lambda: 0.5, backoff_base=1.0
        )
        async with conn:
            await next_of(conn, QueueEmpty, skip=(Hint,))
            await asyncio.to_thread(relay.stop)  # graceful shutdown closes with 1001
            state = await until_state(conn, "reconnecting")
            assert state.close_code == 1001 and state.attempt == 1 and state.delay == 0.5
            await asyncio.to_thread(relay.start)  # same port, same data directory
            mid = os.urandom(16)
            await alice.send(mid, [(b, 1)], b"while-away")
            restarted.set()
            await until_state(conn, "connected")
            assert await next_of(conn, Hint) == Hint(1)
            assert (await next_of(conn, Delivery)).id == mid
        assert delays == [0.5]
        relay.stop()


# -- blobs --------------------------------------------------------------------------------------


async def test_blob_upload_and_resumed_download(
    device: Factory,
    new_user: Callable[[], str],
    tmp_path: Path,
) -> None:
    client = device(new_user())
    await client.register()
    data = os.urandom(3 * 1024 * 1024 + 123)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    progress: list[tuple[int, int | None]] = []
    info = await client.upload_blob(src, progress=lambda d, t: progress.append((d, t)))
    assert (info.id, info.size, info.created) == (digest, len(data), True)
    assert progress[-1] == (len(data), len(data))
    assert len(progress) > 1  # streamed in chunks

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    again = await client.upload_blob(chunks(), sha256=digest)
    assert again.id == digest and not again.created  # content-addressed: stored once

    dest = tmp_path / "dest.bin"
    assert await client.download_blob(digest, dest) == len(data)
    assert dest.read_bytes() == data

    # Resume: keep the first 1 MiB + 7 bytes, download only the rest.
    dest.write_bytes(data[: 1024 * 1024 + 7])
    seen: list[int] = []
    assert await client.download_blob(digest, dest, progress=lambda d, t: seen.append(d)) == len(
        data
    )
    assert dest.read_bytes() == data
    assert seen[0] > 1024 * 1024 + 7 and seen[-1] == len(data)

    # Already complete: nothing to fetch (416 with the size), still verified.
    assert await client.download_blob(digest, dest) == len(data)

    # A corrupted partial file is caught by the content address and removed.
    dest.write_bytes(b"\x00" * 10)
    with pytest.raises(BlobDigestMismatch):
        await client.download_blob(digest, dest)
    assert not dest.exists()
    assert await client.download_blob(digest, dest) == len(data)  # the retry starts over


async def test_blob_errors(device: Factory, new_user: Callable[[], str], tmp_path: Path) -> None:
    client = device(new_user())
    await client.register()
    with pytest.raises(NotFound):
        await client.download_blob("0" * 64, tmp_path / "x")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"not what was signed"

    with pytest.raises(InvalidRequest) as exc:
        await client.upload_blob(chunks(), sha256="ab" * 32)
    assert exc.value.code == "digest_mismatch"
