"""Applying a decrypted payload: the rows, events and follow-ups it causes.

Invariants:

* All knowledge of what an inbound payload does lives here, one small function
  per :class:`~e2ee.payload.PayloadType`, chosen by the table :data:`HANDLERS`
  (every type has exactly one entry).
* A group payload (other than a group change) is accepted only from a member
  of the group in our state; a group change travels pairwise only.
* A message is stored once: a payload whose message id is stored already
  changes nothing (not even the sender's counter).
* Only the author may edit or delete a message, only in the same chat, and
  not once it was deleted. Deleting also clears the attachment's key and the
  deleted text from every message quoting it (``quote_text``), also from a
  reply that arrives later.
* A payload from another of our own devices (linked devices) is what we sent
  from there: a TRANSCRIPT of a direct message or group change, our own group
  message (Sender Key), or a SYNC of local state (:mod:`e2ee.messaging.sync`).
  It is stored as ours (``outgoing``, status ``sent``), gets no receipt and
  counts toward no gap. TRANSCRIPT and SYNC from anyone else are refused.
* Pure: reads through the view, returns an :class:`Outcome`; nothing is
  written before the caller commits it (with the session state that
  decrypted the payload, in one transaction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from e2ee.errors import InvalidMessage
from e2ee.events import MessageChanged, MessageReceived, MessageStored, ReceiptUpdated, Typing
from e2ee.messaging import keys
from e2ee.messaging.accounting import count_inbound
from e2ee.messaging.chats import stored, touch_chat
from e2ee.messaging.groups import apply_group_control, describe_change
from e2ee.messaging.outcome import Outcome, ResendSenderKey, WakeOutbox
from e2ee.messaging.rows import (
    AttachmentRow,
    GroupRow,
    MessageRow,
    ReactionRow,
    ReceiptRow,
    UserChatRow,
    UserRow,
    direct_chat_id,
    group_chat_id,
    status_at_least,
)
from e2ee.messaging.sync import apply_sync
from e2ee.messaging.view import HistoryView
from e2ee.payload import AttachmentPointer, Payload, PayloadType, ReceiptKind
from e2ee.store.protocols import Address

__all__ = ["HANDLERS", "Inbound", "apply_payload", "attachment_row", "clear_quotes"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """One decrypted payload and where it came from.

    Attributes:
        me: our user name.
        sender: the sending device.
        body: the payload.
        via_group: True if it arrived in a group (Sender Key) envelope.
        chat_id: the chat it belongs to.
        message_id: its id (hex).
        now: unix ms, the time of arrival.
        pos: its place in the chat if it arrived late (see
            :func:`~e2ee.messaging.accounting.count_inbound`), else None.
        own: it came from another of our devices (we sent it from there).
    """

    me: str
    sender: Address
    body: Payload
    via_group: bool
    chat_id: str
    message_id: str
    now: int
    pos: int | None = None
    own: bool = False


Handler = Callable[[HistoryView, Inbound, Outcome], None]
#: Payload types that become a ``messages`` row.
_STORED: Final = frozenset({PayloadType.TEXT, PayloadType.ATTACHMENT, PayloadType.TIMER})


def attachment_row(message_id: str, a: AttachmentPointer) -> AttachmentRow:
    """The ``attachments`` row of a message's attachment."""
    return AttachmentRow(
        id=message_id,
        message_id=message_id,
        blob_id=a.blob_id,
        key=a.key,
        digest=a.digest,
        size=a.size,
        mime_type=a.mime_type,
        file_name=a.file_name,
    )


def apply_payload(
    view: HistoryView, me: str, sender: Address, body: Payload, *, via_group: bool, now: int
) -> Outcome:
    """What one decrypted payload causes.

    Args:
        view: history as it stands (committed plus the transaction in progress).
        me: our user name.
        sender: the sending device (authenticated by the decrypt).
        body: the payload.
        via_group: it arrived in a group envelope.
        now: unix ms.

    Returns:
        The rows to commit with the decrypt, events and follow-ups.

    Raises:
        InvalidMessage: the payload breaks a rule (a group message from a
            non-member, a group change inside a group envelope).
    """
    own = sender.name == me
    out = Outcome()
    transcript = None
    if body.type in (PayloadType.TRANSCRIPT, PayloadType.SYNC):
        if not own or via_group:
            raise InvalidMessage("transcripts and sync messages come only from our own devices")
        if body.sync is not None:
            return apply_sync(view, me, sender, body.sync, now)
        assert body.transcript is not None
        transcript, body = body.transcript, body.transcript.content
    gid = body.group_id
    if transcript is not None:
        if transcript.to_user == me:
            return out  # we never send to ourselves: nothing to store
        chat_id = transcript.chat_id
    elif gid:
        chat_id = group_chat_id(gid)
    elif own:
        return out  # a direct payload between our devices (a session reset): nothing to store
    else:
        chat_id = direct_chat_id(sender.name)
    if gid and body.type is not PayloadType.GROUP:
        group = view.get(GroupRow, gid)
        if group is None or sender.name not in view.group_members(gid):
            if body.type is PayloadType.SESSION_RESET:
                return out
            raise InvalidMessage("group message from someone who is not a member")
    inbound = Inbound(me, sender, body, via_group, chat_id, body.message_id.hex(), now, own=own)
    if body.type in _STORED and view.get(MessageRow, inbound.message_id) is not None:
        # Stored already (the ratchet normally stops a duplicate before this): a
        # second copy changes nothing, the sender's counter included.
        return out
    if own:
        # Our other device's counters are its own; they mean no gap here.
        HANDLERS[body.type](view, inbound, out)
        return out
    place = count_inbound(
        view,
        out,
        sender,
        chat_id,
        in_group=bool(gid),
        counter=body.counter,
        message_id=inbound.message_id,
        now=now,
    )
    if place is not None:
        inbound = dataclasses.replace(inbound, pos=place)
    HANDLERS[body.type](view, inbound, out)
    return out


