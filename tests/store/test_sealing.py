"""Sealing and key wrapping: the documented formats, and every way to fail them.

The expected bytes are computed here with PyNaCl's primitives directly, from the
format in docs/storage.md, so a change to the format fails these tests instead of
silently orphaning stored data.
"""

from __future__ import annotations

import itertools
import pickle
import unicodedata
from collections.abc import Callable
from dataclasses import replace

import nacl.bindings
import nacl.encoding
import nacl.hash
import nacl.pwhash.argon2id
import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2ee.errors import StorageError, StoreCorrupt, UsageError, WrongPassphrase
from e2ee.store.sealing import (
    KDF_MINIMUM,
    METHOD_ARGON2ID,
    METHOD_UNPROTECTED,
    SEALED_VERSION,
    KdfLimits,
    Sealer,
    WrappedKey,
    create_key,
    seal_context,
    unlock,
)

KEY = bytes(range(32))
CONTEXT = seal_context("sessions", "bob", 2)


def counter_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for the CSPRNG: 0x00, 0x01, ... as a byte stream."""
    stream = itertools.cycle(range(256))

    def draw(n: int) -> bytes:
        return bytes(next(stream) for _ in range(n))

    return draw


def frame(tag: bytes, data: bytes) -> bytes:
    return tag + len(data).to_bytes(4, "big") + data


# -- sealed blobs -------------------------------------------------------------------------


@given(data=st.binary(max_size=4096), context=st.binary(max_size=64))
def test_open_inverts_seal(data: bytes, context: bytes) -> None:
    sealer = Sealer(KEY)
    assert sealer.open(sealer.seal(data, context), context) == data


def test_sealed_blob_format_is_version_nonce_aead() -> None:
    nonce = bytes(range(24))
    blob = Sealer(KEY, random=counter_random()).seal(b"ratchet state", CONTEXT)
    expected = (
        bytes([SEALED_VERSION])
        + nonce
        + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            b"ratchet state", bytes([SEALED_VERSION]) + CONTEXT, nonce, KEY
        )
    )
    assert blob == expected
    assert len(blob) == 1 + 24 + len(b"ratchet state") + 16


def test_context_encoding_is_framed_and_typed() -> None:
    assert seal_context("sessions", "bob", 2) == (
        frame(b"s", b"sessions") + frame(b"s", b"bob") + frame(b"i", b"2")
    )
    # No two locations share an encoding.
    assert seal_context("t", "ab", "c") != seal_context("t", "a", "bc")
    assert seal_context("t", 1) != seal_context("t", "1")
    assert seal_context("t1", "") != seal_context("t", "1")
    assert seal_context("prekeys", -5) == frame(b"s", b"prekeys") + frame(b"i", b"-5")


def test_context_parts_must_be_str_or_int() -> None:
    with pytest.raises(UsageError):
        seal_context("t", True)
    with pytest.raises(UsageError):
        seal_context("t", 1.5)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        seal_context("t", "\ud800")


def test_nonces_are_fresh_for_every_seal() -> None:
    sealer = Sealer(KEY)
    blobs = {sealer.seal(b"same", CONTEXT) for _ in range(50)}
    assert len(blobs) == 50


@pytest.mark.parametrize(
    "other",
    [
        seal_context("sessions", "bob", 3),
        seal_context("sessions", "bobb", 2),
        seal_context("sender_keys", "bob", 2),
        b"",
    ],
    ids=["device", "name", "table", "empty"],
)
def test_a_blob_opened_for_another_location_fails(other: bytes) -> None:
    sealer = Sealer(KEY)
    with pytest.raises(StoreCorrupt):
        sealer.open(sealer.seal(b"secret", CONTEXT), other)


@given(position=st.integers(0, 1 + 24 + 6 + 16 - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(position: int, bit: int) -> None:
    sealer = Sealer(KEY)
    blob = bytearray(sealer.seal(b"secret", CONTEXT))
    blob[position] ^= 1 << bit
    with pytest.raises(StoreCorrupt):
        sealer.open(bytes(blob), CONTEXT)


def test_truncated_unknown_version_and_other_key_are_corrupt() -> None:
    sealer = Sealer(KEY)
    blob = sealer.seal(b"secret", CONTEXT)
    with pytest.raises(StoreCorrupt, match="truncated"):
        sealer.open(blob[:40], CONTEXT)
    with pytest.raises(StoreCorrupt, match="version 2"):
        sealer.open(b"\x02" + blob[1:], CONTEXT)
    with pytest.raises(StoreCorrupt):
        Sealer(bytes(32)).open(blob, CONTEXT)


def test_keys_must_be_32_bytes() -> None:
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(UsageError):
            Sealer(bad)


def test_the_key_stays_out_of_reprs_pickles_and_errors() -> None:
    sealer = Sealer(KEY)
    assert KEY.hex() not in repr(sealer)
    assert repr(KEY) not in repr(sealer)
    with pytest.raises(UsageError):
        pickle.dumps(sealer)
    unprotected = sealer.wrap_key(None, KDF_MINIMUM)
    assert KEY.hex() not in repr(unprotected)
    assert repr(KEY) not in repr(unprotected)
    failures: list[BaseException] = []
    for attempt in (
        lambda: sealer.open(b"\x01" + bytes(60), CONTEXT),
        lambda: sealer.open(b"", CONTEXT),
        lambda: unlock(sealer.wrap_key("pw", KDF_MINIMUM), "wrong"),
        lambda: unlock(replace(unprotected, payload=KEY[:31]), None),
    ):
        with pytest.raises(StorageError) as caught:
            attempt()
        failures.append(caught.value)
    for failure in failures:
        chain = [failure, failure.__cause__, failure.__context__]
        text = " ".join(f"{e!s} {e!r}" for e in chain if e is not None)
        assert KEY.hex() not in text
        assert repr(KEY) not in text
        assert repr(KEY[:31]) not in text


# -- key wrapping -------------------------------------------------------------------------------


def test_a_passphrase_wrap_unwraps_to_the_same_key() -> None:
    sealer, wrapped = create_key("correct horse", KDF_MINIMUM)
    assert wrapped.protected
    assert wrapped.method == METHOD_ARGON2ID
    assert (wrapped.opslimit, wrapped.memlimit) == (KDF_MINIMUM.opslimit, KDF_MINIMUM.memlimit)
    assert unlock(wrapped, "correct horse").same_key(sealer)
    blob = sealer.seal(b"data", CONTEXT)
    assert unlock(wrapped, "correct horse").open(blob, CONTEXT) == b"data"


def test_wrap_format_is_argon2id_then_aead_over_the_parameters() -> None:
    sealer = Sealer(KEY, random=counter_random())
    wrapped = sealer.wrap_key("pw", KDF_MINIMUM)
    salt, nonce = bytes(range(16)), bytes(range(16, 40))
    kek = nacl.pwhash.argon2id.kdf(
        32, b"pw", salt, opslimit=KDF_MINIMUM.opslimit, memlimit=KDF_MINIMUM.memlimit
    )
    ad = (
        b"blindpost/keywrap\x01"
        + frame(b"", b"argon2id")
        + frame(b"", salt)
        + KDF_MINIMUM.opslimit.to_bytes(8, "big")
        + KDF_MINIMUM.memlimit.to_bytes(8, "big")
    )
    assert wrapped == WrappedKey(
        1,
        "argon2id",
        salt,
        KDF_MINIMUM.opslimit,
        KDF_MINIMUM.memlimit,
        nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(KEY, ad, nonce, kek),
    )


@pytest.mark.parametrize("wrong", ["correct horse ", "Correct horse", "correct hors", "x"])
def test_a_wrong_passphrase_is_refused(wrong: str) -> None:
    _, wrapped = create_key("correct horse", KDF_MINIMUM)
    with pytest.raises(WrongPassphrase):
        unlock(wrapped, wrong)


def test_passphrase_presence_must_match_the_wrap() -> None:
    _, protected = create_key("pw", KDF_MINIMUM)
    _, unprotected = create_key(None, KDF_MINIMUM)
    with pytest.raises(WrongPassphrase):
        unlock(protected, None)
    with pytest.raises(WrongPassphrase):
        unlock(unprotected, "pw")


def test_no_passphrase_stores_the_key_labelled_unprotected() -> None:
    sealer = Sealer(KEY)
    wrapped = sealer.wrap_key(None, KDF_MINIMUM)
    assert wrapped == WrappedKey(1, METHOD_UNPROTECTED, b"", 0, 0, KEY)
    assert not wrapped.protected
    assert unlock(wrapped, None).same_key(sealer)


def test_passphrases_are_compared_after_nfc_normalisation() -> None:
    composed = "caf\u00e9 \u00c5"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    sealer, wrapped = create_key(composed, KDF_MINIMUM)
    assert unlock(wrapped, decomposed).same_key(sealer)


def test_an_empty_passphrase_is_misuse() -> None:
    with pytest.raises(UsageError):
        create_key("", KDF_MINIMUM)
    _, wrapped = create_key("pw", KDF_MINIMUM)
    with pytest.raises(UsageError):
        unlock(wrapped, "")


def test_stored_limits_are_used_to_unwrap() -> None:
    limits = KdfLimits(2, 16 * 1024)
    sealer, wrapped = create_key("pw", limits)
    assert (wrapped.opslimit, wrapped.memlimit) == (2, 16 * 1024)
    assert unlock(wrapped, "pw").same_key(sealer)
    # Changing a stored parameter changes the derived key: the wrap no longer opens.
    for spoiled in (
        replace(wrapped, opslimit=1),
        replace(wrapped, memlimit=8 * 1024),
        replace(wrapped, salt=bytes(16)),
    ):
        with pytest.raises(WrongPassphrase):
            unlock(spoiled, "pw")


@pytest.mark.parametrize(
    "spoil",
    [
        lambda w: replace(w, version=2),
        lambda w: replace(w, method="scrypt"),
        lambda w: replace(w, salt=b"short"),
        lambda w: replace(w, payload=w.payload[:-1]),
        lambda w: replace(w, opslimit=10**6),
        lambda w: replace(w, memlimit=2**40),
    ],
    ids=["version", "method", "salt", "payload", "opslimit", "memlimit"],
)
def test_a_malformed_wrap_is_corrupt_not_a_wrong_passphrase(
    spoil: Callable[[WrappedKey], WrappedKey],
) -> None:
    _, wrapped = create_key("pw", KDF_MINIMUM)
    with pytest.raises(StoreCorrupt):
        unlock(spoil(wrapped), "pw")


def test_limits_out_of_range_are_misuse() -> None:
    for opslimit, memlimit in ((0, 8192), (1, 8191), (65, 8192), (1, 2**40)):
        with pytest.raises(UsageError):
            KdfLimits(opslimit, memlimit)


def test_rewrapping_keeps_the_key_so_sealed_blobs_still_open() -> None:
    sealer, wrapped = create_key("old", KDF_MINIMUM)
    blob = sealer.seal(b"session", CONTEXT)
    rewrapped = unlock(wrapped, "old").wrap_key("new", KDF_MINIMUM)
    assert rewrapped.salt != wrapped.salt
    assert unlock(rewrapped, "new").open(blob, CONTEXT) == b"session"
    removed = unlock(rewrapped, "new").wrap_key(None, KDF_MINIMUM)
    assert unlock(removed, None).open(blob, CONTEXT) == b"session"


def test_a_subkey_is_keyed_blake2b_of_the_data_key_per_purpose() -> None:
    key = bytes(range(32))
    sealer = Sealer(key)
    expected = nacl.hash.blake2b(
        b"", key=key, person=b"bp-sqlcipher-v1", digest_size=32, encoder=nacl.encoding.RawEncoder
    )
    assert sealer.subkey(b"bp-sqlcipher-v1") == expected
    assert sealer.subkey(b"other") != expected
    assert Sealer(bytes(32)).subkey(b"bp-sqlcipher-v1") != expected
    for purpose in (b"", b"x" * 17):
        with pytest.raises(UsageError):
            sealer.subkey(purpose)
