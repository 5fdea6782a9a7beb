"""Recovery keys: what re-claims a username on a new device when every device is lost.

Invariants:

* A recovery key is 144 bits from the OS CSPRNG (``nacl.utils.random``) plus a 16-bit
  checksum, written as 8 groups of 4 base32 characters (``ABCD-EFGH-...``). The checksum only
  catches typing mistakes locally, before a guess is spent at the relay.
* The relay never sees the key: it keeps an Ed25519 public key (the *verifier*) whose private
  key is a keyed BLAKE2b of the key's random bytes, and a recovery request is signed with that
  private key. With 144 random bits no salt or slow hash is needed: a seized relay would have
  to search 2**144 keys (docs/threat-model.md, "Account recovery").
* The key's text and bytes never reach ``repr``, logs or exceptions.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Final

import nacl.encoding
import nacl.hash
import nacl.utils
from nacl.signing import SigningKey

from e2ee.errors import InvalidRecoveryKey, UsageError

__all__ = ["RECOVERY_KEY_BITS", "RecoveryKey"]

_RANDOM_LEN: Final = 18
_CHECK_LEN: Final = 2
#: Random bits in a recovery key.
RECOVERY_KEY_BITS: Final = _RANDOM_LEN * 8
_GROUP: Final = 4


def _checksum(secret: bytes) -> bytes:
    digest: bytes = nacl.hash.blake2b(
        secret, digest_size=_CHECK_LEN, person=b"bp-recovery-chk", encoder=nacl.encoding.RawEncoder
    )
    return digest


class RecoveryKey:
    """A recovery key (144 random bits).

    Make one with :meth:`generate`, read one with :meth:`parse`; :meth:`text` is what the
    user writes down, :meth:`verifier` what the relay stores.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != _RANDOM_LEN:
            raise UsageError(f"a recovery key holds {_RANDOM_LEN} random bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "RecoveryKey(<hidden>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecoveryKey) and other._secret == self._secret

    def __hash__(self) -> int:
        return hash(self._secret)

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = nacl.utils.random) -> RecoveryKey:
        """A new key from ``random_bytes`` (the OS CSPRNG by default)."""
        return cls(random_bytes(_RANDOM_LEN))

    @classmethod
    def parse(cls, text: str) -> RecoveryKey:
        """Read a key as the user typed it: case, spaces and dashes do not matter.

        Raises:
            InvalidRecoveryKey: not 32 base32 characters, or the checksum does not match.
        """
        cleaned = "".join(ch for ch in text.upper() if ch not in " -\t\r\n")
        if len(cleaned) != 8 * _GROUP or not cleaned.isascii():
            raise InvalidRecoveryKey("a recovery key is 8 groups of 4 letters and digits")
        try:
            raw = base64.b32decode(cleaned)
        except (binascii.Error, ValueError):
            raise InvalidRecoveryKey("a recovery key uses the letters A-Z and digits 2-7") from None
        secret, check = raw[:_RANDOM_LEN], raw[_RANDOM_LEN:]
        if _checksum(secret) != check:
            raise InvalidRecoveryKey("this is not the recovery key (a character is mistyped)")
        return cls(secret)

    def text(self) -> str:
        """The key as shown once to the user: ``XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX``."""
        encoded = base64.b32encode(self._secret + _checksum(self._secret)).decode("ascii")
        return "-".join(encoded[i : i + _GROUP] for i in range(0, len(encoded), _GROUP))

    def signing_seed(self) -> bytes:
        """The Ed25519 seed that signs recovery requests (never leaves the client)."""
        seed: bytes = nacl.hash.blake2b(
            self._secret,
            digest_size=32,
            person=b"bp-recovery-v1",
            encoder=nacl.encoding.RawEncoder,
        )
        return seed

    def verifier(self) -> bytes:
        """The 32-byte Ed25519 public key the relay stores to check recovery requests."""
        return bytes(SigningKey(self.signing_seed()).verify_key)
