"""The read view of history that the messaging rules decide from.

Invariants:

* A rule reads only through :class:`HistoryView`; it never writes. What it
  wants written comes back in its :class:`~e2ee.messaging.outcome.Outcome`.
* A view answers with what stands *for the caller*: committed rows plus the
  rows of the transaction in progress (a receive batch), so a rule never
  decides from a stale row.
* Rows come back typed and frozen; a rule changes one with ``dataclasses.replace``.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from e2ee.messaging.rows import AppRow, MessageRow

__all__ = ["HistoryView"]

_R = TypeVar("_R", bound=AppRow)


class HistoryView(Protocol):
    """Read access to history, counters and the session list (blocking, no writes)."""

    def get(self, kind: type[_R], row_id: str) -> _R | None:
        """The row ``row_id`` of the table of ``kind`` (e.g. ``MessageRow``), or None."""
        ...

    def replies(self, message_id: str) -> list[MessageRow]:
        """The messages quoting ``message_id`` (their ``reply_to``), by id."""
        ...

    def counter(self, name: str) -> int | None:
        """The value of a named counter, or None if it was never written."""
        ...

    def group_members(self, group_id: str) -> dict[str, str]:
        """user -> role (``admin`` or ``member``) of a group; gone members left out."""
        ...

    def devices(self, user: str) -> list[int]:
        """Device ids of ``user`` we hold a session with."""
        ...
