"""`blindpost` between two accounts: init, 1:1 messages, receipts, files, safety numbers.

The tests in this module share one relay and run in order (each builds on the
accounts the first one created), the way a person would use the command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cli, Relay

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def accounts(cli: Cli, relay: Relay) -> tuple[str, str]:
    alice, bob = cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "--json", "init", "bob", "--relay", relay.url),
    )
    assert alice.stdout.splitlines()[0].startswith("registered alice (device 1)")
    assert "your safety-number card" in alice.stdout
    card = bob.records[0]
    assert card["type"] == "account" and card["username"] == "bob"
    assert len(card["fingerprint"]) == 30 and card["fingerprint"].isdigit()
    return "alice", "bob"


def test_init_rejects_a_taken_name_and_leaves_no_account(
    cli: Cli, relay: Relay, accounts: Any, one_line_error: Any
) -> None:
    taken = cli("bob2", "init", "bob", "--relay", relay.url, ok=False)
    one_line_error(taken, 7)
    assert "already registered" in taken.stderr
    assert not (cli.data("bob2") / "blindpost.db").exists()


def test_message_receipts_and_history(cli: Cli, accounts: Any) -> None:
    sent = cli("alice", "send", "bob", "hello bob")
    mid = sent.last_word
    assert len(mid) == 32 and sent.stdout.startswith("sent to bob")

    got = cli("bob", "receive", "--json")
    (message,) = got.of_type("message")
    assert message["id"] == mid and message["text"] == "hello bob"
    assert message["sender"] == "alice" and message["group"] is None
    assert message["attachment"] is None and isinstance(message["sent_at"], int)

    delivered = cli("alice", "receive", "--json").of_type("receipt")
    assert delivered == [
        {
            "type": "receipt",
            "status": "delivered",
            "message_ids": [mid],
            "sender": "bob",
            "device": 1,
            "chat": "dm:bob",
            "group": None,
        }
    ]
    assert "marked 1 message(s) read" in cli("bob", "read", "alice").stdout
    read = cli("alice", "receive", "--json").of_type("receipt")
    assert [(r["status"], r["message_ids"], r["sender"]) for r in read] == [("read", [mid], "bob")]

    history = cli("alice", "history", "bob", "--json").records
    assert [(m["id"], m["status"], m["outgoing"]) for m in history] == [(mid, "read", True)]
    assert history[0]["receipts"] == {"bob": "read"}
    human = cli("alice", "history", "bob").stdout
    assert "hello bob [read]" in human and human.split()[-1] == mid


def test_file_send_receive_and_download(
    cli: Cli, accounts: Any, tmp_path: Path, one_line_error: Any
) -> None:
    source = tmp_path / "report.pdf"
    source.write_bytes(bytes(range(256)) * 1200)
    mid = cli("alice", "send-file", "bob", str(source), "--caption", "the report").last_word

    (message,) = cli("bob", "receive", "--json").of_type("message")
    assert message["id"] == mid and message["kind"] == "attachment"
    assert message["attachment"] == {
        "id": mid,
        "name": "report.pdf",
        "size": source.stat().st_size,
        "mime": "application/pdf",
    }
    out = tmp_path / "copy.pdf"
    cli("bob", "download", mid, "--out", str(out))
    assert out.read_bytes() == source.read_bytes()
    one_line_error(cli("bob", "download", mid, "--out", str(out), ok=False), 1)
    into = tmp_path / "inbox"
    into.mkdir()
    saved = cli("bob", "--json", "download", mid, "--out", str(into)).records[0]
    assert Path(saved["path"]) == into / "report.pdf"
    one_line_error(cli("bob", "download", "0" * 32, "--out", str(out), ok=False), 5)


def test_safety_numbers_match_and_verify(cli: Cli, accounts: Any) -> None:
    mine, theirs = cli.many(
        ("alice", "safety-number", "bob", "--json"), ("bob", "safety-number", "alice", "--json")
    )
    a, b = mine.records[0], theirs.records[0]
    assert a["digits"] == b["digits"] and len(a["digits"]) == 60 and a["trust"] == "tofu"
    drawn = cli("alice", "safety-number", "bob", "--qr").stdout
    assert "\u2588" in drawn and " ".join([a["digits"][:5], a["digits"][5:10]]) in drawn

    assert cli("alice", "verify", "bob").stdout.startswith("bob is now verified")
    (contact,) = cli("alice", "contacts", "--json").records
    assert contact == {
        "type": "contact",
        "user": "bob",
        "trust": "verified",
        "devices": {"1": "verified"},
    }


def test_messages_consumed_by_other_commands_are_printed_by_receive(
    cli: Cli, accounts: Any
) -> None:
    reply = cli("bob", "send", "alice", "reply from bob").last_word
    # Alice's send connects send-only: bob's reply waits on the relay for receive.
    cli("alice", "send", "bob", "crossing")
    texts = [(m["id"], m["text"]) for m in cli("alice", "receive", "--json").of_type("message")]
    assert texts == [(reply, "reply from bob")]
    assert cli("alice", "receive", "--json").of_type("message") == []


def _wait_until_locked(folder: Path, timeout: float = 20.0) -> None:
    """Until another process holds the data directory's lock (the SDK's flock).

    Reads /proc/locks rather than probing with flock, which could itself make the
    other process find the directory busy.
    """
    inode = (folder / "blindpost.lock").stat().st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and any(f.endswith(f":{inode}") for f in fields):
                return
        time.sleep(0.05)
    raise AssertionError("the listener never opened its data directory")


def test_receive_timeout_keeps_listening_after_the_queue_is_drained(
    cli: Cli, accounts: Any, one_line_error: Any
) -> None:
    listener = cli.start("bob", "receive", "--json", "--timeout", "6")
    _wait_until_locked(cli.data("bob"))
    began = time.monotonic()
    # While it listens, alice sends; and a second process on bob's data directory is
    # turned away at once (one process per data directory).
    sending, busy = cli.many(("alice", "send", "bob", "live"), ("bob", "contacts"), ok=False)
    assert sending.code == 0, str(sending)
    one_line_error(busy, 10)
    result = cli.finish(listener, ("receive",))
    assert result.code == 0, str(result)
    # "crossing" (from the test above) was waiting; "live" came while listening.
    assert [m["text"] for m in result.of_type("message")] == ["crossing", "live"]
    assert result.of_type("message")[-1]["id"] == sending.last_word
    assert time.monotonic() - began >= 6


def test_errors_are_one_line_with_distinct_statuses(
    cli: Cli, accounts: Any, one_line_error: Any
) -> None:
    unknown = cli("alice", "send", "nobody_here", "hi", ok=False)
    one_line_error(unknown, 5)
    assert "nobody_here" in unknown.stderr
    one_line_error(cli("alice", "safety-number", "stranger", ok=False), 5)
    one_line_error(cli("alice", "send", "--group", "ab" * 12, "hi", ok=False), 5)
    down = cli(
        "offline",
        "--network-timeout",
        "2",
        "init",
        "carol",
        "--relay",
        "http://127.0.0.1:9",
        ok=False,
    )
    one_line_error(down, 3)


def test_passphrase_from_environment_or_file(
    cli: Cli, relay: Relay, tmp_path: Path, one_line_error: Any
) -> None:
    secret = {"BLINDPOST_PASSPHRASE": "correct horse battery staple"}
    init = cli("dave", "init", "dave", "--relay", relay.url, env=secret)
    assert "correct horse" not in init.stdout
    one_line_error(cli("dave", "contacts", ok=False), 6)
    right = tmp_path / "right"
    right.write_text("correct horse battery staple\n")
    cli("dave", "contacts", "--passphrase-file", str(right))


def test_receipts_and_group_events_wait_for_the_next_receive(cli: Cli, accounts: Any) -> None:
    mid = cli("alice", "send", "bob", "are you there").last_word
    printed = cli("bob", "receive", "--json")  # prints it and sends the delivered receipt
    assert mid in [m["id"] for m in printed.of_type("message")]
    gid = cli("bob", "group", "create", "crossing", "alice").last_word
    # The receipt and the group change wait in alice's mailbox while she runs
    # other commands; one-shot commands connect send-only and take nothing.
    cli("alice", "send", "bob", "meanwhile")
    cli("alice", "read", "bob")
    out = cli("alice", "receive", "--json")
    assert any(
        r["status"] == "delivered" and mid in r["message_ids"] for r in out.of_type("receipt")
    ), str(out)
    assert [g["action"] for g in out.of_type("group") if g["group"] == gid] == ["create"]
    again = cli("alice", "receive", "--json")
    assert again.of_type("group") == [] and again.of_type("message") == []
