# The chat list: one option per chat, most recently active first, filtered by
# the text typed into its search box.
#
# Invariant: the list is rebuilt from ``self._chats`` (the source of truth), the
# filter and the archived set (an archived chat is listed only when the filter
# finds it or it is open); the highlighted chat is kept by id across rebuilds, so
# updates that reorder the list never move the user's cursor to another chat.
"""Chat list widget."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import tzinfo
from typing import ClassVar

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist

from tui_client.adapter import ChatSummary
from tui_client.widgets.conversation import VI_BINDINGS, vi_action
from tui_client.widgets.fmt import short_time

__all__ = ["ChatList", "ChatOptions"]


class ChatOptions(OptionList):
    """The options part of the chat list (styled through its component classes)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *VI_BINDINGS,
        # Ids are the [keys] names of the settings file (tui_client.config).
        Binding("m", "toggle_chat('mute')", "Mute", id="mute"),
        Binding("a", "toggle_chat('archive')", "Archive", id="archive"),
        Binding("d", "toggle_chat('delete')", "Delete", id="delete_chat"),
    ]

    class Toggle(Message):
        """The user asked to mute/unmute, archive/unarchive or delete a chat."""

        def __init__(self, what: str, chat_id: str) -> None:
            super().__init__()
            self.what = what
            self.chat_id = chat_id

    def action_toggle_chat(self, what: str) -> None:
        """Mute, archive (again: undo) or delete the highlighted chat."""
        option = self.highlighted_option
        if option is not None and option.id is not None:
            self.post_message(self.Toggle(what, option.id))

    def action_vi(self, action: str) -> None:
        """j / k / g / G (with ``vi_keys``)."""
        vi_action(self, action)

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "chat-options--title",
        "chat-options--time",
        "chat-options--preview",
        "chat-options--unread",
        "chat-options--verified",
    }


def _ordered(chats: Iterable[ChatSummary]) -> list[ChatSummary]:
    """Most recently active first."""
    return sorted(chats, key=lambda c: (-(c.last_at or 0), c.title))


