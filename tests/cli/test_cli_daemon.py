"""`blindpost daemon`: JSON-RPC 2.0 on stdio and on a Unix socket, against a real relay.

Each test runs real ``blindpost`` processes (daemons and one-shot commands) against
the module's relay process. Notifications are compared with what ``receive --json``
prints, field by field. The tests share the module's accounts and run in order (the
group made in the second is used by later ones), as in test_cli_direct.py.
"""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cli, Relay, read_link_code
from daemon_harness import SocketDaemon, StdioDaemon, socket_path

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def accounts(cli: Cli, relay: Relay) -> list[str]:
    names = ["dana", "dbob", "dcarol", "ddave", "derin"]
    cli.many(*[(name, "init", name, "--relay", relay.url) for name in names])
    return names


def test_stdio_daemon_sends_and_receives_with_a_cli_user(cli: Cli, accounts: Any) -> None:
    daemon = StdioDaemon(cli, "dana")
    try:
        sent = daemon.call("send", {"to": "dbob", "text": "hello from a bot"})
        assert set(sent) == {"id"} and len(sent["id"]) == 32
        got = cli("dbob", "receive", "--json").of_type("message")
        assert [(m["id"], m["text"], m["sender"]) for m in got] == [
            (sent["id"], "hello from a bot", "dana")
        ]
        # The relay's "sent" and bob's "delivered" receipt arrive as receive records.
        assert daemon.event("sent", lambda e: e["message_ids"] == [sent["id"]]) == {
            "type": "sent",
            "message_ids": [sent["id"]],
            "chat": "dm:dbob",
            "group": None,
        }
        delivered = daemon.event("receipt", lambda e: sent["id"] in e["message_ids"])
        assert delivered == {
            "type": "receipt",
            "status": "delivered",
            "message_ids": [sent["id"]],
            "sender": "dbob",
            "device": 1,
            "chat": "dm:dbob",
            "group": None,
        }
        reply = cli("dbob", "send", "dana", "hi bot").last_word
        message = daemon.event("message", lambda e: e["id"] == reply)
        assert (message["text"], message["sender"], message["outgoing"]) == (
            "hi bot",
            "dbob",
            False,
        )
        assert daemon.call("read", {"user": "dbob"}) == {
            "type": "read",
            "chat": "dm:dbob",
            "marked": 1,
            "queued": 0,
        }
        receipts = cli("dbob", "receive", "--json").of_type("receipt")
        assert all(r["message_ids"] == [reply] for r in receipts)
        # Read, after delivered when both arrive in that order; the delivered receipt goes
        # out a moment after a message arrives, so a read that overtakes it is all bob sees:
        # a status never goes back.
        assert [r["status"] for r in receipts] in (["delivered", "read"], ["read"])
        history = daemon.call("history", {"user": "dbob"})
        assert [(m["id"], m["status"]) for m in history] == [
            (sent["id"], "delivered"),
            (reply, "received"),
        ]
    finally:
        daemon.close_stdin()
        code, err = daemon.wait()
    assert code == 0, err
    assert err == ""
    # Closed, the data directory is free again, and history agrees with the daemon.
    assert cli("dana", "history", "dbob", "--json").records == history


def test_notifications_are_the_records_receive_json_prints(cli: Cli, accounts: Any) -> None:
    group = cli("ddave", "--json", "group", "create", "crew", "dbob", "dcarol").records[0]["group"]
    daemon = StdioDaemon(cli, "dcarol")
    try:
        created = daemon.event("group", lambda e: e["group"] == group)
        mid = cli("ddave", "send", "--group", group, "to the crew").last_word
        from_daemon = daemon.event("message", lambda e: e["id"] == mid)
    finally:
        daemon.close_stdin()
        code, err = daemon.wait()
    assert code == 0, err
    printed = cli("dbob", "receive", "--json").records
    (from_receive,) = [r for r in printed if r["type"] == "message" and r["id"] == mid]
    (group_record,) = [r for r in printed if r["type"] == "group" and r["group"] == group]
    # Same serializer: the same fields with the same values; only the local time differs.
    assert from_daemon.keys() == from_receive.keys()
    assert {k: v for k, v in from_daemon.items() if k != "received_at"} == {
        k: v for k, v in from_receive.items() if k != "received_at"
    }
    assert created == group_record
    # Every notification is a JSON-RPC 2.0 notification named "receive", without an id.
    assert all(set(n) == {"jsonrpc", "method", "params"} for n in daemon.notifications)
    assert {n["method"] for n in daemon.notifications} == {"receive"}


