"""DeviceSigner and the canonical string of docs/relay-api.md section 1 (pure, no network)."""

from __future__ import annotations

import base64
import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.errors import UsageError
from e2ee.transport.auth import (
    EMPTY_SHA256,
    DeviceSigner,
    canonical_string,
    new_nonce,
)

SEED = bytes(range(32))
NOW_MS = 1_732_766_400_000
NONCE = "AAECAwQFBgcICQoLDA0ODw=="  # base64 of bytes 0..15

# RFC 8032 section 7.1, TEST 1 (empty message): pins our use of PyNaCl's Ed25519.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_empty_sha256_constant_matches_spec_example() -> None:
    assert EMPTY_SHA256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_rfc8032_vector() -> None:
    signer = DeviceSigner.from_seed(RFC8032_SEED, "alice", 1)
    assert signer.public_key == RFC8032_PUB
    assert signer.sign(b"") == RFC8032_SIG


def test_canonical_string_known_answer() -> None:
    got = canonical_string(
        "get", "/v1/messages?after=5&limit=100", "alice", 12, NOW_MS, NONCE, EMPTY_SHA256
    )
    assert got == (
        b"BLINDPOST-AUTH-V1\n"
        b"GET\n"
        b"/v1/messages?after=5&limit=100\n"
        b"alice\n"
        b"12\n"
        b"1732766400000\n"
        b"AAECAwQFBgcICQoLDA0ODw==\n"
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_sign_headers_known_answer() -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 1)
    body = b'{"ids":[]}'
    headers = signer.sign_headers("POST", "/v1/messages/ack", body, now_ms=NOW_MS, nonce=NONCE)
    assert set(headers) == {
        "X-Blindpost-User",
        "X-Blindpost-Device",
        "X-Blindpost-Timestamp",
        "X-Blindpost-Nonce",
        "X-Blindpost-Signature",
    }
    assert headers["X-Blindpost-User"] == "alice"
    assert headers["X-Blindpost-Device"] == "1"
    assert headers["X-Blindpost-Timestamp"] == "1732766400000"
    assert headers["X-Blindpost-Nonce"] == NONCE
    # The signed string written out by hand; the digest is `printf '{"ids":[]}' | sha256sum`.
    expected = (
        b"BLINDPOST-AUTH-V1\nPOST\n/v1/messages/ack\nalice\n1\n1732766400000\n"
        b"AAECAwQFBgcICQoLDA0ODw==\n"
        b"8f05bafd61f29998ca102b333f853628502d4e45d53cff41148d6dd15f011792"
    )
    sig = base64.b64decode(headers["X-Blindpost-Signature"], validate=True)
    VerifyKey(signer.public_key).verify(expected, sig)
    # Ed25519 is deterministic: pin the exact header so any change to the signed bytes shows.
    assert headers["X-Blindpost-Signature"] == (
        "fXfC2XJl6+ta5xaB3oidEphyolPYC0dRrGkHOmKduKqWO1gf58HJhvax33dkbFt3w3ihZmjP6bpq8BwIDX0fAw=="
    )


def test_content_sha256_header_only_with_precomputed_digest() -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 1)
    digest = "ab" * 32
    headers = signer.sign_headers(
        "POST", "/v1/blobs", now_ms=NOW_MS, nonce=NONCE, body_sha256=digest
    )
    assert headers["X-Blindpost-Content-SHA256"] == digest
    msg = canonical_string("POST", "/v1/blobs", "alice", 1, NOW_MS, NONCE, digest)
    VerifyKey(signer.public_key).verify(msg, base64.b64decode(headers["X-Blindpost-Signature"]))


def test_defaults_use_clock_and_fresh_nonces() -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 1)
    a = signer.sign_headers("GET", "/v1/ws")
    b = signer.sign_headers("GET", "/v1/ws")
    assert a["X-Blindpost-Nonce"] != b["X-Blindpost-Nonce"]
    assert len(base64.b64decode(a["X-Blindpost-Nonce"])) == 16
    assert int(a["X-Blindpost-Timestamp"]) > 1_700_000_000_000


def test_new_nonce_uses_injected_randomness() -> None:
    assert new_nonce(lambda n: bytes(range(n))) == NONCE


def test_repr_and_str_hide_private_key() -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 3)
    secret_forms = [SEED.hex(), base64.b64encode(SEED).decode(), repr(SEED)]
    for text in (repr(signer), str(signer), f"{signer}"):
        assert "alice" in text
        for form in secret_forms:
            assert form not in text
    assert base64.b64encode(signer.public_key).decode() in repr(signer)
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_from_signing_key_equals_from_seed() -> None:
    a = DeviceSigner(SigningKey(SEED), "bob_2", 127)
    b = DeviceSigner.from_seed(SEED, "bob_2", 127)
    assert a.public_key == b.public_key
    assert a.user == "bob_2" and a.device == 127


@pytest.mark.parametrize(
    ("seed", "user", "device"),
    [
        (b"short", "alice", 1),
        (SEED, "Alice", 1),
        (SEED, "al", 1),
        (SEED, "a" * 33, 1),
        (SEED, "alice", 0),
        (SEED, "alice", 128),
        (SEED, "alice", True),
    ],
)
def test_bad_construction_is_usage_error(seed: bytes, user: str, device: int) -> None:
    with pytest.raises(UsageError):
        DeviceSigner.from_seed(seed, user, device)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": "short"},
        {"nonce": "x" * 65},
        {"nonce": "has space in it!!!"},
        {"now_ms": -1},
        {"body_sha256": "AB" * 32},
        {"body_sha256": "ab" * 31},
    ],
)
def test_bad_sign_arguments_are_usage_errors(kwargs: dict[str, object]) -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 1)
    args: dict[str, object] = {"now_ms": NOW_MS, "nonce": NONCE}
    args.update(kwargs)
    with pytest.raises(UsageError):
        signer.sign_headers("GET", "/v1/keys/count", **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", ["v1/keys", "/v1/a b", "/v1/x\n", "/v1/x#frag"])
def test_bad_target_is_usage_error(target: str) -> None:
    signer = DeviceSigner.from_seed(SEED, "alice", 1)
    with pytest.raises(UsageError):
        signer.sign_headers("GET", target, now_ms=NOW_MS, nonce=NONCE)


@given(
    seed=st.binary(min_size=32, max_size=32),
    body=st.binary(max_size=256),
    now=st.integers(min_value=0, max_value=2**53),
    nonce=st.from_regex(r"[A-Za-z0-9+/=_-]{16,64}", fullmatch=True),
    device=st.integers(min_value=1, max_value=MAX_DEVICE_ID),
    user=st.from_regex(r"[a-z0-9_]{3,32}", fullmatch=True),
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD"]),
)
def test_signature_verifies_over_the_headers_values(
    seed: bytes, body: bytes, now: int, nonce: str, device: int, user: str, method: str
) -> None:
    """What the relay reconstructs from the headers is exactly what was signed."""
    signer = DeviceSigner.from_seed(seed, user, device)
    h = signer.sign_headers(method, "/v1/messages?after=1", body, now_ms=now, nonce=nonce)
    msg = "\n".join(
        [
            "BLINDPOST-AUTH-V1",
            method,
            "/v1/messages?after=1",
            h["X-Blindpost-User"],
            h["X-Blindpost-Device"],
            h["X-Blindpost-Timestamp"],
            h["X-Blindpost-Nonce"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    VerifyKey(signer.public_key).verify(msg, base64.b64decode(h["X-Blindpost-Signature"]))
