# Invariants: every setting can come from defaults, a TOML file, BLINDPOST_RELAY_* environment
# variables or flags, in that order of increasing precedence; bad settings exit with status 2.
# A first argument naming a command group (``COMMAND_GROUPS``: ``admin`` ...) runs that group's
# operator command instead of the relay.
"""Command line entry point: ``blindpost-relay``."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from blindpost_wire.loop import run as loop_run
from relay import admin, admin_accounts
from relay.admin import Registrar, run_group
from relay.config import ENV_PREFIX, SETTING_HELP, ConfigError, RelayConfig
from relay.errors import StorageError
from relay.integrity import startup_check
from relay.server import serve

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: Operator command groups: ``blindpost-relay GROUP COMMAND ...``. Each module of a group adds
#: its subcommands with its ``register`` (relay.admin's docstring says how).
COMMAND_GROUPS: dict[str, list[Registrar]] = {
    "admin": [admin.register, admin_accounts.register_admin],
    "invite": [admin_accounts.register_invite],
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (its ``--help`` lists every setting)."""
    defaults = RelayConfig()
    lines = ["settings (TOML key = env var BLINDPOST_RELAY_<KEY>, default):"]
    for f in fields(RelayConfig):
        default = getattr(defaults, f.name)
        lines.append(
            f"  {f.name:<28} {ENV_PREFIX}{f.name.upper()}  [{default}]\n"
            f"  {'':<28} {SETTING_HELP.get(f.name, '')}"
        )
    lines.append(
        "\nprecedence: defaults < --config FILE < environment < flags (--host, --port, --data,"
        " --set KEY=VALUE).\nThe TOML file holds top-level `key = value` lines or a [relay] table."
    )
    parser = argparse.ArgumentParser(
        prog="blindpost-relay",
        description="Blindpost blind relay: stores and forwards ciphertext it cannot read."
        f" Operator commands: {', '.join(f'{g} COMMAND' for g in COMMAND_GROUPS)}"
        " (see blindpost-relay admin --help).",
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to listen on [127.0.0.1]")
    parser.add_argument("--port", type=int, help="TCP port, 0 = any free port [8080]")
    parser.add_argument("--data", type=Path, help="data directory [./blindpost-relay-data]")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="start even though the start-up check found a damaged database or missing"
        " acknowledged messages (serves what is left; resets the high-water mark)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the relay until SIGTERM/SIGINT.

    Args:
        argv: arguments (``sys.argv[1:]`` if None).

    Returns:
        Process exit status: 0 after a clean shutdown, 2 for bad settings (a removed setting
        such as ``workers`` included), 1 if it cannot start.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMAND_GROUPS:
        return run_group(f"blindpost-relay {argv[0]}", argv[1:], COMMAND_GROUPS[argv[0]])
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {"host": args.host, "port": args.port, "data_dir": args.data}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    try:
        config = RelayConfig.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"blindpost-relay: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if config.store == "sqlite":  # PostgreSQL vouches for its own durability
            startup_check(
                config.data_dir,
                check_seconds=config.startup_check_seconds,
                accept_data_loss=args.accept_data_loss,
            )
        loop_run(config.event_loop, serve(config))
    except (OSError, StorageError) as exc:
        logging.getLogger("relay").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
