"""Regression tests for python-axolotl 0.2.3's known defects.

Each test first shows the defect against bare python-axolotl (its own in-memory
test stores, no e2ee wrapper), then shows it closed through e2ee. Defect 6 (only
typed errors on malformed input) is covered by ``test_fuzz.py``.

Note: importing e2ee installs our method replacements (``e2ee.core.hardening``,
``e2ee.core.fastpath``) into python-axolotl's classes. None of them changes the
behaviour on the code paths of defects 1-5: the work meters of ``e2ee.core.budget``
wrap primitives there but only call through outside an engine's decrypt (the
bounds they enforce have their own tests in ``test_bounds.py``); defect 7 calls the
saved original explicitly.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import pytest
from axolotl.axolotladdress import AxolotlAddress
from axolotl.ecc.curve import Curve
from axolotl.groups.groupcipher import GroupCipher
from axolotl.groups.groupsessionbuilder import GroupSessionBuilder
from axolotl.groups.ratchet.senderchainkey import SenderChainKey
from axolotl.groups.senderkeyname import SenderKeyName
from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
from axolotl.invalidkeyidexception import InvalidKeyIdException
from axolotl.invalidmessageexception import InvalidMessageException
from axolotl.protocol import whisperprotos_pb2 as pb
from axolotl.protocol.prekeywhispermessage import PreKeyWhisperMessage
from axolotl.protocol.senderkeydistributionmessage import SenderKeyDistributionMessage
from axolotl.protocol.whispermessage import WhisperMessage
from axolotl.sessionbuilder import SessionBuilder
from axolotl.sessioncipher import SessionCipher
from axolotl.state.prekeybundle import PreKeyBundle as AxolotlBundle
from axolotl.state.prekeyrecord import PreKeyRecord
from axolotl.tests.groups.inmemorysenderkeystore import InMemorySenderKeyStore
from axolotl.tests.inmemoryaxolotlstore import InMemoryAxolotlStore
from axolotl.untrustedidentityexception import UntrustedIdentityException
from axolotl.util.keyhelper import KeyHelper
from axolotl.util.medium import Medium

import e2ee  # noqa: F401  (installs the protobuf shim before axolotl imports)
from e2ee.core import MAX_SENDER_KEY_JUMP, MAX_SENDER_KEY_STATES, MAX_SKIPPED_KEYS, hardening
from e2ee.core.engine import Ciphertext, ProtocolEngine
from e2ee.errors import (
    DuplicateMessage,
    InvalidKey,
    InvalidMessage,
    MissingKey,
    SenderKeyJumpTooLarge,
    UntrustedIdentity,
)
from e2ee.store import Address, Changes, MemoryProtocolStore, ProtocolStore, SenderKeyId

ALICE = Address("alice", 1)
BOB = Address("bob", 1)


# -- harnesses ---------------------------------------------------------------------------


def engine(name: str) -> ProtocolEngine:
    e = ProtocolEngine(MemoryProtocolStore())
    e.create_account(name, 1)
    return e


class BarePeer:
    """A python-axolotl party exactly as its README shows: its own test stores."""

    def __init__(self) -> None:
        self.store = InMemoryAxolotlStore()
        self.signed = KeyHelper.generateSignedPreKey(self.store.getIdentityKeyPair(), 7)
        self.store.storeSignedPreKey(7, self.signed)

    def bundle(self, prekey_id: int | None) -> AxolotlBundle:
        prekey = None
        if prekey_id is not None:
            pair = Curve.generateKeyPair()
            self.store.storePreKey(prekey_id, PreKeyRecord(prekey_id, pair))
            prekey = pair.getPublicKey()
        return AxolotlBundle(
            self.store.getLocalRegistrationId(),
            1,
            prekey_id,
            prekey,
            7,
            self.signed.getKeyPair().getPublicKey(),
            self.signed.getSignature(),
            self.store.getIdentityKeyPair().getPublicKey(),
        )

    def cipher(self, peer: str) -> SessionCipher:
        s = self.store
        return SessionCipher(s, s, s, s, peer, 1)

    def start(self, peer: str, bundle: AxolotlBundle) -> None:
        s = self.store
        SessionBuilder(s, s, s, s, peer, 1).processPreKeyBundle(bundle)


def rencode_top_bit(key: bytes) -> bytes:
    """The same X25519 point with the ignored high bit set: a non-canonical encoding."""
    assert key[-1] & 0x80 == 0
    return key[:-1] + bytes([key[-1] | 0x80])


def with_base_key(message: bytes, base_key: bytes) -> bytes:
    proto = pb.PreKeyWhisperMessage()
    proto.ParseFromString(message[1:])
    proto.baseKey = base_key
    return message[:1] + proto.SerializeToString()


def set_sender_chain(e: ProtocolEngine, group: str, iteration: int, seed: bytes) -> None:
    """Let a (malicious or simply very chatty) sender jump its own chain."""
    key_id = SenderKeyId(group, e.address)
    record = SenderKeyRecord(serialized=e.store.load_sender_key(key_id))
    record.getSenderKeyState().setSenderChainKey(SenderChainKey(iteration, seed))
    e.store.commit(Changes(sender_keys_put={key_id: bytes(record.serialize())}))


def signed_sender_key_message(e: ProtocolEngine, group: str, iteration: int) -> bytes:
    """A validly signed Sender Key message claiming any iteration (a hostile member)."""
    from axolotl.protocol.senderkeymessage import SenderKeyMessage

    key_id = SenderKeyId(group, e.address)
    state = SenderKeyRecord(serialized=e.store.load_sender_key(key_id)).getSenderKeyState()
    message = SenderKeyMessage(state.getKeyId(), iteration, bytes(16), state.getSigningKeyPrivate())
    return bytes(message.serialize())


def derived_chain(e: ProtocolEngine, group: str, steps: int) -> tuple[int, bytes]:
    key_id = SenderKeyId(group, e.address)
    state = SenderKeyRecord(serialized=e.store.load_sender_key(key_id)).getSenderKeyState()
    chain = state.getSenderChainKey()
    for _ in range(steps):
        chain = chain.getNext()
    return chain.getIteration(), bytes(chain.getSeed())


# -- defect 1: unbounded Sender Key jumps ----------------------------------------------------


def test_defect1_bare_sender_key_accepts_20000_jump_and_stores_every_key() -> None:
    alice_store, bob_store = InMemorySenderKeyStore(), InMemorySenderKeyStore()
    name = SenderKeyName("g", AxolotlAddress("alice", 1))
    distribution = GroupSessionBuilder(alice_store).create(name)
    GroupSessionBuilder(bob_store).process(
        name, SenderKeyDistributionMessage(serialized=distribution.serialize())
    )
    record = alice_store.loadSenderKey(name)
    chain = record.getSenderKeyState().getSenderChainKey()
    for _ in range(20_000):
        chain = chain.getNext()
    record.getSenderKeyState().setSenderChainKey(chain)
    alice_store.storeSenderKey(name, record)

    message = GroupCipher(alice_store, name).encrypt(b"far ahead")
    assert GroupCipher(bob_store, name).decrypt(message) == b"far ahead"
    kept = bob_store.loadSenderKey(name).getSenderKeyState().senderKeyStateStructure
    assert len(kept.senderMessageKeys) == 20_000  # the defect: every skipped key kept


def test_defect1_e2ee_accepts_maximal_jumps_but_keeps_only_2000_keys() -> None:
    alice, bob = engine("alice"), engine("bob")
    bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))
    for _ in range(2):  # two maximal jumps: 4,000 keys skipped in all
        set_sender_chain(alice, "g", *derived_chain(alice, "g", MAX_SENDER_KEY_JUMP))
        assert bob.group_decrypt("g", ALICE, alice.group_encrypt("g", b"ahead")) == b"ahead"
    record = SenderKeyRecord(serialized=bob.store.load_sender_key(SenderKeyId("g", ALICE)))
    keys = record.getSenderKeyState().senderKeyStateStructure.senderMessageKeys
    assert len(keys) == MAX_SKIPPED_KEYS
    # The newest skipped keys are the ones kept: a late message just before the
    # last jump still decrypts.
    assert [k.iteration for k in keys][-1] == 2 * MAX_SENDER_KEY_JUMP


@pytest.mark.parametrize("jump", [MAX_SENDER_KEY_JUMP + 1, 2**32 - 1])
def test_defect1_e2ee_rejects_larger_jump_without_deriving_keys(
    jump: int,
    monkeypatch: pytest.MonkeyPatch,
    store_snapshot: Callable[[ProtocolStore], object],
) -> None:
    alice, bob = engine("alice"), engine("bob")
    bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))
    hostile = signed_sender_key_message(alice, "g", jump)
    before = store_snapshot(bob.store)
    derived = []
    original = SenderChainKey.getNext
    monkeypatch.setattr(SenderChainKey, "getNext", lambda self: derived.append(1) or original(self))
    with pytest.raises(SenderKeyJumpTooLarge) as info:
        bob.group_decrypt("g", ALICE, hostile)
    assert info.value.jump == jump
    assert derived == []  # rejected before a single key is derived: constant time
    assert store_snapshot(bob.store) == before


def test_defect1_e2ee_keeps_at_most_5_sender_key_states() -> None:
    alice, bob = engine("alice"), engine("bob")
    messages = []
    for _ in range(MAX_SENDER_KEY_STATES + 2):
        alice.group_rotate("g")
        bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))
        messages.append(alice.group_encrypt("g", b"m"))
    record = SenderKeyRecord(serialized=bob.store.load_sender_key(SenderKeyId("g", ALICE)))
    assert len(record.senderKeyStates) == MAX_SENDER_KEY_STATES
    for message in messages[-MAX_SENDER_KEY_STATES:]:
        assert bob.group_decrypt("g", ALICE, message) == b"m"
    with pytest.raises(MissingKey):
        bob.group_decrypt("g", ALICE, messages[0])


def test_bare_sender_key_record_grows_without_bound() -> None:
    store = InMemorySenderKeyStore()
    name = SenderKeyName("g", AxolotlAddress("alice", 1))
    for _ in range(MAX_SENDER_KEY_STATES + 2):
        other = InMemorySenderKeyStore()
        d = GroupSessionBuilder(other).create(name)
        GroupSessionBuilder(store).process(
            name, SenderKeyDistributionMessage(serialized=d.serialize())
        )
    assert len(store.loadSenderKey(name).senderKeyStates) == MAX_SENDER_KEY_STATES + 2


def test_replayed_distribution_cannot_rewind_the_chain() -> None:
    alice, bob = engine("alice"), engine("bob")
    distribution = alice.group_distribution("g")
    bob.group_process_distribution("g", ALICE, distribution)
    first = alice.group_encrypt("g", b"once")
    assert bob.group_decrypt("g", ALICE, first) == b"once"
    bob.group_process_distribution("g", ALICE, distribution)  # replayed: no effect
    with pytest.raises(DuplicateMessage):
        bob.group_decrypt("g", ALICE, first)


# -- defect 2: unbounded skipped keys in 1:1 sessions -------------------------------------


def skipped_keys(session: Any) -> list[int]:
    return [
        len(chain.messageKeys)
        for chain in session.getSessionState().sessionStructure.receiverChains
    ]


def test_defect2_bare_session_grows_2000_keys_per_jump() -> None:
    alice, bob = BarePeer(), BarePeer()
    alice.start("bob", bob.bundle(5))
    sender, receiver = alice.cipher("bob"), bob.cipher("alice")
    first = sender.encrypt(b"hello")
    receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=first.serialize()))
    messages = [sender.encrypt(b"m") for _ in range(4_000)]
    for index in (1_999, 3_999):  # two jumps of 2,000, each allowed
        receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=messages[index].serialize()))
    assert skipped_keys(bob.store.loadSession("alice", 1)) == [3_998]


def test_defect2_e2ee_keeps_at_most_2000_skipped_keys_per_chain() -> None:
    from axolotl.state.sessionrecord import SessionRecord

    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(5))
    bob.decrypt(ALICE, alice.encrypt(BOB, b"hello"))
    messages = [alice.encrypt(BOB, b"m") for _ in range(4_000)]
    for index in (1_999, 3_999):
        assert bob.decrypt(ALICE, messages[index]).plaintext == b"m"
    record = SessionRecord(serialized=bob.store.load_session(ALICE))
    assert max(skipped_keys(record)) == MAX_SKIPPED_KEYS
    # Oldest evicted, newest kept.
    assert bob.decrypt(ALICE, messages[3_998]).plaintext == b"m"
    with pytest.raises(DuplicateMessage):
        bob.decrypt(ALICE, messages[0])


# -- defect 3: sessions without a one-time prekey ------------------------------------------


def test_defect3_bare_session_without_one_time_prekey_fails() -> None:
    alice, bob = BarePeer(), BarePeer()
    alice.start("bob", bob.bundle(None))
    message = alice.cipher("bob").encrypt(b"hello")
    parsed = PreKeyWhisperMessage(serialized=message.serialize())
    assert parsed.getPreKeyId() == 0  # the missing field read as prekey 0
    with pytest.raises(InvalidKeyIdException):
        bob.cipher("alice").decryptPkmsg(parsed)


def test_defect3_e2ee_session_without_one_time_prekey_works() -> None:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(None))
    prekeys_before = bob.store.prekey_ids()
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"hello")).plaintext == b"hello"
    assert bob.store.prekey_ids() == prekeys_before  # no prekey consumed
    assert alice.decrypt(BOB, bob.encrypt(ALICE, b"hi")).plaintext == b"hi"
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"again")).plaintext == b"again"


# -- defect 4: replay through a re-encoded base key ------------------------------------------


def test_defect4_bare_replays_with_reencoded_base_key_and_resets_session() -> None:
    alice, bob = BarePeer(), BarePeer()
    last_resort = Medium.MAX_VALUE  # never removed after use, by design
    alice.start("bob", bob.bundle(last_resort))
    message = alice.cipher("bob").encrypt(b"pay 100")
    receiver = bob.cipher("alice")
    assert receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=message.serialize())) == b"pay 100"
    with pytest.raises(Exception, match="old counter"):  # a plain replay is caught
        receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=message.serialize()))
    base_key = PreKeyWhisperMessage(serialized=message.serialize()).getBaseKey().serialize()
    replay = with_base_key(message.serialize(), rencode_top_bit(base_key))
    assert receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=replay)) == b"pay 100"  # again!
    assert len(bob.store.loadSession("alice", 1).getPreviousSessionStates()) == 1  # reset


def test_defect4_e2ee_rejects_reencoded_base_key_and_plain_replay(
    store_snapshot: Callable[[ProtocolStore], object],
) -> None:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(None))
    message = alice.encrypt(BOB, b"pay 100")
    assert bob.decrypt(ALICE, message).plaintext == b"pay 100"
    before = store_snapshot(bob.store)

    with pytest.raises(DuplicateMessage):
        bob.decrypt(ALICE, message)
    base_key = PreKeyWhisperMessage(serialized=message.body).getBaseKey().serialize()
    replay = Ciphertext("prekey", with_base_key(message.body, rencode_top_bit(base_key)))
    with pytest.raises(InvalidKey):
        bob.decrypt(ALICE, replay)
    assert store_snapshot(bob.store) == before
    # The session was not reset: the conversation goes on.
    assert alice.decrypt(BOB, bob.encrypt(ALICE, b"ok")).plaintext == b"ok"
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"next")).plaintext == b"next"


def test_defect4_e2ee_replay_after_session_replaced_is_refused() -> None:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(None))
    old = alice.encrypt(BOB, b"pay 100")
    bob.decrypt(ALICE, old)
    # Bob loses the session (e.g. it was reset); python-axolotl's own
    # "already processed" check has nothing left to look at.
    bob.store.commit(Changes(sessions_delete=frozenset({ALICE})))
    with pytest.raises(DuplicateMessage):
        bob.decrypt(ALICE, old)


# -- defect 5: identity saved before the message authenticated -------------------------------


def forged_prekey_message(real: bytes, forged_identity: bytes) -> bytes:
    proto = pb.PreKeyWhisperMessage()
    proto.ParseFromString(real[1:])
    proto.identityKey = forged_identity
    return real[:1] + proto.SerializeToString()


def test_defect5_bare_saves_identity_from_a_forged_message() -> None:
    alice, bob, mallory = BarePeer(), BarePeer(), BarePeer()
    alice.start("bob", bob.bundle(9))
    real = alice.cipher("bob").encrypt(b"hi").serialize()
    mallory_key = mallory.store.getIdentityKeyPair().getPublicKey().serialize()
    forged = forged_prekey_message(real, mallory_key)
    receiver = bob.cipher("alice")
    with pytest.raises(InvalidMessageException):  # the MAC fails...
        receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=forged))
    # ...but Mallory's key is now Alice's, and the real Alice is locked out.
    with pytest.raises(UntrustedIdentityException):
        receiver.decryptPkmsg(PreKeyWhisperMessage(serialized=real))


def test_defect5_e2ee_forged_message_changes_nothing(
    store_snapshot: Callable[[ProtocolStore], object],
) -> None:
    alice, bob, mallory = engine("alice"), engine("bob"), engine("mallory")
    alice.process_bundle("bob", bob.local_bundle(9))
    real = alice.encrypt(BOB, b"hi")
    forged = Ciphertext("prekey", forged_prekey_message(real.body, mallory.identity_key))
    before = store_snapshot(bob.store)
    with pytest.raises(InvalidMessage):
        bob.decrypt(ALICE, forged)
    assert store_snapshot(bob.store) == before
    assert bob.identity(ALICE) is None
    assert bob.decrypt(ALICE, real).plaintext == b"hi"
    assert bob.identity(ALICE) is not None
    assert bob.identity(ALICE).identity_key == alice.identity_key  # type: ignore[union-attr]


def test_changed_identity_is_received_but_sending_is_held() -> None:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(1))
    bob.decrypt(ALICE, alice.encrypt(BOB, b"hi"))
    # Alice reinstalls: new identity, same address.
    alice2 = engine("alice")
    alice2.process_bundle("bob", bob.local_bundle(2))
    result = bob.decrypt(ALICE, alice2.encrypt(BOB, b"new phone"))
    assert result.plaintext == b"new phone"
    assert result.identity_change is not None
    assert result.identity_change.old_key == alice.identity_key
    with pytest.raises(UntrustedIdentity):
        bob.encrypt(ALICE, b"held")
    bob.set_trust(ALICE, alice2.identity_key, "tofu")
    assert alice2.decrypt(BOB, bob.encrypt(ALICE, b"accepted")).plaintext == b"accepted"


# -- defect 7: MAC compared in constant time ------------------------------------------------


def test_defect7_mac_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(1))
    message = alice.encrypt(BOB, b"hi")
    parsed = WhisperMessage(
        serialized=PreKeyWhisperMessage(serialized=message.body).getWhisperMessage().serialize()
    )

    bob.decrypt(ALICE, message)
    assert len(calls) == 1 and calls[0][1] == parsed.serialize()[-8:]

    # python-axolotl's own verifyMac never calls compare_digest (it uses `!=`).
    calls.clear()
    original = hardening.ORIGINALS["WhisperMessage.verifyMac"]
    state = alice  # any keys will do: the comparison is what we watch
    del state
    with pytest.raises(InvalidMessageException):
        identity = Curve.generateKeyPair().getPublicKey()
        from axolotl.identitykey import IdentityKey

        original(parsed, 3, IdentityKey(identity), IdentityKey(identity), bytes(32))
    assert calls == []
