"""The real relay for the SDK tests: ``python -m relay`` on loopback, restartable in place.

Imported by the SDK test modules as ``sdk_relay`` (a unique module name: pytest puts
each test folder on ``sys.path``, and conftest modules cannot be imported).

The process itself is :class:`relay_harness.RelayProcess` (shared by every test
folder): :meth:`~relay_harness.RelayProcess.restart` stops it (SIGTERM, or SIGKILL
for a crash) and starts it again on the same port with the same data directory, so
clients reconnect to the same URL and find their mailboxes as the relay left them.
What this module adds is what the SDK tests need of a real relay:

* :func:`mailbox` reads a device's mailbox over the relay's HTTP API, signed with
  that device's own key, which is how a test sees what the relay holds for it;
* :meth:`Relay.metrics` and :meth:`Relay.blob_files` read what the relay exposes
  to its operator;
* :func:`reinstall_device` gives a device address a new auth key, as a user with a
  second device would; :class:`RelayPool` starts each test's relay ahead of time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay_harness import LOOSE_LIMITS, RelayProcess

from e2ee.transport.auth import DeviceSigner
from e2ee.transport.frames import Delivery
from e2ee.transport.http import RelayClient


class Relay(RelayProcess):
    """A relay process with loose rate limits, plus what its operator can see."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, LOOSE_LIMITS)

    def metrics(self) -> dict[str, float]:
        """``GET /metrics``, as {sample name with labels: value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def blob_files(self) -> list[Path]:
        """The stored media blobs (``<data>/blobs/ab/abcdef...``), as files on disk."""
        root = self.data_dir / "blobs"
        return sorted(p for p in root.glob("??/*") if p.is_file())


class RelayPool:
    """Hands each test a fresh relay process, started while the previous test ran.

    Starting a relay costs 0.3-1 s (mostly imports); starting the next one in the
    background hides most of it behind the test that is running. Every relay is
    still used by one test only, with a data directory of its own.
    """

    def __init__(self, base: Path) -> None:
        self._base = base
        self._count = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "relay-pool")
        self._spare: concurrent.futures.Future[Relay] | None = None

    def _start_next(self) -> concurrent.futures.Future[Relay]:
        self._count += 1
        relay = Relay(self._base / f"relay-{self._count}")

        def start() -> Relay:
            relay.start()
            return relay

        return self._executor.submit(start)

    def take(self) -> Relay:
        """A started relay for one test (the caller stops it)."""
        ready = self._spare or self._start_next()
        self._spare = self._start_next()
        return ready.result()

    def close(self) -> None:
        if self._spare is not None:
            with contextlib.suppress(Exception):
                self._spare.result().stop()
        self._executor.shutdown()


def http_as(relay: Relay, signer: DeviceSigner) -> RelayClient:
    """A signed HTTP client of the relay acting as ``signer``'s device (use ``async with``)."""
    return RelayClient(relay.url, signer.user, signer.device, signer)


async def mailbox(relay: Relay, signer: DeviceSigner) -> list[Delivery]:
    """What the relay holds for a device (``GET /v1/messages``; nothing is removed)."""
    async with http_as(relay, signer) as http:
        return [delivery async for delivery in http.fetch_all_messages(limit=1000)]


async def reinstall_device(relay: Relay, old: DeviceSigner, new_auth_key: bytes) -> None:
    """The relay side of reinstalling a device: same address, a new auth key.

    Done as the user would with a second device (the SDK has no device-linking API
    yet): the old installation adds a helper device, the helper removes the old
    device (its mailbox and keys go with it) and adds it back with the new
    installation's auth key, then removes itself.
    """
    helper_id = 127
    helper = DeviceSigner.from_seed(os.urandom(32), old.user, helper_id)
    async with http_as(relay, old) as http:
        await http.add_device(helper_id, helper.public_key)
    async with http_as(relay, helper) as http:
        await http.remove_device(old.device)
        await http.add_device(old.device, new_auth_key)
        await http.remove_device(helper_id)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> bool:
    """Poll a condition on another process (the relay) until it holds; bounded.

    For what the relay does after the client moved on (an acknowledgement being
    committed, a key upload by a background task): the client has no event to
    await for it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
