"""What only the SQLite store promises: persistence, encryption at rest, crash safety.

The shared behaviour lives in ``test_store_conformance.py``; this file covers the
file itself: what is (and is not) in its bytes, the passphrase, migrations,
blobs moved between rows, a process killed mid-commit, and typed errors.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.pwhash.argon2id
import pytest

from e2ee.errors import StorageError, StoreCorrupt, UsageError, WrongPassphrase
from e2ee.store import sqlite as sqlite_module
from e2ee.store import sqlite_cipher
from e2ee.store.protocols import (
    AccountRecord,
    Address,
    Changes,
    IdentityRecord,
    SenderKeyId,
    SignedPreKeyRow,
    TrustLevel,
)
from e2ee.store.sealing import KDF_MINIMUM, KdfLimits, Sealer, unlock
from e2ee.store.sqlite import SCHEMA_VERSION, Migration, SQLiteProtocolStore

REPO = Path(__file__).resolve().parents[2]
BOB = Address("bob", 2)
CAROL = Address("carol", 1)
GROUP_KEY = SenderKeyId("team", BOB)


def open_store(path: Path, passphrase: str | None = "pass") -> SQLiteProtocolStore:
    return SQLiteProtocolStore.open(path, passphrase, kdf_limits=KDF_MINIMUM)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteProtocolStore]:
    opened = open_store(db)
    try:
        yield opened
    finally:
        opened.close()


def marker(label: str) -> bytes:
    """A recognisable 48-byte secret: its bytes cannot occur by chance."""
    return hashlib.sha384(label.encode()).digest()


SECRETS = {
    name: marker(name)
    for name in ("identity_key_pair", "prekey", "signed_prekey", "session", "sender_key")
}
PUBLIC_IDENTITY = b"\x05" + marker("public identity")[:32]


def secret_changes() -> Changes:
    return Changes(
        account=AccountRecord("me", 1, 4242, SECRETS["identity_key_pair"], 1),
        prekeys_put={7: SECRETS["prekey"]},
        signed_prekeys_put={3: SignedPreKeyRow(3, SECRETS["signed_prekey"], 2)},
        sessions_put={BOB: SECRETS["session"]},
        sender_keys_put={GROUP_KEY: SECRETS["sender_key"]},
        identities_put={BOB: IdentityRecord(PUBLIC_IDENTITY, TrustLevel.VERIFIED, 3)},
        meta_put={"next_prekey_id": "8"},
        app_rows=(("messages", {"id": "m1", "body": "hello"}),),
    )


def file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))


def companions(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def fingerprint(db: Path) -> dict[str, str]:
    """The store's data files and a hash of their bytes.

    The -shm file is left out while it exists: it is SQLite's shared-memory index
    of the WAL, rewritten by readers too and rebuilt from the WAL when missing.
    """
    data, wal, shm = companions(db)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (data, wal) if p.exists()
    } | {"shm exists": str(shm.exists())}


def raw(db: Path, passphrase: str | None = "pass") -> sqlite3.Connection:
    """A connection of its own, playing someone who edits the file behind the store's back.

    An encrypted store (one with a passphrase) opens only with its key: this
    someone knows the passphrase, to test what the store checks beyond SQLCipher.
    """
    if sqlite_cipher.layout(str(db)) is not sqlite_cipher.Layout.ENCRYPTED:
        return sqlite3.connect(db, isolation_level=None)
    sealer = unlock(sqlite_cipher.read_keyring_file(str(db)), passphrase)
    return sqlite_cipher.connect_encrypted(str(db), sqlite_cipher.CipherKey(sealer))


def keyring_file(db: Path) -> Path:
    return db.with_name(db.name + sqlite_cipher.KEYRING_SUFFIX)


# -- persistence --------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(db: Path) -> None:
    with open_store(db) as store:
        store.commit(secret_changes())
    with open_store(db) as store:
        account = store.load_account()
        assert account is not None
        assert account.identity_key_pair == SECRETS["identity_key_pair"]
        assert account.registration_id == 4242
        assert store.load_prekey(7) == SECRETS["prekey"]
        assert store.load_signed_prekey(3) == SignedPreKeyRow(3, SECRETS["signed_prekey"], 2)
        assert store.load_session(BOB) == SECRETS["session"]
        assert store.load_sender_key(GROUP_KEY) == SECRETS["sender_key"]
        assert store.load_identity(BOB) == IdentityRecord(PUBLIC_IDENTITY, TrustLevel.VERIFIED, 3)
        assert store.get_meta("next_prekey_id") == "8"
        assert store.load_app_row("messages", "m1") == {"id": "m1", "body": "hello"}


def test_files_are_private_to_the_owner(db: Path, store: SQLiteProtocolStore) -> None:
    store.commit(secret_changes())
    for path in [*companions(db), keyring_file(db)]:
        assert path.exists()
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name


# -- encryption at rest ------------------------------------------------------------------


@pytest.mark.parametrize("passphrase", ["pass", None], ids=["passphrase", "unprotected"])
def test_secrets_never_reach_the_files_in_clear(db: Path, passphrase: str | None) -> None:
    store = open_store(db, passphrase)
    store.commit(secret_changes())
    # Overwrite once so the WAL also holds an older version of each row.
    store.commit(replace(secret_changes(), app_rows=()))
    while_open = file_bytes(db)
    store.close()
    after_close = file_bytes(db)
    for content in (while_open, after_close):
        if passphrase is None:
            assert PUBLIC_IDENTITY in content  # identities are in clear: the scan sees rows
        else:
            # The whole file is encrypted: not even the clear columns or app rows show.
            assert PUBLIC_IDENTITY not in content
            assert b"hello" not in content
            assert b"next_prekey_id" not in content
            assert b"SQLite format 3" not in content
        for name, secret in SECRETS.items():
            assert secret not in content, f"{name} found in clear"
            assert secret[:16] not in content, f"part of {name} found in clear"


def test_without_passphrase_the_data_key_is_stored_labelled(db: Path) -> None:
    open_store(db, None).close()
    with raw(db) as conn:
        method, payload = conn.execute("SELECT method, payload FROM keyring").fetchone()
    assert method == "unprotected"
    assert len(payload) == 32


# -- passphrase ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created_with", "opened_with"),
    [
        ("correct horse", "zebra-42"),
        ("correct horse", None),
        (None, "zebra-42"),
        ("correct horse", "Correct horse"),
        ("correct horse", "correct horse "),
    ],
)
def test_a_wrong_passphrase_changes_no_byte(
    db: Path, created_with: str | None, opened_with: str | None
) -> None:
    with open_store(db, created_with) as store:
        store.commit(secret_changes())
    before = fingerprint(db)
    with pytest.raises(WrongPassphrase) as caught:
        open_store(db, opened_with)
    assert fingerprint(db) == before
    if opened_with:
        assert opened_with not in str(caught.value)


def test_a_wrong_passphrase_on_an_older_schema_does_not_migrate(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_store(db).close()
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, add_notes))
    before = fingerprint(db)
    with pytest.raises(WrongPassphrase):
        open_store(db, "wrong")
    assert fingerprint(db) == before


def test_passphrase_can_be_changed_added_and_removed(db: Path) -> None:
    with open_store(db, "one") as store:
        store.commit(secret_changes())
        store.change_passphrase("one", "two", kdf_limits=KDF_MINIMUM)
        assert store.load_session(BOB) == SECRETS["session"]
    with pytest.raises(WrongPassphrase):
        open_store(db, "one")
    with open_store(db, "two") as store:
        store.change_passphrase("two", None, kdf_limits=KDF_MINIMUM)
    with open_store(db, None) as store:
        assert store.load_session(BOB) == SECRETS["session"]
        store.change_passphrase(None, "three", kdf_limits=KdfLimits(2, 16 * 1024))
    with pytest.raises(WrongPassphrase):
        open_store(db, None)
    with open_store(db, "three") as store:
        assert store.load_session(BOB) == SECRETS["session"]
    wrapped = sqlite_cipher.read_keyring_file(str(db))
    assert (wrapped.opslimit, wrapped.memlimit) == (2, 16384)


def test_a_passphrase_added_to_a_plaintext_store_encrypts_it_on_the_next_open(db: Path) -> None:
    with open_store(db, None) as store:
        store.commit(secret_changes())
        store.change_passphrase(None, "new", kdf_limits=KDF_MINIMUM)
    assert b"hello" in file_bytes(db)  # still plaintext until it is opened again
    with pytest.raises(WrongPassphrase):
        open_store(db, None)
    with open_store(db, "new") as store:
        assert store.encrypted
        assert store.load_app_row("messages", "m1") == {"id": "m1", "body": "hello"}
    assert b"hello" not in file_bytes(db)


def test_changing_the_passphrase_rewraps_the_key_only(db: Path, store: SQLiteProtocolStore) -> None:
    store.commit(secret_changes())
    with raw(db) as conn:
        before = conn.execute("SELECT record FROM sessions").fetchall()
    files_before = fingerprint(db)
    key_before = keyring_file(db).read_bytes()
    store.change_passphrase("pass", "new", kdf_limits=KDF_MINIMUM)
    assert fingerprint(db) == files_before  # the database itself is not rewritten
    assert keyring_file(db).read_bytes() != key_before
    with raw(db, "new") as conn:
        assert conn.execute("SELECT record FROM sessions").fetchall() == before


def test_changing_the_passphrase_of_a_plaintext_store_rewraps_in_place(db: Path) -> None:
    with open_store(db, None) as store:
        store.commit(secret_changes())
        with raw(db) as conn:
            before = conn.execute("SELECT record FROM sessions").fetchall()
        store.change_passphrase(None, "new", kdf_limits=KDF_MINIMUM)
        with raw(db) as conn:
            assert conn.execute("SELECT record FROM sessions").fetchall() == before
            assert conn.execute("SELECT method FROM keyring").fetchone() == ("argon2id",)


def test_changing_the_passphrase_needs_the_old_one(db: Path, store: SQLiteProtocolStore) -> None:
    store.commit(secret_changes())
    before = fingerprint(db)
    with pytest.raises(WrongPassphrase):
        store.change_passphrase("not it", "new", kdf_limits=KDF_MINIMUM)
    with pytest.raises(WrongPassphrase):
        store.change_passphrase(None, "new", kdf_limits=KDF_MINIMUM)
    with pytest.raises(UsageError):
        store.change_passphrase("pass", "", kdf_limits=KDF_MINIMUM)
    assert fingerprint(db) == before
    store.close()
    open_store(db, "pass").close()


# -- sealed blobs are bound to their row ----------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "read"),
    [
        (
            "UPDATE sessions SET record = (SELECT record FROM sessions WHERE name = 'bob') "
            "WHERE name = 'carol'",
            lambda s: s.load_session(CAROL),
        ),
        (
            "UPDATE sessions SET name = 'dave', device_id = 1 WHERE name = 'bob'",
            lambda s: s.load_session(Address("dave", 1)),
        ),
        (
            "UPDATE prekeys SET record = (SELECT record FROM prekeys WHERE prekey_id = 7) "
            "WHERE prekey_id = 8",
            lambda s: s.load_prekey(8),
        ),
        (
            "UPDATE account SET identity_key_pair = (SELECT record FROM prekeys WHERE "
            "prekey_id = 7)",
            lambda s: s.load_account(),
        ),
        (
            "UPDATE sender_keys SET group_id = 'other'",
            lambda s: s.load_sender_key(SenderKeyId("other", BOB)),
        ),
        (
            "UPDATE signed_prekeys SET prekey_id = 4",
            lambda s: s.signed_prekeys(),
        ),
    ],
    ids=[
        "copied-session",
        "renamed-session",
        "copied-prekey",
        "swapped-account",
        "group",
        "signed",
    ],
)
def test_a_blob_moved_to_another_row_is_detected(
    db: Path, store: SQLiteProtocolStore, sql: str, read: Any
) -> None:
    store.commit(secret_changes())
    store.commit(Changes(sessions_put={CAROL: b"carol"}, prekeys_put={8: b"eight"}))
    with raw(db) as conn:
        conn.execute(sql)
    with pytest.raises(StoreCorrupt):
        read(store)


@pytest.mark.parametrize("position", [0, 1, 30, -1], ids=["version", "nonce", "body", "tag"])
def test_a_tampered_blob_is_detected(db: Path, store: SQLiteProtocolStore, position: int) -> None:
    store.commit(secret_changes())
    with raw(db) as conn:
        (blob,) = conn.execute("SELECT record FROM sessions").fetchone()
        spoiled = bytearray(blob)
        spoiled[position] ^= 0x01
        conn.execute("UPDATE sessions SET record = ?", (bytes(spoiled),))
    with pytest.raises(StoreCorrupt) as caught:
        store.load_session(BOB)
    assert SECRETS["session"].hex() not in str(caught.value)


# -- crash safety ---------------------------------------------------------------------------

# Each commit writes many rows: a store that did not wrap a commit in one
# transaction would fsync after every statement, and a kill would almost always
# land between two of them (checked by hand: 6 kills out of 6 found a torn state).
CHILD = textwrap.dedent(
    """
    import sys
    from e2ee.store.protocols import Address, Changes
    from e2ee.store.sealing import KDF_MINIMUM
    from e2ee.store.sqlite import SQLiteProtocolStore

    store = SQLiteProtocolStore.open(sys.argv[1], "kill", kdf_limits=KDF_MINIMUM)
    start = i = int(store.get_meta("n") or 0)
    while True:
        i += 1
        blob = i.to_bytes(8, "big") * 256
        store.commit(Changes(
            sessions_put={Address(f"peer{p}", 1): blob for p in range(8)},
            prekeys_put={8 * i + p: blob[:64] for p in range(8)},
            meta_put={"n": str(i)},
            app_rows=tuple(("messages", {"id": f"{i}.{p}", "n": i}) for p in range(4)),
        ))
        if i == start + 5:
            print("ready", flush=True)
    """
)


def kill_child_when_ready(source: str, db: Path, tmp_path: Path, round_: int) -> None:
    """Run ``source`` on ``db`` until it prints "ready", then SIGKILL it a moment later."""
    script = tmp_path / "child.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(db)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.003 * round_)  # land the kill at a different point each round
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_process_killed_mid_commit_leaves_only_whole_commits(db: Path, tmp_path: Path) -> None:
    seen = 0
    for round_ in range(3):
        kill_child_when_ready(CHILD, db, tmp_path, round_)
        with SQLiteProtocolStore.open(db, "kill") as store:
            n = int(store.get_meta("n") or 0)
            assert n >= seen + 5
            blob = n.to_bytes(8, "big") * 256
            for p in range(8):
                assert store.load_session(Address(f"peer{p}", 1)) == blob
            assert store.prekey_ids() == list(range(8, 8 * n + 8))
            assert store.load_prekey(8 * n + 7) == blob[:64]
            for p in range(4):
                assert store.load_app_row("messages", f"{n}.{p}") == {"id": f"{n}.{p}", "n": n}
            assert store.load_app_row("messages", f"{n + 1}.0") is None
            seen = n


BATCH_CHILD = textwrap.dedent(
    """
    import sys
    from e2ee.store.protocols import Address, Changes
    from e2ee.store.sealing import KDF_MINIMUM
    from e2ee.store.sqlite import SQLiteProtocolStore

    store = SQLiteProtocolStore.open(sys.argv[1], "kill", kdf_limits=KDF_MINIMUM)
    start = batch = int(store.get_meta("batch") or 0)
    while True:
        batch += 1
        with store.batch():
            for i in range(10):
                store.commit(Changes(
                    sessions_put={Address("peer", 1): f"{batch}.{i}".encode()},
                    meta_put={"batch": str(batch), "step": str(i)},
                    app_rows=(("messages", {"id": f"{batch}.{i}", "batch": batch}),),
                ))
        if batch == start + 3:
            print("ready", flush=True)
    """
)


def test_a_process_killed_mid_batch_leaves_only_whole_batches(db: Path, tmp_path: Path) -> None:
    for round_ in range(3):
        kill_child_when_ready(BATCH_CHILD, db, tmp_path, round_)
        with SQLiteProtocolStore.open(db, "kill") as store:
            batch = int(store.get_meta("batch") or 0)
            assert batch >= 3
            assert store.get_meta("step") == "9"  # never part of a batch
            assert store.load_session(Address("peer", 1)) == f"{batch}.9".encode()
            for i in range(10):
                assert store.load_app_row("messages", f"{batch}.{i}") is not None
            assert store.load_app_row("messages", f"{batch + 1}.0") is None


def test_a_batch_is_one_transaction(store: SQLiteProtocolStore) -> None:
    with store.batch():
        for i in range(5):
            store.commit(Changes(meta_put={"i": str(i)}))
    assert store.transaction_count == 1
    with store.batch():
        pass  # nothing committed: no transaction counted
    assert store.transaction_count == 1


# -- atomicity inside SQLite -------------------------------------------------------------------


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with raw(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables
        }


def test_every_interruption_point_leaves_all_or_nothing(
    db: Path, store: SQLiteProtocolStore
) -> None:
    """Abort the commit's SQL after every N virtual-machine steps, for growing N."""
    store.commit(secret_changes())
    update = Changes(
        sessions_put={BOB: b"new session", CAROL: b"carol"},
        prekeys_delete=frozenset({7}),
        meta_put={"next_prekey_id": "9"},
        app_rows=(
            ("messages", {"id": "m1", "body": "edited", "extra": 1}),
            ("threads", {"id": "t1", "title": "new table"}),
        ),
    )
    before = dump(db)
    conn = store._connection()
    outcomes = set()
    for steps in range(1, 4000, 7):
        budget = [steps]

        def abort(budget: list[int] = budget) -> int:
            budget[0] -= 1
            return 1 if budget[0] == 0 else 0  # one fault, then let ROLLBACK run

        conn.set_progress_handler(abort, 1)
        try:
            store.commit(update)
        except StorageError:
            outcomes.add("rolled back")
            assert dump(db) == before
            continue
        finally:
            conn.set_progress_handler(None, 1)
        outcomes.add("committed")
        assert store.load_session(CAROL) == b"carol"
        assert store.load_app_row("threads", "t1") == {"id": "t1", "title": "new table"}
        assert store.prekey_ids() == []
        break
    assert outcomes == {"rolled back", "committed"}


