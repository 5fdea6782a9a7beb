"""Group operations started on this device: create, add, remove, rename, leave.

Invariants:

* Only an admin in our committed group state changes a group (a member may
  always leave); the new state is committed with the outgoing change, which
  travels pairwise to everyone in the old and the new member list.
* Our Sender Key is rotated whenever a member is removed or leaves, so they
  cannot read what we send afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from e2ee.client.compose import group_rows
from e2ee.client.context import ClientContext
from e2ee.client.outbox import Outbox
from e2ee.client_errors import NotAdmin, NotAMember
from e2ee.errors import TransportError, UsageError
from e2ee.history import group_chat_id
from e2ee.payload import GroupAction, GroupControl, PayloadType
from e2ee.store import Address

__all__ = ["change_group", "create_group"]


async def create_group(
    ctx: ClientContext, outbox: Outbox, name: str, members: Sequence[str]
) -> str:
    """See :meth:`e2ee.client.Client.create_group`."""
    me = ctx.me.name
    others = sorted(set(members) - {me})
    if not others:
        raise UsageError("a group needs at least one other member")
    # Resolve every member first, so a group never holds a user that does not
    # exist. If the relay cannot be reached, the creation is queued as before and
    # the members are resolved when it is sent.
    for user in others:
        try:
            await outbox.devices(user)
        except TransportError:
            break
    gid = ctx.random_bytes(12).hex()
    everyone = tuple(sorted({*others, me}))
    control = GroupControl(
        GroupAction.CREATE, name=name, members=everyone, admins=(me,), revision=1
    )

    def commit_state() -> None:
        with ctx.wlock:
            ctx.commit(group_rows(ctx, gid, control, me), {})

    await asyncio.to_thread(commit_state)
    await outbox.queue(
        group_chat_id(gid), PayloadType.GROUP, wait=True, group=control, group_targets=others
    )
    return gid


async def change_group(
    ctx: ClientContext,
    outbox: Outbox,
    gid: str,
    action: GroupAction,
    user: str | None,
    *,
    name: str | None = None,
) -> None:
    """Add, remove, rename or leave (see the :class:`~e2ee.client.Client` methods).

    Raises:
        NotAMember: we are not in the group.
        NotAdmin: we are not an admin of it (and are not leaving).
        UsageError: ``user`` is not a member (remove, leave).
    """
    me = ctx.me.name
    group = await asyncio.to_thread(ctx.history.group, gid)
    if group is None or not group["member"]:
        raise NotAMember(gid)
    members = await asyncio.to_thread(ctx.history.group_members, gid)
    admins = tuple(json.loads(group["admins"] or "[]"))
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
    new_admins = tuple(a for a in admins if a in new_members)
    control = GroupControl(
        action,
        name=name if name is not None else (group["name"] or ""),
        members=tuple(sorted(new_members)),
        admins=new_admins,
        revision=int(group["revision"] or 0) + 1,
        targets=targets,
    )
    recipients = sorted((set(members) | new_members) - {me})
    rows = await asyncio.to_thread(group_rows, ctx, gid, control, me)
    await outbox.queue(
        group_chat_id(gid),
        PayloadType.GROUP,
        wait=True,
        group=control,
        group_targets=recipients,
        extra_rows=rows,
    )
    if action in (GroupAction.REMOVE, GroupAction.LEAVE):
        await asyncio.to_thread(_rotate_group_key, ctx, gid, targets)


def _rotate_group_key(ctx: ClientContext, gid: str, gone: Sequence[str]) -> None:
    """Forget our Sender Key (a new one is made and distributed on next send)."""
    with ctx.wlock:
        ctx.engine.group_rotate(gid)
        for user in gone:
            for device in ctx.known_devices(user):
                ctx.engine.group_forget_sender(gid, Address(user, device))
        generation = ctx.counter(f"keygen:{gid}") + 1
        ctx.commit([], {f"keygen:{gid}": generation})
