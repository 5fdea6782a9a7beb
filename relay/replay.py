# Invariants:
# * A key is claimed at most once while it is recorded: ``claim`` returns True for exactly one
#   caller per key until ``expires_at_ms`` has passed, across every process (and, with a shared
#   backend, every node) that uses the same guard. A key is recorded only once the signature of
#   its request verified (relay.state), so forged requests cannot fill a guard.
# * Keys are keyed digests of (user, device, nonce) (``replay_key``), never the nonce text; the
#   key of the digest is one secret per deployment (``load_replay_secret``), so every process and
#   node that shares a guard must share it too.
# * ``SqliteReplayGuard.claim`` returns only after the claim is committed with synchronous=FULL
#   (fsync'd): a request it let through stays refused after a crash or a restart. Expired rows
#   are swept; the number of rows is bounded (``ReplayGuardFull``, 503, rather than an unchecked
#   nonce).
# * A guard shared by several nodes (Redis, PostgreSQL: ``SharedReplayGuard``) keeps the digest
#   key itself, created once by whichever node comes first, so every node digests alike without
#   an operator copying a secret file between hosts.
"""Replay protection for signed requests: the ``ReplayGuard`` Protocol and its implementations."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from relay.errors import RelayError, StorageError
from relay.threadnames import name_os_thread

if TYPE_CHECKING:
    from relay.config import RelayConfig

__all__ = [
    "REPLAY_KEY_LEN",
    "REPLAY_SECRET_LEN",
    "ManagedReplayGuard",
    "MemoryReplayGuard",
    "PgReplayGuard",
    "ReplayGuard",
    "ReplayGuardFull",
    "SharedReplayGuard",
    "SqliteReplayGuard",
    "effective_replay_guard",
    "load_replay_secret",
    "make_replay_guard",
    "replay_key",
]

log = logging.getLogger("relay.replay")

REPLAY_KEY_LEN = 16
REPLAY_SECRET_LEN = 32
_PERSON = b"blindpost-replay"  # BLAKE2b personalisation: 16 bytes, domain separation
_SWEEP_INTERVAL_MS = 1000
_RECOUNT_INTERVAL_MS = 10_000
_BATCH_MAX = 1000


class ReplayGuard(Protocol):
    """Where the relay records the nonces of accepted signed requests."""

    async def claim(self, key: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """Record ``key`` until ``expires_at_ms``; return False when it is already recorded (a replay)."""  # noqa: E501
        ...


@runtime_checkable
class ManagedReplayGuard(Protocol):
    """A guard with resources the app opens at start and closes at shutdown."""

    async def open(self) -> None:
        """Acquire the guard's resources (connections, threads)."""
        ...

    async def close(self) -> None:
        """Release them; claims after this raise."""
        ...


@runtime_checkable
class SharedReplayGuard(Protocol):
    """A guard several nodes share; it keeps the key of the nonce digests for all of them."""

    async def shared_secret(self) -> bytes:
        """The deployment's replay secret (created by the first node that asks)."""
        ...


class ReplayGuardFull(RelayError):
    """The guard holds its maximum of live keys; the request is refused, not let through (503)."""

    status = 503
    default_code = "busy"

    def __init__(self) -> None:
        super().__init__("too many requests in the auth window", extra={"retry_after": 1})


def replay_key(secret: bytes, user: str, device: int, nonce: str) -> bytes:
    """The guard key of a request: a keyed BLAKE2b digest of (user, device, nonce).

    Args:
        secret: the deployment's replay secret (``load_replay_secret``).
        user: the signing user.
        device: the signing device id.
        nonce: the nonce header value.

    Returns:
        ``REPLAY_KEY_LEN`` bytes.
    """
    h = hashlib.blake2b(digest_size=REPLAY_KEY_LEN, key=secret, person=_PERSON)
    h.update(f"{user}\n{device}\n{nonce}".encode())
    return h.digest()


def load_replay_secret(path: Path) -> bytes:
    """Read the replay secret at ``path``, creating it (random, mode 0600, fsync'd) if missing.

    Args:
        path: the secret file (``data_dir/replay.key`` unless ``replay_secret_file`` is set).

    Returns:
        The secret bytes.

    Raises:
        OSError: the file cannot be read or created.
        ValueError: the file exists with the wrong length.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole under a temporary name, then linked into place: processes starting
        # together on one data directory (the relay and an operator command) never read a
        # file another one has created but not yet written, and all of them end up with the
        # first one's secret.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(REPLAY_SECRET_LEN))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != REPLAY_SECRET_LEN:
        raise ValueError(f"replay secret {path} must hold {REPLAY_SECRET_LEN} bytes")
    return data


class MemoryReplayGuard:
    """In-process guard: exact, bounded, forgotten at restart (one process only).

    Args:
        max_entries: most keys held at once; beyond, ``claim`` raises ``ReplayGuardFull``.
    """

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._seen: set[bytes] = set()
        self._order: deque[tuple[int, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, key: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """See ``ReplayGuard.claim``.

        Raises:
            ReplayGuardFull: ``max_entries`` live keys are held.
        """
        order = self._order
        # Expiry order follows arrival only roughly; an entry is dropped at the earliest once
        # now passes its own expiry, so no replay slips through (some live a little longer).
        while order and order[0][0] < now_ms:
            self._seen.discard(order.popleft()[1])
        if key in self._seen:
            return False
        if len(self._seen) >= self._max:
            raise ReplayGuardFull()
        self._seen.add(key)
        order.append((expires_at_ms, key))
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS replay(k BLOB PRIMARY KEY, exp INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replay_exp ON replay(exp);
"""
# Inserts the key, or takes over an expired row of the same key; changes nothing (0 rows) when
# the key is recorded and live: that is a replay.
_CLAIM = (
    "INSERT INTO replay(k, exp) VALUES (?, ?) "
    "ON CONFLICT(k) DO UPDATE SET exp = excluded.exp WHERE replay.exp < ?"
)

