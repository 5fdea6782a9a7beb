"""Fixtures: the relay as a real subprocess on 127.0.0.1 (free port, temp data dir)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis_support import redis_prefix, throwaway_redis  # noqa: F401  (fixtures)
from relay_harness import QUIET, RelayProcess, start_relay
from relay_testclient import RelayClient


@pytest.fixture(scope="session")
def shared_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay for the whole session (unique usernames keep tests independent)."""
    relay = start_relay(tmp_path_factory.mktemp("relay-shared"), QUIET)
    yield relay
    relay.stop()


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start dedicated relays with specific settings; all are stopped after the test."""
    started: list[RelayProcess] = []

    def factory(
        settings: dict[str, str] | None = None, data_dir: Path | None = None, **kw: list[str]
    ) -> RelayProcess:
        relay = start_relay(
            data_dir or tmp_path / f"relay{len(started)}",
            {**QUIET, **(settings or {})},
            extra_args=kw.get("extra_args", ()),
        )
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
def client(shared_relay: RelayProcess, session: aiohttp.ClientSession) -> RelayClient:
    return RelayClient(shared_relay.url, session)
