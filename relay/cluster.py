# Invariants (docs/architecture.md, "Scale-out"):
# * workers=1 never reaches this module: relay.__main__ runs relay.server.serve directly.
# * The supervisor binds the listening socket once and forks every worker from a process that
#   has no threads and no event loop; a worker inherits the socket and serves it with its own
#   loop, store connections and hub. The supervisor forwards SIGTERM/SIGINT, restarts a crashed
#   worker after a bounded backoff and exits 0 only if every worker shut down cleanly.
# * With N > 1 a worker pushes live deliveries only from the database, in seq order: after its
#   own commits, after a peer's "committed" datagram and on a periodic safety poll. Datagrams
#   are hints, never data: losing one delays a push by at most ``worker_poll_seconds``.
# * One live connection per device across workers: an attach is broadcast with the token
#   (monotonic ns, worker index); whichever worker holds the older token closes its socket with
#   4001, so exactly one survives even when two attaches cross.
# * Only worker 0 runs the retention sweeper. Datagrams carry ids and numbers, never bodies.
"""Scale-out: the ``workers=N`` supervisor and each worker's link to its peers."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from relay.config import WORKER_DATAGRAM_BYTES_MAX, WORKERS_MAX, RelayConfig
from relay.errors import RelayError, StorageError
from relay.hub import CLOSE_DEVICE_REMOVED, CLOSE_REPLACED, CLOSE_RESYNC, Connection
from relay.loop import run as loop_run
from relay.replay import SqliteReplayGuard, make_replay_guard
from relay.state import RelayState
from relay.store.base import Address, Delivery
from relay.store.sqlite import SqliteRelayStore

__all__ = [
    "WORKER_HEADER",
    "ProcessSharedLock",
    "WorkerIdentity",
    "WorkerLink",
    "add_worker_header",
    "bind_listener",
    "run_supervisor",
    "worker_socket_path",
]

log = logging.getLogger("relay.cluster")

WORKER_HEADER = "X-Blindpost-Worker"  # names the worker on every response, the 101 included
# The limits and timers an operator may tune are RelayConfig settings (listen_backlog and
# worker_*). This one is not: it only spaces retries to a peer whose socket queue is full, the
# queue it refills is bounded by worker_outbox_max_lines, and the peer's own safety poll
# (worker_poll_seconds) bounds how late it learns of a commit whatever the retry interval.
_RETRY_SEND = 0.01  # seconds before retrying a datagram to a peer whose queue was full
_SUN_PATH_MAX = 107  # bytes of a Unix socket path (Linux sun_path, minus the NUL)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who a worker is: its index (0..count-1, kept across restarts) and where its peers are."""

    index: int
    count: int
    run_dir: Path


def worker_socket_path(run_dir: Path, index: int) -> Path:
    """Return the Unix datagram socket path of worker ``index``."""
    return run_dir / f"worker-{index}.sock"


