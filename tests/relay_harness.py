"""A real relay process for tests: ``python -m relay`` on 127.0.0.1, restartable in place.

The one way every test folder starts a relay. Imported as ``relay_harness``: pytest
prepends ``tests/`` to ``sys.path`` when it loads ``tests/conftest.py`` (a conftest
outside any package), so this module imports by name from every test folder, like
each folder's own helper modules do from that folder.

Invariants:

* The first start binds port 0 and takes the real port from the relay's
  ``listening on`` log line, so no port is guessed and none can be taken between
  choosing and binding it; every restart binds that same port again (the relay sets
  SO_REUSEADDR) with the same data directory, so clients reconnect to the same URL
  and find what the relay stored.
* Everything the process writes (stdout and stderr) is kept in :attr:`lines`, across
  restarts; :meth:`stop` returns only once the process has exited and its output has
  been read.
* The process never sees the caller's ``BLINDPOST_*`` environment, only what a test
  passes in ``env_extra``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

#: Loose limits: tests sharing a relay register many accounts and fetch many bundles.
LOOSE_LIMITS = {
    "registration_burst": "100000",
    "prekey_fetch_burst": "100000",
    # Registration stays in its default mode (pow), so every test that registers solves a
    # real proof of work, at a tiny difficulty (16 hashes on average).
    "registration_pow_difficulty": "4",
    "device_add_burst": "100000",
    "prekey_fetch_account_burst": "100000",
    "prekey_target_burst": "100000",
    "lookup_burst": "100000",
    "upload_bytes_burst": "100000000000",
    "account_send_burst": "100000000",
    "sealed_token_burst": "100000",
}
#: Loose limits and no background timers (WebSocket heartbeats, the expiry sweeper).
QUIET = {
    **LOOSE_LIMITS,
    "ws_heartbeat_seconds": "0",
    "sweep_interval_seconds": "0",
}

_LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class RelayProcess:
    """A relay process on 127.0.0.1 whose port and data directory survive restarts.

    Args:
        data_dir: the relay's ``--data`` directory (created if missing).
        settings: ``--set name=value`` options; none means the relay's defaults.
        extra_args: more command-line arguments, after the settings.
        env_extra: environment variables added to the scrubbed environment.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: Mapping[str, str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        env_extra: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = dict(settings or {})
        self.extra_args = list(extra_args)
        self.env_extra = dict(env_extra or {})
        self.port = 0  # chosen by the first start, then kept
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[str]:
        """The current (or last) process, for tests that signal or wait on it themselves."""
        assert self._proc is not None, "the relay was never started"
        return self._proc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the relay wrote so far, over all its starts."""
        return "".join(self.lines)

    def environment(self) -> dict[str, str]:
        """The process environment: ours without ``BLINDPOST_*``, plus ``env_extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env_extra)
        return env

    def start(self) -> RelayProcess:
        """Start the process and wait until it listens.

        Returns:
            self, started.

        Raises:
            RuntimeError: the relay exited or did not log its address in time (its
                output is in the message).
        """
        assert not self.running, "the relay is running already"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--data", str(self.data_dir)]
        for key, value in self.settings.items():
            args += ["--set", f"{key}={value}"]
        args += self.extra_args
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.environment(),
            cwd=ROOT,
        )
        ports: list[int] = []
        listening = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                match = _LISTEN_RE.search(line)
                if match and not ports:
                    ports.append(int(match.group(1)))
                    listening.set()
            listening.set()  # exited before listening: do not wait for the timeout

        self._proc = proc
        self._pump = threading.Thread(target=pump, name="relay-log", daemon=True)
        self._pump.start()
        if not listening.wait(START_TIMEOUT) or not ports:
            proc.kill()
            proc.wait(5)
            raise RuntimeError("the relay did not start:\n" + self.log_text()[-3000:])
        self.port = ports[0]
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (unless the process has exited already) and wait for the exit.

        SIGTERM and SIGINT are a graceful shutdown (WebSockets closed with 1001).

        Returns:
            The exit status: 0 after a clean shutdown, ``-signal.SIGKILL`` after a kill.

        Raises:
            AssertionError: the process was still running after ``timeout`` (it is
                killed first; its output is in the message).
        """
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(
                f"the relay did not exit on signal {sig} within {timeout} s:\n"
                + self.log_text()[-3000:]
            ) from None
        finally:
            if self._pump is not None:
                self._pump.join(5)  # the last lines it wrote
        return code

    def restart(self, *, crash: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``crash``) and start on the same port and data."""
        if self.running:
            self.stop(signal.SIGKILL if crash else signal.SIGTERM)
        self.start()


def start_relay(
    data_dir: Path,
    settings: Mapping[str, str] | None = None,
    *,
    extra_args: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
) -> RelayProcess:
    """A started :class:`RelayProcess` (the caller stops it)."""
    return RelayProcess(data_dir, settings, extra_args=extra_args, env_extra=env_extra).start()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a cheap predicate about another process (bounded); for log lines only."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
