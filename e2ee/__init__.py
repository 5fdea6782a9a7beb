"""Blindpost's client SDK: end-to-end encryption on python-axolotl and PyNaCl.

Importing ``e2ee`` first makes python-axolotl 0.2.3 load on the current protobuf
runtime (fast upb backend) and applies our hardening patches; see
:mod:`e2ee._axolotl_compat` and :mod:`e2ee.core.hardening`.
"""

from e2ee import _axolotl_compat

_axolotl_compat.install()

from e2ee.core import fastpath as _fastpath  # noqa: E402  (needs the compat modules)
from e2ee.core import hardening as _hardening  # noqa: E402

_hardening.apply()
_fastpath.apply()

__all__ = ["Client", "ClientOptions"]


def __getattr__(name: str) -> object:
    # `e2ee.Client` without making `import e2ee` pull in aiohttp and SQLite: the
    # protocol core stays importable on its own.
    if name in ("Client", "ClientOptions"):
        from e2ee import client

        return getattr(client, name)
    raise AttributeError(f"module 'e2ee' has no attribute {name!r}")
