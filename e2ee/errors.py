"""Every error the e2ee SDK raises, split by who is at fault.

Invariant: nothing outside this hierarchy escapes a public e2ee function.
python-axolotl's exceptions (plain ``Exception`` subclasses), protobuf's
``DecodeError`` and the C curve library's ``ValueError``/``TypeError`` are caught
at the boundary and re-raised as one of these, chained with ``from`` so the
cause stays available for debugging.  Messages never contain key material or
plaintext: at most ids, addresses, counters and sizes.

Who is at fault:

* :class:`UsageError` -- the calling program (bad argument, wrong state).
* :class:`PeerError` -- the other party or the network delivered something bad
  (malformed, replayed or forged ciphertext, an unverifiable bundle).
* :class:`StorageError` -- the local store (wrong passphrase, corruption).
* :class:`TransportError` -- the relay or the connection to it.

Every leaf the SDK defines lives here (the relay transport's HTTP/WebSocket
leaves, all :class:`TransportError`, are in :mod:`e2ee.transport.errors`);
:mod:`e2ee.client_errors` re-exports the facade's for old imports.
"""

from __future__ import annotations

__all__ = [
    "AttachmentTooLarge",
    "BackupCorrupt",
    "CertificateMismatch",
    "ChatDeleted",
    "ClientClosed",
    "DecryptBudgetExceeded",
    "DuplicateMessage",
    "E2EEError",
    "ExpiredCertificate",
    "FingerprintVersionMismatch",
    "IdentityHeld",
    "InvalidBundle",
    "InvalidCertificate",
    "InvalidKey",
    "InvalidLinkCode",
    "InvalidLinkGrant",
    "InvalidMessage",
    "InvalidRecoveryKey",
    "LinkNotApproved",
    "MediaCorrupt",
    "MissingKey",
    "NoSession",
    "NotAMember",
    "NotAdmin",
    "NotRegistered",
    "PeerError",
    "RecipientMailboxFull",
    "RelayKeyRejected",
    "SendFailed",
    "SenderKeyJumpTooLarge",
    "StillAMember",
    "StorageError",
    "StoreCorrupt",
    "StoreLocked",
    "TransportError",
    "UnknownChat",
    "UnknownRecipient",
    "UnpinnedRelayKey",
    "UnsupportedEnvelope",
    "UnsupportedPayload",
    "UntrustedIdentity",
    "UsageError",
    "WrongPassphrase",
]


class E2EEError(Exception):
    """Root of every error raised by the e2ee package."""


# -- caller misuse -----------------------------------------------------------------


class UsageError(E2EEError, ValueError):
    """The calling program passed a bad argument or called in the wrong state."""


# -- the client facade (caller misuse and local holds) --------------------------------


class ClientClosed(UsageError):
    """The client was closed; open a new one."""


class InvalidRecoveryKey(UsageError):
    """The text is not a recovery key (wrong length or characters, or a typo caught by its
    checksum). Nothing was sent to the relay."""


class InvalidLinkCode(UsageError):
    """The text is not a device-link code (wrong length, characters or version). Nothing
    was sent to the relay."""


class LinkNotApproved(UsageError):
    """No existing device approved the link code in time (or the relay dropped it as
    expired). Nothing was registered and nothing was written: start over with a new code."""


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


class IdentityHeld(UsageError):
    """Sending to ``user`` is held: their identity key changed and was not accepted.

    A local hold, not a fault of the peer: the user decides (accept or verify
    the new key) and the held messages then go out.

    Attributes:
        user: the contact.
        message_id: the held message (hex), when raised for one.
    """

    def __init__(self, user: str, message_id: str | None = None) -> None:
        super().__init__(f"identity of {user} changed; accept it before sending")
        self.user = user
        self.message_id = message_id


class AttachmentTooLarge(UsageError):
    """An attachment is larger than the caller's in-memory limit (nothing was kept).

    Attributes:
        message_id: the message (hex).
        limit: the limit asked for, in bytes.
    """

    def __init__(self, message_id: str, limit: int) -> None:
        super().__init__(f"the attachment of {message_id} is larger than {limit} bytes")
        self.message_id = message_id
        self.limit = limit


class UnknownChat(UsageError):
    """No chat with this id is kept in history (never was, or deleted already)."""

    def __init__(self, chat_id: str) -> None:
        super().__init__(f"no chat {chat_id} in history")
        self.chat_id = chat_id


class StillAMember(UsageError):
    """A group chat's history cannot be deleted while we are a member: leave first."""

    def __init__(self, group_id: str) -> None:
        super().__init__(f"still a member of group {group_id}: leave it before deleting the chat")
        self.group_id = group_id


class ChatDeleted(UsageError):
    """The chat of a message we were waiting to send was deleted (it was not sent).

    Attributes:
        chat_id: the deleted chat.
        message_id: the message that will not be sent (hex).
    """

    def __init__(self, chat_id: str, message_id: str) -> None:
        super().__init__(f"chat {chat_id} was deleted; message {message_id} was not sent")
        self.chat_id = chat_id
        self.message_id = message_id


# -- the peer or the network ---------------------------------------------------------


class PeerError(E2EEError):
    """Data from a peer (or forged by someone on the path) cannot be accepted."""


class InvalidMessage(PeerError):
    """A ciphertext or protocol message is malformed, forged or undecryptable."""


