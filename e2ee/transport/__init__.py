"""The relay transport: pure request builders and frame codecs, plus the aiohttp adapters.

Invariants:

* :mod:`~e2ee.transport.auth`, :mod:`~e2ee.transport.frames`,
  :mod:`~e2ee.transport.requests`, :mod:`~e2ee.transport.errors`,
  :mod:`~e2ee.transport.backoff` and :mod:`~e2ee.transport.failover` are pure (no I/O,
  no aiohttp); only :mod:`~e2ee.transport.http` and :mod:`~e2ee.transport.ws` touch
  the network or the disk.
* Importing the package loads only the pure modules; :mod:`~e2ee.transport.http` and
  :mod:`~e2ee.transport.ws` (and aiohttp) load when one of their names is first used.
* This package implements the client side of docs/relay-api.md itself and never imports
  ``relay`` (an import-linter contract).
* Every failure is an :class:`e2ee.errors.TransportError` subclass (relay or connection at
  fault) or an :class:`e2ee.errors.UsageError` (bad argument, nothing sent).
"""

import importlib
from typing import TYPE_CHECKING, Any, Final

from e2ee.transport.auth import DeviceSigner, canonical_string, new_nonce
from e2ee.transport.backoff import Backoff
from e2ee.transport.errors import (
    AccountBanned,
    AuthFailed,
    BlobDigestMismatch,
    ConnectionClosed,
    ConnectionFailed,
    ConnectionLost,
    DeviceRemoved,
    Forbidden,
    InvalidRequest,
    InviteInvalid,
    InviteRequired,
    MailboxFull,
    MalformedFrame,
    MalformedResponse,
    MismatchedDevices,
    NotConnected,
    NotFound,
    PredecessorMissing,
    RangeNotSatisfiable,
    RateLimited,
    RecoveryRefused,
    RegistrationClosed,
    RegistrationRefused,
    RelayRejected,
    RelayTimeout,
    Replaced,
    SenderShareExceeded,
    TooLarge,
    Unavailable,
    UsernameTaken,
)
from e2ee.transport.failover import MAX_RELAY_URLS, RelayNodes, check_relay_urls, node_failed
from e2ee.transport.frames import (
    Acked,
    Delivery,
    Hint,
    QueueEmpty,
    SendResult,
    ServerError,
    decode_control,
    decode_deliver,
    decode_server_frame,
    encode_ack,
    encode_send,
)
from e2ee.transport.requests import (
    BlobInfo,
    DeviceInfo,
    MessagePage,
    Registered,
    RegistrationInfo,
    Request,
    Response,
    SendReceipt,
)

if TYPE_CHECKING:
    from e2ee.transport.http import ProgressCallback, RelayClient
    from e2ee.transport.ws import ConnectionState, Event, RelayConnection

# The aiohttp adapters load on first use: importing the pure modules (errors, frames,
# requests) must not cost aiohttp's import time (an offline command needs none of it).
_LAZY: Final = {
    "ProgressCallback": "e2ee.transport.http",
    "RelayClient": "e2ee.transport.http",
    "ConnectionState": "e2ee.transport.ws",
    "Event": "e2ee.transport.ws",
    "RelayConnection": "e2ee.transport.ws",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'e2ee.transport' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MAX_RELAY_URLS",
    "AccountBanned",
    "Acked",
    "AuthFailed",
    "Backoff",
    "BlobDigestMismatch",
    "BlobInfo",
    "ConnectionClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionState",
    "Delivery",
    "DeviceInfo",
    "DeviceRemoved",
    "DeviceSigner",
    "Event",
    "Forbidden",
    "Hint",
    "InvalidRequest",
    "InviteInvalid",
    "InviteRequired",
    "MailboxFull",
    "MalformedFrame",
    "MalformedResponse",
    "MessagePage",
    "MismatchedDevices",
    "NotConnected",
    "NotFound",
    "PredecessorMissing",
    "ProgressCallback",
    "QueueEmpty",
    "RangeNotSatisfiable",
    "RateLimited",
    "RecoveryRefused",
    "Registered",
    "RegistrationClosed",
    "RegistrationInfo",
    "RegistrationRefused",
    "RelayClient",
    "RelayConnection",
    "RelayNodes",
    "RelayRejected",
    "RelayTimeout",
    "Replaced",
    "Request",
    "Response",
    "SendReceipt",
    "SendResult",
    "SenderShareExceeded",
    "ServerError",
    "TooLarge",
    "Unavailable",
    "UsernameTaken",
    "canonical_string",
    "check_relay_urls",
    "decode_control",
    "decode_deliver",
    "decode_server_frame",
    "encode_ack",
    "encode_send",
    "new_nonce",
    "node_failed",
]