def test_a_row_failing_while_written_rolls_back_the_whole_commit(
    db: Path, store: SQLiteProtocolStore
) -> None:
    store.commit(secret_changes())
    before = dump(db)
    count = store.transaction_count
    bad = Changes(
        sessions_put={BOB: b"replaced"},
        app_rows=(
            ("threads", {"id": "t", "title": "made a new table"}),
            ("messages", {"id": "m2", "body": "\ud800", "new_column": 1}),  # lone surrogate
        ),
    )
    with pytest.raises(StorageError) as caught:
        store.commit(bad)
    assert "\ud800" not in str(caught.value)
    assert dump(db) == before
    assert store.transaction_count == count
    assert store.load_app_row("threads", "t") is None
    # The rolled-back ALTER TABLE must not linger in the store's column cache.
    store.commit(Changes(app_rows=(("messages", {"id": "m3", "new_column": 3}),)))
    assert store.load_app_row("messages", "m3") == {"id": "m3", "body": None, "new_column": 3}


def test_one_commit_is_one_transaction(store: SQLiteProtocolStore) -> None:
    assert store.transaction_count == 0
    store.commit(secret_changes())
    assert store.transaction_count == 1
    store.commit(Changes())
    assert store.transaction_count == 1


@pytest.mark.parametrize(
    "changes",
    [
        Changes(meta_put={"k": 5}),  # type: ignore[dict-item]
        Changes(prekeys_put={"5": b"pk"}),  # type: ignore[dict-item]
        Changes(prekeys_put={True: b"pk"}),
        Changes(sessions_put={Address(7, 1): b"s"}),  # type: ignore[arg-type]
        Changes(sessions_put={Address("bob", "1"): b"s"}),  # type: ignore[arg-type]
        Changes(sessions_put={BOB: "text"}),  # type: ignore[dict-item]
        Changes(identities_put={BOB: IdentityRecord("key")}),  # type: ignore[arg-type]
        Changes(prekeys_put={2**64: b"pk"}),
        Changes(signed_prekeys_put={1: SignedPreKeyRow(2, b"filed under 1", 0)}),
    ],
    ids=[
        "int-meta",
        "str-prekey-id",
        "bool-prekey-id",
        "int-name",
        "str-device",
        "str-record",
        "str-identity-key",
        "huge-id",
        "misfiled-signed",
    ],
)
def test_fields_sqlite_would_convert_are_refused(
    db: Path, store: SQLiteProtocolStore, changes: Changes
) -> None:
    store.commit(secret_changes())
    before = dump(db)
    with pytest.raises(StorageError):
        store.commit(replace(changes, app_rows=(("messages", {"id": "m9"}),)))
    assert dump(db) == before


