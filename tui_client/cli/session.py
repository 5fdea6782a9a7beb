# Invariants:
# * Every network wait is bounded (--network-timeout; transfers: without progress for that
#   long), so no command blocks forever.
# * One process per data directory: the SDK locks it while the account is open
#   (StoreLocked -> exit status 10).
# * The receive cursor file is replaced atomically; it only ever moves forward.
"""An open account for one command: settings, the receive cursor, bounded network waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from e2ee.client import DB_FILE, Client, ClientOptions, History, StoredMessage
from e2ee.client_errors import (
    AuthFailed,
    IdentityHeld,
)
from e2ee.events import (
    ConnectionStateChanged,
    Event,
)
from tui_client.cli.events import message_output
from tui_client.cli.exits import (
    EXIT_BUSY,
    EXIT_HELD,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from tui_client.cli.output import (
    AttachmentInfo,
    Output,
)

T = TypeVar("T")
CURSOR_FILE: Final = "cli-state.json"
_POLL_SECONDS: Final = 0.05
_RECEIVED_KINDS: Final = ("text", "attachment", "timer")
# A command-line client reconnects sooner than the TUI's defaults: it has a deadline.
_OPTIONS: Final = ClientOptions(backoff_base=0.2, backoff_max=2.0)


# -- the data directory ------------------------------------------------------------------


def _read_cursor(folder: Path) -> int | None:
    """The ``seq`` up to which ``receive`` printed incoming messages (None: never set)."""
    try:
        doc = json.loads((folder / CURSOR_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    value = doc.get("printed_seq") if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _write_cursor(folder: Path, seq: int) -> None:
    path = folder / CURSOR_FILE
    tmp = folder / (CURSOR_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"printed_seq": seq}, f)
    os.replace(tmp, path)


def _messages_after(history: History, seq: int) -> list[StoredMessage]:
    """Incoming messages stored after ``seq`` (by another program, e.g. the TUI)."""
    found: list[StoredMessage] = []
    while batch := history.messages_since(seq, limit=500):
        found.extend(m for m in batch if m.type in _RECEIVED_KINDS)
        seq = batch[-1].seq
    return found


# -- an open account ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    data_dir: Path
    out: Output
    passphrase: str | None
    network_timeout: float


class _Activity:
    """A transfer progress callback that remembers when bytes last moved."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.last = time.monotonic()


