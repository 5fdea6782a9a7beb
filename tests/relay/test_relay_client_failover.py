"""The SDK and the CLI on a relay of two nodes: when the node a client uses dies, every command
still succeeds through the other URL, and nothing is lost or duplicated (docs/sdk.md, "Several
relay URLs"; docs/cli.md, "init").

Two relay processes on one PostgreSQL database (fresh per test) and one Redis (a fresh key
prefix per test). Clients list node 0 first, so they use it until it is SIGKILLed; a client
opened afterwards starts at the dead node again and must move on by itself, for each command.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import node_settings
from relay_harness import RelayProcess

from e2ee.client import Client, ClientOptions, KdfLimits, group_chat_id
from e2ee.events import Event, GroupChanged, MessageReceived

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
FAST = ClientOptions(backoff_base=0.05, backoff_max=0.5, expiry_interval=0.05, ack_delay=0.005)
WAIT = 30.0
BLINDPOST = Path(sys.executable).parent / "blindpost"


@pytest.fixture
def nodes(
    tmp_path: Path, postgres_database: str, redis_prefix: str
) -> Iterator[list[RelayProcess]]:
    """Two relay nodes on one PostgreSQL database and one Redis prefix."""
    started = [
        RelayProcess(tmp_path / f"node{i}", node_settings(postgres_database, redis_prefix)).start()
        for i in range(2)
    ]
    yield started
    for node in started:
        if node.running:
            node.stop()
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]


async def _wait_for(events: AsyncIterator[Event], predicate: Callable[[Event], bool]) -> None:
    """Until an event that ``predicate`` accepts arrives (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while not predicate(await anext(events)):
            pass


def _received(text: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, MessageReceived) and e.message.text == text


def _texts(client: Client, chat: str) -> list[str]:
    return [m.text for m in client.history.messages(chat, limit=1000)]


async def test_sdk_commands_move_to_the_other_node_when_theirs_is_killed(
    nodes: list[RelayProcess], tmp_path: Path
) -> None:
    n0, n1 = nodes
    urls = [n0.url, n1.url]

    async def create(name: str, relays: list[str]) -> Client:
        client = await Client.create(
            tmp_path / name, name, relays, kdf_limits=FAST_KDF, options=FAST
        )
        await client.register()
        return client

    alice = await create("alice", urls)
    bob = await create("bob", [n1.url])  # bob's node stays up
    assert alice.relay_urls == tuple(urls)
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await alice.wait_connected()
        await alice.send_text("bob", "before")
        await _wait_for(b_events, _received("before"))

        # Node 0 dies under alice's socket; a send right away goes through node 1.
        n0.stop(signal.SIGKILL)
        await asyncio.wait_for(alice.send_text("bob", "right after the kill"), WAIT)
        await _wait_for(b_events, _received("right after the kill"))
        # Receiving resumes on node 1 (alice's socket reconnects there).
        await bob.send_text("alice", "to alice on node 1")
        await _wait_for(a_events, _received("to alice on node 1"))
        await asyncio.wait_for(alice.wait_connected(), WAIT)

        # Blobs: upload and download, both ways.
        source = tmp_path / "photo.bin"
        source.write_bytes(os.urandom(300_000))
        mid = await alice.send_file("bob", source, mime_type="application/octet-stream")
        await _wait_for(b_events, lambda e: isinstance(e, MessageReceived) and e.message.id == mid)
        out = await bob.download_attachment(mid, tmp_path / "at-bob.bin")
        assert out.read_bytes() == source.read_bytes()
        back = await bob.send_file("alice", source, mime_type="application/octet-stream")
        await _wait_for(a_events, lambda e: isinstance(e, MessageReceived) and e.message.id == back)
        got = await alice.download_attachment(back, tmp_path / "at-alice.bin")
        assert (
            hashlib.sha256(got.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )

        # Keys (a new contact's bundles) and groups.
        carol = await create("carol", [n1.url])
        async with carol:
            c_events = carol.events()
            assert await alice.user_exists("carol")
            gid = await alice.create_group("team", ["bob", "carol"])
            await _wait_for(c_events, lambda e: isinstance(e, GroupChanged))
            await alice.send_text(group_chat_id(gid), "hello team")
            await _wait_for(c_events, _received("hello team"))
            await _wait_for(b_events, _received("hello team"))

    # Opened again, alice starts where she ended up (node 1); a new account's first call
    # starts at the dead node and moves on by itself.
    alice = await Client.open(tmp_path / "alice", options=FAST)
    assert alice._link.nodes.current == n1.url  # type: ignore[attr-defined]
    bob = await Client.open(tmp_path / "bob", options=FAST)
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await asyncio.wait_for(alice.send_text("bob", "after reopening"), WAIT)
        await _wait_for(b_events, _received("after reopening"))
        await bob.send_text("alice", "to the reopened alice")
        await _wait_for(a_events, _received("to the reopened alice"))
        # A new account registers through a list whose first node is dead.
        dave = await create("dave", urls)
        await dave.close()

        # Each message exactly once on both sides, in the order sent.
        texts = ["before", "right after the kill", "after reopening"]
        for client, chat in ((alice, "dm:bob"), (bob, "dm:alice")):
            seen = [t for t in _texts(client, chat) if t in texts]
            assert seen == texts, seen


def _blindpost(
    home: Path, name: str, *args: str, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
    env["HOME"] = str(home)
    result = subprocess.run(
        [str(BLINDPOST), "--data", str(home / name), "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if ok:
        assert result.returncode == 0, (
            f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def _records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_cli_init_keeps_every_relay_and_each_command_survives_a_dead_node(
    nodes: list[RelayProcess], tmp_path: Path
) -> None:
    n0, n1 = nodes
    relays = ["--relay", n0.url, "--relay", n1.url]
    (account,) = _records(_blindpost(tmp_path, "erin", "init", "erin", *relays))
    assert account["relays"] == [n0.url, n1.url] and account["relay"] == n0.url
    _blindpost(tmp_path, "fay", "init", "fay", "--relay", n1.url)
    # The same account may be given its nodes again (here: the same list), not another relay.
    _blindpost(tmp_path, "erin", "init", "erin", *relays)
    other = _blindpost(tmp_path, "erin", "init", "erin", "--relay", "http://127.0.0.1:9", ok=False)
    assert other.returncode == 2, other.stderr

    n0.stop(signal.SIGKILL)
    # Every command below is a new process that starts at the dead node and moves on.
    _blindpost(tmp_path, "erin", "send", "fay", "hello after the kill")
    texts = [r.get("text") for r in _records(_blindpost(tmp_path, "fay", "receive"))]
    assert texts.count("hello after the kill") == 1, texts
    _blindpost(tmp_path, "fay", "send", "erin", "hello back")
    received = _records(_blindpost(tmp_path, "erin", "receive"))
    assert [r.get("text") for r in received].count("hello back") == 1, received

    payload = tmp_path / "notes.txt"
    payload.write_bytes(os.urandom(50_000))
    sent = _records(_blindpost(tmp_path, "erin", "send-file", "fay", str(payload)))
    mid = sent[-1]["id"]
    _blindpost(tmp_path, "fay", "receive")
    _blindpost(tmp_path, "fay", "download", mid, "--out", str(tmp_path / "got.txt"))
    assert (tmp_path / "got.txt").read_bytes() == payload.read_bytes()

    created = _records(_blindpost(tmp_path, "erin", "group", "create", "pair", "fay"))
    gid = created[-1]["group"]
    _blindpost(tmp_path, "erin", "send", "--group", gid, "hello group")
    got = [r.get("text") for r in _records(_blindpost(tmp_path, "fay", "receive"))]
    assert got.count("hello group") == 1, got
    # A new account whose first node is dead registers through the second one.
    _blindpost(tmp_path, "gus", "init", "gus", *relays)
