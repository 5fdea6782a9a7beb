# Invariants: the listening socket is closed before anything else on shutdown; WebSockets are
# closed with 1001; in-flight requests get ``shutdown_timeout_seconds``; the store's cleanup
# commits every write already submitted before the process exits. Every accepted connection
# is wrapped in relay.guard.HeaderTimeoutProtocol (slowloris guard). As a worker of
# ``workers=N`` (relay.cluster) it serves the supervisor's socket instead of binding one, and its
# link to the other workers is started before the first connection and closed after the store.
"""Run the relay: listening socket, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from aiohttp import web

from relay.app import create_app
from relay.cluster import WorkerIdentity, WorkerLink, add_worker_header
from relay.config import RelayConfig
from relay.guard import HeaderTimeoutProtocol
from relay.state import STATE_KEY

__all__ = ["serve"]

log = logging.getLogger("relay.server")

_LINGER_MAX_SECONDS = 10.0  # aiohttp's default


async def serve(
    config: RelayConfig,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str, int], None] | None = None,
    sock: socket.socket | None = None,
    worker: WorkerIdentity | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    Args:
        config: settings.
        stop: optional event that also triggers shutdown.
        on_listening: called with (host, port) once the socket is listening.
        sock: an already listening socket to serve (a worker's, inherited from the
            supervisor); ``config.host``/``config.port`` are bound if None.
        worker: set in a worker of ``workers=N``: links it to its peers (relay.cluster).

    Raises:
        OSError: the address cannot be bound.
        relay.errors.StorageError: the database cannot be opened.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if config.switch_interval_ms > 0:
        # The writer thread gives up the GIL inside every SQLite step and must win it back from
        # the busy event loop; with the default 5 ms interval each step can wait that long.
        sys.setswitchinterval(config.switch_interval_ms / 1000)
    app = create_app(config)
    if worker is not None:
        add_worker_header(app, worker.index)
    access_log = logging.getLogger("relay.access")
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=access_log,
        access_log_format='%a "%r" %s %b %Tf',
        keepalive_timeout=config.keepalive_timeout_seconds,
        shutdown_timeout=config.shutdown_timeout_seconds,
        # After a response sent before its request's body was read (a 401, 413 or 429 refused
        # up front) aiohttp reads and drops the rest for this long, so the client can read the
        # response; bounded by the body deadline too, so a trickling peer is not held longer.
        lingering_time=min(_LINGER_MAX_SECONDS, config.body_timeout_seconds),
    )
    await runner.setup()
    link: WorkerLink | None = None
    if worker is not None:
        link = WorkerLink(app[STATE_KEY], worker, config)
        try:
            await link.start()
        except BaseException:
            await link.close()
            await runner.cleanup()
            raise
    server = runner.server
    assert server is not None
    timeout = config.header_timeout_seconds

    def factory() -> asyncio.Protocol:
        return HeaderTimeoutProtocol(server(), timeout, loop)

    try:
        if sock is not None:
            listener = await loop.create_server(factory, sock=sock, backlog=config.listen_backlog)
        else:
            listener = await loop.create_server(
                factory,
                config.host,
                config.port,
                reuse_address=True,
                reuse_port=bool(config.reuse_port),
                backlog=config.listen_backlog,
            )
    except OSError:
        if link is not None:
            await link.close()
        await runner.cleanup()
        raise
    host, port = listener.sockets[0].getsockname()[:2]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    if worker is None:
        log.info("blindpost-relay listening on http://%s:%d", host, port)
    else:
        log.info("worker %d serving http://%s:%d pid=%d", worker.index, host, port, os.getpid())
    if on_listening is not None:
        on_listening(host, port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if worker is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        else:
            # A worker gets the stop signal twice when it goes to the whole process group
            # (Ctrl-C, systemd) and the supervisor forwards it too: later ones must not cut the
            # graceful shutdown short, so they stay pending until the worker exits.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        listener.close()
        await app[STATE_KEY].hub.close_all()
        if link is not None:
            link.stop_pushing()
        await runner.cleanup()
        if link is not None:
            await link.close()  # after the store's last commits, so peers hear of them
        await listener.wait_closed()
        log.info("stopped")
