# Invariant: every user-supplied name, id and passphrase source is checked here before any
# account is opened; a bad one is a CliError with exit status 2 (5 for a missing file).
"""Argument checks: usernames, group and message ids, chat targets, the passphrase."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blindpost_wire.names import is_username
from e2ee.client import check_relay_urls, direct_chat_id, group_chat_id
from e2ee.errors import UsageError
from tui_client.cli.exits import ENV_PASSPHRASE, EXIT_USAGE, CliError

_GROUP_RE: Final = re.compile(r"^[0-9a-f]{24}$")
_MESSAGE_RE: Final = re.compile(r"^[0-9a-f]{32}$")


# -- argument checks ---------------------------------------------------------------------


def _relay_urls(given: Sequence[str]) -> tuple[str, ...]:
    """The relay URLs of ``init --relay URL [--relay URL ...]``, checked, in order, once each."""
    for url in given:
        if not re.match(r"^https?://[^/\s]+", url.strip()):
            raise CliError(EXIT_USAGE, f"invalid relay URL {url!r}: use http(s)://host:port")
    try:
        return check_relay_urls(given)
    except UsageError as exc:
        raise CliError(EXIT_USAGE, f"invalid relay URLs: {exc}") from None


def _username(value: str) -> str:
    if not is_username(value):
        raise CliError(EXIT_USAGE, f"invalid username {value!r}: 3 to 32 of a-z, 0-9 and _")
    return value


def _group_id(value: str) -> str:
    gid = value.removeprefix("group:")
    if not _GROUP_RE.match(gid):
        raise CliError(EXIT_USAGE, f"invalid group id {value!r}: 24 hex digits")
    return gid


def _message_id(value: str) -> str:
    mid = value.lower()
    if not _MESSAGE_RE.match(mid):
        raise CliError(EXIT_USAGE, f"invalid message id {value!r}: 32 hex digits")
    return mid


@dataclass(frozen=True, slots=True)
class _Target:
    """A chat named on the command line: a user or a group."""

    to: str  # what Client.send_* takes
    chat_id: str
    user: str | None
    group: str | None

    @property
    def label(self) -> str:
        return self.user if self.user is not None else f"group {self.group}"


def _target(group: str | None, user: str | None) -> _Target:
    if (group is None) == (user is None):
        raise CliError(EXIT_USAGE, "name either a USERNAME or --group GROUP_ID")
    if group is not None:
        gid = _group_id(group)
        return _Target(group_chat_id(gid), group_chat_id(gid), None, gid)
    assert user is not None
    name = _username(user)
    return _Target(name, direct_chat_id(name), name, None)


def _split_words(args: argparse.Namespace, what: str) -> tuple[_Target, str]:
    words: list[str] = args.words
    if args.group is not None:
        if len(words) != 1:
            raise CliError(EXIT_USAGE, f"with --group, give only the {what} (quote it)")
        return _target(args.group, None), words[0]
    if len(words) != 2:
        raise CliError(EXIT_USAGE, f"give USERNAME and the {what} (quote the {what})")
    return _target(None, words[0]), words[1]


def _read_passphrase(args: argparse.Namespace) -> str | None:
    path: Path | None = args.passphrase_file
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CliError(EXIT_USAGE, f"cannot read the passphrase file: {exc.strerror}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CliError(EXIT_USAGE, "the passphrase file is not UTF-8") from exc
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise CliError(EXIT_USAGE, "the passphrase file is empty")
        return text
    return os.environ.get(ENV_PASSPHRASE) or None
