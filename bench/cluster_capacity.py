# Invariants:
# * Runs the three-node recipe itself (deploy/three-node/run_local.py: PostgreSQL primary and
#   synchronous replica, Redis, three relay nodes, HAProxy; loopback, throwaway, torn down at
#   the end even on failure). Never touches another server.
# * CPU is read from /proc/<pid>/stat (utime + stime of every thread) of exactly the processes
#   the recipe started: each relay node, the primary's postmaster and all its children (backends,
#   WAL writer, WAL sender, checkpointer), the replica's, and redis-server. Processes are
#   sampled before and after the measured window; only messages sent in it count.
# * A measurement, never a test: prints the figures and the capacity model's answer, exits 0.
#   Figures from a busy machine are not figures: run it on a quiet one.
"""Capacity of the three-node recipe: CPU per message of relay node, PostgreSQL and Redis,
measured in one run, and the capacity model of docs/self-hosting.md applied to them.

    python bench/cluster_capacity.py --pairs 30 --rate 2000 --duration 30
    python bench/cluster_capacity.py --pairs 3 --rate 50 --duration 2 --idle 1  # smoke run

Every sender's socket is on one node and its recipient's on the next (all traffic crosses
nodes: the Redis wake-up and the recipient node's read are included). Senders pipeline SEND
frames over their WebSocket at ``--rate`` in total; recipients ack every delivered message over
their WebSocket (batched every 20 ms), so the load includes the ack writes real clients cause.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from e2ee.transport.auth import DeviceSigner  # noqa: E402
from e2ee.transport.frames import decode_deliver, encode_ack, encode_send  # noqa: E402

SETTINGS = [
    "registration=open",
    "registration_burst=100000",
    "send_rate=1000000",
    "send_burst=1000000",
    "account_send_rate=1000000",
    "account_send_burst=1000000",
    "account_max_inflight_sends=1000000",
    "log_level=WARNING",
    "sweep_interval_seconds=0",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Published inputs (docs/performance-relay.md): one relay process on SQLite, 2-core VM.
PUBLISHED_RSS_PER_SOCKET_KB = 15.7  # idle authenticated WebSocket, first-frame auth


def load_run_local() -> ModuleType:
    path = ROOT / "deploy" / "three-node" / "run_local.py"
    spec = importlib.util.spec_from_file_location("run_local", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree(root: int) -> list[int]:
    """``root`` and its direct children (a postmaster's processes)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == root:
                pids.append(int(entry.name))
    return pids


def snapshot(topology: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far per role; PostgreSQL's processes are listed anew each time."""
    out = {f"node:{n['name']}": cpu_seconds(n["pid"]) for n in topology["nodes"]}
    for role in ("primary", "replica"):
        data = Path(topology["postgres"][role]["data"])
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        for pid in tree(postmaster):
            out[f"pg-{role}:{pid}"] = cpu_seconds(pid)
    out["redis"] = cpu_seconds(topology["redis"]["pid"])
    return out


def delta(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    # A process that started in the window counts from 0; one that ended is lost (the pool
    # keeps its connections, so PostgreSQL backends do not come and go under steady load).
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))


async def register(session: aiohttp.ClientSession, url: str, signer: DeviceSigner) -> None:
    import json

    body = json.dumps(
        {"username": signer.user, "device_id": 1, "auth_key": signer.public_key_b64}
    ).encode()
    headers = signer.sign_headers("POST", "/v1/accounts", body)
    headers["Content-Type"] = "application/json"
    async with session.post(url + "/v1/accounts", data=body, headers=headers) as r:
        if r.status != 201:
            raise RuntimeError(f"registration failed: {r.status}")


async def measure(args: argparse.Namespace, topology: dict[str, Any]) -> dict[str, float]:
    urls = [n["url"] for n in topology["nodes"]]
    tag = secrets.token_hex(4)
    total = int(args.rate * args.duration)
    delivered = 0
    done = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        pairs = []
        for k in range(args.pairs):
            a = DeviceSigner(SigningKey.generate(), f"cap_a{k}_{tag}", 1)
            b = DeviceSigner(SigningKey.generate(), f"cap_b{k}_{tag}", 1)
            await register(session, urls[k % 3], a)
            await register(session, urls[k % 3], b)
            ws_a = await session.ws_connect(
                urls[k % 3] + "/v1/ws", headers=a.sign_headers("GET", "/v1/ws")
            )
            ws_b = await session.ws_connect(
                urls[(k + 1) % 3] + "/v1/ws", headers=b.sign_headers("GET", "/v1/ws")
            )
            pairs.append((a, b, ws_a, ws_b))

        async def receive(ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal delivered
            pending: list[bytes] = []
            last = time.monotonic()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    pending.append(decode_deliver(msg.data).id)
                    delivered += 1
                    if delivered >= total:
                        done.set()
                now = time.monotonic()
                if pending and (now - last >= 0.02 or len(pending) >= 500 or done.is_set()):
                    await ws.send_str(encode_ack(pending))
                    pending, last = [], now

        async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for _ in ws:  # send_results
                pass

        tasks = [asyncio.ensure_future(receive(p[3])) for p in pairs]
        tasks += [asyncio.ensure_future(drain(p[2])) for p in pairs]
        # The idle cost of this topology (heartbeats, presence refreshes, polls, WAL writer,
        # replication keep-alives) with every socket open, subtracted from the load window.
        idle_before, idle_start = snapshot(topology), time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_after = snapshot(topology)
        idle_elapsed = time.perf_counter() - idle_start
        before = snapshot(topology)
        start = time.perf_counter()
        for i in range(total):
            due = start + i / args.rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            _, b, ws_a, _ = pairs[i % len(pairs)]
            await ws_a.send_bytes(encode_send(os.urandom(16), [(b.user, 1)], b"x" * args.body))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        await asyncio.sleep(0.2)  # the last acks commit
        elapsed = time.perf_counter() - start
        after = snapshot(topology)
        for t in tasks:
            t.cancel()
        for _, _, ws_a, ws_b in pairs:
            await ws_a.close()
            await ws_b.close()
    n = max(1, delivered)

    def per_message(prefix: str) -> float:
        idle_rate = delta(idle_before, idle_after, prefix) / idle_elapsed if args.idle else 0.0
        return max(0.0, delta(before, after, prefix) - idle_rate * elapsed) / n * 1e6

    return {
        "offered": float(total),
        "delivered": float(delivered),
        "rate": delivered / elapsed,
        "node_us": per_message("node:"),
        "pg_primary_us": per_message("pg-primary:"),
        "pg_replica_us": per_message("pg-replica:"),
        "redis_us": per_message("redis"),
    }


def model(
    rate: float,
    devices: int,
    node_us: float,
    pg_us: float,
    replica_us: float,
    redis_us: float,
    rss_kb: float,
    utilisation: float,
) -> list[str]:
    """The capacity model of docs/self-hosting.md ("Capacity of several nodes")."""
    node_cores = rate * node_us / 1e6
    # A node is one event loop (about one core); N+1 so that losing one node still fits.
    nodes = max(2, math.ceil(node_cores / utilisation) + 1)
    per_node_devices = math.ceil(devices / (nodes - 1))
    return [
        f"  relay nodes: ceil({rate:.0f} x {node_us:.0f} us / {utilisation}) + 1 = {nodes}"
        f" (node CPU {node_cores:.2f} cores in all)",
        f"  sockets per node after losing one: {per_node_devices}"
        f" x {rss_kb} KB = {per_node_devices * rss_kb / 1024:.0f} MB RSS;"
        f" LimitNOFILE above {per_node_devices + 1000}",
        f"  PostgreSQL primary: {rate:.0f} x {pg_us:.0f} us = {rate * pg_us / 1e6:.2f} cores"
        f" (/ {utilisation} = {rate * pg_us / 1e6 / utilisation:.2f} to provision);"
        f" replica: {rate * replica_us / 1e6:.2f} cores",
        f"  Redis: {rate:.0f} x {redis_us:.0f} us = {rate * redis_us / 1e6:.2f} of its one core"
        + (
            "  (over the utilisation limit: Redis is single-threaded)"
            if rate * redis_us / 1e6 > utilisation
            else ""
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=30, help="sender/recipient pairs (default 30)")
    p.add_argument("--rate", type=float, default=2000, help="messages per second in all")
    p.add_argument("--duration", type=float, default=30, help="seconds of sending")
    p.add_argument("--body", type=int, default=256, help="body bytes per message")
    p.add_argument(
        "--idle", type=float, default=5, help="seconds of idle baseline subtracted (0: none)"
    )
    p.add_argument("--async-replica", action="store_true", help="replica not synchronous")
    p.add_argument("--target-rate", type=float, default=10_000, help="model: msg/s to serve")
    p.add_argument("--devices", type=int, default=100_000, help="model: connected devices")
    p.add_argument("--utilisation", type=float, default=0.6, help="model: max CPU share")
    p.add_argument("--rss-kb", type=float, default=PUBLISHED_RSS_PER_SOCKET_KB)
    args = p.parse_args(argv)
    run_local = load_run_local()
    base = Path(tempfile.mkdtemp(prefix="blindpost-capacity-"))
    try:
        topology = run_local.up(base, not args.async_replica, SETTINGS)
        figures = asyncio.run(measure(args, topology))
    finally:
        run_local.down(base)
    sync = "asynchronous" if args.async_replica else "synchronous"
    print(
        f"three-node recipe ({sync} replica), {args.pairs} cross-node pairs, offered"
        f" {args.rate:.0f} msg/s for {args.duration:.0f} s:"
    )
    print(
        f"  delivered {figures['delivered']:.0f} of {figures['offered']:.0f}"
        f" ({figures['rate']:.0f} msg/s)"
    )
    print(
        "CPU per delivered message (send, commit, wake-up, push, ack; idle baseline"
        f" of {args.idle:.0f} s subtracted):"
    )
    print(f"  relay nodes (all three) {figures['node_us']:.0f} us")
    print(f"  PostgreSQL primary      {figures['pg_primary_us']:.0f} us")
    print(f"  PostgreSQL replica      {figures['pg_replica_us']:.0f} us")
    print(f"  redis-server            {figures['redis_us']:.0f} us")
    print(
        f"model for {args.devices} devices at {args.target_rate:.0f} msg/s"
        f" (utilisation limit {args.utilisation}; RSS per socket {args.rss_kb} KB):"
    )
    for line in model(
        args.target_rate,
        args.devices,
        figures["node_us"],
        figures["pg_primary_us"],
        figures["pg_replica_us"],
        figures["redis_us"],
        args.rss_kb,
        args.utilisation,
    ):
        print(line)
    if figures["delivered"] < 5000:
        print("(a smoke-sized run: too few messages for the figures to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
