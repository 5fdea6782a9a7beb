"""Sealed sender on a real relay process: certificate keys and certificates, access
verifiers, and sealed sends accepted only with a valid delivery token per recipient."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from relay_testclient import Device, RelayClient, b64, new_mid, unb64

from blindpost_wire.names import is_sealed_sender
from blindpost_wire.sealed import DELIVERY_TOKEN_HEADER, token_header, token_verifier
from e2ee.core.sealed import RelayKey, RelayKeyPins, delivery_token, verify_certificate
from relay.store.base import Envelope
from relay.wire import encode_send

pytestmark = pytest.mark.timeout(120)

SEND_TYPE = "application/vnd.blindpost.send"


def identity() -> bytes:
    return b"\x05" + os.urandom(32)


async def upload_identity(client: RelayClient, dev: Device, ident: bytes) -> None:
    doc = {
        "identity_key": b64(ident),
        "registration_id": 7,
        "signed_prekey": {"id": 1, "public_key": b64(identity()), "signature": b64(os.urandom(64))},
        "one_time_prekeys": [],
    }
    r = await client.request(dev, "PUT", "/v1/keys", json_body=doc)
    assert r.status == 200, r.body


async def pins_of(client: RelayClient, dev: Device) -> RelayKeyPins:
    r = await client.request(dev, "GET", "/v1/sender-keys")
    assert r.status == 200, r.body
    keys = [
        RelayKey(
            k["key_id"],
            unb64(k["public_key"]),
            None if k["endorsement"] is None else unb64(k["endorsement"]),
        )
        for k in r.json()["keys"]
    ]
    return RelayKeyPins().require(keys)


async def set_token(client: RelayClient, dev: Device) -> bytes:
    token = delivery_token(os.urandom(32))
    r = await client.request(
        dev, "PUT", "/v1/access", json_body={"verifier": b64(token_verifier(token))}
    )
    assert r.status == 200 and r.json() == {"set": True}, r.body
    return token


async def send_sealed(
    client: RelayClient, recipients: list[Device], tokens: dict[str, bytes] | None, body: bytes
) -> tuple[int, dict[str, object], bytes]:
    mid = new_mid()
    frame = encode_send(Envelope(mid, tuple(r.addr for r in recipients), body))
    headers = {} if tokens is None else {DELIVERY_TOKEN_HEADER: token_header(tokens)}
    r = await client.request(
        None, "PUT", "/v1/messages/sealed", data=frame, content_type=SEND_TYPE, headers=headers
    )
    return r.status, r.json(), mid


async def test_certificate_names_the_caller_under_a_pinned_key(client: RelayClient) -> None:
    alice = await client.new_device("alice")
    r = await client.request(alice, "POST", "/v1/certificate")
    assert r.status == 404 and r.json()["error"] == "no_identity_key"
    ident = identity()
    await upload_identity(client, alice, ident)
    r = await client.request(alice, "POST", "/v1/certificate")
    assert r.status == 200, r.body
    doc = r.json()
    now = time.time_ns() // 1_000_000
    cert = verify_certificate(unb64(doc["certificate"]), await pins_of(client, alice), now)
    assert (cert.user, cert.device, cert.identity_key) == (alice.user, 1, ident)
    assert cert.expires_ms == doc["expires_ms"] and doc["expires_ms"] > now + 3600_000
    # Unauthenticated callers get nothing.
    assert (await client.request(None, "POST", "/v1/certificate")).status == 401
    assert (await client.request(None, "GET", "/v1/sender-keys")).status == 401


async def test_sealed_send_needs_a_valid_token_per_recipient(client: RelayClient) -> None:
    bob = await client.new_device("bob")
    carol = await client.new_device("carol")
    stranger_target = await client.new_device("dave")  # never set a verifier
    bob_token = await set_token(client, bob)
    carol_token = await set_token(client, carol)

    status, doc, mid = await send_sealed(client, [bob], {bob.user: bob_token}, b"sealed hello")
    assert status == 200 and doc["recipients"] == 1, doc
    (msg,) = (await client.read(bob)).json()["messages"]
    assert unb64(msg["id"]) == mid and unb64(msg["body"]) == b"sealed hello"
    # The relay does not know the sender: the mailbox names a pseudonym, device 0.
    assert is_sealed_sender(msg["sender"]["user"], msg["sender"]["device"])

    refusals = [
        ([bob], None),  # no tokens at all
        ([bob], {bob.user: bytes(16)}),  # a wrong token
        ([bob], {bob.user: carol_token}),  # another user's token
        ([bob, carol], {bob.user: bob_token}),  # one recipient without its token
        ([stranger_target], {stranger_target.user: bob_token}),  # accepts no sealed mail
    ]
    for recipients, tokens in refusals:
        status, doc, _ = await send_sealed(client, recipients, tokens, b"x")
        assert (status, doc["error"]) == (401, "delivery_token_refused"), (recipients, doc)
    assert len((await client.read(bob)).json()["messages"]) == 1  # nothing more stored

    # A group-like send to two users with both tokens goes through.
    status, doc, _ = await send_sealed(
        client, [bob, carol], {bob.user: bob_token, carol.user: carol_token}, b"both"
    )
    assert status == 200 and doc["recipients"] == 2
    # Rotating the verifier retires the old token at once.
    await set_token(client, bob)
    status, doc, _ = await send_sealed(client, [bob], {bob.user: bob_token}, b"old")
    assert status == 401
    # Removing it refuses every sealed message (strangers and contacts alike).
    r = await client.request(bob, "PUT", "/v1/access", json_body={"verifier": None})
    assert r.json() == {"set": False}


async def test_sealed_device_list_is_checked_like_any_send(client: RelayClient) -> None:
    bob = await client.new_device("bob")
    bob2 = await client.add_device(bob, 2)
    token = await set_token(client, bob)
    status, doc, _ = await send_sealed(client, [bob], {bob.user: token}, b"x")
    assert status == 409 and doc["missing_devices"] == {bob.user: [2]}
    status, doc, _ = await send_sealed(client, [bob, bob2], {bob.user: token}, b"x")
    assert status == 200 and doc["recipients"] == 2


async def test_sealed_sends_are_rate_limited_per_token(relay_factory, session) -> None:
    relay = relay_factory({"sealed_token_rate": "0.001", "sealed_token_burst": "3"})
    client = RelayClient(relay.url, session)
    bob = await client.new_device("bob")
    carol = await client.new_device("carol")
    bob_token = await set_token(client, bob)
    carol_token = await set_token(client, carol)
    statuses = [
        (await send_sealed(client, [bob], {bob.user: bob_token}, b"x"))[0] for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    # Another recipient's token has its own bucket.
    assert (await send_sealed(client, [carol], {carol.user: carol_token}, b"x"))[0] == 200


async def test_certificate_key_rotates_with_an_endorsement(relay_factory, session) -> None:
    relay = relay_factory(
        {
            "sender_cert_ttl_seconds": "1",
            "sender_key_overlap_seconds": "1",
            "sender_key_rotation_seconds": "2",
        }
    )
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    await upload_identity(client, alice, identity())
    first = await pins_of(client, alice)
    assert list(first.keys) == [1]
    deadline = time.monotonic() + 30
    while True:  # the key is due after 2 s; a certificate request rotates it
        r = await client.request(alice, "POST", "/v1/certificate")
        if r.json()["key_id"] > 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert r.json()["key_id"] == 2
    r = await client.request(alice, "GET", "/v1/sender-keys")
    keys = [
        RelayKey(
            k["key_id"],
            unb64(k["public_key"]),
            unb64(k["endorsement"]) if k["endorsement"] else None,
        )
        for k in r.json()["keys"]
    ]
    pinned = first.require(keys)  # key 2 is endorsed by the pinned key 1
    cert = unb64((await client.request(alice, "POST", "/v1/certificate")).json()["certificate"])
    assert verify_certificate(cert, pinned, 0).key_id == 2


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"sender_cert_ttl_seconds": 0}, "sender_cert_ttl_seconds must be positive"),
        (
            {"sender_cert_ttl_seconds": 100, "sender_key_overlap_seconds": 50},
            "at least sender_cert_ttl_seconds",
        ),
        (
            {
                "sender_cert_ttl_seconds": 5,
                "sender_key_overlap_seconds": 10,
                "sender_key_rotation_seconds": 10,
            },
            "must exceed sender_key_overlap_seconds",
        ),
    ],
)
def test_certificate_timing_settings_are_checked(changes: dict[str, float], expect: str) -> None:
    from relay.config import ConfigError, RelayConfig

    with pytest.raises(ConfigError, match=expect):
        RelayConfig(**changes)  # type: ignore[arg-type]


async def test_sealed_sender_responses_match_the_openapi_document(client: RelayClient) -> None:
    from test_relay_openapi import check

    bob = await client.new_device("bob")
    check(await client.request(bob, "POST", "/v1/certificate"), "/v1/certificate", "post")  # 404
    await upload_identity(client, bob, identity())
    check(await client.request(bob, "POST", "/v1/certificate"), "/v1/certificate", "post")
    check(await client.request(bob, "GET", "/v1/sender-keys"), "/v1/sender-keys", "get")
    token = delivery_token(os.urandom(32))
    verifier = {"verifier": b64(token_verifier(token))}
    check(await client.request(bob, "PUT", "/v1/access", json_body=verifier), "/v1/access", "put")
    for tokens in ({bob.user: token}, {bob.user: bytes(16)}):
        frame = encode_send(Envelope(new_mid(), (bob.addr,), b"x"))
        r = await client.request(
            None,
            "PUT",
            "/v1/messages/sealed",
            data=frame,
            content_type=SEND_TYPE,
            headers={DELIVERY_TOKEN_HEADER: token_header(tokens)},
        )
        check(r, "/v1/messages/sealed", "put")
