"""Issue 18: the client people keep open all day, driven by Pilot against a real relay.

The app's own account is created through the adapter; the other side is a real
:class:`e2ee.client.Client` on the same relay process.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from tui_harness import main_screen, screen_text, shown, until

from e2ee.client import Client
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import MessageList

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
