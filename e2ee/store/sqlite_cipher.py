"""A store with a passphrase is one SQLCipher database; its wrapped key sits beside it.

Invariants:

* With a passphrase, every page of the database (history, full-text index,
  attachment keys, sessions, metadata) is encrypted by SQLCipher 4 (AES-256-CBC,
  HMAC-SHA512 per page), in the main file and in the WAL alike; the ``-shm``
  file holds only the WAL's index. Temporary tables and indexes stay in memory.
* SQLCipher gets a raw 256-bit key (``PRAGMA key = "x'...'"``), so it runs no
  KDF of its own: the key is :meth:`Sealer.subkey` of the data key (keyed
  BLAKE2b), and the data key is the one the passphrase unwraps. The key lives in
  a :class:`CipherKey`, whose repr hides it; no log line or exception carries it
  (SQLite's messages never quote a PRAGMA's argument).
* The database cannot hold its own wrapped key (it must be read before the
  database can be), so an encrypted store keeps it in ``<db>-keyring``, a small
  JSON file replaced atomically (temporary file, fsync, rename, fsync of the
  directory). The database's ``keyring`` table stays empty.
* Encrypting a plaintext store is crash-safe. :func:`encrypt_in_place` exports
  into ``<db>-encrypting``, fsyncs it, checks it, and only then writes the
  keyring file; the rename over the old file comes last. ``-encrypting`` and
  ``-keyring`` existing together therefore means a complete encrypted copy:
  :func:`finish_pending` (run by every open) completes the rename. Any earlier
  crash leaves the old plaintext database complete, and the next open starts
  the migration again.
* Nothing here knows the schema; :mod:`e2ee.store.sqlite` decides when to call.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
from typing import Any, Final, NoReturn, cast

import sqlcipher3.dbapi2 as _dbapi

from e2ee.errors import StorageError, StoreCorrupt, UsageError
from e2ee.store.sealing import Sealer, WrappedKey
from e2ee.store.sqlite_schema import create_private_file
from e2ee.store.sqlite_sql import DB_ERRORS

__all__ = [
    "ENCRYPTING_SUFFIX",
    "KEYRING_SUFFIX",
    "CipherKey",
    "Layout",
    "connect_encrypted",
    "encrypt_in_place",
    "finish_pending",
    "layout",
    "read_keyring_file",
    "start_encrypted",
    "write_keyring_file",
]

#: The wrapped data key of an encrypted store: ``<db>-keyring``.
KEYRING_SUFFIX: Final = "-keyring"
#: The encrypted copy a migration writes before it replaces the plaintext file.
ENCRYPTING_SUFFIX: Final = "-encrypting"
#: Format of the keyring file.
KEYRING_FILE_VERSION: Final = 1

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_PURPOSE: Final = b"bp-sqlcipher-v1"
_KEYRING_MAX_BYTES: Final = 4096
_JOURNALS: Final = ("-wal", "-shm", "-journal")
_BUSY_TIMEOUT_S: Final = 5.0
_CHUNK: Final = 1 << 20


class Layout(enum.Enum):
    """What is at a store's path."""

    NEW = "new"  # nothing yet (missing or empty file, no WAL)
    PLAIN = "plain"  # a plaintext SQLite database (today's stores without a passphrase)
    ENCRYPTED = "encrypted"  # a SQLCipher database with its keyring file


class CipherKey:
    """SQLCipher's raw page key, derived from the data key. Its bytes never reach a repr."""

    __slots__ = ("__literal",)

    def __init__(self, sealer: Sealer) -> None:
        """Derive the key from the store's data key."""
        self.__literal = "x'" + sealer.subkey(_PURPOSE).hex() + "'"

    def __repr__(self) -> str:
        return "CipherKey(<secret>)"

    def __reduce__(self) -> NoReturn:
        raise UsageError("a CipherKey is secret and cannot be pickled")

    def literal(self) -> str:
        """The key as SQLCipher's raw-key literal ``x'<64 hex digits>'``."""
        return self.__literal


