"""The direct frame path (relay.ws_frames) on aiohttp's real parser: frames reach the handler
while the reading loop waits, and in arrival order once it is busy."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import WSMessage, WSMsgType
from aiohttp._websocket.reader import WebSocketReader

from relay.ws_frames import FrameQueue


class _Protocol:
    """What aiohttp's queue needs of the connection: reading paused or not."""

    def __init__(self) -> None:
        self._reading_paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self._reading_paused = False


def _frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked client frame (FIN set) of at most 125 bytes."""
    assert len(payload) <= 125
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def _setup(handle: Any) -> tuple[FrameQueue, WebSocketReader, _Protocol]:
    proto = _Protocol()
    queue = FrameQueue(proto, 2**16, loop=asyncio.get_running_loop())
    queue.handle = handle
    parser = WebSocketReader(queue, 2**20, compress=False, decode_text=True)
    return queue, parser, proto


async def test_frames_go_to_the_handler_while_the_loop_waits_and_queue_in_order_after() -> None:
    taken: list[bytes] = []
    pause = WSMessage(WSMsgType.BINARY, "wait", "pause")

    def handle(owner: Any, msg: Any) -> Any:
        if msg.type != WSMsgType.BINARY:
            return msg
        taken.append(msg.data)
        return pause if msg.data == b"slow" else None

    queue, parser, _ = _setup(handle)
    # Before the reading loop first waits, nothing is taken directly.
    parser.feed_data(_frame(b"early"))
    assert taken == [] and (await queue.read()).data == b"early"
    queue.resume()
    # One read of the socket with four frames: two taken, then one that makes the loop wait;
    # the frame behind it must not overtake it, so it queues (and a ping with it).
    parser.feed_data(_frame(b"a") + _frame(b"b") + _frame(b"slow") + _frame(b"c"))
    parser.feed_data(_frame(b"p", opcode=0x9))
    assert taken == [b"a", b"b", b"slow"]
    assert (await queue.read()) is pause
    queue.resume()  # frames still queued: the loop must read them first
    assert not queue.on
    assert (await queue.read()).data == b"c"
    assert (await queue.read()).type == WSMsgType.PING
    queue.resume()
    assert queue.on
    parser.feed_data(_frame(b"d") + _frame("tést".encode(), opcode=0x1))
    assert taken == [b"a", b"b", b"slow", b"d"]  # the text frame is not the handler's to take
    text = await queue.read()
    assert text.type == WSMsgType.TEXT and text.data == "tést"


async def test_a_failing_handler_ends_the_socket_with_an_error_frame() -> None:
    def handle(owner: Any, msg: Any) -> Any:
        raise RuntimeError("bug")

    queue, parser, _ = _setup(handle)
    queue.resume()
    parser.feed_data(_frame(b"x") + _frame(b"y"))
    first = await queue.read()
    assert first.type == WSMsgType.ERROR and isinstance(first.data, RuntimeError)
    assert (await queue.read()).data == b"y"  # queued behind it, for the loop that closes


async def test_frames_queued_behind_a_pause_still_pause_reading_when_too_many() -> None:
    def handle(owner: Any, msg: Any) -> Any:
        return WSMessage(WSMsgType.BINARY, None, "pause")

    queue, parser, proto = _setup(handle)
    queue.resume()
    parser.feed_data(b"".join(_frame(b"z" * 100) for _ in range(2000)))
    assert proto.pauses >= 1  # aiohttp's bound on queued frames holds on this path too


async def test_closing_returns_what_queued_pause_markers_still_have_to_run() -> None:
    ran: list[str] = []

    async def later(name: str) -> None:
        ran.append(name)

    def handle(owner: Any, msg: Any) -> Any:
        return WSMessage(WSMsgType.BINARY, later(msg.data.decode()), "pause")

    queue, parser, _ = _setup(handle)
    queue.resume()
    parser.feed_data(_frame(b"taken") + _frame(b"unread"))
    pending = queue.close()
    assert queue.handle is None and not queue.on
    assert len(pending) == 1  # the frame behind the marker was not taken: nothing to run
    await pending[0]
    assert ran == ["taken"]


async def test_the_swap_needs_every_part_aiohttp_built_its_parser_from() -> None:
    """Without one of them (another aiohttp) the socket keeps aiohttp's own parser: never a
    guessed default, since a max_msg_size of 0 would lift the frame size limit."""
    from types import SimpleNamespace

    from aiohttp._websocket.reader import WebSocketDataQueue

    from relay.ws_frames import _swap

    def parts(**missing: Any) -> tuple[Any, Any]:
        proto = _Protocol()
        old_queue = WebSocketDataQueue(proto, 2**16, loop=asyncio.get_running_loop())
        old_parser = WebSocketReader(old_queue, 2**20, compress=False, decode_text=True)
        ws = SimpleNamespace(
            _reader=old_queue,
            _parser=old_parser,
            _loop=asyncio.get_running_loop(),
            _max_msg_size=2**20,
            _compress=False,
        )
        for name, value in missing.items():
            if value is None:
                delattr(ws, name)
            else:
                setattr(ws, name, value)
        proto._payload_parser = old_parser  # type: ignore[attr-defined]
        return ws, proto

    ws, proto = parts()
    queue = _swap(ws, proto)
    assert isinstance(queue, FrameQueue) and ws._reader is queue
    assert proto._payload_parser is ws._parser  # type: ignore[attr-defined]
    for missing in (
        {"_max_msg_size": None},
        {"_max_msg_size": 0},
        {"_loop": None},
        {"_compress": None},
    ):
        ws, proto = parts(**missing)
        kept = ws._parser
        assert _swap(ws, proto) is None, missing
        assert proto._payload_parser is kept  # type: ignore[attr-defined]
