# Invariants:
# * `blindpost daemon` is an adapter over the CLI's own session (tui_client.cli._Session) and
#   the SDK facade: every method is a CLI command under the CLI's name, every event
#   notification's params are exactly the record `receive --json` prints (cli.event_output,
#   the one serializer), and errors carry the CLI's exit status.
# * The wire is JSON-RPC 2.0, one JSON value per line each way (UTF-8, "\n"). A bad line (not
#   JSON, not UTF-8, too long, not a request, unknown method, bad params) gets an error
#   response (none for a notification) and never ends the connection or the daemon.
# * An event is delivered once it was written to, and drained by, at least one subscribed
#   connection. Until then it waits, in order, in one bounded in-memory queue
#   (--event-buffer; past it the oldest are dropped and counted on stderr). Incoming
#   messages delivered advance the `receive` cursor (cli-state.json), so a message the
#   daemon stored but never delivered is reported at the next `receive` or daemon start.
# * Every wait is bounded: SDK calls by --network-timeout, a subscriber that does not
#   read for that long is disconnected, shutdown ends within about twice that.
# * Nothing written carries keys, passphrases or ciphertext; logs name methods and sizes.
"""``blindpost daemon``: the account kept open behind JSON-RPC 2.0 for bots."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from e2ee.client import ClientOptions
from e2ee.client_errors import IdentityHeld
from e2ee.errors import E2EEError, UsageError
from tui_client import cli
from tui_client.cli import (
    EXIT_BUSY,
    EXIT_HELD,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    EventOutput,
)
from tui_client.cli_output import AttachmentInfo, json_line

__all__ = [
    "APP_ERROR_BASE",
    "DEFAULT_EVENT_BUFFER",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_LINE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "DaemonConfig",
    "EventQueue",
    "LineSplitter",
    "add_arguments",
    "cmd_daemon",
]

log = logging.getLogger("blindpost.daemon")

# -- JSON-RPC error codes (public: docs/cli.md) ------------------------------------------

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: An SDK or CLI error: code = APP_ERROR_BASE + the CLI's exit status (1003 unreachable...).
APP_ERROR_BASE: Final = 1000

# -- limits (public: docs/cli.md, `blindpost daemon --help`) -----------------------------

DEFAULT_EVENT_BUFFER: Final = 10_000
DEFAULT_MAX_LINE: Final = 1 << 20
DEFAULT_MAX_INFLIGHT: Final = 256
DEFAULT_MAX_CLIENTS: Final = 64
_EVENT_BUFFER_RANGE: Final = (1, 1_000_000)
_MAX_LINE_RANGE: Final = (1024, 64 << 20)
_MAX_INFLIGHT_RANGE: Final = (1, 100_000)
_MAX_CLIENTS_RANGE: Final = (1, 10_000)
_READ_CHUNK: Final = 65536
_DELIVERY_BATCH: Final = 256
_CURSOR_EVERY: Final = 1.0  # seconds between writes of the receive cursor
# A daemon waits for the relay longer between retries than a one-shot command.
_DAEMON_OPTIONS: Final = ClientOptions(backoff_base=0.5, backoff_max=15.0)
NOTIFICATION_METHOD: Final = "receive"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Where the daemon listens and its limits (validated by :func:`config_from_args`)."""

    socket_path: Path | None = None
    tcp_port: int | None = None
    event_buffer: int = DEFAULT_EVENT_BUFFER
    max_line: int = DEFAULT_MAX_LINE
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_clients: int = DEFAULT_MAX_CLIENTS

    @property
    def stdio(self) -> bool:
        return self.socket_path is None and self.tcp_port is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``blindpost daemon`` (on its subparser)."""
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="listen on this Unix socket (mode 0600) instead of stdin/stdout",
    )
    parser.add_argument(
        "--tcp",
        type=int,
        metavar="PORT",
        help="listen on 127.0.0.1:PORT (loopback only, no authentication: any local user "
        "can use the account; prefer --socket). 0 picks a free port",
    )
    parser.add_argument(
        "--event-buffer",
        type=int,
        default=DEFAULT_EVENT_BUFFER,
        metavar="N",
        help="events kept until a subscriber confirms them (and the most sent to an 'ack' "
        "subscriber unacknowledged); past it the oldest are dropped "
        f"({_EVENT_BUFFER_RANGE[0]}..{_EVENT_BUFFER_RANGE[1]}) [{DEFAULT_EVENT_BUFFER}]",
    )
    parser.add_argument(
        "--max-line",
        type=int,
        default=DEFAULT_MAX_LINE,
        metavar="BYTES",
        help="longest request line; a longer one gets an error "
        f"({_MAX_LINE_RANGE[0]}..{_MAX_LINE_RANGE[1]}) [{DEFAULT_MAX_LINE}]",
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        metavar="N",
        help="requests of one connection running at once; more wait unread "
        f"({_MAX_INFLIGHT_RANGE[0]}..{_MAX_INFLIGHT_RANGE[1]}) [{DEFAULT_MAX_INFLIGHT}]",
    )
    parser.add_argument(
        "--max-clients",
        type=int,
        default=DEFAULT_MAX_CLIENTS,
        metavar="N",
        help="socket connections at once; one more is told so and closed "
        f"({_MAX_CLIENTS_RANGE[0]}..{_MAX_CLIENTS_RANGE[1]}) [{DEFAULT_MAX_CLIENTS}]",
    )


def _in_range(name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise CliError(EXIT_USAGE, f"{name} must be between {low} and {high}")
    return value


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """Validate the daemon's options.

    Raises:
        CliError: a value out of range, or a socket path too long (2).
    """
    path: Path | None = args.socket
    if path is not None and len(os.fsencode(path)) > 100:
        raise CliError(EXIT_USAGE, f"--socket path too long for a Unix socket: {path}")
    port: int | None = args.tcp
    if port is not None:
        _in_range("--tcp", port, (0, 65535))
    return DaemonConfig(
        socket_path=path,
        tcp_port=port,
        event_buffer=_in_range("--event-buffer", args.event_buffer, _EVENT_BUFFER_RANGE),
        max_line=_in_range("--max-line", args.max_line, _MAX_LINE_RANGE),
        max_inflight=_in_range("--max-inflight", args.max_inflight, _MAX_INFLIGHT_RANGE),
        max_clients=_in_range("--max-clients", args.max_clients, _MAX_CLIENTS_RANGE),
    )


# -- framing -----------------------------------------------------------------------------


class TooLong:
    """Marker for a line longer than the limit (it is skipped up to its newline)."""


TOO_LONG: Final = TooLong()


class LineSplitter:
    """Bytes in, complete lines out; a line over ``max_line`` bytes becomes :data:`TOO_LONG`.

    Args:
        max_line: the longest line accepted, without its newline.
    """

    def __init__(self, max_line: int) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | TooLong]:
        """The lines ``chunk`` completes (at EOF, pass ``b""`` to get an unterminated last one)."""
        out: list[bytes | TooLong] = []
        if not chunk:
            if self._buf and not self._skipping:
                out.append(bytes(self._buf))
            self._buf.clear()
            return out
        self._buf += chunk
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if not self._skipping and len(self._buf) > self._max:
                    out.append(TOO_LONG)
                    self._skipping = True
                if self._skipping:
                    self._buf.clear()
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > self._max:
                out.append(TOO_LONG)
            else:
                out.append(line)


# -- the event queue ---------------------------------------------------------------------


class EventQueue:
    """Events not yet delivered, numbered 1, 2, ... in order; at ``limit`` the oldest drop.

    An event leaves the queue once a subscriber confirmed it (:meth:`confirm`):
    drained by a plain subscriber, acknowledged by one that subscribed with ``ack``.

    Args:
        limit: how many events it holds at most.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[tuple[int, EventOutput]] = deque()
        self._next = 1
        #: Every event numbered up to this was confirmed by some subscriber.
        self.done = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last(self) -> int:
        """The number of the newest event put (0: none yet)."""
        return self._next - 1

    def put(self, item: EventOutput) -> None:
        """Queue an event, dropping (and counting) the oldest when full."""
        if len(self._items) >= self.limit:
            number, _ = self._items.popleft()
            self.done = max(self.done, number)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                print(
                    f"{cli.PROG}: warning: {self.dropped} event(s) dropped: more than "
                    f"--event-buffer {self.limit} waiting for a subscriber "
                    "(messages stay in history)",
                    file=sys.stderr,
                    flush=True,
                )
        self._items.append((self._next, item))
        self._next += 1

    def after(self, number: int, count: int) -> list[tuple[int, EventOutput]]:
        """Up to ``count`` queued events numbered above ``number``, oldest first."""
        if not self._items or count <= 0:
            return []
        first = self._items[0][0]
        start = max(number + 1 - first, 0)
        return [self._items[i] for i in range(start, min(start + count, len(self._items)))]

    def confirm(self, number: int) -> list[EventOutput]:
        """Events up to ``number`` were delivered: forget them and return them."""
        gone = []
        while self._items and self._items[0][0] <= number:
            gone.append(self._items.popleft()[1])
        self.done = max(self.done, number)
        return gone


