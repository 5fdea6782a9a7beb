"""What a messaging rule returns: rows to commit, events, follow-up work.

Invariants:

* An :class:`Outcome` is all a rule produced; applying it is the caller's job
  (commit ``rows`` and ``counters`` in one transaction, then emit ``events``
  and carry out ``follow_ups``). Nothing happened before that.
* ``counters`` and ``chats`` hold values every later message overwrites; a
  receive batch may write them once at its end (same transaction).
* Follow-ups are plain values; the client's inbox and outbox perform them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2ee.events import Event
from e2ee.messaging.rows import AppRow, ChatRow, CounterRow, Row, as_row
from e2ee.messaging.view import HistoryView
from e2ee.payload import SyncContact
from e2ee.store.protocols import Address

__all__ = [
    "AnswerSyncRequest",
    "ApplyTrust",
    "FollowUp",
    "ForgetSenders",
    "Outcome",
    "ProcessSenderKey",
    "RequestSenderKey",
    "ResendSenderKey",
    "ResetSession",
    "RotateGroupKey",
    "WakeOutbox",
]


@dataclass(frozen=True, slots=True)
class ResetSession:
    """Start a fresh session with ``peer`` and tell them (a bounded repair)."""

    peer: Address


@dataclass(frozen=True, slots=True)
class RequestSenderKey:
    """Ask ``sender`` for their current Sender Key of group ``group_id``."""

    group_id: str
    sender: Address


@dataclass(frozen=True, slots=True)
class ResendSenderKey:
    """``user`` asked for our Sender Key of ``group_id``: send it with our next message."""

    group_id: str
    user: str


@dataclass(frozen=True, slots=True)
class WakeOutbox:
    """Something for the outbox to send (delivered receipts)."""


@dataclass(frozen=True, slots=True)
class ProcessSenderKey:
    """Install ``sender``'s Sender Key distribution for ``group_id`` (engine call)."""

    group_id: str
    sender: Address
    distribution: bytes


@dataclass(frozen=True, slots=True)
class RotateGroupKey:
    """Make a new Sender Key of ours for ``group_id`` (a member left or was removed)."""

    group_id: str


@dataclass(frozen=True, slots=True)
class ForgetSenders:
    """Drop these members' Sender Keys of ``group_id`` (engine call)."""

    group_id: str
    senders: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class ApplyTrust:
    """Take over our other device's trust decisions about ``contact``'s keys.

    Carried out in the same transaction, with the identity records this device
    holds (:func:`e2ee.messaging.sync.trust_changes` decides which).
    """

    contact: SyncContact


@dataclass(frozen=True, slots=True)
class AnswerSyncRequest:
    """Our new device ``device`` asked for our contacts and groups: send them."""

    device: Address


FollowUp = (
    ResetSession
    | RequestSenderKey
    | ResendSenderKey
    | WakeOutbox
    | ProcessSenderKey
    | RotateGroupKey
    | ForgetSenders
    | ApplyTrust
    | AnswerSyncRequest
)


@dataclass(slots=True)
class Outcome:
    """Rows to commit, events to emit and follow-ups to perform.

    Attributes:
        rows: history rows, in order.
        counters: named counters to write (value after this outcome).
        chats: chat rows touched (``last_message_at`` and the like), by id.
        events: to emit once the rows are committed.
        follow_ups: to perform once the rows are committed (engine calls in
            :class:`ProcessSenderKey`, :class:`RotateGroupKey` and
            :class:`ForgetSenders` belong to the same transaction).
    """

    rows: list[AppRow] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    chats: dict[str, ChatRow] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    follow_ups: list[FollowUp] = field(default_factory=list)

    def counter(self, view: HistoryView, name: str) -> int | None:
        """A counter as this outcome leaves it (its own writes first)."""
        if name in self.counters:
            return self.counters[name]
        return view.counter(name)

    def chat(self, view: HistoryView, chat_id: str) -> ChatRow | None:
        """A chat row as this outcome leaves it (its own writes first)."""
        if chat_id in self.chats:
            return self.chats[chat_id]
        return view.get(ChatRow, chat_id)

    def next_seq(self, view: HistoryView, name: str) -> int:
        """Take the next value of a sequence counter (``seq:messages``, ``seq:outbox``)."""
        value = (self.counter(view, name) or 0) + 1
        self.counters[name] = value
        return value

    def typed_rows(self) -> list[AppRow]:
        """``rows``, then the chat rows, then the counter rows."""
        out = list(self.rows)
        out.extend(self.chats.values())
        out.extend(CounterRow(k, v) for k, v in self.counters.items())
        return out

    def all_rows(self) -> list[Row]:
        """:meth:`typed_rows` as the (table, row) pairs the store commits."""
        return [as_row(r) for r in self.typed_rows()]
