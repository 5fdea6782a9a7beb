"""The three-node recipe of docs/self-hosting.md, run for real by its own script.

deploy/three-node/run_local.py brings up what the recipe describes (a PostgreSQL primary and a
streaming replica, a Redis, three relay nodes from deploy/three-node/node*.toml, HAProxy from
deploy/three-node/haproxy.cfg), all real processes on loopback. What a self-hoster relies on:
two clients that HAProxy put on different nodes exchange messages; when the node holding one of
them dies, that client reconnects through the same HAProxy address, lands on a live node, gets
what was sent meanwhile and the flow continues, each message exactly once and in order; HAProxy's
health check takes the dead node out; ``down`` leaves nothing running.

Needs haproxy (Debian: ``apt-get install -y haproxy``): skipped without it, except with
``CI=true``, where a missing haproxy fails with the install command.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from relay_testclient import Device, RelayClient, new_mid, next_frame

from relay.store.base import StoredMessage

ROOT = Path(__file__).resolve().parents[2]
RUN_LOCAL = ROOT / "deploy" / "three-node" / "run_local.py"
INSTALL = "sudo apt-get install -y haproxy"


def _haproxy_installed() -> bool:
    return any(
        os.access(os.path.join(d, "haproxy"), os.X_OK)
        for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin"]
        if d
    )


if not _haproxy_installed():
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            f"haproxy is not installed (the three-node recipe test needs it): {INSTALL}"
        )
    pytest.skip(f"haproxy is not installed: {INSTALL}", allow_module_level=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_LOCAL), *args], capture_output=True, text=True, timeout=300
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _logs(state_dir: Path, tail: int = 2000) -> str:
    """The processes' logs (the last ``tail`` characters of each; 0 = all)."""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
        for p in sorted(state_dir.glob("*.log"))
    )


@pytest.fixture
def recipe(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The recipe's topology, up; torn down (and checked gone) after the test."""
    state_dir = tmp_path / "recipe"
    # Loose registration limits: every client reaches the nodes from HAProxy's one address.
    up = _run(
        "up", str(state_dir), "--set", "registration_burst=1000", "--set", "log_level=WARNING"
    )
    try:
        assert up.returncode == 0, f"{up.stderr}\n{_logs(state_dir)}"
        topology: dict[str, Any] = json.loads(up.stdout)
        yield topology
    finally:
        # ``up`` records what it starts as it goes: ``down`` cleans up after a failed ``up`` too.
        recorded = json.loads((state_dir / "topology.json").read_text())
        logs = _logs(state_dir, tail=0)
        down = _run("down", str(state_dir))
        assert down.returncode == 0, down.stderr
    pids = [n["pid"] for n in recorded["nodes"]] + [
        recorded["redis"]["pid"],
        recorded["haproxy"]["pid"],
    ]
    assert not [pid for pid in pids if _alive(pid)], "down left processes running"
    for role in ("primary", "replica"):
        assert not Path(recorded["postgres"][role]["data"]).exists()
    assert not state_dir.exists()
    # No node hit an unexpected error (the killed one's log ends abruptly, never in a
    # traceback). The one traceback allowed is asyncpg's own warning while the primary is gone
    # (its pool retries reconnecting: that is the recovery, not a failure).
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )", logs)
    unexpected = [
        r
        for r in records
        if "Traceback" in r and not re.search(r"^\S+ \S+ WARNING asyncpg\.pool ", r)
    ]
    assert not unexpected, "\n".join(unexpected)[-4000:]


async def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def connect(front: RelayClient, dev: Device) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """A WebSocket through HAProxy, and the node it reached (HAProxy's X-Blindpost-Node)."""
    ws = await front.ws(dev)
    node = ws._response.headers.get("X-Blindpost-Node", "")
    assert node in {"node1", "node2", "node3"}, node
    hint = await next_frame(ws, timeout=15)
    assert isinstance(hint, dict) and hint["type"] == "hint", hint
    return ws, node


