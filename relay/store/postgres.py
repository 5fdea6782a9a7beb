# Invariants:
# * Same contract as every RelayStore (one conformance suite and one state machine run against
#   all backends): a write's future resolves only after COMMIT returned with
#   synchronous_commit = on; a failed write changed nothing; only opaque bytes are stored.
# * Sends and acks are group-committed: every one submitted while a batch commits joins the
#   next batch, one transaction with a fixed number of statements whatever its size. Up to
#   ``write_connections`` batches run at once, but a batch that names a user (recipient, acking
#   device) of a batch still in flight starts only after that one finished, so on one node
#   batches touching a device commit, answer and reach the delivery listener in submission
#   order.
# * A device's mailbox seqs, message count and bytes live in its ``devices`` row and change
#   only in a transaction holding that row's lock (taken by every batch, in pk order, before
#   any write). Two transactions writing one mailbox therefore commit one after the other, and
#   the later one reads the earlier one's last_seq: per-device seqs increase in commit order
#   whichever node commits (docs/architecture.md, "PostgreSQL backend").
# * Deadlocks and unique-key races between nodes abort a whole batch, which is then computed
#   again from the database (up to ``_ATTEMPTS`` times); nothing is applied locally before
#   COMMIT returned.
# * Every driver or connection failure surfaces as StorageError (relay.store.pg_common).
# * A message's row goes in the transaction that removes its last mailbox row (trigger
#   ``messages_forget``, schema 5); what stays is its dedupe record (relay.store.dedupe).
"""PostgreSQL implementation of ``RelayStore`` (asyncpg), for relays running as several nodes."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

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
from relay.store.base import (
    Address,
    Delivery,
    DeliveryListener,
    DeviceBundle,
    DeviceInfo,
    Envelope,
    Invite,
    KeyUpload,
    OneTimePrekey,
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
from relay.store.dedupe import SWEEP_CHUNK, DedupeRules, new_secret
from relay.store.pg_common import (
    DB_ERRORS,
    PgSettings,
    lock_key,
    open_pool,
    ping,
    redact_dsn,
    storage_errors,
)
from relay.store.rules import check_quota, check_sender_share, resolve_recipients

__all__ = ["PostgresRelayStore"]

log = logging.getLogger("relay.store")

_SWEEP_CHUNK = 5000
_VACUUM_SECONDS = 60.0
_VACUUM_TIMEOUT_SECONDS = 300.0
_ATTEMPTS = 5
# The advisory lock key that serializes opening provisioning slots (any fixed bigint).
_PROVISION_LOCK = 0x62705F70726F76  # "bp_prov"
_SEND, _ACK = 1, 2
# Aborts that say "another transaction got there first", not "this batch is wrong".
_RETRYABLE = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
)

# A batch is four round trips whatever its size: BEGIN, _BATCH_READ, _BATCH_WRITE, COMMIT.
#
# _BATCH_READ: the directory of the users the batch names, with the lock on each of their
# devices taken in pk order (every writer locks devices in that order, so writers never wait on
# each other in a cycle; under READ COMMITTED a row another transaction changed meanwhile is
# read again once its lock is free, so last_seq and the counters are the committed ones); every
# named user (kind 1, so a user with no device left is told from an unknown one); and the stored
# messages among the batch's message ids (kind 2, for deduplication). For the abuse limits
# ($3: the batch's senders): each sender's stored bytes (kind 3, account_max_bytes), each
# sender's share of each locked mailbox (kind 4), and which named users have written to which
# sender (kind 5, the "answered" relation); and the dedupe records of delivered messages among
# the batch's (sender, message id) digests ($4; kind 6). Kinds 3 to 5 are read in the
# statement's snapshot, not re-read after the device locks like kind 0: a batch committed by
# another node while this one waited for a lock is not counted in them, so across nodes a
# sender share or an account quota can be overrun by what one concurrent batch added (the
# mailbox quota stays exact).
_BATCH_READ = """
WITH locked AS (
    SELECT u.username, d.device_id, d.pk, d.last_seq, d.msg_count, d.msg_bytes
    FROM devices d JOIN users u ON u.pk = d.user_pk WHERE u.username = ANY($1::text[])
    ORDER BY d.pk FOR UPDATE OF d)
SELECT 0 AS kind, username, device_id, pk, last_seq, msg_count, msg_bytes, NULL::bytea AS mid,
    NULL::text AS other
FROM locked
UNION ALL
SELECT 1, username, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM users
WHERE username = ANY($1::text[])
UNION ALL
SELECT 2, sender, sender_device, n_recipients, stored_ms, NULL, NULL, msg_id, NULL FROM messages
WHERE msg_id = ANY($2::bytea[])
UNION ALL
SELECT 3, username, NULL, NULL, sent + blobs, NULL, NULL, NULL, NULL FROM account_bytes
WHERE username = ANY($3::text[])
UNION ALL
SELECT 4, m.sender, NULL, mb.device_pk, count(*), sum(mb.size), NULL, NULL, NULL
FROM mailbox mb JOIN messages m ON m.msg_id = mb.msg_id
WHERE mb.device_pk IN (SELECT pk FROM locked) AND m.sender = ANY($3::text[])
GROUP BY m.sender, mb.device_pk
UNION ALL
SELECT 5, writer, NULL, NULL, NULL, NULL, NULL, NULL, peer FROM wrote_to
WHERE writer = ANY($1::text[]) AND peer = ANY($3::text[])
UNION ALL
SELECT 6, NULL, NULL, recipients, expires, NULL, NULL, key, NULL FROM dedupe
WHERE key = ANY($4::bytea[])
"""
# _BATCH_WRITE: the batch's new messages and mailbox rows, its acks (a message no mailbox
# holds any more is replaced by its dedupe record, here rather than through an UPDATE and the
# messages_forget trigger: one row version less per message), and each touched
# device's seq and counters, in one statement. The sends' seqs and counter deltas were
# computed from the locked rows; the acks' deltas come from the rows actually deleted. Acks
# see the mailbox as it was before the batch's own sends (one statement, one snapshot), as on
# SQLite where a batch's acks run last. Settled sends ($21 their dedupe keys, $22 their ids;
# RelayStore.ack): a message acked in this batch leaves no record, another still queued is
# marked to leave none (rows the acks touch are left to ``held``: one statement may change a
# row once), and a record written earlier goes.
_BATCH_WRITE = """
WITH m AS (
    INSERT INTO messages(msg_id, sender, sender_device, stored_ms, n_recipients, holders, body,
                         dedupe_key, dedupe_exp)
    SELECT * FROM unnest($1::bytea[], $2::text[], $3::int[], $4::bigint[], $5::int[],
                         $5::int[], $6::bytea[], $19::bytea[], $20::bigint[])),
