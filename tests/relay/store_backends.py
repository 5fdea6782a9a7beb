"""The RelayStore implementations the conformance tests run against (``BACKENDS``).

Each backend knows how to make a store and how to "restart" it: the SQLite store reopens its
file in a new object; the in-memory twin closes and reopens the same object (its data lives as
long as the object). Shared by test modules as ``store_backends``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.store.base import RelayStore, StoreLimits
from relay.store.memory import MemoryRelayStore
from relay.store.sqlite import SqliteRelayStore


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[Path, StoreLimits | None], RelayStore]
    reopen_same_object: bool

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


BACKENDS = [
    Backend("sqlite", lambda d, lim: SqliteRelayStore(d / "db.sqlite3", lim), False),
    Backend("memory", lambda d, lim: MemoryRelayStore(lim), True),
]
