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
* TRANSCRIPT and SYNC payloads pass only between devices of one account
  (linked devices): a transcript wraps what this device sent to others, a sync
  message carries local state (read marks, contacts, trust, groups). Each
  carries its own version (:data:`TRANSCRIPT_VERSION`, :data:`SYNC_VERSION`);
  another one is :class:`UnsupportedPayload`. A transcript never wraps a
  transcript or a sync message.

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
    "SYNC_VERSION",
    "TRANSCRIBED",
    "TRANSCRIPT_VERSION",
    "AttachmentPointer",
    "GroupAction",
    "GroupControl",
    "Payload",
    "PayloadType",
    "Quote",
    "ReceiptKind",
    "SyncContact",
    "SyncGroup",
    "SyncIdentity",
    "SyncKind",
    "SyncMessage",
    "Transcript",
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
#: The version a :class:`Transcript` is written with (and the only one read).
TRANSCRIPT_VERSION: Final = 1
#: The version a :class:`SyncMessage` is written with (and the only one read).
SYNC_VERSION: Final = 1
_MAX_SYNC_IDS: Final = 1000
_MAX_SYNC_ITEMS: Final = 200
_SYNC_TRUST: Final = frozenset({"tofu", "verified"})


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
    TRANSCRIPT = 11
    SYNC = 12


#: What our other devices get a :class:`Transcript` of when this device sends it.
TRANSCRIBED: Final = frozenset(
    {
        PayloadType.TEXT,
        PayloadType.ATTACHMENT,
        PayloadType.TIMER,
        PayloadType.REACTION,
        PayloadType.EDIT,
        PayloadType.DELETE,
        PayloadType.GROUP,
    }
)


class SyncKind(enum.IntEnum):
    """What a SYNC payload tells our other devices."""

    READ = 1  #: these incoming messages were read (``message_ids``)
    CONTACTS = 2  #: contacts: names, direct-chat timers, identity keys and trust
    TRUST = 3  #: a trust decision (accept, verify) about the contacts listed
    GROUPS = 4  #: the state of the groups listed
    REQUEST = 5  #: a new device asks for CONTACTS and GROUPS


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
class SyncIdentity:
    """One device's identity key as we trust it (the user's decision).

    Attributes:
        device: the contact's device id.
        identity_key: its public identity key (33 bytes, public: shown in a repr).
        trust: ``tofu`` (accepted) or ``verified`` (safety number compared).
    """

    device: int
    identity_key: bytes
    trust: str

    def __post_init__(self) -> None:
        _check_int(self.device, "sync.device", 255)
        _check_bytes(self.identity_key, "sync.identity_key", 33, exact=True)
        if self.trust not in _SYNC_TRUST:
            raise UsageError("sync.trust: expected 'tofu' or 'verified'")


@dataclass(frozen=True, slots=True)
class SyncContact:
    """A contact as our devices share it.

    Attributes:
        user: the contact's user name.
        timer_seconds: the direct chat's disappearing timer (0 = off).
        identities: the identity keys we accepted, per device.
    """

    user: str
    timer_seconds: int = 0
    identities: tuple[SyncIdentity, ...] = ()

    def __post_init__(self) -> None:
        _check_str(self.user, "sync.user", _MAX_NAME)
        if not self.user:
            raise UsageError("sync.user: must not be empty")
        _check_int(self.timer_seconds, "sync.timer_seconds", _MAX_U32)
        if not isinstance(self.identities, tuple) or len(self.identities) > 255:
            raise UsageError("sync.identities: expected a tuple of at most 255")
        for identity in self.identities:
            if not isinstance(identity, SyncIdentity):
                raise UsageError("sync.identities: expected SyncIdentity values")


@dataclass(frozen=True, slots=True)
class SyncGroup:
    """A group we are a member of, as our devices share it.

    Attributes mirror :class:`GroupControl`'s state, plus the group chat's timer.
    """

    group_id: str
    name: str = ""
    members: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    revision: int = 0
    timer_seconds: int = 0

    def __post_init__(self) -> None:
        _check_str(self.group_id, "sync.group_id", _MAX_NAME)
        if not self.group_id:
            raise UsageError("sync.group_id: must not be empty")
        # The same checks as a group change's state.
        GroupControl(
            GroupAction.CREATE,
            name=self.name,
            members=self.members,
            admins=self.admins,
            revision=self.revision,
        )
        _check_int(self.timer_seconds, "sync.timer_seconds", _MAX_U32)


