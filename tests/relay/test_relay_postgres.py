"""The PostgreSQL store beyond the shared conformance suite: migrations, several nodes on one
database (seq order, quotas, one-time prekeys, one sweeper), typed errors while PostgreSQL is
down, secrets kept out of logs, and a real relay process on ``store=postgres``.

Every test runs against the real server (tests/backend_servers.py); each store works in a
schema of its own inside the session's database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import backend_servers
import pytest
from aiohttp.test_utils import TestClient, TestServer
from relay_harness import QUIET, start_relay
from relay_testclient import Device, RelayClient, b64, new_username, next_frame
from store_backends import pg_settings

import relay.store.pg_common as pg_common
from blindpost_wire.registration import solve_pow
from relay.app import create_app, sweep_once
from relay.config import RelayConfig
from relay.errors import MailboxFull, StorageError
from relay.state import STATE_KEY, Clock
from relay.store.base import (
    Address,
    Envelope,
    KeyUpload,
    OneTimePrekey,
    SignedPrekey,
    StoreLimits,
)
from relay.store.pg_common import MIGRATIONS, SCHEMA_VERSION, PgSettings, lock_key
from relay.store.postgres import PostgresRelayStore

pytestmark = pytest.mark.usefixtures("postgres_test_dsn")

DAY = 86_400_000
A = Address("alice", 1)
B = Address("bob", 1)


def env(body: bytes = b"x", to: tuple[Address, ...] = (B,)) -> Envelope:
    return Envelope(os.urandom(16), to, body)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[PostgresRelayStore, PostgresRelayStore]]:
    """Two stores on one schema, as two relay nodes on one database would be."""
    lim = StoreLimits(mailbox_max_messages=1000)
    one = PostgresRelayStore(pg_settings(tmp_path), lim)
    two = PostgresRelayStore(pg_settings(tmp_path), lim)
    await one.open()
    await two.open()
    await one.create_account(A, b"a" * 32, 0)
    await one.create_account(B, b"b" * 32, 0)
    yield one, two
    await one.close()
    await two.close()


async def test_migrations_from_an_empty_database_and_again_on_reopen(tmp_path: Path) -> None:
    settings = pg_settings(tmp_path)
    store = PostgresRelayStore(settings)
    await store.open()
    await store.create_account(A, b"a" * 32, 0)
    await store.close()
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(f"SET search_path = {settings.schema}")
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [v for v, _ in MIGRATIONS] and versions[-1] == SCHEMA_VERSION
        again = PostgresRelayStore(settings)  # applies nothing, keeps the data
        await again.open()
        assert await again.auth_key(A) == b"a" * 32
        await again.close()
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)
        # A database migrated by a newer relay is refused, not guessed at.
        await conn.execute("INSERT INTO schema_migrations(version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    newer = PostgresRelayStore(settings)
    with pytest.raises(StorageError, match="newer"):
        await newer.open()


async def _rows_naming(conn: asyncpg.Connection, schema: str, needle: str) -> dict[str, int]:
    """Per table of ``schema``: rows whose text form contains ``needle`` (any column)."""
    tables = [
        r[0]
        for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    ]
    found: dict[str, int] = {}
    for table in tables:
        n = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}"."{table}" t WHERE strpos(t::text, $1) > 0',
            needle,
        )
        if n:
            found[table] = int(n)
    return found


async def test_delivered_messages_leave_no_row_naming_their_sender(tmp_path: Path) -> None:
    """After every recipient acked and a sweep ran, no row of any table names the sender but
    its account row and the (timeless) "has written to" relation of the mailbox shares; no
    row holds a message id or a body. Queued, the messages did name it."""
    settings = pg_settings(tmp_path)
    store = PostgresRelayStore(settings, StoreLimits(dedupe_window_ms=DAY))
    await store.open()
    sender, carol = Address("zq-sender-7f3a", 3), Address("carol", 1)
    conn = await asyncpg.connect(settings.dsn)
    try:
        for who in (sender, B, carol):
            await store.create_account(who, b"k" * 32, 0)
        envs = [env(b"body-%03d" % i, (B, carol)) for i in range(20)]
        receipts = [await store.submit_send(sender, e, 1000 + i) for i, e in enumerate(envs)]
        queued = await _rows_naming(conn, settings.schema, sender.user)
        assert queued.get("messages") == 20 and "account_bytes" in queued
        await store.ack(B, [e.message_id for e in envs])
        await store.ack(carol, [e.message_id for e in envs])
        await store.sweep(2000)
        assert await _rows_naming(conn, settings.schema, sender.user) == {
            "users": 1,
            "wrote_to": 2,
        }
        for e in envs:
            hexid = "\\x" + e.message_id.hex()
            assert await _rows_naming(conn, settings.schema, hexid) == {}
        assert await conn.fetchval(f'SELECT count(*) FROM "{settings.schema}".dedupe') == 20
        retry = await store.submit_send(sender, envs[0], 3000)  # still deduplicated
        assert retry.recipients == receipts[0].recipients == 2
        assert await store.mailbox_count(B) == 0
    finally:
        await conn.close()
        await store.close()


async def test_a_sweep_vacuums_the_queue_tables(tmp_path: Path) -> None:
    """Every delivered message leaves dead row versions in messages, mailbox and dedupe; the
    sweep vacuums those tables itself (the test server runs without autovacuum, as some do)."""
    settings = pg_settings(tmp_path)
    store = PostgresRelayStore(settings)
    await store.open()
    conn = await asyncpg.connect(settings.dsn)

    async def vacuumed() -> set[str]:
        rows = await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = $1 "
            "AND (last_vacuum IS NOT NULL OR last_autovacuum IS NOT NULL)",
            settings.schema,
        )
        return {str(r[0]) for r in rows}

    try:
        await store.create_account(A, b"a" * 32, 0)
        await store.create_account(B, b"b" * 32, 0)
        envs = [env(b"m") for _ in range(20)]
        for e in envs:
            await store.submit_send(A, e, 1)
        await store.ack(B, [e.message_id for e in envs])
        await store.sweep(2)
        deadline = asyncio.get_running_loop().time() + 30
        while not {"messages", "mailbox", "dedupe"} <= await vacuumed():
            assert asyncio.get_running_loop().time() < deadline, await vacuumed()
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
        await store.close()


async def test_schema_4_tombstones_are_dropped_by_the_dedupe_migration(tmp_path: Path) -> None:
    """A database of schema 4 keeps delivered messages as body-less rows: migration 6 deletes
    them and keeps queued messages, which are forgotten when acked."""
    settings = pg_settings(tmp_path)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{settings.schema}"')
        await conn.execute(f'SET search_path = "{settings.schema}"')
        await conn.execute(
            "CREATE TABLE schema_migrations(version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in MIGRATIONS[:4]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations(version) VALUES ($1)", version)
        for i, name in enumerate(("alice", "bob")):
            await conn.execute("INSERT INTO users(username, created_ms) VALUES ($1, 0)", name)
            await conn.execute(
                "INSERT INTO devices(user_pk, device_id, auth_key, created_ms) "
                "VALUES ($1, 1, $2, 0)",
                i + 1,
                b"k" * 32,
            )
        tomb, queued = os.urandom(16), os.urandom(16)
        await conn.execute(
            "INSERT INTO messages(msg_id, sender, sender_device, stored_ms, n_recipients, "
            "holders, body) VALUES ($1, 'alice', 1, 5, 1, 0, NULL), "
            "($2, 'alice', 1, 6, 1, 1, 'queued')",
            tomb,
            queued,
        )
        await conn.execute(
            "INSERT INTO mailbox(device_pk, seq, msg_id, size) VALUES (2, 1, $1, 6)", queued
        )
        await conn.execute(
            "UPDATE devices SET last_seq = 1, msg_count = 1, msg_bytes = 6 WHERE pk = 2"
        )
        store = PostgresRelayStore(settings)
        await store.open()
        try:
            assert await conn.fetchval("SELECT count(*) FROM messages") == 1
            assert [m.body for m in await store.fetch_mailbox(B, 0, 10, 10**6)] == [b"queued"]
            assert await store.ack(B, [queued]) == 1
            assert await conn.fetchval("SELECT count(*) FROM messages") == 0
            # The tombstone is gone: the id is free again (the recipient's client drops a copy).
            again = await store.submit_send(A, Envelope(tomb, (B,), b"again"), 9)
            assert again.stored_at == 9
        finally:
            await store.close()
    finally:
        await conn.close()


async def test_messages_queued_before_the_statement_triggers_are_counted_and_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 9 replaces the per-row triggers on ``messages`` by per-statement ones: a
    message queued under schema 8 still counts for its sender's account, leaves with its last
    holder (an ack, a removed device) and leaves its dedupe record."""
    settings = pg_settings(tmp_path)
    carol = Address("carol", 1)
    group, solo = env(b"to both", (B, carol)), env(b"to bob")
    # A relay of schema 8 creates the accounts and queues two messages.
    monkeypatch.setattr(pg_common, "MIGRATIONS", MIGRATIONS[:8])
    monkeypatch.setattr(pg_common, "SCHEMA_VERSION", 8)
    old = PostgresRelayStore(settings)
    await old.open()
    for who in (A, B, carol):
        await old.create_account(who, b"k" * 32, 0)
    await old.submit_send(A, group, 1)
    await old.submit_send(A, solo, 2)
    await old.close()
    monkeypatch.undo()
    store = PostgresRelayStore(settings)
    await store.open()
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(f'SET search_path = "{settings.schema}"')
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 9
        per_row = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'messages'::regclass "
            "AND NOT tgisinternal AND tgtype & 1 = 1"
        )
        assert [r[0] for r in per_row] == ["messages_account_bytes"]  # UPDATE OF body only
        assert await store.account_usage("alice") == len(b"to both") + len(b"to bob")
        assert await store.ack(B, [group.message_id, solo.message_id]) == 2
        assert await store.account_usage("alice") == len(b"to both")  # carol holds it
        await store.remove_device(carol)  # the last holder leaves: row gone, record kept
        assert await store.account_usage("alice") == 0
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
        assert await conn.fetchval("SELECT count(*) FROM dedupe") == 2
        assert (await store.submit_send(A, group, 3)).recipients == 2  # the record answers
        assert await store.mailbox_count(B) == 0
    finally:
        await conn.close()
        await store.close()


