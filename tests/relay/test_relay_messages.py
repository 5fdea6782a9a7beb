"""Store-and-forward over HTTP: idempotent sends, device-list checks, acks, storing once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay_harness import RelayProcess
from relay_testclient import RelayClient, b64, new_mid, unb64


def db_rows(relay: RelayProcess, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def test_send_read_ack_over_http(client: RelayClient) -> None:
    alice = await client.new_device("alice")
    bob = await client.new_device("bob")
    mids = [new_mid() for _ in range(3)]
    for i, mid in enumerate(mids):
        send = client.send if i % 2 == 0 else client.send_binary
        r = await send(alice, [bob], f"cipher-{i}".encode(), mid)
        assert r.status == 200, r.body
        assert r.json()["id"] == b64(mid) and r.json()["recipients"] == 1
    r = await client.read(bob)
    msgs = r.json()["messages"]
    assert [unb64(m["id"]) for m in msgs] == mids
    assert [unb64(m["body"]) for m in msgs] == [b"cipher-0", b"cipher-1", b"cipher-2"]
    seqs = [m["seq"] for m in msgs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert msgs[0]["sender"] == {"user": alice.user, "device": 1}
    # Reading removes nothing; acking does, idempotently.
    assert len((await client.read(bob)).json()["messages"]) == 3
    assert (await client.ack(bob, mids[:2])).json() == {"acked": 2}
    assert (await client.ack(bob, mids[:2])).json() == {"acked": 0}
    left = (await client.read(bob)).json()["messages"]
    assert [unb64(m["id"]) for m in left] == mids[2:]
    page = (await client.read(bob, after=left[0]["seq"])).json()
    assert page == {"messages": [], "more": False}


async def test_retry_is_stored_once_with_same_result(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    mid = new_mid()
    first = await client.send(alice, [bob], b"once", mid)
    again = await client.send(alice, [bob], b"once", mid)
    assert first.status == again.status == 200
    assert first.json() == again.json()
    assert len((await client.read(bob)).json()["messages"]) == 1
    # Another sender may not reuse the id.
    eve = await client.new_device()
    r = await client.send(eve, [bob], b"squat", mid)
    assert r.status == 409 and r.json()["error"] == "message_id_conflict"
    # Even after it is acknowledged, a retry inside the dedupe window is not stored again; the
    # relay then answers from a record that keeps the time only to within a bucket.
    await client.ack(bob, [mid])
    late = (await client.send(alice, [bob], b"once", mid)).json()
    assert (late["id"], late["recipients"]) == (first.json()["id"], first.json()["recipients"])
    assert late["stored_at"] <= first.json()["stored_at"]
    assert (await client.read(bob)).json()["messages"] == []


async def test_mismatched_devices_lists_everything_and_stores_nothing(
    client: RelayClient,
) -> None:
    alice = await client.new_device()
    bob1 = await client.new_device()
    bob2 = await client.add_device(bob1, 2)
    bob_ghost = type(bob1)(bob1.user, 9)
    carol = type(bob1)("carol_nobody_" + bob1.user[-6:])
    alice2 = await client.add_device(alice, 2)
    r = await client.send(alice, [bob1, bob_ghost, carol], b"x")
    assert r.status == 409
    body = r.json()
    assert body["error"] == "mismatched_devices"
    assert body["unknown_users"] == [carol.user]
    assert body["missing_devices"] == {bob1.user: [2]}
    assert body["stale_devices"] == {bob1.user: [9]}
    assert (await client.read(bob1)).json()["messages"] == []
    # Naming the sender's own user requires its other devices (not the sending one).
    r = await client.send(alice, [bob1, bob2, alice], b"x")
    assert r.status == 409 and r.json()["missing_devices"] == {alice.user: [2]}
    assert r.json()["stale_devices"] == {alice.user: [1]}
    r = await client.send(alice, [bob1, bob2, alice2], b"fan-out")
    assert r.status == 200 and r.json()["recipients"] == 3
    for dev in (bob1, bob2, alice2):
        assert [unb64(m["body"]) for m in (await client.read(dev)).json()["messages"]] == [
            b"fan-out"
        ]


async def test_group_body_stored_once_and_deleted_after_last_ack(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    sender = await client.new_device()
    recipients = [await client.new_device() for _ in range(5)]
    mid = new_mid()
    r = await client.send(sender, recipients, b"G" * 1000, mid)
    assert r.status == 200 and r.json()["recipients"] == 5
    rows = db_rows(shared_relay, "SELECT length(body) FROM messages WHERE msg_id=?", mid)
    assert rows == [(1000,)]
    assert db_rows(
        shared_relay,
        "SELECT count(*) FROM mailbox mb JOIN messages m ON m.pk = mb.msg_pk WHERE m.msg_id=?",
        mid,
    ) == [(5,)]
    for i, dev in enumerate(recipients):
        assert (await client.ack(dev, [mid])).json() == {"acked": 1}
        left = db_rows(shared_relay, "SELECT length(body) FROM messages WHERE msg_id=?", mid)
        assert left == ([] if i == 4 else [(1000,)])  # after the last ack: no row at all


async def test_acking_another_devices_message_changes_nothing(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    eve = await client.new_device()
    mid = new_mid()
    await client.send(alice, [bob], b"for bob", mid)
    assert (await client.ack(eve, [mid])).json() == {"acked": 0}
    assert (await client.ack(alice, [mid])).json() == {"acked": 0}
    assert len((await client.read(bob)).json()["messages"]) == 1


async def test_removing_a_device_deletes_its_mailbox(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    alice = await client.new_device()
    bob1 = await client.new_device()
    bob2 = await client.add_device(bob1, 2)
    mid = new_mid()
    assert (await client.send(alice, [bob1, bob2], b"x", mid)).status == 200
    assert (await client.request(bob1, "DELETE", "/v1/devices/2")).status == 200
    assert db_rows(
        shared_relay,
        "SELECT count(*) FROM mailbox mb JOIN messages m ON m.pk = mb.msg_pk WHERE m.msg_id=?",
        mid,
    ) == [(1,)]
    # bob now has one device: a send must name exactly it.
    r = await client.send(alice, [bob1, bob2], b"y")
    assert r.status == 409 and r.json()["stale_devices"] == {bob1.user: [2]}


async def test_logs_never_contain_bodies(client: RelayClient, shared_relay: RelayProcess) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    marker = b"PLAINTEXT-MARKER-7f3a"
    await client.send(alice, [bob], marker)
    await client.read(bob)
    text = shared_relay.log_text()
    assert marker.decode() not in text
    assert b64(marker) not in text
    assert alice.auth_key_b64 not in text


def test_db_path_is_in_data_dir(shared_relay: RelayProcess) -> None:
    assert Path(shared_relay.data_dir / "relay.sqlite3").exists()


async def test_thousand_recipient_group_message(client: RelayClient) -> None:
    import asyncio
    import time

    sender = await client.new_device("grp")
    # 62 users with 16 devices (the default cap) and one with 8: 1000 devices.
    owners = [await client.new_device("grp") for _ in range(63)]
    devices = []
    for n, owner in enumerate(owners):
        devices.append(owner)
        last = 17 if n < 62 else 9
        devices += await asyncio.gather(*(client.add_device(owner, d) for d in range(2, last)))
    assert len(devices) == 1000
    timings = []
    for _i in range(3):
        mid = new_mid()
        started = time.perf_counter()
        r = await client.send_binary(sender, devices, b"g" * 200, mid)
        timings.append(time.perf_counter() - started)
        assert r.status == 200 and r.json()["recipients"] == 1000, r.body
    # The target is 50 ms on an idle 2-core machine; allow for a shared, busy test machine.
    print("group send timings", timings)
    assert min(timings) < 0.5, timings
    last = devices[-1]
    assert len((await client.read(last)).json()["messages"]) == 3


async def test_http_paging_covers_everything_once(client: RelayClient) -> None:
    alice = await client.new_device()
    bob = await client.new_device()
    mids = [new_mid() for _ in range(7)]
    for mid in mids:
        r = await client.send_binary(alice, [bob], b"p" * 250_000, mid)  # pages are byte-bounded
        assert r.status == 200
    seen: list[bytes] = []
    after = 0
    for _ in range(20):
        page = (await client.read(bob, after=after, limit=10)).json()
        assert len(page["messages"]) <= 4
        seen += [unb64(m["id"]) for m in page["messages"]]
        if not page["more"]:
            break
        after = page["messages"][-1]["seq"]
    assert seen == mids
