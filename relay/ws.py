# Invariants (docs/delivery.md):
# * The first frame is the hint; then the backlog in increasing seq; then {"type":"empty"};
#   then live pushes. The switch from backlog to live happens on the event loop with no await
#   between the final "nothing newer is pending" check and setting ``live``, so no committed
#   message can fall between the backlog and the live stream.
# * Messages leave a mailbox only by ack; a disconnect at any point loses nothing.
# * Back-pressure: a socket has at most ``ws_max_inflight_sends`` SENDs waiting for their commit;
#   at the bound the handler stops reading it until half of them are answered (ack frames have
#   their own bound, ``_MAX_INFLIGHT_ACKS``), so pipelining cannot grow relay memory. After a
#   SEND answered 429 the socket is not read for up to ``_REFUSED_PAUSE`` seconds, so a client
#   ignoring Retry-After costs a few refusals per second, not one per frame it can write.
# * Steady state costs one aiohttp handler task per socket and no timers; the backlog drain
#   runs in a short-lived task only while a backlog is being sent.
"""The ``GET /v1/ws`` handler: authenticated delivery, sends and acks over one socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from blindpost_wire.auth import AUTH_FRAME_FIELDS
from blindpost_wire.close import CLOSE_TRY_AGAIN_LATER
from relay.auth import EMPTY_SHA256, H_USER, parse_signed_headers
from relay.errors import AuthError, BadRequest, MismatchedDevices, RateLimited, RelayError
from relay.guard import HeaderTimeoutProtocol
from relay.http_errors import json_error
from relay.hub import CLOSE_BANNED, CLOSE_GOING_AWAY, CLOSE_UNAUTHENTICATED, Connection
from relay.sending import charge_lookups, check_recipient_users
from relay.state import STATE_KEY, RelayState
from relay.store.base import Address, Envelope, SendReceipt
from relay.wire import OP_SEND, OP_SEND_AFTER, b64e, decode_send, encode_deliver, parse_ack
from relay.ws_frames import FastFramesResponse

__all__ = ["websocket_handler"]

log = logging.getLogger("relay.ws")

_PAGE = 256
_PAGE_BYTES = 1024 * 1024
_EMPTY_FRAME = '{"type":"empty"}'
_MAX_DRAIN_PAGES = 1_000_000
_MAX_INFLIGHT_ACKS = 16
# After a 429 to a SEND the socket is not read for min(Retry-After, this) seconds.
_REFUSED_PAUSE = 1.0


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate (401 before the upgrade, or by a first auth frame), then serve the delivery
    protocol."""
    st = request.app[STATE_KEY]
    cfg = st.config
    ws = (FastFramesResponse if cfg.ws_direct_frames else web.WebSocketResponse)(
        heartbeat=None,  # heartbeat and idle timeout: the hub's single liveness sweep, so
        receive_timeout=None,  # there are no timer objects per idle socket
        max_msg_size=cfg.ws_max_frame_bytes,
        compress=False,
        autoping=False,
    )
    addr: Address | None = None
    # Without auth headers a WebSocket upgrade authenticates by its first frame; any other
    # request gets the usual 401.
    if H_USER in request.headers or not ws.can_prepare(request).ok:
        try:
            addr = await st.authenticate(request, EMPTY_SHA256)
        except RelayError as err:
            st.metrics.http_responses[err.status] += 1
            return json_error(err)
    if st.node is not None and not st.node.is_ready:  # a relay node without Redis takes no socket
        st.metrics.http_responses[503] += 1
        return json_error(st.node.unavailable())
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost before upgrade")
    await ws.prepare(request)
    # Upgraded: no more HTTP requests on this connection, so the header-timeout proxy steps out
    # of the data path (one call and one object less per frame and per socket).
    HeaderTimeoutProtocol.unwrap(transport)
    # aiohttp keeps the upgrade request alive for the socket's life (its handler task holds
    # it); its memo of derived values (URL, host, path strings...) is not needed any more.
    # A private attribute, hence the guard: on an aiohttp without it this does nothing.
    memo = getattr(request, "_cache", None)
    if isinstance(memo, dict):
        memo.clear()
    st.hub.upgraded(ws)
    try:
        if addr is None:
            addr = await _frame_auth(st, ws)
            if addr is None:
                return ws
        if st.hub.shutting_down:  # authenticated while the relay began to stop
            if not ws.closed:
                await ws.close(code=CLOSE_GOING_AWAY, message=b"relay shutting down")
            return ws
    finally:
        st.hub.attached_or_gone(ws)
    conn = Connection(addr, ws, transport)
    conn.last_rx = asyncio.get_running_loop().time()
    st.hub.attach(conn)
    if st.node is not None:
        # Registered across nodes before the backlog is read: a commit elsewhere either finds
        # this presence (and wakes us) or came before it (and the drain reads it).
        try:
            await st.node.attach(conn)
        except RelayError:
            st.hub.detach(conn)
            conn.closing = True
            await ws.close(code=CLOSE_TRY_AGAIN_LATER, message=b"relay node lost Redis")
            return ws
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
    max_inflight = cfg.ws_max_inflight_sends
    frames = ws.frames if isinstance(ws, FastFramesResponse) else None
    if frames is not None:
        handler = st.frame_handler
        if handler is None:  # one for all sockets: a socket holds no closure of its own
            handler = st.frame_handler = partial(_frame_now, st, max_inflight, loop.time)
        frames.owner = conn
        frames.handle = handler
    try:
        while True:
            if frames is not None:
                frames.resume()  # data frames are taken in the parser's callback meanwhile
            msg = await ws.receive()
            if msg.extra is _PAUSE:  # _frame_now took a frame, and reading waits for this
                if msg.data is not None:
                    await msg.data
                if conn.inflight_sends >= max_inflight:
                    await _wait_for_commits(st, conn)
                continue
            conn.last_rx = loop.time()
            conn.pinged = False
            kind = msg.type
            if kind == WSMsgType.BINARY:
                later = _on_binary(st, conn, msg.data)
                if later is not None:
                    await later
                if conn.inflight_sends >= max_inflight:
                    await _wait_for_commits(st, conn)
            elif kind == WSMsgType.TEXT:
                pending_acks = _on_text(st, conn, msg.data)
                if pending_acks is not None:
                    await pending_acks
            elif kind == WSMsgType.PING:
                await ws.pong(msg.data)
            elif kind == WSMsgType.PONG:
                continue
            else:  # CLOSE, CLOSING, CLOSED, ERROR: aiohttp already answered with the close code
                break
    finally:
        if frames is not None:
            for later in frames.close():
                st.spawn(later)
        pending = conn.drain
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        st.hub.detach(conn)
        conn.closing = True
        log.info("ws closed user=%s device=%d code=%s", addr.user, addr.device, ws.close_code)
    return ws


