# Invariants:
# * The relay never learns who sent a sealed message: ``PUT /v1/messages/sealed`` carries no
#   signature, the body is opaque, and the message is stored under a pseudonym derived from
#   the recipients' token verifiers (blindpost_wire.names.sealed_sender_name); nothing here
#   logs a token, a verifier, the pseudonym or a sender.
# * A sealed send is accepted only with a valid delivery token for every recipient user, each
#   checked against the stored verifier in constant time; every refusal is the same
#   ``401 delivery_token_refused``, so a send cannot probe which user refused. Each token is
#   rate-limited (``sealed_token_rate``/``sealed_token_burst``; in Redis, cluster-wide, when
#   the relay has one) before the store is touched.
# * Certificate keys live in the store (``sender_keys``), so every node signs with the same
#   keys; a node that finds none, or a current key older than ``sender_key_rotation_seconds``,
#   adds the next one (endorsed by the previous); two nodes racing agree through the key id.
"""Sealed sender on the relay: certificate keys, certificates, access verifiers, sealed sends."""

from __future__ import annotations

import hashlib
import logging

import nacl.signing
import nacl.utils
from aiohttp import web

from blindpost_wire.frames import WireError
from blindpost_wire.names import SEALED_DEVICE_ID, sealed_sender_name
from blindpost_wire.sealed import (
    CERT_CONTEXT,
    DELIVERY_TOKEN_HEADER,
    ENDORSE_CONTEXT,
    certificate_body,
    endorsement_body,
    parse_token_header,
    token_verifier,
    verifier_matches,
)
from relay.auth import sha256_hex
from relay.body import read_body
from relay.errors import AuthError, BadRequest, MismatchedDevices, NotFound
from relay.sending import (
    BINARY_SEND_TYPE,
    charge_lookups,
    check_recipient_users,
    receipt_json,
)
from relay.state import STATE_KEY, RelayState
from relay.store.base import Address, SenderKeyRow
from relay.wire import b64d, b64e, decode_send, json_body

__all__ = [
    "VERIFIER_LEN",
    "current_keys",
    "issue_certificate",
    "send_sealed",
    "sender_keys",
    "set_access",
]

log = logging.getLogger("relay.sealed")

#: A SHA-256 token verifier.
VERIFIER_LEN = 32
_SEED_LEN = 32


def _public(row: SenderKeyRow) -> bytes:
    return bytes(nacl.signing.SigningKey(row.seed).verify_key)


async def current_keys(st: RelayState) -> list[SenderKeyRow]:
    """The stored certificate keys, after adding the next one if none exists or the newest is
    due for rotation.

    Raises:
        StorageError: the store failed.
    """
    cfg = st.config
    now = st.clock.now_ms()
    for _ in range(3):  # another node may add the same key id first: read again
        rows = await st.store.sender_keys()
        newest = rows[-1] if rows else None
        due = newest is None or now - newest.created_ms >= cfg.sender_key_rotation_seconds * 1000
        if not due:
            return rows
        seed = nacl.utils.random(_SEED_LEN)
        key_id = 1 if newest is None else newest.key_id + 1
        endorsement = None
        if newest is not None:
            public = bytes(nacl.signing.SigningKey(seed).verify_key)
            endorsement = (
                nacl.signing.SigningKey(newest.seed)
                .sign(ENDORSE_CONTEXT + endorsement_body(key_id, public))
                .signature
            )
        if await st.store.add_sender_key(SenderKeyRow(key_id, seed, now, endorsement)):
            log.info("sender certificate key %d made", key_id)
    return await st.store.sender_keys()


def _retired(rows: list[SenderKeyRow], i: int, now_ms: int, overlap_ms: float) -> bool:
    """Whether key ``i`` has had a successor for longer than the overlap window."""
    return i + 1 < len(rows) and now_ms - rows[i + 1].created_ms >= overlap_ms


