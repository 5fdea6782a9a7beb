# The Textual application: picks the first screen (first run, unlock or the
# chats), owns the backend's lifetime, the themes and the command palette.
#
# Invariants:
# * The app talks to e2ee only through tui_client.adapter (a Backend).
# * Opening, creating and closing the account happen in workers; a screen is
#   pushed when the worker's ``Opened`` message arrives.
# * The clock and the time zone are parameters, so tests render the same
#   screen every time.
# * Once the main screen is up, the objects alive then are frozen out of the
#   garbage collector (``gc.freeze``): full collections stop walking them.
"""The Blindpost terminal client application."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, cast

from textual import events, on, work
from textual._ansi_sequences import ANSI_SEQUENCES_KEYS
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from tui_client.adapter import (
    Backend,
    BackendError,
    Opener,
    PassphraseRequired,
    default_data_dir,
)
from tui_client.config import ConfigError, TuiConfig, load_config
from tui_client.screens.main import MainScreen
from tui_client.screens.setup import AccountCardScreen, FirstRunScreen, Opened, UnlockScreen

__all__ = ["TERMINAL_KEYS", "BlindpostApp", "run", "teach_terminal_keys"]


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


#: The GIL switch interval of the terminal client's process (seconds; Python's default: 0.005).
SWITCH_INTERVAL = 0.001
#: A full garbage collection waits until input has been quiet this long (seconds).
GC_IDLE = 1.0
#: ... and is looked for this often.
GC_EVERY = 2.0
#: Under unbroken input a full collection still runs after this long (bounds memory).
GC_AT_LEAST = 30.0


class _TerminalKey(StrEnum):
    """Keys Textual's input table does not name (stand-ins for its ``Keys`` values)."""

    ALT_ENTER = "alt+enter"
    ALT_1 = "alt+1"
    ALT_2 = "alt+2"
    ALT_3 = "alt+3"
    ALT_4 = "alt+4"
    ALT_5 = "alt+5"
    ALT_6 = "alt+6"
    ALT_7 = "alt+7"
    ALT_8 = "alt+8"
    ALT_9 = "alt+9"


#: Byte sequences terminals send for keys Textual's table lacks. A terminal sends
#: Alt+Enter as ESC CR; Textual's parser drops the Alt of a key it finds in its
#: table, so ESC CR read as a plain Enter, and the compose box sent the
#: half-written message (issue 18). Alt+1..9 arrive as ESC and the digit, which
#: Textual turns into the characters a Mac keyboard's Option key gives (ESC 1 is
#: "¡"), so the chat-number keys did nothing in a real terminal. Added to
#: Textual's table before the app reads any input; sequences it reads as keys are
#: left alone.
TERMINAL_KEYS: dict[str, tuple[_TerminalKey, ...]] = {
    "\x1b\r": (_TerminalKey.ALT_ENTER,),
    **{f"\x1b{n}": (_TerminalKey(f"alt+{n}"),) for n in range(1, 10)},
}


def teach_terminal_keys() -> None:
    """Add :data:`TERMINAL_KEYS` to Textual's escape-sequence table (idempotent).

    A sequence Textual reads as a key keeps its meaning; one it reads as a
    character (ESC 1 as "¡") or not at all is taught ours.
    """
    table = cast(dict[str, object], ANSI_SEQUENCES_KEYS)
    for sequence, keys in TERMINAL_KEYS.items():
        if not isinstance(table.get(sequence), tuple):
            table[sequence] = keys


def _local_tz() -> tzinfo:
    found = datetime.now().astimezone().tzinfo
    assert found is not None
    return found


