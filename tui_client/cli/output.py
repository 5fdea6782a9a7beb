# Invariant: everything `blindpost` prints goes through this module. JSON output is one
# object per line with a "type" field (the public contract in docs/cli.md); human output
# never contains terminal control characters from peers (message text, file and group
# names are escaped), and nothing here ever receives a key, a passphrase or a ciphertext.
"""Renderers for the ``blindpost`` command line: JSON records and human-readable lines."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from e2ee.client import NOTICE_TYPES, StoredMessage
from e2ee.events import (
    DecryptionProblem,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
)

__all__ = [
    "AttachmentInfo",
    "Output",
    "change_record",
    "clean",
    "error_record",
    "format_time",
    "gap_record",
    "group_event_record",
    "human_change",
    "human_error",
    "human_gap",
    "human_group_event",
    "human_identity",
    "human_message",
    "human_receipt",
    "identity_record",
    "json_line",
    "message_record",
    "receipt_record",
]

# C0 (but newline and tab), DEL, C1, and the bidi embedding/override/isolate controls
# (which can make text read differently from what it is, "Trojan Source").
_UNSAFE: Final = frozenset(
    [
        *range(0x00, 0x09),
        *range(0x0B, 0x20),
        *range(0x7F, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        0x200E,
        0x200F,
        0x061C,
    ]
)
# In JSON, the same characters (and the JS line separators) become \u escapes: the
# parsed string is unchanged, but a terminal showing the raw line cannot be steered.
_JSON_ESCAPES: Final = {c: f"\\u{c:04x}" for c in (*_UNSAFE, 0x2028, 0x2029)}


def clean(text: str, *, newlines: bool = True) -> str:
    """Text from peers, safe to print on a terminal.

    Args:
        text: any string (message text, a file or group name).
        newlines: keep newlines (indented after the first line); False escapes them.

    Returns:
        The text with control and bidi-override characters shown as ``\\uXXXX``.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\n":
            out.append("\n    " if newlines else "\\n")
        elif code in _UNSAFE:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON object on one line (UTF-8 kept readable, control characters escaped)."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return text.translate(_JSON_ESCAPES)


def format_time(ms: int | None) -> str:
    """A unix-ms timestamp as local ``YYYY-MM-DD HH:MM:SS`` (``-`` when unknown)."""
    if not ms:
        return "-"
    moment = _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


class Output:
    """Where records go: JSON lines or human text on stdout, flushed per record.

    Args:
        as_json: print JSON records instead of human text.
        stream: defaults to ``sys.stdout``.
    """

    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self._stream = stream

    def emit(self, record: Mapping[str, Any], human: str | None) -> None:
        """Print one record: its JSON line, or its human text (None prints nothing)."""
        stream = self._stream or sys.stdout
        if self.as_json:
            stream.write(json_line(record) + "\n")
        elif human is not None:
            stream.write(human + "\n")
        stream.flush()


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What the CLI shows of an attachment: never its key, digest or blob id.

    ``id`` is the message id, which is what ``blindpost download`` takes.
    """

    id: str
    name: str
    size: int
    mime: str

    def record(self) -> dict[str, Any]:
        """The JSON ``attachment`` object."""
        return {"id": self.id, "name": self.name, "size": self.size, "mime": self.mime}


# -- messages ---------------------------------------------------------------------------


def message_record(
    message: StoredMessage,
    attachment: AttachmentInfo | None,
    *,
    receipts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON record of a stored message.

    Args:
        message: the message.
        attachment: its file, if any.
        receipts: for ``history``: user -> best status (outgoing messages).

    Returns:
        ``{"type": "message", ...}``; ``status`` is ``pending``, ``sent``,
        ``delivered``, ``read`` or ``failed`` for outgoing messages, ``received``
        for incoming ones.
    """
    record: dict[str, Any] = {
        "type": "message",
        "id": message.id,
        "chat": message.chat_id,
        "group": message.group_id,
        "sender": message.sender,
        "sender_device": message.sender_device,
        "outgoing": message.outgoing,
        "kind": message.type,
        "text": message.text,
        "sent_at": message.sent_at,
        "received_at": message.received_at,
        "reply_to": message.reply_to,
        "edited": message.edited,
        "deleted": message.deleted,
        "expire_seconds": message.expire_seconds,
        "attachment": attachment.record() if attachment else None,
        "status": message.status,
        "delivered_at": message.delivered_at,
        "read_at": message.read_at,
    }
    if receipts is not None:
        record["receipts"] = dict(receipts)
    return record


def _who(message: StoredMessage, group_name: str | None) -> str:
    if message.outgoing:
        speaker = "you"
        if message.group_id is None:
            speaker += f" -> {message.chat_id.removeprefix('dm:')}"
    else:
        speaker = message.sender
    if message.group_id is not None:
        label = clean(group_name or message.group_id, newlines=False)
        return f"[{label}] {speaker}"
    return speaker


