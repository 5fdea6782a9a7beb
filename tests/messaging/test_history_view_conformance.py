"""One conformance suite for every HistoryView: the store-backed one and its twin.

The messaging rules decide only from what a view answers, so the in-memory
twin must answer as the SQLite-backed view does; each test runs against both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from e2ee.client.context import StoreView
from e2ee.history import History
from e2ee.messaging.memory import MemoryHistory
from e2ee.messaging.rows import AppRow, ChatRow, CounterRow, GroupRow, MemberRow, MessageRow, as_row
from e2ee.messaging.view import HistoryView
from e2ee.store.protocols import Changes
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore


class Writable(HistoryView, Protocol):
    def write(self, rows: list[AppRow]) -> None: ...


class _Memory(MemoryHistory):
    def write(self, rows: list[AppRow]) -> None:
        self.put(rows)


class _SQLite(StoreView):
    def __init__(self, store: SQLiteProtocolStore, history: History) -> None:
        super().__init__(history, lambda user: [1, 2] if user == "carol" else [])
        self.store = store

    def write(self, rows: list[AppRow]) -> None:
        self.store.commit(Changes(app_rows=tuple(as_row(r) for r in rows)))


@pytest.fixture(params=["memory", "sqlite"])
def view(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Writable]:
    if request.param == "memory":
        yield _Memory(devices={"carol": [1, 2]})
        return
    store = SQLiteProtocolStore.open(
        tmp_path / "h.db", None, kdf_limits=KdfLimits(opslimit=1, memlimit=8192)
    )
    history = History.open(store)
    try:
        yield _SQLite(store, history)
    finally:
        history.close()
        store.close()


def test_rows_come_back_typed_and_are_replaced_whole(view: Writable) -> None:
    assert view.get(MessageRow, "m1") is None
    first = MessageRow("m1", "dm:bob", sender="bob", text="hi", seq=1, status="received")
    view.write([first])
    assert view.get(MessageRow, "m1") == first
    view.write([MessageRow("m1", "dm:bob", sender="bob", seq=1)])
    assert view.get(MessageRow, "m1") == MessageRow("m1", "dm:bob", sender="bob", seq=1)
    assert view.get(ChatRow, "m1") is None  # tables do not mix


def test_counters_start_unset(view: Writable) -> None:
    assert view.counter("seq:messages") is None
    view.write([CounterRow("seq:messages", 7)])
    assert view.counter("seq:messages") == 7


def test_group_members_leave_out_the_gone(view: Writable) -> None:
    view.write(
        [
            GroupRow("g", name="g", admins='["alice"]', revision=2, member=1),
            MemberRow("g:alice", "g", "alice", "admin"),
            MemberRow("g:bob", "g", "bob", "member"),
            MemberRow("g:carol", "g", "carol", "gone"),
            MemberRow("h:dave", "h", "dave", "member"),
        ]
    )
    assert view.group_members("g") == {"alice": "admin", "bob": "member"}
    assert view.group_members("x") == {}
    assert view.devices("carol") == [1, 2] and view.devices("bob") == []


def test_the_store_view_reads_inside_the_open_batch(tmp_path: Path) -> None:
    """The receive batch's own writes (a group change) are seen by the next delivery."""
    store = SQLiteProtocolStore.open(
        tmp_path / "h.db", None, kdf_limits=KdfLimits(opslimit=1, memlimit=8192)
    )
    history = History.open(store)
    try:
        view = _SQLite(store, history)
        pending: dict[tuple[str, str], AppRow] = {("counters", "n"): CounterRow("n", 3)}
        with store.batch():
            view.write([MemberRow("g:alice", "g", "alice", "admin")])
            inside = StoreView(history, lambda user: [], pending)
            assert inside.group_members("g") == {"alice": "admin"}
            assert inside.counter("n") == 3  # rows the batch writes at its end
        assert StoreView(history, lambda user: []).counter("n") is None
    finally:
        history.close()
        store.close()
