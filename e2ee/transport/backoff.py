"""Exponential backoff with full jitter: the SDK's one retry-delay rule (pure).

Invariants:

* ``delay(attempt)`` is uniform in ``[0, min(cap, base * 2 ** (attempt - 1)))``; the
  randomness is injected, so tests run the policy without waiting.
* Used by the WebSocket's own reconnects (:mod:`e2ee.transport.ws`), the client's
  connection loop (:mod:`e2ee.client.connection`) and the rounds over several relay
  URLs (:mod:`e2ee.transport.failover`).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable

from e2ee.errors import UsageError

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with full jitter (pure).

    Args:
        base: seconds; the first delay is uniform in ``[0, base)``.
        cap: upper bound of the pre-jitter delay.
        random: returns a float in ``[0, 1)``.

    Raises:
        UsageError: non-positive base or cap below base.
    """

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, random: Callable[[], float] = _random.random
    ) -> None:
        if base <= 0 or cap < base:
            raise UsageError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._random = random

    def ceiling(self, attempt: int) -> float:
        """The pre-jitter delay for ``attempt`` (1-based): ``min(cap, base * 2**(attempt-1))``."""
        exponent = min(max(attempt, 1) - 1, 62)  # no float overflow on absurd counts
        return min(self.cap, self.base * (2.0**exponent))

    def delay(self, attempt: int) -> float:
        """A jittered delay for ``attempt``: uniform in ``[0, ceiling(attempt))``."""
        return self._random() * self.ceiling(attempt)
