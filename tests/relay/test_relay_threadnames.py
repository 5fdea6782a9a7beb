"""The relay's threads carry their names to the kernel, so ``top -H`` and ``ps -L`` tell the
SQLite writer from the sync, checkpoint, mark and reader threads (relay.threadnames)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from relay.store.base import Address, Envelope, StoreLimits
from relay.store.sqlite import SqliteRelayStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")


def _os_names() -> dict[int, str]:
    names = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            names[int(tid)] = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
    return names


async def test_the_stores_threads_are_named_for_the_kernel(tmp_path: Path) -> None:
    main_name = _os_names()[threading.main_thread().native_id or os.getpid()]
    store = SqliteRelayStore(
        tmp_path / "db.sqlite3", StoreLimits(), high_water=tmp_path / "relay.hwm"
    )
    await store.open()
    try:
        a, b = Address("alice", 1), Address("bob", 1)
        await store.create_account(a, b"a" * 32, 0)
        await store.create_account(b, b"b" * 32, 0)
        await store.submit_send(a, Envelope(os.urandom(16), (b,), b"ciphertext"), 0)
        assert await store.mailbox_count(b) == 1  # runs on a reader thread
        names = set(_os_names().values())
        # 15 bytes at most: the kernel cuts "relay-checkpoint" to "relay-checkpoin"
        assert {"relay-writer", "relay-sync", "relay-checkpoin", "relay-hwm"} <= names
        assert any(n.startswith("relay-read") for n in names)
        # the main thread's name is the process's (ps, pgrep): left as it was
        assert _os_names()[threading.main_thread().native_id or os.getpid()] == main_name
    finally:
        await store.close()
