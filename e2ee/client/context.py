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
* There is no cache: rules read through :meth:`ClientContext.view`, which
  reads the store's own connection, plus (inside a receive batch) the rows the
  batch will write at its end (``pending``, dropped if the batch fails).
* Events reach every subscriber in the order they were emitted, on the event
  loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from e2ee.client.datadir import META_REGISTERED, META_STRICT, Opened
from e2ee.client.link import RelayLink
from e2ee.client.settling import DEFAULT_SETTLE_BACKLOG, SettleQueue
from e2ee.errors import UsageError
from e2ee.events import ConnectionStateChanged, Event
from e2ee.history import History
from e2ee.messaging.outcome import Outcome
from e2ee.messaging.rows import AppRow, ChatRow, CounterRow, MessageRow, as_row, from_columns
from e2ee.store import Address, Changes

__all__ = ["ClientContext", "ClientOptions", "StoreView"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R", bound=AppRow)


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
        send_batch: at most this many sends share one store transaction: composes
            queued together, queued entries encrypted ahead together, and entries
            marked sent together (1: one each).
        sealed_sender: seal what we send (docs/protocol.md, "Sealed sender"): the
            relay then sees no sender for messages to contacts that shared their access
            key, and no group id in any message. False sends version 1 envelopes.
        send_pipeline: at most this many queued 1:1 messages are on the relay connection
            waiting for its answer at once, each after the previous one (1: one at a
            time, each after the relay's answer to the previous).
        settle_backlog: at most this many ids of our sends wait to be settled (the relay
            told, on the next ack, that it may forget their retry records:
            :mod:`e2ee.client.settling`); beyond it the oldest are dropped, whose records
            then expire with the relay's window. 0 turns settling off (for a relay that
            predates it: it refuses an ack that only settles).
    """

    backoff_base: float = 0.5
    backoff_max: float = 30.0
    maintenance_interval: float = 3600.0
    expiry_interval: float = 1.0
    reset_interval_ms: int = 60_000
    ack_delay: float = 0.02
    send_batch: int = 100
    sealed_sender: bool = True
    send_pipeline: int = 32
    settle_backlog: int = DEFAULT_SETTLE_BACKLOG

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base <= self.backoff_max:
            raise UsageError("ClientOptions needs 0 < backoff_base <= backoff_max")
        if self.send_batch < 1:
            raise UsageError("ClientOptions needs send_batch >= 1")
        if self.send_pipeline < 1:
            raise UsageError("ClientOptions needs send_pipeline >= 1")
        if self.settle_backlog < 0:
            raise UsageError("ClientOptions needs settle_backlog >= 0")


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
        #: Ids of our sends committed as done, for the relay to forget (e2ee.client.settling):
        #: the outbox adds them, the inbox's ack runner sends them.
        self.settled = SettleQueue(options.settle_backlog)
        #: Set when an ack is waiting to go (a committed delivery, or ids to settle).
        self.acks_due = asyncio.Event()
        self._subscribers: list[asyncio.Queue[Event]] = []
        # Inside a receive batch: counter and chat rows, written once at its end
        # instead of with every message (they change with every message).
        self.pending: dict[tuple[str, str], AppRow] | None = None

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
            self.registered = self.store.get_meta(META_REGISTERED) == "1"
            self.strict = self.store.get_meta(META_STRICT) == "1"

    def view(self) -> StoreView:
        """History as it stands for the caller (inside a receive batch: with its rows)."""
        return StoreView(self.history, self.engine.session_devices, self.pending)

    def locked(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run an engine call under the write lock (blocking; use via ``to_thread``)."""
        with self.wlock:
            return call(*args, **kwargs)

    def counter(self, name: str) -> int:
        """A named counter's committed value, 0 if it was never written."""
        return self.view().counter(name) or 0

    def locked_counter(self, name: str) -> int:
        """:meth:`counter` under the write lock."""
        with self.wlock:
            return self.counter(name)

    def commit(self, rows: Sequence[AppRow], counters: Mapping[str, int]) -> None:
        """Commit history rows and counters in one transaction (under the write lock).

        Raises:
            StorageError: nothing was written.
        """
        typed = [*rows, *(CounterRow(k, v) for k, v in counters.items())]
        self.store.commit(Changes(app_rows=tuple(as_row(r) for r in typed)))

    def commit_outcome(self, out: Outcome) -> None:
        """Commit what a messaging rule produced (inside a receive batch: see :meth:`stage`).

        Raises:
            StorageError: nothing was written.
        """
        if self.pending is None:
            self.store.commit(Changes(app_rows=tuple(out.all_rows())))
            return
        if out.rows:
            self.store.commit(Changes(app_rows=tuple(as_row(r) for r in out.rows)))
        self.stage(out)

    def defer(self, out: Outcome) -> None:
        """Keep all of an outcome's rows for the end of the batch (:meth:`stage` keeps only
        its chats and counters).

        For a batch whose rules read back what earlier ones wrote only through the view
        (``StoreView.get`` sees these rows first): composing does. The batch then writes
        every row in its one commit at the end, several per statement.
        """
        pending = self.pending
        if pending is None:
            raise RuntimeError("defer() outside a batch")
        for row in out.rows:
            pending[row.TABLE, row.id] = row
        self.stage(out)

    def stage(self, out: Outcome) -> None:
        """Keep an outcome's counters and chat rows for the end of the receive batch.

        Called once the outcome's rows were committed (in the batch): every later
        message overwrites these rows, so the batch writes them once, in the same
        transaction as the messages that moved them.
        """
        pending = self.pending
        if pending is None:
            raise RuntimeError("stage() outside a receive batch")
        for chat in out.chats.values():
            pending[ChatRow.TABLE, chat.id] = chat
        for name, value in out.counters.items():
            pending[CounterRow.TABLE, name] = CounterRow(name, value)

    def known_devices(self, user: str) -> list[int]:
        """Device ids of ``user`` we hold a session with."""
        return self.engine.session_devices(user)


class StoreView:
    """The :class:`~e2ee.messaging.view.HistoryView` over the store.

    Reads go through the store's own connection (``History.current`` and
    ``History.current_members``), so inside a receive batch they see the batch's
    commits; ``pending`` adds the rows the batch writes at its end. ``devices``
    is the engine's session list. :class:`~e2ee.messaging.memory.MemoryHistory`
    is its in-memory twin (one conformance suite: tests/messaging).

    Args:
        history: the history over the store.
        devices: user -> device ids we hold a session with.
        pending: rows a receive batch writes at its end, by (table, id).
    """

    def __init__(
        self,
        history: History,
        devices: Callable[[str], list[int]],
        pending: Mapping[tuple[str, str], AppRow] | None = None,
    ) -> None:
        self._history = history
        self._devices = devices
        self._pending = pending or {}

    def __repr__(self) -> str:
        return f"StoreView({len(self._pending)} pending rows)"

    def get(self, kind: type[_R], row_id: str) -> _R | None:
        """The typed row, pending rows first."""
        found = self._pending.get((kind.TABLE, row_id))
        if isinstance(found, kind):
            return found
        stored = self._history.current(kind.TABLE, row_id)
        return None if stored is None else from_columns(kind, stored)

    def replies(self, message_id: str) -> list[MessageRow]:
        """The messages quoting ``message_id`` (store connection), by id."""
        return [from_columns(MessageRow, r) for r in self._history.current_replies(message_id)]

    def counter(self, name: str) -> int | None:
        """A counter's value, pending first."""
        found = self.get(CounterRow, name)
        return None if found is None else found.value

    def group_members(self, group_id: str) -> dict[str, str]:
        """A group's members, read on the store's connection (inside the open batch)."""
        return self._history.current_members(group_id)

    def devices(self, user: str) -> list[int]:
        """Device ids of ``user`` we hold a session with."""
        return self._devices(user)
