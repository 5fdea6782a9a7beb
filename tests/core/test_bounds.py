"""Bounded decrypt work and state (issue 19): each attack performed, each bound shown.

What a user relies on:

* a peer (or whoever can inject messages under its name) cannot make the core do
  more than ``work_capacity + work_refill_per_s * seconds`` units of work (plus one
  message's allowance), whatever it sends and however fast: forged 1:1 messages
  far ahead of their chain, forged messages tried against many archived sessions,
  legitimate maximal Sender Key jumps;
* genuine messages from other peers keep decrypting, and are never charged;
* a genuine message refused for its sender's budget changed nothing and decrypts
  when retried after ``retry_after_ms``;
* skipped message keys are capped per peer across chains and states, replay
  records per peer.

Work is counted (derivations and key agreements actually performed, counted
around the metered primitives), never timed. Every test runs on the fixed clock
of ``conftest.Clock`` and moves it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from axolotl.ecc.curve import Curve
from axolotl.groups.ratchet.senderchainkey import SenderChainKey
from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
from axolotl.protocol import whisperprotos_pb2 as pb
from axolotl.protocol.senderkeymessage import SenderKeyMessage
from axolotl.ratchet.chainkey import ChainKey
from axolotl.state.sessionrecord import SessionRecord

from e2ee.core import DecryptLimits, PreKeyBundle, ProtocolEngine, budget
from e2ee.core.engine import Ciphertext
from e2ee.errors import (
    DecryptBudgetExceeded,
    DuplicateMessage,
    InvalidMessage,
    SenderKeyJumpTooLarge,
    UsageError,
)
from e2ee.store import Address, Changes, MemoryProtocolStore, SenderKeyId

LIMITS = DecryptLimits()
CAPACITY = LIMITS.work_capacity
REFILL = LIMITS.work_refill_per_s
MAC_LENGTH = 8


# -- counting the work actually done ---------------------------------------------------


@dataclass
class Work:
    """Primitive calls that completed (a call the meter refused is not counted)."""

    derivations: int = 0
    agreements: int = 0
    key_pairs: int = 0
    signature_checks: int = 0

    @property
    def units(self) -> int:
        return (
            self.derivations * budget.DERIVATION
            + self.agreements * budget.AGREEMENT
            + self.key_pairs * budget.KEY_PAIR
            + self.signature_checks * budget.SIGNATURE_CHECK
        )


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Iterator[Work]:
    counted = Work()

    def count(owner: Any, attr: str, field: str, static: bool) -> None:
        installed = getattr(owner, attr)  # the metered implementation

        def counting(*args: Any) -> Any:
            result = installed(*args)
            setattr(counted, field, getattr(counted, field) + 1)
            return result

        monkeypatch.setattr(owner, attr, staticmethod(counting) if static else counting)

    count(ChainKey, "getMessageKeys", "derivations", False)
    count(SenderChainKey, "getSenderMessageKey", "derivations", False)
    count(Curve, "calculateAgreement", "agreements", True)
    count(Curve, "generateKeyPair", "key_pairs", True)
    count(Curve, "verifySignature", "signature_checks", True)
    yield counted


# -- peers --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now_ms


def device(name: str, clock: Clock, limits: DecryptLimits | None = None) -> ProtocolEngine:
    e = ProtocolEngine(MemoryProtocolStore(), now_ms=clock, limits=limits)
    e.create_account(name, 1)
    return e


def connect(sender: ProtocolEngine, receiver: ProtocolEngine) -> None:
    """A session from ``sender`` to ``receiver``, confirmed both ways."""
    sender.process_bundle(
        receiver.address.name, PreKeyBundle.from_json(receiver.local_bundle(None).to_json())
    )
    receiver.decrypt(sender.address, sender.encrypt(receiver.address, b"hello"))
    sender.decrypt(receiver.address, receiver.encrypt(sender.address, b"hi"))


def forged(genuine: Ciphertext, counter: int, ratchet_key: bytes | None = None) -> Ciphertext:
    """``genuine`` with another counter (and ratchet key) and a MAC nobody computed."""
    proto = pb.WhisperMessage()
    proto.ParseFromString(genuine.body[1:-MAC_LENGTH])
    proto.counter = counter
    if ratchet_key is not None:
        proto.ratchetKey = ratchet_key
    return Ciphertext("message", genuine.body[:1] + proto.SerializeToString() + bytes(MAC_LENGTH))


def undelivered(sender: ProtocolEngine, receiver: ProtocolEngine) -> Ciphertext:
    """An undelivered message on a chain the receiver already knows (one delivered)."""
    receiver.decrypt(sender.address, sender.encrypt(receiver.address, b"known chain"))
    return sender.encrypt(receiver.address, b"template")


def fresh_public_key() -> bytes:
    return bytes(Curve.generateKeyPair().getPublicKey().serialize())


def store_bytes(e: ProtocolEngine) -> object:
    import copy

    from store_state import memory_data

    assert isinstance(e.store, MemoryProtocolStore)
    return copy.deepcopy(memory_data(e.store))


# -- 1:1: forged messages far ahead -----------------------------------------------------------


def test_forged_messages_2000_ahead_cost_at_most_the_budget_at_any_rate(work: Work) -> None:
    clock = Clock()
    alice, bob, carol = device("alice", clock), device("bob", clock), device("carol", clock)
    connect(alice, bob)
    connect(carol, bob)
    template = alice.encrypt(bob.address, b"template")  # never delivered
    before = store_bytes(bob)
    start = work.units
    outcomes: dict[str, int] = {}
    seconds = 5
    for step in range(seconds * 200):  # 200 forged messages a second for 5 seconds
        clock.now_ms += 5
        try:
            bob.decrypt(alice.address, forged(template, 2_000))
        except DecryptBudgetExceeded as exc:
            assert exc.peer == "alice" and exc.retry_after_ms is not None
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        except InvalidMessage:
            outcomes["failed"] = outcomes.get("failed", 0) + 1
        if step % 50 == 0:  # carol keeps talking, and is never charged
            said = f"carol {step}".encode()
            saved = work.units  # carol's work is not the attack's
            assert bob.decrypt(carol.address, carol.encrypt(bob.address, said)).plaintext == said
            start += work.units - saved
    spent = work.units - start
    # Without the budget: 1,000 messages x 2,001 derivations = 2,001,000 units.
    assert spent <= CAPACITY + REFILL * seconds + budget.ALLOWANCE_MESSAGE
    assert outcomes["failed"] <= (CAPACITY + REFILL * seconds) // 2_000 + 1
    assert outcomes["refused"] >= 990
    assert store_bytes(bob) != before  # carol's messages were committed ...
    assert bob.budgets.available("carol", clock.now_ms) == CAPACITY  # ... for free
    # Alice herself is not locked out: her bucket refills and she is heard again.
    clock.now_ms += 10_000
    assert bob.decrypt(alice.address, alice.encrypt(bob.address, b"me")).plaintext == b"me"


def test_refused_genuine_message_changes_nothing_and_decrypts_on_retry(work: Work) -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    connect(alice, bob)
    template = undelivered(alice, bob)
    for _ in range(2):  # the bucket is drained by forgeries under alice's name
        with pytest.raises(InvalidMessage):
            bob.decrypt(alice.address, forged(template, 2_000))
    genuine = alice.encrypt(bob.address, b"really alice")
    before = store_bytes(bob)
    done = work.derivations
    with pytest.raises(DecryptBudgetExceeded) as refused:
        bob.decrypt(alice.address, genuine)
    assert work.derivations == done  # refused before any crypto
    assert store_bytes(bob) == before
    retry = refused.value.retry_after_ms
    assert retry is not None and retry > 0
    clock.now_ms += retry
    assert bob.decrypt(alice.address, genuine).plaintext == b"really alice"


def test_first_trial_beyond_what_is_left_is_refused_before_deriving(work: Work) -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    connect(alice, bob)
    template = undelivered(alice, bob)
    for _ in range(2):
        with pytest.raises(InvalidMessage):
            bob.decrypt(alice.address, forged(template, 2_000))
    clock.now_ms += 1_000  # about 1,000 units again
    done = work.derivations
    with pytest.raises(DecryptBudgetExceeded) as refused:
        bob.decrypt(alice.address, forged(template, 2_000))
    assert work.derivations == done  # 2,000 keys would not fit: none derived
    assert refused.value.needed > refused.value.available
    assert refused.value.retry_after_ms is not None
    with pytest.raises(InvalidMessage):  # 500 keys fit: tried (and charged)
        bob.decrypt(alice.address, forged(template, 500))
    assert work.derivations == done + 500  # from the chain's index 1 to 500


def test_forged_message_tried_against_41_archived_sessions_is_stopped(work: Work) -> None:
    """python-axolotl tries every archived state: one forged message, 41 ratchet steps."""
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    for _ in range(41):  # 41 setups from alice: bob keeps 1 current + 40 archived states
        connect(alice, bob)
        clock.now_ms += 60_000
    record = SessionRecord(serialized=bob.store.load_session(alice.address))
    assert len(record.getPreviousSessionStates()) == 40
    hostile = forged(alice.encrypt(bob.address, b"t"), 2_000, fresh_public_key())
    start = work.units
    with pytest.raises(DecryptBudgetExceeded) as stopped:
        # A new ratchet key, 2,000 ahead: each state tried derives a chain and 2,001
        # keys before the MAC fails -- 41 x (8 + 2,001) units without the budget.
        bob.decrypt(alice.address, hostile)
    assert stopped.value.retry_after_ms is None  # needs more than a full budget
    assert work.units - start <= CAPACITY + budget.ALLOWANCE_MESSAGE
    # A genuine message from alice, a little later, still decrypts.
    clock.now_ms += 10_000
    assert bob.decrypt(alice.address, alice.encrypt(bob.address, b"ok")).plaintext == b"ok"


# -- groups: maximal legitimate jumps ----------------------------------------------------------


def jump_chain(e: ProtocolEngine, group: str, steps: int) -> None:
    """Let a member advance its own chain ``steps`` iterations without sending."""
    key_id = SenderKeyId(group, e.address)
    record = SenderKeyRecord(serialized=e.store.load_sender_key(key_id))
    state = record.getSenderKeyState()
    chain = state.getSenderChainKey()
    for _ in range(steps):
        chain = chain.getNext()
    state.setSenderChainKey(chain)
    e.store.commit(Changes(sender_keys_put={key_id: bytes(record.serialize())}))


def test_member_sending_maximal_jumps_at_any_rate_costs_at_most_the_budget(work: Work) -> None:
    clock = Clock()
    mallory, dave, bob = device("mallory", clock), device("dave", clock), device("bob", clock)
    for member in (mallory, dave):
        bob.group_process_distribution("g", member.address, member.group_distribution("g"))
    seconds, admitted, refused = 5, 0, 0
    jump_chain(mallory, "g", budget.MAX_SENDER_KEY_JUMP)
    pending = mallory.group_encrypt("g", b"far ahead")
    start = work.units
    for step in range(seconds * 200):
        clock.now_ms += 5
        try:  # each accepted one is followed by a new maximal jump; refused ones are re-sent
            assert bob.group_decrypt("g", mallory.address, pending) == b"far ahead"
            admitted += 1
            # (the sender's own derivations are not the receiver's: not counted)
            saved = work.units
            jump_chain(mallory, "g", budget.MAX_SENDER_KEY_JUMP)
            pending = mallory.group_encrypt("g", b"far ahead")
            start += work.units - saved
        except DecryptBudgetExceeded:
            refused += 1
        if step % 50 == 0:
            saved = work.units
            said = dave.group_encrypt("g", f"dave {step}".encode())
            start += work.units - saved
            assert bob.group_decrypt("g", dave.address, said) == f"dave {step}".encode()
    spent = work.units - start
    # Without the budget, every message would be admitted: 1,000 x 2,000 derivations.
    assert admitted <= (CAPACITY + REFILL * seconds) // budget.MAX_SENDER_KEY_JUMP + 1
    per_message = budget.ALLOWANCE_GROUP
    assert spent <= CAPACITY + REFILL * seconds + per_message * (admitted + 20)
    assert refused >= 990
    assert bob.budgets.available("dave", clock.now_ms) == CAPACITY


def test_sender_key_jump_over_the_lower_cap_is_refused_without_deriving(work: Work) -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    bob.group_process_distribution("g", alice.address, alice.group_distribution("g"))
    jump_chain(alice, "g", budget.MAX_SENDER_KEY_JUMP + 1)
    too_far = alice.group_encrypt("g", b"too far")
    done = work.units
    with pytest.raises(SenderKeyJumpTooLarge) as info:
        bob.group_decrypt("g", alice.address, too_far)
    assert info.value.limit == 2_000 and info.value.jump == 2_001
    assert work.units == done  # not even the signature was checked
    assert bob.budgets.available("alice", clock.now_ms) == CAPACITY


def test_forged_group_signatures_are_charged(work: Work) -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    bob.group_process_distribution("g", alice.address, alice.group_distribution("g"))
    state = SenderKeyRecord(
        serialized=alice.store.load_sender_key(SenderKeyId("g", alice.address))
    ).getSenderKeyState()
    stranger = Curve.generateKeyPair().getPrivateKey()
    bad = bytes(SenderKeyMessage(state.getKeyId(), 0, bytes(16), stranger).serialize())
    checks, refusals = 0, 0
    for _ in range(1_000):
        done = work.signature_checks
        try:
            bob.group_decrypt("g", alice.address, bad)
        except DecryptBudgetExceeded:
            refusals += 1
        except InvalidMessage:
            pass
        checks += work.signature_checks - done
    assert checks * budget.SIGNATURE_CHECK <= CAPACITY + budget.ALLOWANCE_GROUP
    assert refusals >= 1_000 - CAPACITY // budget.SIGNATURE_CHECK - 1


# -- genuine traffic is free --------------------------------------------------------------------


def test_genuine_in_order_traffic_is_never_charged() -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    connect(alice, bob)  # a setup with a one-time-prekey-less bundle
    carol = device("carol", clock)
    carol.process_bundle("bob", bob.local_bundle(bob.store.prekey_ids()[0]))
    bob.decrypt(carol.address, carol.encrypt(bob.address, b"setup with a one-time prekey"))
    for round_ in range(30):  # ping-pong: a DH ratchet step on every message
        bob.decrypt(alice.address, alice.encrypt(bob.address, b"%d" % round_))
        alice.decrypt(bob.address, bob.encrypt(alice.address, b"%d" % round_))
    for _ in range(30):
        bob.decrypt(alice.address, alice.encrypt(bob.address, b"same chain"))
    bob.group_process_distribution("g", alice.address, alice.group_distribution("g"))
    for _ in range(30):
        bob.group_decrypt("g", alice.address, alice.group_encrypt("g", b"group"))
    now = clock.now_ms
    for name in ("alice", "carol"):
        assert bob.budgets.available(name, now) == CAPACITY
    assert alice.budgets.available("bob", now) == CAPACITY


def test_a_genuine_jump_is_charged_its_skipped_keys() -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    connect(alice, bob)
    sent = [alice.encrypt(bob.address, b"m") for _ in range(501)]
    assert bob.decrypt(alice.address, sent[-1]).plaintext == b"m"
    charged = CAPACITY - bob.budgets.available("alice", clock.now_ms)
    assert 500 - budget.DH_STEP <= charged <= 500
    assert bob.decrypt(alice.address, sent[0]).plaintext == b"m"  # a stored key: free


# -- state: skipped keys across chains and states --------------------------------------------


def skipped(record: SessionRecord) -> int:
    states = [record.getSessionState(), *record.getPreviousSessionStates()]
    return sum(
        len(chain.messageKeys) for s in states for chain in s.sessionStructure.receiverChains
    )


def test_setups_each_carrying_2000_skipped_keys_keep_2000_in_all() -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    late = []
    for _ in range(3):  # each setup arrives 2,000 messages ahead: 6,000 keys skipped
        alice.process_bundle("bob", bob.local_bundle(None))
        sent = [alice.encrypt(bob.address, b"m") for _ in range(2_001)]
        assert bob.decrypt(alice.address, sent[-1]).plaintext == b"m"
        late.append(sent)
        clock.now_ms += 10_000  # the budget refills between setups
    record = SessionRecord(serialized=bob.store.load_session(alice.address))
    assert len(record.getPreviousSessionStates()) == 2
    assert skipped(record) == LIMITS.max_skipped_keys
    # The newest are kept: a late message of the last setup decrypts; the first
    # setup's keys were pruned.
    assert bob.decrypt(alice.address, late[-1][1_999]).plaintext == b"m"
    with pytest.raises((DuplicateMessage, DecryptBudgetExceeded)):
        # python-axolotl first tries the two newer states (a ratchet step and
        # 2,000 keys each): more than a full budget, so it may be stopped first.
        bob.decrypt(alice.address, late[0][1_999])


def test_skipped_key_cap_is_a_setting() -> None:
    clock = Clock()
    limits = DecryptLimits(max_skipped_keys=300, max_sender_key_jump=300)
    alice, bob = device("alice", clock), device("bob", clock, limits)
    connect(alice, bob)
    for _ in range(3):  # three new receiving chains, 200 keys skipped on each
        sent = [alice.encrypt(bob.address, b"m") for _ in range(201)]
        bob.decrypt(alice.address, sent[-1])
        alice.decrypt(bob.address, bob.encrypt(alice.address, b"r"))
    record = SessionRecord(serialized=bob.store.load_session(alice.address))
    assert skipped(record) == 300
    bob.group_process_distribution("g", alice.address, alice.group_distribution("g"))
    for _ in range(2):
        jump_chain(alice, "g", 250)
        assert bob.group_decrypt("g", alice.address, alice.group_encrypt("g", b"x")) == b"x"
    key = SenderKeyRecord(serialized=bob.store.load_sender_key(SenderKeyId("g", alice.address)))
    assert sum(len(s.senderKeyStateStructure.senderMessageKeys) for s in key.senderKeyStates) == 300


# -- replay records ------------------------------------------------------------------------------


def meta_keys(e: ProtocolEngine, prefix: str) -> dict[str, str]:
    assert isinstance(e.store, MemoryProtocolStore)
    return {k: v for k, v in e.store._meta.items() if k.startswith(prefix)}


def test_setup_replay_records_are_bounded_per_peer_device() -> None:
    clock = Clock()
    limits = DecryptLimits(max_seen_base_keys=3)
    bob = device("bob", clock, limits)
    alice = device("alice", clock)
    setups = []
    for _ in range(6):
        alice.process_bundle("bob", bob.local_bundle(None))
        setups.append(alice.encrypt(bob.address, b"setup"))
        bob.decrypt(alice.address, setups[-1])
    records = meta_keys(bob, "seen_base_key")
    assert len(records) == 1  # one row for alice.1, however many setups
    (value,) = records.values()
    assert len(value.split(",")) == 3
    # The newest are remembered after the sessions are gone.
    bob.store.commit(Changes(sessions_delete=frozenset({alice.address})))
    with pytest.raises(DuplicateMessage):
        bob.decrypt(alice.address, setups[-1])


def test_setup_replay_records_expire_with_their_signed_prekey() -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    alice.process_bundle("bob", bob.local_bundle(None))
    old = alice.encrypt(bob.address, b"old")
    bob.decrypt(alice.address, old)
    # Bob's signed prekey is rotated, and the old one dropped after the grace period.
    clock.now_ms += bob.policy.signed_prekey_rotation_ms
    bob.maintain_keys()
    clock.now_ms += bob.policy.signed_prekey_grace_ms
    bob.maintain_keys()
    alice.process_bundle("bob", bob.local_bundle(None))
    bob.decrypt(alice.address, alice.encrypt(bob.address, b"new"))
    (value,) = meta_keys(bob, "seen_base_key").values()
    assert len(value.split(",")) == 1  # the record of the old setup expired
    # Its replay is still refused: its signed prekey is gone.
    bob.store.commit(Changes(sessions_delete=frozenset({alice.address})))
    with pytest.raises(InvalidMessage):
        bob.decrypt(alice.address, old)


def test_distribution_replay_records_are_bounded_per_group_sender() -> None:
    clock = Clock()
    limits = DecryptLimits(max_seen_distributions=3)
    alice, bob = device("alice", clock), device("bob", clock, limits)
    for _ in range(8):
        alice.group_rotate("g")
        bob.group_process_distribution("g", alice.address, alice.group_distribution("g"))
    records = meta_keys(bob, "seen_distribution")
    assert len(records) == 1
    assert len(next(iter(records.values())).split(",")) == 3


def test_legacy_replay_records_are_still_honoured() -> None:
    from e2ee.core import wire

    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    alice.process_bundle("bob", bob.local_bundle(None))
    setup = alice.encrypt(bob.address, b"setup")
    from axolotl.protocol.prekeywhispermessage import PreKeyWhisperMessage

    base_key = bytes(PreKeyWhisperMessage(serialized=setup.body).getBaseKey().serialize())
    bob.decrypt(alice.address, setup)
    # A store written before the per-peer records: only the old row, no new one.
    bob.store.commit(
        Changes(
            sessions_delete=frozenset({alice.address}),
            meta_put={
                "seen_base_key:" + wire.key_digest(base_key): "1",
                next(iter(meta_keys(bob, "seen_base_keys:"))): "",
            },
        )
    )
    with pytest.raises(DuplicateMessage):
        bob.decrypt(alice.address, setup)


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"work_capacity": 0},
        {"work_capacity": 2_000},  # below one maximal 1:1 jump
        {"work_refill_per_s": -1},
        {"max_skipped_keys": 100},  # below the jump cap
        {"max_sender_key_jump": True},
        {"max_tracked_peers": 0},
        {"max_seen_base_keys": 0},
        {"max_seen_distributions": 1.5},
    ],
)
def test_limits_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        DecryptLimits(**kwargs)


def test_engine_refuses_other_limits_objects() -> None:
    with pytest.raises(UsageError):
        ProtocolEngine(MemoryProtocolStore(), limits={"work_capacity": 1})  # type: ignore[arg-type]


def test_buckets_kept_in_memory_are_bounded() -> None:
    budgets = budget.PeerBudgets(DecryptLimits(max_tracked_peers=2))
    for name in ("a", "b", "c"):
        meter = budgets.admit(name, 0, 0)
        meter.used = 10
        budgets.settle(meter, succeeded=False)
    assert budgets.available("a", 0) == CAPACITY  # dropped: least recently charged
    assert budgets.available("c", 0) == CAPACITY - 10


def test_no_meter_outlives_a_decrypt() -> None:
    clock = Clock()
    alice, bob = device("alice", clock), device("bob", clock)
    connect(alice, bob)
    template = alice.encrypt(bob.address, b"t")
    with pytest.raises(InvalidMessage):
        bob.decrypt(alice.address, forged(template, 10))
    assert budget._LOCAL.meter is None
    assert bob.decrypt(alice.address, template).plaintext == b"t"
    assert budget._LOCAL.meter is None
    with pytest.raises(DuplicateMessage):
        bob.decrypt(alice.address, template)
    assert budget._LOCAL.meter is None


def test_addresses_of_one_peer_share_its_budget() -> None:
    clock = Clock()
    bob = device("bob", clock)
    phone, laptop = device("alice", clock), ProtocolEngine(MemoryProtocolStore(), now_ms=clock)
    laptop.create_account("alice", 2)
    assert laptop.address == Address("alice", 2)
    connect(phone, bob)
    connect(laptop, bob)
    for e in (phone, laptop):
        with pytest.raises(InvalidMessage):
            bob.decrypt(e.address, forged(undelivered(e, bob), 2_000))
    with pytest.raises(DecryptBudgetExceeded):
        bob.decrypt(phone.address, phone.encrypt(bob.address, b"t"))


def test_refused_message_leaves_either_store_unchanged(
    make_peer: Callable[..., Any],
    store_kind: str,
    store_snapshot: Callable[[Any], object],
) -> None:
    alice, bob = make_peer("alice", kind=store_kind), make_peer("bob", kind=store_kind)
    connect(alice.engine, bob.engine)
    template = undelivered(alice.engine, bob.engine)
    for _ in range(2):
        with pytest.raises(InvalidMessage):
            bob.engine.decrypt(alice.address, forged(template, 2_000))
    genuine = alice.engine.encrypt(bob.address, b"kept")
    before = store_snapshot(bob.store)
    with pytest.raises(DecryptBudgetExceeded) as refused:
        bob.engine.decrypt(alice.address, genuine)
    assert store_snapshot(bob.store) == before
    assert refused.value.retry_after_ms is not None
    bob.clock.now_ms += refused.value.retry_after_ms
    assert bob.engine.decrypt(alice.address, genuine).plaintext == b"kept"