# -- connections -------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


class _StreamSink:
    """A socket or pipe: asyncio's StreamWriter."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()


class _FileSink:
    """Standard output that is a file or a terminal: plain blocking writes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._closed = True

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("standard output is closed")

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True


@dataclass(eq=False)
class _Connection:
    name: str
    sink: _Sink
    subscribed: bool
    inflight: asyncio.Semaphore
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Subscribed with ``ack``: events count as delivered only once acknowledged.
    ack: bool = False
    #: The number of the last event written to this connection.
    written: int = 0
    #: Event numbers written but not acknowledged yet (``ack`` subscribers).
    unacked: deque[int] = field(default_factory=deque)
    #: Notifications acknowledged since ``subscribe`` (what ``ack`` counts).
    acked: int = 0

    def subscribe(self, *, ack: bool, after: int) -> None:
        self.subscribed, self.ack, self.written = True, ack, after
        self.unacked.clear()
        self.acked = 0

    async def send(
        self, message: Mapping[str, Any] | Sequence[Mapping[str, Any]], timeout: float
    ) -> None:
        self.sink.write((json_line_any(message) + "\n").encode("utf-8"))
        try:
            await asyncio.wait_for(self.sink.drain(), timeout)
        except (OSError, TimeoutError, RuntimeError):
            self.sink.close()


