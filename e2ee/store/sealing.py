"""Local key protection: one data key seals every secret blob of a store.

Invariants:

* The data key (DEK) is 32 random bytes from :func:`nacl.utils.random`. It never
  leaves a :class:`Sealer` except inside a :class:`WrappedKey`, and it never
  reaches a repr, a log line or an exception message.
* A sealed blob is ``version (1 byte) || nonce (24) || ciphertext || tag (16)``,
  XChaCha20-Poly1305 (IETF AEAD) with associated data ``version || context``.
  The context names where the blob lives (table and primary key, see
  :func:`seal_context`), so a blob copied to another row, or a blob whose
  version byte was changed, fails authentication. Nonces are random; 24 bytes
  make collisions negligible for any number of blobs one store will ever hold.
* The DEK is stored wrapped. With a passphrase: under a key derived by Argon2id
  from the passphrase (NFC-normalised, UTF-8) with a random salt; the salt and
  the Argon2 limits are stored next to the wrap, so later versions can raise the
  limits and old wraps keep opening. Without a passphrase the DEK is stored as it
  is, labelled ``"unprotected"``: then only the file's permissions protect it.
* Changing the passphrase rewraps the DEK only; no sealed blob changes.
* Every failure is typed: a wrong passphrase is :class:`~e2ee.errors.WrongPassphrase`,
  a blob that does not open is :class:`~e2ee.errors.StoreCorrupt`, caller misuse
  is :class:`~e2ee.errors.UsageError`.

This module does no I/O; :mod:`e2ee.store.sqlite` decides where wraps and blobs live.
Python cannot reliably erase ``bytes`` from memory, so the DEK stays in process
memory while a store is open; that is outside what this module can protect.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NoReturn

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash.argon2id
import nacl.utils

from e2ee.errors import StorageError, StoreCorrupt, UsageError, WrongPassphrase

__all__ = [
    "KDF_INTERACTIVE",
    "KDF_MINIMUM",
    "KDF_MODERATE",
    "METHOD_ARGON2ID",
    "METHOD_UNPROTECTED",
    "SEALED_VERSION",
    "WRAP_VERSION",
    "KdfLimits",
    "Sealer",
    "WrappedKey",
    "create_key",
    "seal_context",
    "unlock",
]

Random = Callable[[int], bytes]

#: First byte of every sealed blob. Bump it (and keep opening the old value) to
#: change the format.
SEALED_VERSION: Final = 1
#: Format version of :class:`WrappedKey`.
WRAP_VERSION: Final = 1

METHOD_ARGON2ID: Final = "argon2id"
METHOD_UNPROTECTED: Final = "unprotected"

KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 24
_TAG_BYTES: Final = 16
_SALT_BYTES: Final = 16
_SEALED_OVERHEAD: Final = 1 + _NONCE_BYTES + _TAG_BYTES
_WRAP_LABEL: Final = b"blindpost/keywrap"
_PERSON_BYTES: Final = 16

_encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
_decrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt

# A stored wrap names its own Argon2 limits. Someone who can write the file could
# set them absurdly high to make open() hang or exhaust memory; these caps turn
# that into a clean StoreCorrupt. They sit well above libsodium's SENSITIVE
# preset (4 passes, 1 GiB).
_OPSLIMIT_CAP: Final = 64
_MEMLIMIT_CAP: Final = 4 * 1024**3


@dataclass(frozen=True, slots=True)
class KdfLimits:
    """Argon2id cost parameters: passes (``opslimit``) and memory in bytes (``memlimit``)."""

    opslimit: int
    memlimit: int

    def __post_init__(self) -> None:
        if not nacl.pwhash.argon2id.OPSLIMIT_MIN <= self.opslimit <= _OPSLIMIT_CAP:
            raise UsageError(f"Argon2id opslimit {self.opslimit} is out of range")
        if not nacl.pwhash.argon2id.MEMLIMIT_MIN <= self.memlimit <= _MEMLIMIT_CAP:
            raise UsageError(f"Argon2id memlimit {self.memlimit} is out of range")


#: libsodium's MODERATE preset (3 passes, 256 MiB; about 1 s here). The default.
KDF_MODERATE: Final = KdfLimits(
    nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE
)
#: libsodium's INTERACTIVE preset (2 passes, 64 MiB; about 0.1 s here).
KDF_INTERACTIVE: Final = KdfLimits(
    nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
)
#: The smallest limits libsodium accepts. For tests only: offers no real protection.
KDF_MINIMUM: Final = KdfLimits(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """The data key as stored: wrapped under a passphrase, or labelled unprotected.

    ``payload`` is ``nonce || ciphertext || tag`` for :data:`METHOD_ARGON2ID`
    and the raw data key for :data:`METHOD_UNPROTECTED`; it never reaches repr.
    ``salt`` is empty and the limits are 0 for an unprotected key.
    """

    version: int
    method: str
    salt: bytes
    opslimit: int
    memlimit: int
    payload: bytes = field(repr=False)

    @property
    def protected(self) -> bool:
        """True when a passphrase is needed to unwrap the key."""
        return self.method == METHOD_ARGON2ID

    def _associated_data(self) -> bytes:
        # Binds the parameters to the wrap. Changing any of them already changes
        # the derived key; this makes the binding explicit and format-versioned.
        return b"".join(
            (
                _WRAP_LABEL,
                self.version.to_bytes(1, "big"),
                _frame(self.method.encode("ascii")),
                _frame(self.salt),
                self.opslimit.to_bytes(8, "big"),
                self.memlimit.to_bytes(8, "big"),
            )
        )


class Sealer:
    """Seals and opens secret blobs under one data key.

    Safe to share between threads: it holds no mutable state.
    """

    __slots__ = ("__key", "_random")

    def __init__(self, key: bytes, *, random: Random = nacl.utils.random) -> None:
        """Wrap a 32-byte data key.

        Args:
            key: the data key. Use :func:`create_key` or :func:`unlock` to get one.
            random: source of nonces (a CSPRNG; tests pass a fixed one).

        Raises:
            UsageError: the key is not 32 bytes.
        """
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise UsageError(f"a data key is {KEY_BYTES} bytes")
        self.__key = key
        self._random = random

    def __repr__(self) -> str:
        return "Sealer(key=<secret>)"

    def __reduce__(self) -> NoReturn:
        raise UsageError("a Sealer holds a secret key and cannot be pickled")

    def seal(self, data: bytes, context: bytes) -> bytes:
        """Encrypt and authenticate ``data`` for one storage location.

        Args:
            data: the secret bytes.
            context: where the blob will live (see :func:`seal_context`).

        Returns:
            ``version || nonce || ciphertext || tag``.
        """
        header = SEALED_VERSION.to_bytes(1, "big")
        nonce = self._random(_NONCE_BYTES)
        sealed: bytes = _encrypt(data, header + context, nonce, self.__key)
        return header + nonce + sealed

    def open(self, blob: bytes, context: bytes) -> bytes:
        """Authenticate and decrypt a blob made by :meth:`seal` with the same context.

        Args:
            blob: the sealed bytes.
            context: the location the blob is read from.

        Returns:
            The original data.

        Raises:
            StoreCorrupt: unknown version, truncated, tampered with, sealed under
                another key, or sealed for another location.
        """
        if len(blob) < _SEALED_OVERHEAD:
            raise StoreCorrupt(f"sealed blob is truncated ({len(blob)} bytes)")
        if blob[0] != SEALED_VERSION:
            raise StoreCorrupt(f"sealed blob has unknown format version {blob[0]}")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            data: bytes = _decrypt(blob[1 + _NONCE_BYTES :], blob[:1] + context, nonce, self.__key)
        except nacl.exceptions.CryptoError as exc:
            raise StoreCorrupt("sealed blob failed authentication") from exc
        return data

    def wrap_key(self, passphrase: str | None, limits: KdfLimits) -> WrappedKey:
        """Wrap this sealer's data key for storage.

        Args:
            passphrase: protects the key; None stores it unprotected.
            limits: Argon2id cost, used only with a passphrase.

        Returns:
            The wrapped key, ready to store.

        Raises:
            UsageError: the passphrase is empty (pass None for no passphrase).
        """
        if passphrase is None:
            return WrappedKey(WRAP_VERSION, METHOD_UNPROTECTED, b"", 0, 0, self.__key)
        secret = _passphrase_bytes(passphrase)
        salt = self._random(_SALT_BYTES)
        header = WrappedKey(
            WRAP_VERSION, METHOD_ARGON2ID, salt, limits.opslimit, limits.memlimit, b""
        )
        kek = _derive(secret, header)
        nonce = self._random(_NONCE_BYTES)
        payload = nonce + _encrypt(self.__key, header._associated_data(), nonce, kek)
        return WrappedKey(
            WRAP_VERSION, METHOD_ARGON2ID, salt, limits.opslimit, limits.memlimit, payload
        )

    def subkey(self, purpose: bytes) -> bytes:
        """A 32-byte key for another use of the data key (e.g. SQLCipher's page key).

        Keyed BLAKE2b with ``purpose`` as personalisation: a subkey reveals nothing
        about the data key or about the subkeys of other purposes.

        Args:
            purpose: names the use, 1 to 16 bytes (BLAKE2b's personalisation).

        Returns:
            The subkey; the caller keeps it out of reprs and logs.

        Raises:
            UsageError: ``purpose`` is not 1 to 16 bytes.
        """
        if not isinstance(purpose, bytes) or not 1 <= len(purpose) <= _PERSON_BYTES:
            raise UsageError(f"a subkey purpose is 1 to {_PERSON_BYTES} bytes")
        derived: bytes = nacl.hash.blake2b(
            b"",
            key=self.__key,
            person=purpose,
            digest_size=KEY_BYTES,
            encoder=nacl.encoding.RawEncoder,
        )
        return derived

    def same_key(self, other: Sealer) -> bool:
        """True when both sealers hold the same data key (compared in constant time)."""
        return hmac.compare_digest(self.__key, other.__key)


def create_key(
    passphrase: str | None, limits: KdfLimits, *, random: Random = nacl.utils.random
) -> tuple[Sealer, WrappedKey]:
    """Make a new random data key and its wrap.

    Args:
        passphrase: protects the key; None stores it unprotected.
        limits: Argon2id cost, used only with a passphrase.
        random: CSPRNG for the key, salt and nonces.

    Returns:
        The sealer holding the new key and the wrap to store.

    Raises:
        UsageError: the passphrase is empty.
    """
    if passphrase is not None:
        _passphrase_bytes(passphrase)  # reject "" before drawing a key
    sealer = Sealer(random(KEY_BYTES), random=random)
    return sealer, sealer.wrap_key(passphrase, limits)


def unlock(
    wrapped: WrappedKey, passphrase: str | None, *, random: Random = nacl.utils.random
) -> Sealer:
    """Unwrap a stored data key.

    Args:
        wrapped: the stored wrap.
        passphrase: the passphrase, or None for an unprotected key.
        random: CSPRNG the returned sealer uses for nonces.

    Returns:
        A sealer holding the data key.

    Raises:
        WrongPassphrase: the passphrase does not unwrap the key, a passphrase was
            given for an unprotected key, or none was given for a protected one.
        StoreCorrupt: the wrap is malformed or of an unknown version or method.
        UsageError: the passphrase is empty.
    """
    if wrapped.version != WRAP_VERSION:
        raise StoreCorrupt(f"key wrap has unknown format version {wrapped.version}")
    if wrapped.method == METHOD_UNPROTECTED:
        if passphrase is not None:
            raise WrongPassphrase("this store has no passphrase; open it without one")
        if len(wrapped.payload) != KEY_BYTES:
            raise StoreCorrupt("unprotected data key has the wrong length")
        return Sealer(wrapped.payload, random=random)
    if wrapped.method != METHOD_ARGON2ID:
        raise StoreCorrupt("key wrap uses an unknown method")
    if passphrase is None:
        raise WrongPassphrase("this store is protected by a passphrase")
    secret = _passphrase_bytes(passphrase)
    if len(wrapped.salt) != _SALT_BYTES or len(wrapped.payload) != (
        _NONCE_BYTES + KEY_BYTES + _TAG_BYTES
    ):
        raise StoreCorrupt("key wrap is malformed")
    try:
        KdfLimits(wrapped.opslimit, wrapped.memlimit)
    except UsageError as exc:
        raise StoreCorrupt("key wrap names Argon2id limits out of range") from exc
    kek = _derive(secret, wrapped)
    nonce, boxed = wrapped.payload[:_NONCE_BYTES], wrapped.payload[_NONCE_BYTES:]
    try:
        key: bytes = _decrypt(boxed, wrapped._associated_data(), nonce, kek)
    except nacl.exceptions.CryptoError as exc:
        # A damaged wrap looks the same as a wrong passphrase; AEAD cannot tell.
        raise WrongPassphrase("the passphrase does not open this store") from exc
    return Sealer(key, random=random)


def seal_context(table: str, *key: str | int) -> bytes:
    """The associated data naming one storage location: a table and a primary key.

    Each part is framed with a type tag and its length, so no two different
    locations encode to the same bytes (``("ab", "c")`` differs from ``("a", "bc")``).

    Args:
        table: the table name.
        key: the primary key's parts, in schema order.

    Returns:
        Bytes to pass as ``context`` to :meth:`Sealer.seal` and :meth:`Sealer.open`.

    Raises:
        UsageError: a part is neither str nor int, or a str is not valid Unicode.
    """
    parts = [b"s" + _frame(_utf8(table))]
    for part in key:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise UsageError("a key part is a str or an int")
        if isinstance(part, int):
            parts.append(b"i" + _frame(str(part).encode("ascii")))
        else:
            parts.append(b"s" + _frame(_utf8(part)))
    return b"".join(parts)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # from None: the codec's message quotes the offending text, which may be
        # a passphrase.
        raise UsageError("text is not valid Unicode (lone surrogate)") from None


def _passphrase_bytes(passphrase: str) -> bytes:
    if not isinstance(passphrase, str):
        raise UsageError("a passphrase is a str (or None for no passphrase)")
    if not passphrase:
        raise UsageError("the passphrase is empty; pass None to store the key unprotected")
    # The same passphrase typed on systems that compose characters differently
    # must derive the same key (RFC 8265's OpaqueString profile also uses NFC).
    return _utf8(unicodedata.normalize("NFC", passphrase))


def _derive(secret: bytes, wrapped: WrappedKey) -> bytes:
    try:
        kek: bytes = nacl.pwhash.argon2id.kdf(
            KEY_BYTES,
            secret,
            wrapped.salt,
            opslimit=wrapped.opslimit,
            memlimit=wrapped.memlimit,
        )
    except MemoryError as exc:
        raise StorageError("not enough memory for the Argon2id key derivation") from exc
    except nacl.exceptions.CryptoError as exc:
        raise StoreCorrupt("Argon2id key derivation failed") from exc
    return kek
