# Invariant: a RelayConfig is immutable and fully validated; precedence is
# defaults < TOML file < environment (BLINDPOST_RELAY_<NAME>) < command-line flags.
"""Relay settings: one frozen dataclass, loadable from TOML, environment and flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from blindpost_wire.loop import EVENT_LOOPS, unavailable
from blindpost_wire.names import MAX_DEVICE_ID
from blindpost_wire.registration import MAX_POW_DIFFICULTY, REGISTRATION_MODES

__all__ = [
    "BLOB_STORES",
    "ENV_PREFIX",
    "LISTEN_BACKLOG_MAX",
    "POSTGRES_POOL_MAX",
    "POSTGRES_POOL_MIN",
    "REDIS_PREFIX_MAX",
    "REDIS_WAKE_BODY_MAX",
    "REPLAY_GUARDS",
    "RETIRED_SETTINGS",
    "SETTING_HELP",
    "STORES",
    "ConfigError",
    "RelayConfig",
    "default_data_dir",
]

ENV_PREFIX = "BLINDPOST_RELAY_"
REPLAY_GUARDS = ("auto", "sqlite", "memory", "redis", "postgres")
LISTEN_BACKLOG_MAX = 65535  # the kernel silently caps it further at net.core.somaxconn
STORES = ("sqlite", "postgres")
BLOB_STORES = ("auto", "fs", "postgres")
# The store's pool holds the group-commit writers and the readers (the PostgreSQL blob store has
# a pool of the same size): fewer than 2 leaves nothing for reads; PostgreSQL's own default
# max_connections is 100 for every node together, so a typo of 10,000 would only fail later and
# less clearly.
POSTGRES_POOL_MIN = 2
POSTGRES_POOL_MAX = 1000
REDIS_PREFIX_MAX = 64
REDIS_WAKE_BODY_MAX = 65536  # a wake-up is one PUBLISH: keep it small
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


# Settings that were removed. A configuration that still names one (flag, environment or TOML)
# is refused with what to do instead, not silently ignored or reported as a typo: ``workers``
# and its ``worker_*`` settings ran N processes over one SQLite file, retired for the one
# scale-out design (docs/architecture.md, "One scale-out design: relay nodes").
_NODES_INSTEAD = (
    "workers=N over one SQLite file is gone. One relay process uses one core; for more cores"
    " on one host run several relay nodes on store = postgres with redis_url, sharing one port"
    " with reuse_port = 1 (or on several ports behind a proxy). See docs/self-hosting.md,"
    ' "Several relay nodes"'
)
RETIRED_SETTINGS: dict[str, str] = dict.fromkeys(
    (
        "workers",
        "worker_restart_max_backoff_seconds",
        "worker_restart_first_backoff_seconds",
        "worker_restart_reset_seconds",
        "worker_stop_grace_seconds",
        "worker_poll_seconds",
        "worker_pump_rows",
        "worker_pump_bytes",
        "worker_datagram_bytes",
        "worker_outbox_max_lines",
    ),
    _NODES_INSTEAD,
)


class ConfigError(ValueError):
    """A setting is unknown or has an invalid value."""


def default_data_dir() -> Path:
    """Return ``$XDG_DATA_HOME/blindpost-relay`` if XDG_DATA_HOME is set, else
    ``./blindpost-relay-data``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / "blindpost-relay"
    return Path("blindpost-relay-data")


