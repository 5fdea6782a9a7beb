"""Linked devices through the CLI: a real relay process and real `blindpost` processes.

`link` on a new machine prints `code: CODE` and waits; `devices add CODE` on alice's first
device approves it; then both devices receive what bob sends, `devices` lists both, and a
removed device reads nothing sent afterwards. A code nobody approves times out with nothing
registered.
"""

from __future__ import annotations

from typing import Any

import pytest
from cli_harness import Cli, Relay, read_link_code

pytestmark = pytest.mark.timeout(240)

WAIT = 60.0


def _link(
    cli: Cli, relay: Relay, name: str, approver: str, device_name: str, *extra: str
) -> dict[str, Any]:
    proc = cli.start(name, "link", "--relay", relay.url, "--timeout", str(WAIT))
    code = read_link_code(proc, as_json=False)
    approved = cli(approver, "--json", "devices", "add", code, "--name", device_name, *extra)
    (added,) = approved.records
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, (out, err)
    assert f"linked as {added['username']} (device {added['id']})" in out
    return dict(added)


def test_link_approve_list_and_remove(cli: Cli, relay: Relay, one_line_error: Any) -> None:
    cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    added = _link(cli, relay, "alice-laptop", "alice", "laptop")
    assert added["id"] == 2 and added["name"] == "laptop"

    listed = cli("alice", "devices", "--json").records
    assert [(d["type"], d["id"], d["name"], d["this_device"]) for d in listed] == [
        ("device", 1, "", True),
        ("device", 2, "laptop", False),
    ]
    assert all(isinstance(d["added"], int) for d in listed)
    text = cli("alice-laptop", "devices").stdout
    assert "laptop" in text and "(this device)" in text

    cli("bob", "send", "alice", "to both of your devices")
    for device in ("alice", "alice-laptop"):
        got = cli(device, "receive", "--json").of_type("message")
        assert [m["text"] for m in got] == ["to both of your devices"]
    # The same identity on both: bob's safety number is the same from either device.
    numbers = {
        device: cli(device, "--json", "safety-number", "bob").records[0]["digits"]
        for device in ("alice", "alice-laptop")
    }
    assert numbers["alice"] == numbers["alice-laptop"]

    # Removing this device itself needs --force; removing the laptop logs it out.
    one_line_error(cli("alice", "devices", "remove", "1", ok=False), 2)
    removed = cli("alice", "--json", "devices", "remove", "2").records
    assert removed == [{"type": "device_removed", "id": 2}]
    cli("bob", "send", "alice", "after the removal")
    one_line_error(cli("alice-laptop", "receive", ok=False), 9)
    got = cli("alice", "receive", "--json").of_type("message")
    assert [m["text"] for m in got] == ["after the removal"]
    assert [d["id"] for d in cli("alice", "devices", "--json").records] == [1]


def test_link_never_approved_times_out_with_nothing_registered(
    cli: Cli, relay: Relay, one_line_error: Any
) -> None:
    cli("carol", "init", "carol", "--relay", relay.url)
    result = cli("carol-2", "--json", "link", "--relay", relay.url, "--timeout", "1", ok=False)
    one_line_error(result, 3)
    (code,) = result.records
    assert code["type"] == "link_code" and len(code["code"]) == 82
    assert not (cli.data("carol-2") / "blindpost.db").exists()
    assert [d["id"] for d in cli("carol", "devices", "--json").records] == [1]
    # A code with a typo is refused locally (its checksum), before anything is sent. The typo
    # is in the middle: the last character also carries base32 padding bits, and some
    # changes to it decode to the same bytes (the same, valid, code).
    c = code["code"]
    typo = c[:40] + ("a" if c[40] != "a" else "b") + c[41:]
    one_line_error(cli("carol", "devices", "add", typo, ok=False), 2)


def test_link_with_history(cli: Cli, relay: Relay) -> None:
    cli.many(
        ("erin", "init", "erin", "--relay", relay.url),
        ("frank", "init", "frank", "--relay", relay.url),
    )
    cli("erin", "send", "frank", "from erin's first device")
    cli("frank", "receive")
    cli("frank", "send", "erin", "frank answers")
    cli("erin", "receive")
    added = _link(cli, relay, "erin-2", "erin", "tablet", "--with-history")
    assert added["history"] is True
    got = cli("erin-2", "history", "frank", "--json").of_type("message")
    assert [(m["text"], m["outgoing"]) for m in got] == [
        ("from erin's first device", True),
        ("frank answers", False),
    ]
    # The new device talks on its own from here.
    cli("erin-2", "send", "frank", "from the tablet")
    texts = [m["text"] for m in cli("frank", "receive", "--json").of_type("message")]
    assert texts == ["from the tablet"]
