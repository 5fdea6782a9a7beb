# Invariants: bounded in time and connections; starts its own relay on 127.0.0.1 with a fresh
# temporary data directory (bench/relay_load.py's relay_process) with the relay's default send
# limits and mailbox shares (read from RelayConfig, so the bench follows the defaults); the flood
# comes from a separate process, never from the measuring event loop.
"""Mailbox flood figures (issue 13): a second sender's latency while one account floods.

Run: ``python bench/flood_bench.py [--rate 10] [--duration 20] [--rounds 3]
[--flood-devices 4] [--set NAME=VALUE ...]``

Not a test (pytest does not collect it). One victim is online over a WebSocket and
acknowledges everything it gets. Alice sends ``--rate`` messages/s to the victim for
``--duration`` seconds per phase, alternating ``--rounds`` times: unloaded, then while a
flooding account (another process) floods the victim at the most the relay lets one account
do: ``--flood-devices`` devices of that account, each on its own WebSocket, pipelining sends
as fast as they are taken and ignoring every 429's Retry-After. Each flooded phase starts
once the flood met its first 429 (at most 2 s after it started), so the account's burst is
spent and the flood runs at its sustained rate.

Printed: Alice's send-to-accepted (send_result) and send-to-delivery latency (p50/p99) of
each phase kind, Alice's refusals (must be none), how the flood's sends were answered and at
what rate, the relay's peak RSS, the 1-minute load average before and after, and one line
``RESULT: PASS`` or ``RESULT: MISS`` against the issue's target: delivery p99 under flood at
most 2x the unloaded p99. ``--set`` changes a relay setting (e.g. ``account_send_rate=1e6``
to see the flood without the account limit). Quote figures only from a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from _relay_load_worker import device_seed, device_signer  # noqa: E402
from relay_load import register_devices, relay_process  # noqa: E402

from e2ee.transport.auth import DeviceSigner  # noqa: E402
from e2ee.transport.frames import decode_deliver, encode_ack, encode_send  # noqa: E402
from relay.config import RelayConfig  # noqa: E402

TARGET_RATIO = 2.0
# bench/relay_load.py's BENCH_SETTINGS raise the send limits; the flood must meet the relay's
# defaults (the shares too: the victim acks, so they matter only if the flood outruns it).
_DEFAULTS = RelayConfig()
DEFAULT_LIMITS = {
    name: repr(getattr(_DEFAULTS, name))
    for name in (
        "send_rate",
        "send_burst",
        "account_send_rate",
        "account_send_burst",
        "account_max_inflight_sends",
        "ws_max_inflight_sends",
        "mailbox_sender_max_messages",
        "mailbox_stranger_max_messages",
        "device_add_rate",
        "device_add_burst",
    )
}
_PIPELINE = 64  # sends each flooding socket keeps unanswered (the relay's per-socket bound)
_LEAD_IN_MAX = 2.0  # seconds of flood before a flooded phase, if no send is refused sooner


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


async def alice_phase(
    ws: Any, victim: str, rate: float, duration: float, accepted: dict[bytes, float]
) -> tuple[dict[bytes, float], Counter[str]]:
    """Send at ``rate`` for ``duration``; return the send times of every message and the
    refusals by status; ``accepted`` gets the time each 200 answer arrived."""
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
                if doc["status"] == 200:
                    accepted[base64.b64decode(doc["id"])] = time.monotonic()
                else:
                    refused[f"{doc['status']} {doc.get('error')}"] += 1

    task = asyncio.create_task(reader())
    start = time.monotonic()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        mid = secrets.token_bytes(16)
        sent[mid] = time.monotonic()
        await ws.send_bytes(encode_send(mid, [(victim, 1)], b"a" * 200))
    await asyncio.wait_for(task, 60)
    return sent, refused


def latency_ms(sent: dict[bytes, float], done: dict[bytes, float]) -> list[float]:
    return [(done[m] - t) * 1000 for m, t in sent.items() if m in done]


async def wait_delivered(sent: dict[bytes, float], arrived: dict[bytes, float]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(m in arrived for m in sent):
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def flood_signer(seed: str, device: int) -> DeviceSigner:
    """Device ``device`` of the flooding account ``flood0`` (device 1 is registered with it)."""
    if device == 1:
        return device_signer(seed, "flood", 0)
    return DeviceSigner.from_seed(device_seed(seed + "|flood", device), "flood0", device)


async def add_flood_devices(url: str, seed: str, count: int) -> None:
    """Add devices 2..count to the flooding account (signed by its device 1)."""
    first = flood_signer(seed, 1)
    async with aiohttp.ClientSession() as session:
        for device in range(2, count + 1):
            signer = flood_signer(seed, device)
            body = json.dumps({"device_id": device, "auth_key": signer.public_key_b64}).encode()
            headers = first.sign_headers("POST", "/v1/devices", body)
            headers["Content-Type"] = "application/json"
            async with session.post(url + "/v1/devices", data=body, headers=headers) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"adding flood device {device}: {resp.status}")


async def flood_socket(ws: Any, victim: str, end: float, refused: asyncio.Event) -> Counter[str]:
    """One device of the flood: keep ``_PIPELINE`` sends unanswered until ``end``; set
    ``refused`` at the first 429 (the account's burst is spent)."""
    counts: Counter[str] = Counter()
    inflight = 0
    room = asyncio.Event()
    room.set()

    async def read() -> None:
        nonlocal inflight
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                doc = json.loads(msg.data)
                if doc.get("type") == "send_result":
                    inflight -= 1
                    room.set()
                    counts[f"{doc['status']} {doc.get('error', 'ok')}"] += 1
                    if doc["status"] == 429:
                        refused.set()

    task = asyncio.create_task(read())
    while time.monotonic() < end:
        if inflight >= _PIPELINE:
            room.clear()
            try:
                await asyncio.wait_for(room.wait(), max(0.001, end - time.monotonic()))
            except TimeoutError:
                break
            continue
        inflight += 1
        await ws.send_bytes(encode_send(secrets.token_bytes(16), [(victim, 1)], b"f" * 200))
    await asyncio.sleep(1)
    await ws.close()
    task.cancel()
    return counts


async def flooder(url: str, seed: str, victim: str, duration: float, devices: int) -> None:
    """The flooding account (its own process): once every device is connected (line
    ``flooding``), every device floods for ``duration`` s; line ``refused`` at the first 429;
    last line: the answers by status, as JSON."""
    refused = asyncio.Event()

    async def tell_refused() -> None:
        await refused.wait()
        print("refused", flush=True)

    async with aiohttp.ClientSession() as session:
        sockets = [
            await connect(session, url, flood_signer(seed, d)) for d in range(1, devices + 1)
        ]
        print("flooding", flush=True)
        teller = asyncio.create_task(tell_refused())
        end = time.monotonic() + duration
        results = await asyncio.gather(*(flood_socket(ws, victim, end, refused) for ws in sockets))
        teller.cancel()
    total: Counter[str] = Counter()
    for counts in results:
        total.update(counts)
    print(json.dumps(dict(total)))


async def run(args: argparse.Namespace) -> None:
    seed = secrets.token_hex(8)
    overrides = dict(item.split("=", 1) for item in args.set)
    limits = {**DEFAULT_LIMITS, **overrides}
    load_before = os.getloadavg()[0]
    quiet: list[float] = []
    loaded: list[float] = []
    quiet_acc: list[float] = []
    loaded_acc: list[float] = []
    refusals: Counter[str] = Counter()
    flood_answers: Counter[str] = Counter()
    flood_seconds = 0.0
    with relay_process(limits) as relay:
        relay_pid = relay.pid
        assert relay_pid is not None
        for prefix in ("victim", "alice", "flood"):
            await register_devices(relay.url, seed, prefix, 1)
        await add_flood_devices(relay.url, seed, args.flood_devices)
        victim = device_signer(seed, "victim", 0)
        alice = device_signer(seed, "alice", 0)
        async with aiohttp.ClientSession() as session:
            victim_ws = await connect(session, relay.url, victim)
            alice_ws = await connect(session, relay.url, alice)
            arrived: dict[bytes, float] = {}
            stop = asyncio.Event()
            loop_task = asyncio.create_task(victim_loop(victim_ws, arrived, stop))
            peak = rss_kib(relay_pid)
            sampler_stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not sampler_stop.is_set():
                    peak = max(peak, rss_kib(relay_pid))
                    await asyncio.sleep(0.2)

            async def phase(into: list[float], into_acc: list[float]) -> None:
                acc: dict[bytes, float] = {}
                sent, refused = await alice_phase(
                    alice_ws, victim.user, args.rate, args.duration, acc
                )
                await wait_delivered(sent, arrived)
                into.extend(latency_ms(sent, arrived))
                into_acc.extend(latency_ms(sent, acc))
                refusals.update(refused)

            sampler = asyncio.create_task(sample())
            for _ in range(args.rounds):
                await phase(quiet, quiet_acc)
                flood_for = args.duration + _LEAD_IN_MAX + 1
                flood = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--flooder",
                    relay.url,
                    seed,
                    victim.user,
                    str(flood_for),
                    str(args.flood_devices),
                    stdout=asyncio.subprocess.PIPE,
                )
                assert flood.stdout is not None
                line = await asyncio.wait_for(flood.stdout.readline(), 60)
                assert line.strip() == b"flooding", line
                # Measured once the account's burst is spent (its first 429), so the phase sees
                # the sustained maximum rate; a flood never refused gets _LEAD_IN_MAX seconds.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flood.stdout.readline(), _LEAD_IN_MAX)
                await phase(loaded, loaded_acc)
                out = await asyncio.wait_for(flood.stdout.read(), 60)
                await flood.wait()
                flood_answers.update(json.loads(out.decode().strip().splitlines()[-1]))
                flood_seconds += flood_for
            sampler_stop.set()
            await sampler
            stop.set()
            await loop_task
            for ws in (victim_ws, alice_ws):
                await ws.close()
    changed = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    print(
        f"alice {args.rate:g} msg/s, {args.rounds} x ({args.duration:g} s unloaded +"
        f" {args.duration:g} s flooded); flood: {args.flood_devices} devices of one account;"
        f" settings changed from the defaults: {changed}"
    )
    for name, lat, acc in (("unloaded", quiet, quiet_acc), ("flooded", loaded, loaded_acc)):
        print(
            f"  {name:<9} delivered {len(lat):>5}  accepted p50 {percentile(acc, 0.5):7.2f} ms"
            f" p99 {percentile(acc, 0.99):7.2f} ms | delivered p50 {percentile(lat, 0.5):7.2f} ms"
            f" p99 {percentile(lat, 0.99):7.2f} ms"
        )
    accepted = sum(n for k, n in flood_answers.items() if k.startswith("200"))
    print(
        f"flood's answers: {dict(flood_answers)}"
        f" ({accepted / flood_seconds:.0f} accepted/s over {flood_seconds:g} s of flood)"
    )
    if refusals:
        print(f"alice refused: {dict(refusals)}")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min): {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    ratio = percentile(loaded, 0.99) / percentile(quiet, 0.99)
    ok = ratio <= TARGET_RATIO and not refusals and len(loaded) == len(loaded_acc) > 0
    print(
        f"RESULT: {'PASS' if ok else 'MISS'}  flooded delivery p99"
        f" {percentile(loaded, 0.99):.2f} ms / unloaded {percentile(quiet, 0.99):.2f} ms"
        f" = {ratio:.2f} (target <= {TARGET_RATIO:g}, alice refused {sum(refusals.values())});"
        f" relay peak RSS {peak / 1024:.1f} MiB"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flooder":
        url, seed, victim, duration, devices = sys.argv[2:7]
        asyncio.run(flooder(url, seed, victim, float(duration), int(devices)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood-devices", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    os.environ.pop("BLINDPOST_RELAY_REGISTRATION", None)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
