# The main view: the chat list beside the open conversation.
#
# Invariants:
# * Every backend call runs in a worker (``@work``); the worker posts a
#   past-tense message (``PageLoaded``, ``MessageSent``, ``ChatRefreshed``...) and
#   the handler updates widgets. No handler awaits the backend, so a slow relay
#   or a slow disk never freezes the screen.
# * Backend updates arrive through one long-running worker (``_pump``) that
#   re-posts them as ``UpdateArrived``. New messages of the open chat are added
#   to the list in batches (``_incoming``, one list update per 100 ms tick, every
#   500 ms while the user types, and
#   one ``mark_read`` per batch); chat-list rows touched by updates are
#   refreshed in batches (``_dirty`` + a short timer). So a burst of incoming
#   messages costs a few list updates per second, not one per message.
# * Pages of the open chat are read in workers: the first one (newest, or around
#   a search hit) in an exclusive worker, the next ones (older / newer, asked for
#   by the MessageList's render window) in plain ones whose result is dropped if
#   the window moved meanwhile.
# * The open chat's id is ``self.chat_id``; every page or update for another
#   chat is ignored by the conversation (the user may have moved on).
# * Read means displayed in a focused window: ``mark_read`` is asked only while
#   the terminal has the focus, no dialog covers the chat and the newest
#   message is in view (``_can_mark_read``), and checked again after the
#   debounce. Read receipts never go out for messages the user could not see.
"""The main screen."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import tzinfo
from pathlib import Path
from typing import ClassVar, Literal

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult, SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ProgressBar, Static, TextArea

from tui_client.adapter import (
    PAGE_SIZE,
    Backend,
    BackendError,
    ChatSummary,
    ChatUpdated,
    ConnectionChanged,
    KeyChanged,
    MessageChanged_,
    MessageView,
    NewMessage,
    Notice,
    ReceiptChanged,
    RelayUnavailable,
    TypingChanged,
    Update,
    group_line,
)
from tui_client.config import ChatPrefs, TuiConfig, load_prefs, prefs_path, save_prefs
from tui_client.screens.dialogs import (
    AttachScreen,
    ConfirmScreen,
    ContactInfoScreen,
    DevicesScreen,
    GroupInfoScreen,
    HelpScreen,
    LinkApproval,
    LinkDeviceScreen,
    NewGroup,
    NewGroupScreen,
    PromptScreen,
    ReactScreen,
    SearchScreen,
    SwitcherScreen,
)
from tui_client.screens.setup import AccountCardScreen
from tui_client.widgets.chat_list import ChatList, ChatOptions
from tui_client.widgets.conversation import (
    PREVIEW_COLS,
    PREVIEW_ROWS,
    ComposeArea,
    MessageList,
    first_link,
    mentions,
)
from tui_client.widgets.image_preview import MAX_BYTES, PreviewError, render_preview
from tui_client.widgets.status import ConnectionIndicator, KeyBanner, KeyFooter

__all__ = [
    "ChatRefreshed",
    "ChatsLoaded",
    "MainScreen",
    "MessageSent",
    "PageLoaded",
    "UpdateArrived",
]

_TYPING_EVERY = 4.0  # seconds between "typing" pings while composing
_TYPING_SHOWN = 6.0  # a typing indicator without a refresh disappears after this
_REFRESH_TICK = 0.5  # chat-list refresh batching
_REFRESH_WHILE_TYPING = 2.0  # ... while the user types (see _APPEND_WHILE_TYPING)
_APPEND_TICK = 0.1  # new messages of the open chat are added to the list in batches
# ... but while the user types (the compose box changed less than _TYPING_QUIET
# ago) a batch waits up to _APPEND_WHILE_TYPING: adding rows re-renders the whole
# visible list, the one piece of work a keystroke's frame can queue behind
# (`python bench/tui_bench.py`, keypress to frame while 50 messages/s arrive).
_APPEND_WHILE_TYPING = 0.5
_TYPING_QUIET = 0.3
_MARK_READ_DELAY = 0.5
# Pages read when the window moves (older or newer). Each costs one re-window of
# the list, most of it Textual wrapping and measuring the new rows (~0.3 ms a
# row on the bench machine), so the page is sized to keep that one frame's work
# small: a 200-message page was 50+ ms of main-thread CPU, 50 is a quarter.
_OLDER_PAGE = 50


class UpdateArrived(Message):
    """The backend reported something that already happened."""

    def __init__(self, update: Update) -> None:
        super().__init__()
        self.update = update


class ChatsLoaded(Message):
    """The chat list was read."""

    def __init__(self, chats: list[ChatSummary], held: set[str] | None = None) -> None:
        super().__init__()
        self.chats = chats
        self.held = held or set()


class ChatRefreshed(Message):
    """One chat's row was re-read."""

    def __init__(self, chat: ChatSummary) -> None:
        super().__init__()
        self.chat = chat


PageKind = Literal["newest", "older", "newer", "around"]


class PageLoaded(Message):
    """A page of a chat was read.

    ``kind``: the ``newest`` page (opening a chat), the page before the window
    (``older``), after it (``newer``), or the page ``around`` the message ``anchor``
    (a search hit); ``limit`` is how many were asked for (fewer means the end).
    """

    def __init__(
        self,
        chat_id: str,
        page: list[MessageView],
        kind: PageKind,
        limit: int,
        anchor: str | None = None,
    ) -> None:
        super().__init__()
        self.chat_id = chat_id
        self.page = page
        self.kind = kind
        self.limit = limit
        self.anchor = anchor


class ChatStarted(Message):
    """A new chat with ``user`` may open (the relay knows them)."""

    def __init__(self, chat_id: str, user: str) -> None:
        super().__init__()
        self.chat_id = chat_id
        self.user = user