async def test_nodes_starting_together_apply_each_migration_once(tmp_path: Path) -> None:
    stores = [PostgresRelayStore(pg_settings(tmp_path)) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].create_account(A, b"a" * 32, 0)
        assert await stores[2].auth_key(A) == b"a" * 32
    finally:
        for s in stores:
            await s.close()


async def test_seqs_follow_commit_order_when_two_nodes_write_one_mailbox(
    nodes: tuple[PostgresRelayStore, PostgresRelayStore],
) -> None:
    """Both nodes write bob's mailbox at once, in many overlapping transactions: every message
    is stored once, seqs never repeat, and the mailbox read in seq order holds each node's
    messages in the order that node committed them."""
    one, two = nodes
    sent = {id(one): [], id(two): []}  # type: dict[int, list[bytes]]

    async def writer(store: PostgresRelayStore) -> None:
        for _ in range(10):
            batch = [env(b"m") for _ in range(8)]
            await asyncio.gather(*(store.submit_send(A, e, 1) for e in batch))
            sent[id(store)].extend(e.message_id for e in batch)

    await asyncio.gather(writer(one), writer(two))
    box = await two.fetch_mailbox(B, 0, 1000, 10**9)
    seqs = [m.seq for m in box]
    assert len(box) == 160 and seqs == sorted(set(seqs))
    order = [m.message_id for m in box]
    for ids in sent.values():
        # Each node's sends of one gather may commit in any order among themselves, but a
        # later gather (submitted after the earlier one committed) always sorts after it.
        positions = [order.index(mid) for mid in ids]
        for k in range(0, len(ids), 8):
            assert max(positions[k : k + 8]) < min(positions[k + 8 :] or [len(order)])


