"""A real relay process for tests: start ``python -m relay`` on a free loopback port.

Shared by test modules as ``relay_process`` (conftest's module name is not unique
across test folders, so nothing is imported from it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 10.0

# Generous limits for the shared relay so tests do not trip each other's rate limits.
SHARED_SETTINGS = {
    "registration_burst": "100000",
    "prekey_fetch_burst": "100000",
    "ws_heartbeat_seconds": "0",
    "sweep_interval_seconds": "0",
}


@dataclass
class RelayProcess:
    proc: subprocess.Popen[str]
    port: int
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def start_relay(
    data_dir: Path,
    settings: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    env_extra: dict[str, str] | None = None,
) -> RelayProcess:
    """Start ``python -m relay --port 0`` and wait for its listening log line."""
    args = [
        sys.executable,
        "-m",
        "relay",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data",
        str(data_dir),
    ]
    for key, value in (settings or {}).items():
        args += ["--set", f"{key}={value}"]
    args += extra_args or []
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_extra or {})
    proc = subprocess.Popen(
        args,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    port_box: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = _LISTEN_RE.search(line)
            if m and not port_box:
                port_box.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not port_box:
        proc.kill()
        raise RuntimeError("relay did not start:\n" + "".join(lines))
    return RelayProcess(proc, port_box[0], data_dir, lines)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a cheap predicate about another process (bounded); for log lines only."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
