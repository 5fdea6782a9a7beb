"""`receive` killed mid-way, and a send the relay refuses for good (issue 15).

* A ``receive`` SIGKILLed after printing part of a large backlog printed it all
  again on the next run. It now saves its position after each printed batch:
  the next run re-prints at most that batch (docs/cli.md: at least once, with
  ids to de-duplicate).
* A full recipient mailbox (relay 507) made ``send`` wait for its timeout and
  exit 3; it now fails at once with the relay-refusal status 9 and says so.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import Cli, Relay

from e2ee.client import Client

pytestmark = pytest.mark.timeout(240)

BACKLOG = 450
#: tui_client.cli.CHECKPOINT_EVERY: the most a killed `receive` prints twice.
CHECKPOINT_EVERY = 200


async def _send_many(data: Path, to: str, count: int) -> list[str]:
    client = await Client.open(data)
    async with client:
        ids = [await client.send_text(to, f"n{i:04d}", wait=False) for i in range(count)]
        assert await client.flush(60) == 0
    return ids


def test_a_killed_receive_reprints_at_most_its_last_batch(cli: Cli, relay: Relay) -> None:
    cli.many(
        ("alice", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    sent = asyncio.run(_send_many(cli.data("alice"), "bob", BACKLOG))

    first = cli.start("bob", "receive", "--json")
    assert first.stdout is not None
    printed: list[str] = []
    for line in first.stdout:
        record = json.loads(line)
        if record["type"] == "message":
            printed.append(record["id"])
        if len(printed) == 300:
            first.send_signal(signal.SIGKILL)  # no cleanup, no final save
            break
    first.wait(timeout=30)
    first.stdout.close()
    if first.stderr is not None:
        first.stderr.close()

    again = cli("bob", "receive", "--json")
    second = [r["id"] for r in map(json.loads, again.stdout.splitlines()) if r["type"] == "message"]
    assert set(printed) | set(second) == set(sent)  # everything, at least once
    twice = set(printed) & set(second)
    assert len(twice) <= CHECKPOINT_EVERY  # at most the last unconfirmed batch
    assert len(second) == len(set(second))  # one run never prints a message twice
    # What is printed again is the tail of what the killed run printed, in order.
    assert [m for m in printed if m in twice] == printed[len(printed) - len(twice) :]
    third = cli("bob", "receive", "--json").stdout.splitlines()
    assert [r for r in map(json.loads, third) if r["type"] == "message"] == []


@pytest.fixture
def small_relay(tmp_path: Path) -> Iterator[Relay]:
    server = Relay(tmp_path / "small-relay")
    server.settings["mailbox_max_messages"] = "2"
    server.start()
    yield server
    server.stop()


def test_a_full_mailbox_exits_9_and_says_so(
    cli: Cli, small_relay: Relay, one_line_error: object
) -> None:
    cli.many(
        ("carol", "init", "carol", "--relay", small_relay.url),
        ("dave", "init", "dave", "--relay", small_relay.url),
    )
    cli("carol", "send", "dave", "one")
    cli("carol", "send", "dave", "two")
    refused = cli("carol", "send", "dave", "three", ok=False)
    one_line_error(refused, 9)  # type: ignore[operator]
    assert "mailbox of dave is full" in refused.stderr
