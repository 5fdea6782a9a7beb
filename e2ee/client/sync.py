"""Our own other devices: the transcripts and sync messages they get, and meeting them.

Invariants:

* Our other devices are the ones we hold a session with (``session_devices``
  of our own name, never this device). Once we name ourselves in a send, the
  relay's device-list check names every other device of ours (409: a new one
  is missing, a removed one stale), so the list follows the relay's. A new
  device meets the others itself: before its first send it fetches our
  bundles once and asks them for contacts and groups (a REQUEST sync message).
* Only a key equal to our own identity key is taken for one of our devices
  (linked devices share it); a device of our name with another key gets
  nothing from us.
* Sync messages are outbox entries (mode ``sync``), committed with the local
  change they report, and queued only when we have another device: an
  account on one device pays nothing for linked devices.
* When the peers' part of a message can go without our name (sealed sender), our other
  devices' part (a transcript, a Sender Key message or distribution) goes as a message of
  its own, under :func:`own_message_id` of the message's id, right after the peers' part
  was accepted: a relay message naming our own devices goes with our name, and must not
  carry the peers' part.
* The rules (what a transcript or sync message is, what it changes) live in
  :mod:`e2ee.messaging.sync`; this module reads the store and commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from e2ee import payload
from e2ee.client.context import ClientContext
from e2ee.errors import E2EEError, InvalidMessage, TransportError, UsageError
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import ChatRow, GroupRow, OutboxRow, direct_chat_id, group_chat_id
from e2ee.messaging.sync import (
    contact_of,
    group_of,
    sync_entry,
    sync_messages,
    transcript_for,
    trust_changes,
)
from e2ee.payload import TRANSCRIBED, SyncContact, SyncKind, SyncMessage
from e2ee.store import Address, Changes, TrustLevel

if TYPE_CHECKING:
    from e2ee.client.outbox import Outbox

__all__ = [
    "META_OWN_DEVICES_PROBED",
    "answer_request",
    "apply_trust",
    "contact",
    "introduce",
    "is_own_device_key",
    "own_copy",
    "own_devices",
    "own_message_id",
    "queue_sync",
    "snapshot",
    "sync_outcome",
]

_log = logging.getLogger(__name__)
#: Set once this device looked for our other devices at the relay (before its first send).
META_OWN_DEVICES_PROBED: Final = "own_devices_probed"
_TRANSCRIBED_KINDS: Final = frozenset(kind.name.lower() for kind in TRANSCRIBED)


def own_devices(ctx: ClientContext) -> list[int]:
    """Our other devices we hold a session with (blocking)."""
    return [d for d in ctx.engine.session_devices(ctx.me.name) if d != ctx.me.device_id]


def own_message_id(message_id: bytes) -> bytes:
    """The relay message id of our own other devices' part of message ``message_id`` when it
    travels on its own: fixed (a re-send after a crash is stored once), and not linkable to
    the peers' part by the relay (a hash, not the id itself, which another sender's message
    already uses)."""
    return hashlib.sha256(b"blindpost own devices\x00" + message_id).digest()[:16]


def own_copy(entry: OutboxRow) -> bytes | None:
    """What our other devices get of a pairwise outbox entry: its transcript, or None.

    Receipts, typing, session resets and sync entries are not transcribed. A
    payload within a few bytes of ``MAX_PAYLOAD_BYTES`` has no room for the
    transcript's wrapping: it goes to the recipients only (logged).
    """
    if entry.mode != "pairwise" or entry.kind not in _TRANSCRIBED_KINDS or not entry.payload:
        return None
    try:
        body = payload.decode(entry.payload)
    except InvalidMessage:
        return None
    if body.type not in TRANSCRIBED:
        return None
    try:
        return payload.encode(transcript_for(entry.chat_id, body))
    except UsageError:
        _log.warning("message %s too large for a transcript to our other devices", entry.id)
        return None


def sync_outcome(ctx: ClientContext, out: Outcome, messages: Sequence[SyncMessage]) -> bool:
    """Add outbox entries for ``messages`` to ``out`` if we have another device.

    Call under the write lock, with the outcome of the change they report.

    Returns:
        True when entries were added (wake the outbox after the commit).
    """
    if not messages or not own_devices(ctx):
        return False
    view = ctx.view()
    for message in messages:
        sync_entry(view, out, ctx.me.name, message, ctx.now_ms(), ctx.random_bytes(16))
    return True


def queue_sync(ctx: ClientContext, messages: Sequence[SyncMessage]) -> bool:
    """Commit outbox entries for ``messages`` (blocking; wake the outbox if True)."""
    with ctx.wlock:
        out = Outcome()
        if not sync_outcome(ctx, out, messages):
            return False
        ctx.commit_outcome(out)
        return True


def _identities(ctx: ClientContext, user: str) -> dict[int, tuple[bytes, str]]:
    return {
        address.device_id: (record.identity_key, record.trust)
        for address, record in ctx.store.identities(user).items()
    }


def contact(ctx: ClientContext, user: str) -> SyncContact:
    """``user`` as a CONTACTS or TRUST sync message carries it (blocking)."""
    chat = ctx.view().get(ChatRow, direct_chat_id(user))
    timer = (chat.timer_seconds or 0) if chat is not None else 0
    return contact_of(user, timer, _identities(ctx, user))


def snapshot(ctx: ClientContext) -> list[SyncMessage]:
    """Our contacts and the groups we are in, for a new device of ours (blocking)."""
    with ctx.wlock:
        view = ctx.view()
        contacts = [contact(ctx, u) for u in ctx.history.users() if u != ctx.me.name]
        groups = []
        for info in ctx.history.groups():
            row = view.get(GroupRow, info.id)
            if row is None or not row.member:
                continue
            chat = view.get(ChatRow, group_chat_id(info.id))
            timer = (chat.timer_seconds or 0) if chat is not None else 0
            groups.append(group_of(row, view.group_members(info.id), timer))
    return [
        *sync_messages(SyncKind.CONTACTS, contacts=contacts),
        *sync_messages(SyncKind.GROUPS, groups=groups),
    ]


def answer_request(ctx: ClientContext) -> bool:
    """Queue our contacts and groups for our devices (a new one asked; blocking)."""
    return queue_sync(ctx, snapshot(ctx))


def apply_trust(ctx: ClientContext, synced: SyncContact) -> bool:
    """Take over our other device's trust decisions (inside the delivery's transaction).

    Returns:
        True when it released a held contact (an accepted changed key): the
        outbox should look again.
    """
    user = synced.user
    current = _identities(ctx, user)
    changes = trust_changes(current, synced)
    for device, key, level in changes:
        ctx.engine.set_trust(Address(user, device), key, level)
    was_held = any(trust == TrustLevel.UNTRUSTED for _, trust in current.values())
    if not was_held or not changes:
        return False
    if any(r.trust == TrustLevel.UNTRUSTED for r in ctx.store.identities(user).values()):
        return False
    ctx.held.discard(user)
    return True


def is_own_device_key(ctx: ClientContext, user: str, identity_key: bytes) -> bool:
    """Whether a bundle of ``user`` may be taken: any user's, or ours with our key."""
    return user != ctx.me.name or identity_key == ctx.engine.identity_key


async def introduce(ctx: ClientContext, outbox: Outbox) -> bool:
    """Once per data directory, before its first send: meet our other devices.

    A device looks for the account's other devices at the relay once (our own
    bundles); if there are any, it sessions with them and sends them a REQUEST,
    which also tells them of this device. Later devices introduce themselves
    the same way, and the relay's device-list check keeps the list current.

    Returns:
        False if the relay could not be asked (try again at the next pass).
    """
    if await asyncio.to_thread(ctx.locked, ctx.store.get_meta, META_OWN_DEVICES_PROBED):
        return True
    try:
        await outbox.devices(ctx.me.name, refresh=True)
    except TransportError:
        return False
    except E2EEError as exc:
        _log.info("own devices not probed: %s", type(exc).__name__)
    await asyncio.to_thread(queue_sync, ctx, sync_messages(SyncKind.REQUEST))

    def done() -> None:
        with ctx.wlock:
            ctx.store.commit(Changes(meta_put={META_OWN_DEVICES_PROBED: "1"}))

    await asyncio.to_thread(done)
    return True
