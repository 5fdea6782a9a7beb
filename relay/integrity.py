# Invariants:
# * The high-water mark file (``relay.hwm`` beside the database) only grows while the relay
#   runs: it holds the highest mailbox seq any process of this data directory committed, written
#   after the commit (so it never claims more than the database had) and fsync'd; writers
#   serialise on an flock and keep the larger value. A database whose own seq is below it has
#   lost acknowledged messages. An empty file (killed between creating it and its first
#   write) holds no mark; any other content that is not a mark is damage.
# * ``inspect`` only reads: it is safe on a running relay (WAL readers never block the writer)
#   and on a stopped one; its quick_check is bounded in time when asked.
# * ``startup_check`` refuses to start on damage or missing acknowledged messages unless the
#   operator passed ``--accept-data-loss``, which then resets the mark to what the database holds.
"""Storage integrity: the acknowledged-messages high-water mark and the start-up check."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import StorageError
from relay.threadnames import name_os_thread

__all__ = [
    "DB_NAME",
    "HWM_NAME",
    "HighWaterMark",
    "IntegrityReport",
    "StartupRefused",
    "inspect",
    "read_high_water",
    "startup_check",
    "write_high_water",
]

log = logging.getLogger("relay.integrity")

DB_NAME = "relay.sqlite3"
HWM_NAME = "relay.hwm"
_HWM_PREFIX = "blindpost-relay acknowledged-seq "
# The mark is rewritten at most this often (seconds): each write is an fsync that also commits
# file metadata, which at hundreds of commits a second cost more CPU than the commits' own
# syncs (docs/performance-relay.md, issue 16).
HWM_MIN_INTERVAL = 0.05
_QUICK_CHECK_ERRORS = 20  # quick_check stops after this many problems


class StartupRefused(StorageError):
    """The relay will not start on this data directory (damage or lost acknowledged data)."""


def read_high_water(path: Path) -> int | None:
    """The mark stored at ``path``, or None if there is none.

    Raises:
        StorageError: the file exists but cannot be read or parsed.
    """
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    if not text:
        # What a kill between creating the file and its first write leaves: the mark was
        # never stored, so it claims nothing (a later start writes the database's seq).
        return None
    digits = text.strip().removeprefix(_HWM_PREFIX.strip()).strip()
    if not text.startswith(_HWM_PREFIX) or not digits.isascii() or not digits.isdigit():
        raise StorageError(f"{path} is not a high-water mark file")
    return int(digits)


def write_high_water(path: Path, seq: int, *, only_up: bool = True) -> int:
    """Store ``seq`` at ``path`` (fsync'd), under an flock shared by every process.

    Args:
        path: the mark file.
        seq: the new mark.
        only_up: keep the stored value if it is larger (the running relay); False to reset it
            (``--accept-data-loss``).

    Returns:
        The value now stored.

    Raises:
        OSError: the file cannot be written.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if only_up:
            with contextlib.suppress(ValueError):
                current = os.pread(fd, 64, 0).decode("ascii").removeprefix(_HWM_PREFIX).strip()
                if current.isascii() and current.isdigit():
                    seq = max(seq, int(current))
        data = f"{_HWM_PREFIX}{seq}\n".encode("ascii")
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return seq
    finally:
        os.close(fd)  # releases the lock


class HighWaterMark:
    """Keeps the mark file up to date from a background thread (one fsync per update, updates
    coalesced, at most one per ``HWM_MIN_INTERVAL``), so no write transaction waits for it.

    Args:
        path: the mark file.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._latest = 0
        self._written = 0
        self._wake = threading.Event()
        self._stop = threading.Event()  # ends the pause between two writes at once
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay-hwm", daemon=True)

    def start(self, seq: int) -> None:
        """Start the thread; ``seq`` is the database's seq at open (the mark is at least it)."""
        self._latest = seq
        self._wake.set()
        self._thread.start()

    def note(self, seq: int) -> None:
        """A transaction committed; the database's seq is now ``seq`` (cheap, any thread)."""
        if seq > self._latest:
            self._latest = seq
            self._wake.set()

    def close(self) -> None:
        """Write the last value and stop the thread."""
        self._stopping = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        name_os_thread()
        while True:
            self._wake.wait()
            self._wake.clear()
            latest = self._latest
            if latest > self._written:
                try:
                    self._written = write_high_water(self._path, latest)
                    self._stop.wait(HWM_MIN_INTERVAL)
                except OSError as exc:
                    log.error("cannot update %s: %s", self._path, exc)
                    time.sleep(1)
                    self._wake.set()
            if self._stopping and self._latest <= self._written:
                return


@dataclass(slots=True)
class IntegrityReport:
    """What ``inspect`` found.

    Attributes:
        problems: human-readable findings; empty when healthy.
        quick_check: ``"ok"``, ``"skipped"``, ``"timed out"`` or the first findings.
        db_seq: the database's highest committed mailbox seq (None if unreadable).
        high_water: the mark file's value (None if absent).
    """

    problems: list[str] = field(default_factory=list)
    quick_check: str = "skipped"
    db_seq: int | None = 0
    high_water: int | None = None

    @property
    def healthy(self) -> bool:
        """No problem found."""
        return not self.problems


def _quick_check(conn: sqlite3.Connection, seconds: float | None) -> list[str] | None:
    """Rows of ``PRAGMA quick_check`` (["ok"] when healthy); None if it ran out of time."""
    if seconds is not None:
        deadline = time.monotonic() + seconds
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = conn.execute(f"PRAGMA quick_check({_QUICK_CHECK_ERRORS})").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc).lower():
            return None
        raise
    finally:
        conn.set_progress_handler(None, 0)
    return [str(r[0]) for r in rows]


