"""Signed relay requests: the canonical string of docs/relay-api.md section 1 and its signer.

Invariants:

* Pure: no I/O. The clock and the nonce source are parameters; only the convenience
  defaults read ``time.time`` and ``os.urandom``.
* The private key never leaves :class:`DeviceSigner`: not in ``repr``, ``str``, pickles,
  logs or exception messages. Only the public key is exposed.
* The headers returned by :meth:`DeviceSigner.sign_headers` carry exactly the values that
  were signed (user, device, timestamp, nonce), so a request can never be sent with
  headers that differ from its signature.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import NoReturn

from nacl.signing import SigningKey

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
)
from blindpost_wire.auth import canonical_string as _canonical_string
from blindpost_wire.names import (
    MAX_DEVICE_ID,
    MIN_DEVICE_ID,
    USERNAME_PATTERN,
    is_device_id,
    is_username,
)
from e2ee.errors import UsageError

__all__ = [
    "AUTH_VERSION",
    "EMPTY_SHA256",
    "H_CONTENT_SHA256",
    "H_DEVICE",
    "H_NONCE",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "H_USER",
    "DeviceSigner",
    "canonical_string",
    "check_device_id",
    "check_username",
    "new_nonce",
]


_NONCE_RE = re.compile(NONCE_PATTERN)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
SEED_LEN = 32


def check_username(user: str) -> str:
    """Validate a username (``^[a-z0-9_]{3,32}$``).

    Args:
        user: the candidate name.

    Returns:
        ``user`` unchanged.

    Raises:
        UsageError: not a valid username.
    """
    if not is_username(user):
        raise UsageError(f"username must match ^{USERNAME_PATTERN}$")
    return user


def check_device_id(device: int) -> int:
    """Validate a device id (integer ``MIN_DEVICE_ID..MAX_DEVICE_ID``, 1..127).

    Args:
        device: the candidate id.

    Returns:
        ``device`` unchanged.

    Raises:
        UsageError: not an int in range.
    """
    if not is_device_id(device):
        raise UsageError(f"device id must be an integer {MIN_DEVICE_ID}..{MAX_DEVICE_ID}")
    return device


def new_nonce(random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """Return a fresh nonce: 16 random bytes in padded base64 (24 characters).

    Args:
        random_bytes: source of randomness (``os.urandom`` unless testing).

    Returns:
        The nonce text.
    """
    return base64.b64encode(random_bytes(16)).decode("ascii")


def canonical_string(
    method: str,
    target: str,
    user: str,
    device: int,
    timestamp_ms: int,
    nonce: str,
    body_sha256: str,
) -> bytes:
    """Build the exact bytes covered by the signature (docs/relay-api.md section 1).

    Args:
        method: HTTP method; upper-cased here.
        target: raw path plus ``?query`` exactly as on the request line.
        user: the signing device's username.
        device: the signing device's id.
        timestamp_ms: unix milliseconds.
        nonce: the nonce header value.
        body_sha256: lowercase hex SHA-256 of the body (:data:`EMPTY_SHA256` for none).

    Returns:
        The UTF-8 canonical string: eight fields joined by ``\\n``, no trailing newline.

    Raises:
        UsageError: a field is malformed (lower-level checks than the relay's, so a request
            that would be refused as ``auth_missing`` is not even signed).
    """
    method = method.upper()
    if _METHOD_RE.fullmatch(method) is None:
        raise UsageError("HTTP method must be letters only")
    if not target.startswith("/") or any(c in target for c in " \r\n\t#"):
        raise UsageError("request target must be an origin-form path starting with '/'")
    check_username(user)
    check_device_id(device)
    if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
        raise UsageError("timestamp must be a non-negative integer (unix milliseconds)")
    if not isinstance(nonce, str) or _NONCE_RE.fullmatch(nonce) is None:
        raise UsageError("nonce must be 16..64 characters of [A-Za-z0-9+/=_-]")
    if not isinstance(body_sha256, str) or _HEX64_RE.fullmatch(body_sha256) is None:
        raise UsageError("body digest must be 64 lowercase hex characters")
    return _canonical_string(method, target, user, device, timestamp_ms, nonce, body_sha256)


class DeviceSigner:
    """A device's Ed25519 auth key bound to its (username, device id).

    The signer is what every signed relay request needs: it produces the
    ``X-Blindpost-*`` headers for a request. The public half is the ``auth_key`` given
    at registration (``POST /v1/accounts``) or when adding the device (``POST /v1/devices``).

    Args:
        signing_key: the private Ed25519 key (PyNaCl).
        user: the username the device belongs to (or will be registered under).
        device: the device id, 1..MAX_DEVICE_ID.

    Raises:
        UsageError: bad key type, username or device id.
    """

    __slots__ = ("_device", "_key", "_public_key", "_user")

    def __init__(self, signing_key: SigningKey, user: str, device: int) -> None:
        if not isinstance(signing_key, SigningKey):
            raise UsageError("signing_key must be a nacl.signing.SigningKey")
        self._key = signing_key
        self._public_key = bytes(signing_key.verify_key)
        self._user = check_username(user)
        self._device = check_device_id(device)

    @classmethod
    def from_seed(cls, seed: bytes, user: str, device: int) -> DeviceSigner:
        """Build a signer from the 32-byte Ed25519 seed (the stored private key).

        Args:
            seed: 32 secret bytes.
            user: username.
            device: device id 1..MAX_DEVICE_ID.

        Returns:
            The signer.

        Raises:
            UsageError: the seed is not 32 bytes, or bad username / device id.
        """
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_LEN:
            raise UsageError("an Ed25519 seed is exactly 32 bytes")
        return cls(SigningKey(bytes(seed)), user, device)

    @property
    def user(self) -> str:
        """The username this signer signs as."""
        return self._user

    @property
    def device(self) -> int:
        """The device id this signer signs as."""
        return self._device

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key (the device's ``auth_key``)."""
        return self._public_key

    @property
    def public_key_b64(self) -> str:
        """The public key in padded base64, as the JSON ``auth_key`` field wants it."""
        return base64.b64encode(self._public_key).decode("ascii")

    def __repr__(self) -> str:
        return (
            f"DeviceSigner(user={self._user!r}, device={self._device}, "
            f"public_key={self.public_key_b64!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the private key into whatever stores the pickle.
        raise TypeError("DeviceSigner cannot be pickled; persist the seed deliberately")

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of ``message``.

        Args:
            message: bytes to sign (normally a :func:`canonical_string`).

        Returns:
            The signature.
        """
        return bytes(self._key.sign(message).signature)

    def sign_headers(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        now_ms: int | None = None,
        nonce: str | None = None,
        body_sha256: str | None = None,
    ) -> dict[str, str]:
        """Return the auth headers for one request.

        Args:
            method: HTTP method (``GET`` for the WebSocket upgrade).
            target: raw path and query exactly as sent (``URL.raw_path_qs`` in yarl).
            body: the request body, hashed for the canonical string. Ignored when
                ``body_sha256`` is given.
            now_ms: unix milliseconds; defaults to ``time.time()``.
            nonce: a fresh nonce; defaults to :func:`new_nonce` (16 random bytes).
            body_sha256: precomputed lowercase hex digest of the body, for streamed
                uploads. When given, the ``X-Blindpost-Content-SHA256`` header is added
                (it is required on ``POST /v1/blobs``).

        Returns:
            ``X-Blindpost-User``, ``-Device``, ``-Timestamp``, ``-Nonce``, ``-Signature``
            and, with ``body_sha256``, ``-Content-SHA256``.

        Raises:
            UsageError: a malformed method, target, nonce, timestamp or digest.
        """
        if now_ms is None:
            now_ms = time.time_ns() // 1_000_000
        if nonce is None:
            nonce = new_nonce()
        digest = hashlib.sha256(body).hexdigest() if body_sha256 is None else body_sha256
        message = canonical_string(method, target, self._user, self._device, now_ms, nonce, digest)
        headers = {
            H_USER: self._user,
            H_DEVICE: str(self._device),
            H_TIMESTAMP: str(now_ms),
            H_NONCE: nonce,
            H_SIGNATURE: base64.b64encode(self.sign(message)).decode("ascii"),
        }
        if body_sha256 is not None:
            headers[H_CONTENT_SHA256] = body_sha256
        return headers
