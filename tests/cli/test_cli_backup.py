"""Encrypted backups: `backup create`, then `backup restore` into a new data directory.

Real relay, real clients. The restored account keeps its name, identity (so bob sees no key
change), contacts and history; it starts new sessions, and chats continue both ways while the
backed-up device is logged out. A wrong passphrase, a truncated or a tampered backup is refused
with nothing written.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cli, Relay
from daemon_harness import WAIT, StdioDaemon

pytestmark = pytest.mark.timeout(240)


def _secret(cli: Cli, name: str, text: str) -> str:
    path = cli.home / name
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def _numbers(text: str) -> list[str]:
    """The safety numbers printed (one per device of the contact)."""
    blocks = text.split("safety number with")[1:]
    return ["".join(re.findall(r"\d{5}", block.split("):", 1)[1])) for block in blocks]


def _leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".restore-" in p.name or ".partial-" in p.name
    )


def test_backup_then_restore_keeps_the_name_and_chats(cli: Cli, relay: Relay) -> None:
    pw = _secret(cli, "alice.pw", "correct horse battery staple")
    cli.many(
        ("alice", "--passphrase-file", pw, "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    cli("alice", "--passphrase-file", pw, "send", "bob", "before the backup")
    gid = cli("alice", "--passphrase-file", pw, "group", "create", "team", "bob").last_word
    cli("alice", "--passphrase-file", pw, "send", "--group", gid, "group before")
    source = cli.home / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 100)
    file_mid = cli("bob", "send-file", "alice", str(source)).last_word
    cli("bob", "receive")
    cli("alice", "--passphrase-file", pw, "receive")
    number_before = cli("bob", "safety-number", "alice").stdout

    backup = cli.home / "alice.bpbak"
    made = cli(
        "alice",
        "--passphrase-file",
        pw,
        "--json",
        "backup",
        "create",
        "--out",
        str(backup),
        "--with-media",
    ).records[0]
    assert (made["username"], made["media"], made["skipped"]) == ("alice", 1, False)
    assert made["size"] == backup.stat().st_size
    assert b"before the backup" not in backup.read_bytes()
    skipped = cli(
        "alice",
        "--passphrase-file",
        pw,
        "--json",
        "backup",
        "create",
        "--out",
        str(backup),
        "--if-older",
        "24",
    ).records[0]
    assert skipped["skipped"] is True

    restored = cli(
        "alice-restored", "--passphrase-file", pw, "--json", "backup", "restore", str(backup)
    ).records[0]
    assert (restored["username"], restored["registered"]) == ("alice", True)
    assert restored["device"] != 1
    folder = cli.data("alice-restored")
    assert (folder / "media" / file_mid).read_bytes() == source.read_bytes()
    history = cli("alice-restored", "--passphrase-file", pw, "history", "bob", "--json")
    assert "before the backup" in [m.get("text") for m in history.records]

    # The backed-up device is logged out; the restored one talks both ways.
    old = cli("alice", "--passphrase-file", pw, "send", "bob", "old device", ok=False)
    assert old.code == 9, str(old)
    cli("alice-restored", "--passphrase-file", pw, "send", "bob", "after the restore")
    inbox = cli("bob", "receive", "--json")
    # Same identity: the new device is a first use of the known key, nothing is held, and
    # the safety number is unchanged.
    assert all(c["first_use"] and not c["held"] for c in inbox.of_type("identity_change"))
    numbers_after = _numbers(cli("bob", "safety-number", "alice").stdout)
    assert len(numbers_after) == 2 and set(numbers_after) == set(_numbers(number_before))
    assert [m["text"] for m in inbox.of_type("message")] == ["after the restore"]
    cli("bob", "send", "alice", "good to have you back")
    got = cli("alice-restored", "--passphrase-file", pw, "receive", "--json")
    assert [m["text"] for m in got.of_type("message")] == ["good to have you back"]

    # The group goes on too: new Sender Keys both ways.
    cli("alice-restored", "--passphrase-file", pw, "send", "--group", gid, "group after")
    texts = [m["text"] for m in cli("bob", "receive", "--json").of_type("message")]
    assert texts == ["group after"]
    cli("bob", "send", "--group", gid, "group reply")
    got = cli("alice-restored", "--passphrase-file", pw, "receive", "--json")
    assert [m["text"] for m in got.of_type("message")] == ["group reply"]


def test_bad_backups_are_refused_with_nothing_written(
    cli: Cli, relay: Relay, one_line_error: Any
) -> None:
    pw = _secret(cli, "carol.pw", "a long and careful passphrase")
    cli("carol", "--passphrase-file", pw, "init", "carol", "--relay", relay.url)
    backup = cli.home / "carol.bpbak"
    cli("carol", "--passphrase-file", pw, "backup", "create", "--out", str(backup))
    data = backup.read_bytes()
    truncated = cli.home / "truncated.bpbak"
    truncated.write_bytes(data[: len(data) - 40])
    tampered = cli.home / "tampered.bpbak"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(flipped))
    wrong = _secret(cli, "wrong.pw", "not the passphrase")
    cases = [
        (str(backup), wrong, 6, "passphrase"),
        (str(truncated), pw, 1, "truncated"),
        (str(tampered), pw, 1, "tampered"),
    ]
    for path, passphrase, code, word in cases:
        result = cli(
            "carol-restored", "--passphrase-file", passphrase, "backup", "restore", path, ok=False
        )
        one_line_error(result, code)
        assert word in result.stderr, str(result)
        assert not cli.data("carol-restored").exists()
        assert _leftovers(cli.home) == []
    # Without a passphrase there is no backup at all.
    no_pw = cli("carol", "backup", "create", "--out", str(cli.home / "x.bpbak"), ok=False)
    one_line_error(no_pw, 6)
    assert not (cli.home / "x.bpbak").exists()
    # The intact backup still restores.
    cli("carol-restored", "--passphrase-file", pw, "backup", "restore", str(backup))
    assert os.stat(cli.data("carol-restored")).st_mode & 0o077 == 0


def test_the_daemon_writes_scheduled_backups(cli: Cli, relay: Relay) -> None:
    pw = _secret(cli, "erin.pw", "scheduled and careful")
    cli("erin", "--passphrase-file", pw, "init", "erin", "--relay", relay.url)
    out = cli.home / "erin-scheduled.bpbak"
    # Every 0.0005 h (1.8 s): the first backup at start (no file yet), then again.
    daemon = StdioDaemon(
        cli, "erin", "--passphrase-file", pw, "--backup-every", "0.0005", "--backup-out", str(out)
    )
    try:
        deadline = time.monotonic() + WAIT
        first = None
        while time.monotonic() < deadline:
            if out.exists():
                stamp = out.stat().st_mtime_ns
                first = first or stamp
                if stamp != first:
                    break
            time.sleep(0.05)  # polling a file written by another process
        assert first is not None and out.stat().st_mtime_ns != first, "no second backup"
    finally:
        daemon.close_stdin()
        code, err = daemon.wait()
    assert code == 0, err
    assert _leftovers(cli.home) == []
    cli("erin-restored", "--passphrase-file", pw, "backup", "restore", str(out))
