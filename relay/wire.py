# Invariants: every parser here either returns a fully validated value or raises BadRequest /
# TooLarge; nothing here touches storage or the network. Binary layouts are those of
# docs/relay-api.md (big-endian), versioned by their first (op) byte. The SEND/DELIVER codec,
# the username rule and MAX_DEVICE_ID are blindpost_wire's (shared with the SDK); this module
# maps the neutral WireError to BadRequest/TooLarge and keeps its public names for its callers.
"""Wire formats: base64, JSON request validation and the binary SEND/DELIVER frames."""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from typing import Any

from blindpost_wire import frames as _frames
from blindpost_wire.frames import MESSAGE_ID_LEN, OP_DELIVER, OP_SEND, OP_SEND_AFTER, WireError
from blindpost_wire.names import MAX_DEVICE_ID, RESERVED_USERNAMES, USERNAME_RE
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
    "OP_SEND_AFTER",
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
    "json_body",
    "message_json",
    "parse_ack",
    "parse_ascii_uint",
    "parse_device_id",
    "parse_json_send",
    "parse_key_upload",
    "parse_username",
]

# USERNAME_RE, MAX_DEVICE_ID, RESERVED_USERNAMES, MESSAGE_ID_LEN and the ops are
# blindpost_wire's, re-exported here so the relay's modules keep importing them from one place.
MAX_PREKEY_ID = (1 << 24) - 1
MAX_REGISTRATION_ID = (1 << 31) - 1
PUBLIC_KEY_LEN = 33
SIGNATURE_LEN = 64
AUTH_KEY_LEN = 32
MAX_OTPKS_PER_UPLOAD = 100
MAX_ACK_IDS = 1000


def json_body(body: bytes) -> Any:
    """A request body parsed as JSON.

    Raises:
        BadRequest: not valid JSON (or absurdly deep nesting).
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadRequest("body is not valid JSON") from exc


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
    """Validate a device id (1..MAX_DEVICE_ID), accepting ints or decimal strings.

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


def _relay_error(exc: WireError) -> BadRequest | TooLarge:
    """Map the neutral codec error to the relay's typed error (same message and code)."""
    if exc.code == "too_large":
        return TooLarge(exc.message)
    if exc.code == "invalid_username":
        return BadRequest(exc.message, code="invalid_username")
    return BadRequest(exc.message)


def encode_send(env: Envelope) -> bytes:
    """Encode a SEND frame (op 0x02); the inverse of ``decode_send``.

    Raises:
        BadRequest: a field does not fit the frame layout.
    """
    try:
        return _frames.encode_send(env.message_id, env.recipients, env.body, after=env.after)
    except WireError as exc:
        raise _relay_error(exc) from exc


def decode_send(frame: bytes, *, max_recipients: int, max_body: int) -> Envelope:
    """Decode and validate a binary SEND or SEND_AFTER frame (also the binary HTTP send body).

    Raises:
        BadRequest: truncated or malformed frame. TooLarge: body over ``max_body``.
    """
    try:
        mid, after, recipients, body = _frames.decode_send_frame(
            frame, address=Address, max_recipients=max_recipients, max_body=max_body
        )
    except WireError as exc:
        raise _relay_error(exc) from exc
    return Envelope(mid, recipients, body, after)


def encode_deliver(msg: StoredMessage) -> bytes:
    """Encode a DELIVER frame (op 0x01) for one stored message.

    Raises:
        BadRequest: a field does not fit the frame layout.
    """
    sender = msg.sender
    try:
        return _frames.encode_deliver(
            msg.seq, msg.message_id, sender.user, sender.device, msg.stored_at, msg.body
        )
    except WireError as exc:
        raise _relay_error(exc) from exc


def decode_deliver(frame: bytes) -> StoredMessage:
    """Decode a DELIVER frame (used by tests and clients).

    Raises:
        BadRequest: truncated, wrong op, or a bad sender.
    """
    try:
        seq, mid, user, device, stored_at, body = _frames.decode_deliver(frame)
    except WireError as exc:
        raise _relay_error(exc) from exc
    return StoredMessage(seq, mid, Address(user, device), stored_at, body)


def parse_ack(doc: Any) -> tuple[list[bytes], list[bytes]]:
    """Validate ``{"ids": [b64, ...], "settled": [b64, ...]}``: the 16-byte ids of messages
    to remove from the caller's mailbox, and of the caller's own sends it settles
    (``RelayStore.ack``); each list at most 1000 long, either may be absent or empty, not both.

    Raises:
        BadRequest: malformed.
    """
    body = _obj(doc, "body")
    lists = []
    for name in ("ids", "settled"):
        items = body.get(name, [])
        if not isinstance(items, list) or len(items) > MAX_ACK_IDS:
            raise BadRequest(f"{name} must be a list of at most {MAX_ACK_IDS} message ids")
        lists.append([b64d(i, f"{name}[]", MESSAGE_ID_LEN) for i in items])
    ids, settled = lists
    if not ids and not settled:
        raise BadRequest("an ack names at least one message id (ids or settled)")
    return ids, settled


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
