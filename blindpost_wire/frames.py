"""The binary SEND and DELIVER frames (docs/relay-api.md sections 4-5), once for both sides.

Invariants:

* Pure: bytes in, plain values out (and back); standard library only, no I/O.
* Layouts are big-endian and versioned by their first byte (the op): ``0x01`` DELIVER
  (relay -> client: op, u64 seq, 16-byte id, u64 stored_at, u8 name length, name,
  u8 device, body) and ``0x02`` SEND (client -> relay, also the binary body of
  ``PUT /v1/messages``: op, 16-byte id, u16 count, count x (u8 length, name, u8 device),
  body) and ``0x03`` SEND_AFTER (the same, with the 16-byte id of the sender's previous
  message right after the id: store this one only if that one is stored; a pipelining
  sender's order guard, docs/relay-api.md section 4).
* Decoders accept any bytes and either return fully validated values (names match
  :data:`~blindpost_wire.names.USERNAME_PATTERN`, device ids are in range, recipients are
  distinct) or raise :class:`WireError`; nothing else escapes (no ``struct.error``,
  ``IndexError``, ``UnicodeError``).
* Encoders check only that the values fit the layout (:class:`WireError` otherwise); the
  caller validates names and device ids first, with its own typed error.
* :class:`WireError` is neutral: the relay maps it to ``BadRequest``/``TooLarge``, the SDK to
  ``MalformedFrame``. Its :attr:`WireError.code` says which.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterable
from typing import Final, TypeVar

from blindpost_wire.names import (
    MAX_DEVICE_ID,
    MIN_DEVICE_ID,
    USERNAME_BYTES_RE,
    is_sealed_sender,
)

__all__ = [
    "DELIVER_HEAD_LEN",
    "MAX_FRAME_RECIPIENTS",
    "MESSAGE_ID_LEN",
    "OP_DELIVER",
    "OP_SEND",
    "OP_SEND_AFTER",
    "SEND_HEAD_LEN",
    "WireError",
    "decode_deliver",
    "decode_send",
    "decode_send_frame",
    "encode_deliver",
    "encode_send",
]

OP_DELIVER: Final = 0x01
OP_SEND: Final = 0x02
OP_SEND_AFTER: Final = 0x03
#: Message ids are exactly this many bytes everywhere.
MESSAGE_ID_LEN: Final = 16
#: The u16 count field's ceiling; the relay's configured limit is usually lower.
MAX_FRAME_RECIPIENTS: Final = 0xFFFF
_U64_MAX: Final = (1 << 64) - 1

_DELIVER_HEAD = struct.Struct(">BQ16sQ")  # op, seq, id, stored_at
_SEND_HEAD = struct.Struct(">B16sH")  # op, id, recipient count
_SEND_AFTER_HEAD = struct.Struct(">B16s16sH")  # op, id, previous id, recipient count
DELIVER_HEAD_LEN: Final = _DELIVER_HEAD.size
SEND_HEAD_LEN: Final = _SEND_HEAD.size

A = TypeVar("A", bound=Hashable)


class WireError(ValueError):
    """A frame (or a value to encode) does not fit the wire format.

    Attributes:
        code: ``"malformed"`` (layout, op, count, duplicates, device id),
            ``"invalid_username"`` (a name breaks the username rule) or ``"too_large"``
            (the body is over the caller's ``max_body``).
        message: human-readable text (never contains a body).
    """

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Names already validated by decode_send (bytes as framed -> str): a sender names the same
# few recipients again and again, and the regex was most of a 1:1 SEND's decoding cost.
_VALID_NAMES: dict[bytes, str] = {}
_VALID_NAMES_MAX: Final = 4096


def _name(raw: bytes, what: str) -> str:
    name = _VALID_NAMES.get(raw)
    if name is None:
        if USERNAME_BYTES_RE.fullmatch(raw) is None:
            raise WireError(f"{what} must match ^[a-z0-9_]{{3,32}}$", "invalid_username")
        name = raw.decode("ascii")
        if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
            _VALID_NAMES.clear()
        _VALID_NAMES[raw] = name
    return name


def encode_send(
    message_id: bytes,
    recipients: Iterable[tuple[str, int]],
    body: bytes,
    *,
    after: bytes | None = None,
) -> bytes:
    """Encode a SEND frame (op 0x02), or SEND_AFTER (op 0x03) with ``after``.

    The inverse of :func:`decode_send_frame`.

    Args:
        message_id: exactly 16 bytes.
        recipients: (username, device id) pairs, already validated by the caller.
        body: the opaque ciphertext.
        after: the id of the sender's previous message (16 bytes): the relay stores this
            one only if that one is stored. None for a plain SEND.

    Returns:
        The frame bytes.

    Raises:
        WireError: an id is not 16 bytes, more than 65535 recipients, or a name or device
            id that does not fit its byte.
    """
    if len(message_id) != MESSAGE_ID_LEN or (after is not None and len(after) != MESSAGE_ID_LEN):
        raise WireError("a message id is exactly 16 bytes")
    parts = [b""]
    try:
        for user, device in recipients:
            name = user.encode("ascii")
            parts.append(bytes((len(name),)) + name + bytes((device,)))
        if after is None:
            parts[0] = _SEND_HEAD.pack(OP_SEND, message_id, len(parts) - 1)
        else:
            parts[0] = _SEND_AFTER_HEAD.pack(OP_SEND_AFTER, message_id, after, len(parts) - 1)
    except (struct.error, ValueError, TypeError, AttributeError) as exc:
        raise WireError(f"value does not fit the send frame: {exc}") from exc
    parts.append(body)
    return b"".join(parts)


def decode_send(
    frame: bytes,
    *,
    address: Callable[[str, int], A],
    max_recipients: int = MAX_FRAME_RECIPIENTS,
    max_body: int | None = None,
) -> tuple[bytes, tuple[A, ...], bytes]:
    """Decode and validate a SEND frame (op 0x02 only; see :func:`decode_send_frame`).

    Args:
        frame: the frame bytes.
        address: builds one recipient from (username, device id), e.g. a NamedTuple class.
        max_recipients: the largest recipient count accepted (1..65535).
        max_body: the largest body accepted, or None for no limit.

    Returns:
        (message id, recipients in frame order, body).

    Raises:
        WireError: as :func:`decode_send_frame`; also for a SEND_AFTER frame.
    """
    if frame[:1] != bytes((OP_SEND,)):
        raise WireError("unknown frame op")
    mid, _, recipients, body = decode_send_frame(
        frame, address=address, max_recipients=max_recipients, max_body=max_body
    )
    return mid, recipients, body


def decode_send_frame(
    frame: bytes,
    *,
    address: Callable[[str, int], A],
    max_recipients: int = MAX_FRAME_RECIPIENTS,
    max_body: int | None = None,
) -> tuple[bytes, bytes | None, tuple[A, ...], bytes]:
    """Decode and validate a SEND (op 0x02) or SEND_AFTER (op 0x03) frame.

    Args:
        frame: the frame bytes.
        address: builds one recipient from (username, device id), e.g. a NamedTuple class.
        max_recipients: the largest recipient count accepted (1..65535).
        max_body: the largest body accepted, or None for no limit.

    Returns:
        (message id, the previous message's id for SEND_AFTER or None, recipients in frame
        order, body).

    Raises:
        WireError: wrong op, truncated, 0 or too many recipients, a bad name
            (``invalid_username``) or device id, a duplicate recipient, or a body over
            ``max_body`` (``too_large``).
    """
    after: bytes | None = None
    if frame[:1] == bytes((OP_SEND_AFTER,)):
        if len(frame) < _SEND_AFTER_HEAD.size:
            raise WireError("truncated send frame")
        _, mid, raw_after, count = _SEND_AFTER_HEAD.unpack_from(frame, 0)
        after = bytes(raw_after)
        pos = _SEND_AFTER_HEAD.size
    else:
        if len(frame) < _SEND_HEAD.size:
            raise WireError("truncated send frame")
        op, mid, count = _SEND_HEAD.unpack_from(frame, 0)
        if op != OP_SEND:
            raise WireError("unknown frame op")
        pos = _SEND_HEAD.size
    if not 1 <= count <= max_recipients:
        raise WireError(f"recipients must list 1..{max_recipients} devices")
    end = len(frame)
    recipients: list[A] = []
    for _ in range(count):
        if pos >= end:
            raise WireError("truncated send frame")
        n = frame[pos]
        if pos + 1 + n + 1 > end:
            raise WireError("truncated send frame")
        name = _name(bytes(frame[pos + 1 : pos + 1 + n]), "recipient user")
        device = frame[pos + 1 + n]
        if not MIN_DEVICE_ID <= device <= MAX_DEVICE_ID:
            raise WireError(f"recipient device must be an integer {MIN_DEVICE_ID}..{MAX_DEVICE_ID}")
        recipients.append(address(name, device))
        pos += n + 2
    if max_body is not None and end - pos > max_body:
        raise WireError("message body too large", "too_large")
    if count > 1 and len(set(recipients)) != count:
        raise WireError("recipients contains duplicates")
    return bytes(mid), after, tuple(recipients), bytes(frame[pos:])


def encode_deliver(
    seq: int, message_id: bytes, user: str, device: int, stored_at: int, body: bytes
) -> bytes:
    """Encode a DELIVER frame (op 0x01); the inverse of :func:`decode_deliver`.

    Args:
        seq: the mailbox sequence number (u64).
        message_id: exactly 16 bytes.
        user: the sender's username (validated by the caller).
        device: the sender's device id (validated by the caller).
        stored_at: milliseconds since the epoch when the relay stored it (u64).
        body: the opaque ciphertext.

    Returns:
        The frame bytes.

    Raises:
        WireError: the id is not 16 bytes, or a value does not fit its field.
    """
    if len(message_id) != MESSAGE_ID_LEN:
        raise WireError("a message id is exactly 16 bytes")
    try:
        name = user.encode("ascii")
        return b"".join(
            (
                _DELIVER_HEAD.pack(OP_DELIVER, seq, message_id, stored_at),
                bytes((len(name), *name, device)),
                body,
            )
        )
    except (struct.error, ValueError, TypeError, AttributeError) as exc:
        raise WireError(f"value does not fit the deliver frame: {exc}") from exc


def decode_deliver(frame: bytes) -> tuple[int, bytes, str, int, int, bytes]:
    """Decode and validate a DELIVER frame (op 0x01).

    Args:
        frame: the frame bytes.

    Returns:
        (seq, message id, sender username, sender device id, stored_at, body).

    Raises:
        WireError: wrong op, truncated, or a bad sender name (``invalid_username``) or
            device id.
    """
    if len(frame) < _DELIVER_HEAD.size:
        raise WireError("truncated deliver frame")
    op, seq, mid, stored_at = _DELIVER_HEAD.unpack_from(frame, 0)
    if op != OP_DELIVER:
        raise WireError("not a deliver frame")
    pos = _DELIVER_HEAD.size
    end = len(frame)
    if pos >= end:
        raise WireError("truncated deliver frame")
    n = frame[pos]
    if pos + 1 + n + 1 > end:
        raise WireError("truncated deliver frame")
    raw = bytes(frame[pos + 1 : pos + 1 + n])
    device = frame[pos + 1 + n]
    if raw[:1] == b"~":  # a sealed message: the relay does not know its sender
        user = raw.decode("ascii", "replace")
        if not is_sealed_sender(user, device):
            raise WireError("bad sealed sender pseudonym", "invalid_username")
    else:
        user = _name(raw, "sender user")
        if not MIN_DEVICE_ID <= device <= MAX_DEVICE_ID:
            raise WireError(f"sender device must be an integer {MIN_DEVICE_ID}..{MAX_DEVICE_ID}")
    return seq, bytes(mid), user, device, stored_at, bytes(frame[pos + 2 + n :])
