"""Our faster replacements return exactly what python-axolotl's originals return."""

from __future__ import annotations

from typing import Any

import pytest
from axolotl.ecc.curve import Curve
from axolotl.ecc.djbec import DjbECPublicKey
from axolotl.invalidkeyexception import InvalidKeyException
from axolotl.kdf.hkdfv3 import HKDFv3
from axolotl.state.sessionrecord import SessionRecord
from axolotl.state.sessionstate import SessionState
from hypothesis import given, settings
from hypothesis import strategies as st

import e2ee  # noqa: F401
from e2ee.core import fastpath

ORIGINAL = fastpath.ORIGINALS


def original(name: str) -> Any:
    value = ORIGINAL[name]
    return value.__func__ if isinstance(value, staticmethod) else value


def test_every_replacement_is_installed() -> None:
    assert set(ORIGINAL) == {
        "Curve.generatePublicKey",
        "Curve.calculateAgreement",
        "Curve.decodePoint",
        "DjbECPublicKey.serialize",
        "HKDFv3.deriveSecrets",
        "HKDF.createFor",
        "SessionState.getReceiverChain",
        "ChainKey.getBaseMaterial",
        "ChainKey.getMessageKeys",
        "WhisperMessage.getMac",
        "AESCipher.__init__",
        "SessionRecord.serialize",
        "AESCipher.encrypt",
        "SessionState.getRemoteIdentityKey",
        "SessionState.getLocalIdentityKey",
        "WhisperMessage.__init__",
    }


@settings(max_examples=300)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 3), st.binary(max_size=4))
def test_decode_point_matches_original(key: bytes, offset: int, tail: bytes) -> None:
    data = bytes([5] * (offset + 1)) + key + tail
    ours = Curve.decodePoint(bytearray(data), offset)
    theirs = original("Curve.decodePoint")(bytearray(data), offset)
    assert ours.getPublicKey() == theirs.getPublicKey()
    assert ours.serialize() == original("DjbECPublicKey.serialize")(theirs)


@given(st.binary(max_size=40))
def test_decode_point_refuses_what_cannot_be_a_key(data: bytes) -> None:
    if len(data) >= 33 and data[0] == 5:
        return
    with pytest.raises((InvalidKeyException, IndexError)):
        Curve.decodePoint(bytearray(data), 0)


@settings(max_examples=300)
@given(
    st.binary(min_size=1, max_size=64),
    st.binary(max_size=40),
    st.integers(1, 255),
    st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
)
def test_hkdf_matches_original(ikm: bytes, info: bytes, length: int, salt: bytes | None) -> None:
    kdf = HKDFv3()
    ours = kdf.deriveSecrets(bytearray(ikm), bytearray(info), length, salt)
    theirs = original("HKDFv3.deriveSecrets")(kdf, bytearray(ikm), bytearray(info), length, salt)
    assert ours == theirs


def test_receiver_chain_lookup_matches_original() -> None:
    from e2ee.core.engine import ProtocolEngine
    from e2ee.store import Address, MemoryProtocolStore

    alice, bob = ProtocolEngine(MemoryProtocolStore()), ProtocolEngine(MemoryProtocolStore())
    alice.create_account("alice", 1)
    bob.create_account("bob", 1)
    alice.process_bundle("bob", bob.local_bundle(1))
    a, b = Address("alice", 1), Address("bob", 1)
    for _ in range(4):  # several DH steps: several receiver chains
        bob.decrypt(a, alice.encrypt(b, b"x"))
        alice.decrypt(b, bob.encrypt(a, b"y"))
    state: SessionState = SessionRecord(serialized=bob.store.load_session(a)).getSessionState()
    chains = list(state.sessionStructure.receiverChains)
    assert len(chains) >= 2
    for chain in chains:
        key = Curve.decodePoint(bytearray(chain.senderRatchetKey), 0)
        ours, theirs = (
            state.getReceiverChain(key),
            original("SessionState.getReceiverChain")(state, key),
        )
        assert ours is not None and theirs is not None and ours[1] == theirs[1]
    stranger = DjbECPublicKey(bytes(32))
    assert state.getReceiverChain(stranger) is None
    assert original("SessionState.getReceiverChain")(state, stranger) is None


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_x25519_matches_python_axolotl_curve25519(private_seed: bytes, peer_seed: bytes) -> None:
    import axolotl_curve25519 as donna
    from axolotl.ecc.djbec import DjbECPrivateKey

    peer_public = donna.generatePublicKey(donna.generatePrivateKey(peer_seed))
    for private in (donna.generatePrivateKey(private_seed), private_seed):  # clamped or not
        assert Curve.generatePublicKey(private) == donna.generatePublicKey(private)
        ours = Curve.calculateAgreement(DjbECPublicKey(peer_public), DjbECPrivateKey(private))
        assert ours == donna.calculateAgreement(private, peer_public)


