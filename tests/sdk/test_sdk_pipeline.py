"""The outbox pipelines 1:1 sends (several unanswered on the socket, each naming the one
before it, SEND_AFTER) and keeps every recipient's mailbox in sending order, each message
once, when the relay refuses one in the middle: a device list that changed, a relay that
dies with sends in flight. (A send budget met in the middle: test_sdk_send_budget.py.)
Real clients, a real relay process; what the relay holds is read from it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay

from e2ee.client import Client, ClientOptions
from e2ee.errors import UsageError
from e2ee.events import MessageReceived
from e2ee.history import direct_chat_id
from e2ee.store import Changes
from e2ee.transport.errors import MismatchedDevices, PredecessorMissing
from e2ee.transport.frames import Delivery

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
Mailbox = Callable[..., Awaitable[list[Delivery]]]
WAIT = 30.0


class Answers:
    """Records the relay's answer to every send of a client (wrapping its link's ``send``)."""

    def __init__(self, client: Client) -> None:
        self.refused: list[tuple[bytes, type[BaseException]]] = []
        self.after: list[bytes | None] = []
        link = client._link
        send = link.send

        async def recording(
            mid: bytes, recipients: Sequence[tuple[str, int]], body: bytes, **kw: Any
        ) -> None:
            self.after.append(kw.get("after"))
            try:
                await send(mid, recipients, body, **kw)
            except Exception as exc:
                self.refused.append((mid, type(exc)))
                raise

        link.send = recording  # type: ignore[method-assign]


async def queue(client: Client, targets: Sequence[str]) -> list[str]:
    """Compose one message per target without sending (the client is not started), in order."""
    return [await client.send_text(to, f"m{i:03d}", wait=False) for i, to in enumerate(targets)]


def in_order(held: list[Delivery], sent: list[str]) -> list[str]:
    """The ids of ``sent`` in the order a mailbox holds them (others left out)."""
    wanted = set(sent)
    return [d.id.hex() for d in held if d.id.hex() in wanted]


async def test_a_send_refused_in_the_middle_of_the_pipeline_is_not_overtaken(
    make_client: MakeClient,
    wait_for: WaitFor,
    mailbox: Mailbox,
    relay: Relay,
    signers: Any,
    tmp_path: Path,
    fast_options: ClientOptions,
) -> None:
    """Carol adds a device while Alice's messages to Bob and Carol wait in her outbox. The
    first ones (to Bob) are accepted; the first to Carol is refused (mismatched devices)
    with the later ones already on the socket behind it; those are refused too
    (predecessor missing). Every device's mailbox then holds its messages once, in sending
    order, and every device shows them so."""
    from sdk_relay import http_as

    alice, bob, carol = (
        await make_client("alice"),
        await make_client("bob"),
        await make_client("carol"),
    )
    async with alice, bob, carol:
        await alice.send_text("bob", "hello")  # sessions exist: the sends are pipelined
        await alice.send_text("carol", "hello")
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    try:
        targets = ["bob"] * 5 + ["bob" if i % 2 else "carol" for i in range(45)]
        sent = await queue(alice, targets)
        carol2 = await make_client("carol", register=False, directory="carol2", device_id=2)
        async with http_as(relay, signers["carol", 1]) as http:
            await http.add_device(2, signers["carol", 2].public_key)
        await asyncio.to_thread(
            carol2._store.commit, Changes(meta_put={"sdk.account_created": "1"})
        )
        await carol2.register()
        answers = Answers(alice)
        async with alice:
            assert await alice.flush(WAIT) == 0
            history = alice.history.messages(direct_chat_id("carol"), limit=100)
            assert [m.status for m in history[1:]] == ["sent"] * targets.count("carol")
        refused = {mid.hex(): kind for mid, kind in answers.refused}
        assert refused[sent[5]] is MismatchedDevices  # the first send to carol
        assert all(m not in refused for m in sent[:5])  # the ones before it: accepted
        assert refused[sent[6]] is PredecessorMissing  # in flight behind it
        for user, device in (("bob", 1), ("carol", 1), ("carol", 2)):
            mine = [m for m, to in zip(sent, targets, strict=True) if to == user]
            assert in_order(await mailbox(user, device), mine) == mine
        events = carol2.events()
        async with carol2:
            got = [
                (await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)).message
                for _ in range(targets.count("carol"))
            ]
        assert [m.id for m in got] == [
            m for m, to in zip(sent, targets, strict=True) if to == "carol"
        ]
    finally:
        await alice.close()


async def test_a_relay_that_dies_with_sends_in_flight_loses_and_duplicates_nothing(
    make_client: MakeClient,
    wait_for: WaitFor,
    mailbox: Mailbox,
    relay: Relay,
    tmp_path: Path,
    fast_options: ClientOptions,
) -> None:
    """The relay is killed while a pipeline of Alice's messages is on the socket: some were
    stored, some not, the answers of both lost. Sent again under the same ids after the
    restart, Bob's mailbox holds each once, in order, and Bob shows them so."""
    alice, bob = await make_client("alice"), await make_client("bob")
    async with alice, bob:
        await alice.send_text("bob", "hello")
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    try:
        sent = list(
            await asyncio.gather(
                *(alice.send_text("bob", f"m{i:04d}", wait=False) for i in range(900))
            )
        )
        # The relay dies as the 300th send leaves, with the pipeline running: that send and
        # the ones in flight before it get no answer, whether the relay stored them or not.
        killed = asyncio.Event()
        link, send = alice._link, alice._link.send
        issued: list[bytes] = []

        async def killing(
            mid: bytes, recipients: Sequence[tuple[str, int]], body: bytes, **kw: Any
        ) -> None:
            issued.append(mid)
            if len(issued) == 300:
                relay.proc.kill()
                killed.set()
            await send(mid, recipients, body, **kw)

        link.send = killing  # type: ignore[method-assign]
        async with alice:
            await asyncio.wait_for(killed.wait(), WAIT)
            await asyncio.to_thread(relay.restart, crash=True)
            assert await alice.flush(WAIT) == 0
        # At least the 300th went twice: unanswered before the kill, sent again after it.
        assert issued.count(issued[299]) >= 2
        assert in_order(await mailbox("bob"), sent) == sent
        bob = await Client.open(tmp_path / "bob", options=fast_options)
        events = bob.events()
        async with bob:
            got = [
                (await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)).message
                for _ in sent
            ]
        assert [m.id for m in got] == sent
        assert [m.text for m in got] == [f"m{i:04d}" for i in range(900)]
    finally:
        await alice.close()


@pytest.mark.parametrize("pipeline", [1, 4])
async def test_send_pipeline_sends_each_after_the_one_before(
    make_client: MakeClient, wait_for: WaitFor, fast_options: ClientOptions, pipeline: int
) -> None:
    """``ClientOptions.send_pipeline`` bounds the sends in flight; 1 sends each after the
    answer to the previous one (no SEND_AFTER needed), more names the previous one."""
    options = dataclasses.replace(fast_options, send_pipeline=pipeline)
    alice, bob = await make_client("alice", options=options), await make_client("bob")
    events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", "hello")
        await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
        answers = Answers(alice)
        sent = await asyncio.gather(*(alice.send_text("bob", f"m{i}") for i in range(40)))
        got = [
            (await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)).message.id
            for _ in sent
        ]
    assert got == list(sent)
    named = [a for a in answers.after if a is not None]
    assert (not named) if pipeline == 1 else named
    with pytest.raises(UsageError):
        ClientOptions(send_pipeline=0)
