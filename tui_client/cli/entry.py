# Invariant: `blindpost` without a command opens the TUI (imported lazily, so scripted
# commands never load Textual); with one, it runs exactly one command in one event loop and
# returns its exit status.
"""The ``blindpost`` entry point: parse, open the TUI or run one command, report errors."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import (
    Callable,
    Sequence,
)
from pathlib import Path

from blindpost_wire.loop import run as run_loop
from blindpost_wire.loop import unavailable
from e2ee.errors import E2EEError
from tui_client.cli.checks import _read_passphrase
from tui_client.cli.commands import _COMMANDS
from tui_client.cli.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    _classify,
    _report,
)
from tui_client.cli.output import (
    Output,
)
from tui_client.cli.parser import build_parser, default_data_dir
from tui_client.cli.session import _Settings

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
        # Only the daemon chooses (--event-loop); one-shot commands run on asyncio's loop.
        loop: str = getattr(args, "event_loop", "asyncio")
        if unavailable(loop):
            raise CliError(EXIT_USAGE, "--event-loop uvloop, but uvloop is not installed")
        return run_loop(loop, _COMMANDS[args.command](settings, args))
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
