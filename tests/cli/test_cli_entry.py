"""`blindpost` in-process: no arguments opens the TUI, the parser, the data directory."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from tui_client import cli


def test_no_arguments_opens_the_tui_with_the_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    opened: list[Path | None] = []
    fake = types.ModuleType("tui_client.app")

    def run(data_dir: Path | None) -> int:
        opened.append(data_dir)
        return 0

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tui_client.app", fake)
    assert cli.main([]) == 0
    assert cli.main(["--data", str(tmp_path)]) == 0
    assert opened == [cli.default_data_dir(), tmp_path]


def test_without_the_tui_no_arguments_is_a_clear_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tui_client.app", None)  # import fails
    assert cli.main([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("blindpost: error: the terminal UI is not available")


def test_default_data_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.default_data_dir({"BLINDPOST_DATA": "/x/y"}) == Path("/x/y")
    assert cli.default_data_dir({"XDG_DATA_HOME": "/d"}) == Path("/d/blindpost")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.default_data_dir({}) == tmp_path / ".local/share/blindpost"


def test_options_work_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--json", "--data", "d", "history", "bob"])
    after = parser.parse_args(["history", "bob", "--json", "--data", "d"])
    for args in (before, after):
        assert args.json is True and args.data == Path("d") and args.user == "bob"


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["send"]) == 2
    assert cli.main(["group", "create", "name-only"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("blindpost: error: ") for line in err)


def test_peer_text_cannot_steer_the_terminal() -> None:
    from tui_client.cli.output import clean, json_line

    hostile = "hi\x1b]0;pwned\x07\u202eexe.txt\x9b2J"
    shown = clean(hostile)
    assert "\x1b" not in shown and "\u202e" not in shown and "\x9b" not in shown
    line = json_line({"text": hostile})
    assert "\x1b" not in line and "\u202e" not in line and "\x9b" not in line
    import json

    assert json.loads(line)["text"] == hostile


def test_argument_errors_exit_2_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = str(tmp_path / "nowhere")
    assert cli.main(["--data", nowhere, "history", "bob"]) == 2  # no account there
    assert "init USERNAME" in capsys.readouterr().err
    assert cli.main(["--data", nowhere, "init", "Not A Name", "--relay", "http://x"]) == 2
    assert cli.main(["--data", nowhere, "init", "carol", "--relay", "ftp://x"]) == 2
    assert cli.main(["--data", nowhere, "send", "bob"]) == 2  # no text
    assert cli.main(["--data", nowhere, "send", "--group", "xyz", "hi"]) == 2
    assert cli.main(["--data", nowhere, "read", "bob", "--group", "ab" * 12]) == 2
    assert cli.main(["--data", nowhere, "frobnicate"]) == 2
    assert not (tmp_path / "nowhere").exists()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(line.startswith("blindpost: error: ") for line in err)


def test_offline_commands_load_no_network_stack() -> None:
    """R12: aiohttp, the transport adapters and sqlite-utils load only when needed."""
    import subprocess

    heavy = ("aiohttp", "e2ee.transport.http", "e2ee.transport.ws", "sqlite_utils", "segno")
    probe = (
        "import sys\n"
        "import tui_client.cli\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