def test_low_order_point_is_an_invalid_key() -> None:
    from axolotl.ecc.djbec import DjbECPrivateKey

    from e2ee.core.engine import _axolotl_errors
    from e2ee.errors import InvalidKey

    private = DjbECPrivateKey(bytes([8]) + bytes(30) + bytes([64]))
    with pytest.raises(InvalidKey), _axolotl_errors("peer"):
        Curve.calculateAgreement(DjbECPublicKey(bytes(32)), private)


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32), st.sampled_from([b"\x01", b"\x02"]))
def test_chain_key_material_matches_original(key: bytes, seed: bytes) -> None:
    from axolotl.ratchet.chainkey import ChainKey

    chain = ChainKey(HKDFv3(), key, 7)
    assert chain.getBaseMaterial(bytearray(seed)) == original("ChainKey.getBaseMaterial")(
        chain, bytearray(seed)
    )


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1), st.sampled_from([2, 3]))
def test_message_keys_match_original(key: bytes, index: int, version: int) -> None:
    from axolotl.kdf.hkdf import HKDF
    from axolotl.ratchet.chainkey import ChainKey

    chain = ChainKey(HKDF.createFor(version), key, index)
    ours, theirs = chain.getMessageKeys(), original("ChainKey.getMessageKeys")(chain)
    assert (ours.getCipherKey(), ours.getMacKey(), ours.getIv(), ours.getCounter()) == (
        theirs.getCipherKey(),
        theirs.getMacKey(),
        theirs.getIv(),
        theirs.getCounter(),
    )


@settings(max_examples=200)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(max_size=300),
    st.sampled_from([2, 3]),
)
def test_message_mac_matches_original(
    sender: bytes, receiver: bytes, mac_key: bytes, body: bytes, version: int
) -> None:
    from axolotl.identitykey import IdentityKey
    from axolotl.protocol.whispermessage import WhisperMessage

    keys = IdentityKey(DjbECPublicKey(sender)), IdentityKey(DjbECPublicKey(receiver))
    message = WhisperMessage.__new__(WhisperMessage)
    ours = message.getMac(version, *keys, mac_key, bytearray(body))
    theirs = original("WhisperMessage.getMac")(message, version, *keys, mac_key, bytearray(body))
    assert ours == theirs and len(ours) == 8


@settings(max_examples=300)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**32 - 1) | st.sampled_from([0, 127, 128, 16383, 16384]),
    st.integers(0, 2**32 - 1) | st.sampled_from([0, 127, 128]),
    st.binary(max_size=400),
    st.sampled_from([2, 3]),
)
def test_built_whisper_message_matches_original(
    ratchet: bytes,
    sender: bytes,
    receiver: bytes,
    mac_key: bytes,
    counter: int,
    previous: int,
    ciphertext: bytes,
    version: int,
) -> None:
    from axolotl.identitykey import IdentityKey
    from axolotl.protocol.whispermessage import WhisperMessage

    keys = IdentityKey(DjbECPublicKey(sender)), IdentityKey(DjbECPublicKey(receiver))
    args = (version, mac_key, DjbECPublicKey(ratchet), counter, previous, ciphertext, *keys)
    ours = WhisperMessage(*args)
    theirs = WhisperMessage.__new__(WhisperMessage)
    original("WhisperMessage.__init__")(theirs, *args)
    assert type(ours.serialized) is bytes
    assert ours.serialized == theirs.serialized
    for attribute in ("counter", "previousCounter", "ciphertext", "messageVersion"):
        assert getattr(ours, attribute) == getattr(theirs, attribute)
    assert ours.getSenderRatchetKey() is theirs.getSenderRatchetKey() or (
        ours.getSenderRatchetKey().serialize() == theirs.getSenderRatchetKey().serialize()
    )
    if ciphertext:  # python-axolotl's parser calls an empty body incomplete
        parsed = WhisperMessage(serialized=ours.serialized)
        assert (parsed.getCounter(), parsed.getBody()) == (counter, ciphertext)


