"""Linked devices through the SDK: a grant from an existing device sets up a new one.

Real relay process, real clients, real SQLite files. What a user relies on: the new
device shares the identity (safety numbers unchanged) but signs with its own key,
both devices receive what a contact sends, the devices list shows both, and a removed
device reads nothing sent afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay

from e2ee.client import Client, LinkCode, LinkGrant, NewDeviceKeys, PendingLink, TransportLink
from e2ee.client.devices import seal_grant
from e2ee.client_errors import AuthFailed, NotFound
from e2ee.errors import InvalidLinkCode, InvalidLinkGrant, LinkNotApproved
from e2ee.events import MessageReceived
from e2ee.store.sealing import KdfLimits
from e2ee.transport.auth import DeviceSigner

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]
FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
WAIT = 15.0


async def _link(alice: Client, folder: Path, options: Any, name: str = "laptop") -> Client:
    keys = NewDeviceKeys.generate()
    grant = await alice.devices.add(keys.auth_key, name=name)
    # The grant travels as bytes (encrypted, in the provisioning channel).
    grant = LinkGrant.from_bytes(grant.to_bytes())
    return await Client.link_device(folder, grant, keys, options=options, kdf_limits=FAST_KDF)


async def test_linked_device_shares_identity_and_receives_alongside(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await _link(alice, tmp_path / "alice2", fast_options)
    try:
        assert alice2.username == "alice"
        assert alice2.identity_key == alice.identity_key
        assert alice2.fingerprint == alice.fingerprint
        listed = await alice.devices.list()
        assert [(d.device_id, d.has_keys, d.this_device, d.name) for d in listed] == [
            (1, True, True, ""),
            (2, True, False, "laptop"),
        ]
        # Both devices made signed requests: the relay records a coarse last-seen for each
        # (in the background, so it may land a moment after the answer).
        deadline = time.monotonic() + WAIT
        while any(d.last_seen is None for d in listed):
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.05)
            listed = await alice.devices.list()
        assert all(d.last_seen is not None and d.last_seen % 3_600_000 == 0 for d in listed)
        assert [d.this_device for d in await alice2.devices.list()] == [False, True]

        events1, events2 = alice.events(), alice2.events()
        async with alice, alice2, bob:
            await bob.send_text("alice", "to every device")
            for events in (events1, events2):
                got = await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
                assert got.message.text == "to every device"
    finally:
        await alice2.close()


async def test_removed_device_reads_nothing_sent_afterwards(
    make_client: MakeClient,
    wait_for: WaitFor,
    tmp_path: Path,
    fast_options: Any,
    mailbox: Any,
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await _link(alice, tmp_path / "alice2", fast_options)
    events1, events2 = alice.events(), alice2.events()
    async with alice, bob:
        await alice2.start()
        # bob now holds a session with each of alice's devices.
        await bob.send_text("alice", "before the removal")
        for events in (events1, events2):
            await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
        await alice2.close()
        await alice.devices.remove(2)
        assert [d.device_id for d in await alice.devices.list()] == [1]
        # bob's next send meets the relay's device list without device 2 and leaves it out;
        # device 1 gets it.
        await bob.send_text("alice", "after the removal")
        got = await wait_for(events1, lambda e: isinstance(e, MessageReceived), WAIT)
        assert got.message.text == "after the removal"
    # The removed device's own key no longer signs for anything...
    reopened = await Client.open(tmp_path / "alice2", options=fast_options)
    try:
        with pytest.raises(AuthFailed):
            await reopened.devices.list()
    finally:
        await reopened.close()
    # ...and device 1 acknowledged what it took: no copy waits at the relay.
    assert await mailbox("alice", 1) == []


async def test_grant_for_another_auth_key_is_refused_and_writes_nothing(
    make_client: MakeClient, tmp_path: Path, fast_options: Any
) -> None:
    alice = await make_client("alice")
    keys, other = NewDeviceKeys.generate(), NewDeviceKeys.generate()
    grant = await alice.devices.add(keys.auth_key)
    with pytest.raises(InvalidLinkGrant):
        await Client.link_device(tmp_path / "stolen", grant, other, kdf_limits=FAST_KDF)
    assert not (tmp_path / "stolen").exists()


async def test_linked_device_signs_with_its_own_key(
    make_client: MakeClient, tmp_path: Path, fast_options: Any, relay: Relay
) -> None:
    alice = await make_client("alice")
    keys = NewDeviceKeys.generate()
    alice2 = await _link(alice, tmp_path / "alice2", fast_options)
    await alice2.close()
    # Knowing the identity key (every linked device does) is not enough to sign as device 2:
    # the identity-derived seed is device 1's, and device 2's own seed never left it.
    from e2ee.client.datadir import auth_seed

    ikp = alice._ctx.store.load_account()
    assert ikp is not None
    # Nor as device 1: an account made now draws device 1's seed at random too.
    for device in (1, 2):
        forged = DeviceSigner.from_seed(auth_seed(ikp.identity_key_pair), "alice", device)
        link = TransportLink(forged, relay.url)
        try:
            with pytest.raises(AuthFailed):
                await link.list_devices()
        finally:
            await link.aclose()
    assert keys.auth_key != forged.public_key


def test_grant_encoding_is_versioned_and_hides_secrets() -> None:
    grant = LinkGrant(
        username="alice",
        device_id=2,
        identity_key_pair=b"\x0a" * 70,
        relay_urls=("http://127.0.0.1:9",),
        auth_key=b"\x01" * 32,
        approver_device=1,
        device_name="laptop",
    )
    assert LinkGrant.from_bytes(grant.to_bytes()) == grant
    shown = repr(grant) + str(grant) + repr(NewDeviceKeys.generate())
    assert "identity_key_pair=<secret>" in shown
    assert repr(b"\x0a" * 70) not in shown and "CgoK" not in shown
    data = grant.to_bytes()
    for bad in (
        b"",
        data[:7],
        data[:7] + b"\x02" + data[8:],  # another version
        data[:-1],  # cut short
        data.replace(b'"device_id": 2', b'"device_id": 0'),
        data.replace(b'"device_id": 2', b'"device_id": 1'),  # names its approver
        data.replace(b'"username": "alice"', b'"username": "A"'),
    ):
        with pytest.raises(InvalidLinkGrant):
            LinkGrant.from_bytes(bad)
    assert dataclasses.replace(grant, device_name="x").device_name == "x"


# -- the provisioning channel through the relay ------------------------------------------


async def test_link_through_the_relay_with_a_code(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path, fast_options: Any, relay: Relay
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    pending = await PendingLink.start(relay.url)
    try:
        waiting = asyncio.create_task(pending.wait(WAIT, poll_interval=0.1))
        # Typed with spaces and in upper case, as a person might.
        typed = " ".join(pending.code.text().upper()[i : i + 6] for i in range(0, 82, 6))
        sent = await alice.devices.approve(typed, name="laptop")
        grant = await waiting
    finally:
        await pending.aclose()
    assert grant == sent and grant.device_id == 2 and grant.device_name == "laptop"
    alice2 = await Client.link_device(
        tmp_path / "alice2", grant, pending.keys, options=fast_options, kdf_limits=FAST_KDF
    )
    try:
        assert alice2.fingerprint == alice.fingerprint
        events2 = alice2.events()
        async with alice2, bob:
            await bob.send_text("alice", "hello second device")
            got = await wait_for(events2, lambda e: isinstance(e, MessageReceived), WAIT)
            assert got.message.text == "hello second device"
        # The code is used up: approving it again finds no slot.
        with pytest.raises(NotFound):
            await alice.devices.approve(pending.code.text())
    finally:
        await alice2.close()


async def test_link_refused_without_approval(
    make_client: MakeClient, tmp_path: Path, relay: Relay
) -> None:
    alice = await make_client("alice")
    pending = await PendingLink.start(relay.url)
    try:
        with pytest.raises(LinkNotApproved):
            await pending.wait(1.0, poll_interval=0.1)
    finally:
        await pending.aclose()
    # Nothing was registered for the new device, and nothing was written for it.
    assert [d.device_id for d in await alice.devices.list()] == [1]
    assert not (tmp_path / "alice2").exists()


async def test_tampered_or_misdirected_grant_is_refused(
    make_client: MakeClient, relay: Relay, signers: Any
) -> None:
    alice = await make_client("alice")
    grant = await alice.devices.add(NewDeviceKeys.generate().auth_key)
    for make_sealed in (
        # Sealed to the right key, then one byte flipped.
        lambda p: (
            bytes([seal_grant(grant, p.keys.box_public)[0] ^ 1])
            + seal_grant(grant, p.keys.box_public)[1:]
        ),
        # Sealed to someone else's key.
        lambda p: seal_grant(grant, NewDeviceKeys.generate().box_public),
        # A real grant for this key, naming another device's auth key.
        lambda p: seal_grant(grant, p.keys.box_public),
    ):
        pending = await PendingLink.start(relay.url)
        link = TransportLink(signers["alice", 1], relay.url)
        try:
            await link.fill_provisioning(pending.code.slot_id, make_sealed(pending))
            with pytest.raises(InvalidLinkGrant):
                await pending.wait(WAIT, poll_interval=0.1)
        finally:
            await link.aclose()
            await pending.aclose()


def test_link_code_round_trip_and_typos() -> None:
    keys = NewDeviceKeys.generate()
    code = LinkCode("ab" * 16, keys.box_public)
    text = code.text()
    assert len(text) == 82 and text == text.lower()
    assert LinkCode.parse(text) == code
    assert LinkCode.parse("-".join(text[i : i + 5] for i in range(0, 82, 5)).upper()) == code
    typo = text[:10] + ("a" if text[10] != "a" else "b") + text[11:]
    for bad in (typo, text[:-1], text + "a", "", "not a code!"):
        with pytest.raises(InvalidLinkCode):
            LinkCode.parse(bad)
    assert "box_secret" not in repr(keys) and keys.box_secret.hex() not in repr(keys)


class _Polls:
    """A relay link that answers ``take_provisioning`` from a script (no I/O)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    async def take_provisioning(self, slot_id: str, token: bytes) -> bytes | None:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        return None


