"""Group rules: who may change a group, what the new state is, when keys rotate.

Invariants:

* A group change is accepted only from an admin in our state of the group,
  with a higher revision (never backwards); a member may always leave. We
  learn about a group only by being created into it or added to it by one of
  the admins the change itself names.
* The admins of a group are members of it.
* Whenever a member is removed or leaves, our Sender Key of the group rotates
  (they must not read what we send next) and their Sender Keys are dropped;
  when we are no longer a member, every member's Sender Key is dropped.
* Group changes travel pairwise only; a Sender Key distribution is accepted
  only from a member.
* Every accepted change (not a Sender Key) is kept in its chat's history as a
  ``group`` row: ``sender`` is who made it and ``text`` what changed
  (:func:`describe_change`), so every client can say so after a restart.
* Pure: reads through the view, writes into the outcome.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Final, Literal

from e2ee.errors import InvalidMessage, NotAdmin, NotAMember, UsageError
from e2ee.events import GroupChanged
from e2ee.messaging import keys
from e2ee.messaging.outcome import ForgetSenders, Outcome, ProcessSenderKey, RotateGroupKey
from e2ee.messaging.rows import (
    AppRow,
    ChatRow,
    GroupRow,
    MemberRow,
    UserRow,
    dumps,
    group_chat_id,
)
from e2ee.messaging.view import HistoryView
from e2ee.payload import GroupAction, GroupControl
from e2ee.store.protocols import Address

__all__ = [
    "GroupChange",
    "apply_group_control",
    "describe_change",
    "group_rows",
    "plan_group_change",
]

_ACTION_NAMES: Final[dict[GroupAction, Literal["create", "add", "remove", "leave", "rename"]]] = {
    GroupAction.CREATE: "create",
    GroupAction.ADD: "add",
    GroupAction.REMOVE: "remove",
    GroupAction.LEAVE: "leave",
    GroupAction.RENAME: "rename",
}


def describe_change(action: GroupAction, name: str, targets: Sequence[str]) -> str | None:
    """What a group change did, as its history row says it (who did it is the sender).

    Args:
        action: the change.
        name: the group's name after it.
        targets: the members it added or removed (who left, for a leave).

    Returns:
        A phrase such as ``renamed the group to 'climbers'`` or ``added bob,
        carol``; None for a Sender Key, which changes nothing people see.
    """
    who = ", ".join(targets) or "nobody"
    match action:
        case GroupAction.CREATE:
            return f"created the group '{name}'"
        case GroupAction.ADD:
            return f"added {who}"
        case GroupAction.REMOVE:
            return f"removed {who}"
        case GroupAction.LEAVE:
            return "left the group"
        case GroupAction.RENAME:
            return f"renamed the group to '{name}'"
    return None


def group_rows(
    view: HistoryView, me: str, gid: str, control: GroupControl, by: str, now: int
) -> list[AppRow]:
    """Rows for the group's state after ``control`` (group, roles, users, its chat)."""
    current = view.get(GroupRow, gid)
    rows: list[AppRow] = [
        GroupRow(
            gid,
            name=control.name,
            admins=dumps(list(control.admins)),
            revision=control.revision,
            created_by=(current.created_by if current else None) or by,
            member=1 if me in control.members else 0,
            created_at=(current.created_at if current else None) or now,
        )
    ]
    previous = view.group_members(gid)
    for user in sorted(set(previous) | set(control.members)):
        role = "gone"
        if user in control.members:
            role = "admin" if user in control.admins else "member"
        rows.append(MemberRow(f"{gid}:{user}", gid, user, role))
        rows.append(UserRow(user, created_at=now))
    chat_id = group_chat_id(gid)
    if view.get(ChatRow, chat_id) is None:
        rows.append(ChatRow(chat_id, "group", group_id=gid, last_message_at=now, created_at=now))
    return rows


@dataclasses.dataclass(frozen=True, slots=True)
class GroupChange:
    """A change we make: the control to send, to whom, and who leaves."""

    control: GroupControl
    recipients: tuple[str, ...]
    gone: tuple[str, ...]


