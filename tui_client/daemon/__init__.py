# Invariant: the package's public face; `tui_client.cli` imports only add_arguments and
# cmd_daemon from here, lazily (the daemon imports the CLI, not the other way round).
"""``blindpost daemon``: the account kept open behind JSON-RPC 2.0, for bots.

Modules: :mod:`.protocol` (framing, error codes, params; pure), :mod:`.events` (the
queue of events waiting for a subscriber), :mod:`.methods` (one per CLI command),
:mod:`.server` (transports, connections, delivery, shutdown). The contract is
docs/cli.md, "The daemon".
"""

from __future__ import annotations

from tui_client.daemon.events import EventQueue
from tui_client.daemon.protocol import (
    APP_ERROR_BASE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOTIFICATION_METHOD,
    PARSE_ERROR,
    TOO_LONG,
    LineSplitter,
)
from tui_client.daemon.server import DaemonConfig, add_arguments, cmd_daemon

__all__ = [
    "APP_ERROR_BASE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOTIFICATION_METHOD",
    "PARSE_ERROR",
    "TOO_LONG",
    "DaemonConfig",
    "EventQueue",
    "LineSplitter",
    "add_arguments",
    "cmd_daemon",
]
