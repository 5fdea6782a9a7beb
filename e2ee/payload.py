"""The plaintext payload inside every ciphertext: versioned, compact, padded.

Invariants:

* Layout: ``version (1 byte) || protobuf Content || 0x80 || 0x00 ...``, the whole
  padded to a multiple of :data:`PAD_BUCKET` bytes (ISO/IEC 7816-4 padding), so
  a ciphertext's length tells an observer only its 160-byte bucket.
* :func:`encode` is deterministic: the same :class:`Payload` always gives the
  same bytes (protobuf's deterministic serialization, fields left at their
  default are not written).
* :func:`decode` accepts exactly what :func:`encode` can produce for this
  version, plus unknown protobuf fields (ignored, so a later minor version can
  add fields). Every failure is :class:`~e2ee.errors.InvalidMessage` (an unknown
  version: :class:`UnsupportedPayload`); nothing from protobuf leaks out.
* A :class:`Payload` that exists is valid: :meth:`Payload.__post_init__` checks
  the fields each type needs, so a decoded payload can be used without checks.
* Attachment keys are secrets: they never appear in a repr.

The protobuf classes are built at import time from a descriptor made here, in a
private descriptor pool (package ``blindpost.payload``), as in
:mod:`e2ee.core.fingerprint`. The format is documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from e2ee.errors import InvalidMessage, UnsupportedPayload, UsageError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_ID_BYTES",
    "PAD_BUCKET",
    "PAYLOAD_VERSION",
    "AttachmentPointer",
    "GroupAction",
    "GroupControl",
    "Payload",
    "PayloadType",
    "Quote",
    "ReceiptKind",
    "UnsupportedPayload",
    "decode",
    "encode",
    "pad",
    "unpad",
    "with_access_key",
]

#: The version byte this build writes and reads.
PAYLOAD_VERSION: Final = 1
#: Padded payloads are a multiple of this many bytes.
PAD_BUCKET: Final = 160
#: Message ids are 16 random bytes (the relay's message id is the same value).
MESSAGE_ID_BYTES: Final = 16
#: Largest padded payload; the relay takes 256 KiB bodies, and an envelope may
#: carry one ciphertext per recipient device.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
_MAX_U63: Final = 2**63 - 1
_MAX_U32: Final = 2**32 - 1
_MAX_NAME: Final = 256
_MAX_MEMBERS: Final = 1000
_PAD_MARK: Final = 0x80


class PayloadType(enum.IntEnum):
    """What a payload is; travels as a small integer."""

    TEXT = 1
    RECEIPT = 2
    TYPING = 3
    REACTION = 4
    EDIT = 5
    DELETE = 6
    GROUP = 7
    ATTACHMENT = 8
    TIMER = 9
    SESSION_RESET = 10


class ReceiptKind(enum.IntEnum):
    """Receipt status carried by a RECEIPT payload ("sent" is the relay's answer)."""

    DELIVERED = 1
    READ = 2


class GroupAction(enum.IntEnum):
    """A group-control change."""

    CREATE = 1
    ADD = 2
    REMOVE = 3
    LEAVE = 4
    RENAME = 5
    SENDER_KEY = 6


@dataclass(frozen=True, slots=True)
class Quote:
    """The message a reply quotes.

    Attributes:
        message_id: the quoted message's id (16 bytes).
        author: the quoted message's sender (user name).
        text: a short excerpt of the quoted text, shown with the reply.
    """

    message_id: bytes
    author: str
    text: str = ""

    def __post_init__(self) -> None:
        _check_id(self.message_id, "quote.message_id")
        _check_str(self.author, "quote.author", _MAX_NAME)
        _check_str(self.text, "quote.text", MAX_PAYLOAD_BYTES)


@dataclass(frozen=True, slots=True)
class AttachmentPointer:
    """Where an encrypted file is and how to open it.

    Attributes:
        blob_id: the relay's blob id (lowercase hex SHA-256 of the ciphertext).
        key: the secret-stream key (32 bytes; never in a repr).
        digest: SHA-256 of the ciphertext (32 bytes), checked before use.
        size: plaintext size in bytes.
        mime_type: e.g. ``"image/png"``.
        file_name: the original file name (no directory).
    """

    blob_id: str
    key: bytes = field(repr=False)
    digest: bytes
    size: int
    mime_type: str = "application/octet-stream"
    file_name: str = ""

    def __post_init__(self) -> None:
        _check_str(self.blob_id, "attachment.blob_id", 128)
        if not self.blob_id:
            raise UsageError("attachment.blob_id: must not be empty")
        _check_bytes(self.key, "attachment.key", 32, exact=True)
        _check_bytes(self.digest, "attachment.digest", 32, exact=True)
        _check_int(self.size, "attachment.size", _MAX_U63)
        _check_str(self.mime_type, "attachment.mime_type", _MAX_NAME)
        _check_str(self.file_name, "attachment.file_name", _MAX_NAME)

    def __repr__(self) -> str:
        return (
            f"AttachmentPointer(blob_id={self.blob_id!r}, size={self.size}, "
            f"mime_type={self.mime_type!r}, file_name={self.file_name!r}, key=<secret>)"
        )


@dataclass(frozen=True, slots=True)
class GroupControl:
    """A group change, carrying the group's whole state after it.

    Carrying the state (not only the delta) lets a member who missed a change
    converge on the next one; ``revision`` orders the states.

    Attributes:
        action: what changed.
        name: the group's name after the change.
        members: user names of every member after the change.
        admins: user names allowed to change membership (a subset of members).
        revision: increases with every change; older states are ignored.
        targets: the users the change is about (added, removed, leaving).
        distribution: a Sender Key distribution message (SENDER_KEY only);
            secret, never in a repr.
    """

    action: GroupAction
    name: str = ""
    members: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    revision: int = 0
    targets: tuple[str, ...] = ()
    distribution: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.action, GroupAction):
            raise UsageError("group.action: expected a GroupAction")
        _check_str(self.name, "group.name", _MAX_NAME)
        for what, names in (
            ("members", self.members),
            ("admins", self.admins),
            ("targets", self.targets),
        ):
            if not isinstance(names, tuple) or len(names) > _MAX_MEMBERS:
                raise UsageError(f"group.{what}: expected a tuple of at most {_MAX_MEMBERS}")
            for name in names:
                _check_str(name, f"group.{what}", _MAX_NAME)
        _check_int(self.revision, "group.revision", _MAX_U63)
        _check_bytes(self.distribution, "group.distribution", 4096)
        if self.action is GroupAction.SENDER_KEY and not self.distribution:
            raise UsageError("group: a SENDER_KEY change needs a distribution message")

    def __repr__(self) -> str:
        return (
            f"GroupControl(action={self.action.name}, name={self.name!r}, "
            f"members={self.members!r}, admins={self.admins!r}, revision={self.revision}, "
            f"targets={self.targets!r}, distribution=<{len(self.distribution)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class Payload:
    """One decrypted message of any kind.

    Attributes:
        type: what this payload is.
        message_id: 16 random bytes naming this message (also the relay's id).
        sent_at_ms: the sender's clock when composed (unix ms).
        counter: the sender device's counter for this chat; 0 for payloads that
            are not counted (receipts, typing, session resets), see
            ``docs/wire-format.md``.
        group_id: the group this payload belongs to; "" for a 1:1 chat.
        text: message text (TEXT, EDIT; optional caption for ATTACHMENT).
        quote: the message a reply quotes.
        target_ids: the message(s) a RECEIPT, REACTION, EDIT or DELETE is about.
        receipt: DELIVERED or READ (RECEIPT only).
        reaction: an emoji; "" removes our reaction (REACTION only).
        typing: started (True) or stopped (False) typing (TYPING only).
        attachment: the file (ATTACHMENT only).
        group: the group change (GROUP only).
        timer_seconds: the chat's new disappearing timer, 0 = off (TIMER only).
        expire_seconds: this message disappears this long after it is read
            (sent: after sending); 0 = never. Set from the chat's timer.
        access_key: the sender's access key (32 bytes) for sealed sender, or b""
            (docs/protocol.md, "Sealed sender"); added by the SDK when it sends.
    """

    type: PayloadType
    message_id: bytes
    sent_at_ms: int
    counter: int = 0
    group_id: str = ""
    text: str = ""
    quote: Quote | None = None
    target_ids: tuple[bytes, ...] = ()
    receipt: ReceiptKind | None = None
    reaction: str = ""
    typing: bool = False
    attachment: AttachmentPointer | None = None
    group: GroupControl | None = None
    timer_seconds: int = 0
    expire_seconds: int = 0
    access_key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.type, PayloadType):
            raise UsageError("type: expected a PayloadType")
        _check_id(self.message_id, "message_id")
        _check_int(self.sent_at_ms, "sent_at_ms", _MAX_U63)
        _check_int(self.counter, "counter", _MAX_U63)
        _check_str(self.group_id, "group_id", _MAX_NAME)
        _check_str(self.text, "text", MAX_PAYLOAD_BYTES)
        if self.quote is not None and not isinstance(self.quote, Quote):
            raise UsageError("quote: expected a Quote")
        if not isinstance(self.target_ids, tuple) or len(self.target_ids) > 1000:
            raise UsageError("target_ids: expected a tuple of at most 1000 ids")
        for target in self.target_ids:
            _check_id(target, "target_ids")
        if self.receipt is not None and not isinstance(self.receipt, ReceiptKind):
            raise UsageError("receipt: expected a ReceiptKind")
        _check_str(self.reaction, "reaction", 64)
        if not isinstance(self.typing, bool):
            raise UsageError("typing: expected a bool")
        if self.attachment is not None and not isinstance(self.attachment, AttachmentPointer):
            raise UsageError("attachment: expected an AttachmentPointer")
        if self.group is not None and not isinstance(self.group, GroupControl):
            raise UsageError("group: expected a GroupControl")
        _check_int(self.timer_seconds, "timer_seconds", _MAX_U32)
        _check_int(self.expire_seconds, "expire_seconds", _MAX_U32)
        if not isinstance(self.access_key, bytes) or len(self.access_key) not in (0, 32):
            raise UsageError("access_key: expected 0 or 32 bytes")
        self._check_type()

    def _check_type(self) -> None:
        kind = self.type
        needs_one_target = (PayloadType.REACTION, PayloadType.EDIT, PayloadType.DELETE)
        if kind in needs_one_target and len(self.target_ids) != 1:
            raise UsageError(f"a {kind.name} payload names exactly one target message")
        if kind is PayloadType.RECEIPT and (self.receipt is None or not self.target_ids):
            raise UsageError("a RECEIPT payload needs a receipt kind and target messages")
        if kind is not PayloadType.RECEIPT and self.receipt is not None:
            raise UsageError("only a RECEIPT payload carries a receipt kind")
        if kind in (PayloadType.TEXT, PayloadType.EDIT) and not self.text:
            raise UsageError(f"a {kind.name} payload needs text")
        if (kind is PayloadType.ATTACHMENT) != (self.attachment is not None):
            raise UsageError("an ATTACHMENT payload, and only it, carries an attachment")
        if (kind is PayloadType.GROUP) != (self.group is not None):
            raise UsageError("a GROUP payload, and only it, carries a group change")
        if kind is PayloadType.GROUP and not self.group_id:
            raise UsageError("a GROUP payload needs a group id")

    def __repr__(self) -> str:
        return (
            f"Payload(type={self.type.name}, message_id={self.message_id.hex()}, "
            f"counter={self.counter}, group_id={self.group_id!r}, text=<{len(self.text)} chars>)"
        )


