"""Composing: the history and outbox rows for what this device sends or records.

Invariants:

* Every function here runs under the write lock (the caller holds
  ``ctx.wlock``) and only *builds* rows, except :func:`compose`,
  :func:`mark_read_sync` and :func:`expire_sync`, which commit what they
  built in one transaction.
* An outgoing payload is committed to the ``outbox`` (with its history row)
  before anything is sent; its message id never changes afterwards, so every
  retry is the same message to the relay.
* Notices (``gap``, ``undecryptable``) take the next ``seq`` like a message;
  the same notice id is never stored twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from e2ee import payload
from e2ee.client.context import ClientContext
from e2ee.client.datadir import META_READ_RECEIPTS
from e2ee.client_errors import NotAMember
from e2ee.errors import UsageError
from e2ee.events import Event, MessageChanged
from e2ee.history import (
    History,
    Row,
    StoredMessage,
    direct_chat_id,
    dumps,
    group_chat_id,
    to_message,
)
from e2ee.payload import AttachmentPointer, GroupControl, Payload, PayloadType, Quote
from e2ee.store import Address

__all__ = [
    "attachment_row",
    "chat_for",
    "compose",
    "ensure_chat_rows",
    "expire_sync",
    "group_rows",
    "mark_read_sync",
    "notice_rows",
    "receipt_row",
]


def chat_for(ctx: ClientContext, to: str) -> tuple[str, str, list[str]]:
    """(chat id, mode, targets) for a user name or a chat id."""
    if to.startswith("group:"):
        gid = to[len("group:") :]
        group = ctx.history.group(gid)
        if group is None or not group["member"]:
            raise NotAMember(gid)
        return to, "group", []
    peer = to[len("dm:") :] if to.startswith("dm:") else to
    if not peer or peer == ctx.me.name:
        raise UsageError("send to another user (or a group chat id)")
    return direct_chat_id(peer), "pairwise", [peer]


def ensure_chat_rows(
    ctx: ClientContext, chat_id: str, now: int, pending: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    chat = pending.get(chat_id) or ctx.chats.get(chat_id)
    if chat is None:
        chat = ctx.history.current("chats", chat_id)
    if chat is None:
        if chat_id.startswith("dm:"):
            peer = chat_id[3:]
            chat = History.row(
                "chats", id=chat_id, kind="direct", peer=peer, timer_seconds=0, created_at=now
            )[1]
        else:
            gid = chat_id[len("group:") :]
            chat = History.row(
                "chats", id=chat_id, kind="group", group_id=gid, timer_seconds=0, created_at=now
            )[1]
    chat = dict(chat)
    chat["last_message_at"] = now
    pending[chat_id] = chat
    ctx.chats[chat_id] = chat  # written under the write lock; dropped on failure
    return chat


def notice_rows(
    ctx: ClientContext,
    rows: list[Row],
    chat_id: str,
    sender: Address,
    notice_id: str,
    kind: str,
    text: str,
    now: int,
) -> StoredMessage:
    """Append a notice row (see ``NOTICE_TYPES``) and its chat's rows to ``rows``.

    The notice takes the next ``seq``, so it stands before whatever this
    operation stores after it. Called under the write lock; the caller commits.
    """
    existing = ctx.history.current("messages", notice_id)
    if existing is not None:  # the same delivery processed again after a crash
        return to_message(existing)
    pending: dict[str, dict[str, Any]] = {}
    ensure_chat_rows(ctx, chat_id, now, pending)
    seq = ctx.counter("seq:messages") + 1
    ctx.set_counters({"seq:messages": seq})  # committed with ``rows`` (or dropped)
    table, row = History.row(
        "messages",
        id=notice_id,
        chat_id=chat_id,
        group_id=chat_id[len("group:") :] if chat_id.startswith("group:") else None,
        sender=sender.name,
        sender_device=sender.device_id,
        outgoing=0,
        type=kind,
        text=text,
        counter=0,
        sent_at=now,
        received_at=now,
        read_at=now,
        status="received",
        edited=0,
        deleted=0,
        expire_seconds=0,
        seq=seq,
    )
    rows.append((table, row))
    ctx.defer_or_add(rows, [("chats", c) for c in pending.values()])
    ctx.defer_or_add(rows, [History.row("counters", id="seq:messages", value=seq)])
    return to_message(row)


def compose(
    ctx: ClientContext,
    to: str,
    kind: PayloadType,
    *,
    text: str = "",
    quote: Quote | None = None,
    targets_ids: tuple[bytes, ...] = (),
    reaction: str = "",
    attachment: AttachmentPointer | None = None,
    group: GroupControl | None = None,
    group_targets: Sequence[str] | None = None,
    timer_seconds: int = 0,
    typing: bool = False,
    store_row: bool = True,
    extra_rows: Sequence[Row] = (),
) -> tuple[str, StoredMessage | None]:
    """Commit a payload to the outbox (and its history row); return its id and row."""
    with ctx.wlock:
        chat_id, mode, targets = chat_for(ctx, to)
        if group_targets is not None:
            mode, targets = "pairwise", list(group_targets)
        now = ctx.now_ms()
        mid = ctx.random_bytes(payload.MESSAGE_ID_BYTES)
        chats: dict[str, dict[str, Any]] = {}
        if store_row:
            chat = ensure_chat_rows(ctx, chat_id, now, chats)
            if kind is PayloadType.TIMER:
                chat["timer_seconds"] = timer_seconds
        else:
            chat = ctx.history.current("chats", chat_id) or {}
        counted = kind not in (PayloadType.TYPING, PayloadType.SESSION_RESET)
        counters: dict[str, int] = {}
        counter = 0
        if counted:
            counter = ctx.counter(f"out:{chat_id}") + 1
            counters[f"out:{chat_id}"] = counter
        timed = store_row and kind is not PayloadType.TIMER
        expire = int(chat.get("timer_seconds") or 0) if timed else 0
        body = Payload(
            type=kind,
            message_id=mid,
            sent_at_ms=now,
            counter=counter,
            group_id=chat_id[len("group:") :] if chat_id.startswith("group:") else "",
            text=text,
            quote=quote,
            target_ids=targets_ids,
            reaction=reaction,
            typing=typing,
            attachment=attachment,
            group=group,
            timer_seconds=timer_seconds,
            expire_seconds=expire,
        )
        data = payload.encode(body)
        seq = ctx.counter("seq:outbox") + 1
        counters["seq:outbox"] = seq
        rows: list[Row] = [
            History.row(
                "outbox",
                id=mid.hex(),
                seq=seq,
                chat_id=chat_id,
                mode=mode,
                targets=dumps(targets),
                kind=kind.name.lower(),
                payload=data,
                state="queued",
                attempts=0,
                created_at=now,
            )
        ]
        if store_row:
            mseq = ctx.counter("seq:messages") + 1
            counters["seq:messages"] = mseq
            rows.append(
                History.row(
                    "messages",
                    id=mid.hex(),
                    chat_id=chat_id,
                    group_id=body.group_id or None,
                    sender=ctx.me.name,
                    sender_device=ctx.me.device_id,
                    outgoing=1,
                    type=kind.name.lower(),
                    text=text or None,
                    reply_to=quote.message_id.hex() if quote else None,
                    quote_text=quote.text if quote else None,
                    counter=counter,
                    sent_at=now,
                    status="pending",
                    edited=0,
                    deleted=0,
                    expire_seconds=expire,
                    expires_at=now + expire * 1000 if expire else None,
                    seq=mseq,
                )
            )
            if attachment is not None:
                rows.append(attachment_row(mid.hex(), attachment))
        rows.extend(("chats", c) for c in chats.values())
        rows.extend(extra_rows)
        ctx.commit(rows, counters)
        stored = to_message(rows[1][1]) if store_row else None
        return mid.hex(), stored


def attachment_row(message_id: str, a: AttachmentPointer) -> Row:
    return History.row(
        "attachments",
        id=message_id,
        message_id=message_id,
        blob_id=a.blob_id,
        key=a.key,
        digest=a.digest,
        size=a.size,
        mime_type=a.mime_type,
        file_name=a.file_name,
    )


def receipt_row(
    ctx: ClientContext, user: str, message_id: str, kind: str, counters: dict[str, int]
) -> Row:
    seq = counters.get("seq:outbox", ctx.counter("seq:outbox")) + 1
    counters["seq:outbox"] = seq
    return History.row(
        "outbox",
        id=f"r:{kind}:{message_id}",
        seq=seq,
        chat_id=direct_chat_id(user),
        mode="receipt",
        targets=dumps([user]),
        ref=message_id,
        kind=kind,
        state="queued",
        attempts=0,
        created_at=ctx.now_ms(),
    )


def group_rows(ctx: ClientContext, gid: str, control: GroupControl, by: str) -> list[Row]:
    """Rows for the group's state after ``control`` (members, admins, name)."""
    with ctx.wlock:
        now = ctx.now_ms()
        current = ctx.history.group(gid)
        am_member = ctx.me.name in control.members
        rows: list[Row] = [
            History.row(
                "groups",
                id=gid,
                name=control.name,
                admins=dumps(list(control.admins)),
                revision=control.revision,
                created_by=(current or {}).get("created_by") or by,
                member=1 if am_member else 0,
                created_at=(current or {}).get("created_at") or now,
            )
        ]
        previous = ctx.history.group_members(gid)
        for user in sorted(set(previous) | set(control.members)):
            role = "gone"
            if user in control.members:
                role = "admin" if user in control.admins else "member"
            rows.append(
                History.row(
                    "users_groups", id=f"{gid}:{user}", group_id=gid, user_id=user, role=role
                )
            )
            rows.append(History.row("users", id=user, created_at=now))
        chat_id = group_chat_id(gid)
        if ctx.history.current("chats", chat_id) is None:
            rows.append(
                History.row(
                    "chats",
                    id=chat_id,
                    kind="group",
                    group_id=gid,
                    timer_seconds=0,
                    last_message_at=now,
                    created_at=now,
                )
            )
        return rows


