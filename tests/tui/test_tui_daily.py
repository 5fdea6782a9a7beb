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
from textual.color import Color
from textual.events import AppBlur, AppFocus, Key
from textual.widgets import Input, OptionList
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
from tui_client.adapter import SEARCH_PAGE, Opener
from tui_client.app import BlindpostApp, teach_terminal_keys
from tui_client.screens.dialogs import (
    ConfirmScreen,
    ContactInfoScreen,
    GroupInfoScreen,
    PromptScreen,
    ReactScreen,
    SearchScreen,
)
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import NEW_MARKER, ComposeArea, MessageList

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


def test_the_terminals_alt_digit_bytes_read_as_alt_digits() -> None:
    # A terminal sends Alt+1..9 (the chat-number keys) as ESC and the digit.
    teach_terminal_keys()
    parser = XTermParser()
    keys = [e.key for e in [*parser.feed("\x1b1\x1b9"), *parser.feed("1")] if isinstance(e, Key)]
    assert keys == ["alt+1", "alt+9", "1"]


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


def _luminance(color: Color) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(color.r) + 0.7152 * channel(color.g) + 0.0722 * channel(color.b)


def _contrast(a: Color, b: Color) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _row_strips(listed: MessageList, needle: str) -> list[Any]:
    """The rendered lines of the list that show ``needle``."""
    found = []
    for y in range(listed.size.height):
        strip = listed.render_line(y)
        if needle in "".join(segment.text for segment in strip):
            found.append(strip)
    return found


async def test_cosmetics_names_readable_highlight_whole_row_toasts_and_reactions(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_chat_with(pilot, "bob")
        await bob.send_text("alice", "hello from bob")
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: "hello from bob" in shown(screen))
        # The sender's name is readable on the list's background (WCAG AA: 4.5).
        name = listed._style("sender").color
        background = listed.styles.background
        assert name is not None
        assert _contrast(Color.from_rich_color(name), background) >= 4.5
        # The cursor's highlight covers the whole row, styled spans included.
        listed.focus()
        await pilot.press("end")
        await until(pilot, lambda: listed.selected is not None)
        strips = _row_strips(listed, "bob")
        assert strips
        colours = {s.style.bgcolor for s in strips[0] if s.text.strip() and s.style}
        assert len(colours) == 1, f"the highlighted row has gaps: {colours}"
        # The reaction picker names each emoji once, with a word.
        await pilot.press("plus")
        await until(pilot, lambda: isinstance(app.screen, ReactScreen))
        options = app.screen.query_one("#react-options", OptionList)
        first = str(options.get_option_at_index(0).prompt)
        assert first.count("👍") == 1 and "thumbs up" in first
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        # A message in another chat: the toast is titled with the sender's name.
        await carol.send_text("alice", "psst")
        await until(pilot, lambda: any(n.message.endswith("psst") for n in app._notifications))
        toast = next(n for n in app._notifications if n.message.endswith("psst"))
        assert toast.title == "carol"


async def test_chat_list_previews_files_and_groups_and_badges_verified_contacts(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 not really\n" * 10)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        chats = screen.query_one(ChatList)
        await bob.send_file("alice", report)
        await until(pilot, lambda: (c := chats.get(direct_chat_id("bob"))) and c.last_text)
        assert "report.pdf" in chats.get(direct_chat_id("bob")).last_text  # type: ignore[union-attr]
        # A group with nothing but its creation: its row says what happened.
        gid = await carol.create_group("lunch", ["alice"])
        await until(pilot, lambda: chats.get(f"group:{gid}") is not None)
        await until(pilot, lambda: chats.get(f"group:{gid}").last_text != "")  # type: ignore[union-attr]
        # Verify bob: his row and the chat title carry the badge.
        screen.open_chat(direct_chat_id("bob"))
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, ContactInfoScreen))
        trust = app.screen.query_one("#contact-trust")
        await until(pilot, lambda: "tofu" in str(trust.render()))
        await pilot.press("v")
        await until(pilot, lambda: "verified" in str(trust.render()))
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        await until(pilot, lambda: chats.get(direct_chat_id("bob")).verified)  # type: ignore[union-attr]
        await until(pilot, lambda: "@bob ✓" in screen_text(app))
        assert "✓ verified" in str(screen.query_one("#chat-title").render())


async def test_group_info_reports_success_in_the_success_colour(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        chat_id = await backend.create_group("team", ["bob"])
        screen.open_chat(chat_id)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, GroupInfoScreen))
        dialog = app.screen
        dialog.query_one("#group-rename").value = "team two"
        dialog.query_one("#group-rename").focus()
        await pilot.press("enter")
        status = dialog.query_one("#group-status")
        await until(pilot, lambda: "renamed to team two" in str(status.render()))
        assert status.has_class("dialog-ok") and not status.has_class("dialog-error")
        assert status.styles.color != dialog.query_one("#group-status").app.current_theme.error


