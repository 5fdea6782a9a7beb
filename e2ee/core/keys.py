"""Account keys and prekey bundles: generation, export, import, verification.

Invariants:

* A :class:`PreKeyBundle` that leaves :meth:`PreKeyBundle.from_json` has
  canonical keys and a signed-prekey signature that verifies under its identity
  key; there is no way to build a session from an unverified bundle.
* Private keys never appear in a repr or an error message.
* One-time prekey ids run from 1 to ``0xFFFFFE`` and wrap; ``0xFFFFFF`` is
  python-axolotl's "last resort" id and is never used.

The JSON shapes are the relay's wire format (``docs/relay-api.md``): standard
base64 with padding for every byte field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from axolotl.ecc.curve import Curve
from axolotl.identitykey import IdentityKey
from axolotl.identitykeypair import IdentityKeyPair
from axolotl.state.prekeybundle import PreKeyBundle as _AxolotlBundle
from axolotl.state.prekeyrecord import PreKeyRecord
from axolotl.state.signedprekeyrecord import SignedPreKeyRecord
from axolotl.util.keyhelper import KeyHelper

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.core.wire import check_public_key
from e2ee.errors import InvalidBundle, InvalidKey, UsageError

__all__ = [
    "MAX_DEVICE_ID",
    "MAX_PREKEY_ID",
    "PREKEY_BATCH",
    "KeyUpload",
    "OneTimePreKey",
    "PreKeyBundle",
    "SignedPreKey",
    "b64d",
    "b64e",
    "generate_identity",
    "generate_prekeys",
    "generate_registration_id",
    "generate_signed_prekey",
]

MAX_PREKEY_ID = 0xFFFFFE
# MAX_DEVICE_ID (1..127, as on the relay: binary frames carry it in one byte) is
# blindpost_wire's, re-exported here.
PREKEY_BATCH = 100
_SIGNATURE_LENGTH = 64
_MAX_ID = 0xFFFFFF


def b64e(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    """Decode strict standard base64, raising :class:`InvalidBundle` on bad input."""
    if not isinstance(text, str):
        raise InvalidBundle(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise InvalidBundle(f"{what}: invalid base64") from exc


def _int(value: Any, what: str, low: int = 0, high: int = _MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidBundle(f"{what}: expected an integer in [{low}, {high}]")
    return value


def _key(value: Any, what: str) -> bytes:
    data = b64d(value, what)
    try:
        check_public_key(data, what)
    except InvalidKey as exc:
        raise InvalidBundle(str(exc)) from exc
    return data


@dataclass(frozen=True, slots=True)
class SignedPreKey:
    """The public half of a signed prekey, as published."""

    prekey_id: int
    public_key: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.prekey_id,
            "public_key": b64e(self.public_key),
            "signature": b64e(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedPreKey:
        if not isinstance(data, Mapping):
            raise InvalidBundle("signed_prekey: expected an object")
        signature = b64d(data.get("signature"), "signed_prekey.signature")
        if len(signature) != _SIGNATURE_LENGTH:
            raise InvalidBundle("signed_prekey.signature: must be 64 bytes")
        return cls(
            _int(data.get("id"), "signed_prekey.id"),
            _key(data.get("public_key"), "signed_prekey.public_key"),
            signature,
        )


@dataclass(frozen=True, slots=True)
class OneTimePreKey:
    """The public half of a one-time prekey, as published."""

    prekey_id: int
    public_key: bytes

    def to_json(self) -> dict[str, Any]:
        return {"id": self.prekey_id, "public_key": b64e(self.public_key)}

    @classmethod
    def from_json(cls, data: Any) -> OneTimePreKey:
        if not isinstance(data, Mapping):
            raise InvalidBundle("one_time_prekey: expected an object")
        return cls(
            _int(data.get("id"), "one_time_prekey.id", 1, MAX_PREKEY_ID),
            _key(data.get("public_key"), "one_time_prekey.public_key"),
        )


@dataclass(frozen=True, slots=True)
class PreKeyBundle:
    """What a device publishes so others can start a session with it offline.

    ``one_time_prekey`` is None when the relay's pool for the device is empty;
    such a bundle still works (python-axolotl's defect 3 is handled by us).
    """

    device_id: int
    registration_id: int
    identity_key: bytes
    signed_prekey: SignedPreKey
    one_time_prekey: OneTimePreKey | None = None

    def verify(self) -> None:
        """Check every key is canonical and the signed-prekey signature verifies.

        Raises:
            InvalidBundle: on any failure.
        """
        for what, key in (
            ("identity_key", self.identity_key),
            ("signed_prekey", self.signed_prekey.public_key),
            *(
                [("one_time_prekey", self.one_time_prekey.public_key)]
                if self.one_time_prekey
                else []
            ),
        ):
            try:
                check_public_key(key, what)
            except InvalidKey as exc:
                raise InvalidBundle(str(exc)) from exc
        identity = Curve.decodePoint(bytearray(self.identity_key), 0)
        try:
            ok = Curve.verifySignature(
                identity, self.signed_prekey.public_key, self.signed_prekey.signature
            )
        except (ValueError, TypeError) as exc:
            raise InvalidBundle("signed prekey signature is malformed") from exc
        if not ok:
            raise InvalidBundle("signed prekey signature does not verify")

    def to_json(self) -> dict[str, Any]:
        """The relay's per-device bundle object."""
        return {
            "device_id": self.device_id,
            "registration_id": self.registration_id,
            "identity_key": b64e(self.identity_key),
            "signed_prekey": self.signed_prekey.to_json(),
            "one_time_prekey": self.one_time_prekey.to_json() if self.one_time_prekey else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> PreKeyBundle:
        """Parse and verify a per-device bundle from the relay.

        Raises:
            InvalidBundle: malformed, or the signature does not verify.
        """
        if not isinstance(data, Mapping):
            raise InvalidBundle("bundle: expected an object")
        otpk = data.get("one_time_prekey")
        bundle = cls(
            device_id=_int(data.get("device_id"), "device_id", 1, MAX_DEVICE_ID),
            registration_id=_int(data.get("registration_id"), "registration_id", 0, 2**31 - 1),
            identity_key=_key(data.get("identity_key"), "identity_key"),
            signed_prekey=SignedPreKey.from_json(data.get("signed_prekey")),
            one_time_prekey=OneTimePreKey.from_json(otpk) if otpk is not None else None,
        )
        bundle.verify()
        return bundle

    def to_axolotl(self) -> _AxolotlBundle:
        """python-axolotl's bundle object (internal to the core)."""
        otpk = self.one_time_prekey
        return _AxolotlBundle(
            self.registration_id,
            self.device_id,
            otpk.prekey_id if otpk else None,
            Curve.decodePoint(bytearray(otpk.public_key), 0) if otpk else None,
            self.signed_prekey.prekey_id,
            Curve.decodePoint(bytearray(self.signed_prekey.public_key), 0),
            self.signed_prekey.signature,
            IdentityKey(Curve.decodePoint(bytearray(self.identity_key), 0)),
        )


@dataclass(frozen=True, slots=True)
class KeyUpload:
    """What the device uploads to the relay (``PUT /v1/keys``)."""

    identity_key: bytes
    registration_id: int
    signed_prekey: SignedPreKey | None
    one_time_prekeys: Sequence[OneTimePreKey] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "identity_key": b64e(self.identity_key),
            "registration_id": self.registration_id,
            "one_time_prekeys": [k.to_json() for k in self.one_time_prekeys],
        }
        if self.signed_prekey is not None:
            body["signed_prekey"] = self.signed_prekey.to_json()
        return body


def generate_identity() -> tuple[IdentityKeyPair, int]:
    """A new identity key pair and a registration id (python-axolotl, os.urandom)."""
    return KeyHelper.generateIdentityKeyPair(), KeyHelper.generateRegistrationId()


def generate_registration_id() -> int:
    """A new registration id for an existing identity (a restored backup's new device)."""
    registration_id: int = KeyHelper.generateRegistrationId()
    return registration_id


def generate_prekeys(first_id: int, count: int) -> list[PreKeyRecord]:
    """``count`` one-time prekeys with ids from ``first_id``, wrapping below 0xFFFFFF.

    Raises:
        UsageError: ``first_id`` out of range or ``count`` not in 1..1000.
    """
    if not 1 <= first_id <= MAX_PREKEY_ID or not 1 <= count <= 1000:
        raise UsageError("prekey id or count out of range")
    return [
        PreKeyRecord((first_id - 1 + i) % MAX_PREKEY_ID + 1, Curve.generateKeyPair())
        for i in range(count)
    ]


def generate_signed_prekey(
    identity: IdentityKeyPair, prekey_id: int, now_ms: int
) -> SignedPreKeyRecord:
    """A signed prekey, signed by ``identity``, stamped with ``now_ms``."""
    key_pair = Curve.generateKeyPair()
    signature = Curve.calculateSignature(
        identity.getPrivateKey(), key_pair.getPublicKey().serialize()
    )
    return SignedPreKeyRecord(prekey_id, now_ms, key_pair, signature)
