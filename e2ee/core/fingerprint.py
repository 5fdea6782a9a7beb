"""Safety numbers: Signal's numeric fingerprint and its scannable (QR) form.

Invariants:

* Everything here is computed from public data only (identity public keys and
  stable identifiers); no private key is ever an input, so nothing here needs
  hiding from a repr or a log.
* The output is byte-for-byte libsignal's (``NumericFingerprintGenerator``,
  ``rust/protocol/src/fingerprint.rs``): the 60-digit number and the
  ``CombinedFingerprints`` protobuf reproduce its published test vectors
  (``tests/core/test_fingerprint.py``), so a number can be compared with any
  client that follows the same scheme.
* Both parties get the same 60 digits: each computes one 30-digit half per
  party and the smaller half always comes first.
* A scanned payload is compared in constant time, and every way it can be bad
  surfaces as an :mod:`e2ee.errors` type: :class:`~e2ee.errors.UsageError` for
  the caller's arguments, :class:`~e2ee.errors.InvalidMessage` for a malformed
  payload, :class:`~e2ee.errors.FingerprintVersionMismatch` for another version.
  No protobuf exception leaks out.

The protobuf classes are built at import time from a descriptor we construct
here, in a private descriptor pool: nothing is registered in protobuf's default
pool, so no name can clash with python-axolotl's or anyone else's messages.
See ``docs/safety-numbers.md`` for the scheme and the known-answer vectors.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from e2ee.core.wire import KEY_LENGTH, check_public_key
from e2ee.errors import FingerprintVersionMismatch, InvalidKey, InvalidMessage, UsageError

__all__ = [
    "DEFAULT_ITERATIONS",
    "FINGERPRINT_LENGTH",
    "FINGERPRINT_VERSION",
    "MAX_SCANNED_BYTES",
    "SCANNABLE_VERSION",
    "SafetyNumber",
    "compute_safety_number",
]

#: Version of the hash input (two bytes, big-endian, at the start of the hash).
FINGERPRINT_VERSION: Final = 0
#: Version written into (and required of) the scannable payload.
SCANNABLE_VERSION: Final = 1
#: libsignal's iteration count; the number is only comparable at the same count.
DEFAULT_ITERATIONS: Final = 5200
#: Bytes of each party's iterated hash kept in the scannable payload.
FINGERPRINT_LENGTH: Final = 32
#: A genuine payload is 74 bytes; anything this long is refused before parsing.
MAX_SCANNED_BYTES: Final = 1024

# libsignal refuses counts outside this range; so do we, to stay interoperable.
_MIN_ITERATIONS: Final = 2
_MAX_ITERATIONS: Final = 1_000_000
_MAX_UINT32: Final = 0xFFFFFFFF
_DIGIT_CHUNKS: Final = 6
_CHUNK_BYTES: Final = 5
_CHUNK_MODULUS: Final = 100_000
_GROUPS: Final = 12
_GROUP_DIGITS: Final = 5


# -- the CombinedFingerprints protobuf -------------------------------------------


def _build_messages() -> tuple[Any, Any]:
    """Build the payload's message classes from a descriptor made here.

    Mirrors libsignal's ``fingerprint.proto`` (proto2, so field presence can be
    checked): ``LogicalFingerprint {bytes content = 1}`` and
    ``CombinedFingerprints {uint32 version = 1; LogicalFingerprint
    local_fingerprint = 2; LogicalFingerprint remote_fingerprint = 3}``.
    """
    fdp = descriptor_pb2.FileDescriptorProto(
        name="blindpost/fingerprint.proto",
        package="blindpost.fingerprint",
        syntax="proto2",
    )
    field = descriptor_pb2.FieldDescriptorProto
    optional = field.LABEL_OPTIONAL

    logical = fdp.message_type.add(name="LogicalFingerprint")
    logical.field.add(name="content", number=1, label=optional, type=field.TYPE_BYTES)

    combined = fdp.message_type.add(name="CombinedFingerprints")
    combined.field.add(name="version", number=1, label=optional, type=field.TYPE_UINT32)
    for name, number in (("local_fingerprint", 2), ("remote_fingerprint", 3)):
        combined.field.add(
            name=name,
            number=number,
            label=optional,
            type=field.TYPE_MESSAGE,
            type_name=".blindpost.fingerprint.LogicalFingerprint",
        )

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("blindpost.fingerprint.LogicalFingerprint")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("blindpost.fingerprint.CombinedFingerprints")
        ),
    )


_LogicalFingerprint, _CombinedFingerprints = _build_messages()


def _serialize(version: int, local: bytes, remote: bytes) -> bytes:
    message = _CombinedFingerprints(
        version=version,
        local_fingerprint=_LogicalFingerprint(content=local),
        remote_fingerprint=_LogicalFingerprint(content=remote),
    )
    data: bytes = message.SerializeToString(deterministic=True)
    return data


def _parse(payload: bytes, version: int) -> tuple[bytes, bytes]:
    """Return (their local, their remote) fingerprints from a scanned payload.

    Raises:
        InvalidMessage: too long, not a protobuf of this shape, a field missing,
            or a fingerprint of the wrong length.
        FingerprintVersionMismatch: a well-formed payload of another version.
    """
    if len(payload) > MAX_SCANNED_BYTES:
        raise InvalidMessage(f"scanned fingerprint: {len(payload)} bytes is too long")
    message = _CombinedFingerprints()
    try:
        message.ParseFromString(payload)
    except (DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage("scanned fingerprint: malformed protobuf") from exc
    # libsignal reads a missing version as 0 and reports a version mismatch; a
    # payload with no version at all is far more likely a scan of something else,
    # so we call it malformed (still a PeerError either way).
    if not message.HasField("version"):
        raise InvalidMessage("scanned fingerprint: no version")
    if message.version != version:
        raise FingerprintVersionMismatch(version, int(message.version))
    contents: list[bytes] = []
    for name in ("local_fingerprint", "remote_fingerprint"):
        if not message.HasField(name) or not getattr(message, name).HasField("content"):
            raise InvalidMessage(f"scanned fingerprint: missing {name}")
        content = bytes(getattr(message, name).content)
        if len(content) != FINGERPRINT_LENGTH:
            raise InvalidMessage(f"scanned fingerprint: {name} is not {FINGERPRINT_LENGTH} bytes")
        contents.append(content)
    return contents[0], contents[1]


# -- the numbers -------------------------------------------------------------------


def _iterated_hash(key: bytes, identifier: bytes, iterations: int) -> bytes:
    # libsignal's loop: the first round hashes version || key || id || key, every
    # later round hashes the previous digest || key; ``iterations`` rounds in all.
    digest = FINGERPRINT_VERSION.to_bytes(2, "big") + key + identifier
    for _ in range(iterations):
        digest = hashlib.sha512(digest + key).digest()
    return digest


def _digits(fingerprint: bytes) -> str:
    """Thirty decimal digits: six 5-byte big-endian chunks, each mod 100000."""
    return "".join(
        f"{int.from_bytes(fingerprint[i : i + _CHUNK_BYTES], 'big') % _CHUNK_MODULUS:05d}"
        for i in range(0, _DIGIT_CHUNKS * _CHUNK_BYTES, _CHUNK_BYTES)
    )


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, bytes):
        raise UsageError(f"{what}: expected bytes, got {type(key).__name__}")
    try:
        check_public_key(key, what)
    except InvalidKey as exc:
        raise UsageError(
            f"{what}: expected a canonical {KEY_LENGTH}-byte identity key (0x05 prefix)"
        ) from exc
    return key


def _check_identifier(identifier: object, what: str) -> bytes:
    if not isinstance(identifier, str):
        raise UsageError(f"{what}: expected str, got {type(identifier).__name__}")
    if not identifier:
        raise UsageError(f"{what}: must not be empty")
    try:
        return identifier.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what}: not encodable as UTF-8") from exc


@dataclass(frozen=True, slots=True, repr=False)
class SafetyNumber:
    """One side's view of the safety number shared by two parties.

    Both parties see the same :attr:`digits`; their :attr:`scannable` payloads
    differ (each puts its own fingerprint first), which is what lets
    :meth:`matches_scanned` tell a scan of the peer's screen from a scan of our
    own.  Build one with :func:`compute_safety_number`.

    Attributes:
        local_fingerprint: the first 32 bytes of our iterated hash.
        remote_fingerprint: the first 32 bytes of the peer's iterated hash.
        scannable_version: the version written into :attr:`scannable`.
    """

    local_fingerprint: bytes
    remote_fingerprint: bytes
    scannable_version: int = SCANNABLE_VERSION

    def __post_init__(self) -> None:
        for name in ("local_fingerprint", "remote_fingerprint"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != FINGERPRINT_LENGTH:
                raise UsageError(f"{name}: expected {FINGERPRINT_LENGTH} bytes")
        version = self.scannable_version
        if isinstance(version, bool) or not isinstance(version, int):
            raise UsageError("scannable_version: expected an int")
        if not 0 <= version <= _MAX_UINT32:
            raise UsageError("scannable_version: must fit in 32 bits")

    def __repr__(self) -> str:
        return f"SafetyNumber(digits={self.digits!r}, scannable_version={self.scannable_version})"

    @property
    def digits(self) -> str:
        """The 60-digit safety number, identical on both sides."""
        local = _digits(self.local_fingerprint)
        remote = _digits(self.remote_fingerprint)
        return local + remote if local < remote else remote + local

    def display(self, *, groups_per_line: int = 4) -> str:
        """The number as twelve 5-digit groups, for people to read aloud.

        Args:
            groups_per_line: groups on each line (spaces between groups, a
                newline between lines); the default gives Signal's 3 x 4 grid,
                12 gives a single line.

        Returns:
            e.g. ``"30035 44776 92869 39689\\n28698 ..."``.

        Raises:
            UsageError: ``groups_per_line`` is not between 1 and 12.
        """
        if (
            isinstance(groups_per_line, bool)
            or not isinstance(groups_per_line, int)
            or not 1 <= groups_per_line <= _GROUPS
        ):
            raise UsageError(f"groups_per_line: expected an int from 1 to {_GROUPS}")
        digits = self.digits
        groups = [digits[i : i + _GROUP_DIGITS] for i in range(0, len(digits), _GROUP_DIGITS)]
        lines = [groups[i : i + groups_per_line] for i in range(0, _GROUPS, groups_per_line)]
        return "\n".join(" ".join(line) for line in lines)

    @property
    def scannable(self) -> bytes:
        """The QR payload: libsignal's ``CombinedFingerprints`` protobuf, ours first."""
        return _serialize(self.scannable_version, self.local_fingerprint, self.remote_fingerprint)

    def matches_scanned(self, payload: bytes) -> bool:
        """Compare against the payload scanned from the peer's QR code.

        The peer's payload lists its own fingerprint first, so it matches when
        its local part equals our remote part and the other way round.  Scanning
        our own code (or a code computed against a different key) gives False.

        Args:
            payload: the raw bytes decoded from the peer's QR code.

        Returns:
            True if both fingerprints match, compared in constant time.

        Raises:
            UsageError: ``payload`` is not ``bytes``.
            FingerprintVersionMismatch: the peer uses another scannable version.
            InvalidMessage: the payload is not a well-formed fingerprint.
        """
        if not isinstance(payload, bytes):
            raise UsageError(f"payload: expected bytes, got {type(payload).__name__}")
        their_local, their_remote = _parse(payload, self.scannable_version)
        # Evaluate both comparisons: no early exit that would tell which half differed.
        same_remote = hmac.compare_digest(their_local, self.remote_fingerprint)
        same_local = hmac.compare_digest(their_remote, self.local_fingerprint)
        return same_remote & same_local


