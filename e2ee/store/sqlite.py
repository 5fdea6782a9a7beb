"""The SQLite protocol store: one file holds the keys, the sessions and the SDK's rows.

Invariants:

* Same semantics as :class:`e2ee.store.memory.MemoryProtocolStore`; the
  conformance test in ``tests/store`` runs both. Where SQLite cannot hold what
  the in-memory twin accepts (see :func:`check_app_row`), the commit is refused
  with :class:`~e2ee.errors.StorageError` before anything is written; values are
  never silently converted.
* Every write is one :meth:`SQLiteProtocolStore.commit`: ``BEGIN IMMEDIATE`` ...
  ``COMMIT`` on one connection, rolled back on any error, so a commit is applied
  whole or not at all, also across a crash (WAL, ``synchronous=FULL``).
* Group commit: inside :meth:`SQLiteProtocolStore.batch`, each commit is a
  savepoint of one shared transaction (still all or nothing on its own); the
  batch becomes durable with one ``COMMIT`` (one fsync) when the block ends, and
  a block that raises leaves none of its commits. A commit returns before it is
  durable only inside a batch the caller opened; the lock is held for the whole
  block, so no other thread's commit joins or waits inside someone else's batch.
* With a passphrase the whole file is a SQLCipher database and the wrapped key
  lives in ``<db>-keyring`` (:mod:`e2ee.store.sqlite_cipher`); without one it is
  a plain SQLite file holding its own key. Both run the same SQL.
* Every secret blob (the identity key pair, prekeys, signed prekeys, sessions,
  sender keys) is sealed by :class:`~e2ee.store.sealing.Sealer` with the row's
  table and primary key as associated data; a blob moved to another row fails
  with :class:`~e2ee.errors.StoreCorrupt`. Identities, metadata and app rows are
  not sealed (in clear unless the whole file is encrypted).
* Opening never writes before the passphrase is checked: a wrong passphrase
  leaves the file byte for byte as it was. Migrations run after that, in one
  transaction, so the keyring table's layout must stay readable by every version.
* One connection guarded by one re-entrant lock: safe to call from several
  threads (the SDK calls from ``asyncio.to_thread`` workers).
* Nothing untyped escapes: sqlite3, sqlite-utils and binding errors become
  :class:`~e2ee.errors.StorageError` (:class:`~e2ee.errors.StoreCorrupt` for a
  damaged file). Messages name tables and operations, never stored values.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import sqlite_utils

from e2ee.errors import StorageError, StoreCorrupt, UsageError
from e2ee.store import sqlite_cipher as _cipher
from e2ee.store.protocols import (
    AccountRecord,
    Address,
    Changes,
    IdentityRecord,
    SenderKeyId,
    SignedPreKeyRow,
)
from e2ee.store.rows import APP_NAME as _APP_NAME
from e2ee.store.rows import BatchDepth, check_app_row, validate_changes
from e2ee.store.sealing import (
    KDF_MODERATE,
    KdfLimits,
    Sealer,
    WrappedKey,
    create_key,
    seal_context,
    unlock,
)
from e2ee.store.sqlite_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
)
from e2ee.store.sqlite_schema import (
    create_private_file as _create_private_file,
)
from e2ee.store.sqlite_schema import (
    prepare as _prepare,
)
from e2ee.store.sqlite_schema import (
    probe as _probe,
)
from e2ee.store.sqlite_schema import (
    read_keyring as _read_keyring,
)
from e2ee.store.sqlite_schema import (
    unlock_or_create as _unlock_or_create,
)
from e2ee.store.sqlite_schema import (
    write_keyring as _write_keyring,
)
from e2ee.store.sqlite_sql import (
    identity as _identity,
)
from e2ee.store.sqlite_sql import (
    quote as _quote,
)
from e2ee.store.sqlite_sql import (
    rollback as _rollback,
)
from e2ee.store.sqlite_sql import (
    savepoint as _savepoint,
)
from e2ee.store.sqlite_sql import (
    schema_cookie as _schema_cookie,
)
from e2ee.store.sqlite_sql import (
    storage_errors as _storage_errors,
)
from e2ee.store.sqlite_sql import (
    transaction as _transaction,
)
from e2ee.store.sqlite_sql import (
    upsert_sql as _upsert_sql,
)
from e2ee.store.sqlite_sql import write_statements

__all__ = [
    "APP_TABLE_PREFIX",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "SQLiteProtocolStore",
    "check_app_row",
]

#: App tables live under this prefix, so an SDK table can never collide with
#: the store's own tables (``sessions``, ``meta``...) or SQLite's ``sqlite_*``.
APP_TABLE_PREFIX: Final = "app_"

_BUSY_TIMEOUT_S: Final = 5.0
#: App rows per upsert statement, and bound parameters at most (SQLite's lowest
#: SQLITE_MAX_VARIABLE_NUMBER default is 999).
_ROWS_PER_STATEMENT: Final = 64
_VARIABLES_PER_STATEMENT: Final = 999
_MIN_SQLITE: Final = (3, 37, 0)
# Lower-case ASCII only: SQLite compares table and column names case-insensitively
# ("History" and "history" are one table), the in-memory twin does not.


class SQLiteProtocolStore:
    """A :class:`~e2ee.store.protocols.ProtocolStore` in one SQLite file.

    Create or open one with :meth:`open`; close it with :meth:`close` or use it
    as a context manager.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        sealer: Sealer,
        path: str,
        cipher_key: _cipher.CipherKey | None = None,
    ) -> None:
        """Use :meth:`open`; this wraps an already configured and migrated connection."""
        self._conn: sqlite3.Connection | None = conn
        self._db_helper: sqlite_utils.Database | None = None
        self._sealer = sealer
        self._path = path
        self._cipher_key = cipher_key
        self._lock = threading.RLock()
        self._transactions = 0
        # Open batch (group commit): nesting depth, commits made in it, and the app
        # columns its savepoints added (published to _app_columns only at COMMIT).
        self._batch = BatchDepth()
        self._batch_commits = 0
        self._batch_columns: dict[str, tuple[str, ...]] = {}
        self._batch_checked = False
        # Session and sender-key records committed in the open batch (None: deleted).
        self._batch_records: dict[tuple[str, object], bytes | None] = {}
        # Column names of app tables as last committed, valid while SQLite's
        # schema cookie is unchanged (another connection could alter a table).
        self._app_columns: dict[str, tuple[str, ...]] = {}
        self._schema_cookie = -1

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        kdf_limits: KdfLimits = KDF_MODERATE,
    ) -> SQLiteProtocolStore:
        """Open the store at ``path``, creating it (mode 0600) if it does not exist.

        With a passphrase the whole file is encrypted (SQLCipher) and the wrapped
        key is kept in ``<path>-keyring``; a plaintext store whose key is wrapped
        under a passphrase (made before encryption at rest) is encrypted in place
        first, crash-safely (see :mod:`e2ee.store.sqlite_cipher`).

        Args:
            path: the database file. Its ``-wal``, ``-shm`` (and with a passphrase
                ``-keyring``) companions live next to it.
            passphrase: protects the data key and encrypts the file. None stores the
                key unprotected in a plain SQLite file, so only file permissions
                protect the secrets.
            kdf_limits: Argon2id cost used when this call creates the key. An
                existing store uses the limits stored with its key.

        Returns:
            The open store, migrated to :data:`SCHEMA_VERSION`.

        Raises:
            WrongPassphrase: the passphrase does not open the store (or one was
                given for an unprotected store, or none for a protected one).
                The file is not changed.
            StoreCorrupt: the file is not a database, its keyring (row or file) is
                missing or damaged, or the keyring file is another store's.
            StorageError: the file cannot be opened, belongs to something else,
                was written by a newer version, Python's SQLite is older than
                3.37, or another error occurred.
            UsageError: ``path`` is ``":memory:"`` or empty, or the passphrase is empty.
        """
        where = os.fspath(path)
        if where in ("", ":memory:"):
            raise UsageError("give a file path; use MemoryProtocolStore for a store in memory")
        if passphrase == "":
            raise UsageError("the passphrase is empty; pass None to store the key unprotected")
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StorageError(
                f"SQLite {sqlite3.sqlite_version} is too old: STRICT tables need 3.37 or newer"
            )
        with _storage_errors("open the store"):
            _cipher.finish_pending(where)
            found = _cipher.layout(where)
        if found is _cipher.Layout.PLAIN or (found is _cipher.Layout.NEW and passphrase is None):
            opened = cls._open_plain(where, passphrase, kdf_limits)
            if isinstance(opened, SQLiteProtocolStore):
                return opened
            sealer, wrapped = opened
            # A plaintext store with a passphrase (made before stores were encrypted,
            # or given a passphrase since): encrypt it now, crash-safely.
            with _storage_errors("encrypt the store"):
                _cipher.encrypt_in_place(where, _cipher.CipherKey(sealer), wrapped)
        elif found is _cipher.Layout.NEW:
            sealer, wrapped = create_key(passphrase, kdf_limits)
            with _storage_errors("create the store"):
                _cipher.start_encrypted(where, wrapped)
        else:
            with _storage_errors("read the keyring file"):
                wrapped = _cipher.read_keyring_file(where)
            sealer = unlock(wrapped, passphrase)  # before the database is touched
        key = _cipher.CipherKey(sealer)
        with _storage_errors("open the store"):
            conn = _cipher.connect_encrypted(where, key)
        try:
            with _storage_errors("open the store"):
                version, _ = _probe(conn, MIGRATIONS, keyring_in_db=False)
                _prepare(conn, sealer, MIGRATIONS, version, None, None, keyring_in_db=False)
                return cls(conn, sealer, where, key)
        except BaseException:
            conn.close()
            raise

    @classmethod
    def _open_plain(
        cls, where: str, passphrase: str | None, kdf_limits: KdfLimits
    ) -> SQLiteProtocolStore | tuple[Sealer, WrappedKey]:
        """Open a plaintext store, or unlock one that is to be encrypted (then closed)."""
        with _storage_errors("open the store"):
            _create_private_file(where)
            conn = sqlite3.connect(
                where, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        try:
            with _storage_errors("open the store"):
                # MIGRATIONS is looked up here, at call time: one module-level list.
                _, stored = _probe(conn, MIGRATIONS)
                if stored is None or not stored.protected:
                    sealer = _unlock_or_create(conn, passphrase, kdf_limits, MIGRATIONS)
                    return cls(conn, sealer, where, None)
            # Checked before anything is written: a wrong passphrase changes nothing.
            sealer = unlock(stored, passphrase)
        except BaseException:
            conn.close()
            raise
        conn.close()
        return sealer, stored

    def close(self) -> None:
        """Close the connection. Idempotent; later calls raise :class:`StorageError`."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with _storage_errors("close the store"):
                    conn.close()

    def __enter__(self) -> SQLiteProtocolStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SQLiteProtocolStore(path={self._path!r}, {state})"

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def encrypted(self) -> bool:
        """True when the whole file is encrypted (SQLCipher): a store with a passphrase."""
        return self._cipher_key is not None

    def connect_reader(self) -> sqlite3.Connection:
        """A new connection on the store's file for reads (the caller closes it).

        It is keyed like the store's own (an encrypted store needs SQLCipher and the
        key), autocommit, usable from any thread, with rows readable by column name.

        Raises:
            StorageError: the store is closed or the file cannot be opened.
        """
        with self._lock:
            self._connection()
        with _storage_errors("open a read connection"):
            if self._cipher_key is None:
                conn = sqlite3.connect(
                    self._path,
                    timeout=_BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.row_factory = sqlite3.Row
                return conn
            return _cipher.connect_encrypted(self._path, self._cipher_key, rows_by_name=True)

    @property
    def transaction_count(self) -> int:
        """Write transactions committed through this object (a whole batch counts once)."""
        return self._transactions

    @property
    def in_batch(self) -> bool:
        """True inside :meth:`batch` (on the thread that holds it)."""
        return self._batch.depth > 0

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commits: every :meth:`commit` inside the block shares one transaction.

        Each commit inside stays all or nothing on its own (a savepoint): a failing
        commit is rolled back alone, raises as usual, and the batch goes on if the
        caller catches the error. Reads inside the block see the batch's commits.
        Nothing of the batch is durable before the block ends; then one ``COMMIT``
        (one fsync) makes all of it durable together. If the block raises, or the
        final ``COMMIT`` fails, every commit made in the block is rolled back.

        The store's lock is held for the whole block: other threads' reads and
        commits wait until it ends, so callers keep blocks short (a bounded number
        of commits) and must not wait inside one for a thread that uses the store.
        A nested :meth:`batch` joins the outer one.

        Raises:
            StorageError: the store is closed, or the transaction cannot be begun
                or committed (then nothing of the batch was written).
        """
        with self._lock, self._batch.level():
            if self._batch.depth > 1:
                yield  # joins the outer batch
                return
            with _storage_errors("begin a batch"):
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            self._batch_commits, self._batch_columns, self._batch_checked = 0, {}, False
            try:
                yield
                with _storage_errors("commit a batch"):
                    if not conn.in_transaction:
                        raise StorageError("the batch was rolled back by an earlier error")
                    conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            finally:
                columns, self._batch_columns = self._batch_columns, {}
                self._batch_records.clear()
            # Only after COMMIT: a rolled-back batch also rolled back its ALTERs.
            self._app_columns.update(columns)
            if self._batch_commits:
                self._transactions += 1

    # -- reads --------------------------------------------------------------------------

    def load_account(self) -> AccountRecord | None:
        """The local account, or None before one was created.

        Raises:
            StoreCorrupt: the sealed key pair does not open.
            StorageError: the store is closed or cannot be read.
        """
        row = self._one(
            "SELECT name, device_id, registration_id, identity_key_pair, created_at_ms "
            "FROM account WHERE id = 1"
        )
        if row is None:
            return None
        name, device_id, registration_id, sealed, created_at_ms = row
        return AccountRecord(
            name=name,
            device_id=device_id,
            registration_id=registration_id,
            identity_key_pair=self._unseal(sealed, "account", 1),
            created_at_ms=created_at_ms,
        )

    def load_prekey(self, prekey_id: int) -> bytes | None:
        """A one-time prekey record, or None if unknown or used.

        Raises:
            StoreCorrupt: the sealed record does not open.
            StorageError: the store is closed or cannot be read.
        """
        row = self._one("SELECT record FROM prekeys WHERE prekey_id = ?", (prekey_id,))
        return None if row is None else self._unseal(row[0], "prekeys", prekey_id)

    def prekey_ids(self) -> list[int]:
        """Ids of the one-time prekeys still held, ascending.

        Raises:
            StorageError: the store is closed or cannot be read.
        """
        return [r[0] for r in self._all("SELECT prekey_id FROM prekeys ORDER BY prekey_id")]

    def load_signed_prekey(self, prekey_id: int) -> SignedPreKeyRow | None:
        """A signed prekey row, or None.

        Raises:
            StoreCorrupt: the sealed record does not open.
            StorageError: the store is closed or cannot be read.
        """
        row = self._one(
            "SELECT prekey_id, record, created_at_ms FROM signed_prekeys WHERE prekey_id = ?",
            (prekey_id,),
        )
        return None if row is None else self._signed_row(row)

    def signed_prekeys(self) -> list[SignedPreKeyRow]:
        """All signed prekeys held, oldest first (by ``created_at_ms``, then id).

        Raises:
            StoreCorrupt: a sealed record does not open.
            StorageError: the store is closed or cannot be read.
        """
        rows = self._all(
            "SELECT prekey_id, record, created_at_ms FROM signed_prekeys "
            "ORDER BY created_at_ms, prekey_id"
        )
        return [self._signed_row(r) for r in rows]

    def load_identity(self, address: Address) -> IdentityRecord | None:
        """The identity recorded for a remote device, or None.

        Raises:
            StoreCorrupt: the stored trust level is unknown.
            StorageError: the store is closed or cannot be read.
        """
        row = self._one(
            "SELECT identity_key, trust, updated_at_ms FROM identities "
            "WHERE name = ? AND device_id = ?",
            (address.name, address.device_id),
        )
        return None if row is None else _identity(row)

    def identities(self, name: str) -> dict[Address, IdentityRecord]:
        """All identities recorded for one user's devices.

        Raises:
            StoreCorrupt: a stored trust level is unknown.
            StorageError: the store is closed or cannot be read.
        """
        rows = self._all(
            "SELECT device_id, identity_key, trust, updated_at_ms FROM identities "
            "WHERE name = ? ORDER BY device_id",
            (name,),
        )
        return {Address(name, r[0]): _identity(r[1:]) for r in rows}

    def load_session(self, address: Address) -> bytes | None:
        """A session record, or None.

        Raises:
            StoreCorrupt: the sealed record does not open.
            StorageError: the store is closed or cannot be read.
        """
        with self._lock:
            if self._batch.depth and ("sessions", address) in self._batch_records:
                return self._batch_records["sessions", address]
            row = self._one(
                "SELECT record FROM sessions WHERE name = ? AND device_id = ?",
                (address.name, address.device_id),
            )
        if row is None:
            return None
        return self._unseal(row[0], "sessions", address.name, address.device_id)

    def session_devices(self, name: str) -> list[int]:
        """Device ids of ``name`` with a stored session, ascending.

        Raises:
            StorageError: the store is closed or cannot be read.
        """
        rows = self._all(
            "SELECT device_id FROM sessions WHERE name = ? ORDER BY device_id", (name,)
        )
        return [r[0] for r in rows]

    def load_sender_key(self, key_id: SenderKeyId) -> bytes | None:
        """A sender key record, or None.

        Raises:
            StoreCorrupt: the sealed record does not open.
            StorageError: the store is closed or cannot be read.
        """
        parts = (key_id.group_id, key_id.sender.name, key_id.sender.device_id)
        with self._lock:
            if self._batch.depth and ("sender_keys", key_id) in self._batch_records:
                return self._batch_records["sender_keys", key_id]
            row = self._one(
                "SELECT record FROM sender_keys "
                "WHERE group_id = ? AND sender_name = ? AND sender_device_id = ?",
                parts,
            )
        return None if row is None else self._unseal(row[0], "sender_keys", *parts)

    def get_meta(self, key: str) -> str | None:
        """A small metadata value, or None.

        Raises:
            StorageError: the store is closed or cannot be read.
        """
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def load_app_row(self, table: str, row_id: str) -> Mapping[str, Any] | None:
        """A row written through :attr:`Changes.app_rows`, or None.

        Every column of the table is present; a column the row was not written
        with reads as None (see :func:`check_app_row`).

        Raises:
            StorageError: the store is closed or cannot be read.
        """
        if not isinstance(table, str) or not _APP_NAME.fullmatch(table):
            return None  # no such table can have been written
        name = APP_TABLE_PREFIX + table
        with self._lock, _storage_errors("read an app row"):
            conn = self._connection()
            # App tables are never dropped: one known to this connection exists.
            known = table in self._app_columns or table in self._batch_columns
            if not known and not self._app_table_exists(conn, table):
                return None
            cursor = conn.execute(
                f"SELECT * FROM {_quote(name)} WHERE id = ?",  # noqa: S608  (checked name)
                (row_id,),
            )
            found = cursor.fetchone()
            if found is None:
                return None
            return {d[0]: v for d, v in zip(cursor.description, found, strict=True)}

    def load_app_rows(self, table: str, column: str, value: str | int) -> list[Mapping[str, Any]]:
        """Every row of ``table`` whose ``column`` equals ``value``, ordered by id.

        Read on the store's own connection: inside :meth:`batch` it sees the
        batch's commits.

        Raises:
            StorageError: the store is closed or cannot be read.
        """
        if not isinstance(table, str) or not _APP_NAME.fullmatch(table):
            return []
        if not isinstance(column, str) or not _APP_NAME.fullmatch(column):
            return []
        name = APP_TABLE_PREFIX + table
        with self._lock, _storage_errors("read app rows"):
            conn = self._connection()
            known = table in self._app_columns or table in self._batch_columns
            if not known and not self._app_table_exists(conn, table):
                return []
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({_quote(name)})")]
            if column not in columns:
                return []
            cursor = conn.execute(
                f"SELECT * FROM {_quote(name)} WHERE {_quote(column)} = ? ORDER BY id",  # noqa: S608
                (value,),
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, found, strict=True)) for found in cursor.fetchall()]

    @staticmethod
    def _app_table_exists(conn: sqlite3.Connection, table: str) -> bool:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            (APP_TABLE_PREFIX + table,),
        ).fetchone()
        return found is not None

    # -- writes ---------------------------------------------------------------------------

    def commit(self, changes: Changes) -> None:
        """Apply ``changes`` in one transaction: all of it or, on any error, none of it.

        Args:
            changes: what to write; checked by
                :func:`~e2ee.store.memory.validate_changes` and
                :func:`check_app_row` before anything is written.

        Raises:
            StorageError: the changes are malformed or cannot be stored, the store
                is closed, or the write failed. Nothing was changed.
        """
        with _storage_errors("prepare the commit"):
            app_rows = validate_changes(changes)
            if changes.is_empty():
                with self._lock:
                    self._connection()
                return
            statements = write_statements(changes, self._seal)
        with self._lock, _storage_errors("commit"):
            conn = self._connection()
            if self._batch.depth:
                if not conn.in_transaction:
                    # SQLite rolled the whole batch back (SQLITE_FULL, SQLITE_IOERR): a
                    # savepoint now would begin (and commit) a transaction of its own.
                    raise StorageError("the batch was rolled back by an earlier error")
                # Columns added earlier in the batch are not published yet.
                touched = dict(self._batch_columns)
                with _savepoint(conn):
                    self._write(conn, changes, statements, app_rows, touched)
                self._batch_columns = touched
                self._batch_commits += 1
                self._remember_records(changes)
                return
            touched = {}
            with _transaction(conn):
                self._write(conn, changes, statements, app_rows, touched)
            # Only now: a rolled-back transaction also rolled back its ALTERs.
            self._app_columns.update(touched)
            self._transactions += 1

    def _remember_records(self, changes: Changes) -> None:
        """Keep a batch's committed session and sender-key records for its own reads.

        The next decrypt from the same peer reads the record this one wrote; inside
        a batch it comes from here instead of being selected and unsealed again.
        Puts first, then deletes, as the commit applied them.
        """
        records = self._batch_records
        for address, record in changes.sessions_put.items():
            records["sessions", address] = record
        for address in changes.sessions_delete:
            records["sessions", address] = None
        for key_id, record in changes.sender_keys_put.items():
            records["sender_keys", key_id] = record
        for key_id in changes.sender_keys_delete:
            records["sender_keys", key_id] = None

    def _write(
        self,
        conn: sqlite3.Connection,
        changes: Changes,
        statements: list[tuple[str, list[tuple[Any, ...]]]],
        app_rows: Sequence[tuple[str, dict[str, Any]]],
        touched: dict[str, tuple[str, ...]],
    ) -> None:
        """The SQL of one commit, inside a transaction or savepoint the caller opened."""
        for sql, params in statements:
            conn.executemany(sql, params)
        if app_rows:
            # Inside a batch the schema cannot change under us after the first
            # check: this connection holds the write lock until the batch ends.
            if not self._batch.depth or not self._batch_checked:
                self._check_schema_cookie(conn)
                self._batch_checked = bool(self._batch.depth)
            altered = False
            by_table: dict[str, list[dict[str, Any]]] = {}
            for table, row in app_rows:
                by_table.setdefault(table, []).append(row)
            for table, rows in by_table.items():
                altered = self._put_app_rows(conn, table, rows, touched) or altered
            if altered:
                self._schema_cookie = _schema_cookie(conn)
        for table, row_id in sorted(changes.app_rows_delete):
            if self._app_table_exists(conn, table):
                conn.execute(
                    f"DELETE FROM {_quote(APP_TABLE_PREFIX + table)} WHERE id = ?",  # noqa: S608
                    (row_id,),
                )

    def change_passphrase(
        self, old: str | None, new: str | None, *, kdf_limits: KdfLimits = KDF_MODERATE
    ) -> None:
        """Add, change or remove the passphrase. Only the data key is rewrapped.

        An encrypted store keeps its file and its database key: the wrap in its
        keyring file is replaced atomically (removing the passphrase leaves the
        file encrypted, with the key unprotected beside it). A plaintext store
        given a passphrase stores the new wrap in its ``keyring`` table and is
        encrypted by the next :meth:`open`.

        Args:
            old: the current passphrase, or None if the store has none.
            new: the new passphrase, or None to store the key unprotected.
            kdf_limits: Argon2id cost for the new wrap.

        Raises:
            WrongPassphrase: ``old`` does not open the store. Nothing was changed.
            StoreCorrupt: the stored key is not the one this store was opened with.
            StorageError: the store is closed, the keyring changed meanwhile, or
                the write failed. Nothing was changed.
            UsageError: a passphrase is empty.
        """
        if new == "":
            raise UsageError("the passphrase is empty; pass None to store the key unprotected")
        if self._cipher_key is not None:
            self._change_keyring_file(old, new, kdf_limits)
            return
        with self._lock, _storage_errors("read the keyring"):
            stored = _read_keyring(self._connection())
        if stored is None:
            raise StoreCorrupt("the store has no keyring")
        # Argon2 runs without the lock, so other threads keep using the store.
        if not unlock(stored, old).same_key(self._sealer):
            raise StoreCorrupt("the keyring holds another key than the one in use")
        wrapped = self._sealer.wrap_key(new, kdf_limits)
        with self._lock, _storage_errors("change the passphrase"):
            conn = self._connection()
            with _transaction(conn):
                if _read_keyring(conn) != stored:
                    raise StorageError("the keyring changed meanwhile; try again")
                _write_keyring(conn, wrapped)

    def _change_keyring_file(self, old: str | None, new: str | None, limits: KdfLimits) -> None:
        """Rewrap the data key of an encrypted store in its keyring file (atomically)."""
        with self._lock, _storage_errors("read the keyring file"):
            self._connection()
            stored = _cipher.read_keyring_file(self._path)
        if not unlock(stored, old).same_key(self._sealer):
            raise StoreCorrupt("the keyring holds another key than the one in use")
        wrapped = self._sealer.wrap_key(new, limits)
        with self._lock, _storage_errors("change the passphrase"):
            self._connection()
            if _cipher.read_keyring_file(self._path) != stored:
                raise StorageError("the keyring changed meanwhile; try again")
            _cipher.write_keyring_file(self._path, wrapped)

    # -- backup and restore -----------------------------------------------------------------

    def snapshot_to(self, path: str | os.PathLike[str]) -> None:
        """Copy the whole database, as of one moment, into a new file at ``path`` (mode 0600).

        The one way a backup reads the store (SQLite's online backup API on this store's own
        connection, so every committed row is in it and no half-written transaction is). The
        copy holds the same sealed secrets, opened by the same passphrase; a store encrypted
        at rest is copied encrypted under the same key, with its keyring file beside it
        (``path`` + :data:`~e2ee.store.sqlite_cipher.KEYRING_SUFFIX`), so no plaintext page
        is ever written.

        Args:
            path: a file that does not exist yet.

        Raises:
            StorageError: the store is closed, ``path`` exists, or the copy failed (the
                partial files are removed).
        """
        where = os.fspath(path)
        keyring = where + _cipher.KEYRING_SUFFIX
        with self._lock, _storage_errors("snapshot the store"):
            conn = self._connection()
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            try:
                if self._cipher_key is None:
                    target = sqlite3.connect(where)
                else:
                    target = _cipher.connect_encrypted(where, self._cipher_key)
                    _cipher.write_keyring_file(where, _cipher.read_keyring_file(self._path))
                try:
                    conn.backup(target)
                finally:
                    target.close()
            except BaseException:
                for leftover in (where, keyring):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
                raise

    def drop_ratchet_state(self) -> None:
        """Delete every session, sender key, one-time and signed prekey, in one transaction.

        For a store restored from a backup: its ratchet state may be older than what its
        contacts hold, and using it could repeat message keys (docs/protocol.md, "Backup
        and restore"). The identity key, trust, contacts and history stay.

        Raises:
            StorageError: the store is closed or the write failed (nothing was changed).
        """
        with self._lock, _storage_errors("drop the ratchet state"):
            conn = self._connection()
            with _transaction(conn):
                for table in ("sessions", "sender_keys", "prekeys", "signed_prekeys"):
                    conn.execute(f"DELETE FROM {table}")  # noqa: S608  (fixed names)
            self._transactions += 1

    # -- internals --------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite_utils.Database:
        # sqlite-utils only creates app tables and columns; imported on first use, as
        # it costs a tenth of a second that reading a store does not need.
        if self._db_helper is None:
            import sqlite_utils

            # recursive_triggers and plugins: nothing of ours needs them, and plugins
            # would run foreign code on a connection that holds secrets.
            self._db_helper = sqlite_utils.Database(
                self._connection(), recursive_triggers=False, execute_plugins=False
            )
        return self._db_helper

    def _check_schema_cookie(self, conn: sqlite3.Connection) -> None:
        cookie = _schema_cookie(conn)
        if cookie != self._schema_cookie:
            self._app_columns.clear()
            self._schema_cookie = cookie

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("the store is closed")
        return self._conn

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock, _storage_errors("read"):
            row: tuple[Any, ...] | None = self._connection().execute(sql, params).fetchone()
            return row

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _storage_errors("read"):
            rows: list[tuple[Any, ...]] = self._connection().execute(sql, params).fetchall()
            return rows

    def _seal(self, data: bytes, table: str, *key: str | int) -> bytes:
        if not isinstance(data, bytes):
            raise StorageError(f"a {table} record must be bytes")
        try:
            return self._sealer.seal(data, seal_context(table, *key))
        except UsageError as exc:
            raise StorageError(f"a {table} key cannot be stored") from exc

    def _unseal(self, blob: object, table: str, *key: str | int) -> bytes:
        if not isinstance(blob, bytes):
            raise StoreCorrupt(f"a {table} record is not a sealed blob")
        try:
            return self._sealer.open(blob, seal_context(table, *key))
        except StoreCorrupt as exc:
            where = ", ".join(str(k) for k in key)
            raise StoreCorrupt(f"sealed {table} record ({where}) does not open") from exc
        except UsageError as exc:
            raise StoreCorrupt(f"a {table} key cannot be read") from exc

    def _signed_row(self, row: tuple[Any, ...]) -> SignedPreKeyRow:
        prekey_id, sealed, created_at_ms = row
        return SignedPreKeyRow(
            prekey_id=prekey_id,
            record=self._unseal(sealed, "signed_prekeys", prekey_id),
            created_at_ms=created_at_ms,
        )

    def _put_app_rows(
        self,
        conn: sqlite3.Connection,
        table: str,
        rows: Sequence[dict[str, Any]],
        touched: dict[str, tuple[str, ...]],
    ) -> bool:
        """Upsert one table's rows of a commit, in order; True if a table or column was added.

        Several rows go in one statement (:func:`~e2ee.store.sqlite_sql.upsert_sql`); a row
        whose id is already in the statement starts the next one, so a later row with the
        same id still replaces the earlier one, as row by row.
        """
        # sqlite-utils makes the table and its columns; upsert(alter=True) is not
        # used for two reasons. It types a new column from its first value, and
        # SQLite's type affinity then converts later values ("007" becomes 7 in an
        # INTEGER column); STRICT tables with ANY columns keep every value as
        # written. And its per-call introspection cost about 0.3 ms a row, a third
        # of the per-message budget; the statement below is cached per column set.
        name = APP_TABLE_PREFIX + table
        columns = touched.get(table) or self._app_columns.get(table)
        if columns is None:
            columns = tuple(
                r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (name,))
            )
        created = not columns
        if created:
            self._db.table(name).create({"id": str}, pk="id", strict=True)
            columns = ("id",)
        missing = tuple(dict.fromkeys(c for row in rows for c in row if c not in columns))
        for column in missing:
            self._db.table(name).add_column(column, "ANY")
        columns += missing
        touched[table] = columns
        # Replace, not merge, as in the in-memory twin: columns a row leaves out are
        # cleared.
        per_statement = max(1, min(_ROWS_PER_STATEMENT, _VARIABLES_PER_STATEMENT // len(columns)))
        chunk: list[dict[str, Any]] = []
        ids: set[Any] = set()
        for row in [*rows, None]:
            if chunk and (row is None or row["id"] in ids or len(chunk) >= per_statement):
                conn.execute(
                    _upsert_sql(name, columns, len(chunk)),
                    [r.get(c) for r in chunk for c in columns],
                )
                chunk, ids = [], set()
            if row is not None:
                chunk.append(row)
                ids.add(row["id"])
        return created or bool(missing)


# -- opening ------------------------------------------------------------------------------
