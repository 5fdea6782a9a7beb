"""The relay transport: pure request builders and frame codecs, plus the aiohttp adapters.

Invariants:

* :mod:`~e2ee.transport.auth`, :mod:`~e2ee.transport.frames`,
  :mod:`~e2ee.transport.requests` and :mod:`~e2ee.transport.errors` are pure (no I/O,
  no aiohttp); only :mod:`~e2ee.transport.http` and :mod:`~e2ee.transport.ws` touch
  the network or the disk.
* This package implements the client side of docs/relay-api.md itself and never imports
  ``relay`` (an import-linter contract).
* Every failure is an :class:`e2ee.errors.TransportError` subclass (relay or connection at
  fault) or an :class:`e2ee.errors.UsageError` (bad argument, nothing sent).
"""

from e2ee.transport.auth import DeviceSigner, canonical_string, new_nonce
from e2ee.transport.errors import (
    AuthFailed,
    BlobDigestMismatch,
    ConnectionClosed,
    ConnectionFailed,
    ConnectionLost,
    DeviceRemoved,
    InvalidRequest,
    MailboxFull,
    MalformedFrame,
    MalformedResponse,
    MismatchedDevices,
    NotConnected,
    NotFound,
    RangeNotSatisfiable,
    RateLimited,
    RelayRejected,
    RelayTimeout,
    Replaced,
    TooLarge,
    UsernameTaken,
)
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

__all__ = [
    "Acked",
    "AuthFailed",
    "BlobDigestMismatch",
    "ConnectionClosed",
    "ConnectionFailed",
    "ConnectionLost",
    "Delivery",
    "DeviceRemoved",
    "DeviceSigner",
    "Hint",
    "InvalidRequest",
    "MailboxFull",
    "MalformedFrame",
    "MalformedResponse",
    "MismatchedDevices",
    "NotConnected",
    "NotFound",
    "QueueEmpty",
    "RangeNotSatisfiable",
    "RateLimited",
    "RelayRejected",
    "RelayTimeout",
    "Replaced",
    "SendResult",
    "ServerError",
    "TooLarge",
    "UsernameTaken",
    "canonical_string",
    "decode_control",
    "decode_deliver",
    "decode_server_frame",
    "encode_ack",
    "encode_send",
    "new_nonce",
]