async def test_the_chat_filter_goes_once_a_chat_is_opened(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        await bob.send_text("alice", "hi")
        await carol.send_text("alice", "hello")
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: len(chats.chat_ids()) == 2)
        await pilot.press("ctrl+l")
        await type_text(pilot, "bo")
        await until(pilot, lambda: chats.chat_ids() == [direct_chat_id("bob")])
        await pilot.press("enter")
        await until(pilot, lambda: screen.chat_id == direct_chat_id("bob"))
        # Carol writes again: her chat is listed, not hidden by the old filter.
        await carol.send_text("alice", "still there?")
        await until(pilot, lambda: (c := chats.get(direct_chat_id("carol"))) and c.unread == 2)
        assert direct_chat_id("carol") in chats.chat_ids()
        assert chats.query_one("#chat-filter", Input).value == ""


async def test_delete_for_everyone_and_overwriting_a_file_ask_first(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    notes = tmp_path / "notes.txt"
    notes.write_text("bob's notes\n")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_chat_with(pilot, "bob")
        await send(pilot, screen, "oops")
        await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        listed = screen.query_one(MessageList)
        listed.focus()
        await pilot.press("end")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")  # changed my mind
        await until(pilot, lambda: app.screen is screen)
        assert not listed.messages()[-1].deleted
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        changed = await next_event(bob_events, lambda e: type(e).__name__ == "MessageChanged")
        assert changed.change == "deleted"
        await until(pilot, lambda: listed.messages()[-1].deleted)

        # Saving a file over an existing one asks; "no" keeps the old file.
        await bob.send_file("alice", notes)
        await until(pilot, lambda: listed.messages()[-1].attachment is not None)
        target = tmp_path / "mine.txt"
        target.write_text("my own file\n")
        await pilot.press("end")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("#prompt-input", Input).value = str(target)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert str(target) in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await until(pilot, lambda: app.screen is screen)
        assert target.read_text() == "my own file\n"
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("#prompt-input", Input).value = str(target)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: target.read_text() == "bob's notes\n")


async def test_leaving_a_group_asks_first(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        chat_id = await backend.create_group("team", ["bob"])
        screen.open_chat(chat_id)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, GroupInfoScreen))
        dialog = app.screen
        await until(pilot, lambda: dialog._info is not None)
        await pilot.click("#group-leave-btn")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is dialog)
        info = await backend.group_info(chat_id)
        assert info is not None and info.am_member, "cancelling leaves nothing changed"
        # Clicked again, as the first time: focus + Enter raced the returning dialog's own
        # focus handling under load (two full runs timed out waiting for the confirmation).
        await pilot.click("#group-leave-btn")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: app.screen is screen)
        info = await backend.group_info(chat_id)
        assert info is not None and not info.am_member


async def test_a_new_chat_with_a_name_the_relay_does_not_know_is_refused_at_once(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        await pilot.press("ctrl+n")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("#prompt-input", Input).value = "nobody_here"
        await pilot.press("enter")
        await until(
            pilot, lambda: any("no such user: nobody_here" in n.message for n in app._notifications)
        )
        assert screen.chat_id is None
        assert screen.query_one(ChatList).get(direct_chat_id("nobody_here")) is None
        # A real contact opens, and their safety number is there at once (the
        # relay handed over their key when the chat was checked).
        await open_chat_with(pilot, "bob")
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, ContactInfoScreen))
        number = app.screen.query_one("#contact-number")
        await until(pilot, lambda: "Safety number" in str(number.render()))


async def test_search_matches_word_beginnings_newest_first_with_names_and_pages(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_chat_with(pilot, "bob")
        await send(pilot, screen, "a history lesson")
        await until(pilot, lambda: "a history lesson" in shown(screen))
        await bob.send_text("alice", "histogram ready")
        await until(pilot, lambda: "histogram ready" in shown(screen))
        gid = await carol.create_group("study", ["alice"])
        await carol.send_text(f"group:{gid}", "history again")
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: (c := chats.get(f"group:{gid}")) and c.unread == 1)
        await pilot.press("ctrl+f")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen))
        results = app.screen.query_one("#search-results", OptionList)
        await type_text(pilot, "histo")

        def hits() -> list[str]:
            return [str(results.get_option_at_index(i).prompt) for i in range(results.option_count)]

        await until(pilot, lambda: len(hits()) == 3)
        first, second, third = hits()
        assert first.startswith("#study · carol · ") and first.endswith(": history again")
        assert second.startswith("@bob · bob · ") and second.endswith(": histogram ready")
        assert third.startswith("@bob · you · ") and third.endswith(": a history lesson")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)

        # More hits than a page: the next page comes when the cursor nears the end.
        for i in range(SEARCH_PAGE + 10):
            await bob.send_text("alice", f"needle {i}", wait=False)
        await until(pilot, lambda: shown(screen)[-1] == f"needle {SEARCH_PAGE + 9}")
        await pilot.press("ctrl+f")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen))
        results = app.screen.query_one("#search-results", OptionList)
        await type_text(pilot, "need")
        await until(pilot, lambda: len(hits()) == SEARCH_PAGE)
        assert hits()[0].endswith(f": needle {SEARCH_PAGE + 9}")
        await pilot.press("enter")  # to the results
        await pilot.press("end")
        await until(pilot, lambda: len(hits()) == SEARCH_PAGE + 10)
        numbers = [int(h.rsplit(" ", 1)[1]) for h in hits()]
        assert numbers == list(range(SEARCH_PAGE + 9, -1, -1))


