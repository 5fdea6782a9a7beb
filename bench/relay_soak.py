# Invariants:
# * Bounded: the run stops after --duration (+ warm-up and drain); it starts its own relay on
#   127.0.0.1 with a fresh data directory (or a fresh PostgreSQL database), removed at the end.
# * Load comes from worker processes (bench/_relay_load_worker.py, as for bench/relay_load.py),
#   so the figures are the relay's; this process only samples /proc, the data directory and
#   /metrics once per interval.
# * Prints figures; never fails on them (a measurement, not a test).
"""Relay soak: a long constant-rate run that samples, once per interval, the relay's RSS, the
size of its data directory (or PostgreSQL database), p99 send-to-deliver latency of the
messages sent in that interval, relay CPU per delivered message, the machine's steal and
iowait, and (SQLite) the writer's own checkpoints (count, milliseconds) and its pauses longer
than 20 ms (/metrics, blindpost_relay_store_writer_pause_seconds); prints a table, and a PNG
plot when matplotlib is importable.

Examples (the commands behind docs/performance-relay.md, "Holding steady")::

    python bench/relay_soak.py --rate 3000 --duration 600
    python bench/relay_soak.py --rate 3000 --duration 1800 --sample-seconds 60 --plot soak.png
    python bench/relay_soak.py --store postgres --rate 2000 --duration 600
    python bench/relay_soak.py --sweep-cost 1980000   # one sweep call's writer time, by size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _relay_load_worker import raise_fd_limit  # noqa: E402
from relay_load import (  # noqa: E402
    Relay,
    _metric,
    fetch_text,
    pct,
    register_devices,
    start_traffic,
    store_commits,
    target_relay,
)


def dir_bytes(path: Path | None) -> dict[str, int]:
    """Bytes of the relay's files: the database, its write-ahead log, everything else."""
    out = {"db": 0, "wal": 0, "other": 0}
    if path is None:
        return out
    for p in path.rglob("*"):
        try:
            size = p.stat().st_size if p.is_file() else 0
        except OSError:
            continue
        if p.name == "relay.sqlite3":
            out["db"] += size
        elif p.name == "relay.sqlite3-wal":
            out["wal"] += size
        else:
            out["other"] += size
    return out


async def pg_database_bytes(dsn: str | None) -> int | None:
    if dsn is None:
        return None
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()


