"""Sealed sender: certificates, pinned relay keys, delivery tokens and the sealed envelope.

Invariants:

* Pure: bytes in, bytes or typed values out; time (``now_ms``) and randomness (the ephemeral
  key and the content key) are parameters, so the test vectors in docs/wire-format.md are
  reproducible. Every primitive is PyNaCl's (X25519, Ed25519, BLAKE2b,
  XChaCha20-Poly1305-IETF); nothing here is a primitive of our own.
* A sealed envelope hides from the relay who sent it and which group it belongs to: the
  only clear fields are the version, a fresh ephemeral key and the recipient devices the
  relay fans out to anyway. Each recipient device unwraps the one content key with
  X25519(its identity key, the ephemeral key); the content key encrypts the inner content
  (an optional sender certificate and a version 1 envelope) once for all of them.
* Keys are single use, so the nonces are zero: each wrap key is unique to (ephemeral key,
  recipient device) and each content key is random per message.
* A certificate is accepted only if it parses, its signature verifies under a *pinned*
  relay key and it has not expired; :func:`verify_certificate` raises the typed leaf saying
  which check failed. Binding the certificate to the session it carries is the engine's
  (``ProtocolEngine.open_sealed``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
from nacl.encoding import RawEncoder
from nacl.hash import blake2b

from blindpost_wire.frames import WireError
from blindpost_wire.sealed import (
    CERT_CONTEXT,
    ENDORSE_CONTEXT,
    TOKEN_LENGTH,
    CertificateFields,
    endorsement_body,
    parse_certificate,
)
from e2ee.errors import (
    ExpiredCertificate,
    InvalidCertificate,
    InvalidMessage,
    RelayKeyRejected,
    UnpinnedRelayKey,
    UsageError,
)

__all__ = [
    "ACCESS_KEY_LENGTH",
    "SEALED_VERSION",
    "RelayKey",
    "RelayKeyPins",
    "SealedContent",
    "SealedRecipient",
    "account_access_key",
    "delivery_token",
    "is_sealed",
    "open_sealed",
    "seal",
    "verify_certificate",
]

SEALED_VERSION: Final = 2
ACCESS_KEY_LENGTH: Final = 32
_KEY: Final = 32
_TAG: Final = 16
_WRAPPED: Final = _KEY + _TAG
_NONCE: Final = b"\x00" * 24
_MAX_RECIPIENTS: Final = 4096
_MAX_CERT: Final = 1024
_WRAP_PERSON: Final = b"bp-seal-wrap-v1"
_TOKEN_PERSON: Final = b"bp-deliv-tok-v1"
_ACCESS_PERSON: Final = b"bp-access-key-v1"


# -- delivery tokens -----------------------------------------------------------------------


def account_access_key(identity_secret: bytes, epoch: int) -> bytes:
    """Our access key of rotation ``epoch``: BLAKE2b-256 keyed by a hash of our identity key
    pair's secret bytes, so every device of the account (they share the identity key) makes
    the same one without talking, and nobody else can predict the next epoch's.

    Raises:
        UsageError: ``epoch`` out of range (0 to 2**32 - 1).
    """
    if not 0 <= epoch < 2**32:
        raise UsageError("an access key epoch is 0 to 2**32 - 1")
    return blake2b(
        struct.pack(">I", epoch),
        digest_size=ACCESS_KEY_LENGTH,
        key=blake2b(identity_secret, digest_size=32, encoder=RawEncoder),
        person=_ACCESS_PERSON,
        encoder=RawEncoder,
    )


def delivery_token(access_key: bytes) -> bytes:
    """The delivery token a contact presents to the relay for us: BLAKE2b-128 keyed by our
    access key (the relay sees the token, never the key, and stores only a hash of the token).

    Raises:
        UsageError: not a 32-byte access key.
    """
    if len(access_key) != ACCESS_KEY_LENGTH:
        raise UsageError("an access key is 32 bytes")
    return blake2b(
        b"", digest_size=TOKEN_LENGTH, key=access_key, person=_TOKEN_PERSON, encoder=RawEncoder
    )


# -- relay keys and certificates -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayKey:
    """One certificate key the relay announces (``GET /v1/sender-keys``).

    ``endorsement`` is the previous key's (``key_id - 1``) signature over this key, or None
    for a relay's first key.
    """

    key_id: int
    public_key: bytes = field(repr=False)
    endorsement: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RelayKeyPins:
    """The relay certificate keys this client trusts: key id -> Ed25519 public key."""

    keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)

    def update(self, announced: Iterable[RelayKey]) -> tuple[RelayKeyPins, tuple[int, ...]]:
        """Pin announced keys: all of them on first use, later only those a pinned key
        endorses (a chain ``n -> n + 1`` in key id order).

        Returns:
            The new pins and the ids of announced keys that were *not* pinned.
        """
        keys = dict(self.keys)
        first_use = not keys
        refused: list[int] = []
        for key in sorted(announced, key=lambda k: k.key_id):
            known = keys.get(key.key_id)
            if known is not None:
                if known != key.public_key:
                    refused.append(key.key_id)
                continue
            if first_use:
                keys[key.key_id] = key.public_key
                continue
            previous = keys.get(key.key_id - 1)
            if previous is not None and key.endorsement is not None:
                try:
                    nacl.signing.VerifyKey(previous).verify(
                        ENDORSE_CONTEXT + endorsement_body(key.key_id, key.public_key),
                        key.endorsement,
                    )
                except (nacl.exceptions.BadSignatureError, ValueError, WireError):
                    refused.append(key.key_id)
                    continue
                keys[key.key_id] = key.public_key
                continue
            refused.append(key.key_id)
        return RelayKeyPins(keys), tuple(refused)

    def require(self, announced: Iterable[RelayKey]) -> RelayKeyPins:
        """:meth:`update`, raising for the first key that could not be pinned.

        Raises:
            RelayKeyRejected: an announced key is neither pinned nor endorsed by a pinned key.
        """
        pins, refused = self.update(announced)
        if refused:
            raise RelayKeyRejected(refused[0])
        return pins


def verify_certificate(data: bytes, pins: RelayKeyPins, now_ms: int) -> CertificateFields:
    """Check a sender certificate: format, pinned key, signature, expiry (in that order).

    Raises:
        InvalidCertificate: malformed, or the signature does not verify.
        UnpinnedRelayKey: signed by a key id we never pinned.
        ExpiredCertificate: ``expires_ms`` is before ``now_ms``.
    """
    try:
        cert = parse_certificate(data)
    except WireError as exc:
        raise InvalidCertificate(str(exc)) from exc
    key = pins.keys.get(cert.key_id)
    if key is None:
        raise UnpinnedRelayKey(cert.key_id)
    try:
        nacl.signing.VerifyKey(key).verify(CERT_CONTEXT + cert.body, cert.signature)
    except (nacl.exceptions.BadSignatureError, ValueError) as exc:
        raise InvalidCertificate("certificate: bad signature") from exc
    if cert.expires_ms < now_ms:
        raise ExpiredCertificate(cert.user, cert.expires_ms)
    return cert


# -- the sealed envelope ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealedRecipient:
    """A recipient device and the identity key (33 bytes, type byte 0x05) we seal to."""

    user: str
    device: int
    identity_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SealedContent:
    """What a recipient finds inside: the sender's certificate (None for a relay-authenticated
    send that carries none) and a version 1 envelope (``e2ee.envelope``)."""

    certificate: bytes | None = field(repr=False)
    envelope: bytes = field(repr=False)


def is_sealed(data: bytes) -> bool:
    """Whether a relay message body is a sealed (version 2) envelope."""
    return len(data) > 0 and data[0] == SEALED_VERSION


def _x25519_public(identity_key: bytes) -> bytes:
    if len(identity_key) != 33 or identity_key[0] != 0x05:
        raise UsageError("identity key: expected 33 bytes with type byte 0x05")
    return identity_key[1:]


def _name(user: str) -> bytes:
    data = user.encode("ascii", "replace")
    if not 1 <= len(data) <= 255:
        raise UsageError("user: 1 to 255 ASCII bytes")
    return data


def _wrap_key(shared: bytes, ephemeral: bytes, identity_key: bytes, user: bytes, dev: int) -> bytes:
    data = shared + ephemeral + identity_key + bytes([len(user)]) + user + bytes([dev])
    return blake2b(data, digest_size=_KEY, person=_WRAP_PERSON, encoder=RawEncoder)


def seal(
    recipients: Sequence[SealedRecipient],
    content: SealedContent,
    *,
    ephemeral_private: bytes,
    content_key: bytes,
) -> bytes:
    """Encrypt ``content`` once, to every recipient device's identity key.

    Layout (docs/wire-format.md, "Sealed envelope")::

        u8 version = 2 | 32 ephemeral public key | u16 count
        count x (u8 L | L bytes user | u8 device | 48 wrapped content key)
        XChaCha20-Poly1305(content key, nonce 0, ad = every byte before) of
            u16 certificate length C (0 = none) | C bytes certificate | version 1 envelope

    Args:
        ephemeral_private: 32 random bytes, fresh for this message.
        content_key: 32 random bytes, fresh for this message.

    Raises:
        UsageError: no or too many recipients, a bad key or an oversized certificate.
    """
    if not 1 <= len(recipients) <= _MAX_RECIPIENTS:
        raise UsageError(f"a sealed envelope has 1 to {_MAX_RECIPIENTS} recipients")
    if len(ephemeral_private) != _KEY or len(content_key) != _KEY:
        raise UsageError("ephemeral and content keys are 32 bytes")
    cert = content.certificate or b""
    if len(cert) > _MAX_CERT:
        raise UsageError("certificate too large")
    ephemeral = sodium.crypto_scalarmult_base(ephemeral_private)
    parts = [struct.pack(">B", SEALED_VERSION), ephemeral, struct.pack(">H", len(recipients))]
    for r in recipients:
        user = _name(r.user)
        if not 0 <= r.device <= 255:
            raise UsageError("device id out of range")
        try:
            shared = sodium.crypto_scalarmult(ephemeral_private, _x25519_public(r.identity_key))
        except nacl.exceptions.RuntimeError as exc:  # a low-order point: all-zero secret
            raise UsageError("recipient identity key is not usable") from exc
        key = _wrap_key(shared, ephemeral, r.identity_key, user, r.device)
        wrapped = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            content_key, ephemeral, _NONCE, key
        )
        parts.append(bytes([len(user)]) + user + bytes([r.device]) + wrapped)
    header = b"".join(parts)
    inner = struct.pack(">H", len(cert)) + cert + content.envelope
    body = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, _NONCE, content_key)
    return header + body


def open_sealed(
    data: bytes, *, user: str, device: int, identity_private: bytes, identity_key: bytes
) -> SealedContent:
    """Open a sealed envelope addressed (among others) to (``user``, ``device``).

    Args:
        identity_private: our identity private key (32 bytes, Curve25519).
        identity_key: our serialized identity public key (33 bytes).

    Raises:
        UnsupportedEnvelope: not a version 2 envelope (the caller checks :func:`is_sealed`).
        InvalidMessage: malformed, not addressed to us, or fails authentication.
    """
    if not is_sealed(data):
        raise InvalidMessage("sealed envelope: wrong version")
    try:
        ephemeral = data[1 : 1 + _KEY]
        (count,) = struct.unpack_from(">H", data, 1 + _KEY)
        if len(ephemeral) != _KEY or not 1 <= count <= _MAX_RECIPIENTS:
            raise InvalidMessage("sealed envelope: bad header")
        at = 3 + _KEY
        wrapped: bytes | None = None
        me = _name(user)
        for _ in range(count):
            size = data[at]
            name = data[at + 1 : at + 1 + size]
            dev = data[at + 1 + size]
            slot = data[at + 2 + size : at + 2 + size + _WRAPPED]
            if not size or len(slot) != _WRAPPED:
                raise InvalidMessage("sealed envelope: bad recipient entry")
            if name == me and dev == device:
                wrapped = slot
            at += 2 + size + _WRAPPED
    except (IndexError, struct.error) as exc:
        raise InvalidMessage("sealed envelope: truncated") from exc
    if wrapped is None:
        raise InvalidMessage("sealed envelope: not addressed to this device")
    header, body = data[:at], data[at:]
    try:
        shared = sodium.crypto_scalarmult(identity_private, ephemeral)
        key = _wrap_key(shared, ephemeral, identity_key, me, device)
        content_key = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            wrapped, ephemeral, _NONCE, key
        )
        inner = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(body, header, _NONCE, content_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError) as exc:
        raise InvalidMessage("sealed envelope: does not authenticate") from exc
    if len(inner) < 2:
        raise InvalidMessage("sealed envelope: inner content truncated")
    (size,) = struct.unpack_from(">H", inner, 0)
    if size > _MAX_CERT or len(inner) < 2 + size + 1:
        raise InvalidMessage("sealed envelope: bad certificate length")
    cert = bytes(inner[2 : 2 + size]) if size else None
    return SealedContent(cert, bytes(inner[2 + size :]))
