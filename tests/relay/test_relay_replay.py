"""Replay inside the auth window is refused across restarts.

The attack of issue 13: a captured, validly signed ``DELETE /v1/devices/2`` replayed after the
user re-added device 2 removed the new device, once after every relay restart. The guard
conformance tests run every ``ReplayGuard`` implementation; the attack itself runs against real
relay processes (across relay nodes: tests/relay/test_relay_redis_nodes.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from relay_harness import RelayProcess
from relay_testclient import Device, RelayClient
from store_backends import pg_settings

from relay.errors import StorageError
from relay.replay import (
    REPLAY_KEY_LEN,
    REPLAY_SECRET_LEN,
    MemoryReplayGuard,
    PgReplayGuard,
    ReplayGuard,
    ReplayGuardFull,
    SqliteReplayGuard,
    load_replay_secret,
    replay_key,
)

K1, K2, K3 = (bytes([i]) * REPLAY_KEY_LEN for i in (1, 2, 3))


async def _open_guard(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> MemoryReplayGuard | SqliteReplayGuard | PgReplayGuard:
    if kind == "memory":
        return MemoryReplayGuard(max_entries=3)
    if kind == "sqlite":
        g: SqliteReplayGuard | PgReplayGuard = SqliteReplayGuard(
            tmp_path / "replay.sqlite3", max_entries=3
        )
    else:
        request.getfixturevalue("postgres_test_dsn")
        g = PgReplayGuard(pg_settings(tmp_path))
    await g.open()
    return g


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def guard(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReplayGuard]:
    """Every guard that takes the caller's clock (the Redis one uses Redis's own expiry:
    tests/relay/test_relay_redis_state.py)."""
    g = await _open_guard(request.param, request, tmp_path)
    yield g
    if not isinstance(g, MemoryReplayGuard):
        await g.close()


@pytest.fixture(params=["memory", "sqlite"])
async def bounded_guard(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ReplayGuard]:
    """The guards that bound their entries (``nonce_cache_max``); PostgreSQL's disk bounds the
    shared one."""
    g = await _open_guard(request.param, request, tmp_path)
    yield g
    if not isinstance(g, MemoryReplayGuard):
        await g.close()


async def test_a_key_is_claimed_once_until_it_expires(guard: ReplayGuard) -> None:
    assert await guard.claim(K1, expires_at_ms=1000, now_ms=0)
    assert not await guard.claim(K1, expires_at_ms=1000, now_ms=999)
    assert await guard.claim(K2, expires_at_ms=1000, now_ms=999)  # another key is independent
    assert await guard.claim(K1, expires_at_ms=5000, now_ms=1001)  # expired: a fresh claim


async def test_concurrent_claims_of_one_key_let_exactly_one_through(guard: ReplayGuard) -> None:
    results = await asyncio.gather(*(guard.claim(K1, 1000, 0) for _ in range(20)))
    assert results.count(True) == 1


async def test_a_full_guard_refuses_rather_than_forgets(bounded_guard: ReplayGuard) -> None:
    guard = bounded_guard
    for key in (K1, K2, K3):
        assert await guard.claim(key, 1000, 0)
    with pytest.raises(ReplayGuardFull) as err:
        await guard.claim(b"\x04" * REPLAY_KEY_LEN, 1000, 0)
    assert err.value.status == 503
    assert not await guard.claim(K1, 1000, 10)  # nothing was dropped to make room
    # Once the keys expire there is room again (the SQLite guard sweeps at most once a second).
    assert await guard.claim(b"\x04" * REPLAY_KEY_LEN, 9000, 2000)


async def test_postgres_guard_is_shared_by_nodes_with_one_secret(
    postgres_test_dsn: str, tmp_path: Path
) -> None:
    a, b = PgReplayGuard(pg_settings(tmp_path)), PgReplayGuard(pg_settings(tmp_path))
    await a.open()
    await b.open()
    try:
        assert await a.claim(K1, 5000, 0)
        assert not await b.claim(K1, 5000, 10)  # claimed through another node
        first, second = await asyncio.gather(a.shared_secret(), b.shared_secret())
        assert first == second and len(first) == REPLAY_SECRET_LEN
        assert await a.ready() is None
    finally:
        await a.close()
        await b.close()
    assert await a.ready() == "replay guard is closed"


async def test_sqlite_guard_is_shared_by_connections_and_survives_reopening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "replay.sqlite3"
    a, b = SqliteReplayGuard(path, 100), SqliteReplayGuard(path, 100)
    await a.open()
    await b.open()
    assert await a.claim(K1, 1000, 0)
    assert not await b.claim(K1, 1000, 0)  # another process on the same file
    await a.close()
    await b.close()
    reopened = SqliteReplayGuard(path, 100)
    await reopened.open()
    assert not await reopened.claim(K1, 1000, 0)
    await reopened.close()
    with pytest.raises(StorageError):
        await reopened.claim(K2, 1000, 0)


def test_processes_starting_together_share_one_whole_secret(tmp_path: Path) -> None:
    """Workers start together: none may read a secret file another has not written yet."""
    path = tmp_path / "replay.key"
    code = (
        "import sys; from pathlib import Path; from relay.replay import load_replay_secret;"
        "sys.stdout.write(load_replay_secret(Path(sys.argv[1])).hex())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
        for _ in range(8)
    ]
    secrets = {p.communicate(timeout=60)[0] for p in procs}
    assert [p.returncode for p in procs] == [0] * 8
    assert secrets == {load_replay_secret(path).hex().encode()}
    assert [p.name for p in tmp_path.iterdir()] == ["replay.key"]  # no temporary left


def test_keys_are_keyed_digests_not_nonces(tmp_path: Path) -> None:
    secret = load_replay_secret(tmp_path / "replay.key")
    assert load_replay_secret(tmp_path / "replay.key") == secret  # created once, then read
    assert (tmp_path / "replay.key").stat().st_mode & 0o777 == 0o600
    nonce = "N" * 24
    key = replay_key(secret, "alice", 1, nonce)
    assert len(key) == REPLAY_KEY_LEN and nonce.encode() not in key
    assert key != replay_key(secret, "alice", 2, nonce)
    assert key != replay_key(secret, "bob", 1, nonce)
    assert key != replay_key(os.urandom(32), "alice", 1, nonce)


# -- the attack, against real relay processes --------------------------------------------


async def captured_delete(client: RelayClient, alice: Device) -> dict[str, str]:
    """Remove device 2 with a signed request and return that request's headers (captured)."""
    headers = client.sign(alice, "DELETE", "/v1/devices/2")
    async with client.session.delete(client.base + "/v1/devices/2", headers=headers) as resp:
        assert resp.status == 200, await resp.read()
    return headers


async def replay(client: RelayClient, headers: dict[str, str]) -> tuple[int, str]:
    async with client.session.delete(client.base + "/v1/devices/2", headers=headers) as resp:
        doc = await resp.json()
        return resp.status, str(doc.get("error"))


async def device_ids(client: RelayClient, alice: Device) -> list[int]:
    reply = await client.request(alice, "GET", "/v1/devices")
    return [d["device_id"] for d in reply.json()["devices"]]


async def test_replay_after_a_restart_is_refused(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    await client.add_device(alice, 2)
    captured = await captured_delete(client, alice)
    await client.add_device(alice, 2)  # the user re-adds device 2
    for crash in (False, True):
        relay.restart(crash=crash)
        await session.close()
        session = aiohttp.ClientSession()
        client = RelayClient(relay.url, session)
        assert await replay(client, captured) == (401, "auth_replay")
        assert await device_ids(client, alice) == [1, 2]
    await session.close()
