"""First run and unlock, through the real app, against a real relay."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tui_harness import until

from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.main import MainScreen
from tui_client.screens.setup import AccountCardScreen, FirstRunScreen, UnlockScreen, _Failed
from tui_client.widgets.status import ConnectionIndicator

MakeOpener = Callable[..., Opener]


async def test_first_run_registers_then_later_runs_ask_for_the_passphrase(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    opener = tui_opener("alice")
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(
            pilot,
            lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#setup-create"),
        )
        screen = app.screen
        relay_input = screen.query_one("#setup-relay")
        assert relay_input.value == "http://127.0.0.1:8080"  # the README quick start
        screen.query_one("#setup-username").value = "alice"
        relay_input.value = tui_relay.url
        screen.query_one("#setup-pass").value = "correct horse"
        screen.query_one("#setup-pass2").value = "correct horsE"
        await pilot.click("#setup-create")
        await until(pilot, lambda: "differ" in str(screen.query_one("#setup-error").render()))
        # The keyboard path this time: Enter in the last field submits.
        screen.query_one("#setup-pass2").value = "correct horse"
        screen.query_one("#setup-pass2").focus()
        await pilot.press("enter")
        await until(
            pilot,
            lambda: isinstance(app.screen, AccountCardScreen) and app.screen.query("#card-done"),
        )
        assert "alice" in str(app.screen.query_one("#account-card-info").render())
        shown = str(app.screen.query_one("#account-card-recovery").render())
        assert "Recovery key: " in shown and len(shown.split(": ")[1].split()[0]) == 39
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        indicator = app.screen.query_one(ConnectionIndicator)
        await until(pilot, lambda: indicator.state == "connected")
    assert opener.exists()

    again = BlindpostApp(opener)
    async with again.run_test(size=(80, 24)) as pilot:
        await until(
            pilot,
            lambda: isinstance(again.screen, UnlockScreen) and again.screen.query("#unlock-pass"),
        )
        field = again.screen.query_one("#unlock-pass")
        field.value = "wrong"
        field.focus()
        await pilot.press("enter")
        error = again.screen.query_one("#unlock-error")
        await until(pilot, lambda: "passphrase" in str(error.render()))
        assert isinstance(again.screen, UnlockScreen)
        field.value = "correct horse"
        field.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(again.screen, MainScreen))


async def test_taken_username_is_reported_and_can_be_changed(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    first = await tui_opener("first").create("alice", tui_relay.url, None)
    await first.close()
    opener = tui_opener("second")
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(
            pilot,
            lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#setup-create"),
        )
        screen = app.screen
        screen.query_one("#setup-username").value = "alice"
        screen.query_one("#setup-relay").value = tui_relay.url
        await pilot.click("#setup-create")
        error = screen.query_one("#setup-error")
        await until(pilot, lambda: "taken" in str(error.render()))
        assert not opener.exists(), "a failed registration leaves no half account behind"
        screen.query_one("#setup-username").value = "alice2"
        screen.query_one("#setup-pass2").focus()
        await pilot.press("enter")
        await _through_the_card(pilot)


async def test_without_passphrase_later_runs_open_straight_into_the_chats(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    opener = tui_opener("alice")
    backend = await opener.create("alice", tui_relay.url, None)
    await backend.close()
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))


@pytest.mark.relay_settings(registration="invite")
async def test_first_run_asks_for_an_invite_when_the_relay_is_invite_only(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    """The invite field appears only once the relay says it registers by invitation; a
    refused code says so; the operator's code registers the account."""
    opener = tui_opener("alice")
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 30)) as pilot:
        await until(
            pilot,
            lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#setup-create"),
        )
        screen = app.screen
        invite = screen.query_one("#setup-invite")
        assert not invite.display
        screen.query_one("#setup-username").value = "alice"
        screen.query_one("#setup-relay").value = tui_relay.url
        await pilot.click("#setup-create")
        error = screen.query_one("#setup-error")
        await until(pilot, lambda: "invitation only" in str(error.render()))
        assert invite.display and invite.has_focus
        invite.value = "not-a-code"
        await pilot.press("enter")
        await until(pilot, lambda: "refused the invite code" in str(error.render()))
        made = subprocess.run(
            [sys.executable, "-m", "relay", "invite", "create", "--data", str(tui_relay.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        invite.value = made.stdout.strip()
        invite.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, AccountCardScreen))
    assert opener.exists()


async def _through_the_card(pilot: Any) -> None:
    """The account card comes up; Enter leads on to the chats (fully shown)."""
    app = pilot.app
    await until(
        pilot,
        lambda: isinstance(app.screen, AccountCardScreen) and app.screen.query("#card-done"),
    )
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, MainScreen) and app.screen.query("KeyBanner"))


