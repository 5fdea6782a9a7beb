"""Linked devices: what our own other devices are told, and what their news does here.

Invariants:

* Only our own devices (same user name, another device id) send TRANSCRIPT and
  SYNC payloads; :func:`~e2ee.messaging.inbound.apply_payload` refuses them
  from anyone else before this module sees them.
* A sync message changes local state only forward: a message marked read stays
  read, a group's state moves only to a higher revision, a trust decision is
  taken over only for the identity key this device recorded too (or knows none
  for): a device never learns to trust a key it saw differently.
* Applying a read mark queues no read receipt: the device where the user read
  the message sent the one receipt the peer gets.
* Pure: reads through the view, returns an :class:`Outcome` (and, for trust,
  plain values the client applies in the same transaction).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from e2ee.events import GroupChanged, MessageChanged
from e2ee.messaging import keys
from e2ee.messaging.chats import stored
from e2ee.messaging.groups import group_rows
from e2ee.messaging.outcome import AnswerSyncRequest, ApplyTrust, Outcome
from e2ee.messaging.rows import (
    ChatRow,
    GroupRow,
    MessageRow,
    OutboxRow,
    UserRow,
    direct_chat_id,
    dumps,
    group_chat_id,
)
from e2ee.messaging.view import HistoryView
from e2ee.payload import (
    GroupAction,
    GroupControl,
    Payload,
    PayloadType,
    SyncContact,
    SyncGroup,
    SyncIdentity,
    SyncKind,
    SyncMessage,
    Transcript,
    encode,
)
from e2ee.store.protocols import Address

__all__ = [
    "SYNC_CHAT",
    "apply_sync",
    "contact_of",
    "group_of",
    "sync_entry",
    "sync_messages",
    "transcript_for",
    "trust_changes",
]

#: The ``chat_id`` of outbox entries that go to our own devices only.
SYNC_CHAT: Final = "sync:"
#: At most this many contacts, groups or message ids go into one sync payload
#: (each payload stays far below ``MAX_PAYLOAD_BYTES``).
_CONTACTS_PER_MESSAGE: Final = 100
_GROUPS_PER_MESSAGE: Final = 1
_IDS_PER_MESSAGE: Final = 1000


def transcript_for(chat_id: str, content: Payload) -> Payload:
    """The TRANSCRIPT our other devices get of ``content``, sent to ``chat_id``.

    Args:
        chat_id: where it went (``dm:<user>`` or ``group:<id>``).
        content: the payload as the recipients got it.

    Raises:
        UsageError: ``content`` is of a type that is not transcribed.
    """
    if chat_id.startswith("group:"):
        transcript = Transcript(content, to_group=chat_id[len("group:") :])
    else:
        transcript = Transcript(content, to_user=chat_id[len("dm:") :])
    return Payload(
        type=PayloadType.TRANSCRIPT,
        message_id=content.message_id,
        sent_at_ms=content.sent_at_ms,
        transcript=transcript,
    )


def sync_messages(
    kind: SyncKind,
    *,
    message_ids: Sequence[bytes] = (),
    contacts: Sequence[SyncContact] = (),
    groups: Sequence[SyncGroup] = (),
) -> list[SyncMessage]:
    """``kind``'s items split over as many sync messages as their bounds need."""
    if kind is SyncKind.REQUEST:
        return [SyncMessage(kind)]
    out: list[SyncMessage] = []
    for start in range(0, len(message_ids), _IDS_PER_MESSAGE):
        out.append(SyncMessage(kind, message_ids=tuple(message_ids[start:][:_IDS_PER_MESSAGE])))
    for start in range(0, len(contacts), _CONTACTS_PER_MESSAGE):
        out.append(SyncMessage(kind, contacts=tuple(contacts[start:][:_CONTACTS_PER_MESSAGE])))
    for start in range(0, len(groups), _GROUPS_PER_MESSAGE):
        out.append(SyncMessage(kind, groups=tuple(groups[start:][:_GROUPS_PER_MESSAGE])))
    return out


def sync_entry(
    view: HistoryView, out: Outcome, me: str, sync: SyncMessage, now: int, new_id: bytes
) -> str:
    """Queue ``sync`` for our other devices (an outbox row of mode ``sync``).

    Returns:
        The entry's message id (hex).
    """
    body = Payload(type=PayloadType.SYNC, message_id=new_id, sent_at_ms=now, sync=sync)
    mid = new_id.hex()
    out.rows.append(
        OutboxRow(
            id=mid,
            seq=out.next_seq(view, keys.SEQ_OUTBOX),
            chat_id=SYNC_CHAT,
            mode="sync",
            targets=dumps([me]),
            kind="sync",
            payload=encode(body),
            state="queued",
            attempts=0,
            created_at=now,
        )
    )
    return mid


