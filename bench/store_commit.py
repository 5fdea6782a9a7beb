"""Latency of one committed store transaction: what one sent or received message costs.

A typical commit, as the engine makes it per message: one session blob put (2 KiB
by default) and one history row in the same transaction. Prints median, p90,
p99 and mean per commit with ``synchronous=FULL`` (what the store uses), then
with ``synchronous=NORMAL`` for comparison, then the same without the history
row (what the app-row path adds), then a bare sqlite3 upsert of one blob with the
same journal settings (the floor this disk allows).

Run: python bench/store_commit.py [--commits 2000] [--dir DIR] [--session-bytes 2048]

``--dir`` should be on the disk the store will live on: the figure is mostly one
fsync of the WAL file.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable

from e2ee.store.protocols import Address, Changes
from e2ee.store.sealing import KDF_MINIMUM
from e2ee.store.sqlite import SQLiteProtocolStore


def measure(
    store: SQLiteProtocolStore, commits: int, make: Callable[[int], Changes]
) -> list[float]:
    for i in range(50):  # warm the statement cache and create the tables
        store.commit(make(-i - 1))
    out = []
    for i in range(commits):
        changes = make(i)
        start = time.perf_counter_ns()
        store.commit(changes)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def bare_sqlite(path: str, sync: str, commits: int, size: int) -> list[float]:
    """The floor: one 2 KiB row upserted by plain sqlite3, same journal settings."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE s (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
    out = []
    for i in range(commits + 50):
        blob = os.urandom(size)
        start = time.perf_counter_ns()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO s VALUES (?, ?)", (i % 20, blob))
        conn.execute("COMMIT")
        if i >= 50:
            out.append((time.perf_counter_ns() - start) / 1000)
    conn.close()
    return out


def report(label: str, micros: list[float]) -> None:
    cuts = statistics.quantiles(micros, n=100)
    print(
        f"{label:<34} median {statistics.median(micros):7.0f} us   p90 {cuts[89]:7.0f} us"
        f"   p99 {cuts[98]:7.0f} us   mean {statistics.fmean(micros):7.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where to put the database file")
    parser.add_argument("--session-bytes", type=int, default=2048)
    args = parser.parse_args()

    peers = [Address(f"peer{i}", 1) for i in range(20)]

    def with_history(i: int) -> Changes:
        return Changes(
            sessions_put={peers[i % len(peers)]: os.urandom(args.session_bytes)},
            app_rows=(
                (
                    "messages",
                    {
                        "id": f"m{i}",
                        "peer": str(peers[i % len(peers)]),
                        "body": "see you at eight",
                        "sent_at_ms": 1_700_000_000_000 + i,
                        "direction": "in",
                    },
                ),
            ),
        )

    def session_only(i: int) -> Changes:
        return Changes(sessions_put={peers[i % len(peers)]: os.urandom(args.session_bytes)})

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{args.commits} commits, {args.session_bytes}-byte session blob, in {tmp}")
        for sync in ("FULL", "NORMAL"):
            path = os.path.join(tmp, f"bench-{sync}.db")
            # The KDF is not what is measured; minimal limits keep the run short.
            with SQLiteProtocolStore.open(path, "bench", kdf_limits=KDF_MINIMUM) as store:
                # Measurement only: the store itself always runs with FULL.
                store._connection().execute(f"PRAGMA synchronous = {sync}")
                report(f"session + history row, {sync}", measure(store, args.commits, with_history))
                report(f"session only, {sync}", measure(store, args.commits, session_only))
            floor = bare_sqlite(
                os.path.join(tmp, f"bare-{sync}.db"), sync, args.commits, args.session_bytes
            )
            report(f"bare sqlite3 blob upsert, {sync}", floor)


if __name__ == "__main__":
    main()
