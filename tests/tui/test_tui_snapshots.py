"""SVG snapshots of the main screens at 80x24, on fixed data and a fixed clock.

Update after a deliberate visual change with ``pytest tests/tui --snapshot-update``
and review the SVGs under ``tests/tui/__snapshots__``.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

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
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("ctrl+g")
        await _settle(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)
