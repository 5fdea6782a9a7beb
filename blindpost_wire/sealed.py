"""Sealed sender: the byte layouts the relay and the SDK share (standard library only).

Invariants:

* A sender certificate is ``body || signature``: the relay signs :func:`certificate_body`'s
  bytes prefixed with :data:`CERT_CONTEXT` with its Ed25519 key ``key_id``; the SDK verifies
  with the same prefix. Nothing else is signed with these keys except relay-key endorsements,
  whose prefix (:data:`ENDORSE_CONTEXT`) differs, so one can never pass for the other.
* A delivery token is never stored by the relay: it keeps :func:`token_verifier` of it (a
  SHA-256 under its own prefix) and compares in constant time.
* Parsing accepts exactly what the builders produce; any other input is :class:`WireError`.

The cryptography (signing, verifying, deriving tokens, the sealed envelope) is done by each side
with PyNaCl; see docs/wire-format.md, "Sealed sender".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Final

from blindpost_wire.frames import WireError
from blindpost_wire.names import MAX_DEVICE_ID, MIN_DEVICE_ID

__all__ = [
    "CERT_CONTEXT",
    "CERT_VERSION",
    "DELIVERY_TOKEN_HEADER",
    "ENDORSE_CONTEXT",
    "IDENTITY_KEY_LENGTH",
    "SIGNATURE_LENGTH",
    "TOKEN_LENGTH",
    "CertificateFields",
    "certificate_body",
    "endorsement_body",
    "parse_certificate",
    "parse_token_header",
    "token_header",
    "token_verifier",
    "verifier_matches",
]

CERT_VERSION: Final = 1
#: Domain separation for the relay's two kinds of signature.
CERT_CONTEXT: Final = b"blindpost sender certificate v1\x00"
ENDORSE_CONTEXT: Final = b"blindpost relay key endorsement v1\x00"
_VERIFIER_CONTEXT: Final = b"blindpost delivery token verifier v1\x00"
IDENTITY_KEY_LENGTH: Final = 33
SIGNATURE_LENGTH: Final = 64
PUBLIC_KEY_LENGTH: Final = 32
TOKEN_LENGTH: Final = 16
#: Header of a sealed ``PUT /v1/messages/sealed``: ``user:<b64 token>`` pairs, comma-separated.
DELIVERY_TOKEN_HEADER: Final = "X-Blindpost-Delivery-Tokens"  # noqa: S105 (a header name)
_HEAD: Final = struct.Struct(">BIQB")  # version, key id, expires_ms, device


@dataclass(frozen=True, slots=True)
class CertificateFields:
    """What a sender certificate says (signature checked or not: see the caller)."""

    user: str
    device: int
    identity_key: bytes = field(repr=False)
    expires_ms: int
    key_id: int
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def certificate_body(
    user: str, device: int, identity_key: bytes, expires_ms: int, key_id: int
) -> bytes:
    """The signed part of a sender certificate.

    Layout: ``u8 version | u32 key id | u64 expires_ms | u8 device | 33 identity key |
    u8 L | L bytes user (ASCII)``.

    Raises:
        WireError: a field out of range.
    """
    name = user.encode("ascii", "replace")
    if not 1 <= len(name) <= 255 or not MIN_DEVICE_ID <= device <= MAX_DEVICE_ID:
        raise WireError("certificate: bad user or device")
    if len(identity_key) != IDENTITY_KEY_LENGTH or not 0 <= key_id < 2**32:
        raise WireError("certificate: bad identity key or key id")
    if not 0 <= expires_ms < 2**64:
        raise WireError("certificate: bad expiry")
    return (
        _HEAD.pack(CERT_VERSION, key_id, expires_ms, device)
        + identity_key
        + bytes([len(name)])
        + name
    )


def parse_certificate(data: bytes) -> CertificateFields:
    """Split a certificate into its fields (the signature is *not* checked here).

    Raises:
        WireError: truncated, trailing bytes, another version or a bad field.
    """
    if len(data) < _HEAD.size + IDENTITY_KEY_LENGTH + 2 + SIGNATURE_LENGTH:
        raise WireError("certificate: too short")
    version, key_id, expires_ms, device = _HEAD.unpack_from(data, 0)
    if version != CERT_VERSION:
        raise WireError(f"certificate: unknown version {version}")
    at = _HEAD.size
    identity_key = data[at : at + IDENTITY_KEY_LENGTH]
    at += IDENTITY_KEY_LENGTH
    size = data[at]
    at += 1
    if len(data) != at + size + SIGNATURE_LENGTH or not size:
        raise WireError("certificate: bad length")
    try:
        user = data[at : at + size].decode("ascii")
    except UnicodeDecodeError as exc:
        raise WireError("certificate: user is not ASCII") from exc
    if not MIN_DEVICE_ID <= device <= MAX_DEVICE_ID:
        raise WireError("certificate: bad device id")
    body = data[: at + size]
    return CertificateFields(
        user, device, identity_key, expires_ms, key_id, body, data[at + size :]
    )


def endorsement_body(key_id: int, public_key: bytes) -> bytes:
    """What the previous relay key signs to endorse its successor: ``u32 key id | 32 key``.

    Raises:
        WireError: a field out of range.
    """
    if len(public_key) != PUBLIC_KEY_LENGTH or not 0 <= key_id < 2**32:
        raise WireError("endorsement: bad key id or key")
    return struct.pack(">I", key_id) + public_key


def token_verifier(token: bytes) -> bytes:
    """The 32 bytes the relay keeps for a delivery token (never the token).

    Raises:
        WireError: not a :data:`TOKEN_LENGTH`-byte token.
    """
    if len(token) != TOKEN_LENGTH:
        raise WireError("delivery token: wrong length")
    return hashlib.sha256(_VERIFIER_CONTEXT + token).digest()


def verifier_matches(verifier: bytes | None, token: bytes) -> bool:
    """Whether ``token`` hashes to ``verifier`` (constant time; None never matches)."""
    if verifier is None or len(token) != TOKEN_LENGTH:
        return False
    return hmac.compare_digest(verifier, token_verifier(token))


def token_header(tokens: dict[str, bytes]) -> str:
    """The :data:`DELIVERY_TOKEN_HEADER` value for per-user tokens (sorted by user)."""
    return ",".join(
        f"{user}:{base64.b64encode(token).decode('ascii')}"
        for user, token in sorted(tokens.items())
    )


def parse_token_header(value: str, max_users: int) -> dict[str, bytes]:
    """Parse :data:`DELIVERY_TOKEN_HEADER`.

    Raises:
        WireError: malformed, a user twice, a token of the wrong length, or more than
            ``max_users`` entries.
    """
    tokens: dict[str, bytes] = {}
    parts = [p for p in value.split(",") if p.strip()]
    if not parts or len(parts) > max_users:
        raise WireError("delivery tokens: none, or too many")
    for part in parts:
        user, sep, b64 = part.strip().partition(":")
        if not sep or not user or user in tokens:
            raise WireError("delivery tokens: malformed")
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WireError("delivery tokens: bad base64") from exc
        if len(token) != TOKEN_LENGTH:
            raise WireError("delivery tokens: wrong length")
        tokens[user] = token
    return tokens
