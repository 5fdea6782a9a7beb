"""Hypothesis state machines: 1:1 and group messaging over a hostile network.

The network delivers in any order, drops, duplicates, and either side may restart
from its store at any point. What a user relies on, checked after every step:

* a delivered message decrypts to exactly the plaintext that was sent, once;
* a second delivery raises :class:`DuplicateMessage` and leaves the receiver's
  store byte-identical (so does every other refused delivery);
* nothing but the typed error the model predicts ever escapes;
* after any history, both sides can still talk both ways (teardown).

The models track just enough protocol state to predict each outcome:

* 1:1: python-axolotl keeps the receiving chains of the last five ratchet keys it
  saw from the peer (``SessionState.addReceiverChain``). A late message from a chain
  still held decrypts from its skipped key; one from an evicted chain is refused
  with :class:`InvalidMessage`. The model reads each message's ratchet key from the
  wire to know which chain it belongs to.
* groups: a receiver decrypts a sender's message only once it processed the
  distribution of that sender's key (:class:`NoSession` before any,
  :class:`MissingKey` before that one). Rotations are capped so no receiver holds
  more than ``MAX_SENDER_KEY_STATES`` keys per sender: what eviction does to a
  replayed distribution is pinned by its own test at the end of this file.

Sequences stay far below the 2,000 skipped-key cap, the 2,000-iteration jump
limit and the per-peer work budget, which have their own tests (test_bounds.py).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from axolotl.protocol import whisperprotos_pb2 as pb
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from e2ee.core import MAX_SENDER_KEY_STATES
from e2ee.core.engine import Ciphertext
from e2ee.errors import DuplicateMessage, InvalidMessage, MissingKey, NoSession

#: python-axolotl's ``SessionState.addReceiverChain`` keeps this many receiving chains.
RECEIVER_CHAINS = 5
#: Key rotations per sender in one run: a receiver then holds at most
#: ``1 + MAX_ROTATIONS`` keys per sender, up to the cap but never past it.
MAX_ROTATIONS = MAX_SENDER_KEY_STATES - 1
GROUP = "g1"

#: Runs per store kind: SQLite commits fsync, so it gets fewer (same machines).
EXAMPLES = {"memory": 50, "sqlite": 15}


def stateful(kind: str) -> settings:
    return settings(max_examples=EXAMPLES[kind], stateful_step_count=35, deadline=None)


INDEX = st.integers(min_value=0, max_value=10_000)


def ratchet_key(ciphertext: Ciphertext) -> bytes:
    """The sender's ratchet key of a 1:1 message, read straight from the wire format."""
    body = ciphertext.body
    if ciphertext.kind == "prekey":
        body = pb.PreKeyWhisperMessage.FromString(body[1:]).message
    return bytes(pb.WhisperMessage.FromString(body[1:-8]).ratchetKey)


# -- 1:1 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """A 1:1 message on the wire and what the model knows about it."""

    number: int
    sender: str
    receiver: str
    ciphertext: Ciphertext
    plaintext: bytes
    ratchet_key: bytes


