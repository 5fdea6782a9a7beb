# Invariants:
# * Bounded in time; starts its own relay nodes on 127.0.0.1, a fresh PostgreSQL database
#   (dropped at the end) and, unless --redis-url is given, its own redis-server on a free port,
#   so Redis's command counter counts this run's commands only. Connects to loopback only.
# * Prints its figures, each target and "ok" or "MISSED"; exits 0 even when a target is missed
#   (a measurement, not a test). Figures from a busy machine are not figures: run it quiet.
"""Cross-node delivery on PostgreSQL + Redis: send-to-deliver latency between two relay nodes
and Redis commands per delivered message.

Examples (issue 14's targets: p99 <= 20 ms at 2,000 msg/s; <= 2 Redis round trips a message)::

    python bench/relay_nodes.py --rate 2000 --duration 20
    python bench/relay_nodes.py --rate 2000 --duration 20 --http   # one HTTP request a message

The sender (device on node 1) pipelines SEND frames over one WebSocket at ``--rate``; the
recipient's socket is on node 2, so every message crosses nodes (wake-up through Redis, read
from PostgreSQL by node 2). Latency is measured in this one process from writing the frame to
receiving the DELIVER frame (both sockets here: one clock). With ``--http`` every message is one
signed HTTP request, which also claims its nonce in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from e2ee.transport.auth import DeviceSigner  # noqa: E402
from e2ee.transport.frames import decode_deliver, encode_send  # noqa: E402

TARGET_P99_MS = 20.0
TARGET_ROUND_TRIPS = 2.0
SETTINGS = {
    "registration_burst": "1000",
    "send_rate": "1000000",
    "send_burst": "1000000",
    "log_level": "WARNING",
    "sweep_interval_seconds": "0",
    "ws_heartbeat_seconds": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in 30 s")
        time.sleep(0.05)


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def register(url: str, signer: DeviceSigner) -> None:
    body = json.dumps(
        {"username": signer.user, "device_id": 1, "auth_key": signer.public_key_b64}
    ).encode()
    headers = signer.sign_headers("POST", "/v1/accounts", body)
    headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/accounts", data=body, headers=headers) as r,
    ):
        if r.status != 201:
            raise RuntimeError(f"registration failed: {r.status}")


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> int:
    async with session.get(url + "/metrics") as r:
        match = re.search(rf"^{name} (\d+)$", await r.text(), re.M)
    return int(match.group(1)) if match else 0


async def redis_commands(url: str) -> int:
    r = Redis.from_url(url)
    try:
        info = await r.info("stats")
        return int(info["total_commands_processed"])
    finally:
        await r.aclose()


async def measure(args: argparse.Namespace, urls: list[str], redis_url: str) -> dict[str, float]:
    tag = secrets.token_hex(4)
    alice = DeviceSigner(SigningKey.generate(), f"bench_a_{tag}", 1)
    bob = DeviceSigner(SigningKey.generate(), f"bench_b_{tag}", 1)
    await register(urls[0], alice)
    await register(urls[0], bob)
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    total = int(args.rate * args.duration)
    done = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        ws_b = await session.ws_connect(
            urls[0 if args.same_node else 1] + "/v1/ws", headers=bob.sign_headers("GET", "/v1/ws")
        )
        ws_a = await session.ws_connect(
            urls[0] + "/v1/ws", headers=alice.sign_headers("GET", "/v1/ws")
        )

        async def receive() -> None:
            async for msg in ws_b:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    d = decode_deliver(msg.data)
                    t0 = sent.get(d.id)
                    if t0 is not None:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    if len(latencies) >= total:
                        done.set()
                        return

        async def drain_sender() -> None:
            async for _ in ws_a:  # send_results
                pass

        puts: set[asyncio.Future[None]] = set()
        receiver = asyncio.ensure_future(receive())
        sink = asyncio.ensure_future(drain_sender())
        commands_before = await redis_commands(redis_url)
        wake_before = await metric(session, urls[0], "blindpost_relay_redis_wake_calls_total")
        start = time.perf_counter()
        for i in range(total):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            mid = os.urandom(16)
            frame = encode_send(mid, [(bob.user, 1)], b"x" * args.body)
            sent[mid] = time.perf_counter()
            if args.http:
                headers = alice.sign_headers("PUT", "/v1/messages", frame)
                headers["Content-Type"] = "application/vnd.blindpost.send"
                puts.add(asyncio.ensure_future(_put(session, urls[0], frame, headers)))
            else:
                await ws_a.send_bytes(frame)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - start
        await asyncio.gather(*puts, return_exceptions=True)
        commands = await redis_commands(redis_url) - commands_before
        wakes = await metric(session, urls[0], "blindpost_relay_redis_wake_calls_total")
        receiver.cancel()
        sink.cancel()
        await ws_a.close()
        await ws_b.close()
    latencies.sort()
    delivered = len(latencies)
    return {
        "offered": float(total),
        "delivered": float(delivered),
        "rate": delivered / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "redis_commands_per_msg": commands / max(1, delivered),
        "wake_calls_per_msg": (wakes - wake_before) / max(1, delivered),
    }


async def _put(
    session: aiohttp.ClientSession, url: str, frame: bytes, headers: dict[str, str]
) -> None:
    async with session.put(url + "/v1/messages", data=frame, headers=headers) as r:
        await r.read()


async def amain(args: argparse.Namespace) -> int:
    dbname = f"bench_nodes_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    base, _, _ = args.postgres_dsn.rpartition("/")
    dsn = f"{base}/{dbname}"
    workdir = Path(tempfile.mkdtemp(prefix="blindpost-nodes-"))
    try:
        with processes() as started:
            redis_url = args.redis_url
            if not redis_url:
                binary = shutil.which("redis-server")
                if binary is None:
                    raise SystemExit("redis-server is missing: apt-get install redis-server")
                port = free_port()
                server_args = ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
                server_args += ["--appendonly", "no", "--dir", str(workdir)]
                proc = subprocess.Popen([binary, *server_args], stdout=subprocess.DEVNULL)
                started.append(proc)
                wait_port(port, proc, "redis-server")
                redis_url = f"redis://127.0.0.1:{port}/0"
            env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
            env["BLINDPOST_RELAY_POSTGRES_DSN"] = dsn
            env["BLINDPOST_RELAY_REDIS_URL"] = redis_url
            urls = []
            prefix = f"bench-nodes-{secrets.token_hex(4)}:"  # one relay: one prefix
            for i in range(args.nodes):
                port = free_port()
                cmd = [sys.executable, "-m", "relay", "--port", str(port)]
                cmd += ["--data", str(workdir / f"node{i}")]
                settings = {**SETTINGS, "store": "postgres", "redis_prefix": prefix}
                for k, v in settings.items():
                    cmd += ["--set", f"{k}={v}"]
                with open(workdir / f"node{i}.log", "wb") as log:
                    proc = subprocess.Popen(
                        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                started.append(proc)
                wait_port(port, proc, f"relay node {i}")
                urls.append(f"http://127.0.0.1:{port}")
            figures = await measure(args, urls, redis_url)
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    mode = "HTTP" if args.http else "WebSocket"
    where = "same node" if args.same_node else "cross-node"
    print(f"{where}, {mode} sends, offered {args.rate:.0f} msg/s for {args.duration:.0f} s:")
    print(f"  delivered {figures['delivered']:.0f} of {figures['offered']:.0f}")
    print(f"  rate {figures['rate']:.0f} msg/s")
    ok = figures["p99_ms"] <= TARGET_P99_MS
    print(
        f"  send-to-deliver p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms"
        f" (target <= {TARGET_P99_MS:.0f}: {'ok' if ok else 'MISSED'}),"
        f" max {figures['max_ms']:.1f} ms"
    )
    ok = figures["redis_commands_per_msg"] <= TARGET_ROUND_TRIPS
    print(
        f"  Redis commands per delivered message {figures['redis_commands_per_msg']:.3f}"
        f" (every client's, heartbeats included; target <= {TARGET_ROUND_TRIPS:.0f}:"
        f" {'ok' if ok else 'MISSED'}); wake-up calls per message"
        f" {figures['wake_calls_per_msg']:.3f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--body", type=int, default=200, help="body bytes per message")
    p.add_argument("--http", action="store_true", help="one HTTP request per message")
    p.add_argument(
        "--same-node", action="store_true", help="recipient on the sender's node (a baseline)"
    )
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "BLINDPOST_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a server where a database may be created (and dropped at the end)",
    )
    p.add_argument("--redis-url", default="", help="default: our own redis-server")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error("--nodes must be at least 2")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
