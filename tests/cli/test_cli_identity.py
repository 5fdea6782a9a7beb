"""A contact's identity key changes: `send` is held (status 4) until `trust`.

Names are never reused at a relay, so the key change is staged the way it happens
when a relay is reset or turns hostile: the relay forgets bob (its database is edited
while it is stopped) and a new "bob" registers with new keys.
"""

from __future__ import annotations

from typing import Any

import pytest
from cli_harness import Cli, Relay

pytestmark = pytest.mark.timeout(120)


def test_key_change_holds_sending_until_trust(cli: Cli, relay: Relay, one_line_error: Any) -> None:
    cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    cli("alice", "send", "bob", "before")
    assert [m["text"] for m in cli("bob", "receive", "--json").of_type("message")] == ["before"]

    relay.stop()
    relay.forget_user("bob")
    relay.start()
    cli("bob-new", "init", "bob", "--relay", relay.url)
    cli("bob-new", "send", "alice", "new phone, same bob")

    got = cli("alice", "receive", "--json")
    (change,) = got.of_type("identity_change")
    assert (change["user"], change["first_use"], change["held"]) == ("bob", False, True)
    assert [m["text"] for m in got.of_type("message")] == ["new phone, same bob"]
    held = cli("alice", "send", "bob", "held until trusted", ok=False)
    one_line_error(held, 4)
    assert "blindpost trust bob" in held.stderr
    # Still held in a new process, behind the first one.
    one_line_error(cli("alice", "send", "bob", "second held", ok=False), 4)
    contacts, bob_inbox = cli.many(
        ("alice", "contacts", "--json"), ("bob-new", "receive", "--json")
    )
    assert [(c["user"], c["trust"]) for c in contacts.records] == [("bob", "untrusted")]
    assert bob_inbox.of_type("message") == []  # nothing was encrypted to the new key

    trusted = cli("alice", "--json", "trust", "bob").records[0]
    assert (trusted["trust"], trusted["sent"], trusted["queued"]) == ("tofu", 2, 0)
    texts = [m["text"] for m in cli("bob-new", "receive", "--json").of_type("message")]
    assert texts == ["held until trusted", "second held"]
