"""The read view of history that the messaging rules decide from.

Invariants:

* A rule reads only through :class:`HistoryView`; it never writes. What it
  wants written comes back in its :class:`~e2ee.messaging.outcome.Outcome`.
* A view answers with what stands *for the caller*: committed rows plus the
  rows of the transaction in progress (a receive batch), so a rule never
  decides from a stale row.
* Rows come back as fresh copies: a rule may change its copy freely.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["HistoryView"]


class HistoryView(Protocol):
    """Read access to history, counters and the session list (blocking, no writes)."""

    def current(self, table: str, row_id: str) -> dict[str, Any] | None:
        """A copy of the row ``row_id`` of ``table``, or None."""
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
