"""A deterministic in-memory Backend for snapshot tests (fixed clock, fixed data).

It implements the same :class:`tui_client.adapter.Backend` protocol as the real
adapter, which is all the screens see, so the screens render exactly as they
would over the SDK, but the pixels never depend on keys, ids or the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from e2ee.qr import qr_terminal
from tui_client.adapter import (
    PAGE_SIZE,
    AttachmentInfo,
    BackendError,
    ChatSummary,
    ConnectionChanged,
    ContactInfo,
    DeviceView,
    GroupInfo,
    MessageView,
    Progress,
    SearchHit,
    Update,
)

#: 2026-11-27 14:30:00 UTC, the fake "now".
NOW_MS = int(datetime(2026, 11, 27, 14, 30, tzinfo=UTC).timestamp() * 1000)
MINUTE = 60_000
DAY = 24 * 60 * MINUTE


def fixed_clock() -> int:
    return NOW_MS


def _m(
    n: int,
    chat: str,
    sender: str,
    text: str | None,
    at: int,
    status: str = "received",
    **kw: object,
) -> MessageView:
    return MessageView(
        id=f"{n:032x}",
        chat_id=chat,
        sender=sender,
        outgoing=sender == "alice",
        kind=str(kw.pop("kind", "attachment" if "attachment" in kw else "text")),
        text=text,
        sent_at=at,
        status=status if sender == "alice" else "received",
        seq=n,
        **kw,  # type: ignore[arg-type]
    )


def sample_messages() -> dict[str, list[MessageView]]:
    bob = "dm:bob"
    y = NOW_MS - DAY
    t = NOW_MS - 50 * MINUTE
    return {
        bob: [
            _m(1, bob, "bob", "Did you get the report?", y + 10 * MINUTE),
            _m(2, bob, "alice", "Yes, reading it tonight", y + 12 * MINUTE, "read"),
            _m(3, bob, "bob", "Great, thanks!", y + 13 * MINUTE, reactions=(("alice", "👍"),)),
            _m(
                4,
                bob,
                "bob",
                None,
                t,
                attachment=AttachmentInfo("budget.pdf", 48_213, "application/pdf"),
            ),
            _m(5, bob, "alice", "Page 3 looks off", t + 5 * MINUTE, "read", edited=True),
            _m(
                6,
                bob,
                "bob",
                "Fixed, see the new one",
                t + 9 * MINUTE,
                reply_to=f"{5:032x}",
                quote_text="Page 3 looks off",
                quote_sender="alice",
            ),
            _m(7, bob, "bob", None, t + 10 * MINUTE, deleted=True),
            _m(8, bob, "alice", "Lunch at 1?", t + 20 * MINUTE, "delivered"),
            _m(9, bob, "alice", "Or 1:30", t + 21 * MINUTE, "sent"),
            _m(10, bob, "alice", "(on my way)", t + 22 * MINUTE, "pending"),
        ],
        "group:f00d": [
            _m(20, "group:f00d", "alice", "created the group 'team'", y, kind="group"),
            _m(21, "group:f00d", "carol", "Standup moved to 10:00", t),
            _m(22, "group:f00d", "dave", "ok", t + MINUTE),
        ],
        "dm:carol": [
            _m(30, "dm:carol", "carol", "Are you coming on Friday?", NOW_MS - 3 * MINUTE),
            _m(31, "dm:carol", "carol", "We need a headcount", NOW_MS - 2 * MINUTE),
        ],
        "dm:erin": [_m(40, "dm:erin", "alice", "Happy birthday!", NOW_MS - 3 * DAY, "read")],
    }


class FakeBackend:
    """Everything in memory; sends succeed at once with status ``sent``."""

    def __init__(self, *, connected: str = "connected", queued: int = 0) -> None:
        self.msgs = sample_messages()
        self.titles = {
            "dm:bob": "bob",
            "group:f00d": "team",
            "dm:carol": "carol",
            "dm:erin": "erin",
        }
        self.unread = {"dm:carol": 2, "group:f00d": 1}
        self.sent: list[tuple[str, str, str | None]] = []
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._updates.put_nowait(ConnectionChanged(connected, queued))  # type: ignore[arg-type]
        self._next = 1000
        self.verified: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.approved: list[tuple[str, str]] = []

    @property
    def username(self) -> str:
        return "alice"

    @property
    def relay_url(self) -> str:
        return "http://127.0.0.1:8080"

    @property
    def fingerprint(self) -> str:
        return "".join(str(i % 10) for i in range(30))

    def take_recovery_key(self) -> str | None:
        return None

    def push(self, update: Update) -> None:
        self._updates.put_nowait(update)

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            yield await self._updates.get()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def is_connected(self) -> bool:
        return True

    def _summary(self, chat_id: str) -> ChatSummary:
        msgs = [m for m in self.msgs.get(chat_id, []) if m.kind in ("text", "attachment")]
        last = msgs[-1] if msgs else None
        text = ""
        if last is not None:
            text = "message deleted" if last.deleted else (last.text or "")
            if last.outgoing:
                text = "you: " + text
        return ChatSummary(
            chat_id,
            "group" if chat_id.startswith("group:") else "direct",
            self.titles.get(chat_id, chat_id[3:]),
            self.unread.get(chat_id, 0),
            text,
            last.sent_at if last else None,
        )

    async def chats(self) -> list[ChatSummary]:
        chats = [self._summary(c) for c in self.msgs]
        return sorted(chats, key=lambda c: -(c.last_at or 0))

    async def chat_summary(self, chat_id: str) -> ChatSummary:
        return self._summary(chat_id)

    async def messages(
        self,
        chat_id: str,
        before: str | None = None,
        limit: int = PAGE_SIZE,
        *,
        after: str | None = None,
        around: str | None = None,
    ) -> list[MessageView]:
        msgs = self.msgs.get(chat_id, [])
        ids = [m.id for m in msgs]
        if after is not None:
            return msgs[ids.index(after) + 1 :][:limit]
        if around is not None:
            idx = ids.index(around)
            older = msgs[max(0, idx - limit // 2) : idx]
            return older + msgs[idx:][: limit - len(older)]
        if before is not None:
            msgs = msgs[: ids.index(before)]
        return msgs[-limit:]

    async def message(self, message_id: str) -> MessageView | None:
        for msgs in self.msgs.values():
            for m in msgs:
                if m.id == message_id:
                    return m
        return None

    async def search(
        self, text: str, *, before: str | None = None, limit: int = 50
    ) -> list[SearchHit]:
        return [
            SearchHit(m, m.chat_id.split(":", 1)[1])
            for msgs in self.msgs.values()
            for m in msgs
            if m.text and text.lower() in m.text.lower()
        ]

    async def send_text(self, chat_id: str, text: str, reply_to: str | None = None) -> str:
        self._next += 1
        m = _m(self._next, chat_id, "alice", text, NOW_MS, "sent")
        self.msgs.setdefault(chat_id, []).append(m)
        self.sent.append((chat_id, text, reply_to))
        return m.id

    def _replace(self, message_id: str, **kw: object) -> None:
        for msgs in self.msgs.values():
            for i, m in enumerate(msgs):
                if m.id == message_id:
                    msgs[i] = replace(m, **kw)  # type: ignore[arg-type]

    async def edit(self, message_id: str, text: str) -> None:
        self._replace(message_id, text=text, edited=True)

    async def delete(self, message_id: str) -> None:
        self._replace(message_id, text=None, deleted=True)

    async def react(self, message_id: str, emoji: str) -> None:
        self._replace(message_id, reactions=(("alice", emoji),) if emoji else ())

    async def send_typing(self, chat_id: str, typing: bool) -> None:
        return None

    async def mark_read(self, chat_id: str) -> int:
        return 0

    async def delete_chat(self, chat_id: str) -> None:
        self.msgs.pop(chat_id, None)
        self.titles.pop(chat_id, None)

    async def send_file(self, chat_id: str, path: Path, progress: Progress | None) -> str:
        raise BackendError("the fake backend sends no files")

    async def save_attachment(
        self, message_id: str, destination: Path, progress: Progress | None
    ) -> Path:
        raise BackendError("the fake backend has no files")

    async def attachment_bytes(self, message_id: str, limit: int) -> bytes:
        if message_id not in self.files:
            raise BackendError("the fake backend has no such file")
        return self.files[message_id][:limit]

    def add_image(self, chat_id: str, name: str, data: bytes) -> MessageView:
        """Bob sends ``data`` as an image attachment in ``chat_id`` (one minute ago)."""
        self._next += 1
        info = AttachmentInfo(name, len(data), "image/png")
        m = _m(self._next, chat_id, "bob", None, NOW_MS - MINUTE, attachment=info)
        self.msgs.setdefault(chat_id, []).append(m)
        self.files[m.id] = data
        return m

    async def create_group(self, name: str, members: Sequence[str]) -> str:
        raise BackendError("the fake backend makes no groups")

    async def group_info(self, chat_id: str) -> GroupInfo | None:
        return GroupInfo(
            chat_id, chat_id[6:], "team", ("alice", "carol", "dave"), ("alice",), True, True
        )

    async def rename_group(self, chat_id: str, name: str) -> None:
        self.titles[chat_id] = name

    async def add_member(self, chat_id: str, user: str) -> None:
        return None

    async def remove_member(self, chat_id: str, user: str) -> None:
        return None

    async def leave_group(self, chat_id: str) -> None:
        return None

    async def contact_info(self, user: str) -> ContactInfo:
        digits = "".join(str((i * 7 + 3) % 10) for i in range(60))
        trust = "verified" if user in self.verified else "tofu"
        return ContactInfo(
            user, ((1, trust),), ((1, digits),), qr_terminal(b"\x00" + digits.encode())
        )

    async def accept_key(self, user: str, verified: bool) -> None:
        if verified:
            self.verified.add(user)

    async def held_users(self) -> set[str]:
        return set()

    async def user_exists(self, user: str) -> bool:
        return True

    async def queued_count(self) -> int:
        return 0

    async def approve_device(self, code: str, name: str) -> int:
        self.approved.append((code, name))
        if code == "bad":
            raise BackendError("a link code is base32 text")
        return 2

    async def list_devices(self) -> list[DeviceView]:
        return [
            DeviceView(1, "desk", NOW_MS - 30 * DAY, NOW_MS - MINUTE, True),
            DeviceView(2, "laptop", NOW_MS - 3 * DAY, NOW_MS - 2 * DAY, False),
            DeviceView(3, "", NOW_MS - 60 * DAY, None, False),
        ]

    async def remove_device(self, device_id: int) -> None:
        return None