def test_whisper_message_parsing_and_odd_arguments_keep_the_original() -> None:
    from axolotl.identitykey import IdentityKey
    from axolotl.protocol.whispermessage import WhisperMessage

    keys = IdentityKey(DjbECPublicKey(bytes(32))), IdentityKey(DjbECPublicKey(bytes(range(32))))
    ratchet = DjbECPublicKey(bytes(range(1, 33)))
    # A counter beyond uint32 goes to python-axolotl, whose protobuf refuses it.
    with pytest.raises(ValueError):
        WhisperMessage(3, bytes(32), ratchet, 2**32, 0, b"x", *keys)
    # A bytearray ciphertext is the original's business too, which refuses it.
    with pytest.raises(TypeError):
        WhisperMessage(3, bytes(32), ratchet, 1, 0, bytearray(b"abc"), *keys)


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16), st.binary())
def test_aes_cipher_matches_original(key: bytes, iv: bytes, plaintext: bytes) -> None:
    from axolotl.sessioncipher import AESCipher

    theirs = AESCipher.__new__(AESCipher)
    original("AESCipher.__init__")(theirs, key, iv)
    ciphertext = AESCipher(key, iv).encrypt(plaintext)
    assert ciphertext == original("AESCipher.encrypt")(theirs, plaintext)
    assert AESCipher(key, iv).decrypt(ciphertext) == plaintext


@settings(max_examples=300)
@given(
    st.integers(0, 2**255 - 20),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(1, 20),
    st.binary(min_size=8, max_size=8),
)
def test_parsed_message_matches_python_axolotls_parse(
    ratchet: int, counter: int, previous: int, blocks: int, mac: bytes
) -> None:
    """Our parser builds python-axolotl's WhisperMessage without parsing twice."""
    from axolotl.protocol import whisperprotos_pb2 as pb
    from axolotl.protocol.whispermessage import WhisperMessage

    from e2ee.core import wire

    proto = pb.WhisperMessage(
        ratchetKey=b"\x05" + ratchet.to_bytes(32, "little"),
        counter=counter,
        previousCounter=previous,
        ciphertext=bytes(range(16)) * blocks,
    )
    body = b"\x33" + proto.SerializeToString() + mac
    ours, theirs = wire.parse_whisper_message(body), WhisperMessage(serialized=body)
    assert type(ours) is type(theirs)
    assert set(vars(ours)) == set(vars(theirs))
    for name, value in vars(theirs).items():
        mine = getattr(ours, name)
        if isinstance(value, DjbECPublicKey):
            assert mine.serialize() == value.serialize()
        else:
            assert mine == value and type(mine) is type(value), name


def _conversation_records() -> list[SessionRecord]:
    """Session records of a real conversation: several chains, archived states."""
    from e2ee.core.engine import ProtocolEngine
    from e2ee.store import Address, MemoryProtocolStore

    alice, bob = ProtocolEngine(MemoryProtocolStore()), ProtocolEngine(MemoryProtocolStore())
    alice.create_account("alice", 1)
    bob.create_account("bob", 1)
    a, b = Address("alice", 1), Address("bob", 1)
    records = [SessionRecord(), SessionRecord(sessionState=SessionState())]
    for setup in range(3):  # each new setup archives the previous state
        alice.process_bundle("bob", bob.local_bundle(setup + 1))
        for _ in range(3):
            bob.decrypt(a, alice.encrypt(b, b"x" * 200))
            alice.decrypt(b, bob.encrypt(a, b"y"))
            for engine, peer in ((alice, b), (bob, a)):
                records.append(SessionRecord(serialized=engine.store.load_session(peer)))
    return records


def test_record_serialization_matches_original_byte_for_byte() -> None:
    records = _conversation_records()
    assert max(len(r.getPreviousSessionStates()) for r in records) >= 2
    for record in records:
        ours = record.serialize()
        assert ours == original("SessionRecord.serialize")(record)
        again = SessionRecord(serialized=ours)
        assert len(again.getPreviousSessionStates()) == len(record.getPreviousSessionStates())


@settings(max_examples=200)
@given(st.binary(max_size=20_000), st.lists(st.binary(max_size=300), max_size=4))
def test_record_serialization_matches_original_for_any_size(
    root_key: bytes, previous_keys: list[bytes]
) -> None:
    """Covers one-, two- and three-byte length prefixes."""
    current = SessionState()
    current.getStructure().rootKey = root_key
    record = SessionRecord(sessionState=current)
    for key in previous_keys:
        state = SessionState()
        state.getStructure().rootKey = key
        record.previousStates.append(state)
    assert record.serialize() == original("SessionRecord.serialize")(record)


@settings(max_examples=200)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_session_identity_keys_match_original(remote: bytes, local: bytes) -> None:
    state = SessionState()
    state.getStructure().remoteIdentityPublic = remote
    state.getStructure().localIdentityPublic = local
    for name, key in (
        ("SessionState.getRemoteIdentityKey", remote),
        ("SessionState.getLocalIdentityKey", local),
    ):
        method = getattr(state, name.split(".")[1])
        try:
            theirs = original(name)(state)
        except (InvalidKeyException, IndexError) as exc:  # a key that cannot decode
            with pytest.raises(type(exc)):
                method()
            continue
        for _ in range(2):  # a second call is served from the cache
            assert method().serialize() == theirs.serialize() == key[:33]
