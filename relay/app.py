# Invariants:
# * Handlers are thin: parse and validate, authenticate, call the store, respond. Every error
#   is a RelayError rendered as {"error", "message"} JSON; unexpected ones become a logged 500
#   whose body reveals nothing.
# * Every /v1 route authenticates with a signed request before touching the store (the
#   registration route verifies against the key it is registering), except
#   ``GET /v1/registration``, which only tells the mode and issues a stateless challenge.
# * Nothing here logs or echoes a message body or key material.
"""The aiohttp application: ``create_app(config)`` and the HTTP handlers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.auth import (
    H_CONTENT_SHA256,
    SignedHeaders,
    body_digest_header,
    check_fresh,
    parse_signed_headers,
    verify_signature,
)
from relay.backends import make_blob_store, make_store
from relay.blob_http import blob_response
from relay.blobs import BlobStore, check_blob_id
from relay.body import BodyLimits, BodySlots, read_body, timed_chunks
from relay.config import RelayConfig
from relay.errors import (
    AccountQuotaExceeded,
    AuthError,
    BadRequest,
    Forbidden,
    MismatchedDevices,
    NotFound,
    RateLimited,
    RelayError,
    StorageError,
    TooLarge,
)
from relay.guard import request_started, response_finished
from relay.health import Readiness
from relay.hub import CLOSE_BANNED, CLOSE_DEVICE_REMOVED, Hub
from relay.metrics import Metrics
from relay.ratelimit import Limiter, RateLimiter, make_limiter
from relay.registration import (
    RegistrationGate,
    invite_hash,
    load_or_create_key,
    shared_registration_key,
)
from relay.replay import (
    ManagedReplayGuard,
    ReplayGuard,
    SharedReplayGuard,
    load_replay_secret,
    make_replay_guard,
    replay_key,
)
from relay.store.base import Address, Envelope, RelayStore
from relay.wire import (
    AUTH_KEY_LEN,
    RESERVED_USERNAMES,
    b64d,
    b64e,
    bundle_json,
    decode_send,
    message_json,
    parse_ack_ids,
    parse_ascii_uint,
    parse_device_id,
    parse_json_send,
    parse_key_upload,
    parse_username,
)

__all__ = [
    "BINARY_SEND_TYPE",
    "CONFIG_KEY",
    "STATE_KEY",
    "BlobHealth",
    "Clock",
    "RelayState",
    "charge_lookups",
    "check_recipient_users",
    "create_app",
    "json_error",
    "json_errors",
    "load_openapi",
    "receipt_json",
    "refresh_bans",
    "replay_secret_path",
    "sweep_once",
]

if TYPE_CHECKING:
    from relay.nodes.link import NodeLink

log = logging.getLogger("relay.app")

BINARY_SEND_TYPE = "application/vnd.blindpost.send"


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
    lookup_limit: Limiter  # unknown-user and device-mismatch answers, per account
    upload_limit: RateLimiter  # bytes per account; node-local like send_limit
    body_slots: BodySlots
    blob_health: BlobHealth
    readiness: Readiness = field(default_factory=Readiness)
    keys: dict[Address, bytes] = field(default_factory=dict)  # raw keys: small per device
    # The key of the replay digests (relay.replay.replay_key); loaded when the app starts.
    replay_secret: bytes = b""
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Scale-out hook (relay.cluster): told of a removed device so other workers drop its cached
    # auth key and close its socket. None in a single process.
    device_removed_listener: Callable[[Address], None] | None = None
    # Set while this relay is one of several nodes linked through Redis (redis_url).
    node: NodeLink | None = None

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
        return addr

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
            if _sha(body) != declared:
                raise AuthError(
                    "body does not match X-Blindpost-Content-SHA256", code="auth_invalid"
                )
        else:
            with self.body_slots.hold(request.remote or "?"):
                body = await read_body(request, limits)
            verify_signature(key, sh, method, target, _sha(body))
            await self.claim_nonce(sh)
        self._remember_key(addr, key)
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

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run a background coroutine that is cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


CONFIG_KEY = web.AppKey("config", RelayConfig)
STATE_KEY = web.AppKey("state", RelayState)


def json_error(err: RelayError) -> web.Response:
    """Render a RelayError as its JSON response (with Retry-After for 429 and 503)."""
    headers = {}
    retry = err.extra.get("retry_after")
    if err.status in (429, 503) and isinstance(retry, int):
        headers["Retry-After"] = str(retry)
    return web.json_response(err.to_json(), status=err.status, headers=headers)


def receipt_json(message_id: bytes, recipients: int, stored_at: int) -> dict[str, Any]:
    """The 200 body of a send (also the payload of a WebSocket send_result)."""
    return {"id": b64e(message_id), "recipients": recipients, "stored_at": stored_at}


_HTTP_ERRORS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    416: "range_not_satisfiable",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_errors(handler: Handler) -> Handler:
    """Wrap a handler so every error becomes a JSON error response (and is counted).

    A decorator rather than a middleware: a middleware's frames stay alive for the whole life of
    every WebSocket, and idle sockets must stay small. The WebSocket handler renders its own
    pre-upgrade errors.
    """

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_started(request)  # the slowloris guard's clock stops: headers are complete
        try:
            resp = await handler(request)
        except RelayError as err:
            resp = json_error(err)
            if getattr(err, "close_connection", False):
                await _send_and_close(request, resp)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_ERRORS.get(exc.status, "http_error")
            keep = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            resp = web.json_response(
                {"error": code, "message": exc.reason}, status=exc.status, headers=keep
            )
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = web.json_response(
                {"error": "internal_error", "message": "internal error"}, status=500
            )
        finally:
            response_finished(request)  # the next byte on this connection starts its clock
        request.app[STATE_KEY].metrics.http_responses[resp.status] += 1
        return resp

    return wrapped


async def _send_and_close(request: web.Request, resp: web.StreamResponse) -> None:
    """Write ``resp`` now, then close the connection without reading the rest of the body."""
    resp.force_close()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.prepare(request)
        await resp.write_eof()
    force_close = getattr(request.protocol, "force_close", None)
    if force_close is not None:
        force_close()


async def _fallback(request: web.Request) -> web.StreamResponse:
    """Unknown path -> 404, known path with another method -> 405 (both JSON)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical == _FALLBACK_PATH:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise web.HTTPNotFound()


