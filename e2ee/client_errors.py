"""Errors specific to the client SDK facade, rooted in :mod:`e2ee.errors`.

Invariant: each is a subclass of the :mod:`e2ee.errors` class that says who is
at fault, so ``except UsageError`` / ``except PeerError`` keep working.
Messages name users, devices and ids, never keys or plaintext.
"""

from __future__ import annotations

from e2ee.errors import PeerError, StorageError, TransportError, UsageError

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


class ClientClosed(UsageError):
    """The client was closed; open a new one."""


class NotRegistered(UsageError):
    """The account has not been registered with a relay yet."""


class NotAdmin(UsageError):
    """Only a group admin may change membership (as our group state says)."""

    def __init__(self, group_id: str) -> None:
        super().__init__(f"only an admin of group {group_id} can do that")
        self.group_id = group_id


class NotAMember(UsageError):
    """We are not (or no longer) a member of this group."""

    def __init__(self, group_id: str) -> None:
        super().__init__(f"not a member of group {group_id}")
        self.group_id = group_id


class IdentityHeld(PeerError):
    """Sending to ``user`` is held: their identity key changed and was not accepted.

    Attributes:
        user: the contact.
        message_id: the held message (hex), when raised for one.
    """

    def __init__(self, user: str, message_id: str | None = None) -> None:
        super().__init__(f"identity of {user} changed; accept it before sending")
        self.user = user
        self.message_id = message_id


class UnknownRecipient(PeerError):
    """The relay does not know this user (or they have no devices with keys).

    Attributes:
        user: the user.
        message_id: the failed message (hex), when raised for one.
    """

    def __init__(self, user: str, message_id: str | None = None) -> None:
        super().__init__(f"unknown recipient {user}")
        self.user = user
        self.message_id = message_id


class SendFailed(TransportError):
    """The relay refused a message for good (it stays in history as failed).

    Attributes:
        message_id: the failed message (hex), when raised for one.
    """

    def __init__(self, message: str, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class RecipientMailboxFull(SendFailed):
    """The relay refused the message: a recipient's mailbox is full (relay status 507).

    Nothing was stored on the relay; the message is marked failed in history.
    The recipient has to receive (empty their mailbox) before more can reach them.

    Attributes:
        full: the (user, device) mailboxes the relay reported full.
        message_id: the failed message (hex), when raised for one.
    """

    def __init__(self, full: tuple[tuple[str, int], ...], message_id: str | None = None) -> None:
        users = ", ".join(sorted({user for user, _ in full})) or "a recipient"
        super().__init__(
            f"the mailbox of {users} is full on the relay; nothing was sent "
            "(it empties when they receive)",
            message_id,
        )
        self.full = full


class StoreLocked(StorageError):
    """Another process has this data directory open (one process per directory)."""