class BlindpostApp(App[int]):
    """The terminal client.

    Args:
        opener: creates or opens the account (first run / unlock / open).
        backend: an already open backend (tests); skips the account screens.
        clock: milliseconds since the epoch (times and day separators).
        tz: time zone for displayed times (default: local).
    """

    CSS_PATH = "app.tcss"
    TITLE = "Blindpost"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True, id="quit"),
        Binding("ctrl+t", "toggle_dark", "Theme", show=False, id="theme"),
    ]

    def __init__(
        self,
        opener: Opener | None = None,
        *,
        backend: Backend | None = None,
        clock: Callable[[], int] = _system_ms,
        tz: tzinfo | None = None,
        config: TuiConfig | None = None,
    ) -> None:
        super().__init__()
        teach_terminal_keys()
        self.config = config or TuiConfig()
        # The settings file's [keys] over the default bindings (by binding id).
        self.set_keymap(dict(self.config.keys))
        self.opener = opener
        self.backend: Backend | None = backend
        self.clock = clock
        self.tz = tz or _local_tz()
        self._gc_threshold: tuple[int, int, int] | None = None
        self._last_input = 0.0
        self._last_gc = time.monotonic()

    def on_mount(self) -> None:
        if self.config.theme != self.theme:
            if self.config.theme in self.available_themes:
                self.theme = self.config.theme
            else:
                known = ", ".join(sorted(self.available_themes))
                self.notify(
                    f"theme {self.config.theme!r} is unknown (known: {known})",
                    severity="error",
                    markup=False,
                )
        if self.backend is not None:
            self._start(self.backend, created=False)
        elif self.opener is None or not self.opener.exists():
            assert self.opener is not None, "an opener or a backend is required"
            self.push_screen(FirstRunScreen(self.opener))
        else:
            self._open_without_passphrase()

    @work(exclusive=True, group="open")
    async def _open_without_passphrase(self) -> None:
        assert self.opener is not None
        try:
            backend = await self.opener.open(None)
        except PassphraseRequired:
            self.push_screen(UnlockScreen(self.opener))
            return
        except BackendError as exc:
            self.exit(1, return_code=1, message=f"cannot open the account: {exc}")
            return
        self.post_message(Opened(backend, created=False))

    @on(Opened)
    def _opened(self, message: Opened) -> None:
        self._start(message.backend, message.created)

    def _start(self, backend: Backend, created: bool) -> None:
        self.backend = backend
        self._start_backend(backend)
        main = MainScreen(backend, self.clock, self.tz, self.config)
        # Replace the account screens (if any) so Esc never leads back to them.
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.push_screen(main)
        self.call_after_refresh(self._tune_gc)
        if created:
            self.push_screen(
                AccountCardScreen(
                    backend.username,
                    backend.relay_url,
                    backend.fingerprint,
                    recovery_key=backend.take_recovery_key(),
                )
            )

    def _tune_gc(self) -> None:
        """Keep full garbage collections off the keystrokes' path.

        A full (generation 2) collection walks every tracked object: with
        Textual, Rich, the SDK and the widgets that is some 80,000 objects and
        took 35-190 ms on a loaded 2-CPU machine, a stall seen as a late key
        (docs/tui.md, Performance). So what exists once the main screen is up
        (it lives as long as the app) is frozen out of the scans, and full
        collections run from a timer when input has been quiet for
        ``GC_IDLE`` seconds (or, under unbroken input, every ``GC_AT_LEAST``
        seconds) instead of whenever the allocator's counters say. Young
        generations are still collected automatically (they are small).
        """
        if self._gc_threshold is not None:
            return
        self._gc_threshold = gc.get_threshold()
        gc.freeze()
        young, middle, _ = self._gc_threshold
        gc.set_threshold(young, middle, 1_000_000)
        self.set_interval(GC_EVERY, self._collect_when_idle)

    def _collect_when_idle(self) -> None:
        now = time.monotonic()
        if now - self._last_input >= GC_IDLE or now - self._last_gc >= GC_AT_LEAST:
            self._last_gc = now
            gc.collect()

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key | events.MouseEvent):
            self._last_input = time.monotonic()
        await super().on_event(event)

    @work(group="backend")
    async def _start_backend(self, backend: Backend) -> None:
        try:
            await backend.start()
        except BackendError as exc:
            self.notify(str(exc), severity="error", title="Cannot connect")

    async def action_quit(self) -> None:
        self.exit(0)

    async def on_unmount(self) -> None:
        # Close the account on every way out (quit, Ctrl+C, a test ending), so
        # acknowledgements are flushed and the store is closed cleanly.
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.close()
        if self._gc_threshold is not None:  # the process may live on (tests)
            gc.set_threshold(*self._gc_threshold)
            gc.unfreeze()
            self._gc_threshold = None

    def action_toggle_dark(self) -> None:
        """Switch between the light and the dark theme."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Toggle light/dark theme", "Switch the theme", self.action_toggle_dark)
        if isinstance(screen, MainScreen):
            yield SystemCommand("New chat", "Chat with a username", screen.action_new_chat)
            yield SystemCommand("New group", "Create a group", screen.action_new_group)
            yield SystemCommand("Search messages", "Search the history", screen.action_search)
            yield SystemCommand("Attach a file", "Send a file here", screen.action_attach)
            yield SystemCommand(
                "Chat info", "Contact or group info, safety number", screen.action_info
            )
            yield SystemCommand(
                "Your account", "Your username, relay and key digits", screen.action_account
            )


def run(data_dir: Path | None) -> int:
    """Run the terminal client on ``data_dir`` (default: :func:`default_data_dir`).

    The settings come from :func:`tui_client.config.config_path` (TOML).

    Returns:
        The process exit status (2 if the settings file cannot be used).
    """
    folder = data_dir or default_data_dir()
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"blindpost: {exc}", file=sys.stderr)
        return 2
    # The SDK decrypts and stores in a worker thread, holding the GIL while it
    # runs Python. At the default 5 ms switch interval a keystroke could wait that
    # long at each thread it passes (Textual's input reader, the event loop, the
    # output writer) while messages pour in; at 1 ms the worker yields sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = BlindpostApp(Opener(folder), config=config)
    app.run()
    return app.return_code or 0
