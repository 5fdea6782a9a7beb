# Invariants:
# * The relay keeps only a recovery *verifier*: an Ed25519 public key whose private key the
#   client derives from the recovery key (docs/protocol.md, "Account recovery"). A recovery
#   request is signed with that private key over the same canonical string as every request
#   (freshness window, single-use nonce), so the key itself never reaches the relay, and a
#   captured request cannot be replayed.
# * Every recovery attempt, right or wrong, first takes a token per client address and per
#   username (``recovery_address_*``, ``recovery_*``): guesses are bounded before any work.
# * Replacing an account's devices adds the new device before dropping the others, so a
#   request cut off half-way can be repeated (the old device or the recovery key still
#   authenticates it); a username is never released or re-issued.
"""Account recovery endpoints: set the recovery verifier, re-claim a name, reset devices."""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web

from relay.auth import check_fresh, parse_signed_headers, sha256_hex
from relay.body import read_body
from relay.errors import AuthError, BadRequest, Conflict, Forbidden, NotFound
from relay.state import STATE_KEY, RelayState
from relay.store.base import Address
from relay.wire import AUTH_KEY_LEN, b64d, json_body, parse_device_id

__all__ = ["VERIFIER_LEN", "recover", "replace_devices", "reset_devices", "set_recovery"]

log = logging.getLogger("relay.recovery")

#: An Ed25519 public key.
VERIFIER_LEN = 32


def _new_device(body: bytes) -> tuple[int, bytes]:
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return parse_device_id(doc.get("device_id")), b64d(
        doc.get("auth_key"), "auth_key", AUTH_KEY_LEN
    )


async def replace_devices(st: RelayState, new: Address, auth_key: bytes) -> None:
    """Make ``new`` (with ``auth_key``) the user's only device.

    A device already registered at ``new`` with another key is dropped first; every other
    device is dropped after ``new`` exists (its mailbox, prekeys and sockets with it).

    Raises:
        StorageError, Unavailable: the store or the node link failed.
    """
    st.require_node_ready()  # every node must hear of the removals
    others = {d.device_id for d in await st.store.list_devices(new.user)}
    if new.device in others and await st.store.auth_key(new) != auth_key:
        await st.drop_device(new)
    others.discard(new.device)
    if await st.store.auth_key(new) is None:
        try:
            await st.store.add_device(new, auth_key, st.clock.now_ms())
        except Conflict as exc:
            if exc.code != "too_many_devices":
                raise
            await _drop_all(st, new.user, others)
            others = set()
            await st.store.add_device(new, auth_key, st.clock.now_ms())
    await _drop_all(st, new.user, others)


async def _drop_all(st: RelayState, user: str, devices: set[int]) -> None:
    for device in sorted(devices):
        with contextlib.suppress(NotFound):  # removed meanwhile: gone either way
            await st.drop_device(Address(user, device))


async def set_recovery(request: web.Request) -> web.Response:
    """``PUT /v1/recovery``: store (or replace) the caller's recovery verifier."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    verifier = b64d(doc.get("verifier"), "verifier", VERIFIER_LEN)
    await st.store.set_recovery_verifier(caller.user, verifier)
    log.info("recovery verifier set user=%s", caller.user)
    return web.json_response({"set": True})


async def recover(request: web.Request) -> web.Response:
    """``POST /v1/recovery``: re-claim a username with its recovery key (signed with it)."""
    st = request.app[STATE_KEY]
    peer = request.remote or "?"
    now = st.clock.monotonic()
    await st.recovery_address_limit.take(peer, now)
    sh = parse_signed_headers(request.headers)  # everything checkable before the body
    check_fresh(sh, st.clock.now_ms(), st.window_ms)
    await st.recovery_limit.take(sh.user, now)
    with st.body_slots.hold(peer):
        body = await read_body(request, st.body_limits(st.config.max_request_bytes))
    device, auth_key = _new_device(body)
    if sh.device != device:
        raise AuthError("auth headers must name the new device")
    verifier = await st.store.recovery_verifier(sh.user)
    if verifier is None:
        log.info("recovery refused user=%s (no verifier)", sh.user)
        raise Forbidden("no such account, or wrong recovery key", code="recovery_refused")
    try:
        await st.authenticate(request, sha256_hex(body), register_key=verifier)
    except AuthError as exc:
        if exc.code != "auth_invalid":
            raise
        log.info("recovery refused user=%s (wrong key)", sh.user)
        raise Forbidden("no such account, or wrong recovery key", code="recovery_refused") from None
    new = Address(sh.user, device)
    await replace_devices(st, new, auth_key)
    log.info("account recovered user=%s device=%d", new.user, new.device)
    return web.json_response({"username": new.user, "device_id": new.device})


async def reset_devices(request: web.Request) -> web.Response:
    """``POST /v1/devices/reset``: make a new device the caller's user's only one (a backup
    restored on a new machine, signed by a device of the backup)."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    device, auth_key = _new_device(body)
    await st.device_add_limit.take(caller.user, st.clock.monotonic())
    new = Address(caller.user, device)
    await replace_devices(st, new, auth_key)
    log.info("devices reset user=%s device=%d", new.user, new.device)
    return web.json_response({"username": new.user, "device_id": new.device})
