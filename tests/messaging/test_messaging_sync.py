"""Linked devices in the pure layer: transcripts and sync messages between our devices.

alice has two devices (``ALICE1``, ``ALICE2``), each with its own in-memory
history; bob has one. What one device composes is carried by hand, as the
outbox would send it: the payload to bob, a transcript to the other device.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2ee import payload
from e2ee.errors import InvalidMessage, UnsupportedPayload, UsageError
from e2ee.events import GroupChanged, MessageChanged, MessageStored, ReceiptUpdated
from e2ee.messaging.compose import Draft, compose
from e2ee.messaging.groups import group_rows
from e2ee.messaging.inbound import apply_payload
from e2ee.messaging.memory import MemoryHistory
from e2ee.messaging.outcome import AnswerSyncRequest, ApplyTrust, Outcome, WakeOutbox
from e2ee.messaging.rows import ChatRow, GroupRow, OutboxRow, UserRow
from e2ee.messaging.sync import (
    SYNC_CHAT,
    apply_sync,
    contact_of,
    group_of,
    sync_entry,
    sync_messages,
    transcript_for,
    trust_changes,
)
from e2ee.payload import (
    GroupAction,
    GroupControl,
    Payload,
    PayloadType,
    ReceiptKind,
    SyncContact,
    SyncGroup,
    SyncIdentity,
    SyncKind,
    SyncMessage,
    Transcript,
)
from e2ee.store.protocols import Address

ALICE1 = Address("alice", 1)
ALICE2 = Address("alice", 2)
BOB = Address("bob", 1)
_ids = itertools.count(1)
KEY_A = b"\x05" + bytes(range(32))
KEY_B = b"\x05" + bytes(range(1, 33))


def new_id() -> bytes:
    return next(_ids).to_bytes(16, "big")


def send(history: MemoryHistory, me: Address, draft: Draft, now: int = 1000) -> Payload:
    composed = compose(history, me, draft, now, new_id())
    history.commit(composed.outcome)
    outbox = next(r for r in composed.outcome.rows if isinstance(r, OutboxRow))
    assert outbox.payload is not None
    return payload.decode(outbox.payload)


def wire(body: Payload) -> Payload:
    """What the other side decodes (every payload crosses the codec)."""
    return payload.decode(payload.encode(body))


def receive(
    history: MemoryHistory,
    me: str,
    sender: Address,
    body: Payload,
    now: int = 2000,
    *,
    via_group: bool = False,
) -> Outcome:
    out = apply_payload(history, me, sender, wire(body), via_group=via_group, now=now)
    history.commit(out)
    return out


def test_a_transcript_is_stored_on_the_other_device_as_sent_by_us() -> None:
    a1, a2, bob = MemoryHistory(), MemoryHistory(), MemoryHistory()
    body = send(a1, ALICE1, Draft("bob", PayloadType.TEXT, text="hi bob"))
    receive(bob, "bob", ALICE1, body)
    out = receive(a2, "alice", ALICE1, transcript_for("dm:bob", body))
    [mine] = a2.messages("dm:bob")
    assert (mine.sender, mine.outgoing, mine.text, mine.status) == ("alice", True, "hi bob", "sent")
    assert mine.id == body.message_id.hex() and mine.sender_device == 1
    assert [type(e) for e in out.events] == [MessageStored]
    assert not any(isinstance(f, WakeOutbox) for f in out.follow_ups)  # no delivered receipt
    again = receive(a2, "alice", ALICE1, transcript_for("dm:bob", body))
    assert again.rows == [] and len(a2.messages("dm:bob")) == 1


def test_the_peers_receipts_then_move_the_transcribed_message_on() -> None:
    a1, a2 = MemoryHistory(), MemoryHistory()
    body = send(a1, ALICE1, Draft("bob", PayloadType.TEXT, text="hi"))
    receive(a2, "alice", ALICE1, transcript_for("dm:bob", body))
    read = Payload(
        PayloadType.RECEIPT, new_id(), 3000, target_ids=(body.message_id,), receipt=ReceiptKind.READ
    )
    for history in (a1, a2):
        out = receive(history, "alice", BOB, read)
        assert [e.status for e in out.events if isinstance(e, ReceiptUpdated)] == ["read"]
        assert history.messages("dm:bob")[0].status == "read"


def test_edits_reactions_and_deletes_of_our_messages_follow_by_transcript() -> None:
    a1, a2 = MemoryHistory(), MemoryHistory()
    body = send(a1, ALICE1, Draft("bob", PayloadType.TEXT, text="first"))
    receive(a2, "alice", ALICE1, transcript_for("dm:bob", body))
    edit = send(
        a1, ALICE1, Draft("bob", PayloadType.EDIT, text="second", target_ids=(body.message_id,))
    )
    receive(a2, "alice", ALICE1, transcript_for("dm:bob", edit))
    assert a2.messages("dm:bob")[0].text == "second"
    delete = send(a1, ALICE1, Draft("bob", PayloadType.DELETE, target_ids=(body.message_id,)))
    receive(a2, "alice", ALICE1, transcript_for("dm:bob", delete))
    assert a2.messages("dm:bob")[0].deleted


def test_our_own_group_message_from_the_other_device_is_ours() -> None:
    a2 = MemoryHistory()
    control = GroupControl(GroupAction.CREATE, "g", ("alice", "bob"), ("alice",), 1)
    a2.put(group_rows(a2, "alice", "g1", control, "alice", 1))
    body = Payload(PayloadType.TEXT, new_id(), 5, counter=1, group_id="g1", text="to all")
    receive(a2, "alice", ALICE1, body, via_group=True)
    [mine] = a2.messages("group:g1")
    assert (mine.sender, mine.outgoing, mine.text) == ("alice", True, "to all")


def test_a_group_we_create_on_one_device_appears_on_the_other() -> None:
    a1, a2 = MemoryHistory(), MemoryHistory()
    control = GroupControl(GroupAction.CREATE, "climbers", ("alice", "bob"), ("alice",), 1)
    a1.put(group_rows(a1, "alice", "g1", control, "alice", 1))
    body = send(
        a1, ALICE1, Draft("group:g1", PayloadType.GROUP, group=control, group_targets=["bob"])
    )
    out = receive(a2, "alice", ALICE1, transcript_for("group:g1", body))
    assert any(isinstance(e, GroupChanged) for e in out.events)
    group = a2.get(GroupRow, "g1")
    assert group is not None and group.member == 1 and group.name == "climbers"
    assert set(a2.group_members("g1")) == {"alice", "bob"}
    [notice] = a2.messages("group:g1")
    assert (notice.sender, notice.outgoing, notice.type) == ("alice", True, "group")


def test_a_read_mark_from_our_device_marks_read_and_sends_no_receipt() -> None:
    a2 = MemoryHistory()
    hello = Payload(PayloadType.TEXT, new_id(), 5, counter=1, text="hello", expire_seconds=60)
    receive(a2, "alice", BOB, hello)
    sync = SyncMessage(SyncKind.READ, message_ids=(hello.message_id,))
    out = receive(a2, "alice", ALICE1, Payload(PayloadType.SYNC, new_id(), 6, sync=sync), now=9000)
    [message] = a2.messages("dm:bob")
    assert message.read_at == 9000 and message.expires_at == 9000 + 60_000
    assert [e.change for e in out.events if isinstance(e, MessageChanged)] == ["read"]
    assert not any(isinstance(r, OutboxRow) for r in out.rows)  # no read receipt from here
    again = receive(a2, "alice", ALICE1, Payload(PayloadType.SYNC, new_id(), 7, sync=sync))
    assert again.rows == [] and again.events == []  # read stays read, once


def test_transcripts_and_sync_from_anyone_else_are_refused() -> None:
    bob_side = MemoryHistory()
    inner = Payload(PayloadType.TEXT, new_id(), 5, text="forged")
    forged = transcript_for("dm:carol", inner)
    with pytest.raises(InvalidMessage):
        receive(bob_side, "alice", BOB, forged)
    sync = Payload(PayloadType.SYNC, new_id(), 5, sync=SyncMessage(SyncKind.REQUEST))
    with pytest.raises(InvalidMessage):
        receive(bob_side, "alice", BOB, sync)
    with pytest.raises(InvalidMessage):  # not inside a group envelope either
        receive(bob_side, "alice", ALICE1, forged, via_group=True)
    assert bob_side.messages() == []


def test_contacts_sync_adds_users_and_timers_and_asks_for_trust() -> None:
    a2 = MemoryHistory()
    contact = contact_of("bob", 30, {1: (KEY_A, "verified"), 2: (KEY_B, "untrusted")})
    assert [i.device for i in contact.identities] == [1]  # only decisions travel
    out = apply_sync(a2, "alice", ALICE1, SyncMessage(SyncKind.CONTACTS, contacts=(contact,)), 5)
    a2.commit(out)
    assert a2.get(UserRow, "bob") is not None
    chat = a2.get(ChatRow, "dm:bob")
    assert chat is not None and chat.timer_seconds == 30
    assert out.follow_ups == [ApplyTrust(contact)]
    # A TRUST sync changes only trust, not the contact list.
    trust = apply_sync(a2, "alice", ALICE1, SyncMessage(SyncKind.TRUST, contacts=(contact,)), 6)
    assert trust.rows == [] and trust.follow_ups == [ApplyTrust(contact)]


def test_trust_is_taken_over_only_for_the_key_this_device_saw() -> None:
    decided = SyncContact(
        "bob", 0, (SyncIdentity(1, KEY_A, "verified"), SyncIdentity(2, KEY_A, "tofu"))
    )
    assert trust_changes({}, decided) == [(1, KEY_A, "verified"), (2, KEY_A, "tofu")]
    assert trust_changes({1: (KEY_A, "tofu")}, decided)[0] == (1, KEY_A, "verified")
    assert trust_changes({1: (KEY_A, "untrusted"), 2: (KEY_A, "tofu")}, decided) == [
        (1, KEY_A, "verified")
    ]
    assert trust_changes({1: (KEY_B, "tofu"), 2: (KEY_B, "untrusted")}, decided) == []


def test_groups_sync_moves_only_forward_and_only_into_our_groups() -> None:
    a2 = MemoryHistory()
    state = SyncGroup("g1", "climbers", ("alice", "bob"), ("alice",), 3, timer_seconds=10)
    out = apply_sync(a2, "alice", ALICE1, SyncMessage(SyncKind.GROUPS, groups=(state,)), 5)
    a2.commit(out)
    group = a2.get(GroupRow, "g1")
    assert group is not None and group.revision == 3 and group.member == 1
    chat = a2.get(ChatRow, "group:g1")
    assert chat is not None and chat.timer_seconds == 10
    older = SyncGroup("g1", "old", ("alice",), ("alice",), 2)
    assert (
        apply_sync(a2, "alice", ALICE1, SyncMessage(SyncKind.GROUPS, groups=(older,)), 6).rows == []
    )
    not_ours = SyncGroup("g2", "x", ("bob",), ("bob",), 1)
    assert (
        apply_sync(a2, "alice", ALICE1, SyncMessage(SyncKind.GROUPS, groups=(not_ours,)), 6).rows
        == []
    )
    row = a2.get(GroupRow, "g1")
    assert row is not None
    assert group_of(row, a2.group_members("g1"), 10) == state


def test_a_request_is_answered_by_the_client() -> None:
    out = apply_sync(MemoryHistory(), "alice", ALICE2, SyncMessage(SyncKind.REQUEST), 5)
    assert out.follow_ups == [AnswerSyncRequest(ALICE2)]


def test_sync_entries_go_to_our_own_devices_only() -> None:
    a1 = MemoryHistory()
    out = Outcome()
    mid = sync_entry(a1, out, "alice", SyncMessage(SyncKind.REQUEST), 5, new_id())
    [entry] = [r for r in out.rows if isinstance(r, OutboxRow)]
    assert (entry.id, entry.mode, entry.chat_id, entry.targets) == (
        mid,
        "sync",
        SYNC_CHAT,
        '["alice"]',
    )
    assert entry.payload is not None
    decoded = payload.decode(entry.payload)
    assert decoded.type is PayloadType.SYNC and decoded.sync == SyncMessage(SyncKind.REQUEST)


def test_sync_messages_split_large_lists() -> None:
    ids = [new_id() for _ in range(2500)]
    parts = sync_messages(SyncKind.READ, message_ids=ids)
    assert [len(p.message_ids) for p in parts] == [1000, 1000, 500]
    contacts = [SyncContact(f"u{i}") for i in range(250)]
    assert [len(p.contacts) for p in sync_messages(SyncKind.CONTACTS, contacts=contacts)] == [
        100,
        100,
        50,
    ]
    for part in parts:
        payload.encode(Payload(PayloadType.SYNC, new_id(), 1, sync=part))  # fits


def test_transcript_and_sync_formats_are_checked_and_versioned() -> None:
    inner = Payload(PayloadType.TEXT, new_id(), 5, text="x")
    with pytest.raises(UsageError):
        Transcript(inner)  # no destination
    with pytest.raises(UsageError):
        Transcript(inner, to_user="bob", to_group="g")
    with pytest.raises(UsageError):  # receipts and typing are not transcribed
        Transcript(Payload(PayloadType.TYPING, new_id(), 5), to_user="bob")
    with pytest.raises(UsageError):  # the transcript carries its message's own id
        Payload(PayloadType.TRANSCRIPT, new_id(), 5, transcript=Transcript(inner, to_user="bob"))
    with pytest.raises(UsageError):
        SyncMessage(SyncKind.READ)  # names no message
    # A later version of either is refused as unsupported, not misread.
    pb = payload._PB["Content"]()
    good = transcript_for("dm:bob", inner)
    payload._to_proto(good, pb)
    pb.transcript.version = 2
    data = payload.pad(bytes((payload.PAYLOAD_VERSION,)) + pb.SerializeToString())
    with pytest.raises(UnsupportedPayload):
        payload.decode(data)
    pb = payload._PB["Content"]()
    payload._to_proto(
        Payload(PayloadType.SYNC, new_id(), 5, sync=SyncMessage(SyncKind.REQUEST)), pb
    )
    pb.sync.version = 9
    data = payload.pad(bytes((payload.PAYLOAD_VERSION,)) + pb.SerializeToString())
    with pytest.raises(UnsupportedPayload):
        payload.decode(data)
    # A transcript inside a transcript does not decode.
    pb = payload._PB["Content"]()
    payload._to_proto(good, pb)
    copy = payload._PB["Transcript"]()
    copy.CopyFrom(pb.transcript)
    pb.transcript.content.transcript.CopyFrom(copy)
    data = payload.pad(bytes((payload.PAYLOAD_VERSION,)) + pb.SerializeToString())
    with pytest.raises(InvalidMessage):
        payload.decode(data)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a1", "a2", "bob"]), st.text(min_size=1, max_size=8)),
        max_size=12,
    ),
    st.randoms(use_true_random=False),
)
@settings(max_examples=60, deadline=None)
def test_alices_devices_converge_on_one_history(
    sends: list[tuple[str, str]], rnd: random.Random
) -> None:
    """Whatever alice sends from either device, and bob sends her, in any arrival order per
    device pair that keeps each sender's order: both devices end with the same messages,
    the same senders and the same directions."""
    histories = {"a1": MemoryHistory(), "a2": MemoryHistory(), "bob": MemoryHistory()}
    addresses = {"a1": ALICE1, "a2": ALICE2, "bob": BOB}
    # Per (sender, receiver): payloads in the sender's order (one mailbox each, in order).
    queues: dict[tuple[str, str], list[Payload]] = {}
    for who, text in sends:
        me = addresses[who]
        body = send(
            histories[who],
            me,
            Draft("bob" if who != "bob" else "alice", PayloadType.TEXT, text=text),
        )
        if who == "bob":
            for device in ("a1", "a2"):
                queues.setdefault((who, device), []).append(body)
        else:
            other = "a2" if who == "a1" else "a1"
            queues.setdefault((who, "bob"), []).append(body)
            queues.setdefault((who, other), []).append(transcript_for("dm:bob", body))
    # Interleave the mailboxes at random, each one in order.
    pending = {k: list(v) for k, v in queues.items()}
    while pending:
        key = rnd.choice(sorted(pending))
        sender, receiver = key
        me = "bob" if receiver == "bob" else "alice"
        receive(histories[receiver], me, addresses[sender], pending[key].pop(0))
        if not pending[key]:
            del pending[key]

    def seen(history: MemoryHistory) -> set[tuple[str, str, bool, str | None]]:
        return {(m.id, m.sender, m.outgoing, m.text) for m in history.messages("dm:bob")}

    assert seen(histories["a1"]) == seen(histories["a2"])
    assert len(seen(histories["a1"])) == len(sends)
    bob_view = {(m.id, m.sender, m.text) for m in histories["bob"].messages("dm:alice")}
    assert bob_view == {(i, s, t) for i, s, _, t in seen(histories["a1"])}
