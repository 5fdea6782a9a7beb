# Invariants:
# * One writer thread owns the only write connection. Concurrent write requests are queued and
#   committed together in one transaction (group commit); each caller's future resolves only
#   after the transaction's log frames were fsync'd: by COMMIT itself (synchronous=FULL), or,
#   with ``pipelined_sync``, by the sync thread's fdatasync of the log after COMMIT returned.
# * Early delivery: an accepted send's deliveries go to the early listener while its
#   transaction is still open, with seqs at most ``_EARLY_SEQS`` above the durable mark; a
#   store opened after an unclean close starts that far above it, so no seq is ever reused.
#   Every transaction's outcome reaches the loop in commit order, with the seq it settles.
# * The writer's in-memory caches (directory, mailbox quotas, sequence counters) are exact while
#   no other connection writes; each transaction starts, under the write lock, by checking
#   ``PRAGMA data_version`` and reloading them if another writer (another process sharing the
#   file) committed since, so seqs stay increasing in commit order across writers. Any
#   unexpected failure clears them too (they reload lazily).
# * A write operation validates everything before its first statement that changes data, so a
#   typed error (409, 507, ...) leaves the batch's transaction untouched. Sends defer their
#   INSERTs to one executemany per table per batch; every other operation, and COMMIT, first
#   flushes them, so no statement ever sees the batch without its earlier sends.
# * Staging on the loop: the event loop may check and stage sends itself (``_stage_on_loop``)
#   into the transaction open to it: the writer's, while it waits for more writes, or the next
#   one, while the previous one's closing statements and COMMIT run. It does so under the state
#   lock (the writer holds it whenever it uses its in-memory state; the loop waits for it at
#   most ``_LOOP_LOCK_WAIT``), with lookups on a read connection of its own and from the caches
#   only (a miss hands the send to the writer), and stages nothing while queued writes are still
#   to be taken, so writes join transactions in the order they were submitted. The writer's
#   connection is the writer thread's alone.
# * Reads use separate read-only connections on a small thread pool; WAL lets them run beside
#   the writer and see every transaction committed before they start.
# * Checkpoints never run inside a COMMIT: a checkpoint thread copies the log in the background
#   (PASSIVE, blocking nobody) and the writer finishes the copy between two transactions, so the
#   log starts over; if the thread stops finishing, the writer checkpoints on its own.
# * Storage failures are typed and never silent: a disk-full or I/O error fails its whole batch
#   once (503, one log line) and makes ``ready()`` false until a probe write of realistic size
#   commits; a corruption error (read or write) marks the store damaged for good: every later
#   write is refused. After each commit the seq reached is handed to the high-water mark
#   (relay.integrity), off the write path.
# * Only opaque bytes are stored: ciphertext bodies and public keys. Once the last mailbox row of
#   a message is gone, its ``messages`` row (sender, time, id) is deleted in the same statement
#   (trigger ``mailbox_forget``) and only a ``dedupe`` record (relay.store.dedupe) stays; the
#   writer deletes with ``secure_delete`` on, so the freed bytes are zeroed in the file.
"""SQLite implementation of ``RelayStore`` with a single group-committing writer thread."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import (
    AccountQuotaExceeded,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PredecessorMissing,
    RelayError,
    StorageError,
)
from relay.integrity import HighWaterMark
from relay.store.base import (
    PAUSE_BUCKETS,
    Address,
    Delivery,
    DeliveryListener,
    DeviceBundle,
    DeviceInfo,
    EarlyDeliveryListener,
    Envelope,
    Invite,
    KeyUpload,
    OneTimePrekey,
    PauseStats,
    ProvisionFill,
    ProvisionSlot,
    ProvisionTake,
    SenderKeyRow,
    SendReceipt,
    SignedPrekey,
    StoredMessage,
    StoreLimits,
    StoreStats,
    SweepReport,
)
from relay.store.dedupe import DedupeRules, new_secret
from relay.store.rules import check_quota, check_sender_share, resolve_recipients
from relay.threadnames import name_os_thread

__all__ = ["SCHEMA_VERSION", "SqliteRelayStore", "StorageHealth"]

log = logging.getLogger("relay.store")

# 2: dedupe records replace the body-less messages rows; incremental auto-vacuum.
# 3: senders settle their sends (table ``settle`` and its trigger): the record goes at once.
SCHEMA_VERSION = 3
_SWEEP_CHUNK = 5000
# Dedupe records one sweep call deletes at most (the other backends: dedupe.SWEEP_CHUNK). Here
# a call runs inside the writer's transaction, so every send that arrives while it runs waits
# for it, and every bucket (a tenth of the window: 30 s by default) a whole bucket falls due
# (90,000 records at 3,000 msg/s), deleted over the next seconds. Smaller calls make that wait
# shorter: on a 1,980,000-record table (`bench/relay_soak.py --sweep-cost 1980000`, each call
# its own transaction here) a call of 1,000 took p50 4.5 ms, of 250 p50 2.6 ms, about 2 ms of
# it the commit that a running relay shares with the batch (docs/performance-relay.md, "Holding
# steady"). With the sweeper's pauses (relay.app) it still deletes about 20,000 records/s.
SWEEP_CHUNK = 250
# The sweeper gives free pages back to the file system only beyond this share of the file
# (free pages are reused by later writes anyway; under a steady load the file stays as it is),
# and at most this many pages per sweep (each moved page is a write, done by the writer).
_VACUUM_FREE_SHARE = 4  # vacuum when more than 1/4 of the pages are free, down to 1/8
_VACUUM_MIN_PAGES = 2048
_VACUUM_MAX_PAGES = 1024
_STATEMENT_CACHE = 1024
_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # a log file that grew past this shrinks when it starts over
# Without a background checkpoint finishing for this many times ``checkpoint_commits`` commits
# (its thread failed, or readers held it back), the writer checkpoints itself, so the log stays
# bounded whatever happens.
_CHECKPOINT_FALLBACK_FACTOR = 8
# ... and at least this often (seconds) while commits happen, however few.
_CHECKPOINT_SECONDS = 2.0
# A background checkpoint repeats (up to this many passes) while more than this many log frames
# were committed during its previous pass.
_CHECKPOINT_PASSES = 4
_CHECKPOINT_CLOSE_FRAMES = 64
_PROBE_MIN_BYTES = 64 * 1024
# Early delivery: a transaction hands out seqs before its COMMIT only up to this far above the
# last durable mark, and a store opened after a crash (no clean close) starts this far above
# it, so a seq once shown uncommitted is never given to another message.
_EARLY_SEQS = 1 << 20
# A send to more devices than this is pushed after its commit, as before early delivery: its
# sender is answered first (the group fan-out target is about that answer), and pushing a
# large fan-out early would only compete with its own commit for the loop and the GIL.
_EARLY_MAX_FANOUT = 64
# How long (seconds) the loop waits for the writer's state lock before it hands its sends to the
# writer's queue instead.
_LOOP_LOCK_WAIT = 0.001
_BUSY_TIMEOUT_MS = 10000
_TRUNCATE_WAIT_MS = 50
# The log is emptied after a sweep only once no write came for this long. A TRUNCATE checkpoint
# holds the writer while it copies what is left of the log, syncs the database file and cuts the
# log to zero bytes, after which every commit grows the file again (a costlier sync) until it
# reaches its working size; run whenever the queue happened to be empty between two batches, it
# did that once a minute under load, in the middle of the traffic (docs/performance-relay.md,
# "Holding steady"). Under load the log is overwritten from its start after every checkpoint
# anyway, so what it holds of deleted rows lasts about one log cycle.
_TRUNCATE_IDLE_SECONDS = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
-- One row, rewritten by the readiness probe after a failed write (see ready()).
CREATE TABLE IF NOT EXISTS probe(k INTEGER PRIMARY KEY, b BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users(
    pk INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
    pk INTEGER PRIMARY KEY, user_pk INTEGER NOT NULL, device_id INTEGER NOT NULL,
    auth_key BLOB NOT NULL, created_ms INTEGER NOT NULL,
    registration_id INTEGER, identity_key BLOB, spk_id INTEGER, spk_pub BLOB, spk_sig BLOB,
    name BLOB, seen_ms INTEGER, UNIQUE(user_pk, device_id));
CREATE TABLE IF NOT EXISTS otpks(
    device_pk INTEGER NOT NULL, key_id INTEGER NOT NULL, public_key BLOB NOT NULL,
    PRIMARY KEY(device_pk, key_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages(
    pk INTEGER PRIMARY KEY, msg_id BLOB NOT NULL UNIQUE, sender TEXT NOT NULL,
    sender_device INTEGER NOT NULL, stored_ms INTEGER NOT NULL, n_recipients INTEGER NOT NULL,
    body BLOB, dkey BLOB, dexp INTEGER);
CREATE INDEX IF NOT EXISTS messages_stored ON messages(stored_ms);
CREATE TABLE IF NOT EXISTS mailbox(
    device_pk INTEGER NOT NULL, seq INTEGER NOT NULL, msg_pk INTEGER NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY(device_pk, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS mailbox_msg ON mailbox(msg_pk, device_pk);
CREATE TABLE IF NOT EXISTS blobs(
    id TEXT PRIMARY KEY, size INTEGER NOT NULL, stored_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_stored ON blobs(stored_ms);
-- user_pk has sent at least one message to peer_pk: the "answered" relation of the per-sender
-- mailbox share (relay.store.rules.check_sender_share).
CREATE TABLE IF NOT EXISTS wrote_to(
    user_pk INTEGER NOT NULL, peer_pk INTEGER NOT NULL, PRIMARY KEY(user_pk, peer_pk))
    WITHOUT ROWID;
-- Who holds which blob (the uploaders; several users may upload the same content).
CREATE TABLE IF NOT EXISTS blob_owners(
    blob_id TEXT NOT NULL, username TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY(blob_id, username)) WITHOUT ROWID;
-- Bytes stored per account (account_max_bytes): bodies of its messages still waiting in some
-- mailbox (kept by the triggers below as bodies are stored, dropped or expire) and blobs it
-- holds.
CREATE TABLE IF NOT EXISTS account_bytes(
    username TEXT PRIMARY KEY, sent INTEGER NOT NULL DEFAULT 0,
    blobs INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS account_sent_insert AFTER INSERT ON messages
WHEN NEW.body IS NOT NULL
BEGIN
    INSERT INTO account_bytes(username, sent) VALUES (NEW.sender, length(NEW.body))
    ON CONFLICT(username) DO UPDATE SET sent = sent + length(NEW.body);
END;
CREATE TRIGGER IF NOT EXISTS account_sent_dropped AFTER UPDATE OF body ON messages
WHEN OLD.body IS NOT NULL AND NEW.body IS NULL
BEGIN
    UPDATE account_bytes SET sent = sent - length(OLD.body) WHERE username = OLD.sender;
END;
CREATE TRIGGER IF NOT EXISTS account_sent_deleted AFTER DELETE ON messages
WHEN OLD.body IS NOT NULL
BEGIN
    UPDATE account_bytes SET sent = sent - length(OLD.body) WHERE username = OLD.sender;
END;
CREATE TRIGGER IF NOT EXISTS account_blob_held AFTER INSERT ON blob_owners
BEGIN
    INSERT INTO account_bytes(username, blobs) VALUES (NEW.username, NEW.size)
    ON CONFLICT(username) DO UPDATE SET blobs = blobs + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS account_blob_released AFTER DELETE ON blob_owners
BEGIN
    UPDATE account_bytes SET blobs = blobs - OLD.size WHERE username = OLD.username;
END;
CREATE TABLE IF NOT EXISTS bans(username TEXT PRIMARY KEY, banned_ms INTEGER NOT NULL)
    WITHOUT ROWID;
-- The public key that verifies a user's recovery key (never the key itself).
CREATE TABLE IF NOT EXISTS recovery(username TEXT PRIMARY KEY, verifier BLOB NOT NULL)
    WITHOUT ROWID;
-- Device-link provisioning slots (docs/relay-api.md, "Provisioning"): the new device's public
-- auth key, the SHA-256 of its fetch token, and the encrypted grant once an approver put it.
CREATE TABLE IF NOT EXISTS provisions(
    slot_id BLOB PRIMARY KEY, token_hash BLOB NOT NULL, auth_key BLOB NOT NULL,
    expires_ms INTEGER NOT NULL, grant_ct BLOB) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS provisions_expires ON provisions(expires_ms);
-- Sender-certificate signing keys (relay.sealed); every node of the relay signs with these.
CREATE TABLE IF NOT EXISTS sender_keys(
    key_id INTEGER PRIMARY KEY, seed BLOB NOT NULL, created_ms INTEGER NOT NULL,
    endorsement BLOB);
-- A hash of each user's current delivery token (sealed sender), never the token or its key.
CREATE TABLE IF NOT EXISTS access(username TEXT PRIMARY KEY, verifier BLOB NOT NULL)
    WITHOUT ROWID;
-- Invite codes by SHA-256 (the codes themselves are never stored); single-use.
CREATE TABLE IF NOT EXISTS invites(
    code_hash BLOB PRIMARY KEY, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    used_by TEXT, used_ms INTEGER) WITHOUT ROWID;
-- De-duplication records of delivered messages (relay.store.dedupe): a keyed digest of
-- (sender, device, message id), the recipient count and a coarse expiry bucket; nothing else.
CREATE TABLE IF NOT EXISTS dedupe(
    key BLOB PRIMARY KEY, expires INTEGER NOT NULL, recipients INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_expires ON dedupe(expires);
CREATE TABLE IF NOT EXISTS dedupe_secret(
    id INTEGER PRIMARY KEY CHECK (id = 1), secret BLOB NOT NULL);
-- Once no mailbox row references a message, its row (sender, time, id, body) goes and only its
-- dedupe record (digest and bucket computed at send time: dkey, dexp) stays. Inside SQLite,
-- per deleted row: no statement of its own in the writer's batch (each statement costs the
-- writer a GIL hand-off; see _run_transaction).
CREATE TRIGGER IF NOT EXISTS mailbox_forget AFTER DELETE ON mailbox
WHEN NOT EXISTS (SELECT 1 FROM mailbox WHERE msg_pk=OLD.msg_pk)
BEGIN
    INSERT OR IGNORE INTO dedupe(key, expires, recipients)
    SELECT dkey, dexp, n_recipients FROM messages WHERE pk=OLD.msg_pk AND dkey IS NOT NULL;
    DELETE FROM messages WHERE pk=OLD.msg_pk;
END;
-- A sender settles its sends (it will never send them again; StoreLimits.dedupe_window_ms): an
-- INSERT here of (dedupe key, message id) rows drops each one's dedupe record, or keeps the
-- message still queued from leaving one, and stores nothing (RAISE(IGNORE) skips the row).
-- One statement for all of a batch's settled ids, as for its acks (see _run_transaction).
-- The key is the sender's digest, so nobody settles another's message.
CREATE TABLE IF NOT EXISTS settle(key BLOB NOT NULL, msg_id BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS settle_forget BEFORE INSERT ON settle
BEGIN
    UPDATE messages SET dkey=NULL WHERE msg_id=NEW.msg_id AND dkey=NEW.key;
    DELETE FROM dedupe WHERE key=NEW.key;
    SELECT RAISE(IGNORE);
END;
"""

