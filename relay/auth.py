# Invariants: a request is authenticated only if its timestamp is inside the window, its
# signature verifies against the registered Ed25519 key over the canonical string of
# docs/relay-api.md section 1, and its nonce was not accepted before inside the window (the
# nonce record is relay.replay's ReplayGuard; relay.state claims a nonce only after its signature
# verified, so forged requests cannot fill it).
"""Signed-request authentication: header parsing, canonical string, freshness and verification."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from blindpost_wire.auth import (
    AUTH_VERSION,
    EMPTY_SHA256,
    H_CONTENT_SHA256,
    H_DEVICE,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    H_USER,
    NONCE_PATTERN,
    canonical_string,
)
from relay.errors import AuthError, BadRequest
from relay.wire import USERNAME_RE, b64d, b64e, parse_ascii_uint, parse_device_id

__all__ = [
    "AUTH_VERSION",
    "EMPTY_SHA256",
    "H_CONTENT_SHA256",
    "H_DEVICE",
    "H_NONCE",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "H_USER",
    "SignedHeaders",
    "body_digest_header",
    "canonical_string",
    "check_fresh",
    "parse_signed_headers",
    "sha256_hex",
    "sign_request",
    "verify_signature",
]


_NONCE_RE = re.compile(NONCE_PATTERN)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def sha256_hex(body: bytes) -> str:
    """The hex SHA-256 of a body, as the canonical string signs it."""
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The parsed (not yet verified) auth headers of a request."""

    user: str
    device: int
    timestamp_ms: int
    nonce: str
    signature: bytes


def sign_request(
    key: SigningKey,
    method: str,
    target: str,
    user: str,
    device: int,
    body: bytes = b"",
    *,
    timestamp_ms: int,
    nonce: str,
    body_sha256: str | None = None,
) -> dict[str, str]:
    """Return the auth headers for a request (reference implementation for clients/tests).

    Args:
        key: the device's Ed25519 signing key.
        method: HTTP method.
        target: raw request target.
        user: username.
        device: device id.
        body: request body (hashed unless ``body_sha256`` is given).
        timestamp_ms: unix milliseconds.
        nonce: fresh random nonce (16..64 chars of ``[A-Za-z0-9+/=_-]``).
        body_sha256: precomputed hex digest (streamed uploads).

    Returns:
        Header name to value.
    """
    digest = body_sha256 or sha256_hex(body)
    msg = canonical_string(method, target, user, device, timestamp_ms, nonce, digest)
    return {
        H_USER: user,
        H_DEVICE: str(device),
        H_TIMESTAMP: str(timestamp_ms),
        H_NONCE: nonce,
        H_SIGNATURE: b64e(key.sign(msg).signature),
    }


def parse_signed_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Parse the auth headers without verifying them.

    Raises:
        AuthError: ``auth_missing`` when a header is absent or malformed.
    """
    try:
        user = headers[H_USER]
        device_raw = headers[H_DEVICE]
        ts_raw = headers[H_TIMESTAMP]
        nonce = headers[H_NONCE]
        sig_raw = headers[H_SIGNATURE]
    except KeyError as exc:
        raise AuthError(f"missing header {exc.args[0]}", code="auth_missing") from exc
    try:
        if USERNAME_RE.fullmatch(user) is None:
            raise BadRequest("bad user")
        device = parse_device_id(device_raw)
        timestamp_ms = parse_ascii_uint(ts_raw, "timestamp", 15)
        if _NONCE_RE.fullmatch(nonce) is None:
            raise BadRequest("bad nonce")
        signature = b64d(sig_raw, "signature", 64)
    except BadRequest as exc:
        raise AuthError(f"malformed auth headers: {exc.message}", code="auth_missing") from exc
    return SignedHeaders(user, device, timestamp_ms, nonce, signature)


def body_digest_header(headers: Mapping[str, str]) -> str | None:
    """Return the validated ``X-Blindpost-Content-SHA256`` value, if present.

    Raises:
        AuthError: present but not 64 lowercase hex characters.
    """
    value = headers.get(H_CONTENT_SHA256)
    if value is None:
        return None
    if _HEX64_RE.fullmatch(value) is None:
        raise AuthError("X-Blindpost-Content-SHA256 must be lowercase hex", code="auth_missing")
    return value


def verify_signature(
    auth_key: bytes, sh: SignedHeaders, method: str, target: str, body_sha256: str
) -> None:
    """Verify the Ed25519 signature of a request.

    Raises:
        AuthError: ``auth_invalid``.
    """
    msg = canonical_string(
        method, target, sh.user, sh.device, sh.timestamp_ms, sh.nonce, body_sha256
    )
    try:
        VerifyKey(auth_key).verify(msg, sh.signature)
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise AuthError("signature does not verify", code="auth_invalid") from exc


def check_fresh(sh: SignedHeaders, now_ms: int, window_ms: int) -> None:
    """Reject a timestamp more than ``window_ms`` away from ``now_ms``.

    Raises:
        AuthError: ``auth_stale``.
    """
    if abs(now_ms - sh.timestamp_ms) > window_ms:
        raise AuthError("request timestamp outside the allowed window", code="auth_stale")
