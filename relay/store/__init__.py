# Invariant: handlers depend on the RelayStore protocol only; backends live in submodules.
"""Relay storage: the ``RelayStore`` contract and its SQLite implementation."""

from relay.store.base import RelayStore
from relay.store.sqlite import SqliteRelayStore

__all__ = ["RelayStore", "SqliteRelayStore"]
