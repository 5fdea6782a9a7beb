"""The inbox: deliveries from the relay, decrypted, applied and committed in batches.

Invariants:

* A delivery is acknowledged to the relay, and its events emitted, only after
  its plaintext rows and the session state were committed together
  (``ProtocolEngine.decrypt(on_plaintext=...)``). Deliveries waiting together
  are committed in one transaction (group commit, ``SQLiteProtocolStore.batch()``),
  acknowledged only once that transaction stands.
* A redelivery after a crash is recognised by the ratchet as a duplicate and
  acknowledged without a second event.
* Undecryptable deliveries are acknowledged only after the problem was
  reported (an event and a notice row) and, where possible, repaired (a
  bounded session reset or sender-key request).
* A delivery refused because its sender is over their decrypt work budget
  (``DecryptBudgetExceeded`` with a retry time) may be genuine: it is neither
  acknowledged nor reported, and is tried again once the budget has refilled
  (or redelivered by the relay after a reconnect). Only a message that needs
  more than a whole budget is reported as undecryptable.
* What a payload does is decided in :mod:`e2ee.messaging` (a pure function of
  the payload and a view of history); this module decrypts, asks, commits the
  outcome with the session state in one transaction, and carries out its
  follow-ups (engine work of group changes inside that transaction; repairs
  and outbox wake-ups after it).
* Acks also carry the ids of our own sends that the outbox queued to settle
  (``ctx.settled``, only after their "sent" commit: :mod:`e2ee.client.settling`):
  on the next ack, or on one of their own after ``ack_delay``. An ack that did
  not reach the relay keeps both its deliveries and its ids to settle queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from blindpost_wire.names import is_sealed_sender
from e2ee import envelope, payload
from e2ee.client.context import ClientContext
from e2ee.client.outbox import Outbox
from e2ee.client.sync import answer_request, apply_trust
from e2ee.core import Ciphertext, PreKeyBundle
from e2ee.errors import (
    DecryptBudgetExceeded,
    DuplicateMessage,
    E2EEError,
    InvalidBundle,
    InvalidCertificate,
    InvalidMessage,
    StorageError,
    TransportError,
    UnpinnedRelayKey,
    UntrustedIdentity,
)
from e2ee.events import BacklogDrained, DecryptionProblem, Event, IdentityChanged
from e2ee.messaging.accounting import undecryptable
from e2ee.messaging.inbound import apply_payload
from e2ee.messaging.outcome import (
    AnswerSyncRequest,
    ApplyTrust,
    FollowUp,
    ForgetSenders,
    Outcome,
    ProcessSenderKey,
    RequestSenderKey,
    ResendSenderKey,
    ResetSession,
    RotateGroupKey,
    WakeOutbox,
)
from e2ee.messaging.rows import Row, as_row, group_chat_id
from e2ee.payload import PayloadType
from e2ee.store import Address, Changes
from e2ee.transport.frames import MAX_ACK_IDS, Delivery, QueueEmpty

__all__ = ["Inbox"]

_log = logging.getLogger(__name__)
#: At most this many deliveries share one store transaction (one fsync). The
#: write lock is held meanwhile, so this also bounds how long a send waits.
_INBOX_BATCH: Final = 200
#: A message under a relay key not pinned yet is tried again this long after (ms).
_UNPINNED_RETRY_MS: Final = 500
#: At most this many deliveries are acknowledged by one ack.
_ACK_BATCH: Final = 500


#: A batch's follow-ups, and its deferred deliveries with their retry delay (ms).
_BatchResult = tuple[list[FollowUp], list[tuple[Delivery, int]]]


@dataclass(slots=True)
class _Inbound:
    """What processing one delivery produced (committed already, when rows exist)."""

    events: list[Event] = field(default_factory=list)
    follow_ups: list[FollowUp] = field(default_factory=list)
    #: The applied payload's outcome; its counters and chat rows go to the batch's end.
    outcome: Outcome | None = None
    #: Set when the delivery was deferred (sender over budget): try again after this.
    retry_after_ms: int | None = None


class Inbox:
    """Receives, decrypts, applies and acknowledges deliveries.

    Args:
        ctx: the client's shared state.
        outbox: where follow-up sends (session resets, key requests) go.
    """

    def __init__(self, ctx: ClientContext, outbox: Outbox) -> None:
        self._ctx = ctx
        self._outbox = outbox
        self._acks: list[bytes] = []
        self._inflight: asyncio.Future[_BatchResult] | None = None

    def __repr__(self) -> str:
        return f"Inbox({self._ctx.me})"

    async def run_acks(self) -> None:
        """Send queued acknowledgements in batches, until the client closes.

        Woken by committed deliveries and by sends to settle (``ctx.acks_due``, set by the
        outbox): ids to settle ride on the next ack, or go on their own after the same
        ``ack_delay`` when no delivery is waiting.
        """
        while not self._ctx.closing:
            await self._ctx.acks_due.wait()
            self._ctx.acks_due.clear()
            await asyncio.sleep(self._ctx.options.ack_delay)
            # Unacknowledged messages are delivered again and seen as duplicates; ids not
            # settled stay queued for the next ack (or expire at the relay).
            with contextlib.suppress(TransportError):
                await self.flush_acks()

    def resume_acks(self) -> None:
        """Wake the ack runner if anything waits (after a reconnect: what a lost
        connection left is sent on the new one)."""
        if self._acks or self._ctx.settled:
            self._ctx.acks_due.set()

    async def flush_acks(self) -> None:
        """Acknowledge every committed delivery, and settle every queued send, now.

        Each ack carries at most ``_ACK_BATCH`` deliveries and ``MAX_ACK_IDS`` ids to
        settle (:mod:`e2ee.client.settling`).

        Raises:
            TransportError: the relay did not take them (they stay queued).
        """
        settled = self._ctx.settled
        while self._acks or settled:
            batch, self._acks = self._acks[:_ACK_BATCH], self._acks[_ACK_BATCH:]
            forget = settled.take(MAX_ACK_IDS)
            try:
                if forget:
                    await self._ctx.link.ack(batch, settled=forget)
                else:  # the plain ack of before: a RelayLink without ``settled`` takes it
                    await self._ctx.link.ack(batch)
            except TransportError:
                self._acks = batch + self._acks
                settled.restore(forget)
                raise

    async def finish(self) -> None:
        """Wait for the batch in progress (it was shielded from cancellation)."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(E2EEError):
                await inflight

    async def receive(self) -> None:
        """Process the live connection's deliveries in batches until it closes.

        A reader task moves deliveries into a queue; each round takes what is
        waiting (up to ``_INBOX_BATCH``), so a backlog is processed in large
        batches (one transaction each) and a live message alone, without delay.

        Raises:
            TransportError: the connection failed (after what arrived before
                the failure was processed).
        """
        queue: asyncio.Queue[Delivery | QueueEmpty | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for item in self._ctx.link.deliveries():
                    queue.put_nowait(item)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            processed = 0
            ended = False
            while not ended:
                batch: list[Delivery] = []
                drained = False
                item = await queue.get()
                while True:
                    if item is None:
                        ended = True
                        break
                    if isinstance(item, QueueEmpty):
                        drained = True
                        break
                    batch.append(item)
                    if len(batch) >= _INBOX_BATCH or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    await self._handle_batch(batch, queue.put_nowait)
                    processed += len(batch)
                if drained:
                    self._ctx.emit(BacklogDrained(processed))
            await reader  # re-raises what ended the connection
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await reader

    async def _handle_batch(
        self, batch: Sequence[Delivery], requeue: Callable[[Delivery], None]
    ) -> None:
        # Shielded: if the client is closed meanwhile, the batch still finishes
        # (commit, acks queued, events emitted) and close() waits for it.
        task = asyncio.ensure_future(self._receive_batch(batch))
        self._inflight = task
        follow_ups, deferred = await asyncio.shield(task)
        loop = asyncio.get_running_loop()
        if self._outbox.sealing.refresh_due:
            self._outbox.sealing.refresh_soon()
        for delivery, retry_after_ms in deferred:
            # Back into this connection's queue once the sender's budget has refilled;
            # if the connection ends first, the relay delivers it again (never acked).
            loop.call_later(retry_after_ms / 1000, requeue, delivery)
        # Acks go out from run_acks in batches; processing never waits for the
        # relay to commit them.
        self._ctx.acks_due.set()
        wake = False
        for follow_up in follow_ups:
            if isinstance(follow_up, ResetSession):
                await self._session_reset(follow_up.peer)
            elif isinstance(follow_up, RequestSenderKey):
                await self._request_sender_key(follow_up.group_id, follow_up.sender)
            elif isinstance(follow_up, ResendSenderKey):
                self._outbox.wake()
            elif isinstance(follow_up, WakeOutbox):
                wake = True
            elif isinstance(follow_up, AnswerSyncRequest) and await asyncio.to_thread(
                answer_request, self._ctx
            ):
                self._outbox.wake()  # a new device of ours asked for our contacts and groups
        if wake:
            # Receipts for a burst of deliveries go out together, a moment later.
            self._outbox.wake_soon()

    async def _receive_batch(self, batch: Sequence[Delivery]) -> _BatchResult:
        """Process a batch; acknowledge and show what was committed.

        Returns:
            The follow-ups (repairs, outbox wake-ups) of the committed deliveries,
            and the deliveries deferred (not acknowledged) with when to retry them.

        Raises:
            StorageError: a transaction failed; the deliveries from it on were
                neither acknowledged nor shown (the relay delivers them again).
        """
        inbounds, error = await asyncio.to_thread(self._process_batch, batch)
        # Committed: only now acknowledged, and only now shown.
        done = list(zip(batch, inbounds, strict=False))
        self._acks.extend(d.id for d, i in done if i.retry_after_ms is None)
        deferred = [(d, i.retry_after_ms) for d, i in done if i.retry_after_ms is not None]
        for inbound in inbounds:
            for event in inbound.events:
                self._ctx.emit(event)
        if error is not None:
            if inbounds:
                self._ctx.acks_due.set()
            raise error
        return [f for inbound in inbounds for f in inbound.follow_ups], deferred

    def _process_batch(
        self, batch: Sequence[Delivery]
    ) -> tuple[list[_Inbound], StorageError | None]:
        """Decrypt and store deliveries in one group-commit transaction.

        The deliveries share one store transaction (one fsync instead of one per
        message). Every read of the rules goes through the store's own
        connection (``ctx.view()``), so a delivery sees what earlier deliveries of
        the same transaction wrote, group changes included.

        Returns:
            What the deliveries produced (none if the transaction failed), and the
            error that stopped it.
        """
        ctx = self._ctx
        with ctx.wlock:
            processed: list[_Inbound] = []
            ctx.pending = {}
            try:
                with ctx.store.batch():
                    for delivery in batch:
                        processed.append(self._process_delivery(delivery))
                    if ctx.pending:
                        # In the same transaction as the messages that moved them.
                        rows = tuple(as_row(row) for row in ctx.pending.values())
                        ctx.store.commit(Changes(app_rows=rows))
            except StorageError as exc:
                # Nothing of this transaction stands; the relay delivers it again.
                return [], exc
            finally:
                ctx.pending = None
        return processed, None

    def _process_delivery(self, delivery: Delivery) -> _Inbound:
        """Decrypt, apply and commit one delivery (inside the batch's transaction).

        Raises:
            StorageError: the commit failed (the whole batch is rolled back).
        """
        ctx = self._ctx
        sender = Address(delivery.sender, delivery.device)
        result = _Inbound()
        with ctx.wlock:
            try:
                opened = self._outbox.sealing.open(sender, delivery.body)
            except UnpinnedRelayKey as exc:
                if self._outbox.sealing.may_pin_later(exc.key_id):
                    # A relay key we have not fetched yet: kept, tried again after a refresh.
                    return _Inbound(retry_after_ms=_UNPINNED_RETRY_MS)
                return self._unattributed(delivery, exc)
            except InvalidCertificate as exc:
                # A certificate we refuse: no sender we can vouch for. Reported and
                # acknowledged, attributed to no chat.
                return self._unattributed(delivery, exc)
            except E2EEError as exc:
                if is_sealed_sender(delivery.sender, delivery.device):
                    return self._unattributed(delivery, exc)
                # The outer layer does not open, but the relay vouches for the sender (an
                # authenticated send): reported and repaired as any unreadable message.
                return self._problem(sender, delivery.body, delivery, exc)
            if opened is None:
                return _Inbound()  # our own copy of a message we sealed
            sender, body, cert = opened.sender, opened.envelope, opened.certificate
            try:
                env = envelope.parse(body)
                if cert is not None:
                    # The certificate's identity key must be the one the session uses.
                    if isinstance(env, envelope.GroupEnvelope):
                        ctx.engine.bind_certificate(cert, "group", env.body)
                    else:
                        mine = env.entry_for(ctx.me.name, ctx.me.device_id)
                        if mine is not None:
                            ctx.engine.bind_certificate(cert, mine.kind, mine.body)
                if isinstance(env, envelope.GroupEnvelope):
                    gid = env.group_id
                    ctx.engine.group_decrypt(
                        gid,
                        sender,
                        env.body,
                        on_plaintext=lambda p: self._on_plaintext(sender, p, result, gid),
                    )
                else:
                    entry = env.entry_for(ctx.me.name, ctx.me.device_id)
                    if entry is None:
                        raise InvalidMessage("no ciphertext for this device in the envelope")
                    decrypted = ctx.engine.decrypt(
                        sender,
                        Ciphertext(entry.kind, entry.body),
                        on_plaintext=lambda p: self._on_plaintext(sender, p, result, None),
                    )
                    change = decrypted.identity_change
                    if change is not None:
                        held = not change.first_use or ctx.strict
                        # Before the message itself, so a UI can flag it.
                        result.events.insert(
                            0,
                            IdentityChanged(sender.name, sender.device_id, change.first_use, held),
                        )
                        if held:
                            ctx.held.add(sender.name)
            except DuplicateMessage:
                return _Inbound()  # already stored: acknowledge, show nothing twice
            except InvalidCertificate as exc:
                return self._unattributed(delivery, exc)
            except StorageError:
                raise
            except DecryptBudgetExceeded as exc:
                if exc.retry_after_ms is None:  # more than a whole budget: never readable
                    return self._problem(sender, body, delivery, exc)
                # Possibly genuine; nothing was stored. Not acknowledged: tried again later.
                return _Inbound(retry_after_ms=exc.retry_after_ms)
            except E2EEError as exc:
                # Reported (and repaired if possible), then acknowledged: a message
                # that can never be read must not block the mailbox.
                return self._problem(sender, body, delivery, exc)
            if result.outcome is not None:
                ctx.stage(result.outcome)  # committed with the decrypt
        return result

    def _unattributed(self, delivery: Delivery, exc: E2EEError) -> _Inbound:
        """A sealed delivery refused before any sender could be vouched for (a forged or
        expired certificate, one from an unpinned key, one naming another sender than the
        relay did, or an outer layer that does not open): an event, no chat row, no repair."""
        _log.warning("sealed message refused: %s", type(exc).__name__)
        relay_named = not is_sealed_sender(delivery.sender, delivery.device)
        event = DecryptionProblem(
            delivery.sender if relay_named else "",
            delivery.device if relay_named else 0,
            type(exc).__name__,
            "a sealed message whose sender could not be verified was dropped",
            "none",
        )
        return _Inbound(events=[event])

    def _problem(
        self, sender: Address, body: bytes, delivery: Delivery, exc: E2EEError
    ) -> _Inbound:
        group_id: str | None = None
        with contextlib.suppress(InvalidMessage):
            env = envelope.parse(body)
            if isinstance(env, envelope.GroupEnvelope):
                group_id = env.group_id
        ctx = self._ctx
        out = undecryptable(
            ctx.view(),
            sender,
            delivery.id.hex(),
            exc,
            group_id=group_id,
            now=ctx.now_ms(),
            repair_interval_ms=ctx.options.reset_interval_ms,
        )
        ctx.commit_outcome(out)
        return _Inbound(events=out.events, follow_ups=out.follow_ups)

    async def _session_reset(self, peer: Address) -> None:
        """Start a fresh session with ``peer`` and tell them (bounded by _may_repair)."""
        try:
            bundles = await self._ctx.link.fetch_bundles(peer.name)
            for data in bundles:
                bundle = PreKeyBundle.from_json(data)
                if bundle.device_id == peer.device_id:
                    await asyncio.to_thread(
                        self._ctx.locked, self._ctx.engine.process_bundle, peer.name, bundle
                    )
        except (TransportError, InvalidBundle, UntrustedIdentity) as exc:
            _log.info("session reset with %s postponed: %s", peer, type(exc).__name__)
            return
        await self._outbox.queue(peer.name, PayloadType.SESSION_RESET, wait=False, store_row=False)

    async def _request_sender_key(self, gid: str, sender: Address) -> None:
        with contextlib.suppress(E2EEError):
            await self._outbox.queue(
                group_chat_id(gid),
                PayloadType.SESSION_RESET,
                wait=False,
                store_row=False,
                group_targets=[sender.name],
            )

    def _on_plaintext(
        self, sender: Address, data: bytes, result: _Inbound, envelope_group: str | None
    ) -> list[Row]:
        """The rows to commit with the decrypt (called by the engine, under its lock)."""
        ctx = self._ctx
        body = payload.decode(data)
        if envelope_group is not None and body.group_id != envelope_group:
            raise InvalidMessage("group message names another group inside")
        if body.access_key:
            self._outbox.sealing.learn(sender.name, body.access_key)
        out = apply_payload(
            ctx.view(),
            ctx.me.name,
            sender,
            body,
            via_group=envelope_group is not None,
            now=ctx.now_ms(),
        )
        # Engine work of a group change belongs to this delivery's transaction.
        for follow_up in out.follow_ups:
            if isinstance(follow_up, ProcessSenderKey):
                ctx.engine.group_process_distribution(
                    follow_up.group_id, follow_up.sender, follow_up.distribution
                )
            elif isinstance(follow_up, RotateGroupKey):
                ctx.engine.group_rotate(follow_up.group_id)
            elif isinstance(follow_up, ForgetSenders):
                for address in follow_up.senders:
                    ctx.engine.group_forget_sender(follow_up.group_id, address)
            elif isinstance(follow_up, ApplyTrust) and apply_trust(ctx, follow_up.contact):
                out.follow_ups.append(WakeOutbox())  # a held contact was released
        result.outcome = out
        result.events.extend(out.events)
        result.follow_ups.extend(out.follow_ups)
        return [as_row(r) for r in out.rows]
