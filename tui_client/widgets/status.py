# Small status widgets: the connection indicator, the key-change banner and the footer.
#
# Invariant: they render state handed to them; they never ask the backend.
"""Connection indicator, key-change banner, and a footer that recomposes only on change."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Button, Footer, Static

__all__ = ["ConnectionIndicator", "KeyBanner", "KeyFooter"]


class KeyFooter(Footer):
    """Textual's footer, recomposed only when the keys it would show change.

    Textual's own recomposes (unmounts and mounts a widget per key, then styles
    them) whenever the focused widget's bindings may have changed: every focus
    move, so every chat opened (the compose box takes the focus) and every dialog
    closed, even when the keys shown stay the same. While chats were opened from
    the quick switcher (`python bench/tui_bench.py --only open`, py-spy) that
    recomposition was 14 % of the main thread's samples, the largest single item
    after drawing.
    """

    _shown: tuple[tuple[Binding, str, bool, str], ...] | None = None

    def bindings_changed(self, screen: Screen[object]) -> None:
        shown = tuple(
            (binding, self.app.get_key_display(binding), enabled, tooltip)
            for (_, binding, enabled, tooltip) in screen.active_bindings.values()
            if binding.show
        )
        if shown == self._shown:
            return
        if screen.app.app_focus and self.is_attached and screen is self.screen:
            self._shown = shown  # Footer recomposes only in this case
        super().bindings_changed(screen)


class ConnectionIndicator(Static):
    """``● connected``, ``◌ reconnecting``, ``○ offline · 3 queued``."""

    # ``layout=True``: the text's length changes with the state and the count, so
    # the width (``auto``) is measured again; without it "○ offline · 3 queued"
    # was clipped to the width of the first text shown.
    state: reactive[str] = reactive("connecting", layout=True)
    queued: reactive[int] = reactive(0, layout=True)

    def render(self) -> str:
        if self.state == "connected":
            text = "● connected"
        elif self.state == "connecting":
            text = "◌ reconnecting"
        else:
            text = "○ offline"
        if self.queued:
            text += f" · {self.queued} queued"
        return text

    def watch_state(self, old: str, new: str) -> None:
        self.remove_class(f"-{old}")
        self.add_class(f"-{new}")


class KeyBanner(Vertical):
    """Shown when a contact's key changed: accept it, or open contact info to verify."""

    class Accept(Message):
        """The user accepted ``user``'s new key."""

        def __init__(self, user: str) -> None:
            super().__init__()
            self.user = user

    class Verify(Message):
        """The user wants to compare safety numbers with ``user``."""

        def __init__(self, user: str) -> None:
            super().__init__()
            self.user = user

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.user: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="key-banner-text")
        with Horizontal(id="key-banner-buttons"):
            yield Button("Accept new key", id="key-accept", variant="warning", compact=True)
            yield Button("Verify…", id="key-verify", variant="primary", compact=True)

    def show_for(self, user: str, held: bool) -> None:
        """Show the banner for ``user``."""
        self.user = user
        text = f"⚠ {user}'s safety number changed"
        if held:
            text += "; your messages wait until you accept"
        self.query_one("#key-banner-text", Static).update(text)
        self.display = True

    def hide(self) -> None:
        """Hide the banner."""
        self.user = None
        self.display = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if self.user is None:
            return
        if event.button.id == "key-accept":
            self.post_message(self.Accept(self.user))
        elif event.button.id == "key-verify":
            self.post_message(self.Verify(self.user))
