# Invariants:
# * The command line is an adapter over the SDK facade (e2ee.client.Client) only.
# * Every network wait is bounded (--network-timeout; transfers: without progress for that
#   long), so no command blocks forever. Commands that need nothing from the relay
#   (history, search, contacts, safety-number, group list) never connect; the others connect
#   send-only (no deliveries taken), except `receive` and `daemon`, which receive.
# * Events have one serializer, event_output: `receive` prints its records, and `daemon`
#   (tui_client/daemon/) sends the same records as JSON-RPC notifications.
# * stdout carries results only (human text, or one JSON object per line with --json);
#   a failure is one line `blindpost: error: ...` on stderr and a documented exit status
#   (docs/cli.md). Keys, passphrases and ciphertext are never printed.
# * One process per data directory: the SDK locks it while the account is open
#   (StoreLocked -> exit status 10).
"""The ``blindpost`` command: the TUI without arguments, scriptable subcommands with."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

from blindpost_wire.names import is_username
from e2ee.client import DB_FILE, Client, ClientOptions
from e2ee.client_errors import (
    ClientClosed,
    IdentityHeld,
    NotAdmin,
    NotAMember,
    SendFailed,
    StoreLocked,
    UnknownRecipient,
)
from e2ee.errors import E2EEError, StorageError, TransportError, UsageError, WrongPassphrase
from e2ee.events import (
    BacklogDrained,
    ConnectionStateChanged,
    DecryptionProblem,
    Event,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    ReceiptUpdated,
)
from e2ee.history import GroupInfo, History, StoredMessage, direct_chat_id, group_chat_id
from e2ee.transport.errors import (
    AuthFailed,
    ConnectionFailed,
    ConnectionLost,
    NotConnected,
    NotFound,
    RelayRejected,
    UsernameTaken,
)
from tui_client.cli_output import (
    AttachmentInfo,
    Output,
    change_record,
    clean,
    error_record,
    gap_record,
    group_event_record,
    human_change,
    human_error,
    human_gap,
    human_group_event,
    human_identity,
    human_message,
    human_receipt,
    identity_record,
    message_record,
    receipt_record,
)

__all__ = [
    "EXIT_BUSY",
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_HELD",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PASSPHRASE",
    "EXIT_REFUSED",
    "EXIT_TAKEN",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "EventOutput",
    "build_parser",
    "default_data_dir",
    "event_output",
    "history_page",
    "main",
    "message_output",
    "search_page",
]

T = TypeVar("T")

# -- exit statuses (public: docs/cli.md) ------------------------------------------------

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # anything not listed below
EXIT_USAGE: Final = 2  # bad arguments, no account in the data directory, no TUI
EXIT_UNREACHABLE: Final = 3  # relay unreachable, or a network wait timed out
EXIT_HELD: Final = 4  # a contact's identity key changed: sending is held until `trust`
EXIT_NOT_FOUND: Final = 5  # unknown user, group, message, attachment, file or identity
EXIT_PASSPHRASE: Final = 6  # wrong or missing passphrase
EXIT_TAKEN: Final = 7  # `init`: the username is registered already
EXIT_FORBIDDEN: Final = 8  # not a member / not an admin of the group
EXIT_REFUSED: Final = 9  # the relay refused the request (size, rate, credentials, full mailbox)
EXIT_BUSY: Final = 10  # another process uses this data directory
EXIT_INTERRUPTED: Final = 130  # Ctrl-C

PROG: Final = "blindpost"
ENV_DATA: Final = "BLINDPOST_DATA"
ENV_PASSPHRASE: Final = "BLINDPOST_PASSPHRASE"  # noqa: S105  (a variable name)
CURSOR_FILE: Final = "cli-state.json"
#: `receive` saves its position at least every this many printed messages.
CHECKPOINT_EVERY: Final = 200
DEFAULT_NETWORK_TIMEOUT: Final = 30.0
_GROUP_RE: Final = re.compile(r"^[0-9a-f]{24}$")
_MESSAGE_RE: Final = re.compile(r"^[0-9a-f]{32}$")
_POLL_SECONDS: Final = 0.05
# A command-line client reconnects sooner than the TUI's defaults: it has a deadline.
_OPTIONS: Final = ClientOptions(backoff_base=0.2, backoff_max=2.0)
_RECEIVED_KINDS: Final = ("text", "attachment", "timer")


class CliError(Exception):
    """A failure to report as ``blindpost: error: <message>`` with exit status ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- arguments --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like any error."""

    def error(self, message: str) -> NoReturn:
        raise CliError(EXIT_USAGE, f"{message} (see '{self.prog} --help')")


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before and after the subcommand.

    On subparsers their default is SUPPRESS, so a value given before the subcommand
    is not overwritten by the subparser's default.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        default=default(None),
        help=f"account data directory (default: ${ENV_DATA}, else $XDG_DATA_HOME/blindpost, "
        "else ~/.local/share/blindpost)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON object per line instead of text",
    )
    parser.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        default=default(None),
        help=f"read the key-store passphrase from FILE (else ${ENV_PASSPHRASE}, else none)",
    )
    parser.add_argument(
        "--network-timeout",
        type=float,
        metavar="SECONDS",
        default=default(DEFAULT_NETWORK_TIMEOUT),
        help="give up on the relay after this long (transfers: without progress) "
        f"[{DEFAULT_NETWORK_TIMEOUT:g}]",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log connection and SDK details to stderr",
    )


def _target_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--group", metavar="GROUP_ID", help=f"{what} a group instead of a user")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``blindpost`` (the contract documented in docs/cli.md)."""
    parser = _Parser(
        prog=PROG,
        description="Blindpost end-to-end encrypted messenger. Without a command, opens the "
        "terminal UI; with one, runs it and exits (scriptable: see --json).",
        epilog="exit status: 0 ok, 1 error, 2 usage, 3 relay unreachable or timeout, "
        "4 identity changed (sending held until 'trust'), 5 not found, 6 wrong passphrase, "
        "7 username taken, 8 not a member/admin, 9 refused by the relay, 10 data directory "
        "busy, 130 interrupted. Details: docs/cli.md.",
    )
    _common_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = _Parser(add_help=False)
    _common_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = command("init", "create the account keys and register USERNAME at a relay")
    p.add_argument("username", metavar="USERNAME")
    p.add_argument("--relay", required=True, metavar="URL", help="relay base URL (http[s]://)")
    p.add_argument(
        "--strict-trust",
        action="store_true",
        help="hold sending to every new contact until you run 'trust' or 'verify'",
    )

    p = command("send", "send a text message; prints the message id last")
    _target_args(p, "send to")
    p.add_argument(
        "words",
        nargs="+",
        metavar="USERNAME TEXT",
        help="recipient and text (just TEXT with --group); TEXT '-' reads standard input",
    )

    p = command("send-file", "send a file; prints the message id last")
    _target_args(p, "send to")
    p.add_argument(
        "words",
        nargs="+",
        metavar="USERNAME PATH",
        help="recipient and file (just PATH with --group)",
    )
    p.add_argument("--caption", default="", help="text shown with the file")
    p.add_argument("--mime", default=None, help="MIME type (default: guessed from the name)")

    p = command("receive", "print what arrives and acknowledge it")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep listening this long after the queue is drained (default: exit once drained)",
    )

    p = command("download", "fetch, verify and decrypt the file of a message")
    p.add_argument("message_id", metavar="MESSAGE_ID")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="file to write (a directory: keep the sender's file name)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing file")

    p = command("read", "mark a chat read (sends read receipts)")
    _target_args(p, "mark")
    p.add_argument("user", nargs="?", metavar="USERNAME")

    p = command("history", "messages of a chat with their status")
    _target_args(p, "show")
    p.add_argument("user", nargs="?", metavar="USERNAME")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="newest N (1..1000) [50]")
    page = p.add_mutually_exclusive_group()
    page.add_argument(
        "--before", metavar="MESSAGE_ID", help="the N messages just before this one (older page)"
    )
    page.add_argument(
        "--after", metavar="MESSAGE_ID", help="the N messages just after this one (newer page)"
    )

    p = command("search", "find messages whose words start with TEXT's words, newest first")
    p.add_argument("text", metavar="TEXT", help="words to look for ('histo' finds 'history')")
    p.add_argument("--user", metavar="USERNAME", help="only the chat with this user")
    p.add_argument("--group", metavar="GROUP_ID", help="only this group")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (1..1000) [50]")
    p.add_argument(
        "--before",
        metavar="MESSAGE_ID",
        help="only hits older than this message (the next page: the last id shown)",
    )

    p = command("group", "create, change, leave and list groups")
    gsub = p.add_subparsers(dest="group_command", metavar="ACTION", parser_class=_Parser)
    gsub.required = True
    g = gsub.add_parser("create", help="create a group; prints its id last", parents=[common])
    g.add_argument("name", metavar="NAME")
    g.add_argument("members", nargs="+", metavar="MEMBER")
    g = gsub.add_parser("add", help="add a member (admins)", parents=[common])
    g.add_argument("group_id", metavar="GROUP_ID")
    g.add_argument("username", metavar="USERNAME")
    g = gsub.add_parser("remove", help="remove a member (admins)", parents=[common])
    g.add_argument("group_id", metavar="GROUP_ID")
    g.add_argument("username", metavar="USERNAME")
    g = gsub.add_parser("leave", help="leave a group", parents=[common])
    g.add_argument("group_id", metavar="GROUP_ID")
    gsub.add_parser("list", help="the groups this account knows", parents=[common])

    p = command("safety-number", "the safety number shared with a contact")
    p.add_argument("username", metavar="USERNAME")
    p.add_argument("--qr", action="store_true", help="also draw it as a QR code")

    p = command("trust", "accept a contact's changed identity key (sends held messages)")
    p.add_argument("username", metavar="USERNAME")

    p = command("verify", "mark a contact verified after comparing safety numbers")
    p.add_argument("username", metavar="USERNAME")

    command("contacts", "known users and their trust state")

    from tui_client.daemon import add_arguments as daemon_arguments

    p = command(
        "daemon",
        "keep the account open and serve JSON-RPC 2.0 (one object per line) on stdin/stdout, "
        "or on --socket / --tcp; events become 'receive' notifications (docs/cli.md)",
    )
    daemon_arguments(p)
    return parser


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The data directory when ``--data`` is not given (the TUI's rule, shared).

    Imported from the TUI's adapter only when needed: it pulls in modules (QR
    drawing among them) that a command given ``--data`` never uses.
    """
    from tui_client.adapter import default_data_dir as rule

    return rule(environ)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blindpost")
    except PackageNotFoundError:
        return "unknown"


# -- argument checks ---------------------------------------------------------------------


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


# -- the data directory ------------------------------------------------------------------


def _read_cursor(folder: Path) -> int | None:
    """The ``seq`` up to which ``receive`` printed incoming messages (None: never set)."""
    try:
        doc = json.loads((folder / CURSOR_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    value = doc.get("printed_seq") if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _write_cursor(folder: Path, seq: int) -> None:
    path = folder / CURSOR_FILE
    tmp = folder / (CURSOR_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"printed_seq": seq}, f)
    os.replace(tmp, path)


def _messages_after(history: History, seq: int) -> list[StoredMessage]:
    """Incoming messages stored after ``seq`` (by another program, e.g. the TUI)."""
    found: list[StoredMessage] = []
    while batch := history.messages_since(seq, limit=500):
        found.extend(m for m in batch if m.type in _RECEIVED_KINDS)
        seq = batch[-1].seq
    return found


# -- an open account ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    data_dir: Path
    out: Output
    passphrase: str | None
    network_timeout: float


class _Activity:
    """A transfer progress callback that remembers when bytes last moved."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.last = time.monotonic()