T = TypeVar("T")

_OTHER, _SEND, _ACK = 0, 1, 2
_NO_OP: Any = object()  # the writer's wait for more writes ended without one
_MAX_VARS = 30000  # below SQLite's default SQLITE_MAX_VARIABLE_NUMBER (32766)
# A batch's statements bind a variable number of rows, and each row count is a statement of its
# own in every connection's statement cache: a 1,000-row INSERT holds about 850 kB prepared, so
# an overload's batches (up to write_batch_max operations) once filled the caches with hundreds
# of MB that stayed (RSS 49 -> 900 MB after three 8 s bursts at 14,000 msg/s offered). Row
# counts up to _EXACT_ROWS keep a statement each (light load: one statement per table); larger
# ones come in powers of two (INSERTs split into such chunks, IN lists padded by repeating their
# last value), so each family has at most _EXACT_ROWS + 8 shapes.
_EXACT_ROWS = 32


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _row_chunks(n: int, most: int) -> list[int]:
    """Statement sizes for ``n`` rows: powers of two above ``_EXACT_ROWS`` (at most ``most``,
    itself a power of two), then one exact remainder of at most ``_EXACT_ROWS``."""
    sizes = []
    while n > _EXACT_ROWS:
        size = min(most, _pow2_floor(n))
        sizes.append(size)
        n -= size
    if n:
        sizes.append(n)
    return sizes


def _padded(values: list[Any]) -> list[Any]:
    """``values`` for an IN list: as they are up to ``_EXACT_ROWS``, else repeated last value up
    to the next power of two (a value listed twice matches the same rows once)."""
    n = len(values)
    if n <= _EXACT_ROWS:
        return values
    return values + [values[-1]] * ((1 << (n - 1).bit_length()) - n)


# The most (device pk, message id) pairs or sends one ack DELETE or dedupe lookup names.
_IN_CHUNK = _pow2_floor(_MAX_VARS // 2)

_INSERT_MAILBOX = "INSERT INTO mailbox(device_pk, seq, msg_pk, size) VALUES "
_INSERT_MESSAGE = (
    "INSERT INTO messages(pk, msg_id, sender, sender_device, stored_ms, n_recipients, body, "
    "dkey, dexp) VALUES "
)


def _ack_delete_sql(n: int) -> str:
    """DELETE of the mailbox rows named by ``n`` (device pk, message id) pairs, returning each
    removed row's (device pk, size, message id, sender).

    SQLite finds the rows through the ``mailbox_msg`` index (msg_pk, device_pk): the row values
    are listed in that order, so every acked id costs one index search, whatever the number of
    queued messages (an earlier form scanned the whole mailbox table once per batch of acks:
    14-17 ms for 217 acks against 50,000 queued rows, instead of 2 ms).
    """
    pairs = ",".join(["(?,?)"] * n)
    return (
        f"WITH req(d, mid) AS (VALUES {pairs}) "  # noqa: S608
        "DELETE FROM mailbox WHERE (msg_pk, device_pk) IN "
        "(SELECT m.pk, req.d FROM req JOIN messages m ON m.msg_id = req.mid) "
        "RETURNING device_pk, size, (SELECT msg_id FROM messages WHERE pk = msg_pk), "
        "(SELECT sender FROM messages WHERE pk = msg_pk)"
    )


def _connect(path: Path, *, readonly: bool, cache_kib: int) -> sqlite3.Connection:
    # Batches bind a variable number of rows, so each statement family has one SQL text per row
    # count (at most _EXACT_ROWS + 8 of them); a large statement cache keeps all of them
    # prepared instead of re-parsing them.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=_STATEMENT_CACHE
    )
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    if not readonly:
        # Takes effect only in a new, empty file, and only before the journal mode is set;
        # an older file is switched once by _use_incremental_vacuum.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")  # keeps the random msg_id index hot
    if readonly:
        conn.execute("PRAGMA query_only=1")
    else:
        # Checkpoints are explicit (see _Checkpointer): an automatic one would run inside the
        # writer's COMMIT and hold every write behind it for the copy and its fsync.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        # Deleted rows (a delivered message's sender, id and time) are overwritten with zeros,
        # not left in free space for anyone reading the file later.
        conn.execute("PRAGMA secure_delete=ON")
    return conn


# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xff).
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26
_CORRUPTION = frozenset({_SQLITE_CORRUPT, _SQLITE_NOTADB})
_ENVIRONMENT = frozenset({_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN})


def _error_class(exc: BaseException) -> str | None:
    """``"corrupt"`` for a damaged file, ``"io"`` for disk full / I/O failure, else None."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return None
    primary = code & 0xFF
    if primary in _CORRUPTION:
        return "corrupt"
    if primary in _ENVIRONMENT:
        return "io"
    return None


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return f"{name}: {exc}"


@dataclass(slots=True)
class StorageHealth:
    """What the store knows about its file (read by the readiness check).

    Attributes:
        write_error: why the last write transaction failed (disk full, I/O error); cleared
            when a readiness probe write (``ready()``) commits.
        damaged: why the file is considered damaged (a corruption error met by a read or a
            write); never cleared while the store is open: writes are refused.
    """

    write_error: str | None = None
    damaged: str | None = None


@dataclass(slots=True)
class _UserEntry:
    pk: int
    devices: dict[int, int] = field(default_factory=dict)  # device_id -> device pk
    wrote_to: set[int] | None = None  # user pks this user has sent to; loaded on first use


@dataclass(slots=True)
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    kind: int = 0  # _OTHER, _SEND (rows deferred to flush) or _ACK (run together at the end)
    n: int = 0  # place in the write queue (1, 2, ...); 0 for an op that never went through it


@dataclass(slots=True)
class _Txn:
    """The open write transaction: what it took and what its writers will be answered.

    Shared by the writer thread and, while it is open to the loop (``_txn``), the event loop's
    staging (``SqliteRelayStore._stage_on_loop``); both touch it only under the state lock.
    """

    early_limit: int  # seqs above this are not pushed before the commit
    taken: list[_Op] = field(default_factory=list)
    results: list[tuple[asyncio.Future[Any], bool, Any]] = field(default_factory=list)
    acks: list[_Op] = field(default_factory=list)
    pushed: int = 0  # deliveries already handed out early (a prefix of _WriterState.deliveries)
    error: BaseException | None = None  # an unexpected failure while the loop staged


class _CacheMiss(Exception):
    """A check staged on the loop (``_WriterState.cache_only``) needs a row that is not in the
    writer's caches; the send goes to the writer, which reads it on its own connection."""


class _StaleCaches(Exception):
    """Another connection committed before the writer's transaction began, after the loop had
    staged sends on the caches that commit may have made stale: the sends are checked again."""


@dataclass(slots=True)
class _Closing:
    """What a transaction writes when it closes, taken from the writer's state
    (``_WriterState.detach``) so the loop can stage the next transaction's sends meanwhile."""

    msgs: list[tuple[Any, ...]]
    mailbox: list[tuple[int, int, int, int]]
    wrote: list[tuple[int, int]]
    seq: int  # the seq mark: every seq up to it is settled by this transaction
    seq_dirty: bool
    deliveries: list[Delivery]


@dataclass(slots=True)
class _AckPlan:
    """A transaction's acks resolved to mailbox keys (``_WriterState.ack_plan``)."""

    settled: list[tuple[bytes, bytes]]  # (dedupe key, message id) of settled sends
    owner: dict[tuple[int, bytes], int]  # (device pk, message id) -> first request
    n: int  # requests


class _Pauses:
    """A histogram of one writer step's durations (``PauseStats``), kept by the writer."""

    __slots__ = ("counts", "seconds", "step")

    def __init__(self, step: str) -> None:
        self.step = step
        self.counts = [0] * (len(PAUSE_BUCKETS) + 1)
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def snapshot(self) -> PauseStats:
        return PauseStats(self.step, tuple(self.counts), self.seconds)


