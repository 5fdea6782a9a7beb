"""The SQLite store's schema: migrations, and opening a file (keyring first).

Invariants:

* ``MIGRATIONS[i].version == i + 1``; append only. A store at version ``n`` is
  brought up to date by the steps after ``n``, inside the opening transaction,
  after the passphrase was checked.
* Opening never writes before the passphrase is checked: the keyring is read
  first (its layout stays readable by every later version).
* Split from :mod:`e2ee.store.sqlite` (which re-exports the public names).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from e2ee.errors import StorageError, StoreCorrupt
from e2ee.store.sealing import KdfLimits, Sealer, WrappedKey, create_key, unlock
from e2ee.store.sqlite_sql import transaction

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "create_private_file",
    "prepare",
    "probe",
    "read_keyring",
    "unlock_or_create",
    "write_keyring",
]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: brings a store from ``version - 1`` to ``version``.

    ``apply`` runs inside the opening transaction, after the passphrase was
    checked, with the store's sealer (for steps that must reseal blobs).
    """

    version: int
    summary: str
    apply: Callable[[sqlite3.Connection, Sealer], None]


_V1_SCHEMA: Final = (
    """CREATE TABLE schema_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    ) STRICT""",
    # The keyring is read before migrations run (to check the passphrase first);
    # later versions must keep this layout readable. One row.
    """CREATE TABLE keyring (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        method TEXT NOT NULL,
        salt BLOB NOT NULL,
        opslimit INTEGER NOT NULL,
        memlimit INTEGER NOT NULL,
        payload BLOB NOT NULL
    ) STRICT""",
    """CREATE TABLE account (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        registration_id INTEGER NOT NULL,
        identity_key_pair BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE prekeys (
        prekey_id INTEGER PRIMARY KEY,
        record BLOB NOT NULL
    ) STRICT""",
    """CREATE TABLE signed_prekeys (
        prekey_id INTEGER PRIMARY KEY,
        record BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL
    ) STRICT""",
    # No CHECK on trust: validate_changes guards it, and a new trust level should
    # not need a table rebuild (SQLite cannot alter a CHECK in place).
    """CREATE TABLE identities (
        name TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        identity_key BLOB NOT NULL,
        trust TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (name, device_id)
    ) STRICT, WITHOUT ROWID""",
    # Sessions and sender keys are rowid tables: their 1-3 KB records are too big
    # for WITHOUT ROWID's clustered layout to pay off.
    """CREATE TABLE sessions (
        name TEXT NOT NULL,
        device_id INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (name, device_id)
    ) STRICT""",
    """CREATE TABLE sender_keys (
        group_id TEXT NOT NULL,
        sender_name TEXT NOT NULL,
        sender_device_id INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (group_id, sender_name, sender_device_id)
    ) STRICT""",
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT, WITHOUT ROWID""",
)


def _migrate_v1(conn: sqlite3.Connection, sealer: Sealer) -> None:
    del sealer  # the initial schema has nothing to reseal
    for statement in _V1_SCHEMA:
        conn.execute(statement)


#: Every schema step, in order; ``MIGRATIONS[i].version == i + 1``. Append only:
#: a store at version ``n`` is brought up to date by running the steps after ``n``.
MIGRATIONS: tuple[Migration, ...] = (Migration(1, "initial schema", _migrate_v1),)
#: The schema version this build writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)


def create_private_file(path: str) -> None:
    """Create an empty database file readable by its owner only.

    SQLite gives the -wal and -shm files the database file's permissions.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def unlock_or_create(
    conn: sqlite3.Connection,
    passphrase: str | None,
    limits: KdfLimits,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> Sealer:
    """Check the passphrase (or create the keyring), then run the missing migrations.

    For a plaintext store, whose keyring is its own ``keyring`` table.

    Raises:
        WrongPassphrase: the passphrase does not open the keyring.
        StorageError: the file is newer than this build, or a step failed.
    """
    version, stored = probe(conn, migrations)
    # The passphrase is checked (or the key made) before anything is written, and
    # without holding a write lock while Argon2 runs.
    if stored is None:
        sealer, wrapped = create_key(passphrase, limits)
    else:
        sealer, wrapped = unlock(stored, passphrase), stored
    prepare(conn, sealer, migrations, version, stored, None if stored else wrapped)
    return sealer


def prepare(
    conn: sqlite3.Connection,
    sealer: Sealer,
    migrations: Sequence[Migration],
    version: int,
    stored: WrappedKey | None,
    new_wrap: WrappedKey | None,
    *,
    keyring_in_db: bool = True,
) -> None:
    """Set the connection's pragmas and run the missing migrations in one transaction.

    Args:
        conn: the store's connection, after the passphrase was checked.
        sealer: the unlocked data key.
        migrations: every schema step.
        version, stored: what :func:`probe` read before the passphrase was checked.
        new_wrap: the wrap to store in the ``keyring`` table (a new plaintext store).
        keyring_in_db: False for an encrypted store (its wrap lives in a file).

    Raises:
        StorageError: the file system has no WAL, the file changed meanwhile, or a
            step failed (then the file keeps its old version).
    """
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        raise StorageError("the file system does not support SQLite's WAL mode")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Overwrite deleted rows (used prekeys, old ratchet states) instead of leaving
    # their sealed bytes in free pages.
    conn.execute("PRAGMA secure_delete = ON")
    with transaction(conn):
        again, now_stored = probe(conn, migrations, keyring_in_db=keyring_in_db)
        if (again, now_stored) != (version, stored):
            raise StorageError("the store was changed by another process while opening")
        for migration in migrations[version:]:
            migration.apply(conn, sealer)
        if version < len(migrations):
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (len(migrations),),
            )
        if new_wrap is not None:
            write_keyring(conn, new_wrap)


def probe(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    keyring_in_db: bool = True,
) -> tuple[int, WrappedKey | None]:
    """Read the schema version and the keyring without writing anything.

    With ``keyring_in_db`` False (an encrypted store) the keyring is not read and
    None is returned for it.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        if tables:
            raise StorageError("the file is an SQLite database, but not a Blindpost store")
        return 0, None
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    if row is None or not isinstance(row[0], int) or row[0] < 1:
        raise StoreCorrupt("the store has no valid schema version")
    version: int = row[0]
    if version > len(migrations):
        raise StorageError(
            f"the store has schema version {version}; this build reads up to {len(migrations)}"
        )
    if not keyring_in_db:
        return version, None
    stored = read_keyring(conn)
    if stored is None:
        # Never make a fresh key here: every sealed blob would become unreadable.
        raise StoreCorrupt("the store has no keyring")
    return version, stored


def read_keyring(conn: sqlite3.Connection) -> WrappedKey | None:
    row = conn.execute(
        "SELECT version, method, salt, opslimit, memlimit, payload FROM keyring WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    version, method, salt, opslimit, memlimit, payload = row
    return WrappedKey(version, method, salt, opslimit, memlimit, payload)


def write_keyring(conn: sqlite3.Connection, wrapped: WrappedKey) -> None:
    conn.execute(
        "INSERT INTO keyring (id, version, method, salt, opslimit, memlimit, payload) "
        "VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
        "version = excluded.version, method = excluded.method, salt = excluded.salt, "
        "opslimit = excluded.opslimit, memlimit = excluded.memlimit, payload = excluded.payload",
        (
            wrapped.version,
            wrapped.method,
            wrapped.salt,
            wrapped.opslimit,
            wrapped.memlimit,
            wrapped.payload,
        ),
    )
