# Invariants:
# * At most one registered connection per device; registering a new one evicts the old (4001).
# * Live pushes never await: a frame is written to the transport at once, or the connection
#   is closed as too slow (4002). "Too slow" means its unsent bytes stayed above
#   ``max_outbound`` for longer than ``grace`` seconds, or exceeded ``HARD_CAP_FACTOR`` times
#   that bound at any moment (the memory bound). Bursts (one commit can push many frames to one
#   socket) are tolerated while the reader keeps up. A slow reader therefore costs others
#   nothing, and there is no per-connection task or queue.
# * A connection receives DELIVER frames in strictly increasing seq: pushes are skipped while
#   it drains its backlog (they are in the store) and any seq <= last sent is dropped.
# * Early delivery (``staged``, SQLite): an accepted send is pushed before its commit, in seq
#   order. A socket that went live while a transaction was open may lack seqs staged before
#   that (the drain read only committed ones), so it gets no early push until every seq staged
#   up to then is settled (``hold``); the committed batch then pushes what it missed, in order.
"""Registry of live WebSocket connections and the live-delivery fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

from blindpost_wire.close import (
    CLOSE_BANNED,
    CLOSE_DEVICE_REMOVED,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_REPLACED,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHENTICATED,
)
from relay.metrics import Metrics
from relay.store.base import Address, Delivery, StoredMessage
from relay.wire import encode_deliver

__all__ = [
    "CLOSE_BANNED",
    "CLOSE_DEVICE_REMOVED",
    "CLOSE_GOING_AWAY",
    "CLOSE_IDLE",
    "CLOSE_REPLACED",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHENTICATED",
    "HARD_CAP_FACTOR",
    "Connection",
    "Hub",
    "frame_bytes",
]

log = logging.getLogger("relay.hub")

# The CLOSE_* codes are blindpost_wire's (the SDK reads the same ones), re-exported here.

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_PING = 0x9
_CLOSE_TIMEOUT = 5.0
HARD_CAP_FACTOR = 8


def frame_bytes(opcode: int, payload: bytes) -> bytes:
    """Encode one unmasked, unfragmented server-to-client WebSocket frame (RFC 6455 5.2)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack(">BBH", first, 126, n) + payload
    return struct.pack(">BBQ", first, 127, n) + payload


class Connection:
    """The tiny per-socket state kept while a device is connected."""

    __slots__ = (
        "addr",
        "closing",
        "drain",
        "hold",
        "inflight_acks",
        "inflight_sends",
        "last_rx",
        "last_seq",
        "live",
        "over_since",
        "pending_max",
        "pinged",
        "resume",
        "token",
        "transport",
        "ws",
    )

    def __init__(self, addr: Address, ws: web.WebSocketResponse, transport: asyncio.Transport):
        self.addr = addr
        self.ws = ws
        self.transport = transport
        self.live = False
        self.closing = False
        self.last_seq = 0
        self.pending_max = 0
        self.hold = 0  # no early push until every seq up to this is settled (Hub.staged)
        self.over_since = 0.0
        self.last_rx = 0.0
        self.pinged = False
        self.inflight_acks = 0
        self.inflight_sends = 0
        self.resume: asyncio.Future[None] | None = None  # set while reading is paused
        self.drain: asyncio.Task[None] | None = None
        #: Names this connection across relay nodes (relay.nodes); empty on a single node.
        self.token = ""


