"""Fixtures for the terminal client tests: a real relay process and SDK clients.

* ``tui_relay`` -- ``python -m relay`` on 127.0.0.1 (free port, temp data dir);
  ``@pytest.mark.relay_settings(name=value, ...)`` adds relay settings.
* ``sdk_client(name)`` -- a registered :class:`e2ee.client.Client` (the other side),
  started; closed at the end of the test.
* ``tui_opener(name, **kw)`` -- an :class:`tui_client.adapter.Opener` with fast
  KDF and reconnect settings, for a data directory of the app's own account.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2ee.client import Client, ClientOptions
from e2ee.store.sealing import KdfLimits
from tui_client.adapter import Opener

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
FAST = ClientOptions(backoff_base=0.05, backoff_max=0.2, expiry_interval=0.2, ack_delay=0.005)


class TuiRelay:
    """A relay subprocess on loopback."""

    def __init__(self, data: Path, settings: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.data = data
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = {"registration_burst": "100000", "prekey_fetch_burst": "100000"}
        self.settings.update(settings or {})

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--data", str(self.data)]
        for key, value in self.settings.items():
            args += ["--set", f"{key}={value}"]
        with (self.data / "relay.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("the relay did not start:\n" + (self.data / "relay.log").read_text()[-2000:])

    def log(self) -> str:
        """What the relay logged so far."""
        return (self.data / "relay.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "relay_settings(**kw): extra --set options for the tui_relay process"
    )


@pytest.fixture
def tui_relay(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TuiRelay]:
    marker = request.node.get_closest_marker("relay_settings")
    settings = {k: str(v) for k, v in marker.kwargs.items()} if marker else None
    relay = TuiRelay(tmp_path / "relay-data", settings)
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture
async def sdk_client(
    tui_relay: TuiRelay, tmp_path: Path
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
