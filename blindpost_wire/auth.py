"""Request signing: header names and the canonical string (docs/relay-api.md section 1).

Invariant: :func:`canonical_string` is the only definition of the signed bytes;
the SDK signs and the relay verifies exactly what it returns. It does no
validation: each side checks its inputs its own way first.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = [
    "AUTH_FRAME_FIELDS",
    "AUTH_VERSION",
    "EMPTY_SHA256",
    "H_CONTENT_SHA256",
    "H_DEVICE",
    "H_NONCE",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "H_USER",
    "NONCE_PATTERN",
    "canonical_string",
]

AUTH_VERSION: Final = "BLINDPOST-AUTH-V1"
H_USER: Final = "X-Blindpost-User"
H_DEVICE: Final = "X-Blindpost-Device"
H_TIMESTAMP: Final = "X-Blindpost-Timestamp"
H_NONCE: Final = "X-Blindpost-Nonce"
H_SIGNATURE: Final = "X-Blindpost-Signature"
H_CONTENT_SHA256: Final = "X-Blindpost-Content-SHA256"
#: The WebSocket auth frame (docs/relay-api.md, "First frame"): its JSON keys and the
#: auth header whose value each carries, signed exactly as a header-authenticated
#: ``GET /v1/ws``. The frame is ``{"type": "auth", key: value, ...}``.
AUTH_FRAME_FIELDS: Final = (
    ("user", H_USER),
    ("device", H_DEVICE),
    ("timestamp", H_TIMESTAMP),
    ("nonce", H_NONCE),
    ("signature", H_SIGNATURE),
)
#: SHA-256 of an empty body, the digest line of every body-less request.
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
#: What a nonce header may hold.
NONCE_PATTERN: Final = r"[A-Za-z0-9+/=_-]{16,64}"


def canonical_string(
    method: str,
    target: str,
    user: str,
    device: int,
    timestamp_ms: int,
    nonce: str,
    body_sha256: str,
) -> bytes:
    """The bytes a request signature covers: eight fields joined by ``\\n``.

    Args:
        method: HTTP method (upper-cased here).
        target: raw path plus ``?query`` exactly as on the request line.
        user: the signing device's username.
        device: the signing device's id.
        timestamp_ms: unix milliseconds.
        nonce: the nonce header value.
        body_sha256: lowercase hex SHA-256 of the body (:data:`EMPTY_SHA256` for none).

    Returns:
        The UTF-8 canonical string, no trailing newline.
    """
    fields = (AUTH_VERSION, method.upper(), target, user, str(device), str(timestamp_ms), nonce)
    return "\n".join((*fields, body_sha256)).encode("utf-8")
