"""`blindpost init` against relays in each registration mode (issue 13 item 6).

The default mode (pow) is covered by every other CLI test: `init` there solves the relay's
proof of work without the user doing anything. Here: invite-only and closed relays, with
codes made by the operator's real `blindpost-relay invite create`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cli, Relay

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def invite_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    server = Relay(tmp_path_factory.mktemp("invite-relay"), {"registration": "invite"})
    server.start()
    yield server
    server.stop()


def make_invite(relay: Relay) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "relay", "invite", "create", "--data", str(relay.data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return res.stdout.strip()


def test_invite_only_relay(cli: Cli, invite_relay: Relay, one_line_error: Any) -> None:
    url = invite_relay.url
    missing = cli("dora", "init", "dora", "--relay", url, ok=False)
    one_line_error(missing, 9)
    assert "by invitation only" in missing.stderr and "--invite CODE" in missing.stderr
    wrong = cli("dora", "init", "dora", "--relay", url, "--invite", "no-such-code", ok=False)
    one_line_error(wrong, 9)
    assert "refused the invite code" in wrong.stderr
    code = make_invite(invite_relay)
    done = cli("dora", "init", "dora", "--relay", url, "--invite", code)
    assert done.stdout.startswith("registered dora (device 1)")
    again = cli("eve", "init", "eve", "--relay", url, "--invite", code, ok=False)
    one_line_error(again, 9)
    assert "already used" in again.stderr


def test_closed_relay(
    cli: Cli, tmp_path_factory: pytest.TempPathFactory, one_line_error: Any
) -> None:
    server = Relay(tmp_path_factory.mktemp("closed-relay"), {"registration": "closed"})
    server.start()
    try:
        res = cli("fred", "init", "fred", "--relay", server.url, ok=False)
    finally:
        server.stop()
    one_line_error(res, 9)
    assert "registration is closed" in res.stderr
