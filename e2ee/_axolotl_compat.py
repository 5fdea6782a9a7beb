"""Load python-axolotl 0.2.3 on the current protobuf runtime (fast upb backend).

Invariant: this module runs before anything imports ``axolotl``. python-axolotl
ships protoc 2.x generated modules (``*_pb2.py``) that build descriptors by hand,
which protobuf >= 4 forbids ("Descriptors cannot be created directly").  Those
modules also embed the serialized ``FileDescriptorProto`` they were generated
from.  We read that serialized descriptor out of python-axolotl's own source
(parsing it as data with :mod:`ast`, never executing it), register it in the
default descriptor pool and build the message classes with the public
:func:`google.protobuf.message_factory.GetMessageClass`.  The resulting modules
are placed in :data:`sys.modules` under the names python-axolotl imports, so its
code runs unchanged on the upb backend.  No environment variable is set and no
source is copied.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
import warnings
from pathlib import Path

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

__all__ = ["install"]

#: python-axolotl's generated modules, relative to the ``axolotl`` package.
_GENERATED = {
    "axolotl.state.storageprotos_pb2": ("state", "storageprotos_pb2.py"),
    "axolotl.protocol.whisperprotos_pb2": ("protocol", "whisperprotos_pb2.py"),
}


class AxolotlCompatError(ImportError):
    """python-axolotl is missing or its generated modules look unexpected."""


def _serialized_descriptor(source: str, filename: str) -> bytes:
    """Return the ``serialized_pb`` literal of the module's FileDescriptor call."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        if not isinstance(node, ast.keyword) or node.arg != "serialized_pb":
            continue
        value = node.value
        # protoc 2.x wraps the literal in a ``_b('...')`` latin-1 encoder call.
        if isinstance(value, ast.Call) and len(value.args) == 1:
            value = value.args[0]
        literal = ast.literal_eval(value)
        if isinstance(literal, bytes):
            return literal
        if isinstance(literal, str):
            return literal.encode("latin-1")
    raise AxolotlCompatError(f"no serialized descriptor found in {filename}")


def _build_module(name: str, path: Path) -> types.ModuleType:
    serialized = _serialized_descriptor(path.read_text(encoding="utf-8"), str(path))
    pool = descriptor_pool.Default()
    try:
        file_desc = pool.AddSerializedFile(serialized)
    except TypeError:
        # Already registered (e.g. a second interpreter-level install); reuse it.
        file_desc = None
    if file_desc is None or not hasattr(file_desc, "message_types_by_name"):
        from google.protobuf import descriptor_pb2

        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        file_desc = pool.FindFileByName(proto.name)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.DESCRIPTOR = file_desc  # type: ignore[attr-defined]
    for msg_name, msg_desc in file_desc.message_types_by_name.items():
        setattr(module, msg_name, message_factory.GetMessageClass(msg_desc))
    return module


def install() -> None:
    """Register python-axolotl's protobuf modules; idempotent.

    Warns (``RuntimeWarning``) if protobuf runs on its pure-Python backend: that only happens
    when something outside e2ee selected it (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``
    in the environment); e2ee still works there, several times slower.
    """
    if all(name in sys.modules for name in _GENERATED):
        return
    if api_implementation.Type() == "python":
        warnings.warn(
            "protobuf runs on its pure-Python backend (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION is"
            " set to 'python'); e2ee needs no such setting and is several times faster without it",
            RuntimeWarning,
            stacklevel=3,
        )
    spec = importlib.util.find_spec("axolotl")
    if spec is None or not spec.submodule_search_locations:
        raise AxolotlCompatError("python-axolotl is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, (subpackage, filename) in _GENERATED.items():
        if name not in sys.modules:
            sys.modules[name] = _build_module(name, root / subpackage / filename)


# python-axolotl logs through logging.warn() without a handler of its own, which
# lands on stderr via logging.lastResort; a library should stay quiet unless the
# application configures logging.
import logging as _logging  # noqa: E402

_logging.getLogger("axolotl").addHandler(_logging.NullHandler())
