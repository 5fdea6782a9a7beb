"""`blindpost group ...` with three accounts over one relay: create, send, remove, leave."""

from __future__ import annotations

from typing import Any

import pytest
from cli_harness import Cli, Relay

pytestmark = pytest.mark.timeout(120)


def test_group_lifecycle(cli: Cli, relay: Relay, one_line_error: Any) -> None:
    cli.many(*((name, "init", name, "--relay", relay.url) for name in ("alice", "bob", "carol")))
    created = cli("alice", "group", "create", "team", "bob", "carol")
    gid = created.last_word
    assert len(gid) == 24 and created.stdout.startswith('created group "team"')

    for got in cli.many(("bob", "receive", "--json"), ("carol", "receive", "--json")):
        (event,) = got.of_type("group")
        assert (event["action"], event["group"], event["by"]) == ("create", gid, "alice")
        assert event["members"] == ["alice", "bob", "carol"] and event["admins"] == ["alice"]

    mid = cli("alice", "send", "--group", gid, "hello team").last_word
    for got in cli.many(("bob", "receive", "--json"), ("carol", "receive", "--json")):
        (message,) = got.of_type("message")
        assert (message["id"], message["group"], message["sender"]) == (mid, gid, "alice")
        assert message["text"] == "hello team" and message["chat"] == f"group:{gid}"

    cli("bob", "read", "--group", gid)
    receipts = cli("alice", "receive", "--json").of_type("receipt")
    assert {(r["status"], r["sender"]) for r in receipts} >= {("read", "bob")}
    assert all(r["group"] == gid and r["message_ids"] == [mid] for r in receipts)

    removed = cli("alice", "--json", "group", "remove", gid, "carol").records[0]
    assert removed["action"] == "remove" and removed["members"] == ["alice", "bob"]
    after = cli("alice", "send", "--group", gid, "without carol").last_word

    bob_sees, carol_sees = cli.many(("bob", "receive", "--json"), ("carol", "receive", "--json"))
    assert [m["id"] for m in bob_sees.of_type("message")] == [after]
    assert [(e["action"], e["targets"]) for e in carol_sees.of_type("group")] == [
        ("remove", ["carol"])
    ]
    assert carol_sees.of_type("message") == []  # removed members read nothing new
    refused, leaving = cli.many(
        ("carol", "send", "--group", gid, "let me back"), ("bob", "group", "leave", gid), ok=False
    )
    one_line_error(refused, 8)
    assert leaving.code == 0, str(leaving)
    left = cli("alice", "receive", "--json").of_type("group")
    assert [(e["action"], e["by"], e["members"]) for e in left] == [("leave", "bob", ["alice"])]

    listing, alice_history = cli.many(
        ("carol", "group", "list", "--json"), ("alice", "history", "--group", gid, "--json")
    )
    listed = {r["group"]: r for r in listing.records}
    assert listed[gid]["member"] is False and listed[gid]["name"] == "team"
    history = alice_history.records
    texts = [(m["text"], m["status"]) for m in history if m["kind"] == "text"]
    assert texts == [("hello team", "read"), ("without carol", "delivered")]