# -- app rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "row"),
    [
        ("messages", {"id": "1", "flag": True}),
        ("messages", {"id": "1", "tags": ["a"]}),
        ("messages", {"id": "1", "meta": {"a": 1}}),
        ("messages", {"id": "1", "x": float("nan")}),
        ("messages", {"id": "1", "x": 2**63}),
        ("messages", {"id": 1}),
        ("messages", {"id": "1", "Body": "x"}),
        ("messages", {"id": "1", "has space": "x"}),
        ("Messages", {"id": "1"}),
    ],
    ids=[
        "bool",
        "list",
        "dict",
        "nan",
        "int65",
        "int-id",
        "upper-column",
        "space-column",
        "upper-table",
    ],
)
def test_app_rows_sqlite_cannot_hold_exactly_are_refused(
    db: Path, store: SQLiteProtocolStore, table: str, row: dict[str, Any]
) -> None:
    store.commit(secret_changes())
    before = dump(db)
    with pytest.raises(StorageError):
        store.commit(Changes(meta_put={"k": "v"}, app_rows=((table, row),)))
    assert dump(db) == before


def test_app_values_keep_their_exact_type(store: SQLiteProtocolStore) -> None:
    row = {"id": "1", "a": "007", "b": 7, "c": 7.0, "d": b"7", "e": None, "f": -0.0}
    store.commit(Changes(app_rows=(("messages", row),)))
    loaded = store.load_app_row("messages", "1")
    assert loaded is not None
    assert {k: (type(v), repr(v)) for k, v in loaded.items()} == {
        k: (type(v), repr(v)) for k, v in row.items()
    }


