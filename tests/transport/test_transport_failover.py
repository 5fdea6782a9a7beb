"""Several URLs of one relay: which node a call goes to, when it moves on, what it repeats.

The policy is pure (:class:`e2ee.transport.failover.RelayNodes`): operations here are coroutines
that fail or answer as each test says; sleeping is recorded, not done.
"""

from __future__ import annotations

import pytest

from e2ee.errors import UsageError
from e2ee.transport import (
    AuthFailed,
    Backoff,
    ConnectionClosed,
    ConnectionFailed,
    ConnectionLost,
    NotConnected,
    RateLimited,
    RelayNodes,
    RelayRejected,
    RelayTimeout,
    Replaced,
    Unavailable,
    check_relay_urls,
    node_failed,
)
from e2ee.transport.errors import error_from_response
from e2ee.transport.failover import MAX_RELAY_URLS

A, B, C = "http://a.test:1", "http://b.test:2", "http://c.test:3"


class Script:
    """An operation whose outcome per URL is scripted: an exception to raise, or a value."""

    def __init__(self, **outcomes: object) -> None:
        self.outcomes = outcomes
        self.calls: list[str] = []

    async def __call__(self, url: str) -> str:
        self.calls.append(url)
        key = url.split("//")[1][0]
        outcome = self.outcomes.get(key, "ok")
        if isinstance(outcome, list):
            outcome = outcome.pop(0) if len(outcome) > 1 else outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return f"{outcome}@{key}"


def nodes(*urls: str, rounds: int = 2, sleeps: list[float] | None = None) -> RelayNodes:
    slept = sleeps if sleeps is not None else []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return RelayNodes(
        urls, rounds=rounds, sleep=sleep, backoff=Backoff(0.5, 4.0, random=lambda: 0.5)
    )


def test_urls_are_checked_normalised_and_kept_once_in_order() -> None:
    assert check_relay_urls(["http://a.test:1/", B, "http://a.test:1"]) == (A, B)
    assert check_relay_urls(A) == (A,)
    for bad in ([], ["ftp://a.test"], ["http://a.test/prefix"], ["a.test:80"]):
        with pytest.raises(UsageError):
            check_relay_urls(bad)
    too_many = [f"http://n{i}.test" for i in range(MAX_RELAY_URLS + 1)]
    with pytest.raises(UsageError):
        check_relay_urls(too_many)
    assert len(check_relay_urls(too_many[:MAX_RELAY_URLS])) == MAX_RELAY_URLS


def test_a_node_failure_is_a_broken_connection_or_a_502_503_504_nothing_else() -> None:
    for exc in (
        ConnectionFailed("refused"),
        RelayTimeout("slow"),
        ConnectionLost("closed"),
        NotConnected("no socket"),
        ConnectionClosed(1006, "dropped"),
        error_from_response(502, None),
        error_from_response(503, {"error": "unavailable"}, retry_after_header="3"),
        error_from_response(504, None),
    ):
        assert node_failed(exc), exc
    for exc in (
        Replaced(),
        AuthFailed(401, "auth_invalid"),
        RateLimited(429, "rate_limited", "", retry_after=1),
        RelayRejected(500, "internal"),
        error_from_response(404, {"error": "unknown_user"}),
        UsageError("bad"),
    ):
        assert not node_failed(exc), exc


def test_503_carries_the_relays_retry_after() -> None:
    err = error_from_response(503, {"error": "unavailable"}, retry_after_header="3")
    assert isinstance(err, Unavailable) and err.retry_after == 3 and err.retryable
    assert error_from_response(503, {"retry_after": 7}).retry_after == 7  # type: ignore[attr-defined]
    assert error_from_response(502, None).retry_after is None  # type: ignore[attr-defined]


async def test_calls_stick_to_the_working_node() -> None:
    n = nodes(A, B, C)
    op = Script()
    assert [await n.call(op) for _ in range(3)] == ["ok@a"] * 3
    assert op.calls == [A, A, A]


async def test_a_dead_node_is_left_at_once_and_the_next_one_kept() -> None:
    sleeps: list[float] = []
    n = nodes(A, B, C, sleeps=sleeps)
    op = Script(a=ConnectionFailed("refused"))
    assert await n.call(op) == "ok@b"
    assert await n.call(op) == "ok@b"  # sticks to b; a is not tried again
    assert op.calls == [A, B, B] and sleeps == []
    assert n.current == B


async def test_a_node_that_comes_back_is_not_preferred_again() -> None:
    n = nodes(A, B)
    await n.call(Script(a=ConnectionFailed("refused")))
    op = Script()
    await n.call(op)
    assert op.calls == [B]


async def test_the_relays_own_answers_are_raised_at_once_without_moving() -> None:
    n = nodes(A, B)
    op = Script(a=AuthFailed(401, "auth_invalid"))
    with pytest.raises(AuthFailed):
        await n.call(op)
    assert op.calls == [A] and n.current == A


async def test_all_nodes_down_waits_then_tries_another_round_then_raises() -> None:
    sleeps: list[float] = []
    n = nodes(A, B, rounds=2, sleeps=sleeps)
    op = Script(a=ConnectionFailed("refused"), b=ConnectionFailed("refused"))
    with pytest.raises(ConnectionFailed):
        await n.call(op)
    assert op.calls == [A, B, A, B]
    assert sleeps == [0.25]  # Backoff(0.5).delay(1) with random() = 0.5


async def test_one_url_behind_a_balancer_is_tried_again_after_a_jittered_wait() -> None:
    sleeps: list[float] = []
    n = nodes(A, sleeps=sleeps)
    op = Script(a=[Unavailable(502, "bad_gateway", "", retry_after=None), "ok"])
    assert await n.call(op) == "ok@a"
    assert op.calls == [A, A] and sleeps == [0.25]


async def test_retry_after_is_waited_for_up_to_the_backoff_cap() -> None:
    sleeps: list[float] = []
    n = nodes(A, sleeps=sleeps)
    await n.call(Script(a=[Unavailable(503, "unavailable", "", retry_after=2), "ok"]))
    await n.call(Script(a=[Unavailable(503, "unavailable", "", retry_after=600), "ok"]))
    assert sleeps == [2.0, 4.0]


async def test_a_failure_of_a_node_no_longer_in_use_changes_nothing() -> None:
    n = nodes(A, B, C)
    n.failed(A)
    assert n.current == B
    n.failed(A)  # a late report about a: b stays
    assert n.current == B
    n.failed(B)
    n.failed(C)
    assert n.current == A  # round robin


def test_rounds_must_be_positive() -> None:
    with pytest.raises(UsageError):
        RelayNodes(A, rounds=0)
