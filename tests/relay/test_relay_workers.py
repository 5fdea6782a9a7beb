"""``workers=N``: a supervisor and N worker processes on one socket and one database.

What a user relies on (docs/architecture.md, "Scale-out"): two devices served by different
worker processes exchange messages as if there were one process (live and offline, in seq
order, each exactly once); a device has one live connection across all workers; SIGTERM stops
everything cleanly; a crashed worker comes back and no message the relay acknowledged is lost
or delivered again after its ack committed.

Which worker a WebSocket lands on is the kernel's choice. Tests make it deterministic by
reconnecting until the 101 response's ``X-Blindpost-Worker`` header names the wanted worker
(``ws_on``); every other response carries the header too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from relay_harness import RelayProcess, wait_until
from relay_testclient import Device, RelayClient, b64, drain_until_empty, new_mid, next_frame, unb64

from relay.app import create_app
from relay.cluster import (
    WORKER_HEADER,
    ProcessSharedLock,
    WorkerIdentity,
    WorkerLink,
    worker_socket_path,
)
from relay.config import (
    LISTEN_BACKLOG_MAX,
    WORKER_DATAGRAM_BYTES_MAX,
    WORKER_DATAGRAM_BYTES_MIN,
    WORKERS_MAX,
    ConfigError,
    RelayConfig,
)
from relay.state import STATE_KEY
from relay.store.base import Address, Envelope, StoredMessage
from relay.wire import decode_deliver, encode_send

CONNECT_ATTEMPTS = 200  # reconnects until the kernel hands the socket to the wanted worker
_STARTED_RE = re.compile(r"worker (\d+) started pid=(\d+)")


def workers_relay(factory: Callable[..., RelayProcess], n: int = 2) -> RelayProcess:
    return factory({"workers": str(n), "worker_poll_seconds": "30"})


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for m in _STARTED_RE.finditer(relay.log_text()):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_of(ws: aiohttp.ClientWebSocketResponse) -> int:
    # aiohttp keeps the handshake response on the socket object (no public accessor).
    return int(ws._response.headers[WORKER_HEADER])


async def ws_on(client: RelayClient, dev: Device, worker: int) -> aiohttp.ClientWebSocketResponse:
    """Open ``dev``'s WebSocket on ``worker`` (reconnecting until the kernel picks it)."""
    for _ in range(CONNECT_ATTEMPTS):
        ws = await client.ws(dev, heartbeat=None)
        if worker_of(ws) == worker:
            return ws
        await ws.close()
    raise AssertionError(f"no connection landed on worker {worker}")


async def ws_send(ws: aiohttp.ClientWebSocketResponse, to: Device, body: bytes, mid: bytes) -> None:
    await ws.send_bytes(encode_send(Envelope(mid, (to.addr,), body)))


async def wait_send_result(ws: aiohttp.ClientWebSocketResponse, mid: bytes) -> dict[str, object]:
    for _ in range(1000):
        f = await next_frame(ws)
        if isinstance(f, dict) and f.get("type") == "send_result" and f["id"] == b64(mid):
            return f
        assert isinstance(f, dict | StoredMessage), f
    raise AssertionError("no send_result")


