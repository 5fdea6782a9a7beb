"""The messaging rules without I/O: two in-memory histories, no relay, no event loop.

Each test composes on one side (``compose``), carries the encoded payload by
hand, and applies it on the other (``apply_payload``), as the client's outbox
and inbox would after encrypting and decrypting it.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from e2ee import payload
from e2ee.client_errors import NotAdmin
from e2ee.errors import InvalidMessage, NoSession
from e2ee.events import (
    DecryptionProblem,
    GapDetected,
    GroupChanged,
    MessageChanged,
    ReceiptUpdated,
)
from e2ee.messaging.accounting import undecryptable
from e2ee.messaging.compose import Draft, compose
from e2ee.messaging.groups import describe_change, group_rows, plan_group_change
from e2ee.messaging.inbound import HANDLERS, apply_payload
from e2ee.messaging.memory import MemoryHistory
from e2ee.messaging.outcome import ForgetSenders, Outcome, ResetSession, RotateGroupKey
from e2ee.messaging.rows import ROW_TYPES, TABLES, GroupRow, MessageRow, OutboxRow
from e2ee.payload import GroupAction, GroupControl, Payload, PayloadType
from e2ee.store.protocols import Address

ALICE = Address("alice", 1)
BOB = Address("bob", 1)
CAROL = Address("carol", 1)
_ids = itertools.count(1)


def new_id() -> bytes:
    return next(_ids).to_bytes(16, "big")


def send(history: MemoryHistory, me: Address, draft: Draft, now: int = 1000) -> Payload:
    """Compose on the sender's side, commit it there, return what goes on the wire."""
    composed = compose(history, me, draft, now, new_id())
    history.commit(composed.outcome)
    outbox = next(r for r in composed.outcome.rows if isinstance(r, OutboxRow))
    assert outbox.payload is not None
    return payload.decode(outbox.payload)


def receive(
    history: MemoryHistory, me: str, sender: Address, body: Payload, now: int = 2000
) -> Outcome:
    out = apply_payload(history, me, sender, body, via_group=False, now=now)
    history.commit(out)
    return out


def test_every_payload_type_has_exactly_one_handler() -> None:
    assert set(HANDLERS) == set(PayloadType)


def test_typed_rows_have_exactly_the_columns_of_their_tables() -> None:
    assert set(ROW_TYPES) == set(TABLES)
    for table, kind in ROW_TYPES.items():
        assert [f.name for f in dataclasses.fields(kind)] == list(TABLES[table])


def test_a_message_arrives_once_and_counts_in_order() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    first = send(alice, ALICE, Draft("bob", PayloadType.TEXT, text="one"))
    second = send(alice, ALICE, Draft("bob", PayloadType.TEXT, text="two"))
    assert (first.counter, second.counter) == (1, 2)
    receive(bob, "bob", ALICE, first)
    again = receive(bob, "bob", ALICE, first)  # a duplicate changes nothing
    assert again.events == [] and again.rows == []
    out = receive(bob, "bob", ALICE, second)
    assert not any(isinstance(e, GapDetected) for e in out.events)
    assert [m.text for m in bob.messages("dm:alice")] == ["one", "two"]


def test_a_missing_message_is_reported_as_a_gap_exactly() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    sent = [send(alice, ALICE, Draft("bob", PayloadType.TEXT, text=str(i))) for i in range(4)]
    receive(bob, "bob", ALICE, sent[0])
    out = receive(bob, "bob", ALICE, sent[3])
    gaps = [e for e in out.events if isinstance(e, GapDetected)]
    assert [g.missed for g in gaps] == [2]
    assert [m.type for m in bob.messages("dm:alice")] == ["text", "gap", "text"]


