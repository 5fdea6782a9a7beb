"""WebSocket close codes of the relay's ``/v1/ws`` endpoint (docs/relay-api.md section 5).

Invariant: the relay closes with, and the SDK interprets, exactly these numbers; neither
side spells a close code as a literal.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLOSE_BANNED",
    "CLOSE_DEVICE_REMOVED",
    "CLOSE_GOING_AWAY",
    "CLOSE_IDLE",
    "CLOSE_REPLACED",
    "CLOSE_TOO_SLOW",
    "CLOSE_TRY_AGAIN_LATER",
    "CLOSE_UNAUTHENTICATED",
]

#: The relay is shutting down (RFC 6455); reconnect with backoff.
CLOSE_GOING_AWAY: Final = 1001
#: The relay cannot serve the socket now (a node lost Redis); reconnect with backoff.
CLOSE_TRY_AGAIN_LATER: Final = 1013
#: A newer connection of the same device replaced this one; do not reconnect.
CLOSE_REPLACED: Final = 4001
#: The client read too slowly and its outbound buffer stayed full.
CLOSE_TOO_SLOW: Final = 4002
#: The device was removed from its account; do not reconnect.
CLOSE_DEVICE_REMOVED: Final = 4003
#: Nothing was received for the idle timeout.
CLOSE_IDLE: Final = 4004
#: The first-frame authentication failed.
CLOSE_UNAUTHENTICATED: Final = 4401
#: The operator banned the account (``blindpost-relay admin ban``); do not reconnect.
CLOSE_BANNED: Final = 4403
