"""SQL helpers of the SQLite store: quoting, transactions, savepoints, error mapping.

Invariants:

* Nothing untyped escapes: :func:`storage_errors` turns sqlite3 and sqlcipher3
  errors into :class:`~e2ee.errors.StorageError` (:class:`~e2ee.errors.StoreCorrupt`
  for a corrupt file); messages name the action, never a value.
* :func:`transaction` and :func:`savepoint` commit all or roll back all.
* Pure helpers of :mod:`e2ee.store.sqlite` (split from it to keep it readable).
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Final

import sqlcipher3.dbapi2 as _cipher_dbapi

from e2ee.errors import E2EEError, StorageError, StoreCorrupt
from e2ee.store.protocols import IdentityRecord, TrustLevel
from e2ee.store.rows import INT64_MAX as _INT64_MAX
from e2ee.store.rows import INT64_MIN as _INT64_MIN

__all__ = [
    "DB_ERRORS",
    "check_kinds",
    "identity",
    "quote",
    "rollback",
    "savepoint",
    "schema_cookie",
    "storage_errors",
    "transaction",
    "upsert_sql",
]


#: What either driver raises: the stdlib's sqlite3 (plaintext stores) or sqlcipher3
#: (encrypted stores; the same DB-API with its own exception classes).
DB_ERRORS: Final[tuple[type[Exception], ...]] = (sqlite3.Error, _cipher_dbapi.Error)


# -- helpers ---------------------------------------------------------------------------------


def identity(row: Sequence[Any]) -> IdentityRecord:
    identity_key, trust, updated_at_ms = row
    if trust not in TrustLevel.ALL:
        raise StoreCorrupt("a stored identity has an unknown trust level")
    return IdentityRecord(identity_key=identity_key, trust=trust, updated_at_ms=updated_at_ms)


_KINDS: Final = {"s": (str, "text"), "i": (int, "an int"), "b": (bytes, "bytes")}


def check_kinds(kinds: str, row: tuple[Any, ...]) -> None:
    """Refuse what a STRICT column would convert (an int into TEXT, "5" into INTEGER).

    A converted key would also no longer match the context its blob was sealed for.
    """
    for kind, value in zip(kinds, row, strict=True):
        expected, label = _KINDS[kind]
        if type(value) is not expected:
            raise StorageError(f"expected {label}, got {type(value).__name__}")
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise StorageError("an int exceeds 64 bits")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_cookie(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA schema_version").fetchone()
    return int(row[0])


@functools.lru_cache(maxsize=256)
def upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(quote(c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in columns if c != "id")
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {quote(table)} ({names}) VALUES ({marks}) "  # noqa: S608  (checked names)
        f'ON CONFLICT ("id") {action}'
    )


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` on any exception, then re-raise.

    IMMEDIATE takes the write lock up front, so a transaction never fails halfway
    because another connection wrote first.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (part of error handling: never raises)."""
    # Some errors (SQLITE_FULL, SQLITE_IOERR) already rolled back.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except DB_ERRORS:
            # Closing discards the open transaction; later calls then fail
            # as on a closed store instead of writing into a half-done one.
            conn.close()


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """One commit inside a batch: all of it or, on any exception, none of it."""
    conn.execute("SAVEPOINT bp_commit")
    try:
        yield
        conn.execute("RELEASE bp_commit")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK TO bp_commit")
                conn.execute("RELEASE bp_commit")
            except DB_ERRORS:
                # The batch's transaction is gone or broken: fail the batch.
                rollback(conn)
        raise


_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn everything but our own errors into :class:`StorageError`.

    SQLite's messages name tables, columns and constraints but never bound
    values, so they are kept. Other exceptions (binding a lone surrogate, a
    sqlite-utils complaint) may quote a value, so only their type is named;
    the original stays chained for debugging.
    """
    try:
        yield
    except E2EEError:
        raise
    except DB_ERRORS as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT_CODES:
            raise StoreCorrupt(f"cannot {action}: {exc}") from exc
        raise StorageError(f"cannot {action}: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot {action}: {exc.strerror or type(exc).__name__}") from exc
    except Exception as exc:
        raise StorageError(f"cannot {action}: {type(exc).__name__}") from exc
