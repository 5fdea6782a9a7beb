# The terminal client's settings file: TOML at the XDG config path.
#
# Invariants:
# * Reading the file is the only I/O here; the result is an immutable
#   ``TuiConfig``. A missing file gives the defaults; a file that cannot be
#   used raises ``ConfigError`` naming the file and the setting, never half
#   applies.
# * Unknown settings are errors (a typo must not be silently ignored).
# * Key names are Textual's (``ctrl+k``, ``j``, ``f1``); binding ids are the
#   ones listed in ``KEY_ACTIONS``, which the app hands to Textual's keymap.
"""Settings of the terminal client (``~/.config/blindpost/tui.toml``)."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "KEY_ACTIONS",
    "LAYOUTS",
    "VI_KEYS",
    "ChatPrefs",
    "ConfigError",
    "TuiConfig",
    "config_path",
    "load_config",
    "load_prefs",
    "prefs_path",
    "save_prefs",
]

LAYOUTS = ("compact", "roomy")

#: Binding id -> (default keys, what it does). The ids are what ``[keys]`` in
#: the file sets; the help screen (F1) lists them with their effective keys.
KEY_ACTIONS: dict[str, tuple[str, str]] = {
    "new_chat": ("ctrl+n", "new chat by username"),
    "new_group": ("ctrl+g", "new group"),
    "switch_chat": ("ctrl+k", "quick chat switcher (type part of a name)"),
    "next_unread": ("alt+u", "next chat with unread messages"),
    "info": ("f2", "contact or group info"),
    "account": ("f3", "your account card"),
    "link_device": ("f4", "link a new device: approve the code it shows"),
    "devices": ("f5", "this account's devices: list them, remove one, link a new one"),
    "help": ("f1", "this help: every key"),
    "attach": ("ctrl+o", "attach a file"),
    "search": ("ctrl+f", "search the history"),
    "focus_chats": ("ctrl+l", "jump to the chat filter"),
    "reply": ("r", "reply to the selected message"),
    "react": ("plus,equals_sign", "react to the selected message"),
    "edit": ("e", "edit the selected message (yours)"),
    "delete": ("d", "delete the selected message for everyone (asks)"),
    "save": ("s", "save the selected message's file"),
    "open": ("o", "open the selected message's file"),
    "open_link": ("l", "open the first link of the selected message"),
    "latest": ("end", "jump to the newest message"),
    "editor": ("alt+e", "write the message in $VISUAL / $EDITOR"),
    "mute": ("m", "mute / unmute the highlighted chat (chat list)"),
    "archive": ("a", "archive / unarchive the highlighted chat (chat list)"),
    "delete_chat": ("d", "delete the highlighted chat's history on this device (chat list, asks)"),
    "theme": ("ctrl+t", "light / dark theme"),
    "quit": ("ctrl+q", "quit"),
}

#: ``vi_keys = true``: extra keys in the chat list and the message list.
VI_KEYS: dict[str, str] = {
    "cursor_down": "j",
    "cursor_up": "k",
    "first": "g",
    "last": "G",
}


class ConfigError(Exception):
    """The settings file cannot be used; the text names the file and the setting."""


@dataclass(frozen=True, slots=True)
class TuiConfig:
    """The terminal client's settings (the defaults when there is no file).

    Attributes:
        theme: a Textual theme name (``textual-dark``, ``textual-light``, ...).
        layout: ``compact`` (one line per message while the same sender goes
            on) or ``roomy`` (a header line on every message).
        download_folder: where ``s`` suggests saving and ``o`` saves before
            opening (default ``~/Downloads`` if it exists, else the folder the
            app was started in).
        bell: ring the terminal bell for a message in another chat.
        desktop_notifications: also call ``notify-send`` where it exists.
        vi_keys: ``j``/``k``/``g``/``G`` in the lists.
        keys: binding id -> keys (comma-separated), over the defaults.
        path: the file it was read from (None: defaults).
    """

    theme: str = "textual-dark"
    layout: Literal["compact", "roomy"] = "compact"
    download_folder: Path | None = None
    bell: bool = True
    desktop_notifications: bool = True
    vi_keys: bool = False
    keys: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None

    def key_map(self) -> dict[str, str]:
        """Every binding id with its effective keys (defaults, then the file's)."""
        return {name: self.keys.get(name, default) for name, (default, _) in KEY_ACTIONS.items()}

    def downloads(self) -> Path:
        """The folder files are saved to by default."""
        if self.download_folder is not None:
            return self.download_folder
        folder = Path.home() / "Downloads"
        return folder if folder.is_dir() else Path.cwd()


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the settings file is: ``$BLINDPOST_TUI_CONFIG``, else
    ``$XDG_CONFIG_HOME/blindpost/tui.toml`` (if absolute), else
    ``~/.config/blindpost/tui.toml``.
    """
    env = os.environ if environ is None else environ
    given = env.get("BLINDPOST_TUI_CONFIG")
    if given:
        return Path(given).expanduser()
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "blindpost" / "tui.toml"
    return Path.home() / ".config" / "blindpost" / "tui.toml"


_FIELDS = {
    "theme": str,
    "layout": str,
    "download_folder": str,
    "vi_keys": bool,
}


def load_config(path: Path | None = None) -> TuiConfig:
    """Read the settings file (``path``, else :func:`config_path`).

    Returns:
        The settings; the defaults if the file does not exist.

    Raises:
        ConfigError: not TOML, an unknown setting, or a value of the wrong kind.
    """
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return TuiConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _parse(data, path)


def _parse(data: dict[str, Any], path: Path) -> TuiConfig:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {name}: {why}")

    known = {*_FIELDS, "notifications", "keys"}
    for name in data:
        if name not in known:
            raise bad(name, f"unknown setting (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {"path": path}
    for name, kind in _FIELDS.items():
        if name in data:
            if not isinstance(data[name], kind):
                raise bad(name, f"must be a {'true/false' if kind is bool else 'string'}")
            values[name] = data[name]
    if "layout" in values and values["layout"] not in LAYOUTS:
        raise bad("layout", f"must be one of {', '.join(LAYOUTS)}")
    if "download_folder" in values:
        values["download_folder"] = Path(values["download_folder"]).expanduser()
    notifications = data.get("notifications", {})
    if not isinstance(notifications, dict):
        raise bad("notifications", "must be a table ([notifications])")
    for name, value in notifications.items():
        if name not in ("bell", "desktop"):
            raise bad(f"notifications.{name}", "unknown setting (known: bell, desktop)")
        if not isinstance(value, bool):
            raise bad(f"notifications.{name}", "must be true or false")
    values["bell"] = notifications.get("bell", True)
    values["desktop_notifications"] = notifications.get("desktop", True)
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        raise bad("keys", "must be a table ([keys])")
    for name, value in keys.items():
        if name not in KEY_ACTIONS:
            raise bad(f"keys.{name}", f"unknown action (known: {', '.join(KEY_ACTIONS)})")
        if not isinstance(value, str) or not value.strip():
            raise bad(f"keys.{name}", 'must be a key name such as "ctrl+k" (or "a,b")')
    values["keys"] = {name: value.replace(" ", "") for name, value in keys.items()}
    return TuiConfig(**values)


@dataclass(frozen=True, slots=True)
class ChatPrefs:
    """Per-account choices about chats: muted (no toast, bell or desktop
    notification) and archived (out of the list until a message comes, or the
    filter finds them). Kept in :func:`prefs_path`."""

    muted: frozenset[str] = frozenset()
    archived: frozenset[str] = frozenset()


def prefs_path(username: str, environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/blindpost/chats-<username>.json`` (if absolute), else
    ``~/.local/state/blindpost/chats-<username>.json``."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME")
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "blindpost" / f"chats-{username}.json"


def load_prefs(path: Path) -> ChatPrefs:
    """Read the chat choices; missing or unreadable gives none (they are conveniences)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        muted = frozenset(str(c) for c in data.get("muted", []))
        archived = frozenset(str(c) for c in data.get("archived", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return ChatPrefs()
    return ChatPrefs(muted, archived)


def save_prefs(path: Path, prefs: ChatPrefs) -> None:
    """Write the chat choices (private to the user; replaced in one rename).

    Raises:
        OSError: the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"muted": sorted(prefs.muted), "archived": sorted(prefs.archived)}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
