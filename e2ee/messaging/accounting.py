"""Gap and undecryptable accounting: what never arrived, what arrived unreadable.

Invariants:

* Every counted payload carries its sender's per-chat counter (1, 2, ...). A
  direct chat starts at 0; in a group we may join mid-stream, so the first
  counter seen from a member is the baseline.
* A message that arrived but could not be read is reported once, as
  ``undecryptable`` (and counted), never also as "never arrived": the next
  gap is reduced by the unreadable count, which then starts over.
* A counter at or below the last one means the sender started over (a
  reinstall): it is followed, not reported as a gap forever.
* At most one repair (session reset or sender-key request) per sender device
  and scope per ``interval_ms``.
* Our counters to a contact restart when we accept their new identity key
  (their new installation starts from nothing), see :func:`restart_counters`.
* Pure: reads through the view, writes into the outcome.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from e2ee import payload
from e2ee.errors import E2EEError, InvalidMessage, MissingKey, NoSession
from e2ee.events import DecryptionProblem, GapDetected
from e2ee.messaging import keys
from e2ee.messaging.chats import add_notice
from e2ee.messaging.outcome import Outcome, RequestSenderKey, ResetSession
from e2ee.messaging.rows import GroupRow, MessageRow, OutboxRow, direct_chat_id, group_chat_id
from e2ee.messaging.view import HistoryView
from e2ee.store.protocols import Address

__all__ = ["count_inbound", "repair_allowed", "restart_counters", "undecryptable"]


def count_inbound(
    view: HistoryView,
    out: Outcome,
    sender: Address,
    chat_id: str,
    *,
    in_group: bool,
    counter: int,
    message_id: str,
    now: int,
) -> None:
    """Follow a sender's counter; add a ``gap`` notice and event if messages are missing."""
    if not counter:
        return
    key = keys.incoming(sender, chat_id)
    last = out.counter(view, key)
    if last is None and not in_group:
        last = 0
    unreadable_key = keys.unreadable(sender, chat_id)
    unreadable = out.counter(view, unreadable_key) or 0
    if unreadable:
        out.counters[unreadable_key] = 0
    if last is not None and counter > last + 1 + unreadable:
        missed = counter - last - 1 - unreadable
        plural = "s" if missed != 1 else ""
        notice, _ = add_notice(
            view,
            out,
            chat_id,
            sender,
            f"{message_id}.gap",
            "gap",
            f"{missed} message{plural} from {sender.name} never arrived",
            now,
        )
        out.events.append(GapDetected(chat_id, sender.name, sender.device_id, missed, notice))
    out.counters[key] = counter


def repair_allowed(
    view: HistoryView, out: Outcome, sender: Address, scope: str, now: int, interval_ms: int
) -> bool:
    """True (and the repair recorded in ``out``) if ``sender`` was not repaired lately."""
    key = keys.repair(sender, scope)
    if now - (out.counter(view, key) or 0) < interval_ms:
        return False
    out.counters[key] = now
    return True


def undecryptable(
    view: HistoryView,
    sender: Address,
    delivery_id: str,
    error: E2EEError,
    *,
    group_id: str | None,
    now: int,
    repair_interval_ms: int,
) -> Outcome:
    """Report a delivery that cannot be read: a notice in its chat, an event, a repair.

    Args:
        view: history.
        sender: the sending device.
        delivery_id: the relay's delivery id (hex); names the notice.
        error: why it cannot be read.
        group_id: the group of a group envelope, None for a pairwise one.
        now: unix ms.
        repair_interval_ms: at most one repair per sender device in this time.
    """
    out = Outcome()
    repair: Literal["session_reset", "sender_key_request", "none"] = "none"
    if group_id is not None and isinstance(error, NoSession | MissingKey):
        explanation = (
            "we do not hold this member's current group key; asked them to send it, "
            "so their later messages can be read"
        )
        if repair_allowed(view, out, sender, group_id, now, repair_interval_ms):
            repair = "sender_key_request"
            out.follow_ups.append(RequestSenderKey(group_id, sender))
    elif isinstance(error, payload.UnsupportedPayload):
        explanation = "the sender uses a newer message format; update this app"
    elif group_id is None and isinstance(error, NoSession | MissingKey | InvalidMessage):
        explanation = (
            "the message could not be decrypted (our session with the sender is out of "
            "step); a new session is being set up; ask them to send it again"
        )
        if repair_allowed(view, out, sender, "", now, repair_interval_ms):
            repair = "session_reset"
            out.follow_ups.append(ResetSession(sender))
    else:
        explanation = f"the message was rejected: {error}"
    notice = None
    if group_id is None or view.get(GroupRow, group_id) is not None:
        # Recorded in its chat (in this delivery's transaction), so every client
        # shows it where it happened, also after a restart.
        chat_id = group_chat_id(group_id) if group_id else direct_chat_id(sender.name)
        notice, added = add_notice(
            view,
            out,
            chat_id,
            sender,
            f"{delivery_id}.undecryptable",
            "undecryptable",
            f"a message from {sender.name} could not be read: {explanation}",
            now,
        )
        if added:  # a new notice (not the same delivery again after a crash)
            key = keys.unreadable(sender, chat_id)
            out.counters[key] = (out.counter(view, key) or 0) + 1
    out.events.append(
        DecryptionProblem(
            sender.name,
            sender.device_id,
            type(error).__name__,
            explanation,
            repair,
            group_id=group_id,
            notice=notice,
        )
    )
    return out


def restart_counters(view: HistoryView, chat_id: str, queued: Sequence[OutboxRow]) -> Outcome:
    """Our counters to a contact start over with their new session (a reinstall).

    Their new installation has no record of our old counters: continuing at
    N would make it report N messages that "never arrived". Counted entries of
    the chat still queued (held while the new key was not accepted, so never
    sent) are renumbered from 1 in their order, with their history rows.

    Args:
        view: history.
        chat_id: the direct chat with the contact.
        queued: the outbox entries not yet sent, in sending order.
    """
    out = Outcome()
    counter = 0
    for entry in queued:
        if entry.chat_id != chat_id or entry.mode != "pairwise" or entry.payload is None:
            continue
        body = payload.decode(entry.payload)
        if not body.counter:
            continue  # typing indicators and session resets are not counted
        counter += 1
        renumbered = dataclasses.replace(body, counter=counter)
        out.rows.append(dataclasses.replace(entry, payload=payload.encode(renumbered)))
        message = view.get(MessageRow, entry.id)
        if message is not None:
            out.rows.append(dataclasses.replace(message, counter=counter))
    out.counters[keys.outgoing(chat_id)] = counter
    return out