class PrefsLoaded(Message):
    """The muted and archived chats were read."""

    def __init__(self, prefs: ChatPrefs) -> None:
        super().__init__()
        self.prefs = prefs


class EditorDone(Message):
    """The external editor closed; ``text`` is what the file holds now."""

    def __init__(self, text: str | None, error: str = "") -> None:
        super().__init__()
        self.text = text
        self.error = error


class MessageSent(Message):
    """A message we composed is in history (queued or sent)."""

    def __init__(self, message: MessageView) -> None:
        super().__init__()
        self.message = message


class ActionFailed(Message):
    """A backend call failed; ``text`` is for the user."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class UploadProgress(Message):
    """``done`` of ``total`` bytes of an attachment were uploaded (total 0: finished)."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done = done
        self.total = total


class PreviewReady(Message):
    """An image preview was drawn (``preview`` is a rendering or why there is none)."""

    def __init__(self, message_id: str, preview: Text | str) -> None:
        super().__init__()
        self.message_id = message_id
        self.preview = preview


class KeyAccepted(Message):
    """A contact's new key was accepted."""

    def __init__(self, user: str) -> None:
        super().__init__()
        self.user = user


class MainScreen(Screen[None]):
    """Chat list + conversation + compose."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # Ids are the [keys] names of the settings file (tui_client.config).
        Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
        Binding("ctrl+g", "new_group", "New group", id="new_group"),
        # priority: Ctrl+K is the switcher even while typing (the compose box
        # would take it as "delete to the end of the line").
        Binding("ctrl+k", "switch_chat", "Switch", id="switch_chat", priority=True),
        Binding("alt+u", "next_unread", "Unread", show=False, id="next_unread"),
        Binding("f1", "help", "Help", id="help"),
        Binding("f2", "info", "Info", id="info"),
        Binding("f3", "account", "Me", show=False, id="account"),
        Binding("f4", "link_device", "Link device", show=False, id="link_device"),
        Binding("f5", "devices", "Devices", show=False, id="devices"),
        Binding("ctrl+o", "attach", "Attach", id="attach"),
        Binding("ctrl+f", "search", "Search", id="search"),
        Binding("ctrl+l", "focus_chats", "Chats", show=False, id="focus_chats"),
        Binding("escape", "cancel_compose", "Cancel", show=False),
        Binding("alt+e", "editor", "Editor", show=False, id="editor"),
        *[Binding(f"alt+{n}", f"chat_number({n})", f"Chat {n}", show=False) for n in range(1, 10)],
    ]

    def __init__(
        self,
        backend: Backend,
        clock: Callable[[], int],
        tz: tzinfo,
        config: TuiConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or TuiConfig()
        self.backend = backend
        self._clock = clock
        self._tz = tz
        self.chat_id: str | None = None
        self._reply_to: MessageView | None = None
        self._editing: MessageView | None = None
        self._dirty: set[str] = set()
        self._last_typing = 0.0
        self._typing: dict[str, float] = {}
        self._key_changed: dict[str, bool] = {}
        self._incoming: list[MessageView] = []
        self._last_keystroke = 0.0
        self._last_append = 0.0
        self._last_refresh = 0.0
        # At most two previews are fetched and decoded at a time.
        self._previewing = asyncio.Semaphore(2)

    # -- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        now = self._clock()
        with Horizontal(id="topbar"):
            yield Static(f"Blindpost · {self.backend.username}", id="whoami")
            yield ConnectionIndicator(id="connection")
        with Horizontal(id="body"):
            yield ChatList(now, self._tz, id="chat-list")
            with Vertical(id="conversation"):
                yield Static("No chat open: pick one, or Ctrl+N for a new chat", id="chat-title")
                yield KeyBanner(id="key-banner")
                yield MessageList(now, self._tz, id="messages")
                yield Static("", id="typing")
                yield Static("", id="compose-context")
                yield ProgressBar(id="upload-progress", show_eta=False)
                yield ComposeArea(id="compose", soft_wrap=True, show_line_numbers=False)
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one(KeyBanner).hide()
        self.query_one("#upload-progress", ProgressBar).display = False
        self.query_one("#compose-context", Static).display = False
        self.query_one(ConnectionIndicator).state = (
            "connected" if self.backend.is_connected() else "connecting"
        )
        self._load_chats()
        self._pump()
        self.set_interval(_REFRESH_TICK, self._flush_dirty)
        self.set_interval(_APPEND_TICK, self._append_tick)
        self.set_interval(1.0, self._expire_typing)
        self.messages.compact = self.config.layout == "compact"
        self.messages.me = self.backend.username
        self._prefs = ChatPrefs()
        self._prefs_path = prefs_path(self.backend.username)
        self._load_prefs()
        self.watch(self.app, "app_focus", self._app_focus_changed, init=False)
        self.query_one("#chat-options").focus()

    @property
    def messages(self) -> MessageList:
        return self.query_one(MessageList)

    @property
    def chat_list(self) -> ChatList:
        return self.query_one(ChatList)

    @property
    def compose_area(self) -> ComposeArea:
        return self.query_one(ComposeArea)

    # -- workers ------------------------------------------------------------------------

    @work(group="updates", exit_on_error=False)
    async def _pump(self) -> None:
        async for update in self.backend.updates():
            self.post_message(UpdateArrived(update))

    @work(group="chats", exclusive=True)
    async def _load_chats(self) -> None:
        chats = await self.backend.chats()
        try:
            held = await self.backend.held_users()
        except BackendError:
            held = set()
        self.post_message(ChatsLoaded(chats, held))

    @work(group="refresh")
    async def _refresh_chat(self, chat_id: str) -> None:
        self.post_message(ChatRefreshed(await self.backend.chat_summary(chat_id)))

    def _load_page(self, chat_id: str, kind: PageKind, anchor: str | None = None) -> None:
        if kind in ("newest", "around"):
            self._load_first_page(chat_id, kind, anchor)
        else:
            self._load_next_page(chat_id, kind, anchor)

    @work(group="page", exclusive=True)
    async def _load_first_page(self, chat_id: str, kind: PageKind, anchor: str | None) -> None:
        await self._read_page(chat_id, kind, anchor)

    # Not exclusive: cancelling a page read would leave the list waiting for it.
    # A result that no longer fits the window is dropped in ``_page_loaded``.
    @work(group="page-next")
    async def _load_next_page(self, chat_id: str, kind: PageKind, anchor: str | None) -> None:
        await self._read_page(chat_id, kind, anchor)

    async def _read_page(self, chat_id: str, kind: PageKind, anchor: str | None) -> None:
        # The history is read in a thread by the backend; only the result comes back.
        limit = PAGE_SIZE if kind in ("newest", "around") else _OLDER_PAGE
        try:
            if kind == "older":
                page = await self.backend.messages(chat_id, before=anchor, limit=limit)
            elif kind == "newer":
                page = await self.backend.messages(chat_id, after=anchor, limit=limit)
            elif kind == "around":
                page = await self.backend.messages(chat_id, around=anchor, limit=limit)
            else:
                page = await self.backend.messages(chat_id, limit=limit)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        self.post_message(PageLoaded(chat_id, page, kind, limit, anchor))

    def _can_mark_read(self, in_view: bool = False) -> bool:
        """Read means displayed in a focused window (issue 18).

        The terminal has the focus (focus reporting), this screen is on top (no
        dialog over it), and the chat's newest message is in view (``in_view``:
        the list says so; otherwise its cursor is on the newest message).
        """
        return (
            self.app.app_focus
            and self.app.screen is self
            and self.chat_id is not None
            and (in_view or self.messages.shows_newest())
        )

    def _read_if_seen(self, in_view: bool = False) -> None:
        if self.messages.unseen and self.chat_id is not None and self._can_mark_read(in_view):
            self._mark_read(self.chat_id, in_view)

    @work(group="mark-read", exclusive=True)
    async def _mark_read(self, chat_id: str, in_view: bool = False) -> None:
        await asyncio.sleep(_MARK_READ_DELAY)
        if not self.query(MessageList):
            return  # the app is closing (quit within the debounce): its widgets are gone
        # Still true after the debounce? (The user may have moved up or left.)
        if chat_id != self.chat_id or not self._can_mark_read(in_view):
            return
        self.messages.unseen = False
        try:
            if await self.backend.mark_read(chat_id):
                self.post_message(ChatRefreshed(await self.backend.chat_summary(chat_id)))
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))

    @work(group="send")
    async def _send(self, chat_id: str, text: str, reply_to: str | None) -> None:
        try:
            # On screen through the SDK's MessageStored event (no history read).
            await self.backend.send_text(chat_id, text, reply_to=reply_to)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        self.post_message(
            UpdateArrived(
                ConnectionChanged(
                    "connected" if self.backend.is_connected() else "offline",
                    await self.backend.queued_count(),
                )
            )
        )

    @work(group="act")
    async def _act(self, action: str, message_id: str, value: str = "") -> None:
        try:
            if action == "edit":
                await self.backend.edit(message_id, value)
            elif action == "delete":
                await self.backend.delete(message_id)
            elif action == "react":
                await self.backend.react(message_id, value)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        shown = self.messages.message(message_id)
        if shown is None:
            return
        # What we just did, applied to the message as shown (no history read).
        reaction = None
        if action == "edit":
            changed = replace(shown, text=value, edited=True)
        elif action == "delete":
            changed = replace(shown, text=None, quote_text=None, deleted=True)
        else:
            changed, reaction = shown, (self.backend.username, value)
        self.post_message(
            UpdateArrived(MessageChanged_(changed, action, partial=True, reaction=reaction))
        )

    @work(group="queued", exclusive=True)
    async def _refresh_queued(self) -> None:
        queued = await self.backend.queued_count()
        state: Literal["connected", "offline"] = (
            "connected" if self.backend.is_connected() else "offline"
        )
        self.post_message(UpdateArrived(ConnectionChanged(state, queued)))

    @work(group="typing")
    async def _send_typing(self, chat_id: str) -> None:
        await self.backend.send_typing(chat_id, True)

    @work(group="upload")
    async def _upload(self, chat_id: str, path: Path) -> None:
        def progress(done: int, total: int) -> None:
            self.post_message(UploadProgress(done, total))

        self.post_message(UploadProgress(0, max(1, path.stat().st_size if path.exists() else 1)))
        try:
            # On screen through the SDK's MessageStored event (no history read).
            await self.backend.send_file(chat_id, path, progress)
        except BackendError as exc:
            self.post_message(UploadProgress(0, 0))
            self.post_message(ActionFailed(str(exc)))
            return
        self.post_message(UploadProgress(0, 0))

    @work(group="download")
    async def _download(self, message_id: str, destination: Path, open_after: bool) -> None:
        try:
            path = await self.backend.save_attachment(message_id, destination, None)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        self.notify(f"saved to {path}")
        if open_after:
            opener = "open" if sys.platform == "darwin" else "xdg-open"
            if shutil.which(opener) is None:
                self.notify(f"no {opener} here; the file is at {path}", severity="warning")
                return
            proc = await asyncio.create_subprocess_exec(
                opener,
                str(path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()

    def action_editor(self) -> None:
        """Write the message in $VISUAL / $EDITOR (back in the compose box, not sent)."""
        if self.chat_id is None:
            self.notify("open a chat first", severity="warning")
            return
        self._run_editor(self.compose_area.text)

    @work(group="editor", exclusive=True)
    async def _run_editor(self, text: str) -> None:
        # The draft is written to a private temporary folder (0700, removed when
        # the editor closes): the editor needs a file.
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        argv = shlex.split(editor)
        if not argv or shutil.which(argv[0]) is None:
            self.post_message(EditorDone(None, f"editor not found: {editor}"))
            return
        with tempfile.TemporaryDirectory(prefix="blindpost-compose-") as folder:
            path = Path(folder) / "message.txt"
            path.write_text(text, encoding="utf-8")
            try:
                with self.app.suspend():  # the terminal belongs to the editor meanwhile
                    code = subprocess.call([*argv, str(path)])  # noqa: S603 (the user's own editor)
            except SuspendNotSupported:  # no terminal to hand over (headless)
                code = await asyncio.to_thread(
                    subprocess.call, [*argv, str(path)], stdin=subprocess.DEVNULL
                )
            if code != 0:
                self.post_message(EditorDone(None, f"the editor exited with status {code}"))
                return
            self.post_message(EditorDone(path.read_text(encoding="utf-8")))

    @on(EditorDone)
    def _editor_done(self, message: EditorDone) -> None:
        if message.text is None:
            self.notify(message.error or "nothing changed", severity="warning", markup=False)
            return
        self.compose_area.set_text(message.text.rstrip("\n"))
        self.compose_area.focus()

    @work(group="open-link")
    async def _open_link(self, link: str) -> None:
        """Hand a link to the desktop's opener (xdg-open / open), as one argument."""
        opener = shutil.which("open" if sys.platform == "darwin" else "xdg-open")
        if opener is None:
            self.notify(f"no xdg-open here; the link is {link}", severity="warning", markup=False)
            return
        proc = await asyncio.create_subprocess_exec(
            opener,
            link,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()
        self.notify(f"opened {link}", markup=False)

    @work(group="prefs", exclusive=True)
    async def _load_prefs(self) -> None:
        self.post_message(PrefsLoaded(await asyncio.to_thread(load_prefs, self._prefs_path)))

    @work(group="prefs-save")
    async def _save_prefs(self, prefs: ChatPrefs) -> None:
        try:
            await asyncio.to_thread(save_prefs, self._prefs_path, prefs)
        except OSError as exc:
            self.post_message(ActionFailed(f"cannot keep the chat settings: {exc.strerror}"))

    def _set_prefs(self, prefs: ChatPrefs) -> None:
        self._prefs = prefs
        self.chat_list.set_prefs(prefs.muted, prefs.archived)
        self._save_prefs(prefs)

    @on(PrefsLoaded)
    def _prefs_loaded(self, message: PrefsLoaded) -> None:
        self._prefs = message.prefs
        self.chat_list.set_prefs(message.prefs.muted, message.prefs.archived)

    @on(ChatOptions.Toggle)
    def _toggle(self, message: ChatOptions.Toggle) -> None:
        prefs, chat = self._prefs, message.chat_id
        name = self._chat_name(chat)
        if message.what == "delete":
            self._ask_delete_chat(chat, name)
        elif message.what == "mute":
            muted = prefs.muted ^ {chat}
            self._set_prefs(ChatPrefs(muted, prefs.archived))
            self.notify(f"{name} {'muted' if chat in muted else 'unmuted'}", markup=False)
        else:
            archived = prefs.archived ^ {chat}
            self._set_prefs(ChatPrefs(prefs.muted, archived))
            self.notify(
                f"{name} {'archived' if chat in archived else 'back in the list'}", markup=False
            )

    def _ask_delete_chat(self, chat_id: str, name: str) -> None:
        def answer(sure: bool | None) -> None:
            if sure:
                self._delete_chat(chat_id, name)

        self.app.push_screen(
            ConfirmScreen(
                f"Delete the chat with {name} from this device? "
                "Its messages and files go; the others keep theirs.",
                "Delete",
            ),
            answer,
        )

    @work(group="delete-chat")
    async def _delete_chat(self, chat_id: str, name: str) -> None:
        try:
            await self.backend.delete_chat(chat_id)
        except BackendError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.chat_list.remove_chat(chat_id)
        self._dirty.discard(chat_id)
        if self.chat_id == chat_id:
            self.chat_id = None
            self.chat_list.open_chat = None
            self.messages.clear("")
            self.query_one("#chat-title", Static).update("")
        self.notify(f"deleted the chat with {name}", markup=False)

    @work(group="desktop-notify")
    async def _desktop_notify(self, title: str, body: str) -> None:
        """A desktop notification through ``notify-send``, where it exists.

        The text goes as arguments (no shell); failures are ignored: the toast
        and the bell have already told the user.
        """
        program = shutil.which("notify-send")
        if program is None:
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                program,
                "--app-name=Blindpost",
                "--",
                title,
                body[:200],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()
        except OSError:
            return

    @work(group="preview")
    async def _preview(self, message_id: str) -> None:
        async with self._previewing:
            try:
                data = await self.backend.attachment_bytes(message_id, MAX_BYTES)
                # Decoding is CPU work on untrusted bytes: never on the UI thread.
                preview: Text | str = await asyncio.to_thread(
                    render_preview, data, PREVIEW_COLS, PREVIEW_ROWS
                )
            except BackendError as exc:
                preview = str(exc)
            except PreviewError as exc:
                preview = f"{exc} (the file can still be saved)"
        self.post_message(PreviewReady(message_id, preview))

    @work(group="group")
    async def _create_group(self, group: NewGroup) -> None:
        try:
            chat_id = await self.backend.create_group(group.name, group.members)
            summary = await self.backend.chat_summary(chat_id)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        self.post_message(ChatRefreshed(summary))
        self.post_message(ChatList.ChatChosen(chat_id))

    @work(group="accept")
    async def _accept(self, user: str) -> None:
        try:
            await self.backend.accept_key(user, verified=False)
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        self.post_message(KeyAccepted(user))

    # -- handlers for worker results ------------------------------------------------------

    @on(ChatsLoaded)
    def _chats_loaded(self, message: ChatsLoaded) -> None:
        self.chat_list.set_clock(self._clock())
        self.chat_list.set_chats(message.chats)
        # Keys held from an earlier run (the SDK keeps them): the banner comes back.
        for user in message.held - self._key_changed.keys():
            self._key_changed[user] = True
            if self.chat_id == f"dm:{user}":
                self.query_one(KeyBanner).show_for(user, True)

    @on(ChatRefreshed)
    def _chat_refreshed(self, message: ChatRefreshed) -> None:
        if message.chat.left and message.chat.chat_id != self.chat_id:
            # A refresh queued before we left must not bring the group back (one we
            # were removed from stays listed while it is open, as on the open screen).
            self.chat_list.remove_chat(message.chat.chat_id)
            return
        self.chat_list.set_clock(self._clock())
        self.chat_list.upsert(message.chat)
        if message.chat.chat_id == self.chat_id:
            self._set_title(message.chat)

    @on(PageLoaded)
    def _page_loaded(self, message: PageLoaded) -> None:
        if message.chat_id != self.chat_id:
            return
        page, full = message.page, len(message.page) >= message.limit
        listed = self.messages
        if message.kind == "older":
            if message.anchor == listed.oldest_id():
                listed.prepend(page, full)
            else:  # the window moved meanwhile: the next move asks again
                listed.loading_older = False
        elif message.kind == "newer":
            if message.anchor == listed.newest_id():
                listed.append_newer(page, full)
            else:
                listed.loading_newer = False
        elif message.kind == "around" and message.anchor is not None:
            # The SDK puts up to limit // 2 messages before the anchor.
            ids = [m.id for m in page]
            before = ids.index(message.anchor) if message.anchor in ids else 0
            self.messages.set_clock(self._clock())
            self.messages.show_around(
                message.chat_id, page, message.anchor, before >= message.limit // 2, full
            )
        else:
            self.messages.set_clock(self._clock())
            self.messages.show(message.chat_id, page, full)
            self._read_if_seen()

    @on(MessageSent)
    def _message_sent(self, message: MessageSent) -> None:
        # Usually the SDK's MessageStored got it on screen first; extend() skips
        # what is already shown.
        if message.message.chat_id == self.chat_id:
            self._flush_incoming()
            self.messages.append(message.message)
        self._dirty.add(message.message.chat_id)

    @on(ChatStarted)
    def _chat_started(self, message: ChatStarted) -> None:
        if self.chat_list.get(message.chat_id) is None:
            self.chat_list.upsert(ChatSummary(message.chat_id, "direct", message.user, 0, "", None))
        self.open_chat(message.chat_id)

    @on(ActionFailed)
    def _action_failed(self, message: ActionFailed) -> None:
        # markup=False: error texts may hold brackets ([a-z0-9_]) that are not markup.
        self.notify(message.text, severity="error", title="Blindpost", markup=False)

    @on(UploadProgress)
    def _upload_progress(self, message: UploadProgress) -> None:
        bar = self.query_one("#upload-progress", ProgressBar)
        if message.total == 0:
            bar.display = False
            return
        bar.display = True
        bar.update(total=message.total, progress=message.done)

    @on(PreviewReady)
    def _preview_ready(self, message: PreviewReady) -> None:
        self.messages.set_preview(message.message_id, message.preview)

    @on(KeyAccepted)
    def _key_accepted(self, message: KeyAccepted) -> None:
        self._key_changed.pop(message.user, None)
        self.query_one(KeyBanner).hide()
        self.notify(f"accepted {message.user}'s new key")

    # -- backend updates ------------------------------------------------------------------

    @on(UpdateArrived)
    def _update(self, message: UpdateArrived) -> None:
        update = message.update
        open_chat = self.chat_id
        match update:
            case NewMessage(message=m, chat_title=chat_title):
                self._dirty.add(m.chat_id)
                if m.chat_id == open_chat:
                    if self._typing.pop(m.sender, None) is not None:
                        self._render_typing()
                    # Batched: at 50 messages/s one list update per tick keeps
                    # rendering off the keystrokes' path. Our own messages are
                    # shown at once (the user just pressed Enter).
                    self._incoming.append(m)
                    if m.outgoing:
                        self._flush_incoming()
                elif m.is_notice:
                    self.notify(m.text or "", severity="warning")
                elif m.kind == "group" and not m.outgoing:
                    # A group change in a chat not on screen: a toast now, the
                    # row (kept in history) when the chat is opened.
                    title = chat_title or self._chat_name(m.chat_id)
                    self.notify(group_line(m.sender, m.text), title=title, markup=False)
                elif not m.outgoing and m.kind in ("text", "attachment"):
                    where = chat_title or self._chat_name(m.chat_id)
                    body = m.text or (m.attachment.file_name if m.attachment else "")
                    if m.chat_id in self._prefs.archived:
                        # A new message brings an archived chat back into the list.
                        self._set_prefs(
                            ChatPrefs(self._prefs.muted, self._prefs.archived - {m.chat_id})
                        )
                    if m.chat_id in self._prefs.muted:
                        return  # counted as unread, but no toast, bell or desktop notice
                    if mentions(m.text, self.backend.username):
                        where = f"{m.sender} mentioned you in {where}"
                    self.notify(f"{m.sender}: {body}", title=where, timeout=4, markup=False)
                    if self.config.bell:
                        self.app.bell()
                    if self.config.desktop_notifications:
                        self._desktop_notify(where, f"{m.sender}: {body}")
            case MessageChanged_(message=m, partial=partial, reaction=reaction):
                self._dirty.add(m.chat_id)
                if m.chat_id == open_chat:
                    self._flush_incoming()
                    if partial:
                        self.messages.apply_change(m, reaction)
                    else:
                        self.messages.update_message(m)
            case ReceiptChanged(chat_id=chat_id, message_id=mid, status=status):
                if self.query_one(ConnectionIndicator).queued:
                    self._refresh_queued()
                if chat_id == open_chat:
                    self._flush_incoming()
                    self.messages.set_status(mid, status)
            case TypingChanged(chat_id=chat_id, user=user, typing=typing):
                if chat_id == open_chat:
                    if typing:
                        self._typing[user] = time.monotonic()
                    else:
                        self._typing.pop(user, None)
                    self._render_typing()
            case ChatUpdated(chat_id=chat_id, text=text, after_seq=after_seq):
                self._dirty.add(chat_id)
                if not text:
                    return
                if chat_id == open_chat:
                    self._flush_incoming()
                    self.messages.add_notice(text)
                else:
                    # A toast now, and a row in the chat when it is opened.
                    self.messages.remember_notice(chat_id, after_seq, text)
                    self.notify(text, title=self._chat_name(chat_id))
            case KeyChanged(user=user, chat_id=chat_id, held=held, first_use=first_use):
                if first_use and not held:
                    return
                self._key_changed[user] = held
                if chat_id == open_chat:
                    self._flush_incoming()
                    self.messages.add_notice(f"{user}'s safety number changed")
                    self.query_one(KeyBanner).show_for(user, held)
                else:
                    self.notify(f"{user}'s safety number changed", severity="warning")
            case ConnectionChanged(state=state, queued=queued):
                indicator = self.query_one(ConnectionIndicator)
                indicator.state = state
                indicator.queued = queued
            case Notice(chat_id=chat_id, text=text):
                if chat_id is not None and chat_id == open_chat:
                    # Notices sit after the messages that came before them.
                    self._flush_incoming()
                    self.messages.add_notice(text)
                else:
                    self.notify(text, severity="warning")

    def _append_tick(self) -> None:
        if not self._typing_now() or time.monotonic() - self._last_append >= _APPEND_WHILE_TYPING:
            self._flush_incoming()

    def _flush_incoming(self) -> None:
        batch, self._incoming = self._incoming, []
        batch = [m for m in batch if m.chat_id == self.chat_id]
        if batch:
            self._last_append = time.monotonic()
            # Seen only if the list follows them into view in a focused window;
            # otherwise a "new messages" line marks where they start.
            seen = self._can_mark_read()
            self.messages.extend(batch, unseen=not seen)
            if seen and any(not m.outgoing for m in batch) and self.chat_id is not None:
                self._mark_read(self.chat_id)  # once per batch, not once per message

    def _typing_now(self) -> bool:
        """The user is typing: the compose box changed less than _TYPING_QUIET ago."""
        return time.monotonic() - self._last_keystroke < _TYPING_QUIET

    def _flush_dirty(self) -> None:
        now = time.monotonic()
        if self._typing_now() and now - self._last_refresh < _REFRESH_WHILE_TYPING:
            return
        self._last_refresh = now
        dirty, self._dirty = self._dirty, set()
        for chat_id in dirty:
            self._refresh_chat(chat_id)

    def _render_typing(self) -> None:
        names = sorted(self._typing)
        text = ""
        if len(names) == 1:
            text = f"{names[0]} is typing…"
        elif names:
            text = f"{', '.join(names)} are typing…"
        self.query_one("#typing", Static).update(text)

    def _expire_typing(self) -> None:
        now = time.monotonic()
        stale = [u for u, t in self._typing.items() if now - t > _TYPING_SHOWN]
        if stale:
            for user in stale:
                del self._typing[user]
            self._render_typing()

    # -- opening a chat -------------------------------------------------------------------

    def open_chat(self, chat_id: str, around: str | None = None) -> None:
        """Show a chat: its newest page (or the page ``around`` a message) loads in a worker."""
        self.chat_id = chat_id
        self.chat_list.open_chat = chat_id
        self._typing.clear()
        self._incoming.clear()
        self._render_typing()
        self._cancel_context()
        summary = self.chat_list.get(chat_id)
        self._set_title(summary, chat_id)
        peer = chat_id[3:] if chat_id.startswith("dm:") else None
        banner = self.query_one(KeyBanner)
        if peer is not None and peer in self._key_changed:
            banner.show_for(peer, self._key_changed[peer])
        else:
            banner.hide()
        self.messages.clear(chat_id)
        if around is not None:
            self._load_page(chat_id, "around", around)
        else:
            self._load_page(chat_id, "newest")
        self.compose_area.focus()

    def _chat_name(self, chat_id: str) -> str:
        """A chat's name for people (``bob``, a group's name), never its id."""
        summary = self.chat_list.get(chat_id)
        if summary is not None:
            return summary.title
        return chat_id[3:] if chat_id.startswith("dm:") else "a group"

    def _set_title(self, summary: ChatSummary | None, chat_id: str | None = None) -> None:
        chat_id = chat_id or (summary.chat_id if summary else "")
        if summary is not None:
            marker = "#" if summary.kind == "group" else "@"
            title = f"{marker}{summary.title}" + ("  ✓ verified" if summary.verified else "")
        else:
            title = chat_id.replace("dm:", "@").replace("group:", "#")
        self.query_one("#chat-title", Static).update(f"{title}   (F2: info)")

    @on(ChatList.ChatChosen)
    def _chat_chosen(self, message: ChatList.ChatChosen) -> None:
        self.open_chat(message.chat_id)

    @on(MessageList.NeedPreview)
    def _need_preview(self, message: MessageList.NeedPreview) -> None:
        self._preview(message.message_id)

    @on(MessageList.NeedOlder)
    def _need_older(self, message: MessageList.NeedOlder) -> None:
        if message.chat_id == self.chat_id:
            self._load_page(message.chat_id, "older", message.before)

    @on(MessageList.ReachedNewest)
    def _reached_newest(self, message: MessageList.ReachedNewest) -> None:
        if message.chat_id == self.chat_id:
            self._read_if_seen(in_view=True)

    def _app_focus_changed(self, focused: bool) -> None:
        if focused:
            self._read_if_seen()

    def on_screen_resume(self) -> None:
        # A dialog closed over the chat: what is in view now counts as seen.
        self._read_if_seen()

    @on(MessageList.NeedLatest)
    def _need_latest(self, message: MessageList.NeedLatest) -> None:
        if message.chat_id == self.chat_id:
            self._load_page(message.chat_id, "newest")

    @on(MessageList.NeedNewer)
    def _need_newer(self, message: MessageList.NeedNewer) -> None:
        if message.chat_id == self.chat_id:
            self._load_page(message.chat_id, "newer", message.after)

    # -- composing ------------------------------------------------------------------------

    @on(ComposeArea.Submitted)
    def _submitted(self, message: ComposeArea.Submitted) -> None:
        text = message.text.strip("\n")
        if not text.strip() or self.chat_id is None:
            return
        self.compose_area.set_text("")
        if self._editing is not None:
            self._act("edit", self._editing.id, text)
        else:
            self._send(self.chat_id, text, self._reply_to.id if self._reply_to else None)
        self._cancel_context()

    @on(TextArea.Changed, "#compose")
    def _composing(self, event: TextArea.Changed) -> None:
        now = time.monotonic()
        self._last_keystroke = now
        if self.chat_id is None or not event.text_area.text:
            return
        if now - self._last_typing > _TYPING_EVERY:
            self._last_typing = now
            self._send_typing(self.chat_id)

    def _set_context(self, text: str) -> None:
        context = self.query_one("#compose-context", Static)
        context.update(text + "   (Esc: cancel)")
        context.display = True

    def _cancel_context(self) -> None:
        self._reply_to = None
        self._editing = None
        self.query_one("#compose-context", Static).display = False

    def action_cancel_compose(self) -> None:
        if self._reply_to is not None or self._editing is not None:
            self._cancel_context()
            self.compose_area.set_text("")

    @on(MessageList.Act)
    def _message_action(self, message: MessageList.Act) -> None:
        m = message.message
        if message.action == "reply":
            self._editing = None
            self._reply_to = m
            snippet = (m.text or "").replace("\n", " ")[:50]
            self._set_context(f"↳ replying to {m.sender}: {snippet}")
            self.compose_area.focus()
        elif message.action == "edit":
            if not m.outgoing or m.deleted:
                self.notify("only your own messages can be edited", severity="warning")
                return
            self._reply_to = None
            self._editing = m
            self._set_context("✎ editing your message")
            self.compose_area.set_text(m.text or "")
            self.compose_area.focus()
        elif message.action == "delete":
            if not m.outgoing or m.deleted:
                self.notify("only your own messages can be deleted", severity="warning")
                return

            def delete(sure: bool | None) -> None:
                if sure:
                    self._act("delete", m.id)

            self.app.push_screen(
                ConfirmScreen("Delete this message for everyone in the chat?", "Delete"), delete
            )
        elif message.action == "react":

            def react(emoji: str | None) -> None:
                if emoji is not None:
                    self._act("react", m.id, emoji)

            self.app.push_screen(ReactScreen(), react)
        elif message.action == "link":
            link = first_link(m.text)
            if link is None:
                self.notify("no link in that message", severity="warning")
                return
            self._open_link(link)
        elif message.action in ("save", "open"):
            if m.attachment is None:
                self.notify("that message has no file", severity="warning")
                return
            if message.action == "open":
                self._download(m.id, self.config.downloads(), True)
                return

            name = Path(m.attachment.file_name).name or m.id

            def save(path: str | None) -> None:
                if not path:
                    return
                target = Path(path).expanduser()
                final = target / name if target.is_dir() else target
                if not final.exists():
                    self._download(m.id, final, False)
                    return

                def replace(sure: bool | None) -> None:
                    if sure:
                        self._download(m.id, final, False)

                self.app.push_screen(
                    ConfirmScreen(f"{final} exists. Replace it?", "Replace"), replace
                )

            default = self.config.downloads() / name
            self.app.push_screen(PromptScreen("Save file to", value=str(default)), save)

    # -- actions --------------------------------------------------------------------------

    def action_new_chat(self) -> None:
        """Start a chat with a username."""

        def start(user: str | None) -> None:
            if not user:
                return
            user = user.lstrip("@")
            chat_id = f"dm:{user}"
            if self.chat_list.get(chat_id) is not None:
                self.open_chat(chat_id)
            else:
                self._start_chat(user)  # asks the relay first: no chat with nobody

        self.app.push_screen(PromptScreen("New chat with", placeholder="username"), start)

    @work(group="new-chat", exclusive=True)
    async def _start_chat(self, user: str) -> None:
        try:
            exists = await self.backend.user_exists(user)
        except RelayUnavailable as exc:
            # Offline: the chat opens; the SDK checks the name when it sends.
            self.post_message(ActionFailed(f"{exc} (could not check {user}; sent when online)"))
            exists = True
        except BackendError as exc:
            self.post_message(ActionFailed(str(exc)))
            return
        if not exists:
            self.post_message(ActionFailed(f"no such user: {user} (not known to this relay)"))
            return
        self.post_message(ChatStarted(f"dm:{user}", user))

    def action_new_group(self) -> None:
        """Create a group (pick members)."""
        contacts = sorted(c[3:] for c in self.chat_list.chat_ids() if c.startswith("dm:"))

        def create(group: NewGroup | None) -> None:
            if group is not None:
                self._create_group(group)

        self.app.push_screen(NewGroupScreen(contacts), create)

    def action_info(self) -> None:
        """Contact info (safety number, QR, verify) or group info."""
        if self.chat_id is None:
            return
        if self.chat_id.startswith("group:"):
            chat_id = self.chat_id

            def closed(result: str | None) -> None:
                if result == "left":
                    self.chat_list.remove_chat(chat_id)
                    self.chat_id = None
                    self.messages.clear("")
                    self.query_one("#chat-title", Static).update("You left the group")
                else:
                    self._dirty.add(chat_id)

            self.app.push_screen(GroupInfoScreen(self.backend, chat_id), closed)
        else:
            user = self.chat_id[3:]

            def verified(done: bool | None) -> None:
                self._contact_checked(user, bool(done))

            self.app.push_screen(ContactInfoScreen(self.backend, user), verified)

    def action_account(self) -> None:
        """Our own account card: username, relay and our key's 30 digits."""
        backend = self.backend
        self.app.push_screen(
            AccountCardScreen(
                backend.username, backend.relay_url, backend.fingerprint, first_run=False
            )
        )

    def action_devices(self) -> None:
        """This account's devices: list them, remove one, or link a new one."""

        def chosen(answer: str | None) -> None:
            if answer == "link":
                self.action_link_device()

        self.app.push_screen(DevicesScreen(self.backend, self._clock(), self._tz), chosen)

    def action_link_device(self) -> None:
        """Approve a new device of this account: the code its ``blindpost link`` shows."""

        def approve(answer: LinkApproval | None) -> None:
            if answer is not None:
                self._approve_device(answer)

        self.app.push_screen(LinkDeviceScreen(), approve)

    @work(group="link-device", exclusive=True)
    async def _approve_device(self, answer: LinkApproval) -> None:
        try:
            device = await self.backend.approve_device(answer.code, answer.name)
        except BackendError as exc:
            self.post_message(ActionFailed(f"the device was not linked: {exc}"))
            return
        self.notify(
            f"device {device} linked: it finishes setting itself up",
            title="Blindpost",
            markup=False,
        )

    def action_attach(self) -> None:
        """Send a file (picker or path)."""
        chat_id = self.chat_id
        if chat_id is None:
            self.notify("open a chat first", severity="warning")
            return

        def send(path: Path | None) -> None:
            if path is not None:
                self._upload(chat_id, path)

        self.app.push_screen(AttachScreen(Path.home()), send)

    def action_search(self) -> None:
        """Search across the history."""

        def found(message: MessageView | None) -> None:
            if message is not None:
                # The chat opens at the hit, with the messages around it.
                self.open_chat(message.chat_id, around=message.id)

        self.app.push_screen(SearchScreen(self.backend, self._clock(), self._tz), found)

    def action_help(self) -> None:
        """Every key, as the settings file left them."""
        self.app.push_screen(HelpScreen(self.config.key_map(), self.config))

    def action_switch_chat(self) -> None:
        """Quick switcher: type part of a chat's name, Enter opens the best match."""
        chats = [(c, s.title) for c in self.chat_list.all_ids() if (s := self.chat_list.get(c))]

        def chosen(chat_id: str | None) -> None:
            if chat_id is not None:
                self.open_chat(chat_id)

        self.app.push_screen(SwitcherScreen(chats), chosen)

    def action_next_unread(self) -> None:
        """Open the next chat (in list order, after the open one) with unread messages."""
        ids = self.chat_list.all_ids()
        unread = [c for c in ids if (s := self.chat_list.get(c)) and s.unread]
        if not unread:
            self.notify("no unread messages")
            return
        after = ids.index(self.chat_id) if self.chat_id in ids else -1
        later = [c for c in unread if ids.index(c) > after]
        self.open_chat((later or unread)[0])

    def action_chat_number(self, number: int) -> None:
        """Alt+1..9: the chat at that place in the list."""
        ids = self.chat_list.chat_ids()
        if 0 < number <= len(ids):
            self.open_chat(ids[number - 1])

    def action_focus_chats(self) -> None:
        self.query_one("#chat-filter").focus()

    @on(KeyBanner.Accept)
    def _banner_accept(self, message: KeyBanner.Accept) -> None:
        self._accept(message.user)

    @on(KeyBanner.Verify)
    def _banner_verify(self, message: KeyBanner.Verify) -> None:
        user = message.user

        def verified(done: bool | None) -> None:
            self._contact_checked(user, bool(done))

        self.app.push_screen(ContactInfoScreen(self.backend, user), verified)

    def _contact_checked(self, user: str, verified: bool) -> None:
        """Contact info closed: the banner goes if verified; the row shows the badge."""
        if verified:
            self._key_changed.pop(user, None)
            self.query_one(KeyBanner).hide()
        self._dirty.add(f"dm:{user}")