async def receive(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[StoredMessage]:
    """The next ``n`` delivered messages (skipping the backlog's end marker)."""
    out: list[StoredMessage] = []
    while len(out) < n:
        frame = await next_frame(ws, timeout=30)
        if isinstance(frame, StoredMessage):
            out.append(frame)
        else:
            assert isinstance(frame, dict) and frame.get("type") == "empty", frame
    return out


async def assert_nothing_more(ws: aiohttp.ClientWebSocketResponse) -> None:
    """No further message arrives (no duplicate); a backlog's end marker may."""
    while True:
        try:
            frame = await next_frame(ws, timeout=0.5)
        except TimeoutError:
            return
        assert isinstance(frame, dict) and frame.get("type") == "empty", frame


async def haproxy_status(session: aiohttp.ClientSession, stats: str) -> dict[str, str]:
    async with session.get(stats + ";csv") as resp:
        rows = (await resp.text()).splitlines()
    header = rows[0].lstrip("# ").split(",")
    cells = [dict(zip(header, row.split(","), strict=False)) for row in rows[1:]]
    return {
        c["svname"]: c["status"]
        for c in cells
        if c.get("pxname") == "relay_nodes" and c.get("svname", "").startswith("node")
    }


async def test_a_client_of_a_killed_node_reconnects_through_haproxy_and_the_flow_continues(
    recipe: dict[str, Any], session: aiohttp.ClientSession
) -> None:
    front = RelayClient(recipe["front"], session)
    alice, bob = await front.new_device("alice"), await front.new_device("bob")
    ws_a, node_a = await connect(front, alice)
    ws_b, node_b = await connect(front, bob)
    for _ in range(10):  # leastconn puts the second socket elsewhere; make sure of it
        if node_b != node_a:
            break
        await ws_b.close()
        ws_b, node_b = await connect(front, bob)
    assert node_b != node_a

    async def exchange(first: int, count: int) -> None:
        """Alice sends ``count`` messages through HAProxy; Bob gets each once, in order."""
        mids = [new_mid() for _ in range(count)]
        for i, mid in enumerate(mids):
            reply = await front.send(alice, [bob], b"m%d" % (first + i), mid)
            assert reply.status == 200, reply.body
        got = await receive(ws_b, count)
        assert [m.message_id for m in got] == mids
        assert [m.body for m in got] == [b"m%d" % (first + i) for i in range(count)]
        assert (await front.ack(bob, mids)).status == 200

    await exchange(0, 5)

    # The node holding Bob dies (SIGKILL: no goodbye, no clean close).
    dead = next(n for n in recipe["nodes"] if n["name"] == node_b)
    os.kill(dead["pid"], signal.SIGKILL)
    closed = await ws_b.receive(timeout=30)
    assert closed.type in {
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    }
    await ws_b.close()

    # Meanwhile Alice (on a live node) keeps sending: accepted, durably queued for Bob.
    away = [new_mid() for _ in range(3)]
    for i, mid in enumerate(away):
        assert (await front.send(alice, [bob], b"away%d" % i, mid)).status == 200

    # Bob reconnects to the same address; HAProxy sends him to a live node (a connection the
    # dead node refuses is redispatched even before the health check marks it down).
    ws_b, node_b2 = await connect(front, bob)
    assert node_b2 not in {node_b, ""}
    got = await receive(ws_b, len(away))
    assert [m.message_id for m in got] == away
    assert (await front.ack(bob, away)).status == 200

    await exchange(100, 5)

    # The health check takes the dead node out; the other two stay in.
    status = await wait_for(
        lambda: _down_status(session, recipe["stats"], node_b), f"HAProxy marking {node_b} down"
    )
    assert {k: v for k, v in status.items() if k != node_b} == {
        n: "UP" for n in ("node1", "node2", "node3") if n != node_b
    }
    # Alice's socket was never disturbed, and nothing arrived twice for Bob.
    assert not ws_a.closed
    await assert_nothing_more(ws_b)
    await ws_b.close()

    # PostgreSQL failover: messages acknowledged before the primary is lost were on the
    # synchronous replica, and the nodes find the promoted replica by themselves (both servers
    # are in their DSN). While there is no writable server, a send is refused (503) and
    # retried with the same id, which the relay deduplicates.
    before = [new_mid() for _ in range(5)]
    for i, mid in enumerate(before):
        assert (await front.send(alice, [bob], b"before%d" % i, mid)).status == 200
    failover = await asyncio.to_thread(_run, "failover", recipe["state_dir"])
    assert failover.returncode == 0, failover.stderr
    after = [new_mid() for _ in range(5)]
    for i, mid in enumerate(after):
        await wait_for(
            lambda i=i, mid=mid: _accepted(front, alice, bob, b"after%d" % i, mid),
            "a send accepted after the promotion",
        )
    ws_b, _ = await connect(front, bob)
    got = await receive(ws_b, len(before) + len(after))
    assert [m.message_id for m in got] == before + after
    assert (await front.ack(bob, before + after)).status == 200
    await assert_nothing_more(ws_b)
    await ws_a.close()
    await ws_b.close()


async def _accepted(
    front: RelayClient, sender: Device, to: Device, body: bytes, mid: bytes
) -> bool:
    reply = await front.send(sender, [to], body, mid)
    assert reply.status in {200, 503}, reply.body
    return reply.status == 200


async def _down_status(
    session: aiohttp.ClientSession, stats: str, node: str
) -> dict[str, str] | None:
    status = await haproxy_status(session, stats)
    return status if status.get(node, "").startswith("DOWN") else None


def test_the_capacity_bench_measures_the_recipe_as_it_is() -> None:
    """bench/cluster_capacity.py, which produces the capacity figures of docs/self-hosting.md,
    works on the recipe as it stands: a smoke-sized run delivers every message and prints every
    figure. (It once failed unnoticed, after open registration stopped being the default.)"""
    smoke = ["--pairs", "2", "--rate", "40", "--duration", "1", "--idle", "0"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster_capacity.py"), *smoke],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert re.search(r"delivered (\d+) of \1 ", out.stdout), out.stdout
    for figure in ("relay nodes (all three)", "PostgreSQL primary", "PostgreSQL replica"):
        assert re.search(re.escape(figure) + r"\s+\d+ us", out.stdout), out.stdout
    assert re.search(r"redis-server\s+\d+ us", out.stdout), out.stdout
