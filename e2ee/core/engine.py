"""The protocol engine: account keys, 1:1 sessions and group Sender Keys.

Invariants:

* No I/O but the :class:`~e2ee.store.protocols.ProtocolStore` it is given; no
  network, no clock or randomness beyond ``now_ms`` and python-axolotl's
  ``os.urandom`` key generation.
* Compute on a copy, commit once: every operation runs python-axolotl against a
  :class:`~e2ee.core.staging.StagedStore` and commits one
  :class:`~e2ee.store.protocols.Changes` only after it succeeded -- for a decrypt,
  only after the message authenticated. A failed or hostile decrypt leaves the
  store byte-identical.
* Operations on one peer (1:1 address, or group+sender) are serialized by a
  per-key lock held from load to commit; different peers run in parallel.
  Session setups from a prekey message additionally share one lock, so a
  one-time prekey is consumed by at most one session.
* Bounded work: every received message is charged to its peer's work budget
  (:mod:`e2ee.core.budget`); a peer over budget is refused before any crypto with
  :class:`~e2ee.errors.DecryptBudgetExceeded`, and an admitted message is stopped
  as soon as its work would overdraw the budget. Messages of other peers are never
  affected. Replay records are bounded per peer device and per group sender
  (``_decrypt_setup``, :meth:`ProtocolEngine.group_process_distribution`).
* Only :mod:`e2ee.errors` types escape (see :func:`_translate`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from axolotl.axolotladdress import AxolotlAddress
from axolotl.duplicatemessagexception import DuplicateMessageException
from axolotl.groups.groupcipher import GroupCipher
from axolotl.groups.groupsessionbuilder import GroupSessionBuilder
from axolotl.groups.senderkeyname import SenderKeyName
from axolotl.identitykeypair import IdentityKeyPair
from axolotl.invalidkeyexception import InvalidKeyException
from axolotl.invalidkeyidexception import InvalidKeyIdException
from axolotl.invalidmessageexception import InvalidMessageException
from axolotl.invalidversionexception import InvalidVersionException
from axolotl.legacymessageexception import LegacyMessageException
from axolotl.nosessionexception import NoSessionException
from axolotl.protocol.ciphertextmessage import CiphertextMessage
from axolotl.sessionbuilder import SessionBuilder
from axolotl.sessioncipher import SessionCipher
from axolotl.untrustedidentityexception import UntrustedIdentityException
from google.protobuf.message import DecodeError
from nacl.exceptions import CryptoError

from blindpost_wire.sealed import CertificateFields
from e2ee.core import sealed, wire
from e2ee.core.budget import (
    ALLOWANCE_GROUP,
    ALLOWANCE_MESSAGE,
    ALLOWANCE_SETUP,
    AXOLOTL_MAX_JUMP,
    DERIVATION,
    DH_STEP,
    MAX_SENDER_KEY_JUMP,
    DecryptLimits,
    PeerBudgets,
    WorkMeter,
)
from e2ee.core.keys import (
    MAX_DEVICE_ID,
    KeyUpload,
    PreKeyBundle,
    generate_identity,
    generate_registration_id,
)
from e2ee.core.locks import KeyedLocks
from e2ee.core.prekeys import (
    DAY_MS,
    KeyPolicy,
    current_signed,
    fresh_keys,
    plan_maintenance,
    public_prekeys,
)
from e2ee.core.sealed import SealedContent
from e2ee.core.staging import IdentityChange, SessionCache, StagedStore
from e2ee.errors import (
    CertificateMismatch,
    DecryptBudgetExceeded,
    DuplicateMessage,
    E2EEError,
    InvalidBundle,
    InvalidKey,
    InvalidMessage,
    MissingKey,
    NoSession,
    SenderKeyJumpTooLarge,
    UntrustedIdentity,
    UsageError,
)
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
    "DAY_MS",
    "MAX_SENDER_KEY_JUMP",
    "AppRows",
    "Ciphertext",
    "DecryptLimits",
    "Decrypted",
    "KeyPolicy",
    "ProtocolEngine",
]

#: Rows the caller wants committed together with a decrypt: (table, row) pairs.
AppRows = Sequence[tuple[str, Mapping[str, Any]]]

#: Legacy replay records, one row per accepted setup / distribution (written
#: before the per-peer lists below; still honoured, no longer written).
_META_BASE_KEY = "seen_base_key:"
_META_DISTRIBUTION = "seen_distribution:"
#: Replay records, one row per peer device / per group sender, holding at most
#: ``DecryptLimits.max_seen_*`` entries (newest last).
_META_BASE_KEYS = "seen_base_keys:"
_META_DISTRIBUTIONS = "seen_distributions:"

_AXOLOTL_ERRORS: tuple[type[BaseException], ...] = (
    InvalidMessageException,
    InvalidKeyException,
    InvalidKeyIdException,
    InvalidVersionException,
    LegacyMessageException,
    DuplicateMessageException,
    NoSessionException,
    UntrustedIdentityException,
    DecodeError,
    CryptoError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AssertionError,
    OverflowError,
)


def _valid_address(name: object, device_id: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and isinstance(device_id, int)
        and not isinstance(device_id, bool)
        and 1 <= device_id <= MAX_DEVICE_ID
    )


def _check_peer(address: Address) -> None:
    """An address that came from the relay; raise InvalidMessage if impossible."""
    if not _valid_address(address.name, address.device_id):
        raise InvalidMessage("impossible sender address")


def _check_target(address: Address) -> None:
    """An address the caller chose; raise UsageError if impossible."""
    if not _valid_address(address.name, address.device_id):
        raise UsageError(f"device ids are 1..{MAX_DEVICE_ID} and names non-empty")


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


def _entries(value: str | None) -> list[str]:
    """The entries of a per-peer replay record (comma-separated, newest last)."""
    return value.split(",") if value else []


def _first_trial_units(state: Any, message: Any) -> int:
    """Work python-axolotl surely spends trying ``message`` with the current state.

    ``SessionCipher.decryptWithSessionState``: a known ratchet key derives the keys
    from its chain's index up to the counter; a new one costs a DH ratchet step
    first and starts at 0. A counter more than 2,000 ahead is refused before any
    derivation, an old one is a lookup.
    """
    if not state.hasSenderChain() or message.getMessageVersion() != state.getSessionVersion():
        return 0
    counter: int = message.getCounter()
    found = state.getReceiverChain(message.getSenderRatchetKey())
    if found is not None:
        index: int = found[0].chainKey.index
        if counter < index or counter - index > AXOLOTL_MAX_JUMP:
            return 0
        return (counter - index + 1) * DERIVATION
    if counter > AXOLOTL_MAX_JUMP:
        return DH_STEP
    return DH_STEP + (counter + 1) * DERIVATION


@dataclass(frozen=True, slots=True)
class Ciphertext:
    """An encrypted 1:1 message. ``kind`` travels in the envelope, in clear."""

    kind: Literal["prekey", "message"]
    body: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Ciphertext(kind={self.kind!r}, size={len(self.body)})"


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The result of a successful, committed decrypt.

    Attributes:
        plaintext: the decrypted bytes (hidden from repr).
        sender: who sent it.
        identity_change: set when this message carried an identity key we had
            not seen for the sender (first contact, or a changed key: then it is
            stored as untrusted and sending to the sender is held).
    """

    plaintext: bytes = field(repr=False)
    sender: Address
    identity_change: IdentityChange | None = None

    def __repr__(self) -> str:
        return f"Decrypted(sender={self.sender}, size={len(self.plaintext)})"


