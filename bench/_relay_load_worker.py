# Invariants:
# * Runs in its own process, started by bench/relay_load.py; talks to it only through JSON
#   lines (config and commands on stdin, events on stdout), so the relay, the orchestrator and
#   the load generators never share a CPU-bound event loop.
# * Connects only to the URL it is given (the orchestrator only ever gives it a loopback URL
#   unless the operator passed --url) and stops by itself: every phase has a deadline.
# * Device keys are derived from (seed, index), so the orchestrator registers devices and the
#   worker re-derives the same signers without any private key crossing a pipe.
# * Latency is measured from the CLOCK_MONOTONIC time the sender wrote into the first 8 bytes
#   of the (opaque) body to the moment the DELIVER frame was read; CLOCK_MONOTONIC is shared
#   by every process on the machine.
# * The worker's own pauses must not show up as relay latency: once its sockets are open, what
#   is alive is frozen out of the cyclic collector's sight and collections are rare (the same
#   tuning as the relay's serving process, relay.app.GC_THRESHOLDS), so no full collection of
#   tens of ms lands inside the measured window.
"""Load-generator worker for bench/relay_load.py (not meant to be run by hand)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import resource
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from nacl.signing import SigningKey

from e2ee.transport.auth import DeviceSigner
from e2ee.transport.frames import b64e, encode_ack, encode_send
from relay.app import GC_THRESHOLDS

_T = struct.Struct(">Q")
_DELIVER_FIXED = 33  # op(1) seq(8) id(16) stored_at(8)
ACK_FLUSH_SECONDS = 0.02
CONNECT_TIMEOUT = 30.0


def device_seed(seed: str, index: int) -> bytes:
    """The Ed25519 seed of load device ``index`` (shared with the orchestrator)."""
    return hashlib.sha256(f"blindpost-load|{seed}|{index}".encode()).digest()


def device_signer(seed: str, prefix: str, index: int) -> DeviceSigner:
    """The signer of load device ``index``: user ``<prefix><index>``, device 1."""
    return DeviceSigner(SigningKey(device_seed(seed, index)), f"{prefix}{index}", 1)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@dataclass
class Stats:
    window: tuple[int, int] = (0, 0)  # monotonic ns [start, end) of the measured window
    sent: int = 0
    sent_in_window: int = 0
    accepted_in_window: int = 0
    accepted: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    results: Counter[int] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    latencies_us: list[int] = field(default_factory=list)
    # send -> its 200 (the durable answer: the relay committed and synced the message)
    answer_latencies_us: list[int] = field(default_factory=list)
    fanout: dict[int, list[int]] = field(default_factory=dict)  # t_send -> [count, max lat us]
    sample_ns: int = 0  # > 0: latencies also kept per interval of the window (bench/relay_soak)
    samples: dict[int, list[int]] = field(default_factory=dict)  # interval -> latencies us

    def in_window(self, t_ns: int) -> bool:
        return self.window[0] <= t_ns < self.window[1]


class Conn:
    """One authenticated WebSocket of one load device."""

    def __init__(
        self,
        signer: DeviceSigner,
        stats: Stats,
        ack: bool,
        frame_auth: bool = False,
        settle: bool = True,
    ) -> None:
        self.signer = signer
        self.frame_auth = frame_auth
        self.stats = stats
        self.ack = ack
        self.settle = settle
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.to_ack: list[bytes] = []
        # Ids of our sends answered 200, settled with the next ack frame as the SDK does
        # (docs/relay-api.md): the relay then forgets their dedupe records.
        self.to_settle: list[bytes] = []
        self.pending: dict[str, int] = {}  # base64 message id -> its send time (ns)
        self.reader: asyncio.Task[None] | None = None
        self.live = asyncio.Event()

    async def connect(self, session: aiohttp.ClientSession, url: str) -> None:
        headers = self.signer.sign_headers("GET", "/v1/ws")
        if self.frame_auth:  # docs/relay-api.md section 5: the same fields as the first frame
            self.ws = await session.ws_connect(
                url + "/v1/ws", autoclose=False, autoping=True, max_msg_size=0
            )
            doc = {k.removeprefix("X-Blindpost-").lower(): v for k, v in headers.items()}
            await self.ws.send_str(json.dumps({"type": "auth", **doc}))
        else:
            self.ws = await session.ws_connect(
                url + "/v1/ws", headers=headers, autoclose=False, autoping=True, max_msg_size=0
            )
        self.reader = asyncio.ensure_future(self.read_loop())
        await asyncio.wait_for(self.live.wait(), CONNECT_TIMEOUT)

    async def read_loop(self) -> None:
        ws = self.ws
        assert ws is not None
        st = self.stats
        binary, text = aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT
        while True:
            msg = await ws.receive()
            if msg.type == binary:
                self.on_deliver(msg.data)
            elif msg.type == text:
                self.on_text(msg.data)
            else:
                code = ws.close_code
                st.closes[str(code)] += 1
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    with contextlib.suppress(Exception):
                        await ws.close()
                self.live.set()
                return

    def on_deliver(self, data: bytes) -> None:
        now = time.monotonic_ns()
        st = self.stats
        name_len = data[_DELIVER_FIXED]
        body_at = _DELIVER_FIXED + 1 + name_len + 1
        t_send = _T.unpack_from(data, body_at)[0]
        st.delivered += 1
        lat_us = (now - t_send) // 1000
        if data[body_at + 8 : body_at + 9] == b"G":  # a group-fanout message
            entry = st.fanout.setdefault(t_send, [0, 0])
            entry[0] += 1
            entry[1] = max(entry[1], lat_us)
        elif st.in_window(t_send):
            st.delivered_in_window += 1
            if st.sample_ns:
                k = (t_send - st.window[0]) // st.sample_ns
                st.samples.setdefault(k, []).append(lat_us)
            else:
                st.latencies_us.append(lat_us)
        if self.ack:
            self.to_ack.append(bytes(data[9:25]))

    def on_text(self, text: str) -> None:
        if text.startswith('{"type":"send_result"'):
            doc = json.loads(text)
            status = int(doc.get("status", 0))
            st = self.stats
            st.results[status] += 1
            mid = doc.get("id")
            t_send = self.pending.pop(mid, None) if isinstance(mid, str) else None
            if status == 200:
                st.accepted += 1
                if self.settle and isinstance(mid, str):
                    self.to_settle.append(base64.b64decode(mid))
                if t_send is not None and st.in_window(t_send):
                    st.accepted_in_window += 1
                    st.answer_latencies_us.append((time.monotonic_ns() - t_send) // 1000)
        elif text == '{"type":"empty"}':
            self.live.set()

    async def send(self, recipient: str, body_pad: bytes) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        mid = os.urandom(16)
        t = time.monotonic_ns()
        frame = encode_send(mid, ((recipient, 1),), _T.pack(t) + body_pad)
        self.pending[b64e(mid)] = t
        st = self.stats
        st.sent += 1
        if st.in_window(t):
            st.sent_in_window += 1
        await ws.send_bytes(frame)

    async def flush_acks(self) -> None:
        ws = self.ws
        if not (self.to_ack or self.to_settle) or ws is None or ws.closed:
            return
        ids, self.to_ack = self.to_ack, []
        settled, self.to_settle = self.to_settle, []
        for i in range(0, max(len(ids), len(settled)), 1000):
            await ws.send_str(encode_ack(ids[i : i + 1000], settled=settled[i : i + 1000]))

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader


async def read_command() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def open_all(cfg: dict[str, Any], stats: Stats, ack: bool) -> list[Conn]:
    """Open one WebSocket per device of this worker, spread over the source addresses."""
    url = cfg["url"]
    first, stop = cfg["indices"]
    sources = cfg.get("source_addrs") or [None]
    sessions = []
    for src in sources:
        connector = aiohttp.TCPConnector(
            limit=0, local_addr=(src, 0) if src else None, force_close=False
        )
        sessions.append(
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=30)
            )
        )
    conns = [
        Conn(
            device_signer(cfg["seed"], cfg["prefix"], i),
            stats,
            ack,
            bool(cfg.get("frame_auth")),
            bool(cfg.get("settle", True)),
        )
        for i in range(first, stop)
    ]
    sem = asyncio.Semaphore(int(cfg.get("connect_concurrency", 200)))
    failed: Counter[str] = Counter()

    async def one(k: int, conn: Conn) -> None:
        async with sem:
            try:
                await conn.connect(sessions[k % len(sessions)], url)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failed[type(exc).__name__] += 1

    await asyncio.gather(*(one(k, c) for k, c in enumerate(conns)))
    emit(
        {
            "event": "ready",
            "connected": sum(1 for c in conns if c.ws is not None and not c.ws.closed),
            "failed": dict(failed),
        }
    )
    cfg["_sessions"] = sessions
    return conns


SEND_BURST = 200


async def ack_loop(conns: list[Conn], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(ACK_FLUSH_SECONDS)
        for c in conns:
            if c.to_ack or c.to_settle:
                await c.flush_acks()


async def traffic(cfg: dict[str, Any], conns: list[Conn], stats: Stats, t0: int) -> None:
    """Send at a fixed rate: message k of this worker leaves at t0 + k / rate."""
    rate = float(cfg["rate"])
    total_s = float(cfg["warmup"]) + float(cfg["duration"])
    n_total = int(cfg["peers"])
    first = int(cfg["indices"][0])
    pad = b"\x00" * max(0, int(cfg["body_bytes"]) - 8)
    partners = [f"{cfg['prefix']}{(first + k + n_total // 2) % n_total}" for k in range(len(conns))]
    end = t0 + int(total_s * 1e9)
    sent = 0
    k = 0
    live = [i for i, c in enumerate(conns) if c.ws is not None and not c.ws.closed]
    if not live or rate <= 0:
        return
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        # At most SEND_BURST per round: a sender that fell behind (the relay pushes back on
        # pipelined sends) must not catch up in one burst that starves this process's readers.
        due = min(int((now - t0) * rate / 1e9) - sent, SEND_BURST)
        for _ in range(due):
            i = live[k % len(live)]
            k += 1
            await conns[i].send(partners[i], pad)
        sent += max(due, 0)
        await asyncio.sleep(0.0005)


async def run(cfg: dict[str, Any]) -> None:
    raise_fd_limit()
    stats = Stats()
    mode = cfg["mode"]
    conns = await open_all(cfg, stats, ack=bool(cfg.get("ack", True)))
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = asyncio.Event()
    acker = asyncio.ensure_future(ack_loop(conns, stop))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        cmd = await read_command()
        if mode == "traffic" and cmd.startswith("go "):
            t0 = int(cmd.split()[1])
            warm = int(float(cfg["warmup"]) * 1e9)
            stats.window = (t0 + warm, t0 + warm + int(float(cfg["duration"]) * 1e9))
            stats.sample_ns = int(float(cfg.get("sample_seconds", 0)) * 1e9)
            while time.monotonic_ns() < t0:
                await asyncio.sleep(0.001)
            await traffic(cfg, conns, stats, t0)
            await asyncio.sleep(float(cfg.get("drain", 3.0)))
        elif mode in ("idle", "recipients") and cmd != "close":
            # Idle until told to close; "recipients" receive and ack fan-out messages.
            await read_command()
    finally:
        stop.set()
        acker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acker
        for c in conns:
            if c.to_ack or c.to_settle:
                with contextlib.suppress(Exception):
                    await c.flush_acks()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        lost_results = sum(len(c.pending) for c in conns)
        await asyncio.gather(*(c.close() for c in conns))
        for s in cfg.get("_sessions", []):
            await s.close()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    emit(
        {
            "event": "result",
            "sent": stats.sent,
            "sent_in_window": stats.sent_in_window,
            "accepted": stats.accepted,
            "accepted_in_window": stats.accepted_in_window,
            "delivered": stats.delivered,
            "delivered_in_window": stats.delivered_in_window,
            "results": {str(k): v for k, v in stats.results.items()},
            "closes": dict(stats.closes),
            "unanswered_sends": lost_results,
            "latencies_us": stats.latencies_us,
            "answer_latencies_us": stats.answer_latencies_us,
            "fanout": [[t, c, m] for t, (c, m) in stats.fanout.items()],
            "samples": {str(k): v for k, v in stats.samples.items()},
            "cpu_seconds": cpu,
        }
    )


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
