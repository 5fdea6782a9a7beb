"""Fixtures for the SDK tests: a real relay process and real clients connected to it.

Every client here talks to ``python -m relay`` on 127.0.0.1 through the real
transport (HTTP + WebSocket) and keeps its keys and history in a real SQLite file.
What a test needs to see or do on the relay side it does the way a relay operator
or another device would: restart the process (:meth:`sdk_relay.Relay.restart`),
read a device's mailbox with that device's key (``mailbox``), read ``/metrics``.

Fixtures (pytest cannot import helpers from a conftest, so they are fixtures;
plain helpers live in ``sdk_relay.py``):

* ``relay`` -- a started :class:`sdk_relay.Relay`, one per test (stopped at the end;
  started in the background while the previous test ran, see ``RelayPool``).
* ``make_client(name, **kw) -> Client`` -- a registered client (not started) in
  ``tmp_path / name``; closed at the end of the test.
* ``signers`` -- {(user, device): DeviceSigner} of every client made in the test
  (the key its transport signs with, so a test can act as that device).
* ``mailbox`` -- ``await mailbox(user, device=1)``: what the relay holds for a device.
* ``wait_for`` -- ``await wait_for(events, predicate, timeout=WAIT)`` returns the
  first event from the async iterator ``events`` that matches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay, RelayPool
from sdk_relay import mailbox as read_mailbox

from e2ee.client import Client, ClientOptions, RelayLink, TransportLink
from e2ee.events import Event
from e2ee.store.sealing import KdfLimits
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.frames import Delivery

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
FAST = ClientOptions(backoff_base=0.02, backoff_max=0.1, expiry_interval=0.05, ack_delay=0.005)
#: How long a test waits for something that should happen (generous: shared cores).
WAIT = 15.0

Signers = dict[tuple[str, int], DeviceSigner]


@pytest.fixture
def fast_options() -> ClientOptions:
    """Client options with short delays, for clients a test opens itself."""
    return FAST


@pytest.fixture(scope="session")
def relay_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayPool]:
    pool = RelayPool(tmp_path_factory.mktemp("relays"))
    yield pool
    pool.close()


@pytest.fixture
def relay(relay_pool: RelayPool) -> Iterator[Relay]:
    proc = relay_pool.take()  # a relay of its own, started while the last test ran
    yield proc
    proc.stop()


@pytest.fixture
def signers() -> Signers:
    return {}


@pytest.fixture
async def make_client(
    relay: Relay, tmp_path: Path, signers: Signers
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    def link(signer: DeviceSigner, url: str) -> RelayLink:
        # The SDK's own transport; only the device's key is remembered on the way.
        signers[signer.user, signer.device] = signer
        return TransportLink(signer, url)

    async def make(
        name: str, *, register: bool = True, directory: str | None = None, **kw: Any
    ) -> Client:
        kw.setdefault("options", FAST)
        client = await Client.create(
            tmp_path / (directory or name),
            name,
            relay.url,
            kdf_limits=FAST_KDF,
            link_factory=link,
            **kw,
        )
        clients.append(client)
        if register:
            await client.register()
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def mailbox(relay: Relay, signers: Signers) -> Callable[..., Awaitable[list[Delivery]]]:
    async def read(user: str, device: int = 1) -> list[Delivery]:
        return await read_mailbox(relay, signers[user, device])

    return read


async def _wait_for(
    events: AsyncIterator[Event], predicate: Callable[[Event], bool], timeout: float = WAIT
) -> Event:
    async def scan() -> Event:
        async for event in events:
            if predicate(event):
                return event
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(scan(), timeout)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[Event]]:
    return _wait_for
