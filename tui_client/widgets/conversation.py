# The open conversation: the message list, the key-change banner, the typing
# line, the reply/edit bar, the upload progress and the compose box.
#
# Invariants:
# * ``MessageList`` is a bounded window onto the chat: at most WINDOW messages
#   are options at a time, whichever part of the history is shown. Opening a
#   chat of 100,000 messages renders one page; scrolling past either end of the
#   window loads the next page in a screen worker and drops as many rows from the
#   far end, so no re-layout grows with how far the user has scrolled.
# * Options are cached per message id while the message is in the window, so a
#   re-window re-uses each row's rendering and measured height.
# * Inline notices (missed or unreadable messages, key changes) are kept for the
#   session with the ``seq`` of the message they follow, so they come back in
#   place when the window returns to them.
# * Day separators and notices are disabled options, so the cursor (the
#   "selected message" that reply/react/edit/delete act on) only lands on messages.
# * Colours come from component classes styled in app.tcss, not from code; rows
#   use their partial styles (no background), so the cursor highlights whole rows.
# * Compact layout: a row continues the run above it (no header) only if the
#   message right above it is by the same sender with no separator, notice or
#   "new messages" line between; the cached option follows that flag.
# * The "new messages" line stands above the first message that was shown
#   unseen (``extend(unseen=True)`` or an unread one in a loaded page) until
#   another chat opens; ``unseen`` says something shown is not marked read yet.
# * Image previews are asked for (``NeedPreview``, once per message) when a row is
#   first rendered and drawn when the screen hands them back (``set_preview``);
#   the list itself never decodes or fetches anything.
"""Conversation widgets."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import tzinfo
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import OptionList, TextArea
from textual.widgets.option_list import Option, OptionDoesNotExist

from tui_client.adapter import MessageView, group_line
from tui_client.widgets.fmt import clock_time, day_key, day_label, human_size, tick_for
from tui_client.widgets.image_preview import is_previewable

__all__ = [
    "LINK_RE",
    "NEW_MARKER",
    "VI_BINDINGS",
    "ComposeArea",
    "MessageList",
    "first_link",
    "mention_re",
    "mentions",
    "vi_action",
]

_NOTICE_PREFIX = "notice:"
_DAY_PREFIX = "day:"
#: A link in a message (what ``l`` opens): http(s) URLs, up to whitespace.
LINK_RE = r"https?://[^\s<>\"']+[^\s<>\"'.,;:!?)\]]"


def mention_re(user: str) -> str:
    """``@user`` as a whole name (not the start of a longer one)."""
    return rf"(?<![\w@])@{re.escape(user)}(?![\w])"


def first_link(text: str | None) -> str | None:
    """The first http(s) link in ``text``, if any."""
    found = re.search(LINK_RE, text or "")
    return found.group(0) if found else None


def mentions(text: str | None, user: str) -> bool:
    """True if ``text`` mentions ``@user``."""
    return bool(user) and re.search(mention_re(user), text or "") is not None


#: The id of the "new messages" marker row (one per chat view at most).
NEW_MARKER = "new:marker"
#: Size of an inline image preview, in cells (half blocks: two pixels per row).
PREVIEW_COLS = 32
PREVIEW_ROWS = 8
#: At most this many messages are rows of the list at a time (the render window).
WINDOW = 300
#: New messages may push the window this far past WINDOW before its top is dropped.
TRIM_SLACK = 100


#: vi-style keys in the lists; they act only with ``vi_keys = true`` in the settings.
VI_BINDINGS: list[BindingType] = [
    Binding("j", "vi('cursor_down')", show=False),
    Binding("k", "vi('cursor_up')", show=False),
    Binding("g", "vi('first')", show=False),
    Binding("G", "vi('last')", show=False),
]


def vi_action(widget: OptionList, action: str) -> None:
    """Run a list action for a vi key if the settings ask for vi keys."""
    config = getattr(widget.app, "config", None)
    if config is not None and config.vi_keys:
        getattr(widget, f"action_{action}")()


class MessageList(OptionList):
    """A window onto the messages of one chat, oldest at the top.

    The window holds at most :data:`WINDOW` messages (plus their day separators and
    notices). Moving past its top asks for the page before it (``NeedOlder``) and
    drops messages from the bottom; moving past its bottom asks for the page after
    it (``NeedNewer``) and drops messages from the top. So however far the user
    scrolls, the list re-lays out a bounded number of rows.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "message-list--sender",
        "message-list--own",
        "message-list--time",
        "message-list--quote",
        "message-list--deleted",
        "message-list--edited",
        "message-list--reactions",
        "message-list--attachment",
        "message-list--system",
        "message-list--day",
        "message-list--notice",
        "message-list--new",
        "message-list--link",
        "message-list--mention",
        "message-list--preview-note",
        "message-list--tick-pending",
        "message-list--tick-failed",
        "message-list--tick-sent",
        "message-list--tick-delivered",
        "message-list--tick-read",
    }

    BINDINGS: ClassVar[list[BindingType]] = [
        # Ids are the [keys] names of the settings file (tui_client.config).
        Binding("r", "act('reply')", "Reply", id="reply"),
        Binding("plus,equals_sign", "act('react')", "React", key_display="+", id="react"),
        Binding("e", "act('edit')", "Edit", id="edit"),
        Binding("d", "act('delete')", "Delete", id="delete"),
        Binding("s", "act('save')", "Save file", id="save"),
        Binding("o", "act('open')", "Open file", show=False, id="open"),
        Binding("l", "act('link')", "Open link", show=False, id="open_link"),
        Binding("end", "last", "Latest", show=False, id="latest"),
        *VI_BINDINGS,
    ]

    class NeedOlder(Message):
        """The user reached the top: the page before ``before`` should be loaded."""

        def __init__(self, chat_id: str, before: str) -> None:
            super().__init__()
            self.chat_id = chat_id
            self.before = before

    class NeedNewer(Message):
        """The user reached the bottom of a window that is not the newest page."""

        def __init__(self, chat_id: str, after: str) -> None:
            super().__init__()
            self.chat_id = chat_id
            self.after = after

    class ReachedNewest(Message):
        """The newest message of the chat came into view (the user moved to it)."""

        def __init__(self, chat_id: str) -> None:
            super().__init__()
            self.chat_id = chat_id

    class NeedLatest(Message):
        """The user asked for the newest message while the window is back in history."""

        def __init__(self, chat_id: str) -> None:
            super().__init__()
            self.chat_id = chat_id

    class NeedPreview(Message):
        """An image attachment is on screen without a preview yet."""

        def __init__(self, message_id: str) -> None:
            super().__init__()
            self.message_id = message_id

    class Act(Message):
        """The user asked for an action on a message (reply, react, edit, ...)."""

        def __init__(self, action: str, message: MessageView) -> None:
            super().__init__()
            self.action = action
            self.message = message

    def __init__(self, now_ms: int, tz: tzinfo, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.chat_id: str | None = None
        self.has_older = False
        self.has_newer = False
        self.loading_older = False
        self.loading_newer = False
        self._now_ms = now_ms
        self._tz = tz
        # The window: messages in chat order, and the chat's inline notices (for
        # the session), each placed after the message whose ``seq`` it names.
        self._msgs: list[MessageView] = []
        self._by_id: dict[str, MessageView] = {}
        self._notices: list[tuple[int, int, str]] = []
        self._notices_by_chat: dict[str, list[tuple[int, int, str]]] = {}
        self._newest_seq = 0
        # Messages that arrived while the window is scrolled back in history.
        self._live: list[MessageView] = []
        self._rebuilding = False
        # Options by message id and resolved component styles: a re-window re-uses
        # an option (and its measured height) instead of re-rendering the row.
        self._row_options: dict[str, Option] = {}
        # Compact layout: which cached rows are drawn as a continuation (no header).
        self._continued: dict[str, bool] = {}
        self._tail_broken = False
        #: Our own user name: ``@name`` in a message is highlighted as a mention.
        self.me = ""
        #: One line per message while the same sender goes on (the default); False
        #: gives every message its own header line (the "roomy" layout).
        self.compact = True
        self._styles: dict[str, Style] = {}
        # Image previews (or the reason there is none) by message id; they survive
        # switching chats, so each image is fetched and decoded once per session.
        self._previews: dict[str, Text | str] = {}
        self._preview_asked: set[str] = set()
        # The first message the user had not seen when it was shown: the
        # "new messages" line goes above it (kept until another chat opens).
        self._new_marker: str | None = None
        #: Incoming messages are shown that were not seen yet (not marked read).
        self.unseen = False

    def on_mount(self) -> None:
        # Prompts carry resolved colours; a theme switch must re-render them.
        self.watch(self.app, "theme", self._theme_changed, init=False)

    def _theme_changed(self) -> None:
        self.call_after_refresh(self._restyle)

    def _restyle(self) -> None:
        self._styles.clear()
        self._row_options.clear()
        self._rebuild(keep=self.selected.id if self.selected else None)

    # -- content ------------------------------------------------------------------------

    def set_clock(self, now_ms: int) -> None:
        """Day labels are relative to ``now_ms``."""
        self._now_ms = now_ms

    def clear(self, chat_id: str) -> None:
        """Forget what is shown and start on ``chat_id`` (its first page is on the way)."""
        self.chat_id = chat_id
        self.has_older = self.has_newer = False
        self.loading_older = self.loading_newer = False
        self._msgs = []
        self._by_id = {}
        self._notices = self._notices_by_chat.setdefault(chat_id, []) if chat_id else []
        self._newest_seq = 0
        self._live = []
        self._new_marker = None
        self.unseen = False
        self._row_options.clear()
        self._rebuild(keep=None)

    def show(self, chat_id: str, page: list[MessageView], has_older: bool) -> None:
        """Show the newest page of a chat, the cursor on the newest message.

        Messages of the same chat that arrived while the page was read (and are
        newer than it) stay.
        """
        if chat_id != self.chat_id:
            self.clear(chat_id)
        last_seq = page[-1].seq if page else 0
        arrived = [m for m in self._msgs + self._live if m.seq > last_seq]
        self._set_window(page + _unique(arrived, {m.id for m in page}))
        first_unread = next((m for m in self._msgs if _is_unread(m)), None)
        if first_unread is not None:
            self._new_marker = first_unread.id
            self.unseen = True
        self.has_older = has_older
        self.has_newer = False
        self.loading_older = self.loading_newer = False
        self._live = []
        self._rebuild(keep=None)
        self.action_last()

    def show_around(
        self, chat_id: str, page: list[MessageView], anchor: str, has_older: bool, has_newer: bool
    ) -> None:
        """Show a page from the middle of a chat with the cursor on ``anchor``."""
        if chat_id != self.chat_id:
            self.clear(chat_id)
        self._set_window(page)
        first_unread = next((m for m in page if _is_unread(m)), None)
        if first_unread is not None:
            self._new_marker = first_unread.id
            self.unseen = True
        self.has_older, self.has_newer = has_older, has_newer
        self.loading_older = self.loading_newer = False
        self._rebuild(keep=anchor, top=True)

    def prepend(self, page: list[MessageView], has_older: bool) -> None:
        """Put an older page above the window, keeping the cursor on its message.

        If the window grows past :data:`WINDOW`, the newest messages leave it (they
        come back through ``NeedNewer``).
        """
        self.loading_older = False
        self.has_older = has_older
        first = self._msgs[0].seq if self._msgs else 2**62
        fresh = [m for m in page if m.id not in self._by_id and m.seq < first]
        if not fresh:
            return
        keep = self.selected.id if self.selected else None
        msgs = fresh + self._msgs
        if len(msgs) > WINDOW:
            msgs = msgs[:WINDOW]
            self.has_newer = True
        self._set_window(msgs)
        self._rebuild(keep=keep)

    def append_newer(self, page: list[MessageView], has_newer: bool) -> None:
        """Put a newer page below the window (the user scrolled down in history).

        If the window grows past :data:`WINDOW`, the oldest messages leave it.
        """
        self.loading_newer = False
        last = self._msgs[-1].seq if self._msgs else 0
        fresh = [m for m in page if m.id not in self._by_id and m.seq > last]
        self.has_newer = has_newer
        if not has_newer:
            # The window reached the newest message: what arrived meanwhile joins it.
            newest = fresh[-1].seq if fresh else last
            fresh += _unique([m for m in self._live if m.seq > newest], {m.id for m in fresh})
            self._live = []
        if not fresh:
            return
        keep = self.selected.id if self.selected else None
        msgs = self._msgs + fresh
        if len(msgs) > WINDOW:
            msgs = msgs[-WINDOW:]
            self.has_older = True
        self._set_window(msgs)
        self._rebuild(keep=keep)

    def append(self, message: MessageView) -> None:
        """Add a new message at the bottom (follows it if the cursor was at the end)."""
        self.extend([message])

    def extend(self, messages: list[MessageView], *, unseen: bool = False) -> None:
        """Add new messages at the bottom in one update (one re-layout, one scroll).

        With the cursor on the newest message the list follows them, dropping its
        oldest rows when the window is full. Otherwise the user is reading: once
        the window is full, new messages are only remembered (``has_newer``) and
        come in when the user moves down to them, so the rows being read never move.

        ``unseen``: the user cannot see them now (reading further up, or the
        terminal is not focused): a "new messages" line goes above the first
        incoming one (unless one is shown already) and ``unseen`` is set.
        """
        at_end = self._at_end()
        fresh: list[MessageView] = []
        for message in messages:
            self._newest_seq = max(self._newest_seq, message.seq)
            if message.id in self._by_id:
                self.update_message(message)
            elif self.has_newer or (not at_end and len(self._msgs) + len(fresh) >= WINDOW):
                self.has_newer = True
                self._live.append(message)
            else:
                fresh.append(message)
        if len(self._live) > WINDOW:
            # The store has them too: a page read (``NeedNewer``) brings them back.
            del self._live[:-WINDOW]
        if not fresh:
            return
        new: list[Option] = []
        last = self._msgs[-1] if self._msgs else None
        broken = self._tail_broken  # a notice row came after the last message
        for message in fresh:
            if last is None or day_key(last.sent_at, self._tz) != day_key(
                message.sent_at, self._tz
            ):
                new.append(self._day_option(message.sent_at))
                broken = True
            if unseen and _is_unread(message):
                self.unseen = True
                if self._new_marker is None:
                    self._new_marker = message.id
                    new.append(self._marker_option())
                    broken = True
            self._msgs.append(message)
            self._by_id[message.id] = message
            new.append(self._option(message, self._continues(None if broken else last, message)))
            last, broken = message, False
        self._tail_broken = False
        if len(self._msgs) > WINDOW + TRIM_SLACK:
            # Following new messages pushed the window over: drop its oldest rows
            # in one go (a bounded re-layout every TRIM_SLACK messages, not one per
            # message).
            self._set_window(self._msgs[-WINDOW:])
            self.has_older = True
            self._rebuild(keep=None)
        else:
            self.add_options(new)
        if at_end:
            self.action_last()

    def add_notice(self, text: str) -> None:
        """An inline notice (missed messages, key changes) after the newest message."""
        number = len(self._notices) + 1
        self._notices.append((self._newest_seq, number, text))
        if self.has_newer:
            return  # below the window; shown when the user scrolls down to it
        at_end = self._at_end()
        self._tail_broken = True
        self.add_option(self._notice_option(number, text))
        if at_end:
            self.scroll_end(animate=False)

    def remember_notice(self, chat_id: str, after_seq: int, text: str) -> None:
        """A notice for a chat that is not shown now: a row there once it opens.

        ``after_seq``: the chat's newest message when it happened.
        """
        if chat_id == self.chat_id:
            self.add_notice(text)
            return
        notices = self._notices_by_chat.setdefault(chat_id, [])
        notices.append((after_seq, len(notices) + 1, text))

    def update_message(self, message: MessageView) -> None:
        """Re-render a message that changed (status, edit, delete, reaction)."""
        if message.id not in self._by_id:
            self._live = [message if m.id == message.id else m for m in self._live]
            return
        self._by_id[message.id] = message
        for i, m in enumerate(self._msgs):
            if m.id == message.id:
                self._msgs[i] = message
                break
        option = self._row_options.get(message.id)
        if option is None:
            return
        try:
            # The option object is shared with the cache, so the cache follows.
            self.replace_option_prompt(
                message.id, self._prompt(message, self._continued.get(message.id, False))
            )
        except OptionDoesNotExist:
            self._row_options.pop(message.id, None)

    def apply_change(self, change: MessageView, reaction: tuple[str, str] | None) -> None:
        """A change known from an event alone (no reactions, file or quote author in it).

        Merged into the message as shown: its reactions (with ``reaction``, a
        ``(user, emoji)`` pair, applied; ``""`` removes it), file and quote author
        are kept. A message not shown is left alone (its page is read later).
        """
        shown = self._by_id.get(change.id) or next(
            (m for m in self._live if m.id == change.id), None
        )
        if shown is None:
            return
        reactions = dict(shown.reactions)
        if reaction is not None:
            user, emoji = reaction
            if emoji:
                reactions[user] = emoji
            else:
                reactions.pop(user, None)
        self.update_message(
            replace(
                change,
                reactions=tuple(sorted(reactions.items())),
                attachment=shown.attachment,
                quote_sender=shown.quote_sender,
            )
        )

    def set_preview(self, message_id: str, preview: Text | str) -> None:
        """Show an image preview (a rendering, or a placeholder explaining its absence)."""
        self._previews[message_id] = preview
        found = self._by_id.get(message_id)
        if found is not None:
            at_end = self.highlighted is not None and self._at_end()
            self.update_message(found)
            if at_end:
                # The row grew by the picture: keep the newest message in view.
                self.call_after_refresh(self.scroll_to_highlight)

    def preview(self, message_id: str) -> Text | str | None:
        """The preview of a message's image, once it is known."""
        return self._previews.get(message_id)

    def set_status(self, message_id: str, status: str) -> None:
        """A receipt arrived: re-render the ticks of one message."""
        found = self._by_id.get(message_id)
        if found is None or found.status == status:
            return
        self.update_message(replace(found, status=status))

    def message(self, message_id: str) -> MessageView | None:
        """A message in the window, by id."""
        return self._by_id.get(message_id)

    def messages(self) -> list[MessageView]:
        """The messages in the window, oldest first."""
        return list(self._msgs)

    @property
    def selected(self) -> MessageView | None:
        """The message under the cursor."""
        if self.highlighted is None or self.highlighted >= self.option_count:
            return None
        option_id = self.get_option_at_index(self.highlighted).id
        return self._by_id.get(option_id or "")

    def oldest_id(self) -> str | None:
        """The id of the oldest message in the window."""
        return self._msgs[0].id if self._msgs else None

    def newest_id(self) -> str | None:
        """The id of the newest message in the window."""
        return self._msgs[-1].id if self._msgs else None

    # -- rendering ----------------------------------------------------------------------

    def _at_end(self) -> bool:
        """True if the cursor is on the newest message of the window (or nowhere).

        Rows after it (notices) are disabled, so the cursor cannot be on them.
        """
        if self.highlighted is None or not self._msgs:
            return True
        try:
            return self.highlighted >= self.get_option_index(self._msgs[-1].id)
        except OptionDoesNotExist:
            return True

    def _set_window(self, msgs: list[MessageView]) -> None:
        self._msgs = msgs
        self._by_id = {m.id: m for m in msgs}
        self._newest_seq = max(self._newest_seq, msgs[-1].seq if msgs else 0)
        # Options of messages that left the window are dropped with them.
        for gone in self._row_options.keys() - self._by_id.keys():
            del self._row_options[gone]
            self._continued.pop(gone, None)

    def _style(self, name: str) -> Style:
        style = self._styles.get(name)
        if style is None:
            # partial: the component's colour and text style only, no background
            # of its own, so the cursor's highlight covers the whole row (a full
            # style painted the list's background over it, span by span).
            style = self._styles[name] = self.get_component_rich_style(
                f"message-list--{name}", partial=True
            )
        return style

    def _continues(self, previous: MessageView | None, m: MessageView) -> bool:
        """Compact layout: ``m`` goes on without a header (same sender, right below)."""
        return (
            self.compact
            and previous is not None
            and previous.sender == m.sender
            and previous.outgoing == m.outgoing
            and _is_chat(previous)
            and _is_chat(m)
        )

    def _option(self, message: MessageView, continued: bool = False) -> Option:
        option = self._row_options.get(message.id)
        if option is None or self._continued.get(message.id, False) != continued:
            # A stored notice is shown like the session's notices: not selectable.
            option = self._row_options[message.id] = Option(
                self._prompt(message, continued), id=message.id, disabled=message.is_notice
            )
            self._continued[message.id] = continued
        return option

    def _day_option(self, ms: int) -> Option:
        label = f" {day_label(ms, self._now_ms, self._tz)} "
        text = Text(label.center(max(len(label), 30), "─"), style=self._style("day"))
        return Option(text, id=f"{_DAY_PREFIX}{day_key(ms, self._tz)}", disabled=True)

    def _marker_option(self) -> Option:
        text = Text(" new messages ".center(30, "─"), style=self._style("new"))
        return Option(text, id=NEW_MARKER, disabled=True)

    def shows_newest(self) -> bool:
        """True if the chat's newest message is in view and new ones follow into view.

        The window holds the newest page and the cursor is on its last message
        (the list follows new messages then). With the cursor further up, new
        messages land below what is being read, so they do not count as seen.
        """
        return not self.has_newer and self._at_end()

    def _notice_option(self, number: int, text: str) -> Option:
        return Option(
            Text(f"ⓘ {text}", style=self._style("notice")),
            id=f"{_NOTICE_PREFIX}{number}",
            disabled=True,
        )

    def _rebuild(self, keep: str | None, *, top: bool = False) -> None:
        options: list[Option] = []
        msgs = self._msgs
        # A notice is shown after the message it follows; notices outside the
        # window's range are shown when the window reaches them.
        low = msgs[0].seq if msgs and self.has_older else -1
        high = msgs[-1].seq if msgs and self.has_newer else 2**62
        notices = [n for n in self._notices if low <= n[0] <= high]
        pending = iter(notices)
        nxt = next(pending, None)
        last_day = None
        previous: MessageView | None = None  # the message row just above, if adjacent
        for row in msgs:
            while nxt is not None and nxt[0] < row.seq:
                options.append(self._notice_option(nxt[1], nxt[2]))
                nxt = next(pending, None)
                previous = None
            day = day_key(row.sent_at, self._tz)
            if day != last_day:
                options.append(self._day_option(row.sent_at))
                last_day = day
                previous = None
            if row.id == self._new_marker:
                options.append(self._marker_option())
                previous = None
            options.append(self._option(row, self._continues(previous, row)))
            previous = row
        self._tail_broken = nxt is not None
        while nxt is not None:
            options.append(self._notice_option(nxt[1], nxt[2]))
            nxt = next(pending, None)
        # set_options resets the scroll position to the top; that must not read as
        # "the user scrolled up" and load yet another page.
        self._rebuilding = True
        try:
            self.set_options(options)
            if keep is not None:
                try:
                    self.highlighted = self.get_option_index(keep)
                except OptionDoesNotExist:
                    return
                self.scroll_to_highlight(top=top)
        finally:
            self._rebuilding = False

    def _prompt(self, m: MessageView, continued: bool = False) -> Text:
        """A message's row; ``continued``: no header line, the time at the end."""
        if m.is_notice:
            return Text(f"ⓘ {m.text or ''}", style=self._style("notice"))
        if m.kind not in ("text", "attachment"):
            who = "you" if m.outgoing else m.sender
            if m.kind == "group":
                # History keeps who (the sender) and what changed (the text).
                return Text(f"· {group_line(who, m.text)}", style=self._style("system"))
            label = {"timer": "changed the disappearing-message timer"}.get(m.kind, m.kind)
            return Text(f"· {who}: {m.text or label}", style=self._style("system"))
        stamp = Text()
        stamp.append(clock_time(m.sent_at, self._tz), style=self._style("time"))
        if m.outgoing:
            glyph, suffix = tick_for(m.status)
            stamp.append("  ")
            stamp.append(glyph, style=self._style(f"tick-{suffix}"))
        lines: list[Text] = []
        if not continued:
            head = Text()
            who = "own" if m.outgoing else "sender"
            head.append("you" if m.outgoing else m.sender, style=self._style(who))
            head.append("  ")
            head.append_text(stamp)
            lines.append(head)
        main = -1  # the line a continued row ends with its time
        if m.quote_text is not None and m.reply_to:
            quote = m.quote_text.replace("\n", " ")
            if len(quote) > 60:
                quote = quote[:59] + "…"
            who = f"{m.quote_sender}: " if m.quote_sender else ""
            lines.append(Text(f"┃ {who}{quote}", style=self._style("quote")))
        if m.deleted:
            lines.append(Text("this message was deleted", style=self._style("deleted")))
            main = len(lines) - 1
        else:
            if m.attachment is not None:
                a = m.attachment
                label = f"📎 {a.file_name} ({human_size(a.size)}, {a.mime_type or 'file'})"
                if a.local_path:
                    label += " saved"
                lines.append(Text(label, style=self._style("attachment")))
                main = len(lines) - 1
                if is_previewable(a.mime_type, a.size):
                    lines.append(self._preview_lines(m.id))
            if m.text:
                body = Text(m.text)
                # Links are underlined (l opens the first); a mention of us stands out.
                body.highlight_regex(LINK_RE, self._style("link"))
                if self.me:
                    body.highlight_regex(mention_re(self.me), self._style("mention"))
                if m.edited:
                    body.append(" (edited)", style=self._style("edited"))
                lines.append(body)
                main = len(lines) - 1
        if continued:
            if main < 0:
                lines.append(Text())
                main = len(lines) - 1
            lines[main] = lines[main].copy()
            lines[main].append("  ")
            lines[main].append_text(stamp)
        if m.reactions:
            lines.append(
                Text(
                    "  ".join(f"{emoji} {user}" for user, emoji in m.reactions),
                    style=self._style("reactions"),
                )
            )
        return Text("\n").join(lines)

    def _preview_lines(self, message_id: str) -> Text:
        preview = self._previews.get(message_id)
        if isinstance(preview, Text):
            return preview
        if preview is not None:
            return Text(f"▨ no preview: {preview}", style=self._style("preview-note"))
        if message_id not in self._preview_asked:
            self._preview_asked.add(message_id)
            self.post_message(self.NeedPreview(message_id))
        return Text("▨ loading preview…", style=self._style("preview-note"))

    # -- interaction --------------------------------------------------------------------

    def action_last(self) -> None:
        """End: the newest message of the chat, in one press.

        If the window is back in history, the chat's newest page replaces it
        (``NeedLatest``) instead of walking down one page per press.
        """
        if self.has_newer and self.chat_id:
            self.post_message(self.NeedLatest(self.chat_id))
            return
        super().action_last()

    def action_vi(self, action: str) -> None:
        """j / k / g / G (with ``vi_keys``)."""
        vi_action(self, action)

    def action_act(self, action: str) -> None:
        """Ask the screen to run ``action`` on the selected message."""
        selected = self.selected
        if selected is not None:
            self.post_message(self.Act(action, selected))

    def _maybe_need_older(self) -> None:
        if self._rebuilding:
            return
        oldest = self.oldest_id()
        if self.has_older and not self.loading_older and self.chat_id and oldest:
            self.loading_older = True
            self.post_message(self.NeedOlder(self.chat_id, oldest))

    def _maybe_need_newer(self) -> None:
        if self._rebuilding:
            return
        newest = self.newest_id()
        if self.has_newer and not self.loading_newer and self.chat_id and newest:
            self.loading_newer = True
            self.post_message(self.NeedNewer(self.chat_id, newest))

    def watch_highlighted(self, highlighted: int | None) -> None:
        super().watch_highlighted(highlighted)
        if highlighted is None:
            return
        if highlighted <= 2:
            self._maybe_need_older()
        if highlighted >= self.option_count - 3:
            self._maybe_need_newer()
        self._maybe_reached_newest()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 < old_value:
            self._maybe_need_older()
        if new_value >= self.max_scroll_y and new_value > old_value:
            self._maybe_need_newer()
            # Scrolled (wheel, PageDown) to the bottom: the newest rows are in view.
            self._maybe_reached_newest(scrolled=True)

    def _maybe_reached_newest(self, scrolled: bool = False) -> None:
        if not self.unseen or self._rebuilding or not self.chat_id or self.has_newer:
            return
        if scrolled or self._at_end():
            self.post_message(self.ReachedNewest(self.chat_id))


def _is_chat(m: MessageView) -> bool:
    return m.kind in ("text", "attachment") and not m.deleted


def _is_unread(m: MessageView) -> bool:
    return not m.outgoing and not m.read and m.kind in ("text", "attachment")


def _unique(messages: list[MessageView], seen: set[str]) -> list[MessageView]:
    """``messages`` without the ids in ``seen`` (nor repeats), in order."""
    out = []
    for m in messages:
        if m.id not in seen:
            seen.add(m.id)
            out.append(m)
    return out


class ComposeArea(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Alt+Enter) starts a new line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+j,alt+enter", "newline", "New line", key_display="^J"),
    ]

    class Submitted(Message):
        """The user pressed Enter; ``text`` is what was typed."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        """Insert a line break at the cursor."""
        start, end = self.selection
        self.replace("\n", start, end)

    def set_text(self, text: str) -> None:
        """Replace everything and put the cursor at the end."""
        self.load_text(text)
        self.move_cursor(self.document.end)
