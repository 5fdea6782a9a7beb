"""The outbox: sending what was composed, in order, until the relay accepted it.

Invariants:

* Every outgoing message was committed to the ``outbox`` table (with its
  history row) before this module sees it; entries are sent in composition
  order under the same message id on every retry, so the relay stores each once.
* The relay stores them in that order: 1:1 entries encrypted ahead are
  pipelined (``send_pipeline`` unanswered at most), each naming the one before
  it (SEND_AFTER), so the relay stores none behind one it refused; the refused
  one and those behind it are then sent one at a time, in order
  (:meth:`Outbox._take_answers`). Everything else goes one at a time, after every
  pipelined send was answered.
* An entry's "sent" state is committed only after the relay accepted it,
  several entries per transaction (:meth:`Outbox._mark_sent`); a caller
  waiting for "sent" is told after that commit. A crash (or failed commit) in
  between sends those entries again under the same ids, which the relay stores
  once.
* Sending to a device whose identity key changed is held until the user
  accepts the key; nothing is encrypted to an unaccepted key. A held entry
  stays queued, and so do the later entries of its chat (order is kept).
* A message the relay refuses for good is marked ``failed`` in history and
  never retried; connection problems leave the entry queued.
* What people see that we send (text, attachments, timers, reactions, edits,
  deletes, group changes) also goes to our own other devices: a transcript for
  a pairwise entry, the same Sender Key message for a group one
  (:mod:`e2ee.client.sync`). It rides in the same relay message when that goes
  with our name anyway; when the peers' part can go without our name, it goes
  alone first and ours after it, under a derived id, and the entry is "sent"
  only once both were accepted (a crash in between sends both again under the
  same ids). Sync entries (mode
  ``sync``) go to our other devices only, and are done at once when there is
  none.
* Delivered receipts are sent for every incoming message above a watermark
  counter, which moves only after the relay accepted them (a crash in between
  sends some twice, which is harmless).
* A relay message id is settled (the relay told on the next ack that it may
  forget its retry record, :mod:`e2ee.client.settling`) only after the relay
  accepted it under our name and the commit recording that send as done stood
  (:meth:`Outbox._queue_settled`); never after a failed commit, whose entry is
  sent again under the same id, and never for a message sent without our name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from e2ee import envelope, payload
from e2ee.client.compose import compose_many, make_draft
from e2ee.client.context import ClientContext
from e2ee.client.sealing import Sealing
from e2ee.client.send_errors import for_good, for_message, raise_refused
from e2ee.client.settling import Accepted
from e2ee.client.sync import (
    introduce,
    is_own_device_key,
    own_copy,
    own_devices,
    own_message_id,
)
from e2ee.client_errors import (
    ClientClosed,
    IdentityHeld,
    NotAMember,
    SendFailed,
    UnknownRecipient,
)
from e2ee.core import PreKeyBundle
from e2ee.errors import (
    E2EEError,
    InvalidBundle,
    StorageError,
    TransportError,
    UntrustedIdentity,
)
from e2ee.events import AttachmentMeta, Event, IdentityChanged, MessageStored, ReceiptUpdated
from e2ee.messaging import keys
from e2ee.messaging.compose import Draft
from e2ee.messaging.rows import (
    AppRow,
    MessageRow,
    OutboxRow,
    ReceiptRow,
    StoredMessage,
    from_columns,
    status_at_least,
)
from e2ee.payload import (
    AttachmentPointer,
    GroupAction,
    GroupControl,
    Payload,
    PayloadType,
    Quote,
    ReceiptKind,
)
from e2ee.store import Address, Changes, IdentityRecord, TrustLevel
from e2ee.transport.auth import check_username
from e2ee.transport.errors import MismatchedDevices, NotFound, RelayRejected

__all__ = ["Outbox"]

_log = logging.getLogger(__name__)
_RECEIPT_BATCH: Final = 500
#: A typing indicator not sent within this time is dropped, not sent late.
_TYPING_TTL_MS: Final = 10_000
_MAX_SEND_ATTEMPTS: Final = 4


class Outbox:
    """Sends the outbox's entries and the receipts; wakes on :meth:`wake`.

    Args:
        ctx: the client's shared state.
    """

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._sent_waiters: dict[str, asyncio.Future[None]] = {}
        self._flush_started = 0
        self._flush_done = 0
        self._flush_cond = asyncio.Condition()
        # Composes waiting for the writer; it takes whatever queued while it was busy.
        self._drafts: list[tuple[Draft, asyncio.Future[tuple[str, StoredMessage | None]]]] = []
        self._writer: asyncio.Task[None] | None = None
        # Entries the relay accepted whose "sent" state is not committed yet (with the
        # devices they went to and the ids to settle after that commit), and the task
        # committing them (several per transaction).
        self._accepted: list[tuple[OutboxRow, list[tuple[str, int]], tuple[bytes, ...]]] = []
        self._marker: asyncio.Task[None] | None = None
        # Ciphertexts of queued entries encrypted ahead, by entry id (see _prepare).
        self._prepared: dict[str, list[envelope.Entry]] = {}
        # The bodies of prepared entries a pipelined send carries (see _prepare).
        self._wrapped: dict[str, bytes] = {}
        # Whether this device met our other devices (e2ee.client.sync.introduce).
        self._introduced = False
        self.sealing = Sealing(ctx)  # sealed sender: what leaves and what arrives

    def __repr__(self) -> str:
        return f"Outbox({self._ctx.me})"

    async def queue(
        self,
        to: str,
        kind: PayloadType,
        *,
        wait: bool,
        events: Sequence[Event] = (),
        **kw: Any,
    ) -> str:
        """Commit a payload to the outbox (see :func:`compose`) and wake the sender.

        Args:
            to: a user name or chat id.
            kind: the payload type.
            wait: return only once the relay accepted it.
            events: events of local changes committed with it (``extra_rows``).
            kw: passed to :func:`~e2ee.client.compose.compose`.

        Returns:
            The message id (hex).

        Raises:
            E2EEError: what composing or (with ``wait``) sending raised.
        """
        mid, stored = await self._compose(make_draft(to, kind, **kw))
        if stored is not None:
            pointer, quote = kw.get("attachment"), kw.get("quote")
            meta = None
            if isinstance(pointer, AttachmentPointer):
                meta = AttachmentMeta(pointer.file_name, pointer.size, pointer.mime_type)
            author = quote.author if isinstance(quote, Quote) else None
            self._ctx.emit(MessageStored(stored, meta, author))
        for event in events:  # local changes committed with it
            self._ctx.emit(event)
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._sent_waiters[mid] = waiter
        self._wake.set()
        if waiter is not None:
            try:
                await waiter
            finally:
                self._sent_waiters.pop(mid, None)
        return mid

    async def _compose(self, draft: Draft) -> tuple[str, StoredMessage | None]:
        """Commit a draft together with the others queued meanwhile (a group commit).

        One writer task runs at a time: it takes what is queued (up to
        ``send_batch``, in arrival order) into one transaction, and each caller
        learns its id only after that transaction committed. No caller waits for
        a timer: a lone send is written at once, and the ones arriving while the
        writer is busy share its next transaction.
        """
        future: asyncio.Future[tuple[str, StoredMessage | None]]
        future = asyncio.get_running_loop().create_future()
        self._drafts.append((draft, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_drafts())
        return await future

    async def _write_drafts(self) -> None:
        try:
            while self._drafts:
                size = self._ctx.options.send_batch
                batch, self._drafts = self._drafts[:size], self._drafts[size:]
                results: Sequence[tuple[str, StoredMessage | None] | Exception]
                try:
                    results = await asyncio.to_thread(
                        compose_many, self._ctx, [draft for draft, _ in batch]
                    )
                except Exception as exc:  # noqa: BLE001 -- a bug: every caller must hear of it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller was cancelled (its row may stand)
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._writer = None

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until every outbox entry that can be sent now was sent.

        Held chats (an identity key to accept) and failed entries do not count.
        Offline, this waits for the connection (bounded by ``timeout``).

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            How many outbox entries are still queued (held, or not sent in time).

        Raises:
            ClientClosed: the client is closed.
        """
        target = self._flush_started + 1
        self._wake.set()

        async def done() -> None:
            async with self._flush_cond:
                await self._flush_cond.wait_for(lambda: self._flush_done >= target)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done(), timeout)
        pending = await asyncio.to_thread(self._ctx.history.pending_outbox)
        return len(pending)

    async def run(self) -> None:
        """Send what the outbox holds whenever woken, until the client closes."""
        while not self._ctx.closing:
            await self._wake.wait()
            self._wake.clear()
            if not self._ctx.connected.is_set():
                continue
            self._flush_started += 1
            try:
                await self._flush_outbox()
            except TransportError as exc:
                _log.info("outbox paused: %s", type(exc).__name__)
                # Connection problems wake the outbox on reconnect; a busy relay
                # (429, 5xx) needs a timer.
                asyncio.get_running_loop().call_later(1.0, self._wake.set)
            except StorageError as exc:
                _log.warning("outbox storage error: %s", exc)
                asyncio.get_running_loop().call_later(1.0, self._wake.set)
            finally:
                async with self._flush_cond:
                    self._flush_done += 1
                    self._flush_cond.notify_all()

    async def _flush_outbox(self) -> None:
        if not self._introduced:
            # Before anything is sent, so a new device's first message reaches our others.
            self._introduced = await introduce(self._ctx, self)
        try:
            await self._send_pending()
        finally:
            # Every accepted entry is marked sent before the pass ends (the next
            # pass reads the outbox again and must not see them queued).
            marker, self._marker = self._marker, None
            self._prepared.clear()  # never sent: re-encrypted next time
            self._wrapped.clear()
            try:
                if marker is not None:
                    await marker
            finally:
                self._accepted.clear()  # only after a failed commit: still queued

    async def _send_pending(self) -> None:
        pending = await asyncio.to_thread(self._ctx.history.pending_outbox)
        entries = [from_columns(OutboxRow, found) for found in pending]
        blocked_chats: dict[str, str] = {}  # chat id -> the held user
        receipts: dict[tuple[str, str], list[OutboxRow]] = {}
        window = self._ctx.options.send_pipeline
        # Pipelined 1:1 sends awaiting the relay's answer, in outbox order (see _take_answers).
        inflight: collections.deque[tuple[OutboxRow, asyncio.Task[Accepted]]]
        inflight = collections.deque()
        try:
            for index, entry in enumerate(entries):
                if self._ctx.closing or not self._ctx.connected.is_set():
                    return
                if entry.mode == "receipt":
                    key = (json.loads(entry.targets)[0], entry.kind)
                    receipts.setdefault(key, []).append(entry)
                    continue
                if entry.chat_id in blocked_chats:
                    held = blocked_chats[entry.chat_id]
                    self.fail_waiter(entry.id, IdentityHeld(held, entry.id))
                    continue
                if self._stale(entry):
                    await self._finish_entry(entry, "dropped")  # stale after an outage
                    continue
                pairwise = entry.mode not in ("group", "receipt", "sync")
                if pairwise and entry.id not in self._prepared:
                    run = self._pairwise_run(entries[index:], blocked_chats)
                    self._prepared, self._wrapped = await asyncio.to_thread(self._prepare, run)
                if pairwise and window > 1 and entry.id in self._wrapped:
                    after = inflight[-1][0].id if inflight else None
                    inflight.append((entry, self._start_send(entry, after)))
                    if len(inflight) >= window:
                        await self._take_answers(inflight, blocked_chats, keep=window - 1)
                    continue
                await self._take_answers(inflight, blocked_chats)  # in order: all before it first
                await self._send_one(entry, blocked_chats)
            await self._take_answers(inflight, blocked_chats)
        finally:
            for _, task in inflight:  # the pass stopped: still queued, sent again later
                task.cancel()
        for (user, kind), batch in receipts.items():
            for start in range(0, len(batch), _RECEIPT_BATCH):
                chunk = batch[start : start + _RECEIPT_BATCH]
                try:
                    await self._send_receipts(user, kind, chunk)
                except (IdentityHeld, UnknownRecipient, SendFailed):
                    break
        await self._flush_delivered()

    def _start_send(self, entry: OutboxRow, after: str | None) -> asyncio.Task[Accepted]:
        """Send a prepared 1:1 entry without waiting for the answer (a pipelined send).

        ``after`` is the entry sent just before it, still unanswered: the relay stores
        this one only if that one is stored (a SEND_AFTER frame), so nothing overtakes
        an entry the relay refused.
        """
        prepared = self._prepared.pop(entry.id)
        recipients = [(e.user, e.device) for e in prepared]
        body = self._wrapped.pop(entry.id)
        # ``after`` only when there is one: a RelayLink of before pipelining still works
        # for the first send in flight (and a later one it refuses goes one at a time).
        extra = {} if after is None else {"after": bytes.fromhex(after)}

        async def answered() -> Accepted:
            mid = bytes.fromhex(entry.id)
            await self._ctx.link.send(mid, recipients, body, **extra)
            return Accepted(tuple(recipients), (mid,))  # with our name (see _prepare)

        return asyncio.create_task(answered())

    async def _take_answers(
        self,
        inflight: collections.deque[tuple[OutboxRow, asyncio.Task[Accepted]]],
        blocked_chats: dict[str, str],
        *,
        keep: int = 0,
    ) -> None:
        """Take the relay's answers to pipelined sends, in order, until ``keep`` are left.

        An accepted entry is marked sent (:meth:`_accept`). At the first one not accepted,
        every later one in flight is answered first: each names the one before it
        (``after``), so none of them was stored unless that one was, and those the relay
        stored are accepted. The refused one and the later ones not stored then take the
        one-at-a-time path, in order (:meth:`_send_one`), which sends each again under
        its id (re-encrypted, with the device lists fixed, or held, or failed).

        Raises:
            TransportError, StorageError: the connection or the disk (from the
                one-at-a-time path): the pass stops, the rest stays queued.
        """
        while len(inflight) > keep:
            entry, task = inflight.popleft()
            try:
                accepted = await task
            except Exception:  # noqa: BLE001 -- any refusal: the one-at-a-time path decides
                again = [entry]
                later = list(inflight)
                inflight.clear()
                answers = await asyncio.gather(*(t for _, t in later), return_exceptions=True)
                for (other, _), answer in zip(later, answers, strict=True):
                    if isinstance(answer, BaseException):
                        again.append(other)
                    else:
                        self._accept(other, answer)
                for other in again:
                    await self._send_one(other, blocked_chats)
                return
            self._accept(entry, accepted)

    async def _send_one(self, entry: OutboxRow, blocked_chats: dict[str, str]) -> None:
        """Send one entry and wait for the relay's answer; settle what that means for it."""
        if entry.chat_id in blocked_chats:
            self.fail_waiter(entry.id, IdentityHeld(blocked_chats[entry.chat_id], entry.id))
            return
        try:
            await self._send_entry(entry)
        except IdentityHeld as exc:
            # Stays queued (and later ones of this chat, to keep order) until
            # the key is accepted; a caller waiting for "sent" learns why.
            blocked_chats[entry.chat_id] = exc.user
            self.fail_waiter(entry.id, IdentityHeld(exc.user, entry.id))
        except (TransportError, StorageError) as exc:
            if not isinstance(exc, SendFailed):
                raise  # the connection or the disk: retried, the entry stays queued
            # The relay refused it for good (a full mailbox, a 4xx): failed, never
            # retried (SendFailed is a TransportError, so it is caught here first).
            await self._finish_entry(entry, "failed")
            self.fail_waiter(entry.id, for_message(exc, entry.id))
        except E2EEError as exc:
            # UnknownRecipient, NotAMember, or a payload that cannot be built: the
            # message is marked failed in history, never retried.
            await self._finish_entry(entry, "failed")
            self.fail_waiter(entry.id, for_message(exc, entry.id))

    def _pairwise_run(
        self, entries: Sequence[OutboxRow], blocked_chats: Mapping[str, str]
    ) -> list[OutboxRow]:
        """The pairwise entries at the head of ``entries`` (at most ``send_batch``)."""
        run: list[OutboxRow] = []
        for entry in entries[: self._ctx.options.send_batch]:
            if entry.mode in ("group", "receipt", "sync") or entry.chat_id in blocked_chats:
                break
            if not self._stale(entry):
                run.append(entry)
        return run

    def _stale(self, entry: OutboxRow) -> bool:
        """A typing indicator too old to send (after an outage): dropped, not sent late."""
        age = self._ctx.now_ms() - (entry.created_at or 0)
        return entry.kind == "typing" and age > _TYPING_TTL_MS

    def _prepare(
        self, entries: Sequence[OutboxRow]
    ) -> tuple[dict[str, list[envelope.Entry]], dict[str, bytes]]:
        """Encrypt queued pairwise entries ahead, in one store transaction (blocking).

        One transaction (one fsync) advances the sending chains for all of them,
        instead of one per message; every ciphertext's session state is
        committed before it is sent. The run stops at the first entry that
        needs the slow path (a recipient without a session, a held one); if
        encrypting fails (an untrusted key, the disk), nothing is kept and each
        entry takes the one-by-one path. A prepared ciphertext that is not sent
        (the pass stopped, or a device list changed) is dropped and the entry
        encrypted again: the peer skips that message key.

        Returns:
            entry id -> its ciphertexts, for a prefix of ``entries``; and entry id -> the
            body a pipelined send of it carries (sealed with our certificate when sealing
            is on), for those that go with our name.
        """
        ctx = self._ctx
        prepared: dict[str, list[envelope.Entry]] = {}
        wrapped: dict[str, bytes] = {}
        with ctx.wlock:
            mine = own_devices(ctx)
            sealing = self.sealing.batch()  # reads our certificate and the keys once
            try:
                with ctx.store.batch():
                    # Which devices each entry goes to; then, per device, its messages
                    # in outbox order, encrypted with one session load and one write
                    # (engine.encrypt_many).
                    known: dict[str, list[int]] = {}
                    plan: list[tuple[OutboxRow, list[Address]]] = []
                    texts: dict[Address, list[bytes]] = {}
                    for entry in entries:
                        users: list[str] = json.loads(entry.targets)
                        for user in users:
                            if user not in known:
                                known[user] = ctx.engine.session_devices(user)
                        if any(u in ctx.held or not known[u] for u in users):
                            break
                        targets = [Address(u, d) for u in users for d in known[u]]
                        copy = own_copy(entry) if mine else None
                        copy = None if copy is None else self.sealing.stamp_own(copy)
                        if copy is not None:  # the transcript for our own other devices
                            targets += [Address(ctx.me.name, d) for d in mine]
                        plan.append((entry, targets))
                        data = sealing.stamp(entry.payload or b"", entry.kind)
                        for address in targets:
                            text = copy if address.name == ctx.me.name and copy else data
                            texts.setdefault(address, []).append(text)
                    sealed = {
                        address: iter(ctx.engine.encrypt_many(address, batch))
                        for address, batch in texts.items()
                    }
                    for entry, addresses in plan:
                        prepared[entry.id] = [
                            envelope.Entry(a.name, a.device_id, ct.kind, ct.body)
                            for a in addresses
                            for ct in (next(sealed[a]),)
                        ]
                        # Pipelined sends go with our name (they name the message before
                        # them): wrapped here, in this batch. One that may go without our
                        # name is left to the one-at-a-time path, which seals it so.
                        recipients = [(a.name, a.device_id) for a in addresses]
                        peers = [r for r in recipients if r[0] != ctx.me.name]
                        if peers and len(peers) < len(recipients) and sealing.hideable(peers):
                            continue  # two messages (send_pairwise): the peers' part unnamed
                        body = sealing.authenticated_body(
                            recipients, envelope.build_pairwise(prepared[entry.id])
                        )
                        if body is not None:
                            wrapped[entry.id] = body
            except E2EEError:
                return {}, {}  # rolled back: the one-by-one path meets (and handles) it
        return prepared, wrapped

    async def _flush_delivered(self) -> None:
        """Send delivered receipts for incoming messages above the watermark.

        The watermark (a counter row) moves only after the relay accepted the
        receipts; a crash in between sends some receipts twice, which is harmless.
        Each receipt goes under an id of its own, drawn afresh: once the watermark's
        commit stood, those the relay took under our name are settled.
        """
        while not self._ctx.closing and self._ctx.connected.is_set():
            mark = await asyncio.to_thread(self._ctx.locked_counter, keys.DELIVERED_RECEIPTS)
            pending = await asyncio.to_thread(self._ctx.history.undelivered, mark, 2000)
            if not pending:
                return
            by_sender: dict[str, list[tuple[str, int]]] = {}
            for mid, sender, seq in pending:
                by_sender.setdefault(sender, []).append((mid, seq))
            stop = pending[-1][2]
            named: list[bytes] = []
            for sender, items in by_sender.items():
                for start in range(0, len(items), _RECEIPT_BATCH):
                    chunk = items[start : start + _RECEIPT_BATCH]
                    try:
                        sent = await self._send_receipt_payload(
                            sender, ReceiptKind.DELIVERED, [m for m, _ in chunk]
                        )
                        named.extend(sent.named)
                    except (IdentityHeld, UnknownRecipient, SendFailed):
                        stop = min(stop, chunk[0][1] - 1)
                        break
            if stop <= mark:
                return

            def advance(value: int = stop) -> None:
                with self._ctx.wlock:
                    self._ctx.commit(
                        [],
                        {
                            keys.DELIVERED_RECEIPTS: max(
                                value, self._ctx.counter(keys.DELIVERED_RECEIPTS)
                            )
                        },
                    )

            await asyncio.to_thread(advance)
            self._queue_settled(named)
            if len(pending) < 2000:
                return

    async def _send_receipt_payload(
        self, user: str, kind: ReceiptKind, message_ids: Sequence[str]
    ) -> Accepted:
        """Send a receipt message under a new id (a retry draws another)."""
        body = Payload(
            type=PayloadType.RECEIPT,
            message_id=self._ctx.random_bytes(16),
            sent_at_ms=self._ctx.now_ms(),
            target_ids=tuple(bytes.fromhex(m) for m in message_ids),
            receipt=kind,
        )
        return await self.send_pairwise(body.message_id, [user], payload.encode(body))

    def wake(self) -> None:
        """Look at the outbox now (something was queued, or the connection came up)."""
        self._wake.set()

    def wake_soon(self) -> None:
        """Look at the outbox a moment from now: receipts for a burst go out together."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_later(0.05, self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        self._wake.set()

    def close(self) -> None:
        """Fail every caller still waiting for a send: the client was closed."""
        for waiter in self._sent_waiters.values():
            if not waiter.done():
                waiter.set_exception(ClientClosed("the client was closed"))

    def fail_waiter(self, mid: str, exc: Exception) -> None:
        waiter = self._sent_waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def _send_receipts(self, user: str, kind: str, entries: list[OutboxRow]) -> None:
        receipt = ReceiptKind.DELIVERED if kind == "delivered" else ReceiptKind.READ
        sent = await self._send_receipt_payload(user, receipt, [e.ref or "" for e in entries])

        def done() -> None:
            with self._ctx.wlock:
                view = self._ctx.view()
                rows = [
                    dataclasses.replace(r, state="sent")
                    for e in entries
                    if (r := view.get(OutboxRow, e.id)) is not None
                ]
                self._ctx.commit(rows, {})

        await asyncio.to_thread(done)
        self._queue_settled(sent.named)

    async def _send_entry(self, entry: OutboxRow) -> None:
        mid = bytes.fromhex(entry.id)
        data = entry.payload or b""
        chat_id = entry.chat_id
        if entry.mode == "group":
            accepted = await self._send_group(mid, chat_id[len("group:") :], data)
        elif entry.mode == "sync":
            accepted = await self._send_own(mid, data)
        else:
            prepared = self._prepared.pop(entry.id, None)
            self._wrapped.pop(entry.id, None)
            accepted = await self.send_pairwise(
                mid,
                json.loads(entry.targets),
                data,
                prepared=prepared,
                transcribe=entry,
                kind=entry.kind,
            )
        self._accept(entry, accepted)

    def _accept(self, entry: OutboxRow, accepted: Accepted) -> None:
        """The relay accepted ``entry``: its "sent" state is committed by :meth:`_mark_sent`
        (and its ids settled after that commit).

        Raises:
            StorageError: the last "sent" commit failed (the pass stops; still queued).
        """
        # Receipts are the peers' business: our own devices are not recipients there.
        recipients = [r for r in accepted.recipients if r[0] != self._ctx.me.name]
        marker = self._marker
        if marker is not None and marker.done():
            self._marker = None
            marker.result()  # raises what stopped it (a StorageError): the pass stops
        self._accepted.append((entry, recipients, accepted.named))
        if self._marker is None:
            self._marker = asyncio.create_task(self._mark_sent())

    async def _mark_sent(self) -> None:
        """Commit the accepted entries' "sent" state, many per transaction (group commit).

        Runs beside the sending: the entries accepted while one transaction is
        being written share the next one (at most ``send_batch`` each). Only after
        its commit is a waiting caller told, ``ReceiptUpdated("sent")`` emitted and
        the entries' ids settled. If the commit fails, the entries stay queued and
        are sent again under the same ids (the relay stores each once, as it still
        holds their records: none was settled), as after a crash right after the
        relay accepted them.
        """
        while self._accepted:
            size = self._ctx.options.send_batch
            batch, self._accepted = self._accepted[:size], self._accepted[size:]
            try:
                statuses = await asyncio.to_thread(
                    self._commit_states, [(entry, "sent", sent_to) for entry, sent_to, _ in batch]
                )
            except StorageError:
                self._accepted.clear()  # still queued in the store: sent again
                raise
            # Committed: these ids are never sent again.
            self._queue_settled(mid for _, _, named in batch for mid in named)
            for (entry, _, _), status in zip(batch, statuses, strict=True):
                waiter = self._sent_waiters.get(entry.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                if entry.kind not in ("typing", "session_reset", "receipt"):
                    self._ctx.emit(
                        ReceiptUpdated(entry.id, entry.chat_id, "sent", message_status=status)
                    )

    def _queue_settled(self, named: Iterable[bytes]) -> None:
        """Queue relay ids for the next ack to settle (:mod:`e2ee.client.settling`).

        Call only once the commit recording their sends as done stood (nothing sends
        them again), and only with ids the relay stored under our name.
        """
        ids = list(named)
        if ids and self._ctx.settled.limit:
            self._ctx.settled.add(ids)
            self._ctx.acks_due.set()  # the ack runner takes them (e2ee.client.inbox)

    async def _finish_entry(self, entry: OutboxRow, state: str) -> None:
        """Commit an entry's new state ("failed", "dropped") alone."""
        await asyncio.to_thread(self._commit_states, [(entry, state, ())])

    def _commit_states(
        self, items: Sequence[tuple[OutboxRow, str, Sequence[tuple[str, int]]]]
    ) -> list[str | None]:
        """Commit entries' new states in one transaction (blocking).

        Args:
            items: (entry, new state, the devices it was sent to).

        Returns:
            Per entry, its message's new status (None: no ``messages`` row).

        Raises:
            StorageError: nothing was written.
        """
        statuses: list[str | None] = []
        with self._ctx.wlock:
            view = self._ctx.view()
            rows: list[AppRow] = []
            now = self._ctx.now_ms()
            for entry, state, recipients in items:
                status: str | None = None
                outbox = view.get(OutboxRow, entry.id)
                if outbox is not None:
                    rows.append(dataclasses.replace(outbox, state=state, payload=None))
                message = view.get(MessageRow, entry.id)
                if message is not None:
                    # "failed" ranks with "pending" (a receipt may still move it
                    # on), so it is set, not merged.
                    failed = state == "failed" and message.status == "pending"
                    status = state if failed else status_at_least(message.status, state)
                    rows.append(dataclasses.replace(message, status=status))
                    rows.extend(
                        ReceiptRow(
                            f"{entry.id}:{user}:{device}", entry.id, user, device, "sent", now
                        )
                        for user, device in recipients
                    )
                statuses.append(status)
            self._ctx.commit(rows, {})
        return statuses

    async def user_exists(self, user: str) -> bool:
        """Whether the relay knows ``user`` (fetching bundles, as a first message would)."""
        check_username(user)
        try:
            await self.devices(user)
        except UnknownRecipient:
            return False
        except IdentityHeld:
            pass  # a user whose new key is held exists
        return True

    async def devices(self, user: str, *, refresh: bool = False) -> list[int]:
        """Device ids of ``user`` we hold sessions with, fetching bundles if needed."""
        devices = await asyncio.to_thread(self._ctx.engine.session_devices, user)
        if devices and not refresh:
            return devices
        try:
            bundles = await self._ctx.link.fetch_bundles(user)
        except NotFound as exc:
            raise UnknownRecipient(user) from exc
        if not bundles:
            raise UnknownRecipient(user)
        for data in bundles:
            try:
                bundle = PreKeyBundle.from_json(data)
            except InvalidBundle:
                continue
            if bundle.device_id in devices or Address(user, bundle.device_id) == self._ctx.me:
                continue
            if not is_own_device_key(self._ctx, user, bundle.identity_key):
                # A device of our name must share our identity key (linked devices do).
                _log.warning("device %d of our account has another identity key", bundle.device_id)
                continue
            try:
                await asyncio.to_thread(
                    self._ctx.locked, self._ctx.engine.process_bundle, user, bundle
                )
            except UntrustedIdentity as exc:
                # The bundle names a new key: record it as untrusted (kept across
                # restarts) and drop the session made for the old key, so nothing
                # is encrypted to either until the user decides.
                address = Address(user, bundle.device_id)
                await asyncio.to_thread(self._record_untrusted, address, bundle.identity_key)
                self._hold(user, bundle.device_id)
                raise IdentityHeld(user) from exc
        return await asyncio.to_thread(self._ctx.engine.session_devices, user)

    def _record_untrusted(self, address: Address, key: bytes) -> None:
        with self._ctx.wlock:
            self._ctx.store.commit(
                Changes(
                    identities_put={
                        address: IdentityRecord(key, TrustLevel.UNTRUSTED, self._ctx.now_ms())
                    },
                    sessions_delete=frozenset({address}),
                )
            )

    def _hold(self, user: str, device: int) -> None:
        if user not in self._ctx.held:
            self._ctx.held.add(user)
            self._ctx.emit(IdentityChanged(user, device, False, True))

    async def _fix_devices(self, exc: MismatchedDevices) -> bool:
        """Follow the relay's device lists; False if ours still lack a device it names."""
        for user in exc.unknown_users:
            raise UnknownRecipient(user)

        def drop() -> None:
            stale = frozenset(Address(u, d) for u, devs in exc.stale_devices.items() for d in devs)
            if stale:
                self._ctx.store.commit(Changes(sessions_delete=stale))

        await asyncio.to_thread(drop)
        own_ok = True
        for user, missing in exc.missing_devices.items():
            found = await self.devices(user, refresh=True)
            if user == self._ctx.me.name and not set(missing) <= set(found):
                own_ok = False  # one we cannot take (another key): send without our devices
        return own_ok

    async def send_pairwise(
        self,
        mid: bytes,
        users: Sequence[str],
        data: bytes,
        *,
        prepared: list[envelope.Entry] | None = None,
        transcribe: OutboxRow | None = None,
        kind: str = "receipt",
    ) -> Accepted:
        """Encrypt ``data`` (a payload of ``kind``) for every device of ``users`` and send it
        as message ``mid``.

        ``transcribe``: the outbox entry being sent, whose transcript our own other
        devices get (if it has one and we have another device): in the same relay
        message when that goes with our name anyway, else as a message of its own after
        the peers' part (:meth:`Sealing.hideable`, e2ee.client.sync). ``kind`` decides
        whether the payload carries our access key (sealing.Sealing.stamp): not for
        receipts and session resets, which also go to strangers. Returns the (user,
        device) pairs it went to, and which of its relay ids went with our name.
        """
        me = self._ctx.me.name
        data = self.sealing.stamp(data, kind)
        peers_sent: Accepted | None = None  # once the peers' part went alone
        for _attempt in range(_MAX_SEND_ATTEMPTS):
            entries: list[envelope.Entry] = prepared or []
            mine = []
            if transcribe is not None and not prepared:
                mine = await asyncio.to_thread(own_devices, self._ctx)
            own = own_copy(transcribe) if mine and transcribe is not None else None
            if own is not None:
                own = self.sealing.stamp_own(own)
                for device in mine:
                    ct = await asyncio.to_thread(
                        self._ctx.locked, self._ctx.engine.encrypt, Address(me, device), own
                    )
                    entries.append(envelope.Entry(me, device, ct.kind, ct.body))
            for user in users:
                if peers_sent is not None and user != me:
                    continue  # the relay holds their part: only ours is left
                if user in self._ctx.held:
                    raise IdentityHeld(user)
                for device in [] if prepared else await self.devices(user):
                    address = Address(user, device)
                    try:
                        ct = await asyncio.to_thread(
                            self._ctx.locked, self._ctx.engine.encrypt, address, data
                        )
                    except UntrustedIdentity as exc:
                        self._hold(user, device)
                        raise IdentityHeld(user) from exc
                    entries.append(envelope.Entry(user, device, ct.kind, ct.body))
            if not entries:
                # A sync entry whose last other device was just removed.
                return peers_sent if peers_sent is not None else Accepted()
            peers = [e for e in entries if e.user != me]
            try:
                if peers_sent is None and peers and len(peers) < len(entries):
                    hidden = [(e.user, e.device) for e in peers]
                    if await asyncio.to_thread(self._ctx.locked, self.sealing.hideable, hidden):
                        # The peers' part without our name first; our other devices' part
                        # on its own after it (e2ee.client.sync): only once the peers have it.
                        named = await self.sealing.send(mid, hidden, envelope.build_pairwise(peers))
                        peers_sent = _part(mid, hidden, named)
                        entries = [e for e in entries if e.user == me]
                recipients = [(e.user, e.device) for e in entries]
                if peers_sent is not None:
                    own_mid = own_message_id(mid)
                    named = await self.sealing.send(
                        own_mid, recipients, envelope.build_pairwise(entries)
                    )
                    return peers_sent + _part(own_mid, recipients, named)
                named = await self.sealing.send(mid, recipients, envelope.build_pairwise(entries))
                return _part(mid, recipients, named)
            except MismatchedDevices as exc:
                prepared = None
                self._prepared.clear()  # encrypted for the old device lists
                self._wrapped.clear()
                if not await self._fix_devices(exc):
                    transcribe = None
            except RelayRejected as exc:
                if peers_sent is not None and for_good(exc):
                    return _own_copy_lost(exc, peers_sent)
                raise_refused(exc)
        raise SendFailed("the recipients' device list kept changing")

    async def _send_group(self, mid: bytes, gid: str, data: bytes) -> Accepted:
        me = self._ctx.me.name
        members = await asyncio.to_thread(self._ctx.history.group_members, gid)
        others = sorted(u for u in members if u != me)
        if me not in members:
            raise NotAMember(gid)
        with_own = True
        peers_done: Accepted | None = None  # the members' part went alone and was accepted
        for _attempt in range(_MAX_SEND_ATTEMPTS):
            recipients: list[tuple[str, int]] = []
            if with_own:  # our other devices read our group messages too
                devices = await asyncio.to_thread(own_devices, self._ctx)
                recipients.extend((me, d) for d in devices)
            for user in others:
                if user in self._ctx.held:
                    raise IdentityHeld(user)
                recipients.extend((user, d) for d in await self.devices(user))
            await self._distribute_key(gid, recipients)
            body = await asyncio.to_thread(
                self._ctx.locked, self._ctx.engine.group_encrypt, gid, data
            )
            group = envelope.build_group(gid, body)
            mine = [r for r in recipients if r[0] == me]
            try:
                if peers_done is None and mine and others:
                    hidden = [r for r in recipients if r[0] != me]
                    if await asyncio.to_thread(self._ctx.locked, self.sealing.hideable, hidden):
                        # As in send_pairwise: the members' part without our name, then ours.
                        named = await self.sealing.send(mid, hidden, group)
                        peers_done = _part(mid, hidden, named)
                if peers_done is not None:
                    own = Accepted()
                    if mine:
                        own_mid = own_message_id(mid)
                        own = _part(own_mid, mine, await self.sealing.send(own_mid, mine, group))
                    # This round's devices, as before; the ids of both parts.
                    return Accepted(tuple(recipients), peers_done.named + own.named)
                named = await self.sealing.send(mid, recipients, group)
                return _part(mid, recipients, named)
            except MismatchedDevices as exc:
                with_own = await self._fix_devices(exc) and with_own
            except RelayRejected as exc:
                if peers_done is not None and for_good(exc):
                    peers = tuple(r for r in recipients if r[0] != me)
                    return _own_copy_lost(exc, Accepted(peers, peers_done.named))
                raise_refused(exc)
        raise SendFailed("the group's device list kept changing")

    async def _send_own(self, mid: bytes, data: bytes) -> Accepted:
        """A sync entry: to our other devices only; nothing to do without one."""
        if not await asyncio.to_thread(own_devices, self._ctx):
            return Accepted()
        return await self.send_pairwise(mid, [self._ctx.me.name], data)

    async def _distribute_key(self, gid: str, recipients: Sequence[tuple[str, int]]) -> None:
        """Send our Sender Key (pairwise) to member devices that lack its current generation."""

        def missing() -> tuple[int, list[str]]:
            with self._ctx.wlock:
                generation = self._ctx.counter(keys.key_generation(gid)) + 1
                users = sorted(
                    {
                        u
                        for u, d in recipients
                        if self._ctx.counter(keys.distributed(gid, u, d)) != generation
                    }
                )
                return generation, users

        generation, users = await asyncio.to_thread(missing)
        if not users:
            return
        distribution = await asyncio.to_thread(
            self._ctx.locked, self._ctx.engine.group_distribution, gid
        )
        control = GroupControl(GroupAction.SENDER_KEY, distribution=distribution)
        body = Payload(
            type=PayloadType.GROUP,
            message_id=self._ctx.random_bytes(16),
            sent_at_ms=self._ctx.now_ms(),
            group_id=gid,
            group=control,
        )
        # Under an id of its own, drawn afresh: a retry (after a failed commit below) is a
        # new message, so this id is settled once the commit stood.
        sent = await self.send_pairwise(body.message_id, users, payload.encode(body), kind="group")

        def mark() -> None:
            with self._ctx.wlock:
                self._ctx.commit(
                    [], {keys.distributed(gid, u, d): generation for u, d in sent.recipients}
                )

        await asyncio.to_thread(mark)
        self._queue_settled(sent.named)


def _own_copy_lost(exc: RelayRejected, peers: Accepted) -> Accepted:
    """Our own devices' copy, sent after the peers' part, was refused for good: the message
    counts as sent (the peers have it), though our other devices miss their copy."""
    _log.warning("our devices' copy refused: %s", type(exc).__name__)
    return peers


def _part(mid: bytes, recipients: Sequence[tuple[str, int]], named: bool) -> Accepted:
    """One relay message the relay accepted: ``named`` when it went with our name."""
    return Accepted(tuple(recipients), (mid,) if named else ())
