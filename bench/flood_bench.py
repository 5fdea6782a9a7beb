# Invariants: bounded in time and connections; starts its own relay on 127.0.0.1 with a fresh
# temporary data directory (bench/relay_load.py's relay_process) with the default mailbox
# shares; the flood comes from a separate process, never from the measuring event loop.
"""Mailbox flood figures (issue 13): a second sender's latency while one account floods.

Run: ``python bench/flood_bench.py [--rate 50] [--duration 10]``

Not a test (pytest does not collect it). One victim is online over a WebSocket and
acknowledges everything it gets. Alice sends ``--rate`` messages/s to the victim for
``--duration`` seconds, twice: unloaded, then while a flooding account (another process)
pipelines sends to the victim as fast as the relay takes them. Printed: Alice's send-to-
delivery latency (p50/p99) in both phases, Alice's refusals (must be none), how the flood's
sends were answered (200, 507 sender_share_exceeded, 429...), and the relay's peak RSS.
The issue's target: p99 under flood at most 2x the unloaded p99. Quote figures only from a
quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from _relay_load_worker import device_signer  # noqa: E402
from relay_load import register_devices, relay_process  # noqa: E402

from e2ee.transport.auth import DeviceSigner  # noqa: E402
from e2ee.transport.frames import decode_deliver, encode_ack, encode_send  # noqa: E402

# The defaults of relay/config.py for what is exercised here (BENCH_SETTINGS raises them): the
# mailbox shares, and the send rate that is the flooder's "maximum rate".
DEFAULT_LIMITS = {
    "mailbox_sender_max_messages": "2500",
    "mailbox_stranger_max_messages": "1000",
    "send_rate": "2000",
    "send_burst": "4000",
}


async def connect(session: aiohttp.ClientSession, url: str, signer: DeviceSigner) -> Any:
    headers = signer.sign_headers("GET", "/v1/ws", b"")
    ws = await session.ws_connect(url + "/v1/ws", headers=headers, max_msg_size=0)
    while True:  # hint, backlog, then {"type": "empty"}
        msg = await ws.receive(timeout=30)
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "empty":
            return ws


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def victim_loop(ws: Any, arrived: dict[bytes, float], stop: asyncio.Event) -> None:
    """Receive everything, note arrival times, ack in small batches."""
    pending: list[bytes] = []
    while not stop.is_set():
        try:
            msg = await ws.receive(timeout=0.05)
        except TimeoutError:
            msg = None
        if msg is not None and msg.type == aiohttp.WSMsgType.BINARY:
            d = decode_deliver(msg.data)
            arrived.setdefault(d.id, time.monotonic())
            pending.append(d.id)
        elif msg is not None and msg.type != aiohttp.WSMsgType.TEXT:
            return
        if pending and (len(pending) >= 100 or msg is None):
            await ws.send_str(encode_ack(pending))
            pending = []


async def alice_phase(ws: Any, victim: str, rate: float, duration: float) -> dict[bytes, float]:
    """Send at ``rate`` for ``duration``; return send times of the accepted messages."""
    sent: dict[bytes, float] = {}
    refused: Counter[str] = Counter()
    answers = 0
    total = int(rate * duration)

    async def reader() -> None:
        nonlocal answers
        while answers < total:
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"alice's socket closed: {msg}")
            doc = json.loads(msg.data)
            if doc.get("type") == "send_result":
                answers += 1
                if doc["status"] != 200:
                    refused[f"{doc['status']} {doc.get('error')}"] += 1

    task = asyncio.create_task(reader())
    start = time.monotonic()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        mid = secrets.token_bytes(16)
        sent[mid] = time.monotonic()
        await ws.send_bytes(encode_send(mid, [(victim, 1)], b"a" * 200))
    await asyncio.wait_for(task, 60)
    if refused:
        print(f"  alice refused: {dict(refused)}")
    return sent


def latency_ms(sent: dict[bytes, float], arrived: dict[bytes, float]) -> list[float]:
    return [(arrived[m] - t) * 1000 for m, t in sent.items() if m in arrived]


async def wait_delivered(sent: dict[bytes, float], arrived: dict[bytes, float]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(m in arrived for m in sent):
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def flooder(url: str, seed: str, victim: str, duration: float) -> None:
    """The flooding account (its own process): pipeline sends for ``duration`` seconds."""
    signer = device_signer(seed, "flood", 0)
    counts: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, url, signer)
        end = time.monotonic() + duration
        inflight = 0

        async def read() -> None:
            nonlocal inflight
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    doc = json.loads(msg.data)
                    if doc.get("type") == "send_result":
                        inflight -= 1
                        counts[f"{doc['status']} {doc.get('error', 'ok')}"] += 1

        task = asyncio.create_task(read())
        while time.monotonic() < end:
            if inflight >= 64:
                await asyncio.sleep(0.001)
                continue
            inflight += 1
            await ws.send_bytes(encode_send(secrets.token_bytes(16), [(victim, 1)], b"f" * 200))
        await asyncio.sleep(1)
        await ws.close()
        task.cancel()
    print(json.dumps(dict(counts)))


async def run(args: argparse.Namespace) -> None:
    seed = secrets.token_hex(8)
    with relay_process(DEFAULT_LIMITS) as relay:
        assert relay.pid is not None
        for prefix in ("victim", "alice", "flood"):
            await register_devices(relay.url, seed, prefix, 1)
        victim = device_signer(seed, "victim", 0)
        alice = device_signer(seed, "alice", 0)
        async with aiohttp.ClientSession() as session:
            victim_ws = await connect(session, relay.url, victim)
            alice_ws = await connect(session, relay.url, alice)
            arrived: dict[bytes, float] = {}
            stop = asyncio.Event()
            loop_task = asyncio.create_task(victim_loop(victim_ws, arrived, stop))
            peak = rss_kib(relay.pid)

            sent = await alice_phase(alice_ws, victim.user, args.rate, args.duration)
            await wait_delivered(sent, arrived)
            quiet = latency_ms(sent, arrived)
            peak = max(peak, rss_kib(relay.pid))

            flood = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--flooder",
                    relay.url,
                    seed,
                    victim.user,
                    str(args.duration + 2),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            await asyncio.sleep(1)  # the flood is under way
            sampler_stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not sampler_stop.is_set():
                    peak = max(peak, rss_kib(relay.pid))
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            sent = await alice_phase(alice_ws, victim.user, args.rate, args.duration)
            await wait_delivered(sent, arrived)
            loaded = latency_ms(sent, arrived)
            out, _ = await asyncio.to_thread(flood.communicate, None, 60)
            sampler_stop.set()
            await sampler
            stop.set()
            await loop_task
            for ws in (victim_ws, alice_ws):
                await ws.close()
    print(f"alice {args.rate:g} msg/s for {args.duration:g} s per phase")
    for name, lat, n in (("unloaded", quiet, len(quiet)), ("flooded", loaded, len(loaded))):
        print(
            f"  {name:<9} delivered {n:>5}  p50 {percentile(lat, 0.5):7.2f} ms"
            f"  p99 {percentile(lat, 0.99):7.2f} ms"
        )
    ratio = percentile(loaded, 0.99) / percentile(quiet, 0.99)
    print(
        f"  p99 flooded / unloaded: {ratio:.2f} (target <= 2: {'ok' if ratio <= 2 else 'MISSED'})"
    )
    print(f"flooder's answers: {out.strip()}")
    print(f"relay peak RSS: {peak / 1024:.1f} MiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flooder":
        url, seed, victim, duration = sys.argv[2:6]
        asyncio.run(flooder(url, seed, victim, float(duration)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.pop("BLINDPOST_RELAY_REGISTRATION", None)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
