"""Abuse limits of issue 13 (part B), each performing the attack against a real relay process:
mailbox flood, prekey drain, user enumeration, disk use."""

from __future__ import annotations

import os

from relay_testclient import Device, RelayClient, Reply, b64, drain_until_empty, new_mid, next_frame
from test_relay_keys import key33, upload_doc

from relay.store.base import Envelope
from relay.wire import encode_send

SHARES = {
    "mailbox_max_messages": "20",
    "mailbox_sender_max_messages": "8",
    "mailbox_stranger_max_messages": "5",
}


async def test_mailbox_flood_stops_at_the_senders_share_and_alice_gets_through(
    relay_factory, session
) -> None:
    """One account floods bob's mailbox: it stops at its (stranger) share with 507
    sender_share_exceeded, over HTTP and WebSocket alike, nothing of the refused sends is
    stored, and alice's messages are still accepted and delivered to bob."""
    relay = relay_factory(SHARES)
    client = RelayClient(relay.url, session)
    flooder = await client.new_device("flood")
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    accepted = refused = 0
    for _ in range(50):
        r = await client.send_binary(flooder, [bob], b"spam")
        if r.status == 200:
            accepted += 1
        else:
            assert r.status == 507, r.body
            assert r.json()["error"] == "sender_share_exceeded"
            assert r.json()["full"] == [{"user": bob.user, "device": 1}]
            refused += 1
    assert (accepted, refused) == (5, 45)
    ws = await client.ws(flooder)
    await drain_until_empty(ws)
    mid = new_mid()
    await ws.send_bytes(encode_send(Envelope(mid, (bob.addr,), b"more spam")))
    res = await next_frame(ws)
    assert res["type"] == "send_result" and res["id"] == b64(mid)
    assert res["status"] == 507 and res["error"] == "sender_share_exceeded"
    await ws.close()

    hello = [new_mid() for _ in range(5)]
    for m in hello:
        assert (await client.send(alice, [bob], b"hello", m)).status == 200
    inbox = await client.ws(bob)
    got = await drain_until_empty(inbox)
    await inbox.close()
    assert [g.sender.user for g in got] == [flooder.user] * 5 + [alice.user] * 5
    assert [g.message_id for g in got][5:] == hello
    # Bob answers the flooder once: its share grows to the answered one (8), no further.
    assert (await client.send(bob, [flooder], b"stop it")).status == 200
    statuses = [(await client.send(flooder, [bob], b"spam")).status for _ in range(5)]
    assert statuses == [200, 200, 200, 507, 507]