def test_socket_daemon_serves_several_clients_and_loses_no_unacknowledged_event(
    cli: Cli, accounts: Any, tmp_path: Path
) -> None:
    path = socket_path(tmp_path)
    daemon = SocketDaemon(cli, "derin", "--socket", str(path))
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        listener, sender = daemon.connect(), daemon.connect()
        assert listener.call("subscribe", {"ack": True}) == {"subscribed": True, "ack": True}
        first = cli("dbob", "send", "derin", "first").last_word
        assert listener.event("message", lambda e: e["id"] == first)["text"] == "first"
        assert listener.call("ack", {"count": len(listener.notifications)})

        # A second client sends while the first listens; it gets no events unasked.
        out = sender.call("send", {"to": "dbob", "text": "from the socket"})
        got = cli("dbob", "receive", "--json").of_type("message")
        assert [m["id"] for m in got] == [out["id"]]
        listener.event("receipt", lambda e: out["id"] in e["message_ids"])
        assert sender.notifications == []
        acked = len(listener.notifications)
        assert listener.call("ack", {"count": acked}) == {"acknowledged": acked}

        # The listener gets a message but goes away before acknowledging it; another
        # arrives while nobody listens. The next subscriber gets both, and nothing
        # the listener acknowledged.
        second = cli("dbob", "send", "derin", "second").last_word
        listener.event("message", lambda e: e["id"] == second)
        listener.close()
        third = cli("dbob", "send", "derin", "while nobody listens").last_word
        sender.until(
            lambda: third in [m["id"] for m in sender.call("history", {"user": "dbob"})],
            "the third message stored",
        )
        late = daemon.connect()
        late.call("subscribe")
        late.event("message", lambda e: e["id"] == third)
        assert [e["id"] for e in late.events("message")] == [second, third]
        assert not [e for e in late.events("receipt") if out["id"] in e["message_ids"]]
        bad_ack = late.error("ack", {"count": 1})
        assert bad_ack["code"] == -32602  # a plain subscriber does not acknowledge
        sender.close()
        late.close()
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    assert not path.exists()
    assert "".join(daemon.stderr_lines).strip() == f"blindpost: listening on unix:{path}"


def test_a_message_never_delivered_is_reported_at_the_next_start(
    cli: Cli, accounts: Any, tmp_path: Path
) -> None:
    path = socket_path(tmp_path)
    daemon = SocketDaemon(cli, "derin", "--socket", str(path))
    try:
        control = daemon.connect()
        mid = cli("dbob", "send", "derin", "stored, never delivered").last_word
        control.until(
            lambda: mid in [m["id"] for m in control.call("history", {"user": "dbob"})],
            "the message stored",
        )
        control.close()
        assert daemon.stop(signal.SIGINT) == 0
    finally:
        daemon.kill()
    stdio = StdioDaemon(cli, "derin")
    try:
        assert stdio.event("message", lambda e: e["id"] == mid)["text"] == "stored, never delivered"
    finally:
        stdio.close_stdin()
        code, err = stdio.wait()
    assert code == 0, err
    # Delivered now: neither receive nor a later daemon reports it again.
    assert mid not in [m["id"] for m in cli("derin", "receive", "--json").of_type("message")]


def test_past_the_event_buffer_the_oldest_events_are_dropped_and_counted(
    cli: Cli, accounts: Any, tmp_path: Path
) -> None:
    path = socket_path(tmp_path)
    daemon = SocketDaemon(cli, "dcarol", "--socket", str(path), "--event-buffer", "1")
    try:
        control = daemon.connect()
        ids = [cli("ddave", "send", "dcarol", f"burst {i}").last_word for i in range(2)]
        control.until(
            lambda: {m["id"] for m in control.call("history", {"user": "ddave"})} >= set(ids),
            "both messages stored",
        )
        control.call("subscribe")
        control.until(lambda: bool(control.notifications), "the kept event")
        assert [e["id"] for e in control.events("message")] == [ids[1]]
        # Still in history: a dropped event loses no message.
        assert {m["id"] for m in control.call("history", {"user": "ddave"})} >= set(ids)
        control.close()
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    warnings = [line for line in daemon.stderr_lines if "dropped" in line]
    assert warnings and "--event-buffer 1" in warnings[0]


