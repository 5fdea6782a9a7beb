"""Sealed sender end to end: real clients, a real relay process, its real SQLite files.

Contacts that wrote to each other exchange access keys inside their messages; from then on
their 1:1 and group messages reach the relay with no sender on them and no group id, and the
receiver takes the sender from the verified certificate, never from the relay.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay

from blindpost_wire.names import is_sealed_sender
from e2ee.client import Client, TransportLink
from e2ee.events import DecryptionProblem, MessageReceived
from e2ee.history import direct_chat_id, group_chat_id
from e2ee.store import Address
from e2ee.store.sealing import KdfLimits
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.frames import Delivery, QueueEmpty
from relay.integrity import DB_NAME

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
WAIT = 15.0

pytestmark = pytest.mark.timeout(180)


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def ready(client: Client) -> bool:
    """The client holds a certificate (its first key maintenance after connecting ran)."""
    return client._outbox.sealing.certificate() is not None


def knows(client: Client, user: str) -> bool:
    return client._outbox.sealing.peer_key(user) is not None


def queued_senders(relay: Relay) -> list[str]:
    """The sender column of every message the relay still holds (read-only, WAL-aware)."""
    conn = sqlite3.connect(f"file:{relay.data_dir / DB_NAME}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT sender FROM messages")]
    finally:
        conn.close()


def relay_bytes(relay: Relay) -> bytes:
    """Every byte of the relay's SQLite files (database, write-ahead log, replay guard)."""
    return b"".join(p.read_bytes() for p in sorted(relay.data_dir.glob("*.sqlite3*")))


async def received(events: AsyncIterator[Any], wait_for: WaitFor, text: str) -> Any:
    return await wait_for(
        events, lambda e: isinstance(e, MessageReceived) and e.message.text == text, WAIT
    )