async def _mark_read_settled(pilot: Any, screen: Any) -> None:
    """Wait until no mark-read worker of the screen is pending or running."""
    await until(
        pilot,
        lambda: not [w for w in screen.workers if w.group == "mark-read" and not w.is_finished],
    )


async def test_messages_count_as_read_only_when_shown_in_a_focused_window(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    chat = direct_chat_id("bob")
    app = BlindpostApp(backend=backend)

    async def read_by_alice(message_id: str) -> None:
        await next_event(
            bob_events,
            lambda e: (
                isinstance(e, ReceiptUpdated) and e.message_id == message_id and e.status == "read"
            ),
        )

    async with app.run_test(size=SIZE) as pilot:
        screen = await open_chat_with(pilot, "bob")
        listed = screen.query_one(MessageList)
        # More than a screenful, so rows can be below what is shown.
        for i in range(12):
            await bob.send_text("alice", f"line {i}", wait=False)
        for text in ("one", "two", "three"):
            await bob.send_text("alice", text)
        await until(pilot, lambda: shown(screen)[-3:] == ["one", "two", "three"])
        # On screen, in a focused window: read.
        await read_by_alice(listed.messages()[-1].id)
        assert (await backend.chat_summary(chat)).unread == 0

        # The cursor two rows up: four new messages are below it, not read.
        listed.focus()
        await pilot.press("up", "up")
        assert not listed.shows_newest()
        ids = [await bob.send_text("alice", f"new {i}") for i in range(4)]
        await until(pilot, lambda: shown(screen)[-1] == "new 3")
        await _mark_read_settled(pilot, screen)
        assert (await backend.chat_summary(chat)).unread == 4
        rows = [o.id for o in listed._options]
        assert rows.index(NEW_MARKER) == rows.index(ids[0]) - 1, "the line is above them"
        assert "new messages" in str(listed.get_option(NEW_MARKER).prompt)
        # Moving down to them reads them; the line shows where they start.
        await pilot.press("end")
        await until(pilot, lambda: "new messages" in screen_text(app))
        await read_by_alice(ids[-1])
        await until(pilot, lambda: screen.query_one(ChatList).get(chat).unread == 0)  # type: ignore[union-attr]

        # The terminal loses the focus: what arrives meanwhile waits for it.
        app.post_message(AppBlur())
        await until(pilot, lambda: not app.app_focus)
        away = await bob.send_text("alice", "while you were away")
        await until(pilot, lambda: shown(screen)[-1] == "while you were away")
        await _mark_read_settled(pilot, screen)
        assert (await backend.chat_summary(chat)).unread == 1
        app.post_message(AppFocus())
        await read_by_alice(away)


def _rows(listed: MessageList) -> list[str]:
    return [str(o.prompt) for o in listed._options]


async def test_group_rows_say_what_changed_and_who_did_it(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        chat_id = await backend.create_group("team", ["bob", "carol"])
        gid = chat_id.split(":", 1)[1]
        screen.open_chat(chat_id)
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: any("you created the group 'team'" in r for r in _rows(listed)))
        # Our rename, through group info: the row says so.
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, GroupInfoScreen))
        app.screen.query_one("#group-rename", Input).value = "dream team"
        app.screen.query_one("#group-rename", Input).focus()
        await pilot.press("enter")
        await next_event(bob_events, lambda e: getattr(e, "action", None) == "rename")
        await pilot.press("escape")
        await until(
            pilot, lambda: any("you renamed the group to 'dream team'" in r for r in _rows(listed))
        )
        assert not any("group updated" in r for r in _rows(listed))
        # Bob leaves while the group is open: a row, not only a toast.
        await bob.leave_group(gid)
        await until(pilot, lambda: any("bob left" in r for r in _rows(listed)))
        # Carol leaves while another chat is open: a toast titled with the
        # group's name now, and the row is there when the group is opened.
        await open_chat_with(pilot, "bob")
        await carol.leave_group(gid)
        await until(
            pilot, lambda: any(n.message == "carol left the group" for n in app._notifications)
        )
        toast = next(n for n in app._notifications if n.message == "carol left the group")
        assert toast.title == "dream team"
        screen.open_chat(chat_id)
        await until(pilot, lambda: any("carol left" in r for r in _rows(listed)))
        rows = _rows(listed)
        assert rows.index(next(r for r in rows if "bob left" in r)) < rows.index(
            next(r for r in rows if "carol left" in r)
        )
