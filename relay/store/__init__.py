# Invariant: handlers depend on the RelayStore protocol only; backends live in submodules.
"""Relay storage: the ``RelayStore`` contract, its SQLite implementation and in-memory twin."""

from relay.store.base import RelayStore, StoreLimits
from relay.store.memory import MemoryRelayStore
from relay.store.sqlite import SqliteRelayStore

__all__ = ["MemoryRelayStore", "RelayStore", "SqliteRelayStore", "StoreLimits"]
