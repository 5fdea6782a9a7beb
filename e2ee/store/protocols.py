"""The storage contract of the protocol core.

Invariants:

* Reads return exactly what the last successful :meth:`ProtocolStore.commit`
  wrote (bytes for bytes); a failed commit changes nothing.
* All writes go through :meth:`ProtocolStore.commit` with one :class:`Changes`
  value, applied atomically (one SQLite transaction). This is what lets the core
  compute a whole decrypt on a copy and commit session state, prekey removal,
  identity updates and the application's history rows together, or not at all.
* Record blobs (``bytes``) are python-axolotl's serialized records. Those marked
  *secret* below hold private keys or ratchet secrets and are encrypted at rest by
  the SQLite implementation; the in-memory twin keeps them as they are.
* Implementations are safe to call from several threads.

python-axolotl's own abstract store classes enforce nothing on Python 3 (their
``__metaclass__`` line is ignored), so this Protocol is the real contract; the
conformance test in ``tests/store`` runs against every implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, runtime_checkable

#: Shared read-only empty mapping: the default of every :class:`Changes` field.
_EMPTY: Mapping[Any, Any] = MappingProxyType({})


def _empty() -> Mapping[Any, Any]:
    return _EMPTY


__all__ = [
    "AccountRecord",
    "Address",
    "BatchingStore",
    "Changes",
    "IdentityRecord",
    "ProtocolStore",
    "SenderKeyId",
    "SignedPreKeyRow",
    "TrustLevel",
]


class Address(NamedTuple):
    """One device of one user: python-axolotl's (recipientId, deviceId).

    A named tuple rather than a dataclass: addresses key every dictionary on the
    message hot path, and tuple hashing is done in C.
    """

    name: str
    device_id: int

    def __str__(self) -> str:
        return f"{self.name}.{self.device_id}"


class SenderKeyId(NamedTuple):
    """A sender's key for one group: python-axolotl's SenderKeyName."""

    group_id: str
    sender: Address


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """The local account's long-term keys.

    ``identity_key_pair`` is python-axolotl's serialized IdentityKeyPair (secret).
    """

    name: str
    device_id: int
    registration_id: int
    identity_key_pair: bytes = field(repr=False)
    created_at_ms: int

    def __repr__(self) -> str:  # secrets never reach repr
        return (
            f"AccountRecord(name={self.name!r}, device_id={self.device_id}, "
            f"registration_id={self.registration_id}, identity_key_pair=<secret>)"
        )


@dataclass(frozen=True, slots=True)
class SignedPreKeyRow:
    """A signed prekey record (secret) and when it was generated."""

    prekey_id: int
    record: bytes = field(repr=False)
    created_at_ms: int


class TrustLevel:
    """How far the user trusts a remote identity key (stored as a string)."""

    TOFU = "tofu"  # accepted on first use, never compared out of band
    VERIFIED = "verified"  # the user compared safety numbers
    #: The key replaced an earlier one and the user has not accepted it yet.
    UNTRUSTED = "untrusted"

    ALL = frozenset({TOFU, VERIFIED, UNTRUSTED})


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A remote device's identity public key (serialized, 33 bytes) and its trust."""

    identity_key: bytes
    trust: str = TrustLevel.TOFU
    updated_at_ms: int = 0