async def _first_run_form(pilot: Any) -> Any:
    app = pilot.app
    await until(
        pilot,
        lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#setup-create"),
    )
    return app.screen


async def _submit(pilot: Any, screen: Any) -> None:
    # The keyboard path (Enter in the last field): a Button ignores a click that
    # comes while it still shows the previous click.
    screen.query_one("#setup-pass2").focus()
    await pilot.press("enter")


async def test_a_bad_username_is_refused_before_anything_is_created(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    opener = tui_opener("alice")
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _first_run_form(pilot)
        screen.query_one("#setup-username").value = "Bad Name"
        screen.query_one("#setup-relay").value = tui_relay.url
        await pilot.click("#setup-create")
        error = screen.query_one("#setup-error")
        await until(pilot, lambda: "username" in str(error.render()))
        assert "a-z, digits 0-9 and _" in str(error.render())
        assert not opener.data_dir.exists(), "nothing is written for a refused name"
        # An SDK error naming [a-z0-9_] is shown as written, not eaten as markup.
        screen.post_message(_Failed("must match ^[a-z0-9_]{3,32}$"))
        await until(pilot, lambda: "[a-z0-9_]" in str(error.render()))
    # The next launch asks again instead of failing to open a half account.
    again = BlindpostApp(opener)
    async with again.run_test(size=(80, 24)) as pilot:
        screen = await _first_run_form(pilot)
        screen.query_one("#setup-username").value = "alice"
        screen.query_one("#setup-relay").value = tui_relay.url
        await pilot.click("#setup-create")
        await _through_the_card(pilot)
    assert again.return_code in (None, 0)


async def test_first_run_relay_problems_are_explained_and_leave_nothing_behind(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    opener = tui_opener("alice")
    url = tui_relay.url
    tui_relay.stop()
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _first_run_form(pilot)
        error = screen.query_one("#setup-error")
        screen.query_one("#setup-username").value = "alice"
        # An empty relay field is an error, not a silent default.
        screen.query_one("#setup-relay").value = ""
        await _submit(pilot, screen)
        await until(pilot, lambda: "relay's URL" in str(error.render()))
        assert not opener.data_dir.exists()
        screen.query_one("#setup-relay").value = "relay.example.org/api"
        await _submit(pilot, screen)
        await until(pilot, lambda: "http:// or https://" in str(error.render()))

        assert not opener.data_dir.exists()
        # Nothing listens at the relay's address now: a sentence, not a class name.
        screen.query_one("#setup-relay").value = url
        await _submit(pilot, screen)
        await until(pilot, lambda: "cannot reach the relay" in str(error.render()))
        shown = str(error.render())
        assert url in shown and "ClientConnectorError" not in shown
        assert not opener.exists(), "a failed registration leaves no account behind"
        assert not screen.query_one("#setup-create").disabled
        # The relay comes up: the same form now works.
        tui_relay.start()
        await _submit(pilot, screen)
        await _through_the_card(pilot)


async def test_first_run_takes_a_relays_nodes_separated_by_commas(
    tui_opener: MakeOpener, tui_relay: Any
) -> None:
    # The first node does not answer (nothing listens on port 9): registering and connecting
    # move on to the second, and the account keeps both, in order.
    dead = "http://127.0.0.1:9"
    opener = tui_opener("nodes")
    app = BlindpostApp(opener)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(
            pilot,
            lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#setup-create"),
        )
        screen = app.screen
        screen.query_one("#setup-username").value = "nodes"
        screen.query_one("#setup-relay").value = f"{dead}/,  {tui_relay.url}"
        await pilot.click("#setup-create")
        await until(
            pilot,
            lambda: isinstance(app.screen, AccountCardScreen) and app.screen.query("#card-done"),
        )
        card = str(app.screen.query_one("#account-card-info").render())
        assert f"{dead}, {tui_relay.url}" in card
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        indicator = app.screen.query_one(ConnectionIndicator)
        await until(pilot, lambda: indicator.state == "connected")
