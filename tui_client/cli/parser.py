# Invariant: the argument parser describes every command and option of docs/cli.md; a usage
# error is a CliError (exit status 2), never argparse's own exit.
"""The ``blindpost`` argument parser and the default data directory."""

from __future__ import annotations

import argparse
from collections.abc import (
    Mapping,
)
from pathlib import Path
from typing import Any, Final, NoReturn

from tui_client.cli.exits import ENV_DATA, ENV_PASSPHRASE, EXIT_USAGE, PROG, CliError

DEFAULT_NETWORK_TIMEOUT: Final = 30.0


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
    p.add_argument(
        "--relay",
        required=True,
        action="append",
        metavar="URL",
        help="relay base URL (http[s]://); repeat it for each node of a relay with several "
        "(commands move to the next one when a node fails)",
    )
    p.add_argument(
        "--invite",
        metavar="CODE",
        help="invite code from the relay's operator (relays that register by invitation)",
    )
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

    p = command(
        "recover",
        "re-claim USERNAME on a new device with its recovery key (read from "
        "--recovery-key-file or the first line of standard input); a new identity",
    )
    p.add_argument("username", metavar="USERNAME")
    p.add_argument("--relay", required=True, metavar="URL", help="relay base URL (http[s]://)")
    p.add_argument(
        "--recovery-key-file", type=Path, metavar="FILE", help="read the recovery key from FILE"
    )

    command("recovery-key", "make a new recovery key (the earlier one stops working)")

    p = command(
        "sealed",
        "sealed sender: show whether you send and accept messages without the sender's name; "
        "refuse or accept them, or replace your access key",
    )
    ssub = p.add_subparsers(dest="sealed_command", metavar="ACTION", parser_class=_Parser)
    ssub.required = False
    ssub.add_parser("status", help="what is on (the default)", parents=[common])
    ssub.add_parser(
        "refuse", help="refuse sealed messages from everyone (they come named)", parents=[common]
    )
    ssub.add_parser("accept", help="accept sealed messages from contacts again", parents=[common])
    ssub.add_parser(
        "rotate",
        help="replace your access key: every token contacts hold stops working",
        parents=[common],
    )

    p = command(
        "link",
        "make this machine a new device of an existing account: prints 'code: CODE' and a QR "
        "code, waits until a device of the account approves it ('devices add CODE')",
    )
    p.add_argument(
        "--relay",
        required=True,
        action="append",
        metavar="URL",
        help="the account's relay base URL (http[s]://); repeat it for each node",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up when not approved within this long (nothing is registered) [300]",
    )

    p = command(
        "devices",
        "list this account's devices (id, name, added, last seen); add or remove one",
    )
    dsub = p.add_subparsers(dest="devices_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = False
    dsub.add_parser("list", help="the account's devices (the default)", parents=[common])
    d = dsub.add_parser(
        "add", help="approve a new device that shows CODE ('blindpost link')", parents=[common]
    )
    d.add_argument("code", metavar="CODE", help="the code the new device printed")
    d.add_argument("--name", metavar="NAME", help="a name for it (kept encrypted at the relay)")
    d.add_argument(
        "--with-history",
        action="store_true",
        help="also hand it this device's history (chats, contacts, trust, groups), encrypted",
    )
    d = dsub.add_parser(
        "remove", help="remove a device: it reads nothing sent afterwards", parents=[common]
    )
    d.add_argument("device_id", type=int, metavar="ID")
    d.add_argument("--force", action="store_true", help="allow removing this device itself")

    p = command("backup", "encrypted backups of this account (a passphrase is required)")
    bsub = p.add_subparsers(dest="backup_command", metavar="ACTION", parser_class=_Parser)
    bsub.required = True
    b = bsub.add_parser(
        "create",
        help="write an encrypted backup: keys, contacts, trust, groups, history",
        parents=[common],
    )
    b.add_argument("--out", required=True, type=Path, metavar="FILE", help="the backup file")
    b.add_argument(
        "--with-media", action="store_true", help="also the attachments still on the relay"
    )
    b.add_argument(
        "--if-older",
        type=float,
        metavar="HOURS",
        help="do nothing if FILE is younger than HOURS (for a cron job or systemd timer)",
    )
    b = bsub.add_parser(
        "restore",
        help="restore a backup into a new --data directory (the username is kept)",
        parents=[common],
    )
    b.add_argument("file", type=Path, metavar="FILE", help="the backup file")

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
