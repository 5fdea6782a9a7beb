"""A copy-on-write view of a :class:`ProtocolStore` for one python-axolotl operation.

Invariant (compute on a copy, commit once): python-axolotl writes as it goes --
it saves the peer's identity before the message authenticates, removes prekeys
and stores ratchet state mid-operation. Here every one of those writes lands in
this object's overlay only. The engine turns the overlay into one
:class:`~e2ee.store.protocols.Changes` after the operation succeeded and commits
it; on any failure the overlay is dropped and the store is untouched.

The overlay also enforces our bounds before anything is written:

* at most ``max_skipped_keys`` (default :data:`MAX_SKIPPED_KEYS`) skipped message
  keys per peer record, counted over every receiving chain of every state of a
  1:1 session (current and archived), and over every state of a sender's Sender
  Key record; the oldest are pruned first. python-axolotl caps only the size of
  one jump, so repeated jumps (defect 2), or setups each arriving with 2,000
  skipped keys into up to 41 states (defect 8), grow a record without bound;
* at most :data:`MAX_SENDER_KEY_STATES` Sender Key states per sender and group
  (python-axolotl keeps every state it was ever sent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from axolotl.axolotladdress import AxolotlAddress
from axolotl.groups.senderkeyname import SenderKeyName
from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
from axolotl.identitykey import IdentityKey
from axolotl.identitykeypair import IdentityKeyPair
from axolotl.invalidkeyidexception import InvalidKeyIdException
from axolotl.state.prekeyrecord import PreKeyRecord
from axolotl.state.sessionrecord import SessionRecord
from axolotl.state.signedprekeyrecord import SignedPreKeyRecord

from e2ee.core.budget import MAX_SKIPPED_KEYS
from e2ee.store.protocols import (
    AccountRecord,
    Address,
    Changes,
    IdentityRecord,
    ProtocolStore,
    SenderKeyId,
    TrustLevel,
)

__all__ = [
    "MAX_SENDER_KEY_STATES",
    "MAX_SKIPPED_KEYS",
    "IdentityChange",
    "SessionCache",
    "StagedStore",
]

MAX_SENDER_KEY_STATES = 5


_NONE: frozenset[Any] = frozenset()


class SessionCache:
    """Parsed session records of recent operations, keyed by the bytes stored.

    Parsing a session record is a large part of a same-chain message. After a
    commit the engine keeps the record python-axolotl worked on together with
    the blob that was stored for it; the next operation on that address reuses
    it only if the store still holds exactly that blob (so a change made by
    anyone else, or a restart, simply misses).

    Invariant: an entry is *taken out* when used, and put back only after the
    operation committed. A failed or hostile operation, which may have mutated
    the record, therefore never leaves it behind. The engine holds the peer's
    lock around take and put, so one record is never used by two operations.
    """

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = 256) -> None:
        self._entries: dict[Address, tuple[bytes, SessionRecord]] = {}
        self._limit = limit

    def __repr__(self) -> str:
        return f"SessionCache(entries={len(self._entries)})"

    def take(self, address: Address, stored: bytes) -> SessionRecord | None:
        """The cached record for ``address`` if it was parsed from ``stored``."""
        entry = self._entries.pop(address, None)
        if entry is None or entry[0] != stored:
            return None
        return entry[1]

    def put(self, address: Address, stored: bytes, record: SessionRecord) -> None:
        """Remember ``record``, whose serialization ``stored`` was committed."""
        # What SessionRecord(serialized=stored) would say; a record made fresh in
        # this operation is no longer fresh once stored.
        record.fresh = False
        entries = self._entries
        entries.pop(address, None)
        entries[address] = (stored, record)
        while len(entries) > self._limit:
            try:
                del entries[next(iter(entries))]
            except (StopIteration, KeyError, RuntimeError):  # raced with another peer
                break


class IdentityChange:
    """Records that an operation met a new identity key for an address."""

    __slots__ = ("address", "first_use", "new_key", "old_key")

    def __init__(self, address: Address, old_key: bytes | None, new_key: bytes) -> None:
        self.address = address
        self.old_key = old_key
        self.new_key = new_key
        self.first_use = old_key is None


class StagedStore:
    """python-axolotl's four store interfaces plus SenderKeyStore, over an overlay.

    Args:
        base: the committed store (only read).
        account: the local account (identity key pair, registration id).
        device_id: the device whose identity python-axolotl's name-only identity
            calls refer to (python-axolotl keys identities by name alone).
        now_ms: clock for identity timestamps.
        trust_new_identity: how a peer's first identity key is recorded: ``tofu``
            when True, ``untrusted`` (sending held until verified) when False.
        accept_changed_identity: when True (receiving), a key that differs from
            the stored one is accepted for this operation and recorded as
            ``untrusted`` (the application must accept it before we send); when
            False (sending), a changed or untrusted key is refused. Receiving
            operations are also the only ones that can add skipped message keys,
            so only their sessions are trimmed.
        parsed_sessions: the engine's :class:`SessionCache`, or None.
        max_skipped_keys: skipped message keys kept per record, all chains and
            states together (oldest pruned first).
    """

    def __init__(
        self,
        base: ProtocolStore,
        account: AccountRecord,
        device_id: int,
        now_ms: Callable[[], int],
        *,
        trust_new_identity: bool = True,
        accept_changed_identity: bool = False,
        parsed_sessions: SessionCache | None = None,
        max_skipped_keys: int = MAX_SKIPPED_KEYS,
    ) -> None:
        self._base = base
        self._max_keys = max_skipped_keys
        self._parsed = parsed_sessions
        self._account = account
        self._device_id = device_id
        self._now_ms = now_ms
        self._trust_new = trust_new_identity
        self._accept_changed = accept_changed_identity
        self._identity_pair: IdentityKeyPair | None = None
        self._sessions: dict[Address, SessionRecord] = {}
        self._sessions_deleted: set[Address] = set()
        self._prekeys_deleted: set[int] = set()
        self._identities: dict[Address, IdentityRecord] = {}
        self._sender_keys: dict[SenderKeyId, SenderKeyRecord] = {}
        self._meta: dict[str, str] = {}
        self._loaded: dict[Address, bytes] = {}
        self.identity_changes: list[IdentityChange] = []

    def __repr__(self) -> str:
        return f"StagedStore(sessions={len(self._sessions)}, sender_keys={len(self._sender_keys)})"

    # -- IdentityKeyStore -------------------------------------------------------------

    def getIdentityKeyPair(self) -> IdentityKeyPair:
        if self._identity_pair is None:
            self._identity_pair = IdentityKeyPair(serialized=self._account.identity_key_pair)
        return self._identity_pair

    def getLocalRegistrationId(self) -> int:
        return self._account.registration_id

    def _address(self, name: str) -> Address:
        return Address(name, self._device_id)

    def _identity(self, address: Address) -> IdentityRecord | None:
        if address in self._identities:
            return self._identities[address]
        return self._base.load_identity(address)

    def isTrustedIdentity(self, recepientId: str, identityKey: IdentityKey) -> bool:
        stored = self._identity(self._address(recepientId))
        key = bytes(identityKey.serialize())
        # A first or unchanged key may be used to build a session; whether we may
        # *send* on it is the engine's check of the stored trust level.
        if stored is None or stored.identity_key == key:
            return True
        return self._accept_changed

    def _is_ours(self, address: Address, key: bytes) -> bool:
        own = self.getIdentityKeyPair().getPublicKey().serialize()
        return address.name == self._account.name and key == bytes(own)

    def _sibling_trust(self, address: Address, key: bytes) -> str | None:
        """The trust level of another device of the same user with this key, if decided."""
        levels = {
            record.trust
            for other, record in self._base.identities(address.name).items()
            if other != address and record.identity_key == key
        }
        levels.discard(TrustLevel.UNTRUSTED)
        if not levels:
            return None
        return TrustLevel.VERIFIED if TrustLevel.VERIFIED in levels else TrustLevel.TOFU

    def saveIdentity(self, recepientId: str, identityKey: IdentityKey) -> None:
        address = self._address(recepientId)
        stored = self._identity(address)
        key = bytes(identityKey.serialize())
        if stored is not None and stored.identity_key == key:
            return
        if stored is None and self._is_ours(address, key):
            # Another device of our own account (a linked device shares our identity
            # key): nothing to compare or report, it is ours.
            self._identities[address] = IdentityRecord(key, TrustLevel.VERIFIED, self._now_ms())
            return
        if stored is None:
            sibling = self._sibling_trust(address, key)
            if sibling is not None:
                # A new device of a contact with a key we already decided about (their
                # linked devices share it): the same decision, nothing new to report.
                self._identities[address] = IdentityRecord(key, sibling, self._now_ms())
                return
            trust = TrustLevel.TOFU if self._trust_new else TrustLevel.UNTRUSTED
        else:
            trust = TrustLevel.UNTRUSTED
        self._identities[address] = IdentityRecord(key, trust, self._now_ms())
        self.identity_changes.append(
            IdentityChange(address, stored.identity_key if stored else None, key)
        )

    # -- PreKeyStore ---------------------------------------------------------------------

    def loadPreKey(self, preKeyId: int) -> PreKeyRecord:
        data = None if preKeyId in self._prekeys_deleted else self._base.load_prekey(preKeyId)
        if data is None:
            raise InvalidKeyIdException(f"No such prekey: {preKeyId}")
        return PreKeyRecord(serialized=data)

    def containsPreKey(self, preKeyId: int) -> bool:
        return (
            preKeyId not in self._prekeys_deleted and self._base.load_prekey(preKeyId) is not None
        )

    def removePreKey(self, preKeyId: int) -> None:
        self._prekeys_deleted.add(preKeyId)

    def storePreKey(self, preKeyId: int, preKeyRecord: PreKeyRecord) -> None:
        raise NotImplementedError("prekeys are generated by e2ee.core.account, not here")

    # -- SignedPreKeyStore ---------------------------------------------------------------

    def loadSignedPreKey(self, signedPreKeyId: int) -> SignedPreKeyRecord:
        row = self._base.load_signed_prekey(signedPreKeyId)
        if row is None:
            raise InvalidKeyIdException(f"No such signed prekey: {signedPreKeyId}")
        return SignedPreKeyRecord(serialized=row.record)

    def containsSignedPreKey(self, signedPreKeyId: int) -> bool:
        return self._base.load_signed_prekey(signedPreKeyId) is not None

    # -- SessionStore --------------------------------------------------------------------

    def _stored_session(self, address: Address) -> SessionRecord | None:
        if address in self._sessions_deleted:
            return None
        data = self._base.load_session(address)
        if not data:
            if self._parsed is not None:
                self._parsed.take(address, b"")
            return None
        self._loaded[address] = data
        if self._parsed is not None:
            cached = self._parsed.take(address, data)
            if cached is not None:
                return cached
        return SessionRecord(serialized=data)

    def loadSession(self, recepientId: str, deviceId: int) -> SessionRecord:
        address = Address(recepientId, deviceId)
        record = self._sessions.get(address)
        if record is None:
            record = self._stored_session(address) or SessionRecord()
            self._sessions[address] = record
        return record

    def containsSession(self, recepientId: str, deviceId: int) -> bool:
        address = Address(recepientId, deviceId)
        record = self._sessions.get(address)
        if record is None:
            record = self._stored_session(address)
            if record is None:
                return False
            # Keep the parsed record: python-axolotl loads it right after asking.
            self._sessions[address] = record
        return bool(record.getSessionState().hasSenderChain())

    def storeSession(self, recepientId: str, deviceId: int, sessionRecord: SessionRecord) -> None:
        address = Address(recepientId, deviceId)
        self._sessions[address] = sessionRecord
        self._sessions_deleted.discard(address)

    def deleteSession(self, recepientId: str, deviceId: int) -> None:
        address = Address(recepientId, deviceId)
        self._sessions.pop(address, None)
        self._sessions_deleted.add(address)

    # -- SenderKeyStore ------------------------------------------------------------------

    @staticmethod
    def sender_key_id(name: SenderKeyName) -> SenderKeyId:
        sender: AxolotlAddress = name.getSender()
        return SenderKeyId(name.getGroupId(), Address(sender.getName(), sender.getDeviceId()))

    def loadSenderKey(self, senderKeyName: SenderKeyName) -> SenderKeyRecord:
        key_id = self.sender_key_id(senderKeyName)
        record = self._sender_keys.get(key_id)
        if record is None:
            data = self._base.load_sender_key(key_id)
            record = SenderKeyRecord(serialized=data) if data else SenderKeyRecord()
            self._sender_keys[key_id] = record
        return record

    def storeSenderKey(
        self, senderKeyName: SenderKeyName, senderKeyRecord: SenderKeyRecord
    ) -> None:
        self._sender_keys[self.sender_key_id(senderKeyName)] = senderKeyRecord

    # -- ours ----------------------------------------------------------------------------

    def put_meta(self, key: str, value: str) -> None:
        self._meta[key] = value

    def get_meta(self, key: str) -> str | None:
        return self._meta[key] if key in self._meta else self._base.get_meta(key)

    def touched_sessions(self) -> dict[Address, SessionRecord]:
        return dict(self._sessions)

    def changes(
        self,
        *,
        sessions: bool = True,
        sender_keys: bool = True,
        app_rows: tuple[tuple[str, Any], ...] = (),
    ) -> Changes:
        """Everything this operation wrote, bounded, as one :class:`Changes`.

        Loaded-but-unchanged records are written too (python-axolotl gives no dirty
        flag); callers only stage records they mean to write.
        """
        if sessions:
            keep = self._max_keys if self._accept_changed else None
            session_blobs = {a: _bounded_session(r, keep) for a, r in self._sessions.items()}
        else:
            session_blobs = {}
        sender_blobs = (
            {k: _bounded_sender_key(r, self._max_keys) for k, r in self._sender_keys.items()}
            if sender_keys
            else {}
        )
        return Changes(
            prekeys_delete=frozenset(self._prekeys_deleted) if self._prekeys_deleted else _NONE,
            identities_put=self._identities,
            sessions_put=session_blobs,
            sessions_delete=(
                frozenset(self._sessions_deleted) if self._sessions_deleted else _NONE
            ),
            sender_keys_put=sender_blobs,
            meta_put=self._meta,
            app_rows=app_rows,
        )

    def give_back(self) -> None:
        """Return the session records loaded, unchanged, to the engine's cache.

        Only for an operation refused after reading its records and before
        python-axolotl saw them (a refusal for the peer's work budget): the
        records are exactly what was parsed from the stored bytes, so the cache
        stays warm for the peer's next, genuine message.
        """
        if self._parsed is None:
            return
        for address, data in self._loaded.items():
            record = self._sessions.get(address)
            if record is not None:
                self._parsed.put(address, data, record)

    def committed(self, changes: Changes) -> None:
        """Tell the engine's cache that ``changes`` (from :meth:`changes`) are stored."""
        if self._parsed is None:
            return
        for address, blob in changes.sessions_put.items():
            self._parsed.put(address, blob, self._sessions[address])


def _keep_newest(chains_newest_first: Any, keep: int) -> None:
    """Prune skipped keys so at most ``keep`` remain, oldest chain and key first.

    ``chains_newest_first`` yields the repeated ``messageKeys``-like fields from
    the newest chain to the oldest; within one, keys are in arrival order
    (python-axolotl appends), so the newest are at the end.
    """
    for keys in chains_newest_first:
        held = len(keys)
        if held <= keep:
            keep -= held
        else:
            del keys[: held - keep]
            keep = 0


def _session_chains(record: SessionRecord) -> Any:
    # Newest first: the current state, then archived ones (python-axolotl inserts
    # the latest at index 0); within a state the last receiving chain is the newest.
    for state in (record.getSessionState(), *record.getPreviousSessionStates()):
        for chain in reversed(state.sessionStructure.receiverChains):
            yield chain.messageKeys


def _bounded_session(record: SessionRecord, keep: int | None) -> bytes:
    # Only receiving can add skipped message keys (sending, bundle processing
    # never do), so only receiving operations prune (keep is None otherwise).
    if keep is not None:
        _keep_newest(_session_chains(record), keep)
    return bytes(record.serialize())


def _bounded_sender_key(record: SenderKeyRecord, keep: int) -> bytes:
    states = record.senderKeyStates
    if len(states) > MAX_SENDER_KEY_STATES:
        del states[: len(states) - MAX_SENDER_KEY_STATES]
    # States are appended as distributions arrive: the last is the newest.
    _keep_newest((s.senderKeyStateStructure.senderMessageKeys for s in reversed(states)), keep)
    return bytes(record.serialize())