def test_app_columns_a_row_left_out_read_as_none_and_are_cleared(
    store: SQLiteProtocolStore,
) -> None:
    store.commit(Changes(app_rows=(("messages", {"id": "1", "body": "a", "read": 0}),)))
    store.commit(Changes(app_rows=(("messages", {"id": "2", "body": "b"}),)))
    assert store.load_app_row("messages", "2") == {"id": "2", "body": "b", "read": None}
    store.commit(Changes(app_rows=(("messages", {"id": "1", "read": 1}),)))
    assert store.load_app_row("messages", "1") == {"id": "1", "body": None, "read": 1}


def test_app_tables_cannot_reach_the_stores_own_tables(
    db: Path, store: SQLiteProtocolStore
) -> None:
    store.commit(secret_changes())
    store.commit(Changes(app_rows=(("sessions", {"id": "bob", "record": b"plain"}),)))
    assert store.load_session(BOB) == SECRETS["session"]
    assert store.load_app_row("sessions", "bob") == {"id": "bob", "record": b"plain"}
    with raw(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "app_sessions" in names


# -- migrations ----------------------------------------------------------------------------------


def _add_notes(conn: sqlite3.Connection, sealer: Sealer) -> None:
    del sealer
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT) STRICT")
    conn.execute("INSERT INTO notes (text) VALUES ('migrated')")


