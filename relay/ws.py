# Invariants (docs/delivery.md):
# * The first frame is the hint; then the backlog in increasing seq; then {"type":"empty"};
#   then live pushes. The switch from backlog to live happens on the event loop with no await
#   between the final "nothing newer is pending" check and setting ``live``, so no committed
#   message can fall between the backlog and the live stream.
# * Messages leave a mailbox only by ack; a disconnect at any point loses nothing.
# * Steady state costs one aiohttp handler task per socket and no timers; the backlog drain
#   runs in a short-lived task only while a backlog is being sent.
"""The ``GET /v1/ws`` handler: authenticated delivery, sends and acks over one socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from functools import partial
from typing import Any

from aiohttp import WSMsgType, web

from relay.app import STATE_KEY, RelayState, json_error
from relay.auth import EMPTY_SHA256
from relay.errors import BadRequest, RelayError
from relay.hub import Connection
from relay.store.base import SendReceipt
from relay.wire import OP_SEND, b64e, decode_send, encode_deliver, parse_ack_ids

__all__ = ["websocket_handler"]

log = logging.getLogger("relay.ws")

_PAGE = 256
_PAGE_BYTES = 1024 * 1024
_EMPTY_FRAME = '{"type":"empty"}'
_MAX_DRAIN_PAGES = 1_000_000
_MAX_INFLIGHT_ACKS = 16


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate (401 before the upgrade), then serve the delivery protocol."""
    st = request.app[STATE_KEY]
    cfg = st.config
    try:
        addr = await st.authenticate(request, EMPTY_SHA256)
    except RelayError as err:
        st.metrics.http_responses[err.status] += 1
        return json_error(err)
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost before upgrade")
    # Heartbeat and idle timeout are enforced by the hub's single liveness sweep rather than
    # by per-socket timers: no timer objects per idle socket.
    ws = web.WebSocketResponse(
        heartbeat=None,
        receive_timeout=None,
        max_msg_size=cfg.ws_max_frame_bytes,
        compress=False,
        autoping=False,
    )
    await ws.prepare(request)
    conn = Connection(addr, ws, transport)
    conn.last_rx = asyncio.get_running_loop().time()
    st.hub.attach(conn)
    log.info("ws open user=%s device=%d", addr.user, addr.device)
    # The hint goes out before any client frame is read, so it is always the first frame.
    try:
        waiting = await st.store.mailbox_count(addr)
        await ws.send_str(f'{{"type":"hint","waiting":{waiting}}}')
    except (RelayError, ConnectionError) as exc:
        log.warning("ws setup failed user=%s: %s", addr.user, type(exc).__name__)
        st.hub.detach(conn)
        conn.closing = True
        await ws.close(code=1011, message=b"storage error")
        return ws
    drain = asyncio.ensure_future(_drain(st, conn))
    conn.drain = drain
    drain.add_done_callback(partial(_drained, conn))
    del drain
    loop = asyncio.get_running_loop()
    try:
        while True:
            msg = await ws.receive()
            conn.last_rx = loop.time()
            conn.pinged = False
            kind = msg.type
            if kind == WSMsgType.BINARY:
                _on_binary(st, conn, msg.data)
            elif kind == WSMsgType.TEXT:
                await _on_text(st, conn, msg.data)
            elif kind == WSMsgType.PING:
                await ws.pong(msg.data)
            elif kind == WSMsgType.PONG:
                continue
            else:  # CLOSE, CLOSING, CLOSED, ERROR: aiohttp already answered with the close code
                break
    finally:
        pending = conn.drain
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        st.hub.detach(conn)
        conn.closing = True
        log.info("ws closed user=%s device=%d code=%s", addr.user, addr.device, ws.close_code)
    return ws


def _drained(conn: Connection, task: asyncio.Task[None]) -> None:
    conn.drain = None  # release the finished task (and its frames) for the socket's lifetime


async def _drain(st: RelayState, conn: Connection) -> None:
    ws = conn.ws
    store = st.store
    try:
        for _ in range(_MAX_DRAIN_PAGES):
            msgs = await store.fetch_mailbox(conn.addr, conn.last_seq, _PAGE, _PAGE_BYTES)
            if conn.closing:
                return
            for m in msgs:
                await ws.send_bytes(encode_deliver(m))
                conn.last_seq = m.seq
                st.metrics.delivered += 1
            # No await between this check and ``live = True``: a commit that the read above
            # missed has already raised pending_max, so we loop; a later one is pushed live.
            if not msgs and conn.pending_max <= conn.last_seq:
                conn.live = True
                st.hub.write_text(conn, _EMPTY_FRAME)
                return
    except (ConnectionError, RuntimeError):
        return
    except RelayError as err:
        log.warning("drain failed user=%s: %s", conn.addr.user, err.code)
        await ws.close(code=1011, message=b"storage error")


def _error_frame(st: RelayState, conn: Connection, err: RelayError) -> None:
    doc = {"type": "error", "error": err.code, "message": err.message}
    st.hub.write_text(conn, json.dumps(doc))


def _on_binary(st: RelayState, conn: Connection, data: bytes) -> None:
    cfg = st.config
    if not data or data[0] != OP_SEND:
        _error_frame(st, conn, BadRequest("unknown binary op", code="unknown_op"))
        return
    mid = data[1:17] if len(data) >= 17 else None
    try:
        env = decode_send(data, max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes)
        st.send_limit.take(conn.addr, st.clock.monotonic())
        fut = st.store.submit_send(conn.addr, env, st.clock.now_ms())
    except RelayError as err:
        _send_result_error(st, conn, mid, err)
        return
    fut.add_done_callback(partial(_send_done, st, conn, env.message_id))


def _send_result_error(
    st: RelayState, conn: Connection, mid: bytes | None, err: RelayError
) -> None:
    doc: dict[str, Any] = {
        "type": "send_result",
        "id": b64e(mid) if mid else None,
        "status": err.status,
    }
    doc.update(err.to_json())
    st.hub.write_text(conn, json.dumps(doc))


def _send_done(
    st: RelayState, conn: Connection, mid: bytes, fut: asyncio.Future[SendReceipt]
) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is None:
        r = fut.result()
        st.hub.write_text(
            conn,
            f'{{"type":"send_result","id":"{b64e(mid)}","status":200,'
            f'"recipients":{r.recipients},"stored_at":{r.stored_at}}}',
        )
    elif isinstance(exc, RelayError):
        _send_result_error(st, conn, mid, exc)
    else:
        log.error("send failed with %s", type(exc).__name__)
        _send_result_error(st, conn, mid, RelayError("internal error"))


async def _on_text(st: RelayState, conn: Connection, text: str) -> None:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("type") != "ack":
            raise BadRequest('expected {"type":"ack","ids":[...]}', code="unknown_type")
        ref = doc.get("ref")
        if ref is not None and (not isinstance(ref, str) or len(ref) > 64):
            raise BadRequest("ref must be a string of at most 64 characters")
        ids = parse_ack_ids(doc)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        _error_frame(st, conn, BadRequest("frame is not valid JSON"))
        return
    except RelayError as err:
        _error_frame(st, conn, err)
        return
    # Acks do not hold up the socket's reading (sends behind them keep flowing) unless too many
    # are already waiting for a commit: then this socket waits, which bounds its memory.
    task = asyncio.ensure_future(st.store.ack(conn.addr, ids))
    st.background.add(task)  # a strong reference until it is done
    conn.inflight_acks += 1
    task.add_done_callback(partial(_ack_done, st, conn, ref))
    if conn.inflight_acks > _MAX_INFLIGHT_ACKS:
        with contextlib.suppress(Exception):
            await task


def _ack_done(st: RelayState, conn: Connection, ref: str | None, task: asyncio.Task[int]) -> None:
    conn.inflight_acks -= 1
    st.background.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, RelayError):
        _error_frame(st, conn, exc)
    elif exc is not None:
        log.error("ack failed with %s", type(exc).__name__)
        _error_frame(st, conn, RelayError("internal error"))
    elif ref is not None:
        st.hub.write_text(conn, json.dumps({"type": "acked", "ref": ref, "count": task.result()}))
