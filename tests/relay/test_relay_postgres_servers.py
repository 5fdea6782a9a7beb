"""The test infrastructure for real servers (tests/backend_servers.py): throwaway PostgreSQL and
Redis started when the configured ones do not answer, missing binaries named with their install
command, and ``CI=true`` turning a skip into a failure."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import backend_servers
import pytest


def test_require_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    backend_servers.require(True, "PostgreSQL")  # available: nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Redis is not reachable"):
        backend_servers.require(False, "Redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: Redis is not reachable"):
        backend_servers.require(False, "Redis")


def test_missing_binaries_name_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(backend_servers.MissingServer, match="apt-get install postgresql"):
        backend_servers.start_postgres(tmp_path / "pg", bindir=tmp_path / "no-such-bin")


@pytest.mark.slow
def test_ensure_starts_throwaway_servers_only_for_what_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both configured servers are on a port nobody listens on: ``ensure`` starts a throwaway
    PostgreSQL and Redis on free ports, prints their export lines, and ``stop`` stops them."""
    dead = backend_servers.free_port()
    monkeypatch.setenv(backend_servers.POSTGRES_ENV, f"postgresql://postgres@127.0.0.1:{dead}/x")
    monkeypatch.setenv(backend_servers.REDIS_ENV, f"redis://127.0.0.1:{dead}/0")
    state = Path(tempfile.mkdtemp(prefix="blindpost-ensure-"))
    script = Path(backend_servers.__file__)
    try:
        out = subprocess.run(
            [sys.executable, str(script), "ensure", str(state)],
            check=True,
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line
        )
        dsn = exports[backend_servers.POSTGRES_ENV]
        url = exports[backend_servers.REDIS_ENV]
        assert backend_servers.postgres_answers(dsn) and backend_servers.redis_answers(url)
        assert f":{dead}" not in dsn + url
    finally:
        subprocess.run([sys.executable, str(script), "stop", str(state)], check=True, timeout=120)
    assert not backend_servers.postgres_answers(dsn, 2)
    assert not backend_servers.redis_answers(url, 2)


def test_ensure_starts_nothing_when_both_servers_answer(
    postgres_server: str, redis_server: str, tmp_path: Path
) -> None:
    assert backend_servers.ensure(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
