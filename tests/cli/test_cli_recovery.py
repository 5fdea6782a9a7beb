"""Account recovery with the recovery key shown at `init`: a real relay, real clients.

alice loses her only device; `recover` on a new one re-claims the name with her recovery key.
Her identity is new, so bob sees a key change and accepts it; then the chat continues both ways,
and the lost device can no longer authenticate. A wrong key is refused, then rate-limited.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from cli_harness import BLINDPOST, RUN_TIMEOUT, Cli, Relay

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def strict_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay that allows two recovery attempts per name (then one per 1000 s)."""
    server = Relay(
        tmp_path_factory.mktemp("recovery-relay"),
        {"recovery_burst": "2", "recovery_rate": "0.001"},
    )
    server.start()
    yield server
    server.stop()


def _key_file(cli: Cli, name: str, key: str) -> str:
    path = cli.home / f"{name}.key"
    path.write_text(key + "\n", encoding="utf-8")
    return str(path)


def test_recovery_key_reclaims_the_name(cli: Cli, relay: Relay, one_line_error: Any) -> None:
    alice, _ = cli.many(
        ("alice", "--json", "init", "alice", "--relay", relay.url),
        ("bob", "init", "bob", "--relay", relay.url),
    )
    (account,) = alice.records
    key = account["recovery_key"]
    assert len(key.split("-")) == 8 and all(len(g) == 4 for g in key.split("-"))
    cli("alice", "send", "bob", "before")
    assert [m["text"] for m in cli("bob", "receive", "--json").of_type("message")] == ["before"]

    # Without the key the name stays taken.
    one_line_error(cli("thief", "init", "alice", "--relay", relay.url, ok=False), 7)
    got = cli(
        "alice-new",
        "--json",
        "recover",
        "alice",
        "--relay",
        relay.url,
        "--recovery-key-file",
        _key_file(cli, "alice", key),
    )
    (recovered,) = got.records
    assert recovered["recovered"] is True and recovered["username"] == "alice"
    assert recovered["recovery_key"] not in (None, key)
    assert recovered["fingerprint"] != account["fingerprint"]

    # The lost device is logged out.
    lost = cli("alice", "send", "bob", "from the lost phone", ok=False)
    one_line_error(lost, 9)

    cli("alice-new", "send", "bob", "new phone, same alice")
    inbox = cli("bob", "receive", "--json")
    (change,) = inbox.of_type("identity_change")
    assert (change["user"], change["first_use"], change["held"]) == ("alice", False, True)
    assert [m["text"] for m in inbox.of_type("message")] == ["new phone, same alice"]
    cli("bob", "trust", "alice")
    cli("bob", "send", "alice", "welcome back")
    texts = [m["text"] for m in cli("alice-new", "receive", "--json").of_type("message")]
    assert texts == ["welcome back"]

    # The first key was replaced by the one `recover` printed.
    again = cli(
        "alice-3",
        "recover",
        "alice",
        "--relay",
        relay.url,
        "--recovery-key-file",
        _key_file(cli, "alice-old", key),
        ok=False,
    )
    one_line_error(again, 9)
    assert not (cli.data("alice-3") / "blindpost.db").exists()


def test_wrong_key_is_refused_then_rate_limited(
    cli: Cli, strict_relay: Relay, one_line_error: Any
) -> None:
    (account,) = cli("carol", "--json", "init", "carol", "--relay", strict_relay.url).records
    real = account["recovery_key"]
    other = cli("dave", "--json", "init", "dave", "--relay", strict_relay.url).records[0]
    wrong = _key_file(cli, "wrong", other["recovery_key"])  # a valid key, but dave's

    # A typo is caught by the key's checksum: nothing reaches the relay.
    typo = real[:-1] + ("A" if real[-1] != "A" else "B")
    result = cli(
        "carol-typo",
        "recover",
        "carol",
        "--relay",
        strict_relay.url,
        "--recovery-key-file",
        _key_file(cli, "typo", typo),
        ok=False,
    )
    one_line_error(result, 2)

    def attempt(key_file: str) -> Any:
        return cli(
            "carol-new",
            "recover",
            "carol",
            "--relay",
            strict_relay.url,
            "--recovery-key-file",
            key_file,
            ok=False,
        )

    for _ in range(2):
        refused = attempt(wrong)
        one_line_error(refused, 9)
        assert "refused the recovery key" in refused.stderr
    limited = attempt(_key_file(cli, "carol", real))  # even the right key waits now
    one_line_error(limited, 9)
    assert "too many recovery attempts" in limited.stderr
    assert not (cli.data("carol-new") / "blindpost.db").exists()
    # carol's own device is untouched.
    cli("carol", "send", "dave", "still here")


def test_recovery_key_from_standard_input_after_rotation(cli: Cli, relay: Relay) -> None:
    (account,) = cli("erin", "--json", "init", "erin", "--relay", relay.url).records
    rotated = cli("erin", "--json", "recovery-key").records[0]["recovery_key"]
    assert rotated != account["recovery_key"]
    argv = [str(BLINDPOST), "--data", str(cli.data("erin-new")), "recover", "erin"]
    done = subprocess.run(
        [*argv, "--relay", relay.url],
        input=rotated.lower().replace("-", " ") + "\n",  # as typed: case and spacing ignored
        capture_output=True,
        text=True,
        env=cli.env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("recovered erin")
