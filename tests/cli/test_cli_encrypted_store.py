"""History encrypted at rest, as a user checks it: ``grep`` of the data directory.

Two accounts with passphrases exchange texts and a file through a real relay
process with the installed ``blindpost``; then every file in both data
directories is searched for the message text, the file's name and content, and
the SQLite header. A wrong or missing passphrase is one typed error line.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from cli_harness import Cli, Relay

ALICE = {"BLINDPOST_PASSPHRASE": "alice's long passphrase"}
BOB = {"BLINDPOST_PASSPHRASE": "bob's other passphrase"}


def every_file(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def found_in(folder: Path, needle: bytes) -> list[str]:
    """Files under ``folder`` containing ``needle``: by byte search and by ``grep``."""
    hits = {p.name for p in every_file(folder) if needle in p.read_bytes()}
    grep = shutil.which("grep")
    if grep is not None:
        run = subprocess.run(
            [grep, "-r", "-l", "-a", "-F", needle.decode(), str(folder)],
            capture_output=True,
            check=False,
        )
        assert run.returncode in (0, 1), run.stderr  # 1: nothing found
        hits |= {Path(line).name for line in run.stdout.decode().splitlines()}
    return sorted(hits)


def test_no_message_text_in_any_file_of_an_encrypted_data_directory(
    cli: Cli, relay: Relay, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:12]
    text = f"quokka{tag} meets the pangolin"
    reply = f"wombat{tag} answers"
    name = f"plans{tag}.txt"
    cli("alice", "init", "alice", "--relay", relay.url, env=ALICE)
    cli("bob", "init", "bob", "--relay", relay.url, env=BOB)

    cli("alice", "send", "bob", text, env=ALICE)
    source = tmp_path / name
    source.write_bytes(f"attachment body ibex{tag}\n".encode() * 200)
    mid = cli("alice", "send-file", "bob", str(source), env=ALICE).last_word
    got = cli("bob", "receive", "--json", env=BOB).of_type("message")
    assert text in [m.get("text") for m in got], got
    cli("bob", "send", "alice", reply, env=BOB)
    cli("bob", "read", "alice", env=BOB)
    assert reply in [m.get("text") for m in cli("alice", "receive", "--json", env=ALICE).records]
    out = tmp_path / "copy.txt"
    cli("bob", "download", mid, "--out", str(out), env=BOB)
    assert out.read_bytes() == source.read_bytes()
    # The full-text index works on the encrypted file.
    hits = cli("bob", "search", f"quokka{tag}", "--json", env=BOB).records
    assert [h["text"] for h in hits] == [text], hits

    for user in ("alice", "bob"):
        folder = cli.data(user)
        names = {p.name for p in every_file(folder)}
        assert "blindpost.db" in names and "blindpost.db-keyring" in names, names
        for needle in (f"quokka{tag}", f"wombat{tag}", f"ibex{tag}", f"plans{tag}"):
            assert found_in(folder, needle.encode()) == [], (user, needle)
        assert found_in(folder, b"SQLite format 3") == [], user
        # Control: the same search does find text that is there in clear.
        assert found_in(tmp_path, f"ibex{tag}".encode()) != []


def test_a_wrong_or_missing_passphrase_is_one_typed_error(
    cli: Cli, relay: Relay, one_line_error: Any
) -> None:
    cli("carol", "init", "carol", "--relay", relay.url, env=ALICE)
    folder = cli.data("carol")
    before = {p.name: p.read_bytes() for p in every_file(folder) if p.suffix != ".lock"}
    for env in ({"BLINDPOST_PASSPHRASE": "not carol's"}, {}):
        for command in (("history", "alice"), ("receive",), ("search", "x")):
            result = cli("carol", *command, env=env, ok=False)
            one_line_error(result, 6)
            assert "passphrase" in result.stderr
            assert "Traceback" not in result.stderr
    after = {p.name: p.read_bytes() for p in every_file(folder) if p.suffix != ".lock"}
    assert after == before
    cli("carol", "contacts", env=ALICE)