_FALLBACK_PATH = "/{tail}"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadRequest("body is not valid JSON") from exc


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def _auth(request: web.Request, body: bytes = b"") -> Address:
    return await request.app[STATE_KEY].authenticate(request, _sha(body))


# -- accounts ----------------------------------------------------------------------------


_MAX_INVITE_LEN = 100


async def registration_info(request: web.Request) -> web.Response:
    """``GET /v1/registration``: the registration mode, and for ``pow`` a fresh challenge."""
    st = request.app[STATE_KEY]
    mode = st.config.registration
    doc: dict[str, Any] = {"mode": mode}
    if mode == "pow":
        challenge = st.gate().issue(st.clock.now_ms())
        doc.update(
            challenge=challenge.text,
            difficulty=challenge.difficulty,
            expires_at=challenge.expires_at,
        )
    return web.json_response(doc, headers={"Cache-Control": "no-store"})


async def register(request: web.Request) -> web.Response:
    """``POST /v1/accounts``: register a username with its first device."""
    st = request.app[STATE_KEY]
    mode = st.config.registration
    peer = request.remote or "?"
    await st.register_limit.take(peer, st.clock.monotonic())
    if mode == "closed":
        raise Forbidden("registration is closed on this relay", code="registration_closed")
    sh = parse_signed_headers(request.headers)  # everything checkable before the body
    check_fresh(sh, st.clock.now_ms(), st.window_ms)
    with st.body_slots.hold(peer):
        body = await read_body(request, st.body_limits(st.config.max_request_bytes))
    doc = _json(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    username = parse_username(doc.get("username"))
    if username in RESERVED_USERNAMES:
        raise BadRequest("this username is reserved", code="invalid_username")
    device = parse_device_id(doc.get("device_id"))
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
    invite = doc.get("invite")
    if invite is not None and (not isinstance(invite, str) or len(invite) > _MAX_INVITE_LEN):
        raise BadRequest(f"invite must be a string of at most {_MAX_INVITE_LEN} characters")
    if sh.user != username or sh.device != device:
        raise AuthError("auth headers must name the account being registered")
    addr = await st.authenticate(request, _sha(body), register_key=auth_key)
    now = st.clock.now_ms()
    # An invite, when given, is always checked and consumed; it stands in for the work.
    if invite is None and mode == "invite":
        raise Forbidden("this relay registers by invitation only", code="invite_required")
    if invite is None and mode == "pow":
        st.gate().verify(doc.get("pow"), username, now)
    code = None if invite is None else invite_hash(invite)
    await st.store.create_account(addr, auth_key, now, code)
    log.info("registered user=%s device=%d invite=%s", addr.user, addr.device, code is not None)
    return web.json_response({"username": addr.user, "device_id": addr.device}, status=201)


async def add_device(request: web.Request) -> web.Response:
    """``POST /v1/devices``: add a device to the caller's user."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    doc = _json(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    new = Address(caller.user, parse_device_id(doc.get("device_id")))
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
    await st.device_add_limit.take(caller.user, st.clock.monotonic())
    await st.store.add_device(new, auth_key, st.clock.now_ms())
    log.info("added device user=%s device=%d", new.user, new.device)
    return web.json_response({"username": new.user, "device_id": new.device}, status=201)


async def list_devices(request: web.Request) -> web.Response:
    """``GET /v1/devices``: list the caller's user's devices."""
    st = request.app[STATE_KEY]
    caller = await _auth(request)
    devices = await st.store.list_devices(caller.user)
    return web.json_response(
        {
            "username": caller.user,
            "devices": [
                {"device_id": d.device_id, "created_at": d.created_at, "has_keys": d.has_keys}
                for d in devices
            ],
        }
    )


async def remove_device(request: web.Request) -> web.Response:
    """``DELETE /v1/devices/{device_id}``: remove a device, its mailbox and keys."""
    st = request.app[STATE_KEY]
    target_raw = request.match_info["device_id"]
    caller = await _auth(request)
    target = Address(caller.user, parse_device_id(target_raw))
    st.require_node_ready()  # every node must hear of it
    await st.store.remove_device(target)
    st.keys.pop(target, None)
    st.hub.kick_device(target, CLOSE_DEVICE_REMOVED, "device removed")
    if st.node is not None:
        await st.node.publish_removed(target)
    if st.device_removed_listener is not None:
        st.device_removed_listener(target)
    log.info("removed device user=%s device=%d", target.user, target.device)
    return web.json_response({"removed": True})


# -- keys --------------------------------------------------------------------------------


async def upload_keys(request: web.Request) -> web.Response:
    """``PUT /v1/keys``: upload the caller's identity, signed and one-time prekeys."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    upload = parse_key_upload(_json(body))
    count = await st.store.upload_keys(caller, upload)
    return web.json_response({"count": count})


async def key_count(request: web.Request) -> web.Response:
    """``GET /v1/keys/count``: the caller's remaining one-time prekeys."""
    st = request.app[STATE_KEY]
    caller = await _auth(request)
    return web.json_response({"count": await st.store.prekey_count(caller)})


async def fetch_keys(request: web.Request) -> web.Response:
    """``GET /v1/keys/{username}[/{device_id}]``: hand out prekey bundles."""
    st = request.app[STATE_KEY]
    caller = await _auth(request)
    target = parse_username(request.match_info["username"])
    raw_device = request.match_info.get("device_id")
    device = None if raw_device is None else parse_device_id(raw_device)
    now = st.clock.monotonic()
    # All devices of an account share its budgets: more devices do not mean more fetches.
    await st.fetch_account_limit.take(caller.user, now)
    await st.fetch_limit.take(f"{caller.user}\n{target}", now)
    try:
        await st.prekey_target_limit.take(target, now)
        one_time = True
    except RateLimited:  # the target's pool is being drained: hand out no one-time prekey
        one_time = False
    try:
        bundles = await st.store.fetch_bundles(target, device, one_time)
    except NotFound as exc:
        if exc.code == "unknown_user":
            await st.lookup_limit.take(caller.user, now)  # 429 once the budget is spent
        raise
    return web.json_response({"username": target, "devices": [bundle_json(b) for b in bundles]})


# -- messages ----------------------------------------------------------------------------


async def send_message(request: web.Request) -> web.Response:
    """``PUT /v1/messages``: store one message for its recipient devices (JSON or binary)."""
    st = request.app[STATE_KEY]
    cfg = st.config
    body, caller = await st.read_signed_body(request)
    if request.content_type == BINARY_SEND_TYPE:
        env = decode_send(body, max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes)
    else:
        env = parse_json_send(
            _json(body), max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes
        )
    check_recipient_users(env, cfg.max_recipient_users)
    now = st.clock.monotonic()
    st.send_limit.take_now(caller, now)
    st.upload_limit.take_now(caller.user, now, len(env.body))
    st.require_node_ready()  # other nodes' recipients are woken through Redis
    try:
        receipt = await st.store.submit_send(caller, env, st.clock.now_ms())
    except MismatchedDevices as exc:
        raise await charge_lookups(st, caller, exc) from None
    return web.json_response(
        receipt_json(receipt.message_id, receipt.recipients, receipt.stored_at)
    )


def check_recipient_users(env: Envelope, max_users: int) -> None:
    """Refuse a send naming more than ``max_users`` distinct users.

    Raises:
        BadRequest: ``too_many_recipients``.
    """
    if len({r.user for r in env.recipients}) > max_users:
        raise BadRequest(
            f"a message may name at most {max_users} users", code="too_many_recipients"
        )


async def charge_lookups(
    st: RelayState, caller: Address, exc: MismatchedDevices
) -> MismatchedDevices:
    """Charge a 409's users (unknown, or with a device mismatch) to the caller's lookup budget.

    A 409 tells which names exist and their device ids; the budget bounds how fast anyone
    learns that through sends. An answer about more users than ``lookup_burst`` names only
    that many (``"truncated": true``).

    Returns:
        The 409 to give.

    Raises:
        RateLimited: the budget is spent (no 409 is given).
    """
    answer = exc.limited(max(1, int(st.config.lookup_burst)))
    await st.lookup_limit.take(caller.user, st.clock.monotonic(), answer.users_named)
    return answer


async def read_messages(request: web.Request) -> web.Response:
    """``GET /v1/messages?after=&limit=``: read the caller's mailbox (nothing is removed)."""
    st = request.app[STATE_KEY]
    caller = await _auth(request)
    after = _query_int(request, "after", 0, 0, 2**63 - 1)
    limit = _query_int(request, "limit", 100, 1, 1000)
    msgs = await st.store.fetch_mailbox(caller, after, limit + 1, st.config.max_request_bytes)
    more = len(msgs) > limit
    if not more and msgs:  # the page may have been cut short by its byte budget
        more = bool(await st.store.fetch_mailbox(caller, msgs[-1].seq, 1, 1))
    return web.json_response({"messages": [message_json(m) for m in msgs[:limit]], "more": more})


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = parse_ascii_uint(raw, name, 19)
    except BadRequest:
        value = -1
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer {lo}..{hi}")
    return value


async def ack_messages(request: web.Request) -> web.Response:
    """``POST /v1/messages/ack``: acknowledge messages of the caller's own mailbox."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    ids = parse_ack_ids(_json(body))
    return web.json_response({"acked": await st.store.ack(caller, ids)})


# -- blobs -------------------------------------------------------------------------------


# Every stored blob is a sealed attachment (ciphertext plus its tag), never empty; an empty
# upload can only be a client bug or a probe, and storing it would waste a blob id on nothing.
def _empty_blob() -> BadRequest:
    return BadRequest("a blob must not be empty", code="empty_blob")


async def upload_blob(request: web.Request) -> web.Response:
    """``POST /v1/blobs``: stream an encrypted blob to the blob store; content-addressed by
    SHA-256."""
    st = request.app[STATE_KEY]
    cfg = st.config
    declared = body_digest_header(request.headers)
    if declared is None:
        raise AuthError(f"{H_CONTENT_SHA256} is required for blob uploads", code="auth_missing")
    caller = await st.authenticate(request, declared)
    length = request.content_length
    if length is not None and length > cfg.max_blob_bytes:
        raise TooLarge(f"blob exceeds {cfg.max_blob_bytes} bytes")
    if length == 0:
        raise _empty_blob()
    # Everything that can be refused is refused before the body is read: the byte rate is
    # charged for the declared length, the quota checked against it (for a blob already
    # stored, which the caller may hold already, the store decides after the upload).
    if length is not None:
        await st.upload_limit.take(caller.user, st.clock.monotonic(), length)
        if await st.store.account_usage(
            caller.user
        ) + length > cfg.account_max_bytes and not await st.store.blob_exists(declared):
            raise AccountQuotaExceeded(cfg.account_max_bytes)
    try:
        upload = await st.blobs.receive(
            timed_chunks(request, st.body_limits(cfg.max_blob_bytes)), cfg.max_blob_bytes, declared
        )
    except OSError as exc:  # disk full, quota, file size limit, I/O error: 503, not a 500
        raise st.blob_health.failed(exc, "blob upload") from None
    try:
        if upload.size == 0:  # chunked with no data: refused like an empty Content-Length
            raise _empty_blob()
        if length is None:  # chunked: charged once its size is known
            await st.upload_limit.take(caller.user, st.clock.monotonic(), upload.size)
        async with st.blobs.lock:
            existed = await st.store.blob_exists(upload.blob_id)
            try:
                await st.blobs.finalize(upload)
            except OSError as exc:
                raise st.blob_health.failed(exc, "blob finalize") from None
            try:
                new = await st.store.put_blob(
                    upload.blob_id, upload.size, st.clock.now_ms(), caller.user
                )
            except AccountQuotaExceeded:
                if not existed:
                    await st.blobs.delete([upload.blob_id])
                raise
    finally:
        with contextlib.suppress(OSError):
            await st.blobs.discard(upload)
    st.blob_health.succeeded()
    log.info("blob stored id=%s size=%d new=%s", upload.blob_id, upload.size, new)
    return web.json_response(
        {"id": upload.blob_id, "size": upload.size}, status=201 if new else 200
    )


async def download_blob(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /v1/blobs/{id}``: download a blob, with Range support (206)."""
    st = request.app[STATE_KEY]
    await _auth(request)
    blob_id = request.match_info["blob_id"]
    path = st.blobs.local_path(blob_id)
    if path is not None:
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
    reader = await st.blobs.open_read(blob_id)
    if reader is None:
        raise NotFound("unknown blob", code="unknown_blob")
    return await blob_response(request, reader)


async def delete_blob(request: web.Request) -> web.Response:
    """``DELETE /v1/blobs/{id}``: drop the caller's hold on a blob it uploaded; the file goes
    when nobody holds it any more."""
    st = request.app[STATE_KEY]
    caller = await _auth(request)
    blob_id = request.match_info["blob_id"]
    check_blob_id(blob_id)
    async with st.blobs.lock:
        gone = await st.store.delete_blob(blob_id, caller.user)
        if gone:
            await st.blobs.delete([blob_id])
    log.info("blob released id=%s user=%s deleted=%s", blob_id, caller.user, gone)
    return web.json_response({"deleted": True})


# -- operations --------------------------------------------------------------------------


async def healthz_live(request: web.Request) -> web.Response:
    """``GET /healthz/live``: the process answers (restart it if this fails)."""
    return web.json_response({"status": "ok"})


async def healthz_ready(request: web.Request) -> web.Response:
    """``GET /healthz/ready`` (and ``GET /healthz``): 200 when every readiness check passes,
    else 503 ``{"status": "unavailable", "checks": {name: reason}}``."""
    ready, checks = await request.app[STATE_KEY].readiness.run()
    doc = {"status": "ok" if ready else "unavailable", "checks": checks}
    return web.json_response(doc, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text."""
    st = request.app[STATE_KEY]
    return web.Response(
        text=st.metrics.render(st.store.stats()), content_type="text/plain", charset="utf-8"
    )


def load_openapi() -> bytes:
    """Return the packaged OpenAPI document (relay/openapi.json)."""
    # Located next to this module, not through ``importlib.resources.files("relay")``: under
    # pytest's rootdir imports the name ``relay`` can resolve to the tests/relay namespace.
    return (Path(__file__).resolve().parent / "openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.Response(body=load_openapi(), content_type="application/json")


# -- factory -----------------------------------------------------------------------------


async def refresh_bans(st: RelayState) -> None:
    """Reread the banned users; close the live sockets of newly banned ones (4403)."""
    banned = await st.store.banned_users()
    new = banned - st.banned
    st.banned = banned
    if new:
        closed = st.hub.kick_users(new, CLOSE_BANNED, "account_banned")
        log.info("bans: %d account(s) newly banned, %d socket(s) closed", len(new), closed)


async def _ban_refresher(st: RelayState) -> None:
    while True:
        await asyncio.sleep(st.config.ban_refresh_seconds)
        try:
            await refresh_bans(st)
        except RelayError as exc:
            log.warning("bans: reread failed: %s", exc.code)


# Between two sweep calls: with SWEEP_CHUNK (1,000) records per call of about 10-20 ms, the
# sweeper deletes up to about 25,000 records/s, more than the 10,000 msg/s the relay is built for.
_SWEEP_PAUSE_SECONDS = 0.02


async def _sweeper(st: RelayState) -> None:
    interval = st.config.sweep_interval_seconds
    while True:
        await asyncio.sleep(interval)
        await sweep_once(st)


async def sweep_once(
    st: RelayState, max_rounds: int = 2000, pause_seconds: float = _SWEEP_PAUSE_SECONDS
) -> int:
    """Run retention sweeps until nothing more is due (bounded); return messages removed.

    Each call is bounded work (a small transaction); between calls the sweeper pauses, so the
    writer serves other writes in between instead of queueing them behind a long run of sweep
    transactions (docs/performance-relay.md, "Holding steady").
    """
    removed = 0
    for _ in range(max_rounds):
        async with st.blobs.lock:
            report = await st.store.sweep(st.clock.now_ms())
            await st.blobs.delete(report.blobs)
        removed += report.messages
        if not report.more:
            break
        await asyncio.sleep(pause_seconds)
    if removed:
        log.info("sweeper removed %d expired messages", removed)
    return removed


# Cyclic GC tuning for the serving process. Per-message objects are freed by reference
# counting; the cyclic collector only has to find rare cycles, yet with CPython's default
# thresholds (700, 10, 10) it ran ~100 collections a second at 10,000 msg/s offered, each
# traversing the messages in flight, and full ones every object alive: 8.4 s of a 30 s run,
# pauses up to 435 ms. So everything alive after startup (modules, the app) is frozen out of
# the collector's sight, and collections are rarer: 0.5 s in the same run, and twice the
# messages accepted (docs/performance-relay-journal.md, third session). Process-wide, hence restored
# when the app is cleaned up.
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> tuple[int, int, int]:
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return before


def _restore_gc(before: tuple[int, int, int]) -> None:
    gc.unfreeze()
    gc.set_threshold(*before)


def replay_secret_path(config: RelayConfig) -> Path:
    """Where the replay secret lives: ``replay_secret_file``, or ``data_dir/replay.key``."""
    if config.replay_secret_file:
        return Path(config.replay_secret_file)
    return config.data_dir / "replay.key"


async def _replay_secret(config: RelayConfig, guard: ReplayGuard) -> bytes:
    """The key of the nonce digests: kept by a guard that several nodes share (every node must
    digest alike), else in the replay secret file."""
    if isinstance(guard, SharedReplayGuard):
        return await guard.shared_secret()
    return load_replay_secret(replay_secret_path(config))


def create_app(
    config: RelayConfig,
    *,
    store: RelayStore | None = None,
    clock: Clock | None = None,
    replay: ReplayGuard | None = None,
) -> web.Application:
    """Build the relay application.

    Args:
        config: settings.
        store: storage backend; by default the one ``config.store`` names
            (relay.backends.make_store).
        clock: time source (tests pass a fixed one).
        replay: replay guard; by default the one ``config.replay_guard`` names (the SQLite one
            is ``data_dir/replay.sqlite3``). A guard with ``open``/``close`` is opened with the
            app and closed after it.

    Returns:
        The aiohttp application; its cleanup context opens and closes the store.
    """
    from relay.ws import websocket_handler

    app = web.Application(client_max_size=config.max_request_bytes)
    app[CONFIG_KEY] = config
    metrics_ = Metrics()
    if store is None:
        store = make_store(config)
    limiters = make_limiter(config)
    limiter = limiters.limiter
    state = RelayState(
        config=config,
        store=store,
        clock=clock or Clock(),
        metrics=metrics_,
        hub=Hub(metrics_, config.ws_max_outbound_bytes, config.ws_slow_grace_seconds),
        blobs=make_blob_store(config),
        replay=replay or make_replay_guard(config),
        register_limit=limiter("register", config.registration_rate, config.registration_burst),
        send_limit=RateLimiter(config.send_rate, config.send_burst),
        fetch_limit=limiter("fetch", config.prekey_fetch_rate, config.prekey_fetch_burst),
        fetch_account_limit=limiter(
            "fetch_account", config.prekey_fetch_account_rate, config.prekey_fetch_account_burst
        ),
        prekey_target_limit=limiter(
            "prekey_target", config.prekey_target_rate, config.prekey_target_burst
        ),
        device_add_limit=limiter("device_add", config.device_add_rate, config.device_add_burst),
        lookup_limit=limiter("lookup", config.lookup_rate, config.lookup_burst),
        upload_limit=RateLimiter(config.upload_bytes_rate, config.upload_bytes_burst),
        body_slots=BodySlots(config.unauthenticated_bodies_per_address),
        blob_health=BlobHealth(config.data_dir / "blobs" / "tmp"),
    )
    state.readiness.add_component("storage", state.store)
    state.readiness.add_component("replay_guard", state.replay)
    state.readiness.add("blobs", state.blob_health.ready)

    async def accepting() -> str | None:
        return "shutting down" if state.hub.shutting_down else None

    state.readiness.add("accepting", accepting)
    if config.redis_url:

        async def redis_ready() -> str | None:
            node = state.node  # set once the lifecycle has linked this node
            return "not linked to Redis yet" if node is None else await node.ready()

        state.readiness.add("redis", redis_ready)
    app[STATE_KEY] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.blobs.open()
        guard = state.replay
        try:
            if isinstance(guard, ManagedReplayGuard):
                await guard.open()
            state.replay_secret = await _replay_secret(config, guard)
            await state.store.open()
        except BaseException:
            if isinstance(guard, ManagedReplayGuard):
                await guard.close()
            await state.blobs.close()
            raise
        await refresh_bans(state)
        if config.ban_refresh_seconds > 0:
            state.spawn(_ban_refresher(state))
        gc_before = _tune_gc()
        state.store.set_delivery_listener(state.hub.deliver)
        link: NodeLink | None = None
        if config.redis_url:
            from relay.nodes.link import NodeLink

            link = NodeLink(state, config)
            await link.start()  # takes over the delivery listener
        if config.sweep_interval_seconds > 0:
            state.spawn(_sweeper(state))
        state.spawn(
            state.hub.run_liveness(config.ws_heartbeat_seconds, config.ws_idle_timeout_seconds)
        )
        yield
        await state.hub.close_all()
        for task in list(state.background):
            task.cancel()
        for task in list(state.background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if link is not None:
            link.stop_pushing()
        await state.store.close()  # its last commits still reach the link's listener
        state.store.set_delivery_listener(None)
        await state.blobs.close()
        if isinstance(guard, ManagedReplayGuard):
            await guard.close()
        if link is not None:
            await link.close()  # wakes other nodes for those commits, releases presence
        await limiters.close()
        _restore_gc(gc_before)

    app.cleanup_ctx.append(lifecycle)

    async def on_shutdown(app: web.Application) -> None:
        await state.hub.close_all()

    app.on_shutdown.append(on_shutdown)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/v1/registration", registration_info),
        ("POST", "/v1/accounts", register),
        ("POST", "/v1/devices", add_device),
        ("GET", "/v1/devices", list_devices),
        ("DELETE", "/v1/devices/{device_id}", remove_device),
        ("PUT", "/v1/keys", upload_keys),
        ("GET", "/v1/keys/count", key_count),
        ("GET", "/v1/keys/{username}", fetch_keys),
        ("GET", "/v1/keys/{username}/{device_id}", fetch_keys),
        ("PUT", "/v1/messages", send_message),
        ("GET", "/v1/messages", read_messages),
        ("POST", "/v1/messages/ack", ack_messages),
        ("POST", "/v1/blobs", upload_blob),
        ("GET", "/v1/blobs/{blob_id}", download_blob),
        ("DELETE", "/v1/blobs/{blob_id}", delete_blob),
        ("GET", "/healthz", healthz_ready),
        ("GET", "/healthz/live", healthz_live),
        ("GET", "/healthz/ready", healthz_ready),
        ("GET", "/metrics", metrics),
        ("GET", "/openapi.json", openapi),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, json_errors(handler))
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_route("*", "/{tail:.*}", json_errors(_fallback))
    return app