# The ``extra`` of a pause marker, whose data the reading loop awaits before the next frame.
_PAUSE: Any = object()


def _frame_now(
    st: RelayState, max_inflight: int, now: Callable[[], float], conn: Connection, msg: Any
) -> Any:
    """A frame as aiohttp's parser produced it, while the reading loop waits (relay.ws_frames).

    Returns None when the frame was taken (a SEND queued or answered, an ack submitted); else
    what the reading loop gets: the frame itself (anything but a SEND or an ack, or any frame
    of a closing socket), or a pause marker carrying what it awaits before it reads on (a
    Redis lease, the pause after a 429, the ack bound, or the commits of ``max_inflight``
    sends). Frames behind it wait in aiohttp's queue, which pauses reading the socket when full.
    """
    kind = msg.type
    if conn.closing or (kind != WSMsgType.BINARY and kind != WSMsgType.TEXT):
        return msg
    conn.last_rx = now()
    conn.pinged = False
    if kind == WSMsgType.BINARY:
        later = _on_binary(st, conn, msg.data)
        waits = later is not None or conn.inflight_sends >= max_inflight
    else:
        later = _on_text(st, conn, msg.data)
        waits = later is not None
    if not waits:
        st.metrics.ws_frames_direct += 1
        return None
    return WSMessage(WSMsgType.BINARY, later, _PAUSE)


async def _wait_for_commits(st: RelayState, conn: Connection) -> None:
    """Back-pressure: stop reading this socket until half of its pending sends are answered.

    While nothing calls ``receive()``, aiohttp's frame queue fills and then pauses reading the
    transport, so the kernel's receive buffer and finally the client's send buffer fill: a client
    that pipelines faster than the store commits is slowed down, and costs at most
    ``ws_max_inflight_sends`` queued sends plus aiohttp's bounded read buffer.
    """
    st.metrics.ws_read_pauses += 1
    resume: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.resume = resume
    try:
        await resume
    finally:
        conn.resume = None


