"""Pure request builders and response parsers for every endpoint of docs/relay-api.md.

Invariants:

* Pure, in the style of h11 / matrix-nio's ``Api``: a builder validates its arguments and
  returns a :class:`Request` (method, target, body, extra headers, accepted statuses and a
  parser); an adapter signs it (:meth:`Request.auth_headers`), performs it and hands the
  :class:`Response` back to :meth:`Request.handle`. No I/O, no clock, no aiohttp here.
* Builders raise :class:`~e2ee.errors.UsageError` for bad arguments, before anything is
  sent. :meth:`Request.handle` returns a typed result or raises a
  :class:`~e2ee.transport.errors.RelayRejected` subclass (non-accepted status, mapped by
  :func:`~e2ee.transport.errors.error_from_response`) or
  :class:`~e2ee.transport.errors.MalformedResponse` (accepted status, body off-spec).
* Targets are built from validated ASCII parts only (usernames, ints, hex ids), so the
  target that is signed is byte-for-byte the one on the request line.
* Response header names are looked up lower-case; adapters pass lower-cased keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from blindpost_wire.names import (
    MAX_DEVICE_ID,
    RESERVED_USERNAMES,
    SEALED_DEVICE_ID,
    is_sealed_sender,
)
from blindpost_wire.registration import MAX_POW_DIFFICULTY, REGISTRATION_MODES
from e2ee.errors import UsageError
from e2ee.transport.auth import DeviceSigner, check_device_id, check_username
from e2ee.transport.errors import MalformedResponse, RelayRejected, error_from_response
from e2ee.transport.frames import (
    MESSAGE_ID_LEN,
    Delivery,
    ack_fields,
    b64d,
    b64e,
    check_message_id,
    check_recipients,
    encode_send,
)

__all__ = [
    "BLOB_ID_RE",
    "CT_JSON",
    "CT_SEND",
    "RESERVED_USERNAMES",
    "BlobInfo",
    "BlobRange",
    "DeviceInfo",
    "MessagePage",
    "Registered",
    "RegistrationInfo",
    "Request",
    "Response",
    "SendReceipt",
    "ack_messages",
    "add_device",
    "delete_blob",
    "download_blob",
    "fetch_bundles",
    "fetch_messages",
    "healthz",
    "key_count",
    "list_devices",
    "origin_of",
    "parse_content_range",
    "register",
    "registration_info",
    "rejection",
    "remove_device",
    "send_message",
    "unsatisfied_range_total",
    "upload_blob",
    "upload_keys",
    "websocket_upgrade",
]

CT_JSON = "application/json"
CT_SEND = "application/vnd.blindpost.send"
BLOB_ID_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes \*/(\d+)")
AUTH_KEY_LEN = 32
# RESERVED_USERNAMES (names the relay never registers because ``/v1/keys/<name>`` would hit
# another route) is blindpost_wire's, re-exported here.

T = TypeVar("T")

if TYPE_CHECKING:
    from yarl import URL


# -- the request / response pair ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """What an adapter got back: status, lower-cased headers and the (possibly empty) body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One relay request, ready to sign and send.

    Attributes:
        method: HTTP method.
        target: raw path and query (what is signed and put on the request line).
        body: the body bytes (empty for GET/DELETE and for streamed uploads).
        headers: headers other than the auth headers (Content-Type, Range).
        accepted: statuses that mean success; any other status raises.
        parse: turns an accepted :class:`Response` into the result.
        signed: False only for the public endpoints (``/healthz``).
        body_sha256: for a streamed body the adapter sends separately: its digest, which
            is signed and sent as ``X-Blindpost-Content-SHA256``.
    """

    method: str
    target: str
    parse: Callable[[Response], T] = field(repr=False)
    body: bytes = field(default=b"", repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    accepted: frozenset[int] = frozenset({200})
    signed: bool = True
    body_sha256: str | None = None

    def auth_headers(
        self, signer: DeviceSigner, *, now_ms: int | None = None, nonce: str | None = None
    ) -> dict[str, str]:
        """Return every header to send: :attr:`headers` plus the signed auth headers.

        Args:
            signer: the device's signer.
            now_ms: unix ms (``time.time()`` when None).
            nonce: nonce (random when None).

        Returns:
            The header dict (the auth headers alone for an unsigned request are omitted).

        Raises:
            UsageError: see :meth:`DeviceSigner.sign_headers`.
        """
        out = dict(self.headers)
        if self.signed:
            out.update(
                signer.sign_headers(
                    self.method,
                    self.target,
                    self.body,
                    now_ms=now_ms,
                    nonce=nonce,
                    body_sha256=self.body_sha256,
                )
            )
        return out

    def handle(self, response: Response) -> T:
        """Turn the relay's answer into the typed result, or raise the typed error.

        Args:
            response: status, lower-cased headers and body.

        Returns:
            The parsed result.

        Raises:
            RelayRejected: (a subclass for known statuses) the status is not accepted.
            MalformedResponse: accepted status but the body is not what the spec says.
        """
        if response.status not in self.accepted:
            raise rejection(response)
        return self.parse(response)


def rejection(response: Response) -> RelayRejected:
    """Build the typed error for a non-accepted response (the JSON error body is optional).

    Args:
        response: the relay's answer.

    Returns:
        A :class:`~e2ee.transport.errors.RelayRejected` subclass instance.
    """
    doc: Mapping[str, Any] | None
    try:
        loaded = json.loads(response.body) if response.body else None
    except (ValueError, UnicodeError, RecursionError):
        loaded = None
    doc = loaded if isinstance(loaded, dict) else None
    return error_from_response(
        response.status, doc, retry_after_header=response.headers.get("retry-after")
    )


# -- result types ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered:
    """A device now exists: the answer of ``POST /v1/accounts`` and ``POST /v1/devices``."""

    username: str
    device_id: int


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of the caller's user (``GET /v1/devices``)."""

    device_id: int
    created_at: int
    has_keys: bool
    name: bytes | None = None  # as given when the device was added (the SDK encrypts it)
    last_seen: int | None = None  # unix ms, rounded down by the relay


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """A message is committed durably (``PUT /v1/messages`` 200, or a 200 ``send_result``)."""

    id: bytes
    recipients: int
    stored_at: int


