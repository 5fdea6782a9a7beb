"""Chats and notices: the chat row a message moves, the notice rows of a chat.

Invariants:

* A chat row exists once something was stored in it; every stored message
  moves its ``last_message_at``.
* A notice (``gap``, ``undecryptable``) takes the next ``seq`` like a message,
  so it stands before whatever the same operation stores after it; the same
  notice id is never stored twice (a delivery processed again after a crash).
* Pure: reads through the view, writes into the outcome.
"""

from __future__ import annotations

import dataclasses

from e2ee.messaging import keys
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import ChatRow, MessageRow, StoredMessage, as_row, to_message
from e2ee.messaging.view import HistoryView
from e2ee.store.protocols import Address

__all__ = ["add_notice", "group_id_of", "stored", "touch_chat"]


def group_id_of(chat_id: str) -> str | None:
    """The group id of a group chat id, None for a direct chat."""
    return chat_id[len("group:") :] if chat_id.startswith("group:") else None


def stored(message: MessageRow) -> StoredMessage:
    """The public shape of a message row."""
    return to_message(as_row(message)[1])


def touch_chat(
    view: HistoryView, out: Outcome, chat_id: str, now: int, *, timer_seconds: int | None = None
) -> ChatRow:
    """The chat's row (made if new) with ``last_message_at = now``, put into ``out``.

    Args:
        timer_seconds: a new disappearing-messages timer for the chat, if set.
    """
    chat = out.chat(view, chat_id)
    if chat is None:
        if chat_id.startswith("dm:"):
            chat = ChatRow(chat_id, "direct", peer=chat_id[3:], created_at=now)
        else:
            chat = ChatRow(chat_id, "group", group_id=group_id_of(chat_id), created_at=now)
    chat = dataclasses.replace(chat, last_message_at=now)
    if timer_seconds is not None:
        chat = dataclasses.replace(chat, timer_seconds=timer_seconds)
    out.chats[chat_id] = chat
    return chat


def add_notice(
    view: HistoryView,
    out: Outcome,
    chat_id: str,
    sender: Address,
    notice_id: str,
    kind: str,
    text: str,
    now: int,
) -> tuple[StoredMessage, bool]:
    """Add a notice row to ``out`` (see ``NOTICE_TYPES``).

    Returns:
        The notice, and False if it was stored already (nothing was added).
    """
    existing = view.get(MessageRow, notice_id)
    if existing is not None:  # the same delivery processed again after a crash
        return stored(existing), False
    touch_chat(view, out, chat_id, now)
    notice = MessageRow(
        id=notice_id,
        chat_id=chat_id,
        group_id=group_id_of(chat_id),
        sender=sender.name,
        sender_device=sender.device_id,
        outgoing=0,
        type=kind,
        text=text,
        counter=0,
        sent_at=now,
        received_at=now,
        read_at=now,
        status="received",
        edited=0,
        deleted=0,
        expire_seconds=0,
        seq=out.next_seq(view, keys.SEQ_MESSAGES),
    )
    out.rows.append(notice)
    return stored(notice), True
