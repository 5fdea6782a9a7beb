"""History encrypted at rest with a passphrase, through real clients and a real relay.

The files are searched while the clients are open (the WAL and its index exist
then, with the newest commits) and after they closed; a plaintext data directory
from before encryption (a passphrase-protected key in a clear database) is
encrypted when it is opened, and its history, search and sessions carry on.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from e2ee.client import Client, ClientOptions
from e2ee.client.datadir import DB_FILE
from e2ee.errors import WrongPassphrase
from e2ee.events import MessageReceived
from e2ee.history import direct_chat_id
from e2ee.store.sealing import KDF_MINIMUM
from e2ee.store.sqlite import SQLiteProtocolStore

MakeClient = Callable[..., Awaitable[Client]]


def holders(folder: Path, needle: bytes) -> list[str]:
    """Names of the files under ``folder`` whose bytes contain ``needle``."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes())


async def test_open_clients_keep_no_message_text_in_any_file(
    make_client: MakeClient, wait_for: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:12].encode()
    alice = await make_client("alice", passphrase="alice pass")
    bob = await make_client("bob", passphrase="bob pass")
    b_events, a_events = bob.events(), alice.events()
    async with alice, bob:
        for i in range(20):
            await alice.send_text("bob", f"narwhal{tag.decode()} number {i}")
            await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
        await bob.send_text("alice", f"okapi{tag.decode()} back")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived))
        found = bob.history.search(f"narwhal{tag.decode()}")
        assert len(found) == 20
        folder = tmp_path / "bob"
        files = {p.name for p in folder.iterdir()}
        assert {f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-keyring"} <= files, files
        for who in ("alice", "bob"):
            for needle in (b"narwhal" + tag, b"okapi" + tag, b"SQLite format 3"):
                assert holders(tmp_path / who, needle) == [], (who, needle)
    for who in ("alice", "bob"):
        for needle in (b"narwhal" + tag, b"okapi" + tag):
            assert holders(tmp_path / who, needle) == [], (who, needle)


async def test_a_plaintext_data_directory_is_encrypted_when_opened_with_its_passphrase(
    make_client: MakeClient,
    wait_for: Callable[..., Awaitable[Any]],
    tmp_path: Path,
    fast_options: ClientOptions,
) -> None:
    tag = uuid.uuid4().hex[:12]
    alice = await make_client("alice")
    bob = await make_client("bob")
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("bob", f"axolotl{tag} before")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
    db = tmp_path / "bob" / DB_FILE
    # A store as earlier versions kept it: the key wrapped under a passphrase, the
    # database itself in clear.
    with SQLiteProtocolStore.open(db, None) as store:
        store.change_passphrase(None, "bob pass", kdf_limits=KDF_MINIMUM)
    assert holders(tmp_path / "bob", f"axolotl{tag}".encode()) == [DB_FILE]

    try:
        await Client.open(tmp_path / "bob", "wrong pass", options=fast_options)
    except WrongPassphrase:
        pass
    else:
        raise AssertionError("a wrong passphrase opened the store")
    assert holders(tmp_path / "bob", f"axolotl{tag}".encode()) == [DB_FILE]  # untouched

    bob = await Client.open(tmp_path / "bob", "bob pass", options=fast_options)
    alice = await Client.open(tmp_path / "alice", options=fast_options)
    try:
        assert holders(tmp_path / "bob", f"axolotl{tag}".encode()) == []
        history = bob.history.messages(direct_chat_id("alice"))
        assert [m.text for m in history] == [f"axolotl{tag} before"]
        assert [m.text for m in bob.history.search(f"axolotl{tag}")] == [f"axolotl{tag} before"]
        b_events = bob.events()
        async with alice, bob:
            await alice.send_text("bob", f"axolotl{tag} after")
            got = await wait_for(b_events, lambda e: isinstance(e, MessageReceived))
            assert got.message.text == f"axolotl{tag} after"
        assert holders(tmp_path / "bob", f"axolotl{tag}".encode()) == []
    finally:
        await bob.close()
        await alice.close()
