"""Committing what this device composes, marks read or lets expire.

Invariants:

* The rules live in :mod:`e2ee.messaging.compose`; this module only reads
  (``ctx.view()``), calls them and commits their outcome, under the write
  lock, in one transaction each.
* An outgoing payload is committed to the ``outbox`` (with its history row)
  before anything is sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from e2ee import payload
from e2ee.client.context import ClientContext
from e2ee.client.datadir import META_READ_RECEIPTS
from e2ee.events import Event, MessageChanged
from e2ee.messaging.chats import stored
from e2ee.messaging.compose import Draft, receipt_entry
from e2ee.messaging.compose import compose as compose_rule
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import AppRow, AttachmentRow, MessageRow, StoredMessage
from e2ee.payload import AttachmentPointer, GroupControl, PayloadType, Quote

__all__ = ["compose", "expire_sync", "mark_read_sync"]


def compose(
    ctx: ClientContext,
    to: str,
    kind: PayloadType,
    *,
    text: str = "",
    quote: Quote | None = None,
    target_ids: tuple[bytes, ...] = (),
    reaction: str = "",
    attachment: AttachmentPointer | None = None,
    group: GroupControl | None = None,
    group_targets: Sequence[str] | None = None,
    timer_seconds: int = 0,
    typing: bool = False,
    store_row: bool = True,
    extra_rows: Sequence[AppRow] = (),
) -> tuple[str, StoredMessage | None]:
    """Commit a payload to the outbox (and its history row); return its id and row.

    Raises:
        NotAMember: ``to`` is a group we are not in.
        UsageError: sending to ourselves.
        StorageError: nothing was committed.
    """
    draft = Draft(
        to,
        kind,
        text=text,
        quote=quote,
        target_ids=target_ids,
        reaction=reaction,
        attachment=attachment,
        group=group,
        group_targets=group_targets,
        timer_seconds=timer_seconds,
        typing=typing,
        store_row=store_row,
        extra_rows=tuple(extra_rows),
    )
    with ctx.wlock:
        new_id = ctx.random_bytes(payload.MESSAGE_ID_BYTES)
        composed = compose_rule(ctx.view(), ctx.me, draft, ctx.now_ms(), new_id)
        ctx.commit_outcome(composed.outcome)
        return composed.message_id, composed.stored


def mark_read_sync(ctx: ClientContext, chat_id: str) -> int:
    """Mark a chat's incoming messages read and queue read receipts (if enabled).

    Returns:
        How many messages were newly marked read.

    Raises:
        StorageError: nothing was committed.
    """
    with ctx.wlock:
        now = ctx.now_ms()
        send_receipts = ctx.store.get_meta(META_READ_RECEIPTS) != "0"
        view = ctx.view()
        out = Outcome()
        marked = 0
        for message_id, sender in ctx.history.unread(chat_id):
            message = view.get(MessageRow, message_id)
            if message is not None:
                out.rows.append(dataclasses.replace(message, read_at=now))
                marked += 1
            if send_receipts:
                receipt_entry(view, out, sender, message_id, "read", now)
        if out.rows:
            ctx.commit_outcome(out)
        return marked


def expire_sync(ctx: ClientContext) -> list[Event]:
    """Clear the messages whose disappearing timer ran out.

    Returns:
        A ``MessageChanged("expired")`` event per cleared message.

    Raises:
        StorageError: nothing was committed.
    """
    with ctx.wlock:
        events: list[Event] = []
        view = ctx.view()
        out = Outcome()
        for mid in ctx.history.expired(ctx.now_ms()):
            message = view.get(MessageRow, mid)
            if message is None:
                continue
            cleared = dataclasses.replace(message, text=None, quote_text=None, deleted=2)
            out.rows.append(cleared)
            attachment = view.get(AttachmentRow, mid)
            if attachment is not None:
                out.rows.append(
                    dataclasses.replace(attachment, key=None, digest=None, local_path=None)
                )
            events.append(
                MessageChanged(mid, message.chat_id, "expired", message.sender, stored(cleared))
            )
        if out.rows:
            ctx.commit_outcome(out)
        return events
