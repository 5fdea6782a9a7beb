"""An in-memory history: the :class:`HistoryView` twin of the SQLite one.

Invariants:

* It answers exactly as the store-backed view does for the rows it holds
  (same tables, same full rows, copies out), so the messaging rules can be
  driven without SQLite, a relay or an event loop (tests, simulations).
* :meth:`MemoryHistory.commit` applies an outcome whole: rows replace rows by
  id, counters are set, chat rows written; nothing else changes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import (
    TABLES,
    AppRow,
    MessageRow,
    Row,
    StoredMessage,
    as_row,
    from_columns,
    to_message,
)

__all__ = ["MemoryHistory"]

_R = TypeVar("_R", bound=AppRow)


class MemoryHistory:
    """History in dicts; ``devices`` is the session list the view reports.

    Args:
        devices: user -> device ids we hold a session with.
    """

    def __init__(self, devices: Mapping[str, Iterable[int]] | None = None) -> None:
        self._tables: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in TABLES}
        self._devices = {user: sorted(ids) for user, ids in (devices or {}).items()}

    def __repr__(self) -> str:
        return f"MemoryHistory({len(self._tables['messages'])} messages)"

    # -- HistoryView ---------------------------------------------------------------------

    def get(self, kind: type[_R], row_id: str) -> _R | None:
        """The typed row, or None."""
        found = self._tables[kind.TABLE].get(row_id)
        return None if found is None else from_columns(kind, found)

    def replies(self, message_id: str) -> list[MessageRow]:
        """The messages quoting ``message_id``, by id."""
        rows = self._tables["messages"]
        return [
            from_columns(MessageRow, rows[k])
            for k in sorted(rows)
            if rows[k]["reply_to"] == message_id
        ]

    def counter(self, name: str) -> int | None:
        """A counter's value, or None."""
        found = self._tables["counters"].get(name)
        return None if found is None else int(found["value"])

    def group_members(self, group_id: str) -> dict[str, str]:
        """user -> role of a group, gone members left out."""
        return {
            r["user_id"]: r["role"]
            for r in self._tables["users_groups"].values()
            if r["group_id"] == group_id and r["role"] != "gone"
        }

    def devices(self, user: str) -> list[int]:
        """Device ids of ``user`` we hold a session with."""
        return list(self._devices.get(user, []))

    # -- writes and reads for tests ----------------------------------------------------

    def set_devices(self, user: str, devices: Iterable[int]) -> None:
        """Record the devices we hold sessions with (a session was made)."""
        self._devices[user] = sorted(devices)

    def commit(self, outcome: Outcome) -> None:
        """Apply an outcome's rows, chat rows and counters."""
        self.put(outcome.all_rows())

    def put(self, rows: Iterable[AppRow | Row]) -> None:
        """Write full rows (replacing rows with the same id)."""
        for item in rows:
            table, values = item if isinstance(item, tuple) else as_row(item)
            self._tables[table][values["id"]] = dict(values)

    def messages(self, chat_id: str | None = None) -> list[StoredMessage]:
        """Stored messages (of one chat, or all), in chat order (``pos``)."""
        rows = [
            r
            for r in self._tables["messages"].values()
            if chat_id is None or r["chat_id"] == chat_id
        ]
        return [to_message(r) for r in sorted(rows, key=lambda r: r["pos"] or 0)]
