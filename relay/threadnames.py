# Invariant: naming is best effort and changes nothing else: on a system without prctl (not
# Linux) or when the call fails, the thread runs on unnamed.
"""The operating system's name for the relay's own threads.

CPython 3.11 names a thread only for Python (``threading.Thread(name=...)``); ``top -H``,
``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` show every thread as ``python``, so an operator
cannot tell the SQLite writer from the sync thread, and ``bench/relay_load.py`` could only
split the event loop from the rest. Each relay thread calls ``name_os_thread()`` first thing,
which gives the kernel its Python name (at most 15 bytes). The main thread, whose name is the
process's, is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["name_os_thread"]

_PR_SET_NAME = 15
_MAX_BYTES = 15  # the kernel's TASK_COMM_LEN, less its NUL


def _load_prctl() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., Any] = ctypes.CDLL(ctypes.util.find_library("c")).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def name_os_thread() -> None:
    """Give the calling thread its Python name as its OS name."""
    thread = threading.current_thread()
    if _prctl is None or thread is threading.main_thread():
        return
    label = thread.name.encode("ascii", "replace")[:_MAX_BYTES]
    _prctl(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
