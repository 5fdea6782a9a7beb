# Invariants: the listening socket is closed before anything else on shutdown; WebSockets are
# closed with 1001; in-flight requests get ``shutdown_timeout_seconds``; the store's cleanup
# commits every write already submitted before the process exits. Every accepted connection
# is wrapped in relay.guard.HeaderTimeoutProtocol (slowloris guard). One process is one relay
# node; several share a port only through ``reuse_port`` (each a full node on PostgreSQL + Redis).
"""Run the relay: listening socket, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from blindpost_wire.loop import running as running_loop
from relay.app import create_app
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
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    Args:
        config: settings.
        stop: optional event that also triggers shutdown.
        on_listening: called with (host, port) once the socket is listening.

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
    server = runner.server
    assert server is not None
    timeout = config.header_timeout_seconds

    def factory() -> asyncio.Protocol:
        return HeaderTimeoutProtocol(server(), timeout, loop)

    try:
        listener = await loop.create_server(
            factory,
            config.host,
            config.port,
            reuse_address=True,
            reuse_port=bool(config.reuse_port),
            backlog=config.listen_backlog,
        )
    except OSError:
        await runner.cleanup()
        raise
    host, port = listener.sockets[0].getsockname()[:2]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event loop: %s", running_loop())
    log.info("blindpost-relay listening on http://%s:%d", host, port)
    if on_listening is not None:
        on_listening(host, port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        listener.close()
        await app[STATE_KEY].hub.close_all()
        await runner.cleanup()
        await listener.wait_closed()
        log.info("stopped")
