# Modal dialogs: prompts, reactions, new group, group info, contact info, this
# account's devices, file picker and search.
#
# Invariants: a dialog returns what the user chose through ``dismiss``; the
# dialogs that act on their own (group info, contact info, devices, search) call the
# backend only in workers and show the result when the worker's message arrives.
"""Modal dialogs of the terminal client."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from typing import ClassVar

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    DirectoryTree,
    Input,
    Label,
    OptionList,
    SelectionList,
    Static,
)
from textual.widgets.option_list import Option

from tui_client.adapter import (
    REMOVE_THIS_DEVICE,
    SEARCH_PAGE,
    Backend,
    BackendError,
    ContactInfo,
    DeviceView,
    GroupInfo,
    MessageView,
    SearchHit,
)
from tui_client.config import KEY_ACTIONS, TuiConfig, config_path
from tui_client.widgets.fmt import short_time

__all__ = [
    "REACTIONS",
    "AttachScreen",
    "ConfirmScreen",
    "ContactInfoScreen",
    "DevicesScreen",
    "GroupInfoScreen",
    "HelpScreen",
    "LinkApproval",
    "LinkDeviceScreen",
    "NewGroup",
    "NewGroupScreen",
    "PromptScreen",
    "ReactScreen",
    "SearchScreen",
    "SwitcherScreen",
    "fuzzy_score",
]

#: The quick reactions offered (an empty string removes ours), with their names.
REACTIONS = ("👍", "❤", "😂", "😮", "😢", "🙏")
REACTION_NAMES = ("thumbs up", "heart", "laughing", "surprised", "sad", "thanks")


class ConfirmScreen(ModalScreen[bool]):
    """Ask before something that cannot be undone; dismisses with True to go ahead.

    Enter or ``y`` confirms; Esc or ``n`` cancels (the safe choice has the focus).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "answer(False)", "Cancel"),
        Binding("y", "answer(True)", "Yes"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self._question = question
        self._yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm-dialog"):
            yield Static(
                self._question, classes="dialog-title", id="confirm-question", markup=False
            )
            with Horizontal(classes="dialog-buttons"):
                yield Button(self._yes, variant="error", id="confirm-yes")
                yield Button("Cancel", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    @on(Button.Pressed, "#confirm-yes")
    def _yes_pressed(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no_pressed(self) -> None:
        self.dismiss(False)

    def action_answer(self, answer: bool) -> None:
        """Answer the question."""
        self.dismiss(answer)


def fuzzy_score(query: str, text: str) -> int | None:
    """How well ``query`` matches ``text`` as a subsequence (lower is better); None: no match.

    A prefix match beats a match inside the text, which beats scattered letters.
    """
    q, t = query.lower(), text.lower()
    if not q:
        return 0
    if t.startswith(q):
        return 0
    found = t.find(q)
    if found >= 0:
        return 100 + found
    score, at = 1000, 0
    for ch in q:
        nxt = t.find(ch, at)
        if nxt < 0:
            return None
        score += nxt - at
        at = nxt + 1
    return score


class SwitcherScreen(ModalScreen[str | None]):
    """Ctrl+K: type part of a chat's name; Enter opens the best match (or the highlighted)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, chats: list[tuple[str, str]]) -> None:
        super().__init__()
        self._chats = chats  # (chat id, title), most recent first

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="switcher-dialog"):
            yield Label("Go to chat", classes="dialog-title")
            yield Input(placeholder="part of a name", id="switcher-input")
            yield OptionList(id="switcher-results")

    def on_mount(self) -> None:
        self._show("")

    def matches(self, query: str) -> list[tuple[str, str]]:
        """The chats matching ``query``, best first (ties: most recent first)."""
        scored = [
            (fuzzy_score(query, title), i, c, title) for i, (c, title) in enumerate(self._chats)
        ]
        return [(c, title) for s, _, c, title in sorted(x for x in scored if x[0] is not None)]

    def _show(self, query: str) -> None:
        results = self.query_one("#switcher-results", OptionList)
        results.set_options(
            Option(("#" if c.startswith("group:") else "@") + title, id=c)
            for c, title in self.matches(query)
        )
        if results.option_count:
            results.highlighted = 0

    @on(Input.Changed, "#switcher-input")
    def _changed(self, event: Input.Changed) -> None:
        self._show(event.value)

    @on(Input.Submitted, "#switcher-input")
    def _submitted(self) -> None:
        results = self.query_one("#switcher-results", OptionList)
        option = results.highlighted_option
        if option is not None:
            self.dismiss(option.id)

    def on_key(self, event: events.Key) -> None:
        # Up / Down move through the results while typing goes on in the input.
        if event.key in ("up", "down"):
            results = self.query_one("#switcher-results", OptionList)
            if event.key == "down":
                results.action_cursor_down()
            else:
                results.action_cursor_up()
            event.stop()

    @on(OptionList.OptionSelected, "#switcher-results")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """F1: every key of the main view, as the settings file left them."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, key_map: dict[str, str], config: TuiConfig) -> None:
        super().__init__()
        self._keys = key_map
        self._config = config

    def compose(self) -> ComposeResult:
        width = max(len(k) for k in self._keys.values()) + 2
        lines = [
            f"{keys.replace(',', ' / '):<{width}} {KEY_ACTIONS[name][1]}  [{name}]"
            for name, keys in self._keys.items()
        ]
        lines += [
            f"{'Enter':<{width}} send (compose box)",
            f"{'Alt+Enter':<{width}} new line (also Ctrl+J)",
            f"{'Alt+1..9':<{width}} the chat at that place in the list",
        ]
        if self._config.vi_keys:
            lines.append(f"{'j / k / g / G':<{width}} down / up / first / last in the lists")
        where = self._config.path or config_path()
        source = "read from" if self._config.path else "none yet; create"
        with VerticalScroll(classes="dialog", id="help-dialog"):
            yield Label("Keys", classes="dialog-title")
            yield Static("\n".join(lines), id="help-keys", markup=False)
            yield Static(
                f"Settings file ({source}): {where}\nlayout: {self._config.layout}",
                id="help-config",
                markup=False,
            )

    def action_close(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True, slots=True)
class LinkApproval:
    """What the link dialog returns: the new device's code and the name to give it."""

    code: str
    name: str


class LinkDeviceScreen(ModalScreen[LinkApproval | None]):
    """Approve a new device: type the code its ``blindpost link`` shows, and a name."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Link a new device", classes="dialog-title")
            yield Label(
                "On the new machine run: blindpost --data DIR link --relay URL\n"
                "then type the code it shows. The device gets this account's keys.",
                classes="dialog-hint",
            )
            yield Input(placeholder="code", id="link-code")
            yield Input(placeholder="name for it (optional)", id="link-name", max_length=64)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Link", variant="primary", id="link-ok")
                yield Button("Cancel", id="link-cancel")

    @on(Input.Submitted, "#link-name")
    @on(Input.Submitted, "#link-code")
    @on(Button.Pressed, "#link-ok")
    def _ok(self) -> None:
        code = self.query_one("#link-code", Input).value.strip()
        if not code:
            self.query_one("#link-code", Input).focus()
            return
        name = self.query_one("#link-name", Input).value.strip()
        self.dismiss(LinkApproval(code, name))

    @on(Button.Pressed, "#link-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, placeholder: str = "", value: str = "") -> None:
        super().__init__()
        self._title = title
        self._placeholder = placeholder
        self._value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self._title, classes="dialog-title")
            yield Input(value=self._value, placeholder=self._placeholder, id="prompt-input")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="prompt-ok")
                yield Button("Cancel", id="prompt-cancel")

    @on(Input.Submitted, "#prompt-input")
    @on(Button.Pressed, "#prompt-ok")
    def _ok(self) -> None:
        value = self.query_one("#prompt-input", Input).value.strip()
        self.dismiss(value or None)

    @on(Button.Pressed, "#prompt-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ReactScreen(ModalScreen[str | None]):
    """Pick a reaction (or remove ours)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("React with", classes="dialog-title")
            options = [
                Option(f"{e}  {name}", id=f"r{i}")
                for i, (e, name) in enumerate(zip(REACTIONS, REACTION_NAMES, strict=True))
            ]
            options.append(Option("remove my reaction", id="remove"))
            yield OptionList(*options, id="react-options")

    @on(OptionList.OptionSelected, "#react-options")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        option_id = event.option.id or ""
        self.dismiss("" if option_id == "remove" else REACTIONS[int(option_id[1:])])

    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True, slots=True)
class NewGroup:
    """A group to create."""

    name: str
    members: tuple[str, ...]


class NewGroupScreen(ModalScreen[NewGroup | None]):
    """Name a group and pick its members (known contacts, or typed names)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, contacts: list[str]) -> None:
        super().__init__()
        self._contacts = contacts

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New group", classes="dialog-title")
            yield Input(placeholder="group name", id="group-name")
            yield SelectionList[str](*[(c, c) for c in self._contacts], id="group-members")
            yield Input(placeholder="more members: name1, name2", id="group-extra")
            yield Static("", id="group-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Create", variant="primary", id="group-create")
                yield Button("Cancel", id="group-cancel")

    @on(Button.Pressed, "#group-create")
    @on(Input.Submitted)
    def _create(self) -> None:
        name = self.query_one("#group-name", Input).value.strip()
        picked = list(self.query_one("#group-members", SelectionList).selected)
        extra = self.query_one("#group-extra", Input).value
        picked += [p.strip() for p in extra.replace(" ", ",").split(",") if p.strip()]
        members = tuple(sorted(set(picked)))
        error = self.query_one("#group-error", Static)
        if not name:
            error.update("give the group a name")
        elif not members:
            error.update("pick at least one member")
        else:
            self.dismiss(NewGroup(name, members))

    @on(Button.Pressed, "#group-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class _Loaded(Message):
    """A worker finished loading what a dialog shows."""

    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value


class _Failed(Message):
    """A worker's backend call failed; ``text`` says why."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class _Done(Message):
    """A worker's change succeeded; ``text`` says what was done."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class _StatusDialog(ModalScreen[str | None]):
    """A dialog whose workers report to its status line (the ``Static`` with id ``STATUS``):
    a failure in the error colour, a change done in the success colour."""

    STATUS: ClassVar[str] = ""

    def on__failed(self, message: _Failed) -> None:
        self._status("dialog-error", message.text)

    def on__done(self, message: _Done) -> None:
        self._status("dialog-ok", message.text)

    def _status(self, classes: str, text: str) -> None:
        status = self.query_one(f"#{self.STATUS}", Static)
        status.set_classes(classes)
        status.update(text)


class GroupInfoScreen(_StatusDialog):
    """Group info: rename, add or remove members, leave.

    Dismisses with ``"left"`` after leaving, else None.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]
    STATUS = "group-status"

    def __init__(self, backend: Backend, chat_id: str) -> None:
        super().__init__()
        self._backend = backend
        self._chat_id = chat_id
        self._info: GroupInfo | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Group", classes="dialog-title", id="group-title")
            yield OptionList(id="group-member-list")
            with Horizontal(classes="dialog-row"):
                yield Input(placeholder="new name", id="group-rename")
                yield Button("Rename", id="group-rename-btn", compact=True)
            with Horizontal(classes="dialog-row"):
                yield Input(placeholder="add member", id="group-add")
                yield Button("Add", id="group-add-btn", compact=True)
            yield Static("", id="group-status", classes="dialog-ok", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Remove selected", id="group-remove-btn")
                yield Button("Leave group", variant="error", id="group-leave-btn")
                yield Button("Close", id="group-close")

    def on_mount(self) -> None:
        self._load()

    @work(group="group-info")
    async def _load(self) -> None:
        self.post_message(_Loaded(await self._backend.group_info(self._chat_id)))

    def on__loaded(self, message: _Loaded) -> None:
        info = message.value
        if not isinstance(info, GroupInfo):
            return
        self._info = info
        self.query_one("#group-title", Label).update(f"Group {info.name}")
        members = self.query_one("#group-member-list", OptionList)
        members.set_options(
            Option(f"{m} (admin)" if m in info.admins else m, id=m) for m in info.members
        )

    @work(group="group-change")
    async def _change(self, what: str, value: str) -> None:
        try:
            if what == "rename":
                await self._backend.rename_group(self._chat_id, value)
            elif what == "add":
                await self._backend.add_member(self._chat_id, value)
            elif what == "remove":
                await self._backend.remove_member(self._chat_id, value)
            elif what == "leave":
                await self._backend.leave_group(self._chat_id)
        except BackendError as exc:
            self.post_message(_Failed(str(exc)))
            return
        if what == "leave":
            self.dismiss("left")
            return
        done = {
            "rename": f"renamed to {value}",
            "add": f"added {value}",
            "remove": f"removed {value}",
        }
        self.post_message(_Done(done.get(what, what)))
        self._load()

    @on(Button.Pressed, "#group-rename-btn")
    @on(Input.Submitted, "#group-rename")
    def _rename(self) -> None:
        name = self.query_one("#group-rename", Input).value.strip()
        if name:
            self._change("rename", name)

    @on(Button.Pressed, "#group-add-btn")
    @on(Input.Submitted, "#group-add")
    def _add(self) -> None:
        user = self.query_one("#group-add", Input).value.strip()
        if user:
            self._change("add", user)

    @on(Button.Pressed, "#group-remove-btn")
    def _remove(self) -> None:
        members = self.query_one("#group-member-list", OptionList)
        option = members.highlighted_option
        if option is not None and option.id:
            self._change("remove", option.id)

    @on(Button.Pressed, "#group-leave-btn")
    def _leave(self) -> None:
        name = self._info.name if self._info else "this group"

        def answered(leave: bool | None) -> None:
            if leave:
                self._change("leave", "")

        self.app.push_screen(
            ConfirmScreen(f"Leave {name}? You stop receiving its messages.", "Leave group"),
            answered,
        )

    @on(Button.Pressed, "#group-close")
    def action_close(self) -> None:
        self.dismiss(None)


class DevicesScreen(_StatusDialog):
    """This account's devices (when each was added and last seen); remove one, or go on to
    link a new one.

    Dismisses with ``"link"`` when the user asked to link a new device, else None.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]
    STATUS = "device-status"

    def __init__(self, backend: Backend, now_ms: int = 0, tz: tzinfo | None = None) -> None:
        super().__init__()
        self._backend = backend
        self._now_ms = now_ms
        self._tz = tz or UTC
        self._devices: dict[int, DeviceView] = {}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Devices of this account", classes="dialog-title")
            yield OptionList(id="device-list")
            yield Static("", id="device-status", classes="dialog-ok", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Remove selected", variant="error", id="device-remove-btn")
                yield Button("Link a new device", id="device-link-btn")
                yield Button("Close", id="device-close")

    def on_mount(self) -> None:
        self._load()

    @work(group="devices", exclusive=True)
    async def _load(self) -> None:
        try:
            devices = await self._backend.list_devices()
        except BackendError as exc:
            self.post_message(_Failed(f"cannot list the devices: {exc}"))
            return
        self.post_message(_Loaded(devices))

    def describe(self, d: DeviceView) -> str:
        """One row: id, name, when it was added and last seen, and which one this is."""
        seen = short_time(d.last_seen, self._now_ms, self._tz) or "never"
        added = short_time(d.added_at, self._now_ms, self._tz)
        this = "  (this device)" if d.this_device else ""
        return f"{d.device_id:>3}  {d.name or '(no name)'}  added {added}  seen {seen}{this}"

    def on__loaded(self, message: _Loaded) -> None:
        devices = message.value
        if not isinstance(devices, list):
            return
        self._devices = {d.device_id: d for d in devices}
        listed = self.query_one("#device-list", OptionList)
        listed.set_options(Option(self.describe(d), id=str(d.device_id)) for d in devices)

    @on(Button.Pressed, "#device-remove-btn")
    def _remove(self) -> None:
        option = self.query_one("#device-list", OptionList).highlighted_option
        device = self._devices.get(int(option.id)) if option is not None and option.id else None
        if device is None:
            return
        if device.this_device:
            self.post_message(_Failed(REMOVE_THIS_DEVICE))
            return
        named = f" ({device.name})" if device.name else ""

        def answered(remove: bool | None) -> None:
            if remove:
                self._remove_device(device.device_id)

        self.app.push_screen(
            ConfirmScreen(
                f"Remove device {device.device_id}{named}? It is logged out and reads nothing"
                " sent from now on.",
                "Remove device",
            ),
            answered,
        )

    @work(group="device-change", exclusive=True)
    async def _remove_device(self, device_id: int) -> None:
        try:
            await self._backend.remove_device(device_id)
        except BackendError as exc:
            self.post_message(_Failed(f"device {device_id} was not removed: {exc}"))
            return
        self.post_message(_Done(f"removed device {device_id}"))
        self._load()

    @on(Button.Pressed, "#device-link-btn")
    def _link(self) -> None:
        self.dismiss("link")

    @on(Button.Pressed, "#device-close")
    def action_close(self) -> None:
        self.dismiss(None)


class ContactInfoScreen(ModalScreen[bool]):
    """Safety number, QR code and trust of a contact; mark verified.

    Dismisses with True when the contact was marked verified.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("v", "verify", "Mark verified"),
    ]

    def __init__(self, backend: Backend, user: str) -> None:
        super().__init__()
        self._backend = backend
        self._user = user
        self._verified = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="contact-dialog"):
            yield Label(f"Contact {self._user}", classes="dialog-title")
            yield Static("loading…", id="contact-trust")
            yield Static("", id="contact-number")
            yield Static("", id="contact-qr")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Mark verified", variant="success", id="contact-verify")
                yield Button("Close", id="contact-close")

    def on_mount(self) -> None:
        self._load()

    @work(group="contact-info")
    async def _load(self) -> None:
        try:
            info = await self._backend.contact_info(self._user)
        except BackendError as exc:
            self.post_message(_Failed(str(exc)))
            return
        self.post_message(_Loaded(info))

    def on__loaded(self, message: _Loaded) -> None:
        info = message.value
        if not isinstance(info, ContactInfo):
            return
        trust = ", ".join(f"device {d}: {level}" for d, level in info.trust)
        self.query_one("#contact-trust", Static).update(f"Trust: {trust}")
        numbers = []
        for device, digits in info.safety_numbers:
            groups = [digits[i : i + 5] for i in range(0, len(digits), 5)]
            rows = [" ".join(groups[i : i + 6]) for i in range(0, len(groups), 6)]
            numbers.append(f"Safety number (device {device}):\n" + "\n".join(rows))
        self.query_one("#contact-number", Static).update("\n".join(numbers))
        self.query_one("#contact-qr", Static).update(info.qr)

    def on__failed(self, message: _Failed) -> None:
        self.query_one("#contact-trust", Static).update(message.text)

    @work(group="contact-verify")
    async def action_verify(self) -> None:
        try:
            await self._backend.accept_key(self._user, verified=True)
        except BackendError as exc:
            self.post_message(_Failed(str(exc)))
            return
        self._verified = True
        self.notify(f"{self._user} marked verified")
        self._load()

    @on(Button.Pressed, "#contact-verify")
    def _verify_pressed(self) -> None:
        self.action_verify()

    @on(Button.Pressed, "#contact-close")
    def action_close(self) -> None:
        self.dismiss(self._verified)