def _message(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """TEXT, ATTACHMENT, TIMER: store the message (once, see :func:`apply_payload`)."""
    body = p.body
    timer = body.timer_seconds if body.type is PayloadType.TIMER else None
    touch_chat(view, out, p.chat_id, p.now, timer_seconds=timer)
    expire = body.expire_seconds
    message = MessageRow(
        id=p.message_id,
        chat_id=p.chat_id,
        group_id=body.group_id or None,
        sender=p.sender.name,
        sender_device=p.sender.device_id,
        outgoing=int(p.own),
        type=body.type.name.lower(),
        text=body.text or None,
        reply_to=body.quote.message_id.hex() if body.quote else None,
        quote_text=_quote_text(view, body),
        counter=body.counter,
        sent_at=body.sent_at_ms,
        received_at=None if p.own else p.now,
        status="sent" if p.own else "received",
        edited=0,
        deleted=0,
        expire_seconds=expire,
        expires_at=p.now + expire * 1000 if expire else None,
        seq=out.next_seq(view, keys.SEQ_MESSAGES),
        pos=p.pos,
    )
    out.rows.append(message)
    if body.attachment is not None:
        out.rows.append(attachment_row(p.message_id, body.attachment))
    if p.own:
        # Sent by us from another device: kept as ours, no receipt (it is not incoming).
        out.events.append(MessageStored(stored(message)))
        return
    link_id = f"{p.chat_id}:{p.sender.name}"
    if view.get(UserChatRow, link_id) is None:
        out.rows.append(UserRow(p.sender.name, created_at=p.now))
        out.rows.append(UserChatRow(link_id, p.chat_id, p.sender.name))
    # The delivered receipt needs no row of its own: every incoming message
    # above the "receipts sent" watermark gets one (the outbox sends them).
    out.follow_ups.append(WakeOutbox())
    out.events.append(MessageReceived(stored(message)))


def _quote_text(view: HistoryView, body: Payload) -> str | None:
    """The quoted text to keep: none if the quoted message was deleted already."""
    if body.quote is None:
        return None
    quoted = view.get(MessageRow, body.quote.message_id.hex())
    if quoted is not None and quoted.deleted:
        return None  # a late reply must not bring back what its author deleted
    return body.quote.text


def _receipt(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """RECEIPT: move our messages' per-device and overall status forward."""
    if p.own:
        return  # our devices read for each other through SYNC, not receipts
    status: Literal["delivered", "read"] = (
        "delivered" if p.body.receipt is ReceiptKind.DELIVERED else "read"
    )
    sender = p.sender
    for target in p.body.target_ids:
        tid = target.hex()
        message = view.get(MessageRow, tid)
        if message is None or not message.outgoing:
            continue
        rid = f"{tid}:{sender.name}:{sender.device_id}"
        old = view.get(ReceiptRow, rid)
        if old is not None and status_at_least(old.status, status) == old.status:
            # A receipt that moves nothing (a delivered one overtaken by the read one, or
            # the same again): no row, no event, so nobody sees a status go back.
            continue
        out.rows.append(
            ReceiptRow(
                rid,
                tid,
                sender.name,
                sender.device_id,
                status_at_least(old.status if old else None, status),
                updated_at=p.now,
            )
        )
        if status == "delivered":
            message = dataclasses.replace(message, delivered_at=message.delivered_at or p.now)
        else:
            message = dataclasses.replace(message, read_at=message.read_at or p.now)
        message = dataclasses.replace(message, status=status_at_least(message.status, status))
        out.rows.append(message)
        out.events.append(
            ReceiptUpdated(
                tid,
                message.chat_id,
                status,
                sender.name,
                sender.device_id,
                message_status=message.status,
            )
        )


def _typing(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """TYPING: only an event."""
    if p.own:
        return
    out.events.append(Typing(p.chat_id, p.sender.name, p.sender.device_id, p.body.typing))


def _reaction(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """REACTION: the sender's one reaction to a message of the same chat."""
    tid = p.body.target_ids[0].hex()
    target = view.get(MessageRow, tid)
    if target is None or target.chat_id != p.chat_id:
        return
    out.rows.append(
        ReactionRow(f"{tid}:{p.sender.name}", tid, p.sender.name, p.body.reaction, p.now)
    )
    out.events.append(
        MessageChanged(
            tid,
            p.chat_id,
            "reaction",
            p.sender.name,
            message=stored(target),
            reaction=p.body.reaction,
        )
    )


def _edit_or_delete(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """EDIT, DELETE: only the author, in the same chat, of a message not deleted."""
    tid = p.body.target_ids[0].hex()
    target = view.get(MessageRow, tid)
    if (
        target is None
        or target.sender != p.sender.name
        or bool(target.outgoing) != p.own
        or target.chat_id != p.chat_id
        or target.deleted
    ):
        return
    change: Literal["edited", "deleted"]
    if p.body.type is PayloadType.EDIT:
        target = dataclasses.replace(target, text=p.body.text, edited=1)
        change = "edited"
    else:
        target = dataclasses.replace(target, text=None, quote_text=None, deleted=1)
        change = "deleted"
        attachment = view.get(AttachmentRow, tid)
        if attachment is not None:
            out.rows.append(dataclasses.replace(attachment, key=None, digest=None))
    out.rows.append(target)
    out.events.append(MessageChanged(tid, p.chat_id, change, p.sender.name, stored(target)))
    if change == "deleted":
        clear_quotes(view, out, tid, p.sender.name)


def clear_quotes(view: HistoryView, out: Outcome, message_id: str, by: str) -> None:
    """A deleted message's text goes from every message quoting it, too."""
    for reply in view.replies(message_id):
        if reply.quote_text is not None:
            cleared = dataclasses.replace(reply, quote_text=None)
            out.rows.append(cleared)
            out.events.append(
                MessageChanged(reply.id, reply.chat_id, "quote_deleted", by, stored(cleared))
            )


def _group(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """GROUP: a membership change or a Sender Key, pairwise only."""
    assert p.body.group is not None
    if p.via_group:
        raise InvalidMessage("group changes travel pairwise only")
    changed = apply_group_control(view, out, p.me, p.sender, p.body.group_id, p.body.group, p.now)
    if changed is None:
        return
    text = describe_change(p.body.group.action, changed.name, changed.targets)
    notice = None
    if text is not None and view.get(MessageRow, p.message_id) is None:
        # Kept like a message (who changed what), stored read: it gets no receipt.
        touch_chat(view, out, p.chat_id, p.now)
        row = MessageRow(
            id=p.message_id,
            chat_id=p.chat_id,
            group_id=p.body.group_id,
            sender=p.sender.name,
            sender_device=p.sender.device_id,
            outgoing=int(p.own),
            type="group",
            text=text,
            counter=p.body.counter,
            sent_at=p.body.sent_at_ms,
            received_at=p.now,
            read_at=p.now,
            status="received",
            edited=0,
            deleted=0,
            seq=out.next_seq(view, keys.SEQ_MESSAGES),
        )
        out.rows.append(row)
        notice = stored(row)
    out.events.append(dataclasses.replace(changed, notice=notice))


def _session_reset(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """SESSION_RESET: in a group, a member asks for our Sender Key again."""
    gid = p.body.group_id
    if not gid:
        return
    for device in view.devices(p.sender.name):
        out.counters[keys.distributed(gid, p.sender.name, device)] = 0
    out.follow_ups.append(ResendSenderKey(gid, p.sender.name))


def _unwrapped(view: HistoryView, p: Inbound, out: Outcome) -> None:
    """TRANSCRIPT, SYNC: never reach a handler (:func:`apply_payload` unwraps them)."""
    raise InvalidMessage(f"a {p.body.type.name} payload cannot be nested")


#: The one place that says what each payload type does on arrival.
HANDLERS: Final[Mapping[PayloadType, Handler]] = MappingProxyType(
    {
        PayloadType.TEXT: _message,
        PayloadType.ATTACHMENT: _message,
        PayloadType.TIMER: _message,
        PayloadType.RECEIPT: _receipt,
        PayloadType.TYPING: _typing,
        PayloadType.REACTION: _reaction,
        PayloadType.EDIT: _edit_or_delete,
        PayloadType.DELETE: _edit_or_delete,
        PayloadType.GROUP: _group,
        PayloadType.SESSION_RESET: _session_reset,
        PayloadType.TRANSCRIPT: _unwrapped,
        PayloadType.SYNC: _unwrapped,
    }
)