def json_line_any(value: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A JSON-RPC message (or batch) on one line, escaped as the CLI's records are."""
    if isinstance(value, Mapping):
        return json_line(value)
    return "[" + ",".join(json_line(v) for v in value) + "]"


# -- errors ------------------------------------------------------------------------------


class RpcError(Exception):
    """An error response: JSON-RPC ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = dict(data) if data is not None else None

    def error_object(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.data is not None:
            error["data"] = self.data
        return error


def _rpc_error(exc: BaseException) -> RpcError:
    """The error response for an exception of the CLI or SDK (the exit-status mapping)."""
    if isinstance(exc, RpcError):
        return exc
    status, message = cli._classify(exc)
    message = " ".join(message.split())
    data: dict[str, Any] = {"exit_status": status, "error": type(exc).__name__}
    for attribute in ("user", "message_id", "group_id"):
        value = getattr(exc, attribute, None)
        if isinstance(value, str):
            data[attribute] = value
    if status == EXIT_USAGE:
        return RpcError(INVALID_PARAMS, message, data)
    return RpcError(APP_ERROR_BASE + status, message, data)


# -- parameters --------------------------------------------------------------------------


class _Params:
    """Named parameters of one call; anything unknown or mistyped is -32602."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)
        self._seen: set[str] = set()

    def _get(self, name: str, kinds: tuple[type, ...], what: str, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._raw or self._raw[name] is None:
            if required:
                raise RpcError(INVALID_PARAMS, f"missing parameter {name!r} ({what})")
            return None
        value = self._raw[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise RpcError(INVALID_PARAMS, f"parameter {name!r} must be {what}")
        return value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value: str | None = self._get(name, (str,), "a string", required)
        return value

    def required_text(self, name: str) -> str:
        value = self.text(name, required=True)
        assert value is not None
        return value

    def integer(self, name: str, default: int) -> int:
        value: int | None = self._get(name, (int,), "an integer", False)
        return default if value is None else value

    def flag(self, name: str) -> bool:
        value: bool | None = self._get(name, (bool,), "true or false", False)
        return bool(value)

    def strings(self, name: str) -> list[str]:
        value: list[Any] = self._get(name, (list,), "a list of strings", True)
        if not all(isinstance(v, str) for v in value):
            raise RpcError(INVALID_PARAMS, f"parameter {name!r} must be a list of strings")
        return list(value)

    def chat(self, *, required: bool = True) -> cli._Target | None:
        """``to`` (or ``user``) naming a user, or ``group``: exactly one."""
        to = self.text("to")
        user = self.text("user")
        group = self.text("group")
        if to is not None and user is not None:
            raise RpcError(INVALID_PARAMS, "give 'to' or 'user', not both")
        who = to if to is not None else user
        if who is None and group is None and not required:
            return None
        if (who is None) == (group is None):
            raise RpcError(INVALID_PARAMS, "name either a user ('to' or 'user') or a 'group'")
        return cli._target(group, who)

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            raise RpcError(INVALID_PARAMS, f"unknown parameter(s): {', '.join(unknown)}")


# -- the daemon --------------------------------------------------------------------------

_Handler = Callable[["Daemon", _Connection, _Params], Awaitable[Any]]
_METHODS: dict[str, _Handler] = {}


def _method(name: str) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        _METHODS[name] = handler
        return handler

    return register


class Daemon:
    """One open account serving JSON-RPC connections and broadcasting its events.

    Args:
        session: the CLI session of the open account (not connected yet).
        config: where to listen and the limits.
    """

    def __init__(self, session: cli._Session, config: DaemonConfig) -> None:
        self.session = session
        self.config = config
        self.timeout = session.settings.network_timeout
        self.events = EventQueue(config.event_buffer)
        self.connections: set[_Connection] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._exit = EXIT_OK
        self._servers: list[asyncio.Server] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._cursor = 0
        self._cursor_written = 0
        self._cursor_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self, code: int = EXIT_OK) -> None:
        """Begin a clean shutdown (signals, stdin EOF, a fatal connection state)."""
        if not self._stop.is_set():
            self._exit = code
            self._stop.set()

    async def run(self) -> int:
        """Serve until stopped; return the exit status."""
        loop = asyncio.get_running_loop()
        folder = self.session.settings.data_dir
        history = self.session.history
        cursor = cli._read_cursor(folder)
        if cursor is None:
            cursor = await asyncio.to_thread(history.max_seq, "messages")
        self._cursor = self._cursor_written = cursor
        for message in await asyncio.to_thread(cli._messages_after, history, cursor):
            self.events.put(await cli.message_output(self.session, message))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            if self.config.stdio:
                await self._open_stdio()
            if self.config.socket_path is not None:
                await self._listen_unix(self.config.socket_path)
            if self.config.tcp_port is not None:
                await self._listen_tcp(self.config.tcp_port)
            await self.session.client.start(receive=True)
            pump = asyncio.create_task(self._pump())
            delivery = asyncio.create_task(self._deliver_loop())
            self._wake.set()
            await self._stop.wait()
            await self._shutdown(pump, delivery)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.config.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.config.socket_path.unlink()
        return self._exit

    async def _shutdown(self, pump: asyncio.Task[None], delivery: asyncio.Task[None]) -> None:
        for server in self._servers:
            server.close()
        for reader in list(self._readers):
            reader.cancel()
        requests = [t for c in self.connections for t in c.tasks]
        if requests:
            _, late = await asyncio.wait(requests, timeout=self.timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, CliError):
            await pump
        with contextlib.suppress(E2EEError, CliError):
            await self.session.flush_outbox()  # delivered receipts for what was stored
        # Closing finishes the delivery in progress; its events are queued before the
        # "closed" state, so everything acknowledged to the relay is passed on here.
        await self.session.close()
        while (event := self.session.take_ready()) is not None:
            shown = await cli.event_output(self.session, event)
            if shown is not None:
                self.events.put(shown)
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        while await self._deliver_round():
            pass
        await self._write_cursor(force=True)
        for connection in list(self.connections):
            connection.sink.close()
        for reader in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # -- events ------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Turn SDK events into records, in order, into the event queue."""
        try:
            while True:
                event = await self.session.next_event(3600.0)
                if event is None:
                    continue
                shown = await cli.event_output(self.session, event)
                if shown is not None:
                    self.events.put(shown)
                    self._wake.set()
        except CliError as exc:  # the connection ended for good (replaced, refused)
            print(f"{cli.PROG}: error: {exc}", file=sys.stderr, flush=True)
            self.stop(exc.code)

    def _subscribers(self) -> list[_Connection]:
        return [c for c in self.connections if c.subscribed and not c.sink.is_closing()]

    async def _deliver_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _CURSOR_EVERY)
            self._wake.clear()
            while await self._deliver_round():
                pass
            await self._write_cursor(force=False)

    async def _deliver_round(self) -> bool:
        """Write each subscriber the queued events it has not had; True if any was written.

        A plain subscriber confirms what it drained; an ``ack`` subscriber gets at most
        --event-buffer unacknowledged events and confirms with the ``ack`` method. A
        subscriber that does not drain within the network timeout is disconnected;
        what it did not confirm stays queued for the others and the next one.
        """
        writes: list[tuple[_Connection, int]] = []
        for connection in self._subscribers():
            room = _DELIVERY_BATCH
            if connection.ack:
                room = min(room, self.events.limit - len(connection.unacked))
            start = max(connection.written, self.events.done)
            batch = self.events.after(start, room)
            if not batch:
                continue
            connection.sink.write(
                "".join(
                    json_line({"jsonrpc": "2.0", "method": NOTIFICATION_METHOD, "params": e.record})
                    + "\n"
                    for _, e in batch
                ).encode("utf-8")
            )
            connection.written = batch[-1][0]
            if connection.ack:
                connection.unacked.extend(number for number, _ in batch)
            writes.append((connection, connection.written))
        if not writes:
            return False
        results = await asyncio.gather(
            *(asyncio.wait_for(c.sink.drain(), self.timeout) for c, _ in writes),
            return_exceptions=True,
        )
        for (connection, upto), result in zip(writes, results, strict=True):
            if isinstance(result, BaseException):
                log.info("subscriber %s did not take events; disconnected", connection.name)
                connection.sink.close()
            elif not connection.ack:
                self._confirm(upto)
        return True

    def _confirm(self, number: int) -> None:
        for item in self.events.confirm(number):
            self._cursor = max(self._cursor, item.seq)

    async def _write_cursor(self, *, force: bool) -> None:
        now = time.monotonic()
        if self._cursor == self._cursor_written:
            return
        if not force and now - self._cursor_at < _CURSOR_EVERY:
            return  # the delivery loop comes back within _CURSOR_EVERY
        self._cursor_at = now
        seq = self._cursor
        await asyncio.to_thread(cli._write_cursor, self.session.settings.data_dir, seq)
        self._cursor_written = seq

    # -- transports --------------------------------------------------------------------

    def _connection(self, name: str, sink: _Sink, *, subscribed: bool) -> _Connection:
        connection = _Connection(
            name, sink, subscribed, asyncio.Semaphore(self.config.max_inflight)
        )
        self.connections.add(connection)
        if subscribed:
            self._wake.set()
        return connection

    async def _open_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        mode = os.fstat(1).st_mode
        sink: _Sink
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            pipe = os.fdopen(os.dup(1), "wb", buffering=0)
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, pipe
            )
            sink = _StreamSink(asyncio.StreamWriter(transport, protocol, None, loop))
        else:
            sink = _FileSink(1)
        connection = self._connection("stdio", sink, subscribed=True)
        chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

        def read_stdin() -> None:
            while True:
                try:
                    chunk = os.read(0, _READ_CHUNK)
                except OSError:
                    chunk = b""
                future = asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop)
                try:
                    future.result()
                except (RuntimeError, asyncio.CancelledError):
                    return  # the loop is gone
                if not chunk:
                    return

        threading.Thread(target=read_stdin, name="blindpost-stdin", daemon=True).start()

        async def stdin_chunks() -> Any:
            while chunk := await chunks.get():
                yield chunk

        async def serve() -> None:
            await self._serve(connection, stdin_chunks())
            self.stop()  # stdin EOF

        self._spawn_reader(serve())

    def _spawn_reader(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _listen_unix(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise CliError(EXIT_USAGE, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a socket left behind by a daemon that died
            else:
                raise CliError(EXIT_BUSY, f"another program listens on {path}")
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._accept, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append(server)
        print(f"{cli.PROG}: listening on unix:{path}", file=sys.stderr, flush=True)

    async def _listen_tcp(self, port: int) -> None:
        server = await asyncio.start_server(self._accept, host="127.0.0.1", port=port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        print(f"{cli.PROG}: listening on tcp:127.0.0.1:{bound}", file=sys.stderr, flush=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = _StreamSink(writer)
        if self._stop.is_set():
            sink.close()
            return
        sockets = sum(1 for c in self.connections if c.name != "stdio")
        if sockets >= self.config.max_clients:
            refusal = RpcError(
                APP_ERROR_BASE + EXIT_BUSY,
                f"too many clients (--max-clients {self.config.max_clients})",
            )
            sink.write(
                (
                    json_line({"jsonrpc": "2.0", "id": None, "error": refusal.error_object()})
                    + "\n"
                ).encode()
            )
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(sink.drain(), self.timeout)
            sink.close()
            return
        connection = self._connection(f"socket-{id(writer):x}", sink, subscribed=False)

        async def chunks() -> Any:
            while True:
                try:
                    chunk = await reader.read(_READ_CHUNK)
                except OSError:
                    return
                if not chunk:
                    return
                yield chunk

        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        try:
            await self._serve(connection, chunks())
        finally:
            if task is not None:
                self._readers.discard(task)

    async def _serve(self, connection: _Connection, chunks: Any) -> None:
        """Read requests until EOF; run each as a task (at most --max-inflight at once)."""
        splitter = LineSplitter(self.config.max_line)
        try:
            async for chunk in chunks:
                for line in splitter.feed(chunk):
                    await self._start_request(connection, line)
            for line in splitter.feed(b""):
                await self._start_request(connection, line)
            # EOF: answer what was asked before going away.
            if connection.tasks:
                await asyncio.wait(set(connection.tasks), timeout=self.timeout)
        finally:
            # At shutdown the connection stays: the answers to the requests still
            # running and the last events go out before _shutdown closes it.
            if connection.name != "stdio" and not self._stop.is_set():
                connection.subscribed = False
                self.connections.discard(connection)
                connection.sink.close()

    async def _start_request(self, connection: _Connection, line: bytes | TooLong) -> None:
        await connection.inflight.acquire()
        task = asyncio.create_task(self._request(connection, line))
        connection.tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            connection.tasks.discard(done)
            connection.inflight.release()

        task.add_done_callback(finished)

    # -- requests ----------------------------------------------------------------------

    async def _request(self, connection: _Connection, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            error = RpcError(
                INVALID_REQUEST, f"request line longer than --max-line {self.config.max_line} bytes"
            )
            await connection.send(_error_response(None, error), self.timeout)
            return
        if not line.strip():
            return
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            error = RpcError(PARSE_ERROR, f"parse error: {type(exc).__name__}")
            await connection.send(_error_response(None, error), self.timeout)
            return
        if isinstance(value, list):
            if not value:
                error = RpcError(INVALID_REQUEST, "an empty batch")
                await connection.send(_error_response(None, error), self.timeout)
                return
            answers = await asyncio.gather(*(self._call(connection, v) for v in value))
            batch = [a for a in answers if a is not None]
            if batch:
                await connection.send(batch, self.timeout)
            return
        answer = await self._call(connection, value)
        if answer is not None:
            await connection.send(answer, self.timeout)

    async def _call(self, connection: _Connection, request: Any) -> dict[str, Any] | None:
        """Run one request; its response (None for a notification)."""
        if not isinstance(request, dict):
            return _error_response(None, RpcError(INVALID_REQUEST, "a request is a JSON object"))
        request_id = request.get("id")
        notification = "id" not in request
        if not isinstance(request_id, str | int | None) or isinstance(request_id, bool):
            return _error_response(
                None, RpcError(INVALID_REQUEST, "id must be a string, an integer or null")
            )
        method = request.get("method")
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error_response(
                request_id, RpcError(INVALID_REQUEST, 'need "jsonrpc": "2.0" and a method name')
            )
        unknown = set(request) - {"jsonrpc", "method", "params", "id"}
        if unknown:
            return _error_response(
                request_id,
                RpcError(INVALID_REQUEST, f"unknown member(s): {', '.join(sorted(unknown))}"),
            )
        handler = _METHODS.get(method)
        began = time.monotonic()
        try:
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}")
            params = request.get("params", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)")
            result = await handler(self, connection, _Params(params))
        except asyncio.CancelledError:
            raise
        except (RpcError, CliError, E2EEError, OSError) as exc:
            error = _rpc_error(exc)
            log.info("%s failed: %s", method, error.code)
            return None if notification else _error_response(request_id, error)
        except Exception:
            log.exception("%s failed unexpectedly", method)
            error = RpcError(INTERNAL_ERROR, "internal error (see the daemon's log)")
            return None if notification else _error_response(request_id, error)
        log.debug("%s took %.1f ms", method, (time.monotonic() - began) * 1000)
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error_response(request_id: str | int | None, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.error_object()}


# -- methods: one per CLI command, under its name ------------------------------------------


def _records(rows: Sequence[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    return [record for record, _human in rows]


@_method("subscribe")
async def _subscribe(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    ack = params.flag("ack")
    params.done()
    connection.subscribe(ack=ack, after=daemon.events.done)
    daemon._wake.set()
    return {"subscribed": True, "ack": ack}


@_method("unsubscribe")
async def _unsubscribe(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    params.done()
    connection.subscribed = False
    return {"subscribed": False}


@_method("ack")
async def _ack(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    count = params.integer("count", -1)
    params.done()
    if count == -1:
        raise RpcError(INVALID_PARAMS, "missing parameter 'count' (an integer)")
    if not (connection.subscribed and connection.ack):
        raise RpcError(INVALID_PARAMS, "not subscribed with ack")
    more = count - connection.acked
    if count < 0 or more < 0 or more > len(connection.unacked):
        raise RpcError(
            INVALID_PARAMS,
            f"count must be between {connection.acked} and "
            f"{connection.acked + len(connection.unacked)} (notifications received)",
        )
    number = daemon.events.done
    for _ in range(more):
        number = connection.unacked.popleft()
    connection.acked = count
    if more:
        daemon._confirm(number)
        daemon._wake.set()
    return {"acknowledged": count}


async def _held(daemon: Daemon, target: cli._Target, exc: IdentityHeld) -> RpcError:
    error = await daemon.session.held_error(target.chat_id, exc)
    data: dict[str, Any] = {"exit_status": EXIT_HELD, "error": "IdentityHeld", "user": exc.user}
    if exc.message_id:
        data["message_id"] = exc.message_id
    return RpcError(APP_ERROR_BASE + EXIT_HELD, " ".join(str(error).split()), data)


@_method("send")
async def _send(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    target = params.chat()
    text = params.required_text("text")
    reply_to = params.text("reply_to")
    params.done()
    assert target is not None
    if not text:
        raise RpcError(INVALID_PARAMS, "the message text is empty")
    session = daemon.session
    if target.group:
        await cli._find_group(session, target.group)
    quote = None if reply_to is None else cli._message_id(reply_to)
    try:
        mid = await session.bounded(
            session.client.send_text(target.to, text, reply_to=quote),
            "the relay to accept the message",
        )
    except IdentityHeld as exc:
        raise await _held(daemon, target, exc) from None
    return {"id": mid}


@_method("send-file")
async def _send_file(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    target = params.chat()
    path = Path(params.required_text("path"))
    caption = params.text("caption") or ""
    mime = params.text("mime")
    params.done()
    assert target is not None
    if not path.is_file():
        raise CliError(EXIT_NOT_FOUND, f"no such file: {path}")
    session = daemon.session
    if target.group:
        await cli._find_group(session, target.group)
    activity = cli._Activity()
    try:
        mid = await session.bounded(
            session.client.send_file(
                target.to, path, mime_type=mime, caption=caption, progress=activity
            ),
            "the relay to accept the file",
            activity=activity,
        )
    except IdentityHeld as exc:
        raise await _held(daemon, target, exc) from None
    return {"id": mid}


@_method("download")
async def _download(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    mid = cli._message_id(params.required_text("id"))
    out = Path(params.required_text("out"))
    force = params.flag("force")
    params.done()
    session = daemon.session
    found = await asyncio.to_thread(session.history.attachment_info, mid)
    if found is None or not found.available:
        what = "has no file" if found is None else "no longer has its file (deleted)"
        raise CliError(EXIT_NOT_FOUND, f"message {mid} {what} (or is not in history)")
    info = AttachmentInfo(mid, found.file_name, found.size, found.mime_type)
    if out.is_dir():
        out = out / cli._safe_file_name(info.name, mid)
    if out.exists() and not force:
        raise CliError(cli.EXIT_ERROR, f"{out} exists (use force to replace it)")
    activity = cli._Activity()
    try:
        await session.bounded(
            session.client.download_attachment(mid, out, progress=activity),
            "the file download",
            activity=activity,
        )
    except UsageError as exc:
        raise CliError(EXIT_NOT_FOUND, f"message {mid}: {exc}") from None
    return {
        "type": "download",
        "id": mid,
        "path": str(out),
        "size": out.stat().st_size,
        "name": info.name,
        "mime": info.mime,
    }


@_method("read")
async def _read(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    target = params.chat()
    params.done()
    assert target is not None
    session = daemon.session
    if target.group:
        await cli._find_group(session, target.group)
    count = await session.client.mark_read(target.chat_id)
    queued = await session.flush_outbox() if count else 0
    return {"type": "read", "chat": target.chat_id, "marked": count, "queued": queued}


@_method("history")
async def _history(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    target = params.chat()
    limit = params.integer("limit", 50)
    before = params.text("before")
    after = params.text("after")
    params.done()
    assert target is not None
    if before is not None and after is not None:
        raise RpcError(INVALID_PARAMS, "give at most one of 'before' and 'after'")
    rows = await cli.history_page(daemon.session, target, limit=limit, before=before, after=after)
    return _records(rows)


@_method("search")
async def _search(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    text = params.required_text("text")
    target = params.chat(required=False)
    limit = params.integer("limit", 50)
    before = params.text("before")
    params.done()
    rows = await cli.search_page(daemon.session, text, target=target, limit=limit, before=before)
    return _records(rows)


@_method("group")
async def _group(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    action = params.required_text("action")
    session = daemon.session
    client = session.client
    if action == "list":
        params.done()
        return [cli._group_record(g) for g in await client.groups()]
    if action == "create":
        name = params.required_text("name")
        members = [cli._username(m) for m in params.strings("members")]
        params.done()
        if not name.strip() or not members:
            raise RpcError(INVALID_PARAMS, "a group needs a name and at least one member")
        try:
            gid = await session.bounded(
                client.create_group(name, members), "the relay to accept the group"
            )
        except IdentityHeld as exc:
            raise _held_group(exc, "the group is created but") from None
        record = cli._group_record(await cli._find_group(session, gid))
        return record | {"type": "group", "action": "create", "by": client.username}
    if action not in ("add", "remove", "leave"):
        raise RpcError(INVALID_PARAMS, "action must be create, add, remove, leave or list")
    gid = cli._group_id(params.required_text("group"))
    user = cli._username(params.required_text("user")) if action != "leave" else None
    params.done()
    await cli._find_group(session, gid)
    if action == "add":
        assert user is not None
        work: Awaitable[None] = client.add_member(gid, user)
    elif action == "remove":
        assert user is not None
        work = client.remove_member(gid, user)
    else:
        work = client.leave_group(gid)
    try:
        await session.bounded(work, "the relay to accept the group change")
    except IdentityHeld as exc:
        raise _held_group(exc, "the change is queued;") from None
    record = cli._group_record(await cli._find_group(session, gid))
    return record | {"type": "group", "action": action, "by": client.username}


def _held_group(exc: IdentityHeld, what: str) -> RpcError:
    return RpcError(
        APP_ERROR_BASE + EXIT_HELD,
        f"the identity key of {exc.user} changed: {what} {exc.user} is told only after "
        f"'trust' {exc.user}",
        {"exit_status": EXIT_HELD, "error": "IdentityHeld", "user": exc.user},
    )


@_method("safety-number")
async def _safety_number(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    user = cli._username(params.required_text("user"))
    params.done()
    client = daemon.session.client
    levels = await cli._known_levels(daemon.session, user)
    return [
        {
            "type": "safety_number",
            "user": user,
            "device": device,
            "digits": number.digits,
            "trust": levels.get(device, "none"),
            "scannable": base64.b64encode(number.scannable).decode("ascii"),
        }
        for device, number in await client.safety_number(user)
    ]


async def _accept(daemon: Daemon, params: _Params, *, verified: bool) -> Any:
    user = cli._username(params.required_text("user"))
    params.done()
    session = daemon.session
    client = session.client
    before = cli._overall_trust(await cli._known_levels(session, user))
    if not verified and before != "untrusted":
        return {"type": "trust", "user": user, "trust": before, "changed": False, "sent": 0}
    queued = len(await asyncio.to_thread(session.history.pending_outbox))
    await client.accept_identity(user, verified=verified)
    after = cli._overall_trust(await client.trust_level(user))
    still = await session.flush_outbox() if queued else 0
    return {
        "type": "trust",
        "user": user,
        "trust": after,
        "changed": True,
        "sent": max(queued - still, 0),
        "queued": still,
    }


@_method("trust")
async def _trust(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    return await _accept(daemon, params, verified=False)


@_method("verify")
async def _verify(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    return await _accept(daemon, params, verified=True)


@_method("contacts")
async def _contacts(daemon: Daemon, connection: _Connection, params: _Params) -> Any:
    params.done()
    contacts = await daemon.session.client.contacts()
    return [
        {
            "type": "contact",
            "user": user,
            "trust": cli._overall_trust(levels),
            "devices": {str(d): t for d, t in sorted(levels.items())},
        }
        for user, levels in sorted(contacts.items())
    ]


# -- the command -------------------------------------------------------------------------


async def cmd_daemon(settings: cli._Settings, args: argparse.Namespace) -> int:
    """``blindpost daemon``: open the account and serve until told to stop.

    Returns:
        0 after a clean shutdown; the CLI's exit status when the relay connection ended
        for good (another program took over this device: 10; refused: 9).

    Raises:
        CliError: bad options, no account, a socket path in use.
    """
    config = config_from_args(args)
    async with cli._account(settings, connect=False, options=_DAEMON_OPTIONS) as session:
        return await Daemon(session, config).run()
