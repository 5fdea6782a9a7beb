"""Typed errors of the relay transport, all rooted in :class:`e2ee.errors.TransportError`.

Invariants:

* Every failure of a transport call is one of these (or :class:`e2ee.errors.UsageError`
  for a bad argument detected before anything was sent); nothing from aiohttp, json or
  struct escapes untyped.
* Messages carry only the relay's error code, its human text, HTTP status, method and
  request target, sizes and addresses (user, device). Never a body, a key, a signature
  or a nonce.
* :func:`error_from_response` is the single place mapping an HTTP status + JSON error body
  (or a WebSocket ``send_result``) to a class; HTTP and WebSocket paths raise the same types.

These classes live here until they are moved into :mod:`e2ee.errors`; import them from
:mod:`e2ee.transport`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from e2ee.errors import TransportError

__all__ = [
    "AccountBanned",
    "AuthFailed",
    "BlobDigestMismatch",
    "ConnectionClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "DeliveryTokenRefused",
    "DeviceRemoved",
    "Forbidden",
    "InvalidRequest",
    "InviteInvalid",
    "InviteRequired",
    "MailboxFull",
    "MalformedFrame",
    "MalformedResponse",
    "MismatchedDevices",
    "NotConnected",
    "NotFound",
    "PredecessorMissing",
    "RangeNotSatisfiable",
    "RateLimited",
    "RecoveryRefused",
    "RegistrationClosed",
    "RegistrationRefused",
    "RelayRejected",
    "RelayTimeout",
    "Replaced",
    "SenderShareExceeded",
    "TooLarge",
    "Unavailable",
    "UsernameTaken",
    "error_from_response",
]


# -- the connection ----------------------------------------------------------------------


class ConnectionFailed(TransportError):
    """The relay could not be reached, or the connection broke mid-request."""


class RelayTimeout(ConnectionFailed):
    """A connect, read or whole-request timeout expired."""


class NotConnected(TransportError):
    """A WebSocket operation was attempted while no connection is open."""


class ConnectionLost(TransportError):
    """The WebSocket closed before the relay answered this request.

    The outcome is unknown: a SEND may or may not have been stored. Resending with the
    same message id is safe (the relay deduplicates by sender and id).
    """


class ConnectionClosed(TransportError):
    """The relay closed the WebSocket with a code that stops automatic reconnection.

    Attributes:
        code: the WebSocket close code (e.g. 4001, 4003), or None.
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class Replaced(ConnectionClosed):
    """Close code 4001: a newer connection of the same device took over."""

    def __init__(self) -> None:
        super().__init__(4001, "replaced by a newer connection of this device (close 4001)")


class DeviceRemoved(ConnectionClosed):
    """Close code 4003: this device was removed from its account."""

    def __init__(self) -> None:
        super().__init__(4003, "this device was removed (close 4003)")


# -- the relay broke the protocol --------------------------------------------------------


class MalformedResponse(TransportError):
    """The relay answered with something that does not follow docs/relay-api.md."""


class MalformedFrame(MalformedResponse):
    """A WebSocket frame (binary DELIVER/SEND or JSON control frame) does not parse."""


class BlobDigestMismatch(MalformedResponse):
    """A downloaded blob does not hash to its content address (the partial file is removed)."""


# -- the relay said no -------------------------------------------------------------------


class RelayRejected(TransportError):
    """The relay answered with a non-2xx status and a JSON error body.

    Attributes:
        status: HTTP status (or ``send_result`` status).
        code: the relay's machine-readable ``error`` code (``"unknown"`` if absent).
        detail: the relay's human-readable ``message`` (may be empty).
    """

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        text = f"relay rejected the request: {status} {code}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
        self.status = status
        self.code = code
        self.detail = detail

    @property
    def retryable(self) -> bool:
        """True when repeating the identical request later may succeed (429, 5xx)."""
        return self.status == 429 or self.status >= 500


class InvalidRequest(RelayRejected):
    """400: the relay found the request malformed (``invalid_request``, ``digest_mismatch``)."""


class AuthFailed(RelayRejected):
    """401: ``auth_missing``, ``auth_stale``, ``auth_replay`` or ``auth_invalid``."""

    @property
    def stale(self) -> bool:
        """True when the timestamp was outside the relay's window (check the clock)."""
        return self.code == "auth_stale"


