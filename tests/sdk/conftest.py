"""Fixtures for the SDK tests: an in-process fake relay and clients connected to it.

The fake relay follows docs/relay-api.md where the client depends on it: the
device-list check (``MismatchedDevices``), idempotent sends by (sender, id),
per-device mailboxes delivered in order until acknowledged, one-time prekeys
handed out once, content-addressed blobs. It also lets tests misbehave like a
network: go down (``relay.restart()``), or drop chosen messages (``relay.drop``).

Fixtures (pytest cannot import helpers from a conftest, so they are fixtures):

* ``relay`` -- a :class:`FakeRelay`.
* ``make_client(name, **kw) -> Client`` -- a registered client (not started) in
  its own data directory; closed at the end of the test.
* ``wait_for`` -- ``await wait_for(events, predicate, timeout=5)`` returns the first
  event from the async iterator ``events`` that matches.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from e2ee.client import Client, ClientOptions, RelayLink
from e2ee.events import Event
from e2ee.store.sealing import KdfLimits
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import (
    ConnectionFailed,
    ConnectionLost,
    MismatchedDevices,
    NotConnected,
    NotFound,
    UsernameTaken,
)
from e2ee.transport.frames import Delivery, QueueEmpty

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
FAST = ClientOptions(backoff_base=0.02, backoff_max=0.1, expiry_interval=0.05, ack_delay=0.005)


class FakeRelay:
    """An in-process relay holding everything in memory."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[int, dict[str, Any]]] = {}
        self.mailboxes: dict[tuple[str, int], list[Delivery]] = {}
        self.seq = 0
        self.seen: set[tuple[str, int, bytes]] = set()
        self.live: dict[tuple[str, int], FakeLink] = {}
        self.blobs: dict[str, bytes] = {}
        self.down = False
        #: Return True to drop a message silently: (sender, recipients, body).
        self.drop: Callable[[str, Sequence[tuple[str, int]], bytes], bool] | None = None
        self.sends = 0

    def link(self, signer: DeviceSigner, url: str) -> FakeLink:
        return FakeLink(self, signer.user, signer.device)

    async def restart(self, downtime: float = 0.05) -> None:
        """Drop every connection and refuse new ones for ``downtime`` seconds."""
        self.down = True
        for link in list(self.live.values()):
            link.kill()
        await asyncio.sleep(downtime)
        self.down = False

    def pending(self, user: str, device: int = 1) -> int:
        return len(self.mailboxes.get((user, device), []))


