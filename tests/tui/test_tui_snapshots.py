"""SVG snapshots of the main screens at 80x24, on fixed data and a fixed clock.

Update after a deliberate visual change with ``pytest tests/tui --snapshot-update``
and review the SVGs under ``tests/tui/__snapshots__``.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tui_fakes import FakeBackend, fixed_clock

from tui_client.adapter import KeyChanged, Opener, TypingChanged
from tui_client.app import BlindpostApp
from tui_client.screens.main import MainScreen
from tui_client.widgets.conversation import MessageList

SIZE = (80, 24)


def _app(backend: FakeBackend | None = None) -> BlindpostApp:
    return BlindpostApp(backend=backend or FakeBackend(), clock=fixed_clock, tz=UTC)


async def _settle(pilot: Any) -> None:
    # A blinking cursor would make the picture depend on the moment it is taken.
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False
    await pilot.pause(0.1)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause(0.1)


def _after_key(key: str) -> Callable[[Any], Awaitable[None]]:
    """What to do before the picture: let the main view settle, press ``key``, settle."""

    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press(key)
        await _settle(pilot)

    return run_before


async def _open(pilot: Any, chat_id: str) -> MainScreen:
    await _settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, MainScreen)
    screen.open_chat(chat_id)
    await _settle(pilot)
    return screen


def test_first_run_screen(snap_compare: Any, tmp_path: Path) -> None:
    app = BlindpostApp(Opener(tmp_path / "new"), clock=fixed_clock, tz=UTC)
    assert snap_compare(app, terminal_size=SIZE, run_before=_settle)


def test_main_view_chat_list_only(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_settle)


def test_conversation_with_ticks_quotes_reactions_and_markers(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        screen = await _open(pilot, "dm:bob")
        screen.query_one(MessageList).focus()
        await _settle(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_key_change_banner_and_typing_indicator(snap_compare: Any) -> None:
    backend = FakeBackend(connected="offline", queued=3)

    async def run_before(pilot: Any) -> None:
        await _open(pilot, "dm:bob")
        backend.push(KeyChanged("bob", "dm:bob", held=True, first_use=False))
        backend.push(TypingChanged("dm:bob", "bob", True))
        await _settle(pilot)

    assert snap_compare(_app(backend), terminal_size=SIZE, run_before=run_before)


def test_group_chat_in_the_light_theme(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _open(pilot, "group:f00d")
        await pilot.press("ctrl+t")
        await _settle(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_contact_info_with_safety_number_and_qr(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _open(pilot, "dm:bob")
        await pilot.press("f2")
        await _settle(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_new_group_dialog(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_after_key("ctrl+g"))


def _sunset_png() -> bytes:
    """A small drawn picture: a sky gradient, a sun and the sea."""
    im = Image.new("RGB", (96, 48))
    draw = ImageDraw.Draw(im)
    for y in range(32):
        draw.line([(0, y), (95, y)], fill=(40 + y * 6, 60 + y * 3, 160 - y * 3))
    draw.ellipse([36, 16, 60, 40], fill=(250, 200, 40))
    draw.rectangle([0, 32, 95, 47], fill=(20, 70, 140))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def test_conversation_with_an_image_preview_and_a_corrupt_image(snap_compare: Any) -> None:
    backend = FakeBackend()
    picture = _sunset_png()
    backend.add_image("dm:erin", "sunset.png", picture)
    backend.add_image("dm:erin", "broken.png", picture[:120])

    async def run_before(pilot: Any) -> None:
        screen = await _open(pilot, "dm:erin")
        listed = screen.query_one(MessageList)
        for _ in range(200):  # the previews are decoded in a worker: at most 10 s
            if all(listed.preview(m.id) is not None for m in listed.messages() if m.attachment):
                break
            await pilot.pause(0.05)
        await _settle(pilot)

    assert snap_compare(_app(backend), terminal_size=(80, 30), run_before=run_before)


def test_own_account_card_from_the_main_view(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_after_key("f3"))


def test_devices_dialog_lists_this_accounts_devices(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_after_key("f5"))
