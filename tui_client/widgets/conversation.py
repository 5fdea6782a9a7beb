# The open conversation: the message list, the key-change banner, the typing
# line, the reply/edit bar, the upload progress and the compose box.
#
# Invariants:
# * ``MessageList`` holds one page window of the chat (newest page first, older
#   pages prepended on demand), never the whole history: opening a chat of
#   100,000 messages renders one page.
# * Day separators and notices are disabled options, so the cursor (the
#   "selected message" that reply/react/edit/delete act on) only lands on messages.
# * Colours come from component classes styled in app.tcss, not from code.
# * Image previews are asked for (``NeedPreview``, once per message) when a row is
#   first rendered and drawn when the screen hands them back (``set_preview``);
#   the list itself never decodes or fetches anything.
"""Conversation widgets."""

from __future__ import annotations

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

from tui_client.adapter import MessageView
from tui_client.widgets.fmt import day_key, day_label, human_size, short_time, tick_for
from tui_client.widgets.image_preview import is_previewable

__all__ = ["ComposeArea", "MessageList"]

_NOTICE_PREFIX = "notice:"
_DAY_PREFIX = "day:"
#: Size of an inline image preview, in cells (half blocks: two pixels per row).
PREVIEW_COLS = 32
PREVIEW_ROWS = 8


