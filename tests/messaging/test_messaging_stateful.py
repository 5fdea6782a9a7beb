"""Two messaging states exchange payloads with reordering, drops and duplicates.

A Hypothesis state machine drives the pure rules (``compose`` on the sender,
``apply_payload`` on the receiver) of Alice and Bob over two in-memory
histories, without a relay, crypto or an event loop. The network between them
is a mailbox per recipient, as the relay keeps one (first in, first out), but

* a message may be dropped (never delivered),
* a message may be held back and delivered later, after messages sent after
  it (the SDK defers a delivery while its sender is over the decrypt budget;
  a crash before the acknowledgement makes the relay deliver it again later),
* a message already delivered may come again (a redelivery after a crash
  before the acknowledgement),
* the two directions interleave arbitrarily, and a party sends while
  messages to it are still in flight.

What a user relies on, checked after every step:

* every delivered message is shown once (one ``MessageReceived``, one row),
  in the sender's order, late ones included;
* gaps are reported exactly: the gap notices still shown count exactly the
  messages the receiver has passed that have not arrived (dropped, or held
  back and not delivered yet); each stands before the message that revealed
  it, with only late messages of its own gap in between.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from e2ee import payload
from e2ee.events import GapDetected, MessageReceived
from e2ee.messaging.compose import Draft, compose
from e2ee.messaging.inbound import apply_payload
from e2ee.messaging.memory import MemoryHistory
from e2ee.messaging.rows import OutboxRow
from e2ee.payload import Payload, PayloadType
from e2ee.store.protocols import Address

NAMES = ("alice", "bob")


@dataclass
class Party:
    me: Address
    history: MemoryHistory = field(default_factory=MemoryHistory)
    #: Payloads to this party not yet delivered (FIFO), with their fate decided later.
    mailbox: list[Payload] = field(default_factory=list)
    #: Payloads to this party already delivered (candidates for a redelivery).
    delivered: list[Payload] = field(default_factory=list)
    #: Sender counters of messages to this party that were dropped.
    dropped: list[int] = field(default_factory=list)
    #: Payloads to this party held back, delivered later out of order (or never).
    held: list[Payload] = field(default_factory=list)
    shown: Counter[str] = field(default_factory=Counter)
    gaps: list[int] = field(default_factory=list)


class TwoParties(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.parties = {n: Party(Address(n, 1)) for n in NAMES}
        self.ids = itertools.count(1)
        self.clock = itertools.count(1_000, 7)

    def other(self, name: str) -> Party:
        return self.parties[NAMES[1 - NAMES.index(name)]]

    @rule(sender=st.sampled_from(NAMES), text=st.text(min_size=1, max_size=8))
    def send(self, sender: str, text: str) -> None:
        party, peer = self.parties[sender], self.other(sender)
        composed = compose(
            party.history,
            party.me,
            Draft(peer.me.name, PayloadType.TEXT, text=text),
            next(self.clock),
            next(self.ids).to_bytes(16, "big"),
        )
        party.history.commit(composed.outcome)
        entry = next(r for r in composed.outcome.rows if isinstance(r, OutboxRow))
        assert entry.payload is not None
        peer.mailbox.append(payload.decode(entry.payload))

    def _apply(self, party: Party, body: Payload) -> None:
        sender = self.other(party.me.name).me
        out = apply_payload(
            party.history, party.me.name, sender, body, via_group=False, now=next(self.clock)
        )
        party.history.commit(out)
        for event in out.events:
            if isinstance(event, MessageReceived):
                party.shown[event.message.id] += 1
            elif isinstance(event, GapDetected):
                party.gaps.append(event.missed)

    @precondition(lambda self: any(p.mailbox for p in self.parties.values()))
    @rule(recipient=st.sampled_from(NAMES))
    def deliver(self, recipient: str) -> None:
        party = self.parties[recipient]
        if party.mailbox:
            body = party.mailbox.pop(0)
            self._apply(party, body)
            party.delivered.append(body)

    @precondition(lambda self: any(p.mailbox for p in self.parties.values()))
    @rule(recipient=st.sampled_from(NAMES))
    def drop(self, recipient: str) -> None:
        party = self.parties[recipient]
        if party.mailbox:
            party.dropped.append(party.mailbox.pop(0).counter)

    @precondition(lambda self: any(p.mailbox for p in self.parties.values()))
    @rule(recipient=st.sampled_from(NAMES))
    def hold_back(self, recipient: str) -> None:
        party = self.parties[recipient]
        if party.mailbox:
            party.held.append(party.mailbox.pop(0))

    @precondition(lambda self: any(p.held for p in self.parties.values()))
    @rule(recipient=st.sampled_from(NAMES), data=st.data())
    def deliver_late(self, recipient: str, data: st.DataObject) -> None:
        party = self.parties[recipient]
        if party.held:
            body = party.held.pop(data.draw(st.integers(0, len(party.held) - 1)))
            self._apply(party, body)
            party.delivered.append(body)

    @precondition(lambda self: any(p.delivered for p in self.parties.values()))
    @rule(recipient=st.sampled_from(NAMES), data=st.data())
    def redeliver(self, recipient: str, data: st.DataObject) -> None:
        party = self.parties[recipient]
        if party.delivered:
            body = data.draw(st.sampled_from(party.delivered))
            self._apply(party, body)

    @invariant()
    def every_message_shown_once_in_sender_order(self) -> None:
        for party in self.parties.values():
            assert all(n == 1 for n in party.shown.values())
            chat = f"dm:{self.other(party.me.name).me.name}"
            shown = [m for m in party.history.messages(chat) if m.type == "text" and not m.outgoing]
            assert [m.counter for m in shown] == sorted({b.counter for b in party.delivered})
            assert len(shown) == len(party.shown)

    @invariant()
    def gaps_are_reported_exactly(self) -> None:
        for party in self.parties.values():
            last = max((b.counter for b in party.delivered), default=0)
            arrived = {b.counter for b in party.delivered}
            missing = [c for c in range(1, last) if c not in arrived]
            chat = f"dm:{self.other(party.me.name).me.name}"
            rows = [m for m in party.history.messages(chat) if not m.outgoing and not m.deleted]
            notices = [m for m in rows if m.type == "gap"]
            counts = [int(re.match(r"(\d+) messages? from", n.text or "")[1]) for n in notices]
            assert sum(counts) == len(missing)
            # Every gap was announced once, as it was found.
            assert len(party.gaps) >= len(notices)
            # A notice stands before the message that revealed it, with only late
            # messages of its own gap in between.
            by_id = {m.id: i for i, m in enumerate(rows)}
            for notice in notices:
                revealed = rows[by_id[notice.id[: -len(".gap")]]]
                between = rows[by_id[notice.id] + 1 : by_id[revealed.id]]
                assert all(m.type == "text" and m.counter < revealed.counter for m in between)


TwoParties.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_two_parties = TwoParties.TestCase
