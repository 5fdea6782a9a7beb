"""Helpers for Pilot tests (imported by the test modules; not a test file)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from textual.app import App
from textual.pilot import Pilot

from e2ee.events import Event

T = TypeVar("T")
#: The ceiling of a condition wait. Generous on purpose: on a loaded 2-CPU
#: machine a relay round trip plus a Textual refresh took more than 15 s once
#: (issue 18); a wait returns as soon as its condition holds, so a high ceiling
#: costs nothing when things are quick and only decides when a test gives up.
WAIT = 90.0


async def until(pilot: Pilot[Any], check: Callable[[], T], timeout: float = WAIT) -> T:
    """Let the app run until ``check()`` is truthy; return its value.

    Real relay round trips take an unknown time; the app is driven (``pause``)
    between checks instead of sleeping blind.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await pilot.pause(0.05)


async def next_event(
    events: AsyncIterator[Event], match: Callable[[Event], bool], timeout: float = WAIT
) -> Any:
    """The first event from an SDK subscription that matches."""

    async def scan() -> Event:
        async for event in events:
            if match(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(scan(), timeout)


async def type_text(pilot: Pilot[Any], text: str) -> None:
    """Type ``text`` key by key (spaces included)."""
    for ch in text:
        await pilot.press("space" if ch == " " else ch)


def screen_text(app: App[Any]) -> str:
    """What the terminal shows now: the plain text of the screen's lines."""
    strips = app.screen._compositor.render_strips()
    return "\n".join("".join(segment.text for segment in strip) for strip in strips)


async def main_screen(pilot: Pilot[Any]) -> Any:
    """Wait for the chats (the main screen) and return it."""
    from tui_client.screens.main import MainScreen

    await until(pilot, lambda: isinstance(pilot.app.screen, MainScreen))
    return pilot.app.screen


async def open_chat_with(pilot: Pilot[Any], user: str) -> Any:
    """Start a chat with ``user`` the way a user does (Ctrl+N, the name, Enter)."""
    from tui_client.screens.dialogs import PromptScreen

    screen = await main_screen(pilot)
    await pilot.press("ctrl+n")
    await until(pilot, lambda: isinstance(pilot.app.screen, PromptScreen))
    pilot.app.screen.query_one("#prompt-input").value = user
    await pilot.press("enter")
    await until(pilot, lambda: screen.chat_id == f"dm:{user}")
    return screen


async def send(pilot: Pilot[Any], screen: Any, text: str) -> None:
    """Type ``text`` into the compose box and press Enter."""
    from tui_client.widgets.conversation import ComposeArea

    area = screen.query_one(ComposeArea)
    area.focus()
    area.insert(text)
    await pilot.press("enter")


def shown(screen: Any) -> list[str | None]:
    """The texts of the messages in the open chat's list, oldest first."""
    from tui_client.widgets.conversation import MessageList

    return [m.text for m in screen.query_one(MessageList).messages()]
