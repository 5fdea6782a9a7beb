# Invariants:
# * ``RelayState`` is everything the HTTP and WebSocket handlers share, one per app, kept under
#   ``STATE_KEY``; it holds no handler and imports no handler module, so relay.app (the HTTP
#   routes and the factory) and relay.ws (the socket) both build on it without importing each
#   other (an import-linter contract in pyproject.toml keeps it so).
# * Authentication happens here, in one place: the signature is verified before the nonce is
#   claimed, and a body that cannot be verified before it arrives holds a bounded slot.
"""The relay's shared state: the store, limits, hub and the request authentication on them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.auth import (
    SignedHeaders,
    body_digest_header,
    check_fresh,
    parse_signed_headers,
    sha256_hex,
    verify_signature,
)
from relay.blobs import BlobStore
from relay.body import BodyLimits, BodySlots, read_body
from relay.config import RelayConfig
from relay.errors import AuthError, Forbidden, RelayError, StorageError, TooLarge
from relay.health import Readiness
from relay.hub import CLOSE_DEVICE_REMOVED, Hub
from relay.metrics import Metrics
from relay.ratelimit import FrameLimiter, Limiter, RateLimiter, SendSlots
from relay.registration import RegistrationGate, load_or_create_key, shared_registration_key
from relay.replay import ReplayGuard, SharedReplayGuard, replay_key
from relay.store.base import Address, RelayStore

__all__ = ["CONFIG_KEY", "STATE_KEY", "BlobHealth", "Clock", "RelayState"]

if TYPE_CHECKING:
    from relay.nodes.link import NodeLink

log = logging.getLogger("relay.app")  # the handlers' logger, as before the split


class Clock:
    """Wall-clock milliseconds and monotonic seconds; replace in tests for a fixed clock."""

    def now_ms(self) -> int:
        """Return unix time in milliseconds."""
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        """Return monotonic seconds (for rate limiting)."""
        return time.monotonic()


_PROBE_BYTES = 4 * 1024 * 1024  # a blob probe writes (and removes) this much


@dataclass(slots=True)
class BlobHealth:
    """Whether blob files can be written: the last write failure, until a write succeeds."""

    directory: Path
    write_error: str | None = None

    def failed(self, exc: OSError, what: str) -> StorageError:
        """Record and log a failed blob write; return the error to answer with (503)."""
        self.write_error = f"{type(exc).__name__} errno={exc.errno}: {exc.strerror}"
        log.error("blob storage failure during %s: %s", what, self.write_error)
        return StorageError("blob storage failure")

    def succeeded(self) -> None:
        """A blob write went through."""
        if self.write_error is not None:
            log.warning("blob writes succeed again")
            self.write_error = None

    async def ready(self) -> str | None:
        """None when blob files can be written; after a failure, probes with a 4 MiB file."""
        if self.write_error is None:
            return None
        try:
            await asyncio.get_running_loop().run_in_executor(None, _probe_directory, self.directory)
        except OSError as exc:
            return f"blob writes fail: {type(exc).__name__} errno={exc.errno}: {exc.strerror}"
        self.succeeded()
        return None


def _probe_directory(directory: Path) -> None:
    path = directory / f"probe-{os.getpid()}"
    try:
        with open(path, "wb") as fh:
            fh.write(bytes(_PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass(slots=True)
class RelayState:
    """Everything the handlers share, stored in the app under ``STATE_KEY``."""

    config: RelayConfig
    store: RelayStore
    clock: Clock
    metrics: Metrics
    hub: Hub
    blobs: BlobStore
    replay: ReplayGuard
    register_limit: Limiter
    # Node-local and synchronous: checked per WebSocket frame (``take_now``); docs/architecture.md
    # ("Rate limits") says why these two never go to Redis.
    send_limit: RateLimiter
    fetch_limit: Limiter  # per (requesting account, target user)
    fetch_account_limit: Limiter  # per requesting account
    prekey_target_limit: Limiter  # one-time prekeys handed out per target user
    device_add_limit: Limiter  # per account
    recovery_limit: Limiter  # recovery attempts per username (relay.recovery)
    recovery_address_limit: Limiter  # recovery attempts per client address
    provisioning_limit: Limiter  # provisioning slots opened per client address
    provisioning_poll_limit: Limiter  # provisioning polls per client address
    lookup_limit: Limiter  # unknown-user and device-mismatch answers, per account
    sealed_token_limit: Limiter  # sealed sends per delivery token (relay.sealed)
    upload_limit: RateLimiter  # bytes per account; node-local like send_limit
    # Per account, all devices: cluster-wide with Redis (leased, so a WebSocket send rarely
    # waits for it); the in-flight bound is node-local, like the write queue it shares out.
    account_send_limit: FrameLimiter
    send_slots: SendSlots
    body_slots: BodySlots
    blob_health: BlobHealth
    readiness: Readiness = field(default_factory=Readiness)
    keys: dict[Address, bytes] = field(default_factory=dict)  # raw keys: small per device
    # The coarse last-seen bucket each device was last recorded in (one write per bucket).
    seen: dict[Address, int] = field(default_factory=dict)
    # The key of the replay digests (relay.replay.replay_key); loaded when the app starts.
    replay_secret: bytes = b""
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Set while this relay is one of several nodes linked through Redis (redis_url).
    node: NodeLink | None = None
    # relay.ws's handler of frames taken as they are parsed (ws_direct_frames): one for all
    # sockets, built by the first.
    frame_handler: Callable[[Any, Any], Any] | None = None

    def require_node_ready(self) -> None:
        """Refuse what needs Redis while a relay node cannot reach it.

        Raises:
            Unavailable: 503 with Retry-After.
        """
        node = self.node
        if node is not None:
            node.require_ready()

    _gate: RegistrationGate | None = None
    banned: frozenset[str] = frozenset()  # reread every ban_refresh_seconds

    def gate(self) -> RegistrationGate:
        """The proof-of-work gate, its key loaded (or created) on first use.

        Raises:
            StorageError: the key file cannot be read or created.
        """
        if self._gate is None:
            cfg = self.config
            if isinstance(self.replay, SharedReplayGuard):
                # Nodes behind one load balancer must verify each other's challenges: the key
                # is derived from the secret their shared replay guard keeps for all of them.
                key = shared_registration_key(self.replay_secret)
            else:
                try:
                    key = load_or_create_key(cfg.data_dir)
                except OSError as exc:
                    log.error("registration key unavailable: %s", exc)
                    raise StorageError("registration key unavailable") from exc
            self._gate = RegistrationGate(
                key,
                cfg.registration_pow_difficulty,
                int(cfg.registration_challenge_ttl_seconds * 1000),
            )
        return self._gate

    async def authenticate(
        self, request: web.Request, body_sha256: str, *, register_key: bytes | None = None
    ) -> Address:
        """Authenticate a signed request (docs/relay-api.md section 1).

        Args:
            request: the request (headers, method and raw target are used).
            body_sha256: hex SHA-256 of the body as received (or as declared, for streams).
            register_key: for registration, the auth key being registered.

        Returns:
            The authenticated device address.

        Raises:
            AuthError: missing, stale, replayed or invalid signature.
        """
        sh = parse_signed_headers(request.headers)
        check_fresh(sh, self.clock.now_ms(), self.window_ms)
        declared = body_digest_header(request.headers)
        if declared is not None and declared != body_sha256:
            raise AuthError("body does not match X-Blindpost-Content-SHA256", code="auth_invalid")
        return await self.authenticate_signed(
            sh, request.method, request.raw_path, body_sha256, register_key=register_key
        )

    async def authenticate_signed(
        self,
        sh: SignedHeaders,
        method: str,
        target: str,
        body_sha256: str,
        *,
        register_key: bytes | None = None,
    ) -> Address:
        """Authenticate parsed auth fields (from headers or a WebSocket auth frame).

        Args:
            sh: the parsed, unverified auth fields.
            method: request method that was signed.
            target: raw request target that was signed.
            body_sha256: hex SHA-256 of the body.
            register_key: for registration, the auth key being registered.

        Returns:
            The authenticated device address.

        Raises:
            AuthError: stale, replayed or invalid signature, unknown device.
            Forbidden: ``account_banned``.
        """
        check_fresh(sh, self.clock.now_ms(), self.window_ms)
        addr = Address(sh.user, sh.device)
        key_bytes = register_key if register_key is not None else await self.device_key(addr)
        verify_signature(key_bytes, sh, method, target, body_sha256)
        if addr.user in self.banned:
            raise Forbidden("this account is banned by the relay's operator", code="account_banned")
        await self.claim_nonce(sh)
        if register_key is None:
            self._remember_key(addr, key_bytes)
            self._note_seen(addr)
        return addr

    def _note_seen(self, addr: Address) -> None:
        """Record a device's coarse last-seen time, once per ``device_seen_granularity_seconds``
        bucket (in the background: a failed write only leaves the older time)."""
        step = int(self.config.device_seen_granularity_seconds * 1000)
        if step <= 0:
            return
        bucket = self.clock.now_ms() // step * step
        if self.seen.get(addr) == bucket:
            return
        if len(self.seen) > 200_000:
            self.seen.clear()
        self.seen[addr] = bucket

        async def touch() -> None:
            try:
                await self.store.touch_device(addr, bucket)
            except RelayError:
                self.seen.pop(addr, None)

        self.spawn(touch())

    async def device_key(self, addr: Address) -> bytes:
        """The registered auth key of ``addr`` (cached).

        Raises:
            AuthError: ``auth_invalid``, no such device.
        """
        found = self.keys.get(addr) or await self.store.auth_key(addr)
        if found is None:
            raise AuthError("unknown device", code="auth_invalid")
        return found

    def _remember_key(self, addr: Address, key: bytes) -> None:
        if addr not in self.keys:
            if len(self.keys) > 200_000:
                self.keys.clear()
            self.keys[addr] = key

    async def read_signed_body(self, request: web.Request) -> tuple[bytes, Address]:
        """Read and authenticate a signed request with a body, checking first all that can be
        checked without it.

        Before a byte of the body is read: the auth headers parse, the timestamp is inside the
        window, the declared length is within ``max_request_bytes`` and the device exists; when
        the client sent ``X-Blindpost-Content-SHA256`` the signature is verified and the nonce
        claimed too (a body that then fails leaves the nonce used: retries sign anew). A body
        whose signature cannot be verified before it arrives holds one of its client address's
        ``unauthenticated_bodies_per_address`` slots while it is read. Every body is read under
        the ``body_timeout_seconds`` / ``body_min_bytes_per_second`` deadline (relay.body).

        Returns:
            (body, authenticated device address).

        Raises:
            AuthError: missing, stale, replayed or invalid signature, unknown device.
            TooLarge: over ``max_request_bytes``.
            RateLimited: the client address has too many unauthenticated bodies in flight.
            relay.body.BodyTimeout: the body was too slow (the connection is closed).
            relay.body.BodyAbandoned: the client stopped sending.
        """
        sh = parse_signed_headers(request.headers)
        check_fresh(sh, self.clock.now_ms(), self.window_ms)
        declared = body_digest_header(request.headers)
        limits = self.body_limits(self.config.max_request_bytes)
        length = request.content_length
        if length is not None and length > limits.max_bytes:
            raise TooLarge(f"request body exceeds {limits.max_bytes} bytes")
        addr = Address(sh.user, sh.device)
        key = await self.device_key(addr)
        if addr.user in self.banned:
            raise Forbidden("this account is banned by the relay's operator", code="account_banned")
        method, target = request.method, request.raw_path
        if declared is not None:
            # Authenticated before the body, nonce included: a replay of captured headers is
            # refused here, so it cannot hold connections outside the per-address bound.
            verify_signature(key, sh, method, target, declared)
            await self.claim_nonce(sh)
            body = await read_body(request, limits)
            if sha256_hex(body) != declared:
                raise AuthError(
                    "body does not match X-Blindpost-Content-SHA256", code="auth_invalid"
                )
        else:
            with self.body_slots.hold(request.remote or "?"):
                body = await read_body(request, limits)
            verify_signature(key, sh, method, target, sha256_hex(body))
            await self.claim_nonce(sh)
        self._remember_key(addr, key)
        self._note_seen(addr)
        return body, addr

    def body_limits(self, max_bytes: int) -> BodyLimits:
        """The body deadline settings, with ``max_bytes``."""
        cfg = self.config
        return BodyLimits(cfg.body_timeout_seconds, cfg.body_min_bytes_per_second, max_bytes)

    @property
    def window_ms(self) -> int:
        """The auth window in milliseconds."""
        return int(self.config.auth_window_seconds * 1000)

    async def claim_nonce(self, sh: SignedHeaders) -> None:
        """Record a verified request's nonce in the replay guard (durably, for the SQLite one).

        Freshness is checked again here, at claim time: a request whose body took long must not
        claim a key that has already expired (a replay could then claim it a second time).

        Raises:
            AuthError: ``auth_stale``, or ``auth_replay``: the nonce was accepted before inside
                the window.
            RelayError: 503 when the guard is full or unavailable.
        """
        now_ms = self.clock.now_ms()
        check_fresh(sh, now_ms, self.window_ms)
        key = replay_key(self.replay_secret, sh.user, sh.device, sh.nonce)
        # A key lives until its own timestamp leaves the window: a replay after that is stale.
        if not await self.replay.claim(key, sh.timestamp_ms + self.window_ms, now_ms):
            raise AuthError("nonce already used", code="auth_replay")

    async def drop_device(self, target: Address) -> None:
        """Remove a device with its mailbox and keys, and log it out everywhere: its cached
        auth key is forgotten and its socket closed on this node and (through Redis) on
        every other.

        Raises:
            NotFound: ``unknown_device``.
            StorageError: the store failed.
        """
        await self.store.remove_device(target)
        self.keys.pop(target, None)
        self.hub.kick_device(target, CLOSE_DEVICE_REMOVED, "device removed")
        if self.node is not None:
            await self.node.publish_removed(target)
        log.info("removed device user=%s device=%d", target.user, target.device)

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run a background coroutine that is cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


CONFIG_KEY = web.AppKey("config", RelayConfig)
STATE_KEY = web.AppKey("state", RelayState)
