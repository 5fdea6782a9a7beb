"""Trust decisions: accepting or verifying a contact's identity keys.

Invariants:

* Nothing is encrypted to a key the user has not accepted (the outbox holds
  it); accepting records the keys (``tofu`` or ``verified``) under the write
  lock, and only then is the outbox woken.
* A decision is told to our other devices (a TRUST sync message, committed
  with it); they take it over for the keys they recorded too.
* Accepting a *changed* key (one recorded ``untrusted``) restarts our
  counters to that contact with the new session, in the same call
  (:func:`e2ee.messaging.accounting.restart_counters`), so their new
  installation reports no gap for messages it never could have had.
"""

from __future__ import annotations

from e2ee.client.context import ClientContext
from e2ee.client.sync import contact, sync_outcome
from e2ee.core.fingerprint import SafetyNumber, compute_safety_number
from e2ee.errors import UsageError
from e2ee.messaging.accounting import restart_counters
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import OutboxRow, direct_chat_id, from_columns
from e2ee.messaging.sync import sync_messages
from e2ee.payload import SyncKind
from e2ee.store import TrustLevel

__all__ = ["accept_identity", "contacts", "held_users", "safety_numbers"]


def accept_identity(ctx: ClientContext, user: str, *, verified: bool) -> None:
    """Accept ``user``'s current identity keys (blocking; run in a thread).

    Raises:
        UsageError: nothing is known about that user.
        StorageError: nothing was changed.
    """
    level = TrustLevel.VERIFIED if verified else TrustLevel.TOFU
    with ctx.wlock:
        known = ctx.store.identities(user)
        if not known:
            raise UsageError(f"no identity known for {user}")
        changed = any(r.trust == TrustLevel.UNTRUSTED for r in known.values())
        for address, record in known.items():
            ctx.engine.set_trust(address, record.identity_key, level)
        out = Outcome()
        if changed:
            queued = [from_columns(OutboxRow, e) for e in ctx.history.pending_outbox()]
            out = restart_counters(ctx.view(), direct_chat_id(user), queued)
        sync_outcome(ctx, out, sync_messages(SyncKind.TRUST, contacts=[contact(ctx, user)]))
        if out.rows or out.counters or out.chats:
            ctx.commit_outcome(out)


def safety_numbers(ctx: ClientContext, user: str) -> list[tuple[int, SafetyNumber]]:
    """Safety numbers with each known device of ``user`` (blocking; run in a thread).

    Raises:
        UsageError: we hold no identity key for that user yet.
    """
    out = []
    for address, record in sorted(ctx.store.identities(user).items()):
        number = compute_safety_number(
            ctx.engine.identity_key, ctx.me.name, record.identity_key, user
        )
        out.append((address.device_id, number))
    if not out:
        raise UsageError(f"no identity known for {user}")
    return out


def contacts(ctx: ClientContext) -> dict[str, dict[int, str]]:
    """user -> device -> trust level for everyone in our history (blocking)."""
    out: dict[str, dict[int, str]] = {}
    for user in ctx.history.users():
        if user == ctx.me.name:
            continue
        found = ctx.store.identities(user)
        out[user] = {a.device_id: r.trust for a, r in sorted(found.items())}
    return out


def held_users(ctx: ClientContext) -> set[str]:
    """Contacts whose changed identity key is not accepted yet (blocking)."""
    held = set(ctx.held)
    for user in ctx.history.users():
        found = ctx.store.identities(user)
        if any(r.trust == TrustLevel.UNTRUSTED for r in found.values()):
            held.add(user)
    return held - {ctx.me.name}
