"""Request builders for linking a device through a provisioning slot (docs/relay-api.md,
"Provisioning"): pure, like :mod:`e2ee.transport.requests`.

Invariant: opening and polling a slot are the new device's two unsigned requests (it has no
registered device yet); reading and filling one are signed by a device of the account. A
slot's fetch token and the grant travel only in request bodies, never in a URL or a repr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from e2ee.errors import UsageError
from e2ee.transport.errors import MalformedResponse
from e2ee.transport.frames import b64d, b64e
from e2ee.transport.requests import (
    AUTH_KEY_LEN,
    CT_JSON,
    Request,
    Response,
    _auth_key,
    _int_field,
    _json_body,
    _json_object,
    _str_field,
)

__all__ = [
    "PROVISION_TOKEN_LEN",
    "ProvisionInfo",
    "ProvisionOpened",
    "check_slot_id",
    "fill_provisioning",
    "open_provisioning",
    "read_provisioning",
    "take_provisioning",
]

_SLOT_RE = re.compile(r"[0-9a-f]{32}")
#: The fetch token of a provisioning slot, bytes.
PROVISION_TOKEN_LEN = 32


@dataclass(frozen=True, slots=True)
class ProvisionOpened:
    """A provisioning slot the new device opened (``POST /v1/provisioning``); the token
    takes its grant, so it stays on the new device (its repr hides it)."""

    slot_id: str
    token: bytes = field(repr=False)
    expires_at: int


@dataclass(frozen=True, slots=True)
class ProvisionInfo:
    """A provisioning slot as an approver reads it (``GET /v1/provisioning/{id}``)."""

    auth_key: bytes
    expires_at: int
    filled: bool


def check_slot_id(slot_id: str) -> str:
    """A provisioning slot id: 32 lowercase hex characters.

    Raises:
        UsageError: anything else.
    """
    if not isinstance(slot_id, str) or _SLOT_RE.fullmatch(slot_id) is None:
        raise UsageError("a provisioning slot id is 32 lowercase hex characters")
    return slot_id


def _provision_opened(response: Response) -> ProvisionOpened:
    doc = _json_object(response)
    try:
        slot_id = check_slot_id(_str_field(doc, "id"))
    except UsageError as exc:
        raise MalformedResponse("response field 'id' is not a slot id") from exc
    token = b64d(doc.get("token"), "token", PROVISION_TOKEN_LEN, error=MalformedResponse)
    return ProvisionOpened(slot_id, token, _int_field(doc, "expires_at"))


def open_provisioning(auth_key: bytes) -> Request[ProvisionOpened]:
    """``POST /v1/provisioning`` (unsigned): open a slot for a new device.

    Args:
        auth_key: the new device's 32-byte Ed25519 public auth key.

    Returns:
        The request; result :class:`ProvisionOpened`. Errors: ``RateLimited``,
        ``RelayRejected`` 503 (too many links in progress).

    Raises:
        UsageError: a bad key length.
    """
    return Request(
        "POST",
        "/v1/provisioning",
        _provision_opened,
        body=_json_body({"auth_key": _auth_key(auth_key)}),
        headers={"Content-Type": CT_JSON},
        accepted=frozenset({201}),
        signed=False,
    )


def _provision_info(response: Response) -> ProvisionInfo:
    doc = _json_object(response)
    filled = doc.get("filled")
    if not isinstance(filled, bool):
        raise MalformedResponse("response field 'filled' must be a boolean")
    return ProvisionInfo(
        b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN, error=MalformedResponse),
        _int_field(doc, "expires_at"),
        filled,
    )


def read_provisioning(slot_id: str) -> Request[ProvisionInfo]:
    """``GET /v1/provisioning/{id}`` (signed by any device): the new device's auth key.

    Returns:
        The request; result :class:`ProvisionInfo`. Errors: ``NotFound``
        (``unknown_provisioning``: no such slot, expired or taken).

    Raises:
        UsageError: a bad slot id.
    """
    return Request("GET", f"/v1/provisioning/{check_slot_id(slot_id)}", _provision_info)


def _stored(response: Response) -> bool:
    if _json_object(response).get("stored") is not True:
        raise MalformedResponse("response field 'stored' must be true")
    return True


def fill_provisioning(slot_id: str, grant: bytes) -> Request[bool]:
    """``PUT /v1/provisioning/{id}`` (signed by any device): put the encrypted grant.

    Returns:
        The request; result True. Errors: ``NotFound``, ``RelayRejected`` 409
        ``provisioning_filled``, ``TooLarge``.

    Raises:
        UsageError: a bad slot id or an empty grant.
    """
    if not grant:
        raise UsageError("a grant is not empty")
    return Request(
        "PUT",
        f"/v1/provisioning/{check_slot_id(slot_id)}",
        _stored,
        body=_json_body({"grant": b64e(bytes(grant))}),
        headers={"Content-Type": CT_JSON},
    )


def _taken(response: Response) -> bytes | None:
    doc = _json_object(response)
    if doc.get("grant") is None:
        return None
    return b64d(doc.get("grant"), "grant", error=MalformedResponse)


def take_provisioning(slot_id: str, token: bytes) -> Request[bytes | None]:
    """``POST /v1/provisioning/{id}/take`` (unsigned): the slot's grant once it is there
    (the relay then deletes the slot), None while it waits.

    Returns:
        The request; result the grant ciphertext or None. Errors: ``NotFound`` (no such
        slot, expired, taken, or a wrong token), ``RateLimited``.

    Raises:
        UsageError: a bad slot id or token length.
    """
    if len(token) != PROVISION_TOKEN_LEN:
        raise UsageError("a provisioning token is 32 bytes")
    return Request(
        "POST",
        f"/v1/provisioning/{check_slot_id(slot_id)}/take",
        _taken,
        body=_json_body({"token": b64e(bytes(token))}),
        headers={"Content-Type": CT_JSON},
        signed=False,
    )