_LIVE = "SELECT 1 FROM replay WHERE k = ? AND exp >= ?"


@dataclass(slots=True)
class _Claim:
    key: bytes
    expires_at_ms: int
    now_ms: int
    future: asyncio.Future[bool]


class SqliteReplayGuard:
    """Guard on a SQLite file in the relay's data directory (it survives restarts).

    Claims are group-committed by one writer thread (one fsync per batch, however many requests
    arrive together); each ``claim`` returns after its commit. Every ``_SWEEP_INTERVAL_MS`` a
    batch also deletes expired rows. The row count is kept in memory (recounted every
    ``_RECOUNT_INTERVAL_MS`` plus this process's inserts since).

    Args:
        path: the database file (created with its directory if missing).
        max_entries: most live keys; beyond, ``claim`` raises ``ReplayGuardFull``.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self._path = Path(path)
        self._max = max_entries
        self._queue: queue.SimpleQueue[_Claim | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._count = 0
        self._next_sweep = 0
        self._next_recount = 0
        # Why the last commit failed (disk full, I/O error), until one succeeds again.
        self.failing: str | None = None

    async def open(self) -> None:
        """Open (and create) the file and start the writer thread.

        Raises:
            sqlite3.Error: the file cannot be opened.
        """
        self._loop = asyncio.get_running_loop()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._count = int(conn.execute("SELECT count(*) FROM replay").fetchone()[0])
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="relay-replay", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Commit the claims already submitted, stop the thread, close the file."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    async def claim(self, key: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """See ``ReplayGuard.claim``; returns after the claim is committed.

        Raises:
            ReplayGuardFull: the bound of live keys is reached.
            relay.errors.StorageError: the guard is closed or its file cannot be written.
        """
        if self._closed or self._loop is None:
            raise StorageError("replay guard is closed")
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._queue.put(_Claim(key, expires_at_ms, now_ms, fut))
        return await fut

    async def ready(self) -> str | None:
        """Readiness: None when claims commit, else why not (a failing guard is probed with a
        throwaway claim, so it turns ready again once the disk has room)."""
        if self.failing is None:
            return None
        with contextlib.suppress(StorageError):
            now = int(time.time() * 1000)
            await self.claim(os.urandom(REPLAY_KEY_LEN), now, now)
        return None if self.failing is None else f"replay guard writes fail: {self.failing}"

    def _run(self) -> None:
        name_os_thread()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Claim]) -> None:
        conn = self._conn
        assert conn is not None and self._loop is not None
        results: list[tuple[asyncio.Future[bool], bool | BaseException]] = []
        try:
            now = max(c.now_ms for c in batch)
            conn.execute("BEGIN IMMEDIATE")
            if now >= self._next_sweep:
                self._next_sweep = now + _SWEEP_INTERVAL_MS
                swept = conn.execute("DELETE FROM replay WHERE exp < ?", (now,)).rowcount
                self._count = max(0, self._count - swept)
                if now >= self._next_recount or self._count >= self._max:
                    self._next_recount = now + _RECOUNT_INTERVAL_MS
                    self._count = int(conn.execute("SELECT count(*) FROM replay").fetchone()[0])
            for c in batch:
                if self._count >= self._max:
                    live = conn.execute(_LIVE, (c.key, c.now_ms)).fetchone() is not None
                    results.append((c.future, False if live else ReplayGuardFull()))
                    continue
                fresh = conn.execute(_CLAIM, (c.key, c.expires_at_ms, c.now_ms)).rowcount == 1
                self._count += fresh
                results.append((c.future, fresh))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("replay guard commit of %d claims failed: %s", len(batch), exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.failing = f"{type(exc).__name__}: {exc}"
            err = StorageError("replay guard unavailable")
            results = [(c.future, err) for c in batch]
        else:
            if self.failing is not None:
                log.warning("replay guard writes succeed again")
                self.failing = None
        with contextlib.suppress(RuntimeError):  # the loop closed first
            self._loop.call_soon_threadsafe(_resolve, results)


def _resolve(results: list[tuple[asyncio.Future[bool], bool | BaseException]]) -> None:
    for fut, value in results:
        if fut.done():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


class PgReplayGuard:
    """Guard in the PostgreSQL database of ``store = postgres`` (used when no Redis is set).

    One ``INSERT ... ON CONFLICT`` per claim, committed with ``synchronous_commit = on``: every
    node sharing the database refuses a replay, also after a restart. Expired rows are swept
    every ``_SWEEP_INTERVAL_MS``; ``max_entries`` is not enforced here (PostgreSQL's own disk
    is the bound, and rows expire with the auth window).

    Args:
        settings: how to reach PostgreSQL (relay.store.pg_common.PgSettings); the guard opens a
            pool of two connections of its own.
    """

    def __init__(self, settings: object) -> None:
        from relay.store.pg_common import PgSettings

        assert isinstance(settings, PgSettings)
        self._settings = PgSettings(
            settings.dsn,
            pool_size=2,
            timeout_seconds=settings.timeout_seconds,
            schema=settings.schema,
        )
        self._pool: object | None = None
        self._next_sweep = 0

    async def open(self) -> None:
        """Open the pool and bring the schema up to date (relay.store.pg_common.migrate).

        Raises:
            StorageError: PostgreSQL cannot be reached.
        """
        from relay.store.pg_common import open_pool

        self._pool = await open_pool(self._settings)

    async def close(self) -> None:
        """Close the pool."""
        import asyncpg

        pool, self._pool = self._pool, None
        if isinstance(pool, asyncpg.Pool):
            await pool.close()

    def _live_pool(self) -> object:
        if self._pool is None:
            raise StorageError("replay guard is closed")
        return self._pool

    async def claim(self, key: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """See ``ReplayGuard.claim``.

        Raises:
            relay.errors.StorageError: PostgreSQL did not answer.
        """
        import asyncpg

        from relay.store.pg_common import storage_errors

        pool = self._live_pool()
        assert isinstance(pool, asyncpg.Pool)
        with storage_errors("replay guard claim"):
            async with pool.acquire() as conn:
                if now_ms >= self._next_sweep:
                    self._next_sweep = now_ms + _SWEEP_INTERVAL_MS
                    await conn.execute("DELETE FROM replay_keys WHERE exp < $1", now_ms)
                got = await conn.fetchval(_PG_CLAIM, key, expires_at_ms, now_ms)
        return got is not None

    async def shared_secret(self) -> bytes:
        """See ``SharedReplayGuard``.

        Raises:
            relay.errors.StorageError: PostgreSQL did not answer.
        """
        import asyncpg

        from relay.store.pg_common import storage_errors

        pool = self._live_pool()
        assert isinstance(pool, asyncpg.Pool)
        with storage_errors("replay secret"):
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO replay_secret(id, secret) VALUES (1, $1) ON CONFLICT DO NOTHING",
                    os.urandom(REPLAY_SECRET_LEN),
                )
                secret = await conn.fetchval("SELECT secret FROM replay_secret WHERE id = 1")
        return bytes(secret)

    async def ready(self) -> str | None:
        """None when PostgreSQL answers, else why not."""
        import asyncpg

        from relay.store.pg_common import ping

        pool = self._pool
        return await ping(pool if isinstance(pool, asyncpg.Pool) else None, "replay guard")


# A claim inserts, or takes over an expired row; it returns a row only when it now holds it.
_PG_CLAIM = """
INSERT INTO replay_keys(key, exp) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET exp = EXCLUDED.exp WHERE replay_keys.exp < $3
RETURNING 1
"""


def effective_replay_guard(config: RelayConfig) -> str:
    """The guard ``replay_guard = auto`` stands for: ``sqlite`` with ``store = sqlite``; with
    ``store = postgres``, ``redis`` when ``redis_url`` is set, else ``postgres``.

    Args:
        config: settings (``replay_guard``, ``store``, ``redis_url``).

    Returns:
        ``sqlite``, ``memory``, ``redis`` or ``postgres``.
    """
    if config.replay_guard != "auto":
        return config.replay_guard
    if config.store == "postgres":
        return "redis" if config.redis_url else "postgres"
    return "sqlite"


def make_replay_guard(config: RelayConfig) -> ReplayGuard:
    """The replay guard the settings name (not opened yet).

    Args:
        config: settings (``replay_guard``, ``store``, ``redis_*``, ``postgres_*``,
            ``nonce_cache_max``, ``data_dir``).

    Returns:
        The guard.
    """
    kind = effective_replay_guard(config)
    if kind == "memory":
        return MemoryReplayGuard(config.nonce_cache_max)
    if kind == "redis":
        from relay.nodes.state import RedisReplayGuard

        return RedisReplayGuard.from_config(config)
    if kind == "postgres":
        from relay.backends import pg_settings

        return PgReplayGuard(pg_settings(config))
    return SqliteReplayGuard(config.data_dir / "replay.sqlite3", config.nonce_cache_max)
