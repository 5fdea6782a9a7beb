# Invariants:
# * A request body is read under a deadline that moves with the bytes received: byte n must have
#   arrived ``timeout + n / min_rate`` seconds after the handler started reading. A peer that
#   trickles (one byte every few seconds) is cut off after about ``timeout`` seconds, a body
#   arriving at ``min_rate`` or faster is never cut off, and no body of L bytes holds a
#   connection longer than ``timeout + L / min_rate``.
# * A body cut off for slowness closes its connection at once (no lingering read of the rest);
#   a body the peer abandoned (disconnect, short body) is a typed error, logged as one line
#   without a traceback.
# * ``BodySlots`` counts, per client address, the bodies being read before their request is
#   authenticated; a request beyond the bound is refused before its body is read.
"""Reading request bodies against slow and abandoned uploads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from relay.errors import BadRequest, RateLimited, RelayError, TooLarge

__all__ = ["BodyAbandoned", "BodyLimits", "BodySlots", "BodyTimeout", "read_body", "timed_chunks"]

log = logging.getLogger("relay.body")

_CHUNK = 64 * 1024


class BodyTimeout(RelayError):
    """The body did not arrive at the minimum rate (408); the connection is closed."""

    status = 408
    default_code = "body_timeout"
    close_connection = True  # relay.http_errors.json_errors writes the response, then closes


class BodyAbandoned(BadRequest):
    """The peer stopped sending before the end of the body (400; usually nobody reads it)."""

    default_code = "body_incomplete"


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """How a body must arrive.

    Attributes:
        timeout: seconds allowed before the first byte (and the slack for the rest).
        min_rate: bytes per second a body must keep up with after that.
        max_bytes: largest body (413 beyond).
    """

    timeout: float
    min_rate: float
    max_bytes: int


@dataclass(slots=True)
class BodySlots:
    """Per client address, the unauthenticated bodies being read (bounded).

    Args:
        per_address: most such bodies per address at once.
    """

    per_address: int
    _busy: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def hold(self, address: str) -> Iterator[None]:
        """Hold a slot for ``address`` while the body is read.

        Raises:
            RateLimited: ``address`` already holds ``per_address`` slots (429, Retry-After 1).
        """
        busy = self._busy.get(address, 0)
        if busy >= self.per_address:
            raise RateLimited(1, "too many request bodies in flight from this address")
        self._busy[address] = busy + 1
        try:
            yield
        finally:
            left = self._busy[address] - 1
            if left:
                self._busy[address] = left
            else:
                del self._busy[address]

    def in_flight(self, address: str) -> int:
        """Bodies currently being read for ``address``."""
        return self._busy.get(address, 0)


def _cut_off(request: web.Request, limits: BodyLimits, received: int) -> BodyTimeout:
    log.info(
        "closing connection from %s: body too slow (%d bytes in %.1fs allowed)",
        request.remote,
        received,
        limits.timeout + received / limits.min_rate,
    )
    return BodyTimeout("request body not received in time")


def _abandoned(request: web.Request, exc: BaseException) -> BodyAbandoned:
    log.info("request body from %s abandoned: %s", request.remote, type(exc).__name__)
    return BodyAbandoned("request body incomplete")


async def timed_chunks(request: web.Request, limits: BodyLimits) -> AsyncIterator[bytes]:
    """Yield the body's chunks as they arrive, under the moving deadline.

    Raises:
        BodyTimeout: too slow (the connection is closed).
        BodyAbandoned: the peer disconnected or sent a short body.
        TooLarge: more than ``limits.max_bytes``.
    """
    content = request.content
    loop = asyncio.get_running_loop()
    start = loop.time()
    received = 0
    while True:
        try:
            if content.is_eof():  # the whole body is buffered: no timer needed
                chunk = await content.readany()
            else:
                deadline = start + limits.timeout + received / limits.min_rate
                async with asyncio.timeout_at(deadline):
                    chunk = await content.readany()
        except TimeoutError:
            raise _cut_off(request, limits, received) from None
        except (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError) as exc:
            raise _abandoned(request, exc) from None
        if not chunk:
            return
        received += len(chunk)
        if received > limits.max_bytes:
            raise TooLarge(f"request body exceeds {limits.max_bytes} bytes")
        yield chunk


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    """Read the whole body under the moving deadline (see ``timed_chunks``).

    Raises:
        TooLarge: the declared or actual length exceeds ``limits.max_bytes``.
        BodyTimeout: too slow (the connection is closed).
        BodyAbandoned: the peer disconnected or sent a short body.
    """
    length = request.content_length
    if length is not None and length > limits.max_bytes:
        raise TooLarge(f"request body exceeds {limits.max_bytes} bytes")
    parts = [chunk async for chunk in timed_chunks(request, limits)]
    return parts[0] if len(parts) == 1 else b"".join(parts)
