"""Harness for the CLI tests: a real relay process and the installed ``blindpost``.

Shared by the test modules through this module (not conftest, whose name is not
unique across test folders). The relay is :class:`relay_harness.RelayProcess`;
what is the CLI's own is running ``blindpost`` and editing a stopped relay's database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_harness import QUIET, RelayProcess

BLINDPOST = Path(sys.executable).parent / "blindpost"
#: Upper bound for one CLI run; commands bound their own network waits well below it.
RUN_TIMEOUT = 60.0
#: Bytecode cache of the subprocesses (outside the repository; see _python_env).
PYCACHE = Path(tempfile.gettempdir()) / f"blindpost-cli-tests-pycache-{os.getuid()}"


def _python_env(env: dict[str, str]) -> dict[str, str]:
    """Let the many short ``blindpost`` runs reuse compiled bytecode.

    With PYTHONDONTWRITEBYTECODE set (as in some CI shells), every run compiled the
    SDK's modules again, about a fifth of a second each time. The cache goes to a
    directory outside the source tree, shared by this test session's processes.
    """
    env = dict(env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    return env


class Relay(RelayProcess):
    """The shared relay process (quiet settings), in the environment ``blindpost`` runs in."""

    def __init__(self, data_dir: Path, settings: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, {**QUIET, **(settings or {})})

    def environment(self) -> dict[str, str]:
        return _python_env(super().environment())

    def forget_user(self, username: str) -> None:
        """Delete an account from the stopped relay's database.

        Stands in for what the relay API never allows (names are never reused): an
        operator resetting an account, or a malicious relay swapping a user's keys,
        which is exactly what safety numbers and held sending protect against.
        """
        assert not self.running, "stop the relay first"
        db = sqlite3.connect(self.data_dir / "relay.sqlite3")
        try:
            with db:
                (user_pk,) = db.execute(
                    "SELECT pk FROM users WHERE username = ?", (username,)
                ).fetchone()
                devices = [
                    r[0] for r in db.execute("SELECT pk FROM devices WHERE user_pk = ?", (user_pk,))
                ]
                for pk in devices:
                    db.execute("DELETE FROM otpks WHERE device_pk = ?", (pk,))
                    db.execute("DELETE FROM mailbox WHERE device_pk = ?", (pk,))
                db.execute("DELETE FROM devices WHERE user_pk = ?", (user_pk,))
                db.execute("DELETE FROM users WHERE pk = ?", (user_pk,))
        finally:
            db.close()


@dataclass
class Result:
    """A finished ``blindpost`` run."""

    args: Sequence[str]
    code: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict[str, Any]]:
        """The JSON objects printed (one per line)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    @property
    def last_word(self) -> str:
        return self.stdout.split()[-1]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    def __str__(self) -> str:
        return f"blindpost {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


class Cli:
    """Runs the installed ``blindpost`` command in a scrubbed environment."""

    def __init__(self, home: Path) -> None:
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
        env.pop("XDG_DATA_HOME", None)
        env["HOME"] = str(home)
        env["PYTHONUNBUFFERED"] = "1"
        self.env = _python_env(env)

    def data(self, name: str) -> Path:
        return self.home / name

    def start(
        self, name: str | None, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        argv = [str(BLINDPOST)] + (["--data", str(self.data(name))] if name else []) + list(args)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env | (env or {}),
            cwd=self.home,
        )

    @staticmethod
    def finish(proc: subprocess.Popen[str], args: Sequence[str]) -> Result:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"blindpost {' '.join(args)} hung:\n{out}\n{err}") from None
        return Result(args, proc.returncode, out, err)

    def __call__(
        self, name: str | None, *args: str, ok: bool = True, env: dict[str, str] | None = None
    ) -> Result:
        """Run ``blindpost --data <home>/<name> ARGS``; with ``ok``, require status 0."""
        began = time.monotonic()
        result = self.finish(self.start(name, *args, env=env), args)
        if os.environ.get("CLI_TEST_TIMES"):
            print(f"{time.monotonic() - began:5.2f}s {name} {' '.join(args)}")
        if ok:
            assert result.code == 0, str(result)
            assert result.stderr == "", str(result)
        return result

    def many(self, *runs: tuple[str, ...], ok: bool = True) -> list[Result]:
        """Run several commands concurrently (each tuple: data name, then arguments)."""
        procs = [(self.start(run[0], *run[1:]), run[1:]) for run in runs]
        results = [self.finish(proc, args) for proc, args in procs]
        for result in results:
            assert result.code == 0 or not ok, str(result)
        return results


def assert_one_line_error(result: Result, code: int) -> None:
    """A failure: the documented status and exactly one ``blindpost: error:`` line."""
    assert result.code == code, str(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blindpost: error: "), str(result)


def read_link_code(proc: subprocess.Popen[str], *, as_json: bool) -> str:
    """The code `link` prints before it waits (read line by line while it runs)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if as_json:
            record = json.loads(line)
            if record.get("type") == "link_code":
                return str(record["code"])
        elif line.startswith("code: "):
            return line.removeprefix("code: ").strip()
    raise AssertionError(
        f"link printed no code; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )
