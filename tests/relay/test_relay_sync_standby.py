"""A stopped synchronous standby (docs/self-hosting.md, "PostgreSQL: a primary and a streaming
replica"): a send the relay cannot get confirmed by the standby is answered 503, not 200, even
though PostgreSQL keeps its local commit; the sender's retry with the same message id is stored
once, so the recipient gets the message exactly once; a retry while the standby is still away
is 503 too.

The server is a throwaway PostgreSQL of this test's own (its ``synchronous_standby_names`` is a
server-wide setting, never changed on the shared one) naming a standby that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import backend_servers
import pytest
from redis_support import node_settings
from relay_harness import RelayProcess
from relay_testclient import RelayClient, new_mid, unb64

pytestmark = pytest.mark.usefixtures("postgres_server")  # skipped like every PostgreSQL test


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[str]:
    dsn = backend_servers.start_postgres(tmp_path / "pg")
    try:
        yield dsn
    finally:
        backend_servers.stop_postgres(tmp_path / "pg")


async def _standby(dsn: str, names: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def test_a_send_the_standby_did_not_confirm_is_503_and_its_retry_is_stored_once(
    own_postgres: str, redis_prefix: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # With Redis, as relay nodes run: the request's nonce is recorded there, so the send
    # itself reaches PostgreSQL (with the nonce in PostgreSQL, nothing signed gets that far).
    settings = {**node_settings(own_postgres, redis_prefix), "postgres_timeout_seconds": "1"}
    relay = RelayProcess(tmp_path / "node", settings).start()
    try:
        client = RelayClient(relay.url, session)
        alice, bob = await client.new_device("alice"), await client.new_device("bob")
        await _standby(own_postgres, "no_such_standby")
        mid = new_mid()
        first = await client.send(alice, [bob], b"while the standby is away", mid)
        assert first.status == 503, first.body  # not acknowledged: retry
        # A retry while the standby is still away is not confirmed either: the row is on the
        # primary, but a 200 promises the standby too (the batch locks the recipients' device
        # rows, so its commit waits like any write).
        again = await client.send(alice, [bob], b"while the standby is away", mid)
        assert again.status == 503, again.body
        # The standby comes back: the 503'd send had been committed on the primary.
        await _standby(own_postgres, "")
        page = await client.read(bob)
        assert page.status == 200, page.body
        assert [unb64(m["id"]) for m in page.json()["messages"]] == [mid]
        retry = await client.send(alice, [bob], b"while the standby is away", mid)
        assert retry.status == 200, retry.body
        got = [unb64(m["id"]) for m in (await client.read(bob)).json()["messages"]]
        assert got == [mid]  # once
    finally:
        relay.stop()
