# Invariant: every relay process (one process, or each worker) runs its event loop through
# run(), so the loop implementation is one operator setting (``event_loop``).
"""The relay's event loop: uvloop where it is installed (``event_loop = "auto"``), else asyncio."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "loop_name", "run"]

T = TypeVar("T")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
log = logging.getLogger("relay")


def loop_name(setting: str) -> str:
    """The loop ``setting`` selects here: ``uvloop`` or ``asyncio``.

    Raises:
        RuntimeError: ``uvloop`` was asked for and is not installed.
    """
    installed = importlib.util.find_spec("uvloop") is not None
    if setting == "uvloop" and not installed:
        raise RuntimeError("event_loop = uvloop, but uvloop is not installed")
    if setting == "asyncio" or not installed:
        return "asyncio"
    return "uvloop"


def run(setting: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the selected kind (like ``asyncio.run``).

    uvloop's transports and callbacks cost the relay about 11 % less CPU per message at
    5,000 msg/s (docs/performance-relay.md, fourth session).
    """
    name = loop_name(setting)
    log.debug("event loop: %s", name)
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
