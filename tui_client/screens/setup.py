# First run (create + register), unlock (passphrase) and the account card.
#
# Invariant: creating and opening run in workers; the screens stay responsive
# while the KDF and the relay round trips happen, and report errors inline.
"""Account screens: first run, unlock, account card."""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Center, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Static

from tui_client.adapter import (
    DEFAULT_RELAY_URL,
    Backend,
    BackendError,
    InviteNeeded,
    Opener,
    check_new_account,
)

__all__ = ["AccountCardScreen", "FirstRunScreen", "Opened", "UnlockScreen"]


class Opened(Message):
    """An account was created or unlocked; ``backend`` is ready to start."""

    def __init__(self, backend: Backend, created: bool) -> None:
        super().__init__()
        self.backend = backend
        self.created = created


class _Failed(Message):
    def __init__(self, text: str, invite: bool = False) -> None:
        super().__init__()
        self.text = text
        self.invite = invite  # the relay wants an invite code: show its field


class FirstRunScreen(Screen[None]):
    """Choose a username, the relay and an optional passphrase; register."""

    def __init__(self, opener: Opener) -> None:
        super().__init__()
        self._opener = opener

    def compose(self) -> ComposeResult:
        with Center(), Vertical(classes="setup-box"):
            yield Label("Welcome to Blindpost", classes="dialog-title")
            yield Static("Create your account. Only your username is known to the relay.")
            yield Input(placeholder="username (a-z, 0-9, _)", id="setup-username")
            # A relay of several nodes: their URLs separated by commas; the client moves
            # to the next one when its node fails.
            yield Input(
                value=DEFAULT_RELAY_URL,
                placeholder="relay URL (several nodes: separate with commas)",
                id="setup-relay",
            )
            yield Input(placeholder="passphrase (optional)", password=True, id="setup-pass")
            yield Input(placeholder="passphrase again", password=True, id="setup-pass2")
            # Shown only once the relay says it registers by invitation.
            yield Input(placeholder="invite code", id="setup-invite", classes="hidden")
            # markup=False: an error names characters such as [a-z0-9_], which
            # Rich markup would eat as a tag.
            yield Static("", id="setup-error", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Create account", variant="primary", id="setup-create")
        yield Footer()

    @on(Button.Pressed, "#setup-create")
    @on(Input.Submitted, "#setup-pass2")
    def _create(self) -> None:
        username = self.query_one("#setup-username", Input).value.strip()
        # An empty relay field is an error, not a silent default: the form shows
        # the default as its initial value, so an empty one was cleared on purpose.
        relay = self.query_one("#setup-relay", Input).value.strip()
        passphrase = self.query_one("#setup-pass", Input).value
        again = self.query_one("#setup-pass2", Input).value
        invite = self.query_one("#setup-invite", Input).value.strip() or None
        error = self.query_one("#setup-error", Static)
        try:
            # Checked before anything is created (a bad name used to leave a
            # database behind that every later launch refused to open).
            check_new_account(username, relay)
        except BackendError as exc:
            error.update(str(exc))
            return
        if passphrase != again:
            error.update("the passphrases differ")
            return
        error.update("creating keys and registering…")
        self.query_one("#setup-create", Button).disabled = True
        self._register(username, relay, passphrase or None, invite)

    @on(Input.Submitted, "#setup-invite")
    def _create_with_invite(self) -> None:
        self._create()

    @on(Input.Submitted, "#setup-username")
    @on(Input.Submitted, "#setup-relay")
    @on(Input.Submitted, "#setup-pass")
    def _next_field(self) -> None:
        self.focus_next()

    @work(exclusive=True, group="setup")
    async def _register(
        self, username: str, relay: str, passphrase: str | None, invite: str | None
    ) -> None:
        try:
            backend = await self._opener.create(username, relay, passphrase, invite)
        except BackendError as exc:
            self.post_message(_Failed(str(exc), invite=isinstance(exc, InviteNeeded)))
            return
        self.app.post_message(Opened(backend, created=True))

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        self.query_one("#setup-error", Static).update(message.text)
        self.query_one("#setup-create", Button).disabled = False
        if message.invite:
            field = self.query_one("#setup-invite", Input)
            field.remove_class("hidden")
            field.focus()


class UnlockScreen(Screen[None]):
    """Ask for the passphrase and open the account."""

    def __init__(self, opener: Opener) -> None:
        super().__init__()
        self._opener = opener

    def compose(self) -> ComposeResult:
        with Center(), Vertical(classes="setup-box"):
            yield Label("Unlock Blindpost", classes="dialog-title")
            yield Input(placeholder="passphrase", password=True, id="unlock-pass")
            yield Static("", id="unlock-error", classes="dialog-error", markup=False)
        yield Footer()

    @on(Input.Submitted, "#unlock-pass")
    def _submit(self, event: Input.Submitted) -> None:
        self.query_one("#unlock-error", Static).update("unlocking…")
        self._unlock(event.value)

    @work(exclusive=True, group="unlock")
    async def _unlock(self, passphrase: str) -> None:
        try:
            backend = await self._opener.open(passphrase)
        except BackendError as exc:
            self.post_message(_Failed(str(exc)))
            return
        self.app.post_message(Opened(backend, created=False))

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        self.query_one("#unlock-error", Static).update(message.text)
        self.query_one("#unlock-pass", Input).value = ""


class AccountCardScreen(Screen[None]):
    """Who you are and how contacts verify you: after registering, and on F3."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter,escape", "done", "Continue")]

    def __init__(
        self,
        username: str,
        relay_url: str,
        fingerprint: str = "",
        *,
        first_run: bool = True,
        recovery_key: str | None = None,
    ) -> None:
        super().__init__()
        self._recovery_key = recovery_key
        self._username = username
        self._relay = relay_url
        self._fingerprint = fingerprint
        self._first_run = first_run

    def compose(self) -> ComposeResult:
        title = "Your account is ready" if self._first_run else "Your account"
        digits = self._fingerprint
        # Grouped like the contact card's 60 digits: 5 at a time.
        grouped = " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
        with Center(), Vertical(classes="setup-box", id="account-card"):
            yield Label(title, classes="dialog-title")
            info = f"Username: {self._username}\nRelay:    {self._relay}"
            if grouped:
                info += f"\nYour key: {grouped}"
            yield Static(info, id="account-card-info")
            yield Static(
                "Your key is your half of every safety number: a contact sees these "
                "30 digits in theirs. To verify a contact, open the chat, press F2 "
                "and compare all 60 digits (or scan the QR code) with them.",
                id="account-card-help",
            )
            if self._recovery_key is not None:
                yield Static(
                    f"Recovery key: {self._recovery_key}\nWrite it down now: it is shown only "
                    "once. It re-claims your username on a new device if you lose every device "
                    "('blindpost recover').",
                    id="account-card-recovery",
                    markup=False,
                )
            with Horizontal(classes="dialog-buttons"):
                label = "Start chatting" if self._first_run else "Close"
                yield Button(label, variant="primary", id="card-done")
        yield Footer()

    @on(Button.Pressed, "#card-done")
    def action_done(self) -> None:
        self.dismiss(None)