class OneToOne(RuleBasedStateMachine):
    """Alice starts a session from Bob's bundle; then anything goes on the network."""

    def __init__(self, make_pair: Callable[..., Any], kind: str) -> None:
        super().__init__()
        self.make_pair = make_pair
        self.kind = kind
        self.numbers = itertools.count()
        self.in_flight: list[Letter] = []
        self.delivered: list[Letter] = []

    @initialize(one_time_prekey=st.booleans())
    def start(self, one_time_prekey: bool) -> None:
        self.pair = self.make_pair(self.kind, one_time_prekey=one_time_prekey)
        self.peers = {"alice": self.pair.alice, "bob": self.pair.bob}
        # The receiving chains each side holds, oldest first, and every key seen.
        # Alice's first chain is keyed by Bob's signed prekey (the X3DH ratchet key).
        first = self.pair.bundle.signed_prekey.public_key
        self.chains: dict[str, list[bytes]] = {"alice": [first], "bob": []}
        self.seen: dict[str, set[bytes]] = {"alice": {first}, "bob": set()}
        event(f"one-time prekey: {one_time_prekey}")

    def teardown(self) -> None:
        # Whatever happened, both sides still talk both ways, also after a restart.
        if hasattr(self, "pair"):
            for peer in self.peers.values():
                peer.restart()
            alice, bob = self.pair.alice, self.pair.bob
            for round_ in range(2):
                self.pair.exchange(alice, f"fresh a->b {round_}".encode())
                self.pair.exchange(bob, f"fresh b->a {round_}".encode())
            for peer in self.peers.values():
                peer.close()

    # The receiver refused a delivery: typed error, store unchanged.
    def _refused(self, letter: Letter, error: type[Exception]) -> None:
        receiver = self.peers[letter.receiver]
        before = receiver.snapshot()
        with pytest.raises(error):
            receiver.engine.decrypt(self.peers[letter.sender].address, letter.ciphertext)
        assert receiver.snapshot() == before

    def _send(self, sender: str) -> Letter | None:
        peer = self.peers[sender]
        receiver = "bob" if sender == "alice" else "alice"
        if sender == "bob" and not self.chains["bob"]:
            # Bob has no session until one of Alice's messages reached him.
            before = peer.snapshot()
            with pytest.raises(NoSession):
                peer.engine.encrypt(self.peers[receiver].address, b"too early")
            assert peer.snapshot() == before
            event("1:1 send refused: no session yet")
            return None
        number = next(self.numbers)
        plaintext = f"{sender}->{receiver} #{number}".encode()
        ciphertext = peer.engine.encrypt(self.peers[receiver].address, plaintext)
        return Letter(number, sender, receiver, ciphertext, plaintext, ratchet_key(ciphertext))

    def _deliver(self, letter: Letter) -> None:
        chains, seen = self.chains[letter.receiver], self.seen[letter.receiver]
        if letter.ratchet_key in seen and letter.ratchet_key not in chains:
            # Older than the five receiving chains kept: lost, and nothing changes.
            self._refused(letter, InvalidMessage)
            event("1:1 late message from an evicted chain refused")
            return
        receiver = self.peers[letter.receiver]
        decrypted = receiver.engine.decrypt(self.peers[letter.sender].address, letter.ciphertext)
        assert decrypted.plaintext == letter.plaintext
        assert decrypted.sender == self.peers[letter.sender].address
        if letter.ratchet_key not in seen:
            seen.add(letter.ratchet_key)
            chains.append(letter.ratchet_key)
            del chains[:-RECEIVER_CHAINS]
        elif letter.ratchet_key != chains[-1]:
            event("1:1 late message from before a ratchet step decrypted")
        event(f"1:1 {letter.ciphertext.kind} message decrypted")
        self.delivered.append(letter)

    @rule(sender=st.sampled_from(["alice", "bob"]))
    def send(self, sender: str) -> None:
        letter = self._send(sender)
        if letter is not None:
            self.in_flight.append(letter)

    @rule(first=st.sampled_from(["alice", "bob"]), turns=st.integers(1, RECEIVER_CHAINS + 1))
    def chat(self, first: str, turns: int) -> None:
        """Prompt messages and prompt answers: each turn moves the DH ratchet on both sides."""
        for _ in range(turns):
            for sender in (first, "bob" if first == "alice" else "alice"):
                letter = self._send(sender)
                if letter is not None:
                    self._deliver(letter)

    @precondition(lambda self: self.in_flight)
    @rule(index=INDEX)
    def deliver(self, index: int) -> None:
        position = index % len(self.in_flight)
        if any(other.number < self.in_flight[position].number for other in self.in_flight):
            event("1:1 delivered ahead of an older message")
        self._deliver(self.in_flight.pop(position))

    @precondition(lambda self: len(self.in_flight) > 1)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        """The network hands over everything it holds, in any order."""
        letters, self.in_flight = self.in_flight, []
        for position in data.draw(st.permutations(range(len(letters)))):
            self._deliver(letters[position])

    @precondition(lambda self: self.in_flight)
    @rule(index=INDEX)
    def drop(self, index: int) -> None:
        self.in_flight.pop(index % len(self.in_flight))

    @precondition(lambda self: self.delivered)
    @rule(index=INDEX)
    def duplicate(self, index: int) -> None:
        letter = self.delivered[index % len(self.delivered)]
        if letter.ratchet_key in self.chains[letter.receiver]:
            self._refused(letter, DuplicateMessage)
            event(f"1:1 duplicate {letter.ciphertext.kind} message refused")
        else:
            self._refused(letter, InvalidMessage)
            event("1:1 duplicate from an evicted chain refused")

    @rule(who=st.sampled_from(["alice", "bob"]))
    def restart(self, who: str) -> None:
        self.peers[who].restart()

    @invariant()
    def bob_has_a_session_once_a_message_arrived(self) -> None:
        if hasattr(self, "pair"):
            bob, alice = self.pair.bob, self.pair.alice
            assert bob.engine.has_session(alice.address) == bool(self.chains["bob"])