# -- checks -----------------------------------------------------------------------------


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != MESSAGE_ID_BYTES:
        raise UsageError(f"{what}: expected {MESSAGE_ID_BYTES} bytes")


def _check_bytes(value: object, what: str, size: int, *, exact: bool = False) -> None:
    if not isinstance(value, bytes):
        raise UsageError(f"{what}: expected bytes")
    if (exact and len(value) != size) or len(value) > size:
        raise UsageError(f"{what}: expected {'exactly' if exact else 'at most'} {size} bytes")


def _check_int(value: object, what: str, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise UsageError(f"{what}: expected an int in [0, {high}]")


def _check_str(value: object, what: str, limit: int) -> None:
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected str")
    if len(value) > limit:
        raise UsageError(f"{what}: longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what}: not encodable as UTF-8") from exc


# -- protobuf -----------------------------------------------------------------------------


def _build_messages() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="blindpost/payload.proto", package="blindpost.payload", syntax="proto2"
    )
    f = descriptor_pb2.FieldDescriptorProto
    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED

    def add(msg: Any, name: str, number: int, kind: int, label: int = opt, ref: str = "") -> None:
        extra = {"type_name": f".blindpost.payload.{ref}"} if ref else {}
        msg.field.add(name=name, number=number, label=label, type=kind, **extra)

    quote = fdp.message_type.add(name="Quote")
    add(quote, "message_id", 1, f.TYPE_BYTES)
    add(quote, "author", 2, f.TYPE_STRING)
    add(quote, "text", 3, f.TYPE_STRING)

    attachment = fdp.message_type.add(name="Attachment")
    add(attachment, "blob_id", 1, f.TYPE_STRING)
    add(attachment, "key", 2, f.TYPE_BYTES)
    add(attachment, "digest", 3, f.TYPE_BYTES)
    add(attachment, "size", 4, f.TYPE_UINT64)
    add(attachment, "mime_type", 5, f.TYPE_STRING)
    add(attachment, "file_name", 6, f.TYPE_STRING)

    group = fdp.message_type.add(name="GroupControl")
    add(group, "action", 1, f.TYPE_UINT32)
    add(group, "name", 2, f.TYPE_STRING)
    add(group, "members", 3, f.TYPE_STRING, rep)
    add(group, "admins", 4, f.TYPE_STRING, rep)
    add(group, "revision", 5, f.TYPE_UINT64)
    add(group, "targets", 6, f.TYPE_STRING, rep)
    add(group, "distribution", 7, f.TYPE_BYTES)

    content = fdp.message_type.add(name="Content")
    add(content, "type", 1, f.TYPE_UINT32)
    add(content, "message_id", 2, f.TYPE_BYTES)
    add(content, "sent_at_ms", 3, f.TYPE_UINT64)
    add(content, "counter", 4, f.TYPE_UINT64)
    add(content, "group_id", 5, f.TYPE_STRING)
    add(content, "text", 6, f.TYPE_STRING)
    add(content, "quote", 7, f.TYPE_MESSAGE, ref="Quote")
    add(content, "target_ids", 8, f.TYPE_BYTES, rep)
    add(content, "receipt", 9, f.TYPE_UINT32)
    add(content, "reaction", 10, f.TYPE_STRING)
    add(content, "typing", 11, f.TYPE_BOOL)
    add(content, "attachment", 12, f.TYPE_MESSAGE, ref="Attachment")
    add(content, "group", 13, f.TYPE_MESSAGE, ref="GroupControl")
    add(content, "timer_seconds", 14, f.TYPE_UINT32)
    add(content, "expire_seconds", 15, f.TYPE_UINT32)
    add(content, "access_key", 16, f.TYPE_BYTES)

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return {
        name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"blindpost.payload.{name}")
        )
        for name in ("Quote", "Attachment", "GroupControl", "Content")
    }