mb AS (
    INSERT INTO mailbox(device_pk, seq, msg_id, size)
    SELECT * FROM unnest($7::bigint[], $8::bigint[], $9::bytea[], $10::int[])),
del AS (
    DELETE FROM mailbox x USING unnest($15::bigint[], $16::bytea[]) AS r(d, mid)
    WHERE x.device_pk = r.d AND x.msg_id = r.mid
    RETURNING x.device_pk, x.msg_id, x.size),
acked AS (
    SELECT msg_id, count(*)::int AS n FROM del GROUP BY msg_id),
gone AS (
    DELETE FROM messages g USING acked a WHERE g.msg_id = a.msg_id AND g.holders <= a.n
    RETURNING g.dedupe_key, g.dedupe_exp, g.n_recipients),
rec AS (
    INSERT INTO dedupe(key, expires, recipients)
    SELECT dedupe_key, dedupe_exp, n_recipients FROM gone
    WHERE dedupe_key IS NOT NULL AND dedupe_key <> ALL($21::bytea[])
    ON CONFLICT (key) DO NOTHING),
held AS (
    UPDATE messages g SET holders = g.holders - a.n, dedupe_key =
        CASE WHEN g.dedupe_key = ANY($21::bytea[]) THEN NULL ELSE g.dedupe_key END
    FROM acked a WHERE g.msg_id = a.msg_id AND g.holders > a.n),
unset AS (
    UPDATE messages g SET dedupe_key = NULL
    WHERE g.msg_id = ANY($22::bytea[]) AND g.dedupe_key = ANY($21::bytea[])
    AND NOT EXISTS (SELECT 1 FROM acked a WHERE a.msg_id = g.msg_id)),
fg AS (
    DELETE FROM dedupe WHERE key = ANY($21::bytea[])),
sd AS (
    SELECT * FROM unnest($11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[])
    AS v(pk, seq, c, b)),
ad AS (
    SELECT device_pk AS pk, count(*) AS n, sum(size) AS b FROM del GROUP BY device_pk),
wt AS (
    INSERT INTO wrote_to(writer, peer) SELECT * FROM unnest($17::text[], $18::text[])
    ON CONFLICT DO NOTHING),
dev AS (
    UPDATE devices d SET last_seq = coalesce(t.seq, d.last_seq),
        msg_count = d.msg_count + coalesce(t.c, 0) - coalesce(t.n, 0),
        msg_bytes = d.msg_bytes + coalesce(t.b, 0) - coalesce(t.ab, 0)
    FROM (SELECT coalesce(sd.pk, ad.pk) AS pk, sd.seq, sd.c, sd.b, ad.n, ad.b AS ab
          FROM sd FULL JOIN ad ON sd.pk = ad.pk) t
    WHERE d.pk = t.pk)
SELECT device_pk, msg_id, size FROM del
"""
_DEVICE_PK = (
    "SELECT d.pk FROM devices d JOIN users u ON u.pk = d.user_pk "
    "WHERE u.username = $1 AND d.device_id = $2"
)
# Mailbox rows leave with their holders' count on the message (the row goes at 0) and their
# device's counters; the device rows must be locked (pk order) by the caller.
_DROP_MAILBOX_ROWS = """
WITH del AS (
    DELETE FROM mailbox WHERE {where} RETURNING device_pk, msg_id, size),
msg AS (
    UPDATE messages m SET holders = m.holders - g.n
    FROM (SELECT msg_id, count(*)::int AS n FROM del GROUP BY msg_id) g
    WHERE m.msg_id = g.msg_id),
dev AS (
    UPDATE devices d SET msg_count = d.msg_count - g.n, msg_bytes = d.msg_bytes - g.b
    FROM (SELECT device_pk, count(*) AS n, sum(size) AS b FROM del GROUP BY device_pk) g
    WHERE d.pk = g.device_pk)
