"""Registration modes (issue 13 item 6): proof of work, invites, closed; against real relay
processes, with the operator's ``blindpost-relay invite`` commands run as real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from relay_testclient import Device, RelayClient, drain_until_empty, new_username

from blindpost_wire.auth import AUTH_FRAME_FIELDS
from blindpost_wire.registration import pow_digest, pow_ok, solve_pow
from relay.config import SETTING_HELP, ConfigError, RelayConfig
from relay.errors import Forbidden
from relay.registration import RegistrationGate, load_or_create_key

ROOT = Path(__file__).resolve().parents[2]


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_pow_mode_needs_a_fresh_valid_solution_for_that_name(relay_factory, session) -> None:
    relay = relay_factory({"registration_pow_difficulty": "8"})
    client = RelayClient(relay.url, session)
    info = await client.registration()
    assert info["mode"] == "pow" and info["difficulty"] == 8 and info["expires_at"] > 0
    dev = Device(new_username())
    r = await client.register(dev, pow={"challenge": info["challenge"], "nonce": 0})
    if pow_ok(pow_digest(info["challenge"], dev.user, 0), 8):  # 1 in 256: nonce 0 solves it
        pytest.skip("nonce 0 happened to be a solution")
    assert r.status == 403 and r.json()["error"] == "pow_invalid"
    r = await client.request(
        dev,
        "POST",
        "/v1/accounts",
        json_body={"username": dev.user, "device_id": 1, "auth_key": dev.auth_key_b64},
    )
    assert r.status == 403 and r.json()["error"] == "pow_required"
    # Work done for another name does not register this one.
    other = new_username()
    nonce = solve_pow(info["challenge"], other, 8)
    if not pow_ok(pow_digest(info["challenge"], dev.user, nonce), 8):
        r = await client.register(dev, pow={"challenge": info["challenge"], "nonce": nonce})
        assert r.status == 403 and r.json()["error"] == "pow_invalid"
    # A forged challenge (the MAC does not verify) with real work on it is refused.
    parts = info["challenge"].split(".")
    forged = ".".join([parts[0], "1", parts[2], parts[3]])
    r = await client.register(
        dev, pow={"challenge": forged, "nonce": solve_pow(forged, dev.user, 1)}
    )
    assert r.status == 403 and r.json()["error"] == "pow_invalid"
    good = {"challenge": info["challenge"], "nonce": solve_pow(info["challenge"], dev.user, 8)}
    assert (await client.register(dev, pow=good)).status == 201
    # Replaying the solution (freshly signed) cannot register the name again.
    r = await client.register(dev, pow=good)
    assert r.status == 409 and r.json()["error"] == "username_taken"
    r = await client.register(Device(dev.user + "x"), pow=good)
    assert r.status == 403


def test_challenges_expire_and_a_raised_difficulty_refuses_easier_ones(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == key  # created once, then read
    assert (tmp_path / "registration.key").stat().st_mode & 0o777 == 0o600
    gate = RegistrationGate(key, 4, ttl_ms=1000)
    ch = gate.issue(now_ms=5000)
    sol = {"challenge": ch.text, "nonce": solve_pow(ch.text, "alice", 4)}
    gate.verify(sol, "alice", now_ms=6000)  # valid until expires_at inclusive
    with pytest.raises(Forbidden) as info:
        gate.verify(sol, "alice", now_ms=6001)
    assert info.value.code == "pow_invalid"
    harder = RegistrationGate(key, 6, ttl_ms=1000)
    with pytest.raises(Forbidden):
        harder.verify(sol, "alice", now_ms=5500)
    stranger = RegistrationGate(b"k" * 32, 4, ttl_ms=1000)  # another relay's key
    with pytest.raises(Forbidden):
        stranger.verify(sol, "alice", now_ms=5500)


async def test_closed_mode_refuses_everyone(relay_factory, session) -> None:
    relay = relay_factory({"registration": "closed"})
    client = RelayClient(relay.url, session)
    assert (await client.registration()) == {"mode": "closed"}
    r = await client.register(Device(new_username()))
    assert r.status == 403 and r.json()["error"] == "registration_closed"


async def test_invite_mode_with_operator_codes(relay_factory, session, tmp_path: Path) -> None:
    """The operator creates codes with `blindpost-relay invite create` against the running
    relay's data directory; each registers one account, once; `invite list` shows who used
    which; no code, a wrong one or an expired one is refused with its own error."""
    data = tmp_path / "relay-data"
    relay = relay_factory({"registration": "invite"}, data_dir=data)
    client = RelayClient(relay.url, session)
    assert (await client.registration()) == {"mode": "invite"}
    made = relay_cli("invite", "create", "--data", str(data), "--count", "2")
    assert made.returncode == 0, made.stderr
    codes = made.stdout.split()
    assert len(codes) == 2 and len(set(codes)) == 2 and all(len(c) >= 20 for c in codes)
    dev = Device(new_username())
    r = await client.register(dev)
    assert r.status == 403 and r.json()["error"] == "invite_required"
    r = await client.register(dev, invite="not-a-code")
    assert r.status == 403 and r.json()["error"] == "invite_invalid"
    assert (await client.register(dev, invite=codes[0])).status == 201
    second = Device(new_username())
    r = await client.register(second, invite=codes[0])
    assert r.status == 403 and r.json()["error"] == "invite_invalid"
    expired = relay_cli("invite", "create", "--data", str(data), "--ttl", "0.001")
    assert expired.returncode == 0, expired.stderr
    r = await client.register(second, invite=expired.stdout.strip())
    assert r.status == 403 and r.json()["error"] == "invite_invalid"
    assert (await client.register(second, invite=codes[1])).status == 201
    listed = relay_cli("invite", "list", "--data", str(data))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()[1:]
    assert len(lines) == 3
    assert sum(f"used by {dev.user}" in line for line in lines) == 1
    assert sum(f"used by {second.user}" in line for line in lines) == 1
    assert sum(line.endswith("expired") for line in lines) == 1
    assert not any(code in listed.stdout for code in codes)  # codes are never stored


def test_invite_commands_fail_cleanly_without_a_relay_database(tmp_path: Path) -> None:
    res = relay_cli("invite", "create", "--data", str(tmp_path / "nothing"))
    assert res.returncode == 1 and "no relay database" in res.stderr
    assert "Traceback" not in res.stderr


async def test_ban_and_unban_on_a_running_relay(relay_factory, session, tmp_path: Path) -> None:
    """`blindpost-relay admin ban USER` against a running relay's data directory: the user's
    live socket closes with 4403 within ban_refresh_seconds, every signed request gets 403
    account_banned, a new WebSocket is refused (header auth: 403, frame auth: close 4403);
    others are untouched; `admin unban` lets the user back in."""
    data = tmp_path / "relay-data"
    relay = relay_factory({"ban_refresh_seconds": "0.1"}, data_dir=data)
    client = RelayClient(relay.url, session)
    mallory = await client.new_device("mallory")
    alice = await client.new_device("alice")
    live = await client.ws(mallory)
    await drain_until_empty(live)
    banned = relay_cli("admin", "ban", mallory.user, "--data", str(data))
    assert banned.returncode == 0, banned.stderr
    msg = await live.receive(timeout=30)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4403
    assert msg.extra == "account_banned"
    r = await client.send(mallory, [alice], b"x")
    assert r.status == 403 and r.json()["error"] == "account_banned"
    r = await client.request(mallory, "GET", "/v1/devices")
    assert r.status == 403 and r.json()["error"] == "account_banned"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws(mallory)
    assert refused.value.status == 403
    frame_auth = await session.ws_connect(relay.url + "/v1/ws")
    signed = client.sign(mallory, "GET", "/v1/ws")
    await frame_auth.send_json(
        {"type": "auth"} | {key: signed[header] for key, header in AUTH_FRAME_FIELDS}
    )
    msg = await frame_auth.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4403
    bob = await client.new_device("bob")
    assert (await client.send(alice, [bob], b"hello")).status == 200  # others are untouched

    missing = relay_cli("admin", "ban", "nobody_here", "--data", str(data))
    assert missing.returncode == 1 and "no user" in missing.stderr
    unbanned = relay_cli("admin", "unban", mallory.user, "--data", str(data))
    assert unbanned.returncode == 0, unbanned.stderr
    for _ in range(300):  # the relay rereads bans every 0.1 s
        r = await client.request(mallory, "GET", "/v1/devices")
        if r.status == 200:
            break
        await asyncio.sleep(0.1)
    assert r.status == 200
    assert (await client.send(mallory, [alice], b"sorry")).status == 200


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"registration": "maybe"}, "registration must be one of open, pow, invite, closed"),
        ({"registration_pow_difficulty": 41}, "registration_pow_difficulty must be 0..40"),
        ({"registration_challenge_ttl_seconds": 0}, "registration_challenge_ttl_seconds must"),
        ({"invite_ttl_seconds": 0}, "invite_ttl_seconds must be positive"),
        ({"max_devices_per_user": 128}, "max_devices_per_user must be 1..127"),
        ({"max_recipient_users": 0}, "max_recipient_users must be positive"),
        ({"mailbox_stranger_max_messages": 3000}, "must not exceed mailbox_sender_max_messages"),
        ({"mailbox_sender_max_bytes": 0}, "mailbox_sender_max_bytes must be positive"),
        ({"account_max_bytes": 0}, "account_max_bytes must be positive"),
        ({"upload_bytes_burst": 1000}, "upload_bytes_burst must be at least max_blob_bytes"),
        ({"lookup_rate": -1}, "lookup_rate must not be negative"),
    ],
)
def test_abuse_limit_settings_are_validated(changes: dict[str, object], expect: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expect)):
        RelayConfig().replace(**changes)


def test_every_setting_has_help() -> None:
    assert {f.name for f in dataclasses.fields(RelayConfig)} <= set(SETTING_HELP)