def test_a_late_message_takes_its_place_and_shrinks_the_gap() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    sent = [send(alice, ALICE, Draft("bob", PayloadType.TEXT, text=str(i))) for i in range(4)]
    receive(bob, "bob", ALICE, sent[0])
    receive(bob, "bob", ALICE, sent[3])  # 2 missing: "1" and "2"
    out = receive(bob, "bob", ALICE, sent[2])  # "2" arrives late
    assert not any(isinstance(e, GapDetected) for e in out.events)
    changed = [e for e in out.events if isinstance(e, MessageChanged)]
    assert [(c.change, c.message and c.message.text) for c in changed] == [
        ("edited", "1 message from alice never arrived")
    ]
    assert [(m.type, m.text) for m in bob.messages("dm:alice")] == [
        ("text", "0"),
        ("gap", "1 message from alice never arrived"),
        ("text", "2"),
        ("text", "3"),
    ]
    receive(bob, "bob", ALICE, sent[1])  # the last one missing: the notice goes
    visible = [m.text for m in bob.messages("dm:alice") if not m.deleted]
    assert visible == ["0", "1", "2", "3"]
    # The sender's counter was not moved back: the next message is no gap.
    later = send(alice, ALICE, Draft("bob", PayloadType.TEXT, text="4"))
    assert not any(isinstance(e, GapDetected) for e in receive(bob, "bob", ALICE, later).events)


def test_an_old_counter_outside_any_gap_is_a_fresh_start() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    sent = [send(alice, ALICE, Draft("bob", PayloadType.TEXT, text=str(i))) for i in range(3)]
    for body in sent:
        receive(bob, "bob", ALICE, body)
    reinstalled = MemoryHistory()  # alice's new installation counts from 1 again
    fresh = send(reinstalled, ALICE, Draft("bob", PayloadType.TEXT, text="new"))
    assert fresh.counter == 1
    receive(bob, "bob", ALICE, fresh)
    following = send(reinstalled, ALICE, Draft("bob", PayloadType.TEXT, text="next"))
    out = receive(bob, "bob", ALICE, following)
    assert not any(isinstance(e, GapDetected) for e in out.events)
    assert [m.text for m in bob.messages("dm:alice")][-2:] == ["new", "next"]


def test_an_undecryptable_message_is_not_also_a_gap() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    sent = [send(alice, ALICE, Draft("bob", PayloadType.TEXT, text=str(i))) for i in range(3)]
    receive(bob, "bob", ALICE, sent[0])
    problem = undecryptable(
        bob, ALICE, "ab" * 16, NoSession("alice.1"), group_id=None, now=100, repair_interval_ms=10
    )
    bob.commit(problem)
    assert isinstance(problem.events[0], DecryptionProblem)
    assert problem.follow_ups == [ResetSession(ALICE)]
    out = receive(bob, "bob", ALICE, sent[2])
    assert not any(isinstance(e, GapDetected) for e in out.events)
    # A second failure within the repair interval repairs nothing more.
    again = undecryptable(
        bob, ALICE, "cd" * 16, NoSession("alice.1"), group_id=None, now=105, repair_interval_ms=10
    )
    assert again.follow_ups == []


def test_only_the_author_edits_or_deletes() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    msg = send(alice, ALICE, Draft("bob", PayloadType.TEXT, text="hi"))
    receive(bob, "bob", ALICE, msg)
    forged = Payload(
        type=PayloadType.EDIT,
        message_id=new_id(),
        sent_at_ms=1,
        text="forged",
        target_ids=(msg.message_id,),
    )
    assert receive(bob, "bob", CAROL, forged).rows == []
    delete = send(
        alice,
        ALICE,
        Draft("bob", PayloadType.DELETE, target_ids=(msg.message_id,), store_row=False),
    )
    out = receive(bob, "bob", ALICE, delete)
    assert [e.change for e in out.events if isinstance(e, MessageChanged)] == ["deleted"]
    stored = bob.messages("dm:alice")[0]
    assert stored.deleted and stored.text is None


def _group(
    history: MemoryHistory, me: str, gid: str, admins: tuple[str, ...], members: tuple[str, ...]
) -> None:
    control = GroupControl(GroupAction.CREATE, name="g", members=members, admins=admins, revision=1)
    history.put(group_rows(history, me, gid, control, admins[0], 1))


