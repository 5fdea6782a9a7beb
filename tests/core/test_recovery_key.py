"""Recovery keys: format, typo detection, the verifier the relay stores, no leaks in repr."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey, VerifyKey

from e2ee.core.recovery import RECOVERY_KEY_BITS, RecoveryKey
from e2ee.errors import InvalidRecoveryKey


def test_text_round_trips_however_it_is_typed() -> None:
    key = RecoveryKey.generate()
    text = key.text()
    groups = text.split("-")
    assert len(groups) == 8 and all(len(g) == 4 and g.isalnum() for g in groups)
    assert RecoveryKey.parse(text) == key
    assert RecoveryKey.parse(" " + text.lower().replace("-", " ") + "\n") == key
    assert RECOVERY_KEY_BITS >= 128


def test_every_single_character_typo_is_caught() -> None:
    text = RecoveryKey(bytes(range(18))).text()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    caught = 0
    for i, ch in enumerate(text):
        if ch == "-":
            continue
        wrong = text[:i] + alphabet[(alphabet.index(ch) + 1) % 32] + text[i + 1 :]
        with pytest.raises(InvalidRecoveryKey):
            RecoveryKey.parse(wrong)
        caught += 1
    assert caught == 32


@pytest.mark.parametrize("bad", ["", "ABCD", "!" * 32, "A" * 33, "0" * 32])
def test_malformed_text_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRecoveryKey):
        RecoveryKey.parse(bad)


def test_the_verifier_checks_signatures_made_with_the_key() -> None:
    key = RecoveryKey.generate()
    signed = SigningKey(key.signing_seed()).sign(b"recover alice")
    assert VerifyKey(key.verifier()).verify(signed) == b"recover alice"
    assert key.verifier() != RecoveryKey.generate().verifier()
    assert key.signing_seed() not in key.verifier()


def test_repr_hides_the_key() -> None:
    key = RecoveryKey.generate()
    assert repr(key) == "RecoveryKey(<hidden>)"
    assert key.text() not in repr(key)
