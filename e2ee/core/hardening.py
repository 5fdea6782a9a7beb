"""Hardening patches applied to python-axolotl's classes when e2ee is imported.

Invariant: every patch replaces a python-axolotl method with one of ours that
keeps its contract (same arguments, same exceptions) and closes one documented
defect. The originals stay reachable in :data:`ORIGINALS` so regression tests can
show the defect against bare python-axolotl. Defects that can be closed from the
outside (parsing, limits, trust, compute-then-commit) are closed in our own
wrappers instead; see ``docs/hardening.md``.

Patched:

* ``WhisperMessage.verifyMac`` compared MACs with ``!=``, which can return early
  on the first differing byte. Ours compares with :func:`hmac.compare_digest`.
* The primitives whose calls a hostile message can multiply (message-key
  derivations, key agreements, key generation, signature checks) are wrapped by
  :mod:`e2ee.core.budget`'s work meters, which charge each call to the peer whose
  message is being decrypted. The meters wrap whatever is installed, so
  :func:`apply` installs the fast paths (:mod:`e2ee.core.fastpath`) first.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from axolotl.invalidmessageexception import InvalidMessageException
from axolotl.protocol.whispermessage import WhisperMessage

from e2ee.core import budget, fastpath

__all__ = ["ORIGINALS", "apply"]

ORIGINALS: dict[str, Callable[..., Any]] = {}


def _verify_mac_constant_time(
    self: Any,
    messageVersion: int,
    senderIdentityKey: Any,
    receiverIdentityKey: Any,
    macKey: bytes,
) -> None:
    serialized = bytes(self.serialized)
    mac_length = WhisperMessage.MAC_LENGTH
    if len(serialized) <= mac_length:
        raise InvalidMessageException("Bad Mac!")
    body, their_mac = serialized[:-mac_length], serialized[-mac_length:]
    our_mac = bytes(
        self.getMac(messageVersion, senderIdentityKey, receiverIdentityKey, macKey, body)
    )
    if not hmac.compare_digest(our_mac, their_mac):
        raise InvalidMessageException("Bad Mac!")


def apply() -> None:
    """Install the patches, the fast paths and then the work meters; idempotent."""
    if "WhisperMessage.verifyMac" not in ORIGINALS:
        ORIGINALS["WhisperMessage.verifyMac"] = WhisperMessage.verifyMac
        WhisperMessage.verifyMac = _verify_mac_constant_time
    fastpath.apply()
    budget.install()