class InvalidKey(InvalidMessage):
    """A public key in peer data is malformed or not canonically encoded."""


class DuplicateMessage(InvalidMessage):
    """The message was already decrypted once; a replay or a duplicate delivery."""


class MissingKey(InvalidMessage):
    """The message names a prekey or sender-key id we do not (or no longer) hold."""


class NoSession(PeerError):
    """There is no session (1:1) or sender key (group) for this sender yet."""

    def __init__(self, address: str) -> None:
        super().__init__(f"no session for {address}")
        self.address = address


class SenderKeyJumpTooLarge(InvalidMessage):
    """A Sender Key message claims an iteration too far ahead of the chain."""

    def __init__(self, sender: str, jump: int, limit: int) -> None:
        super().__init__(f"sender key message from {sender} jumps {jump} > {limit} iterations")
        self.sender = sender
        self.jump = jump
        self.limit = limit


class DecryptBudgetExceeded(PeerError):
    """A peer's messages used up its decrypt work budget; nothing was stored.

    The message itself may be genuine: retry it after ``retry_after_ms`` (the
    budget refills with time). ``retry_after_ms`` is None when the message needs
    more work than a full budget allows; retrying it will not help.

    Attributes:
        peer: the remote user name the work is charged to.
        needed: work units the message needs at least.
        available: units left in the peer's budget (negative while in debt).
        retry_after_ms: when to retry, or None (never).
    """

    def __init__(self, peer: str, needed: int, available: int, retry_after_ms: int | None) -> None:
        when = "never" if retry_after_ms is None else f"in {retry_after_ms} ms"
        super().__init__(
            f"messages from {peer} are over their decrypt work budget "
            f"(needs {needed} units, {available} left); retry {when}"
        )
        self.peer = peer
        self.needed = needed
        self.available = available
        self.retry_after_ms = retry_after_ms


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


class UnsupportedEnvelope(InvalidMessage):
    """The envelope was written by a newer version of the format."""

    def __init__(self, version: int) -> None:
        super().__init__(f"envelope version {version} is not supported (this build reads 1 and 2)")
        self.version = version


class UnsupportedPayload(InvalidMessage):
    """The payload was written by a version of the format this build cannot read."""

    def __init__(self, version: int) -> None:
        super().__init__(f"payload version {version} is not supported (this build reads 1)")
        self.version = version


class MediaCorrupt(InvalidMessage):
    """An encrypted file is tampered with, truncated, or does not match its digest."""


class InvalidCertificate(InvalidMessage):
    """A sealed message's sender certificate is malformed or its signature does not verify.

    Nothing was decrypted or stored. The leaves say why: expired, signed by a relay key we
    never pinned, or naming someone other than the session it carries.
    """


class ExpiredCertificate(InvalidCertificate):
    """The sender certificate expired before the message was opened."""

    def __init__(self, user: str, expires_ms: int) -> None:
        super().__init__(f"sender certificate of {user} expired at {expires_ms}")
        self.user = user
        self.expires_ms = expires_ms


class UnpinnedRelayKey(InvalidCertificate):
    """The certificate is signed by a relay key that is not among our pinned keys."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"sender certificate signed by unpinned relay key {key_id}")
        self.key_id = key_id


class CertificateMismatch(InvalidCertificate):
    """The certificate names another sender than the one the message claims or was delivered
    as, or another identity key than the one its session uses."""

    def __init__(self, user: str, reason: str) -> None:
        super().__init__(f"sender certificate of {user}: {reason}")
        self.user = user
        self.reason = reason


class RelayKeyRejected(PeerError):
    """The relay announced a certificate key that no pinned key endorses (or that replaces a
    pinned key under the same id); it is not pinned and certificates under it are refused."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"relay key {key_id} is not endorsed by a pinned key")
        self.key_id = key_id


class InvalidBundle(PeerError):
    """A prekey bundle is malformed or its signed-prekey signature does not verify."""


class InvalidLinkGrant(PeerError):
    """A device-link grant does not decrypt, does not decode, or does not name this device's
    auth key (tampered with, or meant for another code). Nothing was written."""


class UntrustedIdentity(PeerError):
    """The peer's identity key differs from the one we trust for this address.

    Nothing was decrypted or stored. The application decides whether to accept
    the new key (see the SDK's trust API) and then retries.
    """

    def __init__(self, address: str) -> None:
        super().__init__(f"identity key of {address} changed and is not trusted")
        self.address = address


class FingerprintVersionMismatch(PeerError):
    """A scanned safety-number payload uses a different fingerprint version."""

    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__(f"fingerprint version {theirs}, expected {ours}")
        self.ours = ours
        self.theirs = theirs


# -- local storage ---------------------------------------------------------------------


class StorageError(E2EEError):
    """The local store failed, or its content cannot be read."""


class WrongPassphrase(StorageError):
    """The passphrase does not open the local key store. Nothing was changed."""


class StoreCorrupt(StorageError):
    """Stored data failed authentication or does not parse."""


class StoreLocked(StorageError):
    """Another process has this data directory open (one process per directory)."""


class BackupCorrupt(StorageError):
    """A backup file is truncated, tampered with, or not a backup of this format; nothing
    was restored. (A wrong passphrase is :class:`WrongPassphrase`.)"""


# -- the relay -----------------------------------------------------------------------


class TransportError(E2EEError):
    """The relay could not be reached or answered with an error."""


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
