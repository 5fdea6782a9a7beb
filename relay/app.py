# Invariants:
# * Handlers are thin: parse and validate, authenticate, call the store, respond. Every error
#   is a RelayError rendered as {"error", "message"} JSON; unexpected ones become a logged 500
#   whose body reveals nothing.
# * Every /v1 route authenticates with a signed request before touching the store (the
#   registration route verifies against the key it is registering), except
#   ``GET /v1/registration``, which only tells the mode and issues a stateless challenge, and
#   the new device's two provisioning routes (relay.provisioning: rate-limited per address,
#   small, few and short-lived), and ``PUT /v1/messages/sealed``, which carries a delivery
#   token per recipient instead (relay.sealed).
# * Nothing here logs or echoes a message body or key material.
"""The aiohttp application: ``create_app(config)`` and the HTTP handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.auth import (
    H_CONTENT_SHA256,
    body_digest_header,
    check_fresh,
    parse_signed_headers,
    sha256_hex,
)
from relay.backends import make_blob_store, make_store
from relay.blob_http import blob_response
from relay.blobs import check_blob_id
from relay.body import BodySlots, read_body, timed_chunks
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
    TooLarge,
)
from relay.http_errors import Handler, json_errors
from relay.hub import CLOSE_BANNED, Hub
from relay.metrics import Metrics
from relay.provisioning import fill_provision, open_provision, read_provision, take_provision
from relay.ratelimit import RateLimiter, SendSlots, make_limiter
from relay.recovery import recover, reset_devices, set_recovery
from relay.registration import invite_hash
from relay.replay import (
    ManagedReplayGuard,
    ReplayGuard,
    SharedReplayGuard,
    load_replay_secret,
    make_replay_guard,
)
from relay.sealed import issue_certificate, send_sealed, sender_keys, set_access
from relay.sending import BINARY_SEND_TYPE, charge_lookups, check_recipient_users, receipt_json
from relay.state import CONFIG_KEY, STATE_KEY, BlobHealth, Clock, RelayState
from relay.store.base import Address, RelayStore, SupportsEarlyDelivery
from relay.wire import (
    AUTH_KEY_LEN,
    RESERVED_USERNAMES,
    b64d,
    b64e,
    bundle_json,
    decode_send,
    json_body,
    message_json,
    parse_ack,
    parse_ascii_uint,
    parse_device_id,
    parse_json_send,
    parse_key_upload,
    parse_username,
)
from relay.ws import websocket_handler

__all__ = [
    "BINARY_SEND_TYPE",
    "create_app",
    "load_openapi",
    "receipt_json",
    "refresh_bans",
    "replay_secret_path",
    "sweep_once",
]

if TYPE_CHECKING:
    from relay.nodes.link import NodeLink

log = logging.getLogger("relay.app")


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


async def _auth(request: web.Request, body: bytes = b"") -> Address:
    return await request.app[STATE_KEY].authenticate(request, sha256_hex(body))


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
    doc = json_body(body)
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
    addr = await st.authenticate(request, sha256_hex(body), register_key=auth_key)
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
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    new = Address(caller.user, parse_device_id(doc.get("device_id")))
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
    name = None if doc.get("name") is None else b64d(doc.get("name"), "name")
    if name is not None and len(name) > st.config.device_name_max_bytes:
        raise TooLarge(f"a device name is at most {st.config.device_name_max_bytes} bytes")
    await st.device_add_limit.take(caller.user, st.clock.monotonic())
    await st.store.add_device(new, auth_key, st.clock.now_ms(), name)
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
                {
                    "device_id": d.device_id,
                    "created_at": d.created_at,
                    "has_keys": d.has_keys,
                    "name": None if d.name is None else b64e(d.name),
                    "last_seen": d.last_seen,
                }
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
    await st.drop_device(target)
    return web.json_response({"removed": True})


# -- keys --------------------------------------------------------------------------------


async def upload_keys(request: web.Request) -> web.Response:
    """``PUT /v1/keys``: upload the caller's identity, signed and one-time prekeys."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    upload = parse_key_upload(json_body(body))
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
            json_body(body), max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes
        )
    check_recipient_users(env, cfg.max_recipient_users)
    now = st.clock.monotonic()
    st.send_slots.acquire(caller.user)  # first: a send refused here spends no token
    try:
        st.send_limit.take_now(caller, now)
        await st.account_send_limit.take(caller.user, now)
        st.upload_limit.take_now(caller.user, now, len(env.body))
        st.require_node_ready()  # other nodes' recipients are woken through Redis
        receipt = await st.store.submit_send(caller, env, st.clock.now_ms())
    except MismatchedDevices as exc:
        raise await charge_lookups(st, caller, exc) from None
    finally:
        st.send_slots.release(caller.user)
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
    ids, settled = parse_ack(json_body(body))
    return web.json_response({"acked": await st.store.ack(caller, ids, settled)})


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


