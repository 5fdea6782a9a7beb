"""Composing: the outbox entry and history rows for what this device sends.

Invariants:

* An outgoing payload becomes an ``outbox`` row (and, for what people see, a
  ``messages`` row) in one outcome, committed before anything is sent; its
  message id never changes afterwards, so every retry is the same message.
* Counted payloads (everything but typing indicators and session resets)
  take the chat's next outgoing counter; the receiver's gap accounting reads
  it. The outbox ``seq`` is the sending order.
* A disappearing timer applies to messages stored after it was set.
* Pure: reads through the view, returns an :class:`Outcome`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from e2ee import payload
from e2ee.errors import NotAMember, UsageError
from e2ee.messaging import keys
from e2ee.messaging.chats import group_id_of, touch_chat
from e2ee.messaging.chats import stored as stored_message
from e2ee.messaging.groups import describe_change
from e2ee.messaging.inbound import attachment_row, clear_quotes
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import (
    AppRow,
    ChatRow,
    GroupRow,
    MessageRow,
    OutboxRow,
    StoredMessage,
    direct_chat_id,
    dumps,
)
from e2ee.messaging.view import HistoryView
from e2ee.payload import AttachmentPointer, GroupControl, Payload, PayloadType, Quote
from e2ee.store.protocols import Address

__all__ = ["Composed", "Draft", "compose", "delete_own", "receipt_entry", "resolve_chat"]


@dataclass(frozen=True, slots=True)
class Draft:
    """What to send (see :func:`compose`).

    Attributes:
        to: a user name or a chat id (``dm:<user>``, ``group:<id>``).
        kind: the payload type.
        group_targets: send pairwise to these users instead of the chat's
            members (group changes, Sender Key requests).
        store_row: also store a ``messages`` row (what people see).
        extra_rows: rows committed with it (an edit's new text, a reaction).
        timer_seconds: the new timer of a TIMER payload.
    """

    to: str
    kind: PayloadType
    text: str = ""
    quote: Quote | None = None
    target_ids: tuple[bytes, ...] = ()
    reaction: str = ""
    attachment: AttachmentPointer | None = None
    group: GroupControl | None = None
    group_targets: Sequence[str] | None = None
    timer_seconds: int = 0
    typing: bool = False
    store_row: bool = True
    extra_rows: Sequence[AppRow] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Composed:
    """A composed message: its id (hex), its history row (if stored) and the rows."""

    message_id: str
    stored: StoredMessage | None
    outcome: Outcome


def resolve_chat(view: HistoryView, me: str, to: str) -> tuple[str, str, list[str]]:
    """(chat id, mode, targets) for a user name or a chat id.

    Raises:
        NotAMember: a group we are not in.
        UsageError: sending to ourselves or to nobody.
    """
    if to.startswith("group:"):
        gid = to[len("group:") :]
        group = view.get(GroupRow, gid)
        if group is None or not group.member:
            raise NotAMember(gid)
        return to, "group", []
    peer = to[len("dm:") :] if to.startswith("dm:") else to
    if not peer or peer == me:
        raise UsageError("send to another user (or a group chat id)")
    return direct_chat_id(peer), "pairwise", [peer]


def compose(view: HistoryView, me: Address, draft: Draft, now: int, new_id: bytes) -> Composed:
    """The outbox row (and history rows) for ``draft``.

    Args:
        view: history.
        me: this device.
        draft: what to send.
        now: unix ms.
        new_id: the new message id (``payload.MESSAGE_ID_BYTES`` random bytes).

    Raises:
        NotAMember: a group we are not in.
        UsageError: sending to ourselves.
    """
    kind = draft.kind
    chat_id, mode, targets = resolve_chat(view, me.name, draft.to)
    if draft.group_targets is not None:
        mode, targets = "pairwise", list(draft.group_targets)
    out = Outcome()
    chat: ChatRow | None
    if draft.store_row:
        timer = draft.timer_seconds if kind is PayloadType.TIMER else None
        chat = touch_chat(view, out, chat_id, now, timer_seconds=timer)
    else:
        chat = view.get(ChatRow, chat_id)
    counter = 0
    if kind not in (PayloadType.TYPING, PayloadType.SESSION_RESET):
        counter = out.next_seq(view, keys.outgoing(chat_id))
    timed = draft.store_row and kind is not PayloadType.TIMER
    expire = (chat.timer_seconds or 0) if timed and chat is not None else 0
    mid = new_id.hex()
    body = Payload(
        type=kind,
        message_id=new_id,
        sent_at_ms=now,
        counter=counter,
        group_id=group_id_of(chat_id) or "",
        text=draft.text,
        quote=draft.quote,
        target_ids=draft.target_ids,
        reaction=draft.reaction,
        typing=draft.typing,
        attachment=draft.attachment,
        group=draft.group,
        timer_seconds=draft.timer_seconds,
        expire_seconds=expire,
    )
    out.rows.append(
        OutboxRow(
            id=mid,
            seq=out.next_seq(view, keys.SEQ_OUTBOX),
            chat_id=chat_id,
            mode=mode,
            targets=dumps(targets),
            kind=kind.name.lower(),
            payload=payload.encode(body),
            state="queued",
            attempts=0,
            created_at=now,
        )
    )
    stored = None
    if draft.store_row:
        quote = draft.quote
        text = draft.text or None
        if draft.group is not None:
            # Our own change, kept as the others keep it: we are its sender.
            control = draft.group
            text = describe_change(control.action, control.name, control.targets)
        message = MessageRow(
            id=mid,
            chat_id=chat_id,
            group_id=body.group_id or None,
            sender=me.name,
            sender_device=me.device_id,
            outgoing=1,
            type=kind.name.lower(),
            text=text,
            reply_to=quote.message_id.hex() if quote else None,
            quote_text=quote.text if quote else None,
            counter=counter,
            sent_at=now,
            status="pending",
            edited=0,
            deleted=0,
            expire_seconds=expire,
            expires_at=now + expire * 1000 if expire else None,
            seq=out.next_seq(view, keys.SEQ_MESSAGES),
        )
        out.rows.append(message)
        stored = stored_message(message)
        if draft.attachment is not None:
            out.rows.append(attachment_row(mid, draft.attachment))
    out.rows.extend(draft.extra_rows)
    return Composed(mid, stored, out)


def receipt_entry(
    view: HistoryView, out: Outcome, user: str, message_id: str, kind: str, now: int
) -> None:
    """Queue a read (or delivered) receipt for ``message_id`` to ``user`` in ``out``."""
    out.rows.append(
        OutboxRow(
            id=f"r:{kind}:{message_id}",
            seq=out.next_seq(view, keys.SEQ_OUTBOX),
            chat_id=direct_chat_id(user),
            mode="receipt",
            targets=dumps([user]),
            ref=message_id,
            kind=kind,
            state="queued",
            attempts=0,
            created_at=now,
        )
    )


def delete_own(view: HistoryView, me: str, message_id: str) -> Outcome:
    """The local side of deleting one of our messages for everyone.

    Its text and quote are cleared now, and so is the deleted text in every
    message quoting it (a ``quote_deleted`` event each); the DELETE payload
    carrying it to the others is composed with these rows.
    """
    out = Outcome()
    target = view.get(MessageRow, message_id)
    if target is None:
        return out
    out.rows.append(dataclasses.replace(target, text=None, quote_text=None, deleted=1))
    clear_quotes(view, out, message_id, me)
    return out