class FakeLink(RelayLink):
    def __init__(self, relay: FakeRelay, user: str, device: int) -> None:
        self.relay = relay
        self.user = user
        self.device = device
        self.queue: asyncio.Queue[Delivery | QueueEmpty | None] | None = None

    @property
    def me(self) -> tuple[str, int]:
        return (self.user, self.device)

    async def register(self) -> None:
        if self.user in self.relay.devices:
            raise UsernameTaken(409, "username_taken")
        self.relay.devices[self.user] = {self.device: {"prekeys": {}}}

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        entry = self.relay.devices[self.user][self.device]
        entry["identity_key"] = keys["identity_key"]
        entry["registration_id"] = keys["registration_id"]
        if keys.get("signed_prekey"):
            entry["signed_prekey"] = keys["signed_prekey"]
        for k in keys.get("one_time_prekeys", []):
            entry["prekeys"][k["id"]] = k
        return len(entry["prekeys"])

    async def prekey_count(self) -> int:
        if self.relay.down:
            raise ConnectionFailed("relay down")
        return len(self.relay.devices[self.user][self.device]["prekeys"])

    async def fetch_bundles(self, user: str) -> list[Mapping[str, Any]]:
        if user not in self.relay.devices:
            raise NotFound(404, "unknown_user")
        out = []
        for device, entry in sorted(self.relay.devices[user].items()):
            if "signed_prekey" not in entry:
                continue
            prekeys = entry["prekeys"]
            otpk = prekeys.pop(min(prekeys)) if prekeys else None
            out.append(
                {
                    "device_id": device,
                    "registration_id": entry["registration_id"],
                    "identity_key": entry["identity_key"],
                    "signed_prekey": entry["signed_prekey"],
                    "one_time_prekey": otpk,
                }
            )
        return out

    async def connect(self) -> None:
        if self.relay.down:
            raise ConnectionFailed("relay down")
        old = self.relay.live.get(self.me)
        if old is not None and old is not self:
            old.kill()
        self.queue = asyncio.Queue()
        self.relay.live[self.me] = self
        for delivery in self.relay.mailboxes.get(self.me, []):
            self.queue.put_nowait(delivery)
        self.queue.put_nowait(QueueEmpty())

    def kill(self) -> None:
        if self.queue is not None:
            self.queue.put_nowait(None)
        self.queue = None
        if self.relay.live.get(self.me) is self:
            del self.relay.live[self.me]

    async def deliveries(self) -> AsyncIterator[Delivery | QueueEmpty]:  # type: ignore[override]
        queue = self.queue
        if queue is None:
            raise NotConnected("not connected")
        while True:
            item = await queue.get()
            if item is None:
                raise ConnectionLost("connection closed")
            yield item

    async def send(
        self, message_id: bytes, recipients: Sequence[tuple[str, int]], body: bytes
    ) -> None:
        if self.relay.down:  # no live connection needed: a send-only client sends too
            raise ConnectionLost("relay down")
        await asyncio.sleep(0)
        relay = self.relay
        named = {u for u, _ in recipients}
        unknown = tuple(sorted(u for u in named if u not in relay.devices))
        missing: dict[str, tuple[int, ...]] = {}
        stale: dict[str, tuple[int, ...]] = {}
        for user in named - set(unknown):
            registered = set(relay.devices[user]) - ({self.device} if user == self.user else set())
            listed = {d for u, d in recipients if u == user}
            if registered - listed:
                missing[user] = tuple(sorted(registered - listed))
            if listed - registered:
                stale[user] = tuple(sorted(listed - registered))
        if unknown or missing or stale:
            raise MismatchedDevices(
                409,
                "mismatched_devices",
                "",
                unknown_users=unknown,
                missing_devices=missing,
                stale_devices=stale,
            )
        key = (self.user, self.device, message_id)
        if key in relay.seen:
            return
        relay.seen.add(key)
        relay.sends += 1
        if relay.drop is not None and relay.drop(self.user, recipients, body):
            return
        for recipient in recipients:
            relay.seq += 1
            delivery = Delivery(relay.seq, message_id, self.user, self.device, 0, body)
            relay.mailboxes.setdefault(recipient, []).append(delivery)
            live = relay.live.get(recipient)
            if live is not None and live.queue is not None:
                live.queue.put_nowait(delivery)

    async def ack(self, ids: Sequence[bytes]) -> None:
        if self.queue is None:
            raise ConnectionLost("not connected")
        gone = set(ids)
        box = self.relay.mailboxes.get(self.me, [])
        self.relay.mailboxes[self.me] = [d for d in box if d.id not in gone]

    async def upload_blob(self, path: Path, digest: bytes, progress: Any) -> str:
        data = path.read_bytes()
        assert hashlib.sha256(data).digest() == digest
        blob_id = digest.hex()
        self.relay.blobs[blob_id] = data
        if progress:
            progress(len(data), len(data))
        return blob_id

    async def download_blob(self, blob_id: str, path: Path, progress: Any) -> None:
        if blob_id not in self.relay.blobs:
            raise NotFound(404, "unknown_blob")
        path.write_bytes(self.relay.blobs[blob_id])

    async def disconnect(self) -> None:
        self.kill()

    async def aclose(self) -> None:
        self.kill()


@pytest.fixture
def fast_options() -> ClientOptions:
    """Client options with short delays, for clients a test opens itself."""
    return FAST


@pytest.fixture
def relay() -> FakeRelay:
    return FakeRelay()


@pytest.fixture
async def make_client(
    relay: FakeRelay, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(
        name: str, *, register: bool = True, directory: str | None = None, **kw: Any
    ) -> Client:
        kw.setdefault("options", FAST)
        client = await Client.create(
            tmp_path / (directory or name),
            name,
            "fake://relay",
            link_factory=relay.link,
            kdf_limits=FAST_KDF,
            **kw,
        )
        if register:
            await client.register()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def _wait_for(
    events: AsyncIterator[Event], predicate: Callable[[Event], bool], timeout: float = 5.0
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


# -- a real relay process -------------------------------------------------------------


class RelayProcess:
    """``python -m relay`` on 127.0.0.1, restartable on the same port and data."""

    def __init__(self, data: Path, settings: Mapping[str, str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.data = data
        self.settings = dict(settings)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.data.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--data", str(self.data)]
        for key, value in self.settings.items():
            args += ["--set", f"{key}={value}"]
        log = (self.data / "relay.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        text = (self.data / "relay.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"the relay did not start:\n{text}")

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


REAL_RELAY_SETTINGS = {
    "registration_burst": "100000",
    "prekey_fetch_burst": "100000",
}


@pytest.fixture
def real_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    import importlib.util

    if importlib.util.find_spec("relay.__main__") is None:
        pytest.skip("the relay package is not available")
    proc = RelayProcess(tmp_path / "relay-data", REAL_RELAY_SETTINGS)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def make_real_client(
    real_relay: RelayProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(
        name: str, *, register: bool = True, directory: str | None = None, **kw: Any
    ) -> Client:
        kw.setdefault("options", FAST)
        client = await Client.create(
            tmp_path / f"real-{directory or name}", name, real_relay.url, kdf_limits=FAST_KDF, **kw
        )
        if register:
            await client.register()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
