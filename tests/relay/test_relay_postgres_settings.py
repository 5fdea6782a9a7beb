"""The store settings (store, postgres_*, blob_store, redis_*): every source, validation with
clear messages, defaults that keep the embedded SQLite relay, and secrets that never show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.backends import make_blob_store, make_store
from relay.blobs import FsBlobStore
from relay.blobs_postgres import PgBlobStore
from relay.config import ConfigError, RelayConfig
from relay.store.postgres import PostgresRelayStore
from relay.store.sqlite import SqliteRelayStore

SECRET_DSN = "postgresql://relay:hunter2-secret@127.0.0.1:1/blindpost"
SECRET_REDIS = "redis://:hunter2-secret@127.0.0.1:6379/0"


def test_defaults_keep_the_embedded_sqlite_relay(tmp_path: Path) -> None:
    cfg = RelayConfig(data_dir=tmp_path)
    assert (cfg.store, cfg.effective_blob_store, cfg.postgres_dsn) == ("sqlite", "fs", "")
    assert isinstance(make_store(cfg), SqliteRelayStore)
    assert isinstance(make_blob_store(cfg), FsBlobStore)


def test_every_source_sets_the_store_settings(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(
        f'[relay]\nstore = "postgres"\npostgres_dsn = "{SECRET_DSN}"\npostgres_pool_size = 6\n'
    )
    env = {
        "BLINDPOST_RELAY_POSTGRES_WRITE_CONNECTIONS": "3",
        "BLINDPOST_RELAY_REDIS_URL": SECRET_REDIS,
        "BLINDPOST_RELAY_POSTGRES_TIMEOUT_SECONDS": "2.5",
    }
    cfg = RelayConfig.load(
        toml, env=env, overrides={"redis_prefix": "bp-test:", "blob_store": "fs"}
    )
    assert cfg.store == "postgres" and cfg.postgres_dsn == SECRET_DSN
    assert (cfg.postgres_pool_size, cfg.postgres_write_connections) == (6, 3)
    assert cfg.postgres_timeout_seconds == 2.5
    assert (cfg.redis_url, cfg.redis_prefix) == (SECRET_REDIS, "bp-test:")
    assert cfg.effective_blob_store == "fs"
    assert cfg.replace(blob_store="auto").effective_blob_store == "postgres"
    assert isinstance(make_store(cfg), PostgresRelayStore)
    assert isinstance(make_blob_store(cfg.replace(blob_store="auto")), PgBlobStore)
    shown = repr(cfg) + repr(make_store(cfg))
    assert "hunter2" not in shown


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"store": "mysql"}, "store must be one of sqlite, postgres (got 'mysql')"),
        ({"store": "postgres"}, "store = postgres needs postgres_dsn"),
        ({"postgres_dsn": "mysql://u:hunter2@h/db"}, "postgres_dsn must be a postgresql:// URL"),
        ({"blob_store": "s3"}, "blob_store must be one of auto, fs, postgres (got 's3')"),
        ({"blob_store": "postgres"}, "blob_store = postgres needs store = postgres"),
        ({"postgres_pool_size": 1}, "postgres_pool_size must be 2..1000 (got 1)"),
        ({"postgres_pool_size": 1001}, "postgres_pool_size must be 2..1000 (got 1001)"),
        ({"postgres_write_connections": 0}, "postgres_write_connections must be 1..postgres_pool"),
        ({"postgres_write_connections": 10}, "postgres_write_connections must be 1..postgres_pool"),
        ({"postgres_timeout_seconds": 0}, "postgres_timeout_seconds must be positive"),
        ({"redis_url": "http://:hunter2@h"}, "redis_url must be a redis://, rediss:// or unix://"),
        ({"redis_prefix": ""}, "redis_prefix must be 1..64 printable characters"),
        ({"redis_prefix": "a b"}, "redis_prefix must be 1..64 printable characters"),
        ({"redis_prefix": "x" * 65}, "redis_prefix must be 1..64 printable characters"),
    ],
)
def test_bad_store_settings_are_refused_clearly(changes: dict[str, object], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")) as info:
        RelayConfig().replace(**changes)
    assert "hunter2" not in str(info.value)


def _relay(
    tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "relay", "--port", "0", "--data", str(tmp_path / "d"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_a_bad_setting_from_the_command_line_exits_2_without_the_password(
    tmp_path: Path,
) -> None:
    proc = _relay(
        tmp_path, "--set", "store=postgres", "--set", "postgres_dsn=mysql://u:hunter2@h/x"
    )
    assert proc.returncode == 2
    assert "postgres_dsn must be a postgresql:// URL" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert not (tmp_path / "d").exists()


def test_an_unreachable_database_stops_the_relay_without_the_password(tmp_path: Path) -> None:
    proc = _relay(
        tmp_path,
        "--set",
        "store=postgres",
        "--set",
        "postgres_timeout_seconds=3",
        env_extra={"BLINDPOST_RELAY_POSTGRES_DSN": SECRET_DSN},
    )
    assert proc.returncode == 1
    assert "cannot start: connect to postgresql://127.0.0.1:1/blindpost failed" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_help_lists_the_store_settings() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "--help"], capture_output=True, text=True, timeout=60
    )
    for name in ("store", "postgres_dsn", "postgres_pool_size", "blob_store", "redis_prefix"):
        assert f"BLINDPOST_RELAY_{name.upper()}" in proc.stdout