add_notes = Migration(SCHEMA_VERSION + 1, "test: add a notes table", _add_notes)


def test_a_newer_migration_upgrades_an_old_file_and_keeps_its_data(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(db) as store:
        store.commit(secret_changes())
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, add_notes))
    with open_store(db) as store:
        assert store.load_session(BOB) == SECRETS["session"]
    with raw(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (
            SCHEMA_VERSION + 1,
        )
        assert conn.execute("SELECT text FROM notes").fetchall() == [("migrated",)]


def test_a_failing_migration_leaves_the_file_at_its_old_version(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(db) as store:
        store.commit(secret_changes())
    before = dump(db)

    def broken(conn: sqlite3.Connection, sealer: Sealer) -> None:
        _add_notes(conn, sealer)
        conn.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(
        sqlite_module,
        "MIGRATIONS",
        (*sqlite_module.MIGRATIONS, Migration(SCHEMA_VERSION + 1, "broken", broken)),
    )
    with pytest.raises(StorageError):
        open_store(db)
    assert dump(db) == before


def test_a_file_from_a_newer_version_is_refused(db: Path) -> None:
    open_store(db).close()
    with raw(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match="schema version"):
        open_store(db)


V1_SCHEMA = """
CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL) STRICT;
CREATE TABLE keyring (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
    method TEXT NOT NULL, salt BLOB NOT NULL, opslimit INTEGER NOT NULL,
    memlimit INTEGER NOT NULL, payload BLOB NOT NULL) STRICT;
CREATE TABLE account (id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL,
    device_id INTEGER NOT NULL, registration_id INTEGER NOT NULL,
    identity_key_pair BLOB NOT NULL, created_at_ms INTEGER NOT NULL) STRICT;
CREATE TABLE prekeys (prekey_id INTEGER PRIMARY KEY, record BLOB NOT NULL) STRICT;
CREATE TABLE signed_prekeys (prekey_id INTEGER PRIMARY KEY, record BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL) STRICT;
CREATE TABLE identities (name TEXT NOT NULL, device_id INTEGER NOT NULL,
    identity_key BLOB NOT NULL, trust TEXT NOT NULL, updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (name, device_id)) STRICT, WITHOUT ROWID;
CREATE TABLE sessions (name TEXT NOT NULL, device_id INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (name, device_id)) STRICT;
CREATE TABLE sender_keys (group_id TEXT NOT NULL, sender_name TEXT NOT NULL,
    sender_device_id INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (group_id, sender_name, sender_device_id)) STRICT;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT, WITHOUT ROWID;
CREATE TABLE app_messages (id TEXT PRIMARY KEY, body ANY) STRICT;
"""


def _frame(tag: bytes, data: bytes) -> bytes:
    return tag + len(data).to_bytes(4, "big") + data


def test_a_version_1_file_written_by_hand_from_the_docs_loads(db: Path) -> None:
    """Pins the on-disk format of docs/storage.md, independently of the store's code."""
    dek, salt, wrap_nonce, nonce = bytes(range(32)), b"S" * 16, b"W" * 24, b"N" * 24
    ops, mem = 1, 8192
    kek = nacl.pwhash.argon2id.kdf(32, b"caf\xc3\xa9", salt, opslimit=ops, memlimit=mem)
    wrap_ad = (
        b"blindpost/keywrap\x01"
        + _frame(b"", b"argon2id")
        + _frame(b"", salt)
        + ops.to_bytes(8, "big")
        + mem.to_bytes(8, "big")
    )
    payload = wrap_nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        dek, wrap_ad, wrap_nonce, kek
    )

    def sealed(data: bytes, table: str, *key: str | int) -> bytes:
        context = _frame(b"s", table.encode()) + b"".join(
            _frame(b"i", str(k).encode()) if isinstance(k, int) else _frame(b"s", k.encode())
            for k in key
        )
        return (
            b"\x01"
            + nonce
            + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
                data, b"\x01" + context, nonce, dek
            )
        )

    with raw(db) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("INSERT INTO schema_version VALUES (1, 1)")
        conn.execute(
            "INSERT INTO keyring VALUES (1, 1, 'argon2id', ?, ?, ?, ?)", (salt, ops, mem, payload)
        )
        conn.execute(
            "INSERT INTO account VALUES (1, 'me', 1, 77, ?, 5)",
            (sealed(b"pair", "account", 1),),
        )
        conn.execute("INSERT INTO prekeys VALUES (9, ?)", (sealed(b"pk9", "prekeys", 9),))
        conn.execute(
            "INSERT INTO signed_prekeys VALUES (2, ?, 6)", (sealed(b"spk2", "signed_prekeys", 2),)
        )
        conn.execute("INSERT INTO identities VALUES ('bob', 2, x'05', 'verified', 7)")
        conn.execute(
            "INSERT INTO sessions VALUES ('bob', 2, ?)", (sealed(b"sess", "sessions", "bob", 2),)
        )
        conn.execute(
            "INSERT INTO sender_keys VALUES ('team', 'bob', 2, ?)",
            (sealed(b"sk", "sender_keys", "team", "bob", 2),),
        )
        conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        conn.execute("INSERT INTO app_messages VALUES ('m', 'hi')")

    with SQLiteProtocolStore.open(db, "cafe\u0301") as store:  # NFD spelling of the passphrase
        assert store.load_account() == AccountRecord("me", 1, 77, b"pair", 5)
        assert store.load_prekey(9) == b"pk9"
        assert store.load_signed_prekey(2) == SignedPreKeyRow(2, b"spk2", 6)
        assert store.load_identity(BOB) == IdentityRecord(b"\x05", TrustLevel.VERIFIED, 7)
        assert store.load_session(BOB) == b"sess"
        assert store.load_sender_key(GROUP_KEY) == b"sk"
        assert store.get_meta("k") == "v"
        assert store.load_app_row("messages", "m") == {"id": "m", "body": "hi"}


