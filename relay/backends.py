# Invariant: the only place that turns settings into storage backends; handlers and the server
# see the RelayStore and BlobStore protocols, never which backend was chosen.
"""Construct the configured relay store and blob store from a ``RelayConfig``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.blobs import BlobStore, FsBlobStore
from relay.config import RelayConfig
from relay.store.base import RelayStore, StoreLimits

if TYPE_CHECKING:
    from relay.store.pg_common import PgSettings

__all__ = ["make_blob_store", "make_store", "pg_settings", "store_limits"]


def store_limits(config: RelayConfig) -> StoreLimits:
    """The quotas, retention and batching every backend enforces, from the settings."""
    return StoreLimits(
        max_devices_per_user=config.max_devices_per_user,
        max_one_time_prekeys=config.max_one_time_prekeys,
        mailbox_max_messages=config.mailbox_max_messages,
        mailbox_max_bytes=config.mailbox_max_bytes,
        sender_max_messages=config.mailbox_sender_max_messages,
        sender_max_bytes=config.mailbox_sender_max_bytes,
        stranger_max_messages=config.mailbox_stranger_max_messages,
        stranger_max_bytes=config.mailbox_stranger_max_bytes,
        account_max_bytes=config.account_max_bytes,
        message_ttl_ms=int(config.message_ttl_seconds * 1000),
        blob_ttl_ms=int(config.blob_ttl_seconds * 1000),
        dedupe_window_ms=int(config.dedupe_window_seconds * 1000),
        write_batch_max=config.write_batch_max,
        write_batch_interval_ms=config.write_batch_interval_ms,
        checkpoint_commits=config.wal_checkpoint_commits,
        pipelined_sync=bool(config.sqlite_pipelined_sync),
        loop_staging=bool(config.sqlite_loop_staging),
    )


def pg_settings(config: RelayConfig) -> PgSettings:
    """How to reach PostgreSQL, from the settings."""
    from relay.store.pg_common import PgSettings

    return PgSettings(
        config.postgres_dsn,
        pool_size=config.postgres_pool_size,
        timeout_seconds=config.postgres_timeout_seconds,
    )


def make_store(config: RelayConfig) -> RelayStore:
    """The relay store ``config.store`` names (not opened yet).

    Args:
        config: settings (``store``, ``data_dir``, ``postgres_*``, quotas).

    Returns:
        A ``SqliteRelayStore`` in ``data_dir`` or a ``PostgresRelayStore``.
    """
    limits = store_limits(config)
    if config.store == "postgres":
        # Imported here: a relay on SQLite never loads the PostgreSQL driver.
        from relay.store.postgres import PostgresRelayStore

        return PostgresRelayStore(
            pg_settings(config), limits, write_connections=config.postgres_write_connections
        )
    from relay.integrity import DB_NAME, HWM_NAME
    from relay.store.sqlite import SqliteRelayStore

    return SqliteRelayStore(
        config.data_dir / DB_NAME,
        limits,
        probe_bytes=config.max_message_bytes,
        high_water=config.data_dir / HWM_NAME,
    )


def make_blob_store(config: RelayConfig) -> BlobStore:
    """The blob store ``config.effective_blob_store`` names (not opened yet).

    Args:
        config: settings (``blob_store``, ``store``, ``data_dir``, ``postgres_*``).

    Returns:
        An ``FsBlobStore`` in ``data_dir/blobs`` or a ``PgBlobStore``.
    """
    if config.effective_blob_store == "postgres":
        from relay.blobs_postgres import PgBlobStore

        return PgBlobStore(pg_settings(config))
    return FsBlobStore(config.data_dir / "blobs")
