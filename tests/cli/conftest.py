"""Fixtures for the ``blindpost`` command-line tests.

The installed ``blindpost`` console script runs as a subprocess against a real relay
process (``python -m relay``) on loopback, one relay per test module. Every account
lives in its own data directory under the module's temporary directory, and the
subprocess environment is scrubbed (no ``BLINDPOST_*``, a private ``HOME``), so the
tests never touch a real user's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cli_harness import Cli, Relay, assert_one_line_error


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay per test module."""
    server = Relay(tmp_path_factory.mktemp("cli-relay"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("cli-home"))


@pytest.fixture
def one_line_error() -> Any:
    return assert_one_line_error