class _Session:
    """An open client whose events are pumped into a queue, with bounded waits."""

    def __init__(self, settings: _Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._pushback: deque[Event] = deque()
        self._connected = asyncio.Event()
        self._fatal = asyncio.Event()
        self._fatal_reason = ""
        self._offline_reason = ""
        self._pump = asyncio.create_task(self._run_pump(client.events()))
        #: The highest history ``seq`` of a message printed (for ``receive``'s cursor).
        self.printed_seq = 0

    @property
    def history(self) -> History:
        return self.client.history

    async def _run_pump(self, stream: AsyncIterator[Event]) -> None:
        async for event in stream:
            if isinstance(event, ConnectionStateChanged):
                if event.state == "connected":
                    self._connected.set()
                elif event.state == "offline":
                    self._connected.clear()
                    self._offline_reason = event.reason
                    if event.retry_in is None or event.reason == AuthFailed.__name__:
                        self._fatal_reason = event.reason or "offline"
                        self._fatal.set()
                continue
            self.queue.put_nowait(event)

    def _fatal_error(self) -> CliError:
        reason = self._fatal_reason
        if reason == "Replaced":
            return CliError(
                EXIT_BUSY,
                "another program connected to the relay as this device (the TUI or another "
                "blindpost with a copy of this data directory)",
            )
        if reason == "DeviceRemoved":
            return CliError(EXIT_REFUSED, "this device was removed from its account")
        if reason == AuthFailed.__name__:
            return CliError(
                EXIT_REFUSED,
                "the relay refused this device's credentials (unknown account at this "
                "relay, or this computer's clock is off)",
            )
        return CliError(EXIT_UNREACHABLE, f"the relay connection ended: {reason}")

    async def connect(self, *, receive: bool = False) -> None:
        """Start the client and wait (bounded) until the relay answered.

        Args:
            receive: take deliveries (only ``receive`` does). One-shot commands
                connect send-only: what arrives for this account meanwhile stays
                on the relay for the next ``receive``, receipts and group changes
                included.

        Raises:
            CliError: unreachable (3), refused (9), or taken over (10).
        """
        await self.client.start(receive=receive)
        up = asyncio.ensure_future(self._connected.wait())
        fatal = asyncio.ensure_future(self._fatal.wait())
        try:
            await asyncio.wait(
                {up, fatal},
                timeout=self.settings.network_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            up.cancel()
            fatal.cancel()
        if self._fatal.is_set():
            raise self._fatal_error()
        if not self._connected.is_set():
            last = self._offline_reason or "no answer"
            raise CliError(
                EXIT_UNREACHABLE,
                f"cannot reach the relay within {self.settings.network_timeout:g} s "
                f"(last error: {last})",
            )

    async def start(self) -> None:
        """Connect send-only for a one-shot command (see :meth:`connect`)."""
        await self.connect(receive=False)

    async def bounded(
        self, work: Awaitable[T], what: str, *, activity: _Activity | None = None
    ) -> T:
        """Await ``work`` with the network timeout, stopping early when it cannot succeed.

        Args:
            work: the SDK call.
            what: for the timeout message ("waiting for <what>").
            activity: a transfer's progress: the timeout counts from its last progress.

        Raises:
            CliError: timeout (3) or a fatal connection state.
        """
        task = asyncio.ensure_future(work)
        fatal = asyncio.ensure_future(self._fatal.wait())
        limit = self.settings.network_timeout
        try:
            while True:
                left = limit if activity is None else activity.last + limit - time.monotonic()
                done, _ = await asyncio.wait(
                    {task, fatal},
                    timeout=max(left, _POLL_SECONDS),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if task in done:
                    return task.result()
                if fatal in done:
                    raise self._fatal_error()
                if activity is not None and time.monotonic() - activity.last < limit:
                    continue
                raise CliError(EXIT_UNREACHABLE, f"timed out after {limit:g} s waiting for {what}")
        finally:
            for future in (task, fatal):
                if not future.done():
                    future.cancel()
            await asyncio.gather(task, fatal, return_exceptions=True)

    async def next_event(self, timeout: float) -> Event | None:
        """The next event (connection states excluded), or None after ``timeout`` seconds.

        Raises:
            CliError: the connection ended for good.
        """
        if self._pushback:
            return self._pushback.popleft()
        if self._fatal.is_set():
            raise self._fatal_error()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0.0))
        except TimeoutError:
            if self._fatal.is_set():
                raise self._fatal_error() from None
            return None

    def push_back(self, event: Event) -> None:
        self._pushback.appendleft(event)

    def take_ready(self) -> Event | None:
        """An event already waiting, without blocking."""
        if self._pushback:
            return self._pushback.popleft()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def flush_outbox(self) -> int:
        """Wait (bounded) until the outbox sent what it can; return what stays queued."""
        if self._fatal.is_set():
            return len(await asyncio.to_thread(self.history.pending_outbox))
        return await self.client.flush(timeout=self.settings.network_timeout)

    async def close(self) -> None:
        await self.client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump

    # -- reading history for output ------------------------------------------------

    async def attachment(self, message: StoredMessage) -> AttachmentInfo | None:
        if message.type != "attachment":
            return None
        found = await asyncio.to_thread(self.history.attachment_info, message.id)
        if found is None:
            return None
        return AttachmentInfo(
            message.id, found.file_name, found.size, found.mime_type or "application/octet-stream"
        )

    async def group_name(self, group_id: str | None) -> str | None:
        if group_id is None:
            return None
        row = await asyncio.to_thread(self.history.group, group_id)
        return None if row is None else str(row.get("name") or "")

    async def show_message(self, message: StoredMessage) -> None:
        shown = await message_output(self, message)
        self.settings.out.emit(shown.record, shown.human)
        self.printed_seq = max(self.printed_seq, message.seq)

    async def held_error(self, chat_id: str, exc: IdentityHeld) -> CliError:
        """The error for a held send, naming the queued message."""

        def newest_pending() -> str | None:
            for message in reversed(self.history.messages(chat_id, limit=50)):
                if message.outgoing and message.status == "pending":
                    return message.id
            return None

        mid = exc.message_id or await asyncio.to_thread(newest_pending)
        which = f"message {mid} is" if mid else "the message is"
        return CliError(
            EXIT_HELD,
            f"the identity key of {exc.user} changed: {which} held until you run "
            f"'blindpost trust {exc.user}' (or 'blindpost verify {exc.user}' after comparing "
            "safety numbers)",
        )


@contextlib.asynccontextmanager
async def _account(
    settings: _Settings, *, connect: bool, options: ClientOptions = _OPTIONS
) -> AsyncIterator[_Session]:
    """Lock the data directory, open the account, optionally connect; close on exit."""
    folder = settings.data_dir
    if not (folder / DB_FILE).exists():
        raise CliError(
            EXIT_USAGE,
            f"no account in {folder}: run 'blindpost --data {folder} init USERNAME "
            "--relay URL' first",
        )
    client = await Client.open(folder, settings.passphrase, options=options)
    session = _Session(settings, client)
    try:
        if connect:
            await session.start()
        yield session
    finally:
        await session.close()


def _remove_account_files(folder: Path) -> None:
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", CURSOR_FILE):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


async def cmd_init(settings: _Settings, args: argparse.Namespace) -> int:
    user = _username(args.username)
    relay: str = args.relay.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", relay):
        raise CliError(EXIT_USAGE, f"invalid relay URL {args.relay!r}: use http(s)://host:port")
    folder = settings.data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot create {folder}: {exc.strerror}") from exc
    fresh = not (folder / DB_FILE).exists()
    if fresh:
        client = await Client.create(
            folder,
            user,
            relay,
            passphrase=settings.passphrase,
            strict_trust=args.strict_trust,
            options=_OPTIONS,
        )
    else:
        client = await Client.open(folder, settings.passphrase, options=_OPTIONS)
        if client.username != user or client.relay_url.rstrip("/") != relay:
            await client.close()
            raise CliError(
                EXIT_USAGE,
                f"{folder} already holds the account {client.username!r} at {client.relay_url}",
            )
    taken = False
    try:
        if not client.is_registered:
            try:
                await asyncio.wait_for(client.register(), settings.network_timeout)
            except UsernameTaken:
                taken = fresh
                raise CliError(
                    EXIT_TAKEN,
                    f"the username {user!r} is already registered at {relay}; "
                    "choose another (names are never reused)",
                ) from None
            except (TimeoutError, TransportError) as exc:
                reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
                code = EXIT_REFUSED if isinstance(exc, RelayRejected) else EXIT_UNREACHABLE
                raise CliError(
                    code,
                    f"cannot register at {relay} ({reason}); the keys are kept: run the "
                    "same 'init' again to finish",
                ) from None
        seq = await asyncio.to_thread(client.history.max_seq, "messages")
        await asyncio.to_thread(_write_cursor, folder, seq)
    finally:
        await client.close()
        if taken:
            _remove_account_files(folder)
    fingerprint = client.fingerprint
    record = {
        "type": "account",
        "username": user,
        "device": client.device_id,
        "relay": relay,
        "data": str(folder),
        "fingerprint": fingerprint,
        "passphrase": settings.passphrase is not None,
    }
    groups = [fingerprint[i : i + 5] for i in range(0, len(fingerprint), 5)]
    lines = [
        f"registered {user} (device {client.device_id}) at {relay}",
        f"data: {folder}",
        "your safety-number card (your half of every safety number with you):",
        "    " + " ".join(groups[:3]),
        "    " + " ".join(groups[3:]),
        f"contacts compare the full number with 'blindpost safety-number {user}'",
    ]
    if settings.passphrase is None:
        lines.append(
            "note: no passphrase; the keys are protected by file permissions only "
            f"(set {ENV_PASSPHRASE} or --passphrase-file at init to seal them)"
        )
    settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


def _sent_record(mid: str, target: _Target) -> dict[str, Any]:
    return {
        "type": "sent",
        "id": mid,
        "message_ids": [mid],
        "chat": target.chat_id,
        "to": target.user,
        "group": target.group,
    }


async def cmd_send(settings: _Settings, args: argparse.Namespace) -> int:
    target, text = _split_words(args, "TEXT")
    if text == "-":
        text = sys.stdin.read().removesuffix("\n")
    if not text:
        raise CliError(EXIT_USAGE, "the message text is empty")
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        await session.start()
        try:
            mid = await session.bounded(
                session.client.send_text(target.to, text),
                "the relay to accept the message",
            )
        except IdentityHeld as exc:
            raise await session.held_error(target.chat_id, exc) from None
    settings.out.emit(_sent_record(mid, target), f"sent to {target.label}: {mid}")
    return EXIT_OK


async def cmd_send_file(settings: _Settings, args: argparse.Namespace) -> int:
    target, name = _split_words(args, "PATH")
    path = Path(name)
    if not path.is_file():
        raise CliError(EXIT_NOT_FOUND, f"no such file: {path}")
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        await session.start()
        activity = _Activity()
        try:
            mid = await session.bounded(
                session.client.send_file(
                    target.to, path, mime_type=args.mime, caption=args.caption, progress=activity
                ),
                "the relay to accept the file",
                activity=activity,
            )
        except IdentityHeld as exc:
            raise await session.held_error(target.chat_id, exc) from None
    record = _sent_record(mid, target) | {"file": path.name, "size": path.stat().st_size}
    settings.out.emit(record, f"sent {path.name} to {target.label}: {mid}")
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class EventOutput:
    """What ``receive`` prints for an event: the JSON record and the human line.

    ``seq`` is the history position of a message record (0 for other records),
    for the cursor of incoming messages already reported.
    """

    record: dict[str, Any]
    human: str
    seq: int = 0


async def message_output(session: _Session, message: StoredMessage) -> EventOutput:
    """The ``message`` record ``receive`` prints for a stored message."""
    attachment = await session.attachment(message)
    name = await session.group_name(message.group_id)
    return EventOutput(
        message_record(message, attachment), human_message(message, attachment, name), message.seq
    )


async def event_output(session: _Session, event: Event) -> EventOutput | None:
    """The record ``receive --json`` prints for an event (None: not printed).

    The one serializer of events: ``receive`` and ``blindpost daemon`` both use it.
    Receipts already waiting in the session's queue for the same sender, status and
    chat are taken along into one record.
    """
    if isinstance(event, MessageReceived):
        return await message_output(session, event.message)
    if isinstance(event, ReceiptUpdated):
        ids = [event.message_id]
        while (more := session.take_ready()) is not None:
            if isinstance(more, ReceiptUpdated) and (
                more.status,
                more.user,
                more.device,
                more.chat_id,
            ) == (event.status, event.user, event.device, event.chat_id):
                ids.append(more.message_id)
                continue
            session.push_back(more)
            break
        return EventOutput(
            receipt_record(event.status, ids, event.user, event.device, event.chat_id),
            human_receipt(event.status, ids, event.user),
        )
    if isinstance(event, GroupChanged):
        return EventOutput(group_event_record(event), human_group_event(event))
    if isinstance(event, IdentityChanged):
        return EventOutput(identity_record(event), human_identity(event))
    if isinstance(event, GapDetected):
        return EventOutput(gap_record(event), human_gap(event))
    if isinstance(event, DecryptionProblem):
        return EventOutput(error_record(event), human_error(event))
    if isinstance(event, MessageChanged):
        return EventOutput(change_record(event), human_change(event))
    return None  # typing, our own stored messages, backlog and connection states


async def _show_event(session: _Session, event: Event) -> None:
    """Print one event (receipts that arrived together are one record)."""
    shown = await event_output(session, event)
    if shown is not None:
        session.settings.out.emit(shown.record, shown.human)
        session.printed_seq = max(session.printed_seq, shown.seq)


async def cmd_receive(settings: _Settings, args: argparse.Namespace) -> int:
    timeout: float | None = args.timeout
    if timeout is not None and timeout < 0:
        raise CliError(EXIT_USAGE, "--timeout must not be negative")
    folder = settings.data_dir
    async with _account(settings, connect=False) as session:
        cursor = _read_cursor(folder)
        if cursor is None:
            cursor = await asyncio.to_thread(session.history.max_seq, "messages")
        session.printed_seq = cursor
        checkpoint = _Checkpoint(folder, cursor)
        try:
            # Incoming messages stored by another program (the TUI) since the last
            # `receive` come first; one-shot commands take no deliveries.
            for message in await asyncio.to_thread(_messages_after, session.history, cursor):
                await session.show_message(message)
            await checkpoint.save(session.printed_seq)
            await session.connect(receive=True)
            await _receive_loop(session, timeout, checkpoint)
            await session.flush_outbox()  # delivered receipts for what we just printed
            # Closing finishes a batch in progress; its events are queued before the
            # "closed" state, so everything stored is printed here.
            await session.close()
            while (event := session.take_ready()) is not None:
                await _show_event(session, event)
        finally:
            await asyncio.to_thread(_write_cursor, folder, session.printed_seq)
    return EXIT_OK


class _Checkpoint:
    """Saves ``receive``'s position after each printed batch, not only at exit.

    A ``receive`` killed mid-way (SIGKILL) then prints again at most what it
    printed since the last save: one batch (``CHECKPOINT_EVERY`` messages, or
    what arrived together). Output is flushed per record before a save.
    """

    def __init__(self, folder: Path, saved: int) -> None:
        self._folder = folder
        self._saved = saved
        self._printed = 0

    async def save(self, seq: int) -> None:
        if seq != self._saved:
            await asyncio.to_thread(_write_cursor, self._folder, seq)
            self._saved = seq
        self._printed = 0

    async def printed(self, seq: int) -> None:
        self._printed += 1
        if self._printed >= CHECKPOINT_EVERY:
            await self.save(seq)


async def _receive_loop(session: _Session, timeout: float | None, checkpoint: _Checkpoint) -> None:
    """Print events until the backlog is drained and then ``timeout`` passed.

    The backlog ends with :class:`BacklogDrained`. Should it never come (the
    connection keeps dropping), the network timeout without any event ends it.
    The position is saved whenever nothing more is waiting to be printed.
    """
    loop = asyncio.get_running_loop()
    idle = session.settings.network_timeout
    drained = False
    deadline = loop.time() + idle  # before draining: inactivity; after: the end
    while True:
        now = loop.time()
        if now >= deadline:
            if drained:
                return
            drained, deadline = True, now + (timeout or 0.0)
            continue
        event = session.take_ready()
        if event is None:
            await checkpoint.save(session.printed_seq)  # caught up with what arrived
            event = await session.next_event(deadline - now)
        if event is None:
            continue
        if isinstance(event, BacklogDrained):
            if not drained:
                drained, deadline = True, loop.time() + (timeout or 0.0)
            continue
        if not drained:
            deadline = loop.time() + idle
        await _show_event(session, event)
        await checkpoint.printed(session.printed_seq)


async def cmd_download(settings: _Settings, args: argparse.Namespace) -> int:
    mid = _message_id(args.message_id)
    async with _account(settings, connect=False) as session:
        message = await asyncio.to_thread(session.history.message, mid)
        if message is None:
            raise CliError(EXIT_NOT_FOUND, f"no message {mid} in this account's history")
        found = await asyncio.to_thread(session.history.attachment_info, mid)
        if found is None or not found.available:
            what = "has no file" if found is None else "no longer has its file (deleted)"
            raise CliError(EXIT_NOT_FOUND, f"message {mid} {what}")
        info = AttachmentInfo(mid, found.file_name, found.size, found.mime_type)
        out: Path = args.out
        if out.is_dir():
            out = out / _safe_file_name(info.name, mid)
        if out.exists() and not args.force:
            raise CliError(EXIT_ERROR, f"{out} exists (use --force to replace it)")
        activity = _Activity()
        try:
            await session.bounded(
                session.client.download_attachment(mid, out, progress=activity),
                "the file download",
                activity=activity,
            )
        except UsageError as exc:
            # Deleted or expired messages keep their row but lose the file key.
            raise CliError(EXIT_NOT_FOUND, f"message {mid}: {exc}") from None
    record = {"type": "download", "id": mid, "path": str(out), "size": out.stat().st_size}
    settings.out.emit(record | {"name": info.name, "mime": info.mime}, f"saved {out}")
    return EXIT_OK


def _safe_file_name(name: str, fallback: str) -> str:
    """The sender's file name, without directories or control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        return fallback
    return base[:200]


async def cmd_read(settings: _Settings, args: argparse.Namespace) -> int:
    target = _target(args.group, args.user)
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        count = await session.client.mark_read(target.chat_id)
        queued = 0
        if count:
            try:
                await session.start()
            except CliError as exc:
                raise CliError(
                    exc.code,
                    f"marked {count} message(s) read; the read receipts stay queued "
                    f"(they go out with the next command that connects): {exc}",
                ) from None
            queued = await session.flush_outbox()
    record = {"type": "read", "chat": target.chat_id, "marked": count, "queued": queued}
    human = f"marked {count} message(s) read in {target.chat_id}"
    if queued:
        human += f"; {queued} receipt(s) or message(s) still queued"
    settings.out.emit(record, human)
    return EXIT_OK


def _limit(value: int) -> int:
    if not 1 <= value <= 1000:
        raise CliError(EXIT_USAGE, "--limit must be between 1 and 1000")
    return value


def _with_receipts(
    history: History, messages: Sequence[StoredMessage]
) -> list[tuple[StoredMessage, dict[str, str]]]:
    """Each message with its best status per recipient (outgoing ones; blocking)."""
    rows = []
    for message in messages:
        best: dict[str, str] = {}
        if message.outgoing:
            for (user, _device), status in history.receipts(message.id).items():
                best[user] = History.status_at_least(best.get(user), status)
        rows.append((message, best))
    return rows


async def history_page(
    session: _Session,
    target: _Target,
    *,
    limit: int,
    before: str | None = None,
    after: str | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """One page of a chat, oldest first, as (JSON record, human line) pairs.

    Raises:
        CliError: bad limit or id (2), unknown group, or an anchor not in the chat (5).
    """
    _limit(limit)
    anchor_before = None if before is None else _message_id(before)
    anchor_after = None if after is None else _message_id(after)
    if target.group:
        await _find_group(session, target.group)
    history = session.history

    def load() -> list[tuple[StoredMessage, dict[str, str]]]:
        page = history.messages(
            target.chat_id, before=anchor_before, after=anchor_after, limit=limit
        )
        return _with_receipts(history, page)

    try:
        rows = await asyncio.to_thread(load)
    except UsageError:
        anchor = anchor_before or anchor_after
        raise CliError(
            EXIT_NOT_FOUND, f"message {anchor} is not in the chat with {target.label}"
        ) from None
    name = await session.group_name(target.group)
    out = []
    for message, receipts in rows:
        attachment = await session.attachment(message)
        out.append(
            (
                message_record(message, attachment, receipts=receipts),
                human_message(message, attachment, name, with_status=True),
            )
        )
    return out


async def search_page(
    session: _Session,
    text: str,
    *,
    target: _Target | None = None,
    limit: int = 50,
    before: str | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """Messages whose words start with ``text``'s words, newest first, as output pairs.

    Raises:
        CliError: bad limit or id (2), unknown group, or ``before`` unknown (5).
    """
    _limit(limit)
    if not text.strip():
        raise CliError(EXIT_USAGE, "the search text is empty")
    anchor = None if before is None else _message_id(before)
    if target is not None and target.group:
        await _find_group(session, target.group)
    history = session.history
    chat = None if target is None else target.chat_id

    def load() -> list[tuple[StoredMessage, dict[str, str]]]:
        found = history.search_newest(text, chat_id=chat, before=anchor, limit=limit)
        return _with_receipts(history, found)

    try:
        rows = await asyncio.to_thread(load)
    except UsageError:
        raise CliError(EXIT_NOT_FOUND, f"no message {anchor} in this account's history") from None
    out = []
    for message, receipts in rows:
        attachment = await session.attachment(message)
        name = await session.group_name(message.group_id)
        out.append(
            (
                message_record(message, attachment, receipts=receipts),
                human_message(message, attachment, name, with_status=True),
            )
        )
    return out


async def cmd_history(settings: _Settings, args: argparse.Namespace) -> int:
    target = _target(args.group, args.user)
    _limit(args.limit)
    async with _account(settings, connect=False) as session:
        rows = await history_page(
            session, target, limit=args.limit, before=args.before, after=args.after
        )
        for record, human in rows:
            settings.out.emit(record, human)
        if not rows and not settings.out.as_json:
            settings.out.emit({}, f"no messages with {target.label}")
    return EXIT_OK


async def cmd_search(settings: _Settings, args: argparse.Namespace) -> int:
    target = None
    if args.user is not None or args.group is not None:
        target = _target(args.group, args.user)
    _limit(args.limit)
    async with _account(settings, connect=False) as session:
        rows = await search_page(
            session, args.text, target=target, limit=args.limit, before=args.before
        )
        for record, human in rows:
            settings.out.emit(record, human)
        if not rows and not settings.out.as_json:
            settings.out.emit({}, f"no messages match {clean(args.text, newlines=False)!r}")
    return EXIT_OK


def _group_record(group: GroupInfo) -> dict[str, Any]:
    return {
        "type": "group_info",
        "group": group.id,
        "name": group.name,
        "members": list(group.members),
        "admins": list(group.admins),
        "member": group.member,
    }


async def _find_group(session: _Session, gid: str) -> GroupInfo:
    for group in await session.client.groups():
        if group.id == gid:
            return group
    raise CliError(EXIT_NOT_FOUND, f"unknown group {gid}")


def _human_group(record: Mapping[str, Any]) -> str:
    state = "" if record["member"] else " (you are not a member)"
    return (
        f'{record["group"]} "{clean(record["name"], newlines=False)}"{state}: '
        f"members {', '.join(record['members'])}; admins {', '.join(record['admins']) or '-'}"
    )


async def cmd_group(settings: _Settings, args: argparse.Namespace) -> int:
    action: str = args.group_command
    out = settings.out
    if action == "list":
        async with _account(settings, connect=False) as session:
            groups = await session.client.groups()
            for group in groups:
                record = _group_record(group)
                out.emit(record, _human_group(record))
            if not groups and not out.as_json:
                out.emit({}, "no groups")
        return EXIT_OK
    if action == "create":
        members = [_username(m) for m in args.members]
        name: str = args.name
        if not name.strip():
            raise CliError(EXIT_USAGE, "the group name is empty")
        async with _account(settings, connect=True) as session:
            try:
                gid = await session.bounded(
                    session.client.create_group(name, members),
                    "the relay to accept the group",
                )
            except IdentityHeld as exc:
                raise CliError(
                    EXIT_HELD,
                    f"the identity key of {exc.user} changed: the group is created but "
                    f"{exc.user} is told only after 'blindpost trust {exc.user}'",
                ) from None
            record = _group_record(await _find_group(session, gid))
        out.emit(
            record | {"type": "group", "action": "create", "by": session.client.username},
            f'created group "{clean(name, newlines=False)}" with {", ".join(record["members"])}: '
            f"{gid}",
        )
        return EXIT_OK
    gid = _group_id(args.group_id)
    async with _account(settings, connect=False) as session:
        await _find_group(session, gid)
        await session.start()
        client = session.client
        if action == "add":
            user = _username(args.username)
            work: Awaitable[None] = client.add_member(gid, user)
            human = f"added {user} to group {gid}"
        elif action == "remove":
            user = _username(args.username)
            work = client.remove_member(gid, user)
            human = f"removed {user} from group {gid}"
        else:
            work = client.leave_group(gid)
            human = f"left group {gid}"
        try:
            await session.bounded(work, "the relay to accept the group change")
        except IdentityHeld as exc:
            raise CliError(
                EXIT_HELD,
                f"the identity key of {exc.user} changed: the change is queued until "
                f"'blindpost trust {exc.user}'",
            ) from None
        record = _group_record(await _find_group(session, gid))
    out.emit(record | {"type": "group", "action": action, "by": client.username}, human)
    return EXIT_OK


def _overall_trust(levels: Mapping[int, str]) -> str:
    if not levels:
        return "none"
    values = set(levels.values())
    if "untrusted" in values:
        return "untrusted"
    if values == {"verified"}:
        return "verified"
    return "tofu"


async def _known_levels(session: _Session, user: str) -> dict[int, str]:
    levels = await session.client.trust_level(user)
    if not levels:
        raise CliError(
            EXIT_NOT_FOUND,
            f"no identity key known for {user} yet: exchange a message with {user} first",
        )
    return levels


async def cmd_safety_number(settings: _Settings, args: argparse.Namespace) -> int:
    user = _username(args.username)
    async with _account(settings, connect=False) as session:
        levels = await _known_levels(session, user)
        numbers = await session.client.safety_number(user)
    for device, number in numbers:
        trust = levels.get(device, "none")
        record = {
            "type": "safety_number",
            "user": user,
            "device": device,
            "digits": number.digits,
            "trust": trust,
            "scannable": base64.b64encode(number.scannable).decode("ascii"),
        }
        lines = [f"safety number with {user} (device {device}, trust: {trust}):"]
        lines += ["    " + line for line in number.display().splitlines()]
        if args.qr:
            from e2ee.qr import qr_terminal

            lines.append(qr_terminal(number.scannable))
        lines.append(f"compare it with {user}'s screen, then run: blindpost verify {user}")
        settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


async def _accept(settings: _Settings, user: str, *, verified: bool) -> int:
    async with _account(settings, connect=False) as session:
        levels = await _known_levels(session, user)
        before = _overall_trust(levels)
        if not verified and before != "untrusted":
            settings.out.emit(
                {"type": "trust", "user": user, "trust": before, "changed": False, "sent": 0},
                f"nothing to accept: the identity key of {user} did not change (trust: {before})",
            )
            return EXIT_OK
        await session.client.accept_identity(user, verified=verified)
        after = _overall_trust(await session.client.trust_level(user))
        queued = len(await asyncio.to_thread(session.history.pending_outbox))
        still = 0
        if queued:
            try:
                await session.start()
            except CliError as exc:
                raise CliError(
                    exc.code,
                    f"{user} is now {after}; {queued} queued message(s) go out with the next "
                    f"command that connects: {exc}",
                ) from None
            still = await session.flush_outbox()
    record = {"type": "trust", "user": user, "trust": after, "changed": True}
    record |= {"sent": queued - still, "queued": still}
    human = f"{user} is now {after}"
    if queued:
        human += f"; sent {queued - still} queued message(s)"
        if still:
            human += f", {still} still queued"
    settings.out.emit(record, human)
    return EXIT_OK


async def cmd_trust(settings: _Settings, args: argparse.Namespace) -> int:
    return await _accept(settings, _username(args.username), verified=False)


async def cmd_verify(settings: _Settings, args: argparse.Namespace) -> int:
    return await _accept(settings, _username(args.username), verified=True)


async def cmd_contacts(settings: _Settings, args: argparse.Namespace) -> int:
    async with _account(settings, connect=False) as session:
        contacts = await session.client.contacts()
    for user, levels in sorted(contacts.items()):
        trust = _overall_trust(levels)
        devices = ", ".join(f"device {d}: {t}" for d, t in sorted(levels.items()))
        note = " (key changed: sending held until 'trust')" if trust == "untrusted" else ""
        settings.out.emit(
            {
                "type": "contact",
                "user": user,
                "trust": trust,
                "devices": {str(d): t for d, t in sorted(levels.items())},
            },
            f"{user:<32} {trust}{note}" + (f"  [{devices}]" if devices else ""),
        )
    return EXIT_OK


async def cmd_daemon(settings: _Settings, args: argparse.Namespace) -> int:
    from tui_client.daemon import cmd_daemon as serve

    return await serve(settings, args)


_COMMANDS: Final[dict[str, Callable[[_Settings, argparse.Namespace], Coroutine[Any, Any, int]]]] = {
    "init": cmd_init,
    "send": cmd_send,
    "send-file": cmd_send_file,
    "receive": cmd_receive,
    "download": cmd_download,
    "read": cmd_read,
    "history": cmd_history,
    "search": cmd_search,
    "group": cmd_group,
    "safety-number": cmd_safety_number,
    "trust": cmd_trust,
    "verify": cmd_verify,
    "contacts": cmd_contacts,
    "daemon": cmd_daemon,
}


# -- errors -------------------------------------------------------------------------------


def _classify(exc: BaseException) -> tuple[int, str]:
    """Exit status and message for an error from the SDK (or the OS)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, CliError):
        return exc.code, text
    if isinstance(exc, IdentityHeld):
        return EXIT_HELD, f"{text} (run 'blindpost trust {exc.user}')"
    if isinstance(exc, UnknownRecipient | NotFound):
        return EXIT_NOT_FOUND, text
    if isinstance(exc, StoreLocked):
        return EXIT_BUSY, (
            f"{text} (the TUI or another blindpost command); try again when it is done"
        )
    if isinstance(exc, NotAdmin | NotAMember):
        return EXIT_FORBIDDEN, text
    if isinstance(exc, WrongPassphrase):
        return EXIT_PASSPHRASE, (
            f"{text} (give it with --passphrase-file FILE or ${ENV_PASSPHRASE})"
        )
    if isinstance(exc, UsernameTaken):
        return EXIT_TAKEN, text
    if isinstance(exc, ConnectionFailed | ConnectionLost | NotConnected):
        return EXIT_UNREACHABLE, text
    if isinstance(exc, RelayRejected | SendFailed):
        return EXIT_REFUSED, text
    if isinstance(exc, TransportError):
        return EXIT_UNREACHABLE, text
    if isinstance(exc, ClientClosed):
        return EXIT_ERROR, text
    if isinstance(exc, UsageError):
        return EXIT_USAGE, text
    if isinstance(exc, StorageError | E2EEError):
        return EXIT_ERROR, text
    if isinstance(exc, OSError):
        return EXIT_ERROR, f"{exc.strerror or text}" + (
            f": {exc.filename}" if getattr(exc, "filename", None) else ""
        )
    return EXIT_ERROR, text


