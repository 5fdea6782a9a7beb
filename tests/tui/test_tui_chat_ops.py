"""Chat operations in the TUI against a real relay: deleting a chat, group notices
kept in history, and updates that need no history read.

The app's own account is created through the adapter; the other side is a real
:class:`e2ee.client.Client` on the same relay process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tui_harness import main_screen, next_event, until

from e2ee.client import Client
from e2ee.events import MessageReceived
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import ConfirmScreen
from tui_client.widgets.chat_list import ChatList, ChatOptions
from tui_client.widgets.conversation import MessageList

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 30)


async def test_deleting_a_chat_asks_then_forgets_it_and_a_new_message_starts_it_again(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    opener = tui_opener("alice")
    backend = await opener.create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    bob_chat, carol_chat = direct_chat_id("bob"), direct_chat_id("carol")
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        await bob.send_text("alice", "first from bob")
        await carol.send_text("alice", "hello from carol")
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: set(chats.chat_ids()) == {bob_chat, carol_chat})
        screen.open_chat(bob_chat)
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: [m.text for m in listed.messages()] == ["first from bob"])
        options = chats.query_one(ChatOptions)
        options.focus()
        options.highlighted = chats.chat_ids().index(bob_chat)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")  # changed my mind: nothing goes
        await until(pilot, lambda: app.screen is screen)
        assert bob_chat in chats.chat_ids()
        assert len(await backend.messages(bob_chat)) == 1
        options.highlighted = chats.chat_ids().index(bob_chat)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: chats.chat_ids() == [carol_chat])
        assert screen.chat_id is None and listed.messages() == []
        assert await backend.messages(bob_chat) == []
        assert [h.message.text for h in await backend.search("first")] == []
        assert [m.text for m in await backend.messages(carol_chat)] == ["hello from carol"]

        # Bob writes again: the chat comes back as a new one, with only that message.
        bob_events = bob.events()
        await bob.send_text("alice", "still there?")
        await until(pilot, lambda: bob_chat in chats.chat_ids())
        assert [m.text for m in await backend.messages(bob_chat)] == ["still there?"]
        row = chats.get(bob_chat)
        assert row is not None and row.unread == 1
        # Alice can answer in it.
        screen.open_chat(bob_chat)
        await backend.send_text(bob_chat, "yes")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "yes"


def _rows(listed: MessageList) -> list[str]:
    """The message rows shown, day separators left out."""
    return [p for o in listed._options if not (p := str(o.prompt)).startswith("─")]


async def test_group_rows_say_who_changed_what_after_a_restart(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    await sdk_client("dave")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    expected = [
        "· bob created the group 'team'",
        "· bob renamed the group to 'dream team'",
        "· bob added dave",
        "· carol left the group",
        "· bob removed dave",
        "· you left the group",
    ]
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        gid = await bob.create_group("team", ["alice", "carol"])
        chat_id = f"group:{gid}"
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: chat_id in chats.chat_ids())
        screen.open_chat(chat_id)
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: _rows(listed) == expected[:1])
        await bob.rename_group(gid, "dream team")
        await bob.add_member(gid, "dave")
        await carol.leave_group(gid)
        await bob.remove_member(gid, "dave")
        await until(pilot, lambda: _rows(listed) == expected[:5])
        # The list's title follows the rename; its preview names who did what.
        await until(
            pilot,
            lambda: (
                (c := chats.get(chat_id))
                and (c.title, c.last_text) == ("dream team", "bob removed dave")
            ),
        )
        # A group change of ours: leaving (the group goes from the list).
        bob_events = bob.events()
        await backend.leave_group(chat_id)
        await next_event(bob_events, lambda e: getattr(e, "action", None) == "leave")
        await until(pilot, lambda: _rows(listed) == expected)
    # After a restart every row still says who changed what (read from history).
    backend = await tui_opener("alice").open(None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        screen.open_chat(chat_id)  # a group we left: not listed, still kept
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: _rows(listed) == expected)
        assert not any("changed the group" in r for r in _rows(listed))


class _CountedReads:
    """Counts the adapter's message reads from history (a spy on the real adapter).

    ``message`` / ``messages`` are what the screens call, ``_view`` is the one
    path by which the adapter reads a message's details (reactions, file, quote).
    """

    NAMES = ("message", "messages", "_view")

    def __init__(self, backend: Any) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            setattr(backend, name, self._counted(name, getattr(backend, name)))

    def _counted(self, name: str, read: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return read(*args, **kwargs)

        return counted


async def test_changes_receipts_and_own_sends_update_the_screen_without_history_reads(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    bob_chat = direct_chat_id("bob")
    async with app.run_test(size=SIZE) as pilot:
        screen = await main_screen(pilot)
        first = await bob.send_text("alice", "hello alice")
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: bob_chat in chats.chat_ids())
        screen.open_chat(bob_chat)
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: [m.text for m in listed.messages()] == ["hello alice"])
        reads = _CountedReads(backend)  # from here on: none expected

        # Our own sends (a reply and a file) appear from their events, then their ticks move.
        mine = await backend.send_text(bob_chat, "hi bob", reply_to=first)
        await until(pilot, lambda: listed.message(mine) is not None)
        shown = listed.message(mine)
        assert shown is not None and shown.quote_sender == "bob" and shown.outgoing
        await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        await bob.mark_read(direct_chat_id("alice"))
        await until(pilot, lambda: (m := listed.message(mine)) is not None and m.status == "read")
        notes = tmp_path / "notes.txt"
        notes.write_text("some notes\n")
        sent_file = await backend.send_file(bob_chat, notes, None)
        await until(
            pilot,
            lambda: (
                (m := listed.message(sent_file)) is not None
                and m.attachment is not None
                and m.attachment.file_name == "notes.txt"
                and m.status in ("sent", "delivered", "read")
            ),
        )

        # Bob's reaction, edit and delete arrive as MessageChanged: applied in place.
        await bob.react(mine, "👍")
        await until(
            pilot,
            lambda: (m := listed.message(mine)) is not None and m.reactions == (("bob", "👍"),),
        )
        await bob.edit(first, "hello, alice")
        await until(
            pilot,
            lambda: (
                (m := listed.message(first)) is not None and m.edited and m.text == "hello, alice"
            ),
        )
        await bob.react(mine, "")
        await until(pilot, lambda: (m := listed.message(mine)) is not None and m.reactions == ())
        await bob.delete_for_everyone(first)
        await until(pilot, lambda: (m := listed.message(first)) is not None and m.deleted)
        # The reply quoting it loses the quoted text, keeps its own.
        await until(pilot, lambda: (m := listed.message(mine)) is not None and m.quote_text is None)
        after = listed.message(mine)
        assert after is not None and after.text == "hi bob" and after.quote_sender == "bob"
        assert reads.calls == [], f"history was read for: {reads.calls}"
