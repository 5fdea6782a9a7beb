# Invariants: a bucket never holds more than ``burst`` tokens; memory is bounded by
# ``max_keys`` (idle, full buckets are the first forgotten, which loses nothing since a full
# bucket is the state of an unknown key). Time is passed in, never read here. Every limiter
# the handlers use is a ``Limiter``, so another backend (shared between processes or nodes)
# can replace the in-memory one without touching a handler. ``Limiters`` is the one place that
# picks the backend: Redis (``RedisLimiter``, cluster-wide) when ``redis_url`` is set, else
# in memory. A ``LeasedLimiter`` never admits more than its shared limiter granted (it spends
# tokens taken from it in leases); ``SendSlots`` never lets a key hold more than its bound.
"""Keyed token-bucket rate limiting with Retry-After computation, and in-flight bounds."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from relay.errors import RateLimited

if TYPE_CHECKING:
    from relay.config import RelayConfig

__all__ = [
    "FrameLimiter",
    "LeasedLimiter",
    "Limiter",
    "Limiters",
    "RateLimiter",
    "SendSlots",
    "make_limiter",
]

# A node takes a shared (Redis) bucket's tokens this many at a time at most, and never more
# than 1/32 of the burst, so the tokens a node holds but has not spent (lost to the other
# nodes, never added to what the account may send) stay a small part of the burst.
_LEASE_MAX = 16
_LEASE_BURST_SHARE = 32
# How long a key refused by the shared bucket is refused locally without asking it again.
_REFUSAL_MEMORY_MAX = 1.0


class Limiter(Protocol):
    """A keyed rate limit (token buckets, or anything that behaves like them)."""

    async def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """Consume ``cost`` tokens for ``key`` at monotonic ``now``.

        Raises:
            RateLimited: not enough tokens (``retry_after``: whole seconds until there are).
        """


class FrameLimiter(Limiter, Protocol):
    """A ``Limiter`` that can also be asked synchronously, once per WebSocket frame."""

    def take_now(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if that needs no I/O.

        Returns:
            True: taken. False: only ``await take(key, now)`` can tell (it does the I/O).

        Raises:
            RateLimited: refused.
        """