@dataclass(frozen=True, slots=True)
class SyncMessage:
    """Local state one of our devices tells the others (a SYNC payload).

    Attributes:
        kind: what it says.
        message_ids: READ: the incoming messages read (16 bytes each).
        contacts: CONTACTS, TRUST: the contacts concerned.
        groups: GROUPS: the groups concerned.
        version: :data:`SYNC_VERSION`.
    """

    kind: SyncKind
    message_ids: tuple[bytes, ...] = ()
    contacts: tuple[SyncContact, ...] = ()
    groups: tuple[SyncGroup, ...] = ()
    version: int = SYNC_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SyncKind):
            raise UsageError("sync.kind: expected a SyncKind")
        if self.version != SYNC_VERSION:
            raise UsageError(f"sync.version: this build writes {SYNC_VERSION}")
        if not isinstance(self.message_ids, tuple) or len(self.message_ids) > _MAX_SYNC_IDS:
            raise UsageError(f"sync.message_ids: expected a tuple of at most {_MAX_SYNC_IDS}")
        for mid in self.message_ids:
            _check_id(mid, "sync.message_ids")
        for what, items, kind in (
            ("contacts", self.contacts, SyncContact),
            ("groups", self.groups, SyncGroup),
        ):
            if not isinstance(items, tuple) or len(items) > _MAX_SYNC_ITEMS:
                raise UsageError(f"sync.{what}: expected a tuple of at most {_MAX_SYNC_ITEMS}")
            if any(not isinstance(item, kind) for item in items):
                raise UsageError(f"sync.{what}: expected {kind.__name__} values")
        if self.kind is SyncKind.READ and not self.message_ids:
            raise UsageError("a READ sync names the messages read")


@dataclass(frozen=True, slots=True)
class Transcript:
    """What this device sent to others, as our other devices get it.

    Attributes:
        content: the payload as the recipients got it (its message id and
            timestamp are the message's own).
        to_user: the recipient of a direct message ("" for a group).
        to_group: the group it went to ("" for a direct message); equal to
            ``content.group_id``.
        version: :data:`TRANSCRIPT_VERSION`.
    """

    content: Payload
    to_user: str = ""
    to_group: str = ""
    version: int = TRANSCRIPT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.content, Payload):
            raise UsageError("transcript.content: expected a Payload")
        if self.version != TRANSCRIPT_VERSION:
            raise UsageError(f"transcript.version: this build writes {TRANSCRIPT_VERSION}")
        if self.content.type not in TRANSCRIBED:
            raise UsageError(f"a {self.content.type.name} payload is not transcribed")
        _check_str(self.to_user, "transcript.to_user", _MAX_NAME)
        _check_str(self.to_group, "transcript.to_group", _MAX_NAME)
        if bool(self.to_user) == bool(self.to_group):
            raise UsageError("a transcript names a user or a group, not both")
        if self.to_group != self.content.group_id:
            raise UsageError("transcript.to_group must be its content's group id")

    @property
    def chat_id(self) -> str:
        """The chat it belongs to (``dm:<user>`` or ``group:<id>``)."""
        return f"group:{self.to_group}" if self.to_group else f"dm:{self.to_user}"


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
        transcript: what we sent elsewhere (TRANSCRIPT only; own devices).
        sync: local state of another of our devices (SYNC only).
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
    transcript: Transcript | None = None
    sync: SyncMessage | None = None
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
        if (kind is PayloadType.TRANSCRIPT) != (self.transcript is not None):
            raise UsageError("a TRANSCRIPT payload, and only it, carries a transcript")
        if self.transcript is not None:
            if not isinstance(self.transcript, Transcript):
                raise UsageError("transcript: expected a Transcript")
            if self.transcript.content.message_id != self.message_id:
                raise UsageError("a transcript carries its message's own id")
        if (kind is PayloadType.SYNC) != (self.sync is not None):
            raise UsageError("a SYNC payload, and only it, carries a sync message")
        if self.sync is not None and not isinstance(self.sync, SyncMessage):
            raise UsageError("sync: expected a SyncMessage")

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

    identity = fdp.message_type.add(name="SyncIdentity")
    add(identity, "device", 1, f.TYPE_UINT32)
    add(identity, "identity_key", 2, f.TYPE_BYTES)
    add(identity, "trust", 3, f.TYPE_STRING)

    contact = fdp.message_type.add(name="SyncContact")
    add(contact, "user", 1, f.TYPE_STRING)
    add(contact, "timer_seconds", 2, f.TYPE_UINT32)
    add(contact, "identities", 3, f.TYPE_MESSAGE, rep, ref="SyncIdentity")

    sgroup = fdp.message_type.add(name="SyncGroup")
    add(sgroup, "group_id", 1, f.TYPE_STRING)
    add(sgroup, "name", 2, f.TYPE_STRING)
    add(sgroup, "members", 3, f.TYPE_STRING, rep)
    add(sgroup, "admins", 4, f.TYPE_STRING, rep)
    add(sgroup, "revision", 5, f.TYPE_UINT64)
    add(sgroup, "timer_seconds", 6, f.TYPE_UINT32)

    sync = fdp.message_type.add(name="SyncMessage")
    add(sync, "version", 1, f.TYPE_UINT32)
    add(sync, "kind", 2, f.TYPE_UINT32)
    add(sync, "message_ids", 3, f.TYPE_BYTES, rep)
    add(sync, "contacts", 4, f.TYPE_MESSAGE, rep, ref="SyncContact")
    add(sync, "groups", 5, f.TYPE_MESSAGE, rep, ref="SyncGroup")

    transcript = fdp.message_type.add(name="Transcript")
    add(transcript, "version", 1, f.TYPE_UINT32)
    add(transcript, "to_user", 2, f.TYPE_STRING)
    add(transcript, "to_group", 3, f.TYPE_STRING)
    add(transcript, "content", 4, f.TYPE_MESSAGE, ref="Content")

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
    add(content, "transcript", 17, f.TYPE_MESSAGE, ref="Transcript")
    add(content, "sync", 18, f.TYPE_MESSAGE, ref="SyncMessage")
    add(content, "access_key", 16, f.TYPE_BYTES)

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return {
        name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"blindpost.payload.{name}")
        )
        for name in ("Quote", "Attachment", "GroupControl", "Transcript", "SyncMessage", "Content")
    }