# -- typed errors ---------------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_corrupt(db: Path) -> None:
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorrupt):
        open_store(db)


def test_another_programs_database_is_refused_untouched(db: Path) -> None:
    with raw(db) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    before = fingerprint(db)
    with pytest.raises(StorageError, match="not a Blindpost store"):
        open_store(db)
    assert fingerprint(db) == before


def test_a_store_without_its_keyring_is_corrupt(db: Path) -> None:
    open_store(db, None).close()
    with raw(db) as conn:
        conn.execute("DELETE FROM keyring")
    with pytest.raises(StoreCorrupt):
        open_store(db, None)


def test_an_encrypted_store_without_its_keyring_file_is_corrupt(db: Path) -> None:
    with open_store(db) as store:
        store.commit(secret_changes())
    keyring_file(db).unlink()
    before = fingerprint(db)
    with pytest.raises(StoreCorrupt, match="keyring file"):
        open_store(db)
    assert fingerprint(db) == before


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b"not json", b'{"format": 9}', b"[" * 10000],
    ids=["empty", "fields", "text", "format", "huge"],
)
def test_a_damaged_keyring_file_is_corrupt(db: Path, content: bytes) -> None:
    open_store(db).close()
    keyring_file(db).write_bytes(content)
    with pytest.raises(StoreCorrupt):
        open_store(db)


