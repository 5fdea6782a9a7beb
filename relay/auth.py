# Invariants: a request is authenticated only if its timestamp is inside the window, its
# signature verifies against the registered Ed25519 key over the canonical string of
# docs/relay-api.md section 1, and its nonce was not accepted before inside the window. A nonce
# is remembered only after its signature verified, so forged requests cannot fill the cache.
"""Signed-request authentication: canonical string, verification and replay protection."""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
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
from relay.errors import AuthError, BadRequest, RelayError
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
    "NonceCache",
    "SignedHeaders",
    "body_digest_header",
    "canonical_string",
    "parse_signed_headers",
    "sign_request",
    "verify_signature",
]


_NONCE_RE = re.compile(NONCE_PATTERN)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


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
    digest = body_sha256 or hashlib.sha256(body).hexdigest()
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


class NonceCache:
    """Remembers accepted (user, device, nonce) triples until their timestamp leaves the window.

    Memory is bounded by ``max_entries``; when full, new requests are refused (503) rather than
    risking an accepted replay.

    Args:
        window_ms: the auth window; entries expire ``window_ms`` after their timestamp.
        max_entries: hard bound on remembered nonces.
    """

    def __init__(self, window_ms: int, max_entries: int) -> None:
        self._window_ms = window_ms
        self._max = max_entries
        # Entries are 64-bit keyed digests of (user, device, nonce), not the strings: a few
        # dozen bytes each. The key is random per process, so nobody can aim for a collision;
        # an accidental one (about n / 2**64) would only refuse a fresh request.
        self._salt = os.urandom(16)
        self._seen: set[int] = set()
        self._order: deque[tuple[int, int]] = deque()

    def _digest(self, sh: SignedHeaders) -> int:
        h = hashlib.blake2b(digest_size=8, key=self._salt)
        h.update(f"{sh.user}\n{sh.device}\n{sh.nonce}".encode())
        return int.from_bytes(h.digest(), "big")

    def __len__(self) -> int:
        return len(self._seen)

    def check_fresh(self, sh: SignedHeaders, now_ms: int) -> None:
        """Reject a timestamp outside the window.

        Raises:
            AuthError: ``auth_stale``.
        """
        if abs(now_ms - sh.timestamp_ms) > self._window_ms:
            raise AuthError("request timestamp outside the allowed window", code="auth_stale")

    def remember(self, sh: SignedHeaders, now_ms: int) -> None:
        """Record a verified request's nonce, rejecting a replay.

        Raises:
            AuthError: ``auth_replay``. RelayError (503): the cache is full.
        """
        self._expire(now_ms)
        key = self._digest(sh)
        if key in self._seen:
            raise AuthError("nonce already used", code="auth_replay")
        if len(self._seen) >= self._max:
            err = RelayError("too many requests in the auth window", code="busy")
            err.status = 503
            raise err
        self._seen.add(key)
        # Expiry order follows timestamps only roughly; an entry is dropped at the earliest
        # once now passes its own timestamp + window, so no replay can slip through.
        self._order.append((sh.timestamp_ms + self._window_ms, key))

    def _expire(self, now_ms: int) -> None:
        order = self._order
        while order and order[0][0] < now_ms:
            _, key = order.popleft()
            self._seen.discard(key)
