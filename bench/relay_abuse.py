# Invariants:
# * Bounded in time and connection count; starts its own relay on 127.0.0.1 with a fresh
#   temporary data directory (bench/relay_load.py's relay_process), connects only to loopback.
# * Prints figures and the target with "ok" or "MISSED"; exit status 0 either way (a
#   measurement, not a test). Figures taken on a busy machine are not worth publishing.
"""Abuse scenarios against the relay (issue 13): slow request bodies.

``slow-bodies``: N sockets each send signed ``PUT /v1/messages`` headers with
``Content-Length: 1000000`` and then one body byte every ``--interval`` seconds (the attack of
issue 13, item 2). The sockets come from ``--addresses`` loopback addresses (127.0.0.2, ...) so
that, with the default per-address cap, every body is read and must be cut off by the body
deadline (``body_timeout_seconds`` + bytes / ``body_min_bytes_per_second``) rather than refused
up front. Prints how long until the relay had closed them all, their statuses, the relay's peak
RSS and open file descriptors, and whether a second client was served meanwhile.

Examples::

    python bench/relay_abuse.py slow-bodies --sockets 1000
    python bench/relay_abuse.py slow-bodies --sockets 20 --relay-set body_timeout_seconds=2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from _relay_load_worker import raise_fd_limit  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402
from relay_load import Relay, read_status, relay_process, verdict  # noqa: E402

from blindpost_wire.auth import canonical_string  # noqa: E402

BODY_LENGTH = 1_000_000


class Signer:
    """Signs requests for one device (docs/relay-api.md section 1)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.key = SigningKey.generate()

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        ts = time.time_ns() // 1_000_000
        nonce = base64.b64encode(os.urandom(16)).decode()
        digest = hashlib.sha256(body).hexdigest()
        msg = canonical_string(method, target, self.user, 1, ts, nonce, digest)
        return {
            "X-Blindpost-User": self.user,
            "X-Blindpost-Device": "1",
            "X-Blindpost-Timestamp": str(ts),
            "X-Blindpost-Nonce": nonce,
            "X-Blindpost-Signature": base64.b64encode(self.key.sign(msg).signature).decode(),
        }


async def register(session: aiohttp.ClientSession, url: str, signer: Signer) -> None:
    body = json.dumps(
        {
            "username": signer.user,
            "device_id": 1,
            "auth_key": base64.b64encode(bytes(signer.key.verify_key)).decode(),
        }
    ).encode()
    headers = signer.headers("POST", "/v1/accounts", body)
    headers["Content-Type"] = "application/json"
    async with session.post(url + "/v1/accounts", data=body, headers=headers) as resp:
        if resp.status != 201:
            raise RuntimeError(f"registration failed: {resp.status} {await resp.text()}")


async def slow_socket(
    host: str, port: int, source: str, head: bytes, interval: float, ceiling: float
) -> tuple[int | None, float]:
    """One trickling socket; returns (status answered, seconds until the relay closed it)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    data = b""
    try:
        writer.write(head + b"{")
        await writer.drain()
        while time.monotonic() - start < ceiling:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), interval)
            except TimeoutError:
                try:
                    writer.write(b" ")
                    await writer.drain()
                except ConnectionError:
                    break
                continue
            if not chunk:
                break
            data += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - start


async def sample_relay(relay: Relay, stop: asyncio.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        for pid in relay.processes():
            rss = read_status(pid, "VmRSS") or 0
            peaks["rss_kb"] = max(peaks.get("rss_kb", 0), rss)
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                fds = 0
            peaks["fds"] = max(peaks.get("fds", 0), fds)
        await asyncio.sleep(0.5)


async def run_slow_bodies(args: argparse.Namespace, relay: Relay) -> None:
    host, port = "127.0.0.1", int(relay.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        attacker, alice = Signer(f"mallory_{os.urandom(3).hex()}"), Signer("alice_bench")
        await register(session, relay.url, attacker)
        await register(session, relay.url, alice)
        heads = []
        for _ in range(args.sockets):
            lines = [
                "PUT /v1/messages HTTP/1.1",
                "Host: 127.0.0.1",
                "Content-Type: application/json",
                f"Content-Length: {BODY_LENGTH}",
            ]
            lines += [f"{k}: {v}" for k, v in attacker.headers("PUT", "/v1/messages").items()]
            heads.append(("\r\n".join(lines) + "\r\n\r\n").encode())
        sources = [f"127.0.0.{2 + i % args.addresses}" for i in range(args.sockets)]
        stop = asyncio.Event()
        peaks: dict[str, int] = {}
        sampler = asyncio.ensure_future(sample_relay(relay, stop, peaks))
        start = time.monotonic()
        tasks = [
            asyncio.ensure_future(slow_socket(host, port, src, head, args.interval, args.ceiling))
            for src, head in zip(sources, heads, strict=True)
        ]
        # Meanwhile a normal client is served (one request, timed).
        t0 = time.monotonic()
        async with session.get(relay.url + "/healthz/live") as resp:
            other_ok = resp.status == 200
        other_ms = (time.monotonic() - t0) * 1000
        results = await asyncio.gather(*tasks)
        all_closed = time.monotonic() - start
        stop.set()
        await sampler
    statuses = Counter(s for s, _ in results)
    open_at_ceiling = sum(1 for _, dt in results if dt >= args.ceiling)
    print(f"slow-bodies: {args.sockets} sockets from {args.addresses} addresses")
    print(f"  statuses: {dict(sorted(statuses.items(), key=str))} (None = closed, no response)")
    print(f"  all closed after {all_closed:.1f} s; still open at the ceiling: {open_at_ceiling}")
    print(f"  relay peak RSS {peaks.get('rss_kb', 0) / 1024:.1f} MiB, peak fds {peaks.get('fds')}")
    print(f"  other client served meanwhile: {other_ok} in {other_ms:.0f} ms")
    print(f"  relay log tracebacks: {relay.tracebacks()}")
    target = args.deadline_target
    print(
        f"  target: every socket closed within {target:.0f} s -> "
        f"{verdict(open_at_ceiling == 0 and all_closed <= target)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--relay-set", action="append", default=[], metavar="KEY=VALUE", help="relay setting"
    )
    sub = parser.add_subparsers(dest="scenario", required=True)
    slow = sub.add_parser("slow-bodies", help="N sockets trickling request bodies")
    slow.add_argument("--sockets", type=int, default=1000)
    slow.add_argument("--addresses", type=int, default=64, help="loopback source addresses")
    slow.add_argument("--interval", type=float, default=2.0, help="seconds between body bytes")
    slow.add_argument("--ceiling", type=float, default=120.0, help="give up after (seconds)")
    slow.add_argument(
        "--deadline-target",
        type=float,
        default=15.0,
        help="the target: body_timeout_seconds (10) plus slack [15]",
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    settings = dict(item.split("=", 1) for item in args.relay_set)
    with relay_process(settings) as relay:
        asyncio.run(run_slow_bodies(args, relay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