async def test_quota_and_dedupe_hold_across_nodes(tmp_path: Path) -> None:
    lim = StoreLimits(mailbox_max_messages=3)
    one = PostgresRelayStore(pg_settings(tmp_path), lim)
    two = PostgresRelayStore(pg_settings(tmp_path), lim)
    await one.open()
    await two.open()
    try:
        await one.create_account(A, b"a" * 32, 0)
        await one.create_account(B, b"b" * 32, 0)
        first = env()
        results = await asyncio.gather(
            one.submit_send(A, first, 1),
            two.submit_send(A, env(), 2),
            one.submit_send(A, env(), 3),
            two.submit_send(A, env(), 4),
            return_exceptions=True,
        )
        assert sum(isinstance(r, MailboxFull) for r in results) == 1
        assert await one.mailbox_count(B) == 3
        assert (await two.submit_send(A, first, 9)).stored_at == 1  # deduplicated across nodes
        await two.add_device(Address("bob", 2), b"c" * 32, 6)
        assert [d.device_id for d in await one.list_devices("bob")] == [1, 2]
        await one.remove_device(Address("bob", 2))
        assert await two.auth_key(Address("bob", 2)) is None
    finally:
        await one.close()
        await two.close()


async def test_each_one_time_prekey_is_handed_out_once_across_nodes(
    nodes: tuple[PostgresRelayStore, PostgresRelayStore],
) -> None:
    one, two = nodes
    upload = KeyUpload(
        identity_key=b"i" * 33,
        registration_id=7,
        signed_prekey=SignedPrekey(1, b"s" * 33, b"g" * 64),
        one_time_prekeys=tuple(OneTimePrekey(i, bytes([i]) * 33) for i in range(1, 21)),
    )
    assert await one.upload_keys(B, upload) == 20
    fetched = await asyncio.gather(*(s.fetch_bundles("bob", 1) for s in (one, two) * 11))
    keys = [b[0].one_time_prekey for b in fetched]
    handed = [k.id for k in keys if k is not None]
    assert sorted(handed) == list(range(1, 21))  # each exactly once
    assert keys.count(None) == 2 and await two.prekey_count(B) == 0
    assert all(b[0].signed_prekey.id == 1 and b[0].registration_id == 7 for b in fetched)