def test_one_to_one_survives_reorder_drop_duplicate_and_restart(
    pair: Callable[..., Any], store_kind: str
) -> None:
    run_state_machine_as_test(lambda: OneToOne(pair, store_kind), settings=stateful(store_kind))


# -- groups -----------------------------------------------------------------------------

MEMBERS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class Parcel:
    """A group message or a Sender Key distribution on its way to one member."""

    number: int
    sender: str
    receiver: str
    body: bytes
    generation: int  # which of the sender's keys: 0, then +1 per rotation
    plaintext: bytes | None  # None for a distribution


class Group(RuleBasedStateMachine):
    """Three members; every message and distribution travels the same bad network."""

    def __init__(self, make_peer: Callable[..., Any], kind: str) -> None:
        super().__init__()
        self.make_peer = make_peer
        self.kind = kind
        self.numbers = itertools.count()
        self.in_flight: list[Parcel] = []
        self.delivered: list[Parcel] = []
        self.generation = dict.fromkeys(MEMBERS, 0)
        # held[receiver][sender]: the sender's keys the receiver processed.
        self.held: dict[str, dict[str, list[int]]] = {
            r: {s: [] for s in MEMBERS if s != r} for r in MEMBERS
        }

    @initialize(in_flight=st.booleans())
    def start(self, in_flight: bool) -> None:
        """First distributions: handed over directly, or sent over the network too."""
        self.peers = {name: self.make_peer(name, 1, self.kind) for name in MEMBERS}
        for sender in MEMBERS:
            self._distribute(sender)
        if not in_flight:
            for parcel in list(self.in_flight):
                self._deliver(parcel)

    def _post(self, sender: str, body: bytes, plaintext: bytes | None) -> None:
        for receiver in MEMBERS:
            if receiver != sender:
                self.in_flight.append(
                    Parcel(
                        next(self.numbers),
                        sender,
                        receiver,
                        body,
                        self.generation[sender],
                        plaintext,
                    )
                )

    def _distribute(self, sender: str) -> None:
        self._post(sender, self.peers[sender].engine.group_distribution(GROUP), None)

    def teardown(self) -> None:
        # A member who missed a distribution asks for it again; then all talk.
        if hasattr(self, "peers"):
            for peer in self.peers.values():
                peer.restart()
            for sender in MEMBERS:
                dist = self.peers[sender].engine.group_distribution(GROUP)
                for receiver in MEMBERS:
                    if receiver != sender:
                        self.peers[receiver].engine.group_process_distribution(
                            GROUP, self.peers[sender].address, dist
                        )
            for sender in MEMBERS:
                plaintext = f"fresh from {sender}".encode()
                body = self.peers[sender].engine.group_encrypt(GROUP, plaintext)
                for receiver in MEMBERS:
                    if receiver != sender:
                        got = self.peers[receiver].engine.group_decrypt(
                            GROUP, self.peers[sender].address, body
                        )
                        assert got == plaintext
            for peer in self.peers.values():
                peer.close()

    def _attempt(self, parcel: Parcel, error: type[Exception] | None) -> None:
        """Deliver ``parcel``; ``error`` is the refusal the model predicts, if any."""
        receiver = self.peers[parcel.receiver]
        sender = self.peers[parcel.sender].address
        before = receiver.snapshot()
        if parcel.plaintext is None:
            receiver.engine.group_process_distribution(GROUP, sender, parcel.body)
        elif error is not None:
            with pytest.raises(error):
                receiver.engine.group_decrypt(GROUP, sender, parcel.body)
        else:
            assert receiver.engine.group_decrypt(GROUP, sender, parcel.body) == parcel.plaintext
            return
        if error is not None or parcel.generation in self.held[parcel.receiver][parcel.sender]:
            # Refused, or a distribution already processed: not one byte changes.
            assert receiver.snapshot() == before

    @rule(sender=st.sampled_from(MEMBERS))
    def send(self, sender: str) -> None:
        number = next(self.numbers)
        plaintext = f"{sender} to all #{number}".encode()
        self._post(sender, self.peers[sender].engine.group_encrypt(GROUP, plaintext), plaintext)

    @precondition(lambda self: min(self.generation.values()) < MAX_ROTATIONS)
    @rule(data=st.data())
    def rotate(self, data: st.DataObject) -> None:
        """A member left: the sender forgets its key and distributes a new one."""
        sender = data.draw(
            st.sampled_from([m for m in MEMBERS if self.generation[m] < MAX_ROTATIONS])
        )
        self.peers[sender].engine.group_rotate(GROUP)
        self.generation[sender] += 1
        self._distribute(sender)

    def _deliver(self, parcel: Parcel) -> None:
        held = self.held[parcel.receiver][parcel.sender]
        if parcel.plaintext is None:
            self._attempt(parcel, None)
            held.append(parcel.generation)
            assert len(held) <= MAX_SENDER_KEY_STATES
        elif not held:
            self._attempt(parcel, NoSession)
            event("group message before any distribution refused")
            return  # stays in flight: the client retries after the distribution
        elif parcel.generation not in held:
            self._attempt(parcel, MissingKey)
            event("group message before its key's distribution refused")
            return
        else:
            self._attempt(parcel, None)
            event("group message decrypted")
        self.in_flight.remove(parcel)
        self.delivered.append(parcel)

    @precondition(lambda self: self.in_flight)
    @rule(index=INDEX)
    def deliver(self, index: int) -> None:
        self._deliver(self.in_flight[index % len(self.in_flight)])

    @precondition(lambda self: len(self.in_flight) > 1)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        """The network hands over everything it holds, in any order."""
        parcels = list(self.in_flight)
        for position in data.draw(st.permutations(range(len(parcels)))):
            self._deliver(parcels[position])

    @precondition(lambda self: self.in_flight)
    @rule(index=INDEX)
    def drop(self, index: int) -> None:
        self.in_flight.pop(index % len(self.in_flight))

    @precondition(lambda self: any(p.plaintext is not None for p in self.delivered))
    @rule(index=INDEX)
    def duplicate(self, index: int) -> None:
        messages = [p for p in self.delivered if p.plaintext is not None]
        self._attempt(messages[index % len(messages)], DuplicateMessage)
        event("group duplicate message refused")

    @precondition(lambda self: any(p.plaintext is None for p in self.delivered))
    @rule(index=INDEX)
    def duplicate_distribution(self, index: int) -> None:
        distributions = [p for p in self.delivered if p.plaintext is None]
        self._attempt(distributions[index % len(distributions)], None)
        event("group duplicate distribution ignored")

    @rule(who=st.sampled_from(MEMBERS))
    def restart(self, who: str) -> None:
        self.peers[who].restart()


