"""Linked devices through the SDK: a grant from an existing device sets up a new one.

Real relay process, real clients, real SQLite files. What a user relies on: the new
device shares the identity (safety numbers unchanged) but signs with its own key,
both devices receive what a contact sends, the devices list shows both, and a removed
device reads nothing sent afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sdk_relay import Relay

from e2ee.client import Client, LinkGrant, NewDeviceKeys, TransportLink
from e2ee.client_errors import AuthFailed
from e2ee.errors import InvalidLinkGrant
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
        assert [(d.device_id, d.has_keys, d.this_device) for d in listed] == [
            (1, True, True),
            (2, True, False),
        ]
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
    make_client: MakeClient, tmp_path: Path, fast_options: Any, mailbox: Any
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    alice2 = await _link(alice, tmp_path / "alice2", fast_options)
    await alice2.close()
    await alice.devices.remove(2)
    assert [d.device_id for d in await alice.devices.list()] == [1]
    async with bob:
        await bob.send_text("alice", "after the removal")
    # The removed device's own key no longer signs for anything...
    reopened = await Client.open(tmp_path / "alice2", options=fast_options)
    try:
        with pytest.raises(AuthFailed):
            await reopened.devices.list()
    finally:
        await reopened.close()
    # ...and device 1's mailbox got the message, while nothing was addressed to device 2.
    assert len(await mailbox("alice", 1)) == 1


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
    forged = DeviceSigner.from_seed(auth_seed(ikp.identity_key_pair), "alice", 2)
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