async def test_one_sweeper_at_a_time(nodes: tuple[PostgresRelayStore, PostgresRelayStore]) -> None:
    one, two = nodes
    await one.submit_send(A, env(), 0)
    settings = one._settings
    holder = await asyncpg.connect(settings.dsn)
    try:
        # Another node is sweeping: it holds the sweep lock (inside its transaction).
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1)", lock_key(settings.schema, "sweep")
            )
            assert (await two.sweep(40 * DAY)).messages == 0
            assert await one.mailbox_count(B) == 1
        assert (await two.sweep(40 * DAY)).messages == 1
        assert await one.mailbox_count(B) == 0
    finally:
        await holder.close()


async def test_the_dsn_password_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = pg_settings(tmp_path)
    # Trust authentication ignores the password, so the login works and the store logs.
    secret_dsn = base.dsn.replace("postgres@", "postgres:hunter2-secret@")
    settings = PgSettings(secret_dsn, pool_size=3, schema=base.schema)
    caplog.set_level(logging.DEBUG)
    store = PostgresRelayStore(settings)
    await store.open()
    await store.close()
    unreachable = PgSettings(
        "postgresql://postgres:hunter2-secret@127.0.0.1:1/x", timeout_seconds=2
    )
    with pytest.raises(StorageError) as info:
        await PostgresRelayStore(unreachable).open()
    shown = caplog.text + repr(store) + repr(settings) + str(info.value)
    assert "127.0.0.1" in caplog.text  # the store did log where it connected
    assert "hunter2" not in shown