def test_group_survives_reorder_drop_duplicate_rotation_and_restart(
    make_peer: Callable[..., Any], store_kind: str
) -> None:
    run_state_machine_as_test(lambda: Group(make_peer, store_kind), settings=stateful(store_kind))


# -- a defect the group model steers around (see MAX_ROTATIONS) ----------------------------


def test_replayed_distribution_cannot_reopen_messages_after_its_key_was_evicted(
    make_peer: Callable[..., Any],
) -> None:
    """``group_process_distribution`` promises a distribution received again changes
    nothing, so a replay cannot rewind a chain and re-open old messages. That holds
    while the receiver still holds the key; once ``MAX_SENDER_KEY_STATES`` newer
    keys pushed it out, the old distribution is accepted as new, at iteration 0,
    and every message under that key decrypts a second time."""
    alice, bob = make_peer("alice"), make_peer("bob")
    first = alice.engine.group_distribution(GROUP)
    bob.engine.group_process_distribution(GROUP, alice.address, first)
    old = alice.engine.group_encrypt(GROUP, b"read once")
    assert bob.engine.group_decrypt(GROUP, alice.address, old) == b"read once"
    for _ in range(MAX_SENDER_KEY_STATES):
        alice.engine.group_rotate(GROUP)
        newer = alice.engine.group_distribution(GROUP)
        bob.engine.group_process_distribution(GROUP, alice.address, newer)

    before = bob.snapshot()
    with contextlib.suppress(InvalidMessage):  # refusing the replay is fine too
        bob.engine.group_process_distribution(GROUP, alice.address, first)
    assert bob.snapshot() == before
    with pytest.raises((DuplicateMessage, MissingKey)):
        bob.engine.group_decrypt(GROUP, alice.address, old)
