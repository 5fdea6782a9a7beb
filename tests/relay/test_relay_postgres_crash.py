"""Crash safety on PostgreSQL: the SIGKILL test of tests/relay/test_relay_crash.py (20 clients,
10 SIGKILLs at random moments, 5,000 messages answered 200, at least 1,000 on a slow machine)
run against a relay with ``store = postgres``. A 200 must mean committed in PostgreSQL:
nothing answered is lost, nothing acknowledged comes back, every mailbox stays in seq order,
retried ids are stored once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from relay_harness import RelayProcess
from test_relay_crash import (
    test_sigkill_at_random_moments_loses_and_duplicates_nothing as crash_run,
)

pytestmark = pytest.mark.slow


async def test_sigkill_on_postgres_loses_and_duplicates_nothing(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, postgres_database: str
) -> None:
    def on_postgres(settings: dict[str, str] | None, data_dir: Path) -> RelayProcess:
        # The test database has no password: the DSN may go on the command line here.
        pg = {"store": "postgres", "postgres_dsn": postgres_database}
        return relay_factory({**(settings or {}), **pg}, data_dir)

    await crash_run(on_postgres, tmp_path)
