"""The protocol engine as a program uses it: keys, bundles, sessions, groups, trust."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
from store_state import memory_data

import e2ee  # noqa: F401
from e2ee.core import KeyPolicy, PreKeyBundle
from e2ee.core.engine import Ciphertext, ProtocolEngine
from e2ee.errors import (
    InvalidBundle,
    InvalidMessage,
    MissingKey,
    NoSession,
    UntrustedIdentity,
    UsageError,
)
from e2ee.store import Address, MemoryProtocolStore, TrustLevel

ALICE = Address("alice", 1)
BOB = Address("bob", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


def snapshot(store: MemoryProtocolStore) -> dict[str, Any]:
    return copy.deepcopy(memory_data(store))


def engine(name: str, **kwargs: Any) -> ProtocolEngine:
    e = ProtocolEngine(MemoryProtocolStore(), **kwargs)
    e.create_account(name, 1)
    return e


def connected() -> tuple[ProtocolEngine, ProtocolEngine]:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", PreKeyBundle.from_json(bob.local_bundle(3).to_json()))
    bob.decrypt(ALICE, alice.encrypt(BOB, b"hello"))
    alice.decrypt(BOB, bob.encrypt(ALICE, b"hi"))
    return alice, bob


# -- accounts and bundles ---------------------------------------------------------------


def test_new_account_has_identity_signed_prekey_and_100_prekeys() -> None:
    alice = engine("alice")
    upload = alice.key_upload()
    assert len(upload.identity_key) == 33
    assert upload.signed_prekey is not None
    assert len(upload.one_time_prekeys) == 100
    assert len({k.prekey_id for k in upload.one_time_prekeys}) == 100
    body = upload.to_json()
    assert set(body) == {"identity_key", "registration_id", "signed_prekey", "one_time_prekeys"}
    with pytest.raises(UsageError):
        alice.create_account("alice", 1)


def test_bundle_json_round_trip_and_signature_is_always_checked() -> None:
    bob = engine("bob")
    bundle = bob.local_bundle(7)
    assert PreKeyBundle.from_json(bundle.to_json()) == bundle
    bad = bundle.to_json()
    signature = bytearray(bundle.signed_prekey.signature)
    signature[5] ^= 1
    import base64

    bad["signed_prekey"]["signature"] = base64.b64encode(bytes(signature)).decode()
    with pytest.raises(InvalidBundle):
        PreKeyBundle.from_json(bad)
    # Even a bundle object built by hand is verified before use.
    forged = PreKeyBundle(
        bundle.device_id,
        bundle.registration_id,
        engine("mallory").identity_key,
        bundle.signed_prekey,
        bundle.one_time_prekey,
    )
    with pytest.raises(InvalidBundle):
        engine("alice").process_bundle("bob", forged)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("identity_key"),
        lambda b: b.update(identity_key="not base64!"),
        lambda b: b.update(device_id="1"),
        lambda b: b.update(registration_id=-1),
        lambda b: b["signed_prekey"].update(public_key="BQ=="),
        lambda b: b.update(one_time_prekey={"id": 0, "public_key": b["identity_key"]}),
        lambda b: b.update(signed_prekey=None),
    ],
)
def test_malformed_bundles_are_rejected_with_a_typed_error(mutate: Any) -> None:
    body = engine("bob").local_bundle(2).to_json()
    mutate(body)
    with pytest.raises(InvalidBundle):
        PreKeyBundle.from_json(body)


def test_one_time_prekey_is_consumed_only_after_the_message_authenticates() -> None:
    alice, bob = engine("alice"), engine("bob")
    alice.process_bundle("bob", bob.local_bundle(3))
    message = alice.encrypt(BOB, b"hello")
    tampered = Ciphertext("prekey", message.body[:-1] + bytes([message.body[-1] ^ 1]))
    with pytest.raises(InvalidMessage):
        bob.decrypt(ALICE, tampered)
    assert 3 in bob.store.prekey_ids()
    bob.decrypt(ALICE, message)
    assert 3 not in bob.store.prekey_ids()


# -- compute, then commit -----------------------------------------------------------------


def test_failed_decrypt_leaves_store_byte_identical() -> None:
    alice, bob = connected()
    message = alice.encrypt(BOB, b"secret")
    before = snapshot(bob.store)  # type: ignore[arg-type]
    for cut in (1, 9, len(message.body) // 2):
        with pytest.raises(InvalidMessage):
            bob.decrypt(ALICE, Ciphertext("message", message.body[:-cut]))
    flipped = bytearray(message.body)
    flipped[-3] ^= 0x40
    with pytest.raises(InvalidMessage):
        bob.decrypt(ALICE, Ciphertext("message", bytes(flipped)))
    assert snapshot(bob.store) == before  # type: ignore[arg-type]
    assert bob.decrypt(ALICE, message).plaintext == b"secret"


def test_history_row_commits_with_the_session_or_not_at_all() -> None:
    alice, bob = connected()
    first, second = alice.encrypt(BOB, b"one"), alice.encrypt(BOB, b"two")

    def crash(_: bytes) -> list[tuple[str, dict[str, Any]]]:
        raise RuntimeError("disk full")

    before = snapshot(bob.store)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        bob.decrypt(ALICE, first, on_plaintext=crash)
    assert snapshot(bob.store) == before  # type: ignore[arg-type]

    def history(plaintext: bytes) -> list[tuple[str, dict[str, Any]]]:
        return [("messages", {"id": plaintext.decode(), "body": plaintext.decode()})]

    bob.decrypt(ALICE, first, on_plaintext=history)
    bob.decrypt(ALICE, second, on_plaintext=history)
    assert bob.store.load_app_row("messages", "one") == {"id": "one", "body": "one"}
    assert bob.store.load_app_row("messages", "two") is not None


def test_group_decrypt_failure_changes_nothing() -> None:
    alice, bob = engine("alice"), engine("bob")
    bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))
    message = alice.group_encrypt("g", b"group")
    before = snapshot(bob.store)  # type: ignore[arg-type]
    bad = bytearray(message)
    bad[-1] ^= 1  # signature
    with pytest.raises(InvalidMessage):
        bob.group_decrypt("g", ALICE, bytes(bad))
    assert snapshot(bob.store) == before  # type: ignore[arg-type]
    assert bob.group_decrypt("g", ALICE, message) == b"group"


# -- sessions -----------------------------------------------------------------------------


def test_no_session_is_a_typed_error() -> None:
    alice, bob = engine("alice"), engine("bob")
    with pytest.raises(NoSession):
        alice.encrypt(BOB, b"x")
    other, _ = connected()
    message = other.encrypt(BOB, b"x")  # a normal message from a stranger's session
    with pytest.raises((NoSession, InvalidMessage)):
        alice.decrypt(BOB, message)
    with pytest.raises(NoSession):
        bob.group_encrypt("g", b"x")
    with pytest.raises(NoSession):
        bob.group_decrypt("g", ALICE, engine_group_message())


def test_encrypt_many_is_encrypt_in_turn_committed_once() -> None:
    """Several messages to one device: decryptable in order (and out of order) by the
    peer, one session write for all of them; refused as a whole, nothing changes."""
    alice, bob = connected()
    store = alice._store
    commits: list[Any] = []
    commit = store.commit

    def counted(changes: Any) -> None:
        commits.append(changes)
        commit(changes)

    store.commit = counted  # type: ignore[method-assign]
    sent = alice.encrypt_many(BOB, [b"one", b"two", b"three"])
    assert len(commits) == 1 and set(commits[0].sessions_put) == {BOB}
    assert [c.kind for c in sent] == ["message"] * 3
    assert bob.decrypt(ALICE, sent[0]).plaintext == b"one"
    assert bob.decrypt(ALICE, sent[2]).plaintext == b"three"  # a skipped key is kept
    assert bob.decrypt(ALICE, sent[1]).plaintext == b"two"
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"four")).plaintext == b"four"
    before = snapshot(alice._store)
    with pytest.raises(UsageError):
        alice.encrypt_many(BOB, [b"ok", "not bytes"])  # type: ignore[list-item]
    with pytest.raises(NoSession):
        alice.encrypt_many(Address("carol", 1), [b"x"])
    assert snapshot(alice._store) == before
    assert alice.encrypt_many(BOB, []) == []


def engine_group_message() -> bytes:
    sender = engine("carol")
    sender.group_distribution("g")
    return sender.group_encrypt("g", b"x")


def test_removed_member_cannot_read_after_rotation() -> None:
    alice, bob, carol = engine("alice"), engine("bob"), engine("carol")
    for member in (bob, carol):
        member.group_process_distribution("g", ALICE, alice.group_distribution("g"))
    assert carol.group_decrypt("g", ALICE, alice.group_encrypt("g", b"before")) == b"before"
    alice.group_rotate("g")  # carol removed: new key, sent only to bob
    bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))
    after = alice.group_encrypt("g", b"after")
    assert bob.group_decrypt("g", ALICE, after) == b"after"
    with pytest.raises(MissingKey):
        carol.group_decrypt("g", ALICE, after)


def test_strict_mode_holds_sending_until_the_key_is_trusted() -> None:
    alice = engine("alice", trust_on_first_use=False)
    bob = engine("bob")
    alice.process_bundle("bob", bob.local_bundle(1))  # key recorded, but untrusted
    with pytest.raises(UntrustedIdentity):
        alice.encrypt(BOB, b"x")
    record = alice.identity(BOB)
    assert record is not None and record.trust == TrustLevel.UNTRUSTED
    alice.set_trust(BOB, bob.identity_key, TrustLevel.VERIFIED)
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"x")).plaintext == b"x"


# -- locking ----------------------------------------------------------------------------------


def test_concurrent_sends_to_one_peer_lose_no_ratchet_step() -> None:
    alice, bob = connected()
    results: list[Ciphertext] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        for j in range(25):
            message = alice.encrypt(BOB, f"{i}-{j}".encode())
            with lock:
                results.append(message)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plaintexts = {bob.decrypt(ALICE, m).plaintext for m in results}
    assert len(plaintexts) == 100  # every message got its own key: none collided


def test_a_busy_peer_does_not_block_another_peer() -> None:
    alice, _ = connected()
    carol = engine("carol")
    alice.process_bundle("carol", carol.local_bundle(1))
    done = threading.Event()

    def send_to_carol() -> None:
        alice.encrypt(Address("carol", 1), b"not blocked")
        done.set()

    with alice._locks.hold(BOB):  # someone is mid-operation with bob
        thread = threading.Thread(target=send_to_carol)
        thread.start()
        assert done.wait(timeout=30)
    thread.join()


# -- key maintenance --------------------------------------------------------------------------


def test_signed_prekey_rotates_weekly_and_old_one_survives_the_grace_period() -> None:
    clock = Clock()
    policy = KeyPolicy()
    bob = engine("bob", now_ms=clock)
    old_bundle = bob.local_bundle(None)
    assert bob.maintain_keys() is None  # nothing due yet

    clock.now += policy.signed_prekey_rotation_ms
    upload = bob.maintain_keys()
    assert upload is not None and upload.signed_prekey is not None
    assert upload.signed_prekey.prekey_id != old_bundle.signed_prekey.prekey_id
    assert bob.local_bundle(None).signed_prekey == upload.signed_prekey

    # A session built from the bundle fetched before the rotation still works.
    alice = engine("alice")
    alice.process_bundle("bob", old_bundle)
    assert bob.decrypt(ALICE, alice.encrypt(BOB, b"late")).plaintext == b"late"

    clock.now += policy.signed_prekey_grace_ms
    bob.maintain_keys()
    ids = [row.prekey_id for row in bob.store.signed_prekeys()]
    assert old_bundle.signed_prekey.prekey_id not in ids
    carol = engine("carol")
    carol.process_bundle("bob", old_bundle)
    with pytest.raises(MissingKey):
        bob.decrypt(Address("carol", 1), carol.encrypt(BOB, b"too late"))


def test_prekeys_replenished_below_the_threshold() -> None:
    bob = engine("bob", policy=KeyPolicy(prekey_low_water=25, prekey_batch=100))
    assert bob.maintain_keys(relay_prekey_count=25) is None
    upload = bob.maintain_keys(relay_prekey_count=24)
    assert upload is not None and len(upload.one_time_prekeys) == 100
    assert upload.signed_prekey is None
    ids = [k.prekey_id for k in upload.one_time_prekeys]
    assert ids == list(range(101, 201))  # fresh ids, none reused
    assert len(bob.store.prekey_ids()) == 200


def test_local_prekeys_are_capped() -> None:
    bob = engine("bob", policy=KeyPolicy(max_local_prekeys=250))
    for _ in range(4):
        bob.maintain_keys(relay_prekey_count=0)
    held = bob.store.prekey_ids()
    assert len(held) == 250
    assert min(held) == 251  # the oldest were dropped


# -- secrets stay out of repr -----------------------------------------------------------------


def test_no_secret_in_repr() -> None:
    alice, bob = connected()
    account = alice.store.load_account()
    assert account is not None
    message = alice.encrypt(BOB, b"top secret text")
    decrypted = bob.decrypt(ALICE, message)
    texts = [repr(account), repr(message), repr(decrypted), repr(alice), repr(alice.store)]
    joined = " ".join(texts)
    assert "top secret" not in joined
    assert account.identity_key_pair.hex() not in joined
    assert repr(account.identity_key_pair)[2:20] not in joined


def test_reset_device_keeps_the_identity_with_new_keys_and_fresh_sessions() -> None:
    alice, bob = connected()
    before = alice.key_upload()
    account = alice.reset_device(2)
    after = alice.key_upload()
    assert (account.name, account.device_id) == ("alice", 2)
    assert after.identity_key == before.identity_key  # safety numbers do not change
    assert after.signed_prekey is not None and before.signed_prekey is not None
    assert after.signed_prekey.prekey_id != before.signed_prekey.prekey_id
    # (A restore drops the old prekeys first; here they are still held.) No id is reused:
    new_ids = {k.prekey_id for k in after.one_time_prekeys} - {
        k.prekey_id for k in before.one_time_prekeys
    }
    assert len(new_ids) == 100
    with pytest.raises(UsageError):
        alice.reset_device(0)
    # bob starts a new session with the new device from its bundle; both ways work.
    alice2 = Address("alice", 2)
    first = min(new_ids)
    bob.process_bundle("alice", PreKeyBundle.from_json(alice.local_bundle(first).to_json()))
    assert alice.decrypt(BOB, bob.encrypt(alice2, b"welcome back")).plaintext == b"welcome back"
    assert bob.decrypt(alice2, alice.encrypt(BOB, b"thanks")).plaintext == b"thanks"


def test_a_contacts_new_device_with_the_same_key_keeps_the_decision() -> None:
    # bob's second device shares his identity key (a linked device): alice's decision
    # about the key (here, verified in strict mode) covers it at once.
    alice = engine("alice", trust_on_first_use=False)
    bob = engine("bob")
    alice.process_bundle("bob", bob.local_bundle(1))
    alice.set_trust(BOB, bob.identity_key, TrustLevel.VERIFIED)
    account = bob.store.load_account()
    assert account is not None
    bob2 = ProtocolEngine(MemoryProtocolStore())
    bob2.create_account("bob", 2, identity_key_pair=account.identity_key_pair)
    alice.process_bundle("bob", bob2.local_bundle(1))
    record = alice.identity(Address("bob", 2))
    assert record is not None and record.trust == TrustLevel.VERIFIED
    assert bob2.decrypt(ALICE, alice.encrypt(Address("bob", 2), b"x")).plaintext == b"x"
    # A device of bob's name with another key is another identity: held in strict mode.
    other = ProtocolEngine(MemoryProtocolStore())
    other.create_account("bob", 3)
    alice.process_bundle("bob", other.local_bundle(1))
    with pytest.raises(UntrustedIdentity):
        alice.encrypt(Address("bob", 3), b"x")


def test_our_own_other_device_is_ours_without_a_decision() -> None:
    alice = engine("alice", trust_on_first_use=False)
    account = alice.store.load_account()
    assert account is not None
    alice2 = ProtocolEngine(MemoryProtocolStore(), trust_on_first_use=False)
    alice2.create_account("alice", 2, identity_key_pair=account.identity_key_pair)
    alice.process_bundle("alice", alice2.local_bundle(1))
    record = alice.identity(Address("alice", 2))
    assert record is not None and record.trust == TrustLevel.VERIFIED
    decrypted = alice2.decrypt(ALICE, alice.encrypt(Address("alice", 2), b"x"))
    assert decrypted.plaintext == b"x" and decrypted.identity_change is None
