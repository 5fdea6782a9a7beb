"""Fixtures for tests/transport: a real relay subprocess on 127.0.0.1 and device factories.

* ``relay_url`` (session) -- one relay, started as ``python -m relay --host 127.0.0.1
  --port <free> --data <tmp>`` and awaited through ``GET /healthz``. Tests use fresh
  usernames so they stay independent. The whole module skips if ``relay`` cannot be
  imported or does not start (the relay is developed in parallel).
* ``start_relay(**settings)`` -- a dedicated relay with ``--set`` overrides, stopped at
  the end of the test.
* ``new_user()`` -- a fresh unique username.
* ``device(user, device_id)`` -- a :class:`RelayClient` with a fresh signer (closed after
  the test).

Invariant: every process started here is stopped (terminate, then kill) by its fixture.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2ee.transport.auth import DeviceSigner
from e2ee.transport.http import RelayClient

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0
# Generous limits so tests sharing one relay never trip each other's rate limits.
BASE_SETTINGS = {
    "registration_burst": "100000",
    "prekey_fetch_burst": "100000",
}


@dataclass
class RelayProc:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            return resp.status == 200 and json.load(resp).get("status") == "ok"
    except (OSError, ValueError):
        return False


def launch_relay(
    data_dir: Path, settings: dict[str, str] | None = None, port: int | None = None
) -> RelayProc:
    """Start a relay subprocess and wait until ``/healthz`` answers.

    Raises:
        pytest.skip.Exception: ``relay`` is not importable or does not come up.
    """
    if (
        importlib.util.find_spec("relay") is None
        or importlib.util.find_spec("relay.__main__") is None
    ):
        pytest.skip("the relay package cannot be imported")
    data_dir.mkdir(parents=True, exist_ok=True)
    merged = {**BASE_SETTINGS, **(settings or {})}
    last = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = port or _free_port()
        args = [
            sys.executable,
            "-m",
            "relay",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data",
            str(data_dir),
        ]
        for key, value in merged.items():
            args += ["--set", f"{key}={value}"]
        log_path = data_dir / f"relay-{port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        relay = RelayProc(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(relay.url):
                return relay
            time.sleep(0.05)
        relay.stop()
        last = relay.log()
    pytest.skip("the relay did not start:\n" + last[-2000:])


@pytest.fixture(scope="session")
def relay_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    relay = launch_relay(tmp_path_factory.mktemp("transport-relay"))
    yield relay
    relay.stop()


@pytest.fixture(scope="session")
def relay_url(relay_proc: RelayProc) -> str:
    return relay_proc.url


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProc]]:
    started: list[RelayProc] = []

    def factory(_port: str | None = None, _data: str | None = None, **settings: str) -> RelayProc:
        data_dir = Path(_data) if _data else tmp_path / f"relay{len(started)}"
        relay = launch_relay(data_dir, settings, port=int(_port) if _port else None)
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
