"""The entry point the ``blindpost`` CLI calls: ``tui_client.app.run(data_dir) -> int``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from tui_harness import until

from tui_client import app as tui_app
from tui_client.adapter import Opener, default_data_dir


def test_run_has_the_signature_the_cli_calls() -> None:
    signature = inspect.signature(tui_app.run)
    assert list(signature.parameters) == ["data_dir"]
    assert signature.return_annotation in ("int", int)


def test_default_data_dir_follows_the_cli_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLINDPOST_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("BLINDPOST_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "blindpost"


async def test_an_unreadable_account_exits_with_status_1(tmp_path: Path) -> None:
    # A data directory whose database is not a database: the app reports and exits 1.
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "blindpost.db").write_bytes(b"this is not sqlite" * 100)
    app = tui_app.BlindpostApp(Opener(folder))
    async with app.run_test() as pilot:
        await until(pilot, lambda: app.return_code is not None)
    assert app.return_code == 1
