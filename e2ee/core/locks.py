"""Per-key locks: operations on one peer run one at a time, different peers in parallel.

Invariant: a lock object exists only while someone holds or waits for it, so the
table does not grow with the number of peers ever seen. python-axolotl has no
locking of its own; the engine takes one of these around every load-compute-
commit of a session or sender key, which is what makes compute-then-commit safe
when the SDK runs decrypts in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """A family of mutexes indexed by any hashable key."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}

    def __repr__(self) -> str:
        return f"KeyedLocks(active={len(self._locks)})"

    def active(self) -> int:
        """How many keys are held or waited for right now."""
        with self._guard:
            return len(self._locks)

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """Hold the lock for ``key`` for the duration of the ``with`` block."""
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
            with self._guard:
                _, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)