def machine_ticks() -> dict[str, int]:
    """The machine's CPU time so far (clock ticks, all CPUs): total, steal, iowait.

    Steal is time the hypervisor gave this VM's CPUs to someone else: a stall with much
    steal in its interval is the host's, not the relay's."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return {"total": sum(fields[:8]), "steal": fields[7], "iowait": fields[4]}


_PAUSE = "blindpost_relay_store_writer_pause_seconds"


def writer_pauses(metrics: str) -> dict[str, float]:
    """From /metrics: the writer's checkpoints (count, seconds) and its pauses of either step
    longer than 20 ms (SQLite only; zeros otherwise)."""
    out = {"ckpt_n": 0.0, "ckpt_s": 0.0, "over_20ms": 0.0}
    for line in metrics.splitlines():
        if not line.startswith(_PAUSE):
            continue
        name, value = line.rsplit(" ", 1)
        if name == f'{_PAUSE}_count{{step="checkpoint"}}':
            out["ckpt_n"] = float(value)
        elif name == f'{_PAUSE}_sum{{step="checkpoint"}}':
            out["ckpt_s"] = float(value)
        elif name.endswith('le="+Inf"}'):
            out["over_20ms"] += float(value)
        elif name.endswith('le="0.02"}'):
            out["over_20ms"] -= float(value)
    return out


async def sample(relay: Relay) -> dict[str, Any]:
    sizes = dir_bytes(relay.data_dir / "relay" if relay.data_dir else None)
    commits = await store_commits(relay.url)
    metrics = await fetch_text(relay.url + "/metrics")
    return {
        "accepted": _metric(metrics, "blindpost_relay_messages_accepted_total"),
        "queued": _metric(metrics, "blindpost_relay_messages_queued"),
        "t": time.monotonic(),
        "rss_kb": relay.rss_kb(),
        "cpu_s": relay.cpu_seconds(),
        "pg_cpu_s": relay.postgres_cpu_seconds(),
        "pg_bytes": await pg_database_bytes(relay.postgres_dsn),
        "commits": commits[0],
        "ticks": machine_ticks(),
        "pauses": writer_pauses(metrics),
        **sizes,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'min':>5} {'RSS MB':>7} {'data MB':>8} {'db MB':>7} {'wal MB':>7} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'max ms':>8} {'us/msg':>7} {'accepted':>9} {'queued':>7}"
        f" {'steal%':>6} {'iow%':>5} {'ckpt':>5} {'ckpt ms':>8} {'>20ms':>5}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['minute']:5.1f} {r['rss_mb']:7.1f} {r['data_mb']:8.1f} {r['db_mb']:7.1f}"
            f" {r['wal_mb']:7.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['max_ms']:8.1f}"
            f" {r['cpu_us_per_msg']:7.0f} {r['accepted']:9d} {r['queued']:7d}"
            f" {r['steal_pct']:6.1f} {r['iowait_pct']:5.1f} {r['ckpt_n']:5d}"
            f" {r['ckpt_ms']:8.1f} {r['pauses_over_20ms']:5d}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [r["minute"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    for ax, key, label in zip(
        axes,
        ("data_mb", "rss_mb", "p99_ms", "cpu_us_per_msg"),
        ("data directory (MB)", "relay RSS (MB)", "p99 send-to-deliver (ms)", "relay CPU us/msg"),
        strict=True,
    ):
        ax.plot(x, [r[key] for r in rows], marker="o")
        ax.set_ylabel(label)
        ax.grid(True)
    axes[-1].set_xlabel("minutes into the measured window")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return True


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    seed, prefix = secrets.token_hex(8), f"sk{secrets.token_hex(3)}_"
    interval = args.sample_seconds
    with target_relay(args, {}) as relay:
        await register_devices(relay.url, seed, prefix, args.clients)
        workers, t0 = await start_traffic(
            args,
            [relay.url],
            seed,
            prefix,
            {"ack": True, "settle": not args.no_settle, "sample_seconds": interval},
        )
        window0 = t0 / 1e9 + args.warmup
        await asyncio.sleep(max(0.0, window0 - time.monotonic()))
        samples = [await sample(relay)]
        n = int(args.duration // interval)
        for k in range(1, n + 1):
            await asyncio.sleep(max(0.0, window0 + k * interval - time.monotonic()))
            samples.append(await sample(relay))
            s = samples[-1]
            data = s["pg_bytes"] if s["pg_bytes"] is not None else s["db"] + s["wal"] + s["other"]
            print(
                f"  {k * interval / 60:5.1f} min: RSS {s['rss_kb'] / 1024:.0f} MB,"
                f" data {data / 1e6:.1f} MB",
                flush=True,
            )
        total = args.warmup + args.duration + args.drain + 120
        results = await asyncio.gather(*(w.event(total) for w in workers))
        for w in workers:
            await w.finish()
        log_tracebacks = relay.tracebacks()
    by_interval: dict[int, list[int]] = {}
    statuses: dict[str, int] = {}
    for r in results:
        for k, lat in r["samples"].items():
            by_interval.setdefault(int(k), []).extend(lat)
        for code, count in r["results"].items():
            statuses[code] = statuses.get(code, 0) + count
    rows = []
    for k in range(1, len(samples)):
        a, b = samples[k - 1], samples[k]
        lat = sorted(by_interval.get(k - 1, []))
        cpu = (b["cpu_s"] or 0) - (a["cpu_s"] or 0)
        accepted = int(b["accepted"] - a["accepted"])
        data = b["db"] + b["wal"] + b["other"]
        if b["pg_bytes"] is not None:
            data = b["pg_bytes"]
        ticks = max(1, b["ticks"]["total"] - a["ticks"]["total"])
        rows.append(
            {
                "minute": k * interval / 60,
                "rss_mb": (b["rss_kb"] or 0) / 1024,
                "data_mb": data / 1e6,
                "db_mb": b["db"] / 1e6,
                "wal_mb": b["wal"] / 1e6,
                "p50_ms": pct(lat, 50) / 1000,
                "p99_ms": pct(lat, 99) / 1000,
                "max_ms": (lat[-1] / 1000) if lat else float("nan"),
                "delivered": len(lat),
                "accepted": accepted,
                "queued": int(b["queued"]),
                "cpu_us_per_msg": 1e6 * cpu / max(1, accepted),
                "commits_per_s": (b["commits"] - a["commits"]) / interval,
                # Shares of the machine's CPU time in the interval (all CPUs).
                "steal_pct": 100 * (b["ticks"]["steal"] - a["ticks"]["steal"]) / ticks,
                "iowait_pct": 100 * (b["ticks"]["iowait"] - a["ticks"]["iowait"]) / ticks,
                # The SQLite writer's own checkpoints in the interval (count, milliseconds)
                # and its pauses (checkpoint or closing a transaction) longer than 20 ms.
                "ckpt_n": int(b["pauses"]["ckpt_n"] - a["pauses"]["ckpt_n"]),
                "ckpt_ms": 1000 * (b["pauses"]["ckpt_s"] - a["pauses"]["ckpt_s"]),
                "pauses_over_20ms": int(b["pauses"]["over_20ms"] - a["pauses"]["over_20ms"]),
            }
        )
    title = (
        f"relay soak ({args.store}): {args.rate:.0f} msg/s for {args.duration:.0f} s,"
        f" {args.clients} clients, {args.body_bytes}-byte bodies"
    )
    print("== " + title)
    print(table(rows))
    sent = sum(r["sent_in_window"] for r in results)
    delivered = sum(r["delivered_in_window"] for r in results)
    print(
        f"  sent {sent}, delivered {delivered} in window; send results {statuses};"
        f" unanswered {sum(r['unanswered_sends'] for r in results)};"
        f" relay log tracebacks {log_tracebacks}; load average {os.getloadavg()}"
    )
    everything = sorted(lat for lats in by_interval.values() for lat in lats)
    overall = {
        "p50_ms": pct(everything, 50) / 1000,
        "p99_ms": pct(everything, 99) / 1000,
        "max_ms": (everything[-1] / 1000) if everything else float("nan"),
    }
    # The tail target compares the p99 of the whole run with a 30-second run's; with
    # --sample-seconds 30 the first interval is that run (a fresh relay, the same load).
    print(
        f"  whole window: p50 {overall['p50_ms']:.2f} ms, p99 {overall['p99_ms']:.2f} ms,"
        f" max {overall['max_ms']:.1f} ms over {len(everything)} deliveries"
    )
    if rows and rows[0]["p99_ms"] > 0:
        print(
            f"  p99 whole window / first {interval:g} s: "
            f"{overall['p99_ms'] / rows[0]['p99_ms']:.2f}x"
        )
    half = int(1800 // interval)  # the 30 minutes, from a longer run
    if len(rows) > half and rows[0]["p99_ms"] > 0:
        early = sorted(lat for k in range(half) for lat in by_interval.get(k, []))
        overall["first_30_min_p99_ms"] = pct(early, 99) / 1000
        print(
            f"  first 30 minutes: p99 {overall['first_30_min_p99_ms']:.2f} ms"
            f" ({overall['first_30_min_p99_ms'] / rows[0]['p99_ms']:.2f}x the first"
            f" {interval:g} s)"
        )
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        ten = next((r for r in rows if r["minute"] >= 10), None)
        if ten is not None and ten is not last:
            print(f"  data size last / at 10 min: {last['data_mb'] / ten['data_mb']:.2f}x")
        print(
            f"  p99 last interval / first: {last['p99_ms'] / first['p99_ms']:.2f}x;"
            f" data size last / first: {last['data_mb'] / first['data_mb']:.2f}x"
        )
    if args.plot is not None:
        if plot(rows, args.plot, title):
            print(f"  plot written to {args.plot}")
        else:
            print("  (matplotlib not importable: no plot)")
    return {
        "title": title,
        "rows": rows,
        "statuses": statuses,
        "overall": overall,
        "sent": sent,
        "delivered": delivered,
    }


async def sweep_cost(records: int, chunks: Sequence[int] = (1000, 250)) -> None:
    """Time the SQLite store's sweep call by call on a dedupe table of ``records`` records
    spread over 11 buckets (the steady state at a constant rate), one bucket due."""
    import sqlite3
    import tempfile

    import relay.store.sqlite as sqlite_store
    from relay.store.base import StoreLimits
    from relay.store.sqlite import SqliteRelayStore

    lim = StoreLimits(dedupe_window_ms=600_000)
    bucket_ms = 60_000
    for chunk in chunks:
        with tempfile.TemporaryDirectory(prefix="blindpost-sweep-") as tmp:
            path = Path(tmp) / "db.sqlite3"
            store = SqliteRelayStore(path, lim)
            await store.open()
            await store.close()
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO dedupe(key, expires, recipients) VALUES (?,?,1)",
                ((os.urandom(16), 1 + i % 11) for i in range(records)),
            )
            conn.execute("COMMIT")
            conn.close()
            sqlite_store.SWEEP_CHUNK = chunk  # the bench's only knob; the store reads it
            store = SqliteRelayStore(path, lim)
            await store.open()
            times: list[float] = []
            more = True
            while more:
                t = time.perf_counter()
                report = await store.sweep(bucket_ms + 1)
                times.append((time.perf_counter() - t) * 1000)
                more = report.more
            await store.close()
        times.sort()
        print(
            f"  {records} records, {records // 11} due, calls of {chunk}: {len(times)} calls,"
            f" p50 {pct(times, 50):.1f} ms, max {times[-1]:.1f} ms, total {sum(times):.0f} ms"
            f" (load average {os.getloadavg()[0]:.1f})"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=3000.0, help="offered messages/s (total)")
    p.add_argument("--duration", type=float, default=600.0, help="measured seconds")
    p.add_argument("--sample-seconds", type=float, default=60.0, help="sampling interval")
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for stragglers")
    p.add_argument("--clients", type=int, default=200, help="devices (each sends and receives)")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--body-bytes", type=int, default=200)
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="senders do not settle their accepted sends (dedupe records stay for the window)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here (matplotlib)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument(
        "--sweep-cost",
        type=int,
        metavar="RECORDS",
        help="instead of a soak: time the SQLite sweep per call on this many dedupe records",
    )
    p.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the started relay (repeatable)",
    )
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get("BLINDPOST_BENCH_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server for --store postgres (a database is created and dropped on it)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.url = None  # always a relay of its own, one node (target_relay's contract)
    args.nodes = 1
    if args.sweep_cost:
        asyncio.run(sweep_cost(args.sweep_cost))
        return 0
    raise_fd_limit()
    out = asyncio.run(soak(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
