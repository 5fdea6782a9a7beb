# Invariants:
# * Operator commands only read unless their name says otherwise, and work on a stopped or a
#   running relay (SQLite WAL: readers never block the relay's writer, and the relay never
#   blocks them).
# * They report problems as plain sentences on stderr with a non-zero exit status, never a
#   traceback: 0 = healthy / done, 1 = a problem was found or the data cannot be read, 2 = usage.
# * Command groups are a registry: each module contributes ``register(sub)``, which adds its
#   subcommands to a group's subparsers, each with ``set_defaults(func=...)``; relay/__main__.py
#   lists the modules of every group (``COMMAND_GROUPS``).
"""Operator commands: ``blindpost-relay admin check|stats --data DIR``."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay.config import default_data_dir
from relay.errors import StorageError
from relay.integrity import DB_NAME, HWM_NAME, inspect, read_high_water

__all__ = ["Command", "Registrar", "register", "run_group"]

#: A subcommand's implementation: parsed arguments -> exit status.
Command = Callable[[argparse.Namespace], int]
#: Adds a module's subcommands to a group (``sub`` is ``parser.add_subparsers()``'s result).
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

REPLAY_DB_NAME = "replay.sqlite3"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--data DIR`` option every operator command takes."""
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"the relay's data directory [{default_data_dir()}]",
    )


def data_dir(args: argparse.Namespace) -> Path:
    """The data directory the command works on."""
    value = getattr(args, "data", None)
    return value if isinstance(value, Path) else default_data_dir()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` and ``stats`` to the ``admin`` group."""
    check = sub.add_parser(
        "check",
        help="check the database and the acknowledged-messages mark (exit 0 when healthy)",
        description="Read-only integrity check of a data directory (stopped or running relay):"
        " SQLite quick_check of the database and of the replay guard, and whether every message"
        " the relay acknowledged is still in the database (the relay.hwm mark). Exit status 0"
        " when healthy, 1 with the problems on stderr.",
    )
    add_data_argument(check)
    check.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop the quick_check after this long (reported as not checked) [no limit]",
    )
    check.set_defaults(func=cmd_check)
    stats = sub.add_parser(
        "stats",
        help="counts and sizes of accounts, mailboxes, blobs and files",
        description="Read-only figures of a data directory (stopped or running relay).",
    )
    add_data_argument(stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=cmd_stats)


def run_group(prog: str, argv: Sequence[str], registrars: Sequence[Registrar]) -> int:
    """Parse ``argv`` for one command group and run the chosen subcommand.

    Args:
        prog: the group's program name for help (``blindpost-relay admin``).
        argv: the arguments after the group name.
        registrars: the modules' ``register`` functions of this group.

    Returns:
        The subcommand's exit status (2 for usage errors, from argparse).
    """
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for registrar in registrars:
        registrar(sub)
    args = parser.parse_args(list(argv))
    func: Command = args.func
    return func(args)


def _fail(message: str) -> int:
    print(f"blindpost-relay: {message}", file=sys.stderr)
    return 1


def _quick_check_file(path: Path) -> str | None:
    """None when ``path`` passes quick_check (or is absent), else the problem."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA query_only=1")
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{path} cannot be read: {exc}"
    return None if rows == ["ok"] else f"{path} is damaged (quick_check: {'; '.join(rows)})"


def cmd_check(args: argparse.Namespace) -> int:
    """``admin check``: see ``register``."""
    root = data_dir(args)
    if not (root / DB_NAME).exists():
        return _fail(f"no relay database in {root} (expected {root / DB_NAME})")
    report = inspect(root, check_seconds=args.seconds)
    problems = list(report.problems)
    replay_problem = _quick_check_file(root / REPLAY_DB_NAME)
    if replay_problem is not None:
        problems.append(replay_problem)
    print(f"database: {root / DB_NAME}")
    print(f"quick_check: {report.quick_check}")
    mark = "none" if report.high_water is None else str(report.high_water)
    print(f"acknowledged up to seq: {mark}; database at seq: {report.db_seq}")
    print(f"replay guard: {'ok' if replay_problem is None else 'damaged'}")
    if report.quick_check == "timed out":
        print("note: quick_check did not finish in time; run without --seconds to finish it")
    if problems:
        for problem in problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        print(
            "Stop the relay and restore the data directory from a backup; or start it with"
            " --accept-data-loss to serve what is left.",
            file=sys.stderr,
        )
        return 1
    print("healthy")
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def collect_stats(root: Path) -> dict[str, Any]:
    """The figures ``admin stats`` prints.

    Raises:
        StorageError: the database cannot be read.
    """
    db = root / DB_NAME
    if not db.exists():
        raise StorageError(f"no relay database in {root} (expected {db})")
    queries = {
        "users": "SELECT count(*) FROM users",
        "devices": "SELECT count(*) FROM devices",
        "devices_with_keys": "SELECT count(*) FROM devices WHERE spk_id IS NOT NULL",
        "one_time_prekeys": "SELECT count(*) FROM otpks",
        "queued_deliveries": "SELECT count(*) FROM mailbox",
        "queued_bytes": "SELECT coalesce(sum(size), 0) FROM mailbox",
        "messages_with_body": "SELECT count(*) FROM messages WHERE body IS NOT NULL",
        "dedupe_records": "SELECT count(*) FROM dedupe",
        "blobs": "SELECT count(*) FROM blobs",
        "blob_bytes": "SELECT coalesce(sum(size), 0) FROM blobs",
        "seq": "SELECT coalesce((SELECT v FROM meta WHERE k='seq'), 0)",
    }
    out: dict[str, Any] = {"data_dir": str(root)}
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA query_only=1")
            conn.execute("BEGIN")  # one snapshot for every figure
            for name, sql in queries.items():
                out[name] = int(conn.execute(sql).fetchone()[0])
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {db}: {exc}") from exc
    out["acknowledged_seq_mark"] = read_high_water(root / HWM_NAME)
    out["database_bytes"] = _size(db)
    out["wal_bytes"] = _size(root / f"{DB_NAME}-wal")
    out["replay_guard_bytes"] = _size(root / REPLAY_DB_NAME) + _size(root / f"{REPLAY_DB_NAME}-wal")
    return out


def cmd_stats(args: argparse.Namespace) -> int:
    """``admin stats``: see ``register``."""
    try:
        figures = collect_stats(data_dir(args))
    except StorageError as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for name, value in figures.items():
            print(f"{name}: {value}")
    return 0