def plan_group_change(
    group: GroupRow | None,
    members: dict[str, str],
    me: str,
    gid: str,
    action: GroupAction,
    user: str | None,
    name: str | None,
) -> GroupChange:
    """The change we send for ``action`` (add, remove, rename, leave).

    Raises:
        NotAMember: we are not in the group.
        NotAdmin: we are not an admin of it (and are not leaving).
        UsageError: ``user`` is not a member (remove, leave).
    """
    if group is None or not group.member:
        raise NotAMember(gid)
    admins = tuple(json.loads(group.admins or "[]"))
    if action is not GroupAction.LEAVE and me not in admins:
        raise NotAdmin(gid)
    new_members = set(members)
    targets: tuple[str, ...] = ()
    if action is GroupAction.ADD and user:
        new_members.add(user)
        targets = (user,)
    elif action in (GroupAction.REMOVE, GroupAction.LEAVE) and user:
        if user not in new_members:
            raise UsageError(f"{user} is not a member")
        new_members.discard(user)
        targets = (user,)
    control = GroupControl(
        action,
        name=name if name is not None else (group.name or ""),
        members=tuple(sorted(new_members)),
        admins=tuple(a for a in admins if a in new_members),
        revision=(group.revision or 0) + 1,
        targets=targets,
    )
    recipients = tuple(sorted((set(members) | new_members) - {me}))
    gone = targets if action in (GroupAction.REMOVE, GroupAction.LEAVE) else ()
    return GroupChange(control, recipients, gone)


def _forget(view: HistoryView, gid: str, users: list[str] | set[str]) -> ForgetSenders:
    senders = tuple(Address(u, d) for u in sorted(users) for d in view.devices(u))
    return ForgetSenders(gid, senders)


def apply_group_control(
    view: HistoryView,
    out: Outcome,
    me: str,
    sender: Address,
    gid: str,
    control: GroupControl,
    now: int,
) -> GroupChanged | None:
    """Apply a group change (or Sender Key) a member sent us pairwise.

    Returns:
        The change to report (the caller adds its history row and emits it),
        or None: a Sender Key, or a change the rules ignore.

    Raises:
        InvalidMessage: a Sender Key from someone who is not a member.
    """
    group = view.get(GroupRow, gid)
    action = control.action
    if action is GroupAction.SENDER_KEY:
        if group is None or sender.name not in view.group_members(gid):
            raise InvalidMessage("sender key from someone who is not a member")
        out.follow_ups.append(ProcessSenderKey(gid, sender, control.distribution))
        return None
    revision = (group.revision or 0) if group else 0
    admins = set(json.loads(group.admins or "[]")) if group else set()
    members: set[str] = set(view.group_members(gid)) if group else set()
    if group is None:
        # We learn about a group by being created into it or added to it; the
        # sender must be an admin of the state it sends.
        joining = action in (GroupAction.CREATE, GroupAction.ADD)
        if not joining or sender.name not in control.admins or me not in control.members:
            return None
    elif action is GroupAction.CREATE:
        return None  # a group id is created once
    elif action is GroupAction.LEAVE:
        if control.targets != (sender.name,) or sender.name not in members:
            return None
    elif sender.name not in admins or control.revision <= revision:
        return None  # only admins change a group, and never backwards
    if not set(control.admins) <= set(control.members) and action is not GroupAction.LEAVE:
        return None
    if action is GroupAction.LEAVE:
        control = dataclasses.replace(
            control,
            members=tuple(sorted(members - {sender.name})),
            admins=tuple(sorted(admins - {sender.name})),
            name=(group.name or "") if group else control.name,
            revision=max(revision + 1, control.revision),
        )
    out.rows.extend(group_rows(view, me, gid, control, sender.name, now))
    gone = [u for u in members if u not in control.members]
    if gone:
        # A member left or was removed: they must not read what we send next.
        out.follow_ups.append(RotateGroupKey(gid))
        generation = keys.key_generation(gid)
        out.counters[generation] = (out.counter(view, generation) or 0) + 1
        out.follow_ups.append(_forget(view, gid, gone))
    if me not in control.members:
        out.follow_ups.append(_forget(view, gid, members))
    return GroupChanged(
        gid,
        _ACTION_NAMES[action],
        sender.name,
        control.name,
        control.members,
        control.admins,
        control.targets,
    )
