"""Committing what this device composes, marks read or lets expire.

Invariants:

* The rules live in :mod:`e2ee.messaging.compose`; this module only reads
  (``ctx.view()``), calls them and commits their outcome, under the write
  lock, in one transaction each; several composes queued together share one
  (:func:`compose_many`, a group commit like the inbox's).
* An outgoing payload is committed to the ``outbox`` (with its history row)
  before anything is sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from e2ee import payload
from e2ee.client.context import ClientContext
from e2ee.client.datadir import META_READ_RECEIPTS
from e2ee.client.sync import sync_outcome
from e2ee.errors import E2EEError, StorageError, UsageError
from e2ee.events import Event, MessageChanged
from e2ee.messaging.chats import stored
from e2ee.messaging.compose import Draft, receipt_entry
from e2ee.messaging.compose import compose as compose_rule
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import AttachmentRow, MessageRow, StoredMessage, as_row
from e2ee.messaging.sync import sync_messages
from e2ee.payload import PayloadType, Quote, SyncKind
from e2ee.store import Changes

__all__ = [
    "compose_many",
    "edited_rows",
    "expire_sync",
    "make_draft",
    "mark_read_sync",
    "quote_of",
    "target_message",
]


def make_draft(to: str, kind: PayloadType, **kw: Any) -> Draft:
    """A :class:`~e2ee.messaging.compose.Draft` from keyword arguments (its fields)."""
    return Draft(to, kind, **{**kw, "extra_rows": tuple(kw.get("extra_rows", ()))})


def compose_many(
    ctx: ClientContext, drafts: Sequence[Draft]
) -> list[tuple[str, StoredMessage | None] | E2EEError]:
    """Commit several payloads to the outbox in one store transaction (a group commit).

    The drafts are composed in their order, each reading what the earlier ones
    wrote (the same transaction), so outbox order and per-chat counters are as
    if each had been committed alone. Every row is written at the end, in one
    commit (``ctx.pending``: the view reads them from there meanwhile; the chat
    and counter rows every draft moves once each), so the rows of a table go
    several per statement. A draft the rules refuse (``UsageError``, ``NotAMember``) gets its
    error and commits nothing; the others go on. Nothing is durable before the
    one ``COMMIT`` at the end; if it (or any write) fails, nothing of the batch
    stands and every draft gets the ``StorageError``.

    Returns:
        Per draft, in order: its id (hex) and history row (None: no ``messages``
        row), or its error (``NotAMember``: a group we are not in;
        ``UsageError``: sending to ourselves; ``StorageError``: nothing was
        committed).
    """
    results: list[tuple[str, StoredMessage | None] | E2EEError] = []
    with ctx.wlock:
        ctx.pending = {}
        try:
            with ctx.store.batch():
                for draft in drafts:
                    new_id = ctx.random_bytes(payload.MESSAGE_ID_BYTES)
                    try:
                        composed = compose_rule(ctx.view(), ctx.me, draft, ctx.now_ms(), new_id)
                    except StorageError:
                        raise
                    except E2EEError as exc:  # the rules refused it: nothing to commit
                        results.append(exc)
                        continue
                    ctx.defer(composed.outcome)  # written at the end, with the others
                    results.append((composed.message_id, composed.stored))
                if ctx.pending:
                    ctx.store.commit(Changes(app_rows=tuple(map(as_row, ctx.pending.values()))))
        except StorageError as exc:
            return [exc] * len(drafts)
        finally:
            ctx.pending = None
    return results


def mark_read_sync(ctx: ClientContext, chat_id: str) -> int:
    """Mark a chat's incoming messages read and queue read receipts (if enabled).

    Our other devices are told (a READ sync message, in the same commit), so
    they mark the same messages read and the peer gets one read receipt.

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
        read: list[bytes] = []
        for message_id, sender in ctx.history.unread(chat_id):
            message = view.get(MessageRow, message_id)
            if message is not None:
                out.rows.append(dataclasses.replace(message, read_at=now))
                read.append(bytes.fromhex(message_id))
            if send_receipts:
                receipt_entry(view, out, sender, message_id, "read", now)
        marked = len(read)
        sync_outcome(ctx, out, sync_messages(SyncKind.READ, message_ids=read))
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


def quote_of(ctx: ClientContext, message_id: str) -> Quote:
    """The quote of a message in history, for a reply (blocking).

    Raises:
        UsageError: no such message.
    """
    found = ctx.history.message(message_id)
    if found is None:
        raise UsageError("reply_to names no message in history")
    return Quote(bytes.fromhex(found.id), found.sender, (found.text or "")[:200])


def target_message(ctx: ClientContext, message_id: str, *, own: bool = False) -> StoredMessage:
    """The message a reaction, an edit or a delete is about (blocking).

    Raises:
        UsageError: not in history, deleted, or (``own``) not ours.
    """
    found = ctx.history.message(message_id)
    if found is None or found.deleted:
        raise UsageError("no such message in history")
    if own and not found.outgoing:
        raise UsageError("only our own messages can be edited or deleted")
    return found


def edited_rows(ctx: ClientContext, message_id: str, text: str) -> list[MessageRow]:
    """Our message's row with its new text, to commit with the edit (blocking)."""
    found = ctx.view().get(MessageRow, message_id)
    return [] if found is None else [dataclasses.replace(found, text=text, edited=1)]
