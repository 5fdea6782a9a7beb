# Invariant: every relay process (each relay node) runs its event loop through
# run(), so the loop implementation is one operator setting (``event_loop``, validated by
# RelayConfig: ``uvloop`` is refused there when it is not installed).
"""The relay's event loop: uvloop where it is installed (``event_loop = "auto"``), else asyncio."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "run"]

T = TypeVar("T")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def run(setting: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the selected kind (like ``asyncio.run``).

    uvloop's transports and callbacks cost the relay about 10 % less CPU per message at
    5,000 msg/s (docs/performance-relay-journal.md, fourth session). ``serve`` logs which loop runs.
    """
    if setting != "asyncio" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
