"""The envelope: what the client puts into the relay's opaque message body.

Invariants:

* Layout (big-endian), version byte first so the format can change::

    u8 version (1) | u8 kind
    kind 1, pairwise: u16 count, then count times
        u8 user length | user (ASCII) | u8 device | u8 ciphertext kind | u32 length | body
    kind 2, group: u8 group id length | group id (UTF-8) | Sender Key message (to the end)

* A pairwise envelope carries one ciphertext per recipient device (the relay
  requires one body for every device of a user); each device decrypts only
  its own entry. A group envelope carries one Sender Key message for everyone.
* :func:`parse` accepts exactly what :func:`build_pairwise` / :func:`build_group`
  produce: every failure is :class:`~e2ee.errors.InvalidMessage`; a later
  version is :class:`UnsupportedEnvelope`.
* Nothing here is secret from the recipients, but the group id and the ciphertext
  kinds are from the relay: the SDK puts this envelope inside a sealed one
  (``e2ee.core.sealed``, envelope version 2) whenever it can; only senders without
  sealed sender (or without a session yet) send it in clear (docs/wire-format.md).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from e2ee.errors import InvalidMessage, UnsupportedEnvelope, UsageError

__all__ = [
    "ENVELOPE_VERSION",
    "Entry",
    "GroupEnvelope",
    "PairwiseEnvelope",
    "UnsupportedEnvelope",
    "build_group",
    "build_pairwise",
    "parse",
]

ENVELOPE_VERSION: Final = 1
_PAIRWISE: Final = 1
_GROUP: Final = 2
_KINDS: Final = {"prekey": 1, "message": 2}
_KIND_NAMES: Final = frozenset({1, 2})
_MAX_ENTRIES: Final = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """One recipient device's ciphertext in a pairwise envelope."""

    user: str
    device: int
    kind: Literal["prekey", "message"]
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PairwiseEnvelope:
    """Per-device 1:1 ciphertexts."""

    entries: tuple[Entry, ...]

    def entry_for(self, user: str, device: int) -> Entry | None:
        """The entry addressed to (user, device), or None."""
        for entry in self.entries:
            if entry.user == user and entry.device == device:
                return entry
        return None


@dataclass(frozen=True, slots=True)
class GroupEnvelope:
    """One Sender Key message for every member device."""

    group_id: str
    body: bytes = field(repr=False)


def _name(text: str, what: str) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what}: not UTF-8 encodable") from exc
    if not 1 <= len(data) <= 255:
        raise UsageError(f"{what}: 1 to 255 bytes")
    return data


def build_pairwise(entries: Sequence[Entry]) -> bytes:
    """Serialize per-device ciphertexts.

    Raises:
        UsageError: no entries, too many, or a field out of range.
    """
    if not 1 <= len(entries) <= _MAX_ENTRIES:
        raise UsageError(f"a pairwise envelope holds 1 to {_MAX_ENTRIES} entries")
    parts = [struct.pack(">BBH", ENVELOPE_VERSION, _PAIRWISE, len(entries))]
    for e in entries:
        user = _name(e.user, "user")
        if not 0 <= e.device <= 255 or e.kind not in _KINDS:
            raise UsageError("entry: bad device id or ciphertext kind")
        parts.append(struct.pack(">B", len(user)) + user)
        parts.append(struct.pack(">BBI", e.device, _KINDS[e.kind], len(e.body)) + e.body)
    return b"".join(parts)


def build_group(group_id: str, body: bytes) -> bytes:
    """Serialize a group message.

    Raises:
        UsageError: empty or over-long group id, or an empty body.
    """
    gid = _name(group_id, "group id")
    if not body:
        raise UsageError("group body is empty")
    return struct.pack(">BBB", ENVELOPE_VERSION, _GROUP, len(gid)) + gid + body


def parse(data: bytes) -> PairwiseEnvelope | GroupEnvelope:
    """Parse a relay message body.

    Raises:
        UnsupportedEnvelope: another version.
        InvalidMessage: malformed in any way.
    """
    if not isinstance(data, bytes) or len(data) < 3:
        raise InvalidMessage("envelope: too short")
    if data[0] != ENVELOPE_VERSION:
        raise UnsupportedEnvelope(data[0])
    view = memoryview(data)
    try:
        if data[1] == _GROUP:
            size = data[2]
            gid = bytes(view[3 : 3 + size]).decode("utf-8")
            body = bytes(view[3 + size :])
            if len(gid.encode("utf-8")) != size or not size or not body:
                raise InvalidMessage("envelope: bad group id or empty body")
            return GroupEnvelope(gid, body)
        if data[1] != _PAIRWISE:
            raise InvalidMessage(f"envelope: unknown kind {data[1]}")
        (count,) = struct.unpack_from(">H", data, 2)
        if not 1 <= count <= _MAX_ENTRIES:
            raise InvalidMessage("envelope: bad entry count")
        at = 4
        entries = []
        for _ in range(count):
            size = data[at]
            user = bytes(view[at + 1 : at + 1 + size]).decode("utf-8")
            at += 1 + size
            device, kind, length = struct.unpack_from(">BBI", data, at)
            at += 6
            if kind not in _KIND_NAMES or at + length > len(data) or not size:
                raise InvalidMessage("envelope: bad entry")
            name: Literal["prekey", "message"] = "prekey" if kind == 1 else "message"
            entries.append(Entry(user, device, name, bytes(view[at : at + length])))
            at += length
        if at != len(data):
            raise InvalidMessage("envelope: trailing bytes")
        return PairwiseEnvelope(tuple(entries))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidMessage("envelope: truncated or malformed") from exc
