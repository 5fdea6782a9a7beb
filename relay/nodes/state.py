# Invariants:
# * Every key carries the configured prefix, so several relays or test runs share one Redis.
# * A replay key is claimed by one atomic SET NX PXAT: of two nodes claiming the same key at
#   once exactly one wins, and the key outlives its auth window (plus a clock margin).
# * A token bucket is read, refilled and debited inside one Lua script (atomic on the server),
#   with Redis's own clock (TIME), so every node sees the same bucket and the same time; a
#   bucket never holds more than ``burst`` tokens and expires once it would be full again.
# * Redis being unreachable is never "allowed": it raises ``Unavailable`` (503, Retry-After).
"""Cluster-wide state in Redis: the auth replay guard and token-bucket rate limits."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.errors import RateLimited, Unavailable
from relay.replay import REPLAY_SECRET_LEN

if TYPE_CHECKING:
    from relay.config import RelayConfig

__all__ = ["RedisLimiter", "RedisReplayGuard", "connect"]

#: Connections a node opens to Redis for commands; more concurrent commands wait for one
#: (pipelined scripts keep the count of commands per message small, docs/architecture.md).
POOL_CONNECTIONS = 16


def connect(url: str, timeout: float, *, subscriber: bool = False) -> Redis:
    """Return a Redis client for a relay node (no I/O until the first command).

    Commands wait at most ``timeout`` for a pooled connection, for the connection and for their
    answer. The subscriber client never retries behind our back: a reconnect that silently
    re-subscribed would hide the messages lost meanwhile, so its errors reach the caller, who
    re-subscribes and resynchronises.

    Args:
        url: ``redis_url`` (never logged: it may hold a password).
        timeout: seconds (``redis_timeout_seconds``).
        subscriber: build the client for pub/sub (no retries, no read timeout).

    Returns:
        The client.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=2 if subscriber else POOL_CONNECTIONS,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=None if subscriber else timeout,
        retry=Retry(NoBackoff(), 0) if subscriber else Retry(NoBackoff(), 1),
    )
    return Redis(connection_pool=pool)


class RedisReplayGuard:
    """``relay.replay.ReplayGuard`` on Redis: ``SET <prefix>replay:<key> 1 NX PXAT <expiry +
    margin>``; also a ``SharedReplayGuard`` (the digest key is ``<prefix>replay-secret``).

    Args:
        redis: the client.
        prefix: key prefix (``redis_prefix``).
        clock_margin_ms: added to every expiry, so a node whose clock runs up to this much
            behind Redis's still finds the key while it accepts the timestamp.
        retry_after: seconds for the 503 raised when Redis does not answer.
    """

    def __init__(
        self, redis: Redis, prefix: str, *, clock_margin_ms: int = 5000, retry_after: int = 2
    ) -> None:
        self._redis = redis
        self._prefix = (prefix + "replay:").encode()
        self._secret_key = prefix + "replay-secret"
        self._margin = clock_margin_ms
        self._retry_after = retry_after

    @classmethod
    def from_config(cls, config: RelayConfig) -> RedisReplayGuard:
        """A guard with a Redis client of its own (``redis_url``, ``redis_prefix``,
        ``redis_timeout_seconds``, ``redis_retry_after_seconds``); no I/O until used."""
        redis = connect(config.redis_url, config.redis_timeout_seconds)
        return cls(redis, config.redis_prefix, retry_after=config.redis_retry_after_seconds)

    async def open(self) -> None:
        """Nothing to do: the client connects on its first command."""

    async def close(self) -> None:
        """Close the client's connections."""
        await self._redis.aclose()

    async def shared_secret(self) -> bytes:
        """The replay secret every node digests with (``SET NX``: the first node's wins).

        Raises:
            Unavailable: Redis did not answer.
        """
        try:
            await self._redis.set(self._secret_key, os.urandom(REPLAY_SECRET_LEN), nx=True)
            secret = await self._redis.get(self._secret_key)
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(self._retry_after, "replay guard unavailable") from exc
        if not isinstance(secret, bytes) or len(secret) != REPLAY_SECRET_LEN:
            raise Unavailable(self._retry_after, "replay secret in Redis is damaged")
        return secret

    async def ready(self) -> str | None:
        """None when Redis answers a PING, else why not."""
        try:
            await self._redis.ping()
        except (RedisError, OSError, TimeoutError):
            return "Redis does not answer"
        return None

    async def claim(self, key: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """Record ``key`` until ``expires_at_ms`` (on every node sharing this Redis).

        Args:
            key: the request's replay key (opaque bytes).
            expires_at_ms: unix ms after which the key may be forgotten.
            now_ms: the node's unix ms; a key already past its expiry is not recorded.

        Returns:
            True if the key is new (now recorded), False if it was recorded before (a replay).

        Raises:
            Unavailable: Redis did not answer.
        """
        if expires_at_ms <= now_ms:
            return True  # nothing left to guard: the freshness check refuses such a request
        try:
            done = await self._redis.set(
                self._prefix + key, b"1", nx=True, pxat=expires_at_ms + self._margin
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(self._retry_after, "replay guard unavailable") from exc
        return bool(done)


# KEYS[1] bucket; ARGV rate (tokens/s), burst, cost. Returns "" when the tokens were taken,
# else the seconds to wait as a string (a Lua number returned as a reply is cut to an integer).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
local elapsed = now - at
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local wait = ''
if tokens < cost then
  wait = string.format('%.6f', (cost - tokens) / rate)
else
  tokens = tokens - cost
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return wait
"""


class RedisLimiter:
    """``relay.ratelimit.Limiter`` on Redis: one atomic Lua token bucket per key, timed by
    Redis's clock.

    Args:
        redis: the client.
        prefix: key prefix (``redis_prefix``).
        name: the limit's name (``send``, ``register``...), part of every key.
        rate: tokens refilled per second (0 disables the limiter).
        burst: bucket capacity (at least 1).
        retry_after: seconds for the 503 raised when Redis does not answer.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        name: str,
        rate: float,
        burst: float,
        *,
        retry_after: int = 2,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}rl:{name}:"
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._retry_after = retry_after
        self._script = redis.register_script(_TAKE)

    async def take(self, key: str, now: float, cost: float = 1.0) -> None:
        """Consume ``cost`` tokens for ``key``, cluster-wide.

        Args:
            key: who is limited (an IP, a device...).
            now: ignored: Redis's clock times every bucket, so all nodes agree.
            cost: tokens to take.

        Raises:
            RateLimited: not enough tokens; ``retry_after`` says when enough will be there.
            Unavailable: Redis did not answer.
        """
        if self._rate <= 0:
            return
        try:
            reply = await self._script(
                keys=[self._prefix + key], args=[repr(self._rate), repr(self._burst), repr(cost)]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(self._retry_after, "rate limiter unavailable") from exc
        wait = reply.decode() if isinstance(reply, bytes) else str(reply)
        if wait:
            raise RateLimited(max(1, math.ceil(float(wait))))