def test_a_non_admin_cannot_change_a_group_and_removal_rotates_the_key() -> None:
    bob = MemoryHistory(devices={"carol": [1, 2]})
    _group(bob, "bob", "g1", ("alice",), ("alice", "bob", "carol"))
    with pytest.raises(NotAdmin):
        plan_group_change(
            bob.get(GroupRow, "g1"),
            bob.group_members("g1"),
            "bob",
            "g1",
            GroupAction.ADD,
            "dave",
            None,
        )
    by_carol = GroupControl(
        GroupAction.REMOVE,
        name="g",
        members=("bob", "carol"),
        admins=("carol",),
        revision=2,
        targets=("alice",),
    )
    body = Payload(
        type=PayloadType.GROUP, message_id=new_id(), sent_at_ms=1, group_id="g1", group=by_carol
    )
    assert receive(bob, "bob", CAROL, body).events == []  # carol is not an admin
    by_alice = GroupControl(
        GroupAction.REMOVE,
        name="g",
        members=("alice", "bob"),
        admins=("alice",),
        revision=2,
        targets=("carol",),
    )
    body = Payload(
        type=PayloadType.GROUP, message_id=new_id(), sent_at_ms=1, group_id="g1", group=by_alice
    )
    out = receive(bob, "bob", ALICE, body)
    assert any(isinstance(e, GroupChanged) for e in out.events)
    assert RotateGroupKey("g1") in out.follow_ups
    assert ForgetSenders("g1", (Address("carol", 1), Address("carol", 2))) in out.follow_ups
    assert set(bob.group_members("g1")) == {"alice", "bob"}


def test_group_changes_travel_pairwise_only() -> None:
    bob = MemoryHistory()
    _group(bob, "bob", "g1", ("alice",), ("alice", "bob"))
    control = GroupControl(
        GroupAction.RENAME, name="x", members=("alice", "bob"), admins=("alice",), revision=2
    )
    body = Payload(
        type=PayloadType.GROUP, message_id=new_id(), sent_at_ms=1, group_id="g1", group=control
    )
    with pytest.raises(InvalidMessage):
        apply_payload(bob, "bob", ALICE, body, via_group=True, now=1)


def test_describe_change_says_what_changed() -> None:
    assert describe_change(GroupAction.CREATE, "crew", ()) == "created the group 'crew'"
    assert describe_change(GroupAction.ADD, "crew", ("bob", "dave")) == "added bob, dave"
    assert describe_change(GroupAction.REMOVE, "crew", ("carol",)) == "removed carol"
    assert describe_change(GroupAction.LEAVE, "crew", ("carol",)) == "left the group"
    assert describe_change(GroupAction.RENAME, "club", ()) == "renamed the group to 'club'"
    assert describe_change(GroupAction.SENDER_KEY, "club", ()) is None


def _group_payload(control: GroupControl) -> Payload:
    return Payload(
        type=PayloadType.GROUP, message_id=new_id(), sent_at_ms=5, group_id="g1", group=control
    )