def mark_read_sync(ctx: ClientContext, chat_id: str) -> int:
    with ctx.wlock:
        now = ctx.now_ms()
        send_receipts = ctx.store.get_meta(META_READ_RECEIPTS) != "0"
        rows: list[Row] = []
        counters: dict[str, int] = {}
        for message_id, sender in ctx.history.unread(chat_id):
            updated = ctx.history.updated("messages", message_id, read_at=now)
            if updated:
                rows.append(updated)
            if send_receipts:
                rows.append(receipt_row(ctx, sender, message_id, "read", counters))
        if rows:
            ctx.commit(rows, counters)
        return sum(1 for t, _ in rows if t == "messages")


def expire_sync(ctx: ClientContext) -> list[Event]:
    with ctx.wlock:
        events: list[Event] = []
        rows: list[Row] = []
        for mid in ctx.history.expired(ctx.now_ms()):
            row = ctx.history.updated("messages", mid, text=None, quote_text=None, deleted=2)
            if row is None:
                continue
            rows.append(row)
            attachment = ctx.history.updated(
                "attachments", mid, key=None, digest=None, local_path=None
            )
            if attachment:
                rows.append(attachment)
            events.append(MessageChanged(mid, row[1]["chat_id"], "expired", row[1]["sender"]))
        if rows:
            ctx.commit(rows, {})
        return events
