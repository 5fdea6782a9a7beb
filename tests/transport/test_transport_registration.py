"""The SDK against the relay's abuse limits (issue 13): registration in each mode (it solves
the proof of work by itself; every refusal is its own typed error) and blob deletion."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2ee.transport.errors import (
    InviteInvalid,
    InviteRequired,
    NotFound,
    RegistrationClosed,
    RegistrationRefused,
)
from e2ee.transport.http import RelayClient

Factory = Callable[..., RelayClient]
ROOT = Path(__file__).resolve().parents[2]


def make_invite(data_dir: Path) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "relay", "invite", "create", "--data", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return res.stdout.strip()


async def test_pow_is_solved_by_the_sdk(
    start_relay: Callable[..., Any], device: Factory, new_user: Callable[[], str]
) -> None:
    relay = start_relay(registration_pow_difficulty="12")
    client = device(new_user(), url=relay.url)
    info = await client.registration_info()
    assert info.mode == "pow" and info.difficulty == 12 and info.challenge
    registered = await client.register()
    assert registered.username == client.username


async def test_invite_and_closed_modes_raise_typed_errors(
    start_relay: Callable[..., Any], device: Factory, new_user: Callable[[], str]
) -> None:
    relay = start_relay(registration="invite")
    client = device(new_user(), url=relay.url)
    with pytest.raises(InviteRequired) as required:
        await client.register()
    assert required.value.status == 403 and isinstance(required.value, RegistrationRefused)
    with pytest.raises(InviteInvalid):
        await client.register(invite="wrong")
    code = make_invite(relay.data_dir)
    assert (await client.register(invite=code)).username == client.username
    with pytest.raises(InviteInvalid):
        await device(new_user(), url=relay.url).register(invite=code)

    closed = start_relay(registration="closed")
    with pytest.raises(RegistrationClosed):
        await device(new_user(), url=closed.url).register()
    with pytest.raises(RegistrationClosed):  # an invite does not open a closed relay
        await device(new_user(), url=closed.url).register(invite=code)


async def test_an_uploader_deletes_its_blob(
    device: Factory, new_user: Callable[[], str], tmp_path: Path
) -> None:
    owner, other = device(new_user()), device(new_user())
    await owner.register()
    await other.register()
    src = tmp_path / "blob.bin"
    src.write_bytes(b"z" * 5000)
    info = await owner.upload_blob(src)
    with pytest.raises(NotFound):
        await other.delete_blob(info.id)
    assert await owner.delete_blob(info.id) is True
    with pytest.raises(NotFound):
        await owner.download_blob(info.id, tmp_path / "back")
