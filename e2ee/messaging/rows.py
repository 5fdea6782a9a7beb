"""History rows as the messaging rules build them: table shapes, ids, messages.

Invariants:

* Rules build typed rows (one frozen dataclass per table, :data:`ROW_TYPES`);
  the store takes ``(table, full row)`` pairs (:func:`as_row`): every column
  of the table is present (missing ones are None) and unknown columns are
  refused (:func:`row`), so a row built here replaces the stored one whole.
* Booleans are stored as 0/1; message ids are lowercase hex.
* Pure: no I/O. :mod:`e2ee.history` creates these tables and reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Protocol, TypeVar

from e2ee.errors import UsageError

__all__ = [
    "NOTICE_TYPES",
    "POS_SCALE",
    "ROW_TYPES",
    "TABLES",
    "AppRow",
    "AttachmentRow",
    "ChatRow",
    "Columns",
    "CounterRow",
    "GapRow",
    "GroupRow",
    "MemberRow",
    "MessageRow",
    "OutboxRow",
    "ReactionRow",
    "ReceiptRow",
    "Row",
    "StoredMessage",
    "UserChatRow",
    "UserRow",
    "as_row",
    "direct_chat_id",
    "dumps",
    "from_columns",
    "group_chat_id",
    "row",
    "status_at_least",
    "to_message",
]


class Columns(Protocol):
    """Anything that gives a row's columns by name (a dict, an ``sqlite3.Row``)."""

    def __getitem__(self, key: str, /) -> Any: ...


#: An app row to commit: (table without the ``app_`` prefix, full row).
Row = tuple[str, dict[str, Any]]

# Column lists double as the tables' shape: every row built here has exactly
# these keys.
TABLES: Final[dict[str, dict[str, str]]] = {
    "users": {"id": "TEXT", "display_name": "TEXT", "created_at": "INTEGER"},
    "chats": {
        "id": "TEXT",
        "kind": "TEXT",
        "peer": "TEXT",
        "group_id": "TEXT",
        "timer_seconds": "INTEGER",
        "last_message_at": "INTEGER",
        "created_at": "INTEGER",
    },
    "users_chats": {"id": "TEXT", "chat_id": "TEXT", "user_id": "TEXT"},
    "groups": {
        "id": "TEXT",
        "name": "TEXT",
        "admins": "TEXT",
        "revision": "INTEGER",
        "created_by": "TEXT",
        "member": "INTEGER",
        "created_at": "INTEGER",
    },
    "users_groups": {"id": "TEXT", "group_id": "TEXT", "user_id": "TEXT", "role": "TEXT"},
    "messages": {
        "id": "TEXT",
        "chat_id": "TEXT",
        "group_id": "TEXT",
        "sender": "TEXT",
        "sender_device": "INTEGER",
        "outgoing": "INTEGER",
        "type": "TEXT",
        "text": "TEXT",
        "reply_to": "TEXT",
        "quote_text": "TEXT",
        "counter": "INTEGER",
        "sent_at": "INTEGER",
        "received_at": "INTEGER",
        "delivered_at": "INTEGER",
        "read_at": "INTEGER",
        "status": "TEXT",
        "edited": "INTEGER",
        "deleted": "INTEGER",
        "expire_seconds": "INTEGER",
        "expires_at": "INTEGER",
        "seq": "INTEGER",
        "pos": "INTEGER",
    },
    "attachments": {
        "id": "TEXT",
        "message_id": "TEXT",
        "blob_id": "TEXT",
        "key": "BLOB",
        "digest": "BLOB",
        "size": "INTEGER",
        "mime_type": "TEXT",
        "file_name": "TEXT",
        "local_path": "TEXT",
    },
    "receipts": {
        "id": "TEXT",
        "message_id": "TEXT",
        "user_id": "TEXT",
        "device_id": "INTEGER",
        "status": "TEXT",
        "updated_at": "INTEGER",
    },
    "reactions": {
        "id": "TEXT",
        "message_id": "TEXT",
        "user_id": "TEXT",
        "emoji": "TEXT",
        "updated_at": "INTEGER",
    },
    # Client bookkeeping, committed with the rows above.
    "outbox": {
        "id": "TEXT",
        "seq": "INTEGER",
        "chat_id": "TEXT",
        "mode": "TEXT",
        "targets": "TEXT",
        "ref": "TEXT",
        "kind": "TEXT",
        "payload": "BLOB",
        "state": "TEXT",
        "attempts": "INTEGER",
        "created_at": "INTEGER",
    },
    "counters": {"id": "TEXT", "value": "INTEGER"},
    "gaps": {"id": "TEXT", "ranges": "TEXT"},
}

#: A chat is shown in ``pos`` order: a message's ``pos`` is its ``seq`` times this,
#: except a message that arrives late (after a later one from its sender revealed
#: a gap): it takes a place between the gap notice and the message that revealed
#: it, so every sender's messages show in the sender's order.
POS_SCALE: Final = 1 << 20