def compute_safety_number(
    local_key: bytes,
    local_id: str,
    remote_key: bytes,
    remote_id: str,
    *,
    iterations: int = DEFAULT_ITERATIONS,
) -> SafetyNumber:
    """Compute the safety number between us and a peer.

    Args:
        local_key: our serialized identity public key (33 bytes, 0x05 prefix).
        local_id: our stable identifier (the account name or id), as text.
        remote_key: the peer's serialized identity public key.
        remote_id: the peer's stable identifier.
        iterations: SHA-512 rounds per party; both sides must use the same count,
            and only the default is comparable with other clients.

    Returns:
        Our side's :class:`SafetyNumber`.

    Raises:
        UsageError: a key is not a canonical 33-byte Curve25519 public key, an
            identifier is not a non-empty UTF-8-encodable ``str``, or
            ``iterations`` is outside 2..1,000,000.
    """
    local_key = _check_key(local_key, "local_key")
    remote_key = _check_key(remote_key, "remote_key")
    local_bytes = _check_identifier(local_id, "local_id")
    remote_bytes = _check_identifier(remote_id, "remote_id")
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or not _MIN_ITERATIONS <= iterations <= _MAX_ITERATIONS
    ):
        raise UsageError(f"iterations: expected an int from {_MIN_ITERATIONS} to {_MAX_ITERATIONS}")
    local = _iterated_hash(local_key, local_bytes, iterations)
    remote = _iterated_hash(remote_key, remote_bytes, iterations)
    return SafetyNumber(local[:FINGERPRINT_LENGTH], remote[:FINGERPRINT_LENGTH])
