"""Talking to a real ``blindpost daemon`` process: on its stdin/stdout or on its socket.

Every peer reads lines on a background thread into a queue, so a test waits on a
condition (a response with an id, a notification matching a predicate) with a
generous ceiling, never with a fixed sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cli_harness import BLINDPOST, Cli

#: Ceiling for one answer or event (the daemon bounds its own network waits at 30 s).
WAIT = 60.0
_LISTEN_RE = re.compile(r"listening on (unix|tcp):(\S+)")


class Peer:
    """One JSON-RPC connection: requests out, responses and notifications in."""

    def __init__(self, reader: IO[bytes], write: Callable[[bytes], None]) -> None:
        self._write = write
        self._lines: queue.Queue[dict[str, Any] | list[Any] | None] = queue.Queue()
        self.responses: dict[Any, dict[str, Any]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.batches: list[list[Any]] = []
        self.closed = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._pump, args=(reader,), daemon=True)
        self._thread.start()

    def _pump(self, reader: IO[bytes]) -> None:
        for raw in reader:
            self._lines.put(json.loads(raw))
        self._lines.put(None)

    def _take(self, timeout: float) -> bool:
        try:
            item = self._lines.get(timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            self.closed = True
        elif isinstance(item, list):
            self.batches.append(item)
        elif "method" in item:
            self.notifications.append(item)
        else:
            self.responses[item.get("id")] = item
        return True

    def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Read until ``condition()`` holds (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0 or (self.closed and self._lines.empty()):
                raise AssertionError(f"no {what} within {timeout:g} s")
            self._take(min(left, 0.5))

    def raw(self, data: bytes) -> None:
        self._write(data)

    def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request; its id."""
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.raw((json.dumps(message) + "\n").encode())
        return request_id

    def response(self, request_id: Any, timeout: float = WAIT) -> dict[str, Any]:
        self.until(lambda: request_id in self.responses, f"response {request_id}", timeout)
        return self.responses.pop(request_id)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A request's result (AssertionError on an error response)."""
        answer = self.response(self.request(method, params))
        assert "result" in answer, answer
        return answer["result"]

    def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A request's error object (AssertionError on success)."""
        answer = self.response(self.request(method, params))
        assert "error" in answer, answer
        error: dict[str, Any] = answer["error"]
        return error

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The params of the ``receive`` notifications of this record type, so far."""
        return [
            n["params"]
            for n in self.notifications
            if n["method"] == "receive" and n["params"]["type"] == kind
        ]

    def event(self, kind: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait for a notification of type ``kind`` that ``match`` accepts."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events(kind) if match(e)]
            return bool(found)

        self.until(seen, f"{kind} notification")
        return found[0]


class StdioDaemon(Peer):
    """``blindpost --data DIR [OPTIONS] daemon ARGS`` speaking on its stdin/stdout."""

    def __init__(self, cli: Cli, name: str, *args: str, options: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [str(BLINDPOST), "--data", str(cli.data(name)), *options, "daemon", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli.env,
            cwd=cli.home,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        stdin = self.proc.stdin

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        super().__init__(self.proc.stdout, write)

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = WAIT) -> tuple[int, str]:
        """Exit status and stderr once the process ended (it is killed after ``timeout``)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the daemon did not exit") from None
        self.until(lambda: self.closed, "end of output")
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SocketDaemon:
    """``blindpost --data DIR daemon --socket PATH`` (or ``--tcp 0``) and its clients."""

    def __init__(self, cli: Cli, name: str, *args: str, options: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [str(BLINDPOST), "--data", str(cli.data(name)), *options, "daemon", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli.env,
            cwd=cli.home,
        )
        self.stderr_lines: list[str] = []
        self.address: tuple[str, str] | None = None
        ready = threading.Event()
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def pump() -> None:
            for raw in stderr:
                line = raw.decode(errors="replace")
                self.stderr_lines.append(line)
                match = _LISTEN_RE.search(line)
                if match and self.address is None:
                    self.address = (match.group(1), match.group(2))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(WAIT) or self.address is None:
            self.kill()
            raise AssertionError("the daemon did not listen:\n" + "".join(self.stderr_lines))

    def connect(self) -> SocketPeer:
        assert self.address is not None
        kind, where = self.address
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(where)
        else:
            host, port = where.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)))
        return SocketPeer(sock)

    def stop(self, sig: int, timeout: float = WAIT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the daemon did not stop") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SocketPeer(Peer):
    """A client of a daemon's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        super().__init__(sock.makefile("rb"), sock.sendall)

    def close(self) -> None:
        """Disconnect at once (the reader thread's file keeps the socket object open)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def socket_path(tmp: Path) -> Path:
    """A short socket path (Unix socket paths are limited to about 100 bytes)."""
    return tmp / "bp.sock"
