"""Registration modes and the proof of work (docs/relay-api.md, "Registration").

Invariant: :func:`pow_digest` is the only definition of the hashed bytes and
:func:`pow_ok` the only acceptance rule; the SDK solves and the relay verifies
exactly these. The work is bound to the relay-issued challenge (MACed, expiring:
it cannot be prepared in advance) and to the username (one solution registers one
name, and a name registers once, so a solution cannot be replayed). Hashcash on
SHA-256: a solution is a nonce whose digest starts with ``difficulty`` zero bits;
finding one costs ``2**difficulty`` hashes on average, checking it costs one.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = [
    "MAX_POW_DIFFICULTY",
    "POW_NONCE_MAX",
    "REGISTRATION_MODES",
    "pow_digest",
    "pow_ok",
    "solve_pow",
]

#: ``open``: anyone; ``pow``: a proof of work per account; ``invite``: an operator's
#: single-use code per account; ``closed``: nobody.
REGISTRATION_MODES: Final = ("open", "pow", "invite", "closed")
#: Bound on the setting: 40 bits is days of a single core's work.
MAX_POW_DIFFICULTY: Final = 40
POW_NONCE_MAX: Final = (1 << 64) - 1
_DOMAIN: Final = b"blindpost-pow-v1\x00"


def _prefix(challenge: str, username: str) -> hashlib._Hash:
    h = hashlib.sha256(_DOMAIN)
    h.update(challenge.encode("ascii", "replace"))
    h.update(b"\x00")
    h.update(username.encode("utf-8", "replace"))
    h.update(b"\x00")
    return h


def pow_digest(challenge: str, username: str, nonce: int) -> bytes:
    """SHA-256 over the domain tag, challenge, username and the nonce (8 bytes, big-endian).

    Args:
        challenge: the relay-issued challenge string, verbatim.
        username: the name being registered.
        nonce: 0..2**64-1.

    Returns:
        The 32-byte digest.
    """
    h = _prefix(challenge, username)
    h.update(nonce.to_bytes(8, "big"))
    return h.digest()


def pow_ok(digest: bytes, difficulty: int) -> bool:
    """True when ``digest`` starts with at least ``difficulty`` zero bits."""
    return int.from_bytes(digest, "big") >> (len(digest) * 8 - difficulty) == 0


def solve_pow(challenge: str, username: str, difficulty: int, start: int = 0) -> int:
    """Find a nonce >= ``start`` whose :func:`pow_digest` passes :func:`pow_ok` (CPU-bound).

    Args:
        challenge: the relay-issued challenge.
        username: the name being registered.
        difficulty: leading zero bits required (0..``MAX_POW_DIFFICULTY``).
        start: first nonce tried.

    Returns:
        The nonce.

    Raises:
        ValueError: difficulty out of range.
    """
    if not 0 <= difficulty <= MAX_POW_DIFFICULTY:
        raise ValueError(f"difficulty must be 0..{MAX_POW_DIFFICULTY}")
    if difficulty == 0:
        return start
    base = _prefix(challenge, username)
    # d leading zero bits <=> the digest, big-endian, is below 2**(256-d): one bytes
    # comparison in C per try instead of building an int.
    below = (1 << (256 - difficulty)).to_bytes(32, "big")
    nonce = start
    while True:
        h = base.copy()
        h.update(nonce.to_bytes(8, "big"))
        if h.digest() < below:
            return nonce
        nonce += 1
