# Invariants: the listening socket is closed before anything else on shutdown; WebSockets are
# closed with 1001; in-flight requests get ``shutdown_timeout_seconds``; the store's cleanup
# commits every write already submitted before the process exits. A connection that has not
# delivered complete request headers within ``header_timeout_seconds`` is aborted.
"""Run the relay: listening socket, slow-header guard, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from relay.app import STATE_KEY, create_app
from relay.config import RelayConfig

__all__ = ["HeaderTimeoutProtocol", "serve"]

log = logging.getLogger("relay.server")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class HeaderTimeoutProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol and aborts connections whose first request headers are slow.

    aiohttp has no header-read timeout, so a slowloris client could hold a connection forever by
    trickling header bytes. This proxy arms a timer at accept time and disarms it once the
    blank line ending the headers (``\\r\\n\\r\\n``) has arrived; every call is forwarded to
    the wrapped protocol unchanged. Later requests on a keep-alive connection are bounded by
    aiohttp's keep-alive timeout only.

    Args:
        inner: the aiohttp request handler protocol.
        timeout: seconds allowed for the first request's headers.
        loop: the running loop.
    """

    __slots__ = ("_inner", "_loop", "_tail", "_timeout", "_timer", "_transport")

    def __init__(
        self, inner: asyncio.Protocol, timeout: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._timeout > 0:
            self._timer = self._loop.call_later(self._timeout, self._expired)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            buf = self._tail + data
            if b"\r\n\r\n" in buf:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = buf[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expired(self) -> None:
        self._timer = None
        if isinstance(self._transport, asyncio.Transport):
            log.info("closing connection: request headers not received in %.1fs", self._timeout)
            self._transport.abort()


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
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    timeout = config.header_timeout_seconds

    def factory() -> asyncio.Protocol:
        return HeaderTimeoutProtocol(server(), timeout, loop)

    try:
        listener = await loop.create_server(
            factory, config.host, config.port, reuse_address=True, backlog=4096
        )
    except OSError:
        await runner.cleanup()
        raise
    host, port = listener.sockets[0].getsockname()[:2]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
