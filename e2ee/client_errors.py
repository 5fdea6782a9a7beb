"""The client facade's errors: what :class:`e2ee.client.Client` methods raise.

Re-exported from their one home each: :mod:`e2ee.errors` (the facade's own errors) and
:mod:`e2ee.transport.errors` (the relay link's failures that reach a caller of ``Client``:
``send``, ``create``, ``download``, ``connect``...). Programs built on the facade (the TUI
and the CLI, by an import-linter contract) import them from here, never from the transport.
"""

from __future__ import annotations

from e2ee.errors import (
    BackupCorrupt,
    ClientClosed,
    IdentityHeld,
    InvalidLinkCode,
    InvalidLinkGrant,
    InvalidRecoveryKey,
    LinkNotApproved,
    NotAdmin,
    NotAMember,
    NotRegistered,
    RecipientMailboxFull,
    SendFailed,
    StoreLocked,
    UnknownRecipient,
)
from e2ee.transport.errors import (
    AuthFailed,
    ConnectionFailed,
    ConnectionLost,
    InviteInvalid,
    InviteRequired,
    MailboxFull,
    NotConnected,
    NotFound,
    RateLimited,
    RecoveryRefused,
    RegistrationClosed,
    RegistrationRefused,
    RelayRejected,
    RelayTimeout,
    TooLarge,
    UsernameTaken,
)

__all__ = [
    "AuthFailed",
    "BackupCorrupt",
    "ClientClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "IdentityHeld",
    "InvalidLinkCode",
    "InvalidLinkGrant",
    "InvalidRecoveryKey",
    "InviteInvalid",
    "InviteRequired",
    "LinkNotApproved",
    "MailboxFull",
    "NotAMember",
    "NotAdmin",
    "NotConnected",
    "NotFound",
    "NotRegistered",
    "RateLimited",
    "RecipientMailboxFull",
    "RecoveryRefused",
    "RegistrationClosed",
    "RegistrationRefused",
    "RelayRejected",
    "RelayTimeout",
    "SendFailed",
    "StoreLocked",
    "TooLarge",
    "UnknownRecipient",
    "UsernameTaken",
]
