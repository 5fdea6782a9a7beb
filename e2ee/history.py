"""Local message history in the protocol store's SQLite file.

Invariants:

* Every write is an ``app_rows`` entry of a :class:`~e2ee.store.protocols.Changes`
  committed through :meth:`SQLiteProtocolStore.commit`, so a received message's
  rows commit in the same transaction as the session state that decrypted it.
  This module only *builds* rows; it never writes rows itself.
* App rows replace whole rows (columns left out are cleared), so updates are
  read-modify-write. The reads the messaging rules decide from
  (:meth:`History.current`, :meth:`History.current_members`,
  :meth:`History.current_replies`, :meth:`History.counter_value`) go through the
  store's own connection, so inside a receive batch they see the batch's
  commits (see ``e2ee.client.context.StoreView``).
* Every other read (pages, search, summaries) uses a separate read connection
  on the same file (WAL lets it read while the store writes); it never sees a
  half-committed message. The store opens it (:meth:`SQLiteProtocolStore.connect_reader`),
  keyed like its own when the file is encrypted.
* Table shapes and typed rows live in :mod:`e2ee.messaging.rows`.
* The schema is created by :meth:`History.open`, idempotently, and recorded as
  ``history_schema_version`` in the store's meta. Tables are ``STRICT`` with
  typed columns (the store adds nothing to them as long as rows use these
  columns); ``app_messages_fts`` indexes message text through triggers (the
  update trigger only when the text changed).
* Expired (disappearing) messages are overwritten in place: text, quote and
  attachment keys are cleared (``secure_delete`` is on for the store), the FTS
  index drops them through the update trigger, and queries leave them out.
* Booleans are stored as 0/1 (app rows refuse ``bool``); message ids are
  lowercase hex.

All methods block: the SDK calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from e2ee.errors import StorageError, UsageError
from e2ee.messaging.rows import (
    NOTICE_TYPES,
    POS_SCALE,
    TABLES,
    Row,
    StoredMessage,
    direct_chat_id,
    dumps,
    group_chat_id,
    status_at_least,
    to_message,
)
from e2ee.messaging.rows import (
    row as make_row,
)
from e2ee.store.protocols import Changes
from e2ee.store.sqlite import APP_TABLE_PREFIX, SQLiteProtocolStore
from e2ee.store.sqlite_sql import DB_ERRORS

__all__ = [
    "HISTORY_SCHEMA_VERSION",
    "NOTICE_TYPES",
    "AttachmentInfo",
    "Chat",
    "ChatSummary",
    "GroupInfo",
    "History",
    "Row",
    "StoredMessage",
    "direct_chat_id",
    "dumps",
    "group_chat_id",
    "to_message",
]

#: Version of the tables below; stored as the ``history_schema_version`` meta.
HISTORY_SCHEMA_VERSION: Final = 2
_FTS_UPDATE: Final = "app_messages_au"  # APP_TABLE_PREFIX + "messages_au"
#: The full-text index follows a message's text (an edit, an expiry), not its other columns.
_FTS_UPDATE_TRIGGER: Final = (
    "CREATE TRIGGER app_messages_au AFTER UPDATE ON app_messages "
    "WHEN old.text IS NOT new.text OR old.rowid IS NOT new.rowid BEGIN "
    "INSERT INTO app_messages_fts (app_messages_fts, rowid, text) "
    "VALUES ('delete', old.rowid, old.text); "
    "INSERT INTO app_messages_fts (rowid, text) VALUES (new.rowid, new.text); END"
)
_META_VERSION: Final = "history_schema_version"

_NOTICE_SQL: Final = "('gap', 'undecryptable')"

#: Incoming text/attachment messages not marked read (the partial index's WHERE).
_UNREAD: Final = (
    "outgoing = 0 AND read_at IS NULL AND deleted = 0 AND type IN ('text', 'attachment')"
)
#: Incoming messages that get a delivered receipt (the partial index's WHERE).
_DELIVERABLE: Final = "outgoing = 0 AND type IN ('text', 'attachment', 'timer')"
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS app_messages_chat ON app_messages (chat_id, seq)",
    "CREATE INDEX IF NOT EXISTS app_messages_place ON app_messages (chat_id, pos)",
    "CREATE INDEX IF NOT EXISTS app_messages_seq ON app_messages (seq)",
    "CREATE INDEX IF NOT EXISTS app_messages_expiry ON app_messages (expires_at) "
    "WHERE expires_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS app_receipts_message ON app_receipts (message_id)",
    "CREATE INDEX IF NOT EXISTS app_reactions_message ON app_reactions (message_id)",
    "CREATE INDEX IF NOT EXISTS app_users_groups_group ON app_users_groups (group_id)",
    "CREATE INDEX IF NOT EXISTS app_users_chats_chat ON app_users_chats (chat_id)",
    "CREATE INDEX IF NOT EXISTS app_outbox_state ON app_outbox (state, seq)",
    # Unread incoming messages only: chat summaries count them and mark_read finds
    # them without scanning a chat. Queries repeat this WHERE exactly (_UNREAD), so
    # SQLite can use the partial index.
    f"CREATE INDEX IF NOT EXISTS app_messages_unread ON app_messages (chat_id, seq) "
    f"WHERE {_UNREAD}",
    # Incoming messages by seq: the outbox looks for those above the delivered-receipt
    # watermark after every pass. Through app_messages_seq it stepped over every message
    # we sent since the last incoming one, a scan growing with a sending bot's history.
    f"CREATE INDEX IF NOT EXISTS app_messages_incoming ON app_messages (seq) WHERE {_DELIVERABLE}",
)


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group as our committed state knows it; ``member`` is False once we left."""

    id: str
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    revision: int
    member: bool


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What can be shown about an attachment (no key, no digest)."""

    message_id: str
    file_name: str
    size: int
    mime_type: str
    available: bool


@dataclass(frozen=True, slots=True)
class Chat:
    """A conversation: ``kind`` is ``direct`` or ``group``."""

    id: str
    kind: str
    peer: str | None
    group_id: str | None
    timer_seconds: int
    last_message_at: int | None


@dataclass(frozen=True, slots=True)
class ChatSummary:
    """A chat for a chat list: its unread count and its newest message (if any)."""

    chat: Chat
    unread: int
    last_message: StoredMessage | None


def _fts_query(text: str, prefix: bool = False) -> str:
    # Every word is quoted: user input is matched literally, never as FTS5 syntax. With
    # ``prefix`` each word is also marked as a prefix ('*': "histo" finds "history").
    star = "*" if prefix else ""
    return " ".join('"' + w.replace('"', '""') + '"' + star for w in text.split())


class History:
    """Build history rows and read them back.

    Args:
        store: the open SQLite protocol store holding the history tables.

    Use :meth:`open`, which also creates the schema.
    """

    def __init__(self, store: SQLiteProtocolStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"History(path={self._store.path!r})"

    @classmethod
    def open(cls, store: SQLiteProtocolStore) -> History:
        """Open a read connection on the store's file and create the schema if needed.

        Args:
            store: the open store.

        Returns:
            The history.

        Raises:
            StorageError: the file cannot be opened, or was written by a newer
                history schema.
        """
        conn = store.connect_reader()  # keyed like the store's own when it is encrypted
        history = cls(store, conn)
        try:
            history._migrate()
        except BaseException:
            history.close()
            raise
        return history

    def close(self) -> None:
        """Close the read connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def _migrate(self) -> None:
        version = int(self._store.get_meta(_META_VERSION) or "0")
        if version > HISTORY_SCHEMA_VERSION:
            raise StorageError(
                f"history schema {version} is newer than this build ({HISTORY_SCHEMA_VERSION})"
            )
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table, columns in TABLES.items():
                cols = ", ".join(
                    f"{name} {kind} PRIMARY KEY" if name == "id" else f"{name} {kind}"
                    for name, kind in columns.items()
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {APP_TABLE_PREFIX}{table} ({cols}) STRICT"
                )
            known = {r[1] for r in conn.execute(f"PRAGMA table_info({APP_TABLE_PREFIX}messages)")}
            if "pos" not in known:
                # Schema 2 shows a chat in ``pos`` order (late messages in their sender's
                # order); until then the place of every message was its ``seq``.
                conn.execute(f"ALTER TABLE {APP_TABLE_PREFIX}messages ADD COLUMN pos INTEGER")
                conn.execute(
                    f"UPDATE {APP_TABLE_PREFIX}messages SET pos = seq * ?",  # noqa: S608
                    (POS_SCALE,),
                )
            for statement in _INDEXES:
                conn.execute(statement)
            conn.execute("COMMIT")
            if not self._fts_complete(conn):
                # enable_fts runs a script (it commits on its own); replace=True
                # repairs a partial index. sqlite-utils is imported only here: it
                # costs a tenth of a second that opening an account rarely needs.
                import sqlite_utils

                db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
                db.table(f"{APP_TABLE_PREFIX}messages").enable_fts(
                    ["text"], create_triggers=True, replace=True
                )
            found = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?",
                (_FTS_UPDATE,),
            ).fetchone()
            if found is None or found[0] != _FTS_UPDATE_TRIGGER:
                # The update trigger sqlite-utils makes re-indexes the text on every
                # update; a status change (every sent message, every receipt) then
                # rewrote the index for nothing. Ours does it only when the text changed.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"DROP TRIGGER IF EXISTS {_FTS_UPDATE}")
                conn.execute(_FTS_UPDATE_TRIGGER)
                conn.execute("COMMIT")
        except DB_ERRORS as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError(f"cannot create the history schema: {exc}") from exc
        if version != HISTORY_SCHEMA_VERSION:
            self._store.commit(Changes(meta_put={_META_VERSION: str(HISTORY_SCHEMA_VERSION)}))

    @staticmethod
    def _fts_complete(conn: sqlite3.Connection) -> bool:
        """True when the full-text index and its three triggers exist."""
        fts = f"{APP_TABLE_PREFIX}messages_fts"
        names = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE name IN (?, ?, ?, ?)",
                (
                    fts,
                    f"{APP_TABLE_PREFIX}messages_ai",
                    f"{APP_TABLE_PREFIX}messages_ad",
                    f"{APP_TABLE_PREFIX}messages_au",
                ),
            )
        }
        return len(names) == 4

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("history is closed")
        return self._conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._connection().execute(sql, params).fetchall())
            except DB_ERRORS as exc:
                raise StorageError(f"cannot read history: {exc}") from exc

    # -- row builders (pure, except reading the committed row to update) --------------

    @staticmethod
    def row(table: str, **values: Any) -> Row:
        """A full row for ``table`` (see :func:`e2ee.messaging.rows.row`).

        Raises:
            UsageError: unknown table or column.
        """
        return make_row(table, **values)

    def current(self, table: str, row_id: str) -> dict[str, Any] | None:
        """The committed row, read through the store's own connection.

        Raises:
            StorageError: the store cannot be read.
        """
        found = self._store.load_app_row(table, row_id)
        return None if found is None else dict(found)

    def updated(self, table: str, row_id: str, **changes: Any) -> Row | None:
        """The committed row with ``changes`` applied, or None if there is no such row.

        Raises:
            UsageError: unknown table or column.
            StorageError: the store cannot be read.
        """
        found = self.current(table, row_id)
        if found is None:
            return None
        found.update(changes)
        return self.row(table, **{k: v for k, v in found.items() if k in TABLES[table]})

    def next_value(self, counter: str, pending: Mapping[str, int] | None = None) -> int:
        """The next value of a named local counter (1, 2, ...), not yet committed.

        Commit ``History.row("counters", id=counter, value=result)`` with the row
        that uses it.
        """
        if pending and counter in pending:
            return pending[counter] + 1
        found = self.current("counters", counter)
        return int(found["value"]) + 1 if found else 1

    def current_members(self, group_id: str) -> dict[str, str]:
        """A group's members (user -> role, gone ones left out), read like :meth:`current`.

        Read through the store's own connection, so inside a receive batch it
        sees the batch's commits (:meth:`group_members` sees committed rows only).

        Raises:
            StorageError: the store cannot be read.
        """
        rows = self._store.load_app_rows("users_groups", "group_id", group_id)
        return {r["user_id"]: r["role"] for r in rows if r["role"] != "gone"}

    def current_replies(self, message_id: str) -> list[dict[str, Any]]:
        """The ``messages`` rows quoting ``message_id``, read like :meth:`current`.

        Raises:
            StorageError: the store cannot be read.
        """
        return [dict(r) for r in self._store.load_app_rows("messages", "reply_to", message_id)]

    def counter_value(self, counter: str) -> int | None:
        """The committed value of a named counter, or None."""
        found = self.current("counters", counter)
        return None if found is None else int(found["value"])

    def counter_ids(self, prefix: str) -> list[str]:
        """Names of the stored counters that start with ``prefix``."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._query(
            "SELECT id FROM app_counters WHERE id LIKE ? ESCAPE '\\' ORDER BY id",
            (escaped + "%",),
        )
        return [r[0] for r in rows]

    @staticmethod
    def status_at_least(current: str | None, new: str) -> str:
        """The later of two statuses: a receipt never moves a message backwards."""
        return status_at_least(current, new)

    # -- reads ---------------------------------------------------------------------------

    def message(self, message_id: str) -> StoredMessage | None:
        """One message by id (hex), expired ones excluded.

        Raises:
            StorageError: the file cannot be read.
        """
        rows = self._query(
            "SELECT * FROM app_messages WHERE id = ? AND deleted IS NOT 2", (message_id,)
        )
        return to_message(rows[0]) if rows else None

    def messages(
        self,
        chat_id: str,
        *,
        before: str | None = None,
        after: str | None = None,
        around: str | None = None,
        limit: int = 50,
    ) -> list[StoredMessage]:
        """A page of a chat, oldest first.

        Without ``after``/``around``: the page ending just before ``before`` (or
        the newest page). With ``after``: the page starting just after that
        message. With ``around``: that message in the middle of the page (for
        opening a chat at a search hit).

        Args:
            chat_id: ``direct_chat_id(peer)`` or ``group_chat_id(group)``.
            before: a message id; the page ends before it. None for the newest page.
            after: a message id; the page starts after it.
            around: a message id; the page holds it and up to ``limit // 2``
                messages before it.
            limit: at most this many messages (1..1000).

        Returns:
            Up to ``limit`` messages in chat order.

        Raises:
            UsageError: bad limit, more than one of before/after/around, or the
                named message is not in this chat.
            StorageError: the file cannot be read.
        """
        if not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        anchors = [a for a in (before, after, around) if a is not None]
        if len(anchors) > 1:
            raise UsageError("give at most one of before, after and around")
        if after is not None:
            return self._page_after(chat_id, self._pos_in(chat_id, after, "after"), limit)
        if around is not None:
            pos = self._pos_in(chat_id, around, "around")
            older = self._page_before(chat_id, pos, limit // 2) if limit > 1 else []
            return older + self._page_after(chat_id, pos - 1, limit - len(older))
        bound = 2**62 if before is None else self._pos_in(chat_id, before, "before")
        return self._page_before(chat_id, bound, limit)

    def _pos_in(self, chat_id: str, message_id: str, what: str) -> int:
        rows = self._query(
            "SELECT pos FROM app_messages WHERE id = ? AND chat_id = ?", (message_id, chat_id)
        )
        if not rows:
            raise UsageError(f"'{what}' is not a message of this chat")
        return int(rows[0]["pos"])

    def _page_before(self, chat_id: str, pos: int, limit: int) -> list[StoredMessage]:
        rows = self._query(
            "SELECT * FROM app_messages WHERE chat_id = ? AND pos < ? AND deleted IS NOT 2 "
            "ORDER BY pos DESC LIMIT ?",
            (chat_id, pos, limit),
        )
        return [to_message(r) for r in reversed(rows)]

    def _page_after(self, chat_id: str, pos: int, limit: int) -> list[StoredMessage]:
        rows = self._query(
            "SELECT * FROM app_messages WHERE chat_id = ? AND pos > ? AND deleted IS NOT 2 "
            "ORDER BY pos LIMIT ?",
            (chat_id, pos, limit),
        )
        return [to_message(r) for r in rows]

    def messages_since(
        self, seq: int, *, incoming_only: bool = True, limit: int = 500
    ) -> list[StoredMessage]:
        """Messages of every chat stored after ``seq`` (local order), oldest first.

        For a program that prints what arrived since it last looked: remember the
        largest ``seq`` seen and pass it next time. Expired messages are left out.

        Args:
            seq: the last ``seq`` already seen (0 for everything).
            incoming_only: leave out our own messages.
            limit: at most this many (1..1000); call again from the last ``seq``.

        Raises:
            UsageError: bad limit.
            StorageError: the file cannot be read.
        """
        if not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        mine = " AND outgoing = 0" if incoming_only else ""
        rows = self._query(
            f"SELECT * FROM app_messages WHERE seq > ? AND deleted IS NOT 2{mine} "  # noqa: S608
            "ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [to_message(r) for r in rows]

    def search(
        self, text: str, *, chat_id: str | None = None, limit: int = 50
    ) -> list[StoredMessage]:
        """Full-text search over message text, best matches first.

        Words are matched literally (no FTS syntax); all must occur.

        Raises:
            UsageError: bad limit.
            StorageError: the file cannot be read.
        """
        found = self._fts_select(_fts_query(text), chat_id, limit)
        if found is None:
            return []
        sql, params = found
        sql += " ORDER BY f.rank LIMIT ?"
        params.append(limit)
        return [to_message(r) for r in self._query(sql, params)]

    def _fts_select(
        self, query: str, chat_id: str | None, limit: int
    ) -> tuple[str, list[Any]] | None:
        """The search statement both searches share (no ORDER/LIMIT yet), or None when
        ``query`` is empty.

        Raises:
            UsageError: bad limit.
        """
        if not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        if not query:
            return None
        sql = (
            "SELECT m.* FROM app_messages_fts f JOIN app_messages m ON m.rowid = f.rowid "
            "WHERE app_messages_fts MATCH ? AND m.deleted IS 0"
        )
        params: list[Any] = [query]
        if chat_id is not None:
            sql += " AND m.chat_id = ?"
            params.append(chat_id)
        return sql, params

    def search_newest(
        self,
        text: str,
        *,
        chat_id: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[StoredMessage]:
        """Prefix search over message text, newest first, one page at a time.

        Every word of ``text`` must start a word of the message (``histo`` finds
        ``history``); words are matched literally, never as FTS syntax. Pages
        follow local order (``seq``): pass the last message of a page as
        ``before`` to get the next, older page.

        Args:
            text: the words to look for (empty or blank finds nothing).
            chat_id: only this chat (``direct_chat_id``/``group_chat_id``).
            before: a message id; only hits stored before it (any chat).
            limit: at most this many (1..1000).

        Returns:
            Up to ``limit`` matching messages, newest first; deleted and expired
            messages are left out.

        Raises:
            UsageError: bad limit, or ``before`` names no stored message.
            StorageError: the file cannot be read.
        """
        found = self._fts_select(_fts_query(text, prefix=True), chat_id, limit)
        if found is None:
            return []
        sql, params = found
        if before is not None:
            rows = self._query("SELECT seq FROM app_messages WHERE id = ?", (before,))
            if not rows:
                raise UsageError("'before' names no stored message")
            sql += " AND m.seq < ?"
            params.append(int(rows[0]["seq"]))
        sql += " ORDER BY m.seq DESC LIMIT ?"
        params.append(limit)
        return [to_message(r) for r in self._query(sql, params)]

    def chats(self) -> list[Chat]:
        """Every chat, the most recently active first."""
        rows = self._query("SELECT * FROM app_chats ORDER BY last_message_at DESC NULLS LAST")
        return [
            Chat(
                r["id"],
                r["kind"],
                r["peer"],
                r["group_id"],
                r["timer_seconds"] or 0,
                r["last_message_at"],
            )
            for r in rows
        ]

    def chat_summaries(self) -> list[ChatSummary]:
        """Every chat with its unread count and newest message, most recent first.

        One query: the unread counts come from a partial index of unread rows,
        the newest message from the ``(chat_id, seq)`` index.

        Raises:
            StorageError: the file cannot be read.
        """
        rows = self._query(
            "SELECT c.id AS c_id, c.kind AS c_kind, c.peer AS c_peer, c.group_id AS c_group, "  # noqa: S608  (_UNREAD is a constant)
            "c.timer_seconds AS c_timer, c.last_message_at AS c_last, "
            f"(SELECT count(*) FROM app_messages u WHERE u.chat_id = c.id AND {_UNREAD}) "
            "AS c_unread, m.* FROM app_chats c LEFT JOIN app_messages m ON m.rowid = ("
            "SELECT l.rowid FROM app_messages l WHERE l.chat_id = c.id AND l.deleted IS NOT 2 "
            f"AND l.type NOT IN {_NOTICE_SQL} "
            "ORDER BY l.seq DESC LIMIT 1) ORDER BY c.last_message_at DESC NULLS LAST"
        )
        return [
            ChatSummary(
                Chat(
                    r["c_id"],
                    r["c_kind"],
                    r["c_peer"],
                    r["c_group"],
                    r["c_timer"] or 0,
                    r["c_last"],
                ),
                int(r["c_unread"]),
                to_message(r) if r["id"] is not None else None,
            )
            for r in rows
        ]

    def queued_count(self) -> int:
        """Messages waiting in the outbox (receipts, typing and session resets not counted)."""
        rows = self._query(
            "SELECT count(*) AS n FROM app_outbox WHERE state = 'queued' AND mode != 'receipt' "
            "AND kind NOT IN ('typing', 'session_reset')"
        )
        return int(rows[0]["n"])

    def receipts(self, message_id: str) -> dict[tuple[str, int], str]:
        """Per recipient device status of an outgoing message: (user, device) -> status."""
        rows = self._query(
            "SELECT user_id, device_id, status FROM app_receipts WHERE message_id = ?",
            (message_id,),
        )
        return {(r["user_id"], r["device_id"]): r["status"] for r in rows}

    def reactions(self, message_id: str) -> dict[str, str]:
        """Reactions to a message: user -> emoji (removed reactions left out)."""
        rows = self._query(
            "SELECT user_id, emoji FROM app_reactions WHERE message_id = ? AND emoji != ''",
            (message_id,),
        )
        return {r["user_id"]: r["emoji"] for r in rows}

    def attachment(self, message_id: str) -> dict[str, Any] | None:
        """The attachment row of a message (includes its key: keep it private)."""
        rows = self._query("SELECT * FROM app_attachments WHERE message_id = ?", (message_id,))
        return dict(rows[0]) if rows else None

    def attachment_ids(self) -> list[str]:
        """Ids of the messages whose attachment can still be fetched (its key is known)."""
        rows = self._query(
            "SELECT message_id FROM app_attachments WHERE key IS NOT NULL ORDER BY message_id"
        )
        return [r[0] for r in rows]

    def group_members(self, group_id: str) -> dict[str, str]:
        """user -> role (``admin`` or ``member``) for a group, as we know it."""
        rows = self._query(
            "SELECT user_id, role FROM app_users_groups WHERE group_id = ? AND role != 'gone'",
            (group_id,),
        )
        return {r["user_id"]: r["role"] for r in rows}

    def groups(self) -> list[GroupInfo]:
        """Every group we know, by name."""
        out = []
        for row in self._query("SELECT * FROM app_groups ORDER BY name, id"):
            members = self.group_members(row["id"])
            out.append(
                GroupInfo(
                    id=row["id"],
                    name=row["name"] or "",
                    members=tuple(sorted(members)),
                    admins=tuple(json.loads(row["admins"] or "[]")),
                    revision=int(row["revision"] or 0),
                    member=bool(row["member"]),
                )
            )
        return out

    def users(self) -> list[str]:
        """Every user we have a chat or a group with, sorted."""
        rows = self._query(
            "SELECT id FROM app_users UNION SELECT peer FROM app_chats WHERE peer IS NOT NULL "
            "ORDER BY 1"
        )
        return [r[0] for r in rows]

    def attachment_info(self, message_id: str) -> AttachmentInfo | None:
        """Name, size and type of a message's attachment, without its key."""
        rows = self._query(
            "SELECT file_name, size, mime_type, key IS NOT NULL AS available "
            "FROM app_attachments WHERE message_id = ?",
            (message_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return AttachmentInfo(
            message_id,
            r["file_name"] or "",
            int(r["size"] or 0),
            r["mime_type"] or "",
            bool(r["available"]),
        )

    def group(self, group_id: str) -> dict[str, Any] | None:
        """The group row, or None."""
        rows = self._query("SELECT * FROM app_groups WHERE id = ?", (group_id,))
        return dict(rows[0]) if rows else None

    def pending_outbox(self) -> list[dict[str, Any]]:
        """Outbox entries not yet accepted by the relay, in composition order."""
        rows = self._query("SELECT * FROM app_outbox WHERE state = 'queued' ORDER BY seq")
        return [dict(r) for r in rows]

    def unread(self, chat_id: str) -> list[tuple[str, str]]:
        """Incoming text/attachment messages of a chat not marked read: (id, sender)."""
        rows = self._query(
            f"SELECT id, sender FROM app_messages WHERE chat_id = ? AND {_UNREAD} ORDER BY seq",  # noqa: S608
            (chat_id,),
        )
        return [(r["id"], r["sender"]) for r in rows]

    def undelivered(self, after_seq: int, limit: int) -> list[tuple[str, str, int]]:
        """Incoming messages above ``after_seq`` that get a delivered receipt.

        Returns:
            (message id, sender, seq) in ``seq`` order, at most ``limit``.
        """
        rows = self._query(
            "SELECT id, sender, seq FROM app_messages "  # noqa: S608 -- constant text
            f"WHERE seq > ? AND {_DELIVERABLE} ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [(r["id"], r["sender"], int(r["seq"])) for r in rows]

    def max_seq(self, table: str) -> int:
        """The largest ``seq`` in ``messages`` or ``outbox`` (0 when empty)."""
        if table not in ("messages", "outbox"):
            raise UsageError("max_seq is kept for messages and outbox")
        rows = self._query(f"SELECT max(seq) AS s FROM {APP_TABLE_PREFIX}{table}")  # noqa: S608
        return int(rows[0]["s"] or 0)

    def expired(self, now_ms: int) -> list[str]:
        """Ids of messages whose disappearing timer ran out and are not cleared yet."""
        rows = self._query(
            "SELECT id FROM app_messages WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "AND deleted IS NOT 2",
            (now_ms,),
        )
        return [r["id"] for r in rows]

    def chat_row_ids(self, chat_id: str) -> list[tuple[str, str]]:
        """Every ``(table, id)`` of a chat's local history (what deleting it removes).

        Its messages, their attachments, receipts and reactions, who takes part
        in it, its non-receipt outbox entries and the chat row itself. Group
        state (membership, Sender Keys) and per-sender counters are not in it.
        """
        found: list[tuple[str, str]] = []
        for table, sql in (
            (
                "attachments",
                "SELECT a.id FROM app_attachments a JOIN app_messages m "
                "ON m.id = a.message_id WHERE m.chat_id = ?",
            ),
            (
                "receipts",
                "SELECT r.id FROM app_receipts r JOIN app_messages m "
                "ON m.id = r.message_id WHERE m.chat_id = ?",
            ),
            (
                "reactions",
                "SELECT r.id FROM app_reactions r JOIN app_messages m "
                "ON m.id = r.message_id WHERE m.chat_id = ?",
            ),
            ("messages", "SELECT id FROM app_messages WHERE chat_id = ?"),
            ("users_chats", "SELECT id FROM app_users_chats WHERE chat_id = ?"),
            ("outbox", "SELECT id FROM app_outbox WHERE chat_id = ? AND mode != 'receipt'"),
            ("chats", "SELECT id FROM app_chats WHERE id = ?"),
        ):
            found.extend((table, str(r["id"])) for r in self._query(sql, (chat_id,)))
        return found

    def iter_messages(self, chat_id: str, *, page: int = 200) -> Iterator[StoredMessage]:
        """Every message of a chat, newest first, page by page."""
        before: str | None = None
        while True:
            batch = self.messages(chat_id, before=before, limit=page)
            if not batch:
                return
            yield from reversed(batch)
            before = batch[0].id