def _translate(exc: BaseException, who: str) -> E2EEError:
    """Map python-axolotl / protobuf / C-library errors onto e2ee's hierarchy."""
    if isinstance(exc, DuplicateMessageException):
        return DuplicateMessage(f"{who}: message already received")
    if isinstance(exc, NoSessionException):
        return NoSession(who)
    if isinstance(exc, UntrustedIdentityException):
        return UntrustedIdentity(who)
    if isinstance(exc, InvalidKeyIdException):
        return MissingKey(f"{who}: message names a key we do not hold")
    if isinstance(exc, InvalidKeyException | CryptoError):
        return InvalidKey(f"{who}: invalid key")
    return InvalidMessage(f"{who}: {type(exc).__name__}")


class _axolotl_errors:  # noqa: N801  (used like a function: `with _axolotl_errors(who):`)
    """Translate python-axolotl's exceptions raised in the ``with`` block."""

    __slots__ = ("_who",)

    def __init__(self, who: object) -> None:
        self._who = who

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is None or isinstance(exc, E2EEError) or not isinstance(exc, _AXOLOTL_ERRORS):
            return False
        raise _translate(exc, str(self._who)) from exc


class ProtocolEngine:
    """Signal-protocol operations for one local account over one store.

    Args:
        store: where keys and sessions live; every write is one ``commit``.
        now_ms: the clock (milliseconds since the epoch); tests pass a fixed one.
        trust_on_first_use: trust a peer's first identity key without
            verification (default). When False, new keys are stored as
            ``untrusted`` and encrypting to them raises :class:`UntrustedIdentity`
            until :meth:`set_trust` marks them trusted (strict mode).
        policy: key rotation and replenishment settings.
        limits: per-peer bounds on decrypt work and state (defaults: see
            :class:`~e2ee.core.budget.DecryptLimits`).

    Raises:
        UsageError: ``limits`` is not a :class:`DecryptLimits`.
    """

    def __init__(
        self,
        store: ProtocolStore,
        *,
        now_ms: Callable[[], int] = _system_ms,
        trust_on_first_use: bool = True,
        policy: KeyPolicy | None = None,
        limits: DecryptLimits | None = None,
    ) -> None:
        if limits is not None and not isinstance(limits, DecryptLimits):
            raise UsageError("limits must be a DecryptLimits")
        self._store = store
        self._now_ms = now_ms
        self._tofu = trust_on_first_use
        self.policy = policy or KeyPolicy()
        self.limits = limits or DecryptLimits()
        self.budgets = PeerBudgets(self.limits)
        self._locks = KeyedLocks()
        self._setup_lock = threading.Lock()
        self._account_cache: AccountRecord | None = None
        self._parsed_sessions = SessionCache()

    def __repr__(self) -> str:
        account = self._account_cache  # no store read (or unsealing) for a repr
        who = f"{account.name}.{account.device_id}" if account else "account not loaded"
        return f"ProtocolEngine({who})"

    # -- account ---------------------------------------------------------------------

    @property
    def store(self) -> ProtocolStore:
        return self._store

    def has_account(self) -> bool:
        return self._store.load_account() is not None

    def create_account(
        self, name: str, device_id: int, *, identity_key_pair: bytes | None = None
    ) -> AccountRecord:
        """Generate identity, registration id, a signed prekey and a prekey batch.

        Args:
            name: the account name.
            device_id: this device's id.
            identity_key_pair: the account's existing identity key pair (serialized), for a
                linked device: it shares the identity (safety numbers do not change) but
                gets its own registration id, signed prekey and one-time prekeys.

        Raises:
            UsageError: an account already exists, bad name/device id, or an identity key
                pair that does not parse.
        """
        if not _valid_address(name, device_id):
            raise UsageError(f"account needs a name and a device id in 1..{MAX_DEVICE_ID}")
        with self._locks.hold("account"):
            if self._store.load_account() is not None:
                raise UsageError("this store already holds an account")
            now = self._now_ms()
            if identity_key_pair is None:
                identity, registration_id = generate_identity()
            else:
                try:
                    identity = IdentityKeyPair(serialized=identity_key_pair)
                except Exception as exc:  # python-axolotl/protobuf raise anything on bad bytes
                    raise UsageError("not an identity key pair") from exc
                registration_id = generate_registration_id()
            account = AccountRecord(
                name=name,
                device_id=device_id,
                registration_id=registration_id,
                identity_key_pair=bytes(identity.serialize()),
                created_at_ms=now,
            )
            self._store.commit(
                replace(fresh_keys(self._store, identity, self.policy, now), account=account)
            )
            self._account_cache = account
            return account

    def reset_device(self, device_id: int) -> AccountRecord:
        """Become a new device of the same identity: a new registration id, signed prekey
        and one-time prekeys, under ``device_id`` (a backup restored on a new machine).

        Call it on a store whose ratchet state was dropped
        (``SQLiteProtocolStore.drop_ratchet_state``): sessions must start over, so that no
        message key of the backed-up device is used again. Prekey ids continue from the
        stored counters, so none is reused either.

        Raises:
            UsageError: no account, or a bad device id.
        """
        if not 1 <= device_id <= MAX_DEVICE_ID:
            raise UsageError(f"device id must be in 1..{MAX_DEVICE_ID}")
        with self._locks.hold("account"):
            old = self._account()
            identity = IdentityKeyPair(serialized=old.identity_key_pair)
            now = self._now_ms()
            account = replace(old, device_id=device_id, registration_id=generate_registration_id())
            self._store.commit(
                replace(fresh_keys(self._store, identity, self.policy, now), account=account)
            )
            self._account_cache = account
            return account

    def _account(self) -> AccountRecord:
        if self._account_cache is None:
            account = self._store.load_account()
            if account is None:
                raise UsageError("no account in this store; call create_account first")
            self._account_cache = account
        return self._account_cache

    @property
    def address(self) -> Address:
        """This device's own address."""
        account = self._account()
        return Address(account.name, account.device_id)

    @property
    def identity_key(self) -> bytes:
        """This account's serialized identity public key (33 bytes)."""
        pair = IdentityKeyPair(serialized=self._account().identity_key_pair)
        return bytes(pair.getPublicKey().serialize())

    # -- sealed sender (docs/protocol.md, "Sealed sender") ----------------------------------

    def open_sealed(self, data: bytes) -> SealedContent:
        """Open the outer layer of a sealed envelope addressed to this device.

        Raises:
            InvalidMessage: malformed, not addressed to this device, or not authentic.
        """
        account = self._account()
        pair = IdentityKeyPair(serialized=account.identity_key_pair)
        return sealed.open_sealed(
            data,
            user=account.name,
            device=account.device_id,
            identity_private=bytes(pair.getPrivateKey().serialize()),
            identity_key=bytes(pair.getPublicKey().serialize()),
        )

    def bind_certificate(
        self, cert: CertificateFields, kind: Literal["prekey", "message", "group"], body: bytes
    ) -> Address:
        """The sender address a verified certificate vouches for, once the identity key in it
        is the one the inner message's session uses.

        For a session setup (``prekey``) that is the identity key the setup carries; for a
        later 1:1 or Sender Key message, the identity recorded for the certificate's address.
        So a setup from alice is decrypted under alice's address or not at all, whoever the
        relay says delivered it.

        Raises:
            CertificateMismatch: another identity key, or none recorded for that address.
            InvalidMessage: the setup message is malformed.
        """
        address = Address(cert.user, cert.device)
        if kind == "prekey":
            carried: bytes | None = bytes(
                wire.parse_prekey_message(body).getIdentityKey().serialize()
            )
        else:
            record = self._store.load_identity(address)
            carried = None if record is None else record.identity_key
        if carried is None:
            raise CertificateMismatch(cert.user, "no identity key recorded for this sender")
        if carried != cert.identity_key:
            raise CertificateMismatch(cert.user, "the session uses another identity key")
        return address

    def key_upload(self) -> KeyUpload:
        """Everything to publish on registration: identity, current signed prekey,
        and every one-time prekey held (upload at most 100 per request)."""
        account = self._account()
        return KeyUpload(
            identity_key=self.identity_key,
            registration_id=account.registration_id,
            signed_prekey=current_signed(self._store),
            one_time_prekeys=tuple(public_prekeys(self._store, self._store.prekey_ids())),
        )

    def local_bundle(self, prekey_id: int | None = None) -> PreKeyBundle:
        """This device's bundle as the relay would hand it out (for tests and tools)."""
        account = self._account()
        otpk = public_prekeys(self._store, [prekey_id]) if prekey_id is not None else []
        return PreKeyBundle(
            device_id=account.device_id,
            registration_id=account.registration_id,
            identity_key=self.identity_key,
            signed_prekey=current_signed(self._store),
            one_time_prekey=otpk[0] if otpk else None,
        )

    def maintain_keys(self, relay_prekey_count: int | None = None) -> KeyUpload | None:
        """Rotate the signed prekey on schedule and replenish one-time prekeys.

        Args:
            relay_prekey_count: how many one-time prekeys the relay still holds for
                this device, or None if unknown (then only rotation is checked).

        Returns:
            What to upload (a new signed prekey and/or new one-time prekeys), or
            None when nothing changed.
        """
        with self._locks.hold("account"):
            account = self._account()
            identity = IdentityKeyPair(serialized=account.identity_key_pair)
            changes, new_signed, new_prekeys = plan_maintenance(
                self._store, identity, self.policy, self._now_ms(), relay_prekey_count
            )
            if changes.is_empty():
                return None
            self._store.commit(changes)
            if new_signed is None and not new_prekeys:
                return None
            return KeyUpload(
                identity_key=bytes(identity.getPublicKey().serialize()),
                registration_id=account.registration_id,
                signed_prekey=new_signed,
                one_time_prekeys=tuple(new_prekeys),
            )

    # -- trust -------------------------------------------------------------------------

    def identity(self, address: Address) -> IdentityRecord | None:
        """The identity key and trust recorded for a peer device, or None."""
        return self._store.load_identity(address)

    def set_trust(self, address: Address, identity_key: bytes, trust: str) -> None:
        """Record ``identity_key`` for ``address`` with the given trust level.

        Accepting a changed key is ``set_trust(addr, new_key, TrustLevel.TOFU)``;
        marking it verified uses ``TrustLevel.VERIFIED``.

        Raises:
            UsageError: unknown trust level or malformed key.
        """
        if trust not in TrustLevel.ALL:
            raise UsageError(f"unknown trust level {trust!r}")
        try:
            wire.check_public_key(identity_key, "identity key")
        except InvalidKey as exc:
            raise UsageError(str(exc)) from exc
        with self._locks.hold(address):
            self._store.commit(
                Changes(
                    identities_put={address: IdentityRecord(identity_key, trust, self._now_ms())}
                )
            )

    # -- 1:1 sessions ------------------------------------------------------------------

    def _staged(self, device_id: int, *, receiving: bool) -> StagedStore:
        return StagedStore(
            self._store,
            self._account(),
            device_id,
            self._now_ms,
            trust_new_identity=self._tofu,
            accept_changed_identity=receiving,
            parsed_sessions=self._parsed_sessions,
            max_skipped_keys=self.limits.max_skipped_keys,
        )

    def has_session(self, address: Address) -> bool:
        """True when a session with this device exists."""
        return self._store.load_session(address) is not None

    def session_devices(self, name: str) -> list[int]:
        """Device ids of ``name`` we hold sessions with."""
        return self._store.session_devices(name)

    def process_bundle(self, name: str, bundle: PreKeyBundle) -> None:
        """Start a session (X3DH-style) with one device from its prekey bundle.

        Raises:
            InvalidBundle: the bundle does not verify (checked again here).
            UntrustedIdentity: the bundle's identity differs from the trusted one.
        """
        bundle.verify()
        address = Address(name, bundle.device_id)
        _check_target(address)
        with self._locks.hold(address):
            staged = self._staged(bundle.device_id, receiving=False)
            builder = SessionBuilder(staged, staged, staged, staged, name, bundle.device_id)
            with _axolotl_errors(address):
                try:
                    builder.processPreKeyBundle(bundle.to_axolotl())
                except InvalidKeyException as exc:
                    raise InvalidBundle(f"{address}: bundle rejected") from exc
            self._commit_sessions(staged)

    def encrypt(self, address: Address, plaintext: bytes) -> Ciphertext:
        """Encrypt for one device and advance the sending chain (committed).

        Raises:
            NoSession: no session with ``address`` (fetch its bundle first).
            UntrustedIdentity: the peer's key changed and was not accepted yet.
            UsageError: ``plaintext`` is not bytes.
        """
        return self.encrypt_many(address, [plaintext])[0]

    def encrypt_many(self, address: Address, plaintexts: Sequence[bytes]) -> list[Ciphertext]:
        """Encrypt several messages for one device, in order; commit the sending chain once.

        The same as :meth:`encrypt` for each in turn, but the session is loaded,
        advanced on the copy and stored once: all of them or, on any error, none.

        Raises:
            NoSession: no session with ``address`` (fetch its bundle first).
            UntrustedIdentity: the peer's key changed and was not accepted yet.
            UsageError: a plaintext is not bytes.
        """
        if not all(isinstance(p, bytes) for p in plaintexts):
            raise UsageError("plaintext must be bytes")
        _check_target(address)
        with self._locks.hold(address):
            known = self._store.load_identity(address)
            if known is not None and known.trust == TrustLevel.UNTRUSTED:
                raise UntrustedIdentity(str(address))
            staged = self._staged(address.device_id, receiving=False)
            cipher = SessionCipher(staged, staged, staged, staged, address.name, address.device_id)
            with _axolotl_errors(address):
                if not staged.containsSession(address.name, address.device_id):
                    raise NoSession(str(address))
                messages = [cipher.encrypt(p) for p in plaintexts]
            self._commit_sessions(staged)
        return [
            Ciphertext(
                "prekey" if m.getType() == CiphertextMessage.PREKEY_TYPE else "message",
                bytes(m.serialize()),
            )
            for m in messages
        ]

    def decrypt(
        self,
        sender: Address,
        ciphertext: Ciphertext,
        on_plaintext: Callable[[bytes], AppRows] | None = None,
    ) -> Decrypted:
        """Authenticate and decrypt a 1:1 message, then commit everything at once.

        Args:
            sender: the sending device (from the relay envelope).
            ciphertext: kind and body from the envelope.
            on_plaintext: called with the plaintext before the commit; the rows it
                returns (e.g. the history row) are committed in the same
                transaction as the session state. If it raises, nothing is
                committed and its exception propagates.

        Raises:
            InvalidMessage: malformed, forged or undecryptable (store unchanged).
            DuplicateMessage: already decrypted once (store unchanged).
            MissingKey: names a prekey we no longer hold.
            NoSession: a normal message without a session.
            UntrustedIdentity: strict mode refused an unknown identity.
            DecryptBudgetExceeded: the sender's work budget does not cover this
                message now (store unchanged; retry after ``retry_after_ms``).
        """
        _check_peer(sender)
        if ciphertext.kind == "prekey":
            message: Any = wire.parse_prekey_message(ciphertext.body)
        elif ciphertext.kind == "message":
            message = wire.parse_whisper_message(ciphertext.body)
        else:
            raise UsageError(f"unknown ciphertext kind {ciphertext.kind!r}")
        with self._locks.hold(sender):
            # A peer in debt is refused before its session is even loaded.
            self.budgets.check(sender.name, self._now_ms())
            if ciphertext.kind == "prekey":
                with self._setup_lock:
                    return self._decrypt_prekey(sender, message, on_plaintext)
            staged = self._staged(sender.device_id, receiving=True)
            record = staged.loadSession(sender.name, sender.device_id)
            try:
                work = self.budgets.admit(
                    sender.name,
                    self._now_ms(),
                    ALLOWANCE_MESSAGE,
                    _first_trial_units(record.getSessionState(), message) - ALLOWANCE_MESSAGE,
                )
            except DecryptBudgetExceeded:
                staged.give_back()  # only read: a refused flood keeps the cache warm
                raise
            cipher = SessionCipher(staged, staged, staged, staged, sender.name, sender.device_id)
            try:
                with _axolotl_errors(sender), work:
                    # python-axolotl checks for a session first (NoSessionException,
                    # mapped to NoSession by _axolotl_errors).
                    plaintext = bytes(cipher.decryptMsg(message))
                result = self._commit_decrypt(staged, sender, plaintext, on_plaintext)
            except BaseException:
                self.budgets.settle(work, succeeded=False)
                raise
            self.budgets.settle(work, succeeded=True)
            return result

    def _decrypt_prekey(
        self,
        sender: Address,
        message: Any,
        on_plaintext: Callable[[bytes], AppRows] | None,
    ) -> Decrypted:
        staged = self._staged(sender.device_id, receiving=True)
        base_key = bytes(message.getBaseKey().serialize())
        digest = wire.key_digest(base_key)
        seen_key = _META_BASE_KEYS + wire.key_digest(str(sender).encode())
        seen = _entries(staged.get_meta(seen_key))
        record = staged.loadSession(sender.name, sender.device_id)
        known = record.hasSessionState(message.getMessageVersion(), base_key)
        if not known and (
            any(entry.endswith(":" + digest) for entry in seen)
            or staged.get_meta(_META_BASE_KEY + digest) is not None
        ):
            # The session this message set up is gone; processing it again would
            # replay it into a fresh session (defect 4).
            raise DuplicateMessage(f"{sender}: session setup message replayed")
        inner = message.getWhisperMessage()
        # A new session's receiving chain starts at 0: the counter is the jump.
        jump = inner.getCounter() if not known and inner.getCounter() <= AXOLOTL_MAX_JUMP else 0
        work = self.budgets.admit(sender.name, self._now_ms(), ALLOWANCE_SETUP, jump * DERIVATION)
        try:
            plaintext = self._decrypt_setup(staged, sender, message, base_key, work, seen_key, seen)
            result = self._commit_decrypt(staged, sender, plaintext, on_plaintext)
        except BaseException:
            self.budgets.settle(work, succeeded=False)
            raise
        self.budgets.settle(work, succeeded=True)
        return result

    def _decrypt_setup(
        self,
        staged: StagedStore,
        sender: Address,
        message: Any,
        base_key: bytes,
        work: WorkMeter,
        seen_key: str,
        seen: list[str],
    ) -> bytes:
        cipher = SessionCipher(staged, staged, staged, staged, sender.name, sender.device_id)
        with _axolotl_errors(sender), work:
            plaintext = bytes(cipher.decryptPkmsg(message))
            decrypted_by = staged.loadSession(sender.name, sender.device_id).getSessionState()
        envelope_identity = bytes(message.getIdentityKey().serialize())
        session_identity = bytes(decrypted_by.getRemoteIdentityKey().serialize())
        if (
            bytes(decrypted_by.getAliceBaseKey()) != base_key
            or session_identity != envelope_identity
        ):
            # The envelope is not authenticated, only the inner message is (its MAC
            # covers the session's identities). An envelope whose base key or
            # identity differs from the session that decrypted the inner message was
            # re-wrapped by someone: python-axolotl would archive the real session
            # and record the envelope's identity as the sender's.
            raise InvalidMessage(f"{sender}: prekey envelope does not match its message")
        entry = f"{message.getSignedPreKeyId()}:{wire.key_digest(base_key)}"
        if entry not in seen:
            # Only needed while the signed prekey exists: without it a replay fails
            # with MissingKey anyway, so records of deleted signed prekeys expire.
            alive: dict[str, bool] = {}
            for old in seen:
                spk = old.partition(":")[0]
                if spk not in alive:
                    alive[spk] = spk.isdigit() and staged.containsSignedPreKey(int(spk))
            kept = [old for old in seen if alive[old.partition(":")[0]]]
            kept.append(entry)
            staged.put_meta(seen_key, ",".join(kept[-self.limits.max_seen_base_keys :]))
        return plaintext

    def _commit_decrypt(
        self,
        staged: StagedStore,
        sender: Address,
        plaintext: bytes,
        on_plaintext: Callable[[bytes], AppRows] | None,
    ) -> Decrypted:
        rows = tuple(on_plaintext(plaintext)) if on_plaintext else ()
        self._commit_sessions(staged, rows)
        change = staged.identity_changes[-1] if staged.identity_changes else None
        return Decrypted(plaintext, sender, change)

    def _commit_sessions(self, staged: StagedStore, rows: AppRows = ()) -> None:
        changes = staged.changes(sender_keys=False, app_rows=tuple(rows))
        self._store.commit(changes)
        staged.committed(changes)

    # -- groups (Sender Keys) ------------------------------------------------------------

    def _sender_key_name(self, group_id: str, sender: Address) -> SenderKeyName:
        if not group_id:
            raise UsageError("group id must not be empty")
        return SenderKeyName(group_id, AxolotlAddress(sender.name, sender.device_id))

    def group_distribution(self, group_id: str) -> bytes:
        """Our Sender Key distribution message for a group, creating the key if needed.

        Send it to every member device over 1:1 sessions (pairwise encrypted).
        """
        me = self.address
        name = self._sender_key_name(group_id, me)
        with self._locks.hold(SenderKeyId(group_id, me)):
            staged = self._staged(me.device_id, receiving=False)
            with _axolotl_errors(group_id):
                message = GroupSessionBuilder(staged).create(name)
            self._store.commit(staged.changes(sessions=False))
        return bytes(message.serialize())

    def group_rotate(self, group_id: str) -> None:
        """Forget our Sender Key for a group; the next distribution makes a new one.

        Call when a member is removed or leaves, before sending again, so they
        cannot read what follows.
        """
        me = self.address
        key_id = SenderKeyId(group_id, me)
        with self._locks.hold(key_id):
            self._store.commit(Changes(sender_keys_delete=frozenset({key_id})))

    def group_forget_sender(self, group_id: str, sender: Address) -> None:
        """Drop a sender's key for a group (they left or were removed)."""
        key_id = SenderKeyId(group_id, sender)
        with self._locks.hold(key_id):
            self._store.commit(Changes(sender_keys_delete=frozenset({key_id})))

    def group_process_distribution(self, group_id: str, sender: Address, data: bytes) -> None:
        """Store a sender's Sender Key from their distribution message.

        Receiving the same distribution again changes nothing (so a replayed
        distribution cannot rewind the chain and re-open old messages).

        Raises:
            InvalidMessage: malformed, or reuses a key id with a different signing key.
        """
        _check_peer(sender)
        message = wire.parse_distribution_message(data)
        name = self._sender_key_name(group_id, sender)
        key_id = SenderKeyId(group_id, sender)
        with self._locks.hold(key_id):
            staged = self._staged(sender.device_id, receiving=True)
            record = staged.loadSenderKey(name)
            signing = bytes(message.getSignatureKey().serialize())
            for state in record.senderKeyStates:
                if state.getKeyId() == message.getId():
                    if bytes(state.getSigningKeyPublic().serialize()) != signing:
                        raise InvalidMessage(f"{sender}: sender key id reused with another key")
                    return
            # Remembered after its state is evicted too: a replay must not bring an
            # old chain back at iteration 0 and re-open its messages. One record per
            # sender and group, holding the newest max_seen_distributions entries.
            seen_key = _META_DISTRIBUTIONS + wire.key_digest(
                b"\0".join((group_id.encode(), str(sender).encode()))
            )
            seen = _entries(staged.get_meta(seen_key))
            entry = wire.key_digest(str(message.getId()).encode() + b"\0" + signing)
            legacy = _META_DISTRIBUTION + wire.key_digest(
                b"\0".join(
                    (
                        group_id.encode(),
                        str(sender).encode(),
                        str(message.getId()).encode(),
                        signing,
                    )
                )
            )
            if entry in seen or staged.get_meta(legacy) is not None:
                return
            with _axolotl_errors(sender):
                GroupSessionBuilder(staged).process(name, message)
            seen.append(entry)
            staged.put_meta(seen_key, ",".join(seen[-self.limits.max_seen_distributions :]))
            self._store.commit(staged.changes(sessions=False))

    def group_encrypt(self, group_id: str, plaintext: bytes) -> bytes:
        """Encrypt once for every member holding our Sender Key (committed).

        Raises:
            NoSession: no Sender Key yet (call :meth:`group_distribution`).
        """
        if not isinstance(plaintext, bytes):
            raise UsageError("plaintext must be bytes")
        me = self.address
        name = self._sender_key_name(group_id, me)
        with self._locks.hold(SenderKeyId(group_id, me)):
            staged = self._staged(me.device_id, receiving=False)
            if staged.loadSenderKey(name).isEmpty():
                raise NoSession(f"{group_id}:{me}")
            with _axolotl_errors(group_id):
                body = bytes(GroupCipher(staged, name).encrypt(plaintext))
            self._store.commit(staged.changes(sessions=False))
        return body

    def group_decrypt(
        self,
        group_id: str,
        sender: Address,
        data: bytes,
        on_plaintext: Callable[[bytes], AppRows] | None = None,
    ) -> bytes:
        """Verify and decrypt a group message, then commit (see :meth:`decrypt`).

        Raises:
            NoSession: no Sender Key from this sender for this group.
            MissingKey: the message names a Sender Key state we do not hold.
            SenderKeyJumpTooLarge: more than ``limits.max_sender_key_jump``
                iterations ahead (rejected before any key is derived).
            DecryptBudgetExceeded: the sender's work budget does not cover this
                message now (store unchanged; retry after ``retry_after_ms``).
            DuplicateMessage, InvalidMessage: replayed or forged (store unchanged).
        """
        _check_peer(sender)
        message = wire.parse_sender_key_message(data)
        name = self._sender_key_name(group_id, sender)
        key_id = SenderKeyId(group_id, sender)
        with self._locks.hold(key_id):
            self.budgets.check(sender.name, self._now_ms())
            staged = self._staged(sender.device_id, receiving=True)
            record = staged.loadSenderKey(name)
            if record.isEmpty():
                raise NoSession(f"{group_id}:{sender}")
            with _axolotl_errors(sender):
                state = record.getSenderKeyState(message.getKeyId())
                current = state.getSenderChainKey().getIteration()
            # Checked before python-axolotl verifies the signature and derives keys:
            # a hostile claim costs nothing, whoever signed it.
            jump = message.getIteration() - current
            limit = self.limits.max_sender_key_jump
            if jump > limit:
                raise SenderKeyJumpTooLarge(str(sender), jump, limit)
            # Beyond the allowance (the signature and the message's own key), the
            # claimed jump must fit in what is left, also checked before any work;
            # what was actually done (only the signature, if it fails) is charged.
            work = self.budgets.admit(
                sender.name, self._now_ms(), ALLOWANCE_GROUP, max(jump, 0) * DERIVATION
            )
            try:
                with _axolotl_errors(sender), work:
                    plaintext = bytes(GroupCipher(staged, name).decrypt(data))
                rows = tuple(on_plaintext(plaintext)) if on_plaintext else ()
                self._store.commit(staged.changes(sessions=False, app_rows=rows))
            except BaseException:
                self.budgets.settle(work, succeeded=False)
                raise
            self.budgets.settle(work, succeeded=True)
        return plaintext
