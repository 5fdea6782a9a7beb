"""The relay as an operator runs it: start-up, config sources, signals, durability."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from relay_harness import start_relay
from relay_testclient import RelayClient, b64, drain_until_empty, new_mid, next_frame

from relay.config import RelayConfig
from relay.store.base import StoredMessage

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for flag in ("--host", "--port", "--data", "--config", "--set"):
        assert flag in out
    for name in RelayConfig.__dataclass_fields__:
        assert name in out and f"BLINDPOST_RELAY_{name.upper()}" in out, name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("no_such=1", "no_such"),
        ("event_loop=trio", "event_loop must be one of auto, uvloop, asyncio"),
    ],
)
def test_bad_setting_exits_2(tmp_path: Path, setting: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "--data", str(tmp_path), "--set", setting],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("source", ["flag", "environment", "toml"])
@pytest.mark.parametrize("setting", ["workers", "worker_poll_seconds"])
def test_a_config_that_still_sets_workers_is_refused_with_what_to_do(
    tmp_path: Path, source: str, setting: str
) -> None:
    """``workers=N`` is gone (docs/architecture.md, "One scale-out design"): an old
    configuration does not start a relay that silently ignores it, nor fail with a traceback; it
    exits 2 and says how to use more cores instead."""
    args = [sys.executable, "-m", "relay", "--data", str(tmp_path / "d")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    if source == "flag":
        args += ["--set", f"{setting}=2"]
    elif source == "environment":
        env[f"BLINDPOST_RELAY_{setting.upper()}"] = "2"
    else:
        toml = tmp_path / "relay.toml"
        toml.write_text(f"{setting} = 2\n")
        args += ["--config", str(toml)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"setting '{setting}' was removed" in proc.stderr
    for advice in ("several relay nodes", "store = postgres", "redis_url", "reuse_port = 1"):
        assert advice in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_starts_on_an_empty_dir_logs_its_address_and_is_ready(tmp_path: Path) -> None:
    """A fresh data directory is enough to start: the relay logs where it listens and
    answers ready. (How fast it starts is a figure for bench/, not an assertion here: on a
    loaded machine any bound is either loose enough to be useless or flaky.)"""
    relay = start_relay(tmp_path / "fresh")
    try:
        assert f"listening on http://127.0.0.1:{relay.port}" in relay.log_text()
        with urllib.request.urlopen(relay.url + "/healthz/ready", timeout=30) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        assert relay.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("auto", "uvloop" if HAVE_UVLOOP else "asyncio"), ("asyncio", "asyncio")]
    + ([("uvloop", "uvloop")] if HAVE_UVLOOP else []),
)
async def test_event_loop_setting_selects_the_loop(
    tmp_path: Path, setting: str, expected: str
) -> None:
    """Either loop serves the whole path: register, a send, its push, the ack, SIGTERM exit 0."""
    relay = start_relay(tmp_path / "d", {"event_loop": setting})
    try:
        assert f"event loop: {expected}" in relay.log_text()
        async with aiohttp.ClientSession() as session:
            client = RelayClient(relay.url, session)
            alice = await client.new_device()
            bob = await client.new_device()
            ws = await client.ws(bob)
            assert await drain_until_empty(ws) == []
            mid = new_mid()
            assert (await client.send(alice, [bob], b"over " + setting.encode(), mid)).status == 200
            frame = await next_frame(ws)
            assert isinstance(frame, StoredMessage) and frame.message_id == mid
            await ws.send_json({"type": "ack", "ids": [b64(mid)], "ref": "r"})
            assert (await next_frame(ws)) == {"type": "acked", "ref": "r", "count": 1}
            await ws.close()
    finally:
        assert relay.stop() == 0


async def test_env_and_toml_settings_apply(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text("[relay]\nmax_recipients = 1\nmax_message_bytes = 100\n")
    relay = start_relay(
        tmp_path / "d",
        extra_args=["--config", str(toml)],
        env_extra={"BLINDPOST_RELAY_MAX_MESSAGE_BYTES": "10"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            client = RelayClient(relay.url, session)
            alice = await client.new_device()
            bob = await client.new_device()
            carol = await client.new_device()
            assert (await client.send(alice, [bob], b"x" * 11)).status == 413  # env beats TOML
            assert (await client.send(alice, [bob], b"x" * 10)).status == 200
            assert (await client.send(alice, [bob, carol], b"x")).status == 400  # from TOML
    finally:
        relay.stop()


async def test_sigterm_closes_sockets_1001_exits_0_and_keeps_messages(tmp_path: Path) -> None:
    data = tmp_path / "durable"
    relay = start_relay(data, {"registration_burst": "1000"})
    async with aiohttp.ClientSession() as session:
        client = RelayClient(relay.url, session)
        alice = await client.new_device()
        bob = await client.new_device()
        carol = await client.new_device()
        mids = [new_mid() for _ in range(5)]
        for mid in mids:
            assert (await client.send(alice, [bob], b"keep", mid)).status == 200
        ws = await client.ws(carol)
        await drain_until_empty(ws)
        relay.proc.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await ws.close()
        assert relay.proc.wait(15) == 0
        assert "stopped" in relay.log_text()
        relay2 = start_relay(data)
        try:
            client2 = RelayClient(relay2.url, session)
            got = (await client2.read(bob)).json()["messages"]
            assert [m["id"] for m in got] == [b64(m) for m in mids]
            # Sequence numbers keep increasing across restarts.
            later = new_mid()
            await client2.send(alice, [bob], b"after restart", later)
            seqs = [m["seq"] for m in (await client2.read(bob)).json()["messages"]]
            assert seqs == sorted(seqs) and len(set(seqs)) == 6
            # Replay protection and accounts survive too.
            assert (await client2.send(alice, [bob], b"keep", mids[0])).status == 200
            assert len((await client2.read(bob)).json()["messages"]) == 6
        finally:
            assert relay2.stop() == 0


async def test_sigterm_closes_a_socket_still_waiting_for_its_auth_frame(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data")
    async with aiohttp.ClientSession() as session:
        # Upgraded without auth headers: the relay waits (up to header_timeout_seconds, 10 s)
        # for the auth frame. Shutdown must not wait for it.
        ws = await session.ws_connect(relay.url + "/v1/ws")
        time.sleep(0.2)  # the relay is now inside its auth-frame read
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await ws.close()
        assert relay.proc.wait(15) == 0
        assert time.monotonic() - started < 5
