"""Per-key locks: operations on one peer run one at a time, different peers in parallel.

Invariant: a lock object exists only while someone holds or waits for it, so the
table does not grow with the number of peers ever seen. python-axolotl has no
locking of its own; the engine takes one of these around every load-compute-
commit of a session or sender key, which is what makes compute-then-commit safe
when the SDK runs decrypts in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """A family of mutexes indexed by any hashable key."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, list[Any]] = {}

    def __repr__(self) -> str:
        return f"KeyedLocks(active={len(self._locks)})"

    def active(self) -> int:
        """How many keys are held or waited for right now."""
        with self._guard:
            return len(self._locks)

    def hold(self, key: Hashable) -> _Held:
        """A context manager holding the lock for ``key`` for its ``with`` block."""
        return _Held(self, key)


class _Held:
    """Context manager for one hold (a class: cheaper than @contextmanager).

    The table maps a key to ``[lock, users]``; ``users`` counts holders and
    waiters, and the entry goes when it drops to zero.
    """

    __slots__ = ("_entry", "_key", "_owner")

    def __init__(self, owner: KeyedLocks, key: Hashable) -> None:
        self._owner = owner
        self._key = key

    def __enter__(self) -> None:
        owner = self._owner
        with owner._guard:
            entry = owner._locks.get(self._key)
            if entry is None:
                entry = owner._locks[self._key] = [threading.Lock(), 1]
            else:
                entry[1] += 1
        self._entry = entry
        try:
            entry[0].acquire()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: we never held it
            self._leave(entry)
            raise

    def __exit__(self, *exc: object) -> None:
        entry = self._entry
        entry[0].release()
        self._leave(entry)

    def _leave(self, entry: list[Any]) -> None:
        owner = self._owner
        with owner._guard:
            entry[1] -= 1
            if not entry[1]:
                del owner._locks[self._key]
