# Invariants:
# * Pure JSON-RPC 2.0 framing and errors: no I/O, no asyncio, no SDK calls. One JSON value
#   per line; a line over the limit is reported once (TOO_LONG) and skipped to its newline.
# * Error codes are public (docs/cli.md): the JSON-RPC ones, and 1000 + the CLI's exit status
#   for what the CLI would report with that status, so the two mappings cannot drift.
# * Error messages and data carry names, ids and statuses, never keys or message text.
"""JSON-RPC 2.0 for ``blindpost daemon``: line framing, error objects, named params."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from tui_client.cli import EXIT_USAGE
from tui_client.cli import checks as cli_checks
from tui_client.cli import exits as cli_exits
from tui_client.cli.output import json_line

__all__ = [
    "APP_ERROR_BASE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOTIFICATION_METHOD",
    "PARSE_ERROR",
    "TOO_LONG",
    "LineSplitter",
    "Params",
    "RpcError",
    "TooLong",
    "error_response",
    "json_line_any",
    "rpc_error",
]

# -- error codes (public: docs/cli.md) ------------------------------------------

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: An SDK or CLI error: code = APP_ERROR_BASE + the CLI's exit status (1003 unreachable...).
APP_ERROR_BASE: Final = 1000

#: The method name of every event notification.
NOTIFICATION_METHOD: Final = "receive"


class TooLong:
    """Marker for a line longer than the limit (it is skipped up to its newline)."""


TOO_LONG: Final = TooLong()


class LineSplitter:
    """Bytes in, complete lines out; a line over ``max_line`` bytes becomes :data:`TOO_LONG`.

    Args:
        max_line: the longest line accepted, without its newline.
    """

    def __init__(self, max_line: int) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | TooLong]:
        """The lines ``chunk`` completes (at EOF, pass ``b""`` to get an unterminated last one)."""
        out: list[bytes | TooLong] = []
        if not chunk:
            if self._buf and not self._skipping:
                out.append(bytes(self._buf))
            self._buf.clear()
            return out
        self._buf += chunk
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if not self._skipping and len(self._buf) > self._max:
                    out.append(TOO_LONG)
                    self._skipping = True
                if self._skipping:
                    self._buf.clear()
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > self._max:
                out.append(TOO_LONG)
            else:
                out.append(line)


# -- errors ------------------------------------------------------------------------------


class RpcError(Exception):
    """An error response: JSON-RPC ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = dict(data) if data is not None else None

    def error_object(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.data is not None:
            error["data"] = self.data
        return error


def rpc_error(exc: BaseException) -> RpcError:
    """The error response for an exception of the CLI or SDK (the exit-status mapping)."""
    if isinstance(exc, RpcError):
        return exc
    status, message = cli_exits._classify(exc)
    message = " ".join(message.split())
    data: dict[str, Any] = {"exit_status": status, "error": type(exc).__name__}
    for attribute in ("user", "message_id", "group_id"):
        value = getattr(exc, attribute, None)
        if isinstance(value, str):
            data[attribute] = value
    if status == EXIT_USAGE:
        return RpcError(INVALID_PARAMS, message, data)
    return RpcError(APP_ERROR_BASE + status, message, data)


# -- parameters --------------------------------------------------------------------------


class Params:
    """Named parameters of one call; anything unknown or mistyped is -32602."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)
        self._seen: set[str] = set()

    def _get(self, name: str, kinds: tuple[type, ...], what: str, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._raw or self._raw[name] is None:
            if required:
                raise RpcError(INVALID_PARAMS, f"missing parameter {name!r} ({what})")
            return None
        value = self._raw[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise RpcError(INVALID_PARAMS, f"parameter {name!r} must be {what}")
        return value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value: str | None = self._get(name, (str,), "a string", required)
        return value

    def required_text(self, name: str) -> str:
        value = self.text(name, required=True)
        assert value is not None
        return value

    def integer(self, name: str, default: int) -> int:
        value: int | None = self._get(name, (int,), "an integer", False)
        return default if value is None else value

    def flag(self, name: str) -> bool:
        value: bool | None = self._get(name, (bool,), "true or false", False)
        return bool(value)

    def strings(self, name: str) -> list[str]:
        value: list[Any] = self._get(name, (list,), "a list of strings", True)
        if not all(isinstance(v, str) for v in value):
            raise RpcError(INVALID_PARAMS, f"parameter {name!r} must be a list of strings")
        return list(value)

    def chat(self, *, required: bool = True) -> cli_checks._Target | None:
        """``to`` (or ``user``) naming a user, or ``group``: exactly one."""
        to = self.text("to")
        user = self.text("user")
        group = self.text("group")
        if to is not None and user is not None:
            raise RpcError(INVALID_PARAMS, "give 'to' or 'user', not both")
        who = to if to is not None else user
        if who is None and group is None and not required:
            return None
        if (who is None) == (group is None):
            raise RpcError(INVALID_PARAMS, "name either a user ('to' or 'user') or a 'group'")
        return cli_checks._target(group, who)

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            raise RpcError(INVALID_PARAMS, f"unknown parameter(s): {', '.join(unknown)}")


def error_response(request_id: str | int | None, error: RpcError) -> dict[str, Any]:
    """The response object carrying ``error``."""
    return {"jsonrpc": "2.0", "id": request_id, "error": error.error_object()}


def json_line_any(value: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A JSON-RPC message (or batch) on one line, escaped as the CLI's records are."""
    if isinstance(value, Mapping):
        return json_line(value)
    return "[" + ",".join(json_line(v) for v in value) + "]"
