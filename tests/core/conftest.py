"""Shared fixtures for tests/core: devices over a store, a connected pair, store snapshots.

Fixtures (pytest cannot import helpers from a conftest, so everything is a fixture):

* ``store_kind`` -- ``"memory"`` and ``"sqlite"``: a test that asks for it runs
  once per store implementation.
* ``make_peer(name, device_id=1, kind="memory") -> Peer`` -- a new account on a
  fresh store. Stores it opened are closed when the test ends.
* ``pair(kind="memory", one_time_prekey=True) -> Pair`` -- Alice and Bob, Alice
  holding a session built from Bob's bundle; nothing sent yet.
* ``store_snapshot(store) -> object`` -- every stored byte, as a value to compare
  with ``==`` (not ``snapshot``: that name belongs to syrupy, which is installed).

Invariant: a :class:`Peer` keeps no state outside its store, so :meth:`Peer.restart`
(a new engine over the same store; SQLite closes and reopens the file) loses nothing
that a real client restart would keep.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from store_state import memory_data

import e2ee  # noqa: F401  (installs the protobuf shim before axolotl loads)
from e2ee.core import PreKeyBundle, ProtocolEngine
from e2ee.core.engine import Decrypted
from e2ee.store import Address, MemoryProtocolStore, ProtocolStore
from e2ee.store.sqlite import SQLiteProtocolStore

#: The tests' fixed clock (14 Nov 2023); nothing here reads the system time.
NOW_MS = 1_700_000_000_000
#: The one-time prekey ``pair`` puts into Bob's bundle.
PAIR_PREKEY_ID = 5


class Clock:
    """A settable clock in milliseconds; pass it as ``now_ms``."""

    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def snapshot(store: ProtocolStore) -> object:
    """Everything ``store`` holds, as a value that compares equal only byte for byte.

    The memory store is read through its private dictionaries; the SQLite store by
    dumping every table of its file through a separate read-only connection.
    """
    if isinstance(store, MemoryProtocolStore):
        return copy.deepcopy(memory_data(store))
    if not isinstance(store, SQLiteProtocolStore):
        raise TypeError(f"cannot snapshot a {type(store).__name__}")
    uri = f"{Path(store.path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            table: sorted(db.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
            for table in sorted(tables)
        }


class Peer:
    """One device: its account, its store and the engine over that store.

    Attributes:
        name, device_id: the account's address parts.
        store: the store (replaced by a reopened one after an SQLite restart).
        engine: the current engine over ``store``.
        clock: the engine's clock; set ``clock.now_ms`` to move time.
    """

    def __init__(
        self, name: str, device_id: int, kind: str, path: Path | None, clock: Clock
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.kind = kind
        self.clock = clock
        self._path = path
        self._closed = False
        self.store = self._open()
        self.engine = ProtocolEngine(self.store, now_ms=clock)
        self.engine.create_account(name, device_id)

    def __repr__(self) -> str:
        return f"Peer({self.address}, {self.kind})"

    @property
    def address(self) -> Address:
        return Address(self.name, self.device_id)

    def _open(self) -> ProtocolStore:
        if self.kind == "memory":
            return MemoryProtocolStore()
        assert self._path is not None
        return SQLiteProtocolStore.open(self._path)

    def restart(self) -> None:
        """Drop the engine and build a new one from the store alone (SQLite: reopened)."""
        if self.kind != "memory":
            self.close()
            self.store = self._open()
            self._closed = False
        self.engine = ProtocolEngine(self.store, now_ms=self.clock)

    def close(self) -> None:
        """Close the store if it holds a file; idempotent."""
        if isinstance(self.store, SQLiteProtocolStore) and not self._closed:
            self.store.close()
        self._closed = True

    def snapshot(self) -> object:
        return snapshot(self.store)


class Pair:
    """Alice and Bob with a session Alice built from Bob's bundle (h11's ConnectionPair)."""

    def __init__(self, alice: Peer, bob: Peer, *, one_time_prekey: bool) -> None:
        self.alice = alice
        self.bob = bob
        self.bundle = bob.engine.local_bundle(PAIR_PREKEY_ID if one_time_prekey else None)
        alice.engine.process_bundle(bob.name, PreKeyBundle.from_json(self.bundle.to_json()))

    def __repr__(self) -> str:
        return f"Pair({self.alice!r}, {self.bob!r})"

    def other(self, peer: Peer) -> Peer:
        return self.bob if peer is self.alice else self.alice

    def exchange(self, sender: Peer, plaintext: bytes) -> Decrypted:
        """Encrypt from ``sender``, decrypt at the other side, check the plaintext."""
        receiver = self.other(sender)
        decrypted = receiver.engine.decrypt(
            sender.address, sender.engine.encrypt(receiver.address, plaintext)
        )
        assert decrypted.plaintext == plaintext
        assert decrypted.sender == sender.address
        return decrypted


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []
    numbers = itertools.count()

    def make(name: str, device_id: int = 1, kind: str = "memory") -> Peer:
        path = tmp_path / f"{name}.{device_id}.{next(numbers)}.db"
        peer = Peer(name, device_id, kind, path if kind != "memory" else None, Clock())
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


@pytest.fixture
def pair(make_peer: Callable[..., Peer]) -> Callable[..., Pair]:
    def make(kind: str = "memory", *, one_time_prekey: bool = True) -> Pair:
        return Pair(
            make_peer("alice", 1, kind), make_peer("bob", 1, kind), one_time_prekey=one_time_prekey
        )

    return make


@pytest.fixture
def store_snapshot() -> Callable[[ProtocolStore], Any]:
    return snapshot
