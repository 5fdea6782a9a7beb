# Invariants:
# * Nothing here, nor anything built on it, lets an asyncpg or socket exception out: callers
#   wrap every database call in ``storage_errors`` and see only ``StorageError``.
# * A DSN is never logged, put in an exception or a repr: ``redact_dsn`` gives the form that may
#   be shown (no user, no password, no query string).
# * The schema changes only through ``MIGRATIONS``: numbered steps, each applied once, in order,
#   inside one transaction that holds an advisory lock, so nodes starting together apply each
#   step exactly once; a database whose schema is newer than this code is refused.
"""What the PostgreSQL relay store and blob store share: pool, schema migrations, errors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from relay.errors import StorageError

__all__ = [
    "DB_ERRORS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PgSettings",
    "create_pool",
    "lock_key",
    "migrate",
    "open_pool",
    "ping",
    "redact_dsn",
    "storage_errors",
]

log = logging.getLogger("relay.store")

# Everything the driver or the network can raise while PostgreSQL is down, restarting or
# refusing a statement. asyncpg's PostgresError covers server errors, InterfaceError covers a
# connection that closed under us; OSError covers refused or reset sockets.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class PgSettings:
    """How to reach PostgreSQL.

    Attributes:
        dsn: ``postgresql://user:password@host:port/database`` (never shown: see ``redact_dsn``).
        pool_size: connections per process (writers, readers and the blob store's own pool).
        timeout_seconds: connect and statement timeout; a server that stops answering turns
            into ``StorageError`` after this long instead of hanging a request.
        schema: the PostgreSQL schema the tables live in (tests give each store its own);
            created if missing.
    """

    dsn: str
    pool_size: int = 10
    timeout_seconds: float = 10.0
    schema: str = "public"

    def __post_init__(self) -> None:
        if _SCHEMA_RE.fullmatch(self.schema) is None:
            raise ValueError("schema must be a lowercase identifier (a-z, 0-9, _)")

    def __repr__(self) -> str:
        return (
            f"PgSettings(dsn={redact_dsn(self.dsn)!r}, pool_size={self.pool_size}, "
            f"schema={self.schema!r})"
        )


def redact_dsn(dsn: str) -> str:
    """Return ``host:port/database`` of a DSN: what a log line may show.

    Args:
        dsn: a ``postgresql://`` or ``redis://`` URL.

    Returns:
        The URL without scheme credentials or query string (``?`` if it cannot be parsed).
    """
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "?"
    return f"{parts.scheme}://{host}{port}{parts.path}"


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn any database or connection failure into ``StorageError`` (the cause is logged by
    type only: server messages can quote the values of a statement).

    Args:
        what: a few words naming the operation, for the message and the log.

    Raises:
        StorageError: the body raised a database or connection error.
    """
    try:
        yield
    except DB_ERRORS as exc:
        log.warning("postgres: %s failed: %s", what, type(exc).__name__)
        raise StorageError(f"{what} failed: {type(exc).__name__}") from exc


def lock_key(schema: str, name: str) -> int:
    """A 63-bit advisory lock key for ``name`` in ``schema`` (stores sharing a database in
    different schemas never contend)."""
    digest = hashlib.blake2b(f"{schema}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def create_pool(settings: PgSettings) -> asyncpg.Pool:
    """Open a connection pool whose sessions commit durably and use ``settings.schema``.

    Raises:
        StorageError: PostgreSQL cannot be reached or refuses the login.
    """
    server_settings = {
        # A commit returns only once its WAL record is flushed (and, with synchronous
        # standbys configured on the server, replicated): a 200 means durably stored.
        "synchronous_commit": "on",
        "search_path": settings.schema,
        "application_name": "blindpost-relay",
    }
    with storage_errors(f"connect to {redact_dsn(settings.dsn)}"):
        pool = await asyncpg.create_pool(
            settings.dsn,
            min_size=1,
            max_size=settings.pool_size,
            timeout=settings.timeout_seconds,
            command_timeout=settings.timeout_seconds,
            server_settings=server_settings,
            # Statements are prepared once per connection and reused (asyncpg's cache).
            statement_cache_size=256,
        )
    assert pool is not None
    return pool


async def open_pool(settings: PgSettings) -> asyncpg.Pool:
    """``create_pool``, then ``migrate``; the pool is closed again if the migration fails.

    Raises:
        StorageError: PostgreSQL cannot be reached, or its schema is newer than this code.
    """
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.schema)
    except BaseException:
        await pool.close()
        raise
    return pool


async def ping(pool: asyncpg.Pool | None, what: str) -> str | None:
    """Readiness of a PostgreSQL-backed part: None when ``SELECT 1`` answers now, else why not.

    Args:
        pool: the part's pool (None when it is closed).
        what: the part's name, for the reason.
    """
    if pool is None:
        return f"{what} is closed"
    try:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
    except DB_ERRORS as exc:
        return f"{what} cannot reach PostgreSQL: {type(exc).__name__}"
    return None


# Each step: (version, SQL). Never edit a step once released; add a new one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE users(
            pk bigserial PRIMARY KEY,
            username text NOT NULL UNIQUE,
            created_ms bigint NOT NULL);
        CREATE TABLE devices(
            pk bigserial PRIMARY KEY,
            user_pk bigint NOT NULL REFERENCES users(pk),
            device_id integer NOT NULL,
            auth_key bytea NOT NULL,
            created_ms bigint NOT NULL,
            registration_id integer, identity_key bytea,
            spk_id integer, spk_pub bytea, spk_sig bytea,
            -- Per-device mailbox sequence and quota counters, changed only by a transaction
            -- that holds this row's lock: seqs follow commit order (docs/architecture.md).
            last_seq bigint NOT NULL DEFAULT 0,
            msg_count bigint NOT NULL DEFAULT 0,
            msg_bytes bigint NOT NULL DEFAULT 0,
            UNIQUE(user_pk, device_id));
        CREATE TABLE otpks(
            device_pk bigint NOT NULL REFERENCES devices(pk) ON DELETE CASCADE,
            key_id integer NOT NULL,
            public_key bytea NOT NULL,
            PRIMARY KEY(device_pk, key_id));
        CREATE TABLE messages(
            msg_id bytea PRIMARY KEY,
            sender text NOT NULL,
            sender_device integer NOT NULL,
            stored_ms bigint NOT NULL,
            n_recipients integer NOT NULL,
            -- Mailbox rows still holding the body; at 0 the body is dropped and the row stays
            -- as the dedupe tombstone until the dedupe window ends.
            holders integer NOT NULL,
            body bytea);
        CREATE INDEX messages_stored ON messages(stored_ms);
        -- No foreign keys on the hot tables (one check per row): rows go with their device
        -- or message through explicit statements in the same transaction.
        CREATE TABLE mailbox(
            device_pk bigint NOT NULL,
            seq bigint NOT NULL,
            msg_id bytea NOT NULL,
            size integer NOT NULL,
            PRIMARY KEY(device_pk, seq));
        CREATE UNIQUE INDEX mailbox_msg ON mailbox(msg_id, device_pk);
        CREATE TABLE blobs(
            id text PRIMARY KEY,
            size bigint NOT NULL,
            stored_ms bigint NOT NULL);
        CREATE INDEX blobs_stored ON blobs(stored_ms);
        """,
    ),
    (
        2,
        """
        -- The PostgreSQL blob store (relay.blobs_postgres): content in chunks of at most
        -- relay.blobs.CHUNK_SIZE bytes; uploads in progress are staged under an upload id
        -- and renamed to their content address in the transaction that finalizes them.
        CREATE TABLE blob_content(
            id text PRIMARY KEY,
            size bigint NOT NULL,
            chunks integer NOT NULL);
        CREATE TABLE blob_chunks(
            id text NOT NULL,
            n integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY(id, n));
        CREATE TABLE blob_uploads(
            upload_id text PRIMARY KEY,
            started_ms bigint NOT NULL);
        """,
    ),
    (
        3,
        """
        -- The shared replay guard (relay.replay.PgReplayGuard), used with store = postgres
        -- when no Redis is configured: one row per live nonce digest, and the digest key.
        CREATE TABLE replay_keys(
            key bytea PRIMARY KEY,
            exp bigint NOT NULL);
        CREATE INDEX replay_keys_exp ON replay_keys(exp);
        CREATE TABLE replay_secret(
            id integer PRIMARY KEY CHECK (id = 1),
            secret bytea NOT NULL);
        """,
    ),
    (
        4,
        """
        -- Abuse limits (relay.store.base.RelayStore: invites, bans, per-sender mailbox shares,
        -- per-account storage quota, blob owners).
        -- writer has sent at least one message to peer: the "answered" relation of the
        -- per-sender mailbox share (relay.store.rules.check_sender_share).
        CREATE TABLE wrote_to(
            writer text NOT NULL,
            peer text NOT NULL,
            PRIMARY KEY(writer, peer));
        -- Who holds which blob (the uploaders; several users may upload the same content).
        CREATE TABLE blob_owners(
            blob_id text NOT NULL,
            username text NOT NULL,
            size bigint NOT NULL,
            PRIMARY KEY(blob_id, username));
        CREATE INDEX blob_owners_user ON blob_owners(username);
        -- Bytes stored per account (account_max_bytes): bodies of its messages still waiting
        -- in some mailbox, and the blobs it holds; kept by the triggers below, in the
        -- transaction that changes them, whatever statement does.
        CREATE TABLE account_bytes(
            username text PRIMARY KEY,
            sent bigint NOT NULL DEFAULT 0,
            blobs bigint NOT NULL DEFAULT 0);
        INSERT INTO account_bytes(username, sent)
            SELECT sender, sum(octet_length(body)) FROM messages
            WHERE body IS NOT NULL GROUP BY sender;
        CREATE FUNCTION account_sent_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                IF NEW.body IS NOT NULL THEN
                    INSERT INTO account_bytes(username, sent)
                    VALUES (NEW.sender, octet_length(NEW.body))
                    ON CONFLICT (username)
                    DO UPDATE SET sent = account_bytes.sent + EXCLUDED.sent;
                END IF;
            ELSIF OLD.body IS NOT NULL AND (TG_OP = 'DELETE' OR NEW.body IS NULL) THEN
                UPDATE account_bytes SET sent = sent - octet_length(OLD.body)
                WHERE username = OLD.sender;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER messages_account_bytes
            AFTER INSERT OR UPDATE OF body OR DELETE ON messages
            FOR EACH ROW EXECUTE FUNCTION account_sent_bytes();
        CREATE FUNCTION account_blob_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO account_bytes(username, blobs) VALUES (NEW.username, NEW.size)
                ON CONFLICT (username)
                DO UPDATE SET blobs = account_bytes.blobs + EXCLUDED.blobs;
            ELSE
                UPDATE account_bytes SET blobs = blobs - OLD.size
                WHERE username = OLD.username;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER blob_owners_account_bytes
            AFTER INSERT OR DELETE ON blob_owners
            FOR EACH ROW EXECUTE FUNCTION account_blob_bytes();
        CREATE TABLE bans(
            username text PRIMARY KEY,
            banned_ms bigint NOT NULL);
        -- Invite codes by SHA-256 (the codes themselves are never stored); single-use.
        CREATE TABLE invites(
            code_hash bytea PRIMARY KEY,
            created_ms bigint NOT NULL,
            expires_ms bigint NOT NULL,
            used_by text,
            used_ms bigint);
        """,
    ),
    (
        5,
        """
        -- The public key that verifies a user's recovery key (never the key itself).
        CREATE TABLE recovery(
            username text PRIMARY KEY,
            verifier bytea NOT NULL);
        """,
    ),
    (
        6,
        """
        -- A delivered message leaves only a de-duplication record (relay.store.dedupe): a keyed
        -- digest of (sender, device, message id), the recipient count and a coarse expiry
        -- bucket. The digest and bucket are computed at send time (the relay knows the key;
        -- SQL does not) and kept on the message row until the last holder acknowledges.
        ALTER TABLE messages ADD COLUMN dedupe_key bytea, ADD COLUMN dedupe_exp bigint;
        -- The body-less rows schemas 4 and 5 kept for the dedupe window named sender and time: gone
        -- (a retry of one of them is stored again; the recipient's client drops the copy).
        DELETE FROM messages WHERE holders <= 0;
        CREATE TABLE dedupe(
            key bytea PRIMARY KEY,
            expires bigint NOT NULL,
            recipients integer NOT NULL);
        CREATE INDEX dedupe_expires ON dedupe(expires);
        CREATE TABLE dedupe_secret(
            id integer PRIMARY KEY CHECK (id = 1),
            secret bytea NOT NULL);
        CREATE FUNCTION messages_forget() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.dedupe_key IS NOT NULL THEN
                INSERT INTO dedupe(key, expires, recipients)
                VALUES (NEW.dedupe_key, NEW.dedupe_exp, NEW.n_recipients)
                ON CONFLICT (key) DO NOTHING;
            END IF;
            DELETE FROM messages WHERE msg_id = NEW.msg_id;
            RETURN NULL;
        END $$;
        -- The last holder gone (an ack, a removed device, an expiry): the row goes, in the
        -- transaction that removed the holder, whichever statement did.
        CREATE TRIGGER messages_forget
            AFTER UPDATE OF holders ON messages
            FOR EACH ROW WHEN (NEW.holders <= 0) EXECUTE FUNCTION messages_forget();
        -- Queue tables churn all the time (every row is inserted, then deleted within
        -- seconds): vacuum them after 1% dead rows, not the default 20%, so their free space
        -- is reused at once and they do not bloat (docs/storage.md).
        ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_insert_scale_factor = 0.01);
        ALTER TABLE mailbox SET (autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_insert_scale_factor = 0.01);
        ALTER TABLE dedupe SET (autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_insert_scale_factor = 0.01);
        """,
    ),
    (
        7,
        """
        -- Device-link provisioning slots (docs/relay-api.md, "Provisioning"): the new device's
        -- public auth key, the SHA-256 of its fetch token, the encrypted grant once put.
        CREATE TABLE provisions(
            slot_id bytea PRIMARY KEY,
            token_hash bytea NOT NULL,
            auth_key bytea NOT NULL,
            expires_ms bigint NOT NULL,
            grant_ct bytea);
        CREATE INDEX provisions_expires ON provisions(expires_ms);
        -- A device's name (opaque: the SDK encrypts it) and a coarse last-seen time.
        ALTER TABLE devices ADD COLUMN name bytea, ADD COLUMN seen_ms bigint;
        """,
    ),
    (
        8,
        """
        -- Sealed sender (relay.sealed): the certificate signing keys every node shares, and a
        -- hash of each user's current delivery token (never the token or its key).
        CREATE TABLE sender_keys(
            key_id bigint PRIMARY KEY,
            seed bytea NOT NULL,
            created_ms bigint NOT NULL,
            endorsement bytea);
        CREATE TABLE access(
            username text PRIMARY KEY,
            verifier bytea NOT NULL);
        """,
    ),
    (
        9,
        """
        -- Per-statement instead of per-row triggers on messages (the hot table): one call per
        -- statement over its transition table instead of a PL/pgSQL call and a one-row
        -- statement for every message inserted, forgotten and deleted (three per delivered
        -- message). Same rules as migrations 4 and 6, whatever statement changes the rows.
        DROP TRIGGER messages_account_bytes ON messages;
        DROP TRIGGER messages_forget ON messages;
        DROP FUNCTION messages_forget();
        -- A body dropped in place (no statement does that any more): still counted, per row.
        CREATE TRIGGER messages_account_bytes
            AFTER UPDATE OF body ON messages
            FOR EACH ROW EXECUTE FUNCTION account_sent_bytes();
        CREATE FUNCTION account_sent_added() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO account_bytes(username, sent)
            SELECT sender, sum(octet_length(body)) FROM added
            WHERE body IS NOT NULL GROUP BY sender
            ON CONFLICT (username) DO UPDATE SET sent = account_bytes.sent + EXCLUDED.sent;
            RETURN NULL;
        END $$;
        CREATE TRIGGER messages_account_added
            AFTER INSERT ON messages REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION account_sent_added();
        CREATE FUNCTION account_sent_removed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE account_bytes a SET sent = a.sent - r.n
            FROM (SELECT sender, sum(octet_length(body)) AS n FROM removed
                  WHERE body IS NOT NULL GROUP BY sender) r
            WHERE a.username = r.sender;
            RETURN NULL;
        END $$;
        CREATE TRIGGER messages_account_removed
            AFTER DELETE ON messages REFERENCING OLD TABLE AS removed
            FOR EACH STATEMENT EXECUTE FUNCTION account_sent_removed();
        -- The last holder gone (a removed device, an expiry; the write batch deletes acked
        -- rows itself): the rows go and leave their dedupe records, in that transaction.
        CREATE FUNCTION messages_forget() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO dedupe(key, expires, recipients)
            SELECT dedupe_key, dedupe_exp, n_recipients FROM changed
            WHERE holders <= 0 AND dedupe_key IS NOT NULL
            ON CONFLICT (key) DO NOTHING;
            DELETE FROM messages m USING changed c
            WHERE c.holders <= 0 AND m.msg_id = c.msg_id;
            RETURN NULL;
        END $$;
        CREATE TRIGGER messages_forget
            AFTER UPDATE ON messages REFERENCING NEW TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION messages_forget();
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


async def migrate(pool: asyncpg.Pool, schema: str) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` (idempotent, safe with nodes starting together).

    Args:
        pool: an open pool whose sessions use ``schema``.
        schema: the schema to create and migrate.

    Returns:
        The number of steps applied (0 when already current).

    Raises:
        StorageError: the database is unreachable, or its schema is newer than this code.
    """
    applied = 0
    with storage_errors("schema migration"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(schema, "migrate"))
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            if current > SCHEMA_VERSION:
                raise StorageError(
                    f"database schema {current} is newer than this relay's {SCHEMA_VERSION}"
                )
            for version, sql in MIGRATIONS:
                if version <= current:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations(version) VALUES ($1)", version)
                applied += 1
    if applied:
        log.info("postgres schema migrated to version %d (%d steps)", SCHEMA_VERSION, applied)
    return applied