def human_message(
    message: StoredMessage,
    attachment: AttachmentInfo | None,
    group_name: str | None,
    *,
    with_status: bool = False,
) -> str:
    """One message for people: time, who, text, file, status, id (the last word)."""
    parts = [format_time(message.sent_at), _who(message, group_name) + ":"]
    if message.deleted:
        parts.append("(deleted)")
    elif message.type == "group":
        parts.append("(group change)")
    elif message.type == "timer":
        parts.append(f"(disappearing-message timer set to {message.text or '?'})")
    elif message.type in NOTICE_TYPES:
        parts.append("(notice)")
    if attachment is not None:
        parts.append(
            f"[file {clean(attachment.name, newlines=False)}, {attachment.size} bytes, "
            f"{clean(attachment.mime, newlines=False)}]"
        )
    if message.text and message.type not in ("timer", "group") and not message.deleted:
        parts.append(clean(message.text))
    if message.edited:
        parts.append("(edited)")
    if with_status:
        parts.append(f"[{message.status}]")
    parts.append(f"id {message.id}")
    return " ".join(parts)


# -- receive events ----------------------------------------------------------------------


def receipt_record(
    status: str, message_ids: Sequence[str], sender: str | None, device: int | None, chat: str
) -> dict[str, Any]:
    """A ``receipt`` (delivered/read, from ``sender``) or ``sent`` (the relay took it)."""
    group = chat.removeprefix("group:") if chat.startswith("group:") else None
    if status == "sent":
        return {"type": "sent", "message_ids": list(message_ids), "chat": chat, "group": group}
    return {
        "type": "receipt",
        "status": status,
        "message_ids": list(message_ids),
        "sender": sender,
        "device": device,
        "chat": chat,
        "group": group,
    }


def human_receipt(status: str, message_ids: Sequence[str], sender: str | None) -> str:
    """``delivered to bob: <ids>`` / ``read by bob: <ids>`` / ``sent: <ids>``."""
    ids = " ".join(message_ids)
    if status == "sent":
        return f"sent: {ids}"
    if status == "read":
        return f"read by {sender}: {ids}"
    return f"delivered to {sender}: {ids}"


def group_event_record(event: GroupChanged) -> dict[str, Any]:
    """The ``group`` record of a membership change."""
    return {
        "type": "group",
        "group": event.group_id,
        "action": event.action,
        "by": event.by,
        "name": event.name,
        "members": list(event.members),
        "admins": list(event.admins),
        "targets": list(event.targets),
    }


def human_group_event(event: GroupChanged) -> str:
    """A group change for people."""
    name = f'"{clean(event.name, newlines=False)}" ({event.group_id})'
    targets = ", ".join(event.targets)
    if event.action == "create":
        return f"{event.by} created group {name} with {', '.join(event.members)}"
    if event.action == "add":
        return f"{event.by} added {targets} to group {name}"
    if event.action == "remove":
        return f"{event.by} removed {targets} from group {name}"
    if event.action == "leave":
        return f"{event.by} left group {name}"
    if event.action == "sync":
        return f"another of our devices shared group {name} with {', '.join(event.members)}"
    return f"{event.by} renamed group {event.group_id} to {name}"


def identity_record(event: IdentityChanged) -> dict[str, Any]:
    """The ``identity_change`` record: a new contact key or a changed one."""
    return {
        "type": "identity_change",
        "user": event.user,
        "device": event.device,
        "first_use": event.first_use,
        "held": event.held,
    }


def human_identity(event: IdentityChanged) -> str:
    """An identity change for people, with the command that resolves it."""
    if event.held:
        return (
            f"WARNING: the identity key of {event.user} (device {event.device}) changed; "
            f"sending to {event.user} is held until you run: blindpost trust {event.user}"
        )
    if event.first_use:
        return (
            f"new contact {event.user} (device {event.device}); compare safety numbers "
            f"with: blindpost safety-number {event.user}"
        )
    return f"the identity key of {event.user} (device {event.device}) changed"


def gap_record(event: GapDetected) -> dict[str, Any]:
    """The ``gap`` record: messages from a sender that never arrived."""
    chat = event.chat_id
    return {
        "type": "gap",
        "chat": event.chat_id,
        "group": chat.removeprefix("group:") if chat.startswith("group:") else None,
        "user": event.user,
        "device": event.device,
        "missed": event.missed,
    }


def human_gap(event: GapDetected) -> str:
    """A gap for people."""
    return f"WARNING: {event.missed} message(s) from {event.user} in {event.chat_id} never arrived"


def error_record(event: DecryptionProblem) -> dict[str, Any]:
    """The ``error`` record: a message that could not be decrypted or read."""
    return {
        "type": "error",
        "user": event.user,
        "device": event.device,
        "group": event.group_id,
        "error": event.error,
        "explanation": event.explanation,
        "repair": event.repair,
    }


def human_error(event: DecryptionProblem) -> str:
    """A decryption problem for people."""
    return (
        f"ERROR: a message from {event.user} (device {event.device}) could not be read: "
        f"{clean(event.explanation, newlines=False)}"
    )


def change_record(event: MessageChanged) -> dict[str, Any]:
    """The ``change`` record: a message was edited, deleted, reacted to or expired."""
    return {
        "type": "change",
        "id": event.message_id,
        "chat": event.chat_id,
        "change": event.change,
        "by": event.by,
    }


def human_change(event: MessageChanged) -> str:
    """A message change for people."""
    return f"{event.by} {event.change} message {event.message_id} in {event.chat_id}"
