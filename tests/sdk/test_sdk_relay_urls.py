"""The relay URLs an account keeps: several for a relay of several nodes, and data directories
from before (one ``sdk.relay_url``) still open with that one URL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from e2ee.client import DB_FILE, Client
from e2ee.client.datadir import starting_at
from e2ee.errors import UsageError
from e2ee.store.sealing import KdfLimits

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
A, B, C = "http://a.test:8080", "http://b.test:8080", "http://c.test:8080"


async def test_several_urls_are_kept_in_order_and_can_be_replaced(tmp_path: Path) -> None:
    client = await Client.create(tmp_path / "acct", "alice", [A, B + "/"], kdf_limits=FAST_KDF)
    assert client.relay_urls == (A, B) and client.relay_url == A
    await client.close()
    client = await Client.open(tmp_path / "acct")
    assert client.relay_urls == (A, B)
    await client.set_relay_urls([C, A])
    await client.close()
    client = await Client.open(tmp_path / "acct")
    assert client.relay_urls == (C, A) and client.relay_url == C
    with pytest.raises(UsageError):
        await client.set_relay_urls([])
    await client.close()


async def test_a_bad_url_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await Client.create(
            tmp_path / "acct", "alice", [A, "http://b.test/path"], kdf_limits=FAST_KDF
        )
    assert not (tmp_path / "acct" / DB_FILE).exists()


@pytest.mark.parametrize("device_id", [0, 128, True])
async def test_a_device_id_the_relay_would_refuse_creates_nothing(
    tmp_path: Path, device_id: int
) -> None:
    with pytest.raises(UsageError, match="device id"):
        await Client.create(tmp_path / "acct", "alice", A, device_id=device_id, kdf_limits=FAST_KDF)
    assert not (tmp_path / "acct" / DB_FILE).exists()


async def test_a_data_directory_with_one_relay_url_opens_with_that_url(tmp_path: Path) -> None:
    client = await Client.create(tmp_path / "acct", "alice", A, kdf_limits=FAST_KDF)
    await client.close()
    # What a data directory written before several URLs were kept holds: only sdk.relay_url.
    with sqlite3.connect(tmp_path / "acct" / DB_FILE) as db:
        db.execute("DELETE FROM meta WHERE key = 'sdk.relay_urls'")
        assert db.execute("SELECT value FROM meta WHERE key = 'sdk.relay_url'").fetchone() == (A,)
    client = await Client.open(tmp_path / "acct")
    assert client.relay_urls == (A,) and client.relay_url == A
    await client.close()


def test_the_next_open_starts_where_the_last_run_ended_in_round_robin_order() -> None:
    assert starting_at((A, B, C), B) == (B, C, A)
    assert starting_at((A, B, C), None) == (A, B, C)
    assert starting_at((A, B), C) == (A, B)  # a URL no longer listed: the list's own order
