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

    def hold(self, key: Hashable) -> _Held:
        """A context manager holding the lock for ``key`` for its ``with`` block."""
        return _Held(self, key)

    def _acquire(self, key: Hashable) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        return lock

    def _release(self, key: Hashable, lock: threading.Lock) -> None:
        lock.release()
        with self._guard:
            _, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _Held:
    """Context manager for one hold (a class: cheaper than @contextmanager)."""

    __slots__ = ("_key", "_lock", "_owner")

    def __init__(self, owner: KeyedLocks, key: Hashable) -> None:
        self._owner = owner
        self._key = key
        self._lock: threading.Lock | None = None

    def __enter__(self) -> None:
        self._lock = self._owner._acquire(self._key)

    def __exit__(self, *exc: object) -> None:
        assert self._lock is not None
        self._owner._release(self._key, self._lock)
