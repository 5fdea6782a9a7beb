"""Sealed sender's pure parts: certificates, pinned relay keys, tokens, the sealed envelope.

The known-answer vectors are the ones printed in docs/wire-format.md ("Test vectors"); a change
that moves a byte breaks this test and the docs together.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import nacl.signing
import pytest

from blindpost_wire.frames import WireError
from blindpost_wire.sealed import (
    CERT_CONTEXT,
    ENDORSE_CONTEXT,
    certificate_body,
    endorsement_body,
    parse_token_header,
    token_header,
    token_verifier,
    verifier_matches,
)
from e2ee import envelope
from e2ee.core import Ciphertext
from e2ee.core.sealed import (
    RelayKey,
    RelayKeyPins,
    SealedContent,
    SealedRecipient,
    account_access_key,
    delivery_token,
    is_sealed,
    open_sealed,
    seal,
    verify_certificate,
)
from e2ee.errors import (
    ExpiredCertificate,
    InvalidCertificate,
    InvalidMessage,
    RelayKeyRejected,
    UnpinnedRelayKey,
    UsageError,
)

RELAY_SEED = bytes([0x01]) * 32
EPHEMERAL = bytes([0x02]) * 32
CONTENT_KEY = bytes([0x03]) * 32
ACCESS_KEY = bytes([0x04]) * 32
BOB_PRIVATE = bytes([0x11]) * 32
ALICE_PRIVATE = bytes([0x22]) * 32
EXPIRES_MS = 1_800_000_000_000


def identity(private: bytes) -> bytes:
    return b"\x05" + sodium.crypto_scalarmult_base(private)


def certificate(
    user: str = "alice", expires_ms: int = EXPIRES_MS, key_id: int = 1, seed: bytes = RELAY_SEED
) -> bytes:
    body = certificate_body(user, 1, identity(ALICE_PRIVATE), expires_ms, key_id)
    return body + nacl.signing.SigningKey(seed).sign(CERT_CONTEXT + body).signature


def pins(seed: bytes = RELAY_SEED, key_id: int = 1) -> RelayKeyPins:
    key = bytes(nacl.signing.SigningKey(seed).verify_key)
    return RelayKeyPins().require([RelayKey(key_id, key)])


def vectors() -> dict[str, str]:
    """Every value docs/wire-format.md prints, recomputed."""
    cert = certificate()
    inner = envelope.build_group("family", b"\x33sender-key-message")
    sealed = seal(
        [SealedRecipient("bob", 1, identity(BOB_PRIVATE))],
        SealedContent(cert, inner),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    token = delivery_token(ACCESS_KEY)
    return {
        "relay public key": bytes(nacl.signing.SigningKey(RELAY_SEED).verify_key).hex(),
        "alice identity key": identity(ALICE_PRIVATE).hex(),
        "bob identity key": identity(BOB_PRIVATE).hex(),
        "certificate": cert.hex(),
        "inner envelope": inner.hex(),
        "sealed envelope": sealed.hex(),
        "delivery token": token.hex(),
        "token verifier": token_verifier(token).hex(),
    }


def test_vectors_match_the_docs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    flat = "".join(doc.split())
    for name, value in vectors().items():
        assert value in flat, f"{name} is not in docs/wire-format.md"


def test_sealed_round_trip_for_every_recipient_device() -> None:
    bob = identity(BOB_PRIVATE)
    inner = envelope.build_group("family", b"\x33body")
    data = seal(
        [SealedRecipient("bob", 1, bob), SealedRecipient("bob", 2, bob)],
        SealedContent(certificate(), inner),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    assert is_sealed(data)
    for device in (1, 2):
        opened = open_sealed(
            data, user="bob", device=device, identity_private=BOB_PRIVATE, identity_key=bob
        )
        assert opened == SealedContent(certificate(), inner)
    # What the relay sees: no sender, no group id.
    assert b"alice" not in data and b"family" not in data


def test_sealed_without_certificate() -> None:
    bob = identity(BOB_PRIVATE)
    data = seal(
        [SealedRecipient("bob", 1, bob)],
        SealedContent(None, b"\x01inner"),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    opened = open_sealed(data, user="bob", device=1, identity_private=BOB_PRIVATE, identity_key=bob)
    assert opened.certificate is None and opened.envelope == b"\x01inner"


@pytest.mark.parametrize("where", [1, 40, 60, -1])
def test_any_flipped_byte_fails_authentication(where: int) -> None:
    bob = identity(BOB_PRIVATE)
    data = bytearray(
        seal(
            [SealedRecipient("bob", 1, bob)],
            SealedContent(certificate(), b"\x01inner"),
            ephemeral_private=EPHEMERAL,
            content_key=CONTENT_KEY,
        )
    )
    data[where] ^= 0x01
    with pytest.raises(InvalidMessage):
        open_sealed(
            bytes(data), user="bob", device=1, identity_private=BOB_PRIVATE, identity_key=bob
        )


def test_not_addressed_to_this_device_or_wrong_key() -> None:
    bob = identity(BOB_PRIVATE)
    data = seal(
        [SealedRecipient("bob", 1, bob)],
        SealedContent(None, b"\x01inner"),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    with pytest.raises(InvalidMessage, match="not addressed"):
        open_sealed(data, user="bob", device=2, identity_private=BOB_PRIVATE, identity_key=bob)
    with pytest.raises(InvalidMessage, match="authenticate"):
        open_sealed(data, user="bob", device=1, identity_private=ALICE_PRIVATE, identity_key=bob)
    for cut in (0, 5, 40, len(data) - 1):
        with pytest.raises(InvalidMessage):
            open_sealed(
                data[:cut], user="bob", device=1, identity_private=BOB_PRIVATE, identity_key=bob
            )


def test_certificate_checks_are_typed() -> None:
    assert verify_certificate(certificate(), pins(), EXPIRES_MS).user == "alice"
    with pytest.raises(ExpiredCertificate):
        verify_certificate(certificate(), pins(), EXPIRES_MS + 1)
    with pytest.raises(UnpinnedRelayKey):
        verify_certificate(certificate(key_id=2), pins(), 0)
    with pytest.raises(InvalidCertificate, match="signature"):
        verify_certificate(certificate(seed=b"\x09" * 32), pins(), 0)
    with pytest.raises(InvalidCertificate):
        verify_certificate(certificate()[:-1], pins(), 0)
    forged = bytearray(certificate())
    forged[-70] ^= 1  # a byte of the user name
    with pytest.raises(InvalidCertificate):
        verify_certificate(bytes(forged), pins(), 0)


def test_pins_first_use_then_only_endorsed_rotations() -> None:
    k1 = nacl.signing.SigningKey(RELAY_SEED)
    k2 = nacl.signing.SigningKey(b"\x05" * 32)
    k3 = nacl.signing.SigningKey(b"\x06" * 32)
    first = RelayKeyPins().require([RelayKey(1, bytes(k1.verify_key))])
    endorsed = k1.sign(ENDORSE_CONTEXT + endorsement_body(2, bytes(k2.verify_key))).signature
    second = first.require([RelayKey(2, bytes(k2.verify_key), endorsed)])
    assert set(second.keys) == {1, 2}
    # A key the pinned one did not sign, a swapped key under a pinned id: refused.
    bad = k3.sign(ENDORSE_CONTEXT + endorsement_body(3, bytes(k3.verify_key))).signature
    with pytest.raises(RelayKeyRejected):
        second.require([RelayKey(3, bytes(k3.verify_key), bad)])
    with pytest.raises(RelayKeyRejected):
        second.require([RelayKey(2, bytes(k3.verify_key), endorsed)])
    # An unendorsed new key is not pinned and its certificates stay refused.
    pins3, refused = second.update([RelayKey(3, bytes(k3.verify_key))])
    assert refused == (3,) and 3 not in pins3.keys


def test_tokens_and_verifiers() -> None:
    token = delivery_token(ACCESS_KEY)
    assert len(token) == 16 and token != delivery_token(b"\x05" * 32)
    verifier = token_verifier(token)
    assert verifier == hashlib.sha256(b"blindpost delivery token verifier v1\x00" + token).digest()
    assert verifier_matches(verifier, token)
    assert not verifier_matches(verifier, bytes(16))
    assert not verifier_matches(None, token)
    header = token_header({"bob": token, "carol": bytes(16)})
    assert parse_token_header(header, 10) == {"bob": token, "carol": bytes(16)}
    for bad in ("", "bob", "bob:!!", "bob:AAAA", f"bob:{header[4:]},bob:{header[4:]}"):
        with pytest.raises(WireError):
            parse_token_header(bad, 10)
    with pytest.raises(WireError):
        parse_token_header(header, 1)


def test_account_access_keys_are_per_identity_and_epoch() -> None:
    """Every device of an account (one identity key pair) derives the same key for an epoch;
    another epoch or another identity gives another key, which is BLAKE2b as documented."""
    secret = b"\x07" * 70
    key = account_access_key(secret, 0)
    assert len(key) == 32 and key == account_access_key(secret, 0)
    assert key != account_access_key(secret, 1) != account_access_key(b"\x08" * 70, 1)
    mac_key = hashlib.blake2b(secret, digest_size=32).digest()
    expected = hashlib.blake2b(
        (1).to_bytes(4, "big"), digest_size=32, key=mac_key, person=b"bp-access-key-v1"
    ).digest()
    assert account_access_key(secret, 1) == expected
    with pytest.raises(UsageError):
        account_access_key(secret, -1)


def test_relay_refusal_of_a_token_is_a_typed_transport_error() -> None:
    from e2ee.transport.errors import AuthFailed, DeliveryTokenRefused, error_from_response

    err = error_from_response(401, {"error": "delivery_token_refused"})
    assert isinstance(err, DeliveryTokenRefused) and isinstance(err, AuthFailed)
    assert type(error_from_response(401, {"error": "auth_invalid"})) is AuthFailed


# -- the engine: opening and binding ---------------------------------------------------------


def _engines() -> tuple[Any, Any, Any]:
    from e2ee.core import PreKeyBundle, ProtocolEngine
    from e2ee.store import MemoryProtocolStore

    alice = ProtocolEngine(MemoryProtocolStore())
    alice.create_account("alice", 1)
    bob = ProtocolEngine(MemoryProtocolStore())
    bob.create_account("bob", 1)
    carol = ProtocolEngine(MemoryProtocolStore())
    carol.create_account("carol", 1)
    bundle = PreKeyBundle.from_json(bob.local_bundle(prekey_id=1).to_json())
    alice.process_bundle("bob", bundle)
    return alice, bob, carol


def _cert_for(user: str, identity_key: bytes) -> bytes:
    body = certificate_body(user, 1, identity_key, EXPIRES_MS, 1)
    return body + nacl.signing.SigningKey(RELAY_SEED).sign(CERT_CONTEXT + body).signature


def test_a_setup_binds_to_the_certificate_or_is_refused() -> None:
    from e2ee.errors import CertificateMismatch
    from e2ee.store import Address

    alice, bob, carol = _engines()
    ct = alice.encrypt(Address("bob", 1), b"\x01hello")
    assert ct.kind == "prekey"
    inner = envelope.build_pairwise([envelope.Entry("bob", 1, ct.kind, ct.body)])
    sealed = seal(
        [SealedRecipient("bob", 1, bob.identity_key)],
        SealedContent(_cert_for("alice", alice.identity_key), inner),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    opened = bob.open_sealed(sealed)
    assert opened.envelope == inner and opened.certificate is not None
    cert = verify_certificate(opened.certificate, pins(), 0)
    entry = envelope.parse(opened.envelope).entry_for("bob", 1)  # type: ignore[union-attr]
    # A certificate for another user (carol's name, carol's key) around alice's setup.
    impostor = verify_certificate(_cert_for("carol", carol.identity_key), pins(), 0)
    with pytest.raises(CertificateMismatch):
        bob.bind_certificate(impostor, "prekey", entry.body)
    sender = bob.bind_certificate(cert, "prekey", entry.body)
    assert sender == Address("alice", 1)
    assert bob.decrypt(sender, Ciphertext(entry.kind, entry.body)).plaintext == b"\x01hello"
    # A later message binds to the identity now recorded for alice, and to nothing else.
    reply = bob.encrypt(Address("alice", 1), b"\x01hi")
    alice.decrypt(Address("bob", 1), reply)
    later = alice.encrypt(Address("bob", 1), b"\x01again")
    assert later.kind == "message"
    assert bob.bind_certificate(cert, "message", later.body) == Address("alice", 1)
    eve_cert = verify_certificate(_cert_for("eve", alice.identity_key), pins(), 0)
    with pytest.raises(CertificateMismatch):
        bob.bind_certificate(eve_cert, "message", later.body)  # nothing recorded for eve


def test_a_sealed_envelope_for_another_device_does_not_open() -> None:
    _alice, bob, carol = _engines()
    sealed = seal(
        [SealedRecipient("bob", 1, bob.identity_key)],
        SealedContent(None, b"\x01x"),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    with pytest.raises(InvalidMessage):
        carol.open_sealed(sealed)
    # Addressed to bob.1 but sealed to carol's key: bob cannot open it.
    wrong_key = seal(
        [SealedRecipient("bob", 1, carol.identity_key)],
        SealedContent(None, b"\x01x"),
        ephemeral_private=EPHEMERAL,
        content_key=CONTENT_KEY,
    )
    with pytest.raises(InvalidMessage):
        bob.open_sealed(wrong_key)


def test_access_key_is_added_to_an_encoded_payload_without_decoding_it() -> None:
    from e2ee import payload

    body = payload.Payload(
        type=payload.PayloadType.TEXT, message_id=bytes(16), sent_at_ms=5, text="hi"
    )
    data = payload.encode(body)
    stamped = payload.with_access_key(data, ACCESS_KEY)
    assert len(stamped) % payload.PAD_BUCKET == 0
    decoded = payload.decode(stamped)
    assert decoded.access_key == ACCESS_KEY and decoded.text == "hi"
    assert payload.decode(payload.encode(decoded)) == decoded  # field 16 round-trips
    assert ACCESS_KEY.hex() not in repr(decoded)
    with pytest.raises(UsageError):
        payload.with_access_key(data, b"short")
