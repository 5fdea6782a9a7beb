# Why this module touches aiohttp's internals, and how it stays safe (docs/architecture.md, "One
# process"): aiohttp parses a WebSocket's frames in ``data_received`` and puts each into a queue
# that wakes the handler task, which then resumes through three coroutine frames to read it: a
# future, a task step and a wake-up per frame, about a tenth of the relay's CPU per message at
# 2,000 msg/s. Here the queue is a subclass whose ``feed_data`` hands SEND and ack frames to the
# relay's synchronous frame handlers as the parser produces them; everything else (control
# frames, errors, and every frame while the reading loop is busy with an earlier one) goes
# through aiohttp's queue as before, so frames are still taken in the order they arrived.
#
# It relies on aiohttp 3.14's private parts: the response's ``_post_start`` (where the parser is
# set, with no loop iteration before the swap, so the replaced parser has seen no byte), its
# ``_reader``, ``_parser``, ``_max_msg_size`` and ``_decode_text``, and the protocol's
# ``_payload_parser`` and ``_message_tail``. When any is missing or different, or the upgrade
# request came with frame bytes behind it, ``frames`` stays None and the socket is served the
# ordinary way; ``tests/relay/test_relay_websocket.py`` checks that the installed aiohttp gets
# the fast path, so a version that silently loses it fails there.
"""Take a WebSocket's data frames in the parser's callback instead of a task wake-up each."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

try:  # aiohttp >= 3.11; without it every socket is served the ordinary way
    from aiohttp._websocket import reader as _reader
except ImportError:  # pragma: no cover - the pinned aiohttp has it
    _reader = None  # type: ignore[assignment]

__all__ = ["FastFramesResponse", "FrameQueue"]

log = logging.getLogger("relay.ws")

# aiohttp's own queue limit for a WebSocket (web_ws.DEFAULT_CHUNK_SIZE, doubled by the queue):
# frames queued for the reading loop beyond it pause reading the socket.
_QUEUE_LIMIT = 2**16

Handler = Callable[[Any, Any], Any]
_Queue: Any = _reader.WebSocketDataQueue if _reader is not None else object


class FrameQueue(_Queue):  # type: ignore[misc]  # aiohttp's queue, typed Any: a private class
    """aiohttp's frame queue, with a fast path while the reading loop waits for a frame.

    ``handle(owner, msg)`` is called with each frame while :attr:`on` (one handler for all
    sockets, ``owner`` this socket's state, so a socket holds no closure of its own); it
    returns None when it took the frame, or what the reading loop must get instead (the frame
    itself, or a pause marker). From then on frames queue until the loop has taken them all
    and calls :meth:`resume`.
    """

    __slots__ = ("handle", "on", "owner")

    def __init__(self, protocol: Any, limit: int, *, loop: Any) -> None:
        super().__init__(protocol, limit, loop=loop)
        self.on = False
        self.handle: Handler | None = None
        self.owner: Any = None

    def resume(self) -> None:
        """The reading loop is about to wait: take frames in the callback again, unless some
        are still queued (they must be read first)."""
        if self.handle is not None and not self._buffer:
            self.on = True

    def close(self) -> list[Coroutine[Any, Any, None]]:
        """The reading loop ended: stop taking frames, and return what the pause markers still
        queued carry (frames the handler already took: their coroutines must still run, e.g.
        to release or use a send slot; the frames behind them are dropped unread, as aiohttp
        drops a closed socket's queue)."""
        self.on = False
        self.handle = None
        self.owner = None
        return [msg.data for msg, _ in self._buffer if isinstance(msg.data, Coroutine)]

    def feed_data(self, data: Any, size: int) -> None:
        if self.on:
            handle = self.handle
            assert handle is not None
            try:
                data = handle(self.owner, data)
            except Exception as exc:  # noqa: BLE001 - the socket is closed, not the relay
                log.error("ws frame failed with %s", type(exc).__name__)
                data = WSMessage(WSMsgType.ERROR, exc, None)
            if data is None:
                return
            self.on = False
        super().feed_data(data, size)


class FastFramesResponse(web.WebSocketResponse):
    """A WebSocket response whose frames go to a :class:`FrameQueue` (:attr:`frames`) when this
    aiohttp allows it; None there means the socket is served the ordinary way."""

    frames: FrameQueue | None = None

    def _post_start(self, request: Any, protocol: Any, writer: Any) -> None:
        # Checked before aiohttp's parser is set: setting it feeds it what came with the
        # upgrade request (a client that sent frames before the 101); then it stays in place.
        proto = request.protocol
        clean = getattr(proto, "_message_tail", None) == b""
        super()._post_start(request, protocol, writer)
        if clean:  # no loop iteration since the parser was set: it has seen no byte
            self.frames = _swap(self, proto)


def _swap(ws: web.WebSocketResponse, proto: Any) -> FrameQueue | None:
    old_queue = getattr(ws, "_reader", None)
    old_parser = getattr(ws, "_parser", None)
    # What aiohttp built its parser from; missing means another aiohttp (never a default: a
    # max_msg_size of 0 would mean no frame size limit).
    loop = getattr(ws, "_loop", None)
    max_msg_size = getattr(ws, "_max_msg_size", None)
    compress = getattr(ws, "_compress", None)
    if (
        _reader is None
        or type(old_queue) is not _reader.WebSocketDataQueue
        or old_parser is None
        or getattr(proto, "_payload_parser", None) is not old_parser
        or loop is None
        or not isinstance(max_msg_size, int)
        or max_msg_size <= 0
        or compress is None
    ):
        return None
    queue = FrameQueue(proto, _QUEUE_LIMIT, loop=loop)
    try:
        parser = _reader.WebSocketReader(
            queue,
            max_msg_size,
            compress=bool(compress),
            decode_text=getattr(ws, "_decode_text", True),
        )
    except TypeError:  # another aiohttp's parser
        return None
    ws._reader = queue
    ws._parser = parser
    proto._payload_parser = parser
    return queue