def test_errors_are_json_rpc_error_objects_and_never_end_the_daemon(
    cli: Cli, accounts: Any
) -> None:
    daemon = StdioDaemon(cli, "dbob", "--max-line", "1024")

    def answer(line: bytes) -> dict[str, Any]:
        daemon.raw(line + b"\n")
        daemon.until(lambda: None in daemon.responses, "an error without id")
        return daemon.responses.pop(None)["error"]

    try:
        assert answer(b"{not json")["code"] == -32700
        assert answer(b"\xff\xfe")["code"] == -32700
        assert answer(b"[]")["code"] == -32600
        assert answer(b'"just a string"')["code"] == -32600
        assert answer(b'{"jsonrpc": "2.0", "id": true, "method": "contacts"}')["code"] == -32600
        assert answer(b"x" * 2000)["code"] == -32600  # longer than --max-line
        daemon.raw(b'{"jsonrpc": "1.0", "id": 7, "method": "contacts"}\n')
        assert daemon.response(7)["error"]["code"] == -32600
        assert daemon.error("no-such-method")["code"] == -32601
        assert daemon.error("send", {"to": "dana"})["code"] == -32602  # no text
        assert daemon.error("send", {"to": "dana", "text": 5})["code"] == -32602
        assert daemon.error("send", {"to": "Not A Name", "text": "x"})["code"] == -32602
        assert daemon.error("contacts", {"colour": "blue"})["code"] == -32602
        daemon.raw(b'{"jsonrpc": "2.0", "id": 8, "method": "contacts", "params": [1]}\n')
        assert daemon.response(8)["error"]["code"] == -32602
        # SDK errors: the CLI's exit status + 1000, the status and error class in data.
        unknown = daemon.error("send", {"to": "nobody_here", "text": "hello?"})
        assert unknown["code"] == 1005
        data = unknown["data"]
        assert (data["exit_status"], data["error"], data["user"]) == (
            5,
            "UnknownRecipient",
            "nobody_here",
        )
        group = daemon.error("send", {"group": "0" * 24, "text": "hello"})
        assert group["code"] == 1005 and group["data"]["exit_status"] == 5
        assert daemon.error("safety-number", {"user": "nobody_here"})["code"] == 1005
        # A notification gets no answer, even when it fails; a batch gets one array.
        daemon.raw(b'{"jsonrpc": "2.0", "method": "no-such-method"}\n')
        daemon.raw(
            b'[{"jsonrpc": "2.0", "id": "a", "method": "contacts"},'
            b' {"jsonrpc": "2.0", "method": "contacts"}, {"id": "b"}]\n'
        )
        daemon.until(lambda: bool(daemon.batches), "the batch answer")
        (batch,) = daemon.batches
        assert [(a["id"], "result" in a) for a in batch] == [("a", True), ("b", False)]
        # Still serving.
        assert any(c["user"] == "dana" for c in daemon.call("contacts"))
    finally:
        daemon.close_stdin()
        code, err = daemon.wait()
    assert code == 0, err
    assert None not in daemon.responses


def test_too_many_clients_and_bad_options(
    cli: Cli, accounts: Any, tmp_path: Path, one_line_error: Any
) -> None:
    for option, value in [
        ("--event-buffer", "0"),
        ("--max-line", "10"),
        ("--max-inflight", "0"),
        ("--max-clients", "0"),
        ("--tcp", "70000"),
        ("--event-loop", "trio"),
    ]:
        result = cli("ddave", "daemon", option, value, ok=False)
        one_line_error(result, 2)
        assert option in result.stderr
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    daemon = SocketDaemon(
        cli, "ddave", "--tcp", "0", "--max-clients", "1", "--event-loop", loop, options=("-v",)
    )
    try:
        # The daemon says which loop it runs on, read from inside that loop.
        assert any(f"event loop: {loop}" in line for line in daemon.stderr_lines)
        assert daemon.address is not None and daemon.address[1].startswith("127.0.0.1:")
        first = daemon.connect()
        groups = first.call("group", {"action": "list"})
        assert [(g["type"], g["name"]) for g in groups] == [("group_info", "crew")]
        second = daemon.connect()
        second.until(lambda: second.closed, "the refusal")
        assert second.responses[None]["error"]["code"] == 1010
        assert first.call("contacts")  # the first client is unaffected
        first.close()
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()


def test_search_and_group_methods(cli: Cli, accounts: Any) -> None:
    # asyncio's own loop (the other tests run on the default, uvloop where installed).
    daemon = StdioDaemon(cli, "ddave", "--event-loop", "asyncio", options=("-v",))
    try:
        (group,) = daemon.call("group", {"action": "list"})
        gid = group["group"]
        sent = daemon.call("send", {"group": gid, "text": "historical findings"})
        hits = daemon.call("search", {"text": "histor find", "group": gid})
        assert [h["id"] for h in hits] == [sent["id"]]
        assert daemon.call("search", {"text": "histo", "user": "dcarol"}) == []
        changed = daemon.call("group", {"action": "add", "group": gid, "user": "dana"})
        assert changed["action"] == "add" and "dana" in changed["members"]
        not_admin = daemon.error("group", {"action": "rename", "group": gid})
        assert not_admin["code"] == -32602
    finally:
        daemon.close_stdin()
        code, err = daemon.wait()
    assert code == 0, err
    assert "event loop: asyncio" in err  # the option, not the default (uvloop where installed)