@dataclass(slots=True)
class Changes:
    """One atomic write. Empty by default; build with :func:`dataclasses.replace`.

    Treat it as immutable: stores only read it. (It is not ``frozen`` because a
    frozen dataclass pays one ``object.__setattr__`` per field on construction,
    and the protocol engine builds one per message: see docs/performance.md.)

    ``app_rows`` lets the layer above (the SDK's history) put rows into its own
    tables in the same transaction: ``(table, row)`` pairs, each replacing the
    row with the same ``id`` (a str), applied in order; columns a row leaves out
    read back as None. ``app_rows_delete`` removes ``(table, id)`` rows, after
    the puts. The rules for names and values are in :mod:`e2ee.store.rows`.
    """

    account: AccountRecord | None = None
    prekeys_put: Mapping[int, bytes] = field(default_factory=_empty, repr=False)
    prekeys_delete: frozenset[int] = frozenset()
    signed_prekeys_put: Mapping[int, SignedPreKeyRow] = field(default_factory=_empty, repr=False)
    signed_prekeys_delete: frozenset[int] = frozenset()
    identities_put: Mapping[Address, IdentityRecord] = field(default_factory=_empty)
    sessions_put: Mapping[Address, bytes] = field(default_factory=_empty, repr=False)
    sessions_delete: frozenset[Address] = frozenset()
    sender_keys_put: Mapping[SenderKeyId, bytes] = field(default_factory=_empty, repr=False)
    sender_keys_delete: frozenset[SenderKeyId] = frozenset()
    meta_put: Mapping[str, str] = field(default_factory=_empty)
    app_rows: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    app_rows_delete: frozenset[tuple[str, str]] = frozenset()

    def is_empty(self) -> bool:
        """True when committing this would write nothing."""
        return not (
            self.account is not None
            or self.prekeys_put
            or self.prekeys_delete
            or self.signed_prekeys_put
            or self.signed_prekeys_delete
            or self.identities_put
            or self.sessions_put
            or self.sessions_delete
            or self.sender_keys_put
            or self.sender_keys_delete
            or self.meta_put
            or self.app_rows
            or self.app_rows_delete
        )


@runtime_checkable
class ProtocolStore(Protocol):
    """Everything the protocol core reads and writes.

    Every method may raise :class:`e2ee.errors.StorageError` (or a subclass such
    as :class:`e2ee.errors.StoreCorrupt`); nothing else.
    """

    def load_account(self) -> AccountRecord | None:
        """The local account, or None before one was created."""
        ...

    def load_prekey(self, prekey_id: int) -> bytes | None:
        """A one-time prekey record (secret), or None if unknown or used."""
        ...

    def prekey_ids(self) -> list[int]:
        """Ids of the one-time prekeys still held, ascending."""
        ...

    def load_signed_prekey(self, prekey_id: int) -> SignedPreKeyRow | None:
        """A signed prekey row, or None."""
        ...

    def signed_prekeys(self) -> list[SignedPreKeyRow]:
        """All signed prekeys held, oldest first (by ``created_at_ms``, then id)."""
        ...

    def load_identity(self, address: Address) -> IdentityRecord | None:
        """The identity recorded for a remote device, or None."""
        ...

    def identities(self, name: str) -> dict[Address, IdentityRecord]:
        """All identities recorded for one user's devices."""
        ...

    def load_session(self, address: Address) -> bytes | None:
        """A session record (secret), or None."""
        ...

    def session_devices(self, name: str) -> list[int]:
        """Device ids of ``name`` with a stored session, ascending."""
        ...

    def load_sender_key(self, key_id: SenderKeyId) -> bytes | None:
        """A sender key record (secret), or None."""
        ...

    def get_meta(self, key: str) -> str | None:
        """A small metadata value (counters, schedule times), or None."""
        ...

    def load_app_row(self, table: str, row_id: str) -> Mapping[str, Any] | None:
        """A row written through :attr:`Changes.app_rows`, or None."""
        ...

    def load_app_rows(self, table: str, column: str, value: str | int) -> list[Mapping[str, Any]]:
        """Every row of ``table`` whose ``column`` equals ``value``, by id (empty if none)."""
        ...

    def commit(self, changes: Changes) -> None:
        """Apply ``changes`` atomically: all of it or, on any error, none of it."""
        ...


@runtime_checkable
class BatchingStore(ProtocolStore, Protocol):
    """A :class:`ProtocolStore` that can group several commits into one durable write.

    The SDK's inbox uses it to decrypt a backlog in batches: many engine commits,
    one transaction and one fsync, acknowledged to the relay only after the batch
    stands. The core itself never needs it.
    """

    @property
    def in_batch(self) -> bool:
        """True inside :meth:`batch` (on the thread that holds it)."""
        ...

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """A block whose commits all stand together when it ends, or none if it raises.

        Inside it, each :meth:`commit` is still all or nothing on its own and is
        visible to reads; other threads wait until the block ends.
        """
        ...
