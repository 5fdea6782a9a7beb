"""Media files: chunked encryption with libsodium's secret stream (XChaCha20-Poly1305).

Invariants:

* A file is never loaded whole: it is read, encrypted, hashed and written one
  chunk (:data:`CHUNK_SIZE` bytes of plaintext) at a time, so memory stays flat
  whatever the file size.
* Ciphertext format: the 24-byte secret-stream header, then one secret-stream
  message per chunk (chunk + 17 bytes). Every chunk is authenticated; the last
  one, and only it, carries ``TAG_FINAL``, so truncation at a chunk boundary is
  detected too. The key is fresh per file (``crypto_secretstream_*_keygen``) and
  never reused.
* A decrypt writes to a temporary file next to the destination and moves it into
  place only after every chunk authenticated, the final tag was seen, nothing
  followed it, and the SHA-256 of the whole ciphertext matched the expected
  digest. On any failure the temporary file is removed and
  :class:`MediaCorrupt` is raised: no partial plaintext is left behind.
* Keys never appear in a repr, a log or an exception message.

These functions block (file I/O and crypto); the SDK runs them in
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import nacl.bindings as sodium
import nacl.exceptions

from e2ee.errors import MediaCorrupt, UsageError

__all__ = [
    "CHUNK_SIZE",
    "HEADER_BYTES",
    "KEY_BYTES",
    "EncryptedFile",
    "MediaCorrupt",
    "Progress",
    "ciphertext_size",
    "decrypt_file",
    "decrypt_to_bytes",
    "encrypt_file",
]

#: Plaintext bytes per secret-stream message.
CHUNK_SIZE: Final = 256 * 1024
#: The secret-stream header at the start of every ciphertext.
HEADER_BYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
#: Secret-stream key size.
KEY_BYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_ABYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

#: Called with (bytes done, bytes total) after every chunk.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class EncryptedFile:
    """The result of :func:`encrypt_file`.

    Attributes:
        key: the secret-stream key (secret; not in the repr).
        path: the ciphertext file (header included); the caller deletes it.
        digest: SHA-256 of the ciphertext file.
        size: ciphertext size in bytes.
        plaintext_size: size of the file that was encrypted.
    """

    key: bytes = field(repr=False)
    path: Path
    digest: bytes
    size: int
    plaintext_size: int

    def __repr__(self) -> str:
        return (
            f"EncryptedFile(path={str(self.path)!r}, digest={self.digest.hex()}, "
            f"size={self.size}, plaintext_size={self.plaintext_size}, key=<secret>)"
        )


def ciphertext_size(plaintext_size: int) -> int:
    """The ciphertext size for a plaintext of ``plaintext_size`` bytes.

    An empty file still has one (empty, final) chunk.
    """
    chunks = max(1, -(-plaintext_size // CHUNK_SIZE))
    return HEADER_BYTES + plaintext_size + chunks * _ABYTES


def _readinto_full(source: BinaryIO, buffer: bytearray) -> int:
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n = source.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    return filled


def encrypt_file(
    source: str | os.PathLike[str],
    *,
    directory: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> EncryptedFile:
    """Encrypt a file chunk by chunk into a new temporary ciphertext file.

    Args:
        source: the file to encrypt.
        directory: where to create the ciphertext file (default: the system's
            temporary directory). It is created with mode 0600.
        progress: called with (plaintext bytes done, plaintext total).

    Returns:
        The key, ciphertext path, ciphertext SHA-256 and sizes.

    Raises:
        UsageError: ``source`` cannot be read, or the ciphertext cannot be
            written (the partial ciphertext is removed).
    """
    try:
        total = os.stat(source).st_size
        src = open(source, "rb")  # noqa: SIM115  (closed below, with the output)
    except OSError as exc:
        raise UsageError(f"cannot read the file to send: {exc.strerror}") from exc
    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    digest = hashlib.sha256(header)
    fd, name = tempfile.mkstemp(prefix="bp-media-", suffix=".enc", dir=directory)
    done = 0
    written = len(header)
    try:
        with src, os.fdopen(fd, "wb") as out:
            out.write(header)
            current = bytearray(CHUNK_SIZE)
            following = bytearray(CHUNK_SIZE)
            size = _readinto_full(src, current)
            while True:
                # Read one chunk ahead: the final chunk must carry TAG_FINAL, and a
                # file can grow or shrink while we read it.
                next_size = _readinto_full(src, following) if size == CHUNK_SIZE else 0
                tag = _TAG_MESSAGE if next_size else _TAG_FINAL
                chunk = sodium.crypto_secretstream_xchacha20poly1305_push(
                    state, bytes(memoryview(current)[:size]), None, tag
                )
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                done += size
                if progress is not None:
                    progress(done, max(total, done))
                if tag == _TAG_FINAL:
                    break
                current, following, size = following, current, next_size
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(name)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write the encrypted file: {exc.strerror}") from exc
        raise
    return EncryptedFile(key, Path(name), digest.digest(), written, done)


def decrypt_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    key: bytes,
    digest: bytes,
    *,
    progress: Progress | None = None,
) -> int:
    """Verify and decrypt a ciphertext file into ``destination``.

    Args:
        source: the downloaded ciphertext file.
        destination: where the plaintext goes; replaced atomically, and only if
            everything verified.
        key: the secret-stream key from the attachment pointer.
        digest: the expected SHA-256 of the ciphertext.
        progress: called with (ciphertext bytes done, ciphertext total).

    Returns:
        The plaintext size.

    Raises:
        MediaCorrupt: a chunk does not authenticate, the stream is truncated or
            has trailing data, or the digest does not match. ``destination`` is
            left untouched and no partial output remains.
        UsageError: bad key or digest length, or a file cannot be read/written.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise UsageError(f"media key: expected {KEY_BYTES} bytes")
    if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
        raise UsageError("media digest: expected 32 bytes")
    target = Path(destination)
    try:
        total = os.stat(source).st_size
        src = open(source, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise UsageError(f"cannot read the downloaded file: {exc.strerror}") from exc
    try:
        fd, name = tempfile.mkstemp(prefix=".bp-part-", dir=target.parent or ".")
    except OSError as exc:
        src.close()
        raise UsageError(f"cannot write to {target.parent}: {exc.strerror}") from exc
    try:
        with src, os.fdopen(fd, "wb") as out:
            size = _decrypt_stream(src, out, key, digest, total, progress)
        os.replace(name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(name)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write the decrypted file: {exc.strerror}") from exc
        raise
    return size


class _Bounded(io.BytesIO):
    """An in-memory sink that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any, /) -> int:
        if self.tell() + len(data) > self.limit:
            raise _TooLarge
        return super().write(data)


class _TooLarge(Exception):
    """Raised inside :func:`decrypt_to_bytes` when the plaintext passes its limit."""


def decrypt_to_bytes(
    source: str | os.PathLike[str], key: bytes, digest: bytes, *, limit: int
) -> bytes | None:
    """Verify and decrypt a ciphertext file into memory, at most ``limit`` bytes.

    Args:
        source: the downloaded ciphertext file.
        key: the secret-stream key from the attachment pointer.
        digest: the expected SHA-256 of the ciphertext.
        limit: the largest plaintext to hold, in bytes.

    Returns:
        The plaintext, or None if it is larger than ``limit`` (decryption stops
        as soon as it passes the limit: memory stays bounded).

    Raises:
        MediaCorrupt: a chunk does not authenticate, the stream is truncated or
            has trailing data, or the digest does not match.
        UsageError: bad key or digest length, or the file cannot be read.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise UsageError(f"media key: expected {KEY_BYTES} bytes")
    if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
        raise UsageError("media digest: expected 32 bytes")
    try:
        total = os.stat(source).st_size
        src = open(source, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise UsageError(f"cannot read the downloaded file: {exc.strerror}") from exc
    if total > ciphertext_size(limit):
        src.close()
        return None
    sink = _Bounded(limit)
    try:
        with src:
            _decrypt_stream(src, sink, key, digest, total, None)
    except _TooLarge:
        return None
    return sink.getvalue()


def _decrypt_stream(
    src: BinaryIO,
    out: BinaryIO,
    key: bytes,
    expected: bytes,
    total: int,
    progress: Progress | None,
) -> int:
    hasher = hashlib.sha256()
    header = src.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES:
        raise MediaCorrupt("encrypted file: truncated header")
    hasher.update(header)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    except nacl.exceptions.CryptoError as exc:
        raise MediaCorrupt("encrypted file: bad header") from exc
    done = HEADER_BYTES
    size = 0
    buffer = bytearray(CHUNK_SIZE + _ABYTES)
    view = memoryview(buffer)
    while True:
        n = _readinto_full(src, buffer)
        if n == 0:
            raise MediaCorrupt("encrypted file: truncated (no final chunk)")
        chunk = bytes(view[:n])
        hasher.update(chunk)
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, None)
        except nacl.exceptions.CryptoError as exc:
            raise MediaCorrupt(
                f"encrypted file: chunk at byte {done} does not authenticate"
            ) from exc
        out.write(plain)
        size += len(plain)
        done += n
        if progress is not None:
            progress(done, max(total, done))
        if tag == _TAG_FINAL:
            break
        if n < len(buffer):
            raise MediaCorrupt("encrypted file: truncated (short chunk without final tag)")
    if src.read(1):
        raise MediaCorrupt("encrypted file: data after the final chunk")
    if not hmac.compare_digest(hasher.digest(), expected):
        raise MediaCorrupt("encrypted file: digest does not match")
    return size
