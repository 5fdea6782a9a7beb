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
* Group membership changes are accepted only from a sender who is an admin in
  our committed group state (or a member leaving); they travel pairwise
  encrypted. Our Sender Key is rotated whenever a member is removed or leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from e2ee import envelope, payload
from e2ee.client.compose import attachment_row, ensure_chat_rows, group_rows, notice_rows
from e2ee.client.context import ClientContext
from e2ee.client.outbox import Outbox
from e2ee.core import Ciphertext, PreKeyBundle
from e2ee.errors import (
    DuplicateMessage,
    E2EEError,
    InvalidBundle,
    InvalidMessage,
    MissingKey,
    NoSession,
    StorageError,
    TransportError,
    UntrustedIdentity,
)
from e2ee.events import (
    BacklogDrained,
    DecryptionProblem,
    Event,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    ReceiptUpdated,
    Typing,
)
from e2ee.history import History, Row, StoredMessage, direct_chat_id, group_chat_id, to_message
from e2ee.payload import GroupAction, GroupControl, Payload, PayloadType, ReceiptKind
from e2ee.store import Address, Changes
from e2ee.transport.frames import Delivery, QueueEmpty

__all__ = ["Inbox"]

_log = logging.getLogger(__name__)
#: At most this many deliveries share one store transaction (one fsync). The
#: write lock is held meanwhile, so this also bounds how long a send waits.
_INBOX_BATCH: Final = 200
_ACTION_NAMES: Final[dict[GroupAction, Literal["create", "add", "remove", "leave", "rename"]]] = {
    GroupAction.CREATE: "create",
    GroupAction.ADD: "add",
    GroupAction.REMOVE: "remove",
    GroupAction.LEAVE: "leave",
    GroupAction.RENAME: "rename",
}