def _pending(answers: list[Any]) -> tuple[PendingLink, list[float], Any, Any]:
    keys = NewDeviceKeys.generate()
    code = LinkCode("cd" * 16, keys.box_public)
    pending = PendingLink(_Polls(answers), keys, code, b"t" * 32, 0, ("http://127.0.0.1:9",))  # type: ignore[arg-type]
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    return pending, slept, (lambda: now[0]), sleep


async def test_waiting_rides_out_rate_limits_and_a_relay_blip() -> None:
    from e2ee.transport.errors import ConnectionFailed, RateLimited, Unavailable

    keys_grant = LinkGrant("alice", 2, b"\x0a" * 70, ("http://127.0.0.1:9",), b"", 1)
    pending, slept, monotonic, sleep = _pending([])
    grant = dataclasses.replace(keys_grant, auth_key=pending.keys.auth_key)
    pending._link.answers = [  # type: ignore[attr-defined]
        None,
        RateLimited(429, "rate_limited", "", retry_after=5),
        ConnectionFailed("relay restarting"),
        Unavailable(503, "unavailable", "", retry_after=2),
        seal_grant(grant, pending.keys.box_public),
    ]
    got = await pending.wait(60, poll_interval=1.0, monotonic=monotonic, sleep=sleep)
    assert got == grant
    assert slept == [1.0, 5.0, 1.0, 2.0]