_PB: Final = _build_messages()


def _set(message: Any, name: str, value: Any) -> None:
    # Defaults are left unset so the encoding stays minimal and deterministic.
    if value:
        setattr(message, name, value)


def _to_proto(payload: Payload) -> Any:
    msg = _PB["Content"]()
    msg.type = int(payload.type)
    msg.message_id = payload.message_id
    _set(msg, "sent_at_ms", payload.sent_at_ms)
    _set(msg, "counter", payload.counter)
    _set(msg, "group_id", payload.group_id)
    _set(msg, "text", payload.text)
    if payload.quote is not None:
        q = payload.quote
        msg.quote.message_id = q.message_id
        _set(msg.quote, "author", q.author)
        _set(msg.quote, "text", q.text)
    msg.target_ids.extend(payload.target_ids)
    if payload.receipt is not None:
        msg.receipt = int(payload.receipt)
    _set(msg, "reaction", payload.reaction)
    _set(msg, "typing", payload.typing)
    if payload.attachment is not None:
        a, pa = payload.attachment, msg.attachment
        pa.blob_id = a.blob_id
        pa.key = a.key
        pa.digest = a.digest
        pa.size = a.size
        _set(pa, "mime_type", a.mime_type)
        _set(pa, "file_name", a.file_name)
    if payload.group is not None:
        g, pg = payload.group, msg.group
        pg.action = int(g.action)
        _set(pg, "name", g.name)
        pg.members.extend(g.members)
        pg.admins.extend(g.admins)
        _set(pg, "revision", g.revision)
        pg.targets.extend(g.targets)
        _set(pg, "distribution", g.distribution)
    _set(msg, "timer_seconds", payload.timer_seconds)
    _set(msg, "expire_seconds", payload.expire_seconds)
    _set(msg, "access_key", payload.access_key)
    return msg


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> Any:
    try:
        return kind(value)
    except ValueError as exc:
        raise InvalidMessage(f"payload: unknown {what} {value}") from exc


