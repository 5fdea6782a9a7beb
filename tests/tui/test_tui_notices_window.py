"""Inline notices, the file picker, the render window and jumping to a search hit.

The real app against a real relay, with SDK clients on the other side. Missed
and unreadable messages are produced the way they happen in the field: a message
that expired at the relay before we fetched it, and one whose bytes were
altered on the way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import FAST, FAST_KDF
from relay_harness import RelayProcess
from tui_harness import WAIT, next_event, type_text, until

from e2ee.client import Client, TransportLink
from e2ee.events import MessageReceived, ReceiptUpdated
from e2ee.history import direct_chat_id
from e2ee.transport.auth import DeviceSigner
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import AttachScreen, SearchScreen
from tui_client.screens.main import MainScreen
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import NEW_MARKER, WINDOW, MessageList

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 30)


async def _main(pilot: Any) -> MainScreen:
    await until(pilot, lambda: isinstance(pilot.app.screen, MainScreen))
    screen = pilot.app.screen
    assert isinstance(screen, MainScreen)
    return screen


def _rows(listed: MessageList) -> list[str]:
    """What the list shows, top to bottom: message texts and ``ⓘ`` notices.

    Day separators and the "new messages" line are left out.
    """
    out = []
    for option in listed.options:
        if option.id is None or option.id.startswith("day:") or option.id == NEW_MARKER:
            continue
        found = listed.message(option.id)
        if found is None or found.is_notice:  # a notice (stored in history, or the session's)
            out.append(str(option.prompt))
        else:
            out.append(found.text or "")
    return out


@pytest.mark.relay_settings(message_ttl_seconds=1, sweep_interval_seconds=0.2)
async def test_a_message_lost_at_the_relay_shows_a_missed_message_notice(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: RelayProcess
) -> None:
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    # Alice is offline (the app is not running): bob's first message waits in
    # her mailbox, is not fetched within the relay's retention time, and is swept.
    await bob.send_text("alice", "this one is lost")
    deadline = time.monotonic() + WAIT
    while "sweeper removed 1 expired messages" not in tui_relay.log_text():
        assert time.monotonic() < deadline, "the relay never expired the message"
        await asyncio.sleep(0.05)  # polling the relay's log: no event to await
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        await until(pilot, lambda: backend.is_connected())
        screen.open_chat(direct_chat_id("bob"))
        listed = screen.query_one(MessageList)
        await bob.send_text("alice", "after the gap")
        await until(pilot, lambda: "after the gap" in _rows(listed))
        # The notice is inline, above the message whose counter revealed the gap.
        assert _rows(listed) == ["ⓘ 1 message from bob never arrived", "after the gap"]
        # It stays in place when the chat is opened again.
        screen.open_chat("dm:nobody")
        await until(pilot, lambda: listed.chat_id == "dm:nobody")
        screen.open_chat(direct_chat_id("bob"))
        await until(pilot, lambda: "after the gap" in _rows(listed))
        assert _rows(listed) == ["ⓘ 1 message from bob never arrived", "after the gap"]
    # The notice is kept in history: after a restart of the app it is still in place.
    backend = await tui_opener("alice").open(None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        screen.open_chat(direct_chat_id("bob"))
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: "after the gap" in _rows(listed))
        assert _rows(listed) == ["ⓘ 1 message from bob never arrived", "after the gap"]


class TamperingLink(TransportLink):
    """The real transport, except that the next message sent has one byte flipped, in its
    first attempt and in every retry of it (a retry under load must not send it intact)."""

    corrupt_next = False
    corrupted: ClassVar[set[bytes]] = set()

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> None:
        if TamperingLink.corrupt_next:
            TamperingLink.corrupt_next = False
            TamperingLink.corrupted.add(message_id)
        if message_id in TamperingLink.corrupted:
            body = body[:-1] + bytes([body[-1] ^ 0x40])
        await super().send(message_id, recipients, body, after=after)


async def test_a_message_altered_in_transit_shows_an_unreadable_message_notice(
    tui_opener: MakeOpener, tui_relay: RelayProcess, tmp_path: Path
) -> None:
    def tampering(signer: DeviceSigner, url: str) -> TamperingLink:
        return TamperingLink(signer, url)

    bob = await Client.create(
        tmp_path / "sdk-bob",
        "bob",
        tui_relay.url,
        kdf_limits=FAST_KDF,
        options=FAST,
        link_factory=tampering,
    )
    await bob.register()
    await bob.start()
    try:
        backend = await tui_opener("alice").create("alice", tui_relay.url, None)
        app = BlindpostApp(backend=backend)
        async with app.run_test(size=SIZE) as pilot:
            screen = await _main(pilot)
            screen.open_chat(direct_chat_id("bob"))
            listed = screen.query_one(MessageList)
            bob_events = bob.events()
            await bob.send_text("alice", "readable")
            await until(pilot, lambda: "readable" in _rows(listed))
            # Once alice's receipt is back, bob's session is confirmed and his next
            # message is an ordinary ratchet message (not a session-opening one). The relay's
            # "sent" comes first and proves nothing: a session-opening message's last bytes
            # are its signed-prekey id, which a session that already exists ignores, so that
            # flip would go unnoticed while the content stays authenticated.
            await next_event(
                bob_events,
                lambda e: (
                    isinstance(e, ReceiptUpdated)
                    and e.status in ("delivered", "read")
                    and e.user == "alice"
                ),
            )
            TamperingLink.corrupt_next = True
            await bob.send_text("alice", "garbled on the way")
            await until(pilot, lambda: len(_rows(listed)) == 2)
            rows = _rows(listed)
            assert rows[0] == "readable"
            assert rows[1].startswith("ⓘ a message from bob could not be read: ")
            assert "could not be decrypted" in rows[1]
            assert "garbled on the way" not in " ".join(rows)
    finally:
        TamperingLink.corrupt_next = False
        TamperingLink.corrupted.clear()
        await bob.close()


async def test_attach_a_file_through_the_picker(
    tui_opener: MakeOpener,
    sdk_client: MakeClient,
    tui_relay: RelayProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    data = b"minutes of the meeting\n" * 500
    (home / "docs" / "minutes.txt").write_bytes(data)
    monkeypatch.setenv("HOME", str(home))  # the picker starts in the home folder
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        screen.open_chat(direct_chat_id("bob"))
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, AttachScreen))
        dialog = app.screen
        tree = dialog.query_one("#attach-tree")
        await pilot.press("tab")  # from the path box to the tree
        assert tree.has_focus
        await until(pilot, lambda: len(tree.root.children) == 1)
        await pilot.press("down")  # the "docs" folder
        await pilot.press("enter")  # open it
        await until(pilot, lambda: tree.root.children[0].children)
        await pilot.press("down")  # minutes.txt
        await pilot.press("enter")  # pick it: the path is filled in, Send has focus
        assert dialog.query_one("#attach-path").value == str(home / "docs" / "minutes.txt")
        await pilot.press("enter")  # Send
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived), 30)
        assert got.message.type == "attachment"
        saved = await bob.download_attachment(got.message.id, tmp_path / "bob-got.txt")
        assert saved.read_bytes() == data
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: listed.messages() and listed.messages()[-1].attachment)
        assert "📎 minutes.txt" in str(listed.get_option(listed.messages()[-1].id).prompt)


async def test_the_render_window_scrolls_through_a_long_chat_and_back(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: RelayProcess
) -> None:
    total = WINDOW + 150
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        for i in range(total):
            await bob.send_text("alice", f"line {i}", wait=False)
        chats = screen.query_one(ChatList)
        await until(
            pilot,
            lambda: (c := chats.get(direct_chat_id("bob"))) and c.last_text == f"line {total - 1}",
        )
        screen.open_chat(direct_chat_id("bob"))
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: len(listed.messages()) == 60)
        listed.focus()

        def texts() -> list[str]:
            return [m.text or "" for m in listed.messages()]

        def contiguous() -> bool:
            numbers = [int(t.split()[1]) for t in texts()]
            return numbers == list(range(numbers[0], numbers[0] + len(numbers)))

        # Up to the very first message: older pages come in, newer ones leave.
        widest = 0
        while listed.has_older or texts()[0] != "line 0":
            await pilot.press("home")
            await pilot.pause(0.05)
            widest = max(widest, len(listed.messages()))
            assert len(listed.messages()) <= WINDOW
        assert widest == WINDOW
        assert texts()[0] == "line 0" and contiguous()
        assert listed.has_newer and f"line {total - 1}" not in texts()
        # A page coming in keeps the cursor on its message; Home again goes to the top.
        await pilot.press("home")
        assert listed.selected is not None and listed.selected.text == "line 0"
        # Rows are bounded too: messages, one day separator per day, nothing else.
        assert listed.option_count <= WINDOW + 2

        # And back down to the newest, a page at a time: the dropped pages are
        # read again (End would jump straight to the newest page).
        while listed.has_newer:
            await pilot.press("pagedown")
            await pilot.pause(0.05)
            assert len(listed.messages()) <= WINDOW
            assert contiguous()
        assert texts()[-1] == f"line {total - 1}" and contiguous()
        assert "line 0" not in texts() and listed.has_older

        # New messages join the bottom again now that the window is there.
        await bob.send_text("alice", f"line {total}")
        await until(pilot, lambda: texts()[-1] == f"line {total}")
        assert contiguous()

        # While the user reads a few rows up in a full window, a new message does
        # not move what they read; it comes in when they move down to it.
        await pilot.press("end")
        for _ in range(3):
            await pilot.press("up")
        reading = listed.selected
        assert reading is not None and len(texts()) >= WINDOW
        await bob.send_text("alice", f"line {total + 1}")
        await until(pilot, lambda: listed.has_newer)
        assert f"line {total + 1}" not in texts() and listed.selected == reading
        await pilot.press("end")
        await until(pilot, lambda: texts()[-1] == f"line {total + 1}")
        assert contiguous() and len(texts()) <= WINDOW
        total += 1

        # A search hit far back opens the chat around it, not at the newest page.
        await pilot.press("ctrl+f")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen))
        await type_text(pilot, "17")
        results = app.screen.query_one("#search-results")
        # Words match by their beginning (17, 170, 171...): pick "line 17".
        await until(
            pilot,
            lambda: any(
                str(results.get_option_at_index(i).prompt).endswith(": line 17")
                for i in range(results.option_count)
            ),
        )
        await pilot.press("enter")  # from the input to the results
        results.highlighted = next(
            i
            for i in range(results.option_count)
            if str(results.get_option_at_index(i).prompt).endswith(": line 17")
        )
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        await until(pilot, lambda: "line 17" in texts())
        assert listed.selected is not None and listed.selected.text == "line 17"
        assert texts()[0] == "line 0" and contiguous()
        assert listed.has_newer and f"line {total}" not in texts()
        # Moving down from the hit reads the newer pages.
        listed.focus()
        while listed.has_newer:
            await pilot.press("pagedown")
            await pilot.pause(0.05)
        assert texts()[-1] == f"line {total}" and contiguous()
