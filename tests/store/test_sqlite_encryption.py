"""Encrypting a plaintext store in place survives a crash at any point.

A store from before encryption at rest (its key wrapped under a passphrase, the
database in clear) is opened by a child process that is killed with SIGKILL:
once just before each file operation of the migration (each unlink, fsync and
rename: the boundaries between its durable steps), and at moments spread over a
larger store's export. After every kill the directory holds either the old
plaintext database or a complete encrypted one, and the next open finishes (or
restarts) the migration and reads back every row.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from e2ee.errors import WrongPassphrase
from e2ee.store import sqlite_cipher
from e2ee.store.protocols import AccountRecord, Address, Changes
from e2ee.store.sealing import KDF_MINIMUM, unlock
from e2ee.store.sqlite import SQLiteProtocolStore

REPO = Path(__file__).resolve().parents[2]
PASS = "legacy pass"
MARK = b"capybara-plaintext-marker"

# Kills itself just before the N-th file operation (N = argv[2]; 0: never) and
# prints how many it made and how long opening took, when it gets through.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from e2ee.store.sqlite import SQLiteProtocolStore

    kill_at, calls = int(sys.argv[2]), 0

    def step(operation):
        def run(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return operation(*args, **kwargs)
        return run

    for name in ("fsync", "replace", "rename", "unlink"):
        setattr(os, name, step(getattr(os, name)))
    import time
    print("go", flush=True)
    began = time.monotonic()
    SQLiteProtocolStore.open(sys.argv[1], sys.argv[3]).close()
    print(calls, time.monotonic() - began, flush=True)
    """
)


def make_legacy_store(db: Path, rows: int) -> dict[str, list[tuple[Any, ...]]]:
    """A plaintext store with a passphrase-protected key; returns its content."""
    with SQLiteProtocolStore.open(db, None) as store:
        store.commit(
            Changes(
                account=AccountRecord("me", 1, 7, b"identity pair", 1),
                sessions_put={Address(f"peer{i}", 1): bytes([i]) * 900 for i in range(20)},
                meta_put={"next_prekey_id": "8"},
            )
        )
        for start in range(0, rows, 500):
            store.commit(
                Changes(
                    app_rows=tuple(
                        ("messages", {"id": f"m{i:06d}", "text": MARK.decode() + f" {i}"})
                        for i in range(start, min(rows, start + 500))
                    )
                )
            )
        store.change_passphrase(None, PASS, kdf_limits=KDF_MINIMUM)
    with sqlite3.connect(db) as conn:
        return content(conn)


def content(conn: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the keyring (it moves to a file)."""
    tables = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if r[0] != "keyring"
    ]
    return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}


def encrypted_content(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    sealer = unlock(sqlite_cipher.read_keyring_file(str(path).removesuffix("-encrypting")), PASS)
    conn = sqlite_cipher.connect_encrypted(str(path), sqlite_cipher.CipherKey(sealer))
    try:
        assert conn.execute("SELECT count(*) FROM keyring").fetchone() == (0,)
        return content(conn)
    finally:
        conn.close()


def run_child(db: Path, tmp_path: Path, kill_at: int, delay: float | None = None) -> str:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(db), str(kill_at), PASS],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "go"
    if delay is not None:
        time.sleep(delay)  # land the kill at a chosen point of the export
        child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=120)
    return out.strip()


def check_crash_state(db: Path, expected: dict[str, list[tuple[Any, ...]]]) -> str:
    """After a kill: the old plaintext store or a complete encrypted one, nothing else."""
    tmp = Path(str(db) + sqlite_cipher.ENCRYPTING_SUFFIX)
    keyring = Path(str(db) + sqlite_cipher.KEYRING_SUFFIX)
    if tmp.exists() and keyring.exists():
        assert encrypted_content(tmp) == expected
        return "copy done"
    found = sqlite_cipher.layout(str(db))
    if found is sqlite_cipher.Layout.PLAIN:
        with sqlite3.connect(db) as conn:
            assert content(conn) == expected
            assert conn.execute("SELECT method FROM keyring").fetchone() == ("argon2id",)
        return "plaintext"
    assert found is sqlite_cipher.Layout.ENCRYPTED
    assert encrypted_content(db) == expected
    return "encrypted"


def check_reopened(db: Path, expected: dict[str, list[tuple[Any, ...]]]) -> None:
    with SQLiteProtocolStore.open(db, PASS) as store:
        assert store.encrypted
        assert store.load_session(Address("peer3", 1)) == bytes([3]) * 900
        assert store.get_meta("next_prekey_id") == "8"
    assert encrypted_content(db) == expected
    names = sorted(p.name for p in db.parent.iterdir())
    assert names == [db.name, db.name + sqlite_cipher.KEYRING_SUFFIX], names
    for path in db.parent.iterdir():
        assert MARK not in path.read_bytes(), path.name


def test_a_kill_before_any_file_operation_leaves_a_store_that_opens(tmp_path: Path) -> None:
    original = tmp_path / "original"
    original.mkdir()
    expected = make_legacy_store(original / "store.db", rows=300)
    work = tmp_path / "work"
    # A run without a kill counts the file operations.
    shutil.copytree(original, work)
    total = int(run_child(work / "store.db", tmp_path, 0).split()[0])
    check_reopened(work / "store.db", expected)
    assert total >= 10
    states = set()
    for kill_at in range(1, total + 1):
        shutil.rmtree(work)
        shutil.copytree(original, work)
        assert run_child(work / "store.db", tmp_path, kill_at) == "", kill_at
        states.add(check_crash_state(work / "store.db", expected))
        check_reopened(work / "store.db", expected)
    assert states == {"plaintext", "copy done", "encrypted"}, states


def test_a_kill_during_the_export_leaves_a_store_that_opens(tmp_path: Path) -> None:
    original = tmp_path / "original"
    original.mkdir()
    expected = make_legacy_store(original / "store.db", rows=60_000)
    work = tmp_path / "work"
    shutil.copytree(original, work)
    took = float(run_child(work / "store.db", tmp_path, 0).split()[1])
    states = []
    for fraction in (0.2, 0.4, 0.6, 0.8):
        shutil.rmtree(work)
        shutil.copytree(original, work)
        run_child(work / "store.db", tmp_path, 0, delay=took * fraction)
        states.append(check_crash_state(work / "store.db", expected))
        check_reopened(work / "store.db", expected)
    print("states after the kills:", states, f"(migration took {took:.2f} s)")


def test_a_wrong_passphrase_does_not_start_the_migration(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    make_legacy_store(db, rows=10)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for wrong in ("not it", None):
        with pytest.raises(WrongPassphrase):
            SQLiteProtocolStore.open(db, wrong)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
