# Invariant: every error the relay reports to a client is a RelayError carrying its HTTP status
# and a stable machine-readable code; the message text never contains bodies or key material.
"""Typed relay errors, each mapped to an HTTP status and a JSON error code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "STORAGE_RETRY_AFTER_SECONDS",
    "AccountQuotaExceeded",
    "AuthError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "MailboxFull",
    "MismatchedDevices",
    "NotFound",
    "PredecessorMissing",
    "RateLimited",
    "RelayError",
    "SenderShareExceeded",
    "StorageError",
    "TooLarge",
    "Unavailable",
]


class RelayError(Exception):
    """Root of every error the relay reports to a client.

    Attributes:
        status: HTTP status code.
        code: stable machine-readable error code (the ``error`` field of the JSON body).
        message: human-readable text (never contains secrets or message bodies).
        extra: additional JSON fields merged into the error body.
    """

    status = 500
    default_code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.extra: dict[str, Any] = dict(extra or {})

    def to_json(self) -> dict[str, Any]:
        """Return the JSON error body ``{"error": code, "message": ..., **extra}``."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        body.update(self.extra)
        return body


class BadRequest(RelayError):
    """The client sent something malformed (400)."""

    status = 400
    default_code = "invalid_request"


class AuthError(RelayError):
    """Missing, stale, replayed or invalid request signature (401)."""

    status = 401
    default_code = "auth_invalid"


class Forbidden(RelayError):
    """Authenticated (or unauthenticated registration) but not allowed (403): registration
    closed, invite or proof of work missing or invalid, account banned."""

    status = 403
    default_code = "forbidden"


class NotFound(RelayError):
    """The named user, device, or blob does not exist (404)."""

    status = 404
    default_code = "not_found"


class Conflict(RelayError):
    """The request conflicts with stored state (409)."""

    status = 409
    default_code = "conflict"


class MismatchedDevices(Conflict):
    """A send named a device list that does not match the recipients' current devices (409)."""

    default_code = "mismatched_devices"

    def __init__(
        self,
        unknown_users: list[str],
        missing: dict[str, list[int]],
        stale: dict[str, list[int]],
        *,
        truncated: bool = False,
    ) -> None:
        self._parts = (list(unknown_users), dict(missing), dict(stale))
        self.users_named = len(set(unknown_users) | set(missing) | set(stale))
        more = {"truncated": True} if truncated else {}
        super().__init__(
            "recipient device list does not match the registered devices",
            extra={
                "unknown_users": sorted(unknown_users),
                "missing_devices": {u: sorted(d) for u, d in sorted(missing.items())},
                "stale_devices": {u: sorted(d) for u, d in sorted(stale.items())},
                **more,
            },
        )

    def limited(self, max_users: int) -> MismatchedDevices:
        """The same answer about the first ``max_users`` users (by name) only, marked
        ``"truncated": true`` when some were left out (the client fixes those and resends)."""
        if self.users_named <= max_users:
            return self
        unknown, missing, stale = self._parts
        keep = set(sorted(set(unknown) | set(missing) | set(stale))[:max_users])
        return MismatchedDevices(
            [u for u in unknown if u in keep],
            {u: d for u, d in missing.items() if u in keep},
            {u: d for u, d in stale.items() if u in keep},
            truncated=True,
        )


class PredecessorMissing(Conflict):
    """A SEND_AFTER named a previous message of the sender that is not stored (409).

    Nothing was stored: the sender pipelined this message behind one the relay refused (or
    has not seen), and sends it again once that one is settled.
    """

    default_code = "predecessor_missing"

    def __init__(self) -> None:
        super().__init__("the previous message named by this send is not stored")


class TooLarge(RelayError):
    """A body, message, or blob exceeds its configured limit (413)."""

    status = 413
    default_code = "too_large"


class RateLimited(RelayError):
    """A rate limit was hit (429); ``retry_after`` is in whole seconds (>= 1)."""

    status = 429
    default_code = "rate_limited"

    def __init__(self, retry_after: int, message: str = "rate limit exceeded") -> None:
        super().__init__(message, extra={"retry_after": retry_after})
        self.retry_after = retry_after


class MailboxFull(RelayError):
    """A recipient mailbox is at its quota; nothing was stored (507)."""

    status = 507
    default_code = "mailbox_full"

    def __init__(self, full: list[tuple[str, int]]) -> None:
        super().__init__(
            "recipient mailbox is full",
            extra={"full": [{"user": u, "device": d} for u, d in full]},
        )


#: Seconds a client is asked to wait (``Retry-After``) after a storage failure.
STORAGE_RETRY_AFTER_SECONDS = 5


class SenderShareExceeded(RelayError):
    """The sender holds its whole share of some recipient mailbox; nothing was stored (507).

    507 like ``mailbox_full`` (a storage quota, freed when the recipient reads, at no time a
    Retry-After could promise), with its own code: other senders still get through.
    """

    status = 507
    default_code = "sender_share_exceeded"

    def __init__(self, over: list[tuple[str, int]]) -> None:
        super().__init__(
            "your share of the recipient mailbox is used up until the recipient reads it",
            extra={"full": [{"user": u, "device": d} for u, d in over]},
        )


class AccountQuotaExceeded(RelayError):
    """The account's stored bytes (pending messages it sent + blobs it holds) would exceed
    ``account_max_bytes``; nothing was stored (507)."""

    status = 507
    default_code = "account_quota_exceeded"

    def __init__(self, limit: int) -> None:
        super().__init__(
            "your account's storage quota is used up until recipients read your messages"
            " or you delete blobs",
            extra={"limit": limit},
        )


class StorageError(RelayError):
    """The store failed (disk full, I/O error, damaged file, closed); the request had no effect
    (503 ``storage_unavailable`` with ``Retry-After``)."""

    status = 503
    default_code = "storage_unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message,
            code=code,
            extra={"retry_after": STORAGE_RETRY_AFTER_SECONDS, **(extra or {})},
        )


class Unavailable(RelayError):
    """A service this request needs (Redis, for a relay node) is unreachable; nothing was done
    (503 with ``retry_after`` in whole seconds, also sent as the Retry-After header)."""

    status = 503
    default_code = "unavailable"

    def __init__(self, retry_after: int, message: str = "temporarily unavailable") -> None:
        super().__init__(message, extra={"retry_after": max(1, retry_after)})
        self.retry_after = max(1, retry_after)