@pytest.mark.slow
async def test_a_database_that_goes_away_gives_storage_errors_and_comes_back() -> None:
    """PostgreSQL stops under an open store: every call fails with StorageError (never a raw
    driver error), nothing half-done is acknowledged, and once the server is back the same
    store object works again without a restart."""
    work = Path(tempfile.mkdtemp(prefix="blindpost-pg-down-"))
    dsn = await asyncio.to_thread(backend_servers.start_postgres, work / "pg")
    try:
        store = PostgresRelayStore(PgSettings(dsn, pool_size=3, timeout_seconds=5))
        await store.open()
        await store.create_account(A, b"a" * 32, 0)
        await store.create_account(B, b"b" * 32, 0)
        kept = env(b"kept")
        await store.submit_send(A, kept, 1)
        await asyncio.to_thread(backend_servers.postgres_ctl, work / "pg", "stop")
        lost = env(b"refused")
        with pytest.raises(StorageError):
            await store.submit_send(A, lost, 2)
        with pytest.raises(StorageError):
            await store.fetch_mailbox(B, 0, 10, 10**6)
        with pytest.raises(StorageError):
            await store.create_account(Address("carol", 1), b"c" * 32, 3)
        with pytest.raises(StorageError):
            await store.sweep(10)
        await asyncio.to_thread(backend_servers.postgres_ctl, work / "pg", "start")
        box = await store.fetch_mailbox(B, 0, 10, 10**6)
        assert [m.body for m in box] == [b"kept"]
        await store.submit_send(A, lost, 4)  # the client's retry of the refused send
        assert [m.body for m in await store.fetch_mailbox(B, 0, 10, 10**6)] == [b"kept", b"refused"]
        await store.close()
        await asyncio.to_thread(backend_servers.postgres_ctl, work / "pg", "stop")
        with pytest.raises(StorageError):  # a relay cannot start without its database
            await PostgresRelayStore(PgSettings(dsn, timeout_seconds=2)).open()
    finally:
        await asyncio.to_thread(backend_servers.stop, work)


