# Invariants:
# * Handlers are thin: parse and validate, authenticate, call the store, respond. Every error
#   is a RelayError rendered as {"error", "message"} JSON; unexpected ones become a logged 500
#   whose body reveals nothing.
# * Every /v1 route authenticates with a signed request before touching the store (the
#   registration route verifies against the key it is registering).
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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.auth import (
    H_CONTENT_SHA256,
    NonceCache,
    SignedHeaders,
    body_digest_header,
    parse_signed_headers,
    verify_signature,
)
from relay.backends import make_blob_store, make_store
from relay.blob_http import blob_response
from relay.blobs import CHUNK_SIZE, BlobStore
from relay.config import RelayConfig
from relay.errors import AuthError, BadRequest, NotFound, RelayError, TooLarge
from relay.guard import request_started, response_finished
from relay.hub import CLOSE_DEVICE_REMOVED, Hub
from relay.metrics import Metrics
from relay.ratelimit import RateLimiter
from relay.store.base import Address, RelayStore
from relay.wire import (
    AUTH_KEY_LEN,
    RESERVED_USERNAMES,
    b64d,
    b64e,
    bundle_json,
    decode_send,
    message_json,
    parse_ack_ids,
    parse_device_id,
    parse_json_send,
    parse_key_upload,
    parse_username,
)