def _report(code: int, message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return code


# -- entry point --------------------------------------------------------------------------


def _run_tui(data_dir: Path) -> int:
    """Open the Textual app: ``tui_client.app.run(data_dir) -> int``, imported lazily."""
    try:
        module = importlib.import_module("tui_client.app")
        run: Callable[[Path | None], int] = module.run
    except (ImportError, AttributeError) as exc:
        return _report(
            EXIT_USAGE,
            f"the terminal UI is not available ({type(exc).__name__}: {exc}); "
            "use a command, see 'blindpost --help'",
        )
    return int(run(data_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blindpost`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status (documented in docs/cli.md).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CliError as exc:
        return _report(exc.code, str(exc))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL,
        format=f"{PROG}: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    data_dir: Path = (args.data or default_data_dir()).expanduser()
    if args.command is None:
        return _run_tui(data_dir)
    try:
        if args.network_timeout <= 0:
            raise CliError(EXIT_USAGE, "--network-timeout must be positive")
        settings = _Settings(
            data_dir=data_dir,
            out=Output(args.json),
            passphrase=_read_passphrase(args),
            network_timeout=args.network_timeout,
        )
        return asyncio.run(_COMMANDS[args.command](settings, args))
    except KeyboardInterrupt:
        return _report(EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, like other Unix tools.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (E2EEError, CliError, OSError) as exc:
        return _report(*_classify(exc))


if __name__ == "__main__":
    sys.exit(main())