class ChatList(Vertical):
    """A filter box over the list of chats."""

    class ChatChosen(Message):
        """The user opened a chat."""

        def __init__(self, chat_id: str) -> None:
            super().__init__()
            self.chat_id = chat_id

    def __init__(self, now_ms: int, tz: tzinfo, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._chats: dict[str, ChatSummary] = {}
        self._now_ms = now_ms
        self._tz = tz
        self._filter = ""
        self.open_chat: str | None = None
        #: Chats that raise no toast, bell or desktop notification (marked 🔕).
        self.muted: frozenset[str] = frozenset()
        #: Chats left out of the list unless the filter finds them.
        self.archived: frozenset[str] = frozenset()

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter chats", id="chat-filter")
        yield ChatOptions(id="chat-options")

    @property
    def options(self) -> ChatOptions:
        return self.query_one(ChatOptions)

    def set_clock(self, now_ms: int) -> None:
        """Times are shown relative to ``now_ms`` (today -> HH:MM)."""
        self._now_ms = now_ms

    def set_chats(self, chats: list[ChatSummary]) -> None:
        """Replace every chat."""
        self._chats = {c.chat_id: c for c in chats}
        self._rebuild()

    def upsert(self, chat: ChatSummary) -> None:
        """Add or replace one chat (its activity time decides its place)."""
        old = self._chats.get(chat.chat_id)
        if old == chat:
            return
        before = self.chat_ids()
        self._chats[chat.chat_id] = chat
        if old is not None and self.is_mounted and self.chat_ids() == before:
            if chat.chat_id not in before:
                return  # filtered out: nothing on screen changes
            # Same place in the list: re-render that row only (no list rebuild).
            opts = self.options
            width = max(12, (opts.scrollable_content_region.width or 24) - 1)
            opts.replace_option_prompt(chat.chat_id, self._prompt(chat, width))
            return
        self._rebuild()

    def remove_chat(self, chat_id: str) -> None:
        """Drop a chat (e.g. a group we left)."""
        self._chats.pop(chat_id, None)
        self._rebuild()

    def get(self, chat_id: str) -> ChatSummary | None:
        """The chat's row, if listed."""
        return self._chats.get(chat_id)

    def chat_ids(self) -> list[str]:
        """Chat ids in display order (after the filter)."""
        return [c.chat_id for c in self._visible()]

    def all_ids(self) -> list[str]:
        """Every chat id in display order, whatever the filter."""
        return [c.chat_id for c in _ordered(self._chats.values())]

    def _visible(self) -> list[ChatSummary]:
        needle = self._filter.lower()
        chats = _ordered(self._chats.values())
        if needle:
            # The filter finds archived chats too.
            return [c for c in chats if needle in c.title.lower() or needle in c.chat_id]
        return [c for c in chats if c.chat_id not in self.archived or c.chat_id == self.open_chat]

    def set_prefs(self, muted: frozenset[str], archived: frozenset[str]) -> None:
        """Which chats are muted and archived."""
        self.muted, self.archived = muted, archived
        self._rebuild()

    def _style(self, name: str) -> Style:
        # partial: only what the component class sets (colour, bold), no
        # background of its own, so the highlighted row's background shows
        # behind every part of the text instead of stopping at each styled span.
        return self.options.get_component_rich_style(f"chat-options--{name}", partial=True)

    def _prompt(self, chat: ChatSummary, width: int) -> Text:
        when = short_time(chat.last_at, self._now_ms, self._tz)
        marker = "#" if chat.kind == "group" else "@"
        # The badge a verified contact carries (safety number compared, ``v``).
        badge_text = " ✓" if chat.verified else ""
        if chat.chat_id in self.muted:
            badge_text += " 🔕"
        if chat.chat_id in self.archived:
            badge_text += " (archived)"
        title = f"{marker}{chat.title}"
        room = max(4, width - len(when) - cell_len(badge_text) - 1)
        if len(title) > room:
            title = title[: room - 1] + "…"
        head = Text(title, style=self._style("title"))
        if badge_text:
            head.append(badge_text, style=self._style("verified"))
        head.pad_right(max(1, width - len(title) - cell_len(badge_text) - len(when)))
        head.append(when, style=self._style("time"))
        badge = ""
        if chat.unread:
            badge = f" {chat.unread} "
        preview_room = max(4, width - len(badge) - 1)
        preview = chat.last_text
        if len(preview) > preview_room:
            preview = preview[: preview_room - 1] + "…"
        line = Text(preview, style=self._style("preview"))
        if badge:
            line.pad_right(max(1, width - len(preview) - len(badge)))
            line.append(badge, style=self._style("unread"))
        return Text("\n").join([head, line])

    def _rebuild(self) -> None:
        if not self.is_mounted:
            return
        opts = self.options
        keep = None
        if opts.highlighted is not None and opts.highlighted < opts.option_count:
            keep = opts.get_option_at_index(opts.highlighted).id
        width = max(12, (opts.scrollable_content_region.width or 24) - 1)
        visible = self._visible()
        opts.set_options(Option(self._prompt(c, width), id=c.chat_id) for c in visible)
        target = keep or self.open_chat
        if target is not None and target in self._chats:
            try:
                opts.highlighted = opts.get_option_index(target)
            except OptionDoesNotExist:  # filtered out: highlight the first one
                opts.highlighted = 0 if visible else None
        elif visible:
            opts.highlighted = 0

    def on_mount(self) -> None:
        # Prompts carry resolved colours; a theme switch must re-render them.
        self.watch(self.app, "theme", self._theme_changed, init=False)
        self._rebuild()

    def _theme_changed(self) -> None:
        self.call_after_refresh(self._rebuild)

    def on_resize(self) -> None:
        self._rebuild()

    @on(Input.Changed, "#chat-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self._filter = event.value.strip()
        self._rebuild()

    @on(Input.Submitted, "#chat-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        visible = self._visible()
        if visible:
            self._choose(visible[0].chat_id)

    @on(OptionList.OptionSelected, "#chat-options")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self._choose(event.option.id)

    def _choose(self, chat_id: str) -> None:
        # The filter found the chat; it goes once the chat is open, so a chat that
        # receives messages later is never hidden behind a forgotten filter.
        if self._filter:
            self.clear_filter()
        self.post_message(self.ChatChosen(chat_id))

    def clear_filter(self) -> None:
        """List every chat again."""
        self._filter = ""
        self.query_one("#chat-filter", Input).value = ""
        self._rebuild()