class _Session:
    """An open client whose events are pumped into a queue, with bounded waits."""

    def __init__(self, settings: _Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._pushback: deque[Event] = deque()
        self._connected = asyncio.Event()
        self._fatal = asyncio.Event()
        self._fatal_reason = ""
        # Tasks inside bounded() now, and those the fatal state cancelled (see bounded).
        self._bounded: set[asyncio.Task[object]] = set()
        self._fatal_cancelled: set[asyncio.Task[object]] = set()
        self._offline_reason = ""
        self._pump = asyncio.create_task(self._run_pump(client.events()))
        #: The highest history ``seq`` of a message printed (for ``receive``'s cursor).
        self.printed_seq = 0

    @property
    def history(self) -> History:
        return self.client.history

    async def _run_pump(self, stream: AsyncIterator[Event]) -> None:
        async for event in stream:
            if isinstance(event, ConnectionStateChanged):
                if event.state == "connected":
                    self._connected.set()
                elif event.state == "offline":
                    self._connected.clear()
                    self._offline_reason = event.reason
                    if event.retry_in is None or event.reason == AuthFailed.__name__:
                        self._fatal_reason = event.reason or "offline"
                        self._set_fatal()
                continue
            self.queue.put_nowait(event)

    def _set_fatal(self) -> None:
        """The connection ended for good: every bounded() wait stops now."""
        self._fatal.set()
        for task in self._bounded - self._fatal_cancelled:
            self._fatal_cancelled.add(task)
            task.cancel()

    def _fatal_error(self) -> CliError:
        reason = self._fatal_reason
        if reason == "Replaced":
            return CliError(
                EXIT_BUSY,
                "another program connected to the relay as this device (the TUI or another "
                "blindpost with a copy of this data directory)",
            )
        if reason == "DeviceRemoved":
            return CliError(EXIT_REFUSED, "this device was removed from its account")
        if reason == AuthFailed.__name__:
            return CliError(
                EXIT_REFUSED,
                "the relay refused this device's credentials (unknown account at this "
                "relay, or this computer's clock is off)",
            )
        return CliError(EXIT_UNREACHABLE, f"the relay connection ended: {reason}")

    async def connect(self, *, receive: bool = False) -> None:
        """Start the client and wait (bounded) until the relay answered.

        Args:
            receive: take deliveries (only ``receive`` does). One-shot commands
                connect send-only: what arrives for this account meanwhile stays
                on the relay for the next ``receive``, receipts and group changes
                included.

        Raises:
            CliError: unreachable (3), refused (9), or taken over (10).
        """
        await self.client.start(receive=receive)
        up = asyncio.ensure_future(self._connected.wait())
        fatal = asyncio.ensure_future(self._fatal.wait())
        try:
            await asyncio.wait(
                {up, fatal},
                timeout=self.settings.network_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            up.cancel()
            fatal.cancel()
        if self._fatal.is_set():
            raise self._fatal_error()
        if not self._connected.is_set():
            last = self._offline_reason or "no answer"
            raise CliError(
                EXIT_UNREACHABLE,
                f"cannot reach the relay within {self.settings.network_timeout:g} s "
                f"(last error: {last})",
            )

    async def start(self) -> None:
        """Connect send-only for a one-shot command (see :meth:`connect`)."""
        await self.connect(receive=False)

    async def bounded(
        self, work: Awaitable[T], what: str, *, activity: _Activity | None = None
    ) -> T:
        """Await ``work`` with the network timeout, stopping early when it cannot succeed.

        Args:
            work: the SDK call.
            what: for the timeout message ("waiting for <what>").
            activity: a transfer's progress: the timeout counts from its last progress.

        Raises:
            CliError: timeout (3) or a fatal connection state.
        """
        current = asyncio.current_task()
        if (
            current is None
            or activity is not None
            or self._fatal.is_set()
            or current in self._bounded
        ):  # a transfer, already fatal, or nested in another wait: the general way
            return await self._bounded_polling(work, what, activity)
        # The common case (every daemon call) without a task or timer of its own beside
        # the timeout: ``work`` runs in the caller's task, the fatal state cancels that
        # task (_set_fatal) and the cancellation is taken back here and reported.
        limit = self.settings.network_timeout
        self._bounded.add(current)
        try:
            async with asyncio.timeout(limit) as deadline:
                return await work
        except TimeoutError:
            if deadline.expired():
                raise CliError(
                    EXIT_UNREACHABLE, f"timed out after {limit:g} s waiting for {what}"
                ) from None
            raise
        except asyncio.CancelledError:
            if self._unwatch(current):
                raise self._fatal_error() from None
            raise
        finally:
            self._unwatch(current)

    def _unwatch(self, task: asyncio.Task[object]) -> bool:
        """Forget a bounded() task; True if the fatal state had cancelled it and that was
        its only cancellation (which is taken back)."""
        self._bounded.discard(task)
        if task not in self._fatal_cancelled:
            return False
        self._fatal_cancelled.discard(task)
        return task.uncancel() == 0

    async def _bounded_polling(
        self, work: Awaitable[T], what: str, activity: _Activity | None
    ) -> T:
        """:meth:`bounded` with a transfer's progress (or outside a task): polls."""
        task = asyncio.ensure_future(work)
        fatal = asyncio.ensure_future(self._fatal.wait())
        limit = self.settings.network_timeout
        try:
            while True:
                left = limit if activity is None else activity.last + limit - time.monotonic()
                done, _ = await asyncio.wait(
                    {task, fatal},
                    timeout=max(left, _POLL_SECONDS),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if task in done:
                    return task.result()
                if fatal in done:
                    raise self._fatal_error()
                if activity is not None and time.monotonic() - activity.last < limit:
                    continue
                raise CliError(EXIT_UNREACHABLE, f"timed out after {limit:g} s waiting for {what}")
        finally:
            for future in (task, fatal):
                if not future.done():
                    future.cancel()
            await asyncio.gather(task, fatal, return_exceptions=True)

    async def next_event(self, timeout: float) -> Event | None:
        """The next event (connection states excluded), or None after ``timeout`` seconds.

        Raises:
            CliError: the connection ended for good.
        """
        if self._pushback:
            return self._pushback.popleft()
        if self._fatal.is_set():
            raise self._fatal_error()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0.0))
        except TimeoutError:
            if self._fatal.is_set():
                raise self._fatal_error() from None
            return None

    def push_back(self, event: Event) -> None:
        self._pushback.appendleft(event)

    def take_ready(self) -> Event | None:
        """An event already waiting, without blocking."""
        if self._pushback:
            return self._pushback.popleft()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def flush_outbox(self) -> int:
        """Wait (bounded) until the outbox sent what it can; return what stays queued."""
        if self._fatal.is_set():
            return len(await asyncio.to_thread(self.history.pending_outbox))
        return await self.client.flush(timeout=self.settings.network_timeout)

    async def close(self) -> None:
        await self.client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump

    # -- reading history for output ------------------------------------------------

    async def attachment(self, message: StoredMessage) -> AttachmentInfo | None:
        if message.type != "attachment":
            return None
        found = await asyncio.to_thread(self.history.attachment_info, message.id)
        if found is None:
            return None
        return AttachmentInfo(
            message.id, found.file_name, found.size, found.mime_type or "application/octet-stream"
        )

    async def group_name(self, group_id: str | None) -> str | None:
        if group_id is None:
            return None
        row = await asyncio.to_thread(self.history.group, group_id)
        return None if row is None else str(row.get("name") or "")

    async def show_message(self, message: StoredMessage) -> None:
        shown = await message_output(self, message)
        self.settings.out.emit(shown.record, shown.human)
        self.printed_seq = max(self.printed_seq, message.seq)

    async def held_error(self, chat_id: str, exc: IdentityHeld) -> CliError:
        """The error for a held send, naming the queued message."""

        def newest_pending() -> str | None:
            for message in reversed(self.history.messages(chat_id, limit=50)):
                if message.outgoing and message.status == "pending":
                    return message.id
            return None

        mid = exc.message_id or await asyncio.to_thread(newest_pending)
        which = f"message {mid} is" if mid else "the message is"
        return CliError(
            EXIT_HELD,
            f"the identity key of {exc.user} changed: {which} held until you run "
            f"'blindpost trust {exc.user}' (or 'blindpost verify {exc.user}' after comparing "
            "safety numbers)",
        )


@contextlib.asynccontextmanager
async def _account(
    settings: _Settings, *, connect: bool, options: ClientOptions = _OPTIONS
) -> AsyncIterator[_Session]:
    """Lock the data directory, open the account, optionally connect; close on exit."""
    folder = settings.data_dir
    if not (folder / DB_FILE).exists():
        raise CliError(
            EXIT_USAGE,
            f"no account in {folder}: run 'blindpost --data {folder} init USERNAME "
            "--relay URL' first",
        )
    client = await Client.open(folder, settings.passphrase, options=options)
    session = _Session(settings, client)
    try:
        if connect:
            await session.start()
        yield session
    finally:
        await session.close()


def _remove_account_files(folder: Path) -> None:
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", CURSOR_FILE):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
