"""Fixtures for tests/transport: a real relay subprocess on 127.0.0.1 and device factories.

* ``relay_url`` (session) -- one relay (:class:`relay_harness.RelayProcess`, loose rate
  limits). Tests use fresh usernames so they stay independent.
* ``start_relay(**settings)`` -- a dedicated relay with ``--set`` overrides, stopped at
  the end of the test (``relay.stop()`` / ``relay.start()`` restart it in place).
* ``new_user()`` -- a fresh unique username.
* ``device(user, device_id)`` -- a :class:`RelayClient` with a fresh signer (closed after
  the test).

Invariant: every process started here is stopped by its fixture.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from relay_harness import LOOSE_LIMITS, RelayProcess
from relay_harness import start_relay as launch_relay

from e2ee.transport.auth import DeviceSigner
from e2ee.transport.http import RelayClient


@pytest.fixture(scope="session")
def relay_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    relay = launch_relay(tmp_path_factory.mktemp("transport-relay"), LOOSE_LIMITS)
    yield relay
    relay.stop()


@pytest.fixture(scope="session")
def relay_url(relay_proc: RelayProcess) -> str:
    return relay_proc.url


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def factory(**settings: str) -> RelayProcess:
        data_dir = tmp_path / f"relay{len(started)}"
        relay = launch_relay(data_dir, {**LOOSE_LIMITS, **settings})
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop()


_counter = itertools.count()


@pytest.fixture
def new_user() -> Callable[[], str]:
    def make() -> str:
        return f"t{next(_counter)}_{uuid.uuid4().hex[:20]}"

    return make


@pytest.fixture
async def device(relay_url: str) -> AsyncIterator[Callable[..., RelayClient]]:
    clients: list[RelayClient] = []

    def make(user: str, device_id: int = 1, url: str | None = None, **kw: object) -> RelayClient:
        signer = DeviceSigner.from_seed(os.urandom(32), user, device_id)
        client = RelayClient(url or relay_url, user, device_id, signer, **kw)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