def _from_proto(msg: Any) -> Payload:
    if not msg.HasField("type") or not msg.HasField("message_id"):
        raise InvalidMessage("payload: missing type or message id")
    quote = None
    if msg.HasField("quote"):
        quote = Quote(bytes(msg.quote.message_id), msg.quote.author, msg.quote.text)
    attachment = None
    if msg.HasField("attachment"):
        a = msg.attachment
        attachment = AttachmentPointer(
            a.blob_id, bytes(a.key), bytes(a.digest), a.size, a.mime_type, a.file_name
        )
    group = None
    if msg.HasField("group"):
        g = msg.group
        group = GroupControl(
            action=_enum(GroupAction, g.action, "group action"),
            name=g.name,
            members=tuple(g.members),
            admins=tuple(g.admins),
            revision=g.revision,
            targets=tuple(g.targets),
            distribution=bytes(g.distribution),
        )
    receipt = None
    if msg.HasField("receipt"):
        receipt = _enum(ReceiptKind, msg.receipt, "receipt kind")
    return Payload(
        type=_enum(PayloadType, msg.type, "payload type"),
        message_id=bytes(msg.message_id),
        sent_at_ms=msg.sent_at_ms,
        counter=msg.counter,
        group_id=msg.group_id,
        text=msg.text,
        quote=quote,
        target_ids=tuple(bytes(t) for t in msg.target_ids),
        receipt=receipt,
        reaction=msg.reaction,
        typing=msg.typing,
        attachment=attachment,
        group=group,
        timer_seconds=msg.timer_seconds,
        expire_seconds=msg.expire_seconds,
        access_key=bytes(msg.access_key),
    )


