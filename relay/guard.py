# Invariant: a connection that has not delivered a request's complete headers within
# ``header_timeout_seconds`` of that request's first byte is aborted, on every request of a
# keep-alive connection (the first request's clock starts at accept time). The guard is told
# about handlers by plain calls from the handler wrapper, not by an aiohttp middleware: a
# middleware's frames would stay alive for the whole life of every WebSocket.
"""Slowloris guard: ``HeaderTimeoutProtocol`` wraps aiohttp's per-connection protocol."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

__all__ = ["HeaderTimeoutProtocol", "request_started", "response_finished"]

log = logging.getLogger("relay.server")


class HeaderTimeoutProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol and aborts connections whose request headers are slow.

    aiohttp has no header-read timeout, so a slowloris client could hold a connection forever by
    trickling header bytes. This proxy arms a timer when a request begins (at accept time, and
    on a keep-alive connection at the first byte after the previous response) and disarms it
    once the blank line ending the headers (``\\r\\n\\r\\n``) has arrived or a handler has
    started; every call is forwarded to the wrapped protocol unchanged. ``request_started`` /
    ``response_finished`` (called by ``relay.http_errors.json_errors``, which wraps every HTTP
    route) tell it when a handler runs; a WebSocket upgrade ``unwrap``s it. An idle keep-alive
    connection (no bytes at all) is left to aiohttp's keep-alive timeout.

    Args:
        inner: the aiohttp request handler protocol.
        timeout: seconds allowed for each request's headers.
        loop: the running loop.
    """

    __slots__ = ("_between", "_inner", "_loop", "_tail", "_timeout", "_timer", "_transport")

    def __init__(
        self, inner: asyncio.Protocol, timeout: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._between = False  # a response is done; the next byte starts a new request
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._between:
            self._between = False
            self._arm()
        if self._timer is not None:
            buf = self._tail + data
            if b"\r\n\r\n" in buf:
                self._disarm()
            else:
                self._tail = buf[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._between = False
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    @staticmethod
    def unwrap(transport: asyncio.BaseTransport) -> None:
        """Hand ``transport`` straight to the wrapped protocol (after a WebSocket upgrade)."""
        proxy = transport.get_protocol()
        if isinstance(proxy, HeaderTimeoutProtocol):
            proxy._disarm()
            transport.set_protocol(proxy._inner)

    def request_started(self) -> None:
        """A handler runs: its headers are complete (pipelined requests need no scan)."""
        self._between = False
        self._disarm()

    def response_finished(self) -> None:
        """The handler is done; the next byte received begins the next request's headers."""
        self._between = True

    def _arm(self) -> None:
        self._tail = b""
        if self._timeout > 0 and self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._expired)

    def _disarm(self) -> None:
        self._tail = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        # A stream transport; not isinstance-checked: uvloop's are not asyncio.Transport
        # subclasses.
        abort = getattr(self._transport, "abort", None)
        if abort is not None:
            log.info("closing connection: request headers not received in %.1fs", self._timeout)
            abort()


def _guard_of(request: web.Request) -> HeaderTimeoutProtocol | None:
    transport = request.transport
    proxy = transport.get_protocol() if transport is not None else None
    return proxy if isinstance(proxy, HeaderTimeoutProtocol) else None


def request_started(request: web.Request) -> None:
    """Tell the connection's guard (if any) that a handler for ``request`` runs."""
    guard = _guard_of(request)
    if guard is not None:
        guard.request_started()


def response_finished(request: web.Request) -> None:
    """Tell the connection's guard (if any) that the handler for ``request`` is done."""
    guard = _guard_of(request)
    if guard is not None:
        guard.response_finished()
