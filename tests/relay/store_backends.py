"""The RelayStore implementations the conformance tests run against (``BACKENDS``).

Each backend knows how to make a store and how to "restart" it: the SQLite store reopens its
file in a new object; the in-memory twin closes and reopens the same object (its data lives as
long as the object); the PostgreSQL store opens a new object on the same schema. Each
PostgreSQL store works in a schema of its own, named after the test's directory, inside the
session's database (the ``postgres_test_dsn`` fixture, which ``Backend.prepare`` requests), so
tests never see each other's rows. Shared by test modules as ``store_backends``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import backend_servers
import pytest

from relay.store.base import RelayStore, StoreLimits
from relay.store.memory import MemoryRelayStore
from relay.store.pg_common import PgSettings
from relay.store.postgres import PostgresRelayStore
from relay.store.sqlite import SqliteRelayStore


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[Path, StoreLimits | None], RelayStore]
    reopen_same_object: bool
    fixture: str | None = None  # a fixture the backend needs (a server)

    def prepare(self, request: pytest.FixtureRequest) -> None:
        """Request the fixtures this backend needs (it skips or fails when a server is down)."""
        if self.fixture is not None:
            request.getfixturevalue(self.fixture)

    async def open(self, directory: Path, limits: StoreLimits | None = None) -> RelayStore:
        store = self.make(directory, limits)
        await store.open()
        return store

    async def restart(
        self, store: RelayStore, directory: Path, limits: StoreLimits | None = None
    ) -> RelayStore:
        await store.close()
        if self.reopen_same_object:
            await store.open()
            return store
        return await self.open(directory, limits)


def pg_settings(directory: Path) -> PgSettings:
    """Settings for a store on the session database, in the schema owned by ``directory``."""
    dsn = backend_servers.SESSION_DATABASE
    assert dsn is not None, "request the postgres_test_dsn fixture (Backend.prepare)"
    schema = "t_" + hashlib.blake2b(str(directory).encode(), digest_size=10).hexdigest()
    return PgSettings(dsn, pool_size=4, schema=schema)


BACKENDS = [
    Backend("sqlite", lambda d, lim: SqliteRelayStore(d / "db.sqlite3", lim), False),
    Backend("memory", lambda d, lim: MemoryRelayStore(lim), True),
    Backend(
        "postgres",
        lambda d, lim: PostgresRelayStore(pg_settings(d), lim),
        False,
        "postgres_test_dsn",
    ),
]
