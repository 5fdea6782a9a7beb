"""Real Redis for the relay-node tests: the server at ``BLINDPOST_TEST_REDIS_URL`` (default
the local one), a key prefix unique to each test, and throwaway ``redis-server`` processes on a
free port for the tests that stop Redis (the shared one is never restarted).

Every key a test creates carries its prefix, and the prefix's keys are deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from relay_harness import QUIET

REDIS_URL = os.environ.get("BLINDPOST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def node_settings(postgres_dsn: str, prefix: str, url: str = REDIS_URL) -> dict[str, str]:
    """``--set`` options of a relay node on PostgreSQL + Redis in tests: quiet, and a dead
    node's presence expires within 2 s."""
    return {
        **QUIET,
        "store": "postgres",
        "postgres_dsn": postgres_dsn,
        "redis_url": url,
        "redis_prefix": prefix,
        "redis_heartbeat_seconds": "0.5",
        "redis_presence_ttl_seconds": "2",
    }


def unique_prefix() -> str:
    """A key prefix no other test run uses."""
    return f"bp-test-relay-redis:{uuid.uuid4().hex[:12]}:"


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (end of a test)."""
    r = Redis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def redis_prefix(redis_server: str) -> AsyncIterator[str]:
    """A fresh key prefix on the shared Redis (skipped if it does not answer, failed in CI)."""
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(redis_server, prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayRedis:
    """A ``redis-server`` of our own on a free port, no persistence, stoppable and restartable
    on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: apt-get install redis-server")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the throwaway redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis(tmp_path)
    server.start()
    yield server
    server.stop()