async def receive_messages(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[StoredMessage]:
    out: list[StoredMessage] = []
    while len(out) < n:
        f = await next_frame(ws, timeout=10)
        if isinstance(f, StoredMessage):
            out.append(f)
        else:
            assert isinstance(f, dict) and f.get("type") in {"send_result", "acked"}, f
    return out


WS = aiohttp.ClientWebSocketResponse


async def alice_on_0_bob_on_1(
    relay: RelayProcess, session: aiohttp.ClientSession
) -> tuple[
    RelayClient, Device, Device, aiohttp.ClientWebSocketResponse, aiohttp.ClientWebSocketResponse
]:
    """Register alice and bob; open alice's socket on worker 0 and bob's on worker 1, both
    drained (nothing queued)."""
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    ws_a = await ws_on(client, alice, 0)
    ws_b = await ws_on(client, bob, 1)
    assert await drain_until_empty(ws_a) == []
    assert await drain_until_empty(ws_b) == []
    return client, alice, bob, ws_a, ws_b


async def test_clients_on_different_workers_exchange_messages(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = workers_relay(relay_factory)
    client, alice, bob, ws_a, ws_b = await alice_on_0_bob_on_1(relay, session)

    # Live, both directions: each push crosses from the committing worker to the other one.
    mid = new_mid()
    await ws_send(ws_a, bob, b"a->b", mid)
    assert (await wait_send_result(ws_a, mid))["status"] == 200
    got = await receive_messages(ws_b, 1)
    assert [(m.message_id, m.body) for m in got] == [(mid, b"a->b")]
    mid2 = new_mid()
    await ws_send(ws_b, alice, b"b->a", mid2)
    got = await receive_messages(ws_a, 1)
    assert [(m.message_id, m.body) for m in got] == [(mid2, b"b->a")]

    # A pipelined burst from worker 0 plus HTTP sends (any worker): bob on worker 1 sees each
    # exactly once, in increasing seq, and alice's own sends in the order she sent them.
    ws_mids = [new_mid() for _ in range(60)]
    for i, m in enumerate(ws_mids):
        await ws_send(ws_a, bob, b"ws%d" % i, m)
    http_mids = [new_mid() for _ in range(20)]
    for i, m in enumerate(http_mids):
        assert (await client.send(alice, [bob], b"http%d" % i, m)).status == 200
    got = await receive_messages(ws_b, 80)
    seqs = [m.seq for m in got]
    assert seqs == sorted(set(seqs))
    ids = [m.message_id for m in got]
    assert sorted(ids) == sorted(ws_mids + http_mids)
    assert [i for i in ids if i in set(ws_mids)] == ws_mids
    assert [i for i in ids if i in set(http_mids)] == http_mids
    with pytest.raises(asyncio.TimeoutError):
        await ws_b.receive(timeout=0.5)  # nothing more: no duplicate pushes
    done = [b64(i) for i in [mid, *ids]]
    await ws_b.send_str(json.dumps({"type": "ack", "ids": done, "ref": "r"}))
    acked = await next_frame(ws_b)
    assert acked == {"type": "acked", "ref": "r", "count": 81}
    await ws_b.close()

    # Offline, then online on the *other* worker: the backlog arrives in order, once.
    offline = [new_mid() for _ in range(5)]
    for i, m in enumerate(offline):
        await ws_send(ws_a, bob, b"off%d" % i, m)
        assert (await wait_send_result(ws_a, m))["status"] == 200
    ws_b0 = await ws_on(client, bob, 0)
    backlog = await drain_until_empty(ws_b0)
    assert [m.message_id for m in backlog] == offline
    # ...and live pushes continue on that worker after the backlog.
    mid3 = new_mid()
    assert (await client.send(alice, [bob], b"after", mid3)).status == 200
    assert [m.message_id for m in await receive_messages(ws_b0, 1)] == [mid3]
    await ws_a.close()
    await ws_b0.close()


async def test_reconnect_on_another_worker_replaces_the_old_socket(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = workers_relay(relay_factory)
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    old = await ws_on(client, bob, 0)
    await drain_until_empty(old)
    new = await ws_on(client, bob, 1)
    await drain_until_empty(new)
    closed = await old.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
    mid = new_mid()
    assert (await client.send(alice, [bob], b"to the new socket", mid)).status == 200
    assert [m.message_id for m in await receive_messages(new, 1)] == [mid]
    # And back the other way: the newest connection wins whichever worker holds it.
    newest = await ws_on(client, bob, 0)
    await drain_until_empty(newest)
    closed = await new.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
    for ws in (old, new, newest):
        await ws.close()


async def pinned_client(url: str, worker: int) -> RelayClient:
    """A client whose one keep-alive HTTP connection is served by ``worker``."""
    for _ in range(CONNECT_ATTEMPTS):
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=30)
        )
        async with http.get(url + "/healthz") as resp:
            await resp.read()
            if resp.headers[WORKER_HEADER] == str(worker):
                return RelayClient(url, http)
        await http.close()
    raise AssertionError(f"no HTTP connection landed on worker {worker}")


async def test_removed_device_is_closed_and_refused_on_every_worker(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = workers_relay(relay_factory)
    on = [await pinned_client(relay.url, w) for w in (0, 1)]
    try:
        owner = await on[0].new_device("owner")
        second = await on[0].add_device(owner, 2)
        for worker in (0, 1):  # both workers cache the second device's key
            r = await on[worker].request(second, "GET", "/v1/keys/count")
            assert (r.status, r.headers[WORKER_HEADER]) == (200, str(worker))
        ws = await ws_on(RelayClient(relay.url, session), second, 1)
        await drain_until_empty(ws)
        r = await on[0].request(owner, "DELETE", "/v1/devices/2")
        assert (r.status, r.headers[WORKER_HEADER]) == (200, "0")
        closed = await ws.receive(timeout=5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4003
        for worker in (0, 1):  # neither worker accepts the removed device's key any more
            r = await on[worker].request(second, "GET", "/v1/keys/count")
            assert (r.status, r.headers[WORKER_HEADER]) == (401, str(worker))
        await ws.close()
    finally:
        for c in on:
            await c.session.close()


async def test_resync_order_forgets_cached_keys_and_closes_sockets(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    """A worker told to resync (``X``, what a peer sends when it had to drop lines queued for
    it) closes every socket with 1012 and forgets every cached auth key, so a removal whose
    ``R`` line it never got takes effect there too."""
    relay = workers_relay(relay_factory)
    on1 = await pinned_client(relay.url, 1)
    try:
        owner = await on1.new_device("owner")
        second = await on1.add_device(owner, 2)
        r = await on1.request(second, "GET", "/v1/keys/count")  # worker 1 caches the key
        assert (r.status, r.headers[WORKER_HEADER]) == (200, "1")
        ws = await ws_on(RelayClient(relay.url, session), second, 1)
        await drain_until_empty(ws)
        # Worker 1's datagram socket is moved away while worker 0 removes the device: the
        # ``R`` line is lost, and worker 1 still takes the removed device's cached key.
        sock_path = worker_socket_path(relay.data_dir / "run", 1)
        away = sock_path.with_name("away.sock")
        sock_path.rename(away)
        on0 = await pinned_client(relay.url, 0)
        try:
            r = await on0.request(owner, "DELETE", "/v1/devices/2")
            assert (r.status, r.headers[WORKER_HEADER]) == (200, "0")
            await asyncio.sleep(0.5)  # worker 0 sends the line soon after answering
        finally:
            await on0.session.close()
            away.rename(sock_path)
        r = await on1.request(second, "GET", "/v1/keys/count")
        assert (r.status, r.headers[WORKER_HEADER]) == (200, "1")  # the gap the order closes
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            peer.sendto(b"X", os.fspath(sock_path))
        finally:
            peer.close()
        closed = await ws.receive(timeout=5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1012
        r = await on1.request(second, "GET", "/v1/keys/count")
        assert (r.status, r.headers[WORKER_HEADER]) == (401, "1")
        r = await on1.request(owner, "GET", "/v1/keys/count")  # others authenticate again
        assert (r.status, r.headers[WORKER_HEADER]) == (200, "1")
        await ws.close()
    finally:
        await on1.session.close()


async def test_blob_uploaded_on_one_worker_downloads_on_the_other(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = workers_relay(relay_factory)
    on = [await pinned_client(relay.url, w) for w in (0, 1)]
    try:
        dev = await on[0].new_device()
        data = os.urandom(300_000)
        r = await on[0].upload_blob(dev, data)
        assert (r.status, r.headers[WORKER_HEADER]) == (201, "0")
        blob_id = r.json()["id"]
        r = await on[1].request(dev, "GET", f"/v1/blobs/{blob_id}")
        assert (r.status, r.headers[WORKER_HEADER], r.body) == (200, "1", data)
        r = await on[1].upload_blob(dev, data)  # the same bytes again: already stored
        assert (r.status, r.headers[WORKER_HEADER]) == (200, "1")
    finally:
        for c in on:
            await c.session.close()


async def test_sigterm_of_the_supervisor_stops_every_worker_and_exits_0(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = workers_relay(relay_factory, 3)
    pids = worker_pids(relay)
    assert sorted(pids) == [0, 1, 2] and all(alive(p) for p in pids.values())
    client = RelayClient(relay.url, session)
    dev = await client.new_device()
    sockets = [await ws_on(client, dev, w) for w in (2,)]
    await drain_until_empty(sockets[0])
    assert relay.stop(signal.SIGTERM) == 0
    closed = await sockets[0].receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001
    assert not any(alive(p) for p in pids.values())
    assert "during shutdown" not in relay.log_text()
    assert not list((relay.data_dir / "run").glob("*.sock"))
    await sockets[0].close()


async def test_sigkilled_worker_is_restarted_and_nothing_acknowledged_is_lost(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    """Kill the recipient's worker mid-stream, then the sender's, then all workers at once:
    every send answered 200 is delivered, none is delivered again after its ack was confirmed,
    and retried sends (same id) are stored once."""
    relay = workers_relay(relay_factory)
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    bodies: dict[bytes, bytes] = {}
    confirmed: set[bytes] = set()
    seen: dict[bytes, int] = {}  # id -> seq, over every connection of bob
    ack_confirmed: set[bytes] = set()
    violations: list[str] = []

    async def bob_session(worker: int, until_complete: bool) -> None:
        """Receive and ack (one ack per message) until the socket dies, or, if
        ``until_complete``, until the backlog was drained and every confirmed id was seen."""
        ws = await ws_on(client, bob, worker)
        last = 0
        pending: dict[str, list[bytes]] = {}
        n = 0
        drained = False
        try:
            while not (until_complete and drained and confirmed <= seen.keys()):
                msg = await ws.receive(timeout=10)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    m = decode_deliver(msg.data)
                    if m.seq <= last:
                        violations.append(f"seq {m.seq} after {last}")
                    last = m.seq
                    if bodies.get(m.message_id) != m.body:
                        violations.append("unknown or corrupted delivery")
                    if m.message_id in ack_confirmed:
                        violations.append(f"{b64(m.message_id)} delivered after its ack")
                    if seen.setdefault(m.message_id, m.seq) != m.seq:
                        violations.append(f"{b64(m.message_id)} stored twice")
                    n += 1
                    pending[f"r{n}"] = [m.message_id]
                    await ws.send_str(
                        json.dumps({"type": "ack", "ids": [b64(m.message_id)], "ref": f"r{n}"})
                    )
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    doc = json.loads(msg.data)
                    if doc["type"] == "acked":
                        ack_confirmed.update(pending.pop(doc["ref"]))
                    drained = drained or doc["type"] == "empty"
                else:
                    return  # the worker died under us
        finally:
            await ws.close()

    async def alice_sends(worker: int, mids: list[bytes]) -> list[bytes]:
        """Send ``mids`` pipelined over one socket; return those not answered (worker died)."""
        ws = await ws_on(client, alice, worker)
        unanswered = dict.fromkeys(mids)
        for mid in mids:
            await ws_send(ws, bob, bodies[mid], mid)
        try:
            while unanswered:
                msg = await ws.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                doc = json.loads(msg.data)
                if doc.get("type") == "send_result":
                    assert doc["status"] == 200, doc
                    mid = unb64(doc["id"])
                    unanswered.pop(mid, None)
                    confirmed.add(mid)
        finally:
            await ws.close()
        return list(unanswered)

    def new_batch(n: int, tag: str) -> list[bytes]:
        mids = [new_mid() for _ in range(n)]
        for i, m in enumerate(mids):
            bodies[m] = f"{tag}{i}".encode()
        return mids

    # Phase 1: bob on worker 1 receives live; worker 1 is SIGKILLed mid-stream.
    pids = worker_pids(relay)
    bob_task = asyncio.ensure_future(bob_session(1, until_complete=False))
    await asyncio.sleep(0.3)
    first = new_batch(150, "p1-")
    sender = asyncio.ensure_future(alice_sends(0, first))
    while len(ack_confirmed) < 20:
        await asyncio.sleep(0.005)
    os.kill(pids[1], signal.SIGKILL)
    assert await sender == []  # alice's worker is unaffected
    await asyncio.wait_for(bob_task, 15)
    assert wait_until(lambda: worker_pids(relay)[1] != pids[1], 10)
    assert wait_until(lambda: "worker 1 ready" in relay.log_text(), 10)
    assert f"worker 1 pid={pids[1]} exited with -9; restarting" in relay.log_text()

    # Phase 2: alice on worker 0 is SIGKILLed while sends are in flight; she retries the
    # unanswered ids on the restarted worker 0 (idempotent sends).
    second = new_batch(300, "p2-")
    sender = asyncio.ensure_future(alice_sends(0, second))
    while not confirmed & set(second):
        await asyncio.sleep(0.001)
    os.kill(worker_pids(relay)[0], signal.SIGKILL)
    retry = await sender
    assert wait_until(lambda: relay.log_text().count("worker 0 ready") >= 1, 10)
    if retry:
        assert await alice_sends(0, retry) == []

    # Phase 3: every worker is SIGKILLed at once mid-send; the supervisor restarts both.
    third = new_batch(300, "p3-")
    sender = asyncio.ensure_future(alice_sends(1, third))
    while not confirmed & set(third):
        await asyncio.sleep(0.001)
    before = worker_pids(relay)
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    retry = await sender
    assert wait_until(lambda: all(worker_pids(relay)[w] != before[w] for w in (0, 1)), 10)
    if retry:
        assert await alice_sends(1, retry) == []

    # Phase 4: bob (on worker 1) gets everything that was answered 200, once.
    assert confirmed == set(first) | set(second) | set(third)
    await asyncio.wait_for(bob_session(1, until_complete=True), 30)
    assert violations == []
    assert set(seen) == confirmed
    assert relay.proc.poll() is None
    assert relay.stop() == 0


async def test_only_worker_0_runs_the_retention_sweeper(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """Expired messages are removed, every time by worker 0 (rounds with both workers' clocks
    ticking: a sweeper on worker 1 would win some of them)."""
    relay = relay_factory(
        {"workers": "2", "message_ttl_seconds": "0.2", "sweep_interval_seconds": "0.1"}
    )
    on = [await pinned_client(relay.url, w) for w in (0, 1)]
    try:
        alice = await on[0].new_device()
        bob = await on[0].new_device()
        for round_ in range(8):
            for c in on:
                assert (await c.send(alice, [bob], b"expires", new_mid())).status == 200
            done = round_ + 1
            assert wait_until(lambda n=done: relay.log_text().count("sweeper removed") >= n, 5)
        for _ in range(50):  # the last round expires too
            if not (await on[1].read(bob)).json()["messages"]:
                break
            await asyncio.sleep(0.1)
        assert (await on[1].read(bob)).json()["messages"] == []
        sweeps = [line for line in relay.lines if "sweeper removed" in line]
        assert sweeps and all(" w0 " in line for line in sweeps), sweeps
    finally:
        for c in on:
            await c.session.close()


def test_workers_exit_when_the_supervisor_is_killed(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """No orphan keeps serving the port: workers get SIGTERM when the supervisor dies."""
    relay = workers_relay(relay_factory)
    pids = worker_pids(relay)
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    assert wait_until(lambda: not any(alive(p) for p in pids.values()), 15)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", relay.port)) != 0


@pytest.mark.parametrize(
    ("how", "name", "value", "expect"),
    [
        ("flag", "workers", "0", f"workers must be 1..{WORKERS_MAX}"),
        ("flag", "workers", str(WORKERS_MAX + 1), f"workers must be 1..{WORKERS_MAX}"),
        ("env", "workers", "0", f"workers must be 1..{WORKERS_MAX}"),
        ("toml", "workers", "1000", f"workers must be 1..{WORKERS_MAX}"),
        ("flag", "workers", "two", "workers: invalid value 'two'"),
        (
            "flag",
            "worker_datagram_bytes",
            "100",
            "worker_datagram_bytes must be 1024..65536 (got 100)",
        ),
        ("env", "worker_pump_rows", "0", "worker_pump_rows must be positive (got 0)"),
        ("toml", "worker_outbox_max_lines", "0", "worker_outbox_max_lines must be positive"),
        ("flag", "listen_backlog", "0", "listen_backlog must be 1..65535 (got 0)"),
    ],
)
def test_bad_worker_setting_is_refused_clearly(
    tmp_path: Path, how: str, name: str, value: str, expect: str
) -> None:
    args = [sys.executable, "-m", "relay", "--port", "0", "--data", str(tmp_path / "d")]
    args += ["--set", "workers=2"] if name != "workers" else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    if how == "flag":
        args += ["--set", f"{name}={value}"]
    elif how == "env":
        env[f"BLINDPOST_RELAY_{name.upper()}"] = value
    else:
        (tmp_path / "relay.toml").write_text(f"[relay]\n{name} = {value}\n")
        args += ["--config", str(tmp_path / "relay.toml")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert expect in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"worker_pump_rows": 0}, "worker_pump_rows must be positive"),
        ({"worker_pump_bytes": 0}, "worker_pump_bytes must be positive"),
        ({"worker_datagram_bytes": WORKER_DATAGRAM_BYTES_MIN - 1}, "worker_datagram_bytes must"),
        ({"worker_datagram_bytes": WORKER_DATAGRAM_BYTES_MAX + 1}, "worker_datagram_bytes must"),
        ({"worker_outbox_max_lines": 0}, "worker_outbox_max_lines must be positive"),
        ({"worker_stop_grace_seconds": 0}, "worker_stop_grace_seconds must be positive"),
        ({"worker_restart_first_backoff_seconds": 0}, "first_backoff_seconds must be positive"),
        ({"worker_restart_reset_seconds": 0}, "worker_restart_reset_seconds must be positive"),
        ({"worker_pump_bytes": -1}, "worker_pump_bytes must not be negative"),
        ({"listen_backlog": 0}, "listen_backlog must be 1..65535"),
        ({"listen_backlog": LISTEN_BACKLOG_MAX + 1}, "listen_backlog must be 1..65535"),
        ({"worker_pump_rows": 1.5}, "worker_pump_rows must be an integer"),
    ],
)
def test_worker_limits_are_validated(changes: dict[str, object], expect: str) -> None:
    # Checked with workers=1 too: a bad value fails at once, not when workers is raised later.
    for workers in (1, 2):
        with pytest.raises(ConfigError, match=re.escape(expect)):
            RelayConfig(workers=workers).replace(**changes)


def test_worker_limit_bounds_are_accepted() -> None:
    low = RelayConfig().replace(
        worker_pump_rows=1,
        worker_pump_bytes=1,
        worker_datagram_bytes=WORKER_DATAGRAM_BYTES_MIN,
        worker_outbox_max_lines=1,
        listen_backlog=1,
    )
    assert (low.worker_pump_rows, low.worker_datagram_bytes, low.listen_backlog) == (1, 1024, 1)
    high = RelayConfig().replace(
        worker_datagram_bytes=WORKER_DATAGRAM_BYTES_MAX, listen_backlog=LISTEN_BACKLOG_MAX
    )
    assert (high.worker_datagram_bytes, high.listen_backlog) == (65536, 65535)
    defaults = RelayConfig()  # the values the relay used before these were settings
    assert (
        defaults.worker_pump_rows,
        defaults.worker_pump_bytes,
        defaults.worker_datagram_bytes,
        defaults.worker_outbox_max_lines,
        defaults.worker_stop_grace_seconds,
        defaults.worker_restart_first_backoff_seconds,
        defaults.worker_restart_reset_seconds,
        defaults.listen_backlog,
    ) == (1000, 4 * 1024 * 1024, 16 * 1024, 100_000, 15.0, 0.1, 30.0, 4096)


def test_help_documents_workers() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    names = [n for n in RelayConfig.__dataclass_fields__ if n.startswith("worker")]
    assert len(names) >= 10
    for name in [*names, "listen_backlog"]:
        assert f"BLINDPOST_RELAY_{name.upper()}" in out


async def send_all(ws: aiohttp.ClientWebSocketResponse, envelopes: list[Envelope]) -> None:
    """Send ``envelopes`` pipelined over one socket; every one must be answered 200."""
    for env in envelopes:
        await ws.send_bytes(encode_send(env))
    waiting = {b64(env.message_id) for env in envelopes}
    while waiting:
        f = await next_frame(ws, timeout=10)
        if isinstance(f, dict) and f.get("type") == "send_result":
            assert f["status"] == 200, f
            waiting.discard(str(f["id"]))


async def test_small_pump_pages_push_a_burst_completely_and_in_order(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    """With the pump reading 2 rows and 1 body per page, a burst committed on worker 0 reaches a
    device on worker 1 whole, in order, once, past rows of an offline device in between; the
    offline device then gets its backlog and live pushes the same way."""
    relay = relay_factory(
        {
            "workers": "2",
            "worker_poll_seconds": "30",  # pushes come from datagram wake-ups, not the poll
            "worker_pump_rows": "2",
            "worker_pump_bytes": "1",
        }
    )
    client, _alice, bob, ws_a, ws_b = await alice_on_0_bob_on_1(relay, session)
    carol = await client.new_device("carol")

    to = [(carol,), (bob,), (bob, carol)]
    burst = [
        Envelope(new_mid(), tuple(d.addr for d in to[i % 3]), b"m%d-" % i + b"x" * (i * 7))
        for i in range(45)
    ]
    await send_all(ws_a, burst)
    for_bob = [e.message_id for e in burst if bob.addr in e.recipients]
    for_carol = [e.message_id for e in burst if carol.addr in e.recipients]
    got = await receive_messages(ws_b, len(for_bob))
    assert [m.message_id for m in got] == for_bob
    assert [m.seq for m in got] == sorted({m.seq for m in got})
    assert [m.body for m in got] == [e.body for e in burst if bob.addr in e.recipients]
    with pytest.raises(asyncio.TimeoutError):
        await ws_b.receive(timeout=0.5)  # nothing more: no duplicate pushes

    ws_c = await ws_on(client, carol, 1)
    assert [m.message_id for m in await drain_until_empty(ws_c)] == for_carol
    live = [Envelope(new_mid(), (carol.addr,), b"live%d" % i) for i in range(6)]
    await send_all(ws_a, live)
    got = await receive_messages(ws_c, len(live))
    assert [m.message_id for m in got] == [e.message_id for e in live]
    for ws in (ws_a, ws_b, ws_c):
        await ws.close()


async def test_safety_poll_pushes_when_datagrams_are_lost(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    """Worker 1's datagram socket is unlinked, so worker 0's "committed" signals never reach it:
    with worker_poll_seconds=0.2 its safety poll still pushes every message, in order (with the
    30 s poll the other tests use, this would time out)."""
    relay = relay_factory(
        {
            "workers": "2",
            "worker_poll_seconds": "0.2",
            "worker_outbox_max_lines": "1",
            "worker_datagram_bytes": str(WORKER_DATAGRAM_BYTES_MIN),
        }
    )
    _client, _alice, bob, ws_a, ws_b = await alice_on_0_bob_on_1(relay, session)
    worker_socket_path(relay.data_dir / "run", 1).unlink()
    for round_ in range(2):
        burst = [Envelope(new_mid(), (bob.addr,), b"r%d-%d" % (round_, i)) for i in range(20)]
        started = time.monotonic()
        await send_all(ws_a, burst)
        got = await receive_messages(ws_b, len(burst))
        assert [m.message_id for m in got] == [e.message_id for e in burst]
        assert time.monotonic() - started < 5
    with pytest.raises(asyncio.TimeoutError):
        await ws_b.receive(timeout=0.5)
    for ws in (ws_a, ws_b):
        await ws.close()


async def test_datagrams_respect_their_size_and_the_outbox_cap(tmp_path: Path) -> None:
    """One worker's link, in process: lines queued for a peer that is not reading are capped at
    worker_outbox_max_lines; on overflow they are replaced by one resync order ``X`` (attach and
    removal lines must not vanish silently), and what follows it is sent packed in datagrams of
    at most worker_datagram_bytes, whole lines each, in order."""
    config = RelayConfig(
        data_dir=tmp_path / "d",
        workers=2,
        worker_datagram_bytes=WORKER_DATAGRAM_BYTES_MIN,
        worker_outbox_max_lines=40,
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = create_app(config)[STATE_KEY]
    await state.store.open()
    link = WorkerLink(state, WorkerIdentity(0, 2, run_dir), config)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        peer.bind(os.fspath(worker_socket_path(run_dir, 1)))
        peer.setblocking(False)
        await link.start()
        removed = state.device_removed_listener
        assert removed is not None
        users = [f"user_{i:027d}" for i in range(120)]  # 32 characters, the longest username
        for user in users:  # synchronously: the flush runs only after all are queued
            removed(Address(user, 7))
        await asyncio.sleep(0.05)
        datagrams: list[bytes] = []
        with pytest.raises(BlockingIOError):
            while True:
                datagrams.append(peer.recv(WORKER_DATAGRAM_BYTES_MAX))
        assert len(datagrams) >= 2
        assert all(len(d) <= WORKER_DATAGRAM_BYTES_MIN for d in datagrams)
        lines = b"\n".join(datagrams).decode().split("\n")
        # 40 lines fill the box, the 41st turns it into ["X"], 39 more fill it to 40, the 81st
        # resets it again: the peer gets the order and the 39 lines queued after it.
        assert lines == ["X"] + [f"R 7 {u}" for u in users[81:]]
    finally:
        await link.close()
        await state.store.close()
        if isinstance(state.blobs.lock, ProcessSharedLock):
            state.blobs.lock.close()
        peer.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_listen_backlog_sizes_the_accept_queue(
    relay_factory: Callable[..., RelayProcess], workers: int
) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    relay = relay_factory({"workers": str(workers), "listen_backlog": "17"})
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{relay.port}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert out[0] == "LISTEN" and out[2] == "17", out  # Send-Q of a listener is its backlog


def test_restart_backoff_and_stop_grace_settings_apply(
    relay_factory: Callable[..., RelayProcess],
) -> None:
    """A crashed worker waits worker_restart_first_backoff_seconds, doubling per crash until it
    has run worker_restart_reset_seconds; on SIGTERM a stuck worker is killed
    worker_stop_grace_seconds after shutdown_timeout_seconds (not the default 15 s)."""
    relay = relay_factory(
        {
            "workers": "2",
            "worker_restart_first_backoff_seconds": "0.3",
            "worker_restart_reset_seconds": "3",
            "shutdown_timeout_seconds": "0.5",
            "worker_stop_grace_seconds": "0.5",
        }
    )

    def crash_worker_1(times_ready: int) -> None:
        os.kill(worker_pids(relay)[1], signal.SIGKILL)
        assert wait_until(lambda: relay.log_text().count("worker 1 ready") >= times_ready, 10)

    crash_worker_1(1)
    crash_worker_1(2)  # ran well under 3 s: the wait doubles
    time.sleep(3.5)  # ran longer than worker_restart_reset_seconds: the first wait again
    crash_worker_1(3)
    delays = re.findall(
        r"worker 1 pid=\d+ exited with -9; restarting in ([\d.]+) s", relay.log_text()
    )
    assert delays == ["0.3", "0.6", "0.3"]

    os.kill(worker_pids(relay)[0], signal.SIGSTOP)  # stuck: cannot handle SIGTERM
    started = time.monotonic()
    assert relay.stop(signal.SIGTERM) == 1
    assert time.monotonic() - started < 8
    assert "workers did not stop in time; killing them" in relay.log_text()


async def test_blob_lock_excludes_other_processes(tmp_path: Path) -> None:
    """The workers' blob lock is an OS file lock: held here, another process cannot take it."""
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
    )
    path = tmp_path / "blobs.lock"
    lock = ProcessSharedLock(path)

    def other_process_can_lock() -> bool:
        rc = subprocess.run([sys.executable, "-c", probe, str(path)], timeout=30).returncode
        assert rc in (0, 3)
        return rc == 0

    async with lock:
        assert not other_process_can_lock()
    assert other_process_can_lock()
    lock.close()
