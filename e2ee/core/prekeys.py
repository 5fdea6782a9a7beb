"""This device's prekeys: what the relay publishes, and keeping them fresh.

Invariants:

* Compute, then commit: every function here reads the store it is given and returns the
  :class:`~e2ee.store.protocols.Changes` to commit with what to upload; the engine commits
  them under its account lock (``ProtocolEngine.create_account``, ``reset_device``,
  ``maintain_keys``). Nothing here writes.
* Prekey ids come from counters in the store's meta and wrap at ``MAX_PREKEY_ID``, so an id
  is not handed out again before the whole range was used.
* A replaced signed prekey is kept until its successor is ``signed_prekey_grace_ms`` old, so
  a session set up from a bundle fetched before the rotation still works.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from axolotl.identitykeypair import IdentityKeyPair
from axolotl.state.prekeyrecord import PreKeyRecord
from axolotl.state.signedprekeyrecord import SignedPreKeyRecord

from e2ee.core.keys import (
    MAX_PREKEY_ID,
    PREKEY_BATCH,
    OneTimePreKey,
    SignedPreKey,
    generate_prekeys,
    generate_signed_prekey,
)
from e2ee.errors import UsageError
from e2ee.store.protocols import Changes, ProtocolStore, SignedPreKeyRow

__all__ = [
    "DAY_MS",
    "KeyPolicy",
    "current_signed",
    "fresh_keys",
    "plan_maintenance",
    "public_prekeys",
]

DAY_MS = 86_400_000

META_NEXT_PREKEY = "next_prekey_id"
META_NEXT_SIGNED = "next_signed_prekey_id"
META_CURRENT_SIGNED = "current_signed_prekey_id"


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Schedules and sizes for account key maintenance (all configurable).

    Attributes:
        signed_prekey_rotation_ms: age after which a new signed prekey is made.
        signed_prekey_grace_ms: how long a replaced signed prekey is kept, so
            sessions set up from a bundle fetched before the rotation still work.
        prekey_batch: one-time prekeys generated per batch.
        prekey_low_water: replenish when the relay holds fewer than this.
        max_local_prekeys: unused one-time prekeys kept locally at most; the
            oldest are dropped beyond it.
    """

    signed_prekey_rotation_ms: int = 7 * DAY_MS
    signed_prekey_grace_ms: int = 14 * DAY_MS
    prekey_batch: int = PREKEY_BATCH
    prekey_low_water: int = 25
    max_local_prekeys: int = 2_000


def _public(key_pair_owner: PreKeyRecord | SignedPreKeyRecord) -> bytes:
    return bytes(key_pair_owner.getKeyPair().getPublicKey().serialize())


def current_signed(store: ProtocolStore) -> SignedPreKey:
    """The signed prekey the relay publishes now.

    Raises:
        UsageError: the store holds none (no account).
    """
    current = store.get_meta(META_CURRENT_SIGNED)
    row = store.load_signed_prekey(int(current)) if current else None
    if row is None:
        raise UsageError("no current signed prekey")
    record = SignedPreKeyRecord(serialized=row.record)
    return SignedPreKey(record.getId(), _public(record), bytes(record.getSignature()))


def public_prekeys(store: ProtocolStore, ids: Sequence[int]) -> list[OneTimePreKey]:
    """The public halves of the one-time prekeys with ``ids`` still held (others skipped)."""
    keys = []
    for pid in ids:
        data = store.load_prekey(pid)
        if data is not None:
            keys.append(OneTimePreKey(pid, _public(PreKeyRecord(serialized=data))))
    return keys


def fresh_keys(
    store: ProtocolStore, identity: IdentityKeyPair, policy: KeyPolicy, now: int
) -> Changes:
    """A new signed prekey and a batch of one-time prekeys, with ids from the store's
    counters (1 for a new store): what a new account or a reset device commits."""
    signed_id = int(store.get_meta(META_NEXT_SIGNED) or "1")
    signed = generate_signed_prekey(identity, signed_id, now)
    first = int(store.get_meta(META_NEXT_PREKEY) or "1")
    prekeys = generate_prekeys(first, policy.prekey_batch)
    return Changes(
        signed_prekeys_put={signed_id: SignedPreKeyRow(signed_id, bytes(signed.serialize()), now)},
        prekeys_put={p.getId(): bytes(p.serialize()) for p in prekeys},
        meta_put={
            META_NEXT_SIGNED: str(signed_id % MAX_PREKEY_ID + 1),
            META_CURRENT_SIGNED: str(signed_id),
            META_NEXT_PREKEY: str(prekeys[-1].getId() % MAX_PREKEY_ID + 1),
        },
    )


def plan_maintenance(
    store: ProtocolStore,
    identity: IdentityKeyPair,
    policy: KeyPolicy,
    now: int,
    relay_prekey_count: int | None,
) -> tuple[Changes, SignedPreKey | None, list[OneTimePreKey]]:
    """Rotate the signed prekey on schedule and replenish one-time prekeys (see
    ``ProtocolEngine.maintain_keys``).

    Returns:
        The changes to commit (possibly empty), the new signed prekey if one was made,
        and the new one-time prekeys.
    """
    changes = Changes()
    new_signed: SignedPreKey | None = None
    rows = store.signed_prekeys()
    current_id = int(store.get_meta(META_CURRENT_SIGNED) or "0")
    current = next((r for r in rows if r.prekey_id == current_id), None)
    if current is None or now - current.created_at_ms >= policy.signed_prekey_rotation_ms:
        next_id = int(store.get_meta(META_NEXT_SIGNED) or "1")
        record = generate_signed_prekey(identity, next_id, now)
        row = SignedPreKeyRow(next_id, bytes(record.serialize()), now)
        changes = replace(
            changes,
            signed_prekeys_put={next_id: row},
            meta_put={
                META_CURRENT_SIGNED: str(next_id),
                META_NEXT_SIGNED: str(next_id % MAX_PREKEY_ID + 1),
            },
        )
        new_signed = SignedPreKey(next_id, _public(record), bytes(record.getSignature()))
        rows = [*rows, row]
    # A replaced key is dropped once its successor is older than the grace.
    expired = frozenset(
        older.prekey_id
        for older, newer in itertools.pairwise(rows)
        if now - newer.created_at_ms >= policy.signed_prekey_grace_ms
    )
    new_prekeys: list[OneTimePreKey] = []
    if relay_prekey_count is not None and relay_prekey_count < policy.prekey_low_water:
        first = int(store.get_meta(META_NEXT_PREKEY) or "1")
        batch = generate_prekeys(first, policy.prekey_batch)
        held = store.prekey_ids()
        overflow = len(held) + len(batch) - policy.max_local_prekeys
        # Oldest in allocation order: ids at or after `first` were allocated
        # before the last wrap-around, so they come first.
        by_age = sorted(held, key=lambda pid: (pid < first, pid))
        dropped = frozenset(by_age[: max(overflow, 0)])
        changes = replace(
            changes,
            prekeys_put={p.getId(): bytes(p.serialize()) for p in batch},
            prekeys_delete=dropped,
            meta_put={
                **changes.meta_put,
                META_NEXT_PREKEY: str(batch[-1].getId() % MAX_PREKEY_ID + 1),
            },
        )
        new_prekeys = [OneTimePreKey(p.getId(), _public(p)) for p in batch]
    return replace(changes, signed_prekeys_delete=expired), new_signed, new_prekeys
