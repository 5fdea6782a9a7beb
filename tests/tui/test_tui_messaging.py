"""The real app, driven by Pilot, against a real relay and a real SDK client.

The app's own account is created through the adapter (as the first-run screen
would) and the other side is an :class:`e2ee.client.Client` on the same relay.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from textual.widgets import OptionList
from tui_harness import next_event, screen_text, type_text, until

from e2ee.client import Client
from e2ee.events import MessageReceived, ReceiptUpdated
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import ConfirmScreen, PromptScreen, ReactScreen, SearchScreen
from tui_client.screens.main import MainScreen
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import ComposeArea, MessageList
from tui_client.widgets.status import ConnectionIndicator

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 30)


async def _app_for(opener: Opener, name: str) -> BlindpostApp:
    backend = await opener.create(name, opener_relay(opener), None)
    return BlindpostApp(backend=backend)


def opener_relay(opener: Opener) -> str:
    return opener.relay_url  # type: ignore[attr-defined, no-any-return]


async def _open_chat_with(pilot: Any, user: str) -> MainScreen:
    screen = pilot.app.screen
    assert isinstance(screen, MainScreen)
    await pilot.press("ctrl+n")
    prompt = await until(pilot, lambda: isinstance(pilot.app.screen, PromptScreen))
    assert prompt
    pilot.app.screen.query_one("#prompt-input").value = user
    await pilot.press("enter")
    await until(pilot, lambda: screen.chat_id == direct_chat_id(user))
    return screen


async def _send(pilot: Any, screen: MainScreen, text: str) -> None:
    area = screen.query_one(ComposeArea)
    area.focus()
    area.insert(text)
    await pilot.press("enter")


def _shown(screen: MainScreen) -> list[str | None]:
    return [m.text for m in screen.query_one(MessageList).messages()]


async def test_send_receive_and_receipt_ticks_progress(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    opener = tui_opener("alice")
    opener.relay_url = tui_relay.url  # type: ignore[attr-defined]
    app = await _app_for(opener, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = app.screen
        assert isinstance(screen, MainScreen)
        indicator = screen.query_one(ConnectionIndicator)
        await until(pilot, lambda: indicator.state == "connected")

        screen = await _open_chat_with(pilot, "bob")
        await _send(pilot, screen, "hello bob")
        # The message shows at once (queued), then the ticks move on.
        await until(pilot, lambda: "hello bob" in _shown(screen))
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "hello bob" and got.message.sender == "alice"
        listed = screen.query_one(MessageList)
        mine = listed.messages()[-1]
        await until(pilot, lambda: listed.message(mine.id).status == "delivered")  # type: ignore[union-attr]
        assert "✓✓" in str(listed.get_option(mine.id).prompt)
        assert "read" not in str(listed.get_option(mine.id).prompt)

        await bob.mark_read(direct_chat_id("alice"))
        await until(pilot, lambda: listed.message(mine.id).status == "read")  # type: ignore[union-attr]
        assert "✓✓ read" in str(listed.get_option(mine.id).prompt)

        # Bob answers with a reply; it appears with its quote, and is marked read.
        await bob.send_text("alice", "hi alice", reply_to=got.message.id)
        await until(pilot, lambda: "hi alice" in _shown(screen))
        answer = listed.messages()[-1]
        assert answer.quote_text == "hello bob" and answer.sender == "bob"
        assert "┃ alice: hello bob" in str(listed.get_option(answer.id).prompt)
        read = await next_event(
            bob_events, lambda e: isinstance(e, ReceiptUpdated) and e.status == "read"
        )
        assert read.message_id == answer.id


async def test_reply_react_edit_delete_from_the_keyboard(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    opener = tui_opener("alice")
    opener.relay_url = tui_relay.url  # type: ignore[attr-defined]
    app = await _app_for(opener, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = await _open_chat_with(pilot, "bob")
        await _send(pilot, screen, "first draft")
        await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        listed = screen.query_one(MessageList)
        listed.focus()
        await pilot.press("end")

        # Edit: the compose box is filled, Enter sends the new text.
        await pilot.press("e")
        area = screen.query_one(ComposeArea)
        assert area.text == "first draft"
        area.load_text("final text")
        await pilot.press("enter")
        changed = await next_event(bob_events, lambda e: type(e).__name__ == "MessageChanged")
        assert changed.change == "edited"
        await until(pilot, lambda: listed.messages()[-1].edited)
        assert "(edited)" in str(listed.get_option(listed.messages()[-1].id).prompt)

        # React with the first quick reaction.
        listed.focus()
        await pilot.press("plus")
        await until(pilot, lambda: isinstance(app.screen, ReactScreen))
        await pilot.press("enter")
        await next_event(bob_events, lambda e: type(e).__name__ == "MessageChanged")
        await until(pilot, lambda: listed.messages()[-1].reactions == (("alice", "👍"),))

        # Reply: the next message quotes the selected one.
        listed.focus()
        await pilot.press("r")
        area.insert("replying")
        await pilot.press("enter")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.quote_text == "final text"

        # Delete the first message for everyone.
        listed.focus()
        listed.highlighted = listed.get_option_index(listed.messages()[0].id)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        deleted = await next_event(bob_events, lambda e: type(e).__name__ == "MessageChanged")
        assert deleted.change == "deleted"
        await until(pilot, lambda: listed.messages()[0].deleted)


async def test_incoming_message_in_another_chat_notifies_and_counts_unread(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    opener = tui_opener("alice")
    opener.relay_url = tui_relay.url  # type: ignore[attr-defined]
    app = await _app_for(opener, "alice")
    bells: list[int] = []
    app.bell = lambda: bells.append(1)  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = await _open_chat_with(pilot, "bob")
        await carol.send_text("alice", "psst, it's carol")
        await carol.send_text("alice", "are you there?")
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: (c := chats.get(direct_chat_id("carol"))) and c.unread == 2)
        assert bells, "the terminal bell rang"
        assert any("carol" in str(n.message) for n in app._notifications)
        assert chats.get(direct_chat_id("carol")).last_text == "are you there?"  # type: ignore[union-attr]
        # Most recent activity first.
        assert chats.chat_ids()[0] == direct_chat_id("carol")
        # Filter as you type.
        chats.query_one("#chat-filter").value = "bo"
        await until(pilot, lambda: chats.chat_ids() == [direct_chat_id("bob")])
        # Opening carol's chat shows her messages and clears the count.
        screen.open_chat(direct_chat_id("carol"))
        await until(pilot, lambda: _shown(screen) == ["psst, it's carol", "are you there?"])
        await until(pilot, lambda: chats.get(direct_chat_id("carol")).unread == 0)  # type: ignore[union-attr]
        assert bob is not None


async def test_older_history_loads_when_scrolling_up(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    opener = tui_opener("alice")
    opener.relay_url = tui_relay.url  # type: ignore[attr-defined]
    app = await _app_for(opener, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = app.screen
        assert isinstance(screen, MainScreen)
        for i in range(300):
            await bob.send_text("alice", f"line {i}", wait=False)
        await until(
            pilot,
            lambda: (
                (c := screen.query_one(ChatList).get(direct_chat_id("bob")))
                and c.last_text == "line 299"
            ),
        )
        screen.open_chat(direct_chat_id("bob"))
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: len(listed.messages()) == 60)
        assert listed.messages()[-1].text == "line 299"
        listed.focus()
        await pilot.press("home")
        # Older pages are 50 messages: the newest 60, then 50 at a time, the
        # cursor staying on the message it was on while each page comes in.
        await until(pilot, lambda: len(listed.messages()) == 110)
        assert listed.selected is not None and listed.selected.text == "line 240"
        for count in (160, 210, 260, 300):
            await pilot.press("home")
            await until(pilot, lambda count=count: len(listed.messages()) == count)
        assert [m.text for m in listed.messages()] == [f"line {i}" for i in range(300)]
        assert not listed.has_older


async def test_connection_indicator_counts_queued_messages_while_offline(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    opener = tui_opener("alice")
    opener.relay_url = tui_relay.url  # type: ignore[attr-defined]
    app = await _app_for(opener, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = await _open_chat_with(pilot, "bob")
        await _send(pilot, screen, "while online")
        await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        indicator = screen.query_one(ConnectionIndicator)
        tui_relay.stop()
        await until(pilot, lambda: indicator.state in ("offline", "connecting"))
        await _send(pilot, screen, "written offline")
        await until(pilot, lambda: indicator.queued == 1)
        assert "1 queued" in str(indicator.render())
        # The whole text is on screen: the width follows the text (it was clipped
        # to the width of "● connected").
        shown = str(indicator.render())
        await until(pilot, lambda: indicator.content_region.width >= len(shown))
        assert "1 queued" in screen_text(app)
        listed = screen.query_one(MessageList)
        assert listed.messages()[-1].status == "pending"
        tui_relay.start()
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "written offline"
        await until(pilot, lambda: indicator.state == "connected")
        await until(pilot, lambda: listed.messages()[-1].status in ("sent", "delivered"))
        await until(pilot, lambda: indicator.queued == 0)
        assert str(indicator.render()) == "● connected"


async def test_search_across_the_history_and_open_the_result(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = await _open_chat_with(pilot, "carol")
        await bob.send_text("alice", "the pineapple plan is on")
        await carol.send_text("alice", "nothing to see here")
        await bob.send_text("alice", "and lunch at noon")
        await until(pilot, lambda: "nothing to see here" in _shown(screen))
        await until(pilot, lambda: screen.chat_list.get(direct_chat_id("bob")))
        await pilot.press("ctrl+f")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen))
        dialog = app.screen
        await type_text(pilot, "pineapple")
        results = dialog.query_one("#search-results", OptionList)
        await until(pilot, lambda: results.option_count == 1)
        hit = str(results.get_option_at_index(0).prompt)
        assert hit.startswith("@bob · bob · ") and hit.endswith(": the pineapple plan is on")
        await pilot.press("enter")  # from the input to the results
        await pilot.press("enter")  # open the highlighted result
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        await until(pilot, lambda: screen.chat_id == direct_chat_id("bob"))
        await until(pilot, lambda: "the pineapple plan is on" in _shown(screen))
