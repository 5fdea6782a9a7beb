"""python-axolotl 0.2.3 on the current protobuf runtime, fast backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import google.protobuf

import e2ee  # noqa: F401


def test_protobuf_runs_on_upb() -> None:
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
    assert int(google.protobuf.__version__.split(".")[0]) >= 5


_BACKEND_VARIABLE = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
_SHOW_BACKEND = (
    "import e2ee, axolotl.sessioncipher\n"
    "from google.protobuf.internal import api_implementation as a\n"
    "print(a.Type())"
)


def _env_without_backend_variable(**extra: str) -> dict[str, str]:
    """The environment of a program that sets nothing about protobuf's backend."""
    env = {k: v for k, v in os.environ.items() if k != _BACKEND_VARIABLE}
    env.update(extra)
    return env


def test_fresh_interpreter_imports_e2ee_on_upb_without_any_backend_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", _SHOW_BACKEND],
        capture_output=True,
        text=True,
        check=True,
        env=_env_without_backend_variable(),
    )
    assert out.stdout.strip() == "upb"


def test_a_backend_forced_to_pure_python_from_outside_is_reported() -> None:
    """e2ee still works there, but the user is told why it is slow."""
    out = subprocess.run(
        [sys.executable, "-c", _SHOW_BACKEND],
        capture_output=True,
        text=True,
        check=True,
        env=_env_without_backend_variable(**{_BACKEND_VARIABLE: "python"}),
    )
    assert out.stdout.strip() == "python"
    assert "RuntimeWarning" in out.stderr and _BACKEND_VARIABLE in out.stderr


def test_bare_python_axolotl_fails_on_current_protobuf() -> None:
    """The reason the shim exists: python-axolotl's own modules do not import."""
    out = subprocess.run(
        [sys.executable, "-c", "import axolotl.state.sessionrecord"],
        capture_output=True,
        text=True,
        env=_env_without_backend_variable(),
    )
    assert out.returncode != 0
    assert "Descriptors cannot be created directly" in out.stderr


def test_python_axolotl_bundled_suite_passes() -> None:
    import axolotl

    suite = Path(axolotl.__file__).parent / "tests"
    # A fresh interpreter that imports e2ee first, exactly as a program would.
    code = (
        "import e2ee, sys, pytest\n"
        f"sys.exit(pytest.main([{str(suite)!r}, '-q', '-p', 'no:cacheprovider']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env_without_backend_variable(),
    )
    assert out.returncode == 0, out.stdout[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_shim_builds_the_message_classes_python_axolotl_expects() -> None:
    from axolotl.protocol import whisperprotos_pb2 as wire
    from axolotl.state import storageprotos_pb2 as storage

    for name in (
        "SessionStructure",
        "RecordStructure",
        "PreKeyRecordStructure",
        "SignedPreKeyRecordStructure",
        "IdentityKeyPairStructure",
        "SenderKeyStateStructure",
        "SenderKeyRecordStructure",
    ):
        assert hasattr(storage, name)
    chain = storage.SessionStructure.Chain()
    chain.chainKey.index = 3
    assert storage.SessionStructure.Chain.FromString(chain.SerializeToString()).chainKey.index == 3
    for name in (
        "WhisperMessage",
        "PreKeyWhisperMessage",
        "KeyExchangeMessage",
        "SenderKeyMessage",
        "SenderKeyDistributionMessage",
    ):
        assert hasattr(wire, name)
