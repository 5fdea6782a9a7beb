"""How the relay's refusal of a send reaches the caller waiting for it.

Invariants:

* A full mailbox is a refusal for good (``RecipientMailboxFull``): it stays full until its
  owner receives, so the message is marked failed, never retried.
* A retryable refusal (429, 5xx) stays a ``TransportError``: the entry stays queued.
* Every other refusal is ``SendFailed``; a caller waiting for a message hears the error
  naming that message (:func:`for_message`).
"""

from __future__ import annotations

from typing import NoReturn

from e2ee.client_errors import RecipientMailboxFull, SendFailed, UnknownRecipient
from e2ee.errors import E2EEError
from e2ee.transport.errors import MailboxFull, RelayRejected

__all__ = ["for_good", "for_message", "raise_refused"]


def for_good(exc: RelayRejected) -> bool:
    """Whether the relay refused for good (a full mailbox too: not retried)."""
    return isinstance(exc, MailboxFull) or not exc.retryable


def raise_refused(exc: RelayRejected) -> NoReturn:
    """Raise what a send refused by the relay raises: a full mailbox or a refusal for good,
    typed for the caller (from ``exc``); a retryable refusal (429, 5xx) as it is (the entry
    stays queued)."""
    if isinstance(exc, MailboxFull):
        # Not retried: a full mailbox stays full until its owner receives.
        raise RecipientMailboxFull(exc.full) from exc
    if exc.retryable:
        raise exc
    raise SendFailed(f"relay refused message: {exc.code}") from exc


def for_message(exc: E2EEError, message_id: str) -> E2EEError:
    """The error a caller waiting for ``message_id`` gets: the same, naming the message."""
    if isinstance(exc, UnknownRecipient):
        return UnknownRecipient(exc.user, message_id)
    if isinstance(exc, RecipientMailboxFull):
        return RecipientMailboxFull(exc.full, message_id)
    if isinstance(exc, SendFailed):
        return SendFailed(str(exc), message_id)
    return exc