_PB: Final = _build_messages()


def _set(message: Any, name: str, value: Any) -> None:
    # Defaults are left unset so the encoding stays minimal and deterministic.
    if value:
        setattr(message, name, value)


def _to_proto(payload: Payload, msg: Any = None) -> Any:
    msg = _PB["Content"]() if msg is None else msg
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
    if payload.transcript is not None:
        t, pt = payload.transcript, msg.transcript
        pt.version = t.version
        _set(pt, "to_user", t.to_user)
        _set(pt, "to_group", t.to_group)
        _to_proto(t.content, pt.content)
    if payload.sync is not None:
        _sync_to_proto(payload.sync, msg.sync)
    _set(msg, "access_key", payload.access_key)
    return msg


def _sync_to_proto(sync: SyncMessage, ps: Any) -> None:
    ps.version = sync.version
    ps.kind = int(sync.kind)
    ps.message_ids.extend(sync.message_ids)
    for c in sync.contacts:
        pc = ps.contacts.add()
        pc.user = c.user
        _set(pc, "timer_seconds", c.timer_seconds)
        for i in c.identities:
            pi = pc.identities.add()
            pi.device = i.device
            pi.identity_key = i.identity_key
            pi.trust = i.trust
    for g in sync.groups:
        pg = ps.groups.add()
        pg.group_id = g.group_id
        _set(pg, "name", g.name)
        pg.members.extend(g.members)
        pg.admins.extend(g.admins)
        _set(pg, "revision", g.revision)
        _set(pg, "timer_seconds", g.timer_seconds)


def _sync_from_proto(ps: Any) -> SyncMessage:
    if ps.version != SYNC_VERSION:
        raise UnsupportedPayload(ps.version)
    return SyncMessage(
        kind=_enum(SyncKind, ps.kind, "sync kind"),
        message_ids=tuple(bytes(m) for m in ps.message_ids),
        contacts=tuple(
            SyncContact(
                c.user,
                c.timer_seconds,
                tuple(SyncIdentity(i.device, bytes(i.identity_key), i.trust) for i in c.identities),
            )
            for c in ps.contacts
        ),
        groups=tuple(
            SyncGroup(
                g.group_id, g.name, tuple(g.members), tuple(g.admins), g.revision, g.timer_seconds
            )
            for g in ps.groups
        ),
    )


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> Any:
    try:
        return kind(value)
    except ValueError as exc:
        raise InvalidMessage(f"payload: unknown {what} {value}") from exc


def _from_proto(msg: Any, *, nested: bool = False) -> Payload:
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
    transcript = None
    if msg.HasField("transcript"):
        pt = msg.transcript
        if nested:
            raise InvalidMessage("payload: a transcript inside a transcript")
        if pt.version != TRANSCRIPT_VERSION:
            raise UnsupportedPayload(pt.version)
        transcript = Transcript(
            _from_proto(pt.content, nested=True), pt.to_user, pt.to_group, pt.version
        )
    sync = _sync_from_proto(msg.sync) if msg.HasField("sync") else None
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
        transcript=transcript,
        sync=sync,
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
