"""How `history` prints a notice row (a gap or an unreadable message) kept by the SDK."""

from __future__ import annotations

from e2ee.history import NOTICE_TYPES, StoredMessage
from tui_client.cli.output import human_message, message_record


def _notice(kind: str, text: str) -> StoredMessage:
    return StoredMessage(
        id="ab" * 16 + "." + kind,
        chat_id="dm:bob",
        group_id=None,
        sender="bob",
        sender_device=1,
        outgoing=False,
        type=kind,
        text=text,
        reply_to=None,
        quote_text=None,
        counter=0,
        sent_at=1_700_000_000_000,
        received_at=1_700_000_000_000,
        delivered_at=None,
        read_at=1_700_000_000_000,
        status="received",
        edited=False,
        deleted=False,
        expire_seconds=0,
        expires_at=None,
        seq=7,
    )


def test_notices_are_marked_for_people_and_typed_for_scripts() -> None:
    assert set(NOTICE_TYPES) == {"gap", "undecryptable"}
    for kind, text in (
        ("gap", "2 messages from bob never arrived"),
        ("undecryptable", "a message from bob could not be read: ..."),
    ):
        notice = _notice(kind, text)
        line = human_message(notice, None, None, with_status=True)
        assert "bob: (notice) " + text in line
        assert line.split()[-1] == notice.id  # the id stays the last word
        record = message_record(notice, None)
        assert (record["type"], record["kind"], record["text"]) == ("message", kind, text)
