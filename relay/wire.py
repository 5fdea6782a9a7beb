# Invariants: every parser here either returns a fully validated value or raises BadRequest /
# TooLarge; nothing here touches storage or the network. Binary layouts are those of
# docs/relay-api.md (big-endian), versioned by their first (op) byte.
"""Wire formats: base64, JSON request validation and the binary SEND/DELIVER frames."""

from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Mapping
from typing import Any

from relay.errors import BadRequest, TooLarge
from relay.store.base import (
    Address,
    DeviceBundle,
    Envelope,
    KeyUpload,
    OneTimePrekey,
    SignedPrekey,
    StoredMessage,
)

__all__ = [
    "AUTH_KEY_LEN",
    "MAX_DEVICE_ID",
    "MAX_PREKEY_ID",
    "MESSAGE_ID_LEN",
    "OP_DELIVER",
    "OP_SEND",
    "PUBLIC_KEY_LEN",
    "RESERVED_USERNAMES",
    "SIGNATURE_LEN",
    "USERNAME_RE",
    "b64d",
    "b64e",
    "bundle_json",
    "decode_deliver",
    "decode_send",
    "encode_deliver",
    "encode_send",
    "message_json",
    "parse_ack_ids",
    "parse_ascii_uint",
    "parse_device_id",
    "parse_json_send",
    "parse_key_upload",
    "parse_username",
]

USERNAME_RE = re.compile(r"[a-z0-9_]{3,32}")
MAX_DEVICE_ID = 127
MAX_PREKEY_ID = (1 << 24) - 1
MAX_REGISTRATION_ID = (1 << 31) - 1
MESSAGE_ID_LEN = 16
PUBLIC_KEY_LEN = 33
SIGNATURE_LEN = 64
AUTH_KEY_LEN = 32
MAX_OTPKS_PER_UPLOAD = 100
MAX_ACK_IDS = 1000

OP_DELIVER = 0x01
OP_SEND = 0x02

_DELIVER_HEAD = struct.Struct(">BQ16sQ")
_SEND_HEAD = struct.Struct(">B16sH")


def b64e(data: bytes) -> str:
    """Encode bytes as standard padded base64 text."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64d(value: Any, what: str, length: int | None = None) -> bytes:
    """Decode standard padded base64, optionally requiring an exact decoded length.

    Raises:
        BadRequest: not a string, not valid base64, or wrong length.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        # strict_mode accepts exactly what b64decode(validate=True) accepts (alphabet and
        # padding checked in C), without its per-call regex: ~0.25 us instead of ~0.65 us per id.
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{what} is not valid base64") from exc
    if length is not None and len(data) != length:
        raise BadRequest(f"{what} must be {length} bytes")
    return data


def parse_username(value: Any, what: str = "username") -> str:
    """Validate a username (``^[a-z0-9_]{3,32}$``).

    Raises:
        BadRequest: ``invalid_username``.
    """
    if not isinstance(value, str) or USERNAME_RE.fullmatch(value) is None:
        raise BadRequest(f"{what} must match ^[a-z0-9_]{{3,32}}$", code="invalid_username")
    return value


RESERVED_USERNAMES = frozenset({"count"})


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{what} must be an integer {lo}..{hi}")
    return value


_ASCII_DIGITS = frozenset("0123456789")


def parse_ascii_uint(text: str, what: str, max_digits: int) -> int:
    """Parse a non-negative decimal integer written in ASCII digits only.

    ``str.isdigit()`` and ``int()`` accept every Unicode decimal (``"\u0663"``, fullwidth
    digits) and ``isdigit()`` even superscripts that ``int()`` then refuses, so every number the
    relay reads from a header, query or frame goes through here instead.

    Args:
        text: the raw text.
        what: the field name, for the error message.
        max_digits: longest accepted text (bounds ``int()``'s work).

    Returns:
        The integer.

    Raises:
        BadRequest: empty, too long, or any character outside ``0-9``.
    """
    if not 0 < len(text) <= max_digits or not _ASCII_DIGITS.issuperset(text):
        raise BadRequest(f"{what} must be at most {max_digits} ASCII digits")
    return int(text)


