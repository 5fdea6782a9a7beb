"""Local history: schema, rows committed through the store, paging, search."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2ee.errors import StorageError, UsageError
from e2ee.history import HISTORY_SCHEMA_VERSION, History, direct_chat_id
from e2ee.messaging.rows import POS_SCALE
from e2ee.store import Changes
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteProtocolStore]:
    s = SQLiteProtocolStore.open(tmp_path / "db.sqlite", kdf_limits=FAST_KDF)
    yield s
    s.close()


def _msg(seq: int, text: str, chat: str = "dm:bob", **extra: object) -> tuple[str, dict]:
    return History.row(
        "messages",
        id=f"{seq:032x}",
        chat_id=chat,
        sender="bob",
        sender_device=1,
        outgoing=0,
        type="text",
        text=text,
        counter=seq,
        sent_at=1000 + seq,
        status="received",
        edited=0,
        deleted=0,
        expire_seconds=0,
        seq=seq,
        **extra,
    )


def test_schema_is_created_once_and_versioned(store: SQLiteProtocolStore) -> None:
    h = History.open(store)
    h.close()
    again = History.open(store)  # idempotent
    assert store.get_meta("history_schema_version") == str(HISTORY_SCHEMA_VERSION)
    assert again.messages(direct_chat_id("bob")) == []
    again.close()


def test_newer_schema_is_refused(store: SQLiteProtocolStore) -> None:
    store.commit(Changes(meta_put={"history_schema_version": "99"}))
    with pytest.raises(StorageError):
        History.open(store)


def test_paging_returns_older_pages_in_order(store: SQLiteProtocolStore) -> None:
    h = History.open(store)
    store.commit(Changes(app_rows=tuple(_msg(i, f"message {i}") for i in range(1, 121))))
    newest = h.messages("dm:bob", limit=50)
    assert [m.counter for m in newest] == list(range(71, 121))
    older = h.messages("dm:bob", before=newest[0].id, limit=50)
    assert [m.counter for m in older] == list(range(21, 71))
    oldest = h.messages("dm:bob", before=older[0].id, limit=50)
    assert [m.counter for m in oldest] == list(range(1, 21))
    assert h.messages("dm:bob", before=oldest[0].id) == []
    assert len(list(h.iter_messages("dm:bob", page=7))) == 120
    with pytest.raises(UsageError):
        h.messages("dm:carol", before=newest[0].id)
    h.close()


def test_a_chat_pages_in_place_order_with_late_messages_in_between(
    store: SQLiteProtocolStore,
) -> None:
    h = History.open(store)
    rows = [_msg(i, f"message {i}") for i in (1, 3, 4)]
    # Counter 2 arrived last (seq 5) but belongs between 1 and 3.
    late = History.row(
        "messages", **{**_msg(5, "message 2")[1], "counter": 2, "pos": 3 * POS_SCALE - 1}
    )
    store.commit(Changes(app_rows=(*rows, late)))
    assert [m.text for m in h.messages("dm:bob")] == [f"message {i}" for i in (1, 2, 3, 4)]
    assert [m.text for m in h.messages("dm:bob", before=f"{3:032x}")] == ["message 1", "message 2"]
    assert [m.text for m in h.messages("dm:bob", after=f"{5:032x}", limit=1)] == ["message 3"]
    # Arrival order stays what pollers read.
    assert [m.text for m in h.messages_since(0)][-1] == "message 2"
    h.close()


def test_a_schema_1_history_gets_places_in_arrival_order(store: SQLiteProtocolStore) -> None:
    h = History.open(store)
    h.close()
    conn = sqlite3.connect(store.path)
    conn.execute("DROP INDEX app_messages_place")
    conn.execute("ALTER TABLE app_messages DROP COLUMN pos")
    conn.commit()
    columns = [c for c in History.row("messages", id="x")[1] if c != "pos"]
    for i in (2, 1, 3):
        values = _msg(i, f"message {i}")[1]
        conn.execute(
            f"INSERT INTO app_messages ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            [values[c] for c in columns],
        )
    conn.commit()
    conn.close()
    store.commit(Changes(meta_put={"history_schema_version": "1"}))
    again = History.open(store)
    assert store.get_meta("history_schema_version") == str(HISTORY_SCHEMA_VERSION)
    assert [m.counter for m in again.messages("dm:bob")] == [1, 2, 3]
    again.close()


def test_search_is_literal_and_follows_edits_and_expiry(store: SQLiteProtocolStore) -> None:
    h = History.open(store)
    store.commit(
        Changes(
            app_rows=(
                _msg(1, "lunch at noon?"),
                _msg(2, "dinner tonight", chat="dm:carol"),
                _msg(3, 'weird "quotes" AND OR NEAR('),
            )
        )
    )
    assert [m.counter for m in h.search("lunch")] == [1]
    assert [m.counter for m in h.search("dinner", chat_id="dm:bob")] == []
    assert [m.counter for m in h.search('"quotes" NEAR(')] == [3]  # no FTS syntax errors
    edited = h.updated("messages", f"{1:032x}", text="brunch at noon?", edited=1)
    assert edited is not None
    store.commit(Changes(app_rows=(edited,)))
    assert h.search("lunch") == []
    assert [m.text for m in h.search("brunch")] == ["brunch at noon?"]
    gone = h.updated("messages", f"{1:032x}", text=None, deleted=2)
    assert gone is not None
    store.commit(Changes(app_rows=(gone,)))
    assert h.search("brunch") == [] and h.message(f"{1:032x}") is None
    assert [m.counter for m in h.messages("dm:bob")] == [3]
    h.close()


def test_search_follows_status_changes_and_an_old_index_trigger_is_replaced(
    store: SQLiteProtocolStore, tmp_path: Path
) -> None:
    """The index is rewritten only when the text changes; a file whose update trigger
    re-indexed every update (before 2026-12-07) gets the new one when opened."""
    h = History.open(store)
    store.commit(Changes(app_rows=(_msg(1, "lunch at noon?"), _msg(2, "lunch again"))))
    for status in ("delivered", "read"):
        moved = h.updated("messages", f"{1:032x}", status=status)
        assert moved is not None
        store.commit(Changes(app_rows=(moved,)))
    assert [m.counter for m in h.search("lunch")] == [2, 1]
    assert h.message(f"{1:032x}").status == "read"  # type: ignore[union-attr]
    h.close()
    # The trigger sqlite-utils makes: every update deletes and re-inserts the text.
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.executescript(
        "DROP TRIGGER app_messages_au; CREATE TRIGGER app_messages_au AFTER UPDATE ON "
        "app_messages BEGIN INSERT INTO app_messages_fts (app_messages_fts, rowid, text) "
        "VALUES('delete', old.rowid, old.text); INSERT INTO app_messages_fts (rowid, text) "
        "VALUES (new.rowid, new.text); END;"
    )
    conn.close()
    again = History.open(store)
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    (trigger,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'app_messages_au'")
    conn.close()
    assert "WHEN old.text IS NOT new.text" in trigger[0]
    edited = again.updated("messages", f"{2:032x}", text="brunch again", edited=1)
    assert edited is not None
    store.commit(Changes(app_rows=(edited,)))
    assert [m.counter for m in again.search("lunch")] == [1]
    assert [m.counter for m in again.search("brunch")] == [2]
    again.close()


def test_history_rows_commit_atomically_with_protocol_state(
    store: SQLiteProtocolStore,
) -> None:
    """A failing commit writes neither the history row nor the session state."""
    h = History.open(store)
    bad = Changes(meta_put={"x": "1"}, app_rows=(_msg(1, "hi"), ("messages", {"id": 5})))
    with pytest.raises(StorageError):
        store.commit(bad)
    assert store.get_meta("x") is None and h.messages("dm:bob") == []
    h.close()


def test_row_builder_refuses_unknown_columns() -> None:
    with pytest.raises(UsageError):
        History.row("messages", id="x", bogus=1)
    with pytest.raises(UsageError):
        History.row("nope", id="x")
    assert History.status_at_least("read", "delivered") == "read"
    assert History.status_at_least("sent", "delivered") == "delivered"


def test_unread_rows_are_found_through_their_own_index(store: SQLiteProtocolStore) -> None:
    """mark_read and chat summaries touch the unread rows only, not the whole chat."""
    h = History.open(store)
    read = [_msg(i, f"old {i}", read_at=5) for i in range(1, 2001)]
    unread = [_msg(i, f"new {i}") for i in range(2001, 2004)]
    chat = History.row("chats", id="dm:bob", kind="direct", peer="bob", last_message_at=1)
    store.commit(Changes(app_rows=(*read, *unread, chat)))
    assert [mid for mid, _ in h.unread("dm:bob")] == [f"{i:032x}" for i in range(2001, 2004)]
    [summary] = h.chat_summaries()
    assert summary.unread == 3
    assert summary.last_message is not None and summary.last_message.counter == 2003
    conn = h._connection()
    for sql in (
        "SELECT id, sender FROM app_messages WHERE chat_id = ? AND "
        "outgoing = 0 AND read_at IS NULL AND deleted = 0 AND type IN ('text', 'attachment') "
        "ORDER BY seq",
        "SELECT count(*) FROM app_messages u WHERE u.chat_id = ? AND "
        "outgoing = 0 AND read_at IS NULL AND deleted = 0 AND type IN ('text', 'attachment')",
    ):
        plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("dm:bob",)))
        assert "app_messages_unread" in plan, plan
    h.close()


def test_undelivered_skips_our_own_messages_through_its_index(
    store: SQLiteProtocolStore,
) -> None:
    """A sending bot's history does not slow the delivered-receipt lookup after each pass:
    incoming messages above the watermark come from a partial index, not a walk over every
    message sent since the last one that arrived."""
    h = History.open(store)
    mine = [
        ("messages", {**_msg(i, f"mine {i}")[1], "outgoing": 1, "sender": "me"})
        for i in range(1, 2001)
    ]
    store.commit(Changes(app_rows=(_msg(2001, "in"), *mine, _msg(2002, "also in"))))
    conn = h._connection()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)  # the SQL undelivered runs, values inlined
    assert h.undelivered(0, 10) == [
        (f"{2001:032x}", "bob", 2001),
        (f"{2002:032x}", "bob", 2002),
    ]
    conn.set_trace_callback(None)
    assert h.undelivered(2001, 10) == [(f"{2002:032x}", "bob", 2002)]
    assert h.undelivered(2002, 10) == []
    [sql] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert "app_messages_incoming" in plan, plan
    h.close()


def test_messages_since_a_seq_across_chats(store: SQLiteProtocolStore) -> None:
    h = History.open(store)
    store.commit(
        Changes(
            app_rows=(
                _msg(1, "one"),
                _msg(2, "two", chat="dm:carol"),
                ("messages", {**_msg(3, "mine")[1], "outgoing": 1, "sender": "me"}),
                _msg(4, "four"),
            )
        )
    )
    assert [m.text for m in h.messages_since(0)] == ["one", "two", "four"]
    assert [m.text for m in h.messages_since(1, limit=1)] == ["two"]
    assert [m.text for m in h.messages_since(2, incoming_only=False)] == ["mine", "four"]
    assert h.messages_since(4) == []
    with pytest.raises(UsageError):
        h.messages_since(0, limit=0)
    h.close()


def test_opening_an_account_loads_no_network_stack(tmp_path: Path) -> None:
    """Reading local history (an offline command) never imports aiohttp or sqlite-utils."""
    import subprocess
    import sys

    folder = str(tmp_path / "a")
    create = f"""
import asyncio
from e2ee.client import Client
from e2ee.store.sealing import KdfLimits

async def main():
    made = await Client.create({folder!r}, "alice", "http://127.0.0.1:9",
                               kdf_limits=KdfLimits(1, 8192))
    await made.close()

asyncio.run(main())
"""
    read = f"""
import asyncio, sys
from e2ee.client import Client

async def main():
    client = await Client.open({folder!r})
    client.history.messages("dm:bob")
    await client.contacts()
    await client.close()
    print(sorted(m for m in ("aiohttp", "sqlite_utils") if m in sys.modules))

asyncio.run(main())
"""
    for probe in (create, read):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
