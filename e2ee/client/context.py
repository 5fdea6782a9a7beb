"""What every part of the client shares: one account's store, engine and history.

Invariants:

* All history writes happen under :attr:`ClientContext.wlock` (an ``RLock``),
  so read-modify-write updates of a row (status, edits, receipts) never lose
  each other. Every engine call that takes one of the engine's per-peer locks
  runs under it too (:meth:`ClientContext.locked`): a receive batch holds the
  write lock and the store's transaction while it decrypts, so an engine call
  holding a peer lock while waiting for the store would deadlock with it.
* Lock order: the write lock, then the engine's per-peer locks, then the
  store's lock.
* The counter and chat caches only ever hold committed values or values of the
  transaction in progress; a failed commit drops them (:meth:`drop_caches`).
* Events reach every subscriber in the order they were emitted, on the event
  loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from e2ee.client.datadir import META_REGISTERED, META_STRICT, Opened
from e2ee.client.link import RelayLink
from e2ee.errors import UsageError
from e2ee.events import ConnectionStateChanged, Event
from e2ee.history import History, Row
from e2ee.store import Address, Changes

__all__ = ["ClientContext", "ClientOptions"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Tunables; the defaults suit a real client, tests shorten the delays.

    Attributes:
        backoff_base: first reconnect delay bound in seconds (doubles per failure).
        backoff_max: reconnect delay cap in seconds.
        maintenance_interval: seconds between key-maintenance runs while connected.
        expiry_interval: seconds between disappearing-message sweeps.
        reset_interval_ms: at most one session reset per peer device in this time.
        ack_delay: seconds acks may wait to be batched.
    """

    backoff_base: float = 0.5
    backoff_max: float = 30.0
    maintenance_interval: float = 3600.0
    expiry_interval: float = 1.0
    reset_interval_ms: int = 60_000
    ack_delay: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base <= self.backoff_max:
            raise UsageError("ClientOptions needs 0 < backoff_base <= backoff_max")


class ClientContext:
    """The shared state of one open client (built by :class:`e2ee.client.Client`).

    Args:
        opened: the open data directory.
        link: the relay link.
        now_ms: the clock (unix milliseconds).
        random_bytes: the source of message and group ids (``os.urandom``).
        jitter: the reconnect jitter source, a float in ``[0, 1)``.
        options: tunables.
    """

    def __init__(
        self,
        opened: Opened,
        link: RelayLink,
        *,
        now_ms: Callable[[], int],
        random_bytes: Callable[[int], bytes],
        jitter: Callable[[], float],
        options: ClientOptions,
    ) -> None:
        account = opened.account
        self.folder = opened.folder
        self.store = opened.store
        self.engine = opened.engine
        self.history = opened.history
        self.link = link
        self.me = Address(account.name, account.device_id)
        self.now_ms = now_ms
        self.random_bytes = random_bytes
        self.jitter = jitter
        self.options = options
        self.registered = opened.registered
        self.strict = False
        self.wlock = threading.RLock()
        #: Users whose new identity key was seen but not accepted (sending is held).
        self.held: set[str] = set()
        self.connected = asyncio.Event()
        self.closing = False
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._counters: dict[str, int] = {}
        self.chats: dict[str, dict[str, Any]] = {}
        self.known_links: set[str] = set()
        # Inside a receive transaction: counter and chat rows, written once at its
        # end instead of with every message (they change with every message).
        self.deferred: dict[tuple[str, str], dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"ClientContext(user={self.me.name!r}, device={self.me.device_id})"

    # -- events ----------------------------------------------------------------------------

    def subscribe(self) -> AsyncIterator[Event]:
        """A new subscription to every event from now on; it ends when the client closes."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._iterate(queue)

    async def _iterate(self, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, ConnectionStateChanged) and event.state == "closed":
                    return
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    def emit(self, event: Event) -> None:
        """Hand ``event`` to every subscriber (on the event loop's thread)."""
        for queue in self._subscribers:
            queue.put_nowait(event)

    # -- state (blocking: call through asyncio.to_thread) --------------------------------

    def load_state(self) -> None:
        """Re-read the settings that other processes or calls may have changed."""
        with self.wlock:
            self.drop_caches()
            self.registered = self.store.get_meta(META_REGISTERED) == "1"
            self.strict = self.store.get_meta(META_STRICT) == "1"

    def drop_caches(self) -> None:
        """Forget cached rows: they may describe a commit that failed.

        Rows deferred to the end of the current receive transaction stand (their
        messages committed), so the cache keeps them: the store has not seen them yet.
        """
        self._counters.clear()
        self.chats.clear()
        self.known_links.clear()
        for (table, key), row in (self.deferred or {}).items():
            if table == "counters":
                self._counters[key] = row["value"]
            else:
                self.chats[key] = row

    def locked(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run an engine call under the write lock (blocking; use via ``to_thread``)."""
        with self.wlock:
            return call(*args, **kwargs)

    def counter_or_none(self, name: str) -> int | None:
        """A named counter's value (cached), or None if it was never written."""
        value = self._counters.get(name)
        if value is None:
            value = self.history.counter_value(name)
            if value is not None:
                self._counters[name] = value
        return value

    def counter(self, name: str) -> int:
        """A named counter's value (cached), 0 if it was never written."""
        value = self._counters.get(name)
        if value is None:
            value = self.history.counter_value(name) or 0
            self._counters[name] = value
        return value

    def locked_counter(self, name: str) -> int:
        """:meth:`counter` under the write lock."""
        with self.wlock:
            return self.counter(name)

    def set_counters(self, counters: Mapping[str, int]) -> None:
        """Cache counter values that are being committed (dropped if that fails)."""
        self._counters.update(counters)

    def commit(self, rows: Sequence[Row], counters: Mapping[str, int]) -> None:
        """Commit history rows and counters in one transaction (under the write lock).

        Raises:
            StorageError: nothing was written.
        """
        all_rows = tuple(rows) + tuple(
            History.row("counters", id=k, value=v) for k, v in counters.items()
        )
        try:
            self.store.commit(Changes(app_rows=all_rows))
        except BaseException:
            self.drop_caches()  # cached chat rows may describe this failed write
            raise
        self._counters.update(counters)

    def defer_or_add(self, rows: list[Row], more: Sequence[Row]) -> None:
        """Add ``more`` to ``rows``, or inside a receive transaction defer them to its end.

        Only rows that every later message overwrites (counters, a chat's
        ``last_message_at``) are deferred: the transaction commits all or nothing,
        so they still stand exactly when the messages that moved them do.
        """
        if self.deferred is None:
            rows.extend(more)
            return
        for table, row in more:
            self.deferred[(table, row["id"])] = row

    def known_devices(self, user: str) -> list[int]:
        """Device ids of ``user`` we hold a session with."""
        return self.engine.session_devices(user)