class DeliveryTokenRefused(AuthFailed):
    """401 ``delivery_token_refused``: a sealed send named a recipient without a valid
    delivery token (none given, a wrong or old one, or a recipient that accepts no sealed
    messages). One answer for all of them, so a send cannot probe which. Nothing was stored;
    the SDK sends the message again unsealed and forgets the recipient's access key."""


class NotFound(RelayRejected):
    """404: ``unknown_user``, ``unknown_device``, ``unknown_blob``..."""


class Forbidden(RelayRejected):
    """403: the relay understood and authenticated the request but does not allow it."""


class AccountBanned(Forbidden):
    """403 ``account_banned``: the relay's operator banned this account."""


class RegistrationRefused(Forbidden):
    """403 on registration: see the subclasses; ``pow_required``/``pow_invalid`` (the proof of
    work was missing, expired or wrong: registering again fetches a fresh challenge)."""


class RegistrationClosed(RegistrationRefused):
    """403 ``registration_closed``: this relay registers nobody."""


class InviteRequired(RegistrationRefused):
    """403 ``invite_required``: this relay registers by invitation only; ask its operator."""


class InviteInvalid(RegistrationRefused):
    """403 ``invite_invalid``: the invite code is unknown, already used or expired."""


class RecoveryRefused(Forbidden):
    """403 ``recovery_refused``: no such account, no recovery key set for it, or the key is
    wrong (the relay gives one answer for all three). Guesses are rate-limited (429)."""


_FORBIDDEN: dict[str, type[Forbidden]] = {
    "recovery_refused": RecoveryRefused,
    "account_banned": AccountBanned,
    "registration_closed": RegistrationClosed,
    "invite_required": InviteRequired,
    "invite_invalid": InviteInvalid,
    "pow_required": RegistrationRefused,
    "pow_invalid": RegistrationRefused,
}


class UsernameTaken(RelayRejected):
    """409 ``username_taken``: the name is registered (names are never reused)."""


class PredecessorMissing(RelayRejected):
    """409 ``predecessor_missing``: a SEND_AFTER's previous message is not stored.

    Nothing was stored. The sender pipelined this message behind one the relay refused
    (or had not stored yet); send it again, in order, once that one is settled.
    """

    @property
    def retryable(self) -> bool:
        """True: the same request succeeds once the previous message is stored."""
        return True


class MismatchedDevices(RelayRejected):
    """409 ``mismatched_devices``: the recipient list is not the users' current device set.

    Nothing was stored. Fix the list (fetch bundles for missing devices, drop stale ones,
    drop unknown users) and resend with the same message id.

    Attributes:
        unknown_users: users that do not exist.
        missing_devices: user -> registered devices that were not listed.
        stale_devices: user -> listed devices that are not registered.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        unknown_users: tuple[str, ...],
        missing_devices: Mapping[str, tuple[int, ...]],
        stale_devices: Mapping[str, tuple[int, ...]],
    ) -> None:
        super().__init__(status, code, detail)
        self.unknown_users = unknown_users
        self.missing_devices = dict(missing_devices)
        self.stale_devices = dict(stale_devices)


class TooLarge(RelayRejected):
    """413 ``too_large``: message body, request or blob over the relay's limit."""


class RangeNotSatisfiable(RelayRejected):
    """416: the requested byte range lies outside the blob."""


class RateLimited(RelayRejected):
    """429: slow down.

    Attributes:
        retry_after: seconds to wait before retrying (>= 1).
    """

    def __init__(self, status: int, code: str, detail: str, *, retry_after: int) -> None:
        super().__init__(status, code, detail)
        self.retry_after = retry_after


class Unavailable(RelayRejected):
    """502, 503 or 504: this relay node (or the proxy in front of it) cannot serve now.

    Nothing was acknowledged: the outcome of a write is unknown (a node may have committed
    it before failing to answer), so only an idempotent request is repeated, here or on
    another node of the same relay (every request the SDK repeats is: sends and acks by
    message id, key uploads by key id, blobs by content address).

    Attributes:
        retry_after: seconds the relay asked to wait (``Retry-After``), or None.
    """

    def __init__(self, status: int, code: str, detail: str, *, retry_after: int | None) -> None:
        super().__init__(status, code, detail)
        self.retry_after = retry_after