def test_group_changes_are_kept_in_history_with_who_and_what() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    _group(bob, "bob", "g1", ("alice",), ("alice", "bob", "carol"))
    _group(alice, "alice", "g1", ("alice",), ("alice", "bob", "carol"))
    # Alice renames: her own row says what she did, with her as the sender.
    plan = plan_group_change(
        alice.get(GroupRow, "g1"),
        alice.group_members("g1"),
        "alice",
        "g1",
        GroupAction.RENAME,
        None,
        "club",
    )
    composed = compose(
        alice, ALICE, Draft("group:g1", PayloadType.GROUP, group=plan.control), 1000, new_id()
    )
    assert composed.stored is not None and composed.stored.type == "group"
    assert (composed.stored.sender, composed.stored.text) == (
        "alice",
        "renamed the group to 'club'",
    )
    alice.commit(composed.outcome)
    outbox = next(r for r in composed.outcome.rows if isinstance(r, OutboxRow))
    assert outbox.payload is not None
    body = payload.decode(outbox.payload)
    assert body.text == ""  # the description is ours to make, never sent

    # Bob keeps the same words, with alice as the sender, stored read, in the chat.
    out = receive(bob, "bob", ALICE, body)
    changed = next(e for e in out.events if isinstance(e, GroupChanged))
    assert changed.notice is not None
    assert (changed.notice.sender, changed.notice.type) == ("alice", "group")
    assert changed.notice.text == "renamed the group to 'club'"
    assert changed.notice.chat_id == "group:g1" and changed.notice.read_at is not None
    assert bob.get(MessageRow, changed.notice.id) is not None

    # A member leaving is a row too; a change the rules refuse leaves none.
    leave = _group_payload(
        GroupControl(
            GroupAction.LEAVE,
            name="club",
            members=("alice", "bob"),
            admins=("alice",),
            revision=3,
            targets=("carol",),
        )
    )
    left = next(e for e in receive(bob, "bob", CAROL, leave).events if isinstance(e, GroupChanged))
    assert left.notice is not None and (left.notice.sender, left.notice.text) == (
        "carol",
        "left the group",
    )
    refused = _group_payload(
        GroupControl(
            GroupAction.ADD,
            name="club",
            members=("alice", "bob", "eve"),
            admins=("carol",),
            revision=9,
            targets=("eve",),
        )
    )
    before = bob.messages("group:g1")
    assert receive(bob, "bob", CAROL, refused).events == []
    assert bob.messages("group:g1") == before and len(before) == 2
    # The same change delivered again adds no second row and reports nothing.
    assert receive(bob, "bob", ALICE, body).events == []
    assert bob.messages("group:g1") == before


def test_change_and_receipt_events_carry_the_committed_state() -> None:
    alice, bob = MemoryHistory(), MemoryHistory()
    msg = send(alice, ALICE, Draft("bob", PayloadType.TEXT, text="hi"))
    receive(bob, "bob", ALICE, msg)
    mid = msg.message_id
    edit = send(
        alice,
        ALICE,
        Draft("bob", PayloadType.EDIT, text="hi!", target_ids=(mid,), store_row=False),
    )
    (edited,) = [
        e for e in receive(bob, "bob", ALICE, edit).events if isinstance(e, MessageChanged)
    ]
    assert edited.message is not None and edited.message == bob.messages("dm:alice")[0]
    assert (edited.message.text, edited.message.edited, edited.reaction) == ("hi!", True, None)
    # Bob reacts, then takes it back: alice learns who reacted with what.
    for emoji in ("👍", ""):
        react = send(
            bob,
            BOB,
            Draft(
                "alice", PayloadType.REACTION, reaction=emoji, target_ids=(mid,), store_row=False
            ),
        )
        (reacted,) = [
            e for e in receive(alice, "alice", BOB, react).events if isinstance(e, MessageChanged)
        ]
        assert (reacted.change, reacted.by, reacted.reaction) == ("reaction", "bob", emoji)
        assert reacted.message is not None and reacted.message.id == mid.hex()
    # A read receipt says the message's best status after it.
    receipt = Payload(
        type=PayloadType.RECEIPT,
        message_id=new_id(),
        sent_at_ms=1,
        receipt=payload.ReceiptKind.READ,
        target_ids=(mid,),
    )
    (updated,) = [
        e for e in receive(alice, "alice", BOB, receipt).events if isinstance(e, ReceiptUpdated)
    ]
    assert (updated.status, updated.message_status) == ("read", "read")
    # A delivered receipt overtaken by the read one moves nothing: no event, no row.
    late = dataclasses.replace(receipt, message_id=new_id(), receipt=payload.ReceiptKind.DELIVERED)
    out = receive(alice, "alice", BOB, late)
    assert out.events == [] and out.rows == []
    assert alice.messages("dm:bob")[0].status == "read"
