# Invariants:
# * Runs in its own process, started by bench/peer_ejabberd.py; talks to it only through JSON
#   lines (config and commands on stdin, events on stdout), exactly like
#   bench/_relay_load_worker.py, so both systems are driven by the same kind of process.
# * Connects only to the loopback ejabberd node the orchestrator started, and stops by itself:
#   every phase has a deadline.
# * Latency is measured from the CLOCK_MONOTONIC time the sender wrote into the first 19
#   characters of the message body to the moment the stanza was read; CLOCK_MONOTONIC is shared
#   by every process on the machine. The body has the same size as the relay's (200 bytes).
# * A minimal XMPP client (RFC 6120/6121): stream, optional in-band registration (XEP-0077),
#   SASL PLAIN, resource binding, initial presence, chat messages. It parses only what it needs
#   (the server is ours and trusted); it is a load generator, not a general client.
"""Load-generator worker for bench/peer_ejabberd.py (not meant to be run by hand)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT = 30.0
LOGIN_ATTEMPTS = 3
SEND_BURST = 200
_STREAM_OPEN = (
    "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client'"
    " xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
_IQ_REPLY = re.compile(rb"<iq[^>]*\bid='(?P<id>[a-z]+)'[^>]*?(?:/>|>.*?</iq>)", re.S)
_BODY = re.compile(rb"<body>(\d{19})")
_TS_DIGITS = 19


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Stats:
    window: tuple[int, int] = (0, 0)  # monotonic ns [start, end) of the measured window
    sent: int = 0
    sent_in_window: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    first_delivery_ns: int = 0
    last_delivery_ns: int = 0
    latencies_us: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def in_window(self, t_ns: int) -> bool:
        return self.window[0] <= t_ns < self.window[1]


class XmppConn:
    """One logged-in XMPP session of one load user."""

    def __init__(self, cfg: dict[str, Any], user: str, stats: Stats) -> None:
        self.cfg = cfg
        self.user = user
        self.stats = stats
        self.domain = str(cfg["domain"])
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""
        self.task: asyncio.Task[None] | None = None
        self.seq = 0
        self.pong = asyncio.Event()

    async def _until(self, pattern: re.Pattern[bytes] | bytes) -> re.Match[bytes] | int:
        assert self.reader is not None
        while True:
            if isinstance(pattern, bytes):
                at = self.buf.find(pattern)
                if at >= 0:
                    end = at + len(pattern)
                    self.buf = self.buf[end:]
                    return end
            else:
                m = pattern.search(self.buf)
                if m is not None:
                    self.buf = self.buf[m.end() :]
                    return m
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("ejabberd closed the stream")
            self.buf += chunk

    async def _iq(self, stanza: str, iq_id: str) -> bytes:
        assert self.writer is not None
        self.writer.write(stanza.encode())
        while True:
            m = await self._until(_IQ_REPLY)
            assert isinstance(m, re.Match)
            if m.group("id") == iq_id.encode():
                return m.group(0)

    async def login(self, register: bool, source: str | None) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            str(self.cfg["host"]),
            int(self.cfg["port"]),
            local_addr=(source, 0) if source else None,
        )
        open_stream = _STREAM_OPEN.format(domain=self.domain)
        self.writer.write(open_stream.encode())
        await self._until(b"</stream:features>")
        password = str(self.cfg["password"])
        if register:
            reply = await self._iq(
                "<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
                f"<username>{self.user}</username><password>{password}</password>"
                "</query></iq>",
                "reg",
            )
            if b"type='result'" not in reply and b"conflict" not in reply:
                raise ConnectionError(f"registration refused: {reply[:200]!r}")
        token = base64.b64encode(f"\0{self.user}\0{password}".encode()).decode()
        self.writer.write(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            f"{token}</auth>".encode()
        )
        m = await self._until(re.compile(rb"<(success|failure)\b[^>]*?(?:/>|>.*?</\1>)", re.S))
        assert isinstance(m, re.Match)
        if m.group(1) != b"success":
            raise ConnectionError("SASL PLAIN refused")
        self.writer.write(open_stream.encode())
        await self._until(b"</stream:features>")
        await self._iq(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            "<resource>load</resource></bind></iq>",
            "bind",
        )
        self.writer.write(b"<presence/>")
        self.task = asyncio.ensure_future(self.read_loop())

    async def read_loop(self) -> None:
        assert self.reader is not None
        st = self.stats
        data = self.buf
        self.buf = b""
        while True:
            # Every complete timestamp seen in this chunk is one delivered message; a body split
            # over two reads is found once the rest arrives (the tail is kept).
            cut = 0
            for m in _BODY.finditer(data):
                now = time.monotonic_ns()
                t_send = int(m.group(1))
                st.delivered += 1
                if not st.first_delivery_ns:
                    st.first_delivery_ns = now
                st.last_delivery_ns = now
                if st.in_window(t_send):
                    st.delivered_in_window += 1
                    st.latencies_us.append((now - t_send) // 1000)
                cut = m.end()
            if b"id='ping'" in data:
                self.pong.set()
            tail = data[cut:]
            keep = tail[-(len(b"<body>") + _TS_DIGITS) :]
            try:
                chunk = await self.reader.read(262144)
            except (ConnectionError, OSError) as exc:
                st.errors[type(exc).__name__] += 1
                return
            if not chunk:
                return
            data = keep + chunk

    def send(self, to: str, pad: str) -> None:
        w = self.writer
        if w is None or w.is_closing():
            return
        t = time.monotonic_ns()
        self.seq += 1
        w.write(
            f"<message to='{to}@{self.domain}' type='chat' id='m{self.seq}'>"
            f"<body>{t:0{_TS_DIGITS}d}{pad}</body></message>".encode()
        )
        st = self.stats
        st.sent += 1
        if st.in_window(t):
            st.sent_in_window += 1

    async def close(self) -> None:
        if self.writer is not None and not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(b"</stream:stream>")
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 5)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def read_command() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def open_all(cfg: dict[str, Any], stats: Stats) -> list[XmppConn]:
    first, stop = cfg["indices"]
    sources = cfg.get("source_addrs") or [None]
    conns = [XmppConn(cfg, f"{cfg['prefix']}{i}", stats) for i in range(first, stop)]
    sem = asyncio.Semaphore(int(cfg.get("connect_concurrency", 100)))
    failed: Counter[str] = Counter()

    async def one(k: int, conn: XmppConn) -> None:
        register = bool(cfg.get("register", True))
        async with sem:
            # A login that fails (a timeout: ejabberd under the previous round's load sometimes
            # leaves one unanswered; a dropped or refused connection) is tried again on a new
            # connection, registering again being a "conflict", which login accepts; only one
            # failing every attempt counts.
            for attempt in range(1, LOGIN_ATTEMPTS + 1):
                try:
                    await asyncio.wait_for(
                        conn.login(register, sources[k % len(sources)]), CONNECT_TIMEOUT
                    )
                    return
                except (ConnectionError, OSError, TimeoutError) as exc:
                    await conn.close()
                    conn.buf = b""
                    if attempt == LOGIN_ATTEMPTS:
                        failed[f"{type(exc).__name__}: {exc}"[:80]] += 1

    await asyncio.gather(*(one(k, c) for k, c in enumerate(conns)))
    emit(
        {
            "event": "ready",
            "connected": sum(1 for c in conns if c.task is not None),
            "failed": dict(failed),
        }
    )
    return conns


async def traffic(cfg: dict[str, Any], conns: list[XmppConn], t0: int) -> None:
    """Open-loop pacing, as the relay worker: message k of this worker leaves at t0 + k / rate."""
    rate = float(cfg["rate"])
    total_s = float(cfg["warmup"]) + float(cfg["duration"])
    n_total = int(cfg["peers"])
    first = int(cfg["indices"][0])
    pad = "x" * max(0, int(cfg["body_bytes"]) - _TS_DIGITS)
    partners = [f"{cfg['prefix']}{(first + k + n_total // 2) % n_total}" for k in range(len(conns))]
    end = t0 + int(total_s * 1e9)
    live = [i for i, c in enumerate(conns) if c.task is not None]
    if not live or rate <= 0:
        return
    sent = k = 0
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        due = min(int((now - t0) * rate / 1e9) - sent, SEND_BURST)
        for _ in range(due):
            i = live[k % len(live)]
            k += 1
            conns[i].send(partners[i], pad)
        sent += max(due, 0)
        await asyncio.sleep(0.0005)


async def send_burst(cfg: dict[str, Any], conns: list[XmppConn]) -> None:
    """Drain scenario, sender side: ``count`` messages to one offline user, as fast as TCP goes."""
    pad = "x" * max(0, int(cfg["body_bytes"]) - _TS_DIGITS)
    to = str(cfg["to"])
    conn = conns[0]
    for n in range(int(cfg["count"])):
        conn.send(to, pad)
        if n % 500 == 499 and conn.writer is not None:
            await conn.writer.drain()
    # A ping answered by the server: every message before it has been processed (stored offline).
    assert conn.writer is not None
    conn.writer.write(b"<iq type='get' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>")
    await asyncio.wait_for(conn.pong.wait(), 300)


async def run(cfg: dict[str, Any]) -> None:
    raise_fd_limit()
    stats = Stats()
    mode = cfg["mode"]
    if mode == "drain-receive":
        # Log in and time until every queued message has arrived.
        conn = XmppConn(cfg, str(cfg["user"]), stats)
        t_start = time.monotonic_ns()
        await conn.login(False, None)
        deadline = time.monotonic() + float(cfg.get("timeout", 120))
        while stats.delivered < int(cfg["count"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        await conn.close()
        emit(
            {
                "event": "result",
                "delivered": stats.delivered,
                "seconds": (stats.last_delivery_ns - t_start) / 1e9 if stats.delivered else None,
            }
        )
        return
    conns = await open_all(cfg, stats)
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)  # the relay worker's tuning (relay.app.GC_THRESHOLDS)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        cmd = await read_command()
        if mode == "traffic" and cmd.startswith("go "):
            t0 = int(cmd.split()[1])
            warm = int(float(cfg["warmup"]) * 1e9)
            stats.window = (t0 + warm, t0 + warm + int(float(cfg["duration"]) * 1e9))
            while time.monotonic_ns() < t0:
                await asyncio.sleep(0.001)
            await traffic(cfg, conns, t0)
            await asyncio.sleep(float(cfg.get("drain", 3.0)))
        elif mode == "drain-send" and cmd == "go":
            await send_burst(cfg, conns)
        elif mode == "idle" and cmd != "close":
            await read_command()
    finally:
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(c.close() for c in conns))
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    emit(
        {
            "event": "result",
            "sent": stats.sent,
            "sent_in_window": stats.sent_in_window,
            "accepted": stats.sent,
            "accepted_in_window": stats.sent_in_window,
            "delivered": stats.delivered,
            "delivered_in_window": stats.delivered_in_window,
            "latencies_us": stats.latencies_us,
            "errors": dict(stats.errors),
            "cpu_seconds": cpu,
        }
    )


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