class MessageList(OptionList):
    """The messages of one chat, oldest at the top."""

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
        "message-list--preview-note",
        "message-list--tick-pending",
        "message-list--tick-failed",
        "message-list--tick-sent",
        "message-list--tick-delivered",
        "message-list--tick-read",
    }

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "act('reply')", "Reply"),
        Binding("plus,equals_sign", "act('react')", "React", key_display="+"),
        Binding("e", "act('edit')", "Edit"),
        Binding("d", "act('delete')", "Delete"),
        Binding("s", "act('save')", "Save file"),
        Binding("o", "act('open')", "Open file", show=False),
    ]

    class NeedOlder(Message):
        """The user reached the top: the page before ``before`` should be loaded."""

        def __init__(self, chat_id: str, before: str) -> None:
            super().__init__()
            self.chat_id = chat_id
            self.before = before

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
        self.loading_older = False
        self._now_ms = now_ms
        self._tz = tz
        self._rows: list[MessageView | str] = []
        self._by_id: dict[str, MessageView] = {}
        self._notices = 0
        self._rebuilding = False
        # Rendered prompts by message id, and resolved component styles: a page
        # prepend or a theme switch re-uses them instead of re-rendering every row.
        self._prompts: dict[str, Text] = {}
        self._styles: dict[str, Style] = {}
        # Image previews (or the reason there is none) by message id; they survive
        # switching chats, so each image is fetched and decoded once per session.
        self._previews: dict[str, Text | str] = {}
        self._preview_asked: set[str] = set()

    def on_mount(self) -> None:
        # Prompts carry resolved colours; a theme switch must re-render them.
        self.watch(self.app, "theme", self._theme_changed, init=False)

    def _theme_changed(self) -> None:
        self.call_after_refresh(self._restyle)

    def _restyle(self) -> None:
        self._styles.clear()
        self._prompts.clear()
        self._rebuild(keep=self.selected.id if self.selected else None)

    # -- content ------------------------------------------------------------------------

    def set_clock(self, now_ms: int) -> None:
        """Day labels are relative to ``now_ms``."""
        self._now_ms = now_ms

    def show(self, chat_id: str, page: list[MessageView], has_older: bool) -> None:
        """Show the newest page of a chat, the cursor on the newest message."""
        self.chat_id = chat_id
        self.has_older = has_older
        self.loading_older = False
        self._rows = list(page)
        self._by_id = {m.id: m for m in page}
        self._prompts.clear()
        self._rebuild(keep=None)
        self.action_last()

    def prepend(self, page: list[MessageView], has_older: bool) -> None:
        """Put an older page above what is shown, keeping the cursor on its message."""
        self.loading_older = False
        self.has_older = has_older
        fresh = [m for m in page if m.id not in self._by_id]
        if not fresh:
            return
        keep = self.selected.id if self.selected else None
        self._rows[:0] = fresh
        self._by_id.update((m.id, m) for m in fresh)
        self._rebuild(keep=keep)

    def append(self, message: MessageView) -> None:
        """Add a new message at the bottom (follows it if the cursor was at the end)."""
        self.extend([message])

    def extend(self, messages: list[MessageView]) -> None:
        """Add new messages at the bottom in one update (one re-layout, one scroll)."""
        at_end = self.highlighted is None or self.highlighted >= self.option_count - 1
        new: list[Option] = []
        last = self._last_message()
        for message in messages:
            if message.id in self._by_id:
                self.update_message(message)
                continue
            if last is None or day_key(last.sent_at, self._tz) != day_key(
                message.sent_at, self._tz
            ):
                new.append(self._day_option(message.sent_at))
            self._rows.append(message)
            self._by_id[message.id] = message
            new.append(Option(self._cached_prompt(message), id=message.id))
            last = message
        if not new:
            return
        self.add_options(new)
        if at_end:
            self.action_last()

    def add_notice(self, text: str) -> None:
        """An inline notice (missed messages, key changes) at the bottom."""
        self._notices += 1
        row = f"{_NOTICE_PREFIX}{self._notices}:{text}"
        self._rows.append(row)
        at_end = self.highlighted is None or self.highlighted >= self.option_count - 1
        self.add_option(self._notice_option(row))
        if at_end:
            self.scroll_end(animate=False)

    def update_message(self, message: MessageView) -> None:
        """Re-render a message that changed (status, edit, delete, reaction)."""
        if message.id not in self._by_id:
            return
        self._by_id[message.id] = message
        self._prompts.pop(message.id, None)
        self._rows = [
            message if isinstance(r, MessageView) and r.id == message.id else r for r in self._rows
        ]
        try:
            self.replace_option_prompt(message.id, self._cached_prompt(message))
        except OptionDoesNotExist:
            return

    def set_preview(self, message_id: str, preview: Text | str) -> None:
        """Show an image preview (a rendering, or a placeholder explaining its absence)."""
        self._previews[message_id] = preview
        found = self._by_id.get(message_id)
        if found is not None:
            at_end = self.highlighted is not None and self.highlighted >= self.option_count - 1
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
        """A shown message by id."""
        return self._by_id.get(message_id)

    def messages(self) -> list[MessageView]:
        """The shown messages, oldest first."""
        return [r for r in self._rows if isinstance(r, MessageView)]

    @property
    def selected(self) -> MessageView | None:
        """The message under the cursor."""
        if self.highlighted is None or self.highlighted >= self.option_count:
            return None
        option_id = self.get_option_at_index(self.highlighted).id
        return self._by_id.get(option_id or "")

    def oldest_id(self) -> str | None:
        """The id of the oldest shown message."""
        for row in self._rows:
            if isinstance(row, MessageView):
                return row.id
        return None

    # -- rendering ----------------------------------------------------------------------

    def _last_message(self) -> MessageView | None:
        for row in reversed(self._rows):
            if isinstance(row, MessageView):
                return row
        return None

    def _style(self, name: str) -> Style:
        style = self._styles.get(name)
        if style is None:
            style = self._styles[name] = self.get_component_rich_style(f"message-list--{name}")
        return style

    def _cached_prompt(self, message: MessageView) -> Text:
        prompt = self._prompts.get(message.id)
        if prompt is None:
            prompt = self._prompts[message.id] = self._prompt(message)
        return prompt

    def _day_option(self, ms: int) -> Option:
        label = f" {day_label(ms, self._now_ms, self._tz)} "
        text = Text(label.center(max(len(label), 30), "─"), style=self._style("day"))
        return Option(text, id=f"{_DAY_PREFIX}{day_key(ms, self._tz)}", disabled=True)

    def _notice_option(self, row: str) -> Option:
        _, number, text = row.split(":", 2)
        return Option(
            Text(f"ⓘ {text}", style=self._style("notice")),
            id=f"{_NOTICE_PREFIX}{number}",
            disabled=True,
        )

    def _rebuild(self, keep: str | None) -> None:
        options: list[Option] = []
        last_day = None
        for row in self._rows:
            if isinstance(row, str):
                options.append(self._notice_option(row))
                continue
            day = day_key(row.sent_at, self._tz)
            if day != last_day:
                options.append(self._day_option(row.sent_at))
                last_day = day
            options.append(Option(self._cached_prompt(row), id=row.id))
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
                self.scroll_to_highlight()
        finally:
            self._rebuilding = False

    def _prompt(self, m: MessageView) -> Text:
        if m.kind not in ("text", "attachment"):
            label = {"group": "group updated", "timer": "timer changed"}.get(m.kind, m.kind)
            return Text(f"· {m.sender}: {m.text or label}", style=self._style("system"))
        head = Text()
        who = "own" if m.outgoing else "sender"
        head.append("you" if m.outgoing else m.sender, style=self._style(who))
        head.append("  ")
        head.append(short_time(m.sent_at, self._now_ms, self._tz), style=self._style("time"))
        if m.outgoing:
            glyph, suffix = tick_for(m.status)
            head.append("  ")
            head.append(glyph, style=self._style(f"tick-{suffix}"))
        lines = [head]
        if m.quote_text is not None and m.reply_to:
            quote = m.quote_text.replace("\n", " ")
            if len(quote) > 60:
                quote = quote[:59] + "…"
            who = f"{m.quote_sender}: " if m.quote_sender else ""
            lines.append(Text(f"┃ {who}{quote}", style=self._style("quote")))
        if m.deleted:
            lines.append(Text("this message was deleted", style=self._style("deleted")))
        else:
            if m.attachment is not None:
                a = m.attachment
                label = f"📎 {a.file_name} ({human_size(a.size)}, {a.mime_type or 'file'})"
                if a.local_path:
                    label += " saved"
                lines.append(Text(label, style=self._style("attachment")))
                if is_previewable(a.mime_type, a.size):
                    lines.append(self._preview_lines(m.id))
            if m.text:
                body = Text(m.text)
                if m.edited:
                    body.append(" (edited)", style=self._style("edited"))
                lines.append(body)
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

    def action_act(self, action: str) -> None:
        """Ask the screen to run ``action`` on the selected message."""
        selected = self.selected
        if selected is not None:
            self.post_message(self.Act(action, selected))

    def _maybe_need_older(self) -> None:
        oldest = self.oldest_id()
        if self._rebuilding:
            return
        if self.has_older and not self.loading_older and self.chat_id and oldest:
            self.loading_older = True
            self.post_message(self.NeedOlder(self.chat_id, oldest))

    def watch_highlighted(self, highlighted: int | None) -> None:
        super().watch_highlighted(highlighted)
        if highlighted is not None and highlighted <= 2:
            self._maybe_need_older()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 and old_value > 0:
            self._maybe_need_older()


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