#: ``messages`` rows that are notices about the conversation, not messages: ``gap``
#: (messages from the sender never arrived) and ``undecryptable`` (one could not be
#: read). Their ``text`` is a sentence for people; they are stored read, get no
#: receipts and are never the chat's unread or preview message.
NOTICE_TYPES: Final = ("gap", "undecryptable")

_STATUS_ORDER: Final = {"pending": 0, "failed": 0, "sent": 1, "delivered": 2, "read": 3}


def direct_chat_id(peer: str) -> str:
    """The chat id of the 1:1 conversation with ``peer``."""
    return f"dm:{peer}"


def group_chat_id(group_id: str) -> str:
    """The chat id of a group's conversation."""
    return f"group:{group_id}"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as kept in history.

    Attributes:
        id: message id (hex).
        chat_id: ``dm:<peer>`` or ``group:<group id>``.
        sender: sending user; ``outgoing`` tells whether it is us.
        type: ``text``, ``attachment``, ``group``, ``timer``, or one of the
            :data:`NOTICE_TYPES`...
        text: the text (after edits); None once deleted or expired.
        status: for outgoing messages the best status over all recipients
            (``pending``, ``sent``, ``delivered``, ``read``); ``received`` for
            incoming ones.
        reply_to: id of the quoted message, if any.
        seq: local order of arrival or composition.
    """

    id: str
    chat_id: str
    group_id: str | None
    sender: str
    sender_device: int
    outgoing: bool
    type: str
    text: str | None
    reply_to: str | None
    quote_text: str | None
    counter: int
    sent_at: int
    received_at: int | None
    delivered_at: int | None
    read_at: int | None
    status: str
    edited: bool
    deleted: bool
    expire_seconds: int
    expires_at: int | None
    seq: int

    def __repr__(self) -> str:
        return (
            f"StoredMessage(id={self.id}, chat_id={self.chat_id!r}, sender={self.sender!r}, "
            f"type={self.type!r}, status={self.status!r})"
        )


def to_message(row: Columns) -> StoredMessage:
    """Build a :class:`StoredMessage` from a ``messages`` row."""
    return StoredMessage(
        id=row["id"],
        chat_id=row["chat_id"],
        group_id=row["group_id"],
        sender=row["sender"],
        sender_device=row["sender_device"] or 0,
        outgoing=bool(row["outgoing"]),
        type=row["type"],
        text=row["text"],
        reply_to=row["reply_to"],
        quote_text=row["quote_text"],
        counter=row["counter"] or 0,
        sent_at=row["sent_at"] or 0,
        received_at=row["received_at"],
        delivered_at=row["delivered_at"],
        read_at=row["read_at"],
        status=row["status"] or "",
        edited=bool(row["edited"]),
        deleted=bool(row["deleted"]),
        expire_seconds=row["expire_seconds"] or 0,
        expires_at=row["expires_at"],
        seq=row["seq"] or 0,
    )


def row(table: str, **values: Any) -> Row:
    """A full row for ``table``: missing columns are None, unknown ones refused.

    Raises:
        UsageError: unknown table or column.
    """
    columns = TABLES.get(table)
    if columns is None:
        raise UsageError(f"unknown history table {table!r}")
    unknown = set(values) - set(columns)
    if unknown:
        raise UsageError(f"unknown columns for {table}: {sorted(unknown)}")
    full = {name: values.get(name) for name in columns}
    if table == "messages" and full["pos"] is None:
        full["pos"] = (full["seq"] or 0) * POS_SCALE
    return table, full


def status_at_least(current: str | None, new: str) -> str:
    """The later of two statuses: a receipt never moves a message backwards."""
    if current is None or _STATUS_ORDER.get(new, 0) > _STATUS_ORDER.get(current, 0):
        return new
    return current


def dumps(value: Any) -> str:
    """Compact JSON for list-valued columns (app rows hold scalars only)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# -- typed rows ---------------------------------------------------------------------------
#
# One frozen dataclass per table, fields in the table's column order (a test
# holds them to TABLES). Rules read and build these; mypy catches a misspelt
# column. ``as_row`` turns one into the (table, full row) pair the store takes.


@dataclass(frozen=True, slots=True)
class UserRow:
    """A user we have a chat or a group with."""

    TABLE: ClassVar[str] = "users"
    id: str
    display_name: str | None = None
    created_at: int | None = None


@dataclass(frozen=True, slots=True)
class ChatRow:
    """A conversation: ``kind`` is ``direct`` (``peer``) or ``group`` (``group_id``)."""

    TABLE: ClassVar[str] = "chats"
    id: str
    kind: str
    peer: str | None = None
    group_id: str | None = None
    timer_seconds: int | None = 0
    last_message_at: int | None = None
    created_at: int | None = None


