"""Group operations started on this device: create, add, remove, rename, leave.

Invariants:

* The rules (who may change what, the new state) live in
  :mod:`e2ee.messaging.groups`; the new state is committed with the outgoing
  change, which travels pairwise to everyone in the old and the new member list.
* Our Sender Key is rotated whenever a member is removed or leaves, so they
  cannot read what we send afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from e2ee.client.context import ClientContext
from e2ee.client.outbox import Outbox
from e2ee.errors import TransportError, UsageError
from e2ee.messaging import keys
from e2ee.messaging.groups import GroupChange, group_rows, plan_group_change
from e2ee.messaging.rows import AppRow, GroupRow, group_chat_id
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
            ctx.commit(group_rows(ctx.view(), me, gid, control, me, ctx.now_ms()), {})

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

    def plan() -> tuple[GroupChange, list[AppRow]]:
        with ctx.wlock:
            view = ctx.view()
            change = plan_group_change(
                view.get(GroupRow, gid), view.group_members(gid), me, gid, action, user, name
            )
            return change, group_rows(view, me, gid, change.control, me, ctx.now_ms())

    change, rows = await asyncio.to_thread(plan)
    await outbox.queue(
        group_chat_id(gid),
        PayloadType.GROUP,
        wait=True,
        group=change.control,
        group_targets=change.recipients,
        extra_rows=rows,
    )
    if change.gone:
        await asyncio.to_thread(_rotate_group_key, ctx, gid, change.gone)


def _rotate_group_key(ctx: ClientContext, gid: str, gone: Sequence[str]) -> None:
    """Forget our Sender Key (a new one is made and distributed on next send)."""
    with ctx.wlock:
        ctx.engine.group_rotate(gid)
        for user in gone:
            for device in ctx.known_devices(user):
                ctx.engine.group_forget_sender(gid, Address(user, device))
        generation = keys.key_generation(gid)
        ctx.commit([], {generation: ctx.counter(generation) + 1})
