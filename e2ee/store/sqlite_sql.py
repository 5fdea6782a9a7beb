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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import sqlcipher3.dbapi2 as _cipher_dbapi

from e2ee.errors import E2EEError, StorageError, StoreCorrupt
from e2ee.store.protocols import Changes, IdentityRecord, TrustLevel
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
    "write_statements",
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
def upsert_sql(table: str, columns: tuple[str, ...], rows: int = 1) -> str:
    """``INSERT ... VALUES (...)`` of ``rows`` rows, each replacing the row with its id.

    Several rows in one statement: SQLite calls a virtual table's savepoint at each
    statement, and FTS5 then flushes its pending terms into a new index segment, so an
    indexed table written row by row paid one segment per row.
    """
    names = ", ".join(quote(c) for c in columns)
    marks = "(" + ", ".join("?" for _ in columns) + ")"
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in columns if c != "id")
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {quote(table)} ({names}) VALUES {', '.join([marks] * rows)} "  # noqa: S608  (checked names)
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


# -- the protocol tables' writes ----------------------------------------------------------

# (sql, kinds): the parameters' types, checked by check_kinds before any write.
# Upserts update in place; INSERT OR REPLACE would delete and reinsert the row,
# which costs twice as much for a 2 KB session record.
_PUT_ACCOUNT: Final = (
    "INSERT INTO account (id, name, device_id, registration_id, identity_key_pair, "
    "created_at_ms) VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "name = excluded.name, device_id = excluded.device_id, "
    "registration_id = excluded.registration_id, "
    "identity_key_pair = excluded.identity_key_pair, created_at_ms = excluded.created_at_ms",
    "siibi",
)
_PUT_PREKEY: Final = (
    "INSERT INTO prekeys (prekey_id, record) VALUES (?, ?) "
    "ON CONFLICT (prekey_id) DO UPDATE SET record = excluded.record",
    "ib",
)
_DELETE_PREKEY: Final = ("DELETE FROM prekeys WHERE prekey_id = ?", "i")
_PUT_SIGNED: Final = (
    "INSERT INTO signed_prekeys (prekey_id, record, created_at_ms) VALUES (?, ?, ?) "
    "ON CONFLICT (prekey_id) DO UPDATE SET "
    "record = excluded.record, created_at_ms = excluded.created_at_ms",
    "ibi",
)
_DELETE_SIGNED: Final = ("DELETE FROM signed_prekeys WHERE prekey_id = ?", "i")
_PUT_IDENTITY: Final = (
    "INSERT INTO identities (name, device_id, identity_key, trust, updated_at_ms) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, device_id) DO UPDATE SET "
    "identity_key = excluded.identity_key, trust = excluded.trust, "
    "updated_at_ms = excluded.updated_at_ms",
    "sibsi",
)
_PUT_SESSION: Final = (
    "INSERT INTO sessions (name, device_id, record) VALUES (?, ?, ?) "
    "ON CONFLICT (name, device_id) DO UPDATE SET record = excluded.record",
    "sib",
)
_DELETE_SESSION: Final = ("DELETE FROM sessions WHERE name = ? AND device_id = ?", "si")
_PUT_SENDER_KEY: Final = (
    "INSERT INTO sender_keys (group_id, sender_name, sender_device_id, record) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (group_id, sender_name, sender_device_id) "
    "DO UPDATE SET record = excluded.record",
    "ssib",
)
_DELETE_SENDER_KEY: Final = (
    "DELETE FROM sender_keys WHERE group_id = ? AND sender_name = ? AND sender_device_id = ?",
    "ssi",
)
_PUT_META: Final = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "ss",
)


def write_statements(
    changes: Changes, seal: Callable[..., bytes]
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The statements of ``changes``, checked and sealed up front (``seal(data, table,
    *key)``), so the write lock is held only for SQL.

    Order per kind is put, then delete, as in the in-memory twin.

    Raises:
        StorageError: a value of the wrong type, or a signed prekey filed under another id.
    """
    out: list[tuple[str, list[tuple[Any, ...]]]] = []

    def add(statement: tuple[str, str], rows: list[tuple[Any, ...]]) -> None:
        sql, kinds = statement
        for row in rows:
            check_kinds(kinds, row)
        out.append((sql, rows))

    if (account := changes.account) is not None:
        add(
            _PUT_ACCOUNT,
            [
                (
                    account.name,
                    account.device_id,
                    account.registration_id,
                    seal(account.identity_key_pair, "account", 1),
                    account.created_at_ms,
                )
            ],
        )
    if changes.prekeys_put:
        add(
            _PUT_PREKEY,
            [(i, seal(r, "prekeys", i)) for i, r in changes.prekeys_put.items()],
        )
    if changes.prekeys_delete:
        add(_DELETE_PREKEY, [(i,) for i in changes.prekeys_delete])
    if changes.signed_prekeys_put:
        for i, row in changes.signed_prekeys_put.items():
            if row.prekey_id != i:
                raise StorageError(f"signed prekey {i} is filed under another id")
        add(
            _PUT_SIGNED,
            [
                (i, seal(row.record, "signed_prekeys", i), row.created_at_ms)
                for i, row in changes.signed_prekeys_put.items()
            ],
        )
    if changes.signed_prekeys_delete:
        add(_DELETE_SIGNED, [(i,) for i in changes.signed_prekeys_delete])
    if changes.identities_put:
        add(
            _PUT_IDENTITY,
            [
                (a.name, a.device_id, r.identity_key, r.trust, r.updated_at_ms)
                for a, r in changes.identities_put.items()
            ],
        )
    if changes.sessions_put:
        add(
            _PUT_SESSION,
            [
                (a.name, a.device_id, seal(r, "sessions", a.name, a.device_id))
                for a, r in changes.sessions_put.items()
            ],
        )
    if changes.sessions_delete:
        add(_DELETE_SESSION, [(a.name, a.device_id) for a in changes.sessions_delete])
    if changes.sender_keys_put:
        add(
            _PUT_SENDER_KEY,
            [
                (
                    k.group_id,
                    k.sender.name,
                    k.sender.device_id,
                    seal(r, "sender_keys", k.group_id, k.sender.name, k.sender.device_id),
                )
                for k, r in changes.sender_keys_put.items()
            ],
        )
    if changes.sender_keys_delete:
        add(
            _DELETE_SENDER_KEY,
            [(k.group_id, k.sender.name, k.sender.device_id) for k in changes.sender_keys_delete],
        )
    if changes.meta_put:
        add(_PUT_META, list(changes.meta_put.items()))
    return out
