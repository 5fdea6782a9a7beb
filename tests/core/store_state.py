"""What an in-memory store holds, for byte-for-byte comparisons in tests.

One definition for every test module here (pytest cannot import from a conftest).
"""

from __future__ import annotations

from typing import Any

from e2ee.store import MemoryProtocolStore

#: Attributes that are bookkeeping, not stored data.
_NOT_DATA = frozenset({"_lock", "_batch", "_batch_depth"})


def memory_data(store: MemoryProtocolStore) -> dict[str, Any]:
    """The store's data attributes, live (deep-copy the result to keep it)."""
    return {k: v for k, v in vars(store).items() if k not in _NOT_DATA}
