"""Groups, attachments and key changes: the real app against a real relay."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tui_harness import next_event, until

from e2ee.client import Client
from e2ee.events import GroupChanged, MessageReceived
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import (
    AttachScreen,
    ConfirmScreen,
    ContactInfoScreen,
    GroupInfoScreen,
    NewGroupScreen,
    PromptScreen,
)
from tui_client.screens.main import MainScreen
from tui_client.widgets.conversation import ComposeArea, MessageList
from tui_client.widgets.status import KeyBanner

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 34)


async def _main(pilot: Any) -> MainScreen:
    await until(pilot, lambda: isinstance(pilot.app.screen, MainScreen))
    screen = pilot.app.screen
    assert isinstance(screen, MainScreen)
    return screen


async def _send(pilot: Any, screen: MainScreen, text: str) -> None:
    area = screen.query_one(ComposeArea)
    area.focus()
    area.insert(text)
    await pilot.press("enter")


async def test_create_a_group_talk_in_it_and_rename_it(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    bob_events, carol_events = bob.events(), carol.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        await pilot.press("ctrl+g")
        await until(pilot, lambda: isinstance(app.screen, NewGroupScreen))
        dialog = app.screen
        dialog.query_one("#group-name").value = "team"
        dialog.query_one("#group-extra").value = "bob, carol"
        dialog.query_one("#group-extra").focus()
        await pilot.press("enter")
        await until(pilot, lambda: (screen.chat_id or "").startswith("group:"))
        created = await next_event(bob_events, lambda e: isinstance(e, GroupChanged))
        assert created.name == "team" and created.members == ("alice", "bob", "carol")
        await next_event(carol_events, lambda e: isinstance(e, GroupChanged))
        assert "#team" in str(screen.query_one("#chat-title").render())

        await _send(pilot, screen, "hello team")
        for events in (bob_events, carol_events):
            got = await next_event(events, lambda e: isinstance(e, MessageReceived))
            assert got.message.text == "hello team"
        await bob.send_text(got.message.chat_id, "hi from bob")
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: any(m.text == "hi from bob" for m in listed.messages()))

        # Group info: members shown, rename goes to everyone.
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, GroupInfoScreen))
        info = app.screen
        members = info.query_one("#group-member-list")
        await until(pilot, lambda: members.option_count == 3)
        info.query_one("#group-rename").value = "dream team"
        info.query_one("#group-rename").focus()
        await pilot.press("enter")
        renamed = await next_event(
            bob_events, lambda e: isinstance(e, GroupChanged) and e.action == "rename"
        )
        assert renamed.name == "dream team"
        await pilot.press("escape")
        await until(pilot, lambda: "#dream team" in str(screen.query_one("#chat-title").render()))

        # Remove carol: she is told, and the others see the new member list.
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, GroupInfoScreen))
        info = app.screen
        members = info.query_one("#group-member-list")
        await until(pilot, lambda: members.option_count == 3)
        members.highlighted = members.get_option_index("carol")
        info.query_one("#group-remove-btn").press()
        removed = await next_event(
            carol_events, lambda e: isinstance(e, GroupChanged) and e.action == "remove"
        )
        assert removed.members == ("alice", "bob")
        await until(pilot, lambda: members.option_count == 2)

        # Leave: bob is told, the group leaves the chat list and the conversation.
        group_id = screen.chat_id
        assert group_id is not None
        info.query_one("#group-leave-btn").press()
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        left = await next_event(
            bob_events, lambda e: isinstance(e, GroupChanged) and e.action == "leave"
        )
        assert left.by == "alice"
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        await until(pilot, lambda: screen.chat_list.get(group_id) is None)
        assert screen.chat_id is None and not listed.messages()
        assert "You left the group" in str(screen.query_one("#chat-title").render())


async def test_attach_a_file_with_progress_and_save_a_received_one(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Path
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    source = tmp_path / "report.bin"
    data = os.urandom(300_000)
    source.write_bytes(data)
    progress: list[tuple[int, int]] = []
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        bar = screen.query_one("#upload-progress")
        original = bar.update

        def spy(**kw: Any) -> None:
            if "progress" in kw:
                progress.append((kw["progress"], kw.get("total") or 0))
            original(**kw)

        bar.update = spy  # type: ignore[method-assign]
        screen.open_chat(direct_chat_id("bob"))
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, AttachScreen))
        path_input = app.screen.query_one("#attach-path")
        path_input.value = str(source)
        path_input.focus()
        await pilot.press("enter")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived), 30)
        saved = await bob.download_attachment(got.message.id, tmp_path / "bob-got.bin")
        assert saved.read_bytes() == data
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: listed.messages() and listed.messages()[-1].attachment)
        assert "📎 report.bin" in str(listed.get_option(listed.messages()[-1].id).prompt)
        await until(pilot, lambda: not screen.query_one("#upload-progress").display)

        # Bob sends a file back; Alice saves it with "s".
        back = tmp_path / "photo.png"
        back.write_bytes(b"\x89PNG fake image bytes" * 100)
        await bob.send_file("alice", back)
        await until(
            pilot,
            lambda: (
                listed.messages()[-1].attachment is not None
                and listed.messages()[-1].sender == "bob"
            ),
        )
        listed.focus()
        await pilot.press("end")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        target = tmp_path / "saved.png"
        app.screen.query_one("#prompt-input").value = str(target)
        await pilot.press("enter")
        await until(pilot, lambda: target.exists())
        assert target.read_bytes() == back.read_bytes()
    # The bar showed the upload going up to the whole (encrypted) file.
    assert progress[0][0] == 0
    assert progress[-1][0] >= len(data)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


async def test_key_change_banner_holds_sending_until_accepted(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    # Strict trust: every new key needs the user's word, so the banner shows for
    # bob's (first) key; the same banner shows when a known contact's key changes.
    backend = await tui_opener("alice", strict_trust=True).create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        screen.open_chat(direct_chat_id("bob"))
        await _send(pilot, screen, "hello?")
        banner = screen.query_one(KeyBanner)
        await until(pilot, lambda: banner.display and banner.user == "bob")
    # After a restart the SDK still holds bob's key: the banner comes back.
    app = BlindpostApp(opener=tui_opener("alice", strict_trust=True))
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        screen.open_chat(direct_chat_id("bob"))
        banner = screen.query_one(KeyBanner)
        await until(pilot, lambda: banner.display and banner.user == "bob")
        text = str(banner.query_one("#key-banner-text").render())
        assert "bob's safety number changed" in text and "wait" in text
        # Verify opens contact info with the safety number and the QR code. (The banner's
        # buttons are clicked once laid out: a click before lands on nothing.)
        verify = banner.query_one("#key-verify")
        await until(pilot, lambda: verify.region.area > 0)
        await pilot.click("#key-verify")
        await until(pilot, lambda: isinstance(app.screen, ContactInfoScreen))
        number = app.screen.query_one("#contact-number")
        await until(pilot, lambda: "Safety number" in str(number.render()))
        assert "▀" in str(app.screen.query_one("#contact-qr").render())
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        assert banner.display
        # Accept: the held message goes out, the banner goes away.
        accept = banner.query_one("#key-accept")
        await until(pilot, lambda: accept.region.area > 0)
        await pilot.click("#key-accept")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "hello?"
        await until(pilot, lambda: not banner.display)


async def test_contact_info_marks_the_contact_verified(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _main(pilot)
        screen.open_chat(direct_chat_id("bob"))
        await _send(pilot, screen, "hi")
        await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, ContactInfoScreen))
        trust = app.screen.query_one("#contact-trust")
        await until(pilot, lambda: "tofu" in str(trust.render()))
        digits = [n.digits for _, n in await bob.safety_number("alice")]
        shown = str(app.screen.query_one("#contact-number").render()).replace(" ", "")
        assert digits[0] in shown.replace("\n", "").split(":", 1)[1]
        await pilot.press("v")
        await until(pilot, lambda: "verified" in str(trust.render()))
