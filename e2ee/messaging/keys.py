"""The names of the client's counters (rows of the ``counters`` table), in one place.

Invariants:

* Every counter name is made here; nothing else spells one. The names are
  stored, so they never change (the families read ``seq:``, ``out:``, ``in:``,
  ``unreadable:``, ``rcpt:``, ``repair:``, ``keygen:`` and ``dist:``; the
  ``gaps`` rows read ``gaps:``).
* Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from e2ee.store.protocols import Address

__all__ = [
    "DELIVERED_RECEIPTS",
    "DISTRIBUTED_PREFIX",
    "SEQ_MESSAGES",
    "SEQ_OUTBOX",
    "distributed",
    "gaps",
    "incoming",
    "key_generation",
    "outgoing",
    "repair",
    "unreadable",
]

#: The local order of ``messages`` rows (their ``seq``).
SEQ_MESSAGES: Final = "seq:messages"
#: The local order of ``outbox`` rows (their ``seq``): the sending order.
SEQ_OUTBOX: Final = "seq:outbox"
#: The ``seq`` up to which delivered receipts were accepted by the relay.
DELIVERED_RECEIPTS: Final = "rcpt:delivered"
#: Every :func:`distributed` counter's name starts with this.
DISTRIBUTED_PREFIX: Final = "dist:"


def outgoing(chat_id: str) -> str:
    """Our last message counter in a chat (the receiver's gap detection reads it)."""
    return f"out:{chat_id}"


def incoming(sender: Address, chat_id: str) -> str:
    """The last counter seen from a sender device in a chat."""
    return f"in:{sender}:{chat_id}"


def gaps(sender: Address, chat_id: str) -> str:
    """The ``gaps`` row of a sender device in a chat (its open gaps)."""
    return f"gaps:{sender}:{chat_id}"


def unreadable(sender: Address, chat_id: str) -> str:
    """Messages from a sender device in a chat that arrived but could not be read."""
    return f"unreadable:{sender}:{chat_id}"


def repair(sender: Address, scope: str) -> str:
    """When (unix ms) we last repaired a sender device (scope: a group id or "")."""
    return f"repair:{sender}:{scope}"


def key_generation(group_id: str) -> str:
    """How often our Sender Key of a group was rotated."""
    return f"keygen:{group_id}"


def distributed(group_id: str, user: str, device: int) -> str:
    """The generation of our Sender Key a member device last received."""
    return f"{DISTRIBUTED_PREFIX}{group_id}:{user}.{device}"