def bind_listener(config: RelayConfig) -> socket.socket:
    """Bind and listen on ``config.host:config.port`` (port 0 picks a free one), with an accept
    queue of ``config.listen_backlog``.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    infos = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(config.listen_backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _prepare_run_dir(data_dir: Path, count: int) -> Path:
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)  # only the relay's user may signal its workers
    longest = worker_socket_path(run_dir.resolve(), count - 1)
    if len(os.fsencode(longest)) > _SUN_PATH_MAX:
        raise OSError(
            f"data directory path too long for the worker sockets ({len(str(longest))} bytes"
            f" > {_SUN_PATH_MAX}); use a shorter --data path"
        )
    return run_dir.resolve()


# -- supervisor -----------------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    pid: int = 0
    ready_fd: int = -1
    ready: bool = False
    started: float = 0.0
    crashes: int = 0
    restart_at: float | None = None


def run_supervisor(config: RelayConfig) -> int:
    """Bind the socket, run ``config.workers`` workers until SIGTERM/SIGINT, then stop them.

    Returns:
        0 when every worker shut down cleanly, 1 otherwise (including a worker that could not
        start).

    Raises:
        OSError: the address cannot be bound or the run directory cannot be made.
    """
    count = config.workers
    assert 1 < count <= WORKERS_MAX
    run_dir = _prepare_run_dir(config.data_dir, count)
    listener = bind_listener(config)
    try:
        # Schema creation is not safe for several first openers at once, so it happens here,
        # once. asyncio.run joins the store's threads: the supervisor forks with none running.
        asyncio.run(_prepare_store(config))
    except BaseException:
        listener.close()
        raise
    if threading.active_count() != 1:  # fork would copy a thread's locks but not the thread
        log.warning("supervisor still has %d threads before forking", threading.active_count())
    host, port = listener.getsockname()[:2]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    pending: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)

    def on_signal(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    signal.set_wakeup_fd(wake_w)
    children = [_Child(i) for i in range(count)]
    status = 0
    stopping = False
    stop_deadline = 0.0
    announced = False

    def spawn(child: _Child) -> None:
        ready_r, ready_w = os.pipe()
        # Signals stay blocked across fork so none reaches the child before it has reset the
        # supervisor's handlers; the child unblocks them once it has.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in handled:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for fd in [wake_r, wake_w, ready_r] + [c.ready_fd for c in children]:
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                code = _worker_main(
                    config, WorkerIdentity(child.index, count, run_dir), listener, ready_w
                )
            except BaseException:  # the worker must never return into the supervisor's code
                log.exception("worker %d failed", child.index)
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        child.pid = pid
        child.ready_fd = ready_r
        child.ready = False
        child.started = time.monotonic()
        child.restart_at = None
        log.info("worker %d started pid=%d", child.index, pid)

    def forward(sig: int) -> None:
        for c in children:
            if c.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, sig)

    try:
        for child in children:
            spawn(child)
        while True:
            now = time.monotonic()
            timeout = 1.0
            for c in children:
                if c.restart_at is not None and not stopping:
                    timeout = min(timeout, max(0.0, c.restart_at - now))
            fds = [wake_r] + [c.ready_fd for c in children if c.ready_fd >= 0]
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                readable = []
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
            for c in children:
                if c.ready_fd >= 0 and c.ready_fd in readable:
                    if os.read(c.ready_fd, 64):
                        c.ready = True
                        if announced:
                            log.info("worker %d ready", c.index)
                    else:  # the worker's end closed: it is gone, or has reported already
                        os.close(c.ready_fd)
                        c.ready_fd = -1
            while pending:
                sig = pending.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    if not stopping:
                        log.info("shutting down %d workers", count)
                        stopping = True
                        stop_deadline = time.monotonic() + config.shutdown_timeout_seconds
                        stop_deadline += config.worker_stop_grace_seconds
                    forward(sig)
            while True:
                try:
                    pid, wstatus = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(wstatus)
                dead = next((c for c in children if c.pid == pid), None)
                if dead is None:
                    continue
                child = dead
                child.pid = 0
                if stopping:
                    stopped_early = not child.ready and code in (-signal.SIGTERM, -signal.SIGINT)
                    if code != 0 and not stopped_early:  # (before it could handle the signal)
                        log.error("worker %d exited with %d during shutdown", child.index, code)
                        status = 1
                    continue
                if not announced:
                    log.error("worker %d failed to start (exit %d)", child.index, code)
                    status = 1
                    stopping = True
                    stop_deadline = time.monotonic() + config.shutdown_timeout_seconds
                    stop_deadline += config.worker_stop_grace_seconds
                    forward(signal.SIGTERM)
                    continue
                now = time.monotonic()
                if now - child.started >= config.worker_restart_reset_seconds:
                    child.crashes = 0
                delay = min(
                    config.worker_restart_max_backoff_seconds,
                    config.worker_restart_first_backoff_seconds * (2**child.crashes),
                )
                child.crashes = min(child.crashes + 1, 30)
                child.restart_at = now + delay
                log.error(
                    "worker %d pid=%d exited with %d; restarting in %.1f s",
                    child.index,
                    pid,
                    code,
                    delay,
                )
            if not announced and not stopping and all(c.ready for c in children):
                announced = True
                log.info(
                    "blindpost-relay listening on http://%s:%d (workers=%d)", host, port, count
                )
            if stopping:
                if all(c.pid == 0 for c in children):
                    break
                if time.monotonic() > stop_deadline:
                    log.error("workers did not stop in time; killing them")
                    forward(signal.SIGKILL)
                    status = 1
                    stop_deadline = float("inf")
                continue
            now = time.monotonic()
            for c in children:
                if c.restart_at is not None and c.restart_at <= now:
                    spawn(c)
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for c in children:
            if c.ready_fd >= 0:
                os.close(c.ready_fd)
        os.close(wake_r)
        os.close(wake_w)
        listener.close()
        for i in range(count):
            with contextlib.suppress(OSError):
                worker_socket_path(run_dir, i).unlink()
    if status == 0:
        log.info("stopped")
    return status


async def _prepare_store(config: RelayConfig) -> None:
    """Create or migrate the schema and the workers' ``mailbox(seq)`` index, then close.

    The replay guard's file is created here too: switching a new SQLite file to WAL needs an
    exclusive lock, and two workers doing it at once could fail with "database is locked"
    (seen in a full run); once the file is in WAL mode, opening it again changes nothing.
    """
    store = SqliteRelayStore(config.data_dir / "relay.sqlite3", read_threads=1)
    await store.open()
    try:
        await store.ensure_seq_index()
    finally:
        await store.close()
    guard = make_replay_guard(config)
    if isinstance(guard, SqliteReplayGuard):
        await guard.open()
        await guard.close()


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies (no orphaned listeners)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _worker_main(
    config: RelayConfig, ident: WorkerIdentity, listener: socket.socket, ready_w: int
) -> int:
    """Run one worker's event loop on the inherited socket; returns its exit status."""
    from relay.server import serve  # relay.server imports this module

    parent = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the supervisor died before the death signal was armed
        return 1
    fmt = f"%(asctime)s %(levelname)s %(name)s w{ident.index} %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(fmt))
    if ident.index != 0:
        config = config.replace(sweep_interval_seconds=0)  # sweeps run once, on worker 0

    def on_listening(host: str, port: int) -> None:
        os.write(ready_w, b"1")
        os.close(ready_w)

    try:
        loop_run(
            config.event_loop,
            serve(config, sock=listener, worker=ident, on_listening=on_listening),
        )
    except (OSError, StorageError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


# -- the worker's link to its peers ----------------------------------------------------------


class ProcessSharedLock(asyncio.Lock):
    """An asyncio lock that also holds ``flock(path)``, so it excludes other workers too.

    Replaces ``BlobFiles.lock`` in a worker: a blob's finalize + row update and the sweep's
    row delete + file unlink then never interleave across processes (a sweep on worker 0 could
    otherwise unlink a blob that worker 1 has just re-uploaded).

    Args:
        path: the lock file (created if missing).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def acquire(self) -> Literal[True]:
        """Take the in-process lock, then the file lock (in a thread: it may block)."""
        await super().acquire()
        fut = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, self._fd, fcntl.LOCK_EX)
        try:
            await asyncio.shield(fut)
        except BaseException:
            fut.add_done_callback(self._unlock_if_taken)  # cancelled while the thread waits
            super().release()
            raise
        return True

    def _unlock_if_taken(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        """Release the file lock, then the in-process lock."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        super().release()

    def close(self) -> None:
        """Close the lock file (the lock must not be held)."""
        os.close(self._fd)


class WorkerLink:
    """Cross-worker wake-ups and the one-connection-per-device rule, for one worker.

    Args:
        state: the worker's relay state (its store must be a ``SqliteRelayStore``).
        ident: this worker's identity.
        config: the settings it reads: ``worker_poll_seconds`` (safety-poll interval of the
            delivery pump), ``worker_pump_rows`` and ``worker_pump_bytes`` (page size of the
            pump's reads), ``worker_datagram_bytes`` (datagram size) and
            ``worker_outbox_max_lines`` (lines queued per peer).

    Raises:
        relay.errors.StorageError: the store is not a ``SqliteRelayStore``.
    """

    def __init__(self, state: RelayState, ident: WorkerIdentity, config: RelayConfig) -> None:
        store = state.store
        if not isinstance(store, SqliteRelayStore):
            raise StorageError("workers > 1 need the SQLite store")
        self._state = state
        self._store = store
        self._ident = ident
        self._config = config
        self._cursor = 0
        self._wanted = False
        self._closing = False
        self._pump_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Attach token of the device's latest local attach: while hub.get(addr) returns a
        # connection, it is the one this token belongs to (every attach overwrites it).
        self._tokens: dict[Address, int] = {}
        self._peers = [i for i in range(ident.count) if i != ident.index]
        self._outbox: dict[int, list[str]] = {i: [] for i in self._peers}
        self._commit_hint = 0
        self._commit_sent: dict[int, int] = dict.fromkeys(self._peers, 0)
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._dropped_lines = 0

    @property
    def cursor(self) -> int:
        """The highest seq this worker has pushed from (for tests and logs)."""
        return self._cursor

    async def start(self) -> None:
        """Bind this worker's datagram socket and take over the store's and hub's hooks.

        Raises:
            OSError: the socket cannot be bound.
            relay.errors.StorageError: the database cannot be read.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        await self._store.ensure_seq_index()
        self._cursor = await self._store.committed_seq()
        path = worker_socket_path(self._ident.run_dir, self._ident.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a crashed incarnation of this worker
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.fspath(path))
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_readable)
        self._store.set_delivery_listener(self._on_commit)
        self._state.hub.attach_listener = self._on_attach
        self._state.device_removed_listener = self._on_device_removed
        self._state.blobs.lock = ProcessSharedLock(self._ident.run_dir / "blobs.lock")
        self._poll_task = loop.create_task(self._poll())
        log.info(
            "worker %d linked to %d peers cursor=%d",
            self._ident.index,
            len(self._peers),
            self._cursor,
        )

    def stop_pushing(self) -> None:
        """Shutdown, before the store closes: stop reading it (peers are still told of commits)."""
        self._closing = True
        for task in (self._poll_task, self._pump_task):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """After the store closed: tell peers of the last commits and close the socket."""
        self.stop_pushing()
        for task in (self._poll_task, self._pump_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._flush()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._state.hub.attach_listener = None
        self._state.device_removed_listener = None
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            worker_socket_path(self._ident.run_dir, self._ident.index).unlink()

    # -- delivery pump -----------------------------------------------------------------

    def _on_commit(self, deliveries: Sequence[Delivery]) -> None:
        # The store's listener: this worker committed; deliveries are in increasing seq.
        seq = deliveries[-1].message.seq
        if seq > self._commit_hint:
            self._commit_hint = seq
            self._schedule_flush()
        if not self._closing:
            self.wake()

    def wake(self) -> None:
        """Ask the pump to read the store (coalesced: one read covers every pending wake)."""
        self._wanted = True
        task = self._pump_task
        if (task is None or task.done()) and not self._closing:
            assert self._loop is not None
            self._pump_task = self._loop.create_task(self._pump())

    async def _pump(self) -> None:
        hub = self._state.hub
        get = hub.get

        def wanted(addr: Address) -> bool:
            return get(addr) is not None

        while self._wanted and not self._closing:
            self._wanted = False
            more = True
            try:
                while more:
                    cursor, more, deliveries = await self._store.fetch_committed_after(
                        self._cursor,
                        self._config.worker_pump_rows,
                        self._config.worker_pump_bytes,
                        wanted,
                    )
                    if cursor > self._cursor:
                        self._cursor = cursor
                    if deliveries:
                        hub.deliver(deliveries)
            except RelayError as err:  # the safety poll retries
                log.warning("delivery pump read failed: %s", err.code)
                return

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._config.worker_poll_seconds)
            self.wake()

    # -- one connection per device -----------------------------------------------------

    def _on_attach(self, conn: Connection) -> None:
        token = time.monotonic_ns()  # CLOCK_MONOTONIC is one clock for every process
        tokens = self._tokens
        tokens[conn.addr] = token
        if len(tokens) > 2 * len(self._state.hub) + 1024:  # forget devices no longer here
            hub = self._state.hub
            for addr in [a for a in tokens if hub.get(a) is None]:
                del tokens[addr]
        self._queue_line(f"A {token} {self._ident.index} {conn.addr.device} {conn.addr.user}")

    def _on_remote_attach(self, token: int, worker: int, addr: Address) -> None:
        hub = self._state.hub
        conn = hub.get(addr)
        if conn is None:
            return
        local = self._tokens.get(addr, 0)
        if (local, self._ident.index) < (token, worker):
            log.info(
                "closing replaced connection user=%s device=%d (newer on worker %d)",
                addr.user,
                addr.device,
                worker,
            )
            hub.kick(conn, CLOSE_REPLACED, "replaced by a newer connection")

    def _on_device_removed(self, addr: Address) -> None:
        self._queue_line(f"R {addr.device} {addr.user}")

    def _on_remote_removed(self, addr: Address) -> None:
        self._state.keys.pop(addr, None)
        self._state.hub.kick_device(addr, CLOSE_DEVICE_REMOVED, "device removed")

    def _on_resync(self) -> None:
        # A peer had to drop lines queued for this worker (the outbox cap), so an ``A`` or an
        # ``R`` may be among them: forget every cached auth key (a removed device's included)
        # and close every socket (an older connection of a device that moved is among them);
        # the clients reconnect and authenticate against the database.
        self._state.keys.clear()
        closed = self._state.hub.kick_all(CLOSE_RESYNC, "worker resync")
        log.warning("worker %d resynchronised: %d sockets closed", self._ident.index, closed)
        self.wake()

    # -- datagrams -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):
            try:
                # The largest datagram any worker may send (all are forked with one config, but
                # a short read would cut a line and could misname a device in an ``A`` line).
                data = sock.recv(WORKER_DATAGRAM_BYTES_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for line in data.decode("ascii", "replace").split("\n"):
                self._handle_line(line)

    def _handle_line(self, line: str) -> None:
        parts = line.split(" ")
        try:
            kind = parts[0]
            if kind == "C" and len(parts) == 2:
                if int(parts[1]) > self._cursor:
                    self.wake()
            elif kind == "A" and len(parts) == 5:
                addr = Address(parts[4], int(parts[3]))
                self._on_remote_attach(int(parts[1]), int(parts[2]), addr)
            elif kind == "R" and len(parts) == 3:
                self._on_remote_removed(Address(parts[2], int(parts[1])))
            elif kind == "X" and len(parts) == 1:
                self._on_resync()
        except ValueError:
            log.warning("ignored a malformed worker datagram line (%d bytes)", len(line))

    def _queue_line(self, line: str) -> None:
        for peer in self._peers:
            box = self._outbox[peer]
            box.append(line)
            if len(box) > self._config.worker_outbox_max_lines:
                # Attach and removal lines must not vanish silently (the peer would keep a
                # removed device's key or a replaced socket): they become one resync order.
                box[:] = ["X"]
                self._dropped_lines += 1
                if self._dropped_lines == 1:
                    log.warning("worker %d is not reading its datagrams; it will resync", peer)
        self._schedule_flush()

    def _schedule_flush(self, delay: float = 0.0) -> None:
        if self._flush_handle is not None or self._loop is None:
            return
        if delay:
            self._flush_handle = self._loop.call_later(delay, self._flush)
        else:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        sock = self._sock
        if sock is None:
            return
        retry = False
        for peer in self._peers:
            box = self._outbox[peer]
            if self._commit_hint > self._commit_sent[peer]:
                box.append(f"C {self._commit_hint}")
                self._commit_sent[peer] = self._commit_hint
            if not box:
                continue
            path = os.fspath(worker_socket_path(self._ident.run_dir, peer))
            while box:
                chunk: list[str] = []
                size = 0
                for line in box:
                    if chunk and size + len(line) + 1 > self._config.worker_datagram_bytes:
                        break
                    chunk.append(line)
                    size += len(line) + 1
                try:
                    sock.sendto("\n".join(chunk).encode("ascii"), path)
                except (BlockingIOError, InterruptedError):
                    retry = True  # the peer's queue is full: it is busy and will read later
                    break
                except OSError:
                    box.clear()  # the peer is down; a restarted worker starts from the store
                    break
                del box[: len(chunk)]
        if retry:
            self._schedule_flush(_RETRY_SEND)


def add_worker_header(app: web.Application, index: int) -> None:
    """Name the worker on every response (``X-Blindpost-Worker``), the WebSocket 101 included."""
    value = str(index)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = value

    app.on_response_prepare.append(on_prepare)
