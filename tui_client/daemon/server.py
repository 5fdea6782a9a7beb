# Invariants:
# * The server is an adapter over the CLI's own session (tui_client.cli.session._Session) and
#   the SDK facade; every event notification's params are exactly the record `receive --json` prints
#   (cli.event_output, the one serializer).
# * A bad line never ends the connection or the daemon (protocol.py answers it).
# * Events wait, in order, in one bounded queue (events.py) until a subscriber confirms them:
#   a plain subscriber by draining them, an `ack` subscriber by acknowledging them. A new
#   subscriber gets every event not yet confirmed, so a client that disconnects loses no
#   event it did not acknowledge. Confirmed incoming messages advance `receive`'s cursor
#   (cli-state.json), so a message stored but never confirmed is reported again after a
#   crash.
# * Every wait is bounded: SDK calls by --network-timeout, a subscriber that does not read
#   for that long is disconnected, shutdown ends within about twice that.
# * Nothing written carries keys, passphrases or ciphertext; logs name methods and codes.
"""The ``blindpost daemon`` server: transports, connections, event delivery, shutdown."""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from blindpost_wire.loop import EVENT_LOOPS
from blindpost_wire.loop import running as running_loop
from e2ee.client import ClientOptions
from e2ee.errors import E2EEError
from tui_client import cli
from tui_client.cli import EXIT_BUSY, EXIT_OK, EXIT_USAGE, CliError
from tui_client.cli import session as cli_session
from tui_client.cli.output import json_line
from tui_client.daemon.events import EventQueue
from tui_client.daemon.methods import METHODS
from tui_client.daemon.protocol import (
    APP_ERROR_BASE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOTIFICATION_METHOD,
    PARSE_ERROR,
    LineSplitter,
    Params,
    RpcError,
    TooLong,
    error_response,
    json_line_any,
    rpc_error,
)

__all__ = [
    "DEFAULT_EVENT_BUFFER",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_LINE",
    "Connection",
    "Daemon",
    "DaemonConfig",
    "add_arguments",
    "cmd_daemon",
    "config_from_args",
]

log = logging.getLogger("blindpost.daemon")

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
_GATHER_MAX: Final = 65536  # bytes gathered for one write at most (see _StreamSink)
_DELIVERY_BATCH: Final = 256
_PUMP_POLL: Final = 0.5  # seconds: how soon the pump notices the session was closed
_CURSOR_EVERY: Final = 1.0  # seconds between writes of the receive cursor
# A daemon waits for the relay longer between retries than a one-shot command.
DAEMON_OPTIONS: Final = ClientOptions(backoff_base=0.5, backoff_max=15.0)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Where the daemon listens and its limits (validated by :func:`config_from_args`)."""

    socket_path: Path | None = None
    tcp_port: int | None = None
    event_buffer: int = DEFAULT_EVENT_BUFFER
    max_line: int = DEFAULT_MAX_LINE
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_clients: int = DEFAULT_MAX_CLIENTS
    backup_out: Path | None = None  # scheduled backups: the file, rewritten ...
    backup_every_hours: float = 0.0  # ... when it is this old

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
        "--backup-every",
        type=float,
        metavar="HOURS",
        help="while running, write an encrypted backup to --backup-out whenever it is "
        "HOURS old (at start if missing or older); needs the account's passphrase",
    )
    parser.add_argument(
        "--backup-out", type=Path, metavar="FILE", help="the scheduled backup's file"
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="auto runs on uvloop where it is installed (less CPU per call), else asyncio's "
        "own loop; uvloop requires it [auto]",
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
    every: float | None = args.backup_every
    if (every is None) != (args.backup_out is None):
        raise CliError(EXIT_USAGE, "--backup-every and --backup-out go together")
    if every is not None and not 0 < every <= 24 * 365:
        raise CliError(EXIT_USAGE, "--backup-every must be 0 < HOURS <= 8760")
    return DaemonConfig(
        backup_out=args.backup_out,
        backup_every_hours=every or 0.0,
        socket_path=path,
        tcp_port=port,
        event_buffer=_in_range("--event-buffer", args.event_buffer, _EVENT_BUFFER_RANGE),
        max_line=_in_range("--max-line", args.max_line, _MAX_LINE_RANGE),
        max_inflight=_in_range("--max-inflight", args.max_inflight, _MAX_INFLIGHT_RANGE),
        max_clients=_in_range("--max-clients", args.max_clients, _MAX_CLIENTS_RANGE),
    )


# -- connections -------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


class _StreamSink:
    """A socket or pipe: asyncio's StreamWriter, its writes gathered per loop iteration.

    The answers to calls the relay accepted together are written in the same iteration
    (one "sent" commit settles many calls): they go out in one system call, not one each.
    Order is kept (one buffer), and :meth:`close` writes what is gathered first.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._gathered: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        if not self._gathered:
            asyncio.get_running_loop().call_soon(self._flush)
        self._gathered.append(data)
        self._size += len(data)
        if self._size >= _GATHER_MAX:
            self._flush()  # drain() then sees the transport's real backlog

    def _flush(self) -> None:
        data, self._gathered, self._size = b"".join(self._gathered), [], 0
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._flush()
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
class Connection:
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
            # asyncio.timeout, not wait_for: no task per answer (drain rarely waits).
            async with asyncio.timeout(timeout):
                await self.sink.drain()
        except (OSError, TimeoutError, RuntimeError):
            self.sink.close()


