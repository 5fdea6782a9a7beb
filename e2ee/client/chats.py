"""Deleting a chat's local history.

Invariants:

* A chat's messages, their attachments (keys included), receipts, reactions,
  its participants, its outbox entries (other than receipts) and the chat row
  go in one transaction, under the write lock: all of them or nothing. The
  search index follows through its triggers. Other chats are not touched.
* Group state (membership, Sender Keys) and the per-sender counters stay, so a
  later message is neither refused nor reported as a gap; it starts the chat
  anew (the rules create a chat row for a message to a chat that has none).
* A group we are still a member of is refused (``StillAMember``): leaving is
  the group operation, deleting only forgets what is kept here.
"""

from __future__ import annotations

from e2ee.client.context import ClientContext
from e2ee.errors import StillAMember, UnknownChat
from e2ee.messaging.chats import group_id_of
from e2ee.messaging.rows import ChatRow, GroupRow
from e2ee.store import Changes

__all__ = ["delete_chat_sync"]


def delete_chat_sync(ctx: ClientContext, chat_id: str) -> list[str]:
    """Delete a chat's local history in one transaction (blocking).

    Returns:
        The ids of the chat's outbox entries that were removed (their waiting
        senders must be told the message will not go out).

    Raises:
        UnknownChat: no chat ``chat_id`` in history.
        StillAMember: a group chat of a group we are still a member of.
        StorageError: nothing was deleted.
    """
    with ctx.wlock:
        view = ctx.view()
        if view.get(ChatRow, chat_id) is None:
            raise UnknownChat(chat_id)
        gid = group_id_of(chat_id)
        if gid is not None:
            group = view.get(GroupRow, gid)
            if group is not None and group.member:
                raise StillAMember(gid)
        doomed = ctx.history.chat_row_ids(chat_id)
        ctx.store.commit(Changes(app_rows_delete=frozenset(doomed)))
        return [row_id for table, row_id in doomed if table == "outbox"]
