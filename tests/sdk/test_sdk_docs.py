"""docs/sdk.md's quick start runs as written against a real relay process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def _example(name: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"example {name} not found in {DOC}"
    return match.group(1)


def test_quickstart_runs(relay: Any, tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(_example("quickstart"))
    env = {**os.environ, "BLINDPOST_RELAY": relay.url}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].endswith(": hello, bob") and lines[0].startswith("alice_")
    assert " read by bob_" in lines[1]
    assert lines[2] == "['hello, bob']"