async def sender_keys(request: web.Request) -> web.Response:
    """``GET /v1/sender-keys``: the certificate keys clients pin, with their endorsements."""
    st = request.app[STATE_KEY]
    await st.authenticate(request, sha256_hex(b""))
    rows = await current_keys(st)
    now = st.clock.now_ms()
    overlap = st.config.sender_key_overlap_seconds * 1000
    # Every stored key is listed, so a client pinned long ago can follow the endorsements
    # key by key; those past their overlap are marked retired (they sign nothing any more).
    keys = [
        {
            "key_id": row.key_id,
            "public_key": b64e(_public(row)),
            "endorsement": None if row.endorsement is None else b64e(row.endorsement),
            "retired": _retired(rows, i, now, overlap),
        }
        for i, row in enumerate(rows)
    ]
    return web.json_response({"keys": keys})


async def issue_certificate(request: web.Request) -> web.Response:
    """``POST /v1/certificate``: a short-lived sender certificate for the calling device."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    if body.strip() not in (b"", b"{}"):
        raise BadRequest("the body must be empty or {}")
    identity_key = await st.store.identity_key(caller)
    if identity_key is None:
        raise NotFound("upload keys (PUT /v1/keys) first", code="no_identity_key")
    rows = await current_keys(st)
    key = rows[-1]
    now = st.clock.now_ms()
    expires = now + int(st.config.sender_cert_ttl_seconds * 1000)
    signed = certificate_body(caller.user, caller.device, identity_key, expires, key.key_id)
    cert = signed + nacl.signing.SigningKey(key.seed).sign(CERT_CONTEXT + signed).signature
    return web.json_response(
        {"certificate": b64e(cert), "expires_ms": expires, "key_id": key.key_id}
    )


async def set_access(request: web.Request) -> web.Response:
    """``PUT /v1/access``: store (or with null remove) the caller's delivery-token verifier."""
    st = request.app[STATE_KEY]
    body, caller = await st.read_signed_body(request)
    doc = json_body(body)
    if not isinstance(doc, dict) or "verifier" not in doc:
        raise BadRequest('body must be {"verifier": <b64 32 bytes> | null}')
    raw = doc["verifier"]
    verifier = None if raw is None else b64d(raw, "verifier", VERIFIER_LEN)
    await st.store.set_access_verifier(caller.user, verifier)
    return web.json_response({"set": verifier is not None})


def _refused() -> AuthError:
    return AuthError(
        "a recipient's delivery token is missing or not valid", code="delivery_token_refused"
    )


async def send_sealed(request: web.Request) -> web.Response:
    """``PUT /v1/messages/sealed``: store a message whose sender the relay does not know."""
    st = request.app[STATE_KEY]
    cfg = st.config
    if request.content_type != BINARY_SEND_TYPE:
        raise BadRequest(f"a sealed send is {BINARY_SEND_TYPE}")
    header = request.headers.get(DELIVERY_TOKEN_HEADER)
    if header is None:
        raise _refused()
    try:
        tokens = parse_token_header(header, cfg.max_recipient_users)
    except WireError as exc:
        raise BadRequest(exc.message) from exc
    with st.body_slots.hold(request.remote or "?"):
        body = await read_body(request, st.body_limits(cfg.max_request_bytes))
    env = decode_send(body, max_recipients=cfg.max_recipients, max_body=cfg.max_message_bytes)
    check_recipient_users(env, cfg.max_recipient_users)
    users = sorted({r.user for r in env.recipients})
    if set(tokens) != set(users):
        raise _refused()
    verifiers = await st.store.access_verifiers(users)
    if not all(verifier_matches(verifiers.get(u), tokens[u]) for u in users):
        raise _refused()
    now = st.clock.monotonic()
    for user in users:  # per token, before any work for the store
        await st.sealed_token_limit.take(token_verifier(tokens[user]).hex(), now)
    pseudonym = sealed_sender_name(hashlib.sha256(b"".join(verifiers[u] for u in users)).digest())
    sender = Address(pseudonym, SEALED_DEVICE_ID)
    st.require_node_ready()
    try:
        receipt = await st.store.submit_send(sender, env, st.clock.now_ms())
    except MismatchedDevices as exc:
        raise await charge_lookups(st, sender, exc) from None
    return web.json_response(
        receipt_json(receipt.message_id, receipt.recipients, receipt.stored_at)
    )
