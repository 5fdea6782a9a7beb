# Invariants:
# * A provisioning slot carries a device-link grant from an approving device to a new device
#   (docs/relay-api.md, "Provisioning"). The relay holds the new device's *public* auth key and
#   the grant as ciphertext (sealed to an X25519 key the relay never sees); it cannot read or
#   forge a grant.
# * Opening a slot and polling it are unauthenticated (the new device has no account yet), so
#   both take a token per client address first (``provisioning_rate``/``_poll_rate``), bodies
#   are small, slots are few (``provisioning_max_live``) and short-lived
#   (``provisioning_ttl_seconds``). Reading a slot and putting a grant need a signed request of
#   any registered device.
# * A grant is handed out once: taking it deletes the slot in the same transaction; only the
#   holder of the slot's token (its SHA-256 is stored, never the token) can take it. Expired
#   slots go with any grant in them.
# * Logs name slot ids (random, not secret once used) and sizes, never keys, tokens or grants.
"""Device-link provisioning endpoints: open a slot, read it, fill it, take its grant."""

from __future__ import annotations

import hashlib
import logging
import os
import re

from aiohttp import web

from relay.body import read_body
from relay.errors import BadRequest, Conflict, NotFound, TooLarge, Unavailable
from relay.state import STATE_KEY
from relay.store.base import ProvisionSlot
from relay.wire import AUTH_KEY_LEN, b64d, b64e, json_body

__all__ = [
    "SLOT_ID_LEN",
    "TOKEN_LEN",
    "fill_provision",
    "open_provision",
    "read_provision",
    "take_provision",
]

log = logging.getLogger("relay.provisioning")

#: Bytes of a slot id (hex in paths: 32 characters).
SLOT_ID_LEN = 16
#: Bytes of a slot's fetch token.
TOKEN_LEN = 32
# The unauthenticated bodies are tiny JSON objects (one 32-byte key in base64).
_SMALL_BODY = 1024
_SLOT_RE = re.compile(r"[0-9a-f]{32}")


def _slot_id(request: web.Request) -> bytes:
    raw = request.match_info["slot_id"]
    if _SLOT_RE.fullmatch(raw) is None:
        raise BadRequest("slot id must be 32 lowercase hex characters")
    return bytes.fromhex(raw)


def _not_found() -> NotFound:
    return NotFound("no such provisioning slot (or it expired)", code="unknown_provisioning")


async def _small_json(request: web.Request) -> dict[str, object]:
    st = request.app[STATE_KEY]
    peer = request.remote or "?"
    with st.body_slots.hold(peer):
        body = await read_body(request, st.body_limits(_SMALL_BODY))
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


async def open_provision(request: web.Request) -> web.Response:
    """``POST /v1/provisioning``: open a slot for a new device (unauthenticated)."""
    st = request.app[STATE_KEY]
    cfg = st.config
    await st.provisioning_limit.take(request.remote or "?", st.clock.monotonic())
    doc = await _small_json(request)
    auth_key = b64d(doc.get("auth_key"), "auth_key", AUTH_KEY_LEN)
    now = st.clock.now_ms()
    slot = ProvisionSlot(
        slot_id=os.urandom(SLOT_ID_LEN),
        auth_key=auth_key,
        expires_ms=now + int(cfg.provisioning_ttl_seconds * 1000),
        filled=False,
    )
    token = os.urandom(TOKEN_LEN)
    opened = await st.store.open_provision(
        slot, hashlib.sha256(token).digest(), now, cfg.provisioning_max_live
    )
    if not opened:
        raise Unavailable(5, "too many device links in progress on this relay")
    log.info("provisioning slot opened id=%s", slot.slot_id.hex())
    return web.json_response(
        {"id": slot.slot_id.hex(), "token": b64e(token), "expires_at": slot.expires_ms},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


async def read_provision(request: web.Request) -> web.Response:
    """``GET /v1/provisioning/{slot_id}``: the new device's auth key (signed, any device)."""
    st = request.app[STATE_KEY]
    slot_id = _slot_id(request)
    await st.authenticate(request, hashlib.sha256(b"").hexdigest())
    slot = await st.store.provision(slot_id, st.clock.now_ms())
    if slot is None:
        raise _not_found()
    return web.json_response(
        {"auth_key": b64e(slot.auth_key), "expires_at": slot.expires_ms, "filled": slot.filled}
    )


async def fill_provision(request: web.Request) -> web.Response:
    """``PUT /v1/provisioning/{slot_id}``: put the encrypted grant (signed, any device)."""
    st = request.app[STATE_KEY]
    slot_id = _slot_id(request)
    body, caller = await st.read_signed_body(request)
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    raw = doc.get("grant")
    limit = st.config.provisioning_max_grant_bytes
    if isinstance(raw, str) and len(raw) > (limit + 2) // 3 * 4:
        raise TooLarge(f"a grant is at most {limit} bytes")
    grant = b64d(raw, "grant")
    if not grant or len(grant) > limit:
        raise TooLarge(f"a grant is 1..{limit} bytes")
    outcome = await st.store.fill_provision(slot_id, grant, st.clock.now_ms())
    if outcome == "missing":
        raise _not_found()
    if outcome == "filled":
        raise Conflict("this slot holds a grant already", code="provisioning_filled")
    log.info(
        "provisioning grant stored id=%s size=%d by=%s/%d",
        slot_id.hex(),
        len(grant),
        caller.user,
        caller.device,
    )
    return web.json_response({"stored": True})


async def take_provision(request: web.Request) -> web.Response:
    """``POST /v1/provisioning/{slot_id}/take``: the grant, once, for the slot's token."""
    st = request.app[STATE_KEY]
    slot_id = _slot_id(request)
    await st.provisioning_poll_limit.take(request.remote or "?", st.clock.monotonic())
    doc = await _small_json(request)
    token = b64d(doc.get("token"), "token", TOKEN_LEN)
    taken = await st.store.take_provision(
        slot_id, hashlib.sha256(token).digest(), st.clock.now_ms()
    )
    if not taken.found:
        raise _not_found()
    if taken.grant is not None:
        log.info("provisioning grant taken id=%s size=%d", slot_id.hex(), len(taken.grant))
    grant = None if taken.grant is None else b64e(taken.grant)
    return web.json_response({"grant": grant}, headers={"Cache-Control": "no-store"})