def parse_device_id(value: Any, what: str = "device_id") -> int:
    """Validate a device id (1..127), accepting ints or ASCII decimal strings.

    Raises:
        BadRequest: not an integer in range.
    """
    if isinstance(value, str):
        if len(value) > 1 and value[0] == "0":
            raise BadRequest(f"{what} must be an integer 1..{MAX_DEVICE_ID}")
        try:
            value = parse_ascii_uint(value, what, 3)
        except BadRequest:
            raise BadRequest(f"{what} must be an integer 1..{MAX_DEVICE_ID}") from None
    return _int(value, what, 1, MAX_DEVICE_ID)


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def parse_key_upload(doc: Any) -> KeyUpload:
    """Validate a ``PUT /v1/keys`` body.

    Raises:
        BadRequest: any field missing or malformed, or more than 100 one-time prekeys.
    """
    body = _obj(doc, "body")
    identity = b64d(body.get("identity_key"), "identity_key", PUBLIC_KEY_LEN)
    reg = _int(body.get("registration_id"), "registration_id", 0, MAX_REGISTRATION_ID)
    spk_doc = body.get("signed_prekey")
    spk = None
    if spk_doc is not None:
        s = _obj(spk_doc, "signed_prekey")
        spk = SignedPrekey(
            _int(s.get("id"), "signed_prekey.id", 0, MAX_PREKEY_ID),
            b64d(s.get("public_key"), "signed_prekey.public_key", PUBLIC_KEY_LEN),
            b64d(s.get("signature"), "signed_prekey.signature", SIGNATURE_LEN),
        )
    otpk_docs = body.get("one_time_prekeys", [])
    if not isinstance(otpk_docs, list) or len(otpk_docs) > MAX_OTPKS_PER_UPLOAD:
        raise BadRequest(f"one_time_prekeys must be a list of at most {MAX_OTPKS_PER_UPLOAD}")
    otpks: dict[int, OneTimePrekey] = {}
    for item in otpk_docs:
        o = _obj(item, "one_time_prekeys[]")
        key = OneTimePrekey(
            _int(o.get("id"), "one_time_prekeys[].id", 0, MAX_PREKEY_ID),
            b64d(o.get("public_key"), "one_time_prekeys[].public_key", PUBLIC_KEY_LEN),
        )
        otpks[key.id] = key
    return KeyUpload(identity, reg, spk, tuple(otpks.values()))


def _check_recipients(recipients: list[Address], max_recipients: int) -> tuple[Address, ...]:
    if not 1 <= len(recipients) <= max_recipients:
        raise BadRequest(f"recipients must list 1..{max_recipients} devices")
    if len(set(recipients)) != len(recipients):
        raise BadRequest("recipients contains duplicates")
    return tuple(recipients)


def parse_json_send(doc: Any, *, max_recipients: int, max_body: int) -> Envelope:
    """Validate a JSON ``PUT /v1/messages`` body.

    Raises:
        BadRequest: malformed fields. TooLarge: body over ``max_body``.
    """
    body = _obj(doc, "body")
    mid = b64d(body.get("id"), "id", MESSAGE_ID_LEN)
    rdocs = body.get("recipients")
    if not isinstance(rdocs, list):
        raise BadRequest("recipients must be a list")
    if len(rdocs) > max_recipients:
        raise BadRequest(f"recipients must list 1..{max_recipients} devices")
    recipients = []
    for r in rdocs:
        o = _obj(r, "recipients[]")
        recipients.append(
            Address(
                parse_username(o.get("user"), "recipients[].user"),
                parse_device_id(o.get("device"), "recipients[].device"),
            )
        )
    raw = body.get("body")
    if isinstance(raw, str) and len(raw) > (max_body * 4) // 3 + 4:
        raise TooLarge("message body too large")
    data = b64d(raw, "body")
    if len(data) > max_body:
        raise TooLarge("message body too large")
    return Envelope(mid, _check_recipients(recipients, max_recipients), data)


def encode_send(env: Envelope) -> bytes:
    """Encode a SEND frame (op 0x02); the inverse of ``decode_send``."""
    parts = [_SEND_HEAD.pack(OP_SEND, env.message_id, len(env.recipients))]
    for r in env.recipients:
        name = r.user.encode("ascii")
        parts.append(bytes((len(name),)) + name + bytes((r.device,)))
    parts.append(env.body)
    return b"".join(parts)


