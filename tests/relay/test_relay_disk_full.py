"""A full disk: every write answers 503 ``storage_unavailable`` with Retry-After, the relay says
it is not ready, and it recovers by itself once there is room (issue 13, item 9).

How the disk is filled, for real and without privileges: the running relay process gets a small
``RLIMIT_FSIZE`` (``prlimit``, allowed on one's own processes). The kernel then refuses every
write past that offset in any file the process writes, with ``EFBIG`` (CPython ignores
``SIGXFSZ``), exactly where a full disk refuses with ``ENOSPC``: SQLite's write-ahead log cannot
grow (SQLITE_FULL: a short write) and a blob's temp file cannot grow. A tmpfs or loop mount of a
tiny file system would need root; this needs nothing and fails the same system calls.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from relay_harness import RelayProcess
from relay_testclient import RelayClient

from relay.app import create_app
from relay.config import RelayConfig
from relay.state import STATE_KEY

LIMIT = 1024 * 1024  # bytes: the WAL, a few 200 KB messages in, passes it
CEILING = 60.0


async def health(session: aiohttp.ClientSession, url: str, path: str) -> tuple[int, Any]:
    async with session.get(url + path) as resp:
        return resp.status, await resp.json()


async def wait_ready(session: aiohttp.ClientSession, url: str, want: int) -> Any:
    deadline = time.monotonic() + CEILING
    while True:
        status, doc = await health(session, url, "/healthz/ready")
        if status == want or time.monotonic() > deadline:
            assert status == want, doc
            return doc
        await asyncio.sleep(0.1)


async def test_disk_full_is_503_with_retry_after_not_ready_then_recovers(
    relay_factory: Callable[..., RelayProcess], session: aiohttp.ClientSession
) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    assert (await health(session, relay.url, "/healthz/ready"))[0] == 200
    pid = relay.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (LIMIT, hard))
    accepted = 0
    try:
        for _ in range(60):
            reply = await client.send(alice, [bob], os.urandom(200_000))
            if reply.status != 200:
                break
            accepted += 1
        assert reply.status == 503, reply.body
        assert reply.json()["error"] == "storage_unavailable"
        assert int(reply.headers["Retry-After"]) >= 1
        # Not ready while writes fail; alive all the same.
        doc = await wait_ready(session, relay.url, 503)
        assert doc["status"] == "unavailable" and doc["checks"]["storage"] != "ok"
        assert (await health(session, relay.url, "/healthz"))[0] == 503
        assert (await health(session, relay.url, "/healthz/live"))[0] == 200
        # A blob larger than what fits: 503 with Retry-After too, not a 500.
        up = await client.upload_blob(alice, os.urandom(2 * LIMIT))
        assert up.status == 503, up.body
        assert up.json()["error"] == "storage_unavailable"
        assert int(up.headers["Retry-After"]) >= 1
        # Reads of what was acknowledged still work.
        assert (await client.read(bob, limit=1000)).status == 200
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    # Room again: ready after the probe write, and writes go through.
    doc = await wait_ready(session, relay.url, 200)
    assert set(doc["checks"].values()) == {"ok"}
    assert (await client.send(alice, [bob], b"after")).status == 200
    up = await client.upload_blob(alice, os.urandom(2 * LIMIT))
    assert up.status == 201, up.body
    # Nothing acknowledged was lost, nothing refused was stored.
    reply = await client.read(bob, limit=1000)
    assert len(reply.json()["messages"]) == accepted + 1
    log = relay.log_text()
    assert "storage failure" in log and "blob storage failure" in log
    assert "Traceback" not in log


async def test_not_ready_once_shutting_down(tmp_path: Path) -> None:
    app = create_app(RelayConfig(data_dir=tmp_path, sweep_interval_seconds=0))
    async with TestClient(TestServer(app)) as tc:
        resp = await tc.get("/healthz/ready")
        assert resp.status == 200
        await app[STATE_KEY].hub.close_all()  # what SIGTERM does first
        resp = await tc.get("/healthz/ready")
        assert resp.status == 503
        assert (await resp.json())["checks"]["accepting"] == "shutting down"
        assert (await tc.get("/healthz/live")).status == 200
