"""Name rules both sides enforce: usernames and device ids (docs/relay-api.md section 2).

Invariants: this module is the only definition of what a username and a device id are.
The relay refuses, and the SDK never sends, a name outside :data:`USERNAME_PATTERN` or a
device id outside ``MIN_DEVICE_ID..MAX_DEVICE_ID`` (binary frames carry the device id in
one byte, and the relay's device table is bounded by it). Predicates only: each side
raises its own typed error.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_DEVICE_ID",
    "MIN_DEVICE_ID",
    "RESERVED_USERNAMES",
    "SEALED_DEVICE_ID",
    "SEALED_SENDER_RE",
    "USERNAME_BYTES_RE",
    "USERNAME_PATTERN",
    "USERNAME_RE",
    "is_device_id",
    "is_sealed_sender",
    "is_username",
    "sealed_sender_name",
]

#: A username: 3 to 32 characters of lowercase ASCII letters, digits and ``_``.
USERNAME_PATTERN: Final = r"[a-z0-9_]{3,32}"
#: :data:`USERNAME_PATTERN` compiled for text (use ``fullmatch``).
USERNAME_RE: Final = re.compile(USERNAME_PATTERN)
#: :data:`USERNAME_PATTERN` compiled for the raw bytes of a binary frame (use ``fullmatch``).
USERNAME_BYTES_RE: Final = re.compile(USERNAME_PATTERN.encode("ascii"))
#: Names that match the pattern but collide with a relay route (``GET /v1/users/count``).
RESERVED_USERNAMES: Final = frozenset({"count"})
#: The smallest device id.
MIN_DEVICE_ID: Final = 1
#: The largest device id (one byte in the binary frames, high bit clear).
MAX_DEVICE_ID: Final = 127


#: The sender the relay stores and delivers for a sealed message (it does not know the real
#: one): ``~`` and 16 hex digits, never a username, with device id 0, never a device.
SEALED_SENDER_RE: Final = re.compile(r"~[0-9a-f]{16}")
SEALED_DEVICE_ID: Final = 0


def sealed_sender_name(digest: bytes) -> str:
    """The pseudonym a sealed message is stored under, from a digest of its tokens' verifiers
    (the first 8 bytes are used)."""
    return "~" + digest[:8].hex()


def is_sealed_sender(user: object, device: object) -> bool:
    """Tell whether (``user``, ``device``) is a sealed message's pseudonymous sender."""
    return (
        isinstance(user, str)
        and SEALED_SENDER_RE.fullmatch(user) is not None
        and device == SEALED_DEVICE_ID
    )


def is_username(value: object) -> bool:
    """Tell whether ``value`` is a well-formed username (reserved names included).

    Args:
        value: anything.

    Returns:
        True for a ``str`` that fully matches :data:`USERNAME_PATTERN`.
    """
    return isinstance(value, str) and USERNAME_RE.fullmatch(value) is not None


def is_device_id(value: object) -> bool:
    """Tell whether ``value`` is a device id (an ``int``, not a ``bool``, in range).

    Args:
        value: anything.

    Returns:
        True for an ``int`` in ``MIN_DEVICE_ID..MAX_DEVICE_ID``.
    """
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and MIN_DEVICE_ID <= value <= MAX_DEVICE_ID
    )
