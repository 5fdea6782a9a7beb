# Invariants: a bucket never holds more than ``burst`` tokens; memory is bounded by
# ``max_keys`` (idle, full buckets are the first forgotten, which loses nothing since a full
# bucket is the state of an unknown key). Time is passed in, never read here. Every limiter
# the handlers use is a ``Limiter``, so another backend (shared between processes or nodes)
# can replace the in-memory one without touching a handler. ``Limiters`` is the one place that
# picks the backend: Redis (``RedisLimiter``, cluster-wide) when ``redis_url`` is set, else
# in memory.
"""Keyed token-bucket rate limiting with Retry-After computation."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from relay.errors import RateLimited

if TYPE_CHECKING:
    from relay.config import RelayConfig

__all__ = ["Limiter", "Limiters", "RateLimiter", "make_limiter"]


class Limiter(Protocol):
    """A keyed rate limit (token buckets, or anything that behaves like them)."""

    async def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """Consume ``cost`` tokens for ``key`` at monotonic ``now``.

        Raises:
            RateLimited: not enough tokens (``retry_after``: whole seconds until there are).
        """


class RateLimiter:
    """In-memory token buckets keyed by strings (or, for ``take_now``, any hashable).

    Implements ``Limiter``. Callers keep ``cost`` <= ``burst`` (a larger cost never fits).

    Args:
        rate: tokens refilled per second (0 disables the limiter).
        burst: bucket capacity.
        max_keys: bound on tracked keys.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self._rate}, burst={self._burst})"

    async def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """See ``Limiter.take``.

        Raises:
            RateLimited: not enough tokens; ``retry_after`` says when enough will be there.
        """
        self.take_now(key, now, cost)

    def take_now(self, key: Hashable, now: float, cost: float = 1.0) -> None:
        """``take`` without a coroutine, for synchronous hot paths (WebSocket frames).

        Raises:
            RateLimited: not enough tokens; ``retry_after`` says when enough will be there.
        """
        if self._rate <= 0:
            return
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            wait = (cost - tokens) / self._rate
            raise RateLimited(max(1, math.ceil(wait)))
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - cost, now)

    def _prune(self, now: float) -> None:
        full_after = self._burst / self._rate
        stale = [k for k, (_, at) in self._buckets.items() if now - at >= full_after]
        for k in stale:
            del self._buckets[k]
        if len(self._buckets) >= self._max_keys:
            # Still full of active keys: forget the oldest half (they get a fresh burst).
            for k in list(self._buckets)[: self._max_keys // 2]:
                del self._buckets[k]


class Limiters:
    """Makes the relay's ``Limiter`` instances on one backend (and closes it).

    Args:
        config: settings; with ``redis_url`` every limiter is a ``RedisLimiter`` on one shared
            Redis client (keys under ``redis_prefix``), so every node takes from the same
            buckets; else each is an in-memory ``RateLimiter``.
    """

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._redis: Any = None
        if config.redis_url:
            from relay.nodes.state import connect

            self._redis = connect(config.redis_url, config.redis_timeout_seconds)

    def limiter(self, name: str, rate: float, burst: float) -> Limiter:
        """A limiter named ``name`` (part of its Redis keys) of ``rate``/s and ``burst``."""
        if self._redis is None:
            return RateLimiter(rate, burst)
        from relay.nodes.state import RedisLimiter

        cfg = self._config
        return RedisLimiter(
            self._redis,
            cfg.redis_prefix,
            name,
            rate,
            burst,
            retry_after=cfg.redis_retry_after_seconds,
        )

    async def close(self) -> None:
        """Close the Redis client, if any."""
        if self._redis is not None:
            await self._redis.aclose()


def make_limiter(config: RelayConfig) -> Limiters:
    """The ``Limiters`` of ``config`` (see there)."""
    return Limiters(config)