async def test_sealed_chats_leave_no_sender_and_no_group_id_on_the_relay(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    a_events, b_events, c_events = alice.events(), bob.events(), carol.events()
    async with alice, bob, carol:
        for client in (alice, bob, carol):
            await until(lambda c=client: ready(c))
        # Contacts write to each other: each learns the other's access key.
        await alice.send_text("bob", "hi bob")
        await received(b_events, wait_for, "hi bob")
        await bob.send_text("alice", "hi alice")
        await received(a_events, wait_for, "hi alice")
        await carol.send_text("alice", "hi from carol")
        await received(a_events, wait_for, "hi from carol")
        gid = await alice.create_group("secret-club", ["bob", "carol"])
        await alice.send_text(group_chat_id(gid), "welcome")
        await received(b_events, wait_for, "welcome")
        await received(c_events, wait_for, "welcome")
        assert knows(alice, "bob") and knows(alice, "carol") and knows(bob, "alice")
    # Bob and carol are offline: what alice sends now waits on the relay.
    log_mark = len(relay.log_text())
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    async with alice:
        await alice.send_text("bob", "sealed direct")
        await alice.send_text(group_chat_id(gid), "sealed group")
    senders = queued_senders(relay)
    assert len(senders) == 2, senders  # the direct message and the group message
    assert all(is_sealed_sender(s, 0) for s in senders), senders
    # Nowhere in the relay's files: the group id. In its log since: alice's name only where
    # her own socket opens and closes (the relay sees who is online: docs/threat-model.md);
    # the sends themselves are "PUT /v1/messages/sealed" lines naming nobody.
    assert gid.encode() not in relay_bytes(relay)
    lines = relay.log_text()[log_mark:].splitlines()
    assert sum("/v1/messages/sealed" in line for line in lines) == 2
    naming = [line for line in lines if "alice" in line]
    assert all(" ws " in f" {line} " and "user=alice" in line for line in naming), naming

    # The recipients take the sender from the certificate.
    for name, texts in (("bob", ["sealed direct", "sealed group"]), ("carol", ["sealed group"])):
        again = await Client.open(tmp_path / name, options=fast_options)
        events = again.events()
        async with again:
            for text in texts:
                got = await received(events, wait_for, text)
                assert got.message.sender == "alice"
        await again.close()
    assert "sealed direct" in [
        m.text for m in (await _history(tmp_path / "bob", fast_options, direct_chat_id("alice")))
    ]
    assert gid.encode() not in relay_bytes(relay)


async def _history(folder: Path, options: Any, chat: str) -> list[Any]:
    client = await Client.open(folder, options=options)
    try:
        return list(client.history.messages(chat))
    finally:
        await client.close()


async def test_unsealed_and_sealed_senders_interoperate(
    make_client: MakeClient, wait_for: WaitFor, fast_options: Any
) -> None:
    """A client with sealed sender off (an older sender's version 1 envelopes) and one with it
    on read each other, in both directions."""
    import dataclasses

    old = await make_client("old", options=dataclasses.replace(fast_options, sealed_sender=False))
    new = await make_client("new")
    o_events, n_events = old.events(), new.events()
    async with old, new:
        await until(lambda: ready(new))
        await old.send_text("new", "from the old format")
        await received(n_events, wait_for, "from the old format")
        await new.send_text("old", "from the new one")
        await received(o_events, wait_for, "from the new one")
        await old.send_text("new", "and back")
        got = await received(n_events, wait_for, "and back")
        assert got.message.sender == "old"


class RelabellingLink(TransportLink):
    """What a hostile relay does: deliver every message as coming from ``eve``."""

    async def deliveries(self) -> AsyncIterator[Delivery | QueueEmpty]:
        async for item in super().deliveries():
            if isinstance(item, Delivery) and item.sender != "eve":
                item = Delivery(item.seq, item.id, "eve", 1, item.stored_at, item.body)
            yield item


async def test_a_setup_from_alice_delivered_as_eve_is_refused(
    make_client: MakeClient,
    wait_for: WaitFor,
    relay: Relay,
    signers: dict[Any, DeviceSigner],
    tmp_path: Path,
    fast_options: Any,
) -> None:
    def relabel(signer: DeviceSigner, url: str) -> TransportLink:
        signers[signer.user, signer.device] = signer
        return RelabellingLink(signer, url)

    alice = await make_client("alice")
    eve = await make_client("eve")
    bob = await Client.create(
        tmp_path / "bob",
        "bob",
        relay.url,
        kdf_limits=KdfLimits(opslimit=1, memlimit=8192),
        link_factory=relabel,
        options=fast_options,
    )
    await bob.register()
    b_events = bob.events()
    async with alice, eve, bob:
        await until(lambda: ready(alice))
        await alice.send_text("bob", "this is alice")
        problem = await wait_for(b_events, lambda e: isinstance(e, DecryptionProblem), WAIT)
        assert problem.error == "CertificateMismatch"
        # Nothing was recorded under eve's name: no identity, no message.
        assert bob._ctx.engine.identity(Address("eve", 1)) is None
        assert list(bob.history.messages(direct_chat_id("eve"))) == []
    await bob.close()


async def test_a_refused_token_falls_back_to_an_authenticated_send(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay
) -> None:
    """Bob replaces his access key: alice's sealed send is refused by the relay
    (DeliveryTokenRefused), she forgets the old key and the same message goes with her name;
    bob's next message gives her the new key and sealed sending resumes."""
    alice, bob = await make_client("alice"), await make_client("bob")
    a_events, b_events = alice.events(), bob.events()
    async with alice, bob:
        await until(lambda: ready(alice) and ready(bob))
        await alice.send_text("bob", "hello")
        await received(b_events, wait_for, "hello")
        await bob.send_text("alice", "hello back")
        await received(a_events, wait_for, "hello back")
        old = alice._outbox.sealing.peer_key("bob")
        await bob._outbox.sealing.rotate_access_key()
        mark = len(relay.log_text())
        await alice.send_text("bob", "after the rotation")
        await received(b_events, wait_for, "after the rotation")
        # The relay's log reaches the test through a pipe: wait for the line, under load too.
        await until(lambda: '"PUT /v1/messages/sealed HTTP/1.1" 401' in relay.log_text()[mark:])
        assert not knows(alice, "bob")
        await bob.send_text("alice", "my new key rides along")
        await received(a_events, wait_for, "my new key rides along")
        assert knows(alice, "bob") and alice._outbox.sealing.peer_key("bob") != old
        mark = len(relay.log_text())
        await alice.send_text("bob", "sealed again")
        await received(b_events, wait_for, "sealed again")
        await until(lambda: '"PUT /v1/messages/sealed HTTP/1.1" 200' in relay.log_text()[mark:])


async def test_unverifiable_sealed_messages_are_reported_without_a_sender(
    make_client: MakeClient, wait_for: WaitFor, relay: Relay
) -> None:
    """Anyone holding bob's token can put bytes in his mailbox without a name: a clear
    envelope, or a sealed one that does not open, is reported with no sender, and nothing is
    recorded under the relay's pseudonym (no chat, no repair sent to it)."""
    import aiohttp

    from blindpost_wire.sealed import DELIVERY_TOKEN_HEADER, token_header
    from e2ee import envelope
    from e2ee.core.sealed import delivery_token
    from e2ee.transport.frames import encode_send

    bob = await make_client("bob")
    b_events = bob.events()
    async with bob:
        await until(lambda: ready(bob) and bob._outbox.sealing.access_key() is not None)
        token = delivery_token(bob._outbox.sealing.access_key() or b"")
        clear = envelope.build_pairwise([envelope.Entry("bob", 1, "message", b"\x33junk")])
        bodies = [clear, b"\x02" + bytes(80)]
        async with aiohttp.ClientSession() as http:
            for body in bodies:
                frame = encode_send(os.urandom(16), [("bob", 1)], body)
                async with http.put(
                    relay.url + "/v1/messages/sealed",
                    data=frame,
                    headers={
                        "Content-Type": "application/vnd.blindpost.send",
                        DELIVERY_TOKEN_HEADER: token_header({"bob": token}),
                    },
                ) as resp:
                    assert resp.status == 200, await resp.text()
        for _ in bodies:
            problem = await wait_for(b_events, lambda e: isinstance(e, DecryptionProblem), WAIT)
            assert (problem.user, problem.device, problem.repair) == ("", 0, "none")
            assert problem.notice is None
        assert [c for c in bob.history.chats() if "~" in c.id] == []