def layout(path: str) -> Layout:
    """Tell a new, plaintext or encrypted store apart (reads, never writes).

    Raises:
        StoreCorrupt: the file is neither SQLite nor accompanied by a keyring file.
        OSError: the file cannot be read.
    """
    keyring = os.path.exists(path + KEYRING_SUFFIX)
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        header = b""
    if not header:
        # A database created in WAL mode can be all in its WAL until a checkpoint.
        wal = path + "-wal"
        if not (os.path.exists(wal) and os.path.getsize(wal) > 0):
            return Layout.NEW
        return Layout.ENCRYPTED if keyring else Layout.PLAIN
    if header == _SQLITE_MAGIC:
        return Layout.PLAIN
    if keyring:
        return Layout.ENCRYPTED
    raise StoreCorrupt(
        "the file is not a database (or an encrypted store whose keyring file is missing)"
    )


def connect_encrypted(
    path: str, key: CipherKey, *, rows_by_name: bool = False
) -> sqlite3.Connection:
    """Open (or create) the encrypted database at ``path`` with ``key``.

    With ``rows_by_name`` rows are sqlcipher3's ``Row`` (as :class:`sqlite3.Row`).

    The connection is typed as :class:`sqlite3.Connection`: sqlcipher3 is the
    standard module built against SQLCipher, with the same API.

    Raises:
        StoreCorrupt: the key does not open the file (a keyring file of another store).
        StorageError: the file cannot be opened.
    """
    conn = _dbapi.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        # SQLCipher logs a failed page HMAC to stderr; the typed error says enough.
        conn.execute("PRAGMA cipher_log_level = NONE")
        conn.execute(f'PRAGMA key = "{key.literal()}"')
        # Pin the file format: a later SQLCipher with other defaults still opens it.
        conn.execute("PRAGMA cipher_compatibility = 4")
        conn.execute("PRAGMA temp_store = MEMORY")
        # This build enables recursive triggers by default; the stdlib's does not.
        conn.execute("PRAGMA recursive_triggers = OFF")
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except _dbapi.DatabaseError as exc:
            raise StoreCorrupt("the keyring file does not open this database") from exc
        if rows_by_name:
            conn.row_factory = _dbapi.Row
    except BaseException:
        conn.close()
        raise
    return cast(sqlite3.Connection, conn)


def read_keyring_file(path: str) -> WrappedKey:
    """The wrapped data key of the encrypted store at ``path``.

    Raises:
        StoreCorrupt: the keyring file is missing, too large or malformed.
    """
    try:
        with open(path + KEYRING_SUFFIX, "rb") as f:
            raw = f.read(_KEYRING_MAX_BYTES + 1)
    except FileNotFoundError:
        raise StoreCorrupt("the encrypted store's keyring file is missing") from None
    except OSError as exc:
        raise StorageError(f"cannot read the keyring file: {exc.strerror}") from exc
    if len(raw) > _KEYRING_MAX_BYTES:
        raise StoreCorrupt("the keyring file is too large")
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc["format"] != KEYRING_FILE_VERSION:
            raise StoreCorrupt(f"the keyring file has unknown format {doc['format']!r}")
        wrapped = WrappedKey(
            version=_int(doc["version"]),
            method=_str(doc["method"]),
            salt=bytes.fromhex(_str(doc["salt"])),
            opslimit=_int(doc["opslimit"]),
            memlimit=_int(doc["memlimit"]),
            payload=bytes.fromhex(_str(doc["payload"])),
        )
    except StoreCorrupt:
        raise
    except (ValueError, KeyError, TypeError):
        # from None: a malformed value could be part of a key.
        raise StoreCorrupt("the keyring file is malformed") from None
    return wrapped


def write_keyring_file(path: str, wrapped: WrappedKey) -> None:
    """Replace the keyring file atomically: it holds the old wrap or the new one.

    Raises:
        OSError: the file cannot be written (nothing was replaced).
    """
    doc = {
        "format": KEYRING_FILE_VERSION,
        "version": wrapped.version,
        "method": wrapped.method,
        "salt": wrapped.salt.hex(),
        "opslimit": wrapped.opslimit,
        "memlimit": wrapped.memlimit,
        "payload": wrapped.payload.hex(),
    }
    target = path + KEYRING_SUFFIX
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(doc, sort_keys=True).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(path)


