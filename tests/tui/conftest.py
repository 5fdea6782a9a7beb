"""Fixtures for the terminal client tests: a real relay process and SDK clients.

* ``tui_relay`` -- a :class:`relay_harness.RelayProcess` (free port, temp data dir);
  ``@pytest.mark.relay_settings(name=value, ...)`` adds relay settings.
* ``sdk_client(name)`` -- a registered :class:`e2ee.client.Client` (the other side),
  started; closed at the end of the test.
* ``tui_opener(name, **kw)`` -- an :class:`tui_client.adapter.Opener` with fast
  KDF and reconnect settings, for a data directory of the app's own account.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_harness import LOOSE_LIMITS, RelayProcess, start_relay

from e2ee.client import Client, ClientOptions
from e2ee.store.sealing import KdfLimits
from tui_client.adapter import Opener

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
FAST = ClientOptions(backoff_base=0.05, backoff_max=0.2, expiry_interval=0.2, ack_delay=0.005)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "relay_settings(**kw): extra --set options for the tui_relay process"
    )


@pytest.fixture
def tui_relay(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RelayProcess]:
    marker = request.node.get_closest_marker("relay_settings")
    settings = {k: str(v) for k, v in marker.kwargs.items()} if marker else {}
    relay = start_relay(tmp_path / "relay-data", {**LOOSE_LIMITS, **settings})
    yield relay
    relay.stop()


@pytest.fixture
async def sdk_client(
    tui_relay: RelayProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(name: str, *, start: bool = True) -> Client:
        client = await Client.create(
            tmp_path / f"sdk-{name}", name, tui_relay.url, kdf_limits=FAST_KDF, options=FAST
        )
        await client.register()
        clients.append(client)
        if start:
            await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def tui_opener(tmp_path: Path) -> Callable[..., Opener]:
    def make(name: str = "me", **kw: Any) -> Opener:
        return Opener(tmp_path / f"tui-{name}", options=FAST, kdf_limits=FAST_KDF, **kw)

    return make


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings and chat choices of the app stay inside the test's folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("BLINDPOST_TUI_CONFIG", str(tmp_path / "no-such-tui.toml"))
