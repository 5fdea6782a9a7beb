"""Cluster-wide state on a real Redis: the replay guard and the token-bucket limiter, each
used from two clients standing for two relay nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis_support import REDIS_URL, free_port

from relay.errors import RateLimited, Unavailable
from relay.nodes.state import RedisLimiter, RedisReplayGuard, connect
from relay.ratelimit import LeasedLimiter, Limiter
from relay.replay import ReplayGuard


@pytest.fixture
async def two_clients() -> AsyncIterator[tuple[Redis, Redis]]:
    a, b = connect(REDIS_URL, 10.0), connect(REDIS_URL, 10.0)
    yield a, b
    await a.aclose()
    await b.aclose()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_key_claimed_on_one_node_is_a_replay_on_another(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    node1: ReplayGuard = RedisReplayGuard(a, redis_prefix)
    node2: ReplayGuard = RedisReplayGuard(b, redis_prefix)
    t = now_ms()
    assert await node1.claim(b"nonce-1", t + 60_000, t) is True
    assert await node2.claim(b"nonce-1", t + 60_000, t) is False
    assert await node1.claim(b"nonce-1", t + 60_000, t) is False
    assert await node2.claim(b"nonce-2", t + 60_000, t) is True
    # Another prefix (another relay sharing this Redis) is independent.
    other = RedisReplayGuard(a, redis_prefix + "other:")
    assert await other.claim(b"nonce-1", t + 60_000, t) is True


async def test_concurrent_claims_of_one_key_have_exactly_one_winner(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    guards = [RedisReplayGuard(a, redis_prefix), RedisReplayGuard(b, redis_prefix)]
    t = now_ms()
    results = await asyncio.gather(
        *(guards[i % 2].claim(b"same", t + 60_000, t) for i in range(200))
    )
    assert results.count(True) == 1


async def test_a_claim_expires_with_its_window(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    g1 = RedisReplayGuard(a, redis_prefix, clock_margin_ms=0)
    g2 = RedisReplayGuard(b, redis_prefix, clock_margin_ms=0)
    t = now_ms()
    assert await g1.claim(b"short", t + 300, t)
    assert not await g2.claim(b"short", t + 300, t)
    ttl = await a.pttl(redis_prefix + "replay:short")
    assert 0 < ttl <= 300
    deadline = time.monotonic() + 10
    while not await g2.claim(b"short", now_ms() + 300, now_ms()):
        assert time.monotonic() < deadline, "the replay key never expired"
        await asyncio.sleep(0.05)
    # An expiry already past records nothing (and is never a replay).
    assert await g1.claim(b"past", t - 1, t)
    assert await a.exists(redis_prefix + "replay:past") == 0


async def test_the_replay_key_outlives_the_window_by_the_clock_margin(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, _ = two_clients
    g = RedisReplayGuard(a, redis_prefix, clock_margin_ms=5000)
    t = now_ms()
    assert await g.claim(b"k", t + 1000, t)
    assert 5000 < await a.pttl(redis_prefix + "replay:k") <= 6000


async def test_token_bucket_is_atomic_across_nodes_under_concurrency(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    # Two nodes with different ideas of "now": Redis's clock decides, so they agree.
    nodes: list[Limiter] = [
        RedisLimiter(a, redis_prefix, "send", rate=0.001, burst=25),
        RedisLimiter(b, redis_prefix, "send", rate=0.001, burst=25),
    ]

    async def take(i: int) -> int | None:
        try:
            await nodes[i % 2].take("alice/1", now=float(i * 1000))
        except RateLimited as err:
            return err.retry_after
        return None

    results = await asyncio.gather(*(take(i) for i in range(300)))
    taken = [r for r in results if r is None]
    refused = [r for r in results if r is not None]
    assert len(taken) == 25
    assert len(refused) == 275
    assert all(r >= 1 for r in refused)
    # Another key, and another limit name, have buckets of their own.
    await nodes[0].take("bob/1", 0.0)
    await RedisLimiter(a, redis_prefix, "fetch", 0.001, 1).take("alice/1", 0.0)


async def test_leased_account_budget_never_exceeds_the_shared_bucket(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    """Two nodes spend one account's send budget in leases of 3 tokens (burst 96): together
    they admit at most the burst, and at most a lease less one per node fewer; once refused, a
    node keeps refusing that account for its Retry-After without asking Redis again, while
    another account is unaffected."""
    a, b = two_clients
    burst = 96
    nodes = [
        LeasedLimiter(RedisLimiter(c, redis_prefix, "account_send", 0.001, burst), burst)
        for c in (a, b)
    ]

    async def take(i: int) -> bool:
        node = nodes[i % 2]
        if node.take_now("mallory", 0.0):
            return True
        try:
            await node.take("mallory", 0.0)
        except RateLimited as err:
            assert err.retry_after >= 1
            return False
        return True

    results = await asyncio.gather(*(take(i) for i in range(400)))
    assert burst - 2 * (3 - 1) <= results.count(True) <= burst
    for node in nodes:
        with pytest.raises(RateLimited):
            node.take_now("mallory", 0.5)  # remembered: no round trip
    await nodes[0].take("alice", 0.0)


async def test_token_bucket_refills_by_redis_time_and_reports_retry_after(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    n1 = RedisLimiter(a, redis_prefix, "reg", rate=5.0, burst=1)
    n2 = RedisLimiter(b, redis_prefix, "reg", rate=5.0, burst=1)
    await n1.take("1.2.3.4", 0.0)
    with pytest.raises(RateLimited) as caught:
        await n2.take("1.2.3.4", 0.0)
    assert caught.value.retry_after == 1
    assert caught.value.status == 429
    slow = RedisLimiter(a, redis_prefix, "slow", rate=0.01, burst=1)
    await slow.take("x", 0.0)
    with pytest.raises(RateLimited) as caught:
        await slow.take("x", 0.0)
    assert 99 <= caught.value.retry_after <= 100
    deadline = time.monotonic() + 10
    while True:  # 0.2 s of Redis time refills one token
        try:
            await n2.take("1.2.3.4", 0.0)
            break
        except RateLimited:
            assert time.monotonic() < deadline, "the bucket never refilled"
            await asyncio.sleep(0.05)
    # The bucket key expires once it would be full again: nothing stays behind.
    assert 0 < await a.pttl(redis_prefix + "rl:reg:1.2.3.4") <= 1200


async def test_a_disabled_limiter_never_refuses_and_touches_nothing(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, _ = two_clients
    off = RedisLimiter(a, redis_prefix, "off", rate=0, burst=1)
    for _ in range(5):
        await off.take("k", 0.0)
    assert [k async for k in a.scan_iter(match=redis_prefix + "rl:off:*")] == []


async def test_unreachable_redis_is_unavailable_never_allowed() -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", 1.0)
    try:
        with pytest.raises(Unavailable) as caught:
            await RedisReplayGuard(dead, "p:", retry_after=3).claim(b"k", now_ms() + 1000, now_ms())
        assert caught.value.status == 503
        assert caught.value.retry_after == 3
        with pytest.raises(Unavailable):
            await RedisLimiter(dead, "p:", "send", 1.0, 1.0).take("k", 0.0)
    finally:
        await dead.aclose()


async def test_nodes_share_one_replay_secret_made_by_the_first(
    two_clients: tuple[Redis, Redis], redis_prefix: str
) -> None:
    a, b = two_clients
    g1, g2 = RedisReplayGuard(a, redis_prefix), RedisReplayGuard(b, redis_prefix)
    first, second = await asyncio.gather(g1.shared_secret(), g2.shared_secret())
    assert first == second and len(first) == 32
    assert await RedisReplayGuard(a, redis_prefix + "other:").shared_secret() != first
    assert await g1.ready() is None
