"""The relay WebSocket (``GET /v1/ws``): one live connection per device, with reconnect.

Invariants:

* One background task owns the socket: it connects (a freshly signed upgrade on every
  attempt), reads frames, resolves waiting sends/acks and queues events. Callers only
  write frames (:meth:`RelayConnection.send`, :meth:`RelayConnection.ack`) and read the
  event stream.
* Nothing is ever re-sent here. A send or ack whose answer did not arrive before the
  socket closed fails with :class:`~e2ee.transport.errors.ConnectionLost`; the SDK outbox
  resends with the same message id (the relay deduplicates). After a reconnect the relay
  replays every unacknowledged message, so a delivery can be seen twice.
* Reconnect policy: exponential backoff with full jitter,
  ``delay = random() * min(cap, base * 2 ** (attempt - 1))``; the attempt counter resets
  only after a connection stayed up ``stable_after`` seconds (a flapping relay still backs
  off). Close 4001 (replaced), 4003 (device removed) and 4403 (account banned), a 4xx on
  the upgrade (401: unknown device or bad clock; 403) and :meth:`RelayConnection.close` end
  the connection for
  good; everything else (1001 relay shutdown, 1006, 4002, 4004, 1011, network errors,
  5xx, 429) reconnects.
* Time and randomness are injectable (``random``, ``sleep``, ``monotonic``, ``clock_ms``),
  so tests run the policy without waiting.
* Every state change is an event (:class:`ConnectionState`): ``connecting``,
  ``connected``, ``reconnecting(attempt, delay)``, and finally exactly one ``closed``,
  after which the event iterator ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random as _random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias

import aiohttp
from yarl import URL

from blindpost_wire.auth import AUTH_FRAME_FIELDS
from blindpost_wire.close import (
    CLOSE_BANNED,
    CLOSE_DEVICE_REMOVED,
    CLOSE_REPLACED,
    CLOSE_UNAUTHENTICATED,
)
from e2ee.errors import TransportError, UsageError
from e2ee.transport import requests as rq
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.backoff import Backoff
from e2ee.transport.errors import (
    AccountBanned,
    AuthFailed,
    ConnectionClosed,
    ConnectionFailed,
    ConnectionLost,
    DeviceRemoved,
    MalformedFrame,
    NotConnected,
    RateLimited,
    RelayRejected,
    RelayTimeout,
    Replaced,
)
from e2ee.transport.frames import (
    Acked,
    Delivery,
    Hint,
    QueueEmpty,
    SendResult,
    ServerError,
    UnknownControl,
    check_message_id,
    decode_control,
    decode_deliver,
    encode_ack,
    encode_send,
)
from e2ee.transport.http import RelayClient, origin_of
from e2ee.transport.requests import SendReceipt

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "RECONNECTING",
    "Backoff",
    "ConnectionState",
    "Event",
    "RelayConnection",
]

log = logging.getLogger(__name__)

StateName = Literal["connecting", "connected", "reconnecting", "closed"]
CONNECTING: Final = "connecting"
CONNECTED: Final = "connected"
RECONNECTING: Final = "reconnecting"
CLOSED: Final = "closed"

# The close codes are blindpost_wire's; CLOSE_REMOVED keeps its historical SDK name.
CLOSE_REMOVED: Final = CLOSE_DEVICE_REMOVED


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """A change of the connection's state (an event).

    Attributes:
        state: ``connecting``, ``connected``, ``reconnecting`` or ``closed``.
        attempt: reconnect attempt number (1, 2, ...); 0 for the first connect.
        delay: seconds until the next attempt (``reconnecting`` only).
        close_code: the WebSocket close code that caused this change, if any.
        error: the failure that caused it (``closed`` for good: e.g. ``Replaced``,
            ``DeviceRemoved``, ``AuthFailed``), if any.
    """

    state: StateName
    attempt: int = 0
    delay: float | None = None
    close_code: int | None = None
    error: TransportError | None = field(default=None, compare=False)


Event: TypeAlias = ConnectionState | Hint | Delivery | QueueEmpty | SendResult | Acked | ServerError


def _swallow(fut: asyncio.Future[Any]) -> None:
    # A caller may drop a send future it no longer cares about; reading the exception
    # here keeps asyncio from logging "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class RelayConnection:
    """The device's live WebSocket to the relay, reconnecting on its own.

    Typical use::

        async with RelayConnection(url, signer) as conn:
            async for event in conn:
                if isinstance(event, Delivery):
                    ...  # decrypt, store, then: await conn.ack([event.id])

    Args:
        base_url: relay root URL.
        signer: the device's signer (user and device come from it).
        session: an aiohttp session to borrow (not closed here).
        backoff_base: first reconnect delay bound, seconds.
        backoff_cap: largest reconnect delay bound, seconds.
        random: jitter source in ``[0, 1)``.
        sleep: awaitable sleep (injected by tests).
        monotonic: monotonic clock in seconds (for ``stable_after``).
        clock_ms: unix ms for the signed upgrade.
        connect_timeout: limit for TCP connect + upgrade, seconds.
        heartbeat: client ping interval, seconds (None: rely on the relay's pings).
        max_frame_bytes: largest frame accepted from the relay.
        stable_after: seconds a connection must last to reset the backoff.
        max_attempts: give up (``closed``) after this many failed reconnects (None: never).
        reconnect: False to stop at the first disconnect.
        frame_auth: authenticate with the first frame after the upgrade (the default;
            the relay keeps less memory per idle socket) instead of signed upgrade
            headers. Both are docs/relay-api.md section 5; a refused auth frame is
            :class:`AuthFailed` either way.

    Raises:
        UsageError: bad URL or backoff settings.
    """

    def __init__(
        self,
        base_url: str,
        signer: DeviceSigner,
        *,
        session: aiohttp.ClientSession | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock_ms: Callable[[], int] | None = None,
        connect_timeout: float = 10.0,
        heartbeat: float | None = 30.0,
        max_frame_bytes: int = 4 * 1024 * 1024,
        stable_after: float = 10.0,
        max_attempts: int | None = None,
        reconnect: bool = True,
        frame_auth: bool = True,
    ) -> None:
        if not isinstance(signer, DeviceSigner):
            raise UsageError("signer must be a DeviceSigner")
        self._url = URL(str(origin_of(base_url)) + "/v1/ws", encoded=True)
        self._signer = signer
        self._session = session
        self._owns_session = session is None
        self._backoff = Backoff(backoff_base, backoff_cap, random)
        self._sleep = sleep
        self._monotonic = monotonic
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._max_frame = max_frame_bytes
        self._stable_after = stable_after
        self._max_attempts = max_attempts
        self._reconnect = reconnect
        self._frame_auth = frame_auth
        #: The first frame after an auth frame (read to learn whether auth passed),
        #: handed to :meth:`_serve` to dispatch before the rest.
        self._first: aiohttp.WSMessage | None = None

        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._state = ConnectionState(CONNECTING)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._finished = False
        self._state_changed = asyncio.Event()
        self._sends: dict[bytes, collections.deque[asyncio.Future[SendReceipt]]] = {}
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._refs = itertools.count(1)

    @classmethod
    def from_client(cls, client: RelayClient, **kwargs: Any) -> RelayConnection:
        """Open a connection for the same relay and device as ``client``, sharing its session.

        Args:
            client: an HTTP client.
            **kwargs: any keyword argument of :class:`RelayConnection`.

        Returns:
            The (not yet started) connection.
        """
        kwargs.setdefault("session", client.session())
        return cls(client.base_url, client.signer, **kwargs)

    def __repr__(self) -> str:
        return (
            f"RelayConnection({self._signer.user!r}, {self._signer.device}, "
            f"state={self._state.state!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The latest state (also delivered as an event)."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while a socket is open."""
        return self._ws is not None and not self._ws.closed

    async def start(self) -> None:
        """Start connecting in the background (idempotent; returns immediately)."""
        if self._task is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._task = asyncio.create_task(self._run(), name="blindpost-relay-ws")

    async def __aenter__(self) -> RelayConnection:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket for good (code 1000) and stop reconnecting (idempotent).

        Pending sends and acks fail with :class:`ConnectionLost`; the event stream ends
        after a final ``closed`` state.
        """
        self._closing = True
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await ws.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending(ConnectionLost("connection closed by the client"))
        self._finish(ConnectionState(CLOSED, close_code=1000))
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_connected(self) -> None:
        """Wait until a socket is open.

        Raises:
            UsageError: :meth:`start` was not called.
            ConnectionClosed: (or the error that ended it, e.g. ``AuthFailed``) the
                connection ended for good before connecting.
        """
        if self._task is None and not self._finished:
            raise UsageError("start() the connection before waiting for it")
        while True:
            if self.connected and self._state.state == CONNECTED:
                return
            if self._finished:
                raise self._state.error or ConnectionClosed(
                    self._state.close_code, "the connection is closed"
                )
            self._state_changed.clear()
            await self._state_changed.wait()

    # -- the event stream ----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Iterate over events until (and including) the final ``closed`` state.

        Yields:
            :class:`ConnectionState`, :class:`Hint`, :class:`Delivery`, :class:`QueueEmpty`,
            :class:`SendResult`, :class:`Acked`, :class:`ServerError`.
        """
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, ConnectionState) and event.state == CLOSED:
                return

    async def next_event(self) -> Event:
        """Return the next event (for callers that prefer ``await`` over ``async for``)."""
        return await self._events.get()

    # -- writing ---------------------------------------------------------------------------------

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> asyncio.Future[SendReceipt]:
        """Write a SEND frame; return a future resolved by the matching ``send_result``.

        Sends may be pipelined: await this for each message, then await the futures.
        Pipelined sends whose order matters name the previous one in ``after`` (a
        SEND_AFTER frame): the relay refuses one whose previous message is not stored
        (``PredecessorMissing``), so none overtakes an earlier one it refused.

        Args:
            message_id: 16 bytes; the answer is matched by it.
            recipients: (username, device id) pairs (all current devices of each user).
            body: the ciphertext.
            after: the id of our previous message, or None.

        Returns:
            A future that resolves to a :class:`SendReceipt`, or raises the typed error of a
            non-200 result (``MismatchedDevices``, ``MailboxFull``, ``RateLimited``...), or
            :class:`ConnectionLost` if the socket closed first (then resend).

        Raises:
            UsageError: bad arguments. NotConnected: no open socket (nothing was written).
            ConnectionLost: the write failed.
        """
        frame = encode_send(message_id, recipients, body, after=after)
        ws = self._open_socket()
        fut: asyncio.Future[SendReceipt] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_swallow)
        queue = self._sends.setdefault(bytes(message_id), collections.deque())
        queue.append(fut)
        try:
            await ws.send_bytes(frame)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self._drop_send(bytes(message_id), fut)
            raise ConnectionLost("the socket closed while writing a send frame") from exc
        self._check_still_open(ws, fut)
        return fut

    async def ack(
        self, ids: Iterable[bytes], ref: str | None = None, *, settled: Iterable[bytes] = ()
    ) -> asyncio.Future[int]:
        """Write an ack frame; return a future resolved by the relay's ``acked`` answer.

        Args:
            ids: 0..1000 message ids to remove from this device's mailbox.
            ref: correlation string (generated when None); must be unique while pending.
            settled: 0..1000 ids of this device's own sends that the relay answered 200 and
                that will never be sent again: the relay may forget their retry records
                (:func:`~e2ee.transport.frames.ack_fields`). Not both lists empty.

        Returns:
            A future resolving to the number of mailbox rows removed (of ``ids``, after
            commit), or raising :class:`ConnectionLost`.

        Raises:
            UsageError: bad ids or ref, or ``ref`` already pending. NotConnected: no socket.
            ConnectionLost: the write failed.
        """
        id_list = [check_message_id(i) for i in ids]
        settled_list = [check_message_id(i) for i in settled]
        if ref is None:
            ref = f"a{next(self._refs)}"
        if ref in self._acks:
            raise UsageError("an ack with this ref is still pending")
        text = encode_ack(id_list, ref, settled_list)
        ws = self._open_socket()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_swallow)
        self._acks[ref] = fut
        try:
            await ws.send_str(text)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self._acks.pop(ref, None)
            raise ConnectionLost("the socket closed while writing an ack frame") from exc
        self._check_still_open(ws, fut)
        return fut

    def _open_socket(self) -> aiohttp.ClientWebSocketResponse:
        ws = self._ws
        if ws is None or ws.closed or self._closing:
            raise NotConnected(f"not connected (state: {self._state.state})")
        return ws

    def _check_still_open(
        self, ws: aiohttp.ClientWebSocketResponse, fut: asyncio.Future[Any]
    ) -> None:
        # The reader may have failed pending futures while we were writing; this one was
        # registered on a socket that is gone, so nobody else would ever resolve it.
        if (self._ws is not ws or ws.closed) and not fut.done():
            fut.set_exception(ConnectionLost("the socket closed before the relay answered"))

    def _drop_send(self, message_id: bytes, fut: asyncio.Future[SendReceipt]) -> None:
        queue = self._sends.get(message_id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(fut)
            if not queue:
                del self._sends[message_id]

    def _fail_pending(self, error: TransportError) -> None:
        sends, self._sends = self._sends, {}
        acks, self._acks = self._acks, {}
        for queue in sends.values():
            for fut in queue:
                if not fut.done():
                    fut.set_exception(error)
        for fut_ack in acks.values():
            if not fut_ack.done():
                fut_ack.set_exception(error)

    # -- the background task -------------------------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        self._state = state
        self._events.put_nowait(state)
        self._state_changed.set()

    def _finish(self, state: ConnectionState) -> None:
        if not self._finished:
            self._finished = True
            self._set_state(state)

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                self._set_state(ConnectionState(CONNECTING, attempt=attempt))
                code: int | None = None
                error: TransportError | None = None
                min_delay = 0.0
                try:
                    ws = await self._connect()
                except RelayRejected as exc:
                    if exc.status in (408, 429) or exc.status >= 500:
                        error = exc
                        if isinstance(exc, RateLimited):
                            min_delay = float(exc.retry_after)
                    else:  # 401 (unknown device, bad clock), 403, 404...: retrying won't help
                        self._finish(ConnectionState(CLOSED, attempt=attempt, error=exc))
                        return
                except ConnectionFailed as exc:
                    error = exc
                else:
                    started = self._monotonic()
                    code, error = await self._serve(ws)
                    if self._monotonic() - started >= self._stable_after:
                        attempt = 0
                    if self._closing:
                        break
                    if code == CLOSE_REPLACED:
                        self._finish(ConnectionState(CLOSED, close_code=code, error=Replaced()))
                        return
                    if code == CLOSE_REMOVED:
                        self._finish(
                            ConnectionState(CLOSED, close_code=code, error=DeviceRemoved())
                        )
                        return
                    if code == CLOSE_BANNED:
                        self._finish(ConnectionState(CLOSED, close_code=code, error=_banned()))
                        return
                if not self._reconnect or (
                    self._max_attempts is not None and attempt >= self._max_attempts
                ):
                    self._finish(
                        ConnectionState(CLOSED, attempt=attempt, close_code=code, error=error)
                    )
                    return
                attempt += 1
                delay = max(self._backoff.delay(attempt), min_delay)
                log.info(
                    "relay connection lost (code=%s, %s); retry %d in %.2fs",
                    code,
                    type(error).__name__ if error else "closed",
                    attempt,
                    delay,
                )
                self._set_state(
                    ConnectionState(
                        RECONNECTING, attempt=attempt, delay=delay, close_code=code, error=error
                    )
                )
                await self._sleep(delay)
        finally:
            # Whatever ended the task (close(), a final close code, cancellation from
            # outside), consumers get exactly one final "closed" and no future hangs.
            self._ws = None
            self._fail_pending(ConnectionLost("the connection is closed"))
            self._finish(ConnectionState(CLOSED, close_code=1000 if self._closing else None))

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open the socket with a freshly signed upgrade request."""
        req = rq.websocket_upgrade()
        signed = req.auth_headers(self._signer, now_ms=self._clock_ms())
        session = self._session
        if session is None or session.closed:
            raise ConnectionFailed("the aiohttp session is closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await session.ws_connect(
                    self._url,
                    headers=None if self._frame_auth else signed,
                    heartbeat=self._heartbeat,
                    autoping=True,
                    max_msg_size=self._max_frame,
                    compress=0,
                )
                if self._frame_auth:
                    self._first = await self._authenticate(ws, signed)
                return ws
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
            if status == 401:
                raise AuthFailed(401, "auth_failed", "websocket upgrade refused") from exc
            if status == 429:
                retry = exc.headers.get("Retry-After", "1") if exc.headers else "1"
                raise RateLimited(
                    429, "rate_limited", "", retry_after=int(retry) if retry.isdigit() else 1
                ) from exc
            raise RelayRejected(status, "upgrade_failed", "websocket upgrade refused") from exc
        except TimeoutError as exc:
            raise RelayTimeout("GET /v1/ws: timed out") from exc
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(f"GET /v1/ws: {type(exc).__name__}") from exc

    async def _authenticate(
        self, ws: aiohttp.ClientWebSocketResponse, signed: dict[str, str]
    ) -> aiohttp.WSMessage:
        """Send the auth frame; return the relay's first frame once it is accepted.

        Raises:
            AuthFailed: the relay closed the socket with 4401.
            ConnectionFailed: the socket closed or failed otherwise.
        """
        frame = {"type": "auth"} | {key: signed[header] for key, header in AUTH_FRAME_FIELDS}
        try:
            await ws.send_str(json.dumps(frame, separators=(",", ":")))
            first = await ws.receive()
        except BaseException:
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await ws.close()
            raise
        if first.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return first
        with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
            await ws.close()
        if ws.close_code == CLOSE_UNAUTHENTICATED:
            raise AuthFailed(401, "auth_failed", "websocket auth frame refused")
        if ws.close_code == CLOSE_BANNED:
            raise _banned()
        raise ConnectionFailed(f"websocket closed during auth (code {ws.close_code})")

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse
    ) -> tuple[int | None, TransportError | None]:
        """Read until the socket closes; return (close code, error)."""
        self._ws = ws
        self._set_state(ConnectionState(CONNECTED))
        error: TransportError | None = None
        first, self._first = self._first, None
        if first is not None and first.type == aiohttp.WSMsgType.BINARY:
            self._dispatch_binary(first.data)
        elif first is not None:
            self._dispatch_text(first.data)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._dispatch_binary(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    error = ConnectionFailed(f"websocket error: {type(msg.data).__name__}")
                    break
        except (aiohttp.ClientError, OSError) as exc:
            error = ConnectionFailed(f"websocket read failed: {type(exc).__name__}")
        finally:
            self._ws = None
            if not ws.closed:
                with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                    await ws.close()
            self._fail_pending(ConnectionLost("the socket closed before the relay answered"))
        code = ws.close_code
        log.debug("relay socket closed with code %s", code)
        return code, error

    def _dispatch_binary(self, data: bytes) -> None:
        try:
            delivery = decode_deliver(data)
        except MalformedFrame as exc:
            log.warning("ignoring a malformed frame from the relay: %s", exc)
            return
        self._events.put_nowait(delivery)

    def _dispatch_text(self, data: str) -> None:
        try:
            frame = decode_control(data)
        except MalformedFrame as exc:
            log.warning("ignoring a malformed control frame from the relay: %s", exc)
            return
        if isinstance(frame, UnknownControl):
            log.debug("ignoring unknown control frame type %r", frame.type[:32])
            return
        if isinstance(frame, SendResult):
            self._resolve_send(frame)
        elif isinstance(frame, Acked):
            fut = self._acks.pop(frame.ref, None)
            if fut is not None and not fut.done():
                fut.set_result(frame.count)
        elif isinstance(frame, ServerError):
            log.warning("relay rejected a frame: %s", frame.error)
            fut = self._acks.pop(frame.ref, None) if frame.ref is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(frame.exception())
        self._events.put_nowait(frame)

    def _resolve_send(self, result: SendResult) -> None:
        queue = self._sends.get(result.id)
        if not queue:
            return
        fut = queue.popleft()
        if not queue:
            del self._sends[result.id]
        if fut.done():
            return
        error = result.exception()
        if error is not None:
            fut.set_exception(error)
        elif result.recipients is not None and result.stored_at is not None:
            fut.set_result(SendReceipt(result.id, result.recipients, result.stored_at))


def _banned() -> AccountBanned:
    return AccountBanned(403, "account_banned", "the relay's operator banned this account (4403)")
