"""One relay node's Redis link in process, against our own throwaway redis-server: readiness
follows Redis, and the node recovers by itself, without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from redis_support import ThrowawayRedis

from relay.app import create_app
from relay.config import ConfigError, RelayConfig
from relay.errors import Unavailable
from relay.state import STATE_KEY
from relay.store.memory import MemoryRelayStore


async def wait_for(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def node_config(tmp_path: Path, url: str) -> RelayConfig:
    return RelayConfig(
        data_dir=tmp_path / "d",
        redis_url=url,
        redis_prefix="bp-ready:",
        redis_heartbeat_seconds=0.2,
        redis_presence_ttl_seconds=1.0,
        redis_timeout_seconds=0.5,
        sweep_interval_seconds=0,
        ws_heartbeat_seconds=0,
    )


async def test_readiness_follows_redis_and_recovers_without_restart(
    tmp_path: Path, throwaway_redis: ThrowawayRedis
) -> None:
    app = create_app(node_config(tmp_path, throwaway_redis.url), store=MemoryRelayStore())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        st = app[STATE_KEY]
        node = st.node
        assert node is not None

        async def ready() -> bool:
            return await node.ready() is None

        async def not_ready() -> bool:
            return await node.ready() is not None and not node.is_ready

        await wait_for(ready, "the node to become ready")
        st.require_node_ready()
        throwaway_redis.stop()
        await wait_for(not_ready, "the node to notice Redis is gone")
        with pytest.raises(Unavailable) as caught:
            st.require_node_ready()
        assert caught.value.status == 503 and caught.value.retry_after >= 1
        assert await node.ready() == "not subscribed to Redis"
        throwaway_redis.start()
        await wait_for(ready, "the node to recover")
        st.require_node_ready()
        assert st.metrics.redis_resyncs >= 2  # subscribed at start, and again after the outage
    finally:
        await server.close()


async def test_a_node_started_without_redis_becomes_ready_when_redis_comes(
    tmp_path: Path, throwaway_redis: ThrowawayRedis
) -> None:
    throwaway_redis.stop()
    app = create_app(node_config(tmp_path, throwaway_redis.url), store=MemoryRelayStore())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # does not fail: the node starts not-ready
    try:
        node = app[STATE_KEY].node
        assert node is not None
        assert await node.ready() is not None
        throwaway_redis.start()

        async def ready() -> bool:
            return await node.ready() is None

        await wait_for(ready, "the node to become ready")
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"redis_heartbeat_seconds": 0}, "redis_heartbeat_seconds must be positive"),
        ({"redis_poll_seconds": 0}, "redis_poll_seconds must be positive"),
        ({"redis_timeout_seconds": 0}, "redis_timeout_seconds must be positive"),
        ({"redis_retry_after_seconds": 0}, "redis_retry_after_seconds must be positive"),
        ({"redis_wake_body_bytes": 65537}, "redis_wake_body_bytes must be 0..65536"),
        (
            {"redis_heartbeat_seconds": 5, "redis_presence_ttl_seconds": 5},
            "redis_presence_ttl_seconds must exceed redis_heartbeat_seconds",
        ),
        ({"reuse_port": 2}, "reuse_port must be 0 or 1"),
        ({"reuse_port": 1}, "reuse_port = 1 needs store = postgres and redis_url"),
        (
            {"reuse_port": 1, "store": "postgres", "postgres_dsn": "postgresql://h/db"},
            "reuse_port = 1 needs store = postgres and redis_url",
        ),
        (
            {"reuse_port": 1, "redis_url": "redis://127.0.0.1:6379/0"},
            "reuse_port = 1 needs store = postgres and redis_url",
        ),
    ],
)
def test_node_settings_are_validated(changes: dict[str, object], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        RelayConfig().replace(**changes)


def test_the_redis_url_never_shows_in_the_config_repr() -> None:
    config = RelayConfig(redis_url="redis://:hunter2-secret@127.0.0.1:6379/0")
    assert "hunter2" not in repr(config)