# -- padding ------------------------------------------------------------------------------


def pad(data: bytes, bucket: int = PAD_BUCKET) -> bytes:
    """Append ``0x80`` then zeros up to the next multiple of ``bucket``.

    At least one byte is always added, so padding is unambiguous.

    Args:
        data: the bytes to pad.
        bucket: the size granularity (positive).

    Returns:
        ``data`` padded to a multiple of ``bucket`` bytes.

    Raises:
        UsageError: ``bucket`` is not positive.
    """
    if bucket < 1:
        raise UsageError("bucket must be positive")
    size = (len(data) // bucket + 1) * bucket
    return data + b"\x80" + bytes(size - len(data) - 1)


def unpad(data: bytes, bucket: int = PAD_BUCKET) -> bytes:
    """Remove :func:`pad`'s padding.

    Args:
        data: padded bytes.
        bucket: the granularity they were padded to.

    Returns:
        The bytes before the padding.

    Raises:
        InvalidMessage: not a positive multiple of ``bucket``, or no ``0x80`` marker.
    """
    if not data or len(data) % bucket:
        raise InvalidMessage(f"payload: {len(data)} bytes is not a multiple of {bucket}")
    body = data.rstrip(b"\x00")
    if not body or body[-1] != _PAD_MARK or len(data) - len(body) >= bucket:
        raise InvalidMessage("payload: bad padding")
    return body[:-1]


# -- the format ---------------------------------------------------------------------------


def encode(payload: Payload) -> bytes:
    """Serialize and pad a payload.

    Args:
        payload: what to send.

    Returns:
        ``version || Content || padding``, a multiple of :data:`PAD_BUCKET` bytes.

    Raises:
        UsageError: the result would exceed :data:`MAX_PAYLOAD_BYTES`.
    """
    body: bytes = _to_proto(payload).SerializeToString(deterministic=True)
    data = pad(bytes((PAYLOAD_VERSION,)) + body)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise UsageError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return data


#: Content field 16 (access_key), length-delimited, 32 bytes: tag 0x82 0x01, length 0x20.
_ACCESS_KEY_FIELD: Final = b"\x82\x01\x20"


def with_access_key(data: bytes, access_key: bytes) -> bytes:
    """An encoded payload with ``access_key`` (field 16) added, without decoding it.

    Protobuf reads a field that appears twice as its last value, so appending the field to the
    serialized Content is the same as setting it; only the padding is redone. Cheap enough for
    every message the SDK sends.

    Raises:
        UsageError: not 32 bytes, or the result would exceed :data:`MAX_PAYLOAD_BYTES`.
        InvalidMessage: ``data`` is not a padded payload.
    """
    if len(access_key) != 32:
        raise UsageError("an access key is 32 bytes")
    out = pad(unpad(data) + _ACCESS_KEY_FIELD + access_key)
    if len(out) > MAX_PAYLOAD_BYTES:
        raise UsageError(f"payload of {len(out)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return out


def decode(data: bytes) -> Payload:
    """Parse a padded payload.

    Args:
        data: the plaintext from a decrypted ciphertext.

    Returns:
        The payload.

    Raises:
        UnsupportedPayload: another version of the format.
        InvalidMessage: too large, bad padding, malformed protobuf, an unknown
            type, or fields that do not fit the type.
    """
    if not isinstance(data, bytes) or len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidMessage("payload: not bytes, or too large")
    body = unpad(data)
    if not body:
        raise InvalidMessage("payload: empty")
    if body[0] != PAYLOAD_VERSION:
        raise UnsupportedPayload(body[0])
    msg = _PB["Content"]()
    try:
        msg.ParseFromString(body[1:])
    except (DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage("payload: malformed protobuf") from exc
    try:
        return _from_proto(msg)
    except UsageError as exc:
        raise InvalidMessage(f"payload: {exc}") from exc