async def test_a_relay_process_on_postgres_sends_and_delivers(
    tmp_path: Path, postgres_database: str
) -> None:
    """``blindpost-relay --set store=postgres``: a message sent over HTTP is pushed over the
    recipient's WebSocket; after a restart with an empty data directory the unacknowledged
    message is still there (it lives in PostgreSQL), and nothing was written to SQLite."""
    settings = {**QUIET, "store": "postgres", "blob_store": "fs"}
    relay = start_relay(
        tmp_path / "relay",
        settings,
        env_extra={"BLINDPOST_RELAY_POSTGRES_DSN": postgres_database},
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            client = RelayClient(relay.url, session)
            alice = await client.new_device("alice")
            bob = await client.new_device("bob")
            ws = await client.ws(bob)
            assert (await next_frame(ws))["type"] == "hint"
            assert await next_frame(ws) == {"type": "empty"}
            r = await client.send(alice, [bob], b"over postgres")
            assert r.status == 200 and r.json()["recipients"] == 1
            pushed = await next_frame(ws, timeout=15)
            assert pushed.body == b"over postgres" and pushed.sender == alice.addr
            await ws.close()
            relay.stop()
            relay.data_dir = tmp_path / "relay-empty"  # nothing local survives
            relay.start()
            page = (await client.read(bob)).json()
            assert [m["seq"] for m in page["messages"]] == [pushed.seq]
        assert not list((tmp_path / "relay").glob("*.sqlite3"))
    finally:
        relay.stop()


async def test_two_relay_nodes_on_one_database_share_blobs_and_mailboxes(
    tmp_path: Path, postgres_database: str
) -> None:
    """Two relay processes on one PostgreSQL (blob_store defaults to postgres there): a blob
    uploaded via node one downloads via node two, whole and by ranges; a message sent
    via node one is read and acknowledged via node two; nothing is stored on either's disk."""
    env_extra = {"BLINDPOST_RELAY_POSTGRES_DSN": postgres_database}
    settings = {**QUIET, "store": "postgres"}
    one = start_relay(tmp_path / "one", settings, env_extra=env_extra)
    two = start_relay(tmp_path / "two", settings, env_extra=env_extra)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            via_one, via_two = RelayClient(one.url, session), RelayClient(two.url, session)
            alice = await via_one.new_device("alice")
            bob = await via_two.new_device("bob")
            data = os.urandom(700_000)  # several chunks
            up = await via_one.upload_blob(alice, data)
            assert up.status == 201
            blob_id = up.json()["id"]
            assert (await via_two.upload_blob(bob, data)).status == 200  # known on node two
            target = f"/v1/blobs/{blob_id}"
            full = await via_two.request(bob, "GET", target)
            assert full.status == 200 and full.body == data
            part = await via_two.request(bob, "GET", target, headers={"Range": "bytes=300000-"})
            assert part.status == 206 and part.body == data[300000:]
            assert part.headers["Content-Range"] == f"bytes 300000-{len(data) - 1}/{len(data)}"
            tail = await via_two.request(bob, "GET", target, headers={"Range": "bytes=-10"})
            assert tail.status == 206 and tail.body == data[-10:]
            bad = await via_two.request(bob, "GET", target, headers={"Range": "bytes=900000-"})
            assert bad.status == 416
            missing = await via_two.request(bob, "GET", "/v1/blobs/" + "0" * 64)
            assert missing.status == 404 and missing.json()["error"] == "unknown_blob"
            mid = os.urandom(16)
            assert (await via_one.send(alice, [bob], b"cross-node", mid)).status == 200
            page = (await via_two.read(bob)).json()
            assert [m["body"] for m in page["messages"]] == [b64(b"cross-node")]
            assert (await via_two.ack(bob, [mid])).json() == {"acked": 1}
            assert (await via_one.read(bob)).json()["messages"] == []
        for node in (one, two):
            stored = [p for p in (node.data_dir / "blobs").rglob("*") if p.is_file()]
            assert stored == [] and not list(node.data_dir.glob("*.sqlite3"))
    finally:
        one.stop()
        two.stop()


async def test_nodes_without_redis_share_the_replay_guard_and_registration_key(
    tmp_path: Path, postgres_database: str
) -> None:
    """Two relay processes on one PostgreSQL and no Redis (replay_guard = auto: postgres): a
    signed request accepted by node one is a replay on node two and after node one restarts;
    a proof-of-work challenge issued by node one registers through node two; neither node
    keeps a replay or registration key on its own disk."""
    env_extra = {"BLINDPOST_RELAY_POSTGRES_DSN": postgres_database}
    settings = {
        **QUIET,
        "store": "postgres",
        "registration": "pow",
        "registration_pow_difficulty": "4",
    }
    one = start_relay(tmp_path / "one", settings, env_extra=env_extra)
    two = start_relay(tmp_path / "two", settings, env_extra=env_extra)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            via_one, via_two = RelayClient(one.url, session), RelayClient(two.url, session)
            info = await via_one.registration()
            assert info["mode"] == "pow"
            alice = Device(new_username("alice"))
            nonce = solve_pow(info["challenge"], alice.user, info["difficulty"])
            pow_doc = {"challenge": info["challenge"], "nonce": nonce}
            assert (await via_two.register(alice, pow=pow_doc)).status == 201
            headers = via_one.sign(alice, "GET", "/v1/devices")
            async with session.get(one.url + "/v1/devices", headers=headers) as resp:
                assert resp.status == 200
            async with session.get(two.url + "/v1/devices", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"] == "auth_replay"
            one.stop()
            one.start()
            async with session.get(one.url + "/v1/devices", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"] == "auth_replay"
        for node in (one, two):
            kept = {p.name for p in node.data_dir.iterdir()} if node.data_dir.exists() else set()
            assert not kept & {"replay.key", "replay.sqlite3", "registration.key"}
    finally:
        one.stop()
        two.stop()


class FixedClock(Clock):
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.now


async def test_the_sweeper_expires_blobs_stored_in_postgres(postgres_database: str) -> None:
    """The app built from ``store = postgres`` keeps blob contents in PostgreSQL; once a blob's
    TTL is over, a sweep removes its metadata and its chunks, and downloads answer 404."""
    clock = FixedClock()
    cfg = RelayConfig(
        store="postgres",
        postgres_dsn=postgres_database,
        sweep_interval_seconds=0,
        blob_ttl_seconds=10,
        auth_window_seconds=10**9,
        postgres_pool_size=3,
    )
    app = create_app(cfg, clock=clock)
    async with TestClient(TestServer(app)) as tc:
        client = RelayClient(str(tc.make_url("")).rstrip("/"), tc.session)
        dev = await client.new_device("blobber")
        data = os.urandom(300_000)
        blob_id = (await client.upload_blob(dev, data)).json()["id"]
        got = await client.request(dev, "GET", f"/v1/blobs/{blob_id}")
        assert got.status == 200 and got.body == data
        conn = await asyncpg.connect(postgres_database)
        try:
            assert (
                await conn.fetchval("SELECT count(*) FROM blob_chunks WHERE id = $1", blob_id) == 2
            )
            clock.now += 11_000
            await sweep_once(app[STATE_KEY])
            assert await conn.fetchval("SELECT count(*) FROM blob_chunks") == 0
            assert await conn.fetchval("SELECT count(*) FROM blob_content") == 0
        finally:
            await conn.close()
        assert (await client.request(dev, "GET", f"/v1/blobs/{blob_id}")).status == 404
        assert app[STATE_KEY].store.stats().blob_bytes == 0


async def test_pipelined_sends_commit_and_reach_the_listener_in_submission_order(
    tmp_path: Path,
) -> None:
    """Sends submitted one after another without waiting (a WebSocket client pipelining) land
    in many batches, several in flight at once: each device's mailbox and the delivery
    listener still see them in submission order, and receipts resolve before the fan-out."""
    store = PostgresRelayStore(pg_settings(tmp_path), write_connections=3)
    await store.open()
    carol = Address("carol", 1)
    try:
        for addr in (A, B, carol):
            await store.create_account(addr, b"k" * 32, 0)
        delivered: list[tuple[Address, int, bytes]] = []
        store.set_delivery_listener(
            lambda ds: delivered.extend((d.recipient, d.message.seq, d.message.body) for d in ds)
        )
        futures = []
        bodies = []
        for i in range(60):
            to = (B,) if i % 3 else (B, carol)
            bodies.append((to, b"%d" % i))
            futures.append(store.submit_send(A, Envelope(os.urandom(16), to, b"%d" % i), i))
            if i % 4 == 0:
                await asyncio.sleep(0)  # let a batch start with what is queued so far
        await asyncio.gather(*futures)
        for dev in (B, carol):
            want = [body for to, body in bodies if dev in to]
            box = await store.fetch_mailbox(dev, 0, 1000, 10**9)
            assert [m.body for m in box] == want
            pushed = [(seq, body) for rcpt, seq, body in delivered if rcpt == dev]
            assert pushed == [(m.seq, m.body) for m in box]
        assert store.stats().commits > 1
    finally:
        await store.close()
