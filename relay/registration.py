# Invariants:
# * A challenge is valid only if its MAC verifies under this relay's registration key, it has
#   not expired, and it asks at least the currently configured difficulty; it carries no state
#   on the relay (a restarted process with the same key file verifies it).
# * The key lives in ``<data_dir>/registration.key`` (32 random bytes, mode 0600), created once,
#   atomically: processes starting together all end up with the same key. Relay nodes that
#   share a replay guard (Redis, PostgreSQL) derive it from that guard's shared secret instead
#   (``shared_registration_key``), so a challenge one node issued verifies on every node.
# * Invite codes are never stored: only their SHA-256 (a leaked database grants no invite).
"""Registration gate: modes, proof-of-work challenges and invite codes (relay side)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from blindpost_wire.registration import MAX_POW_DIFFICULTY, POW_NONCE_MAX, pow_digest, pow_ok
from relay.errors import BadRequest, Forbidden

__all__ = [
    "KEY_FILE",
    "Challenge",
    "RegistrationGate",
    "invite_hash",
    "load_or_create_key",
    "new_invite_code",
    "shared_registration_key",
]

KEY_FILE = "registration.key"
_KEY_LEN = 32
_MAC_LEN = 16
_PERSON = b"bp-reg-chal-v1"


def load_or_create_key(data_dir: Path) -> bytes:
    """Return the relay's registration MAC key, creating it on first use.

    Raises:
        OSError: the data directory is not writable, or the key file is damaged.
    """
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_LEN))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def shared_registration_key(shared_secret: bytes) -> bytes:
    """The registration MAC key of nodes sharing a replay guard: a keyed BLAKE2b of a fixed
    label under the guard's shared secret (domain-separated from the nonce digests).

    Args:
        shared_secret: ``relay.replay.SharedReplayGuard.shared_secret()``.

    Returns:
        The key (as long as a key file's).
    """
    return hashlib.blake2b(
        b"registration MAC key", digest_size=_KEY_LEN, key=shared_secret, person=b"blindpost-regkey"
    ).digest()


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != _KEY_LEN:
        raise OSError(f"{path} is damaged (expected {_KEY_LEN} bytes); remove it to make a new one")
    return key


def new_invite_code() -> str:
    """A fresh invite code: 128 random bits as 26 lowercase base32 characters (``a-z2-7``).

    Not URL-safe base64: a code starting with ``-`` is read as an option by a command line
    (``blindpost init NAME --invite -x2...`` failed), and base32 survives reading aloud.
    """
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


def invite_hash(code: str) -> bytes:
    """What the store keeps of an invite code (SHA-256 of its UTF-8 bytes)."""
    return hashlib.sha256(code.encode("utf-8", "replace")).digest()


@dataclass(frozen=True, slots=True)
class Challenge:
    """An issued challenge: the string to hash, its difficulty and expiry (unix ms)."""

    text: str
    difficulty: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class RegistrationGate:
    """Issues and checks proof-of-work challenges.

    Args:
        key: the MAC key (``load_or_create_key``).
        difficulty: leading zero bits a solution needs.
        ttl_ms: how long a challenge stays valid.
    """

    def __init__(self, key: bytes, difficulty: int, ttl_ms: int) -> None:
        self._key = key
        self.difficulty = difficulty
        self._ttl_ms = ttl_ms

    def __repr__(self) -> str:
        return f"RegistrationGate(difficulty={self.difficulty})"

    def _mac(self, body: str) -> str:
        mac = hashlib.blake2b(
            body.encode("ascii"), key=self._key, digest_size=_MAC_LEN, person=_PERSON
        )
        return _b64(mac.digest())

    def issue(self, now_ms: int) -> Challenge:
        """Return a new challenge ``"<expires_ms>.<difficulty>.<random>.<mac>"``."""
        expires = now_ms + self._ttl_ms
        body = f"{expires}.{self.difficulty}.{_b64(secrets.token_bytes(16))}"
        return Challenge(f"{body}.{self._mac(body)}", self.difficulty, expires)

    def verify(self, doc: object, username: str, now_ms: int) -> None:
        """Check a ``"pow": {"challenge": str, "nonce": int}`` object for ``username``.

        Raises:
            Forbidden: ``pow_required`` (absent), ``pow_invalid`` (forged, expired, too easy,
                or the work does not verify).
            BadRequest: malformed.
        """
        if doc is None:
            raise Forbidden(
                "this relay requires a proof of work: GET /v1/registration", code="pow_required"
            )
        if not isinstance(doc, dict):
            raise BadRequest("pow must be an object")
        text, nonce = doc.get("challenge"), doc.get("nonce")
        if not isinstance(text, str) or len(text) > 200:
            raise BadRequest("pow.challenge must be a string")
        if not isinstance(nonce, int) or isinstance(nonce, bool) or not 0 <= nonce <= POW_NONCE_MAX:
            raise BadRequest("pow.nonce must be an integer 0..2**64-1")
        parts = text.split(".")
        if len(parts) != 4:
            raise Forbidden("not a challenge of this relay", code="pow_invalid")
        body = ".".join(parts[:3])
        if not body.isascii() or not hmac.compare_digest(self._mac(body), parts[3]):
            raise Forbidden("not a challenge of this relay", code="pow_invalid")
        expires, difficulty = int(parts[0]), int(parts[1])  # MACed: our own digits
        if expires < now_ms:
            raise Forbidden("the challenge expired: fetch a new one", code="pow_invalid")
        if difficulty < self.difficulty or difficulty > MAX_POW_DIFFICULTY:
            raise Forbidden("the challenge is easier than required now", code="pow_invalid")
        if not pow_ok(pow_digest(text, username, nonce), difficulty):
            raise Forbidden("the proof of work does not verify", code="pow_invalid")