__all__ = [
    "BINARY_SEND_TYPE",
    "CONFIG_KEY",
    "STATE_KEY",
    "Clock",
    "RelayState",
    "create_app",
    "json_error",
    "json_errors",
    "load_openapi",
    "receipt_json",
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


@dataclass(slots=True)
class RelayState:
    """Everything the handlers share, stored in the app under ``STATE_KEY``."""

    config: RelayConfig
    store: RelayStore
    clock: Clock
    metrics: Metrics
    hub: Hub
    blobs: BlobStore
    nonces: NonceCache
    register_limit: RateLimiter
    send_limit: RateLimiter
    fetch_limit: RateLimiter
    keys: dict[Address, bytes] = field(default_factory=dict)  # raw keys: small per device
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
        self.nonces.check_fresh(sh, self.clock.now_ms())
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
        """
        now = self.clock.now_ms()
        self.nonces.check_fresh(sh, now)
        addr = Address(sh.user, sh.device)
        if register_key is not None:
            key_bytes = register_key
        else:
            found = self.keys.get(addr) or await self.store.auth_key(addr)
            if found is None:
                raise AuthError("unknown device", code="auth_invalid")
            key_bytes = found
        verify_signature(key_bytes, sh, method, target, body_sha256)
        self.nonces.remember(sh, now)
        if self.node is not None:  # replays on other nodes too (relay.nodes.state)
            await self.node.claim_nonce(
                sh.user, sh.device, sh.nonce, sh.timestamp_ms + self.nonces.window_ms
            )
        if register_key is None and addr not in self.keys:
            if len(self.keys) > 200_000:
                self.keys.clear()
            self.keys[addr] = key_bytes
        return addr

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


async def _read_body(request: web.Request) -> bytes:
    cfg = request.app[STATE_KEY].config
    if request.content_length is not None and request.content_length > cfg.max_request_bytes:
        raise TooLarge(f"request body exceeds {cfg.max_request_bytes} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise TooLarge(f"request body exceeds {cfg.max_request_bytes} bytes") from exc


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


async def register(request: web.Request) -> web.Response:
    """``POST /v1/accounts``: register a username with its first device."""
    st = request.app[STATE_KEY]
    peer = request.remote or "?"
    st.register_limit.take(peer, st.clock.monotonic())
    body = await _read_body(request)
    doc = _json(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    username = parse_username(doc.get("username"))
    if username in RESERVED_USERNAMES:
        raise BadRequest("this username is reserved", code="invalid_username")
    device = parse_device_id(doc.get("device_id"))
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
    sh = parse_signed_headers(request.headers)
    if sh.user != username or sh.device != device:
        raise AuthError("auth headers must name the account being registered")
    addr = await st.authenticate(request, _sha(body), register_key=auth_key)
    await st.store.create_account(addr, auth_key, st.clock.now_ms())
    log.info("registered user=%s device=%d", addr.user, addr.device)
    return web.json_response({"username": addr.user, "device_id": addr.device}, status=201)


async def add_device(request: web.Request) -> web.Response:
    """``POST /v1/devices``: add a device to the caller's user."""
    st = request.app[STATE_KEY]
    body = await _read_body(request)
    caller = await _auth(request, body)
    doc = _json(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    new = Address(caller.user, parse_device_id(doc.get("device_id")))
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
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
    body = await _read_body(request)
    caller = await _auth(request, body)
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
    st.fetch_limit.take((caller, target), st.clock.monotonic())
    bundles = await st.store.fetch_bundles(target, device)
    return web.json_response({"username": target, "devices": [bundle_json(b) for b in bundles]})


# -- messages ----------------------------------------------------------------------------


async def send_message(request: web.Request) -> web.Response:
    """``PUT /v1/messages``: store one message for its recipient devices (JSON or binary)."""
    st = request.app[STATE_KEY]
    cfg = st.config
    body = await _read_body(request)
    caller = await _auth(request, body)
    if request.content_type == BINARY_SEND_TYPE:
        env = decode_send(body, max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes)
    else:
        env = parse_json_send(
            _json(body), max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes
        )
    st.send_limit.take(caller, st.clock.monotonic())
    st.require_node_ready()  # other nodes' recipients are woken through Redis
    receipt = await st.store.submit_send(caller, env, st.clock.now_ms())
    return web.json_response(
        receipt_json(receipt.message_id, receipt.recipients, receipt.stored_at)
    )


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
    if not raw.isdigit() or len(raw) > 19 or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer {lo}..{hi}")
    return int(raw)


async def ack_messages(request: web.Request) -> web.Response:
    """``POST /v1/messages/ack``: acknowledge messages of the caller's own mailbox."""
    st = request.app[STATE_KEY]
    body = await _read_body(request)
    caller = await _auth(request, body)
    ids = parse_ack_ids(_json(body))
    return web.json_response({"acked": await st.store.ack(caller, ids)})


# -- blobs -------------------------------------------------------------------------------


async def upload_blob(request: web.Request) -> web.Response:
    """``POST /v1/blobs``: stream an encrypted blob to the blob store; content-addressed by
    SHA-256."""
    st = request.app[STATE_KEY]
    cfg = st.config
    declared = body_digest_header(request.headers)
    if declared is None:
        raise AuthError(f"{H_CONTENT_SHA256} is required for blob uploads", code="auth_missing")
    await st.authenticate(request, declared)
    if request.content_length is not None and request.content_length > cfg.max_blob_bytes:
        raise TooLarge(f"blob exceeds {cfg.max_blob_bytes} bytes")
    upload = await st.blobs.receive(
        request.content.iter_chunked(CHUNK_SIZE), cfg.max_blob_bytes, declared
    )
    try:
        async with st.blobs.lock:
            await st.blobs.finalize(upload)
            new = await st.store.put_blob(upload.blob_id, upload.size, st.clock.now_ms())
    finally:
        await st.blobs.discard(upload)
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


# -- operations --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``."""
    return web.json_response({"status": "ok"})


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


async def _sweeper(st: RelayState) -> None:
    interval = st.config.sweep_interval_seconds
    while True:
        await asyncio.sleep(interval)
        await sweep_once(st)


async def sweep_once(st: RelayState, max_rounds: int = 100) -> int:
    """Run retention sweeps until nothing more is due (bounded); return messages removed."""
    removed = 0
    for _ in range(max_rounds):
        async with st.blobs.lock:
            report = await st.store.sweep(st.clock.now_ms())
            await st.blobs.delete(report.blobs)
        removed += report.messages
        if report.messages < 5000 and len(report.blobs) < 5000:
            break
    if removed:
        log.info("sweeper removed %d expired messages", removed)
    return removed


# Cyclic GC tuning for the serving process. Per-message objects are freed by reference
# counting; the cyclic collector only has to find rare cycles, yet with CPython's default
# thresholds (700, 10, 10) it ran ~100 collections a second at 10,000 msg/s offered, each
# traversing the messages in flight, and full ones every object alive: 8.4 s of a 30 s run,
# pauses up to 435 ms. So everything alive after startup (modules, the app) is frozen out of
# the collector's sight, and collections are rarer: 0.5 s in the same run, and twice the
# messages accepted (docs/performance-relay.md, third session). Process-wide, hence restored
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


def create_app(
    config: RelayConfig, *, store: RelayStore | None = None, clock: Clock | None = None
) -> web.Application:
    """Build the relay application.

    Args:
        config: settings.
        store: storage backend; by default the one ``config.store`` names
            (relay.backends.make_store).
        clock: time source (tests pass a fixed one).

    Returns:
        The aiohttp application; its cleanup context opens and closes the store.
    """
    from relay.ws import websocket_handler

    app = web.Application(client_max_size=config.max_request_bytes)
    app[CONFIG_KEY] = config
    metrics_ = Metrics()
    if store is None:
        store = make_store(config)
    state = RelayState(
        config=config,
        store=store,
        clock=clock or Clock(),
        metrics=metrics_,
        hub=Hub(metrics_, config.ws_max_outbound_bytes, config.ws_slow_grace_seconds),
        blobs=make_blob_store(config),
        nonces=NonceCache(int(config.auth_window_seconds * 1000), config.nonce_cache_max),
        register_limit=RateLimiter(config.registration_rate, config.registration_burst),
        send_limit=RateLimiter(config.send_rate, config.send_burst),
        fetch_limit=RateLimiter(config.prekey_fetch_rate, config.prekey_fetch_burst),
    )
    app[STATE_KEY] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.blobs.open()
        try:
            await state.store.open()
        except BaseException:
            await state.blobs.close()
            raise
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
        if link is not None:
            await link.close()  # wakes other nodes for those commits, releases presence
        _restore_gc(gc_before)

    app.cleanup_ctx.append(lifecycle)

    async def on_shutdown(app: web.Application) -> None:
        await state.hub.close_all()

    app.on_shutdown.append(on_shutdown)
    routes: list[tuple[str, str, Handler]] = [
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
        ("GET", "/healthz", healthz),
        ("GET", "/metrics", metrics),
        ("GET", "/openapi.json", openapi),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, json_errors(handler))
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_route("*", "/{tail:.*}", json_errors(_fallback))
    return app