@dataclass(slots=True)
class _Inbound:
    """What processing one delivery produced (committed already, when rows exist)."""

    events: list[Event] = field(default_factory=list)
    wake_outbox: bool = False
    reset: Address | None = None
    key_request: tuple[str, Address] | None = None
    resend_key: tuple[str, str] | None = None
    #: Ends the group-commit transaction after this delivery (it changed group state).
    barrier: bool = False


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
        self._ack_wake = asyncio.Event()
        self._inflight: asyncio.Future[list[_Inbound]] | None = None

    def __repr__(self) -> str:
        return f"Inbox({self._ctx.me})"

    async def run_acks(self) -> None:
        """Send queued acknowledgements in batches, until the client closes."""
        while not self._ctx.closing:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await asyncio.sleep(self._ctx.options.ack_delay)
            # Unacknowledged messages are delivered again and seen as duplicates.
            with contextlib.suppress(TransportError):
                await self.flush_acks()

    async def flush_acks(self) -> None:
        """Acknowledge every committed delivery now.

        Raises:
            TransportError: the relay did not take them (they stay queued).
        """
        while self._acks:
            batch, self._acks = self._acks[:500], self._acks[500:]
            try:
                await self._ctx.link.ack(batch)
            except TransportError:
                self._acks = batch + self._acks
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
                    await self._handle_batch(batch)
                    processed += len(batch)
                if drained:
                    self._ctx.emit(BacklogDrained(processed))
            await reader  # re-raises what ended the connection
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await reader

    async def _handle_batch(self, batch: Sequence[Delivery]) -> None:
        # Shielded: if the client is closed meanwhile, the batch still finishes
        # (commit, acks queued, events emitted) and close() waits for it.
        task = asyncio.ensure_future(self._receive_batch(batch))
        self._inflight = task
        inbounds = await asyncio.shield(task)
        # Acks go out from _ack_loop in batches; processing never waits for the
        # relay to commit them.
        self._ack_wake.set()
        wake = False
        for inbound in inbounds:
            if inbound.reset is not None:
                await self._session_reset(inbound.reset)
            if inbound.key_request is not None:
                gid, sender = inbound.key_request
                await self._request_sender_key(gid, sender)
            if inbound.resend_key:
                self._outbox.wake()
            wake = wake or inbound.wake_outbox
        if wake:
            # Receipts for a burst of deliveries go out together, a moment later.
            self._outbox.wake_soon()

    async def _receive_batch(self, batch: Sequence[Delivery]) -> list[_Inbound]:
        """Process a batch; acknowledge and show what was committed.

        Raises:
            StorageError: a transaction failed; the deliveries from it on were
                neither acknowledged nor shown (the relay delivers them again).
        """
        inbounds, error = await asyncio.to_thread(self._process_batch, batch)
        # Committed: only now acknowledged, and only now shown.
        self._acks.extend(d.id for d in batch[: len(inbounds)])
        for inbound in inbounds:
            for event in inbound.events:
                self._ctx.emit(event)
        if error is not None:
            if inbounds:
                self._ack_wake.set()
            raise error
        return [i for i in inbounds if i.reset or i.key_request or i.resend_key or i.wake_outbox]

    def _process_batch(
        self, batch: Sequence[Delivery]
    ) -> tuple[list[_Inbound], StorageError | None]:
        """Decrypt and store deliveries in group-commit transactions.

        The deliveries share store transactions (one fsync per transaction instead
        of one per message). A transaction ends early after a group change,
        because group state is read through History's own connection, which sees
        only committed rows.

        Returns:
            What the committed deliveries produced (a prefix of ``batch``, all of
            it unless a transaction failed), and the error that stopped the rest.
        """
        done: list[_Inbound] = []
        with self._ctx.wlock:
            while len(done) < len(batch):
                pending: list[_Inbound] = []
                self._ctx.deferred = {}
                try:
                    with self._ctx.store.batch():
                        for delivery in batch[len(done) :]:
                            pending.append(self._process_delivery(delivery))
                            if pending[-1].barrier:
                                break
                        if self._ctx.deferred:
                            # In the same transaction as the messages that moved them.
                            rows = tuple((t, row) for (t, _), row in self._ctx.deferred.items())
                            self._ctx.store.commit(Changes(app_rows=rows))
                except StorageError as exc:
                    # Nothing of this transaction stands; the relay delivers it again.
                    self._ctx.deferred = None
                    self._ctx.drop_caches()  # cached rows may describe the rolled-back rows
                    return done, exc
                except BaseException:
                    self._ctx.deferred = None
                    self._ctx.drop_caches()
                    raise
                self._ctx.deferred = None
                done.extend(pending)
        return done, None

    def _process_delivery(self, delivery: Delivery) -> _Inbound:
        sender = Address(delivery.sender, delivery.device)
        out = _Inbound()
        with self._ctx.wlock:
            try:
                env = envelope.parse(delivery.body)
                if isinstance(env, envelope.GroupEnvelope):
                    self._ctx.engine.group_decrypt(
                        env.group_id,
                        sender,
                        env.body,
                        on_plaintext=lambda p: self._on_plaintext(sender, p, out, env.group_id),
                    )
                else:
                    entry = env.entry_for(self._ctx.me.name, self._ctx.me.device_id)
                    if entry is None:
                        raise InvalidMessage("no ciphertext for this device in the envelope")
                    result = self._ctx.engine.decrypt(
                        sender,
                        Ciphertext(entry.kind, entry.body),
                        on_plaintext=lambda p: self._on_plaintext(sender, p, out, None),
                    )
                    change = result.identity_change
                    if change is not None:
                        held = not change.first_use or self._ctx.strict
                        # Before the message itself, so a UI can flag it.
                        out.events.insert(
                            0,
                            IdentityChanged(sender.name, sender.device_id, change.first_use, held),
                        )
                        if held:
                            self._ctx.held.add(sender.name)
            except DuplicateMessage:
                return _Inbound()  # already stored: acknowledge, show nothing twice
            except StorageError:
                self._ctx.drop_caches()  # rows computed for a failed commit are void
                raise
            except E2EEError as exc:
                # Reported (and repaired if possible), then acknowledged: a message
                # that can never be read must not block the mailbox.
                self._ctx.drop_caches()
                return self._problem(sender, delivery, exc)
        return out

    def _problem(self, sender: Address, delivery: Delivery, exc: E2EEError) -> _Inbound:
        out = _Inbound()
        group_id: str | None = None
        with contextlib.suppress(InvalidMessage):
            env = envelope.parse(delivery.body)
            if isinstance(env, envelope.GroupEnvelope):
                group_id = env.group_id
        error = type(exc).__name__
        repair: Literal["session_reset", "sender_key_request", "none"] = "none"
        if group_id is not None and isinstance(exc, NoSession | MissingKey):
            explanation = (
                "we do not hold this member's current group key; asked them to send it, "
                "so their later messages can be read"
            )
            if self._may_repair(sender, group_id):
                repair = "sender_key_request"
                out.key_request = (group_id, sender)
        elif isinstance(exc, payload.UnsupportedPayload):
            explanation = "the sender uses a newer message format; update this app"
        elif group_id is None and isinstance(exc, NoSession | MissingKey | InvalidMessage):
            explanation = (
                "the message could not be decrypted (our session with the sender is out of "
                "step); a new session is being set up; ask them to send it again"
            )
            if self._may_repair(sender, ""):
                repair = "session_reset"
                out.reset = sender
        else:
            explanation = f"the message was rejected: {exc}"
        notice: StoredMessage | None = None
        if group_id is None or self._ctx.history.group(group_id) is not None:
            # Recorded in its chat (in this delivery's transaction), so every client
            # shows it where it happened, also after a restart.
            chat_id = group_chat_id(group_id) if group_id else direct_chat_id(sender.name)
            rows: list[Row] = []
            notice = notice_rows(
                self._ctx,
                rows,
                chat_id,
                sender,
                f"{delivery.id.hex()}.undecryptable",
                "undecryptable",
                f"a message from {sender.name} could not be read: {explanation}",
                self._ctx.now_ms(),
            )
            if rows:  # a new notice (not the same delivery again after a crash)
                unreadable_key = f"unreadable:{sender}:{chat_id}"
                unreadable = (self._ctx.counter_or_none(unreadable_key) or 0) + 1
                self._ctx.commit(rows, {unreadable_key: unreadable})
        out.events.append(
            DecryptionProblem(
                sender.name,
                sender.device_id,
                error,
                explanation,
                repair,
                group_id=group_id,
                notice=notice,
            )
        )
        return out

    def _may_repair(self, sender: Address, scope: str) -> bool:
        """At most one repair per sender device (and scope) per ``reset_interval_ms``."""
        name = f"repair:{sender}:{scope}"
        now = self._ctx.now_ms()
        if now - self._ctx.counter(name) < self._ctx.options.reset_interval_ms:
            return False
        self._ctx.commit([], {name: now})
        return True

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
        self, sender: Address, data: bytes, out: _Inbound, envelope_group: str | None
    ) -> list[Row]:
        body = payload.decode(data)
        if envelope_group is not None and body.group_id != envelope_group:
            raise InvalidMessage("group message names another group inside")
        return self._apply(sender, body, out, via_group=envelope_group is not None)

    def _apply(
        self, sender: Address, body: Payload, out: _Inbound, *, via_group: bool
    ) -> list[Row]:
        """Rows (and events into ``out``) for one decrypted payload; nothing committed here."""
        now = self._ctx.now_ms()
        gid = body.group_id
        chat_id = group_chat_id(gid) if gid else direct_chat_id(sender.name)
        mid = body.message_id.hex()
        rows: list[Row] = []
        counters: dict[str, int] = {}
        if gid and body.type is not PayloadType.GROUP:
            group = self._ctx.history.group(gid)
            members = self._ctx.history.group_members(gid)
            if group is None or sender.name not in members:
                if body.type is PayloadType.SESSION_RESET:
                    return []
                raise InvalidMessage("group message from someone who is not a member")
        if body.counter:
            # A direct chat starts at 0; in a group we may join mid-stream, so the
            # first counter seen from a member is the baseline.
            key = f"in:{sender}:{chat_id}"
            last = self._ctx.counter_or_none(key)
            if last is None and not gid:
                last = 0
            # Messages that arrived but could not be read were reported as such
            # (``undecryptable``); they are not also "never arrived".
            unreadable_key = f"unreadable:{sender}:{chat_id}"
            unreadable = self._ctx.counter_or_none(unreadable_key) or 0
            if unreadable:
                counters[unreadable_key] = 0
            if last is not None and body.counter > last + 1 + unreadable:
                missed = body.counter - last - 1 - unreadable
                plural = "s" if missed != 1 else ""
                notice = notice_rows(
                    self._ctx,
                    rows,
                    chat_id,
                    sender,
                    f"{mid}.gap",
                    "gap",
                    f"{missed} message{plural} from {sender.name} never arrived",
                    now,
                )
                out.events.append(
                    GapDetected(chat_id, sender.name, sender.device_id, missed, notice)
                )
            # A counter at or below the last one means the sender started over
            # (a reinstall): follow it rather than report a gap forever.
            counters[key] = body.counter
        kind = body.type
        if kind in (PayloadType.TEXT, PayloadType.ATTACHMENT, PayloadType.TIMER):
            if self._ctx.history.current("messages", mid) is not None:
                return self._finish(rows, counters)
            pending: dict[str, dict[str, Any]] = {}
            chat = ensure_chat_rows(self._ctx, chat_id, now, pending)
            if kind is PayloadType.TIMER:
                chat["timer_seconds"] = body.timer_seconds
            expire = body.expire_seconds
            mseq = self._ctx.counter("seq:messages") + 1
            counters["seq:messages"] = mseq
            first = len(rows)  # the message's row (a gap notice may come before it)
            rows.append(
                History.row(
                    "messages",
                    id=mid,
                    chat_id=chat_id,
                    group_id=gid or None,
                    sender=sender.name,
                    sender_device=sender.device_id,
                    outgoing=0,
                    type=kind.name.lower(),
                    text=body.text or None,
                    reply_to=body.quote.message_id.hex() if body.quote else None,
                    quote_text=body.quote.text if body.quote else None,
                    counter=body.counter,
                    sent_at=body.sent_at_ms,
                    received_at=now,
                    status="received",
                    edited=0,
                    deleted=0,
                    expire_seconds=expire,
                    expires_at=now + expire * 1000 if expire else None,
                    seq=mseq,
                )
            )
            if body.attachment is not None:
                rows.append(attachment_row(mid, body.attachment))
            self._ctx.defer_or_add(rows, [("chats", c) for c in pending.values()])
            link_id = f"{chat_id}:{sender.name}"
            if link_id not in self._ctx.known_links:
                rows.append(History.row("users", id=sender.name, created_at=now))
                rows.append(
                    History.row("users_chats", id=link_id, chat_id=chat_id, user_id=sender.name)
                )
                self._ctx.known_links.add(link_id)
            # The delivered receipt needs no row of its own: every incoming message
            # above the "receipts sent" watermark gets one (see _flush_delivered).
            out.wake_outbox = True
            rows = self._finish(rows, counters)
            # The event is built after commit from the same values.
            out.events.append(MessageReceived(to_message(rows[first][1])))
            return rows
        if kind is PayloadType.RECEIPT:
            status: Literal["delivered", "read"] = (
                "delivered" if body.receipt is ReceiptKind.DELIVERED else "read"
            )
            for target in body.target_ids:
                tid = target.hex()
                message = self._ctx.history.current("messages", tid)
                if message is None or not message["outgoing"]:
                    continue
                rid = f"{tid}:{sender.name}:{sender.device_id}"
                old = self._ctx.history.current("receipts", rid)
                new_status = History.status_at_least(old["status"] if old else None, status)
                rows.append(
                    History.row(
                        "receipts",
                        id=rid,
                        message_id=tid,
                        user_id=sender.name,
                        device_id=sender.device_id,
                        status=new_status,
                        updated_at=now,
                    )
                )
                field_name = "delivered_at" if status == "delivered" else "read_at"
                message[field_name] = message[field_name] or now
                message["status"] = History.status_at_least(message["status"], status)
                rows.append(("messages", message))
                out.events.append(
                    ReceiptUpdated(tid, message["chat_id"], status, sender.name, sender.device_id)
                )
            return self._finish(rows, counters)
        if kind is PayloadType.TYPING:
            out.events.append(Typing(chat_id, sender.name, sender.device_id, body.typing))
            return self._finish(rows, counters)
        if kind is PayloadType.REACTION:
            tid = body.target_ids[0].hex()
            target_row = self._ctx.history.current("messages", tid)
            if target_row is not None and target_row["chat_id"] == chat_id:
                rows.append(
                    History.row(
                        "reactions",
                        id=f"{tid}:{sender.name}",
                        message_id=tid,
                        user_id=sender.name,
                        emoji=body.reaction,
                        updated_at=now,
                    )
                )
                out.events.append(MessageChanged(tid, chat_id, "reaction", sender.name))
            return self._finish(rows, counters)
        if kind in (PayloadType.EDIT, PayloadType.DELETE):
            tid = body.target_ids[0].hex()
            target_row = self._ctx.history.current("messages", tid)
            # Only the author may edit or delete, and only in the same chat.
            if (
                target_row is not None
                and target_row["sender"] == sender.name
                and not target_row["outgoing"]
                and target_row["chat_id"] == chat_id
                and not target_row["deleted"]
            ):
                if kind is PayloadType.EDIT:
                    target_row.update(text=body.text, edited=1)
                    change: Literal["edited", "deleted"] = "edited"
                else:
                    target_row.update(text=None, quote_text=None, deleted=1)
                    change = "deleted"
                    attachment = self._ctx.history.updated(
                        "attachments", tid, key=None, digest=None
                    )
                    if attachment:
                        rows.append(attachment)
                rows.append(("messages", target_row))
                out.events.append(MessageChanged(tid, chat_id, change, sender.name))
            return self._finish(rows, counters)
        if kind is PayloadType.GROUP:
            assert body.group is not None
            if via_group:
                raise InvalidMessage("group changes travel pairwise only")
            out.barrier = True
            rows.extend(self._apply_group(sender, gid, body.group, out))
            return self._finish(rows, counters)
        if kind is PayloadType.SESSION_RESET:
            if gid:
                # A member asks for our Sender Key again: redistribute to them.
                for device in self._ctx.known_devices(sender.name):
                    counters[f"dist:{gid}:{sender.name}.{device}"] = 0
                out.resend_key = (gid, sender.name)
            return self._finish(rows, counters)
        return self._finish(rows, counters)

    def _finish(self, rows: list[Row], counters: Mapping[str, int]) -> list[Row]:
        # Counter rows ride along in the decrypt's transaction (or are deferred to
        # its end); the cache is updated right away because the commit follows
        # immediately under the write lock (if it fails, the cache is dropped).
        self._ctx.set_counters(counters)
        self._ctx.defer_or_add(
            rows, [History.row("counters", id=k, value=v) for k, v in counters.items()]
        )
        return rows

    def _apply_group(
        self, sender: Address, gid: str, control: GroupControl, out: _Inbound
    ) -> list[Row]:
        group = self._ctx.history.group(gid)
        action = control.action
        if action is GroupAction.SENDER_KEY:
            if group is None or sender.name not in self._ctx.history.group_members(gid):
                raise InvalidMessage("sender key from someone who is not a member")
            self._ctx.engine.group_process_distribution(gid, sender, control.distribution)
            return []
        revision = int(group["revision"] or 0) if group else 0
        admins = set(json.loads(group["admins"] or "[]")) if group else set()
        members: set[str] = set(self._ctx.history.group_members(gid)) if group else set()
        if group is None:
            # We learn about a group by being created into it or added to it; the
            # sender must be an admin of the state it sends.
            joining = action in (GroupAction.CREATE, GroupAction.ADD)
            if not joining or sender.name not in control.admins:
                return []
            if self._ctx.me.name not in control.members:
                return []
        elif action is GroupAction.CREATE:
            return []  # a group id is created once
        elif action is GroupAction.LEAVE:
            if control.targets != (sender.name,) or sender.name not in members:
                return []
        elif sender.name not in admins or control.revision <= revision:
            return []  # only admins change a group, and never backwards
        if not set(control.admins) <= set(control.members) and action is not GroupAction.LEAVE:
            return []
        if action is GroupAction.LEAVE:
            control = dataclasses.replace(
                control,
                members=tuple(sorted(members - {sender.name})),
                admins=tuple(sorted(admins - {sender.name})),
                name=group["name"] if group else control.name,
                revision=max(revision + 1, control.revision),
            )
        rows = group_rows(self._ctx, gid, control, sender.name)
        gone = [u for u in members if u not in control.members]
        if gone:
            # A member left or was removed: they must not read what we send next.
            self._ctx.engine.group_rotate(gid)
            rows.append(
                History.row(
                    "counters", id=f"keygen:{gid}", value=self._ctx.counter(f"keygen:{gid}") + 1
                )
            )
            self._ctx.set_counters({f"keygen:{gid}": self._ctx.counter(f"keygen:{gid}") + 1})
            for user in gone:
                for device in self._ctx.known_devices(user):
                    self._ctx.engine.group_forget_sender(gid, Address(user, device))
        if self._ctx.me.name not in control.members:
            for user in members:
                for device in self._ctx.known_devices(user):
                    self._ctx.engine.group_forget_sender(gid, Address(user, device))
        out.events.append(
            GroupChanged(
                gid,
                _ACTION_NAMES[action],
                sender.name,
                control.name,
                control.members,
                control.admins,
                control.targets,
            )
        )
        return rows
