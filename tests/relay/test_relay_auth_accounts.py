"""Accounts, devices and signed-request authentication against a real relay process."""

from __future__ import annotations

import time

from relay_testclient import Device, RelayClient, new_username

from relay.auth import H_SIGNATURE


async def test_register_then_taken_username_is_409(client: RelayClient) -> None:
    dev = Device(new_username())
    r = await client.register(dev)
    assert r.status == 201
    assert r.json() == {"username": dev.user, "device_id": 1}
    other = Device(dev.user)
    r2 = await client.register(other)
    assert r2.status == 409
    assert r2.json()["error"] == "username_taken"


async def test_username_rules(client: RelayClient) -> None:
    for bad in ["ab", "Alice", "a" * 33, "al-ice", "count", "émile"]:
        dev = Device("validname_x")
        r = await client.request(
            dev,
            "POST",
            "/v1/accounts",
            json_body={"username": bad, "device_id": 1, "auth_key": dev.auth_key_b64},
        )
        assert r.status in (400, 401), (bad, r.status)
        if r.status == 400:
            assert r.json()["error"] == "invalid_username"


async def test_registration_requires_proof_of_key(client: RelayClient) -> None:
    dev = Device(new_username())
    impostor = Device(dev.user)  # signs with a different key than the one registered
    r = await client.request(
        impostor,
        "POST",
        "/v1/accounts",
        json_body={"username": dev.user, "device_id": 1, "auth_key": dev.auth_key_b64},
    )
    assert r.status == 401
    assert r.json()["error"] == "auth_invalid"


async def test_replayed_request_is_401(client: RelayClient) -> None:
    dev = await client.new_device()
    headers = client.sign(dev, "GET", "/v1/devices")
    async with client.session.get(client.base + "/v1/devices", headers=headers) as resp:
        assert resp.status == 200
    async with client.session.get(client.base + "/v1/devices", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "auth_replay"


async def test_stale_and_future_timestamps_are_401(client: RelayClient) -> None:
    dev = await client.new_device()
    now = time.time_ns() // 1_000_000
    for ts in (now - 61_000, now + 61_000):
        headers = client.sign(dev, "GET", "/v1/devices", timestamp_ms=ts)
        async with client.session.get(client.base + "/v1/devices", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "auth_stale"


async def test_signature_binds_path_body_and_method(client: RelayClient) -> None:
    dev = await client.new_device()
    # Signed for another path.
    headers = client.sign(dev, "GET", "/v1/keys/count")
    async with client.session.get(client.base + "/v1/devices", headers=headers) as resp:
        assert resp.status == 401
    # Signed for another body.
    headers = client.sign(dev, "POST", "/v1/messages/ack", b'{"ids": []}')
    async with client.session.post(
        client.base + "/v1/messages/ack", data=b'{"ids": ["x"]}', headers=headers
    ) as resp:
        assert resp.status == 401
    # Garbage signature and missing headers.
    headers = client.sign(dev, "GET", "/v1/devices")
    headers[H_SIGNATURE] = "A" * 86 + "=="
    async with client.session.get(client.base + "/v1/devices", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "auth_invalid"
    async with client.session.get(client.base + "/v1/devices") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "auth_missing"


async def test_unknown_device_is_401(client: RelayClient) -> None:
    ghost = Device(new_username())
    r = await client.request(ghost, "GET", "/v1/devices")
    assert r.status == 401


async def test_add_list_remove_devices(client: RelayClient) -> None:
    d1 = await client.new_device()
    d2 = await client.add_device(d1, 2)
    r = await client.request(
        d1, "POST", "/v1/devices", json_body={"device_id": 2, "auth_key": d2.auth_key_b64}
    )
    assert r.status == 409 and r.json()["error"] == "device_exists"
    r = await client.request(d2, "GET", "/v1/devices")
    assert r.status == 200
    assert [d["device_id"] for d in r.json()["devices"]] == [1, 2]
    # Device 2 can act; after removal by device 1 it cannot.
    assert (await client.request(d2, "GET", "/v1/keys/count")).status == 200
    r = await client.request(d1, "DELETE", "/v1/devices/2")
    assert r.status == 200 and r.json() == {"removed": True}
    assert (await client.request(d2, "GET", "/v1/keys/count")).status == 401
    r = await client.request(d1, "DELETE", "/v1/devices/2")
    assert r.status == 404 and r.json()["error"] == "unknown_device"
    r = await client.request(d1, "GET", "/v1/devices")
    assert [d["device_id"] for d in r.json()["devices"]] == [1]


async def test_bad_input_is_4xx_json_never_500(client: RelayClient) -> None:
    dev = await client.new_device()
    cases = [
        ("PUT", "/v1/messages", b"not json"),
        ("PUT", "/v1/messages", b"[]"),
        ("PUT", "/v1/messages", b'{"id": 5, "recipients": "x", "body": null}'),
        ("PUT", "/v1/keys", b'{"identity_key": "!!"}'),
        ("POST", "/v1/messages/ack", b'{"ids": "nope"}'),
        ("POST", "/v1/devices", b'{"device_id": 0, "auth_key": ""}'),
        ("DELETE", "/v1/devices/abc", b""),
        ("GET", "/v1/messages?after=-1", b""),
        ("GET", "/v1/keys/NOT_VALID", b""),
        ("GET", "/v1/blobs/xyz", b""),
    ]
    for method, target, body in cases:
        r = await client.request(dev, method, target, data=body or None)
        assert 400 <= r.status < 500, (method, target, r.status, r.body)
        assert "error" in r.json() and "message" in r.json()
    r = await client.request(None, "GET", "/nope")
    assert r.status == 404 and r.json()["error"] == "not_found"


async def test_unknown_route_404_and_wrong_method_405_are_json(client: RelayClient) -> None:
    r = await client.request(None, "GET", "/v2/anything")
    assert r.status == 404 and r.json()["error"] == "not_found"
    r = await client.request(None, "DELETE", "/healthz")
    assert r.status == 405 and r.json()["error"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]
