"""Faster equivalents of a few python-axolotl hot spots, installed on import.

Invariant: each replacement returns exactly what the original returns for every
input the original accepts (differential tests in ``tests/core/test_fastpath.py``
compare them on random inputs), except that :func:`_decode_point` refuses keys
shorter than 32 bytes, which the original silently accepted. No primitive is
implemented here: HKDF comes from ``cryptography`` (already python-axolotl's
dependency), the rest is bookkeeping.

Why: the 1:1 ratchet spent most of its time in per-call imports inside
``Curve.decodePoint`` (about 20 calls per message), byte juggling in
``DjbECPublicKey.serialize`` and a Python-level HKDF; and python-axolotl-curve25519's
reference X25519 is about four times slower than libsodium's (PyNaCl), which computes
the same function (RFC 7748, clamped scalar) for key generation and agreement. The
XEdDSA signatures stay python-axolotl-curve25519's.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Callable
from typing import Any

from axolotl.ecc.curve import Curve
from axolotl.ecc.djbec import DjbECPublicKey
from axolotl.identitykey import IdentityKey
from axolotl.invalidkeyexception import InvalidKeyException
from axolotl.kdf.hkdf import HKDF as HKDF_BASE
from axolotl.kdf.hkdfv3 import HKDFv3
from axolotl.kdf.messagekeys import MessageKeys
from axolotl.protocol.whispermessage import WhisperMessage
from axolotl.ratchet.chainkey import ChainKey
from axolotl.sessioncipher import AESCipher
from axolotl.state.sessionrecord import SessionRecord
from axolotl.state.sessionstate import SessionState
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

__all__ = ["ORIGINALS", "apply"]

ORIGINALS: dict[str, Callable[..., Any]] = {}

_DJB_TYPE = Curve.DJB_TYPE
_TYPE_BYTE = bytes([_DJB_TYPE])
_ZERO_SALT = bytes(32)
_SHA256 = hashes.SHA256()


def _decode_point(_bytes: Any, offset: int = 0) -> DjbECPublicKey:
    if len(_bytes) < offset + 33 or _bytes[0] != _DJB_TYPE or _bytes[offset] != _DJB_TYPE:
        raise InvalidKeyException("Bad key encoding")
    return DjbECPublicKey(bytes(_bytes[offset + 1 : offset + 33]))


def _serialize(self: DjbECPublicKey) -> bytes:
    return _TYPE_BYTE + bytes(self.publicKey)


def _derive_secrets(
    self: HKDFv3, inputKeyMaterial: Any, info: Any, outputLength: int, salt: Any = None
) -> bytes:
    kdf = HKDF(
        algorithm=_SHA256,
        length=outputLength,
        salt=bytes(salt) if salt else _ZERO_SALT,
        info=bytes(info) if info is not None else None,
    )
    return kdf.derive(bytes(inputKeyMaterial))


_HKDF_V3 = HKDFv3()


def _create_for(messageVersion: int) -> Any:
    # python-axolotl imports two modules and builds a new (stateless) object on
    # every call; version 3 is the only one we accept, so reuse one instance.
    if messageVersion == 3:
        return _HKDF_V3
    return _original_static("HKDF.createFor")(messageVersion)


def _is_clamped(private: bytes) -> bool:
    # Every key python-axolotl generates is clamped (RFC 7748). libsodium clamps
    # any scalar it is given, python-axolotl-curve25519 does not: for an unclamped
    # scalar (only seen in imported test vectors) the two differ, so those keep
    # the original code.
    return len(private) == 32 and private[0] & 7 == 0 and private[31] & 0xC0 == 0x40


def _generate_public_key(privateKey: bytes) -> bytes:
    private = bytes(privateKey)
    if not _is_clamped(private):
        return bytes(_original_static("Curve.generatePublicKey")(privateKey))
    return bytes(crypto_scalarmult_base(private))


def _calculate_agreement(publicKey: Any, privateKey: Any) -> bytes:
    private = bytes(privateKey.getPrivateKey())
    if (
        publicKey.getType() != _DJB_TYPE
        or privateKey.getType() != _DJB_TYPE
        or not _is_clamped(private)
    ):
        return bytes(_original_static("Curve.calculateAgreement")(publicKey, privateKey))
    # libsodium refuses low-order points (an all-zero shared secret) with a
    # CryptoError, which the engine's boundary reports as an invalid key.
    return bytes(crypto_scalarmult(private, bytes(publicKey.getPublicKey())))


def _original_static(name: str) -> Callable[..., Any]:
    original: Any = ORIGINALS[name]
    return original.__func__ if isinstance(original, staticmethod) else original


def _get_receiver_chain(self: SessionState, ECPublickKey_senderEphemeral: Any) -> Any:
    wanted = ECPublickKey_senderEphemeral.getPublicKey()
    for index, chain in enumerate(self.sessionStructure.receiverChains):
        if chain.senderRatchetKey[1:33] == wanted:
            return (chain, index)
    return None


def _base_material(self: ChainKey, seedBytes: Any) -> bytes:
    # One C call (OpenSSL's one-shot HMAC) instead of python-axolotl's
    # new/update/digest sequence through the pure-Python ``hmac.HMAC`` class.
    return hmac.digest(bytes(self.key), bytes(seedBytes), "sha256")


_MESSAGE_KEY_SEED = bytes(ChainKey.MESSAGE_KEY_SEED)
_MESSAGE_KEYS_INFO = b"WhisperMessageKeys"


def _message_keys(self: ChainKey) -> MessageKeys:
    # python-axolotl's steps (HMAC seed 0x01, HKDF "WhisperMessageKeys" to 80
    # bytes, split 32/32/16) without its intermediate objects.
    material = self.kdf.deriveSecrets(
        hmac.digest(bytes(self.key), _MESSAGE_KEY_SEED, "sha256"), _MESSAGE_KEYS_INFO, 80
    )
    return MessageKeys(material[:32], material[32:64], material[64:80], self.index)


def _get_mac(
    self: WhisperMessage,
    messageVersion: int,
    senderIdentityKey: Any,
    receiverIdentityKey: Any,
    macKey: Any,
    serialized: Any,
) -> bytes:
    if messageVersion >= 3:
        data = (
            bytes(senderIdentityKey.getPublicKey().serialize())
            + bytes(receiverIdentityKey.getPublicKey().serialize())
            + bytes(serialized)
        )
    else:
        data = bytes(serialized)
    return hmac.digest(bytes(macKey), data, "sha256")[: WhisperMessage.MAC_LENGTH]


def _aes_cipher_init(self: AESCipher, key: Any, iv: Any) -> None:
    # python-axolotl asks for cryptography's default_backend() on every message;
    # the argument is ignored by current cryptography releases.
    self.key = key
    self.iv = iv
    self.cipher = Cipher(algorithms.AES(key), modes.CBC(iv))


def _aes_encrypt(self: AESCipher, raw: Any) -> bytes:
    # PKCS#7 padding to the 16-byte block, as cryptography's PKCS7(128) padder
    # writes it, without building a padder object per message. (Decryption keeps
    # cryptography's unpadder, which checks the padding in constant time.)
    data = bytes(raw)
    pad = 16 - len(data) % 16
    encryptor = self.cipher.encryptor()
    return bytes(encryptor.update(data + bytes((pad,)) * pad) + encryptor.finalize())


#: Identity keys by their serialization: python-axolotl decodes the session's two
#: identity keys from bytes for every message (for the MAC). IdentityKey objects
#: are never modified after construction, so one object per key can be shared.
_IDENTITY_KEYS: dict[bytes, IdentityKey] = {}
_IDENTITY_KEYS_MAX = 1024


def _identity_key(serialized: bytes) -> IdentityKey:
    key = _IDENTITY_KEYS.get(serialized)
    if key is None:
        key = IdentityKey(serialized, 0)  # raises as python-axolotl would
        if len(_IDENTITY_KEYS) >= _IDENTITY_KEYS_MAX:
            _IDENTITY_KEYS.clear()
        _IDENTITY_KEYS[bytes(serialized)] = key
    return key


def _remote_identity_key(self: SessionState) -> IdentityKey:
    return _identity_key(self.sessionStructure.remoteIdentityPublic)


def _local_identity_key(self: SessionState) -> IdentityKey:
    return _identity_key(self.sessionStructure.localIdentityPublic)


def _varint(tag: int, value: int) -> bytes:
    # A protobuf field key (one byte for the field numbers used here) and a varint.
    out = bytearray((tag,))
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return _varint(tag, len(payload)) + payload


_UINT32_LIMIT = 1 << 32
_CURRENT_VERSION = WhisperMessage.CURRENT_VERSION


def _whisper_message_init(
    self: WhisperMessage,
    messageVersion: Any = None,
    macKey: Any = None,
    ECPublicKey_senderRatchetKey: Any = None,
    counter: Any = None,
    previousCounter: Any = None,
    ciphertext: Any = None,
    senderIdentityKey: Any = None,
    receiverIdentityKey: Any = None,
    serialized: Any = None,
) -> None:
    # python-axolotl builds a protobuf message only to serialize it. WhisperMessage
    # is ratchetKey (1, bytes), counter (2, uint32), previousCounter (3, uint32),
    # ciphertext (4, bytes), all set, written in field order: the same bytes
    # framed by hand. Parsing, and any argument outside what the fast path
    # covers, keeps the original.
    if (
        serialized
        or type(messageVersion) is not int
        or type(counter) is not int
        or type(previousCounter) is not int
        or not 0 <= counter < _UINT32_LIMIT
        or not 0 <= previousCounter < _UINT32_LIMIT
        or type(ciphertext) is not bytes
    ):
        ORIGINALS["WhisperMessage.__init__"](
            self,
            messageVersion,
            macKey,
            ECPublicKey_senderRatchetKey,
            counter,
            previousCounter,
            ciphertext,
            senderIdentityKey,
            receiverIdentityKey,
            serialized,
        )
        return
    body = (
        bytes((((messageVersion << 4) | _CURRENT_VERSION) & 0xFF,))
        + _length_delimited(0x0A, bytes(ECPublicKey_senderRatchetKey.serialize()))
        + _varint(0x10, counter)
        + _varint(0x18, previousCounter)
        + _length_delimited(0x22, ciphertext)
    )
    mac = self.getMac(messageVersion, senderIdentityKey, receiverIdentityKey, macKey, body)
    self.serialized = body + bytes(mac)
    self.senderRatchetKey = ECPublicKey_senderRatchetKey
    self.counter = counter
    self.previousCounter = previousCounter
    self.ciphertext = ciphertext
    self.messageVersion = messageVersion


def _serialize_record(self: SessionRecord) -> bytes:
    # python-axolotl copies every state into a new RecordStructure message (a deep
    # MergeFrom) only to serialize it. A RecordStructure is field 1 (the current
    # session) then field 2 repeated (previous sessions), each length-delimited:
    # the same bytes from the states' own serializations, without the copy.
    parts = [_length_delimited(0x0A, self.sessionState.getStructure().SerializeToString())]
    for state in self.previousStates:
        parts.append(_length_delimited(0x12, state.getStructure().SerializeToString()))
    return b"".join(parts)


_PATCHES: tuple[tuple[str, Any, str, Any], ...] = (
    ("Curve.generatePublicKey", Curve, "generatePublicKey", staticmethod(_generate_public_key)),
    ("Curve.calculateAgreement", Curve, "calculateAgreement", staticmethod(_calculate_agreement)),
    ("Curve.decodePoint", Curve, "decodePoint", staticmethod(_decode_point)),
    ("DjbECPublicKey.serialize", DjbECPublicKey, "serialize", _serialize),
    ("HKDFv3.deriveSecrets", HKDFv3, "deriveSecrets", _derive_secrets),
    ("HKDF.createFor", HKDF_BASE, "createFor", staticmethod(_create_for)),
    ("SessionState.getReceiverChain", SessionState, "getReceiverChain", _get_receiver_chain),
    ("ChainKey.getBaseMaterial", ChainKey, "getBaseMaterial", _base_material),
    ("ChainKey.getMessageKeys", ChainKey, "getMessageKeys", _message_keys),
    ("WhisperMessage.getMac", WhisperMessage, "getMac", _get_mac),
    ("AESCipher.__init__", AESCipher, "__init__", _aes_cipher_init),
    ("SessionRecord.serialize", SessionRecord, "serialize", _serialize_record),
    ("AESCipher.encrypt", AESCipher, "encrypt", _aes_encrypt),
    (
        "SessionState.getRemoteIdentityKey",
        SessionState,
        "getRemoteIdentityKey",
        _remote_identity_key,
    ),
    ("SessionState.getLocalIdentityKey", SessionState, "getLocalIdentityKey", _local_identity_key),
    ("WhisperMessage.__init__", WhisperMessage, "__init__", _whisper_message_init),
)


def apply() -> None:
    """Install the replacements; idempotent."""
    for name, owner, attr, replacement in _PATCHES:
        if name not in ORIGINALS:
            ORIGINALS[name] = inspect.getattr_static(owner, attr)
            setattr(owner, attr, replacement)
