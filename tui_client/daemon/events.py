# Invariant: events are numbered 1, 2, ... in the order the SDK emitted them; an event leaves
# the queue only when confirmed (some subscriber took it) or, past the limit, dropped as the
# oldest (counted, warned on stderr). Nothing here does I/O but that warning.
"""The daemon's queue of events waiting for a subscriber to confirm them."""

from __future__ import annotations

import sys
from collections import deque

from tui_client import cli
from tui_client.cli import EventOutput

__all__ = ["EventQueue"]


class EventQueue:
    """Events not yet delivered, numbered 1, 2, ... in order; at ``limit`` the oldest drop.

    An event leaves the queue once a subscriber confirmed it (:meth:`confirm`):
    drained by a plain subscriber, acknowledged by one that subscribed with ``ack``.

    Args:
        limit: how many events it holds at most.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[tuple[int, EventOutput]] = deque()
        self._next = 1
        #: Every event numbered up to this was confirmed by some subscriber.
        self.done = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last(self) -> int:
        """The number of the newest event put (0: none yet)."""
        return self._next - 1

    def put(self, item: EventOutput) -> None:
        """Queue an event, dropping (and counting) the oldest when full."""
        if len(self._items) >= self.limit:
            number, _ = self._items.popleft()
            self.done = max(self.done, number)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                print(
                    f"{cli.PROG}: warning: {self.dropped} event(s) dropped: more than "
                    f"--event-buffer {self.limit} waiting for a subscriber "
                    "(messages stay in history)",
                    file=sys.stderr,
                    flush=True,
                )
        self._items.append((self._next, item))
        self._next += 1

    def after(self, number: int, count: int) -> list[tuple[int, EventOutput]]:
        """Up to ``count`` queued events numbered above ``number``, oldest first."""
        if not self._items or count <= 0:
            return []
        first = self._items[0][0]
        start = max(number + 1 - first, 0)
        return [self._items[i] for i in range(start, min(start + count, len(self._items)))]

    def confirm(self, number: int) -> list[EventOutput]:
        """Events up to ``number`` were delivered: forget them and return them."""
        gone = []
        while self._items and self._items[0][0] <= number:
            gone.append(self._items.popleft()[1])
        self.done = max(self.done, number)
        return gone