class AttachScreen(ModalScreen[Path | None]):
    """Pick a file to send: browse, or type a path."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self._start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="attach-dialog"):
            yield Label("Attach a file", classes="dialog-title")
            yield Input(placeholder="path to a file", id="attach-path")
            yield DirectoryTree(self._start, id="attach-tree")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Send", variant="primary", id="attach-send")
                yield Button("Cancel", id="attach-cancel")

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#attach-path", Input).value = str(event.path)
        # Enter picked the file; a second Enter sends it.
        self.query_one("#attach-send", Button).focus()

    @on(Input.Submitted, "#attach-path")
    @on(Button.Pressed, "#attach-send")
    def _send(self) -> None:
        raw = self.query_one("#attach-path", Input).value.strip()
        if raw:
            self.dismiss(Path(raw).expanduser())

    @on(Button.Pressed, "#attach-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class SearchScreen(ModalScreen[MessageView | None]):
    """Search across the history; choosing a result opens its chat.

    Each word matches the words it begins (``histo`` finds ``history``); hits
    come newest first, a page at a time: moving to the end of the list reads
    the next page.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, backend: Backend, now_ms: int = 0, tz: tzinfo | None = None) -> None:
        super().__init__()
        self._backend = backend
        self._now_ms = now_ms
        self._tz = tz or UTC
        self._results: dict[str, MessageView] = {}
        self._text = ""
        self._more = False  # the last page was full: there may be older hits
        self._loading = False

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="search-dialog"):
            yield Label("Search messages", classes="dialog-title")
            yield Input(placeholder="words to find (beginnings are enough)", id="search-input")
            yield OptionList(id="search-results")

    @on(Input.Changed, "#search-input")
    def _changed(self, event: Input.Changed) -> None:
        self._text = event.value
        self._search(event.value, None)

    @work(exclusive=True, group="search")
    async def _search(self, text: str, before: str | None) -> None:
        try:
            hits = await self._backend.search(text, before=before) if text.strip() else []
        except BackendError as exc:
            self.post_message(_Failed(str(exc)))
            return
        self.post_message(_Loaded((text, before, hits)))

    def _label(self, hit: SearchHit) -> str:
        m = hit.message
        where = ("@" if m.chat_id.startswith("dm:") else "#") + hit.chat_title
        who = "you" if m.outgoing else m.sender
        when = short_time(m.sent_at, self._now_ms, self._tz)
        return f"{where} · {who} · {when}: {(m.text or '').replace(chr(10), ' ')}"

    def on__loaded(self, message: _Loaded) -> None:
        value = message.value
        if not isinstance(value, tuple):
            return
        text, before, hits = value
        if text != self._text:
            return  # typed on meanwhile
        results = self.query_one("#search-results", OptionList)
        if before is None:
            self._results = {}
            results.clear_options()
        self._loading = False
        self._more = len(hits) >= SEARCH_PAGE
        fresh = [h for h in hits if h.message.id not in self._results]
        for hit in fresh:
            self._results[hit.message.id] = hit.message
        results.add_options(Option(self._label(h), id=h.message.id) for h in fresh)

    def on__failed(self, message: _Failed) -> None:
        self._loading = False
        self.notify(message.text, severity="error", markup=False)

    @on(OptionList.OptionHighlighted, "#search-results")
    def _near_end(self, event: OptionList.OptionHighlighted) -> None:
        results = self.query_one("#search-results", OptionList)
        if self._more and not self._loading and event.option_index >= results.option_count - 3:
            oldest = min(self._results.values(), key=lambda m: m.seq)
            self._loading = True
            self._search(self._text, oldest.id)

    @on(Input.Submitted, "#search-input")
    def _to_results(self) -> None:
        results = self.query_one("#search-results", OptionList)
        results.focus()
        # Enter again opens the best match, without an arrow key first.
        if results.option_count and results.highlighted is None:
            results.highlighted = 0

    @on(OptionList.OptionSelected, "#search-results")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self._results.get(event.option.id or ""))

    def action_cancel(self) -> None:
        self.dismiss(None)
