"""Request builders for sealed sender (docs/relay-api.md): pure, like :mod:`requests`.

Invariant: :func:`send_sealed` is the one unsigned request that carries a message; it names
no sender, only one delivery token per recipient user (``X-Blindpost-Delivery-Tokens``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blindpost_wire.sealed import DELIVERY_TOKEN_HEADER, token_header
from e2ee.errors import UsageError
from e2ee.transport.errors import MalformedResponse
from e2ee.transport.frames import encode_send
from e2ee.transport.requests import (
    CT_JSON,
    CT_SEND,
    Request,
    Response,
    SendReceipt,
    _json_object,
    _receipt,
)

__all__ = [
    "AnnouncedKey",
    "IssuedCertificate",
    "issue_certificate",
    "send_sealed",
    "sender_keys",
    "set_access",
]


@dataclass(frozen=True, slots=True)
class AnnouncedKey:
    """One relay certificate key as ``GET /v1/sender-keys`` lists it."""

    key_id: int
    public_key: bytes = field(repr=False)
    endorsement: bytes | None = field(repr=False)
    retired: bool


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """``POST /v1/certificate``'s answer."""

    certificate: bytes = field(repr=False)
    expires_ms: int
    key_id: int


def _b64(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise MalformedResponse(f"{what} must be base64 text")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponse(f"{what} is not base64") from exc
    if size is not None and len(data) != size:
        raise MalformedResponse(f"{what} must be {size} bytes")
    return data


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedResponse(f"{key} must be a non-negative integer")
    return value


def _keys(response: Response) -> tuple[AnnouncedKey, ...]:
    items = _json_object(response).get("keys")
    if not isinstance(items, list):
        raise MalformedResponse("keys must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("retired"), bool):
            raise MalformedResponse("malformed key entry")
        endorsement = item.get("endorsement")
        out.append(
            AnnouncedKey(
                _int(item, "key_id"),
                _b64(item.get("public_key"), "public_key", 32),
                None if endorsement is None else _b64(endorsement, "endorsement", 64),
                item["retired"],
            )
        )
    return tuple(out)


def sender_keys() -> Request[tuple[AnnouncedKey, ...]]:
    """``GET /v1/sender-keys``: the relay's certificate keys, oldest first."""
    return Request("GET", "/v1/sender-keys", _keys)


def _certificate(response: Response) -> IssuedCertificate:
    doc = _json_object(response)
    return IssuedCertificate(
        _b64(doc.get("certificate"), "certificate"), _int(doc, "expires_ms"), _int(doc, "key_id")
    )


def issue_certificate() -> Request[IssuedCertificate]:
    """``POST /v1/certificate``: a sender certificate for the signing device.

    Errors: ``NotFound`` ``no_identity_key`` before the device uploaded keys.
    """
    return Request("POST", "/v1/certificate", _certificate)


def _access_set(response: Response) -> bool:
    value = _json_object(response).get("set")
    if not isinstance(value, bool):
        raise MalformedResponse("response field 'set' must be a boolean")
    return value


def set_access(verifier: bytes | None) -> Request[bool]:
    """``PUT /v1/access``: store (or with None remove) our delivery-token verifier.

    Raises:
        UsageError: the verifier is not 32 bytes.
    """
    if verifier is not None and len(verifier) != 32:
        raise UsageError("a token verifier is 32 bytes")
    value = None if verifier is None else base64.b64encode(verifier).decode("ascii")
    body = json.dumps({"verifier": value}).encode()
    return Request("PUT", "/v1/access", _access_set, body=body, headers={"Content-Type": CT_JSON})


def send_sealed(
    message_id: bytes,
    recipients: Sequence[tuple[str, int]],
    body: bytes,
    tokens: Mapping[str, bytes],
) -> Request[SendReceipt]:
    """``PUT /v1/messages/sealed``: store a message without naming its sender (unsigned).

    Args:
        recipients: every device of every recipient user (no device counts as ours).
        tokens: one delivery token per recipient user.

    Returns:
        The request; result :class:`SendReceipt`. Errors: ``DeliveryTokenRefused`` (401),
        ``MismatchedDevices``, ``RateLimited``, ``MailboxFull``.

    Raises:
        UsageError: bad id, recipients, body, or a recipient user without a token.
    """
    if {u for u, _ in recipients} != set(tokens):
        raise UsageError("a sealed send needs exactly one token per recipient user")
    return Request(
        "PUT",
        "/v1/messages/sealed",
        _receipt,
        body=encode_send(message_id, recipients, body),
        headers={"Content-Type": CT_SEND, DELIVERY_TOKEN_HEADER: token_header(dict(tokens))},
        signed=False,
    )