SELECT count(*) FROM del
"""


@dataclass(slots=True)
class _Op:
    kind: int
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Batch:
    ops: list[_Op]
    users: frozenset[str]
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Outcome:
    """What a batch did, applied to the store's counters and futures only after COMMIT."""

    results: list[tuple[asyncio.Future[Any], bool, Any]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    accepted: int = 0
    queued: int = 0


class PostgresRelayStore:
    """``RelayStore`` on PostgreSQL with group commit; several relay nodes may share one database.

    Args:
        settings: how to reach PostgreSQL (the DSN is never logged).
        limits: quotas, retention and batching (``write_batch_max``).
        write_connections: batches that may commit at the same time (each holds a connection).
    """

    def __init__(
        self,
        settings: PgSettings,
        limits: StoreLimits | None = None,
        *,
        write_connections: int = 1,
    ) -> None:
        if write_connections < 1 or write_connections >= settings.pool_size:
            raise ValueError("write_connections must be 1..pool_size-1")
        self._settings = settings
        self._limits = limits or StoreLimits()
        self._writers = write_connections
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: DeliveryListener | None = None
        self._pending: list[_Op] = []
        self._inflight: list[_Batch] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._closing = False
        self._queued = 0
        self._accepted = 0
        self._blob_bytes = 0
        self._commits = 0
        self._committed_ops = 0
        self._sweep_key = lock_key(settings.schema, "sweep")
        self._rules: DedupeRules | None = None
        self._next_vacuum = 0.0  # event loop time

    def __repr__(self) -> str:
        where = redact_dsn(self._settings.dsn)
        return f"PostgresRelayStore({where}, schema={self._settings.schema})"

    @property
    def limits(self) -> StoreLimits:
        """The quotas, retention and batching this store was opened with."""
        return self._limits

    # -- lifecycle -----------------------------------------------------------------------

    def set_delivery_listener(self, listener: DeliveryListener | None) -> None:
        """See ``RelayStore.set_delivery_listener``."""
        self._listener = listener

    async def open(self) -> None:
        """Connect, migrate the schema and load the counters.

        Raises:
            StorageError: PostgreSQL is unreachable, or its schema is newer than this code.
        """
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        pool = await open_pool(self._settings)
        try:
            with storage_errors("load counters"):
                row = await pool.fetchrow(
                    "SELECT (SELECT count(*) FROM mailbox), "
                    "(SELECT coalesce(sum(size), 0) FROM blobs)"
                )
                await pool.execute(
                    "INSERT INTO dedupe_secret(id, secret) VALUES (1, $1) ON CONFLICT DO NOTHING",
                    new_secret(),
                )
                secret = await pool.fetchval("SELECT secret FROM dedupe_secret WHERE id = 1")
        except BaseException:
            await pool.close()
            raise
        assert row is not None
        self._queued, self._blob_bytes = int(row[0]), int(row[1])
        self._rules = DedupeRules(bytes(secret), self._limits.dedupe_window_ms)
        self._pool = pool
        log.info("store: postgres %s", redact_dsn(self._settings.dsn))

    async def ready(self) -> str | None:
        """Readiness (``/healthz/ready``): None when PostgreSQL answers a ``SELECT 1`` now.

        PostgreSQL vouches for its own durability (WAL, ``synchronous_commit = on``), so there
        is no damage latch or acknowledged-messages mark here as on SQLite: a lost connection
        is what makes this store not ready, and it turns ready again once the server answers.
        """
        return await ping(None if self._closing else self._pool, "store")

    async def close(self) -> None:
        """Commit every write already submitted, then close the connections."""
        self._closing = True
        if self._idle is not None:
            await self._idle.wait()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._settings.timeout_seconds)
            except DB_ERRORS:
                pool.terminate()

    def stats(self) -> StoreStats:
        """See ``RelayStore.stats``: counted at open, then kept by this node's own commits
        (another node's commits show after a restart)."""
        return StoreStats(
            self._queued, self._accepted, self._blob_bytes, self._commits, self._committed_ops
        )

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None or self._closing:
            raise StorageError("store is closed")
        return self._pool

    # -- group commit ----------------------------------------------------------------------

    def _submit(self, kind: int, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        self._pool_or_fail()
        assert self._loop is not None and self._idle is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(_Op(kind, args, fut))
        self._idle.clear()
        if len(self._pending) == 1:
            self._loop.call_soon(self._start_batches)
        return fut

    def _start_batches(self) -> None:
        assert self._loop is not None and self._idle is not None
        while self._pending and len(self._inflight) < self._writers:
            ops = self._pending[: self._limits.write_batch_max]
            del self._pending[: len(ops)]
            # Batches naming a common user (a recipient, an acking user, or a sender: so one
            # sender's batches, and a SEND_AFTER's previous message, commit in order) wait
            # for each other.
            senders = {op.args[0].user for op in ops if op.kind == _SEND}
            users = frozenset(_users_of(ops) | senders)
            waits = [b.done for b in self._inflight if b.users & users]
            batch = _Batch(ops, users, self._loop.create_future())
            self._inflight.append(batch)
            task = self._loop.create_task(self._run_batch(batch, waits))
            self._tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)
        if not self._pending and not self._inflight:
            self._idle.set()

    async def _run_batch(self, batch: _Batch, waits: list[asyncio.Future[None]]) -> None:
        try:
            for fut in waits:
                await asyncio.shield(fut)
            outcome = await self._commit_batch(batch.ops)
        except Exception as exc:
            if not isinstance(exc, RelayError):
                log.exception("write batch of %d failed", len(batch.ops))
                exc = StorageError("storage failure")
            outcome = _Outcome(results=[(op.future, False, exc) for op in batch.ops])
        else:
            self._commits += 1
            self._committed_ops += len(batch.ops)
            self._accepted += outcome.accepted
            self._queued += outcome.queued
        for fut, ok, value in outcome.results:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        # The futures' callbacks (send results) run first; the fan-out follows them, in the
        # order batches finish (batches sharing a user finish in submission order).
        if outcome.deliveries and self._listener is not None:
            assert self._loop is not None
            self._loop.call_soon(self._deliver, outcome.deliveries)
        self._inflight.remove(batch)
        batch.done.set_result(None)
        self._start_batches()

    def _deliver(self, deliveries: list[Delivery]) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            listener(deliveries)
        except Exception:
            log.exception("delivery listener failed")

    async def _commit_batch(self, ops: list[_Op]) -> _Outcome:
        pool = self._pool
        if pool is None:
            raise StorageError("store is closed")
        with storage_errors("write batch"):
            async with pool.acquire() as conn:
                for attempt in range(1, _ATTEMPTS + 1):
                    try:
                        async with conn.transaction():
                            return await self._batch_statements(conn, ops)
                    except _RETRYABLE as exc:
                        if attempt == _ATTEMPTS:
                            raise StorageError("write batch kept conflicting") from exc
                        log.info("write batch retried (%s)", type(exc).__name__)
        raise AssertionError("unreachable")

    async def _batch_statements(self, conn: asyncpg.Connection, ops: list[_Op]) -> _Outcome:
        """Run one batch's statements inside its transaction; change nothing outside it."""
        out = _Outcome()
        sends = [op for op in ops if op.kind == _SEND]
        acks = [op for op in ops if op.kind == _ACK]
        known: dict[bytes, tuple[str, int, int, int]] = {}
        directory: dict[str, dict[int, int]] = {}
        last_seq: dict[int, int] = {}
        usage: dict[int, list[int]] = {}
        senders = sorted({op.args[0].user for op in sends})
        account: dict[str, int] = {}  # sender -> stored bytes
        shares: dict[tuple[int, str], list[int]] = {}  # (device pk, sender) -> [rows, bytes]
        wrote: set[tuple[str, str]] = set()  # (writer, peer)
        rules = self._rules
        assert rules is not None
        dkeys = [rules.digest(op.args[0], op.args[1].message_id) for op in sends]
        # A SEND_AFTER's previous message is looked up with the batch's own ids.
        afters = [(op.args[0], op.args[1].after) for op in sends if op.args[1].after is not None]
        delivered: dict[bytes, tuple[int, int]] = {}  # digest -> (expires, recipients)
        rows = await conn.fetch(
            _BATCH_READ,
            sorted(_users_of(ops)),
            [op.args[1].message_id for op in sends] + [after for _, after in afters],
            senders,
            dkeys + [rules.digest(sender, after) for sender, after in afters],
        )
        for kind, name, dev_id, pk, seq_or_ms, count, size, mid, other in rows:
            if kind == 0:
                directory.setdefault(name, {})[int(dev_id)] = int(pk)
                last_seq[int(pk)] = int(seq_or_ms)
                usage[int(pk)] = [int(count), int(size)]
            elif kind == 1:
                directory.setdefault(name, {})
            elif kind == 2:
                known[bytes(mid)] = (name, int(dev_id), int(pk), int(seq_or_ms))
            elif kind == 3:
                account[name] = int(seq_or_ms)
            elif kind == 4:
                shares[(int(pk), name)] = [int(seq_or_ms), int(count)]
            elif kind == 6:
                delivered[bytes(mid)] = (int(seq_or_ms), int(pk))
            else:
                wrote.add((name, other))
        new_wrote: list[tuple[str, str]] = []
        added: dict[int, list[int]] = {}  # device pk -> [rows, bytes] this batch's sends add
        msgs: list[tuple[bytes, str, int, int, int, bytes | None, bytes, int]] = []
        rows_mb: list[tuple[int, int, bytes, int]] = []
        in_batch: dict[bytes, tuple[str, int, int, int]] = {}
        lim = self._limits
        for op, dkey in zip(sends, dkeys, strict=True):
            sender, env, now_ms = op.args
            done = delivered.get(dkey)
            if done is not None:  # the sender's own delivered message (checked first: another
                # sender may since have reused the id)
                out.results.append(
                    (op.future, True, rules.receipt(env.message_id, done[1], done[0]))
                )
                continue
            try:
                prior = in_batch.get(env.message_id) or known.get(env.message_id)
                if prior is not None:
                    if prior[0] != sender.user or prior[1] != sender.device:
                        raise Conflict(
                            "message id used by another sender", code="message_id_conflict"
                        )
                    out.results.append(
                        (op.future, True, SendReceipt(env.message_id, prior[2], prior[3]))
                    )
                    continue
                if env.after is not None:
                    before = in_batch.get(env.after) or known.get(env.after)
                    stored = (
                        rules.digest(sender, env.after) in delivered
                        if before is None
                        else (before[0], before[1]) == (sender.user, sender.device)
                    )
                    if not stored:
                        raise PredecessorMissing()
                targets = resolve_recipients(sender, env.recipients, directory.get)
                size = len(env.body)
                user = sender.user
                check_sender_share(
                    user,
                    targets,
                    lambda pk, user=user: shares.get((pk, user), (0, 0)),  # type: ignore[misc]
                    lambda peer, user=user: (peer, user) in wrote,  # type: ignore[misc]
                    size,
                    lim,
                )
                check_quota(
                    targets,
                    usage.__getitem__,
                    size,
                    lim.mailbox_max_messages,
                    lim.mailbox_max_bytes,
                )
                used = account.get(user, 0)
                if used + size > lim.account_max_bytes:
                    raise AccountQuotaExceeded(lim.account_max_bytes)
            except RelayError as exc:
                out.results.append((op.future, False, exc))
                continue
            msgs.append(
                (
                    env.message_id,
                    sender.user,
                    sender.device,
                    now_ms,
                    len(targets),
                    env.body if targets else None,
                    dkey,
                    rules.expires(now_ms),
                )
            )
            in_batch[env.message_id] = (sender.user, sender.device, len(targets), now_ms)
            account[user] = used + size
            for addr, dev_pk in targets:
                if addr.user != user:
                    share = shares.setdefault((dev_pk, user), [0, 0])
                    share[0] += 1
                    share[1] += size
                    # A sealed send's pseudonym (relay.sealed) never answers: no rows for it.
                    if (user, addr.user) not in wrote and not user.startswith("~"):
                        wrote.add((user, addr.user))
                        new_wrote.append((user, addr.user))
                seq = last_seq[dev_pk] + 1
                last_seq[dev_pk] = seq
                use = usage[dev_pk]
                use[0] += 1
                use[1] += size
                delta = added.setdefault(dev_pk, [0, 0])
                delta[0] += 1
                delta[1] += size
                rows_mb.append((dev_pk, seq, env.message_id, size))
                out.deliveries.append(
                    Delivery(addr, StoredMessage(seq, env.message_id, sender, now_ms, env.body))
                )
            out.queued += len(targets)
            out.accepted += 1
            out.results.append((op.future, True, SendReceipt(env.message_id, len(targets), now_ms)))
        # An id acknowledged twice in one batch counts for the first request only.
        owner: dict[tuple[int, bytes], int] = {}
        settled = {rules.digest(op.args[0], mid): mid for op in acks for mid in op.args[2]}
        for i, op in enumerate(acks):
            addr, ids, _ = op.args
            acker = directory.get(addr.user, {}).get(addr.device)
            if acker is not None:
                for mid in ids:
                    owner.setdefault((acker, mid), i)
        counts = [0] * len(acks)
        if msgs or owner or settled:
            pks = sorted(added)
            keys = list(owner)
            deleted = await conn.fetch(
                _BATCH_WRITE,
                [m[0] for m in msgs],
                [m[1] for m in msgs],
                [m[2] for m in msgs],
                [m[3] for m in msgs],
                [m[4] for m in msgs],
                [m[5] for m in msgs],
                [r[0] for r in rows_mb],
                [r[1] for r in rows_mb],
                [r[2] for r in rows_mb],
                [r[3] for r in rows_mb],
                pks,
                [last_seq[pk] for pk in pks],
                [added[pk][0] for pk in pks],
                [added[pk][1] for pk in pks],
                [k[0] for k in keys],
                [k[1] for k in keys],
                [w[0] for w in new_wrote],
                [w[1] for w in new_wrote],
                [m[6] for m in msgs],
                [m[7] for m in msgs],
                list(settled),
                list(settled.values()),
            )
            for dev_pk, mid, _size in deleted:
                counts[owner[(int(dev_pk), bytes(mid))]] += 1
            out.queued -= len(deleted)
        out.results.extend((op.future, True, n) for op, n in zip(acks, counts, strict=True))
        return out

    # -- accounts ------------------------------------------------------------------------

    async def _transaction(self, what: str, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        """Run ``fn`` in its own transaction (retried on a deadlock or serialization failure)."""
        pool = self._pool_or_fail()
        with storage_errors(what):
            async with pool.acquire() as conn:
                for attempt in range(1, _ATTEMPTS + 1):
                    try:
                        async with conn.transaction():
                            return await fn(conn)
                    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                        if attempt == _ATTEMPTS:
                            raise
        raise AssertionError("unreachable")

    async def create_account(
        self, addr: Address, auth_key: bytes, now_ms: int, invite: bytes | None = None
    ) -> None:
        """See ``RelayStore.create_account`` (the invite is consumed in the same transaction:
        of two nodes registering with one code, exactly one succeeds)."""

        async def tx(conn: asyncpg.Connection) -> None:
            user_pk = await conn.fetchval(
                "INSERT INTO users(username, created_ms) VALUES ($1, $2) "
                "ON CONFLICT (username) DO NOTHING RETURNING pk",
                addr.user,
                now_ms,
            )
            if user_pk is None:
                raise Conflict("username is taken", code="username_taken")
            if invite is not None:
                used = await conn.fetchval(
                    "UPDATE invites SET used_by = $1, used_ms = $2 WHERE code_hash = $3 "
                    "AND used_by IS NULL AND expires_ms >= $2 RETURNING 1",
                    addr.user,
                    now_ms,
                    invite,
                )
                if used is None:  # raising rolls the user row back
                    raise Forbidden("unknown, used or expired invite code", code="invite_invalid")
            await conn.execute(
                "INSERT INTO devices(user_pk, device_id, auth_key, created_ms) "
                "VALUES ($1, $2, $3, $4)",
                user_pk,
                addr.device,
                auth_key,
                now_ms,
            )

        await self._transaction("create account", tx)

    async def set_banned(self, user: str, banned: bool, now_ms: int) -> bool:
        """See ``RelayStore.set_banned``."""

        async def tx(conn: asyncpg.Connection) -> bool:
            if await conn.fetchval("SELECT 1 FROM users WHERE username = $1", user) is None:
                return False
            if banned:
                await conn.execute(
                    "INSERT INTO bans(username, banned_ms) VALUES ($1, $2) "
                    "ON CONFLICT (username) DO NOTHING",
                    user,
                    now_ms,
                )
            else:
                await conn.execute("DELETE FROM bans WHERE username = $1", user)
            return True

        result: bool = await self._transaction("set ban", tx)
        return result

    async def banned_users(self) -> frozenset[str]:
        """See ``RelayStore.banned_users``."""
        pool = self._pool_or_fail()
        with storage_errors("read bans"):
            rows = await pool.fetch("SELECT username FROM bans")
        return frozenset(str(r[0]) for r in rows)

    async def create_invite(self, code_hash: bytes, now_ms: int, expires_ms: int) -> None:
        """See ``RelayStore.create_invite``."""
        pool = self._pool_or_fail()
        with storage_errors("create invite"):
            await pool.execute(
                "INSERT INTO invites(code_hash, created_ms, expires_ms) VALUES ($1, $2, $3)",
                code_hash,
                now_ms,
                expires_ms,
            )

    async def list_invites(self) -> list[Invite]:
        """See ``RelayStore.list_invites``."""
        pool = self._pool_or_fail()
        with storage_errors("list invites"):
            rows = await pool.fetch(
                "SELECT code_hash, created_ms, expires_ms, used_by, used_ms FROM invites "
                "ORDER BY created_ms, code_hash"
            )
        return [
            Invite(
                bytes(r[0]).hex()[:12],
                int(r[1]),
                int(r[2]),
                r[3],
                None if r[4] is None else int(r[4]),
            )
            for r in rows
        ]

    async def set_recovery_verifier(self, user: str, verifier: bytes) -> bool:
        """See ``RelayStore.set_recovery_verifier``."""

        async def tx(conn: asyncpg.Connection) -> bool:
            if await conn.fetchval("SELECT 1 FROM users WHERE username = $1", user) is None:
                return False
            await conn.execute(
                "INSERT INTO recovery(username, verifier) VALUES ($1, $2) "
                "ON CONFLICT (username) DO UPDATE SET verifier = EXCLUDED.verifier",
                user,
                verifier,
            )
            return True

        result: bool = await self._transaction("set recovery verifier", tx)
        return result

    async def recovery_verifier(self, user: str) -> bytes | None:
        """See ``RelayStore.recovery_verifier``."""
        pool = self._pool_or_fail()
        with storage_errors("read recovery verifier"):
            found = await pool.fetchval("SELECT verifier FROM recovery WHERE username = $1", user)
        return None if found is None else bytes(found)

    async def open_provision(
        self, slot: ProvisionSlot, token_hash: bytes, now_ms: int, max_live: int
    ) -> bool:
        """See ``RelayStore.open_provision`` (nodes opening slots at once take turns on a
        transaction-scoped advisory lock, so ``max_live`` holds across nodes)."""

        async def tx(conn: asyncpg.Connection) -> bool:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PROVISION_LOCK)
            await conn.execute("DELETE FROM provisions WHERE expires_ms <= $1", now_ms)
            if await conn.fetchval("SELECT count(*) FROM provisions") >= max_live:
                return False
            inserted = await conn.fetchval(
                "INSERT INTO provisions(slot_id, token_hash, auth_key, expires_ms) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (slot_id) DO NOTHING RETURNING 1",
                slot.slot_id,
                token_hash,
                slot.auth_key,
                slot.expires_ms,
            )
            if inserted is None:
                raise Conflict("provisioning slot exists", code="provisioning_exists")
            return True

        result: bool = await self._transaction("open provisioning slot", tx)
        return result

    async def provision(self, slot_id: bytes, now_ms: int) -> ProvisionSlot | None:
        """See ``RelayStore.provision``."""
        pool = self._pool_or_fail()
        with storage_errors("read provisioning slot"):
            row = await pool.fetchrow(
                "SELECT auth_key, expires_ms, grant_ct IS NOT NULL AS filled FROM provisions "
                "WHERE slot_id = $1 AND expires_ms > $2",
                slot_id,
                now_ms,
            )
        if row is None:
            return None
        return ProvisionSlot(slot_id, bytes(row[0]), int(row[1]), bool(row[2]))

    async def fill_provision(self, slot_id: bytes, grant: bytes, now_ms: int) -> ProvisionFill:
        """See ``RelayStore.fill_provision``."""

        async def tx(conn: asyncpg.Connection) -> ProvisionFill:
            filled = await conn.fetchval(
                "SELECT grant_ct IS NOT NULL FROM provisions "
                "WHERE slot_id = $1 AND expires_ms > $2 FOR UPDATE",
                slot_id,
                now_ms,
            )
            if filled is None:
                return "missing"
            if filled:
                return "filled"
            await conn.execute(
                "UPDATE provisions SET grant_ct = $2 WHERE slot_id = $1", slot_id, grant
            )
            return "stored"

        result: ProvisionFill = await self._transaction("fill provisioning slot", tx)
        return result

    async def take_provision(self, slot_id: bytes, token_hash: bytes, now_ms: int) -> ProvisionTake:
        """See ``RelayStore.take_provision``."""

        async def tx(conn: asyncpg.Connection) -> ProvisionTake:
            row = await conn.fetchrow(
                "SELECT token_hash, grant_ct FROM provisions "
                "WHERE slot_id = $1 AND expires_ms > $2 FOR UPDATE",
                slot_id,
                now_ms,
            )
            if row is None or not hmac.compare_digest(bytes(row[0]), token_hash):
                return ProvisionTake(False, None)
            if row[1] is None:
                return ProvisionTake(True, None)
            await conn.execute("DELETE FROM provisions WHERE slot_id = $1", slot_id)
            return ProvisionTake(True, bytes(row[1]))

        result: ProvisionTake = await self._transaction("take provisioning grant", tx)
        return result

    async def sweep_provisions(self, now_ms: int) -> int:
        """See ``RelayStore.sweep_provisions``."""
        pool = self._pool_or_fail()
        with storage_errors("sweep provisioning slots"):
            status = await pool.execute("DELETE FROM provisions WHERE expires_ms <= $1", now_ms)
        return int(status.split()[-1])

    async def touch_device(self, addr: Address, seen_ms: int) -> None:
        """See ``RelayStore.touch_device``."""
        pool = self._pool_or_fail()
        with storage_errors("touch device"):
            await pool.execute(
                "UPDATE devices SET seen_ms = $3 WHERE device_id = $2 AND user_pk = "
                "(SELECT pk FROM users WHERE username = $1)",
                addr.user,
                addr.device,
                seen_ms,
            )

    async def add_device(
        self, addr: Address, auth_key: bytes, now_ms: int, name: bytes | None = None
    ) -> None:
        """See ``RelayStore.add_device``."""

        async def tx(conn: asyncpg.Connection) -> None:
            # The user row's lock serializes device changes of one user across nodes, so the
            # device limit holds.
            user_pk = await conn.fetchval(
                "SELECT pk FROM users WHERE username = $1 FOR UPDATE", addr.user
            )
            if user_pk is None:
                raise NotFound("unknown user", code="unknown_user")
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT device_id FROM devices WHERE user_pk = $1", user_pk
                )
            ]
            if addr.device in ids:
                raise Conflict("device id already registered", code="device_exists")
            if len(ids) >= self._limits.max_devices_per_user:
                raise Conflict("too many devices", code="too_many_devices")
            await conn.execute(
                "INSERT INTO devices(user_pk, device_id, auth_key, created_ms, name) "
                "VALUES ($1, $2, $3, $4, $5)",
                user_pk,
                addr.device,
                auth_key,
                now_ms,
                name,
            )

        await self._transaction("add device", tx)

    async def list_devices(self, user: str) -> list[DeviceInfo]:
        """See ``RelayStore.list_devices``."""
        pool = self._pool_or_fail()
        with storage_errors("list devices"):
            rows = await pool.fetch(
                "SELECT d.device_id, d.created_ms, d.spk_id IS NOT NULL, d.name, d.seen_ms "
                "FROM devices d JOIN users u ON u.pk = d.user_pk WHERE u.username = $1 "
                "ORDER BY d.device_id",
                user,
            )
        return [
            DeviceInfo(
                int(r[0]),
                int(r[1]),
                bool(r[2]),
                None if r[3] is None else bytes(r[3]),
                None if r[4] is None else int(r[4]),
            )
            for r in rows
        ]

    async def remove_device(self, addr: Address) -> None:
        """See ``RelayStore.remove_device``."""

        async def tx(conn: asyncpg.Connection) -> int:
            await conn.execute("SELECT 1 FROM users WHERE username = $1 FOR UPDATE", addr.user)
            dev_pk = await conn.fetchval(_DEVICE_PK + " FOR UPDATE OF d", addr.user, addr.device)
            if dev_pk is None:
                raise NotFound("unknown device", code="unknown_device")
            removed = int(
                await conn.fetchval(_DROP_MAILBOX_ROWS.format(where="device_pk = $1"), dev_pk)
            )
            await conn.execute("DELETE FROM otpks WHERE device_pk = $1", dev_pk)
            await conn.execute("DELETE FROM devices WHERE pk = $1", dev_pk)
            return removed

        self._queued -= await self._transaction("remove device", tx)

    async def identity_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.identity_key``."""
        return await self._device_key(addr, "identity_key", "read identity key")

    async def _device_key(
        self, addr: Address, column: Literal["identity_key", "auth_key"], what: str
    ) -> bytes | None:
        """A device's public key of one kind, or None (no such device, or none uploaded)."""
        pool = self._pool_or_fail()
        with storage_errors(what):
            key = await pool.fetchval(
                f"SELECT d.{column} FROM devices d JOIN users u "  # noqa: S608 - fixed names
                "ON u.pk = d.user_pk WHERE u.username = $1 AND d.device_id = $2",
                addr.user,
                addr.device,
            )
        return None if key is None else bytes(key)

    async def sender_keys(self) -> list[SenderKeyRow]:
        """See ``RelayStore.sender_keys``."""
        pool = self._pool_or_fail()
        with storage_errors("read sender keys"):
            rows = await pool.fetch(
                "SELECT key_id, seed, created_ms, endorsement FROM sender_keys ORDER BY key_id"
            )
        return [
            SenderKeyRow(int(r[0]), bytes(r[1]), int(r[2]), None if r[3] is None else bytes(r[3]))
            for r in rows
        ]

    async def add_sender_key(self, row: SenderKeyRow) -> bool:
        """See ``RelayStore.add_sender_key``."""
        pool = self._pool_or_fail()
        with storage_errors("add sender key"):
            done = await pool.fetchval(
                "INSERT INTO sender_keys(key_id, seed, created_ms, endorsement) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
                row.key_id,
                row.seed,
                row.created_ms,
                row.endorsement,
            )
        return done is not None

    async def set_access_verifier(self, user: str, verifier: bytes | None) -> bool:
        """See ``RelayStore.set_access_verifier``."""

        async def tx(conn: asyncpg.Connection) -> bool:
            if await conn.fetchval("SELECT 1 FROM users WHERE username = $1", user) is None:
                return False
            if verifier is None:
                await conn.execute("DELETE FROM access WHERE username = $1", user)
            else:
                await conn.execute(
                    "INSERT INTO access(username, verifier) VALUES ($1, $2) "
                    "ON CONFLICT (username) DO UPDATE SET verifier = EXCLUDED.verifier",
                    user,
                    verifier,
                )
            return True

        result: bool = await self._transaction("set access verifier", tx)
        return result

    async def access_verifiers(self, users: Sequence[str]) -> dict[str, bytes]:
        """See ``RelayStore.access_verifiers``."""
        pool = self._pool_or_fail()
        with storage_errors("read access verifiers"):
            rows = await pool.fetch(
                "SELECT username, verifier FROM access WHERE username = ANY($1::text[])",
                list(dict.fromkeys(users)),
            )
        return {str(r[0]): bytes(r[1]) for r in rows}

    async def auth_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.auth_key``."""
        return await self._device_key(addr, "auth_key", "read auth key")

    # -- keys ----------------------------------------------------------------------------

    async def upload_keys(self, addr: Address, upload: KeyUpload) -> int:
        """See ``RelayStore.upload_keys``."""

        async def tx(conn: asyncpg.Connection) -> int:
            row = await conn.fetchrow(
                "SELECT d.pk, d.identity_key, d.spk_id FROM devices d "
                "JOIN users u ON u.pk = d.user_pk WHERE u.username = $1 AND d.device_id = $2 "
                "FOR UPDATE OF d",
                addr.user,
                addr.device,
            )
            if row is None:
                raise NotFound("unknown device", code="unknown_device")
            dev_pk, stored_identity, spk_id = row
            if stored_identity is not None and bytes(stored_identity) != upload.identity_key:
                raise Conflict("a different identity key is registered", code="identity_mismatch")
            if spk_id is None and upload.signed_prekey is None:
                raise BadRequest("the first upload must include signed_prekey")
            new_ids = sorted({k.id for k in upload.one_time_prekeys})
            existing, already = await conn.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE key_id = ANY($2::int[])) "
                "FROM otpks WHERE device_pk = $1",
                dev_pk,
                new_ids,
            )
            total = int(existing) + len(new_ids) - int(already)
            if total > self._limits.max_one_time_prekeys:
                raise Conflict("too many one-time prekeys stored", code="prekey_pool_full")
            spk = upload.signed_prekey
            await conn.execute(
                "UPDATE devices SET identity_key = $2, registration_id = $3, "
                "spk_id = coalesce($4, spk_id), spk_pub = coalesce($5, spk_pub), "
                "spk_sig = coalesce($6, spk_sig) WHERE pk = $1",
                dev_pk,
                upload.identity_key,
                upload.registration_id,
                None if spk is None else spk.id,
                None if spk is None else spk.public_key,
                None if spk is None else spk.signature,
            )
            if upload.one_time_prekeys:
                await conn.execute(
                    "INSERT INTO otpks(device_pk, key_id, public_key) "
                    "SELECT $1, k, p FROM unnest($2::int[], $3::bytea[]) AS v(k, p) "
                    "ON CONFLICT (device_pk, key_id) "
                    "DO UPDATE SET public_key = excluded.public_key",
                    dev_pk,
                    [k.id for k in _last_per_id(upload.one_time_prekeys)],
                    [k.public_key for k in _last_per_id(upload.one_time_prekeys)],
                )
            return total

        result: int = await self._transaction("upload keys", tx)
        return result

    async def prekey_count(self, addr: Address) -> int:
        """See ``RelayStore.prekey_count``."""
        pool = self._pool_or_fail()
        with storage_errors("count prekeys"):
            n = await pool.fetchval(
                f"SELECT count(*) FROM otpks WHERE device_pk = ({_DEVICE_PK})",  # noqa: S608
                addr.user,
                addr.device,
            )
        return int(n)

    async def fetch_bundles(
        self, user: str, device: int | None, one_time: bool = True
    ) -> list[DeviceBundle]:
        """See ``RelayStore.fetch_bundles`` (each one-time prekey is handed out once, whichever
        node hands it out)."""

        async def tx(conn: asyncpg.Connection) -> list[DeviceBundle]:
            user_pk = await conn.fetchval("SELECT pk FROM users WHERE username = $1", user)
            if user_pk is None:
                raise NotFound("unknown user", code="unknown_user")
            rows = await conn.fetch(
                "SELECT pk, device_id, registration_id, identity_key, spk_id, spk_pub, spk_sig "
                "FROM devices WHERE user_pk = $1 AND ($2::int IS NULL OR device_id = $2) "
                "AND identity_key IS NOT NULL AND spk_id IS NOT NULL ORDER BY device_id",
                user_pk,
                device,
            )
            bundles: list[DeviceBundle] = []
            for dev_pk, dev_id, reg_id, identity, spk_id, spk_pub, spk_sig in rows:
                otpk_row = (
                    await conn.fetchrow(
                        "DELETE FROM otpks WHERE (device_pk, key_id) = (SELECT device_pk, key_id "
                        "FROM otpks WHERE device_pk = $1 ORDER BY key_id LIMIT 1 "
                        "FOR UPDATE SKIP LOCKED) RETURNING key_id, public_key",
                        dev_pk,
                    )
                    if one_time
                    else None
                )
                otpk = (
                    None
                    if otpk_row is None
                    else OneTimePrekey(int(otpk_row[0]), bytes(otpk_row[1]))
                )
                bundles.append(
                    DeviceBundle(
                        device_id=int(dev_id),
                        registration_id=int(reg_id),
                        identity_key=bytes(identity),
                        signed_prekey=SignedPrekey(int(spk_id), bytes(spk_pub), bytes(spk_sig)),
                        one_time_prekey=otpk,
                    )
                )
            if device is not None and not bundles:
                raise NotFound("unknown device or no keys uploaded", code="unknown_device")
            return bundles

        result: list[DeviceBundle] = await self._transaction("fetch bundles", tx)
        return result

    # -- messages ------------------------------------------------------------------------

    def submit_send(
        self, sender: Address, envelope: Envelope, now_ms: int
    ) -> asyncio.Future[SendReceipt]:
        """See ``RelayStore.submit_send``."""
        return self._submit(_SEND, (sender, envelope, now_ms))

    async def ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> int:
        """See ``RelayStore.ack``."""
        return await self.submit_ack(addr, message_ids, settled)

    def submit_ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> asyncio.Future[int]:
        """See ``RelayStore.submit_ack``."""
        return self._submit(_ACK, (addr, tuple(dict.fromkeys(message_ids)), tuple(settled)))

    async def fetch_mailbox(
        self, addr: Address, after_seq: int, limit: int, max_bytes: int
    ) -> list[StoredMessage]:
        """See ``RelayStore.fetch_mailbox``."""
        pool = self._pool_or_fail()
        with storage_errors("read mailbox"):
            rows = await pool.fetch(
                "SELECT mb.seq, m.msg_id, m.sender, m.sender_device, m.stored_ms, m.body "  # noqa: S608
                "FROM mailbox mb JOIN messages m ON m.msg_id = mb.msg_id "
                f"WHERE mb.device_pk = ({_DEVICE_PK}) AND mb.seq > $3 "
                "ORDER BY mb.seq LIMIT $4",
                addr.user,
                addr.device,
                after_seq,
                limit,
            )
        out: list[StoredMessage] = []
        total = 0
        for seq, mid, sender, sdev, stored, body in rows:
            data = bytes(body) if body is not None else b""
            if out and total + len(data) > max_bytes:
                break
            total += len(data)
            out.append(
                StoredMessage(int(seq), bytes(mid), Address(sender, int(sdev)), int(stored), data)
            )
        return out

    async def mailbox_count(self, addr: Address) -> int:
        """See ``RelayStore.mailbox_count``."""
        pool = self._pool_or_fail()
        with storage_errors("count mailbox"):
            n = await pool.fetchval(
                f"SELECT count(*) FROM mailbox WHERE device_pk = ({_DEVICE_PK})",  # noqa: S608
                addr.user,
                addr.device,
            )
        return int(n)

    # -- blobs and retention -------------------------------------------------------------

    async def put_blob(
        self, blob_id: str, size: int, now_ms: int, owner: str | None = None
    ) -> bool:
        """See ``RelayStore.put_blob`` (the owner's quota is checked under the lock of its
        ``account_bytes`` row, so it holds across nodes)."""
        limit = self._limits.account_max_bytes

        async def tx(conn: asyncpg.Connection) -> bool:
            held = await conn.fetchval("SELECT size FROM blobs WHERE id = $1", blob_id)
            held = size if held is None else int(held)
            if owner is not None and (
                await conn.fetchval(
                    "SELECT 1 FROM blob_owners WHERE blob_id = $1 AND username = $2",
                    blob_id,
                    owner,
                )
                is None
            ):
                await conn.execute(
                    "INSERT INTO account_bytes(username) VALUES ($1) "
                    "ON CONFLICT (username) DO NOTHING",
                    owner,
                )
                used = await conn.fetchval(
                    "SELECT sent + blobs FROM account_bytes WHERE username = $1 FOR UPDATE",
                    owner,
                )
                # No row: the sweeper deleted it (it held 0) after the INSERT above.
                if int(used or 0) + held > limit:
                    raise AccountQuotaExceeded(limit)
                await conn.execute(
                    "INSERT INTO blob_owners(blob_id, username, size) VALUES ($1, $2, $3) "
                    "ON CONFLICT DO NOTHING",
                    blob_id,
                    owner,
                    held,
                )
            # xmax = 0 only on a freshly inserted row version, not on an updated one.
            return bool(
                await conn.fetchval(
                    "INSERT INTO blobs(id, size, stored_ms) VALUES ($1, $2, $3) "
                    "ON CONFLICT (id) DO UPDATE SET stored_ms = excluded.stored_ms "
                    "RETURNING xmax = 0",
                    blob_id,
                    size,
                    now_ms,
                )
            )

        new: bool = await self._transaction("record blob", tx)
        if new:
            self._blob_bytes += size
        return new

    async def delete_blob(self, blob_id: str, owner: str) -> bool:
        """See ``RelayStore.delete_blob``."""

        async def tx(conn: asyncpg.Connection) -> int | None:
            if (
                await conn.fetchval(
                    "DELETE FROM blob_owners WHERE blob_id = $1 AND username = $2 RETURNING 1",
                    blob_id,
                    owner,
                )
                is None
            ):
                raise NotFound("unknown blob", code="unknown_blob")
            if await conn.fetchval("SELECT 1 FROM blob_owners WHERE blob_id = $1", blob_id):
                return None
            gone = await conn.fetchval("DELETE FROM blobs WHERE id = $1 RETURNING size", blob_id)
            return 0 if gone is None else int(gone)

        freed: int | None = await self._transaction("delete blob", tx)
        if freed is None:
            return False
        self._blob_bytes -= freed
        return True

    async def account_usage(self, user: str) -> int:
        """See ``RelayStore.account_usage``."""
        pool = self._pool_or_fail()
        with storage_errors("read account usage"):
            used = await pool.fetchval(
                "SELECT sent + blobs FROM account_bytes WHERE username = $1", user
            )
        return 0 if used is None else int(used)

    async def blob_exists(self, blob_id: str) -> bool:
        """See ``RelayStore.blob_exists``."""
        pool = self._pool_or_fail()
        with storage_errors("read blob"):
            found = await pool.fetchval("SELECT 1 FROM blobs WHERE id = $1", blob_id)
        return found is not None

    async def sweep(self, now_ms: int) -> SweepReport:
        """See ``RelayStore.sweep``. One node sweeps at a time: a node that finds the sweep
        lock (a transaction-level advisory lock) taken sweeps nothing and reports nothing."""
        lim = self._limits
        rules = self._rules
        assert rules is not None

        async def tx(conn: asyncpg.Connection) -> tuple[SweepReport, int, int]:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._sweep_key):
                return SweepReport(0, ()), 0, 0
            expired = [
                r[0]
                for r in await conn.fetch(
                    "SELECT msg_id FROM messages WHERE stored_ms < $1 ORDER BY stored_ms LIMIT $2",
                    now_ms - lim.message_ttl_ms,
                    _SWEEP_CHUNK,
                )
            ]
            removed = 0
            if expired:
                await conn.execute(
                    "SELECT 1 FROM devices WHERE pk IN (SELECT device_pk FROM mailbox "
                    "WHERE msg_id = ANY($1::bytea[])) ORDER BY pk FOR UPDATE",
                    expired,
                )
                removed = int(
                    await conn.fetchval(
                        _DROP_MAILBOX_ROWS.format(where="msg_id = ANY($1::bytea[])"), expired
                    )
                )
                await conn.execute("DELETE FROM messages WHERE msg_id = ANY($1::bytea[])", expired)
            forgotten = int(
                await conn.fetchval(
                    "WITH d AS (DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe "
                    "WHERE expires <= $1 LIMIT $2) RETURNING 1) SELECT count(*) FROM d",
                    rules.current(now_ms),
                    SWEEP_CHUNK,
                )
            )
            if forgotten < SWEEP_CHUNK:  # the last call of a sweep (it scans the table)
                # An account whose messages were all delivered and who holds no blob: its row
                # would only say that it once sent something.
                await conn.execute("DELETE FROM account_bytes WHERE sent = 0 AND blobs = 0")
            blob_rows = await conn.fetch(
                "DELETE FROM blobs WHERE id IN (SELECT id FROM blobs WHERE stored_ms < $1 "
                "LIMIT $2) RETURNING id, size",
                now_ms - lim.blob_ttl_ms,
                _SWEEP_CHUNK,
            )
            if blob_rows:
                await conn.execute(
                    "DELETE FROM blob_owners WHERE blob_id = ANY($1::text[])",
                    [str(r[0]) for r in blob_rows],
                )
            blob_bytes = sum(int(r[1]) for r in blob_rows)
            more = _SWEEP_CHUNK in (len(expired), len(blob_rows)) or forgotten == SWEEP_CHUNK
            report = SweepReport(len(expired), tuple(str(r[0]) for r in blob_rows), forgotten, more)
            return report, removed, blob_bytes

        report, removed, blob_bytes = await self._transaction("sweep", tx)
        self._queued -= removed
        self._blob_bytes -= blob_bytes
        if not report.more:
            await self._vacuum_queue_tables()
        return report  # type: ignore[no-any-return]

    async def _vacuum_queue_tables(self) -> None:
        """VACUUM the tables whose every row is deleted soon after it is inserted, at most once
        per ``_VACUUM_SECONDS``, after a sweep's last call.

        Autovacuum does this when it runs (migration 6 makes it act on 1% dead rows), but a
        server may have it off or behind; then every delivered message left dead row versions
        and the database grew by about 58 MB a minute at 1,000 msg/s (docs/storage.md). A plain
        VACUUM blocks no reads or writes; SKIP_LOCKED leaves a table another node (or
        autovacuum) is vacuuming right now.
        """
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_vacuum:
            return
        self._next_vacuum = loop.time() + _VACUUM_SECONDS
        pool = self._pool_or_fail()
        # A failed or slow vacuum is logged (storage_errors) and tried again next time; the
        # sweep itself has committed.
        with contextlib.suppress(StorageError), storage_errors("vacuum"):
            await pool.execute(
                "VACUUM (SKIP_LOCKED) messages, mailbox, dedupe", timeout=_VACUUM_TIMEOUT_SECONDS
            )


def _users_of(ops: Sequence[_Op]) -> set[str]:
    """The users a batch's operations name: recipients of sends, the acking device's user."""
    users: set[str] = set()
    for op in ops:
        if op.kind == _SEND:
            users.update(r.user for r in op.args[1].recipients)
        else:
            users.add(op.args[0].user)
    return users


def _last_per_id(keys: Sequence[OneTimePrekey]) -> list[OneTimePrekey]:
    """One key per id, the last one given (as ``INSERT OR REPLACE`` row by row would keep)."""
    return list({k.id: k for k in keys}.values())