# Between two sweep calls: with SQLite's 250 records per call of about 1-3 ms (PostgreSQL:
# 1,000, each its own transaction), the sweeper deletes about 20,000 records/s, more than the
# 10,000 msg/s the relay is built for, while regular writes get the writer in between.
_SWEEP_PAUSE_SECONDS = 0.01


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
    slots = await st.store.sweep_provisions(st.clock.now_ms())
    if slots:
        log.info("sweeper removed %d expired provisioning slots", slots)
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
        recovery_limit=limiter("recovery", config.recovery_rate, config.recovery_burst),
        recovery_address_limit=limiter(
            "recovery_address", config.recovery_address_rate, config.recovery_address_burst
        ),
        provisioning_limit=limiter(
            "provisioning", config.provisioning_rate, config.provisioning_burst
        ),
        provisioning_poll_limit=limiter(
            "provisioning_poll", config.provisioning_poll_rate, config.provisioning_poll_burst
        ),
        lookup_limit=limiter("lookup", config.lookup_rate, config.lookup_burst),
        sealed_token_limit=limiter(
            "sealed_token", config.sealed_token_rate, config.sealed_token_burst
        ),
        upload_limit=RateLimiter(config.upload_bytes_rate, config.upload_bytes_burst),
        account_send_limit=limiters.frame_limiter(
            "account_send", config.account_send_rate, config.account_send_burst
        ),
        send_slots=SendSlots(config.account_max_inflight_sends),
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
        early = state.store if isinstance(state.store, SupportsEarlyDelivery) else None
        if early is not None and config.early_delivery and not config.redis_url:
            # Pushed once checked, in parallel with the commit (docs/delivery.md). Relay nodes
            # push only what their store committed (relay.nodes.link).
            early.set_early_delivery_listener(state.hub)
        link: NodeLink | None = None
        if config.redis_url:
            # Imported here, not at the top: only a relay with redis_url pays for loading redis.
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
        if early is not None:
            early.set_early_delivery_listener(None)
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
        ("POST", "/v1/devices/reset", reset_devices),
        ("POST", "/v1/provisioning", open_provision),
        ("GET", "/v1/provisioning/{slot_id}", read_provision),
        ("PUT", "/v1/provisioning/{slot_id}", fill_provision),
        ("POST", "/v1/provisioning/{slot_id}/take", take_provision),
        ("PUT", "/v1/recovery", set_recovery),
        ("POST", "/v1/recovery", recover),
        ("PUT", "/v1/keys", upload_keys),
        ("GET", "/v1/keys/count", key_count),
        ("GET", "/v1/keys/{username}", fetch_keys),
        ("GET", "/v1/keys/{username}/{device_id}", fetch_keys),
        ("PUT", "/v1/messages", send_message),
        ("PUT", "/v1/messages/sealed", send_sealed),
        ("GET", "/v1/sender-keys", sender_keys),
        ("POST", "/v1/certificate", issue_certificate),
        ("PUT", "/v1/access", set_access),
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
