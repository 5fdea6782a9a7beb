"""Device-link provisioning slots on a real relay process (docs/relay-api.md, "Provisioning").

The new device opens a slot unauthenticated and polls it with its token; a registered device
reads the slot's auth key and puts an (opaque) grant in it once; the grant is handed out once.
Every limit is the configured one: per-address rates, the size of a grant, the number of live
slots, the lifetime.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from relay_testclient import Device, RelayClient, b64, unb64

pytestmark = pytest.mark.timeout(120)


async def _open(client: RelayClient, auth_key: bytes = b"k" * 32) -> Any:
    r = await client.request(
        None, "POST", "/v1/provisioning", json_body={"auth_key": b64(auth_key)}
    )
    assert r.status == 201, r.body
    return r.json()


async def _take(client: RelayClient, slot: Any, token: str | None = None) -> Any:
    return await client.request(
        None,
        "POST",
        f"/v1/provisioning/{slot['id']}/take",
        json_body={"token": token or slot["token"]},
    )


async def test_grant_goes_from_approver_to_new_device_once(client: RelayClient) -> None:
    alice = await client.new_device("prov")
    slot = await _open(client, b"n" * 32)
    assert len(unb64(slot["token"])) == 32 and len(slot["id"]) == 32
    assert slot["expires_at"] > time.time() * 1000

    r = await _take(client, slot)
    assert r.status == 200 and r.json() == {"grant": None}
    r = await client.request(alice, "GET", f"/v1/provisioning/{slot['id']}")
    assert r.status == 200 and unb64(r.json()["auth_key"]) == b"n" * 32
    assert r.json()["filled"] is False

    path = f"/v1/provisioning/{slot['id']}"
    r = await client.request(alice, "PUT", path, json_body={"grant": b64(b"sealed grant")})
    assert r.status == 200 and r.json() == {"stored": True}
    r = await client.request(alice, "PUT", path, json_body={"grant": b64(b"another")})
    assert r.status == 409 and r.json()["error"] == "provisioning_filled"

    wrong = await _take(client, slot, b64(b"w" * 32))
    assert wrong.status == 404 and wrong.json()["error"] == "unknown_provisioning"
    r = await _take(client, slot)
    assert r.status == 200 and unb64(r.json()["grant"]) == b"sealed grant"
    # Handed out once: the slot is gone for everyone.
    assert (await _take(client, slot)).status == 404
    assert (await client.request(alice, "GET", path)).status == 404


async def test_reading_and_filling_need_a_registered_device(client: RelayClient) -> None:
    slot = await _open(client)
    path = f"/v1/provisioning/{slot['id']}"
    stranger = Device("nobody_here")
    assert (await client.request(None, "GET", path)).status == 401
    assert (await client.request(stranger, "GET", path)).status == 401
    r = await client.request(stranger, "PUT", path, json_body={"grant": b64(b"x")})
    assert r.status == 401
    assert (await _take(client, slot)).json() == {"grant": None}


async def test_bad_input_is_a_4xx(client: RelayClient) -> None:
    alice = await client.new_device("prov")
    for body in ({}, {"auth_key": b64(b"short")}, {"auth_key": 7}):
        r = await client.request(None, "POST", "/v1/provisioning", json_body=body)
        assert r.status == 400, body
    r = await client.request(None, "POST", "/v1/provisioning", data=b"x" * 5000)
    assert r.status == 413
    assert (await client.request(alice, "GET", "/v1/provisioning/NOTHEX")).status == 400
    missing = "0" * 32
    assert (await client.request(alice, "GET", f"/v1/provisioning/{missing}")).status == 404
    r = await client.request(
        alice, "PUT", f"/v1/provisioning/{missing}", json_body={"grant": "AA=="}
    )
    assert r.status == 404
    slot = await _open(client)
    r = await _take(client, slot, "not base64!")
    assert r.status == 400


async def test_limits_are_the_configured_ones(relay_factory: Any, session: Any) -> None:
    relay = relay_factory(
        {
            "provisioning_max_grant_bytes": "100",
            "provisioning_max_live": "2",
            "provisioning_rate": "0.001",
            "provisioning_burst": "3",
            "provisioning_poll_rate": "0.001",
            "provisioning_poll_burst": "2",
        }
    )
    client = RelayClient(relay.url, session)
    alice = await client.new_device("prov")
    first = await _open(client)
    path = f"/v1/provisioning/{first['id']}"
    r = await client.request(alice, "PUT", path, json_body={"grant": b64(b"g" * 101)})
    assert r.status == 413
    r = await client.request(alice, "PUT", path, json_body={"grant": b64(b"g" * 100)})
    assert r.status == 200
    await _open(client)
    # Two live slots: the third is refused, and nothing was stored for it.
    r = await client.request(
        None, "POST", "/v1/provisioning", json_body={"auth_key": b64(b"k" * 32)}
    )
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
    # The per-address rate: the burst of 3 is spent.
    r = await client.request(
        None, "POST", "/v1/provisioning", json_body={"auth_key": b64(b"k" * 32)}
    )
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert (await _take(client, first)).status == 200
    assert (await _take(client, first)).status == 404
    assert (await _take(client, first)).status == 429


async def test_a_slot_expires_with_its_grant(relay_factory: Any, session: Any) -> None:
    relay = relay_factory({"provisioning_ttl_seconds": "1"})
    client = RelayClient(relay.url, session)
    alice = await client.new_device("prov")
    slot = await _open(client)
    path = f"/v1/provisioning/{slot['id']}"
    r = await client.request(alice, "PUT", path, json_body={"grant": b64(b"g")})
    assert r.status == 200
    deadline = time.monotonic() + 30
    # Read (not taken: taking would hand the grant out) until the relay's clock passed.
    while (await client.request(alice, "GET", path)).status != 404:
        assert time.monotonic() < deadline, "the slot outlived its lifetime"
        await asyncio.sleep(0.2)
    assert time.time() * 1000 >= slot["expires_at"] - 50
    assert (await _take(client, slot)).status == 404
