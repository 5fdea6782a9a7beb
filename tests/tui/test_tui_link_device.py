"""Approving a new device from the TUI (F4) and removing one (F5): the real app, a real relay,
a real new device.

The new device waits with its code (the SDK's PendingLink, as `blindpost link` does); the user
types the code and a name into the app's dialog; the new device gets its grant, links, and
receives what a contact sends. A code with a typo is refused with a notice, nothing linked.
The devices dialog lists both devices; removing the other one logs it out at the relay, and
this device itself is not offered for removal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tui_harness import next_event, until

from e2ee.client import Client, PendingLink
from e2ee.errors import E2EEError
from e2ee.events import MessageReceived
from e2ee.store.sealing import KdfLimits
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import ConfirmScreen, DevicesScreen, LinkDeviceScreen
from tui_client.screens.main import MainScreen

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 34)
FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)


async def _main(pilot: Any) -> MainScreen:
    await until(pilot, lambda: isinstance(pilot.app.screen, MainScreen))
    screen = pilot.app.screen
    assert isinstance(screen, MainScreen)
    return screen


async def test_f4_approves_a_new_device_by_its_code(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Path
) -> None:
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    pending = await PendingLink.start(tui_relay.url)
    notices: list[str] = []
    try:
        waiting = asyncio.ensure_future(pending.wait(90, poll_interval=0.1))
        async with app.run_test(size=SIZE) as pilot:
            screen = await _main(pilot)
            original = screen.notify

            def spy(message: str, **kw: Any) -> None:
                notices.append(message)
                original(message, **kw)

            screen.notify = spy  # type: ignore[method-assign]
            # A typo first: refused locally, nothing linked.
            await pilot.press("f4")
            await until(pilot, lambda: isinstance(app.screen, LinkDeviceScreen))
            app.screen.query_one("#link-code").value = "bad" + pending.code.text()[3:]
            await pilot.click("#link-ok")
            await until(pilot, lambda: any("not linked" in n for n in notices))
            assert not waiting.done()

            await pilot.press("f4")
            await until(pilot, lambda: isinstance(app.screen, LinkDeviceScreen))
            app.screen.query_one("#link-code").value = pending.code.text()
            app.screen.query_one("#link-name").value = "laptop"
            await pilot.click("#link-ok")
            await until(pilot, lambda: any("device 2 linked" in n for n in notices))
            grant = await asyncio.wait_for(waiting, 90)
    finally:
        await pending.aclose()
    assert (grant.username, grant.device_id, grant.device_name) == ("alice", 2, "laptop")
    alice2 = await Client.link_device(tmp_path / "alice2", grant, pending.keys, kdf_limits=FAST_KDF)
    try:
        events = alice2.events()
        async with alice2:
            await bob.send_text("alice", "hello laptop")
            got = await next_event(events, lambda e: isinstance(e, MessageReceived))
            assert got.message.text == "hello laptop"
    finally:
        await alice2.close()


def _rows(app: Any) -> list[str]:
    listed = app.screen.query_one("#device-list")
    return [str(listed.get_option_at_index(i).prompt) for i in range(listed.option_count)]


def _status(app: Any) -> str:
    return str(app.screen.query_one("#device-status").render())


async def test_f5_lists_the_devices_and_removes_another_one(
    tui_opener: MakeOpener, tui_relay: Any, tmp_path: Path
) -> None:
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    pending = await PendingLink.start(tui_relay.url)
    try:
        waiting = asyncio.ensure_future(pending.wait(90, poll_interval=0.1))
        assert await backend.approve_device(pending.code.text(), "laptop") == 2
        grant = await asyncio.wait_for(waiting, 90)
    finally:
        await pending.aclose()
    alice2 = await Client.link_device(tmp_path / "alice2", grant, pending.keys, kdf_limits=FAST_KDF)
    app = BlindpostApp(backend=backend)
    try:
        assert [d.device_id for d in await alice2.devices.list()] == [1, 2]
        async with app.run_test(size=SIZE) as pilot:
            await _main(pilot)
            await pilot.press("f5")
            await until(pilot, lambda: isinstance(app.screen, DevicesScreen))
            await until(pilot, lambda: len(_rows(app)) == 2)
            first, second = _rows(app)
            assert first.split()[0] == "1" and "(this device)" in first
            assert second.split()[:2] == ["2", "laptop"] and "(this device)" not in second

            # This device is not removed from here (it would log itself out).
            listed = app.screen.query_one("#device-list")
            listed.highlighted = 0
            await pilot.click("#device-remove-btn")
            await until(pilot, lambda: "that is this device" in _status(app))
            assert isinstance(app.screen, DevicesScreen)

            listed.highlighted = 1
            # A button ignores clicks during its 0.2 s press effect.
            remove = app.screen.query_one("#device-remove-btn")
            await until(pilot, lambda: not remove.has_class("-active"))
            await pilot.click("#device-remove-btn")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: "removed device 2" in _status(app))
            await until(pilot, lambda: len(_rows(app)) == 1)
            assert "(this device)" in _rows(app)[0]
            assert [d.device_id for d in await backend.list_devices()] == [1]
        # The removed device's requests are refused from now on.
        with pytest.raises(E2EEError):
            await alice2.devices.list()
    finally:
        await alice2.close()