class RateLimiter:
    """In-memory token buckets keyed by strings (or, for ``take_now``, any hashable).

    Implements ``Limiter`` and ``FrameLimiter`` (``take_now`` never needs I/O here). Callers
    keep ``cost`` <= ``burst`` (a larger cost never fits).

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

    def take_now(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """``take`` without a coroutine, for synchronous hot paths (WebSocket frames).

        Returns:
            True (the tokens were taken).

        Raises:
            RateLimited: not enough tokens; ``retry_after`` says when enough will be there.
        """
        if self._rate <= 0:
            return True
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            wait = (cost - tokens) / self._rate
            raise RateLimited(max(1, math.ceil(wait)))
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - cost, now)
        return True

    def _prune(self, now: float) -> None:
        full_after = self._burst / self._rate
        stale = [k for k, (_, at) in self._buckets.items() if now - at >= full_after]
        for k in stale:
            del self._buckets[k]
        if len(self._buckets) >= self._max_keys:
            # Still full of active keys: forget the oldest half (they get a fresh burst).
            for k in list(self._buckets)[: self._max_keys // 2]:
                del self._buckets[k]


class LeasedLimiter:
    """A ``FrameLimiter`` over a shared ``Limiter`` (Redis) that asks it once per lease.

    Tokens are taken from the shared bucket ``lease`` at a time (one at a time when fewer are
    left) and spent locally, so most takes need no round trip and the shared bucket still
    bounds every node together: all nodes never admit more than it granted. What a node
    leased but did not spend is lost to the others (at most ``lease - 1`` per node and key, a
    slightly early refusal, never an excess). A key the shared bucket refused is refused
    locally until its Retry-After (at most one second) has passed, so a flood of refused
    sends costs no round trip each. Concurrent takes of one key wait for one lease rather than
    each taking one.

    Args:
        shared: the cluster-wide limiter.
        burst: its burst (the lease is at most 1/32 of it, and at most 16).
        max_keys: bound on keys with leased tokens or a remembered refusal.
    """

    def __init__(self, shared: Limiter, burst: float, max_keys: int = 100_000) -> None:
        self._shared = shared
        self._lease = max(1, min(_LEASE_MAX, int(burst // _LEASE_BURST_SHARE)))
        self._max_keys = max_keys
        self._tokens: dict[str, int] = {}
        self._refused: dict[str, tuple[float, int]] = {}  # key -> (until, retry_after)
        self._refilling: dict[str, asyncio.Future[None]] = {}  # keys whose lease is being taken

    def __repr__(self) -> str:
        return f"LeasedLimiter({self._shared!r}, lease={self._lease})"

    def take_now(self, key: str, now: float) -> bool:
        """See ``FrameLimiter.take_now``: True when a leased token was left.

        Raises:
            RateLimited: the shared bucket refused this key less than its Retry-After ago.
        """
        left = self._tokens.get(key, 0)
        if left > 0:
            if left == 1:
                del self._tokens[key]
            else:
                self._tokens[key] = left - 1
            return True
        refused = self._refused.get(key)
        if refused is not None:
            if now < refused[0]:
                raise RateLimited(refused[1])
            del self._refused[key]
        return False

    async def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """Take one token (``cost`` is ignored: sends cost one): a leased one, else a new
        lease from the shared limiter.

        Raises:
            RateLimited: the shared bucket has no token for ``key``.
            relay.errors.Unavailable: the shared limiter cannot be reached.
        """
        while not self.take_now(key, now):
            pending = self._refilling.get(key)
            if pending is None:
                break
            await pending  # one lease per key at a time: then try its tokens
        else:
            return
        done = asyncio.get_running_loop().create_future()
        self._refilling[key] = done
        try:
            await self._lease_from_shared(key, now)
        finally:
            del self._refilling[key]
            done.set_result(None)

    async def _lease_from_shared(self, key: str, now: float) -> None:
        got = self._lease
        try:
            await self._shared.take(key, now, got)
        except RateLimited as exc:
            if got == 1:
                self._refuse(key, now, exc.retry_after)
            got = 1  # fewer than a lease left: the last tokens, one at a time
            try:
                await self._shared.take(key, now, 1)
            except RateLimited as last:
                self._refuse(key, now, last.retry_after)
        if got > 1:
            if len(self._tokens) >= self._max_keys:
                self._tokens.clear()  # leased tokens forgotten: early refusals, never excess
            self._tokens[key] = self._tokens.get(key, 0) + got - 1

    def _refuse(self, key: str, now: float, retry_after: int) -> NoReturn:
        if len(self._refused) >= self._max_keys:
            self._refused.clear()
        self._refused[key] = (now + min(float(retry_after), _REFUSAL_MEMORY_MAX), retry_after)
        raise RateLimited(retry_after)


class SendSlots:
    """Bounds what one key (an account) has in flight at once (sends awaiting their commit).

    Node-local: the write path it shares fairly is the node's own (its group-commit queue).

    Args:
        per_key: the bound (``account_max_inflight_sends``).
    """

    def __init__(self, per_key: int) -> None:
        self._per_key = per_key
        self._held: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        """Take one slot for ``key``; give it back with ``release``.

        Raises:
            RateLimited: ``key`` already holds ``per_key`` slots (429, Retry-After 1).
        """
        held = self._held.get(key, 0)
        if held >= self._per_key:
            raise RateLimited(1, "too many sends of this account awaiting their commit")
        self._held[key] = held + 1

    def release(self, key: str) -> None:
        """Give back a slot taken by ``acquire``."""
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: str) -> int:
        """Slots ``key`` holds now."""
        return self._held.get(key, 0)


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

    def frame_limiter(self, name: str, rate: float, burst: float) -> FrameLimiter:
        """A ``FrameLimiter`` named ``name``: in memory, or with Redis a ``LeasedLimiter`` on
        its cluster-wide bucket (so a WebSocket send rarely waits for Redis)."""
        if self._redis is None or rate <= 0:
            return RateLimiter(rate, burst)
        return LeasedLimiter(self.limiter(name, rate, burst), burst)

    async def close(self) -> None:
        """Close the Redis client, if any."""
        if self._redis is not None:
            await self._redis.aclose()


def make_limiter(config: RelayConfig) -> Limiters:
    """The ``Limiters`` of ``config`` (see there)."""
    return Limiters(config)
