"""Issue 18: layout, settings file, keys, quick switcher and notifications.

The app runs under Pilot over the real SDK against a real relay process; the
settings file is a real TOML file. ``notify-send`` (outside the project) is a
small script on ``PATH`` that records its arguments.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from tui_harness import (
    main_screen,
    next_event,
    open_chat_with,
    screen_text,
    shown,
    type_text,
    until,
)

from e2ee.client import Client
from e2ee.events import MessageReceived
from e2ee.history import direct_chat_id
from tui_client import app as tui_app
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.config import ConfigError, TuiConfig, config_path, load_config
from tui_client.screens.dialogs import HelpScreen, PromptScreen, SwitcherScreen, fuzzy_score
from tui_client.widgets.chat_list import ChatList
from tui_client.widgets.conversation import ComposeArea, MessageList

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (80, 24)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tui.toml"
    path.write_text(text)
    return path


def test_the_settings_file_is_read_and_checked(tmp_path: Path) -> None:
    assert load_config(tmp_path / "missing.toml") == TuiConfig()
    path = _write(
        tmp_path,
        'theme = "textual-light"\nlayout = "roomy"\ndownload_folder = "~/dl"\n'
        "vi_keys = true\n[notifications]\nbell = false\ndesktop = false\n"
        '[keys]\nnew_chat = "ctrl+b"\n',
    )
    config = load_config(path)
    assert config.theme == "textual-light" and config.layout == "roomy" and config.vi_keys
    assert config.download_folder == Path.home() / "dl"
    assert not config.bell and not config.desktop_notifications
    assert config.key_map()["new_chat"] == "ctrl+b"
    assert config.key_map()["search"] == "ctrl+f"  # the default stays
    for text, named in (
        ('layuot = "roomy"\n', "layuot: unknown setting"),
        ('layout = "tiny"\n', "layout: must be one of compact, roomy"),
        ("vi_keys = 1\n", "vi_keys: must be a true/false"),
        ('[keys]\nfly = "x"\n', "keys.fly: unknown action"),
        ("[notifications]\nsound = true\n", "notifications.sound: unknown setting"),
        ("theme = \n", "not valid TOML"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config(_write(tmp_path, text))
        assert named in str(caught.value) and str(tmp_path) in str(caught.value)


def test_the_settings_file_lives_at_the_xdg_path(tmp_path: Path) -> None:
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "blindpost" / "tui.toml"
    assert config_path({"BLINDPOST_TUI_CONFIG": str(tmp_path / "x.toml")}) == tmp_path / "x.toml"
    assert config_path({}) == Path.home() / ".config" / "blindpost" / "tui.toml"


def test_a_broken_settings_file_stops_the_client_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLINDPOST_TUI_CONFIG", str(_write(tmp_path, 'layout = "tiny"\n')))
    assert tui_app.run(tmp_path / "data") == 2
    assert "layout: must be one of compact, roomy" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_fuzzy_matching_prefers_prefixes_then_substrings_then_letters() -> None:
    assert fuzzy_score("car", "carol") == 0
    assert fuzzy_score("rol", "carol") == 102
    score = fuzzy_score("crl", "carol")
    assert score is not None and score > 102
    assert fuzzy_score("xyz", "carol") is None


async def test_compact_layout_puts_a_continuing_sender_on_one_line(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob = await sdk_client("bob")
    for layout in ("compact", "roomy"):
        backend = await tui_opener(f"alice_{layout}").create(f"alice_{layout}", tui_relay.url, None)
        app = BlindpostApp(backend=backend, config=TuiConfig(layout=layout))  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            screen = await main_screen(pilot)
            for i in range(20):
                await bob.send_text(f"alice_{layout}", f"short {i}", wait=False)
            chats = screen.query_one(ChatList)
            chat = direct_chat_id("bob")
            await until(
                pilot, lambda c=chats, k=chat: (s := c.get(k)) and s.last_text == "short 19"
            )
            screen.open_chat(chat)
            listed = screen.query_one(MessageList)
            await until(pilot, lambda s=screen: shown(s)[-1:] == ["short 19"])
            rows = [str(listed.get_option(m.id).prompt) for m in listed.messages()]
            if layout == "compact":
                # The first of the run names bob; the rest are one line each.
                assert rows[0].startswith("bob  ")
                assert all("\n" not in r and r.startswith("short ") for r in rows[1:])
                assert all(
                    sum(f"short {i}" in line for line in _visible(listed)) == 1
                    for i in range(8, 20)
                ), "the newest twelve fit on an 80x24 screen"
            else:
                assert all(r.startswith("bob  ") and r.count("\n") == 1 for r in rows)


def _visible(listed: MessageList) -> list[str]:
    return ["".join(s.text for s in listed.render_line(y)) for y in range(listed.size.height)]


async def test_keys_from_the_settings_file_and_the_help_screen_lists_them(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Path
) -> None:
    bob = await sdk_client("bob")
    config = load_config(_write(tmp_path, 'vi_keys = true\n[keys]\nnew_chat = "ctrl+b"\n'))
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend, config=config)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await main_screen(pilot)
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, PromptScreen))
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = str(app.screen.query_one("#help-keys").render())
        assert "ctrl+b" in keys and "new chat by username" in keys and "j / k / g / G" in keys
        assert str(tmp_path / "tui.toml") in str(app.screen.query_one("#help-config").render())
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen)
        # vi keys move the cursor in the message list.
        for i in range(3):
            await bob.send_text("alice", f"vi {i}")
        screen.open_chat(direct_chat_id("bob"))
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: shown(screen) == ["vi 0", "vi 1", "vi 2"])
        listed.focus()
        await pilot.press("G")
        await until(pilot, lambda: listed.selected is not None and listed.selected.text == "vi 2")
        await pilot.press("k")
        await until(pilot, lambda: listed.selected is not None and listed.selected.text == "vi 1")
        await pilot.press("g")
        await until(pilot, lambda: listed.selected is not None and listed.selected.text == "vi 0")
        await pilot.press("j")
        await until(pilot, lambda: listed.selected is not None and listed.selected.text == "vi 1")


async def test_quick_switcher_chat_numbers_and_the_next_unread_chat(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any
) -> None:
    bob, carol, dave = await sdk_client("bob"), await sdk_client("carol"), await sdk_client("dave")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await main_screen(pilot)
        chats = screen.query_one(ChatList)
        for user in (bob, carol, dave):
            await user.send_text("alice", f"hi from {user.username}")
        await until(pilot, lambda: len(chats.chat_ids()) == 3)
        assert chats.chat_ids() == [direct_chat_id(u) for u in ("dave", "carol", "bob")]
        # Alt+N: the chat at that place in the list (most recent first).
        await pilot.press("alt+1")
        await until(pilot, lambda: screen.chat_id == direct_chat_id("dave"))
        # Shown for a moment in a focused window: read.
        await until(pilot, lambda: chats.get(direct_chat_id("dave")).unread == 0)  # type: ignore[union-attr]
        # Ctrl+K (also while the compose box has the focus), a few letters, Enter.
        await pilot.press("ctrl+k")
        await until(pilot, lambda: isinstance(app.screen, SwitcherScreen))
        await type_text(pilot, "crl")
        await pilot.press("enter")
        await until(pilot, lambda: screen.chat_id == direct_chat_id("carol"))
        # Alt+U: the next chat with unread messages (bob's; the others were read).
        await until(pilot, lambda: chats.get(direct_chat_id("carol")).unread == 0)  # type: ignore[union-attr]
        await pilot.press("alt+u")
        await until(pilot, lambda: screen.chat_id == direct_chat_id("bob"))


async def test_desktop_notifications_through_notify_send(
    tui_opener: MakeOpener,
    sdk_client: MakeClient,
    tui_relay: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = tmp_path / "notified.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "notify-send"
    script.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {record}\necho >> {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_chat_with(pilot, "bob")
        await carol.send_text("alice", "are you there?")
        await until(pilot, lambda: record.exists() and "are you there?" in record.read_text())
        assert record.read_text().splitlines()[0] == (
            "--app-name=Blindpost|--|carol|carol: are you there?|"
        )
        assert bob is not None
    # Turned off in the settings: no call.
    record.unlink()
    backend = await tui_opener("alice").open(None)
    app = BlindpostApp(backend=backend, config=TuiConfig(desktop_notifications=False))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat_with(pilot, "bob")
        await carol.send_text("alice", "second try")
        await until(
            pilot,
            lambda: (c := screen.query_one(ChatList).get(direct_chat_id("carol"))) and c.unread,
        )
        await until(pilot, lambda: any("second try" in n.message for n in app._notifications))
        assert not record.exists()


def _recorder(tmp_path: Path, name: str, record: Path) -> Path:
    """A stand-in for a desktop program (outside the project) recording its arguments."""
    bin_dir = tmp_path / f"bin-{name}"
    bin_dir.mkdir()
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {record}\necho >> {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


async def test_mentions_stand_out_and_l_opens_the_link(
    tui_opener: MakeOpener,
    sdk_client: MakeClient,
    tui_relay: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = tmp_path / "opened.txt"
    bin_dir = _recorder(tmp_path, "xdg-open", opened)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend, config=TuiConfig(desktop_notifications=False))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat_with(pilot, "carol")
        gid = await bob.create_group("lunch", ["alice", "carol"])
        text = "@alice the plan: https://example.org/plan?day=fri."
        await bob.send_text(f"group:{gid}", text)
        # Another chat is open: the toast says who mentioned us, and where.
        await until(pilot, lambda: any("mentioned you" in n.title for n in app._notifications))
        toast = next(n for n in app._notifications if "mentioned you" in n.title)
        assert toast.title == "bob mentioned you in lunch"
        screen.open_chat(f"group:{gid}")
        listed = screen.query_one(MessageList)
        await until(pilot, lambda: text in shown(screen))
        found = next(m for m in listed.messages() if m.text == text)
        prompt = listed.get_option(found.id).prompt
        assert isinstance(prompt, Text)
        styled = {prompt.plain[s.start : s.end]: s.style for s in prompt.spans}
        assert styled["@alice"] == listed._style("mention")
        assert styled["https://example.org/plan?day=fri"] == listed._style("link")
        listed.focus()
        await pilot.press("end")
        await until(pilot, lambda: listed.selected is not None and listed.selected.id == found.id)
        await pilot.press("l")
        await until(pilot, lambda: opened.exists() and opened.read_text().strip())
        assert opened.read_text().splitlines()[0] == "https://example.org/plan?day=fri|"
        assert carol is not None


async def test_muted_chats_stay_quiet_and_archived_ones_leave_the_list(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Path
) -> None:
    bob, carol = await sdk_client("bob"), await sdk_client("carol")
    opener = tui_opener("alice")
    backend = await opener.create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend, config=TuiConfig(desktop_notifications=False))
    bells: list[int] = []
    app.bell = lambda: bells.append(1)  # type: ignore[method-assign]
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await main_screen(pilot)
        chats = screen.query_one(ChatList)
        options = chats.options
        await bob.send_text("alice", "hi from bob")
        await carol.send_text("alice", "hi from carol")
        await until(pilot, lambda: len(chats.chat_ids()) == 2)
        options.focus()
        options.highlighted = options.get_option_index(direct_chat_id("carol"))
        await pilot.press("m")
        await until(pilot, lambda: direct_chat_id("carol") in chats.muted)
        await until(pilot, lambda: "@carol 🔕" in screen_text(app))
        # A muted chat counts unread messages but makes no noise.
        toasts, rung = len(app._notifications), len(bells)
        await carol.send_text("alice", "psst")
        await until(pilot, lambda: chats.get(direct_chat_id("carol")).unread == 2)  # type: ignore[union-attr]
        await bob.send_text("alice", "and me")  # the unmuted one still rings (a sync point)
        await until(pilot, lambda: len(bells) > rung)
        assert not any("psst" in n.message for n in list(app._notifications)[toasts:])
        # Archive bob: out of the list; the filter still finds him.
        options.highlighted = options.get_option_index(direct_chat_id("bob"))
        await pilot.press("a")
        await until(pilot, lambda: chats.chat_ids() == [direct_chat_id("carol")])
        await pilot.press("ctrl+l")
        await type_text(pilot, "bo")
        await until(pilot, lambda: chats.chat_ids() == [direct_chat_id("bob")])
        assert "(archived)" in screen_text(app)
        chats.clear_filter()
        # A new message brings him back.
        await bob.send_text("alice", "still there?")
        await until(pilot, lambda: direct_chat_id("bob") in chats.chat_ids())
        assert direct_chat_id("bob") not in chats.archived
    # The choices outlive the app.
    app = BlindpostApp(backend=await opener.open(None))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await main_screen(pilot)
        chats = screen.query_one(ChatList)
        await until(pilot, lambda: direct_chat_id("carol") in chats.muted)
        assert not chats.archived


async def test_alt_e_writes_the_message_in_the_editor(
    tui_opener: MakeOpener,
    sdk_client: MakeClient,
    tui_relay: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = tmp_path / "draft-seen.txt"
    editor = tmp_path / "my editor"
    # A stand-in for the user's editor: it keeps what it was given and writes a
    # two-line message into the file.
    editor.write_text(
        f'#!/bin/sh\ncp "$1" "{seen}"\nprintf "written in the editor\\nsecond line\\n" > "$1"\n'
    )
    editor.chmod(editor.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("VISUAL", f"'{editor}'")
    bob = await sdk_client("bob")
    bob_events = bob.events()
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat_with(pilot, "bob")
        area = screen.query_one(ComposeArea)
        area.focus()
        await type_text(pilot, "draft")
        await pilot.press("alt+e")
        await until(pilot, lambda: area.text == "written in the editor\nsecond line")
        assert seen.read_text() == "draft", "the editor starts from the draft"
        await pilot.press("enter")
        got = await next_event(bob_events, lambda e: isinstance(e, MessageReceived))
        assert got.message.text == "written in the editor\nsecond line"
    assert not list(Path(tempfile.gettempdir()).glob("blindpost-compose-*"))
