# Invariant: a send is held to the same rules whether it arrives as ``PUT /v1/messages`` or as
# a WebSocket SEND frame; the checks both transports share live here.
"""The rules a send obeys on either transport: recipient users, and the 409's lookup charge."""

from __future__ import annotations

from typing import Any

from relay.errors import BadRequest, MismatchedDevices
from relay.state import RelayState
from relay.store.base import Address, Envelope
from relay.wire import b64e

__all__ = ["BINARY_SEND_TYPE", "charge_lookups", "check_recipient_users", "receipt_json"]

BINARY_SEND_TYPE = "application/vnd.blindpost.send"


def receipt_json(message_id: bytes, recipients: int, stored_at: int) -> dict[str, Any]:
    """The 200 body of a send (also the payload of a WebSocket send_result)."""
    return {"id": b64e(message_id), "recipients": recipients, "stored_at": stored_at}


def check_recipient_users(env: Envelope, max_users: int) -> None:
    """Refuse a send naming more than ``max_users`` distinct users.

    Raises:
        BadRequest: ``too_many_recipients``.
    """
    if len({r.user for r in env.recipients}) > max_users:
        raise BadRequest(
            f"a message may name at most {max_users} users", code="too_many_recipients"
        )


async def charge_lookups(
    st: RelayState, caller: Address, exc: MismatchedDevices
) -> MismatchedDevices:
    """Charge a 409's users (unknown, or with a device mismatch) to the caller's lookup budget.

    A 409 tells which names exist and their device ids; the budget bounds how fast anyone
    learns that through sends. An answer about more users than ``lookup_burst`` names only
    that many (``"truncated": true``).

    Returns:
        The 409 to give.

    Raises:
        RateLimited: the budget is spent (no 409 is given).
    """
    answer = exc.limited(max(1, int(st.config.lookup_burst)))
    await st.lookup_limit.take(caller.user, st.clock.monotonic(), answer.users_named)
    return answer
