"""Typed, immutable events emitted by :class:`e2ee.client.Client`.

Invariants:

* Every event is a frozen dataclass; nothing in an event is a secret (no keys,
  no ciphertext). Message text is reachable only through ``message`` objects,
  whose repr leaves the text out.
* Events are emitted after the state they describe is committed: a program that
  reacts to :class:`MessageReceived` finds the message in history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from e2ee.messaging.rows import StoredMessage

__all__ = [
    "AttachmentMeta",
    "BacklogDrained",
    "ConnectionStateChanged",
    "DecryptionProblem",
    "Event",
    "GapDetected",
    "GroupChanged",
    "IdentityChanged",
    "MessageChanged",
    "MessageReceived",
    "MessageStored",
    "ReceiptUpdated",
    "Typing",
]


@dataclass(frozen=True, slots=True)
class AttachmentMeta:
    """What can be shown of an attachment we sent (no key, no digest)."""

    file_name: str
    size: int
    mime_type: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A new message (text, attachment, timer change...) was stored in history."""

    message: StoredMessage


@dataclass(frozen=True, slots=True)
class MessageStored:
    """One of our own messages was stored in history and queued for sending.

    Also emitted when another of our devices sent a message (its transcript or
    our own group message arrived): ``outgoing`` is True and ``status`` ``sent``.

    Emitted by every ``send_*`` call (and group changes) once the row is
    committed, before the relay accepted it (``status`` is ``pending``); the
    ``ReceiptUpdated`` events that follow move its status on.

    ``attachment``: the file it carries (name, size, type), if any;
    ``quote_sender``: the author of the message it replies to, if any. With
    them a view shows the new message without reading history.
    """

    message: StoredMessage
    attachment: AttachmentMeta | None = None
    quote_sender: str | None = None


@dataclass(frozen=True, slots=True)
class MessageChanged:
    """A stored message was edited, deleted for everyone, reacted to, or expired.

    ``quote_deleted``: the message it quotes was deleted for everyone, so its
    copy of the quoted text (``quote_text``) was cleared.

    ``read``: another of our devices marked this incoming message read (its
    ``read_at`` is set here too; no second read receipt is sent).

    ``message`` is the message as committed after the change (None only from
    producers older than this field); ``reaction`` is ``by``'s reaction after a
    ``reaction`` change (``""``: removed). A view applies them without reading
    history.
    """

    message_id: str
    chat_id: str
    change: Literal["edited", "deleted", "reaction", "expired", "quote_deleted", "read"]
    by: str
    message: StoredMessage | None = None
    reaction: str | None = None


@dataclass(frozen=True, slots=True)
class ReceiptUpdated:
    """An outgoing message's status changed for a recipient.

    ``status`` is ``sent`` (the relay accepted it; ``user`` is None then: it
    concerns every recipient), ``delivered`` or ``read``. ``message_status`` is
    the message's best status over all recipients after this receipt (what a
    view shows; None when the message is not in history).
    """

    message_id: str
    chat_id: str
    status: Literal["sent", "delivered", "read"]
    user: str | None = None
    device: int | None = None
    message_status: str | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    """A contact started or stopped typing in a chat."""

    chat_id: str
    user: str
    device: int
    typing: bool


@dataclass(frozen=True, slots=True)
class GroupChanged:
    """A group was created or changed (by an admin, or a member leaving).

    ``sync``: another of our devices told us the group's state (a linked
    device learning the groups it is in).

    ``notice`` is the history row that records it in the group's chat (type
    ``group``: ``sender`` is who made the change, ``text`` what changed, e.g.
    ``renamed the group to 'climbers'``), committed with the change; None when
    it was stored already.
    """

    group_id: str
    action: Literal["create", "add", "remove", "leave", "rename", "sync"]
    by: str
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    targets: tuple[str, ...] = ()
    notice: StoredMessage | None = None


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """A contact device's identity key is new or changed.

    ``held`` is True when sending to that contact is held until the user accepts
    the key (:meth:`e2ee.client.Client.accept_identity`).
    """

    user: str
    device: int
    first_use: bool
    held: bool


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    """The relay connection went up or down; ``retry_in`` is the backoff delay (s)."""

    state: Literal["connecting", "connected", "offline", "closed"]
    retry_in: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BacklogDrained:
    """Every message waiting at the relay when we connected was processed.

    Processed means committed, its events emitted and its acknowledgement queued.
    Emitted once per connection, after ``ConnectionStateChanged("connected")``.
    """

    processed: int


@dataclass(frozen=True, slots=True)
class DecryptionProblem:
    """A message from ``user``/``device`` could not be decrypted or read.

    Attributes:
        error: the e2ee error class name (``NoSession``, ``InvalidMessage``...).
        explanation: what it means, for people.
        repair: ``session_reset`` when a new session was started and the sender
            asked to use it, ``sender_key_request`` when the group sender was
            asked for its key again, ``none`` when nothing can be done (or the
            repair budget for this sender is used up).
        notice: the history row that records it in its chat (type
            ``undecryptable``, see :data:`e2ee.history.NOTICE_TYPES`), or None when
            the chat is unknown (a group we are not in).
    """

    user: str
    device: int
    error: str
    explanation: str
    repair: Literal["session_reset", "sender_key_request", "none"]
    group_id: str | None = None
    notice: StoredMessage | None = None


@dataclass(frozen=True, slots=True)
class GapDetected:
    """The sender's counter jumped: ``missed`` messages from them never arrived.

    ``notice`` is the history row that records it (type ``gap``), stored just
    before the message that revealed the gap, in the same transaction.
    """

    chat_id: str
    user: str
    device: int
    missed: int
    notice: StoredMessage | None = None


Event = (
    BacklogDrained
    | MessageReceived
    | MessageStored
    | MessageChanged
    | ReceiptUpdated
    | Typing
    | GroupChanged
    | IdentityChanged
    | ConnectionStateChanged
    | DecryptionProblem
    | GapDetected
)
