"""Chat operations of the SDK against a real relay: deleting a chat's history.

What a user relies on: a deleted chat is gone from every read (pages, search,
summaries, attachment keys), other chats are untouched, a late message starts
the chat anew without a false gap, and the errors say what was wrong.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from e2ee.client import Client
from e2ee.errors import AttachmentTooLarge, ChatDeleted, StillAMember, UnknownChat, UsageError
from e2ee.events import GapDetected, GroupChanged, MessageReceived, ReceiptUpdated
from e2ee.history import direct_chat_id, group_chat_id
from e2ee.media import CHUNK_SIZE, MediaCorrupt, decrypt_to_bytes, encrypt_file

MakeClient = Callable[..., Awaitable[Client]]
WaitFor = Callable[..., Awaitable[Any]]


def _rows(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql, args).fetchall())


async def test_delete_chat_removes_its_history_and_leaves_other_chats(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    alice = await make_client("alice")
    bob = await make_client("bob")
    carol = await make_client("carol")
    a_events = alice.events()
    async with alice, bob, carol:
        first = await bob.send_text("alice", "zebrafish from bob")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived) and e.message.id == first)
        source = tmp_path / "note.txt"
        source.write_bytes(b"secret file")
        sent_file = await alice.send_file("bob", source)
        mine = await alice.send_text("bob", "zebra reply", reply_to=first)
        await alice.react(first, "👍")
        await wait_for(
            a_events,
            lambda e: isinstance(e, ReceiptUpdated) and e.message_id == mine and e.status != "sent",
        )
        kept = await carol.send_text("alice", "zebrafish from carol")
        await wait_for(a_events, lambda e: isinstance(e, MessageReceived) and e.message.id == kept)
        assert len(alice.history.search_newest("zebra")) == 3

        await alice.delete_chat(direct_chat_id("bob"))

        history = alice.history
        assert history.messages(direct_chat_id("bob")) == []
        for mid in (first, sent_file, mine):
            assert history.message(mid) is None
        assert history.attachment(sent_file) is None  # the file's key is gone
        assert history.receipts(mine) == {} and history.reactions(first) == {}
        assert [m.id for m in history.search_newest("zebra")] == [kept]
        assert [s.chat.id for s in history.chat_summaries()] == [direct_chat_id("carol")]
        assert [m.text for m in history.messages(direct_chat_id("carol"))] == [
            "zebrafish from carol"
        ]
        # Nothing of the chat is left in the file (the FTS index included).
        db = alice._ctx.folder / "blindpost.db"
        assert _rows(db, "SELECT id FROM app_messages WHERE chat_id = ?", "dm:bob") == []
        assert _rows(db, "SELECT rowid FROM app_messages_fts WHERE text LIKE '%bob%'") == []

        # Bob's history is his: nothing was sent, he keeps every message.
        assert len(bob.history.messages(direct_chat_id("alice"))) >= 2

        # A late message starts the chat anew: shown as new, no false gap.
        later = await bob.send_text("alice", "are you there?")
        got = await wait_for(
            a_events,
            lambda e: isinstance(e, (MessageReceived, GapDetected)),
        )
        assert isinstance(got, MessageReceived) and got.message.id == later
        assert [m.text for m in history.messages(direct_chat_id("bob"))] == ["are you there?"]
        summary = next(s for s in history.chat_summaries() if s.chat.id == "dm:bob")
        assert summary.unread == 1
        # And alice can write to bob again.
        await alice.send_text("bob", "yes")


async def test_delete_chat_errors_and_queued_messages(
    make_client: MakeClient, wait_for: WaitFor
) -> None:
    alice = await make_client("alice")
    bob = await make_client("bob")
    with pytest.raises(UnknownChat) as unknown:
        await alice.delete_chat("dm:nobody")
    assert isinstance(unknown.value, UsageError) and unknown.value.chat_id == "dm:nobody"
    # Offline: the message waits in the outbox; deleting the chat drops it.
    queued = await alice.send_text("bob", "never sent", wait=False)
    assert await alice.queued_count() == 1
    await alice.delete_chat(direct_chat_id("bob"))
    assert await alice.queued_count() == 0 and alice.history.message(queued) is None
    with pytest.raises(UnknownChat):
        await alice.delete_chat(direct_chat_id("bob"))  # deleted already
    b_events = bob.events()
    async with alice, bob:
        gid = await alice.create_group("crew", ["bob"])
        with pytest.raises(StillAMember) as member:
            await alice.delete_chat(group_chat_id(gid))
        assert member.value.group_id == gid
        assert alice.history.chats()  # nothing was deleted
        await alice.leave_group(gid)
        await alice.delete_chat(group_chat_id(gid))
        assert all(c.id != group_chat_id(gid) for c in alice.history.chats())
        # The group changes reach bob; the dropped message never does.
        await wait_for(b_events, lambda e: isinstance(e, GroupChanged) and e.action == "leave")
        assert bob.history.messages(direct_chat_id("alice")) == []


async def test_a_sender_waiting_for_a_deleted_chat_is_told(make_client: MakeClient) -> None:
    alice = await make_client("alice")
    await make_client("bob")
    waiting = asyncio.ensure_future(alice.send_text("bob", "held back", wait=True))
    await asyncio.sleep(0)
    while await alice.queued_count() == 0:  # committed to the outbox, not yet sent
        await asyncio.sleep(0.01)
    await alice.delete_chat(direct_chat_id("bob"))
    with pytest.raises(ChatDeleted) as deleted:
        await asyncio.wait_for(waiting, 15)
    assert deleted.value.chat_id == "dm:bob"


async def test_attachment_bytes_decrypts_in_memory_within_a_limit(
    make_client: MakeClient, wait_for: WaitFor, tmp_path: Path
) -> None:
    alice, bob = await make_client("alice"), await make_client("bob")
    b_events = bob.events()
    content = bytes(range(256)) * 1200  # 307,200 bytes: two chunks of the stream
    source = tmp_path / "picture.png"
    source.write_bytes(content)
    async with alice, bob:
        mid = await alice.send_file("bob", source)
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived) and e.message.id == mid)
        before = sorted(p.name for p in bob._ctx.folder.iterdir())
        assert await bob.attachment_bytes(mid, limit=len(content)) == content
        # No plaintext (nor the downloaded ciphertext) is left in the account folder.
        assert sorted(p.name for p in bob._ctx.folder.iterdir()) == before
        with pytest.raises(AttachmentTooLarge) as large:
            await bob.attachment_bytes(mid, limit=len(content) - 1)
        assert large.value.message_id == mid and isinstance(large.value, UsageError)
        text = await alice.send_text("bob", "no file here")
        await wait_for(b_events, lambda e: isinstance(e, MessageReceived) and e.message.id == text)
        with pytest.raises(UsageError, match="no attachment"):
            await bob.attachment_bytes(text, limit=1024)
        for bad in (0, -1, 64 * 1024 * 1024 + 1):
            with pytest.raises(UsageError, match="limit"):
                await bob.attachment_bytes(mid, limit=bad)


def test_decrypt_to_bytes_stops_at_the_limit_and_refuses_tampering(tmp_path: Path) -> None:
    source = tmp_path / "plain"
    content = b"x" * (CHUNK_SIZE * 2 + 10)
    source.write_bytes(content)
    encrypted = encrypt_file(source, directory=tmp_path)
    key, digest, cipher = encrypted.key, encrypted.digest, encrypted.path
    assert decrypt_to_bytes(cipher, key, digest, limit=len(content)) == content
    # Over the limit: None (the ciphertext size already says so; the sink is bounded too).
    assert decrypt_to_bytes(cipher, key, digest, limit=CHUNK_SIZE + 1) is None
    data = bytearray(cipher.read_bytes())
    data[100] ^= 1
    cipher.write_bytes(bytes(data))
    with pytest.raises(MediaCorrupt):
        decrypt_to_bytes(cipher, key, digest, limit=len(content))