class MailboxFull(RelayRejected):
    """507 ``mailbox_full``: some recipient mailbox is at its quota; nothing was stored.

    Attributes:
        full: the (user, device) mailboxes that are full.
    """

    def __init__(
        self, status: int, code: str, detail: str, *, full: tuple[tuple[str, int], ...]
    ) -> None:
        super().__init__(status, code, detail)
        self.full = full


class SenderShareExceeded(MailboxFull):
    """507 ``sender_share_exceeded``: this account holds its whole share of some recipient
    mailbox (a smaller one until the recipient has ever written back); nothing was stored.

    Other senders still get through. Retry later, once the recipient has read its mailbox.
    """


# -- mapping -----------------------------------------------------------------------------


def _str(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _device_map(value: object) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    if not isinstance(value, Mapping):
        return out
    for user, devices in value.items():
        if isinstance(user, str) and isinstance(devices, list):
            out[user] = tuple(d for d in devices if isinstance(d, int) and not isinstance(d, bool))
    return out


def error_from_response(
    status: int, body: Mapping[str, Any] | None, *, retry_after_header: str | None = None
) -> RelayRejected:
    """Map a non-2xx status and its JSON error body to the matching exception.

    Tolerant by design: a missing or odd field yields a default, never a second error,
    so a proxy's HTML error page still becomes a :class:`RelayRejected` with its status.

    Args:
        status: HTTP status (or the ``status`` of a WebSocket ``send_result``).
        body: the decoded JSON object, or None when the body was not a JSON object.
        retry_after_header: the ``Retry-After`` header, if any (used when the body has none).

    Returns:
        The exception to raise (not raised here).
    """
    doc: Mapping[str, Any] = body if body is not None else {}
    code = _str(doc.get("error"), "unknown")
    detail = _str(doc.get("message"))
    if status == 400:
        return InvalidRequest(status, code, detail)
    if status == 401:
        if code == "delivery_token_refused":
            return DeliveryTokenRefused(status, code, detail)
        return AuthFailed(status, code, detail)
    if status == 403:
        return _FORBIDDEN.get(code, Forbidden)(status, code, detail)
    if status == 404:
        return NotFound(status, code, detail)
    if status == 409 and code == "mismatched_devices":
        raw_unknown = doc.get("unknown_users")
        unknown = (
            tuple(u for u in raw_unknown if isinstance(u, str))
            if isinstance(raw_unknown, list)
            else ()
        )
        return MismatchedDevices(
            status,
            code,
            detail,
            unknown_users=unknown,
            missing_devices=_device_map(doc.get("missing_devices")),
            stale_devices=_device_map(doc.get("stale_devices")),
        )
    if status == 409 and code == "predecessor_missing":
        return PredecessorMissing(status, code, detail)
    if status == 409 and code == "username_taken":
        return UsernameTaken(status, code, detail)
    if status == 413:
        return TooLarge(status, code, detail)
    if status == 416:
        return RangeNotSatisfiable(status, code, detail)
    if status == 429:
        retry = _int_or_none(doc.get("retry_after"))
        if retry is None and retry_after_header is not None:
            retry = _int_or_none(retry_after_header)
        return RateLimited(status, code, detail, retry_after=max(1, retry or 1))
    if status in (502, 503, 504):
        retry_after = _int_or_none(doc.get("retry_after"))
        if retry_after is None and retry_after_header is not None:
            retry_after = _int_or_none(retry_after_header)
        return Unavailable(status, code, detail, retry_after=retry_after)
    if status == 507:
        full: list[tuple[str, int]] = []
        raw_full = doc.get("full")
        if isinstance(raw_full, list):
            for item in raw_full:
                if isinstance(item, Mapping):
                    user, device = item.get("user"), item.get("device")
                    if isinstance(user, str) and isinstance(device, int):
                        full.append((user, device))
        kind = SenderShareExceeded if code == "sender_share_exceeded" else MailboxFull
        return kind(status, code, detail, full=tuple(full))
    return RelayRejected(status, code, detail)