def trust_changes(
    current: Mapping[int, tuple[bytes, str]], contact: SyncContact
) -> list[tuple[int, bytes, str]]:
    """The trust records a TRUST or CONTACTS sync sets here, for one contact.

    Args:
        current: device -> (identity key, trust level) as this device records it.
        contact: what our other device decided.

    Returns:
        (device, identity key, level) to record: a device we know no key of
        takes the key and level; one with the same key takes the level (an
        accepted or verified key, an accepted change); one with another key is
        left alone (this device saw something else: it decides itself).
    """
    changes: list[tuple[int, bytes, str]] = []
    for identity in contact.identities:
        known = current.get(identity.device)
        if known is None or (known[0] == identity.identity_key and known[1] != identity.trust):
            changes.append((identity.device, identity.identity_key, identity.trust))
    return changes


def apply_sync(view: HistoryView, me: str, sender: Address, sync: SyncMessage, now: int) -> Outcome:
    """What a SYNC payload from our device ``sender`` changes here.

    Args:
        view: history as it stands.
        me: our user name.
        sender: the own device that sent it.
        sync: what it says.
        now: unix ms.

    Returns:
        Rows, events and follow-ups (trust records and answers to a request
        are follow-ups the client carries out).
    """
    out = Outcome()
    if sync.kind is SyncKind.READ:
        _read(view, out, sync.message_ids, now)
    elif sync.kind in (SyncKind.CONTACTS, SyncKind.TRUST):
        for contact in sync.contacts:
            if contact.user == me:
                continue
            if sync.kind is SyncKind.CONTACTS:
                _contact(view, out, contact, now)
            if contact.identities:
                out.follow_ups.append(ApplyTrust(contact))
    elif sync.kind is SyncKind.GROUPS:
        for group in sync.groups:
            _group(view, out, me, sender, group, now)
    elif sync.kind is SyncKind.REQUEST:
        out.follow_ups.append(AnswerSyncRequest(sender))
    return out


def _read(view: HistoryView, out: Outcome, message_ids: Iterable[bytes], now: int) -> None:
    for raw in message_ids:
        message = view.get(MessageRow, raw.hex())
        if message is None or message.outgoing or message.read_at is not None:
            continue
        message = dataclasses.replace(message, read_at=now)
        if message.expire_seconds:
            # A disappearing message's clock starts when it is read, on every device.
            message = dataclasses.replace(message, expires_at=now + message.expire_seconds * 1000)
        out.rows.append(message)
        out.events.append(
            MessageChanged(message.id, message.chat_id, "read", message.sender, stored(message))
        )


def _contact(view: HistoryView, out: Outcome, contact: SyncContact, now: int) -> None:
    if view.get(UserRow, contact.user) is None:
        out.rows.append(UserRow(contact.user, created_at=now))
    chat_id = direct_chat_id(contact.user)
    chat = out.chat(view, chat_id)
    if chat is None and contact.timer_seconds:
        chat = ChatRow(chat_id, "direct", peer=contact.user, created_at=now)
    if chat is not None and (chat.timer_seconds or 0) != contact.timer_seconds:
        out.chats[chat_id] = dataclasses.replace(chat, timer_seconds=contact.timer_seconds)


def _group(
    view: HistoryView, out: Outcome, me: str, sender: Address, group: SyncGroup, now: int
) -> None:
    gid = group.group_id
    current = view.get(GroupRow, gid)
    if me not in group.members:
        return  # we learn only groups we are in
    if current is not None and (current.revision or 0) >= group.revision:
        return  # never backwards
    control = GroupControl(
        GroupAction.CREATE,
        name=group.name,
        members=group.members,
        admins=group.admins,
        revision=group.revision,
    )
    if not set(control.admins) <= set(control.members):
        return
    out.rows.extend(group_rows(view, me, gid, control, sender.name, now))
    chat_id = group_chat_id(gid)
    chat = out.chat(view, chat_id) or ChatRow(
        chat_id, "group", group_id=gid, last_message_at=now, created_at=now
    )
    out.chats[chat_id] = dataclasses.replace(chat, timer_seconds=group.timer_seconds)
    out.events.append(GroupChanged(gid, "sync", me, group.name, group.members, group.admins, ()))


def contact_of(
    user: str, timer_seconds: int, identities: Mapping[int, tuple[bytes, str]]
) -> SyncContact:
    """A contact as a CONTACTS or TRUST sync carries it (decided keys only)."""
    return SyncContact(
        user,
        timer_seconds,
        tuple(
            SyncIdentity(device, key, level)
            for device, (key, level) in sorted(identities.items())
            if level in ("tofu", "verified")
        ),
    )


def group_of(row: GroupRow, members: Mapping[str, str], timer_seconds: int) -> SyncGroup:
    """A group we are in, as a GROUPS sync carries it."""
    return SyncGroup(
        row.id,
        row.name or "",
        tuple(sorted(members)),
        tuple(sorted(a for a in json.loads(row.admins or "[]") if a in members)),
        row.revision or 0,
        timer_seconds,
    )
