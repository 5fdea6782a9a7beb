"""Account recovery on a real relay process: the verifier, re-claiming a name, device reset.

A recovery request is signed with the recovery key's Ed25519 key (the relay keeps only its
public half), so the test client's ``Device`` with that key and the new device's id stands for
a client holding the recovery key.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nacl.signing import SigningKey
from relay_testclient import Device, RelayClient, b64

pytestmark = pytest.mark.timeout(120)


def _recovery_request(user: str, recovery: SigningKey, new: Device) -> tuple[Device, Any]:
    signer = Device(user, new.device, recovery)
    return signer, {"device_id": new.device, "auth_key": new.auth_key_b64}


async def _set_verifier(client: RelayClient, dev: Device, recovery: SigningKey) -> None:
    r = await client.request(
        dev, "PUT", "/v1/recovery", json_body={"verifier": b64(bytes(recovery.verify_key))}
    )
    assert r.status == 200 and r.json() == {"set": True}, r.body


async def test_recovery_key_replaces_every_device(relay_factory, session) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    alice2 = await client.add_device(alice, 2)
    bob = await client.new_device("bob")
    assert (await client.send(bob, [alice, alice2], b"for the old phone")).status == 200
    recovery = SigningKey.generate()
    await _set_verifier(client, alice, recovery)

    new = Device(alice.user, 1)  # a new key at the old device id
    signer, body = _recovery_request(alice.user, recovery, new)
    r = await client.request(signer, "POST", "/v1/recovery", json_body=body)
    assert r.status == 200 and r.json() == {"username": alice.user, "device_id": 1}, r.body

    # The old devices are logged out; the new one reads an empty mailbox.
    for old in (alice, alice2):
        r = await client.request(old, "GET", "/v1/devices")
        assert r.status == 401
    listed = (await client.request(new, "GET", "/v1/devices")).json()["devices"]
    assert [d["device_id"] for d in listed] == [1]
    assert (await client.read(new)).json()["messages"] == []
    # The name is still taken: nobody can register it again.
    assert (await client.register(Device(alice.user))).status == 409


async def test_wrong_key_is_refused_then_rate_limited(relay_factory, session) -> None:
    relay = relay_factory({"recovery_rate": "0.001", "recovery_burst": "3"})
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    await _set_verifier(client, alice, SigningKey.generate())
    new = Device(alice.user, 1)
    codes = []
    for _ in range(4):
        signer, body = _recovery_request(alice.user, SigningKey.generate(), new)
        r = await client.request(signer, "POST", "/v1/recovery", json_body=body)
        codes.append((r.status, r.json()["error"]))
        if r.status == 429:
            assert int(r.headers["Retry-After"]) >= 1
    assert codes == [(403, "recovery_refused")] * 3 + [(429, "rate_limited")]
    # Nothing changed: the old device still works.
    assert (await client.request(alice, "GET", "/v1/devices")).status == 200


async def test_per_address_limit_spans_usernames(relay_factory, session) -> None:
    relay = relay_factory({"recovery_address_rate": "0.001", "recovery_address_burst": "2"})
    client = RelayClient(relay.url, session)
    users = [await client.new_device("victim") for _ in range(3)]
    statuses = []
    for user in users:
        signer, body = _recovery_request(user.user, SigningKey.generate(), Device(user.user))
        statuses.append(
            (await client.request(signer, "POST", "/v1/recovery", json_body=body)).status
        )
    assert statuses == [403, 403, 429]


async def test_no_verifier_means_locked(relay_factory, session) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    for user in (alice.user, "nobody_here"):
        signer, body = _recovery_request(user, SigningKey.generate(), Device(user))
        r = await client.request(signer, "POST", "/v1/recovery", json_body=body)
        assert (r.status, r.json()["error"]) == (403, "recovery_refused")


async def test_a_captured_recovery_request_cannot_be_replayed(relay_factory, session) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    recovery = SigningKey.generate()
    await _set_verifier(client, alice, recovery)
    new = Device(alice.user, 1)
    signer, body = _recovery_request(alice.user, recovery, new)
    raw = json.dumps(body).encode()
    headers = client.sign(signer, "POST", "/v1/recovery", raw)
    first = await client.request(None, "POST", "/v1/recovery", data=raw, headers=headers)
    again = await client.request(None, "POST", "/v1/recovery", data=raw, headers=headers)
    assert first.status == 200
    assert (again.status, again.json()["error"]) == (401, "auth_replay")


async def test_device_reset_signed_by_an_existing_device(relay_factory, session) -> None:
    relay = relay_factory()
    client = RelayClient(relay.url, session)
    alice = await client.new_device("alice")
    restored = Device(alice.user, 2)
    body = {"device_id": 2, "auth_key": restored.auth_key_b64}
    for signer in (alice, restored):  # repeating it (cut off half-way) changes nothing more
        r = await client.request(signer, "POST", "/v1/devices/reset", json_body=body)
        assert r.status == 200 and r.json() == {"username": alice.user, "device_id": 2}, r.body
    assert (await client.request(alice, "GET", "/v1/devices")).status == 401
    listed = (await client.request(restored, "GET", "/v1/devices")).json()["devices"]
    assert [d["device_id"] for d in listed] == [2]