@dataclass(frozen=True, slots=True)
class UserChatRow:
    """A user takes part in a chat (id ``<chat id>:<user>``)."""

    TABLE: ClassVar[str] = "users_chats"
    id: str
    chat_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class GroupRow:
    """A group as our committed state knows it (``admins`` is a JSON list)."""

    TABLE: ClassVar[str] = "groups"
    id: str
    name: str | None = None
    admins: str | None = None
    revision: int | None = 0
    created_by: str | None = None
    member: int | None = 0
    created_at: int | None = None


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A user's role in a group: ``admin``, ``member`` or ``gone``."""

    TABLE: ClassVar[str] = "users_groups"
    id: str
    group_id: str
    user_id: str
    role: str


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A message or notice as stored (see :class:`StoredMessage` for the public shape)."""

    TABLE: ClassVar[str] = "messages"
    id: str
    chat_id: str
    group_id: str | None = None
    sender: str = ""
    sender_device: int | None = None
    outgoing: int = 0
    type: str = "text"
    text: str | None = None
    reply_to: str | None = None
    quote_text: str | None = None
    counter: int | None = 0
    sent_at: int | None = None
    received_at: int | None = None
    delivered_at: int | None = None
    read_at: int | None = None
    status: str | None = None
    edited: int | None = 0
    deleted: int | None = 0
    expire_seconds: int | None = 0
    expires_at: int | None = None
    seq: int | None = None
    #: Place in the chat (see :data:`POS_SCALE`); left out: ``seq * POS_SCALE``.
    pos: int | None = None

    def __post_init__(self) -> None:
        if self.pos is None and self.seq is not None:
            object.__setattr__(self, "pos", self.seq * POS_SCALE)


@dataclass(frozen=True, slots=True)
class AttachmentRow:
    """A message's attachment (holds its key: never shown or logged)."""

    TABLE: ClassVar[str] = "attachments"
    id: str
    message_id: str
    blob_id: str | None = None
    key: bytes | None = field(default=None, repr=False)
    digest: bytes | None = field(default=None, repr=False)
    size: int | None = None
    mime_type: str | None = None
    file_name: str | None = None
    local_path: str | None = None


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """One recipient device's status of one of our messages."""

    TABLE: ClassVar[str] = "receipts"
    id: str
    message_id: str
    user_id: str
    device_id: int
    status: str
    updated_at: int | None = None


@dataclass(frozen=True, slots=True)
class ReactionRow:
    """A user's reaction to a message (``emoji == ""``: removed)."""

    TABLE: ClassVar[str] = "reactions"
    id: str
    message_id: str
    user_id: str
    emoji: str
    updated_at: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """Something to send: a payload (``mode`` pairwise/group) or a receipt."""

    TABLE: ClassVar[str] = "outbox"
    id: str
    seq: int
    chat_id: str
    mode: str
    targets: str
    ref: str | None = None
    kind: str = ""
    payload: bytes | None = field(default=None, repr=False)
    state: str = "queued"
    attempts: int | None = 0
    created_at: int | None = None


@dataclass(frozen=True, slots=True)
class GapRow:
    """The open gaps of one sender device in one chat (:mod:`e2ee.messaging.accounting`).

    ``ranges`` is JSON: a list of ``[first, last, missing, notice id]``, oldest
    first: counters ``first..last`` were skipped when a later message
    arrived, ``missing`` of them have not arrived since.
    """

    TABLE: ClassVar[str] = "gaps"
    id: str
    ranges: str = "[]"


@dataclass(frozen=True, slots=True)
class CounterRow:
    """A named counter (names: :mod:`e2ee.messaging.keys`)."""

    TABLE: ClassVar[str] = "counters"
    id: str
    value: int


AppRow = (
    UserRow
    | ChatRow
    | UserChatRow
    | GroupRow
    | MemberRow
    | MessageRow
    | AttachmentRow
    | ReceiptRow
    | ReactionRow
    | OutboxRow
    | CounterRow
    | GapRow
)
#: Every typed row class, by table.
ROW_TYPES: Final[dict[str, type[AppRow]]] = {
    cls.TABLE: cls
    for cls in (
        UserRow,
        ChatRow,
        UserChatRow,
        GroupRow,
        MemberRow,
        MessageRow,
        AttachmentRow,
        ReceiptRow,
        ReactionRow,
        OutboxRow,
        CounterRow,
        GapRow,
    )
}
_R = TypeVar("_R", bound=AppRow)


#: Field names per row class (dataclasses.fields() builds them anew on every call).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(kind: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(kind))
    return names


def as_row(value: AppRow) -> Row:
    """The (table, full row) pair the store commits."""
    return value.TABLE, {name: getattr(value, name) for name in _names(type(value))}


def from_columns(kind: type[_R], found: Mapping[str, Any]) -> _R:
    """A typed row from a stored row (columns the class does not know are ignored)."""
    values: dict[str, Any] = {name: found.get(name) for name in _names(kind)}
    return kind(**values)
