"""The live connection to the relay and the timers that run while the client is up.

Invariants:

* One reconnect policy: :class:`~e2ee.transport.backoff.Backoff` (exponential, full
  jitter from the injected ``ctx.jitter``), reset after every successful
  connect. The relay link itself never reconnects.
* A connection that another connection of this device replaced, or a device
  the relay removed, is not retried: reconnecting would only fight over it.
* After every (re)connect the outbox is woken, acks (and sends to settle) left
  from the last connection go out, and key maintenance runs; a
  storage error while receiving drops the connection without acknowledging
  anything, so the relay delivers the same messages again afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from e2ee.client.compose import expire_sync
from e2ee.client.context import ClientContext
from e2ee.client.inbox import Inbox
from e2ee.client.outbox import Outbox
from e2ee.errors import E2EEError, StorageError, TransportError
from e2ee.events import ConnectionStateChanged
from e2ee.transport.backoff import Backoff
from e2ee.transport.errors import DeviceRemoved, Replaced

__all__ = ["Connection", "run_expiry", "start_background", "stop_background"]

_log = logging.getLogger(__name__)


class Connection:
    """Keeps the relay connection up and feeds the inbox; runs the client's timers.

    Args:
        ctx: the client's shared state.
        inbox: receives the live connection's deliveries.
        outbox: woken after every connect.
        receive: False makes a send-only client (no live connection).
    """

    def __init__(self, ctx: ClientContext, inbox: Inbox, outbox: Outbox, *, receive: bool) -> None:
        self._ctx = ctx
        self._inbox = inbox
        self._outbox = outbox
        self._receive = receive

    def __repr__(self) -> str:
        return f"Connection({self._ctx.me}, receive={self._receive})"

    async def run(self) -> None:
        """Connect, receive, and reconnect with backoff until the client closes."""
        options = self._ctx.options
        backoff = Backoff(options.backoff_base, options.backoff_max, random=self._ctx.jitter)
        failures = 0
        while not self._ctx.closing:
            self._ctx.emit(ConnectionStateChanged("connecting"))
            reason = ""
            try:
                if self._receive:
                    await self._ctx.link.connect()
                else:
                    # The relay is reachable and accepts our credentials.
                    await self._ctx.link.prekey_count()
                failures = 0
                self._ctx.connected.set()
                self._ctx.emit(ConnectionStateChanged("connected"))
                self._outbox.wake()
                self._inbox.resume_acks()  # what the last connection could not send
                maintenance = asyncio.create_task(self._maintain_keys())
                try:
                    if self._receive:
                        await self._outbox.sealing.ensure_pins()
                        await self._inbox.receive()
                    else:
                        # Send-only: nothing is taken from the mailbox; sends go over
                        # HTTP until close() cancels this wait.
                        await asyncio.Event().wait()
                finally:
                    maintenance.cancel()
                    with contextlib.suppress(asyncio.CancelledError, E2EEError):
                        await maintenance
                reason = "connection closed"
            except (Replaced, DeviceRemoved) as exc:
                # Another connection of this device took over, or the device was
                # removed: reconnecting would only fight over it.
                self._ctx.connected.clear()
                self._ctx.emit(ConnectionStateChanged("offline", None, type(exc).__name__))
                return
            except TransportError as exc:
                reason = type(exc).__name__
            except StorageError as exc:
                # Nothing was acknowledged; the relay delivers again after reconnecting.
                reason = f"storage: {type(exc).__name__}"
                _log.warning("storage error while receiving: %s", exc)
            except E2EEError as exc:
                reason = type(exc).__name__
                _log.warning("receiving stopped: %s", type(exc).__name__)
            finally:
                self._ctx.connected.clear()
            if self._ctx.closing:
                return
            with contextlib.suppress(TransportError):
                await self._ctx.link.disconnect()
            failures += 1
            delay = backoff.delay(failures)
            self._ctx.emit(ConnectionStateChanged("offline", retry_in=delay, reason=reason))
            await asyncio.sleep(delay)

    async def _maintain_keys(self) -> None:
        while True:
            try:
                count = await self._ctx.link.prekey_count()
                upload = await asyncio.to_thread(
                    self._ctx.locked, self._ctx.engine.maintain_keys, count
                )
                if upload is not None:
                    await self._ctx.link.upload_keys(upload.to_json())
                # After the keys: a certificate names the identity key the relay holds.
                await self._outbox.sealing.refresh()
            except TransportError as exc:
                _log.info("key maintenance postponed: %s", type(exc).__name__)
            await asyncio.sleep(self._ctx.options.maintenance_interval)


async def run_expiry(ctx: ClientContext) -> None:
    """Clear disappearing messages whose time ran out, every ``expiry_interval``."""
    while not ctx.closing:
        events = await asyncio.to_thread(expire_sync, ctx)
        for event in events:
            ctx.emit(event)
        await asyncio.sleep(ctx.options.expiry_interval)


def start_background(
    ctx: ClientContext, inbox: Inbox, outbox: Outbox, *, receive: bool
) -> list[asyncio.Task[None]]:
    """Start what runs while the client is up: the connection loop, the outbox, the ack
    flusher and the expiry timer (``receive`` False: a send-only connection)."""
    connection = Connection(ctx, inbox, outbox, receive=receive)
    runners = (connection.run(), outbox.run(), inbox.run_acks(), run_expiry(ctx))
    return [asyncio.create_task(runner) for runner in runners]


async def stop_background(
    ctx: ClientContext, tasks: list[asyncio.Task[None]], inbox: Inbox
) -> None:
    """Stop those tasks, finish the delivery in progress, flush acknowledgements, disconnect.

    Everything committed so far is acknowledged; a delivery cut off mid-way was not, and
    comes back as a duplicate next time. Sends waiting to be settled go with that last ack;
    if it fails they are dropped with the client, which is harmless: their records expire
    at the relay after its window (e2ee.client.settling).
    """
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, E2EEError):
            await task
    await inbox.finish()
    with contextlib.suppress(TransportError):
        await inbox.flush_acks()
    with contextlib.suppress(TransportError):
        await ctx.link.disconnect()
    with contextlib.suppress(TransportError):
        await ctx.link.aclose()
