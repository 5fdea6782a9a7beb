"""``blindpost-relay admin check|stats`` on a running and a stopped relay (real processes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
from relay_harness import RelayProcess
from relay_testclient import RelayClient
from test_relay_integrity import admin


async def test_stats_and_check_on_a_running_then_stopped_relay(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    bob2 = await client.add_device(bob, 2)
    for body in (b"one", b"two"):
        assert (await client.send(alice, [bob, bob2], body)).status == 200
    up = await client.upload_blob(alice, b"z" * 1000)
    assert up.status == 201
    for running in (True, False):
        if not running:
            assert relay.stop() == 0
        done = admin("stats", "--data", str(relay.data_dir), "--json")
        assert done.returncode == 0, done.stderr
        figures = json.loads(done.stdout)
        assert figures["users"] == 2 and figures["devices"] == 3
        assert figures["queued_deliveries"] == 4  # two messages to bob's two devices
        assert figures["queued_bytes"] == 2 * (3 + 3)
        assert figures["blobs"] == 1 and figures["blob_bytes"] == 1000
        assert figures["acknowledged_seq_mark"] == figures["seq"] == 4
        checked = admin("check", "--data", str(relay.data_dir))
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.strip().endswith("healthy")
    text = admin("stats", "--data", str(relay.data_dir))
    assert "users: 2" in text.stdout


def test_commands_on_a_missing_directory_fail_cleanly(tmp_path: Path) -> None:
    for command in ("check", "stats"):
        done = admin(command, "--data", str(tmp_path / "nothing"))
        assert done.returncode == 1
        assert "no relay database" in done.stderr and "Traceback" not in done.stderr
    assert admin("frobnicate").returncode == 2
