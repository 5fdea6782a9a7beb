"""Settling: telling the relay it may forget the retry record of a send of ours.

Invariants:

* For a while after it stored a message (``dedupe_window_seconds``), the relay keeps a record
  of (sender device, message id), so that a retry of the same send is answered as a
  duplicate instead of being stored twice. An id we settle loses that record at once: a
  later send under it would be stored, and delivered, twice.
* So an id is settled only once nothing of ours sends it again: after the relay answered
  200 for it AND the commit that records that send as done stood (an outbox entry's "sent"
  state, the receipts' "sent" state or watermark, a Sender Key distribution's counters).
  If that commit fails, nothing is settled: the send is retried under the same id (an
  outbox entry), or the id is not used again (ids drawn afresh per attempt) and its record
  simply expires.
* Only ids the relay stored under our name are settled (:attr:`Accepted.named`). A sealed
  send is stored under a pseudonym, not under this device: settling its id would change
  nothing and would tell the relay which device sent it.
* Settling only spares the relay's storage; nothing depends on it. An id not settled
  (dropped from the bounded queue, pending at close, its ack lost) expires with the
  relay's window, as if the client never settled anything.
* Pure: no asyncio, no I/O. The outbox adds ids after its commits (``ctx.settled``); the
  inbox's ack runner takes them onto its next ack (:mod:`e2ee.client.inbox`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_SETTLE_BACKLOG", "Accepted", "SettleQueue"]

#: How many ids may wait to be settled by default (``ClientOptions.settle_backlog``): 16
#: bytes each, so at most about 160 kB plus the deque's overhead.
DEFAULT_SETTLE_BACKLOG: Final = 10_000


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the relay accepted of one outgoing message: every part of it answered 200.

    Attributes:
        recipients: the (user, device) pairs it went to.
        named: the relay message ids of its parts stored under our name (authenticated
            sends; not the sealed ones): what to settle once the send is committed as done.
    """

    recipients: tuple[tuple[str, int], ...] = ()
    named: tuple[bytes, ...] = ()

    def __add__(self, other: Accepted) -> Accepted:
        """The two parts of one message (the peers' part, then our other devices')."""
        return Accepted(self.recipients + other.recipients, self.named + other.named)


class SettleQueue:
    """Ids of our sends waiting to be settled, oldest first, at most ``limit`` of them.

    When more are added the oldest are dropped (counted in :attr:`dropped`): harmless,
    their records expire with the relay's window. A ``limit`` of 0 keeps nothing.

    Args:
        limit: how many ids may wait at most.

    Raises:
        ValueError: a negative limit.
    """

    __slots__ = ("_ids", "dropped")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a settle queue's limit is at least 0")
        self._ids: collections.deque[bytes] = collections.deque(maxlen=limit)
        #: Ids dropped because the queue was full.
        self.dropped = 0

    def __repr__(self) -> str:
        return f"SettleQueue({len(self._ids)} of {self._ids.maxlen}, dropped={self.dropped})"

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def limit(self) -> int:
        """How many ids may wait at most."""
        return self._ids.maxlen or 0

    def add(self, ids: Iterable[bytes]) -> None:
        """Queue ids whose sends were committed as done (see the module's invariants)."""
        before = len(self._ids)
        added = 0
        for mid in ids:
            self._ids.append(mid)  # a full deque drops its oldest
            added += 1
        self.dropped += before + added - len(self._ids)

    def take(self, count: int) -> list[bytes]:
        """Remove and return the ``count`` oldest ids (fewer if fewer wait)."""
        return [self._ids.popleft() for _ in range(min(count, len(self._ids)))]

    def restore(self, ids: Sequence[bytes]) -> None:
        """Put back ids :meth:`take` returned whose ack did not reach the relay, ahead of
        the others (they are older); if that overfills the queue, the oldest go."""
        if not ids:
            return
        waiting = [*ids, *self._ids]
        self._ids.clear()
        self._ids.extend(waiting)  # keeps the newest ``limit``
        self.dropped += len(waiting) - len(self._ids)