async def test_adding_devices_fast_gets_429(relay_factory, session) -> None:
    relay = relay_factory({"device_add_rate": "0.001", "device_add_burst": "3"})
    client = RelayClient(relay.url, session)
    mallory = await client.new_device("mallory")
    for n in (2, 3, 4):
        await client.add_device(mallory, n)
    r = await client.request(
        mallory,
        "POST",
        "/v1/devices",
        json_body={"device_id": 5, "auth_key": Device(mallory.user, 5).auth_key_b64},
    )
    assert r.status == 429 and r.json()["error"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    listed = (await client.request(mallory, "GET", "/v1/devices")).json()["devices"]
    assert [d["device_id"] for d in listed] == [1, 2, 3, 4]


async def test_the_default_device_cap_is_16(relay_factory, session) -> None:
    relay = relay_factory()  # the harness loosens only the rate, not the cap
    client = RelayClient(relay.url, session)
    mallory = await client.new_device("mallory")
    for n in range(2, 17):
        await client.add_device(mallory, n)
    r = await client.request(
        mallory,
        "POST",
        "/v1/devices",
        json_body={"device_id": 17, "auth_key": Device(mallory.user, 17).auth_key_b64},
    )
    assert r.status == 409 and r.json()["error"] == "too_many_devices"


async def upload_keys(client: RelayClient, dev: Device, n: int) -> None:
    r = await client.request(dev, "PUT", "/v1/keys", json_body=upload_doc(key33(), range(n)))
    assert r.status == 200, r.body


async def prekey_count(client: RelayClient, dev: Device) -> int:
    count: int = (await client.request(dev, "GET", "/v1/keys/count")).json()["count"]
    return count


async def test_draining_a_prekey_pool_through_many_devices_is_stopped(
    relay_factory, session
) -> None:
    """Issue 13's attack: one account adds many devices and fetches bob's bundles from each.
    Its devices share one budget per target (then 429), and across accounts bob's pool gives
    out at most its one-time prekey budget: further bundles come without a one-time prekey,
    so the pool is not drained."""
    relay = relay_factory(
        {
            "prekey_fetch_rate": "0.001",
            "prekey_fetch_burst": "4",
            "prekey_target_rate": "0.001",
            "prekey_target_burst": "6",
        }
    )
    client = RelayClient(relay.url, session)
    bob = await client.new_device("bob")
    await upload_keys(client, bob, 50)
    mallory = await client.new_device("mallory")
    devices = [mallory] + [await client.add_device(mallory, n) for n in range(2, 9)]
    statuses = []
    for dev in devices:
        r = await client.request(dev, "GET", f"/v1/keys/{bob.user}")
        statuses.append(r.status)
    assert statuses == [200] * 4 + [429] * 4
    assert await prekey_count(client, bob) == 46
    # More accounts: bob's pool hands out 2 more one-time prekeys, then bundles without.
    handed = []
    for _ in range(4):
        helper = await client.new_device("sybil")
        r = await client.request(helper, "GET", f"/v1/keys/{bob.user}")
        assert r.status == 200
        (bundle,) = r.json()["devices"]
        assert bundle["signed_prekey"]["id"] == 1
        handed.append(bundle["one_time_prekey"] is not None)
    assert handed == [True, True, False, False]
    assert await prekey_count(client, bob) == 44


async def test_prekey_fetches_count_per_account_across_targets(relay_factory, session) -> None:
    relay = relay_factory({"prekey_fetch_account_rate": "0.001", "prekey_fetch_account_burst": "3"})
    client = RelayClient(relay.url, session)
    targets = [await client.new_device("t") for _ in range(4)]
    for t in targets:
        await upload_keys(client, t, 2)
    mallory = await client.new_device("mallory")
    mallory2 = await client.add_device(mallory, 2)
    got = [(await client.request(mallory, "GET", f"/v1/keys/{t.user}")).status for t in targets[:2]]
    got += [
        (await client.request(mallory2, "GET", f"/v1/keys/{t.user}")).status for t in targets[2:]
    ]
    assert got == [200, 200, 200, 429]


def rcpts(users: list[str]) -> list[dict[str, object]]:
    return [{"user": u, "device": 1} for u in users]


async def test_user_enumeration_is_budgeted_per_account(relay_factory, session) -> None:
    """Issue 13's attack: a send naming many usernames learns which exist and their device
    ids. Now a message names at most max_recipient_users users, one 409 names at most
    lookup_burst of them (truncated), and the account's lookup budget (409 users and key
    fetch misses together) then answers 429, over HTTP and WebSocket; another account's
    budget is its own."""
    relay = relay_factory(
        {"lookup_rate": "0.001", "lookup_burst": "10", "max_recipient_users": "30"}
    )
    client = RelayClient(relay.url, session)
    mallory = await client.new_device("mallory")
    known = [await client.new_device("k") for _ in range(3)]
    for k in known:
        await client.add_device(k, 2)
    names = sorted([k.user for k in known] + [f"nobody{i:03d}" for i in range(22)])

    async def send_to(dev: Device, users: list[str]) -> Reply:
        body = {"id": b64(new_mid()), "recipients": rcpts(users), "body": b64(b"x")}
        return await client.request(dev, "PUT", "/v1/messages", json_body=body)

    r = await send_to(mallory, names + [f"extra{i}" for i in range(6)])
    assert r.status == 400 and r.json()["error"] == "too_many_recipients"
    r = await send_to(mallory, names)
    assert r.status == 409, r.body
    doc = r.json()
    assert doc["truncated"] is True
    reported = set(doc["unknown_users"]) | set(doc["missing_devices"])
    assert len(reported) == 10 and reported == set(names[:10])
    r = await send_to(mallory, names)
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    r = await client.request(mallory, "GET", "/v1/keys/nobody_else")
    assert r.status == 429  # a key fetch miss spends the same budget
    ws = await client.ws(mallory)
    await drain_until_empty(ws)
    frame = encode_send(Envelope(new_mid(), (known[0].addr,), b"x"))  # device 2 is missing
    await ws.send_bytes(frame)
    res = await next_frame(ws)
    assert res["type"] == "send_result" and res["status"] == 429
    await ws.close()

    eve = await client.new_device("eve")
    r = await client.request(eve, "GET", "/v1/keys/nobody_else")
    assert r.status == 404 and r.json()["error"] == "unknown_user"
    r = await send_to(eve, [known[0].user])
    assert r.status == 409 and r.json()["missing_devices"] == {known[0].user: [2]}
    assert "truncated" not in r.json()


async def test_disk_quota_blob_deletion_and_upload_rate(relay_factory, session) -> None:
    """Issue 13's attack: one account stores blobs and messages to its own second device
    without bound. Now its stored bytes stop at account_max_bytes (507
    account_quota_exceeded, before the body is read), it can free them by deleting what it
    uploaded (only the uploader can), and its upload byte rate is bounded (429)."""
    relay = relay_factory(
        {
            "account_max_bytes": "10000",
            "max_blob_bytes": "6000",
            "upload_bytes_rate": "1",
            "upload_bytes_burst": "30000",
        }
    )
    client = RelayClient(relay.url, session)
    hog = await client.new_device("hog")
    hog2 = await client.add_device(hog, 2)
    other = await client.new_device("other")
    first = os.urandom(6000)
    r = await client.upload_blob(hog, first)
    assert r.status == 201, r.body
    blob_id = r.json()["id"]
    r = await client.upload_blob(hog, os.urandom(6000))
    assert r.status == 507 and r.json()["error"] == "account_quota_exceeded"
    statuses = [(await client.send(hog, [hog2], b"m" * 1000)).status for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 507]
    r = await client.upload_blob(hog, first)  # at its quota, it still refreshes what it holds
    assert r.status == 200 and r.json()["id"] == blob_id
    # Only an uploader can delete; for anyone else the blob does not exist.
    r = await client.request(other, "DELETE", f"/v1/blobs/{blob_id}")
    assert r.status == 404 and r.json()["error"] == "unknown_blob"
    r = await client.upload_blob(other, first)  # now other holds the same content too
    assert r.status == 200
    r = await client.request(hog, "DELETE", f"/v1/blobs/{blob_id}")
    assert r.status == 200 and r.json() == {"deleted": True}
    r = await client.request(other, "GET", f"/v1/blobs/{blob_id}")
    assert r.status == 200 and r.body == first  # other still holds it
    r = await client.request(hog, "DELETE", f"/v1/blobs/{blob_id}")
    assert r.status == 404
    r = await client.request(other, "DELETE", f"/v1/blobs/{blob_id}")
    assert r.status == 200
    r = await client.request(hog, "GET", f"/v1/blobs/{blob_id}")
    assert r.status == 404
    assert (await client.send(hog, [hog2], b"m" * 1000)).status == 200  # space freed
    # Other spent 6000 of its 30000-byte burst on `first`: four 5000-byte uploads fit.
    spent = 0
    for _ in range(10):
        r = await client.upload_blob(other, os.urandom(5000))
        if r.status == 429:
            break
        assert r.status == 201, r.body
        spent += 1
        await client.request(other, "DELETE", f"/v1/blobs/{r.json()['id']}")
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert spent == 4
