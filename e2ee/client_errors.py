"""The client facade's errors, re-exported from :mod:`e2ee.errors` (their one home).

Kept so ``from e2ee.client_errors import IdentityHeld`` goes on working.
"""

from __future__ import annotations

from e2ee.errors import (
    ClientClosed,
    IdentityHeld,
    NotAdmin,
    NotAMember,
    NotRegistered,
    RecipientMailboxFull,
    SendFailed,
    StoreLocked,
    UnknownRecipient,
)

__all__ = [
    "ClientClosed",
    "IdentityHeld",
    "NotAMember",
    "NotAdmin",
    "NotRegistered",
    "RecipientMailboxFull",
    "SendFailed",
    "StoreLocked",
    "UnknownRecipient",
]