class _WriterState:
    """Everything the writer thread owns: the connection and exact caches."""

    def __init__(self, conn: sqlite3.Connection, limits: StoreLimits, rules: DedupeRules) -> None:
        self.conn = conn
        self.limits = limits
        self.rules = rules
        self.users: dict[str, _UserEntry] = {}
        self.quota: dict[int, list[int]] = {}  # device pk -> [count, bytes]
        # device pk -> sender username -> [count, bytes]; loaded with ``quota``, kept exact
        self.shares: dict[int, dict[str, list[int]]] = {}
        self.pending_wrote: list[tuple[int, int]] = []
        # user -> stored bytes, never below the truth (sends add; drops happen in SQLite
        # triggers, so an entry is reread exactly before it refuses anything)
        self.account: dict[str, int] = {}
        self.batch_sent: dict[str, int] = {}  # bytes of this batch's sends not yet flushed
        self.deliveries: list[Delivery] = []
        # (start, end) in ``deliveries`` of sends to more than _EARLY_MAX_FANOUT devices
        self.fanouts: list[tuple[int, int]] = []
        self.pending_msgs: list[tuple[Any, ...]] = []
        self.pending_mailbox: list[tuple[int, int, int, int]] = []
        self.batch_ids: dict[bytes, tuple[str, int, int, int]] = {}
        # Sends of the open transaction already flushed to it, and of the transaction being
        # committed: the loop's lookups (on a connection of its own, which sees only committed
        # rows) find them here until the COMMIT that writes them has returned.
        self.txn_ids: dict[bytes, tuple[str, int, int, int]] = {}
        self.committing_ids: dict[bytes, tuple[str, int, int, int]] = {}
        # Set while the loop stages: a check that would read SQLite raises _CacheMiss instead.
        self.cache_only = False
        self.known: dict[bytes, tuple[str, int, int, int]] = {}
        self.known_delivered: dict[bytes, tuple[int, int]] = {}  # digest -> (expires, recipients)
        # The chunk's dedupe keys as begin_batch computed them: message id -> (sender, key).
        self.keys_of: dict[bytes, tuple[Address, bytes]] = {}
        self.truncate_log = False  # a sweep asks the writer to empty the log when idle
        row = conn.execute("SELECT v FROM meta WHERE k='seq'").fetchone()
        self.seq = int(row[0]) if row else 0
        # The seq mark of the last COMMIT known durable (set after its sync): early seqs stay
        # within _EARLY_SEQS of it, so the skip after a crash covers them even when the crash
        # was a power loss that took unsynced commits with it.
        self.durable_seq = self.seq
        self.seq_dirty = False
        row = conn.execute("SELECT max(pk) FROM messages").fetchone()
        self.next_msg_pk = int(row[0] or 0) + 1
        self.queued = int(conn.execute("SELECT count(*) FROM mailbox").fetchone()[0])
        self.accepted = 0
        self.commits = 0
        self.committed_ops = 0
        self.loop_staged = 0
        # What holds every write behind it: the writer's own checkpoint between transactions
        # (its fsyncs), and a transaction's closing steps up to COMMIT's return (nothing is
        # staged meanwhile). relay_soak.py prints them per interval.
        self.checkpoint_pauses = _Pauses("checkpoint")
        self.commit_pauses = _Pauses("commit")
        self.checkpointed_at = 0  # self.commits when the log was last fully checkpointed
        self.checkpointed_time = time.monotonic()  # and when
        self.blob_bytes = int(conn.execute("SELECT coalesce(sum(size),0) FROM blobs").fetchone()[0])
        self.data_version = self._data_version()

    def checkpoint(self) -> None:
        """Copy the rest of the write-ahead log into the database file (outside a transaction);
        the next transaction then starts the log over from its beginning."""
        start = time.perf_counter()
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("checkpoint failed: %s", type(exc).__name__)
        self.checkpoint_pauses.add(time.perf_counter() - start)
        self.checkpointed_at = self.commits
        self.checkpointed_time = time.monotonic()

    def _data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def reset_caches(self) -> None:
        self.pending_msgs = []
        self.pending_mailbox = []
        self.pending_wrote = []
        self.batch_ids = {}
        self.txn_ids = {}
        self.committing_ids = {}
        self.users.clear()
        self.quota.clear()
        self.shares.clear()
        self.account.clear()
        self.batch_sent = {}
        self.deliveries.clear()
        self.fanouts.clear()
        conn = self.conn
        self.queued = int(conn.execute("SELECT count(*) FROM mailbox").fetchone()[0])
        self.blob_bytes = int(conn.execute("SELECT coalesce(sum(size),0) FROM blobs").fetchone()[0])
        row = conn.execute("SELECT v FROM meta WHERE k='seq'").fetchone()
        self.seq = max(self.seq, int(row[0]) if row else 0)
        row = conn.execute("SELECT max(pk) FROM messages").fetchone()
        self.next_msg_pk = max(self.next_msg_pk, int(row[0] or 0) + 1)

    # -- caches --------------------------------------------------------------------------

    def user(self, username: str) -> _UserEntry | None:
        entry = self.users.get(username)
        if entry is not None:
            return entry
        if self.cache_only:
            raise _CacheMiss
        row = self.conn.execute("SELECT pk FROM users WHERE username=?", (username,)).fetchone()
        if row is None:
            return None
        entry = _UserEntry(int(row[0]))
        for dev_id, dev_pk in self.conn.execute(
            "SELECT device_id, pk FROM devices WHERE user_pk=?", (entry.pk,)
        ):
            entry.devices[int(dev_id)] = int(dev_pk)
        if len(self.users) > 200_000:
            self.users.clear()
        self.users[username] = entry
        return entry

    def _devices_of(self, username: str) -> dict[int, int] | None:
        entry = self.user(username)
        return None if entry is None else entry.devices

    def device_pk(self, addr: Address) -> int | None:
        entry = self.user(addr.user)
        return None if entry is None else entry.devices.get(addr.device)

    def mailbox_usage(self, device_pk: int) -> list[int]:
        usage = self.quota.get(device_pk)
        if usage is None:
            if self.cache_only:
                raise _CacheMiss
            # One statement loads the mailbox's total and every sender's share of it.
            shares: dict[str, list[int]] = {}
            usage = [0, 0]
            for sender, count, size in self.conn.execute(
                "SELECT m.sender, count(*), sum(mb.size) FROM mailbox mb "
                "JOIN messages m ON m.pk = mb.msg_pk WHERE mb.device_pk=? GROUP BY m.sender",
                (device_pk,),
            ):
                shares[str(sender)] = [int(count), int(size)]
                usage[0] += int(count)
                usage[1] += int(size)
            if len(self.quota) > 200_000:
                self.quota.clear()
                self.shares.clear()
            self.quota[device_pk] = usage
            self.shares[device_pk] = shares
        return usage

    def sender_share(self, device_pk: int, sender: str) -> Sequence[int]:
        self.mailbox_usage(device_pk)
        return self.shares[device_pk].get(sender, (0, 0))

    def wrote_to(self, entry: _UserEntry) -> set[int]:
        peers = entry.wrote_to
        if peers is None:
            if self.cache_only:
                raise _CacheMiss
            peers = entry.wrote_to = {
                int(r[0])
                for r in self.conn.execute(
                    "SELECT peer_pk FROM wrote_to WHERE user_pk=?", (entry.pk,)
                )
            }
        return peers

    def stored_bytes(self, user: str) -> int:
        """Exact bytes stored for ``user``, this batch's unflushed sends included."""
        if self.cache_only:
            raise _CacheMiss
        row = self.conn.execute(
            "SELECT sent + blobs FROM account_bytes WHERE username=?", (user,)
        ).fetchone()
        return (0 if row is None else int(row[0])) + self.batch_sent.get(user, 0)

    def charge_account(self, user: str, size: int) -> None:
        """Count ``size`` more bytes for ``user``, or refuse.

        Raises:
            AccountQuotaExceeded: it would not fit.
        """
        limit = self.limits.account_max_bytes
        used = self.account.get(user)
        if used is None or used + size > limit:
            used = self.stored_bytes(user)
            if used + size > limit:
                self.account[user] = used
                raise AccountQuotaExceeded(limit)
        if len(self.account) > 200_000:
            self.account.clear()
        self.account[user] = used + size

    def answered(self, recipient: str, sender: _UserEntry) -> bool:
        entry = self.user(recipient)
        return entry is not None and sender.pk in self.wrote_to(entry)

    # -- accounts ------------------------------------------------------------------------

    def create_account(
        self, addr: Address, auth_key: bytes, now_ms: int, invite: bytes | None = None
    ) -> None:
        if self.user(addr.user) is not None:
            raise Conflict("username is taken", code="username_taken")
        if invite is not None:
            used = self.conn.execute(
                "UPDATE invites SET used_by=?, used_ms=? "
                "WHERE code_hash=? AND used_by IS NULL AND expires_ms >= ?",
                (addr.user, now_ms, invite, now_ms),
            ).rowcount
            if not used:
                raise Forbidden("unknown, used or expired invite code", code="invite_invalid")
        cur = self.conn.execute(
            "INSERT INTO users(username, created_ms) VALUES (?, ?)", (addr.user, now_ms)
        )
        user_pk = int(cur.lastrowid or 0)
        self.conn.execute(
            "INSERT INTO devices(user_pk, device_id, auth_key, created_ms) VALUES (?,?,?,?)",
            (user_pk, addr.device, auth_key, now_ms),
        )
        # Not cached here: the directory cache fills on first use (sends), so accounts that
        # only connect cost no writer memory.

    def add_device(
        self, addr: Address, auth_key: bytes, now_ms: int, name: bytes | None = None
    ) -> None:
        entry = self.user(addr.user)
        if entry is None:
            raise NotFound("unknown user", code="unknown_user")
        if addr.device in entry.devices:
            raise Conflict("device id already registered", code="device_exists")
        if len(entry.devices) >= self.limits.max_devices_per_user:
            raise Conflict("too many devices", code="too_many_devices")
        cur = self.conn.execute(
            "INSERT INTO devices(user_pk, device_id, auth_key, created_ms, name) "
            "VALUES (?,?,?,?,?)",
            (entry.pk, addr.device, auth_key, now_ms, name),
        )
        entry.devices[addr.device] = int(cur.lastrowid or 0)

    def remove_device(self, addr: Address) -> None:
        entry = self.user(addr.user)
        dev_pk = None if entry is None else entry.devices.get(addr.device)
        if entry is None or dev_pk is None:
            raise NotFound("unknown device", code="unknown_device")
        conn = self.conn
        removed = conn.execute("DELETE FROM mailbox WHERE device_pk=?", (dev_pk,)).rowcount
        conn.execute("DELETE FROM otpks WHERE device_pk=?", (dev_pk,))
        conn.execute("DELETE FROM devices WHERE pk=?", (dev_pk,))
        del entry.devices[addr.device]
        self.quota.pop(dev_pk, None)
        self.shares.pop(dev_pk, None)
        self.queued -= removed

    # -- keys ----------------------------------------------------------------------------

    def upload_keys(self, addr: Address, upload: KeyUpload) -> int:
        dev_pk = self.device_pk(addr)
        if dev_pk is None:
            raise NotFound("unknown device", code="unknown_device")
        conn = self.conn
        row = conn.execute(
            "SELECT identity_key, spk_id FROM devices WHERE pk=?", (dev_pk,)
        ).fetchone()
        stored_identity, spk_id = row
        if stored_identity is not None and bytes(stored_identity) != upload.identity_key:
            raise Conflict("a different identity key is registered", code="identity_mismatch")
        if spk_id is None and upload.signed_prekey is None:
            raise BadRequest("the first upload must include signed_prekey")
        existing = int(
            conn.execute("SELECT count(*) FROM otpks WHERE device_pk=?", (dev_pk,)).fetchone()[0]
        )
        new_ids = {k.id for k in upload.one_time_prekeys}
        if new_ids:
            marks = ",".join("?" * len(new_ids))
            already = int(
                conn.execute(
                    f"SELECT count(*) FROM otpks WHERE device_pk=? AND key_id IN ({marks})",  # noqa: S608
                    (dev_pk, *new_ids),
                ).fetchone()[0]
            )
        else:
            already = 0
        total = existing + len(new_ids) - already
        if total > self.limits.max_one_time_prekeys:
            raise Conflict("too many one-time prekeys stored", code="prekey_pool_full")
        conn.execute(
            "UPDATE devices SET identity_key=?, registration_id=? WHERE pk=?",
            (upload.identity_key, upload.registration_id, dev_pk),
        )
        spk = upload.signed_prekey
        if spk is not None:
            conn.execute(
                "UPDATE devices SET spk_id=?, spk_pub=?, spk_sig=? WHERE pk=?",
                (spk.id, spk.public_key, spk.signature, dev_pk),
            )
        conn.executemany(
            "INSERT OR REPLACE INTO otpks(device_pk, key_id, public_key) VALUES (?,?,?)",
            [(dev_pk, k.id, k.public_key) for k in upload.one_time_prekeys],
        )
        return total

    def fetch_bundles(
        self, user: str, device: int | None, one_time: bool = True
    ) -> list[DeviceBundle]:
        entry = self.user(user)
        if entry is None:
            raise NotFound("unknown user", code="unknown_user")
        if device is not None:
            dev_pk = entry.devices.get(device)
            targets = [] if dev_pk is None else [(device, dev_pk)]
        else:
            targets = sorted(entry.devices.items())
        conn = self.conn
        bundles: list[DeviceBundle] = []
        for dev_id, dev_pk in targets:
            row = conn.execute(
                "SELECT registration_id, identity_key, spk_id, spk_pub, spk_sig "
                "FROM devices WHERE pk=?",
                (dev_pk,),
            ).fetchone()
            if row is None or row[1] is None or row[2] is None:
                continue
            otpk_row = (
                conn.execute(
                    "SELECT key_id, public_key FROM otpks WHERE device_pk=? "
                    "ORDER BY key_id LIMIT 1",
                    (dev_pk,),
                ).fetchone()
                if one_time
                else None
            )
            otpk = None
            if otpk_row is not None:
                conn.execute(
                    "DELETE FROM otpks WHERE device_pk=? AND key_id=?", (dev_pk, otpk_row[0])
                )
                otpk = OneTimePrekey(int(otpk_row[0]), bytes(otpk_row[1]))
            bundles.append(
                DeviceBundle(
                    device_id=dev_id,
                    registration_id=int(row[0]),
                    identity_key=bytes(row[1]),
                    signed_prekey=SignedPrekey(int(row[2]), bytes(row[3]), bytes(row[4])),
                    one_time_prekey=otpk,
                )
            )
        if device is not None and not bundles:
            raise NotFound("unknown device or no keys uploaded", code="unknown_device")
        return bundles

    # -- messages ------------------------------------------------------------------------

    def _stored_by(self, sender: Address, message_id: bytes) -> bool:
        """Whether ``sender``'s message ``message_id`` is stored (queued, or delivered): read
        from this batch's sends and what :meth:`begin_batch` loaded (it loads SEND_AFTER's
        previous ids too)."""
        row = self._row_of(message_id)
        if row is not None:
            return row[0] == sender.user and int(row[1]) == sender.device
        return self._key_of(sender, message_id) in self.known_delivered

    def _row_of(self, message_id: bytes) -> tuple[str, int, int, int] | None:
        """The stored (sender, device, recipients, stored_ms) of a queued message: this
        transaction's (in memory until its COMMIT returned, for the loop's lookups), the one
        being committed, or what :meth:`begin_batch` loaded."""
        return (
            self.batch_ids.get(message_id)
            or self.txn_ids.get(message_id)
            or self.committing_ids.get(message_id)
            or self.known.get(message_id)
        )

    def send(self, sender: Address, env: Envelope, now_ms: int) -> SendReceipt:
        rules = self.rules
        dkey = self._key_of(sender, env.message_id)
        # The sender's own delivered message first: another sender may since have reused the id.
        done = self.known_delivered.get(dkey)
        if done is not None:
            return rules.receipt(env.message_id, done[1], done[0])
        row = self._row_of(env.message_id)
        if row is not None:
            if row[0] != sender.user or int(row[1]) != sender.device:
                raise Conflict("message id used by another sender", code="message_id_conflict")
            return SendReceipt(env.message_id, int(row[2]), int(row[3]))
        if env.after is not None and not self._stored_by(sender, env.after):
            raise PredecessorMissing()
        targets = resolve_recipients(sender, env.recipients, self._devices_of)
        size = len(env.body)
        lim = self.limits
        user = sender.user
        # None only for a sealed send's pseudonym (relay.sealed): no account, so a stranger
        # to every recipient, and it writes no "answered" rows.
        me = self.user(user)
        check_sender_share(
            user,
            targets,
            lambda dev_pk: self.sender_share(dev_pk, user),
            lambda peer: me is not None and self.answered(peer, me),
            size,
            lim,
        )
        check_quota(
            targets, self.mailbox_usage, size, lim.mailbox_max_messages, lim.mailbox_max_bytes
        )
        # Every read that may miss the caches comes before the first change (cache_only).
        new_peers: list[int] = []
        if me is not None:
            mine = self.wrote_to(me)
            for addr, _ in targets:
                if addr.user != user:
                    peer = self.user(addr.user)
                    if peer is not None and peer.pk not in mine and peer.pk not in new_peers:
                        new_peers.append(peer.pk)
        self.charge_account(user, size)
        self.batch_sent[user] = self.batch_sent.get(user, 0) + size
        if me is not None:
            for peer_pk in new_peers:
                mine.add(peer_pk)
                self.pending_wrote.append((me.pk, peer_pk))
        msg_pk = self.next_msg_pk
        # Rows are written by flush() with one executemany per table for the whole batch.
        self.pending_msgs.append(
            (
                msg_pk,
                env.message_id,
                sender.user,
                sender.device,
                now_ms,
                len(targets),
                env.body,
                dkey,
                rules.expires(now_ms),
            )
        )
        self.batch_ids[env.message_id] = (sender.user, sender.device, len(targets), now_ms)
        self.next_msg_pk = msg_pk + 1
        rows = self.pending_mailbox
        seq = self.seq
        if len(targets) > _EARLY_MAX_FANOUT:
            start = len(self.deliveries)
            self.fanouts.append((start, start + len(targets)))
        for addr, dev_pk in targets:
            seq += 1
            rows.append((dev_pk, seq, msg_pk, size))
            usage = self.quota[dev_pk]
            usage[0] += 1
            usage[1] += size
            shares = self.shares[dev_pk]
            share = shares.get(user)
            if share is None:
                shares[user] = [1, size]
            else:
                share[0] += 1
                share[1] += size
            self.deliveries.append(
                Delivery(addr, StoredMessage(seq, env.message_id, sender, now_ms, env.body))
            )
        self.seq = seq
        self.seq_dirty = True
        self.queued += len(targets)
        self.accepted += 1
        return SendReceipt(env.message_id, len(targets), now_ms)

    def flush(self) -> None:
        """Write the rows of the sends deferred in this batch (before any other statement)."""
        self.write_rows(*self._take_pending())

    def _take_pending(
        self,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """Take the deferred sends' rows (to be written now); their ids move to ``txn_ids``."""
        rows = (self.pending_msgs, self.pending_mailbox, self.pending_wrote)
        self.pending_msgs = []
        self.pending_mailbox = []
        self.pending_wrote = []
        self.batch_sent = {}
        if self.batch_ids:
            self.txn_ids.update(self.batch_ids)
            self.batch_ids = {}
        return rows

    def write_rows(
        self,
        msgs: Sequence[tuple[Any, ...]],
        mailbox: Sequence[tuple[int, int, int, int]],
        wrote: Sequence[tuple[int, int]],
    ) -> None:
        """INSERT deferred sends' rows (SQL only: no cache is read or changed)."""
        if msgs:
            self._insert_rows(_INSERT_MESSAGE, 9, msgs)
            self._insert_rows(_INSERT_MAILBOX, 4, mailbox)
        if wrote:
            self.conn.executemany(
                "INSERT OR IGNORE INTO wrote_to(user_pk, peer_pk) VALUES (?,?)", wrote
            )

    def detach(self) -> _Closing:
        """Take what the open transaction has still to write, and start the next one's in
        memory: its sends' ids stay findable (``committing_ids``) until ``committed``."""
        closing = _Closing(*self._take_pending(), self.seq, self.seq_dirty, self.deliveries)
        self.committing_ids, self.txn_ids = self.txn_ids, {}
        self.deliveries = []
        self.fanouts = []
        self.seq_dirty = False
        return closing

    def committed(self) -> None:
        """The detached transaction's COMMIT returned: its rows are visible to every reader."""
        self.committing_ids = {}

    def foreign_commit(self) -> bool:
        """Whether another connection committed since this one last looked (and note it)."""
        version = self._data_version()
        if version == self.data_version:
            return False
        self.data_version = version
        return True

    def _insert_rows(self, prefix: str, ncols: int, rows: Sequence[tuple[Any, ...]]) -> None:
        """One multi-row INSERT (one SQLite step) per chunk of rows (``_row_chunks``)."""
        one = "(" + ",".join("?" * ncols) + ")"
        start = 0
        for size in _row_chunks(len(rows), _pow2_floor(_MAX_VARS // ncols)):
            part = rows[start : start + size]
            start += size
            params = [v for row in part for v in row]
            self.conn.execute(prefix + ",".join([one] * size), params)

    def begin_batch(
        self, sends: Sequence[tuple[Address, bytes]], reader: sqlite3.Connection | None = None
    ) -> None:
        """Load, in one step, for deduplicating a chunk's (sender, message id) sends, the stored
        (sender, device, recipients, stored_at) of messages still queued and the dedupe records
        (expires, recipients) of delivered ones. Whether another connection committed was
        checked when the transaction began (:meth:`foreign_commit`); inside it none can.

        On the writer's connection (also when lent to the loop) the lookup sees the open
        transaction's rows; on ``reader`` (the loop's own connection, while the writer commits)
        only committed ones, and the uncommitted sends are found in memory (:meth:`_row_of`).
        """
        self.known = {}
        self.known_delivered = {}
        self.keys_of = {}
        digest = self.rules.digest
        conn = reader or self.conn
        for start in range(0, max(len(sends), 1), _IN_CHUNK):
            part = sends[start : start + _IN_CHUNK]
            ids = [mid for _, mid in part]
            keys = []
            for sender, mid in part:
                key = digest(sender, mid)
                keys.append(key)
                self.keys_of[mid] = (sender, key)
            ids, keys = _padded(ids), _padded(keys)
            marks = ",".join("?" * len(ids))
            # One statement, rows only for what exists (almost never): kind 0 a queued
            # message by id, kind 1 a delivered one's dedupe record by key.
            for kind, k, a, b, c, d in conn.execute(
                "SELECT 0, msg_id, sender, sender_device, n_recipients, stored_ms "  # noqa: S608
                f"FROM messages WHERE msg_id IN ({marks}) UNION ALL "
                f"SELECT 1, key, expires, recipients, 0, 0 FROM dedupe WHERE key IN ({marks})",
                ids + keys,
            ):
                if kind == 0:
                    self.known[k] = (a, b, c, d)
                else:
                    self.known_delivered[k] = (a, b)

    def _key_of(self, sender: Address, message_id: bytes) -> bytes:
        """The dedupe key of ``sender``'s ``message_id``: begin_batch's, or computed."""
        got = self.keys_of.get(message_id)
        if got is not None and got[0] == sender:
            return got[1]
        return self.rules.digest(sender, message_id)

    def ack_plan(
        self, requests: Sequence[tuple[Address, Sequence[bytes], Sequence[bytes]]]
    ) -> _AckPlan:
        """Resolve several devices' acks and settled sends (``RelayStore.ack``) from the caches,
        for :meth:`ack_run` (SQL only, so a closing transaction runs it while the loop stages
        the next one's sends) and :meth:`ack_apply` (the quota caches, after COMMIT).

        An id acknowledged twice in one batch counts for the first request only.
        """
        digest = self.rules.digest
        settled = {digest(addr, mid): mid for addr, _, mids in requests for mid in mids}
        owner: dict[tuple[int, bytes], int] = {}
        for i, (addr, ids, _) in enumerate(requests):
            dev_pk = self.device_pk(addr)
            if dev_pk is not None:
                for mid in ids:
                    owner.setdefault((dev_pk, mid), i)
        return _AckPlan(list(settled.items()), owner, len(requests))

    def ack_run(self, plan: _AckPlan) -> tuple[list[int], list[tuple[int, int, str]]]:
        """Run a plan's SQL: one INSERT into ``settle`` for all the settled ids (first, so a
        message acked and settled in one batch leaves no record at all), then one DELETE that
        returns the mailbox rows it removed (the ``mailbox_forget`` trigger replaces each
        message no mailbox references any more by its dedupe record). Return rows removed per
        request and each removed row's (device pk, size, sender)."""
        if plan.settled:
            self._insert_rows("INSERT INTO settle(key, msg_id) VALUES ", 2, plan.settled)
        counts = [0] * plan.n
        owner = plan.owner
        keys = list(owner)
        removed: list[tuple[int, int, str]] = []
        for start in range(0, len(keys), _IN_CHUNK):
            part = _padded(keys[start : start + _IN_CHUNK])
            for dev_pk, size, mid, sender in self.conn.execute(
                _ack_delete_sql(len(part)), [v for key in part for v in key]
            ).fetchall():
                counts[owner[(dev_pk, bytes(mid))]] += 1
                removed.append((dev_pk, int(size), sender))
        return counts, removed

    def ack_apply(self, removed: Sequence[tuple[int, int, str]]) -> None:
        """Take removed mailbox rows off the quota caches."""
        for dev_pk, size, sender in removed:
            usage = self.quota.get(dev_pk)
            if usage is not None:
                usage[0] -= 1
                usage[1] -= size
                shares = self.shares[dev_pk]
                share = shares.get(sender)
                if share is not None:
                    share[0] -= 1
                    share[1] -= size
                    if share[0] <= 0:
                        del shares[sender]
        self.queued -= len(removed)

    def ack(self, addr: Address, ids: Sequence[bytes], settled: Sequence[bytes] = ()) -> int:
        """One device's ack (an ack op's function; a transaction runs its acks together)."""
        counts, removed = self.ack_run(self.ack_plan([(addr, ids, settled)]))
        self.ack_apply(removed)
        return counts[0]

    # -- blobs and retention -------------------------------------------------------------

    def put_blob(self, blob_id: str, size: int, now_ms: int, owner: str | None) -> bool:
        conn = self.conn
        row = conn.execute("SELECT size FROM blobs WHERE id=?", (blob_id,)).fetchone()
        held = size if row is None else int(row[0])
        if owner is not None:
            known = conn.execute(
                "SELECT 1 FROM blob_owners WHERE blob_id=? AND username=?", (blob_id, owner)
            ).fetchone()
            if known is None:
                limit = self.limits.account_max_bytes
                if self.stored_bytes(owner) + held > limit:
                    raise AccountQuotaExceeded(limit)
                conn.execute(
                    "INSERT INTO blob_owners(blob_id, username, size) VALUES (?,?,?)",
                    (blob_id, owner, held),
                )
                self.account.pop(owner, None)
        cur = self.conn.execute("UPDATE blobs SET stored_ms=? WHERE id=?", (now_ms, blob_id))
        if cur.rowcount:
            return False
        self.conn.execute(
            "INSERT INTO blobs(id, size, stored_ms) VALUES (?,?,?)", (blob_id, size, now_ms)
        )
        self.blob_bytes += size
        return True

    def delete_blob(self, blob_id: str, owner: str) -> bool:
        conn = self.conn
        if not conn.execute(
            "DELETE FROM blob_owners WHERE blob_id=? AND username=?", (blob_id, owner)
        ).rowcount:
            raise NotFound("unknown blob", code="unknown_blob")
        self.account.pop(owner, None)
        if conn.execute("SELECT 1 FROM blob_owners WHERE blob_id=?", (blob_id,)).fetchone():
            return False
        row = conn.execute("DELETE FROM blobs WHERE id=? RETURNING size", (blob_id,)).fetchone()
        if row is not None:
            self.blob_bytes -= int(row[0])
        return True

    def sweep(self, now_ms: int) -> SweepReport:
        conn = self.conn
        lim = self.limits
        cutoff = now_ms - lim.message_ttl_ms
        expired = [
            int(r[0])
            for r in conn.execute(
                "SELECT pk FROM messages WHERE stored_ms < ? ORDER BY stored_ms LIMIT ?",
                (cutoff, _SWEEP_CHUNK),
            )
        ]
        removed_rows = 0
        for pk in expired:
            removed_rows += conn.execute("DELETE FROM mailbox WHERE msg_pk=?", (pk,)).rowcount
        conn.executemany("DELETE FROM messages WHERE pk=?", [(pk,) for pk in expired])
        forgotten = conn.execute(
            "DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe WHERE expires <= ? LIMIT ?)",
            (self.rules.current(now_ms), SWEEP_CHUNK),
        ).rowcount
        if forgotten < SWEEP_CHUNK:  # the last call of a sweep (it scans the table)
            # An account whose messages were all delivered and who holds no blob: its row
            # would only say that it once sent something.
            conn.execute("DELETE FROM account_bytes WHERE sent = 0 AND blobs = 0")
        blob_rows = conn.execute(
            "SELECT id, size FROM blobs WHERE stored_ms < ? LIMIT ?",
            (now_ms - lim.blob_ttl_ms, _SWEEP_CHUNK),
        ).fetchall()
        conn.executemany("DELETE FROM blobs WHERE id=?", [(r[0],) for r in blob_rows])
        conn.executemany("DELETE FROM blob_owners WHERE blob_id=?", [(r[0],) for r in blob_rows])
        if blob_rows:
            self.account.clear()
        self.blob_bytes -= sum(int(r[1]) for r in blob_rows)
        if removed_rows:
            self.quota.clear()
            self.shares.clear()
            self.account.clear()
            self.queued -= removed_rows
        self._vacuum_some()
        self.truncate_log = True
        more = _SWEEP_CHUNK in (len(expired), len(blob_rows)) or forgotten == SWEEP_CHUNK
        return SweepReport(len(expired), tuple(str(r[0]) for r in blob_rows), forgotten, more)

    def _vacuum_some(self) -> None:
        """Give free pages back to the file system when they are a large share of the file
        (after a backlog drained), a bounded number per sweep (incremental auto-vacuum)."""
        free, pages = self.conn.execute(
            "SELECT freelist_count, page_count FROM pragma_freelist_count, pragma_page_count"
        ).fetchone()
        if free > _VACUUM_MIN_PAGES and free * _VACUUM_FREE_SHARE > pages:
            n = min(free - pages // (2 * _VACUUM_FREE_SHARE), _VACUUM_MAX_PAGES)
            # One page per statement: Python's sqlite3 steps a statement without result
            # columns once, and each step of incremental_vacuum(N) frees one page (about
            # 10 us each, so 10 ms for the most one sweep frees).
            for _ in range(n):
                self.conn.execute("PRAGMA incremental_vacuum(1)")


class _Checkpointer:
    """Copies the write-ahead log into the database file on its own thread and connection.

    A checkpoint is the relay's largest single piece of disk work (every page changed since the
    last one is written to the database file, then fsync'd). Run inside the writer's COMMIT, as
    SQLite's automatic checkpoint does, it held every write behind it: 7-11 ms every ~300 ms at
    5,000 msg/s (docs/performance-relay-journal.md, fifth). Here it runs beside the writer; a
    PASSIVE checkpoint never blocks writers or readers. When a pass has finished (``finished``),
    the writer copies the few pages committed meanwhile itself, between two transactions, and
    its next transaction starts the log over, so the log file does not grow.
    """

    def __init__(self, path: Path) -> None:
        self._conn = _connect(path, readonly=False, cache_kib=2048)
        self._wake = threading.Event()
        self._stopping = False
        self.finished = False  # set here after a pass; read and cleared by the writer thread
        self._thread = threading.Thread(target=self._run, name="relay-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Start a pass (called by the writer; a pass already asked for is not repeated)."""
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (after a pass in progress) and close its connection."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        name_os_thread()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._catch_up()
            except sqlite3.Error as exc:
                log.warning("background checkpoint failed: %s", type(exc).__name__)
                continue
            self.finished = True

    def _catch_up(self) -> None:
        """Checkpoint, then again while the previous pass saw many frames committed meanwhile,
        so the copy left to the writer is small."""
        last_frames = None
        for _ in range(_CHECKPOINT_PASSES):
            _, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if last_frames is not None and frames - last_frames < _CHECKPOINT_CLOSE_FRAMES:
                return
            last_frames = frames


class _Syncer:
    """Makes committed transactions durable on its own thread (``pipelined_sync``).

    The write connection commits with ``synchronous=NORMAL``: COMMIT appends the transaction's
    frames to the write-ahead log and returns; this thread then runs ``fdatasync`` on the log
    and only after it returns hands each transaction's results on (``done``), in commit order.
    A sync covers every frame written before it started, so all commits that came while the
    previous sync ran share the next one. SQLite itself still syncs the log before every
    checkpoint and whenever the log starts over (its header), so the log it recovers after a
    power loss holds at least every transaction answered here.

    The log stays open between syncs (an ``fdatasync`` on any descriptor of the file syncs
    it): the writer's connection keeps the log file in place for as long as this thread runs,
    and each ``open`` and ``close`` was one more time the thread gave up the GIL and had to
    win it back from the event loop. After a failed sync the file is opened again.
    """

    def __init__(self, log_path: Path, done: Callable[[list[Any], OSError | None], None]) -> None:
        self._path = log_path
        self._fd: int | None = None  # the log, open between syncs (this thread's only)
        self._done = done
        self._items: list[Any] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay-sync", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        """Queue one transaction's outcome; it is passed to ``done`` after the next sync."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def close(self) -> None:
        """Sync and hand on what is queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                items, self._items = self._items, []
            if not items:
                return
            error: OSError | None = None
            try:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                os.fdatasync(self._fd)
            except OSError as exc:
                error = exc
                self._release()  # the next sync opens the file again
            try:
                self._done(items, error)
            except Exception:
                log.exception("sync hand-off failed")


class SqliteRelayStore:
    """``RelayStore`` on SQLite (WAL, synchronous=FULL) with group commit.

    Args:
        path: database file (created with its directory if missing).
        limits: quotas and retention.
        read_threads: size of the read connection pool.
        probe_bytes: size of the readiness probe's write after a failed write (the relay
            passes ``max_message_bytes``).
        high_water: the acknowledged-messages mark file (relay.integrity) kept up to date after
            every commit; None keeps none.
    """

    def __init__(
        self,
        path: Path,
        limits: StoreLimits | None = None,
        read_threads: int = 2,
        *,
        probe_bytes: int = 256 * 1024,
        high_water: Path | None = None,
    ):
        self._probe_bytes = probe_bytes
        self._hwm = HighWaterMark(high_water) if high_water is not None else None
        self._path = Path(path)
        self._limits = limits or StoreLimits()
        self._read_threads = read_threads
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._state: _WriterState | None = None
        self._checkpointer: _Checkpointer | None = None
        self._syncer: _Syncer | None = None
        # Acks submitted while a transaction is open (``_submit``), applied by it before COMMIT.
        self._side_lock = threading.Lock()
        self._side_acks: list[_Op] = []
        self._open = False
        # Staging on the loop (``loop_staging``): the writer's in-memory state is used by the
        # writer thread, or by the loop in the transaction open to it (``_txn``); either holds
        # ``_state_lock`` meanwhile (the loop waits for it at most ``_LOOP_LOCK_WAIT``).
        # Without commit pacing no transaction ever waits for more writes, so none is open.
        self._loop_staging = self._limits.loop_staging and self._limits.write_batch_interval_ms > 0
        self._state_lock = threading.Lock()
        self._txn: _Txn | None = None
        self._loop_reader: sqlite3.Connection | None = None  # the loop's lookups (its thread only)
        # Set by the writer while it waits for more writes (under the state lock): its own
        # connection is idle then, inside the open transaction, so the loop uses it, with a warm
        # page cache and no cache-only restriction (a read connection loses its page cache
        # whenever another connection commits).
        self._lend_conn = False
        self._loop_sends: list[_Op] = []  # sends submitted in this loop iteration
        self._queued_n = 0  # ``n`` of the last op put in the queue (loop thread)
        self._staged_n = 0  # ``n`` of the last queued op the writer took into a transaction
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: DeliveryListener | None = None
        self._early: EarlyDeliveryListener | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._closed = False
        self.health = StorageHealth()

    @property
    def limits(self) -> StoreLimits:
        """The quotas, retention and batching this store was opened with."""
        return self._limits

    # -- lifecycle -----------------------------------------------------------------------

    def set_delivery_listener(self, listener: DeliveryListener | None) -> None:
        """Register the live-delivery callback (see ``RelayStore``)."""
        self._listener = listener

    def set_early_delivery_listener(self, listener: EarlyDeliveryListener | None) -> None:
        """Register the listener of staged, not yet committed, deliveries (see
        ``EarlyDeliveryListener``); None pushes only after COMMIT."""
        self._early = listener

    async def open(self) -> None:
        """Create the schema and start the writer thread.

        Raises:
            StorageError: the database cannot be opened or has a newer schema.
        """
        self._loop = asyncio.get_running_loop()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(self._path, readonly=False, cache_kib=65536)
            had_accounting = _has_table(conn, "account_bytes")
            _forget_tombstones(conn)
            conn.executescript(_SCHEMA)
            _device_columns(conn)
            if not had_accounting:  # a database from before per-account quotas
                conn.execute(
                    "INSERT OR IGNORE INTO account_bytes(username, sent) SELECT sender, "
                    "sum(length(body)) FROM messages WHERE body IS NOT NULL GROUP BY sender"
                )
            row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta(k, v) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(f"database schema {row[0]} is newer than {SCHEMA_VERSION}")
            elif int(row[0]) < SCHEMA_VERSION:
                conn.execute("UPDATE meta SET v=? WHERE k='schema_version'", (SCHEMA_VERSION,))
            conn.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('seq', 0)")
            _skip_shown_seqs(conn)
            _use_incremental_vacuum(conn)
            conn.execute(
                "INSERT OR IGNORE INTO dedupe_secret(id, secret) VALUES (1, ?)", (new_secret(),)
            )
            secret = bytes(conn.execute("SELECT secret FROM dedupe_secret").fetchone()[0])
            rules = DedupeRules(secret, self._limits.dedupe_window_ms)
            self._state = _WriterState(conn, self._limits, rules)
            self._checkpointer = _Checkpointer(self._path)
            if self._limits.pipelined_sync:
                # Only this connection's commits; the checkpointer keeps FULL (it syncs the log
                # before each copy and the database file after it either way).
                conn.execute("PRAGMA synchronous=NORMAL")
                self._syncer = _Syncer(Path(f"{self._path}-wal"), self._synced)
            if self._hwm is not None:
                self._hwm.start(self._state.seq)
            if self._loop_staging:
                self._loop_reader = _connect(self._path, readonly=True, cache_kib=16384)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database: {exc}") from exc
        self._readers = ThreadPoolExecutor(
            self._read_threads, thread_name_prefix="relay-read", initializer=name_os_thread
        )
        self._thread = threading.Thread(target=self._run_writer, name="relay-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Commit all submitted writes, stop the writer and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._enqueue_loop_sends()
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._syncer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._syncer.close)
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.close)
        if self._hwm is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._hwm.close)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._loop_reader is not None:
            self._loop_reader.close()
        if self._state is not None:
            try:
                # Every writer is done: no seq above the mark was shown (see _skip_shown_seqs).
                self._state.conn.execute("UPDATE meta SET v=1 WHERE k='seq_clean'")
                self._state.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                log.warning("checkpoint at close failed")
            self._state.conn.close()

    async def ready(self) -> str | None:
        """Readiness: None when writes commit, else why not.

        A damaged store is never ready again while open. After a failed write the store is
        probed with a one-row write, so it turns ready again once the disk has room.
        """
        health = self.health
        if health.damaged is not None:
            return f"storage damaged: {health.damaged}"
        if health.write_error is not None and not self._closed and self._state is not None:
            # Small writes may well succeed on a full disk (into pages the log already has), so
            # the probe writes as much as the largest message; only it clears the failure.
            size = max(_PROBE_MIN_BYTES, self._probe_bytes)
            try:
                await self._submit(_probe_write, self._state.conn, size)
            except StorageError:
                pass
            else:
                log.warning("storage writes succeed again (a %d-byte probe committed)", size)
                health.write_error = None
        if health.damaged is not None:
            return f"storage damaged: {health.damaged}"
        if health.write_error is not None:
            return f"storage writes fail: {health.write_error}"
        return None

    def stats(self) -> StoreStats:
        """Return current counters (read without locking; values are ints)."""
        st = self._state
        if st is None:
            return StoreStats(0, 0, 0)
        return StoreStats(
            st.queued,
            st.accepted,
            st.blob_bytes,
            st.commits,
            st.committed_ops,
            st.loop_staged,
            (st.checkpoint_pauses.snapshot(), st.commit_pauses.snapshot()),
        )

    # -- writer machinery ----------------------------------------------------------------

    def _submit(self, fn: Callable[..., T], *args: Any, kind: int = 0) -> asyncio.Future[T]:
        if self._closed or self._loop is None:
            raise StorageError("store is closed")
        if self.health.damaged is not None:
            raise StorageError("storage is damaged; writes are refused")
        fut: asyncio.Future[T] = self._loop.create_future()
        op = _Op(fn, args, fut, kind)
        if kind == _SEND and self._loop_staging:
            # Staged at the end of this loop iteration, together with the other sends it
            # brought (one dedupe lookup for all of them), into the open transaction if any.
            self._loop_sends.append(op)
            if len(self._loop_sends) == 1:
                self._loop.call_soon(self._stage_on_loop)
            return fut
        if kind == _ACK:
            # An ack joins the open transaction without waking the writer (it is applied just
            # before COMMIT) when that transaction already took every earlier write, so acks
            # keep their order after sends; otherwise it goes through the queue.
            with self._side_lock:
                if self._open and self._queue.empty():
                    self._side_acks.append(op)
                    return fut
        self._enqueue_loop_sends()  # earlier sends stay ahead of this write
        self._enqueue(op)
        return fut

    def _enqueue(self, op: _Op) -> None:
        self._queued_n += 1
        op.n = self._queued_n
        self._queue.put(op)

    def _enqueue_loop_sends(self) -> None:
        ops, self._loop_sends = self._loop_sends, []
        for op in ops:
            self._enqueue(op)

    def _stage_on_loop(self) -> None:
        """Stage this iteration's sends into the transaction open to the loop, on the loop:
        checked, given their seqs and pushed early just as the writer would, with no hand-over
        to the writer thread and back. That transaction is the writer's open one while it waits
        for more writes, or the next one while the writer commits the previous. When none is
        open to the loop (the writer is idle, or stages queued writes, or has some still to
        take), or a check needs a row the caches lack, the sends go to the writer's queue."""
        ops, self._loop_sends = self._loop_sends, []
        if not ops:
            return
        txn = self._txn
        lock = self._state_lock
        # The writer holds the lock only for short steps; waiting for it (which lets the writer
        # have the GIL) is cheaper than the queue: a send queued makes the ones after it wait
        # for the writer too, in submission order.
        if txn is not None and lock.acquire(timeout=_LOOP_LOCK_WAIT):
            try:
                # Queued writes first (a SEND_AFTER may follow its predecessor in the queue);
                # then the transaction's size bound and its health.
                if (
                    self._txn is txn
                    and txn.error is None
                    and self._staged_n == self._queued_n
                    and len(txn.taken) + len(ops) <= self._limits.write_batch_max
                ):
                    ops = self._stage_loop_sends(txn, ops)
            finally:
                lock.release()
        for op in ops:
            self._enqueue(op)

    def _stage_loop_sends(self, txn: _Txn, ops: list[_Op]) -> list[_Op]:
        """Stage ``ops`` into ``txn`` (the state lock held); return those left to the writer:
        from the first whose check needed SQLite on, in order."""
        st = self._state
        assert st is not None and self._loop is not None and self._loop_reader is not None
        txn.taken.extend(ops)
        lent = self._lend_conn
        st.cache_only = not lent
        try:
            reader = None if lent else self._loop_reader
            done = self._stage_chunk(st, txn, ops, self._loop.call_soon, reader)
        except Exception as exc:  # noqa: BLE001 - the writer handles it
            # The writer rolls the transaction back and retries its writes one by one, as
            # after a failure of its own.
            txn.error = exc
            return []
        finally:
            st.cache_only = False
        st.loop_staged += done
        rest = ops[done:]
        if rest:
            del txn.taken[len(txn.taken) - len(rest) :]
        return rest

    def _side_enter(self) -> None:
        with self._side_lock:
            self._open = True

    def _side_take(self, keep_open: bool = False) -> list[_Op]:
        """Take the acks that joined the open transaction; with ``keep_open`` later ones join
        the next transaction (open to the loop while this one commits), else the queue."""
        with self._side_lock:
            self._open = keep_open
            acks, self._side_acks = self._side_acks, []
        return acks

    def _run_writer(self) -> None:
        name_os_thread()
        st = self._state
        checkpointer = self._checkpointer
        assert st is not None and checkpointer is not None
        every = self._limits.checkpoint_commits
        requested = False
        interval = self._limits.write_batch_interval_ms / 1000
        last_start = last_deadline = -interval
        # With loop staging, a transaction that took writes is followed at once by the next
        # one, open to the loop from the moment the previous one starts to commit, so the loop
        # stages (and pushes) the next interval's sends itself, the first one too; an interval
        # that brings no write ends that, and the writer waits for work again.
        nxt: _Txn | None = None
        stop = False
        while not stop:
            first: list[_Op] = []
            if nxt is None:
                if st.truncate_log:
                    try:
                        op = self._queue.get(timeout=_TRUNCATE_IDLE_SECONDS)
                    except queue.Empty:  # idle: empty the log, then wait for work
                        st.truncate_log = not _truncate_log(st.conn)
                        continue
                else:
                    op = self._queue.get()
                if op is None:
                    break
                first.append(op)
            # Commit pacing: while writes keep arriving, a transaction commits at most once per
            # interval after the previous one started, so its fixed cost (fsync, one page per
            # table and index touched) is shared by more operations; until then it stays open
            # and takes each write as it comes (a send is checked and pushed at once). After an
            # idle interval the first write commits at once.
            # A transaction opened ahead commits one interval after the previous commit.
            now = time.monotonic()
            deadline = max((last_start if first else last_deadline) + interval, now)
            last_start, last_deadline = now, deadline
            stop, took, nxt = self._run_transaction(st, first, deadline, txn=nxt)
            if not took:
                last_start = -interval  # nothing came: the next write finds the writer idle
            # Between transactions (the batch's results are already on their way): finish a
            # background checkpoint, or ask for one.
            since = st.commits - st.checkpointed_at
            # Also by time: when the machine is short of CPU, batches grow to write_batch_max
            # and commits become rare (1.3/s at 3,000 msg/s on a loaded 2-core box), and 512
            # of them took minutes while the log grew by gigabytes (docs/performance-relay.md,
            # "Holding steady").
            age = time.monotonic() - st.checkpointed_time if since else 0.0
            if checkpointer.finished:
                checkpointer.finished = requested = False
                st.checkpoint()
            elif (
                since >= every * _CHECKPOINT_FALLBACK_FACTOR
                or age >= _CHECKPOINT_SECONDS * _CHECKPOINT_FALLBACK_FACTOR
            ):
                log.warning(
                    "no background checkpoint finished in %d commits (%.1f s); the writer"
                    " checkpoints",
                    since,
                    age,
                )
                st.checkpoint()
            elif (since >= every or age >= _CHECKPOINT_SECONDS) and not requested:
                requested = True
                checkpointer.request()

    def _take_more(self, batch: list[_Op], room: int) -> bool:
        """Append queued operations to ``batch`` without waiting, at most ``room``; return
        True when the stop sentinel was met."""
        while room > 0:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            batch.append(nxt)
            room -= 1
        return False

    def _run_transaction(
        self,
        st: _WriterState,
        first: list[_Op],
        deadline: float,
        *,
        more: bool = True,
        txn: _Txn | None = None,
    ) -> tuple[bool, bool, _Txn | None]:
        """Run one write transaction: stage what is queued, keep taking writes until
        ``deadline`` (or ``write_batch_max`` operations), then COMMIT and answer them all.

        Every SQLite step releases the GIL, and winning it back from a busy event loop can take a
        whole switch interval; so a chunk of operations costs a handful of statements, not a few
        per message: at BEGIN one step for the other-writer check (``foreign_commit``); per
        chunk one step for the dedupe lookup; at the end one multi-row INSERT per table (earlier
        only when another operation needs the rows), one DELETE for all the transaction's acks
        (dropped bodies follow inside SQLite, by a trigger), the seq mark and COMMIT.

        Early delivery: with an early listener set, each chunk's accepted sends are handed to it
        as soon as they are staged, before COMMIT; their senders' results still wait for it.
        Only seqs at most ``_EARLY_SEQS`` above the last durable mark go early, so the gap a
        restart after a crash leaves (``_open_seq``) covers every seq ever shown uncommitted.

        Staging on the loop (``loop_staging``): the transaction is open to ``_stage_on_loop``
        (``_txn``) whenever this thread does not hold the state lock: while it waits for more
        writes, and, for the next transaction, while this one's closing statements and COMMIT
        run (``_WriterState.detach`` took what they write; the loop's lookups run on a
        connection of its own and find this transaction's ids in memory), so the loop never
        waits for the writer to stage and push a send.

        Args:
            st: the writer's state.
            first: the operations to start with.
            deadline: monotonic time until which more writes are taken into the transaction.
            more: False runs exactly ``first`` (the one-by-one retry of a failed batch).
            txn: the transaction the previous one opened to the loop, with what the loop staged.

        Returns:
            Whether the stop sentinel was taken from the queue; whether the transaction took
            any write (``first`` may be empty: a transaction opened ahead of the writes); the
            next transaction, already open to the loop, if any.
        """
        max_batch = self._limits.write_batch_max if more else len(first)
        if txn is None:
            txn = _Txn(early_limit=st.durable_seq + _EARLY_SEQS)
        chunk = first
        committed = False
        retry: list[_Op] = []
        staging = more and self._loop_staging
        nxt: _Txn | None = None
        closing: _Closing | None = None
        # BEGIN (and the other-writer check) before the state lock: every SQLite step releases
        # the GIL, and the loop, running meanwhile, stages into ``txn`` rather than queue.
        begun: BaseException | None = None
        foreign = False
        try:
            st.conn.execute("BEGIN IMMEDIATE")
            foreign = st.foreign_commit()
        except Exception as exc:  # noqa: BLE001 - raised again below, under the lock
            begun = exc
        lock = self._state_lock
        lock.acquire()
        held = True
        try:
            if more:
                self._side_enter()
                if staging:
                    self._txn = txn
            stop = self._take_more(first, max_batch - len(first) - len(txn.taken))
            loop_sends = any(op.kind == _SEND for op in txn.taken)
            txn.taken.extend(first)
            try:
                if begun is not None:
                    raise begun
                if txn.error is not None:  # the loop's staging failed while the last committed
                    raise txn.error
                if foreign:
                    if loop_sends:
                        # The loop staged them before BEGIN, against caches another
                        # connection's commit may have made stale: check them again.
                        raise _StaleCaches
                    st.reset_caches()
                while True:
                    if chunk:
                        self._stage_chunk(st, txn, chunk, self._post)
                        if more:
                            self._staged_n = max(self._staged_n, chunk[-1].n)
                    if stop or len(txn.taken) >= max_batch:
                        break
                    wait = deadline - time.monotonic()
                    try:
                        if wait <= 0:
                            nxt_op = self._queue.get_nowait()
                        elif staging:
                            # Open to the loop's staging while waiting (``_stage_on_loop``).
                            self._lend_conn = True
                            lock.release()
                            held = False
                            try:
                                nxt_op = self._queue.get(timeout=wait)
                            finally:
                                lock.acquire()
                                held = True
                                self._lend_conn = False
                        else:
                            nxt_op = self._queue.get(timeout=wait)
                    except queue.Empty:
                        nxt_op = _NO_OP
                    if txn.error is not None:
                        raise txn.error
                    if nxt_op is _NO_OP:
                        break
                    if nxt_op is None:
                        stop = True
                        break
                    chunk = [nxt_op]
                    stop = self._take_more(chunk, max_batch - len(txn.taken) - 1)
                    txn.taken.extend(chunk)
                started = time.perf_counter()
                keep = staging and not stop
                if more:
                    side = self._side_take(keep_open=keep)
                    if keep and not txn.taken and not side:
                        keep = False  # nothing came: the writer goes idle
                        side = self._side_take()
                    txn.acks.extend(side)
                    txn.taken.extend(side)
                if keep:
                    nxt = _Txn(early_limit=st.durable_seq + _EARLY_SEQS)
                    self._txn = nxt
                elif more:
                    self._txn = None
                plan = st.ack_plan([op.args for op in txn.acks]) if txn.acks else None
                closing = st.detach()
                if keep:
                    lock.release()  # the loop stages into ``nxt`` while this one commits
                    held = False
                st.write_rows(closing.msgs, closing.mailbox, closing.wrote)
                counts, removed = st.ack_run(plan) if plan is not None else ([], [])
                if closing.seq_dirty:
                    st.conn.execute("UPDATE meta SET v=? WHERE k='seq'", (closing.seq,))
                st.conn.execute("COMMIT")
                if not held:
                    lock.acquire()
                    held = True
                st.committed()
                st.ack_apply(removed)
                txn.results.extend(
                    (op.future, True, n) for op, n in zip(txn.acks, counts, strict=True)
                )
                if txn.taken:
                    st.commit_pauses.add(time.perf_counter() - started)
                    st.commits += 1
                    st.committed_ops += len(txn.taken)
                committed = True
            except Exception as exc:
                if not held:
                    lock.acquire()
                    held = True
                closing = None
                if more:
                    self._txn = None
                    txn.taken.extend(self._side_take())
                if nxt is not None:
                    # What the loop staged into the next transaction was checked against this
                    # one's effects: it goes the same way.
                    txn.taken.extend(nxt.taken)
                    nxt = None
                self._rollback(st)
                kind = _error_class(exc)
                if kind is not None:
                    # The file or the disk failed, not one operation: retrying each would fail
                    # the same way (and log as many times). Every operation of the batch fails.
                    self._note_failure(kind, exc, f"write batch of {len(txn.taken)} operations")
                    err = StorageError(
                        "storage is damaged" if kind == "corrupt" else "storage failure"
                    )
                    txn.results = [(op.future, False, err) for op in txn.taken]
                elif len(txn.taken) > 1 or isinstance(exc, _StaleCaches):
                    if isinstance(exc, _StaleCaches):
                        log.info("another connection wrote: %d writes run again", len(txn.taken))
                    else:
                        log.exception(
                            "write batch of %d failed; retrying one by one", len(txn.taken)
                        )
                    retry = txn.taken
                else:  # one write, or none (a transaction opened ahead of the writes)
                    log.exception("write batch of %d failed", len(txn.taken))
                    failure = StorageError("storage failure")
                    txn.results = [(op.future, False, failure) for op in txn.taken]
            # Seqs up to the mark are settled now: committed, or failed and never to be
            # committed (after a failure the next seqs start above every seq handed out).
            settled = closing.seq if closing is not None else st.seq
            deliveries = closing.deliveries if closing is not None else []
        finally:
            if more:  # every queued write it took is answered now, whatever happened
                self._staged_n = max(self._staged_n, max((op.n for op in txn.taken), default=0))
            if held:
                lock.release()
        if retry:
            for op in retry:
                self._run_transaction(st, [op], 0.0, more=False)
            return stop, True, None
        if not txn.taken:
            return stop, False, nxt  # it wrote nothing: nothing to sync or to answer
        outcome = (txn.results, deliveries, settled, committed)
        if self._syncer is not None:
            self._syncer.submit(outcome)  # in commit order, behind the transactions before
        else:
            self._synced([outcome], None)
        return stop, True, nxt

    def _stage_chunk(
        self,
        st: _WriterState,
        txn: _Txn,
        chunk: list[_Op],
        post: Callable[..., Any],
        reader: sqlite3.Connection | None = None,
    ) -> int:
        """Run a chunk of the transaction's operations (sends checked and staged, acks set
        aside for the end), then hand its accepted sends' deliveries to the early listener
        through ``post`` (the writer's thread-safe hand-over, or the loop's own ``call_soon``:
        either way under the state lock, so they reach the loop in seq order).

        Returns how many were run: all, but on the loop (``reader``: its own connection for the
        lookups) those from the first that needs a row the caches lack on are left undone.
        """
        sends = [(op.args[0], op.args[1].message_id) for op in chunk if op.kind == _SEND]
        # A SEND_AFTER's previous message is looked up with the chunk's own ids (one staged
        # earlier in this transaction is in batch_ids, or already flushed).
        sends += [
            (op.args[0], op.args[1].after)
            for op in chunk
            if op.kind == _SEND and op.args[1].after is not None
        ]
        if sends:
            if reader is None:
                st.begin_batch(sends)
            else:
                try:
                    st.begin_batch(sends, reader)
                except sqlite3.Error:
                    return 0  # the writer looks them up on its own connection
        done = 0
        for op in chunk:
            if op.kind == _ACK:
                txn.acks.append(op)
                done += 1
                continue
            if op.kind != _SEND:
                st.flush()
            try:
                txn.results.append((op.future, True, op.fn(*op.args)))
            except RelayError as exc:
                txn.results.append((op.future, False, exc))
            except _CacheMiss:
                break
            done += 1
        if self._early is not None and len(st.deliveries) > txn.pushed:
            txn.pushed = self._stage_early(st, txn.pushed, txn.early_limit, post)
        return done

    def _synced(self, outcomes: list[Any], error: OSError | None) -> None:
        """Transactions are durable (or their sync failed): answer them, in commit order.

        Called by the sync thread, or by the writer when it committed with a sync of its own.
        A failed sync answers every write of those transactions with a storage failure (their
        rows may be visible and may be lost: a sender retries, a recipient acks again).
        """
        if error is not None:
            self._note_failure("io", error, f"log sync of {len(outcomes)} transactions")
        hwm = self._hwm
        for results, deliveries, settled, committed in outcomes:
            if error is not None:
                failure = StorageError("storage failure")
                results = [(fut, False, failure) for fut, _, _ in results]
            elif committed:
                st = self._state
                if st is not None and settled > st.durable_seq:
                    st.durable_seq = settled  # one int, read by the writer thread
                if hwm is not None:
                    hwm.note(settled)
            self._post(self._complete, results, deliveries, settled)

    def _stage_early(
        self, st: _WriterState, pushed: int, early_limit: int, post: Callable[..., Any]
    ) -> int:
        """Hand the deliveries staged since ``pushed`` to the early listener, in order: large
        fan-outs and seqs past ``early_limit`` (a huge transaction) marked to wait for their
        commit. Returns the new ``pushed``."""
        end = len(st.deliveries)
        start = pushed
        for lo, hi in st.fanouts:
            if hi <= start:
                continue
            if lo > start:
                self._post_early(post, st.deliveries[start:lo], early_limit, True)
            self._post_early(post, st.deliveries[max(lo, start) : hi], early_limit, False)
            start = hi
        if start < end:
            self._post_early(post, st.deliveries[start:end], early_limit, True)
        return end

    def _post_early(
        self, post: Callable[..., Any], staged: list[Delivery], early_limit: int, push: bool
    ) -> None:
        post(self._deliver_early, staged, push and staged[-1].message.seq <= early_limit)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            log.warning("event loop closed before results were delivered")

    def _rollback(self, st: _WriterState) -> None:
        with contextlib.suppress(sqlite3.Error):
            st.conn.execute("ROLLBACK")
        st.seq_dirty = False
        with contextlib.suppress(sqlite3.Error):  # a damaged file may fail these reads too
            st.reset_caches()

    def _note_failure(self, kind: str, exc: BaseException, what: str) -> None:
        """Log a storage failure loudly (no bodies: SQLite's messages name no row data) and
        record it for the readiness check; after a corruption error writes are refused."""
        reason = _describe(exc)
        if kind == "corrupt":
            if self.health.damaged is None:
                log.critical(
                    "storage DAMAGED (%s) during %s: writes are refused and the relay reports"
                    " not ready; stop it and run `blindpost-relay admin check --data DIR`",
                    reason,
                    what,
                )
            else:
                log.error("storage damaged (%s) during %s", reason, what)
            self.health.damaged = reason
        else:
            log.error("storage failure (%s) during %s", reason, what)
            self.health.write_error = reason

    def _complete(
        self,
        results: list[tuple[asyncio.Future[Any], bool, Any]],
        deliveries: list[Delivery],
        settled: int,
    ) -> None:
        for fut, ok, value in results:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        # The futures' callbacks (send results) were queued first; the fan-out follows them, so
        # a sender is answered before a large group message is pushed. Batches keep commit
        # order because the loop runs callbacks first in, first out.
        # With early delivery most went out already; sockets that wait for these (``hold``)
        # get no early push from later transactions until ``settled`` has moved past them.
        if (deliveries and self._listener is not None) or self._early is not None:
            assert self._loop is not None
            self._loop.call_soon(self._deliver, deliveries, settled)

    def _deliver(self, deliveries: list[Delivery], settled: int) -> None:
        listener = self._listener
        try:
            if deliveries and listener is not None:
                listener(deliveries)
            early = self._early
            if early is not None:
                early.settled(settled)
        except Exception:
            log.exception("delivery listener failed")

    def _deliver_early(self, deliveries: list[Delivery], push: bool) -> None:
        early = self._early
        if early is None:
            return
        try:
            early.staged(deliveries, push)
        except Exception:
            log.exception("early delivery listener failed")

    # -- reader machinery ----------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self._path, readonly=True, cache_kib=16384)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None or self._closed:
            raise StorageError("store is closed")

        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                kind = _error_class(exc) or "io"
                self._note_failure(kind, exc, f"read {getattr(fn, '__qualname__', 'query')}")
                raise StorageError(f"read failed: {type(exc).__name__}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # -- RelayStore API ------------------------------------------------------------------

    async def create_account(
        self, addr: Address, auth_key: bytes, now_ms: int, invite: bytes | None = None
    ) -> None:
        """See ``RelayStore.create_account``."""
        assert self._state is not None
        await self._submit(self._state.create_account, addr, auth_key, now_ms, invite)

    async def set_banned(self, user: str, banned: bool, now_ms: int) -> bool:
        """See ``RelayStore.set_banned``."""
        assert self._state is not None
        return await self._submit(_set_banned, self._state.conn, user, banned, now_ms)

    async def banned_users(self) -> frozenset[str]:
        """See ``RelayStore.banned_users``."""

        def q(conn: sqlite3.Connection) -> frozenset[str]:
            return frozenset(str(r[0]) for r in conn.execute("SELECT username FROM bans"))

        return await self._read(q)

    async def create_invite(self, code_hash: bytes, now_ms: int, expires_ms: int) -> None:
        """See ``RelayStore.create_invite``."""
        assert self._state is not None
        await self._submit(_insert_invite, self._state.conn, code_hash, now_ms, expires_ms)

    async def list_invites(self) -> list[Invite]:
        """See ``RelayStore.list_invites``."""

        def q(conn: sqlite3.Connection) -> list[Invite]:
            return [
                Invite(
                    bytes(r[0]).hex()[:12],
                    int(r[1]),
                    int(r[2]),
                    r[3],
                    None if r[4] is None else int(r[4]),
                )
                for r in conn.execute(
                    "SELECT code_hash, created_ms, expires_ms, used_by, used_ms FROM invites "
                    "ORDER BY created_ms, code_hash"
                )
            ]

        return await self._read(q)

    async def set_recovery_verifier(self, user: str, verifier: bytes) -> bool:
        """See ``RelayStore.set_recovery_verifier``."""
        assert self._state is not None
        return await self._submit(_set_recovery, self._state.conn, user, verifier)

    async def recovery_verifier(self, user: str) -> bytes | None:
        """See ``RelayStore.recovery_verifier``."""

        def q(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT verifier FROM recovery WHERE username=?", (user,))
            found = row.fetchone()
            return None if found is None else bytes(found[0])

        return await self._read(q)

    async def identity_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.identity_key``."""

        def q(conn: sqlite3.Connection) -> bytes | None:
            found = conn.execute(
                "SELECT d.identity_key FROM devices d JOIN users u ON u.pk = d.user_pk "
                "WHERE u.username=? AND d.device_id=?",
                (addr.user, addr.device),
            ).fetchone()
            return None if found is None or found[0] is None else bytes(found[0])

        return await self._read(q)

    async def sender_keys(self) -> list[SenderKeyRow]:
        """See ``RelayStore.sender_keys``."""

        def q(conn: sqlite3.Connection) -> list[SenderKeyRow]:
            return [
                SenderKeyRow(int(k), bytes(s), int(c), None if e is None else bytes(e))
                for k, s, c, e in conn.execute(
                    "SELECT key_id, seed, created_ms, endorsement FROM sender_keys ORDER BY key_id"
                )
            ]

        return await self._read(q)

    async def add_sender_key(self, row: SenderKeyRow) -> bool:
        """See ``RelayStore.add_sender_key``."""
        assert self._state is not None
        return await self._submit(_add_sender_key, self._state.conn, row)

    async def set_access_verifier(self, user: str, verifier: bytes | None) -> bool:
        """See ``RelayStore.set_access_verifier``."""
        assert self._state is not None
        return await self._submit(_set_access, self._state.conn, user, verifier)

    async def access_verifiers(self, users: Sequence[str]) -> dict[str, bytes]:
        """See ``RelayStore.access_verifiers``."""
        wanted = list(dict.fromkeys(users))

        def q(conn: sqlite3.Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for start in range(0, len(wanted), _MAX_VARS):
                part = wanted[start : start + _MAX_VARS]
                marks = ",".join("?" * len(part))
                for name, verifier in conn.execute(
                    f"SELECT username, verifier FROM access WHERE username IN ({marks})",  # noqa: S608
                    part,
                ):
                    out[str(name)] = bytes(verifier)
            return out

        return await self._read(q)

    async def open_provision(
        self, slot: ProvisionSlot, token_hash: bytes, now_ms: int, max_live: int
    ) -> bool:
        """See ``RelayStore.open_provision``."""
        return await self._submit(_open_provision, self._conn(), slot, token_hash, now_ms, max_live)

    async def provision(self, slot_id: bytes, now_ms: int) -> ProvisionSlot | None:
        """See ``RelayStore.provision``."""

        def q(conn: sqlite3.Connection) -> ProvisionSlot | None:
            row = conn.execute(
                "SELECT auth_key, expires_ms, grant_ct IS NOT NULL FROM provisions "
                "WHERE slot_id=? AND expires_ms>?",
                (slot_id, now_ms),
            ).fetchone()
            if row is None:
                return None
            return ProvisionSlot(slot_id, bytes(row[0]), int(row[1]), bool(row[2]))

        return await self._read(q)

    async def fill_provision(self, slot_id: bytes, grant: bytes, now_ms: int) -> ProvisionFill:
        """See ``RelayStore.fill_provision``."""
        return await self._submit(_fill_provision, self._conn(), slot_id, grant, now_ms)

    async def take_provision(self, slot_id: bytes, token_hash: bytes, now_ms: int) -> ProvisionTake:
        """See ``RelayStore.take_provision``."""
        return await self._submit(_take_provision, self._conn(), slot_id, token_hash, now_ms)

    async def sweep_provisions(self, now_ms: int) -> int:
        """See ``RelayStore.sweep_provisions``."""
        return await self._submit(_sweep_provisions, self._conn(), now_ms)

    def _conn(self) -> sqlite3.Connection:
        if self._state is None:
            raise StorageError("store is closed")
        return self._state.conn

    async def add_device(
        self, addr: Address, auth_key: bytes, now_ms: int, name: bytes | None = None
    ) -> None:
        """See ``RelayStore.add_device``."""
        assert self._state is not None
        await self._submit(self._state.add_device, addr, auth_key, now_ms, name)

    async def touch_device(self, addr: Address, seen_ms: int) -> None:
        """See ``RelayStore.touch_device``."""
        await self._submit(_touch_device, self._conn(), addr, seen_ms)

    async def remove_device(self, addr: Address) -> None:
        """See ``RelayStore.remove_device``."""
        assert self._state is not None
        await self._submit(self._state.remove_device, addr)

    async def list_devices(self, user: str) -> list[DeviceInfo]:
        """See ``RelayStore.list_devices``."""

        def q(conn: sqlite3.Connection) -> list[DeviceInfo]:
            return [
                DeviceInfo(
                    int(r[0]),
                    int(r[1]),
                    r[2] is not None,
                    None if r[3] is None else bytes(r[3]),
                    None if r[4] is None else int(r[4]),
                )
                for r in conn.execute(
                    "SELECT d.device_id, d.created_ms, d.spk_id, d.name, d.seen_ms FROM devices d "
                    "JOIN users u ON u.pk = d.user_pk WHERE u.username=? ORDER BY d.device_id",
                    (user,),
                )
            ]

        return await self._read(q)

    async def auth_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.auth_key``."""

        def q(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT d.auth_key FROM devices d JOIN users u ON u.pk = d.user_pk "
                "WHERE u.username=? AND d.device_id=?",
                (addr.user, addr.device),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read(q)

    async def upload_keys(self, addr: Address, upload: KeyUpload) -> int:
        """See ``RelayStore.upload_keys``."""
        assert self._state is not None
        return await self._submit(self._state.upload_keys, addr, upload)

    async def prekey_count(self, addr: Address) -> int:
        """See ``RelayStore.prekey_count``."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM otpks WHERE device_pk = (SELECT d.pk FROM devices d "
                "JOIN users u ON u.pk = d.user_pk WHERE u.username=? AND d.device_id=?)",
                (addr.user, addr.device),
            ).fetchone()
            return int(row[0])

        return await self._read(q)

    async def fetch_bundles(
        self, user: str, device: int | None, one_time: bool = True
    ) -> list[DeviceBundle]:
        """See ``RelayStore.fetch_bundles``."""
        assert self._state is not None
        return await self._submit(self._state.fetch_bundles, user, device, one_time)

    def submit_send(
        self, sender: Address, envelope: Envelope, now_ms: int
    ) -> asyncio.Future[SendReceipt]:
        """See ``RelayStore.submit_send``."""
        assert self._state is not None
        return self._submit(self._state.send, sender, envelope, now_ms, kind=_SEND)

    async def ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> int:
        """See ``RelayStore.ack``."""
        return await self.submit_ack(addr, message_ids, settled)

    def submit_ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> asyncio.Future[int]:
        """See ``RelayStore.submit_ack``."""
        assert self._state is not None
        return self._submit(self._state.ack, addr, tuple(message_ids), tuple(settled), kind=_ACK)

    async def fetch_mailbox(
        self, addr: Address, after_seq: int, limit: int, max_bytes: int
    ) -> list[StoredMessage]:
        """See ``RelayStore.fetch_mailbox``."""

        def q(conn: sqlite3.Connection) -> list[StoredMessage]:
            out: list[StoredMessage] = []
            total = 0
            for seq, mid, sender, sdev, stored, body in conn.execute(
                "SELECT mb.seq, m.msg_id, m.sender, m.sender_device, m.stored_ms, m.body "
                "FROM mailbox mb JOIN messages m ON m.pk = mb.msg_pk "
                "WHERE mb.device_pk = (SELECT d.pk FROM devices d JOIN users u "
                "ON u.pk = d.user_pk WHERE u.username=? AND d.device_id=?) AND mb.seq > ? "
                "ORDER BY mb.seq LIMIT ?",
                (addr.user, addr.device, after_seq, limit),
            ):
                data = bytes(body) if body is not None else b""
                if out and total + len(data) > max_bytes:
                    break
                total += len(data)
                out.append(
                    StoredMessage(
                        int(seq), bytes(mid), Address(sender, int(sdev)), int(stored), data
                    )
                )
            return out

        return await self._read(q)

    async def mailbox_count(self, addr: Address) -> int:
        """See ``RelayStore.mailbox_count``."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM mailbox WHERE device_pk = (SELECT d.pk FROM devices d "
                "JOIN users u ON u.pk = d.user_pk WHERE u.username=? AND d.device_id=?)",
                (addr.user, addr.device),
            ).fetchone()
            return int(row[0])

        return await self._read(q)

    async def put_blob(
        self, blob_id: str, size: int, now_ms: int, owner: str | None = None
    ) -> bool:
        """See ``RelayStore.put_blob``."""
        assert self._state is not None
        return await self._submit(self._state.put_blob, blob_id, size, now_ms, owner)

    async def delete_blob(self, blob_id: str, owner: str) -> bool:
        """See ``RelayStore.delete_blob``."""
        assert self._state is not None
        return await self._submit(self._state.delete_blob, blob_id, owner)

    async def account_usage(self, user: str) -> int:
        """See ``RelayStore.account_usage``."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT sent + blobs FROM account_bytes WHERE username=?", (user,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return await self._read(q)

    async def blob_exists(self, blob_id: str) -> bool:
        """See ``RelayStore.blob_exists``."""

        def q(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM blobs WHERE id=?", (blob_id,)).fetchone() is not None

        return await self._read(q)

    async def sweep(self, now_ms: int) -> SweepReport:
        """See ``RelayStore.sweep``."""
        assert self._state is not None
        return await self._submit(self._state.sweep, now_ms)


def _truncate_log(conn: sqlite3.Connection) -> bool:
    """Copy the write-ahead log into the database file and empty it, so page images of deleted
    rows do not stay in the log file while the relay is idle; return False when readers held it
    back (tried again later). Called by the writer after ``_TRUNCATE_IDLE_SECONDS`` without a
    write: it waits for readers at most ``_TRUNCATE_WAIT_MS``."""
    try:
        conn.execute(f"PRAGMA busy_timeout={_TRUNCATE_WAIT_MS}")
        busy = int(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
    except sqlite3.Error as exc:
        log.warning("log truncation failed: %s", type(exc).__name__)
        busy = 1
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    return busy == 0


def _skip_shown_seqs(conn: sqlite3.Connection) -> None:
    """Start above every seq a process that did not close cleanly may have shown.

    Early delivery pushes a message before its transaction commits, with seqs at most
    ``_EARLY_SEQS`` above the durable mark; after a crash those seqs were seen by
    recipients but are not in the file. Moving the mark up by that much (once, durably, before
    the writer starts) keeps seqs increasing for every recipient across the crash. A clean
    close sets ``seq_clean``, so a normal restart keeps seqs dense; a file from before early
    delivery has no marker and nothing to skip.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT v FROM meta WHERE k='seq_clean'").fetchone()
        if row is not None and int(row[0]) == 0:
            conn.execute("UPDATE meta SET v = v + ? WHERE k='seq'", (_EARLY_SEQS,))
        conn.execute(
            "INSERT INTO meta(k, v) VALUES ('seq_clean', 0) ON CONFLICT(k) DO UPDATE SET v=0"
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _probe_write(conn: sqlite3.Connection, size: int) -> None:
    conn.execute("INSERT OR REPLACE INTO probe(k, b) VALUES (1, zeroblob(?))", (size,))


def _insert_invite(
    conn: sqlite3.Connection, code_hash: bytes, now_ms: int, expires_ms: int
) -> None:
    conn.execute(
        "INSERT INTO invites(code_hash, created_ms, expires_ms) VALUES (?,?,?)",
        (code_hash, now_ms, expires_ms),
    )


def _set_banned(conn: sqlite3.Connection, user: str, banned: bool, now_ms: int) -> bool:
    if conn.execute("SELECT 1 FROM users WHERE username=?", (user,)).fetchone() is None:
        return False
    if banned:
        conn.execute("INSERT OR IGNORE INTO bans(username, banned_ms) VALUES (?,?)", (user, now_ms))
    else:
        conn.execute("DELETE FROM bans WHERE username=?", (user,))
    return True


def _touch_device(conn: sqlite3.Connection, addr: Address, seen_ms: int) -> None:
    conn.execute(
        "UPDATE devices SET seen_ms=? WHERE device_id=? AND user_pk="
        "(SELECT pk FROM users WHERE username=?)",
        (seen_ms, addr.device, addr.user),
    )


def _device_columns(conn: sqlite3.Connection) -> None:
    """A database from before device names and last-seen gets the two (nullable) columns."""
    have = {str(r[1]) for r in conn.execute("PRAGMA table_info(devices)")}
    for column, kind in (("name", "BLOB"), ("seen_ms", "INTEGER")):
        if column not in have:
            conn.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")


def _sweep_provisions(conn: sqlite3.Connection, now_ms: int) -> int:
    return conn.execute("DELETE FROM provisions WHERE expires_ms<=?", (now_ms,)).rowcount


def _open_provision(
    conn: sqlite3.Connection, slot: ProvisionSlot, token_hash: bytes, now_ms: int, max_live: int
) -> bool:
    _sweep_provisions(conn, now_ms)
    (live,) = conn.execute("SELECT COUNT(*) FROM provisions").fetchone()
    if live >= max_live:
        return False
    if conn.execute("SELECT 1 FROM provisions WHERE slot_id=?", (slot.slot_id,)).fetchone():
        raise Conflict("provisioning slot exists", code="provisioning_exists")
    conn.execute(
        "INSERT INTO provisions(slot_id, token_hash, auth_key, expires_ms) VALUES (?,?,?,?)",
        (slot.slot_id, token_hash, slot.auth_key, slot.expires_ms),
    )
    return True


def _fill_provision(
    conn: sqlite3.Connection, slot_id: bytes, grant: bytes, now_ms: int
) -> ProvisionFill:
    row = conn.execute(
        "SELECT grant_ct IS NOT NULL FROM provisions WHERE slot_id=? AND expires_ms>?",
        (slot_id, now_ms),
    ).fetchone()
    if row is None:
        return "missing"
    if row[0]:
        return "filled"
    conn.execute("UPDATE provisions SET grant_ct=? WHERE slot_id=?", (grant, slot_id))
    return "stored"


def _take_provision(
    conn: sqlite3.Connection, slot_id: bytes, token_hash: bytes, now_ms: int
) -> ProvisionTake:
    row = conn.execute(
        "SELECT token_hash, grant_ct FROM provisions WHERE slot_id=? AND expires_ms>?",
        (slot_id, now_ms),
    ).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[0]), token_hash):
        return ProvisionTake(False, None)
    if row[1] is None:
        return ProvisionTake(True, None)
    conn.execute("DELETE FROM provisions WHERE slot_id=?", (slot_id,))
    return ProvisionTake(True, bytes(row[1]))


def _set_recovery(conn: sqlite3.Connection, user: str, verifier: bytes) -> bool:
    if conn.execute("SELECT 1 FROM users WHERE username=?", (user,)).fetchone() is None:
        return False
    conn.execute(
        "INSERT INTO recovery(username, verifier) VALUES (?,?) "
        "ON CONFLICT(username) DO UPDATE SET verifier=excluded.verifier",
        (user, verifier),
    )
    return True


def _add_sender_key(conn: sqlite3.Connection, row: SenderKeyRow) -> bool:
    cur = conn.execute(
        "INSERT OR IGNORE INTO sender_keys(key_id, seed, created_ms, endorsement) VALUES (?,?,?,?)",
        (row.key_id, row.seed, row.created_ms, row.endorsement),
    )
    return cur.rowcount == 1


def _set_access(conn: sqlite3.Connection, user: str, verifier: bytes | None) -> bool:
    if conn.execute("SELECT 1 FROM users WHERE username=?", (user,)).fetchone() is None:
        return False
    if verifier is None:
        conn.execute("DELETE FROM access WHERE username=?", (user,))
    else:
        conn.execute(
            "INSERT INTO access(username, verifier) VALUES (?,?) "
            "ON CONFLICT(username) DO UPDATE SET verifier=excluded.verifier",
            (user, verifier),
        )
    return True


def _forget_tombstones(conn: sqlite3.Connection) -> None:
    """Schema 1 to 2: give ``messages`` its dedupe columns, drop the trigger that left body-less
    rows behind, and delete those rows (they named sender and time; a retry of one of them is
    stored again, and the recipient's client drops the copy by its message id). One
    transaction, so relay processes opening the file together migrate it once."""
    if not _has_table(conn, "messages"):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(messages)")}
        if "dkey" not in columns:
            conn.execute("ALTER TABLE messages ADD COLUMN dkey BLOB")
            conn.execute("ALTER TABLE messages ADD COLUMN dexp INTEGER")
        conn.execute("DROP TRIGGER IF EXISTS mailbox_drop_body")
        gone = conn.execute(
            "DELETE FROM messages WHERE body IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM mailbox WHERE msg_pk = messages.pk)"
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    if gone:
        log.warning("schema 2: deleted %d body-less messages rows (old dedupe tombstones)", gone)


def _use_incremental_vacuum(conn: sqlite3.Connection) -> None:
    """Switch the file to incremental auto-vacuum (the sweeper then returns free pages).

    A file created without it needs one VACUUM, which rewrites the whole file (it takes about
    as long as copying it and needs that much free disk space) once, at the first open by a
    relay of schema 2; a new file is switched before it holds anything.
    """
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
        return
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
        started = time.monotonic()
        conn.execute("VACUUM")
        log.warning(
            "database switched to incremental auto-vacuum (one VACUUM, %.1f s)",
            time.monotonic() - started,
        )


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None