@dataclass(frozen=True, slots=True)
class MessagePage:
    """A page of the caller's mailbox (``GET /v1/messages``); ``more`` means read on."""

    messages: tuple[Delivery, ...]
    more: bool

    @property
    def last_seq(self) -> int | None:
        """The ``seq`` to pass as ``after`` for the next page (None for an empty page)."""
        return self.messages[-1].seq if self.messages else None


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """An uploaded blob: its content address (lowercase hex SHA-256) and size."""

    id: str
    size: int
    created: bool


@dataclass(frozen=True, slots=True)
class BlobRange:
    """Headers of a blob download: where the body starts and how large the blob is.

    Attributes:
        status: 200 (whole blob) or 206 (a range).
        start: offset of the first body byte in the blob.
        length: body length, when announced.
        total: full blob size, when known.
    """

    status: int
    start: int
    length: int | None
    total: int | None


@dataclass(frozen=True, slots=True)
class RegistrationInfo:
    """``GET /v1/registration``: the relay's registration mode (``open``, ``pow``,
    ``invite`` or ``closed``) and, for ``pow``, a challenge with its difficulty (bits)."""

    mode: str
    challenge: str | None = None
    difficulty: int = 0


# -- JSON helpers ------------------------------------------------------------------------


def _json_body(doc: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise UsageError("request body is not JSON-serialisable") from exc


def _json_object(response: Response) -> dict[str, Any]:
    try:
        doc = json.loads(response.body)
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise MalformedResponse(f"status {response.status}: body is not JSON") from exc
    if not isinstance(doc, dict):
        raise MalformedResponse(f"status {response.status}: body is not a JSON object")
    return doc


def _int_field(doc: Mapping[str, Any], key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MalformedResponse(f"response field {key!r} must be an integer {lo}..{hi}")
    return value


def _str_field(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise MalformedResponse(f"response field {key!r} must be a string")
    return value


def _user_field(doc: Mapping[str, Any], key: str) -> str:
    try:
        return check_username(_str_field(doc, key))
    except UsageError as exc:
        raise MalformedResponse(f"response field {key!r} is not a valid username") from exc


def _registered(response: Response) -> Registered:
    doc = _json_object(response)
    return Registered(_user_field(doc, "username"), _int_field(doc, "device_id", 1, MAX_DEVICE_ID))


def _auth_key(auth_key: bytes) -> str:
    if not isinstance(auth_key, bytes | bytearray) or len(auth_key) != AUTH_KEY_LEN:
        raise UsageError("an auth key is a 32-byte Ed25519 public key")
    return b64e(bytes(auth_key))


# -- accounts and devices ----------------------------------------------------------------


_REGISTRATION_MODES = frozenset(REGISTRATION_MODES)


def _registration_info(response: Response) -> RegistrationInfo:
    doc = _json_object(response)
    mode = doc.get("mode")
    if mode not in _REGISTRATION_MODES:
        raise MalformedResponse("response field 'mode' is not a registration mode")
    if mode != "pow":
        return RegistrationInfo(str(mode))
    challenge = _str_field(doc, "challenge")
    if not challenge.isascii() or len(challenge) > 200:
        raise MalformedResponse("response field 'challenge' is not a challenge")
    return RegistrationInfo("pow", challenge, _int_field(doc, "difficulty", 0, MAX_POW_DIFFICULTY))


def registration_info() -> Request[RegistrationInfo]:
    """``GET /v1/registration`` (public, unsigned): the registration mode.

    A relay older than registration modes answers 404; treat that as ``open``.

    Returns:
        The request; its result is :class:`RegistrationInfo`.
    """
    return Request("GET", "/v1/registration", _registration_info, signed=False)


def register(
    username: str,
    device_id: int,
    auth_key: bytes,
    *,
    pow: tuple[str, int] | None = None,
    invite: str | None = None,
) -> Request[Registered]:
    """``POST /v1/accounts``: register a username with its first device.

    Sign it with the signer whose public key is ``auth_key`` (proof of possession).

    Args:
        username: the new name.
        device_id: the first device's id (1..MAX_DEVICE_ID).
        auth_key: that device's 32-byte Ed25519 public key.
        pow: (challenge, nonce) solving the relay's challenge for ``username``
            (:func:`blindpost_wire.registration.solve_pow`).
        invite: an invite code from the relay's operator.

    Returns:
        The request; its result is :class:`Registered`. Errors: ``UsernameTaken`` (409),
        ``InvalidRequest`` (400), ``RegistrationRefused`` and its subclasses (403),
        ``AuthFailed``, ``RateLimited``.

    Raises:
        UsageError: bad username, device id, key length or invite.
    """
    doc: dict[str, Any] = {
        "username": check_username(username),
        "device_id": check_device_id(device_id),
        "auth_key": _auth_key(auth_key),
    }
    if invite is not None:
        if not isinstance(invite, str) or not invite.strip() or len(invite.strip()) > 100:
            raise UsageError("an invite code is a non-empty string of at most 100 characters")
        doc["invite"] = invite.strip()
    if pow is not None:
        doc["pow"] = {"challenge": pow[0], "nonce": pow[1]}
    body = _json_body(doc)
    return Request(
        "POST",
        "/v1/accounts",
        _registered,
        body=body,
        headers={"Content-Type": CT_JSON},
        accepted=frozenset({201}),
    )


def add_device(device_id: int, auth_key: bytes, name: bytes | None = None) -> Request[Registered]:
    """``POST /v1/devices``: add a device (signed by an existing device of the same user).

    Args:
        device_id: the new device's id.
        auth_key: the new device's 32-byte Ed25519 public key.
        name: the device's name as the relay keeps it (opaque bytes; the SDK encrypts it).

    Returns:
        The request; result :class:`Registered`. Errors: ``RelayRejected`` 409
        ``device_exists`` / ``too_many_devices``.

    Raises:
        UsageError: bad device id or key length.
    """
    doc: dict[str, Any] = {"device_id": check_device_id(device_id), "auth_key": _auth_key(auth_key)}
    if name is not None:
        doc["name"] = b64e(bytes(name))
    body = _json_body(doc)
    return Request(
        "POST",
        "/v1/devices",
        _registered,
        body=body,
        headers={"Content-Type": CT_JSON},
        accepted=frozenset({201}),
    )


def reset_devices(device_id: int, auth_key: bytes) -> Request[Registered]:
    """``POST /v1/devices/reset``: make a new device the user's only device (signed by a
    device of the user; a backup restored on a new machine).

    Args:
        device_id: the new device's id.
        auth_key: the new device's 32-byte Ed25519 public key.

    Returns:
        The request; result :class:`Registered`. Errors: ``RateLimited``, ``AuthFailed``.

    Raises:
        UsageError: bad device id or key length.
    """
    body = _json_body({"device_id": check_device_id(device_id), "auth_key": _auth_key(auth_key)})
    return Request(
        "POST", "/v1/devices/reset", _registered, body=body, headers={"Content-Type": CT_JSON}
    )


def _recovery_set(response: Response) -> bool:
    if _json_object(response).get("set") is not True:
        raise MalformedResponse("response field 'set' must be true")
    return True


def set_recovery(verifier: bytes) -> Request[bool]:
    """``PUT /v1/recovery``: store the verifier of the account's recovery key.

    Args:
        verifier: the 32-byte Ed25519 public key (:meth:`e2ee.core.recovery.RecoveryKey.verifier`).

    Returns:
        The request; result True.

    Raises:
        UsageError: the verifier is not 32 bytes.
    """
    body = _json_body({"verifier": _auth_key(verifier)})
    return Request(
        "PUT", "/v1/recovery", _recovery_set, body=body, headers={"Content-Type": CT_JSON}
    )


def recover(device_id: int, auth_key: bytes) -> Request[Registered]:
    """``POST /v1/recovery``: re-claim the signer's username for a new device.

    Sign it with the recovery key's signer bound to (username, ``device_id``).

    Args:
        device_id: the new device's id.
        auth_key: the new device's 32-byte Ed25519 public key.

    Returns:
        The request; result :class:`Registered`. Errors: ``RecoveryRefused`` (403),
        ``RateLimited`` (429, per username and per client address), ``AuthFailed``.

    Raises:
        UsageError: bad device id or key length.
    """
    body = _json_body({"device_id": check_device_id(device_id), "auth_key": _auth_key(auth_key)})
    return Request(
        "POST", "/v1/recovery", _registered, body=body, headers={"Content-Type": CT_JSON}
    )


def _device_list(response: Response) -> tuple[DeviceInfo, ...]:
    doc = _json_object(response)
    items = doc.get("devices")
    if not isinstance(items, list):
        raise MalformedResponse("response field 'devices' must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("has_keys"), bool):
            raise MalformedResponse("malformed device entry")
        name = item.get("name")
        seen = item.get("last_seen")
        out.append(
            DeviceInfo(
                _int_field(item, "device_id", 1, MAX_DEVICE_ID),
                _int_field(item, "created_at"),
                bool(item["has_keys"]),
                None if name is None else b64d(name, "name", error=MalformedResponse),
                None if seen is None else _int_field(item, "last_seen"),
            )
        )
    return tuple(out)


def list_devices() -> Request[tuple[DeviceInfo, ...]]:
    """``GET /v1/devices``: the caller's user's devices, sorted by id.

    Returns:
        The request; result a tuple of :class:`DeviceInfo`.
    """
    return Request("GET", "/v1/devices", _device_list)


def _removed(response: Response) -> bool:
    doc = _json_object(response)
    removed = doc.get("removed")
    if not isinstance(removed, bool):
        raise MalformedResponse("response field 'removed' must be a boolean")
    return removed


def remove_device(device_id: int) -> Request[bool]:
    """``DELETE /v1/devices/{device_id}``: remove a device of the caller's user.

    Args:
        device_id: any device of the user, the caller's own included.

    Returns:
        The request; result True. Errors: ``NotFound`` (``unknown_device``).

    Raises:
        UsageError: bad device id.
    """
    return Request("DELETE", f"/v1/devices/{check_device_id(device_id)}", _removed)


# -- prekeys -----------------------------------------------------------------------------


def _count(response: Response) -> int:
    return _int_field(_json_object(response), "count")


def upload_keys(keys: Mapping[str, Any]) -> Request[int]:
    """``PUT /v1/keys``: upload identity key, signed prekey and one-time prekeys.

    The core builds ``keys`` (base64 fields per the spec); it is sent as is.

    Args:
        keys: the JSON object of docs/relay-api.md section 3.

    Returns:
        The request; result the number of one-time prekeys now stored. Errors:
        ``InvalidRequest``; ``RelayRejected`` 409 ``identity_mismatch`` / ``prekey_pool_full``.

    Raises:
        UsageError: not a mapping with an ``identity_key``, or not JSON-serialisable.
    """
    if not isinstance(keys, Mapping) or "identity_key" not in keys:
        raise UsageError("a key upload is a mapping with at least 'identity_key'")
    return Request(
        "PUT",
        "/v1/keys",
        _count,
        body=_json_body(keys),
        headers={"Content-Type": CT_JSON},
    )


def key_count() -> Request[int]:
    """``GET /v1/keys/count``: one-time prekeys left for the calling device.

    Returns:
        The request; result the count.
    """
    return Request("GET", "/v1/keys/count", _count)


def _bundles(response: Response) -> list[dict[str, Any]]:
    doc = _json_object(response)
    devices = doc.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise MalformedResponse("response field 'devices' must be a list of objects")
    for d in devices:
        _int_field(d, "device_id", 1, MAX_DEVICE_ID)
    return list(devices)


def fetch_bundles(username: str, device_id: int | None = None) -> Request[list[dict[str, Any]]]:
    """``GET /v1/keys/{username}[/{device_id}]``: prekey bundles, one per device with keys.

    Each fetch consumes one one-time prekey per device. The bundles are returned as raw
    JSON objects; the core parses and verifies them (it is the one that can judge keys).

    Args:
        username: whose bundles.
        device_id: one device only, or every device with keys when None.

    Returns:
        The request; result the ``devices`` list. Errors: ``NotFound``
        (``unknown_user`` / ``unknown_device``), ``RateLimited``.

    Raises:
        UsageError: bad or reserved username, or bad device id.
    """
    if check_username(username) in RESERVED_USERNAMES:
        raise UsageError(f"{username!r} is reserved (it collides with a relay route)")
    target = f"/v1/keys/{username}"
    if device_id is not None:
        target += f"/{check_device_id(device_id)}"
    return Request("GET", target, _bundles)


# -- messages ----------------------------------------------------------------------------


def _receipt(response: Response) -> SendReceipt:
    doc = _json_object(response)
    return SendReceipt(
        b64d(doc.get("id"), "id", MESSAGE_ID_LEN, error=MalformedResponse),
        _int_field(doc, "recipients"),
        _int_field(doc, "stored_at"),
    )


def send_message(
    message_id: bytes,
    recipients: Sequence[tuple[str, int]],
    body: bytes,
    *,
    encoding: Literal["binary", "json"] = "binary",
    after: bytes | None = None,
) -> Request[SendReceipt]:
    """``PUT /v1/messages``: store one message for a list of recipient devices.

    Idempotent per (sender, message id): retry with the same id after a failure.

    Args:
        message_id: 16 bytes chosen by the sender.
        recipients: every current device of every addressed user (own user: all but the
            sending device), as (username, device id) pairs.
        body: the opaque ciphertext.
        encoding: ``"binary"`` (the SEND frame, compact) or ``"json"`` (base64 body).
        after: store it only if the sender's message with this id is stored (a SEND_AFTER
            frame; binary only).

    Returns:
        The request; result :class:`SendReceipt`. Errors: ``MismatchedDevices``,
        ``TooLarge``, ``MailboxFull``, ``RateLimited``, ``PredecessorMissing``,
        ``RelayRejected`` 409 ``message_id_conflict``.

    Raises:
        UsageError: bad id, recipients, body or encoding (``after`` with JSON).
    """
    if after is not None and encoding != "binary":
        raise UsageError("after needs the binary encoding")
    if encoding == "binary":
        data = encode_send(message_id, recipients, body, after=after)
        content_type = CT_SEND
    elif encoding == "json":
        if not isinstance(body, bytes | bytearray):
            raise UsageError("the message body must be bytes")
        data = _json_body(
            {
                "id": b64e(check_message_id(message_id)),
                "recipients": [{"user": u, "device": d} for u, d in check_recipients(recipients)],
                "body": b64e(bytes(body)),
            }
        )
        content_type = CT_JSON
    else:
        raise UsageError("encoding must be 'binary' or 'json'")
    return Request(
        "PUT", "/v1/messages", _receipt, body=data, headers={"Content-Type": content_type}
    )


def _delivery(item: object) -> Delivery:
    if not isinstance(item, dict) or not isinstance(item.get("sender"), dict):
        raise MalformedResponse("malformed mailbox entry")
    sender = item["sender"]
    if is_sealed_sender(sender.get("user"), sender.get("device")):  # the relay knows no sender
        user, device = str(sender["user"]), SEALED_DEVICE_ID
    else:
        user, device = _user_field(sender, "user"), _int_field(sender, "device", 1, MAX_DEVICE_ID)
    return Delivery(
        seq=_int_field(item, "seq"),
        id=b64d(item.get("id"), "id", MESSAGE_ID_LEN, error=MalformedResponse),
        sender=user,
        device=device,
        stored_at=_int_field(item, "stored_at"),
        body=b64d(item.get("body"), "body", error=MalformedResponse),
    )


def _page(response: Response) -> MessagePage:
    doc = _json_object(response)
    items = doc.get("messages")
    more = doc.get("more")
    if not isinstance(items, list) or not isinstance(more, bool):
        raise MalformedResponse("a mailbox page needs 'messages' (list) and 'more' (bool)")
    return MessagePage(tuple(_delivery(i) for i in items), more)


def fetch_messages(after: int = 0, limit: int = 100) -> Request[MessagePage]:
    """``GET /v1/messages?after=<seq>&limit=<n>``: read (not remove) the caller's mailbox.

    Args:
        after: return messages with ``seq`` greater than this.
        limit: 1..1000.

    Returns:
        The request; result :class:`MessagePage` in increasing ``seq``.

    Raises:
        UsageError: negative ``after`` or ``limit`` out of range.
    """
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise UsageError("after must be a non-negative integer")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise UsageError("limit must be an integer 1..1000")
    return Request("GET", f"/v1/messages?after={after}&limit={limit}", _page)


def _acked(response: Response) -> int:
    return _int_field(_json_object(response), "acked")


def ack_messages(ids: Iterable[bytes], settled: Iterable[bytes] = ()) -> Request[int]:
    """``POST /v1/messages/ack``: remove messages from the caller's mailbox (idempotent), and
    let the relay forget the retry records of the caller's own settled sends.

    Args:
        ids: 0..1000 message ids to remove from the caller's mailbox.
        settled: 0..1000 ids of this device's own sends that the relay answered 200 and
            that it will never send again (:func:`~e2ee.transport.frames.ack_fields`);
            not both empty. An id the relay does not know is ignored.

    Returns:
        The request; result the number of mailbox rows removed now (of ``ids`` only).

    Raises:
        UsageError: no ids in either list, too many in one, or a bad id.
    """
    return Request(
        "POST",
        "/v1/messages/ack",
        _acked,
        body=_json_body(ack_fields(ids, settled)),
        headers={"Content-Type": CT_JSON},
    )


def websocket_upgrade() -> Request[None]:
    """``GET /v1/ws``: the signed upgrade request (the adapter performs the handshake).

    Returns:
        The request (its parser is unused: a successful upgrade has no body).
    """
    return Request("GET", "/v1/ws", lambda _r: None, accepted=frozenset({101}))


# -- blobs -------------------------------------------------------------------------------


def _check_blob_id(blob_id: str, what: str = "blob id") -> str:
    if not isinstance(blob_id, str) or BLOB_ID_RE.fullmatch(blob_id) is None:
        raise UsageError(f"{what} must be 64 lowercase hex characters (a SHA-256)")
    return blob_id


def _blob_info(response: Response) -> BlobInfo:
    doc = _json_object(response)
    blob_id = _str_field(doc, "id")
    if BLOB_ID_RE.fullmatch(blob_id) is None:
        raise MalformedResponse("blob id is not 64 lowercase hex characters")
    return BlobInfo(blob_id, _int_field(doc, "size"), response.status == 201)


def upload_blob(
    sha256_hex: str, *, content_type: str = "application/octet-stream"
) -> Request[BlobInfo]:
    """``POST /v1/blobs``: the request line and signed headers of a streamed upload.

    The body is not part of the request: the adapter streams it. Its SHA-256 is signed
    (and sent as ``X-Blindpost-Content-SHA256``), so it must be known beforehand.

    Args:
        sha256_hex: lowercase hex SHA-256 of the exact bytes that will be streamed.
        content_type: any media type (the relay stores ciphertext; it does not care).

    Returns:
        The request; result :class:`BlobInfo` (``created`` False when it already existed).
        Errors: ``TooLarge``, ``InvalidRequest`` (``digest_mismatch``).

    Raises:
        UsageError: malformed digest.
    """
    _check_blob_id(sha256_hex, "sha256_hex")
    return Request(
        "POST",
        "/v1/blobs",
        _blob_info,
        headers={"Content-Type": content_type},
        accepted=frozenset({200, 201}),
        body_sha256=sha256_hex,
    )


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """Parse ``Content-Range: bytes a-b/total`` (total may be ``*``).

    Args:
        value: the header value.

    Returns:
        (first byte, last byte inclusive, total or None).

    Raises:
        MalformedResponse: not that shape, or a <= b < total violated.
    """
    m = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if m is None:
        raise MalformedResponse("Content-Range is not 'bytes a-b/total'")
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        raise MalformedResponse("Content-Range is inconsistent")
    return first, last, total


def unsatisfied_range_total(response: Response) -> int | None:
    """The blob size from a 416's ``Content-Range: bytes */N``, if present.

    Args:
        response: the 416 response.

    Returns:
        N, or None when the header is absent or malformed.
    """
    m = _UNSATISFIED_RANGE_RE.fullmatch(response.headers.get("content-range", "").strip())
    return int(m.group(1)) if m else None


def _length(headers: Mapping[str, str]) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise MalformedResponse("Content-Length is not a number")
    return int(raw.strip())


def _make_range_parser(start: int) -> Callable[[Response], BlobRange]:
    def parse(response: Response) -> BlobRange:
        length = _length(response.headers)
        if response.status == 200:
            return BlobRange(200, 0, length, length)
        first, last, total = parse_content_range(response.headers.get("content-range", ""))
        if first != start:
            raise MalformedResponse("206 range does not start where it was asked to")
        if length is not None and length != last - first + 1:
            raise MalformedResponse("206 Content-Length disagrees with Content-Range")
        return BlobRange(206, first, last - first + 1, total)

    return parse


def _deleted(response: Response) -> bool:
    return _json_object(response).get("deleted") is True


def delete_blob(blob_id: str) -> Request[bool]:
    """``DELETE /v1/blobs/{id}``: drop this account's hold on a blob it uploaded (the relay
    deletes the blob once nobody holds it).

    Args:
        blob_id: the blob's content address.

    Returns:
        The request; its result is True. Errors: ``NotFound`` (``unknown_blob``: this account
        holds no such blob).

    Raises:
        UsageError: malformed id.
    """
    return Request("DELETE", f"/v1/blobs/{_check_blob_id(blob_id)}", _deleted)


def download_blob(blob_id: str, *, start: int = 0, method: str = "GET") -> Request[BlobRange]:
    """``GET /v1/blobs/{id}`` (or ``HEAD``), from byte ``start`` on (``Range: bytes=start-``).

    The body is streamed by the adapter; :meth:`Request.handle` only reads the headers.

    Args:
        blob_id: the content address (lowercase hex SHA-256).
        start: first byte wanted; 0 asks for the whole blob (no Range header).
        method: ``"GET"`` or ``"HEAD"``.

    Returns:
        The request; result :class:`BlobRange` (status 200 means the relay sent the whole
        blob, even if a range was asked for). Errors: ``NotFound``, ``RangeNotSatisfiable``.

    Raises:
        UsageError: bad id, negative start or another method.
    """
    _check_blob_id(blob_id)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise UsageError("start must be a non-negative integer")
    if method not in ("GET", "HEAD"):
        raise UsageError("blobs are read with GET or HEAD")
    headers = {"Range": f"bytes={start}-"} if start else {}
    return Request(
        method,
        f"/v1/blobs/{blob_id}",
        _make_range_parser(start),
        headers=headers,
        accepted=frozenset({200, 206}),
    )


# -- operations --------------------------------------------------------------------------


def _healthy(response: Response) -> bool:
    return _json_object(response).get("status") == "ok"


def healthz() -> Request[bool]:
    """``GET /healthz`` (public, unsigned).

    Returns:
        The request; result True when the relay reports ``{"status": "ok"}``.
    """
    return Request("GET", "/healthz", _healthy, signed=False)


def origin_of(base_url: str) -> URL:
    """Validate a relay base URL and return its origin (scheme://host[:port]).

    Args:
        base_url: e.g. ``http://127.0.0.1:8080`` (a trailing ``/`` is fine).

    Returns:
        The origin URL.

    Raises:
        UsageError: not http(s), no host, or a path/query/fragment (the API lives at the
            root: a path prefix would change the signed request target).
    """
    from yarl import URL

    try:
        url = URL(base_url)
    except (TypeError, ValueError) as exc:
        raise UsageError("base_url is not a URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError("base_url must be an http:// or https:// URL with a host")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise UsageError("base_url must be the relay's root (no path, query or fragment)")
    return url.origin()
