"""`blindpost search` (prefix matching, newest first, paging) and `history --before/--after`."""

from __future__ import annotations

from typing import Any

import pytest
from cli_harness import Cli, Relay

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def chat(cli: Cli, relay: Relay) -> list[str]:
    """Five messages from sara to tom, received by tom; their ids in order."""
    cli.many(
        ("sara", "init", "sara", "--relay", relay.url),
        ("tom", "init", "tom", "--relay", relay.url),
    )
    texts = [
        "the history of rome",
        "nothing to see",
        "historians agree",
        "a histogram, please",
        "Histo-logy is HISTORY too",
    ]
    ids = [cli("sara", "send", "tom", text).last_word for text in texts]
    received = cli("tom", "receive", "--json").of_type("message")
    assert [m["id"] for m in received] == ids
    return ids


def test_search_matches_word_prefixes_newest_first(cli: Cli, chat: list[str]) -> None:
    hits = cli("tom", "search", "histo", "--json").records
    assert [h["id"] for h in hits] == [chat[4], chat[3], chat[2], chat[0]]
    assert all(h["type"] == "message" for h in hits)
    # Every word must start a word of the message.
    assert [h["id"] for h in cli("tom", "search", "hist rom", "--json").records] == [chat[0]]
    # Human output ends each line with the id; a miss says so.
    human = cli("tom", "search", "histo").stdout.splitlines()
    assert [line.split()[-1] for line in human] == [chat[4], chat[3], chat[2], chat[0]]
    assert "no messages match 'zebra'" in cli("tom", "search", "zebra").stdout
    assert cli("tom", "search", "zebra", "--json").stdout == ""


def test_search_pages_with_limit_and_before(cli: Cli, chat: list[str], one_line_error: Any) -> None:
    first = [h["id"] for h in cli("tom", "search", "histo", "--limit", "2", "--json").records]
    assert first == [chat[4], chat[3]]
    after = cli("tom", "search", "histo", "--limit", "2", "--before", first[-1], "--json")
    assert [h["id"] for h in after.records] == [chat[2], chat[0]]
    last = cli("tom", "search", "histo", "--limit", "2", "--before", chat[0], "--json")
    assert last.records == []
    # Restricted to a chat: sara's side finds the same messages (sent by her).
    mine = cli("sara", "search", "histo", "--user", "tom", "--json").records
    assert [(h["id"], h["outgoing"]) for h in mine][:1] == [(chat[4], True)]
    assert cli("sara", "search", "histo", "--user", "nobody", "--json").records == []
    one_line_error(cli("tom", "search", "histo", "--before", "f" * 32, ok=False), 5)
    one_line_error(cli("tom", "search", "histo", "--before", "nothex", ok=False), 2)
    one_line_error(cli("tom", "search", "  ", ok=False), 2)
    one_line_error(cli("tom", "search", "histo", "--limit", "0", ok=False), 2)


def test_history_pages_before_and_after(cli: Cli, chat: list[str], one_line_error: Any) -> None:
    def page(*args: str) -> list[str]:
        return [m["id"] for m in cli("tom", "history", "sara", "--json", *args).records]

    assert page() == chat
    assert page("--limit", "2") == chat[3:]
    assert page("--limit", "2", "--before", chat[3]) == chat[1:3]
    assert page("--limit", "2", "--before", chat[1]) == chat[:1]
    assert page("--limit", "2", "--after", chat[0]) == chat[1:3]
    assert page("--after", chat[4]) == []
    one_line_error(cli("tom", "history", "sara", "--before", "0" * 32, ok=False), 5)
    both = cli("tom", "history", "sara", "--before", chat[1], "--after", chat[0], ok=False)
    one_line_error(both, 2)
