"""Damaged storage is never served silently (issue 13, item 10).

Each test damages a real SQLite file of a real relay the way disks and operators do: overwritten
pages (here: every full overflow page of the message bodies, so the chains are broken) and a
write-ahead log that lost its tail after a crash. The relay must refuse to start with a clear
message unless ``--accept-data-loss`` is given, find damage it meets while running (log it,
refuse writes, report not ready), and ``blindpost-relay admin check`` must say so.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from relay_harness import ROOT, RelayProcess
from relay_testclient import Device, RelayClient

from relay.integrity import DB_NAME, HWM_NAME, read_high_water

PAGE = 4096
WAL_HEADER, WAL_FRAME = 32, 24 + PAGE
MARK = 0xAB
CEILING = 60.0


async def fill(client: RelayClient, n: int, size: int) -> tuple[Device, Device]:
    """Register alice and bob; alice sends bob ``n`` messages of ``size`` bytes of ``MARK``."""
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    for _ in range(n):
        assert (await client.send(alice, [bob], bytes([MARK]) * size)).status == 200
    return alice, bob


def db_seq(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return int(conn.execute("SELECT v FROM meta WHERE k='seq'").fetchone()[0])


def break_overflow_pages(db: Path) -> int:
    """Overwrite every page holding only message-body bytes (a full overflow page) with noise;
    return how many."""
    data = bytearray(db.read_bytes())
    broken = 0
    for start in range(PAGE, len(data), PAGE):
        page = data[start : start + PAGE]
        if page[4:] == bytes([MARK]) * (PAGE - 4):
            data[start : start + PAGE] = os.urandom(PAGE)
            broken += 1
    db.write_bytes(bytes(data))
    return broken


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", "admin", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=CEILING,
        check=False,
    )


def refused_start(relay: RelayProcess) -> str:
    """Start ``relay``, expecting it to exit with status 1; return its log."""
    with pytest.raises(RuntimeError):
        relay.start()
    assert relay.proc.wait(CEILING) == 1
    log = relay.log_text()
    assert "Traceback" not in log
    return log


async def wait_until_async(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + CEILING
    while not pred():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_lost_wal_tail_refuses_start_unless_accepted(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    data = relay.data_dir
    client = RelayClient(relay.url, session)
    _, bob = await fill(client, 60, 100)
    seq = db_seq(data)
    assert seq >= 60
    # The mark follows the commits (written just after each, off the write path).
    await wait_until_async(lambda: read_high_water(data / HWM_NAME) == seq)
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL  # the log is not checkpointed
    wal = data / f"{DB_NAME}-wal"
    frames = (wal.stat().st_size - WAL_HEADER) // WAL_FRAME
    assert frames > 20
    os.truncate(wal, WAL_HEADER + (frames - 10) * WAL_FRAME)  # the last 10 frames are gone
    # As after a power loss: the shared-memory index (never fsync'd) is rebuilt from the log.
    (data / f"{DB_NAME}-shm").unlink()
    log = refused_start(relay)
    assert "acknowledged messages are missing" in log
    assert f"up to seq {seq}" in log and "--accept-data-loss" in log
    assert admin("check", "--data", str(data)).returncode != 0
    # The operator accepts the loss: the relay serves what is left, and says so.
    relay.extra_args = ["--accept-data-loss"]
    relay.start()
    await session.close()
    async with aiohttp.ClientSession() as s2:
        left = (await RelayClient(relay.url, s2).read(bob, limit=1000)).json()["messages"]
    assert 0 < len(left) < 60
    assert "--accept-data-loss: starting anyway" in relay.log_text()
    relay.stop()
    # Accepted once: later starts need no flag.
    relay.extra_args = []
    relay.start()
    assert admin("check", "--data", str(data)).returncode == 0


async def test_a_kill_before_the_first_mark_write_does_not_block_the_next_start(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    data = relay.data_dir
    client = RelayClient(relay.url, session)
    _, bob = await fill(client, 3, 100)
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    # A SIGKILL between creating the mark file and its first write leaves it empty.
    os.truncate(data / HWM_NAME, 0)
    assert read_high_water(data / HWM_NAME) is None
    relay.start()
    assert len((await RelayClient(relay.url, session).read(bob)).json()["messages"]) == 3
    await wait_until_async(lambda: read_high_water(data / HWM_NAME) == db_seq(data))
    # Anything else that is not a mark is still damage.
    relay.stop()
    (data / HWM_NAME).write_text("garbage\n")
    assert "is not a high-water mark file" in refused_start(relay)


async def test_overwritten_pages_refuse_start_and_admin_check_says_why(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    data = relay.data_dir
    await fill(RelayClient(relay.url, session), 20, 20_000)
    assert admin("check", "--data", str(data)).returncode == 0  # healthy, while running
    assert relay.stop() == 0  # graceful: everything is in the database file
    assert break_overflow_pages(data / DB_NAME) >= 20
    log = refused_start(relay)
    assert "is damaged (quick_check" in log and "--accept-data-loss" in log
    checked = admin("check", "--data", str(data))
    assert checked.returncode == 1
    assert "damaged" in checked.stdout + checked.stderr
    assert "Traceback" not in checked.stdout + checked.stderr


async def test_damage_met_while_running_stops_writes_and_readiness(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    data = relay.data_dir
    client = RelayClient(relay.url, session)
    alice, bob = await fill(client, 20, 20_000)
    assert relay.stop() == 0
    assert break_overflow_pages(data / DB_NAME) >= 20
    # Without the start-up check the damage goes unnoticed until a read meets it.
    relay.settings["startup_check_seconds"] = "0"
    relay.start()
    await session.close()
    async with aiohttp.ClientSession() as s2:
        client = RelayClient(relay.url, s2)
        reply = await client.read(bob, limit=1000)
        assert reply.status == 503 and reply.json()["error"] == "storage_unavailable"
        # From then on: no writes into the damaged file, and not ready.
        sent = await client.send(alice, [bob], b"into the damaged file?")
        assert sent.status == 503 and "Retry-After" in sent.headers
        async with s2.get(relay.url + "/healthz/ready") as resp:
            doc = await resp.json()
            assert resp.status == 503 and doc["checks"]["storage"].startswith("storage damaged")
    log = relay.log_text()
    assert "storage DAMAGED" in log and "Traceback" not in log
