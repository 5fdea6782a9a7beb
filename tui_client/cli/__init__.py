# Invariants:
# * The command line is an adapter over the SDK facade (e2ee.client.Client, e2ee.events,
#   e2ee.errors / e2ee.client_errors) only; an import-linter contract keeps it off e2ee's
#   core, store, transport and history modules.
# * A failure is one line `blindpost: error: ...` on stderr and a documented exit status
#   (docs/cli.md); stdout carries results only.
# * Importing this package loads no network or storage libraries (aiohttp, sqlite_utils):
#   `blindpost --help` stays fast.
"""The ``blindpost`` command: the TUI without arguments, scriptable subcommands with.

The package is split by concern:

* :mod:`~tui_client.cli.parser`: the argument parser and the default data directory;
* :mod:`~tui_client.cli.checks`: argument checks (names, ids, chat targets, passphrase);
* :mod:`~tui_client.cli.session`: opening the account for one command, bounded waits;
* :mod:`~tui_client.cli.commands`: one coroutine per subcommand (``cmd_init``, ...);
* :mod:`~tui_client.cli.events`: the records ``receive`` prints (shared with the daemon);
* :mod:`~tui_client.cli.output`: JSON records and human lines;
* :mod:`~tui_client.cli.exits`: exit statuses and the error -> status mapping;
* :mod:`~tui_client.cli.entry`: :func:`main`.
"""

from __future__ import annotations

from tui_client.cli.commands import history_page, search_page
from tui_client.cli.entry import main
from tui_client.cli.events import EventOutput, event_output, message_output
from tui_client.cli.exits import (
    EXIT_BUSY,
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_HELD,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PASSPHRASE,
    EXIT_REFUSED,
    EXIT_TAKEN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    PROG,
    CliError,
)
from tui_client.cli.parser import build_parser, default_data_dir

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
    "PROG",
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
