"""Root test configuration.

Importing e2ee first installs the protobuf shim, so test modules may import
python-axolotl directly (in any import order ruff's isort chooses).

The server fixtures hand tests the real PostgreSQL and Redis (tests/backend_servers.py): a
test that needs one is skipped when it does not answer, and fails instead under ``CI=true``.
"""

from collections.abc import Iterator

import backend_servers
import pytest

import e2ee  # noqa: F401


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The DSN of the PostgreSQL server (its default database)."""
    dsn = backend_servers.postgres_dsn()
    backend_servers.require(backend_servers.postgres_answers(dsn), "PostgreSQL")
    return dsn


@pytest.fixture(scope="session")
def postgres_test_dsn(postgres_server: str) -> Iterator[str]:
    """The DSN of an empty database made for this test session (dropped at its end)."""
    dsn = backend_servers.create_database(postgres_server)
    backend_servers.SESSION_DATABASE = dsn
    yield dsn
    backend_servers.SESSION_DATABASE = None
    backend_servers.drop_database(postgres_server, dsn)


@pytest.fixture
def postgres_database(postgres_server: str) -> Iterator[str]:
    """The DSN of an empty database of this test's own (for relay processes; dropped after)."""
    dsn = backend_servers.create_database(postgres_server)
    yield dsn
    backend_servers.drop_database(postgres_server, dsn)


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The URL of the Redis server."""
    url = backend_servers.redis_url()
    backend_servers.require(backend_servers.redis_answers(url), "Redis")
    return url