async def _frame_auth(st: RelayState, ws: web.WebSocketResponse) -> Address | None:
    """Authenticate by the first frame of an upgrade that carried no auth headers.

    The frame is ``{"type":"auth", "user", "device", "timestamp", "nonce", "signature"}``: the
    values of the auth headers, signed exactly as a header-authenticated ``GET /v1/ws`` (docs/
    relay-api.md section 5). It must arrive within ``header_timeout_seconds``; anything else
    closes the socket with 4401 (nothing is read before the auth frame is verified).

    Returns:
        The device address, or None after closing the socket.
    """
    timeout = st.config.header_timeout_seconds or st.config.auth_window_seconds
    try:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type != WSMsgType.TEXT:
            raise AuthError("the first frame must be the auth frame", code="auth_missing")
        try:
            doc = json.loads(msg.data)
        except (ValueError, RecursionError) as exc:
            raise AuthError("auth frame is not valid JSON", code="auth_missing") from exc
        if not isinstance(doc, dict) or doc.get("type") != "auth":
            raise AuthError("the first frame must be the auth frame", code="auth_missing")
        fields = {
            header: str(doc[key]) if isinstance(doc.get(key), str | int) else ""
            for key, header in AUTH_FRAME_FIELDS
        }
        sh = parse_signed_headers(fields)
        return await st.authenticate_signed(sh, "GET", "/v1/ws", EMPTY_SHA256)
    except TimeoutError:
        reason = "no auth frame in time"
    except RelayError as err:
        reason = err.code
    code = CLOSE_BANNED if reason == "account_banned" else CLOSE_UNAUTHENTICATED
    st.metrics.http_responses[403 if code == CLOSE_BANNED else 401] += 1
    log.info("ws auth failed: %s", reason)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.close(code=code, message=reason.encode())
    return None


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
                st.hub.went_live(conn)
                st.hub.write_text(conn, _EMPTY_FRAME)
                return
    except (ConnectionError, RuntimeError):
        return
    except RelayError as err:
        log.warning("drain failed user=%s: %s", conn.addr.user, err.code)
        await ws.close(code=1011, message=b"storage error")


def _error_frame(st: RelayState, conn: Connection, err: RelayError, ref: str | None = None) -> None:
    """Tell the client a frame was refused: its code and HTTP status, and the ``ref`` of an
    ack frame that carried one (so the client fails that ack at once)."""
    doc: dict[str, Any] = {
        "type": "error",
        "error": err.code,
        "message": err.message,
        "status": err.status,
    }
    if ref is not None:
        doc["ref"] = ref
    st.hub.write_text(conn, json.dumps(doc))


def _on_binary(st: RelayState, conn: Connection, data: bytes) -> Coroutine[Any, Any, None] | None:
    """Take a SEND frame: checked and queued for its commit, or answered with an error.

    Returns:
        None, or a coroutine the reading loop awaits before it reads the next frame: a lease of
        the account's send budget from Redis (then the send is queued), or the pause that
        follows a 429 (``_REFUSED_PAUSE``).
    """
    cfg = st.config
    if not data or data[0] not in (OP_SEND, OP_SEND_AFTER):
        _error_frame(st, conn, BadRequest("unknown binary op", code="unknown_op"))
        return None
    mid = data[1:17] if len(data) >= 17 else None
    user = conn.addr.user
    try:
        env = decode_send(data, max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes)
        check_recipient_users(env, cfg.max_recipient_users)
        st.send_slots.acquire(user)  # before any token is spent; released by _send_done
    except RelayError as err:
        return _refused(st, conn, mid, err)
    try:
        now = st.clock.monotonic()
        st.send_limit.take_now(conn.addr, now)
        if not st.account_send_limit.take_now(user, now):
            return _send_after_lease(st, conn, env, now)
        _queue_send(st, conn, env, now)
    except RelayError as err:
        st.send_slots.release(user)
        return _refused(st, conn, mid, err)
    return None


def _queue_send(st: RelayState, conn: Connection, env: Envelope, now: float) -> None:
    """Submit a send whose rate limits passed but the byte rate (its slot is held).

    Raises:
        RelayError: refused (the upload byte rate, a node without Redis, a closing store).
    """
    st.upload_limit.take_now(conn.addr.user, now, len(env.body))
    st.require_node_ready()
    fut = st.store.submit_send(conn.addr, env, st.clock.now_ms())
    conn.inflight_sends += 1
    metrics = st.metrics
    metrics.sends_in_flight += 1
    if metrics.sends_in_flight > metrics.sends_in_flight_peak:
        metrics.sends_in_flight_peak = metrics.sends_in_flight
    fut.add_done_callback(partial(_send_done, st, conn, env.message_id))


