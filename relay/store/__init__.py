# Invariant: handlers depend on the RelayStore protocol only; backends live in submodules.
"""Relay storage: the ``RelayStore`` contract, its SQLite implementation and in-memory twin.

The PostgreSQL implementation is ``relay.store.postgres.PostgresRelayStore``, not imported here,
so a relay on SQLite never loads the PostgreSQL driver.
"""

from relay.store.base import RelayStore, StoreLimits
from relay.store.memory import MemoryRelayStore
from relay.store.sqlite import SqliteRelayStore

__all__ = ["MemoryRelayStore", "RelayStore", "SqliteRelayStore", "StoreLimits"]
