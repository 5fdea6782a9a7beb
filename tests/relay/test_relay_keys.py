"""Prekey bundles: upload, count, hand out each one-time prekey once, rate limits."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from relay_testclient import Device, RelayClient, b64


def key33() -> str:
    return b64(b"\x05" + os.urandom(32))


def upload_doc(identity: str, otpk_ids: range, *, spk: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "identity_key": identity,
        "registration_id": 4242,
        "one_time_prekeys": [{"id": i, "public_key": key33()} for i in otpk_ids],
    }
    if spk:
        doc["signed_prekey"] = {"id": 1, "public_key": key33(), "signature": b64(os.urandom(64))}
    return doc


async def test_upload_count_and_identity_conflict(client: RelayClient) -> None:
    dev = await client.new_device()
    ident = key33()
    r = await client.request(
        dev, "PUT", "/v1/keys", json_body=upload_doc(ident, range(0), spk=False)
    )
    assert r.status == 400  # first upload needs a signed prekey
    r = await client.request(dev, "PUT", "/v1/keys", json_body=upload_doc(ident, range(100)))
    assert r.status == 200 and r.json() == {"count": 100}
    r = await client.request(
        dev, "PUT", "/v1/keys", json_body=upload_doc(ident, range(100, 150), spk=False)
    )
    assert r.json() == {"count": 150}
    assert (await client.request(dev, "GET", "/v1/keys/count")).json() == {"count": 150}
    r = await client.request(dev, "PUT", "/v1/keys", json_body=upload_doc(key33(), range(1)))
    assert r.status == 409 and r.json()["error"] == "identity_mismatch"
    too_many = upload_doc(ident, range(200, 301))
    r = await client.request(dev, "PUT", "/v1/keys", json_body=too_many)
    assert r.status == 400
    short = upload_doc(ident, range(1))
    short["signed_prekey"]["signature"] = b64(b"x" * 63)
    assert (await client.request(dev, "PUT", "/v1/keys", json_body=short)).status == 400


async def test_bundle_fetch_hands_out_then_runs_dry(client: RelayClient) -> None:
    bob = await client.new_device()
    bob2 = await client.add_device(bob, 2)
    ident = key33()
    await client.request(bob, "PUT", "/v1/keys", json_body=upload_doc(ident, range(2)))
    alice = await client.new_device()
    got = []
    for _ in range(3):
        r = await client.request(alice, "GET", f"/v1/keys/{bob.user}")
        assert r.status == 200
        devices = r.json()["devices"]
        assert [d["device_id"] for d in devices] == [1]  # bob2 uploaded nothing
        assert devices[0]["identity_key"] == ident and devices[0]["registration_id"] == 4242
        got.append(devices[0]["one_time_prekey"])
    assert [g["id"] for g in got[:2]] == [0, 1] and got[2] is None
    r = await client.request(alice, "GET", f"/v1/keys/{bob.user}/2")
    assert r.status == 404 and r.json()["error"] == "unknown_device"
    r = await client.request(alice, "GET", "/v1/keys/nobody_here_x")
    assert r.status == 404 and r.json()["error"] == "unknown_user"
    assert bob2.device == 2


async def test_concurrent_fetches_never_hand_out_a_key_twice(client: RelayClient) -> None:
    bob = await client.new_device()
    await client.request(bob, "PUT", "/v1/keys", json_body=upload_doc(key33(), range(30)))
    fetchers = [await client.new_device() for _ in range(10)]

    async def fetch(dev: Device) -> list[int | None]:
        ids = []
        for _ in range(5):
            r = await client.request(dev, "GET", f"/v1/keys/{bob.user}/1")
            assert r.status == 200
            otpk = r.json()["devices"][0]["one_time_prekey"]
            ids.append(None if otpk is None else otpk["id"])
        return ids

    results = await asyncio.gather(*(fetch(d) for d in fetchers))
    handed = [i for ids in results for i in ids if i is not None]
    assert sorted(handed) == list(range(30))  # each exactly once
    assert sum(i is None for ids in results for i in ids) == 20
    assert (await client.request(bob, "GET", "/v1/keys/count")).json() == {"count": 0}


async def test_fetch_rate_limited_per_requester_and_target(relay_factory, session) -> None:
    relay = relay_factory({"prekey_fetch_burst": "3", "prekey_fetch_rate": "0.01"})
    client = RelayClient(relay.url, session)
    bob = await client.new_device()
    carol = await client.new_device()
    for dev in (bob, carol):
        await client.request(dev, "PUT", "/v1/keys", json_body=upload_doc(key33(), range(10)))
    alice = await client.new_device()
    statuses = [
        (await client.request(alice, "GET", f"/v1/keys/{bob.user}")).status for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    r = await client.request(alice, "GET", f"/v1/keys/{bob.user}")
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"] == "rate_limited"
    # Another target, and another requester, are unaffected.
    assert (await client.request(alice, "GET", f"/v1/keys/{carol.user}")).status == 200
    dave = await client.new_device()
    assert (await client.request(dave, "GET", f"/v1/keys/{bob.user}")).status == 200
    # The pool was not drained by the refused requests.
    assert (await client.request(bob, "GET", "/v1/keys/count")).json() == {"count": 6}
