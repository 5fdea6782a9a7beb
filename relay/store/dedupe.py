# Invariants:
# * What the relay keeps of a message after every recipient acknowledged it is one de-duplication
#   record: a keyed BLAKE2b digest of (sender user, sender device, message id), the message's
#   recipient count and a coarse expiry bucket. No username, device id, message id or exact
#   time; the record lives until its bucket has passed (``dedupe_window_ms`` after the message
#   was first stored, rounded up to a bucket), then the sweeper deletes it.
# * The digest key is one random secret per database (each backend keeps it in a table of its
#   own, created by the first process that opens the database, never rotated); digests made by
#   every process and node sharing the database therefore agree.
# * Every backend computes digests, buckets and the answer to a late retry here, so they agree.
"""De-duplication records of delivered messages: digests, expiry buckets (docs/storage.md)."""

from __future__ import annotations

import hashlib
import os

from relay.store.base import Address, SendReceipt

__all__ = ["DIGEST_LEN", "SECRET_LEN", "SWEEP_CHUNK", "DedupeRules", "new_secret"]

SECRET_LEN = 32
DIGEST_LEN = 16  # 128 bits: no two live records collide (2^-64 at 2^32 records)
_PERSON = b"bp-relay-dedupe"
# A record's expiry is rounded up to a bucket of this fraction of the window: the record says
# when it expires only to within a bucket, and the sweeper deletes a whole bucket at once.
_BUCKETS_PER_WINDOW = 10
_MIN_BUCKET_MS = 1000
# Records one sweep call deletes at most. A whole bucket falls due at once (at 3,000 msg/s the
# default window's 30 s bucket is 90,000 records); deleted in one go, or in a few large
# transactions, they held every write behind them: 5,000 records cost the writer about 40 ms
# per call, 1,000 about 8 ms (docs/performance-relay.md, "Holding steady"). In small calls,
# with the relay's pauses in between (relay.app.sweep_once), regular writes get the writer
# between them.
SWEEP_CHUNK = 1000


def new_secret() -> bytes:
    """A fresh random digest key (``SECRET_LEN`` bytes)."""
    return os.urandom(SECRET_LEN)


class DedupeRules:
    """Digests and buckets for one database's de-duplication records.

    Args:
        secret: the database's digest key (``SECRET_LEN`` bytes).
        window_ms: ``StoreLimits.dedupe_window_ms``: how long after a message was first
            stored a retry of it is still answered as a duplicate.

    Raises:
        ValueError: the secret has the wrong length.
    """

    __slots__ = ("_secret", "bucket_ms", "window_ms")

    def __init__(self, secret: bytes, window_ms: int) -> None:
        if len(secret) != SECRET_LEN:
            raise ValueError(f"the dedupe secret must hold {SECRET_LEN} bytes")
        self._secret = secret
        self.window_ms = max(0, int(window_ms))
        self.bucket_ms = max(_MIN_BUCKET_MS, self.window_ms // _BUCKETS_PER_WINDOW)

    def __repr__(self) -> str:
        return f"DedupeRules(window_ms={self.window_ms}, bucket_ms={self.bucket_ms})"

    def digest(self, sender: Address, message_id: bytes) -> bytes:
        """The record key of ``message_id`` sent by ``sender`` (``DIGEST_LEN`` bytes)."""
        user = sender.user.encode()
        h = hashlib.blake2b(digest_size=DIGEST_LEN, key=self._secret, person=_PERSON)
        # Length-prefixed fields: no two (user, device, id) triples share an input.
        h.update(len(user).to_bytes(2, "big"))
        h.update(user)
        h.update(sender.device.to_bytes(8, "big", signed=True))
        h.update(message_id)
        return h.digest()

    def expires(self, stored_ms: int) -> int:
        """The bucket after which the record of a message stored at ``stored_ms`` is deleted
        (the first bucket starting at or after ``stored_ms + window_ms``)."""
        return -(-(stored_ms + self.window_ms) // self.bucket_ms)

    def current(self, now_ms: int) -> int:
        """The bucket ``now_ms`` falls in: records whose ``expires`` is at most this are due."""
        return now_ms // self.bucket_ms

    def receipt(self, message_id: bytes, recipients: int, expires: int) -> SendReceipt:
        """The answer to a retry of a delivered message, from its record.

        ``stored_at`` is no longer known exactly: it is given as the latest time the record's
        bucket allows (never later than the true one, at most one bucket earlier).
        """
        stored_at = max(0, expires * self.bucket_ms - self.window_ms - self.bucket_ms)
        return SendReceipt(message_id, recipients, stored_at)