SETTING_HELP: dict[str, str] = {
    "host": "address to listen on",
    "port": "TCP port (0 picks a free one; the log line shows it)",
    "data_dir": "directory for the SQLite database and blob files",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "auth_window_seconds": "max age/skew of a signed request timestamp",
    "max_request_bytes": "max HTTP request body (blobs excepted) -> 413",
    "max_message_bytes": "max message body -> 413",
    "max_recipients": "max recipient devices per message",
    "max_devices_per_user": "max devices per user (1..127) -> 409 too_many_devices",
    "max_recipient_users": "max distinct recipient users per message -> 400",
    "max_one_time_prekeys": "max one-time prekeys stored per device",
    "max_blob_bytes": "max blob upload -> 413",
    "mailbox_max_messages": "per-mailbox message quota -> 507",
    "mailbox_max_bytes": "per-mailbox byte quota -> 507",
    "mailbox_sender_max_messages": "messages one sending account may hold in one recipient"
    " device's mailbox when the recipient's account has ever sent to it -> 507"
    " sender_share_exceeded",
    "mailbox_sender_max_bytes": "bytes one sending account may hold in one recipient device's"
    " mailbox when the recipient's account has ever sent to it -> 507 sender_share_exceeded",
    "account_max_bytes": "bytes one account may keep stored: bodies of its messages not yet read"
    " by every recipient (each body once) plus the blobs it uploaded -> 507"
    " account_quota_exceeded",
    "upload_bytes_rate": "bytes per second one account may upload (message bodies and blobs"
    " together) -> 429",
    "upload_bytes_burst": "upload byte burst per account (at least max_blob_bytes, so one"
    " blob always fits)",
    "mailbox_stranger_max_messages": "as mailbox_sender_max_messages for a sender the recipient"
    " never sent to (at most mailbox_sender_max_messages)",
    "mailbox_stranger_max_bytes": "as mailbox_sender_max_bytes for a sender the recipient never"
    " sent to (at most mailbox_sender_max_bytes)",
    "message_ttl_seconds": "unacknowledged messages are deleted after this",
    "blob_ttl_seconds": "blobs are deleted this long after their last upload",
    "dedupe_window_seconds": "how long after a send a retry of it is still answered as a"
    " duplicate (after delivery only a keyed digest is kept, see docs/storage.md)",
    "sweep_interval_seconds": "how often the retention sweeper runs",
    "ws_max_frame_bytes": "max client WebSocket frame -> close 1009",
    "ws_max_outbound_bytes": "unsent bytes a WebSocket may hold longer than the grace period"
    " (or 8x at any time) -> close 4002",
    "ws_max_inflight_sends": "SEND frames a WebSocket may have awaiting their commit; beyond it the"
    " relay stops reading that socket until half are answered (back-pressure)",
    "ws_direct_frames": "1 = a WebSocket's SEND and ack frames are taken as aiohttp's parser"
    " produces them, without a task wake-up each (where the installed aiohttp allows it; other"
    " frames, and frames that arrive while the socket's reading waits, go through aiohttp's"
    " queue); 0 = every frame through aiohttp's queue",
    "ws_slow_grace_seconds": "how long a WebSocket may stay above ws_max_outbound_bytes",
    "ws_heartbeat_seconds": "ping interval (0 disables); no pong within half -> disconnect",
    "ws_idle_timeout_seconds": "nothing received for this long -> close 4004",
    "header_timeout_seconds": "time allowed to send complete request headers",
    "body_timeout_seconds": "time allowed for a request body's first byte; byte n must arrive"
    " within this + n / body_min_bytes_per_second, else 408 and the connection is closed"
    " (bodies refused before they are read are drained for at most min(10, this) seconds)",
    "body_min_bytes_per_second": "the slowest rate a request body (blobs included) may arrive at"
    " after body_timeout_seconds",
    "unauthenticated_bodies_per_address": "request bodies one client address may have in flight"
    " before their request is authenticated (registration, and signed bodies without"
    " X-Blindpost-Content-SHA256); beyond -> 429 before the body is read",
    "keepalive_timeout_seconds": "idle HTTP keep-alive connections are closed after this",
    "shutdown_timeout_seconds": "grace period for in-flight requests on SIGTERM",
    "registration": "who may register: open, pow (a proof of work per account, solved by the"
    " SDK), invite (a code from `blindpost-relay invite create`) or closed",
    "registration_pow_difficulty": "with registration = pow: leading zero bits of SHA-256 a"
    f" client must find (0..{MAX_POW_DIFFICULTY}); each bit doubles the cost (20: about a"
    " second of one core)",
    "registration_challenge_ttl_seconds": "a proof-of-work challenge expires this long after"
    " GET /v1/registration issued it",
    "invite_ttl_seconds": "default lifetime of a code made by `blindpost-relay invite create`",
    "registration_rate": "registrations per second per client IP (token refill)",
    "registration_burst": "registration burst per client IP",
    "send_rate": "messages per second per sending device",
    "send_burst": "message burst per sending device",
    "account_send_rate": "messages per second per sending account, all its devices together"
    " (HTTP and WebSocket; shared by every node through Redis with redis_url) -> 429",
    "account_send_burst": "message burst per sending account",
    "account_max_inflight_sends": "sends one account (all its devices) may have awaiting their"
    " commit on one relay process; beyond -> 429 (Retry-After 1), so one sender's sends"
    " never fill the shared write queue",
    "prekey_fetch_rate": "bundle fetches per second per (requesting account, all its devices"
    " together; target user) -> 429",
    "prekey_fetch_burst": "bundle fetch burst per (requesting account, target user)",
    "prekey_fetch_account_rate": "bundle fetches per second per requesting account, all"
    " targets together -> 429",
    "prekey_fetch_account_burst": "bundle fetch burst per requesting account, all targets",
    "prekey_target_rate": "one-time prekeys handed out per second per target user, all"
    " requesters together; beyond, bundles come without one (the pool is not drained)",
    "prekey_target_burst": "one-time prekey burst per target user",
    "device_add_rate": "device additions per second per account -> 429",
    "device_add_burst": "device addition burst per account",
    "device_name_max_bytes": "largest device name (the SDK's ciphertext) POST /v1/devices"
    " takes -> 413",
    "device_seen_granularity_seconds": "the relay records a device's last-seen time rounded"
    " down to this (one write per device per period; 0 = never recorded)",
    "provisioning_ttl_seconds": "how long a device-link provisioning slot (POST"
    " /v1/provisioning) lives, waiting for its grant and then for the new device to fetch it",
    "provisioning_max_live": "provisioning slots alive at once on this relay, all clients"
    " together (beyond: 503 busy)",
    "provisioning_max_grant_bytes": "largest encrypted link grant a provisioning slot holds -> 413",
    "provisioning_rate": "provisioning slots opened per second per client IP -> 429",
    "provisioning_burst": "provisioning slot burst per client IP",
    "provisioning_poll_rate": "polls of a provisioning slot for its grant per second per"
    " client IP -> 429",
    "provisioning_poll_burst": "provisioning poll burst per client IP",
    "recovery_rate": "account recovery attempts (POST /v1/recovery) per second per username,"
    " right or wrong -> 429",
    "recovery_burst": "recovery attempt burst per username",
    "recovery_address_rate": "account recovery attempts per second per client IP, all usernames"
    " together -> 429",
    "recovery_address_burst": "recovery attempt burst per client IP",
    "ban_refresh_seconds": "how often the relay rereads the bans that `blindpost-relay admin"
    " ban|unban` wrote (a running relay applies a ban within this time; 0 = only at start)",
    "lookup_rate": "per account: users per second that a send may report as unknown or"
    " with a device mismatch (409), and key fetches of unknown users (404) -> 429",
    "lookup_burst": "per account: burst of such lookups",
    "sealed_token_rate": "sealed sends per second per delivery token (each recipient user's"
    " token is charged) -> 429",
    "sealed_token_burst": "sealed send burst per delivery token",
    "sender_cert_ttl_seconds": "lifetime of a sender certificate (POST /v1/certificate)",
    "sender_key_rotation_seconds": "age at which the certificate signing key is replaced by a"
    " new one it endorses",
    "sender_key_overlap_seconds": "how long a replaced certificate key is still announced (at"
    " least sender_cert_ttl_seconds, so certificates it signed stay verifiable)",
    "write_batch_max": "max write operations committed in one transaction",
    "write_batch_interval_ms": "while writes keep arriving, commit a transaction at most this"
    " often after the previous one started; it takes every write that comes meanwhile, each"
    " send still pushed at once with early_delivery (a write after an idle period commits at"
    " once; 0 = commit as fast as possible)",
    "early_delivery": "1 = with store = sqlite and no redis_url, push an accepted message to an"
    " online recipient before its commit (the sender's 200 still waits for it; after a failed"
    " commit or a crash the recipient may get it again, with the same message id); 0 = push"
    " only after the commit",
    "sqlite_pipelined_sync": "1 = a commit writes the SQLite log and a sync thread fsyncs it"
    " before the writes are answered (the writer goes on meanwhile; one fsync covers every commit"
    " made during the previous one); 0 = every commit fsyncs before the writer goes on",
    "sqlite_loop_staging": "1 = while a write transaction is open, the event loop checks and"
    " stages a send into it itself (and pushes it early) instead of handing it to the writer"
    " thread and waiting for it; 0 = every send goes through the writer thread",
    "wal_checkpoint_commits": "every this many commits a background thread checkpoints the"
    " SQLite write-ahead log (the writer never waits for the copy); smaller keeps the log file"
    " smaller, larger does fewer copies",
    "startup_check_seconds": "time bound of the SQLite quick_check run before the relay serves"
    " (0 skips it; missing acknowledged messages are always checked); a damaged database or"
    " missing acknowledged messages refuse the start unless --accept-data-loss is given",
    "nonce_cache_max": "max nonces the replay guard holds at once (requests are refused with 503"
    " beyond)",
    "replay_guard": "where accepted nonces are recorded: auto (sqlite with store = sqlite; with"
    " store = postgres, redis if redis_url is set, else postgres), sqlite"
    " (data_dir/replay.sqlite3, survives restarts), redis or postgres"
    " (shared by every node, survive restarts) or memory (one process, forgotten at restart: a"
    " captured request can be replayed after a restart inside auth_window_seconds)",
    "replay_secret_file": "file holding the key of the nonce digests of the sqlite and memory"
    " guards (created if missing); empty = data_dir/replay.key. The redis and postgres guards"
    " keep their key themselves, shared by every node",
    "switch_interval_ms": "Python thread switch interval; small values stop the event loop"
    " from starving the SQLite writer thread",
    "event_loop": "auto (uvloop where installed, else asyncio), uvloop or asyncio",
    "store": "where accounts, keys and mailboxes live: sqlite (embedded, in data_dir) or postgres"
    " (postgres_dsn; several relay nodes may share it)",
    "postgres_dsn": "with store = postgres: postgresql://user:password@host:port/database"
    " (never logged; prefer BLINDPOST_RELAY_POSTGRES_DSN or the TOML file over a flag, which"
    " other local users can read in the process list)",
    "postgres_pool_size": f"with store = postgres: the store's connections per relay process"
    f" ({POSTGRES_POOL_MIN}..{POSTGRES_POOL_MAX}); with blob_store = postgres the blob store"
    " opens as many again",
    "postgres_write_connections": "with store = postgres: group-commit transactions in flight at"
    " once (1..postgres_pool_size-1; batches naming the same user still commit in turn)",
    "postgres_timeout_seconds": "with store = postgres: connect and statement timeout; a"
    " server that stops answering turns into 503 after this long",
    "blob_store": "where blob contents live: fs (data_dir/blobs), postgres (store = postgres"
    " only; any node serves any blob) or auto (postgres with store = postgres, else fs)",
    "redis_url": "redis://[:password@]host:port/db for cross-node delivery (never logged)",
    "redis_prefix": f"prefix of every Redis key and channel, so several relays or test runs"
    f" can share one Redis (1..{REDIS_PREFIX_MAX} characters, no whitespace)",
    "listen_backlog": f"TCP accept queue length (1..{LISTEN_BACKLOG_MAX}; the kernel caps it"
    " at net.core.somaxconn)",
    "reuse_port": "1 = bind with SO_REUSEPORT, so several relay nodes on one host share the port"
    " (the kernel spreads connections over them; needs store = postgres and redis_url); 0 = a"
    " port of its own",
    "redis_heartbeat_seconds": "with redis_url: how often a node pings Redis and refreshes the"
    " presence of its connected devices",
    "redis_presence_ttl_seconds": "with redis_url: a device's presence expires this long after"
    " its node's last refresh (must exceed redis_heartbeat_seconds)",
    "redis_poll_seconds": "with redis_url: safety poll; a lost wake-up delays a push by at most"
    " this long (every live socket's mailbox is re-read this often)",
    "redis_wake_body_bytes": "with redis_url: a wake-up carries a message whose encoded"
    f" DELIVER frame is at most this many bytes, so the woken node pushes it without reading the"
    f" store (0..{REDIS_WAKE_BODY_MAX}; 0 = wake-ups carry sequence numbers only)",
    "redis_timeout_seconds": "with redis_url: a Redis command that takes longer fails, and the"
    " node becomes not-ready",
    "redis_retry_after_seconds": "with redis_url: the Retry-After of the 503 answered while Redis"
    " is unreachable",
}


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """All relay settings. See ``SETTING_HELP`` and docs/self-hosting.md."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = field(default_factory=default_data_dir)
    log_level: str = "INFO"
    auth_window_seconds: float = 60.0
    max_request_bytes: int = 1024 * 1024
    max_message_bytes: int = 256 * 1024
    max_recipients: int = 2000
    max_devices_per_user: int = 16
    max_recipient_users: int = 1000
    max_one_time_prekeys: int = 1000
    max_blob_bytes: int = 100 * 1024 * 1024
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 256 * 1024 * 1024
    mailbox_sender_max_messages: int = 2500
    mailbox_sender_max_bytes: int = 64 * 1024 * 1024
    mailbox_stranger_max_messages: int = 1000
    mailbox_stranger_max_bytes: int = 32 * 1024 * 1024
    account_max_bytes: int = 1024 * 1024 * 1024
    upload_bytes_rate: float = 1024 * 1024.0
    upload_bytes_burst: float = 200 * 1024 * 1024.0
    message_ttl_seconds: float = 30 * 86400.0
    blob_ttl_seconds: float = 30 * 86400.0
    dedupe_window_seconds: float = 300.0
    sweep_interval_seconds: float = 60.0
    ws_max_frame_bytes: int = 1024 * 1024
    ws_max_outbound_bytes: int = 1024 * 1024
    ws_max_inflight_sends: int = 64
    ws_direct_frames: int = 1
    ws_slow_grace_seconds: float = 2.0
    ws_heartbeat_seconds: float = 30.0
    ws_idle_timeout_seconds: float = 300.0
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    body_min_bytes_per_second: float = 8192.0
    unauthenticated_bodies_per_address: int = 16
    keepalive_timeout_seconds: float = 75.0
    shutdown_timeout_seconds: float = 10.0
    registration: str = "pow"
    registration_pow_difficulty: int = 20
    registration_challenge_ttl_seconds: float = 300.0
    invite_ttl_seconds: float = 7 * 86400.0
    registration_rate: float = 0.2
    registration_burst: float = 20.0
    send_rate: float = 2000.0
    send_burst: float = 4000.0
    # A busy bot's pace, far above a human's: the cap that stops one account from taking the
    # relay's write path (bench/flood_bench.py; docs/threat-model.md).
    account_send_rate: float = 20.0
    account_send_burst: float = 600.0
    account_max_inflight_sends: int = 64
    prekey_fetch_rate: float = 0.2
    prekey_fetch_burst: float = 10.0
    prekey_fetch_account_rate: float = 1.0
    prekey_fetch_account_burst: float = 200.0
    prekey_target_rate: float = 0.5
    prekey_target_burst: float = 100.0
    device_add_rate: float = 0.01
    device_add_burst: float = 5.0
    # Device linking (docs/relay-api.md, "Provisioning"): unauthenticated, so bounded per
    # address, in number and size, and short-lived.
    device_name_max_bytes: int = 512
    device_seen_granularity_seconds: float = 3600.0
    provisioning_ttl_seconds: float = 600.0
    provisioning_max_live: int = 10_000
    provisioning_max_grant_bytes: int = 16_384
    provisioning_rate: float = 0.05
    provisioning_burst: float = 10.0
    provisioning_poll_rate: float = 2.0
    provisioning_poll_burst: float = 30.0
    # A recovery key has 144 random bits: these bound the relay's work and a user's nuisance
    # (each attempt verifies one signature), not the guessing odds (docs/threat-model.md).
    recovery_rate: float = 1 / 3600
    recovery_burst: float = 5.0
    recovery_address_rate: float = 1 / 360
    recovery_address_burst: float = 20.0
    ban_refresh_seconds: float = 5.0
    lookup_rate: float = 0.5
    lookup_burst: float = 100.0
    sealed_token_rate: float = 5.0
    sealed_token_burst: float = 200.0
    sender_cert_ttl_seconds: float = 86400.0
    sender_key_rotation_seconds: float = 30 * 86400.0
    sender_key_overlap_seconds: float = 2 * 86400.0
    write_batch_max: int = 2000
    write_batch_interval_ms: float = 5.0
    early_delivery: int = 1
    sqlite_pipelined_sync: int = 1
    sqlite_loop_staging: int = 1
    wal_checkpoint_commits: int = 512
    startup_check_seconds: float = 60.0
    nonce_cache_max: int = 1_000_000
    replay_guard: str = "auto"
    replay_secret_file: str = ""
    switch_interval_ms: float = 0.5
    listen_backlog: int = 4096
    reuse_port: int = 0
    event_loop: str = "auto"
    store: str = "sqlite"
    # Secrets (a password may be in the URL): kept out of repr, and so out of every log line
    # and traceback that shows a config.
    postgres_dsn: str = field(default="", repr=False)
    postgres_pool_size: int = 10
    postgres_write_connections: int = 1
    postgres_timeout_seconds: float = 10.0
    blob_store: str = "auto"
    redis_url: str = field(default="", repr=False)
    redis_prefix: str = "blindpost:"
    redis_heartbeat_seconds: float = 5.0
    redis_presence_ttl_seconds: float = 20.0
    redis_poll_seconds: float = 10.0
    redis_wake_body_bytes: int = 4096
    redis_timeout_seconds: float = 2.0
    redis_retry_after_seconds: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"{f.name} must not be negative")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be 0..65535")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("log_level must be DEBUG, INFO, WARNING or ERROR")
        for name in (
            "max_request_bytes",
            "max_message_bytes",
            "max_recipients",
            "ws_max_frame_bytes",
            "ws_max_inflight_sends",
            "account_max_inflight_sends",
            "write_batch_max",
            "wal_checkpoint_commits",
            "auth_window_seconds",
            "body_timeout_seconds",
            "body_min_bytes_per_second",
            "unauthenticated_bodies_per_address",
            "mailbox_sender_max_messages",
            "mailbox_sender_max_bytes",
            "mailbox_stranger_max_messages",
            "mailbox_stranger_max_bytes",
            "account_max_bytes",
            "sender_cert_ttl_seconds",
            "sender_key_rotation_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")
        if self.sender_key_overlap_seconds < self.sender_cert_ttl_seconds:
            raise ConfigError(
                "sender_key_overlap_seconds must be at least sender_cert_ttl_seconds (got"
                f" {self.sender_key_overlap_seconds} < {self.sender_cert_ttl_seconds})"
            )
        if self.sender_key_rotation_seconds <= self.sender_key_overlap_seconds:
            raise ConfigError(
                "sender_key_rotation_seconds must exceed sender_key_overlap_seconds (got"
                f" {self.sender_key_rotation_seconds} <= {self.sender_key_overlap_seconds})"
            )
        if self.replay_guard not in REPLAY_GUARDS:
            raise ConfigError(
                f"replay_guard must be one of {', '.join(REPLAY_GUARDS)}"
                f" (got {self.replay_guard!r})"
            )
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"event_loop must be one of {', '.join(EVENT_LOOPS)} (got {self.event_loop!r})"
            )
        if unavailable(self.event_loop):
            raise ConfigError("event_loop = uvloop, but uvloop is not installed")
        if not 1 <= self.listen_backlog <= LISTEN_BACKLOG_MAX:
            raise ConfigError(
                f"listen_backlog must be 1..{LISTEN_BACKLOG_MAX} (got {self.listen_backlog})"
            )
        for name in (
            "redis_heartbeat_seconds",
            "redis_poll_seconds",
            "redis_timeout_seconds",
            "redis_retry_after_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")
        if not 0 <= self.redis_wake_body_bytes <= REDIS_WAKE_BODY_MAX:
            raise ConfigError(
                f"redis_wake_body_bytes must be 0..{REDIS_WAKE_BODY_MAX}"
                f" (got {self.redis_wake_body_bytes})"
            )
        if self.redis_presence_ttl_seconds <= self.redis_heartbeat_seconds:
            raise ConfigError(
                "redis_presence_ttl_seconds must exceed redis_heartbeat_seconds (got"
                f" {self.redis_presence_ttl_seconds} <= {self.redis_heartbeat_seconds})"
            )
        if self.early_delivery not in (0, 1):
            raise ConfigError(f"early_delivery must be 0 or 1 (got {self.early_delivery})")
        if self.sqlite_pipelined_sync not in (0, 1):
            raise ConfigError(
                f"sqlite_pipelined_sync must be 0 or 1 (got {self.sqlite_pipelined_sync})"
            )
        if self.ws_direct_frames not in (0, 1):
            raise ConfigError(f"ws_direct_frames must be 0 or 1 (got {self.ws_direct_frames})")
        if self.sqlite_loop_staging not in (0, 1):
            raise ConfigError(
                f"sqlite_loop_staging must be 0 or 1 (got {self.sqlite_loop_staging})"
            )
        if self.reuse_port not in (0, 1):
            raise ConfigError(f"reuse_port must be 0 or 1 (got {self.reuse_port})")
        if self.reuse_port and (self.store != "postgres" or not self.redis_url):
            # Processes sharing a port get clients at random: without the shared store and the
            # Redis link a message sent to one would not be pushed by another.
            raise ConfigError(
                "reuse_port = 1 needs store = postgres and redis_url: the processes sharing a"
                " port must be relay nodes linked through Redis (docs/self-hosting.md,"
                ' "Several relay nodes")'
            )
        if self.replay_guard == "redis" and not self.redis_url:
            raise ConfigError("replay_guard = redis needs redis_url")
        if self.replay_guard == "postgres" and self.store != "postgres":
            raise ConfigError("replay_guard = postgres needs store = postgres")
        for kind in ("messages", "bytes"):
            if getattr(self, f"mailbox_stranger_max_{kind}") > getattr(
                self, f"mailbox_sender_max_{kind}"
            ):
                raise ConfigError(
                    f"mailbox_stranger_max_{kind} must not exceed mailbox_sender_max_{kind}"
                    " (a sender the recipient never answered gets the smaller share)"
                )
        if self.upload_bytes_rate > 0 and self.upload_bytes_burst < self.max_blob_bytes:
            raise ConfigError(
                f"upload_bytes_burst must be at least max_blob_bytes ({self.max_blob_bytes}):"
                " a blob larger than the burst could never be uploaded"
            )
        if self.registration not in REGISTRATION_MODES:
            raise ConfigError(
                f"registration must be one of {', '.join(REGISTRATION_MODES)}"
                f" (got {self.registration!r})"
            )
        if self.registration_pow_difficulty > MAX_POW_DIFFICULTY:
            raise ConfigError(
                f"registration_pow_difficulty must be 0..{MAX_POW_DIFFICULTY}"
                f" (got {self.registration_pow_difficulty})"
            )
        for name in (
            "registration_challenge_ttl_seconds",
            "invite_ttl_seconds",
            "provisioning_ttl_seconds",
            "provisioning_max_live",
            "provisioning_max_grant_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")
        if not 1 <= self.max_devices_per_user <= MAX_DEVICE_ID:
            raise ConfigError(
                f"max_devices_per_user must be 1..{MAX_DEVICE_ID} (got {self.max_devices_per_user})"
            )
        if self.max_recipient_users < 1:
            raise ConfigError("max_recipient_users must be positive")
        self._check_backends()

    def _check_backends(self) -> None:
        # Messages never quote a DSN or URL: they may hold a password.
        if self.store not in STORES:
            raise ConfigError(f"store must be one of {', '.join(STORES)} (got {self.store!r})")
        if self.blob_store not in BLOB_STORES:
            raise ConfigError(
                f"blob_store must be one of {', '.join(BLOB_STORES)} (got {self.blob_store!r})"
            )
        if self.postgres_dsn and _scheme(self.postgres_dsn) not in _POSTGRES_SCHEMES:
            raise ConfigError("postgres_dsn must be a postgresql:// URL")
        if self.store == "postgres":
            if not self.postgres_dsn:
                raise ConfigError("store = postgres needs postgres_dsn")
        elif self.blob_store == "postgres":
            raise ConfigError("blob_store = postgres needs store = postgres")
        if not POSTGRES_POOL_MIN <= self.postgres_pool_size <= POSTGRES_POOL_MAX:
            raise ConfigError(
                f"postgres_pool_size must be {POSTGRES_POOL_MIN}..{POSTGRES_POOL_MAX}"
                f" (got {self.postgres_pool_size})"
            )
        if not 1 <= self.postgres_write_connections < self.postgres_pool_size:
            raise ConfigError(
                "postgres_write_connections must be 1..postgres_pool_size-1"
                f" (got {self.postgres_write_connections})"
            )
        if self.postgres_timeout_seconds <= 0:
            raise ConfigError("postgres_timeout_seconds must be positive")
        if self.redis_url and _scheme(self.redis_url) not in _REDIS_SCHEMES:
            raise ConfigError("redis_url must be a redis://, rediss:// or unix:// URL")
        prefix = self.redis_prefix
        if not 1 <= len(prefix) <= REDIS_PREFIX_MAX or any(
            c.isspace() or not c.isprintable() for c in prefix
        ):
            raise ConfigError(
                f"redis_prefix must be 1..{REDIS_PREFIX_MAX} printable characters without"
                " whitespace"
            )

    @property
    def effective_blob_store(self) -> str:
        """``blob_store`` with ``auto`` resolved: ``postgres`` with store = postgres, else fs."""
        if self.blob_store == "auto":
            return "postgres" if self.store == "postgres" else "fs"
        return self.blob_store

    def replace(self, **changes: Any) -> RelayConfig:
        """Return a copy with ``changes`` applied (values are coerced and validated).

        Raises:
            ConfigError: unknown setting or bad value.
        """
        return dataclasses.replace(self, **_coerce_all(changes))

    @classmethod
    def load(
        cls,
        toml_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> RelayConfig:
        """Build a config from defaults, a TOML file, the environment and explicit overrides.

        Args:
            toml_path: optional TOML file with top-level ``name = value`` settings (a
                ``[relay]`` table is also accepted).
            env: environment mapping (``BLINDPOST_RELAY_<NAME>``); ``os.environ`` if None.
            overrides: highest-precedence values (command-line flags); None values are skipped.

        Returns:
            The validated config.

        Raises:
            ConfigError: unknown setting, unreadable file, or bad value.
        """
        values: dict[str, Any] = {}
        if toml_path is not None:
            try:
                with open(toml_path, "rb") as fh:
                    doc = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {toml_path}: {exc}") from exc
            table = doc.get("relay", doc)
            if not isinstance(table, dict):
                raise ConfigError("[relay] must be a table")
            values.update(table)
        env_map = os.environ if env is None else env
        names = {f.name for f in fields(cls)} | RETIRED_SETTINGS.keys()
        for name in names:
            raw = env_map.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls(**_coerce_all(values))


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


_FIELD_TYPES: dict[str, Any] = {}


def _coerce_all(values: Mapping[str, Any]) -> dict[str, Any]:
    if not _FIELD_TYPES:
        defaults = RelayConfig()
        for f in fields(RelayConfig):
            _FIELD_TYPES[f.name] = type(getattr(defaults, f.name))
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = _FIELD_TYPES.get(key)
        if kind is None:
            retired = RETIRED_SETTINGS.get(key)
            if retired is not None:
                raise ConfigError(f"setting {key!r} was removed: {retired}")
            raise ConfigError(f"unknown setting {key!r}")
        out[key] = _coerce(key, kind, value)
    return out


def _coerce(name: str, kind: Any, value: Any) -> Any:
    try:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: booleans are not accepted")
        if issubclass(kind, Path):
            return Path(str(value))
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name} must be an integer")
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except ConfigError:  # a ValueError too: keep its specific message
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: invalid value {value!r}") from exc
