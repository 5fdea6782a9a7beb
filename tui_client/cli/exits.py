# Invariant: every failure leaves `blindpost` as one line `blindpost: error: ...` on stderr and
# one of the documented exit statuses (docs/cli.md); _classify is the only mapping from an
# SDK (or OS) error to a status, shared by the commands and the daemon.
"""Exit statuses, the CLI's error type, and the mapping from SDK errors to statuses."""

from __future__ import annotations

import sys
from typing import Final

from e2ee.client_errors import (
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    IdentityHeld,
    NotAdmin,
    NotAMember,
    NotConnected,
    NotFound,
    RelayRejected,
    SendFailed,
    StoreLocked,
    UnknownRecipient,
    UsernameTaken,
)
from e2ee.errors import E2EEError, StorageError, TransportError, UsageError, WrongPassphrase

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


class CliError(Exception):
    """A failure to report as ``blindpost: error: <message>`` with exit status ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


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
