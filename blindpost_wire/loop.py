# Invariant: every relay process (each relay node) and the client's daemon run their event loop
# through run(), so the loop implementation is one setting (the relay's ``event_loop``, the
# daemon's ``--event-loop``), refused by each when it names uvloop and uvloop is not installed
# (``unavailable``).
"""The event loop a long-running program runs on: uvloop where it is installed (``auto``), else
asyncio's own."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "run", "running", "unavailable"]

T = TypeVar("T")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def unavailable(setting: str) -> bool:
    """Whether ``setting`` asks for uvloop and uvloop is not installed (a usage error)."""
    return setting == "uvloop" and importlib.util.find_spec("uvloop") is None


def run(setting: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the selected kind (like ``asyncio.run``).

    uvloop's transports and callbacks cost the relay about 10 % less CPU per message at
    5,000 msg/s (docs/performance-relay-journal.md, fourth session), the daemon about 7 % per
    ``send`` call at 1,000 calls/s (docs/performance.md, "The daemon").
    """
    if setting != "asyncio" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def running() -> str:
    """The kind of the running event loop (``uvloop`` or ``asyncio``), for the start-up log."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