def test_the_keyring_file_of_another_store_does_not_open_it(
    db: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.db"
    open_store(db).close()
    open_store(other).close()
    keyring_file(db).write_bytes(keyring_file(other).read_bytes())
    with pytest.raises(StoreCorrupt, match="does not open") as caught:
        open_store(db)
    sealer = unlock(sqlite_cipher.read_keyring_file(str(other)), "pass")
    key = sqlite_cipher.CipherKey(sealer).literal()[2:-1]
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    assert all(key not in str(exc) and key not in repr(exc) for exc in chain)
    assert capfd.readouterr().err == ""  # SQLCipher's own logging stays off


def test_unopenable_paths_raise_storage_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        open_store(tmp_path)  # a directory
    with pytest.raises(StorageError):
        open_store(tmp_path / "missing" / "store.db")
    with pytest.raises(UsageError):
        open_store(Path(":memory:"))
    with pytest.raises(UsageError):
        SQLiteProtocolStore.open(tmp_path / "x.db", "")


def test_a_closed_store_raises_storage_error(store: SQLiteProtocolStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError):
        store.load_session(BOB)
    with pytest.raises(StorageError):
        store.commit(secret_changes())
    with pytest.raises(StorageError):
        store.commit(Changes())
    assert "closed" in repr(store)


def test_reprs_hide_the_key(db: Path) -> None:
    store = open_store(db, None)
    store.commit(secret_changes())
    with raw(db) as conn:
        (dek,) = conn.execute("SELECT payload FROM keyring").fetchone()
    key = sqlite_cipher.CipherKey(store._sealer)
    text = repr(store) + repr(store._sealer) + repr(store.load_account()) + repr(key)
    assert dek.hex() not in text
    assert key.literal()[2:-1] not in text
    assert SECRETS["identity_key_pair"].hex() not in text
    assert "secret" in repr(store._sealer)
    store.close()


# -- backup snapshot and restore reset -------------------------------------------------------


def test_a_snapshot_holds_every_commit_and_opens_with_the_same_passphrase(
    db: Path, store: SQLiteProtocolStore, tmp_path: Path
) -> None:
    store.commit(secret_changes())
    copy = tmp_path / "snapshot.db"
    store.snapshot_to(copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with pytest.raises(StorageError):
        store.snapshot_to(copy)  # never overwrites
    with open_store(copy) as snap:
        assert snap.load_session(BOB) == SECRETS["session"]
        assert snap.load_app_row("messages", "m1") == {"id": "m1", "body": "hello"}
    with pytest.raises(WrongPassphrase):
        open_store(copy, "not the passphrase")


def test_dropping_ratchet_state_keeps_identity_trust_and_history(
    store: SQLiteProtocolStore,
) -> None:
    store.commit(secret_changes())
    store.drop_ratchet_state()
    assert store.load_session(BOB) is None
    assert store.load_sender_key(GROUP_KEY) is None
    assert store.load_prekey(7) is None and store.signed_prekeys() == []
    account = store.load_account()
    assert account is not None and account.identity_key_pair == SECRETS["identity_key_pair"]
    assert store.load_identity(BOB) == IdentityRecord(PUBLIC_IDENTITY, TrustLevel.VERIFIED, 3)
    assert store.load_app_row("messages", "m1") == {"id": "m1", "body": "hello"}
