"""Several URLs of one relay: stick to the node that works, move to the next when it dies.

Invariants:

* A relay run as several nodes (docs/self-hosting.md, "Three nodes") is one service: every
  node serves every account, every request and every socket. :class:`RelayNodes` holds its
  URLs in the order given and one *current* URL; requests go to the current URL until it
  fails with a node failure, then the next URL (round robin) becomes current and stays
  current while it works. A node that comes back is not preferred again: sticking keeps a
  device's socket and its requests on one node.
* A node failure (:func:`node_failed`) is what another node could do better: the
  connection could not be opened or broke (:class:`ConnectionFailed`,
  :class:`RelayTimeout`, :class:`ConnectionLost`, :class:`NotConnected`, a socket closed
  without a final close code) or the node or its proxy answered 502, 503 or 504
  (:class:`Unavailable`). Anything else is the relay's answer (4xx, 429: the rate limits are
  cluster-wide, 500) and is raised at once: every node would say the same.
* :meth:`RelayNodes.call` repeats the *same* request: every URL once, moving on at once,
  then, once all failed, a wait from :class:`~e2ee.transport.backoff.Backoff` (at least the
  relay's ``Retry-After``, at most the backoff's cap) before the next round, for at most
  ``rounds`` rounds; then the last error is raised and the caller's own retry policy takes
  over (the outbox's timer, the connection loop's backoff). Each attempt is signed afresh
  (the nonce cache is cluster-wide). Only idempotent requests may go through it; the SDK's
  all are (sends and acks by message id, key uploads by key id, blobs by content address,
  reads; registration checks its own unknown outcome).
* No I/O and no aiohttp here: the operation is a callable taking the URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from e2ee.errors import UsageError
from e2ee.transport.backoff import Backoff
from e2ee.transport.errors import (
    ConnectionClosed,
    ConnectionFailed,
    ConnectionLost,
    NotConnected,
    Unavailable,
)

__all__ = ["MAX_RELAY_URLS", "RelayNodes", "check_relay_urls", "node_failed"]

T = TypeVar("T")

#: The most URLs one account keeps for its relay (a relay of more nodes sits behind a
#: balancer: give its one URL, or a few of its nodes).
MAX_RELAY_URLS: Final = 16


def check_relay_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """Validate relay URLs and return their origins, in order, without repeats.

    Args:
        urls: one URL, or the URLs of the nodes of one relay (``http[s]://host[:port]``,
            a trailing ``/`` is fine).

    Returns:
        The origins (``scheme://host[:port]``, no trailing ``/``).

    Raises:
        UsageError: none given, more than :data:`MAX_RELAY_URLS`, or one that is not an
            http(s) URL with a host and no path, query or fragment.
    """
    from e2ee.transport.requests import origin_of

    given = [urls] if isinstance(urls, str) else list(urls)
    if not given:
        raise UsageError("give at least one relay URL")
    origins: list[str] = []
    for url in given:
        if not isinstance(url, str):
            raise UsageError("relay URLs must be strings")
        origin = str(origin_of(url.strip()))
        if origin not in origins:
            origins.append(origin)
    if len(origins) > MAX_RELAY_URLS:
        raise UsageError(f"at most {MAX_RELAY_URLS} relay URLs")
    return tuple(origins)


def node_failed(exc: BaseException) -> bool:
    """True when ``exc`` means the node (or its proxy) failed, so another node may serve.

    See the module's invariants for the list.
    """
    if isinstance(exc, ConnectionFailed | ConnectionLost | NotConnected | Unavailable):
        return True
    # A socket that closed without one of the final codes (4001 replaced, 4003 removed,
    # 4403 banned: their own subclasses) closed because of its node.
    return type(exc) is ConnectionClosed


class RelayNodes:
    """The URLs of one relay and which one is in use (see the module's invariants).

    Args:
        urls: one URL or several (checked by :func:`check_relay_urls`).
        backoff: the wait between rounds over all URLs.
        rounds: the most rounds one :meth:`call` makes (>= 1).
        sleep: awaitable sleep (injected by tests).

    Raises:
        UsageError: bad URLs or ``rounds < 1``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        backoff: Backoff | None = None,
        rounds: int = 2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rounds < 1:
            raise UsageError("rounds must be at least 1")
        self._urls = check_relay_urls(urls)
        self._backoff = backoff or Backoff()
        self._rounds = rounds
        self._sleep = sleep
        self._index = 0

    def __repr__(self) -> str:
        return f"RelayNodes({list(self._urls)!r}, current={self.current!r})"

    @property
    def urls(self) -> tuple[str, ...]:
        """All URLs, in the order given."""
        return self._urls

    @property
    def current(self) -> str:
        """The URL requests go to now."""
        return self._urls[self._index]

    def failed(self, url: str) -> None:
        """Record a node failure at ``url``: if it is current, the next URL becomes current.

        A failure of a URL that is no longer current (another request moved on already)
        changes nothing.
        """
        if url == self.current:
            self._index = (self._index + 1) % len(self._urls)

    async def call(self, op: Callable[[str], Awaitable[T]], *, rounds: int | None = None) -> T:
        """Run ``op(url)`` at the current URL, moving on after node failures.

        Args:
            op: performs one request at the URL it is given; must be idempotent.
            rounds: overrides the instance's number of rounds for this call.

        Returns:
            ``op``'s result from the first node that served it.

        Raises:
            Exception: whatever ``op`` raised that is not a node failure, at once; after
                ``rounds`` rounds of node failures, the last one.
        """
        limit = self._rounds if rounds is None else max(1, rounds)
        round_no = 1
        tried = 0
        while True:
            url = self.current
            try:
                return await op(url)
            except Exception as exc:
                if not node_failed(exc):
                    raise
                self.failed(url)
                tried += 1
                if tried < len(self._urls):
                    continue  # an untried node: at once
                if round_no >= limit:
                    raise
                delay = self._backoff.delay(round_no)
                retry_after = exc.retry_after if isinstance(exc, Unavailable) else None
                if retry_after is not None:
                    delay = max(delay, min(float(retry_after), self._backoff.cap))
                round_no += 1
                tried = 0
                await self._sleep(delay)