def decode_send(frame: bytes, *, max_recipients: int, max_body: int) -> Envelope:
    """Decode and validate a binary SEND frame (also the binary HTTP send body).

    Raises:
        BadRequest: truncated or malformed frame. TooLarge: body over ``max_body``.
    """
    if len(frame) < _SEND_HEAD.size:
        raise BadRequest("truncated send frame")
    op, mid, count = _SEND_HEAD.unpack_from(frame, 0)
    if op != OP_SEND:
        raise BadRequest("unknown frame op")
    if not 1 <= count <= max_recipients:
        raise BadRequest(f"recipients must list 1..{max_recipients} devices")
    pos = _SEND_HEAD.size
    end = len(frame)
    recipients = []
    names = _VALID_NAMES
    for _ in range(count):
        if pos >= end:
            raise BadRequest("truncated send frame")
        n = frame[pos]
        if pos + 1 + n + 1 > end:
            raise BadRequest("truncated send frame")
        raw = bytes(frame[pos + 1 : pos + 1 + n])
        name = names.get(raw)
        if name is None:
            try:
                name = parse_username(raw.decode("ascii"), "recipient user")
            except UnicodeDecodeError as exc:
                raise BadRequest(
                    "recipient username must be ASCII", code="invalid_username"
                ) from exc
            if len(names) >= _VALID_NAMES_MAX:
                names.clear()
            names[raw] = name
        device = frame[pos + 1 + n]
        if not 1 <= device <= MAX_DEVICE_ID:
            raise BadRequest(f"recipient device must be an integer 1..{MAX_DEVICE_ID}")
        recipients.append(Address(name, device))
        pos += n + 2
    if end - pos > max_body:
        raise TooLarge("message body too large")
    checked = (recipients[0],) if count == 1 else _check_recipients(recipients, max_recipients)
    return Envelope(bytes(mid), checked, bytes(frame[pos:]))


# Usernames already validated by decode_send (bytes as framed -> str): a sender names the same
# few recipients again and again, and the regex was most of a 1:1 SEND's decoding cost.
_VALID_NAMES: dict[bytes, str] = {}
_VALID_NAMES_MAX = 4096


def encode_deliver(msg: StoredMessage) -> bytes:
    """Encode a DELIVER frame (op 0x01) for one stored message."""
    name = msg.sender.user.encode("ascii")
    return b"".join(
        (
            _DELIVER_HEAD.pack(OP_DELIVER, msg.seq, msg.message_id, msg.stored_at),
            bytes((len(name),)),
            name,
            bytes((msg.sender.device,)),
            msg.body,
        )
    )


def decode_deliver(frame: bytes) -> StoredMessage:
    """Decode a DELIVER frame (used by tests and clients).

    Raises:
        BadRequest: truncated or wrong op.
    """
    if len(frame) < _DELIVER_HEAD.size + 2 or frame[0] != OP_DELIVER:
        raise BadRequest("not a deliver frame")
    _, seq, mid, stored = _DELIVER_HEAD.unpack_from(frame, 0)
    pos = _DELIVER_HEAD.size
    n = frame[pos]
    user = frame[pos + 1 : pos + 1 + n].decode("ascii")
    device = frame[pos + 1 + n]
    return StoredMessage(
        seq, bytes(mid), Address(user, device), stored, bytes(frame[pos + 2 + n :])
    )


def parse_ack_ids(doc: Any) -> list[bytes]:
    """Validate ``{"ids": [b64, ...]}`` (1..1000 16-byte ids).

    Raises:
        BadRequest: malformed.
    """
    body = _obj(doc, "body")
    ids = body.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_ACK_IDS:
        raise BadRequest(f"ids must be a list of 1..{MAX_ACK_IDS} message ids")
    return [b64d(i, "ids[]", MESSAGE_ID_LEN) for i in ids]


def message_json(msg: StoredMessage) -> dict[str, Any]:
    """JSON form of a stored message (HTTP mailbox read)."""
    return {
        "seq": msg.seq,
        "id": b64e(msg.message_id),
        "sender": {"user": msg.sender.user, "device": msg.sender.device},
        "stored_at": msg.stored_at,
        "body": b64e(msg.body),
    }


def bundle_json(bundle: DeviceBundle) -> dict[str, Any]:
    """JSON form of one device's prekey bundle."""
    spk = bundle.signed_prekey
    otpk = bundle.one_time_prekey
    return {
        "device_id": bundle.device_id,
        "registration_id": bundle.registration_id,
        "identity_key": b64e(bundle.identity_key),
        "signed_prekey": {
            "id": spk.id,
            "public_key": b64e(spk.public_key),
            "signature": b64e(spk.signature),
        },
        "one_time_prekey": None
        if otpk is None
        else {"id": otpk.id, "public_key": b64e(otpk.public_key)},
    }
