"""The real PostgreSQL and Redis servers tests use, and throwaway ones when none answers.

Imported as ``backend_servers`` (``tests/`` is on ``sys.path``, like ``relay_harness``), and run
by scripts/test as ``python tests/backend_servers.py ensure DIR`` / ``stop DIR``.

Invariants:

* Tests reach the servers named by ``BLINDPOST_TEST_POSTGRES_DSN`` and
  ``BLINDPOST_TEST_REDIS_URL`` (defaults: the local servers). Each test session works in its
  own database, created and dropped here, named ``blindpost_test_<random>``, so parallel
  runs never collide.
* When a server does not answer, a test that needs it is skipped, except with ``CI=true``:
  then it fails (``require``), so CI never passes by skipping a backend.
* ``ensure`` starts a throwaway server (temporary data directory, free port, loopback only)
  only for a backend that does not answer, prints the ``export`` lines for it, and records it
  under DIR so that ``stop`` stops exactly what ``ensure`` started. Missing server binaries
  are an error that names the command installing them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

POSTGRES_ENV = "BLINDPOST_TEST_POSTGRES_DSN"
REDIS_ENV = "BLINDPOST_TEST_REDIS_URL"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_BIN = Path(os.environ.get("BLINDPOST_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL_HINT = "sudo apt-get install postgresql-15 redis-server"
START_TIMEOUT = 60.0
T = TypeVar("T")

#: The session's database (set by the ``postgres_test_dsn`` fixture while it is alive).
SESSION_DATABASE: str | None = None


class MissingServer(RuntimeError):
    """A server binary needed for a throwaway server is not installed."""


def postgres_dsn() -> str:
    """The PostgreSQL server tests use (a database on it is created per session)."""
    return os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_DSN


def redis_url() -> str:
    """The Redis server tests use."""
    return os.environ.get(REDIS_ENV) or DEFAULT_REDIS_URL


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require(available: bool, what: str) -> None:
    """Skip the calling test when a backend is unavailable; fail it instead under ``CI=true``.

    Raises:
        pytest.fail.Exception: under CI.
        pytest.skip.Exception: otherwise.
    """
    import pytest

    if available:
        return
    message = f"{what} is not reachable (scripts/test starts throwaway servers; {INSTALL_HINT})"
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


# -- probes ------------------------------------------------------------------------------


def _run(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a loop of its own, in a thread of its own: these helpers
    are called from fixtures that may run inside a test's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro())).result()


def postgres_answers(dsn: str, timeout: float = 5.0) -> bool:
    """True when a PostgreSQL server accepts a login at ``dsn``."""

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        await conn.close()
        return True

    return _run(probe)


def redis_answers(url: str, timeout: float = 5.0) -> bool:
    """True when a Redis server at ``url`` answers PING with PONG."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout
        ) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- per-session databases -----------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def create_database(server_dsn: str) -> str:
    """Create an empty database ``blindpost_test_<random>`` and return its DSN."""
    name = "blindpost_test_" + secrets.token_hex(6)

    async def create() -> None:
        conn = await asyncpg.connect(server_dsn, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    _run(create)
    return with_database(server_dsn, name)


def drop_database(server_dsn: str, database_dsn: str) -> None:
    """Drop a database made by ``create_database`` (closing any session still on it)."""
    name = urlsplit(database_dsn).path.lstrip("/")
    assert name.startswith("blindpost_test_"), name

    async def drop() -> None:
        conn = await asyncpg.connect(server_dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    _run(drop)


# -- throwaway servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` account then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise MissingServer("running as root needs runuser (util-linux) to start PostgreSQL")
    return [runuser, "-u", "postgres", "--"]


def _wait(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer within {START_TIMEOUT:.0f} s")


def start_postgres(workdir: Path, port: int | None = None, bindir: Path = POSTGRES_BIN) -> str:
    """Start a throwaway PostgreSQL under ``workdir`` on a free loopback port.

    Returns:
        Its DSN (user ``postgres``, trust authentication, database ``postgres``).

    Raises:
        MissingServer: initdb/pg_ctl are not installed under ``bindir``.
    """
    initdb, pg_ctl = bindir / "initdb", bindir / "pg_ctl"
    if not (initdb.exists() and pg_ctl.exists()):
        raise MissingServer(f"PostgreSQL server binaries not found in {bindir}: {INSTALL_HINT}")
    prefix = _as_postgres_user()
    # The data directory lives in its own temporary directory (the server's account must be
    # able to reach it, which a root-only test directory would not allow); ``workdir`` records
    # where, for ``stop_postgres``.
    data = Path(tempfile.mkdtemp(prefix="blindpost-test-pg-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "postgres-data").write_text(str(data))
    if prefix:
        shutil.chown(data, "postgres")
    port = port or free_port()
    subprocess.run(
        [*prefix, str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # In the configuration file, so a restart (postgres_ctl) keeps the port and address.
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{data}'\n"
        )
    postgres_ctl(workdir, "start", bindir)
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    _wait(lambda: postgres_answers(dsn, 2), "the throwaway PostgreSQL")
    return dsn


def postgres_ctl(workdir: Path, action: str, bindir: Path = POSTGRES_BIN) -> None:
    """``pg_ctl stop`` (fast) or ``start`` a server made by ``start_postgres``, keeping its data
    and port (tests of a database that goes away and comes back)."""
    data = Path((workdir / "postgres-data").read_text())
    args = ["-m", "fast", "stop"] if action == "stop" else ["-w", "start"]
    if action == "start":
        args = ["-l", str(data / "server.log"), *args]
    subprocess.run(
        [*_as_postgres_user(), str(bindir / "pg_ctl"), "-D", str(data), *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def stop_postgres(workdir: Path, bindir: Path = POSTGRES_BIN) -> None:
    """Stop a server started by ``start_postgres`` (fast shutdown: it is throwaway)."""
    record = workdir / "postgres-data"
    if not record.exists():
        return
    data = Path(record.read_text())
    if (data / "postmaster.pid").exists():
        subprocess.run(
            [*_as_postgres_user(), str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
        )
    shutil.rmtree(data, ignore_errors=True)
    record.unlink()


def start_redis(workdir: Path, port: int | None = None) -> str:
    """Start a throwaway Redis (no persistence) under ``workdir`` on a free loopback port.

    Raises:
        MissingServer: redis-server is not on PATH.
    """
    server = shutil.which("redis-server")
    if server is None:
        raise MissingServer(f"redis-server not found on PATH: {INSTALL_HINT}")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    subprocess.run(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--dir",
            str(workdir),
            "--pidfile",
            str(workdir / "redis.pid"),
            "--logfile",
            str(workdir / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: redis_answers(url, 2), "the throwaway Redis")
    return url


def stop_redis(workdir: Path) -> None:
    """Stop a server started by ``start_redis`` and wait until it is gone."""
    pidfile = workdir / "redis.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().strip())
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def ensure(state: Path) -> list[str]:
    """Start a throwaway server for each backend that does not answer.

    Returns:
        ``export NAME=value`` lines for the servers started (none if both answer).

    Raises:
        MissingServer: a backend does not answer and its binaries are missing.
    """
    exports = []
    if not postgres_answers(postgres_dsn()):
        dsn = start_postgres(state / "pg")
        exports.append(f"export {POSTGRES_ENV}={dsn}")
    if not redis_answers(redis_url()):
        url = start_redis(state / "redis")
        exports.append(f"export {REDIS_ENV}={url}")
    return exports


def stop(state: Path) -> None:
    """Stop whatever ``ensure`` started under ``state``."""
    stop_postgres(state / "pg")
    stop_redis(state / "redis")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in {"ensure", "stop"}:
        print("usage: backend_servers.py ensure|stop STATE_DIR", file=sys.stderr)
        return 2
    state = Path(argv[1])
    if argv[0] == "stop":
        stop(state)
        return 0
    try:
        lines = ensure(state)
    except MissingServer as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
        print(f"started a throwaway server: {line.split('=', 1)[0][7:]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