async def _send_after_lease(st: RelayState, conn: Connection, env: Envelope, now: float) -> None:
    """Take the account's send token from the shared bucket (Redis), then queue the send."""
    try:
        await st.account_send_limit.take(conn.addr.user, now)
        _queue_send(st, conn, env, now)
    except RelayError as err:
        st.send_slots.release(conn.addr.user)
        pause = _refused(st, conn, env.message_id, err)
        if pause is not None:
            await pause


def _refused(
    st: RelayState, conn: Connection, mid: bytes | None, err: RelayError
) -> Coroutine[Any, Any, None] | None:
    """Answer a refused send; after a 429, the pause before this socket is read again.

    A client that keeps sending after a 429 would otherwise cost a decode and an answer per
    frame at whatever rate it writes; paused, its frames wait in its own buffers (and the
    kernel's), so refused sends cost at most a few per second and per socket.
    """
    _send_result_error(st, conn, mid, err)
    if isinstance(err, RateLimited):
        st.metrics.ws_sends_rate_limited += 1
        return asyncio.sleep(min(float(err.retry_after), _REFUSED_PAUSE))
    return None


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
    conn.inflight_sends -= 1
    st.send_slots.release(conn.addr.user)
    st.metrics.sends_in_flight -= 1
    resume = conn.resume
    if (
        resume is not None
        and conn.inflight_sends <= st.config.ws_max_inflight_sends // 2
        and not resume.done()
    ):
        resume.set_result(None)
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
    elif isinstance(exc, MismatchedDevices):
        st.spawn(_answer_mismatch(st, conn, mid, exc))
    elif isinstance(exc, RelayError):
        _send_result_error(st, conn, mid, exc)
    else:
        log.error("send failed with %s", type(exc).__name__)
        _send_result_error(st, conn, mid, RelayError("internal error"))


async def _answer_mismatch(
    st: RelayState, conn: Connection, mid: bytes, exc: MismatchedDevices
) -> None:
    """The 409 of a WebSocket send, once its users are charged to the lookup budget (429 when
    it is spent), as over HTTP."""
    err: RelayError
    try:
        err = await charge_lookups(st, conn.addr, exc)
    except RelayError as limited:
        err = limited
    if not conn.closing:
        _send_result_error(st, conn, mid, err)


def _on_text(st: RelayState, conn: Connection, text: str) -> Coroutine[Any, Any, None] | None:
    """Take an ack frame; returns what must be awaited before the socket is read on, if
    anything (too many of its acks wait for a commit)."""
    ref: str | None = None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("type") != "ack":
            raise BadRequest('expected {"type":"ack","ids":[...]}', code="unknown_type")
        given = doc.get("ref")
        if given is not None and (not isinstance(given, str) or len(given) > 64):
            raise BadRequest("ref must be a string of at most 64 characters")
        ref = given
        ids, settled = parse_ack(doc)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        _error_frame(st, conn, BadRequest("frame is not valid JSON"))
        return None
    except RelayError as err:
        _error_frame(st, conn, err, ref)
        return None
    # Acks do not hold up the socket's reading (sends behind them keep flowing) unless too many
    # are already waiting for a commit: then this socket waits, which bounds its memory.
    try:
        fut = st.store.submit_ack(conn.addr, ids, settled)
    except RelayError as err:  # the store is closing
        _error_frame(st, conn, err, ref)
        return None
    conn.inflight_acks += 1
    fut.add_done_callback(partial(_ack_done, st, conn, ref))
    if conn.inflight_acks > _MAX_INFLIGHT_ACKS:
        return _quiet(fut)
    return None


async def _quiet(fut: Any) -> None:
    with contextlib.suppress(Exception):
        await fut


def _ack_done(st: RelayState, conn: Connection, ref: str | None, fut: asyncio.Future[int]) -> None:
    conn.inflight_acks -= 1
    if fut.cancelled():
        return
    exc = fut.exception()
    if isinstance(exc, RelayError):
        _error_frame(st, conn, exc, ref)
    elif exc is not None:
        log.error("ack failed with %s", type(exc).__name__)
        _error_frame(st, conn, RelayError("internal error"), ref)
    elif ref is not None:
        st.hub.write_text(conn, json.dumps({"type": "acked", "ref": ref, "count": fut.result()}))
