"""`blindpost sealed`: refusing sealed messages, accepting them again, a new access key.

Real relay process, real CLI processes. What a user relies on: after `sealed refuse` the relay
accepts no message for bob without its sender's name (his contacts' messages still arrive, named);
after `sealed accept` and a message of his, alice writes to him unnamed again; after `sealed
rotate` the tokens alice holds stop working, and her message still arrives.
"""

from __future__ import annotations

import sqlite3

import pytest
from cli_harness import Cli, Relay

from blindpost_wire.names import is_sealed_sender

pytestmark = pytest.mark.timeout(240)


def sender_of(relay: Relay, message_id: str) -> str:
    """The sender column the relay stored for message ``message_id`` (read-only)."""
    db = sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        query = "SELECT sender FROM messages WHERE msg_id = ?"
        (row,) = db.execute(query, (bytes.fromhex(message_id),)).fetchall()
        return str(row[0])
    finally:
        db.close()


def received(cli: Cli, user: str) -> list[tuple[str, str]]:
    got = cli(user, "receive", "--json").of_type("message")
    return [(m["sender"], m["text"]) for m in got]


def test_refuse_accept_and_rotate(cli: Cli, relay: Relay) -> None:
    cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    (status,) = cli("bob", "--json", "sealed").records
    assert status == {"type": "sealed", "sending": True, "accepting": True}
    # Contacts: each learns the other's access key from the other's message.
    cli("alice", "send", "bob", "one")
    assert received(cli, "bob") == [("alice", "one")]
    cli("bob", "send", "alice", "two")
    assert received(cli, "alice") == [("bob", "two")]
    mid = cli("alice", "send", "bob", "sealed").last_word
    assert is_sealed_sender(sender_of(relay, mid), 0)
    assert received(cli, "bob") == [("alice", "sealed")]

    (status,) = cli("bob", "--json", "sealed", "refuse").records
    assert status["accepting"] is False
    mid = cli("alice", "send", "bob", "named").last_word
    assert sender_of(relay, mid) == "alice"  # the relay refused it sealed: it went named
    assert received(cli, "bob") == [("alice", "named")]
    assert cli("bob", "--json", "sealed").records[0]["accepting"] is False  # kept

    (status,) = cli("bob", "--json", "sealed", "accept").records
    assert status["accepting"] is True
    cli("bob", "send", "alice", "my key again")
    assert received(cli, "alice") == [("bob", "my key again")]
    mid = cli("alice", "send", "bob", "sealed again").last_word
    assert is_sealed_sender(sender_of(relay, mid), 0)
    assert received(cli, "bob") == [("alice", "sealed again")]

    out = cli("bob", "sealed", "rotate").stdout
    assert "new access key" in out
    mid = cli("alice", "send", "bob", "after the rotation").last_word
    assert sender_of(relay, mid) == "alice"  # her token is refused: named, and still delivered
    assert received(cli, "bob") == [("alice", "after the rotation")]
