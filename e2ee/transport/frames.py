"""WebSocket frames of docs/relay-api.md sections 4-5: binary SEND/DELIVER, JSON control frames.

Invariants:

* Pure: bytes and text in, frozen dataclasses out (and back). No I/O, no aiohttp.
* Decoders accept any input and either return a fully validated frame or raise
  :class:`~e2ee.transport.errors.MalformedFrame` (data from the relay is at fault);
  encoders raise :class:`~e2ee.errors.UsageError` for bad arguments (the caller is at
  fault). Nothing else escapes: no ``struct.error``, ``IndexError``, ``UnicodeError``,
  ``json.JSONDecodeError``.
* Binary layouts are big-endian and versioned by their first byte (the op):
  ``0x01`` DELIVER (relay -> client), ``0x02`` SEND (client -> relay, also the binary
  body of ``PUT /v1/messages``).
* Message ids are exactly 16 bytes everywhere; in JSON they are padded standard base64.
* The binary codec itself is :mod:`blindpost_wire.frames`, shared with the relay byte for
  byte; this module validates arguments, builds the SDK's dataclasses and maps the neutral
  :class:`~blindpost_wire.frames.WireError` to :class:`MalformedFrame`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from blindpost_wire import frames as _frames
from blindpost_wire.frames import (
    MAX_FRAME_RECIPIENTS,
    MESSAGE_ID_LEN,
    OP_DELIVER,
    OP_SEND,
    WireError,
)
from e2ee.errors import UsageError
from e2ee.transport.auth import check_device_id, check_username
from e2ee.transport.errors import (
    MalformedFrame,
    MalformedResponse,
    RelayRejected,
    error_from_response,
)

__all__ = [
    "MAX_ACK_IDS",
    "MAX_ACK_REF_LEN",
    "MAX_RECIPIENTS",
    "MESSAGE_ID_LEN",
    "OP_DELIVER",
    "OP_SEND",
    "Acked",
    "ControlFrame",
    "Delivery",
    "Hint",
    "QueueEmpty",
    "SendFrame",
    "SendResult",
    "ServerError",
    "ServerFrame",
    "UnknownControl",
    "ack_fields",
    "b64d",
    "b64e",
    "check_message_id",
    "check_recipients",
    "decode_control",
    "decode_deliver",
    "decode_send",
    "decode_server_frame",
    "encode_ack",
    "encode_control",
    "encode_deliver",
    "encode_send",
]

# OP_DELIVER, OP_SEND and MESSAGE_ID_LEN are blindpost_wire's (re-exported); the codec too.
MAX_RECIPIENTS = MAX_FRAME_RECIPIENTS  # the relay's configured limit is usually lower
MAX_ACK_IDS = 1000
MAX_ACK_REF_LEN = 64
_U64_MAX = (1 << 64) - 1


# -- base64 helpers ----------------------------------------------------------------------


def b64e(data: bytes) -> str:
    """Encode bytes as padded standard base64 text (the relay's only base64 flavour)."""
    return base64.b64encode(data).decode("ascii")


def b64d(
    value: object,
    what: str,
    length: int | None = None,
    *,
    error: type[MalformedResponse] = MalformedFrame,
) -> bytes:
    """Decode relay-supplied padded standard base64, optionally of an exact length.

    Args:
        value: the JSON value.
        what: field name for the error message.
        length: required decoded length, if any.
        error: the class to raise (:class:`MalformedResponse` for HTTP bodies).

    Returns:
        The decoded bytes.

    Raises:
        MalformedFrame: (or ``error``) not a string, not strict base64, or the wrong length.
    """
    if not isinstance(value, str):
        raise error(f"{what} is not a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError) as exc:
        raise error(f"{what} is not valid base64") from exc
    if length is not None and len(data) != length:
        raise error(f"{what} must decode to {length} bytes, got {len(data)}")
    return data


# -- frame types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A DELIVER frame (op 0x01): one message from the caller's mailbox.

    Attributes:
        seq: the mailbox sequence number (increasing per recipient device).
        id: the 16-byte message id chosen by the sender.
        sender: the sender's username.
        device: the sender's device id.
        stored_at: unix ms when the relay committed the message.
        body: the opaque ciphertext.
    """

    seq: int
    id: bytes
    sender: str
    device: int
    stored_at: int
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SendFrame:
    """A SEND frame (op 0x02) as decoded; mostly useful to tests and fake relays."""

    id: bytes
    recipients: tuple[tuple[str, int], ...]
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Hint:
    """``{"type":"hint","waiting":N}``: always the first frame; N messages are queued."""

    waiting: int


@dataclass(frozen=True, slots=True)
class QueueEmpty:
    """``{"type":"empty"}``: the backlog present at connect time has been delivered."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """``{"type":"send_result",...}``: the relay's answer to one SEND frame.

    For status 200, ``recipients`` and ``stored_at`` are set. Otherwise ``error`` and
    ``message`` (and ``retry_after`` for 429); :meth:`exception` builds the same typed
    error the HTTP path raises.

    Attributes:
        id: the message id this answers.
        status: HTTP-equivalent status.
        recipients: number of recipient devices (200 only).
        stored_at: commit time in unix ms (200 only).
        error: the relay's error code (non-200).
        message: the relay's human text (non-200).
        retry_after: seconds (429).
        fields: the whole JSON object, for error details such as ``missing_devices``.
    """

    id: bytes
    status: int
    recipients: int | None = None
    stored_at: int | None = None
    error: str | None = None
    message: str | None = None
    retry_after: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when the message was stored (status 200)."""
        return self.status == 200

    def exception(self) -> RelayRejected | None:
        """Return the typed error for a non-200 result, or None when it succeeded.

        Returns:
            e.g. :class:`~e2ee.transport.errors.MismatchedDevices` for a 409
            ``mismatched_devices``; None for 200.
        """
        if self.ok:
            return None
        return error_from_response(self.status, self.fields)


@dataclass(frozen=True, slots=True)
class Acked:
    """``{"type":"acked","ref":...,"count":n}``: an ack frame with this ref is committed."""

    ref: str
    count: int


@dataclass(frozen=True, slots=True)
class ServerError:
    """``{"type":"error",...}``: a frame we sent was refused; the connection stays open.

    ``status``: the HTTP status of the refusal (relays before it sent none); ``ref``: the ref
    of the refused ack frame, when it carried one (relays before it sent none).
    """

    error: str
    message: str
    status: int | None = None
    ref: str | None = None

    def exception(self) -> RelayRejected:
        """The typed error of this refusal, as for the same HTTP answer (400 without a
        status)."""
        return error_from_response(
            400 if self.status is None else self.status,
            {"error": self.error, "message": self.message},
        )


@dataclass(frozen=True, slots=True)
class UnknownControl:
    """A well-formed JSON control frame of a type this client does not know (ignored)."""

    type: str


ControlFrame: TypeAlias = Hint | QueueEmpty | SendResult | Acked | ServerError | UnknownControl
ServerFrame: TypeAlias = Delivery | ControlFrame


# -- argument checks ---------------------------------------------------------------------


def check_message_id(message_id: bytes) -> bytes:
    """Validate a caller-supplied message id (exactly 16 bytes).

    Raises:
        UsageError: not 16 bytes.
    """
    if not isinstance(message_id, bytes | bytearray) or len(message_id) != MESSAGE_ID_LEN:
        raise UsageError("a message id is exactly 16 bytes")
    return bytes(message_id)


def check_recipients(recipients: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Validate a recipient list: 1..65535 distinct (username, device id) pairs.

    Raises:
        UsageError: empty, too long, duplicated, or a bad username / device id.
    """
    out: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    for item in recipients:
        if not isinstance(item, tuple) or len(item) != 2:
            raise UsageError("recipients are (username, device id) pairs")
        user, device = check_username(item[0]), check_device_id(item[1])
        if (user, device) in seen:
            raise UsageError("recipients contain a duplicate (username, device) pair")
        seen.add((user, device))
        out.append((user, device))
    if not 1 <= len(out) <= MAX_RECIPIENTS:
        raise UsageError(f"a message needs 1..{MAX_RECIPIENTS} recipients")
    return tuple(out)


def _check_body(body: bytes) -> bytes:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise UsageError("the message body must be bytes")
    return bytes(body)


# -- binary frames -----------------------------------------------------------------------


def encode_send(
    message_id: bytes,
    recipients: Sequence[tuple[str, int]],
    body: bytes,
    *,
    after: bytes | None = None,
) -> bytes:
    """Encode a SEND frame (op 0x02), also the ``application/vnd.blindpost.send`` HTTP body.

    With ``after``, a SEND_AFTER frame (op 0x03): the relay stores the message only if the
    sender's message ``after`` is stored, and answers 409 ``predecessor_missing``
    (:class:`~e2ee.transport.errors.PredecessorMissing`) otherwise.

    Args:
        message_id: 16 bytes chosen by the sender (reuse it on retries).
        recipients: distinct (username, device id) pairs.
        body: the opaque ciphertext.
        after: the id of the sender's previous message (16 bytes), or None.

    Returns:
        The frame bytes.

    Raises:
        UsageError: bad id, recipients or body type.
    """
    mid = check_message_id(message_id)
    previous = None if after is None else check_message_id(after)
    checked = check_recipients(recipients)
    payload = _check_body(body)
    try:
        return _frames.encode_send(mid, checked, payload, after=previous)
    except WireError as exc:  # unreachable after the checks above; typed all the same
        raise UsageError(exc.message) from exc


def _pair(user: str, device: int) -> tuple[str, int]:
    return (user, device)


def decode_send(frame: bytes) -> SendFrame:
    """Decode a SEND frame (op 0x02).

    Args:
        frame: the frame bytes.

    Returns:
        The decoded frame.

    Raises:
        MalformedFrame: wrong op, truncated, zero or duplicate recipients, bad names.
    """
    try:
        mid, recipients, body = _frames.decode_send(bytes(frame), address=_pair)
    except WireError as exc:
        raise MalformedFrame(exc.message) from exc
    return SendFrame(mid, recipients, body)


def encode_deliver(delivery: Delivery) -> bytes:
    """Encode a DELIVER frame (op 0x01); the relay's side, used by tests and fakes.

    Args:
        delivery: the message.

    Returns:
        The frame bytes.

    Raises:
        UsageError: a field is out of range.
    """
    mid = check_message_id(delivery.id)
    for value, what in ((delivery.seq, "seq"), (delivery.stored_at, "stored_at")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
            raise UsageError(f"{what} must be an unsigned 64-bit integer")
    user = check_username(delivery.sender)
    device = check_device_id(delivery.device)
    body = _check_body(delivery.body)
    try:
        return _frames.encode_deliver(delivery.seq, mid, user, device, delivery.stored_at, body)
    except WireError as exc:  # unreachable after the checks above; typed all the same
        raise UsageError(exc.message) from exc


def decode_deliver(frame: bytes) -> Delivery:
    """Decode a DELIVER frame (op 0x01).

    Args:
        frame: the binary WebSocket message.

    Returns:
        The delivery.

    Raises:
        MalformedFrame: wrong op, truncated, or a bad sender name / device id.
    """
    try:
        seq, mid, user, device, stored_at, body = _frames.decode_deliver(bytes(frame))
    except WireError as exc:
        raise MalformedFrame(exc.message) from exc
    return Delivery(seq, mid, user, device, stored_at, body)


# -- JSON control frames -----------------------------------------------------------------


def _field_int(doc: Mapping[str, Any], key: str, lo: int = 0, hi: int = _U64_MAX) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MalformedFrame(f"control frame field {key!r} must be an integer {lo}..{hi}")
    return value


def _opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    return None if doc.get(key) is None else _field_int(doc, key)


def _opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedFrame(f"control frame field {key!r} must be a string")
    return value


def decode_control(text: str | bytes) -> ControlFrame:
    """Decode a JSON control frame (a text WebSocket message) from the relay.

    Args:
        text: the message text (bytes are decoded as UTF-8).

    Returns:
        The typed frame; :class:`UnknownControl` for a well-formed frame of another type.

    Raises:
        MalformedFrame: not UTF-8, not a JSON object, no string ``type``, or a known type
            with missing or ill-typed fields.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise MalformedFrame("control frame is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise MalformedFrame("control frame is not a JSON object")
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise MalformedFrame("control frame has no string 'type'")
    if kind == "hint":
        return Hint(_field_int(doc, "waiting"))
    if kind == "empty":
        return QueueEmpty()
    if kind == "send_result":
        status = _field_int(doc, "status", 100, 599)
        result = SendResult(
            id=b64d(doc.get("id"), "send_result id", MESSAGE_ID_LEN),
            status=status,
            recipients=_opt_int(doc, "recipients"),
            stored_at=_opt_int(doc, "stored_at"),
            error=_opt_str(doc, "error"),
            message=_opt_str(doc, "message"),
            retry_after=_opt_int(doc, "retry_after"),
            fields=doc,
        )
        if status == 200 and (result.recipients is None or result.stored_at is None):
            raise MalformedFrame("successful send_result lacks recipients or stored_at")
        return result
    if kind == "acked":
        ref = _opt_str(doc, "ref")
        if ref is None:
            raise MalformedFrame("acked frame has no ref")
        return Acked(ref, _field_int(doc, "count"))
    if kind == "error":
        code = _opt_str(doc, "error")
        refused = _opt_int(doc, "status")
        if refused is not None and not 400 <= refused <= 599:
            raise MalformedFrame("error frame status out of range")
        return ServerError(
            "unknown" if code is None else code,
            _opt_str(doc, "message") or "",
            refused,
            _opt_str(doc, "ref"),
        )
    return UnknownControl(kind)


def decode_server_frame(data: str | bytes, *, binary: bool) -> ServerFrame:
    """Decode any relay -> client WebSocket message.

    Args:
        data: the message payload.
        binary: True for a binary WebSocket message (DELIVER), False for text (control).

    Returns:
        The typed frame.

    Raises:
        MalformedFrame: see :func:`decode_deliver` and :func:`decode_control`.
    """
    if binary:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedFrame("binary frame payload is not bytes")
        return decode_deliver(bytes(data))
    return decode_control(data)


def ack_fields(ids: Iterable[bytes], settled: Iterable[bytes] = ()) -> dict[str, list[str]]:
    """The id lists of an acknowledgement (the ack frame and ``POST /v1/messages/ack``).

    ``ids`` are deliveries to remove from this device's mailbox; ``settled`` are ids of this
    device's own earlier sends that the relay answered 200 and that it will never send
    again, so the relay may drop their de-duplication record at once. An empty list is
    left out (the relay takes a missing list as an empty one).

    Args:
        ids: 0..1000 message ids (16 bytes each).
        settled: 0..1000 message ids (16 bytes each).

    Returns:
        ``{"ids": [b64...], "settled": [b64...]}`` without the empty ones.

    Raises:
        UsageError: both lists empty, one longer than 1000, or a bad id.
    """
    fields: dict[str, list[str]] = {}
    for name, values in (("ids", ids), ("settled", settled)):
        encoded = [b64e(check_message_id(i)) for i in values]
        if len(encoded) > MAX_ACK_IDS:
            raise UsageError(f"an ack carries at most {MAX_ACK_IDS} ids in {name}")
        if encoded:
            fields[name] = encoded
    if not fields:
        raise UsageError("an ack carries at least one message id (in ids or settled)")
    return fields


def encode_ack(ids: Iterable[bytes], ref: str | None = None, settled: Iterable[bytes] = ()) -> str:
    """Encode a client ack frame ``{"type":"ack","ids":[...],"settled":[...],"ref":...}``.

    Args:
        ids: 0..1000 message ids (16 bytes each) to remove from this device's mailbox.
        ref: optional correlation string (<= 64 characters) echoed by the ``acked`` answer
            (whose count is of ``ids`` removed only).
        settled: 0..1000 ids of this device's own sends the relay may forget
            (:func:`ack_fields`); not both lists empty. Left out when empty, so an ack
            without it is the frame of before.

    Returns:
        The JSON text.

    Raises:
        UsageError: no ids in either list, too many in one, a bad id, or a bad ref.
    """
    doc: dict[str, Any] = {"type": "ack", **ack_fields(ids, settled)}
    if ref is not None:
        if not isinstance(ref, str) or not 1 <= len(ref) <= MAX_ACK_REF_LEN:
            raise UsageError(f"an ack ref is a string of 1..{MAX_ACK_REF_LEN} characters")
        doc["ref"] = ref
    return json.dumps(doc, separators=(",", ":"))


def encode_control(frame: ControlFrame) -> str:
    """Encode a relay -> client control frame (the relay's side; for tests and fakes).

    Args:
        frame: the frame.

    Returns:
        The JSON text.

    Raises:
        UsageError: :class:`UnknownControl` cannot be encoded.
    """
    doc: dict[str, Any]
    if isinstance(frame, Hint):
        doc = {"type": "hint", "waiting": frame.waiting}
    elif isinstance(frame, QueueEmpty):
        doc = {"type": "empty"}
    elif isinstance(frame, SendResult):
        doc = {k: v for k, v in frame.fields.items() if k not in ("type", "id", "status")}
        doc.update({"type": "send_result", "id": b64e(frame.id), "status": frame.status})
        for key in ("recipients", "stored_at", "error", "message", "retry_after"):
            value = getattr(frame, key)
            if value is not None:
                doc[key] = value
    elif isinstance(frame, Acked):
        doc = {"type": "acked", "ref": frame.ref, "count": frame.count}
    elif isinstance(frame, ServerError):
        doc = {"type": "error", "error": frame.error, "message": frame.message}
        if frame.status is not None:
            doc["status"] = frame.status
        if frame.ref is not None:
            doc["ref"] = frame.ref
    else:
        raise UsageError("unknown control frames cannot be encoded")
    return json.dumps(doc, separators=(",", ":"))
