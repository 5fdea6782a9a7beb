"""Gap and undecryptable accounting: what never arrived, what arrived unreadable.

Invariants:

* Every counted payload carries its sender's per-chat counter (1, 2, ...). A
  direct chat starts at 0; in a group we may join mid-stream, so the first
  counter seen from a member is the baseline.
* A message that arrived but could not be read is reported once, as
  ``undecryptable`` (and counted), never also as "never arrived": the next
  gap is reduced by the unreadable count, which then starts over.
* A message that arrives late (its counter lies in a gap reported earlier)
  shrinks that gap's notice (gone once nothing is missing) and takes a place
  between the notice and the message that revealed the gap, so a chat shows
  every sender's messages in the sender's order (:data:`~e2ee.messaging.rows.POS_SCALE`).
  At most :data:`MAX_OPEN_GAPS` gaps per sender device and chat stay open.
* Any other counter at or below the last one means the sender started over (a
  reinstall): it is followed, not reported as a gap forever.
* At most one repair (session reset or sender-key request) per sender device
  and scope per ``interval_ms``.
* Our counters to a contact restart when we accept their new identity key
  (their new installation starts from nothing), see :func:`restart_counters`.
* Pure: reads through the view, writes into the outcome.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Final, Literal

from e2ee import payload
from e2ee.errors import E2EEError, InvalidMessage, MissingKey, NoSession
from e2ee.events import DecryptionProblem, GapDetected, MessageChanged
from e2ee.messaging import keys
from e2ee.messaging.chats import add_notice, stored
from e2ee.messaging.outcome import Outcome, RequestSenderKey, ResetSession
from e2ee.messaging.rows import (
    POS_SCALE,
    GapRow,
    GroupRow,
    MessageRow,
    OutboxRow,
    direct_chat_id,
    dumps,
    group_chat_id,
)
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
) -> int | None:
    """Follow a sender's counter; add a ``gap`` notice and event if messages are missing.

    Returns:
        For a message that arrives late (its counter lies in an open gap), the
        chat place (``pos``) that puts it in its sender's order; otherwise None.
    """
    if not counter:
        return None
    key = keys.incoming(sender, chat_id)
    last = out.counter(view, key)
    if last is None and not in_group:
        last = 0
    if last is not None and counter <= last:
        late = _fill_gap(view, out, sender, chat_id, counter)
        if late is not None:
            return late
        # Not one we were missing: the sender started over (a reinstall).
        _forget_gaps(view, out, sender, chat_id)
        out.counters[key] = counter
        return None
    unreadable_key = keys.unreadable(sender, chat_id)
    unreadable = out.counter(view, unreadable_key) or 0
    if unreadable:
        out.counters[unreadable_key] = 0
    if last is not None and counter > last + 1 + unreadable:
        missed = counter - last - 1 - unreadable
        notice, _ = add_notice(
            view, out, chat_id, sender, f"{message_id}.gap", "gap", _gap_text(sender, missed), now
        )
        out.events.append(GapDetected(chat_id, sender.name, sender.device_id, missed, notice))
        _open_gap(view, out, sender, chat_id, (last + 1, counter - 1, missed, notice.id))
    out.counters[key] = counter
    return None


#: Open gaps kept per sender device and chat; beyond it the oldest is final.
MAX_OPEN_GAPS: Final = 64


def _gap_text(sender: Address, missed: int) -> str:
    plural = "s" if missed != 1 else ""
    return f"{missed} message{plural} from {sender.name} never arrived"


def _gap_ranges(view: HistoryView, out: Outcome, gap_id: str) -> list[list[Any]]:
    for row in reversed(out.rows):  # this outcome's own write first
        if isinstance(row, GapRow) and row.id == gap_id:
            return list(json.loads(row.ranges))
    found = view.get(GapRow, gap_id)
    return [] if found is None else list(json.loads(found.ranges))


def _open_gap(
    view: HistoryView, out: Outcome, sender: Address, chat_id: str, gap: tuple[int, int, int, str]
) -> None:
    gap_id = keys.gaps(sender, chat_id)
    ranges = [*_gap_ranges(view, out, gap_id), list(gap)][-MAX_OPEN_GAPS:]
    out.rows.append(GapRow(gap_id, dumps(ranges)))


def _forget_gaps(view: HistoryView, out: Outcome, sender: Address, chat_id: str) -> None:
    gap_id = keys.gaps(sender, chat_id)
    if _gap_ranges(view, out, gap_id):
        out.rows.append(GapRow(gap_id, "[]"))


def _fill_gap(
    view: HistoryView, out: Outcome, sender: Address, chat_id: str, counter: int
) -> int | None:
    """A late arrival: one fewer missing in its gap; its place in the chat (or None)."""
    gap_id = keys.gaps(sender, chat_id)
    ranges = _gap_ranges(view, out, gap_id)
    for i, (first_, last_, missing_, notice_id) in enumerate(ranges):
        first, last, missing = int(first_), int(last_), int(missing_)
        if not first <= counter <= last or missing <= 0:
            continue
        notice = _pending_message(view, out, str(notice_id))
        missing -= 1
        ranges[i] = [first, last, missing, notice_id]
        if missing == 0:
            del ranges[i]
        out.rows.append(GapRow(gap_id, dumps(ranges)))
        if notice is None:
            return None
        change: Literal["edited", "expired"] = "edited"
        if missing == 0:  # nothing is missing any more: the notice goes
            changed = dataclasses.replace(notice, text=None, deleted=2)
            change = "expired"
        else:
            changed = dataclasses.replace(notice, text=_gap_text(sender, missing))
        out.rows.append(changed)
        out.events.append(MessageChanged(notice.id, chat_id, change, sender.name, stored(changed)))
        # Between the notice and the message that revealed the gap (the notice's seq
        # + 1), in counter order; gaps wider than POS_SCALE - 1 share places.
        base = notice.pos if notice.pos is not None else (notice.seq or 0) * POS_SCALE
        step = (counter - first + 1) * POS_SCALE // (last - first + 2)
        return base + max(step, 1)
    return None


def _pending_message(view: HistoryView, out: Outcome, message_id: str) -> MessageRow | None:
    for row in reversed(out.rows):
        if isinstance(row, MessageRow) and row.id == message_id:
            return row
    return view.get(MessageRow, message_id)


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