def test_shutdown_answers_a_request_still_waiting_for_the_relay(
    cli: Cli, relay: Relay, accounts: Any, tmp_path: Path
) -> None:
    # Last in the module: it stops the shared relay for a while.
    path = socket_path(tmp_path)
    daemon = SocketDaemon(cli, "ddave", "--socket", str(path), "--network-timeout", "5")
    try:
        client = daemon.connect()
        client.call("contacts")  # the daemon answers: the account is open
        relay.stop()
        try:
            waiting = client.request("send", {"to": "dbob", "text": "queued at shutdown"})
            client.until(
                lambda: any(
                    m["text"] == "queued at shutdown" and m["status"] == "pending"
                    for m in client.call("history", {"user": "dbob"})
                ),
                "the message in the outbox",
            )
            daemon.proc.send_signal(signal.SIGTERM)
            answer = client.response(waiting)
            assert answer["error"]["code"] == 1003, answer
            assert answer["error"]["data"]["exit_status"] == 3
            assert daemon.proc.wait(timeout=60) == 0
        finally:
            relay.start()
    finally:
        daemon.kill()
    # The message stayed queued, and goes out with the next command that connects.
    (pending,) = [
        m
        for m in cli("ddave", "history", "dbob", "--json").records
        if m["text"] == "queued at shutdown"
    ]
    assert pending["status"] == "pending"
    cli("ddave", "receive")
    got = cli("dbob", "receive", "--json").of_type("message")
    assert [m["text"] for m in got if m["id"] == pending["id"]] == ["queued at shutdown"]


def test_devices_recovery_key_backup_and_sealed_methods(
    cli: Cli, relay: Relay, accounts: Any, tmp_path: Path
) -> None:
    """The account commands added with linked devices, backups and sealed sender are methods
    too: a device is linked, listed and removed through the daemon, a new recovery key and a
    backup are made through it, sealed messages are refused and accepted again, with the
    CLI's records as results."""
    pw = tmp_path / "pw"
    pw.write_text("daemon backup passphrase\n")
    cli("dfay", "--passphrase-file", str(pw), "init", "dfay", "--relay", relay.url)
    daemon = StdioDaemon(cli, "dfay", "--passphrase-file", str(pw))
    try:
        (only,) = daemon.call("devices")
        assert only["type"] == "device" and only["id"] == 1 and only["this_device"] is True
        proc = cli.start("dfay-laptop", "link", "--relay", relay.url, "--timeout", "60")
        code = read_link_code(proc, as_json=False)
        added = daemon.call("devices", {"action": "add", "code": code, "name": "laptop"})
        assert added == {
            "type": "device_added",
            "id": added["id"],
            "name": "laptop",
            "username": "dfay",
            "history": False,
        }
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
        listed = {d["id"]: d for d in daemon.call("devices", {"action": "list"})}
        assert set(listed) == {1, added["id"]} and listed[added["id"]]["name"] == "laptop"
        ourselves = daemon.error("devices", {"action": "remove", "id": 1})
        assert ourselves["code"] == -32602 and "this device" in ourselves["message"]
        removed = daemon.call("devices", {"action": "remove", "id": added["id"]})
        assert removed == {"type": "device_removed", "id": added["id"]}
        assert [d["id"] for d in daemon.call("devices")] == [1]
        assert daemon.error("devices", {"action": "rename"})["code"] == -32602

        key = daemon.call("recovery-key")
        assert key["type"] == "recovery_key" and key["username"] == "dfay"
        assert len(key["recovery_key"]) > 20

        out_file = tmp_path / "dfay.backup"
        made = daemon.call("backup", {"action": "create", "out": str(out_file)})
        assert made["type"] == "backup" and made["username"] == "dfay"
        assert out_file.stat().st_size == made["size"] > 0
        restore = daemon.error("backup", {"action": "restore", "out": str(out_file)})
        assert restore["code"] == -32602 and "new data directory" in restore["message"]

        assert daemon.call("sealed") == {"type": "sealed", "sending": True, "accepting": True}
        refused = daemon.call("sealed", {"action": "refuse"})
        assert refused == {"type": "sealed", "sending": True, "accepting": False}
        assert daemon.call("sealed", {"action": "status"})["accepting"] is False
        assert daemon.call("sealed", {"action": "accept"})["accepting"] is True
        assert daemon.error("sealed", {"action": "off"})["code"] == -32602
    finally:
        daemon.close_stdin()
        code_, err_ = daemon.wait()
    assert code_ == 0, err_
    no_passphrase = StdioDaemon(cli, "dbob")
    try:
        refused = no_passphrase.error("backup", {"action": "create", "out": str(tmp_path / "x")})
        assert refused["data"]["error"] == "CliError" and "passphrase" in refused["message"]
        assert not (tmp_path / "x").exists()
    finally:
        no_passphrase.close_stdin()
        no_passphrase.wait()
