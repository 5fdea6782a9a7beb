# Invariant: events have one serializer, event_output: `receive` prints its records, and
# `daemon` (tui_client/daemon/) sends the same records as JSON-RPC notifications.
"""Event and message records as ``receive`` prints them (and the daemon sends them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from e2ee.client import StoredMessage
from e2ee.events import (
    DecryptionProblem,
    Event,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    MessageStored,
    ReceiptUpdated,
)
from tui_client.cli.output import (
    change_record,
    error_record,
    gap_record,
    group_event_record,
    human_change,
    human_error,
    human_gap,
    human_group_event,
    human_identity,
    human_message,
    human_receipt,
    identity_record,
    message_record,
    receipt_record,
)

if TYPE_CHECKING:  # session imports this module at run time
    from tui_client.cli.session import _Session


@dataclass(frozen=True, slots=True)
class EventOutput:
    """What ``receive`` prints for an event: the JSON record and the human line.

    ``seq`` is the history position of a message record (0 for other records),
    for the cursor of incoming messages already reported.
    """

    record: dict[str, Any]
    human: str
    seq: int = 0


async def message_output(session: _Session, message: StoredMessage) -> EventOutput:
    """The ``message`` record ``receive`` prints for a stored message."""
    attachment = await session.attachment(message)
    name = await session.group_name(message.group_id)
    return EventOutput(
        message_record(message, attachment), human_message(message, attachment, name), message.seq
    )


async def event_output(session: _Session, event: Event) -> EventOutput | None:
    """The record ``receive --json`` prints for an event (None: not printed).

    The one serializer of events: ``receive`` and ``blindpost daemon`` both use it.
    Receipts already waiting in the session's queue for the same sender, status and
    chat are taken along into one record.
    """
    if isinstance(event, MessageReceived):
        return await message_output(session, event.message)
    if isinstance(event, MessageStored) and _from_our_other_device(session, event.message):
        return await message_output(session, event.message)
    if isinstance(event, ReceiptUpdated):
        ids = [event.message_id]
        while (more := session.take_ready()) is not None:
            if isinstance(more, ReceiptUpdated) and (
                more.status,
                more.user,
                more.device,
                more.chat_id,
            ) == (event.status, event.user, event.device, event.chat_id):
                ids.append(more.message_id)
                continue
            session.push_back(more)
            break
        return EventOutput(
            receipt_record(event.status, ids, event.user, event.device, event.chat_id),
            human_receipt(event.status, ids, event.user),
        )
    if isinstance(event, GroupChanged):
        return EventOutput(group_event_record(event), human_group_event(event))
    if isinstance(event, IdentityChanged):
        return EventOutput(identity_record(event), human_identity(event))
    if isinstance(event, GapDetected):
        return EventOutput(gap_record(event), human_gap(event))
    if isinstance(event, DecryptionProblem):
        return EventOutput(error_record(event), human_error(event))
    if isinstance(event, MessageChanged):
        return EventOutput(change_record(event), human_change(event))
    return None  # typing, what this device stored itself, backlog and connection states


def _from_our_other_device(session: _Session, message: StoredMessage) -> bool:
    """A message we sent from another of our devices (it arrived as its transcript)."""
    return message.outgoing and message.sender_device != session.client.device_id


async def _show_event(session: _Session, event: Event) -> None:
    """Print one event (receipts that arrived together are one record)."""
    shown = await event_output(session, event)
    if shown is not None:
        session.settings.out.emit(shown.record, shown.human)
        session.printed_seq = max(session.printed_seq, shown.seq)