class Daemon:
    """One open account serving JSON-RPC connections and broadcasting its events.

    Args:
        session: the CLI session of the open account (not connected yet).
        config: where to listen and the limits.
    """

    def __init__(self, session: cli_session._Session, config: DaemonConfig) -> None:
        self.session = session
        self.config = config
        self.timeout = session.settings.network_timeout
        self.events = EventQueue(config.event_buffer)
        self.connections: set[Connection] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._exit = EXIT_OK
        self._servers: list[asyncio.Server] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._cursor = 0
        self._cursor_written = 0
        self._cursor_at = 0.0
        self._session_closed = False

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
        cursor = cli_session._read_cursor(folder)
        if cursor is None:
            cursor = await asyncio.to_thread(history.max_seq, "messages")
        self._cursor = self._cursor_written = cursor
        for message in await asyncio.to_thread(cli_session._messages_after, history, cursor):
            self.events.put(await cli.message_output(self.session, message))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("event loop: %s", running_loop())
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
            backups = asyncio.create_task(self._backup_loop())
            self._wake.set()
            await self._stop.wait()
            await backups  # ends at once, or after the backup being written
            await self._shutdown(pump, delivery)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.config.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.config.socket_path.unlink()
        return self._exit

    async def _backup_loop(self) -> None:
        """Scheduled backups (``--backup-every``): rewrite the file whenever it is that old.

        A failed backup is logged (kind only) and tried again after at most five minutes;
        the file is replaced only by a complete new backup.
        """
        out, every = self.config.backup_out, self.config.backup_every_hours * 3600
        passphrase = self.session.settings.passphrase
        if out is None or passphrase is None:
            return
        while not self._stop.is_set():
            try:
                age: float | None = time.time() - out.stat().st_mtime
            except OSError:
                age = None
            due = 0.0 if age is None else max(0.0, every - age)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), due)
                return  # stopping
            try:
                info = await self.session.client.recovery.backup(out, passphrase)
            except E2EEError as exc:
                log.warning("scheduled backup failed: %s", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(every, 300.0))
                continue
            log.info("scheduled backup written: %d bytes", info.size)

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
        with contextlib.suppress(E2EEError, CliError):
            await self.session.flush_outbox()  # delivered receipts for what was stored
        # Closing finishes the delivery in progress; its events are queued before the
        # "closed" state, and the pump, told the session is closed, takes what is left
        # and ends: everything acknowledged to the relay is passed on.
        await self.session.close()
        self._session_closed = True
        with contextlib.suppress(CliError):
            await pump
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
        """Turn SDK events into records, in order, into the event queue.

        Runs until the session was closed and every event it queued was taken.
        """
        try:
            while True:
                if self._session_closed:
                    event = self.session.take_ready()
                    if event is None:
                        return
                else:
                    # What is queued already is taken without a timed wait (two events
                    # per send at 1,000 sends/s: a wait_for each cost a task and a timer).
                    event = self.session.take_ready()
                    if event is None:
                        event = await self.session.next_event(_PUMP_POLL)
                    if event is None:
                        continue
                shown = await cli.event_output(self.session, event)
                if shown is not None:
                    self.events.put(shown)
                    self._wake.set()
        except CliError as exc:  # the connection ended for good (replaced, refused)
            print(f"{cli.PROG}: error: {exc}", file=sys.stderr, flush=True)
            self.stop(exc.code)

    def _subscribers(self) -> list[Connection]:
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
        writes: list[tuple[Connection, int]] = []
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
                self.confirm(upto)
        return True

    def wake(self) -> None:
        """Have the delivery loop look again (a subscriber came, or acknowledged)."""
        self._wake.set()

    def confirm(self, number: int) -> None:
        """Events up to ``number`` were taken by a subscriber: forget them."""
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
        await asyncio.to_thread(cli_session._write_cursor, self.session.settings.data_dir, seq)
        self._cursor_written = seq

    # -- transports --------------------------------------------------------------------

    def _connection(self, name: str, sink: _Sink, *, subscribed: bool) -> Connection:
        connection = Connection(name, sink, subscribed, asyncio.Semaphore(self.config.max_inflight))
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

    async def _serve(self, connection: Connection, chunks: Any) -> None:
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

    async def _start_request(self, connection: Connection, line: bytes | TooLong) -> None:
        await connection.inflight.acquire()
        task = asyncio.create_task(self._request(connection, line))
        connection.tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            connection.tasks.discard(done)
            connection.inflight.release()

        task.add_done_callback(finished)

    # -- requests ----------------------------------------------------------------------

    async def _request(self, connection: Connection, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            error = RpcError(
                INVALID_REQUEST, f"request line longer than --max-line {self.config.max_line} bytes"
            )
            await connection.send(error_response(None, error), self.timeout)
            return
        if not line.strip():
            return
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            error = RpcError(PARSE_ERROR, f"parse error: {type(exc).__name__}")
            await connection.send(error_response(None, error), self.timeout)
            return
        if isinstance(value, list):
            if not value:
                error = RpcError(INVALID_REQUEST, "an empty batch")
                await connection.send(error_response(None, error), self.timeout)
                return
            answers = await asyncio.gather(*(self._call(connection, v) for v in value))
            batch = [a for a in answers if a is not None]
            if batch:
                await connection.send(batch, self.timeout)
            return
        answer = await self._call(connection, value)
        if answer is not None:
            await connection.send(answer, self.timeout)

    async def _call(self, connection: Connection, request: Any) -> dict[str, Any] | None:
        """Run one request; its response (None for a notification)."""
        if not isinstance(request, dict):
            return error_response(None, RpcError(INVALID_REQUEST, "a request is a JSON object"))
        request_id = request.get("id")
        notification = "id" not in request
        if not isinstance(request_id, str | int | None) or isinstance(request_id, bool):
            return error_response(
                None, RpcError(INVALID_REQUEST, "id must be a string, an integer or null")
            )
        method = request.get("method")
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return error_response(
                request_id, RpcError(INVALID_REQUEST, 'need "jsonrpc": "2.0" and a method name')
            )
        unknown = set(request) - {"jsonrpc", "method", "params", "id"}
        if unknown:
            return error_response(
                request_id,
                RpcError(INVALID_REQUEST, f"unknown member(s): {', '.join(sorted(unknown))}"),
            )
        handler = METHODS.get(method)
        began = time.monotonic()
        try:
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}")
            params = request.get("params", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)")
            result = await handler(self, connection, Params(params))
        except asyncio.CancelledError:
            raise
        except (RpcError, CliError, E2EEError, OSError) as exc:
            error = rpc_error(exc)
            log.info("%s failed: %s", method, error.code)
            return None if notification else error_response(request_id, error)
        except Exception:
            log.exception("%s failed unexpectedly", method)
            error = RpcError(INTERNAL_ERROR, "internal error (see the daemon's log)")
            return None if notification else error_response(request_id, error)
        log.debug("%s took %.1f ms", method, (time.monotonic() - began) * 1000)
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


# -- the command -------------------------------------------------------------------------


async def cmd_daemon(settings: cli_session._Settings, args: argparse.Namespace) -> int:
    """``blindpost daemon``: open the account and serve until told to stop.

    Returns:
        0 after a clean shutdown; the CLI's exit status when the relay connection ended
        for good (another program took over this device: 10; refused: 9).

    Raises:
        CliError: bad options, no account, a socket path in use.
    """
    config = config_from_args(args)
    if config.backup_out is not None and settings.passphrase is None:
        raise CliError(
            cli.EXIT_PASSPHRASE,
            "scheduled backups need the account's passphrase (--passphrase-file or "
            "$BLINDPOST_PASSPHRASE)",
        )
    async with cli_session._account(settings, connect=False, options=DAEMON_OPTIONS) as session:
        return await Daemon(session, config).run()
