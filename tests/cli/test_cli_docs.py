"""docs/examples/echo_bot.py, as docs/cli.md runs it, against a real relay process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_harness import BLINDPOST, RUN_TIMEOUT, Cli, Relay

pytestmark = pytest.mark.timeout(180)

BOT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "echo_bot.py"
DOC = BOT.parents[1] / "cli.md"


def test_the_documented_echo_bot_answers_a_cli_user(cli: Cli, relay: Relay) -> None:
    assert "examples/echo_bot.py" in DOC.read_text()
    cli.many(
        ("echo", "init", "echo_bot", "--relay", relay.url),
        ("uma", "init", "uma", "--relay", relay.url),
    )
    bot = subprocess.Popen(
        [sys.executable, str(BOT), "--data", str(cli.data("echo")), "--max-messages", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.env | {"PATH": f"{BLINDPOST.parent}:{cli.env.get('PATH', '')}"},
        cwd=cli.home,
    )
    try:
        asked = cli("uma", "send", "echo_bot", "ping, is anyone there?").last_word
        out, err = bot.communicate(timeout=RUN_TIMEOUT)
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.communicate()
    assert bot.returncode == 0, err
    assert err == ""
    (line,) = out.splitlines()
    assert line.startswith("echoed to uma: ")
    reply_id = line.split()[-1]
    (reply,) = cli("uma", "receive", "--json").of_type("message")
    assert (reply["id"], reply["sender"]) == (reply_id, "echo_bot")
    assert (reply["text"], reply["reply_to"]) == ("ping, is anyone there?", asked)