def inspect(data_dir: Path, *, check_seconds: float | None) -> IntegrityReport:
    """Read-only integrity inspection of a data directory (running relay or not).

    Args:
        data_dir: the relay's data directory.
        check_seconds: time bound of the quick_check; None = unbounded, 0 = skip it.

    Returns:
        The report; ``problems`` lists damage and missing acknowledged messages.
    """
    report = IntegrityReport()
    db = data_dir / DB_NAME
    try:
        report.high_water = read_high_water(data_dir / HWM_NAME)
    except StorageError as exc:
        report.problems.append(str(exc))
    if db.exists():
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(db, isolation_level=None, timeout=10)
            conn.execute("PRAGMA query_only=1")
            if check_seconds != 0:
                rows = _quick_check(conn, check_seconds)
                if rows is None:
                    report.quick_check = "timed out"
                    log.warning("quick_check did not finish in %.0f s; not checked", check_seconds)
                elif rows == ["ok"]:
                    report.quick_check = "ok"
                else:
                    report.quick_check = "; ".join(rows[:5])
                    report.problems.append(f"{db} is damaged (quick_check: {report.quick_check})")
            row = conn.execute("SELECT v FROM meta WHERE k='seq'").fetchone()
            report.db_seq = int(row[0]) if row else 0
        except sqlite3.Error as exc:
            report.db_seq = None
            report.problems.append(f"{db} cannot be read: {exc}")
        finally:
            if conn is not None:
                conn.close()
    hwm, seq = report.high_water, report.db_seq
    if hwm is not None and seq is not None and seq < hwm:
        report.problems.append(
            f"acknowledged messages are missing: the relay acknowledged messages up to seq {hwm}"
            f" ({HWM_NAME}) but {db} ends at seq {seq} (its write-ahead log lost its tail, or an"
            " older copy was restored)"
        )
    return report


def startup_check(data_dir: Path, *, check_seconds: float, accept_data_loss: bool) -> None:
    """Run before the relay serves: refuse a damaged database or lost acknowledged messages.

    Args:
        data_dir: the data directory.
        check_seconds: ``startup_check_seconds`` (0 skips the quick_check, never the mark).
        accept_data_loss: the operator's ``--accept-data-loss``: log the problems, reset the mark
            to what the database holds, and start.

    Raises:
        StartupRefused: problems found and ``accept_data_loss`` not given.
    """
    report = inspect(data_dir, check_seconds=check_seconds)
    if report.healthy:
        return
    for problem in report.problems:
        log.critical("%s", problem)
    if not accept_data_loss:
        raise StartupRefused(
            "refusing to start: " + "; ".join(report.problems) + ". Restore the data directory"
            " from a backup (see `blindpost-relay admin check --data DIR`), or start once with"
            " --accept-data-loss to serve what is left"
        )
    if report.db_seq is not None:
        write_high_water(data_dir / HWM_NAME, report.db_seq, only_up=False)
    log.warning("--accept-data-loss: starting anyway; the high-water mark is reset")