async def test_waiting_gives_up_at_its_timeout_or_when_the_slot_is_gone() -> None:
    pending, slept, monotonic, sleep = _pending([None] * 100)
    with pytest.raises(LinkNotApproved):
        await pending.wait(3.5, poll_interval=1.0, monotonic=monotonic, sleep=sleep)
    assert slept == [1.0, 1.0, 1.0, 0.5]
    pending, slept, monotonic, sleep = _pending([None, NotFound(404, "unknown_provisioning")])
    with pytest.raises(LinkNotApproved):
        await pending.wait(60, poll_interval=1.0, monotonic=monotonic, sleep=sleep)
    assert slept == [1.0]


async def test_history_hand_over_to_the_new_device(
    make_client: MakeClient,
    wait_for: WaitFor,
    tmp_path: Path,
    fast_options: Any,
    relay: Relay,
    signers: Any,
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    events = alice.events()
    up: list[tuple[int, int]] = []
    down: list[tuple[int, int]] = []
    async with alice, bob:
        await alice.send_text("bob", "before the new laptop")
        await bob.send_text("alice", "an answer from bob")
        await wait_for(events, lambda e: isinstance(e, MessageReceived), WAIT)
        pending = await PendingLink.start(relay.url)
        try:
            waiting = asyncio.create_task(pending.wait(WAIT, poll_interval=0.1))
            sent = await alice.devices.approve(
                pending.code.text(), with_history=True, progress=lambda d, t: up.append((d, t))
            )
            grant = await waiting
        finally:
            await pending.aclose()
        assert grant == sent and grant.history_blob
        assert grant.history_key not in repr(grant)
        alice2 = await Client.link_device(
            tmp_path / "alice2",
            grant,
            pending.keys,
            options=fast_options,
            kdf_limits=FAST_KDF,
            progress=lambda d, t: down.append((d, t)),
        )
        try:
            assert up and up[-1][0] == up[-1][1] and down and down[-1][0] == down[-1][1]
            chat = await asyncio.to_thread(alice2.history.messages, "dm:bob", limit=10)
            assert [m.text for m in chat] == ["before the new laptop", "an answer from bob"]
            assert alice2.device_id == 2 and alice2.fingerprint == alice.fingerprint
            # A device of its own: bob's next message reaches it, over a new session.
            events2 = alice2.events()
            async with alice2:
                await bob.send_text("alice", "after the hand-over")
                got = await wait_for(events2, lambda e: isinstance(e, MessageReceived), WAIT)
                assert got.message.text == "after the hand-over"
            # The download was removed, and so was the one-time blob at the relay.
            assert not list(tmp_path.glob(".*handover-*"))
            link = TransportLink(signers["alice", 1], relay.url)
            try:
                with pytest.raises(NotFound):
                    await link.download_blob(grant.history_blob, tmp_path / "again", None)
            finally:
                await link.aclose()
        finally:
            await alice2.close()
