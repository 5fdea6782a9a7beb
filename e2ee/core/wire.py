"""Strict parsers for python-axolotl's wire messages.

Invariant: a message reaches python-axolotl only after it passed these checks,
and every failure here is an :class:`e2ee.errors.InvalidMessage` (or subclass).
python-axolotl's own parsers are lax: they accept keys shorter or longer than 33
bytes, read a missing one-time prekey id as 0, and accept public keys that are
not canonically encoded (the high bit set, or a field element >= 2^255-19). The
last one is a real attack: X25519 ignores the high bit, so a re-encoded base key
gives the same shared secret under different bytes and slips past python-
axolotl's "already processed" check (see ``docs/hardening.md``, defect 4).

Each ``parse_*`` returns python-axolotl's own message object built from the same
bytes, so the protocol engine runs unchanged on validated input.
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

from axolotl.ecc.djbec import DjbECPublicKey
from axolotl.protocol import whisperprotos_pb2 as _pb
from axolotl.protocol.prekeywhispermessage import PreKeyWhisperMessage
from axolotl.protocol.senderkeydistributionmessage import SenderKeyDistributionMessage
from axolotl.protocol.senderkeymessage import SenderKeyMessage
from axolotl.protocol.whispermessage import WhisperMessage
from google.protobuf.message import DecodeError

from e2ee.errors import InvalidKey, InvalidMessage

__all__ = [
    "CURRENT_VERSION_BYTE",
    "KEY_LENGTH",
    "check_public_key",
    "key_digest",
    "parse_distribution_message",
    "parse_prekey_message",
    "parse_sender_key_message",
    "parse_whisper_message",
]

#: Version byte of every v3 message: high nibble message version, low nibble current.
CURRENT_VERSION_BYTE = 0x33
#: Serialized Curve25519 public key: the type byte 0x05 then 32 bytes.
KEY_LENGTH = 33
_DJB_TYPE = 0x05
_FIELD_PRIME = 2**255 - 19
_MAC_LENGTH = 8
_SIGNATURE_LENGTH = 64
_AES_BLOCK = 16
_CHAIN_KEY_LENGTH = 32
#: Bodies larger than this are refused before any parsing (the relay limits too).
MAX_MESSAGE_BYTES = 1 << 20


def check_public_key(data: bytes, what: str) -> None:
    """Raise :class:`InvalidKey` unless ``data`` is a canonical serialized key.

    Args:
        data: the serialized key (type byte + 32 bytes little-endian u-coordinate).
        what: a short name for the error message ("base key", ...).

    Raises:
        InvalidKey: wrong length, unknown type, or a non-canonical coordinate.
    """
    if len(data) != KEY_LENGTH or data[0] != _DJB_TYPE:
        raise InvalidKey(f"{what}: not a {KEY_LENGTH}-byte Curve25519 key")
    if int.from_bytes(data[1:], "little") >= _FIELD_PRIME:
        raise InvalidKey(f"{what}: not canonically encoded")


def key_digest(data: bytes) -> str:
    """A short stable digest of a public key, for replay bookkeeping."""
    return hashlib.sha256(data).hexdigest()[:32]


def _parse_proto(message: Any, data: bytes, what: str) -> None:
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise InvalidMessage(f"{what}: malformed protobuf") from exc


def _check_size(body: bytes, minimum: int, what: str) -> None:
    if not isinstance(body, bytes):
        raise InvalidMessage(f"{what}: expected bytes")
    if len(body) < minimum or len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"{what}: bad length {len(body)}")
    if body[0] != CURRENT_VERSION_BYTE:
        raise InvalidMessage(f"{what}: unsupported version byte {body[0]:#04x}")


def _check_ciphertext(data: bytes, what: str) -> None:
    if not data or len(data) % _AES_BLOCK:
        raise InvalidMessage(f"{what}: ciphertext is not whole AES blocks")


def parse_whisper_message(body: bytes) -> WhisperMessage:
    """Validate and parse a normal (type 2) ratchet message.

    Raises:
        InvalidMessage: malformed, wrong version, or a non-canonical ratchet key.
    """
    _check_size(body, 1 + _MAC_LENGTH + 1, "message")
    proto = _pb.WhisperMessage()
    _parse_proto(proto, body[1:-_MAC_LENGTH], "message")
    for name in ("ratchetKey", "counter", "ciphertext"):
        if not proto.HasField(name):
            raise InvalidMessage(f"message: missing {name}")
    check_public_key(proto.ratchetKey, "ratchet key")
    _check_ciphertext(proto.ciphertext, "message")
    return _whisper_message(body, proto)


def _whisper_message(body: bytes, proto: Any) -> WhisperMessage:
    """python-axolotl's ``WhisperMessage(serialized=body)``, from our own parse.

    Its constructor would parse the same bytes a second time; for input that
    passed the checks above it sets exactly these attributes (a differential
    test in ``tests/core/test_fastpath.py`` compares them).
    """
    message: Any = WhisperMessage.__new__(WhisperMessage)
    message.serialized = body
    message.senderRatchetKey = DjbECPublicKey(proto.ratchetKey[1:])
    message.messageVersion = CURRENT_VERSION_BYTE >> 4
    message.counter = proto.counter
    message.previousCounter = proto.previousCounter
    message.ciphertext = proto.ciphertext
    return cast(WhisperMessage, message)


def parse_prekey_message(body: bytes) -> PreKeyWhisperMessage:
    """Validate and parse a session-setup (type 3) message.

    A missing one-time prekey id stays ``None`` (python-axolotl reads it as 0 and
    then fails to find prekey 0: defect 3).

    Raises:
        InvalidMessage: malformed, wrong version, or any key not canonical.
    """
    _check_size(body, 2, "prekey message")
    proto = _pb.PreKeyWhisperMessage()
    _parse_proto(proto, body[1:], "prekey message")
    for name in ("registrationId", "signedPreKeyId", "baseKey", "identityKey", "message"):
        if not proto.HasField(name):
            raise InvalidMessage(f"prekey message: missing {name}")
    check_public_key(proto.baseKey, "base key")
    check_public_key(proto.identityKey, "identity key")
    parse_whisper_message(proto.message)
    try:
        message = PreKeyWhisperMessage(serialized=body)
    except Exception as exc:
        raise InvalidMessage("prekey message: rejected by parser") from exc
    if not proto.HasField("preKeyId"):
        message.preKeyId = None
    return message


def parse_sender_key_message(body: bytes) -> SenderKeyMessage:
    """Validate and parse a group (Sender Key) message.

    Raises:
        InvalidMessage: malformed or wrong version.
    """
    _check_size(body, 1 + _SIGNATURE_LENGTH + 1, "sender key message")
    proto = _pb.SenderKeyMessage()
    _parse_proto(proto, body[1:-_SIGNATURE_LENGTH], "sender key message")
    for name in ("id", "iteration", "ciphertext"):
        if not proto.HasField(name):
            raise InvalidMessage(f"sender key message: missing {name}")
    _check_ciphertext(proto.ciphertext, "sender key message")
    try:
        return SenderKeyMessage(serialized=body)
    except Exception as exc:
        raise InvalidMessage("sender key message: rejected by parser") from exc


def parse_distribution_message(body: bytes) -> SenderKeyDistributionMessage:
    """Validate and parse a Sender Key distribution message.

    Raises:
        InvalidMessage: malformed, wrong version, or a bad chain or signing key.
    """
    _check_size(body, 2, "distribution message")
    proto = _pb.SenderKeyDistributionMessage()
    _parse_proto(proto, body[1:], "distribution message")
    for name in ("id", "iteration", "chainKey", "signingKey"):
        if not proto.HasField(name):
            raise InvalidMessage(f"distribution message: missing {name}")
    if len(proto.chainKey) != _CHAIN_KEY_LENGTH:
        raise InvalidMessage("distribution message: bad chain key length")
    check_public_key(proto.signingKey, "signing key")
    try:
        return SenderKeyDistributionMessage(serialized=body)
    except Exception as exc:
        raise InvalidMessage("distribution message: rejected by parser") from exc