class Hub:
    """Maps devices to their live connection and pushes committed messages.

    Args:
        metrics: counters to update.
        max_outbound_bytes: unsent bytes a socket may hold for longer than ``grace``.
        grace: seconds a socket may stay above ``max_outbound_bytes``.
    """

    def __init__(self, metrics: Metrics, max_outbound_bytes: int, grace: float = 2.0) -> None:
        self._conns: dict[Address, Connection] = {}
        self._metrics = metrics
        self._max_outbound = max_outbound_bytes
        self._hard_cap = max_outbound_bytes * HARD_CAP_FACTOR
        self._grace = grace
        self._tasks: set[asyncio.Task[None]] = set()
        #: The highest seq handed to ``staged`` and the highest settled (committed or failed).
        self.staged_seq = 0
        self.settled_seq = 0
        # Relay nodes hook (relay.nodes.link): told when a connection stops being its device's
        # registered one, to release the device's presence. None on a single node.
        self.detach_listener: Callable[[Connection], None] | None = None
        #: Upgraded sockets not attached yet (waiting for their auth frame, or for the
        #: hint's store read): shutdown closes these too.
        self._unattached: set[Any] = set()
        #: Set by :meth:`close_all`; no connection is attached after it.
        self.shutting_down = False

    def __len__(self) -> int:
        return len(self._conns)

    def attach(self, conn: Connection) -> None:
        """Register ``conn`` as its device's live connection, evicting an older one (4001)."""
        old = self._conns.get(conn.addr)
        self._conns[conn.addr] = conn
        self._metrics.ws_connections = len(self._conns)
        if old is not None:
            self.kick(old, CLOSE_REPLACED, "replaced by a newer connection")

    def detach(self, conn: Connection) -> None:
        """Unregister ``conn`` if it is still its device's registered connection."""
        if self._conns.get(conn.addr) is conn:
            del self._conns[conn.addr]
            self._metrics.ws_connections = len(self._conns)
            if self.detach_listener is not None:
                self.detach_listener(conn)

    def connections(self) -> list[Connection]:
        """Return the registered connections (a copy)."""
        return list(self._conns.values())

    def get(self, addr: Address) -> Connection | None:
        """Return the device's live connection, if any."""
        return self._conns.get(addr)

    def write(self, conn: Connection, opcode: int, payload: bytes) -> bool:
        """Write one frame now, or close the connection as too slow.

        Returns:
            True if the frame was written.
        """
        return self.write_raw(conn, frame_bytes(opcode, payload))

    def write_raw(self, conn: Connection, frames: bytes) -> bool:
        """Write already framed bytes (one or more whole frames) now, or close the connection
        as too slow (the same rule as ``write``).

        Returns:
            True if the bytes were written.
        """
        if conn.closing:
            return False
        transport = conn.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self._max_outbound:
            self._metrics.ws_slow_disconnects += 1
            log.info("closing slow connection user=%s device=%d", conn.addr.user, conn.addr.device)
            self.kick(conn, CLOSE_TOO_SLOW, "outbound buffer full")
            return False
        transport.write(frames)
        return True

    def write_text(self, conn: Connection, text: str) -> bool:
        """Write a text frame (see ``write``)."""
        return self.write(conn, OPCODE_TEXT, text.encode("utf-8"))

    def deliver(self, deliveries: Sequence[Delivery]) -> None:
        """Push committed messages to live connections (called on the loop, commit order).

        A committed batch's frames for one connection leave in one ``transport.write`` (one
        ``send()`` instead of one per frame: under load a batch carries several messages per
        socket). A connection whose write is refused (closing, or too slow and now being
        closed) never receives again, so advancing its ``last_seq`` first loses nothing: the
        messages stay in the mailbox for the next connection.
        """
        self._push((d.recipient, d.message.seq, d.message) for d in deliveries)

    def deliver_encoded(self, items: Sequence[tuple[Address, int, bytes]]) -> None:
        """Push DELIVER payloads encoded elsewhere (another node's wake-up carried them), as
        :meth:`deliver` pushes stored messages: same order and skipping rules.

        Args:
            items: (recipient, seq, the encoded DELIVER payload) in increasing seq per device.
        """
        self._push(items)

    def _push(self, items: Iterable[tuple[Address, int, StoredMessage | bytes]]) -> None:
        conns = self._conns
        out: dict[Connection, list[bytes]] = {}
        for addr, seq, message in items:
            conn = conns.get(addr)
            if conn is None:
                continue
            if not conn.live:
                if seq > conn.pending_max:
                    conn.pending_max = seq
                continue
            if seq <= conn.last_seq:
                continue
            conn.last_seq = seq
            payload = message if isinstance(message, bytes) else encode_deliver(message)
            frame = frame_bytes(OPCODE_BINARY, payload)
            out.setdefault(conn, []).append(frame)
        self._write_batches(out)

    def _write_batches(self, out: dict[Connection, list[bytes]]) -> None:
        # One transport.write per connection for all its frames of this batch.
        delivered = 0
        for conn, frames in out.items():
            if self.write_raw(conn, frames[0] if len(frames) == 1 else b"".join(frames)):
                delivered += len(frames)
        self._metrics.delivered += delivered

    def staged(self, deliveries: Sequence[Delivery], push: bool = True) -> None:
        """Push accepted messages before their commit (``EarlyDeliveryListener``).

        Only to live sockets, in increasing seq; the committed batch (``deliver``) follows and
        skips what went out here (its seqs are not above ``last_seq`` any more). A socket that
        went live while a transaction was open, or that has a message held back (``push``
        False: it goes out after its commit), gets nothing early until those are settled
        (``hold``): the committed batches then push what it missed, in order.
        """
        if not deliveries:
            return
        conns = self._conns
        settled = self.settled_seq
        out: dict[Connection, list[bytes]] = {}
        for d in deliveries:
            conn = conns.get(d.recipient)
            if conn is None or not conn.live:
                continue
            seq = d.message.seq
            if seq <= conn.last_seq:
                continue
            if not push or conn.hold > settled:
                conn.hold = seq  # and everything after it waits for its commit
                continue
            conn.last_seq = seq
            frame = frame_bytes(OPCODE_BINARY, encode_deliver(d.message))
            out.setdefault(conn, []).append(frame)
        last = deliveries[-1].message.seq
        if last > self.staged_seq:
            self.staged_seq = last
        self._write_batches(out)

    def settled(self, seq: int) -> None:
        """Every seq up to ``seq`` is committed or failed (``EarlyDeliveryListener``)."""
        if seq > self.settled_seq:
            self.settled_seq = seq

    def went_live(self, conn: Connection) -> None:
        """``conn`` drained its backlog: from now on it is pushed to (early once settled)."""
        conn.live = True
        if self.staged_seq > self.settled_seq:
            conn.hold = self.staged_seq

    def kick(self, conn: Connection, code: int, reason: str) -> None:
        """Close a connection with ``code`` in the background and unregister it."""
        if conn.closing:
            return
        conn.closing = True
        self.detach(conn)
        task = asyncio.get_running_loop().create_task(self._close(conn, code, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def kick_all(self, code: int, reason: str) -> int:
        """Close every live connection; return how many."""
        conns = list(self._conns.values())
        for conn in conns:
            self.kick(conn, code, reason)
        return len(conns)

    def kick_users(self, users: frozenset[str], code: int, reason: str) -> int:
        """Close every live connection of these users; return how many."""
        conns = [c for a, c in self._conns.items() if a.user in users]
        for conn in conns:
            self.kick(conn, code, reason)
        return len(conns)

    def kick_device(self, addr: Address, code: int, reason: str) -> None:
        """Close the device's live connection, if any."""
        conn = self._conns.get(addr)
        if conn is not None:
            self.kick(conn, code, reason)

    async def _close(self, conn: Connection, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(
                conn.ws.close(code=code, message=reason.encode()), _CLOSE_TIMEOUT
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            conn.transport.abort()

    def check_liveness(self, now: float, heartbeat: float, idle: float) -> None:
        """Ping quiet sockets and close those that stay silent (4004).

        A socket from which nothing arrived for ``heartbeat`` seconds is pinged; if still nothing
        arrived after another ``heartbeat / 2``, or for ``idle`` seconds in total, it is closed.

        Args:
            now: loop time.
            heartbeat: ping interval in seconds (0 disables pings).
            idle: idle timeout in seconds (0 disables it).
        """
        for conn in list(self._conns.values()):
            quiet = now - conn.last_rx
            if (idle and quiet > idle) or (heartbeat and conn.pinged and quiet > heartbeat * 1.5):
                self.kick(conn, CLOSE_IDLE, "no traffic from client")
            elif heartbeat and not conn.pinged and quiet >= heartbeat:
                conn.pinged = True
                self.write(conn, OPCODE_PING, b"")

    async def run_liveness(self, heartbeat: float, idle: float) -> None:
        """Run ``check_liveness`` periodically until cancelled (one task for all sockets)."""
        periods = [p for p in (heartbeat / 2, idle / 4) if p > 0]
        if not periods:
            return
        tick = max(0.05, min(periods))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            self.check_liveness(loop.time(), heartbeat, idle)

    def upgraded(self, ws: Any) -> None:
        """Track an upgraded socket until :meth:`attached_or_gone` (shutdown closes it)."""
        self._unattached.add(ws)

    def attached_or_gone(self, ws: Any) -> None:
        """The socket was attached, or will never be."""
        self._unattached.discard(ws)

    async def close_all(self, code: int = CLOSE_GOING_AWAY) -> None:
        """Close every connection with ``code`` (shutdown) and wait for the closes.

        Sockets still authenticating are closed too (a pending auth-frame read returns at
        once), and nothing is attached afterwards.
        """
        self.shutting_down = True
        for ws in list(self._unattached):
            task = asyncio.ensure_future(_close_quietly(ws, code))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for conn in list(self._conns.values()):
            self.kick(conn, code, "relay shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _close_quietly(ws: Any, code: int) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.close(code=code, message=b"relay shutting down")