def start_encrypted(path: str, wrapped: WrappedKey) -> None:
    """Prepare a new encrypted store: clear leftovers, write the keyring, create the file.

    Raises:
        OSError: a file cannot be removed or written.
    """
    for leftover in _leftovers(path):
        _remove(leftover)
    _remove(path + KEYRING_SUFFIX)
    write_keyring_file(path, wrapped)
    create_private_file(path)


def finish_pending(path: str) -> bool:
    """Complete an encryption that stopped after its copy and keyring were durable.

    Returns:
        True if a pending rename was completed.

    Raises:
        OSError: a file cannot be removed or renamed.
    """
    tmp = path + ENCRYPTING_SUFFIX
    if not (os.path.exists(tmp) and os.path.exists(path + KEYRING_SUFFIX)):
        return False
    # A leftover journal of the old plaintext file must not be replayed into the
    # new one: SQLite ties a -wal or -journal to the path, not to the file.
    if os.path.exists(path):
        _scrub(path)
    for suffix in _JOURNALS:
        _remove(path + suffix)
    os.replace(tmp, path)
    _fsync_dir(path)
    for suffix in _JOURNALS:
        _remove(tmp + suffix)
    return True


def encrypt_in_place(path: str, key: CipherKey, wrapped: WrappedKey) -> None:
    """Encrypt the plaintext store at ``path`` (closed) under ``key``; crash-safe.

    Steps, each durable before the next: (1) remove leftovers of an earlier try,
    including a stale keyring file; (2) end the plaintext file's WAL (journal
    mode DELETE checkpoints and removes it); (3) ``sqlcipher_export`` into
    ``<db>-encrypting``, empty its ``keyring`` table, fsync; (4) check the copy
    opens with ``key``; (5) write the keyring file; (6) overwrite the old file
    with zeros and rename the copy over it (:func:`finish_pending`).

    Raises:
        StorageError: the database is in use or a step failed; the plaintext store
            is then still complete and the next open tries again.
        OSError: a file operation failed (same guarantee).
    """
    tmp = path + ENCRYPTING_SUFFIX
    _remove(path + KEYRING_SUFFIX)  # first: -keyring with -encrypting means "complete"
    _remove(path + KEYRING_SUFFIX + ".tmp")
    for leftover in _leftovers(path):
        _remove(leftover)
    _fsync_dir(path)
    create_private_file(tmp)
    conn: Any = _dbapi.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        if mode is None or str(mode[0]).lower() != "delete":
            raise StorageError("the store is in use by another connection; cannot encrypt it")
        conn.execute("ATTACH DATABASE ? AS enc KEY ?", (tmp, key.literal()))
        conn.execute("PRAGMA enc.cipher_compatibility = 4")
        conn.execute("SELECT sqlcipher_export('enc')")
        # The wrap moves to the keyring file; an encrypted store's table stays empty.
        conn.execute("DELETE FROM enc.keyring")
        conn.execute("DETACH DATABASE enc")
    except _dbapi.Error as exc:
        raise StorageError(f"cannot encrypt the store: {exc}") from exc
    finally:
        conn.close()
    _fsync_file(tmp)
    _fsync_dir(path)
    check = connect_encrypted(tmp, key)
    try:
        row = check.execute("PRAGMA quick_check").fetchone()
    except DB_ERRORS as exc:
        raise StorageError(f"the encrypted copy does not check out: {exc}") from exc
    finally:
        check.close()
    if row is None or row[0] != "ok":
        raise StorageError("the encrypted copy does not check out")
    write_keyring_file(path, wrapped)
    finish_pending(path)


# -- files ------------------------------------------------------------------------------


def _leftovers(path: str) -> list[str]:
    tmp = path + ENCRYPTING_SUFFIX
    return [tmp] + [tmp + suffix for suffix in _JOURNALS]


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scrub(path: str) -> None:
    """Overwrite a file that is about to be replaced with zeros (best effort: an SSD
    or a copy-on-write file system may keep the old blocks)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        zeros = bytes(_CHUNK)
        done = 0
        while done < size:
            done += os.write(fd, zeros[: min(_CHUNK, size - done)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an int")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a str")
    return value
