"""The client SDK facade: an async messenger client over core, store and transport.

Invariants:

* :class:`Client` holds no rule of its own: it checks its arguments and state,
  then delegates to the module that owns the rule (composing:
  :mod:`e2ee.client.compose`; receiving: :mod:`e2ee.client.inbox`; sending:
  :mod:`e2ee.client.outbox`; groups: :mod:`e2ee.client.groups`; the relay
  connection: :mod:`e2ee.client.connection`; the data directory:
  :mod:`e2ee.client.datadir`; accounts: :mod:`e2ee.client.account`; trust:
  :mod:`e2ee.client.trust`; attachments: :mod:`e2ee.client.attachments`;
  backups and the recovery key: :mod:`e2ee.client.recovery`, ``client.recovery``;
  linked devices: :mod:`e2ee.client.devices`, ``client.devices``).
* The event loop never blocks: every SQLite access and every crypto call runs in
  ``asyncio.to_thread``; large files are encrypted and decrypted chunk by chunk.
* Time and randomness are parameters (``now_ms``, ``random_bytes``, ``jitter``).
* Secrets (keys, plaintext) never reach a repr, a log line or an exception.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType

from e2ee.client.account import (
    client_context,
    create_account_dir,
    finish_restore,
    register_account,
)
from e2ee.client.attachments import (
    attachment_bytes,
    download_attachment,
    stored_pointer,
    upload_file,
)
from e2ee.client.backup import META_RESTORED_FROM
from e2ee.client.chats import delete_chat_sync
from e2ee.client.compose import edited_rows, mark_read_sync, quote_of, target_message
from e2ee.client.connection import start_background, stop_background
from e2ee.client.context import ClientContext, ClientOptions
from e2ee.client.datadir import (
    DB_FILE,
    META_READ_RECEIPTS,
    Opened,
    close_opened,
    open_dir,
    relay_meta,
)
from e2ee.client.devices import Devices
from e2ee.client.groups import change_group, create_group
from e2ee.client.inbox import Inbox
from e2ee.client.link import LinkFactory, TransportLink, default_link_factory
from e2ee.client.newdevice import link_client, restore_client
from e2ee.client.outbox import Outbox
from e2ee.client.recovery import Recovery
from e2ee.client.sealing import SealedSender
from e2ee.client.trust import accept_identity, contacts, held_users, safety_numbers
from e2ee.client_errors import ClientClosed, NotRegistered
from e2ee.core.fingerprint import SafetyNumber
from e2ee.errors import ChatDeleted, UsageError
from e2ee.events import ConnectionStateChanged, Event
from e2ee.history import GroupInfo, History
from e2ee.media import Progress
from e2ee.messaging.compose import delete_own
from e2ee.messaging.rows import ReactionRow
from e2ee.payload import GroupAction, PayloadType
from e2ee.store import Changes
from e2ee.store.sealing import KdfLimits
from e2ee.transport.failover import check_relay_urls

__all__ = ["Client"]


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


class Client:
    """An end-to-end encrypted messenger client for one account on one device.

    Create one with :meth:`create` (new account) or :meth:`open` (existing); then
    ``async with client:`` connects to the relay and keeps the connection up
    (reconnecting with backoff) until the block ends. Everything else is a
    coroutine method; :meth:`events` yields what happens.
    """

    def __init__(
        self, ctx: ClientContext, opened: Opened, link_factory: LinkFactory, auth_key: bytes
    ) -> None:
        """Use :meth:`open` or :meth:`create`."""
        self._ctx = ctx
        # The parts the facade delegates to, sharing ``ctx``.
        self._outbox = Outbox(ctx)
        self._inbox = Inbox(ctx, self._outbox)
        self._opened: Opened | None = opened
        self._relay_urls = opened.relay_urls
        self._identity_key = opened.identity_key
        self._fingerprint = opened.fingerprint
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # What a one-off link (signed with another key: recovery, restore) is made with.
        self._link_factory = link_factory
        self._auth_key = auth_key
        self._recovery = Recovery(ctx, link_factory, auth_key)
        self._sealed = SealedSender(self._outbox.sealing)
        self._devices = Devices(ctx)
        # Kept for programs and tests that reach for them (not public API).
        self._store = ctx.store
        self._engine = ctx.engine
        self._link = ctx.link

    def __repr__(self) -> str:
        return f"Client(user={self._ctx.me.name!r}, device={self._ctx.me.device_id})"

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        data_dir: str | os.PathLike[str],
        username: str,
        relay_url: str | Sequence[str],
        *,
        device_id: int = 1,
        passphrase: str | None = None,
        strict_trust: bool = False,
        link_factory: LinkFactory | None = None,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
        kdf_limits: KdfLimits | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        jitter: Callable[[], float] = random.random,
    ) -> Client:
        """Create a new account in ``data_dir`` (not yet registered with the relay).

        Account creation itself lives in :func:`e2ee.client.account.create_account_dir`.

        Args:
            data_dir: a directory for the database (created if missing).
            username: the account name (``[a-z0-9_]{3,32}``).
            relay_url: the relay's base URL, e.g. ``http://127.0.0.1:8080``, or the URLs
                of its nodes (at most 16): requests go to one node and move to the next
                when it fails (docs/sdk.md, "Several relay URLs").
            device_id: this device's id (1..127).
            passphrase: protects the keys at rest; None relies on file permissions.
            strict_trust: if True, every new contact key must be verified or
                accepted before sending (no trust on first use).
            link_factory: builds the relay link (default: the aiohttp transport).
            now_ms: the clock.
            options: tunables.
            kdf_limits: Argon2id cost (tests pass a cheap one).
            random_bytes: the source of message and group ids.
            jitter: the reconnect jitter source (a float in ``[0, 1)``).

        Returns:
            The client, not connected. Call :meth:`register` next.

        Raises:
            UsageError: bad name, device id or relay URL, or the directory already holds
                an account.
            StorageError: the database cannot be created.
        """
        folder = Path(data_dir)
        urls = check_relay_urls(relay_url)
        opened = await asyncio.to_thread(
            create_account_dir,
            folder,
            username,
            urls,
            device_id=device_id,
            passphrase=passphrase,
            strict_trust=strict_trust,
            now_ms=now_ms,
            kdf_limits=kdf_limits,
        )
        return await cls._build(opened, link_factory, now_ms, options, random_bytes, jitter)

    @classmethod
    async def open(
        cls,
        data_dir: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        link_factory: LinkFactory | None = None,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        jitter: Callable[[], float] = random.random,
    ) -> Client:
        """Open the account in ``data_dir``.

        Args:
            data_dir: the directory given to :meth:`create`.
            passphrase: the passphrase given to :meth:`create`, if any.
            link_factory: builds the relay link (default: the aiohttp transport).
            now_ms: the clock.
            options: tunables.
            random_bytes: the source of message and group ids.
            jitter: the reconnect jitter source (a float in ``[0, 1)``).

        Returns:
            The client, not connected.

        Raises:
            WrongPassphrase: the passphrase does not open the store.
            StoreLocked: another process has the directory open.
            UsageError: the directory holds no account.
            StorageError: the database cannot be opened.
        """
        folder = Path(data_dir)

        def setup() -> Opened:
            if not (folder / DB_FILE).exists():
                raise UsageError(f"no account in {folder}")
            return open_dir(folder, passphrase, None, now_ms, None)

        opened = await asyncio.to_thread(setup)
        return await cls._build(opened, link_factory, now_ms, options, random_bytes, jitter)

    @classmethod
    async def _build(
        cls,
        opened: Opened,
        link_factory: LinkFactory | None,
        now_ms: Callable[[], int],
        options: ClientOptions | None,
        random_bytes: Callable[[int], bytes],
        jitter: Callable[[], float],
    ) -> Client:
        factory = link_factory or default_link_factory
        try:
            ctx, auth_key = client_context(
                opened,
                factory,
                now_ms=now_ms,
                options=options or ClientOptions(),
                random_bytes=random_bytes,
                jitter=jitter,
            )
            return cls(ctx, opened, factory, auth_key)
        except BaseException:
            await asyncio.to_thread(close_opened, opened)
            raise

    async def register(self, *, invite: str | None = None) -> None:
        """Register the account with the relay and upload its prekeys.

        Args:
            invite: an invite code from the relay's operator (invite-only relays).

        Raises:
            UsernameTaken: the name is registered already.
            RegistrationRefused: closed relay, invite required or invalid (its subclasses).
            TransportError: the relay cannot be reached or refused.
        """
        self._check_open()
        restored_from = await asyncio.to_thread(self._store.get_meta, META_RESTORED_FROM)
        if restored_from:
            await finish_restore(self._ctx, int(restored_from), self._auth_key, self._link_factory)
        await register_account(self._ctx, invite)

    # A new device of an existing account: from a backup or from a link grant
    # (e2ee.client.newdevice holds both, with their documentation).
    restore = classmethod(restore_client)
    link_device = classmethod(link_client)

    @property
    def devices(self) -> Devices:
        """The devices of this account (:class:`~e2ee.client.devices.Devices`):
        ``await client.devices.list()``, ``add(auth_key, name=...)``, ``remove(id)``.

        Raises:
            ClientClosed: the client was closed.
        """
        self._check_open()
        return self._devices

    @property
    def recovery(self) -> Recovery:
        """Backups and the recovery key of this account (:class:`~e2ee.client.recovery.Recovery`):
        ``await client.recovery.backup(out, passphrase)``, ``recover(key)``, ``new_key()``,
        ``has_key``.

        Raises:
            ClientClosed: the client was closed.
        """
        self._check_open()
        return self._recovery

    @property
    def sealed(self) -> SealedSender:
        """Sealed sender settings (:class:`~e2ee.client.sealing.SealedSender`):
        ``accepting``, ``await client.sealed.refuse()``, ``accept()``, ``rotate_access_key()``.

        Raises:
            ClientClosed: the client was closed.
        """
        self._check_open()
        return self._sealed

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, *, receive: bool = True) -> None:
        """Start the connection loop, the outbox and the timers (``async with`` does this).

        Args:
            receive: False makes a send-only client, for one-shot programs (a
                command that sends a message and exits): it opens no live
                connection and takes nothing from the mailbox, so deliveries,
                receipts and group changes wait on the relay for the next
                receiving client. Sends (and receipts from :meth:`mark_read`) go
                out over HTTP; "connected" then means the relay answered and
                accepted our credentials.

        Raises:
            NotRegistered: :meth:`register` was never called.
            ClientClosed: the client was closed.
        """
        self._check_open()
        if self._tasks:
            return
        await asyncio.to_thread(self._ctx.load_state)
        if not self._ctx.registered:
            raise NotRegistered("register the account with a relay first")
        self._tasks = start_background(self._ctx, self._inbox, self._outbox, receive=receive)

    async def close(self) -> None:
        """Finish the delivery in progress, flush acknowledgements, disconnect, close files.

        Idempotent. Messages still in the outbox stay there for the next start.
        """
        if self._closed:
            return
        self._ctx.closing = True
        tasks, self._tasks = self._tasks, []
        await stop_background(self._ctx, tasks, self._inbox)
        self._closed = True
        self._outbox.close()
        self._ctx.emit(ConnectionStateChanged("closed"))
        link = self._ctx.link
        in_use = link.nodes.current if isinstance(link, TransportLink) else None
        await asyncio.to_thread(self._close_files, in_use)

    def _close_files(self, relay_in_use: str | None = None) -> None:
        with self._ctx.wlock:
            opened, self._opened = self._opened, None
            if opened is not None:
                close_opened(opened, relay_in_use)

    def _check_open(self) -> None:
        if self._closed or self._ctx.closing:
            raise ClientClosed("the client was closed")

    # -- properties ------------------------------------------------------------------------

    @property
    def username(self) -> str:
        """Our user name."""
        return self._ctx.me.name

    @property
    def device_id(self) -> int:
        """This device's id."""
        return self._ctx.me.device_id

    @property
    def relay_url(self) -> str:
        """The relay this account registers with (its first URL)."""
        return self._relay_urls[0] if self._relay_urls else ""

    @property
    def relay_urls(self) -> tuple[str, ...]:
        """All URLs of the relay (its nodes, or one URL), in the order given."""
        return self._relay_urls

    async def set_relay_urls(self, urls: str | Sequence[str]) -> None:
        """Replace the relay's URLs, e.g. after its operator added or removed a node.

        They must be URLs of the same relay (the account lives there); they are used
        from the next :meth:`open` on.

        Args:
            urls: one URL or several (at most 16).

        Raises:
            UsageError: a bad URL, none, or too many. StorageError: not written.
        """
        self._check_open()
        checked = check_relay_urls(urls)
        await asyncio.to_thread(self._ctx.store.commit, Changes(meta_put=relay_meta(checked)))
        self._relay_urls = checked

    @property
    def is_registered(self) -> bool:
        """True once :meth:`register` completed (account created and keys uploaded)."""
        return self._ctx.registered

    @property
    def identity_key(self) -> bytes:
        """Our identity public key (33 bytes; public, safe to show)."""
        return self._identity_key

    @property
    def fingerprint(self) -> str:
        """Our 30 digits: our half of every safety number with us."""
        return self._fingerprint

    @property
    def history(self) -> History:
        """Read access to local history (blocking: call it via ``asyncio.to_thread``)."""
        return self._ctx.history

    @property
    def connected(self) -> bool:
        """True while the live connection to the relay is up."""
        return self._ctx.connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the live connection to the relay is up.

        Raises:
            ClientClosed: the client is closed.
        """
        self._check_open()
        await self._ctx.connected.wait()

    def events(self) -> AsyncIterator[Event]:
        """A new subscription to every event from now on.

        Returns:
            An async iterator; it ends when the client is closed.
        """
        return self._ctx.subscribe()

    async def set_read_receipts(self, enabled: bool) -> None:
        """Turn sending read receipts on or off (delivered receipts are always sent).

        Raises:
            StorageError: the setting cannot be stored.
        """
        value = "1" if enabled else "0"
        await asyncio.to_thread(
            self._ctx.store.commit, Changes(meta_put={META_READ_RECEIPTS: value})
        )

    async def send_text(
        self, to: str, text: str, *, reply_to: str | None = None, wait: bool = True
    ) -> str:
        """Send a text message to a user or a group chat.

        Args:
            to: a user name, or a chat id (``dm:<user>``, ``group:<id>``).
            text: the message.
            reply_to: id (hex) of a message in history to quote.
            wait: return only after the relay accepted it ("sent"). Offline,
                that is after reconnecting. With False, return once queued.

        Returns:
            The message id (hex).

        Raises:
            UsageError: empty text, unknown ``reply_to``, or sending to ourselves.
            NotAMember: ``to`` is a group we are not in.
            SendFailed: the relay refused the message for good.
            UnknownRecipient: the relay does not know the user.
            ClientClosed: the client was closed while waiting.
        """
        if not text:
            raise UsageError("text must not be empty")
        quote = await asyncio.to_thread(quote_of, self._ctx, reply_to) if reply_to else None
        return await self._outbox.queue(to, PayloadType.TEXT, wait=wait, text=text, quote=quote)

    async def react(self, message_id: str, emoji: str, *, wait: bool = True) -> str:
        """React to a message (``emoji=""`` removes our reaction).

        Returns:
            The id of the reaction message.

        Raises:
            UsageError: the message is not in history.
        """
        target = await asyncio.to_thread(target_message, self._ctx, message_id)
        me = self._ctx.me.name
        rows = [ReactionRow(f"{message_id}:{me}", message_id, me, emoji, self._ctx.now_ms())]
        return await self._outbox.queue(
            target.chat_id,
            PayloadType.REACTION,
            wait=wait,
            target_ids=(bytes.fromhex(message_id),),
            reaction=emoji,
            store_row=False,
            extra_rows=rows,
        )

    async def edit(self, message_id: str, text: str, *, wait: bool = True) -> str:
        """Replace the text of one of our messages, for everyone.

        Raises:
            UsageError: not our message, deleted, or empty text.
        """
        target = await asyncio.to_thread(target_message, self._ctx, message_id, own=True)
        if not text:
            raise UsageError("text must not be empty")
        rows = await asyncio.to_thread(edited_rows, self._ctx, message_id, text)
        return await self._outbox.queue(
            target.chat_id,
            PayloadType.EDIT,
            wait=wait,
            text=text,
            target_ids=(bytes.fromhex(message_id),),
            store_row=False,
            extra_rows=rows,
        )

    async def delete_for_everyone(self, message_id: str, *, wait: bool = True) -> str:
        """Delete one of our messages on every side (its text is cleared locally now).

        Its text also goes from every message quoting it, here and on the other
        devices (a ``MessageChanged("quote_deleted")`` event for each).

        Raises:
            UsageError: not our message.
        """
        target = await asyncio.to_thread(target_message, self._ctx, message_id, own=True)
        me = self._ctx.me.name
        local = await asyncio.to_thread(lambda: delete_own(self._ctx.view(), me, message_id))
        return await self._outbox.queue(
            target.chat_id,
            PayloadType.DELETE,
            wait=wait,
            target_ids=(bytes.fromhex(message_id),),
            store_row=False,
            extra_rows=local.rows,
            events=local.events,
        )

    async def send_typing(self, to: str, typing: bool = True) -> None:
        """Tell a chat we started (or stopped) typing. Dropped while offline.

        Raises:
            NotAMember: ``to`` is a group we are not in.
        """
        if not self.connected:
            return
        await self._outbox.queue(to, PayloadType.TYPING, wait=False, store_row=False, typing=typing)

    async def set_disappearing_timer(self, to: str, seconds: int, *, wait: bool = True) -> str:
        """Set a chat's disappearing-messages timer (0 turns it off), for both sides.

        Messages sent or received after this disappear ``seconds`` after they
        were sent (outgoing) or received (incoming).

        Raises:
            UsageError: negative seconds.
        """
        if seconds < 0:
            raise UsageError("seconds must not be negative")
        return await self._outbox.queue(
            to, PayloadType.TIMER, wait=wait, timer_seconds=seconds, text=f"timer {seconds}s"
        )

    async def mark_read(self, chat_id: str) -> int:
        """Mark every incoming message of a chat read; send read receipts if enabled.

        Returns:
            How many messages were newly marked read.

        Raises:
            StorageError: history cannot be written.
        """
        self._check_open()
        count = await asyncio.to_thread(mark_read_sync, self._ctx, chat_id)
        if count:
            self._outbox.wake()
        return count

    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat's local history (nothing is sent; the others keep theirs).

        Its messages, attachment keys, receipts, reactions, search entries and
        unsent messages go in one transaction; a message arriving later starts
        the chat anew. A caller waiting for one of its messages to be sent gets
        ``ChatDeleted``.

        Raises:
            UnknownChat: no such chat in history.
            StillAMember: a group we are still a member of (leave it first).
            StorageError: nothing was deleted.
        """
        self._check_open()
        for mid in await asyncio.to_thread(delete_chat_sync, self._ctx, chat_id):
            self._outbox.fail_waiter(mid, ChatDeleted(chat_id, mid))

    async def send_file(
        self,
        to: str,
        path: str | os.PathLike[str],
        *,
        mime_type: str | None = None,
        caption: str = "",
        progress: Progress | None = None,
        wait: bool = True,
    ) -> str:
        """Encrypt a file, upload it to the relay's blob store, and send a pointer.

        Args:
            to: user or chat id.
            path: the file (any type, any size up to the relay's blob limit).
            mime_type: default: guessed from the file name.
            caption: optional text shown with it.
            progress: called with (bytes uploaded, total) during the upload, on
                the event loop's thread (never from a worker thread); it must not
                block.
            wait: as for :meth:`send_text`.

        Returns:
            The message id (hex).

        Raises:
            UsageError: the file cannot be read.
            TransportError: the upload failed (nothing was sent).
        """
        self._check_open()
        pointer = await upload_file(self._ctx, Path(path), mime_type, progress)
        return await self._outbox.queue(
            to, PayloadType.ATTACHMENT, wait=wait, attachment=pointer, text=caption
        )

    async def forward_attachment(self, message_id: str, to: str, *, wait: bool = True) -> str:
        """Send an attachment we hold again, reusing its blob (no re-upload).

        Raises:
            UsageError: the message has no attachment.
        """
        pointer = await asyncio.to_thread(stored_pointer, self._ctx, message_id)
        return await self._outbox.queue(to, PayloadType.ATTACHMENT, wait=wait, attachment=pointer)

    async def download_attachment(
        self,
        message_id: str,
        destination: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download, verify and decrypt a message's attachment into ``destination``.

        Args:
            message_id: the message (hex) whose attachment to fetch.
            destination: the file to write.
            progress: called with (bytes downloaded, total) on the event loop's
                thread (never from a worker thread); it must not block.

        Raises:
            UsageError: the message has no attachment.
            MediaCorrupt: the blob was tampered with or truncated (nothing written).
            TransportError: the download failed.
        """
        return await download_attachment(self._ctx, message_id, Path(destination), progress)

    async def attachment_bytes(self, message_id: str, *, limit: int) -> bytes:
        """Download, verify and decrypt an attachment into memory (image previews).

        Args:
            message_id: the message (hex) whose attachment to fetch.
            limit: the most plaintext bytes to hold (1 .. 64 MiB).

        Returns:
            The decrypted content; no plaintext copy is written to disk.

        Raises:
            UsageError: no attachment, or ``limit`` out of range.
            AttachmentTooLarge: larger than ``limit`` (declared or found).
            MediaCorrupt: the blob was tampered with or truncated.
            TransportError: the download failed.
        """
        self._check_open()
        return await attachment_bytes(self._ctx, message_id, limit)

    async def create_group(self, name: str, members: Sequence[str]) -> str:
        """Create a group with us as its admin, and tell every member (pairwise).

        Returns:
            The group id; its chat id is ``group:<id>``.

        Raises:
            UsageError: no members, or an invalid name.
            UnknownRecipient: a member does not exist on the relay (checked when
                the relay can be reached); nothing was created.
        """
        self._check_open()
        return await create_group(self._ctx, self._outbox, name, members)

    async def add_member(self, group_id: str, user: str) -> None:
        """Add a member (admins only); everyone, the new member included, is told.

        Args:
            group_id: the group.
            user: the user to add.

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
            IdentityHeld: a member's key changed and is not accepted (the change
                stays queued).
        """
        await self._change_group(group_id, GroupAction.ADD, user)

    async def remove_member(self, group_id: str, user: str) -> None:
        """Remove a member (admins only) and rotate our Sender Key.

        Every remaining member rotates theirs when the change reaches them, so
        the removed member cannot read anything sent afterwards.

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
            UsageError: ``user`` is not a member.
        """
        await self._change_group(group_id, GroupAction.REMOVE, user)

    async def rename_group(self, group_id: str, name: str) -> None:
        """Rename a group (admins only).

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
        """
        await self._change_group(group_id, GroupAction.RENAME, None, name=name)

    async def leave_group(self, group_id: str) -> None:
        """Leave a group; the others rotate their Sender Keys.

        Raises:
            NotAMember: we are not in the group.
        """
        await self._change_group(group_id, GroupAction.LEAVE, self._ctx.me.name)

    async def safety_number(self, user: str) -> list[tuple[int, SafetyNumber]]:
        """Safety numbers with each known device of ``user`` (digits + QR payload).

        Raises:
            UsageError: we hold no identity key for that user yet.
        """

        return await asyncio.to_thread(safety_numbers, self._ctx, user)

    async def groups(self) -> list[GroupInfo]:
        """Every group we know (``member`` is False for groups we left or were removed from).

        Raises:
            StorageError: history cannot be read.
        """
        return await asyncio.to_thread(self._ctx.history.groups)

    async def contacts(self) -> dict[str, dict[int, str]]:
        """Everyone we have a chat, a group or a key with: user -> device -> trust level.

        A user we never exchanged keys with maps to an empty dict.

        Raises:
            StorageError: the store or history cannot be read.
        """

        return await asyncio.to_thread(contacts, self._ctx)

    async def trust_level(self, user: str) -> dict[int, str]:
        """How far each known device of a contact is trusted.

        Returns:
            device id -> ``tofu``, ``verified`` or ``untrusted`` (empty if unknown).

        Raises:
            StorageError: the store cannot be read.
        """
        found = await asyncio.to_thread(self._ctx.store.identities, user)
        return {a.device_id: r.trust for a, r in found.items()}

    async def held_users(self) -> set[str]:
        """Contacts whose identity key changed and was not accepted yet (sending is held).

        Read from the store (keys recorded as ``untrusted``), so it survives
        restarts; :meth:`accept_identity` or :meth:`verify` releases a user.

        Raises:
            StorageError: the store or history cannot be read.
        """

        return await asyncio.to_thread(held_users, self._ctx)

    async def user_exists(self, user: str) -> bool:
        """Whether the relay knows ``user`` (fetching their bundles, as a first message would).

        Returns:
            False if the relay has no such user (a user whose new key is held exists).

        Raises:
            UsageError: not a valid user name.
            TransportError: the relay cannot be reached.
        """
        self._check_open()
        return await self._outbox.user_exists(user)

    async def queued_count(self) -> int:
        """Messages composed but not yet accepted by the relay (held ones included).

        Receipts, typing indicators and session resets are not counted.

        Raises:
            StorageError: history cannot be read.
        """
        return await asyncio.to_thread(self._ctx.history.queued_count)

    async def accept_identity(self, user: str, *, verified: bool = False) -> None:
        """Accept ``user``'s current (new) identity keys; held messages then go out.

        Accepting a changed key (a reinstall) restarts our message counters to
        them, so their new installation reports no gap.

        Args:
            user: the contact.
            verified: record the keys as verified (safety numbers compared).

        Raises:
            UsageError: nothing is known about that user.
        """

        self._check_open()
        await asyncio.to_thread(accept_identity, self._ctx, user, verified=verified)
        self._ctx.held.discard(user)
        self._outbox.wake()

    async def verify(self, user: str) -> None:
        """Mark ``user``'s current keys verified (after comparing safety numbers).

        Raises:
            UsageError: nothing is known about that user.
        """
        await self.accept_identity(user, verified=True)

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until every outbox entry that can be sent now was sent.

        Held chats (an identity key to accept) and failed entries do not count.
        Offline, this waits for the connection (bounded by ``timeout``).

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            How many outbox entries are still queued (held, or not sent in time).

        Raises:
            ClientClosed: the client is closed.
        """
        self._check_open()
        return await self._outbox.flush(timeout)

    async def _change_group(
        self, gid: str, action: GroupAction, user: str | None, *, name: str | None = None
    ) -> None:
        self._check_open()
        await change_group(self._ctx, self._outbox, gid, action, user, name=name)
