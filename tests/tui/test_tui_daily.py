"""Issue 18: the client people keep open all day, driven by Pilot against a real relay.

The app's own account is created through the adapter; the other side is a real
:class:`e2ee.client.Client` on the same relay process.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from textual._xterm_parser import XTermParser
from textual.events import Key
from tui_harness import (
    main_screen,
    next_event,
    open_chat_with,
    screen_text,
    send,
    shown,
    type_text,
    until,
)

from e2ee.client import Client
from e2ee.events import MessageReceived, ReceiptUpdated
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp, teach_terminal_keys
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import ComposeArea, MessageList

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 30)
DAY_MS = 24 * 3600 * 1000


async def test_yesterdays_messages_keep_their_time_and_the_list_says_yesterday(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    # The app's clock runs a day ahead of bob's: what bob sends now is yesterday's.
    tomorrow = int(time.time() * 1000) + DAY_MS
    app = BlindpostApp(backend=backend, clock=lambda: tomorrow, tz=UTC)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        await bob.send_text("alice", "sent yesterday")
        sent = bob.history.messages(direct_chat_id("alice"))[-1]
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: (c := chats.get(direct_chat_id("bob"))) and c.last_at)
        await until(pilot, lambda: "Yesterday" in screen_text(app))
        assert datetime.fromtimestamp(sent.sent_at / 1000, UTC).strftime("%d %b") not in (
            screen_text(app)
        )
        screen.open_chat(direct_chat_id("bob"))
        await until(pilot, lambda: "sent yesterday" in shown(screen))
        listed = screen.query_one(MessageList)
        row = str(listed.get_option(sent.id).prompt)
        hhmm = datetime.fromtimestamp(sent.sent_at / 1000, UTC).strftime("%H:%M")
        assert hhmm in row, "a message older than today keeps its time of day"
        separator = [str(o.prompt) for o in listed._options if (o.id or "").startswith("day:")]
        assert separator and "Yesterday" in separator[0]


def test_the_terminals_alt_enter_bytes_read_as_alt_enter() -> None:
    teach_terminal_keys()
    parser = XTermParser()
    keys = [e.key for e in [*parser.feed("hi\x1b\r"), *parser.feed("x\r")] if isinstance(e, Key)]
    assert keys == ["h", "i", "alt+enter", "x", "enter"]


async def test_alt_enter_starts_a_new_line_and_enter_sends_both(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_chat_with(pilot, "bob")
        area = screen.query_one(ComposeArea)
        area.focus()
        await type_text(pilot, "first line")
        await pilot.press("alt+enter")
        # The keys typed after it land in the box, on the second line.
        await type_text(pilot, "second")
        assert area.text == "first line\nsecond"
        assert shown(screen) == [], "nothing was sent"
        await pilot.press("enter")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "first line\nsecond"
        await until(pilot, lambda: area.text == "")


async def test_end_jumps_from_the_top_of_a_long_chat_to_the_newest_message(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        for i in range(500):
            await bob.send_text("alice", f"line {i}", wait=False)
        chats = screen.query_one(ChatList)
        await until(
            pilot, lambda: (c := chats.get(direct_chat_id("bob"))) and c.last_text == "line 499"
        )
        first = (await backend.messages(direct_chat_id("bob"), limit=500))[0]
        assert first.text == "line 0"
        # At the top of the chat (as a search hit opens it): older rows only.
        screen.open_chat(direct_chat_id("bob"), around=first.id)
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: listed.selected is not None and listed.selected.text == "line 0")
        assert listed.has_newer
        listed.focus()
        await pilot.press("end")  # one press, not one per 50-message page
        await until(
            pilot, lambda: listed.selected is not None and listed.selected.text == "line 499"
        )
        assert not listed.has_newer
        assert shown(screen)[-1] == "line 499"
