# The only module of the terminal client that imports e2ee.
#
# Invariants:
# * Widgets and screens see the plain, immutable view types and the ``Backend``
#   protocol defined here, never an e2ee object: swapping the SDK (or using the
#   in-memory fake the snapshot tests use) changes nothing above this line.
# * Every method is a coroutine that never blocks the event loop: history reads
#   go through ``asyncio.to_thread``; everything else is an SDK coroutine, which
#   does its own blocking work off the loop.
# * ``updates()`` turns SDK events into past-tense ``Update`` values, enriched
#   with what the screen needs (the message as stored), so widgets never query
#   the SDK in reaction to an event.
# * Errors the user can act on leave as ``BackendError`` with a readable text;
#   nothing secret (keys, plaintext) is ever put into one.
"""Adapter between the Textual client and the :mod:`e2ee` SDK facade."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from blindpost_wire.names import is_username
from e2ee.client import (
    DB_FILE,
    MAX_RELAY_URLS,
    NOTICE_TYPES,
    Client,
    ClientOptions,
    KdfLimits,
    StoredMessage,
    check_relay_urls,
    direct_chat_id,
    group_chat_id,
)
from e2ee.client import ChatSummary as SdkChatSummary
from e2ee.client_errors import (
    ConnectionFailed,
    InviteInvalid,
    InviteRequired,
    RegistrationClosed,
    RelayRejected,
    RelayTimeout,
)
from e2ee.errors import AttachmentTooLarge, E2EEError, TransportError, UsageError, WrongPassphrase
from e2ee.events import (
    ConnectionStateChanged,
    DecryptionProblem,
    Event,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    MessageStored,
    ReceiptUpdated,
    Typing,
)
from e2ee.qr import qr_terminal

__all__ = [
    "DEFAULT_RELAY_URL",
    "PAGE_SIZE",
    "REMOVE_THIS_DEVICE",
    "SEARCH_PAGE",
    "AttachmentInfo",
    "Backend",
    "BackendError",
    "ChatSummary",
    "ChatUpdated",
    "ConnectionChanged",
    "ContactInfo",
    "DeviceView",
    "GroupInfo",
    "InviteNeeded",
    "KeyChanged",
    "MessageChanged_",
    "MessageView",
    "Messenger",
    "NewMessage",
    "Notice",
    "Opener",
    "PassphraseRequired",
    "Progress",
    "ReceiptChanged",
    "RelayUnavailable",
    "SearchHit",
    "TypingChanged",
    "Update",
    "account_exists",
    "check_new_account",
    "default_data_dir",
    "group_line",
    "relay_error",
]

#: The relay of the README quick start.
DEFAULT_RELAY_URL = "http://127.0.0.1:8080"
#: Messages per history page (the newest page is what opening a chat shows).
PAGE_SIZE = 60
#: Search hits per page (the search dialog reads the next page as you scroll).
SEARCH_PAGE = 50

Progress = Callable[[int, int], None]


class BackendError(Exception):
    """An operation failed in a way the user should be told about."""


@contextlib.contextmanager
def _backend_errors() -> Iterator[None]:
    """The one place an SDK error becomes the :class:`BackendError` screens show.

    Raises:
        BackendError: the block raised an :class:`~e2ee.errors.E2EEError`
            (chained, so the SDK's type stays available).
    """
    try:
        yield
    except E2EEError as exc:
        raise BackendError(str(exc)) from exc


def group_line(who: str, what: str | None) -> str:
    """A group change as people read it: ``who`` (``you`` or a name) and what changed.

    ``what`` is the phrase history keeps (``renamed the group to 'x'``); rows
    stored before it was kept have none.
    """
    return f"{who} {what or 'changed the group'}"


class PassphraseRequired(BackendError):
    """The account is protected by a passphrase (or the one given is wrong)."""


class InviteNeeded(BackendError):
    """The relay registers by invitation only and no code, or a refused one, was given."""


def _registration_error(exc: E2EEError) -> BackendError | None:
    """The error for a refusal by the relay's registration mode, else None."""
    if isinstance(exc, InviteRequired):
        return InviteNeeded(
            "this relay registers by invitation only: enter the invite code from its operator"
        )
    if isinstance(exc, InviteInvalid):
        return InviteNeeded("the relay refused the invite code (unknown, already used or expired)")
    if isinstance(exc, RegistrationClosed):
        return BackendError("this relay does not accept new accounts (registration is closed)")
    return None


class RelayUnavailable(BackendError):
    """The relay could not be asked (offline); the answer is not known."""


# -- view types ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What the screen shows of an attachment (its key stays in the SDK)."""

    file_name: str
    size: int
    mime_type: str
    local_path: str | None = None


@dataclass(frozen=True, slots=True)
class MessageView:
    """One history entry as the conversation shows it."""

    id: str
    chat_id: str
    sender: str
    outgoing: bool
    kind: str
    text: str | None
    sent_at: int
    status: str
    edited: bool = False
    deleted: bool = False
    reply_to: str | None = None
    quote_text: str | None = None
    quote_sender: str | None = None
    reactions: tuple[tuple[str, str], ...] = ()
    attachment: AttachmentInfo | None = None
    seq: int = 0
    #: An incoming message already marked read (always True for our own).
    read: bool = True

    @property
    def is_notice(self) -> bool:
        """A notice kept in history (missed or unreadable messages), not a message."""
        return self.kind in NOTICE_TYPES


@dataclass(frozen=True, slots=True)
class ChatSummary:
    """One row of the chat list."""

    chat_id: str
    kind: Literal["direct", "group"]
    title: str
    unread: int
    last_text: str
    last_at: int | None
    #: A group we are no longer a member of (we left or were removed): not listed.
    left: bool = False
    #: A contact whose every known device was marked verified (safety number compared).
    verified: bool = False


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A search result: the message and the name of its chat (never a raw id)."""

    message: MessageView
    chat_title: str


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group as we know it."""

    chat_id: str
    group_id: str
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    am_admin: bool
    am_member: bool


@dataclass(frozen=True, slots=True)
class ContactInfo:
    """A contact's trust state and safety numbers (one per device)."""

    user: str
    trust: tuple[tuple[int, str], ...]
    safety_numbers: tuple[tuple[int, str], ...]
    qr: str


#: Why this device is not removed from the app (it would log itself out; the CLI's
#: ``blindpost devices remove ID --force`` does that).
REMOVE_THIS_DEVICE = "that is this device: remove it from another device of this account"


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device of our account as the relay lists it.

    ``name``: the name given when it was linked ("" for none); ``added_at`` and ``last_seen``
    (the relay's coarse time of its last request, None before one) are unix ms.
    """

    device_id: int
    name: str
    added_at: int
    last_seen: int | None
    this_device: bool


# -- updates (past tense: they describe what already happened) ----------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message was stored (received, or sent from this device).

    ``chat_title``: the chat's name for people (set for received messages, so a
    toast can name a chat the list does not show yet).
    """

    message: MessageView
    chat_title: str = ""


@dataclass(frozen=True, slots=True)
class MessageChanged_:  # noqa: N801  (the SDK's MessageChanged is imported here too)
    """A stored message was edited, deleted or reacted to; ``message`` is its new state.

    ``partial``: built from the SDK event alone (no history read), so
    ``message`` has no reactions, file or quote author: the screen keeps the
    ones it shows and applies ``reaction`` (user, emoji; ``""`` removes it).
    """

    message: MessageView
    change: str
    partial: bool = False
    reaction: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ReceiptChanged:
    """An outgoing message's best status changed."""

    chat_id: str
    message_id: str
    status: str


@dataclass(frozen=True, slots=True)
class TypingChanged:
    """A contact started or stopped typing."""

    chat_id: str
    user: str
    typing: bool


@dataclass(frozen=True, slots=True)
class ChatUpdated:
    """A chat's title or membership may have changed: refresh its row.

    ``text`` (may be empty) says what and who, ``after_seq``: the chat's newest
    message when it happened (the notice belongs after it). Group changes come
    as :class:`NewMessage` with their history row; this is for a change whose
    row was stored already.
    """

    chat_id: str
    text: str
    after_seq: int = 0


@dataclass(frozen=True, slots=True)
class KeyChanged:
    """A contact's identity key is new or changed; ``held`` means sending waits."""

    user: str
    chat_id: str
    held: bool
    first_use: bool


@dataclass(frozen=True, slots=True)
class ConnectionChanged:
    """The relay connection changed; ``queued`` messages wait to be sent."""

    state: Literal["connecting", "connected", "offline", "closed"]
    queued: int
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should see inline (missed messages, undecryptable ones)."""

    chat_id: str | None
    text: str


Update = (
    NewMessage
    | MessageChanged_
    | ReceiptChanged
    | TypingChanged
    | ChatUpdated
    | KeyChanged
    | ConnectionChanged
    | Notice
)


class Backend(Protocol):
    """What the screens may ask of the messenger (implemented by :class:`Messenger`)."""

    @property
    def username(self) -> str: ...

    @property
    def relay_url(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def take_recovery_key(self) -> str | None: ...

    def updates(self) -> AsyncIterator[Update]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def chats(self) -> list[ChatSummary]: ...

    async def chat_summary(self, chat_id: str) -> ChatSummary: ...

    async def messages(
        self,
        chat_id: str,
        before: str | None = None,
        limit: int = PAGE_SIZE,
        *,
        after: str | None = None,
        around: str | None = None,
    ) -> list[MessageView]: ...

    async def message(self, message_id: str) -> MessageView | None: ...

    async def search(
        self, text: str, *, before: str | None = None, limit: int = SEARCH_PAGE
    ) -> list[SearchHit]: ...

    async def send_text(self, chat_id: str, text: str, reply_to: str | None = None) -> str: ...

    async def edit(self, message_id: str, text: str) -> None: ...

    async def delete(self, message_id: str) -> None: ...

    async def react(self, message_id: str, emoji: str) -> None: ...

    async def send_typing(self, chat_id: str, typing: bool) -> None: ...

    async def mark_read(self, chat_id: str) -> int: ...

    async def delete_chat(self, chat_id: str) -> None: ...

    async def send_file(self, chat_id: str, path: Path, progress: Progress | None) -> str: ...

    async def save_attachment(
        self, message_id: str, destination: Path, progress: Progress | None
    ) -> Path: ...

    async def attachment_bytes(self, message_id: str, limit: int) -> bytes: ...

    async def create_group(self, name: str, members: Sequence[str]) -> str: ...

    async def group_info(self, chat_id: str) -> GroupInfo | None: ...

    async def rename_group(self, chat_id: str, name: str) -> None: ...

    async def add_member(self, chat_id: str, user: str) -> None: ...

    async def remove_member(self, chat_id: str, user: str) -> None: ...

    async def leave_group(self, chat_id: str) -> None: ...

    async def contact_info(self, user: str) -> ContactInfo: ...

    async def accept_key(self, user: str, verified: bool) -> None: ...

    async def held_users(self) -> set[str]: ...

    async def user_exists(self, user: str) -> bool: ...

    async def queued_count(self) -> int: ...

    async def approve_device(self, code: str, name: str) -> int: ...

    async def list_devices(self) -> list[DeviceView]: ...

    async def remove_device(self, device_id: int) -> None: ...

    def is_connected(self) -> bool: ...


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The account directory used when none is given, by the app and the CLI alike.

    ``$BLINDPOST_DATA``, else ``$XDG_DATA_HOME/blindpost`` (if absolute), else
    ``~/.local/share/blindpost``.
    """
    env = os.environ if environ is None else environ
    home = env.get("BLINDPOST_DATA")
    if home:
        return Path(home).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "blindpost"
    return Path.home() / ".local" / "share" / "blindpost"


def account_exists(data_dir: Path) -> bool:
    """True if ``data_dir`` holds an account database."""
    return (data_dir / DB_FILE).exists()


def split_relay_urls(text: str) -> list[str]:
    """The URLs typed in the relay field: one, or a relay's nodes separated by commas or
    spaces (``http://a:8080, http://b:8080``)."""
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


def check_new_account(username: str, relay_url: str) -> None:
    """Check a first-run form before anything is created.

    Args:
        username: the name typed.
        relay_url: the relay field: one URL, or several separated by commas or spaces.

    Raises:
        BackendError: the name or the relay URL cannot be used (the text says why).
    """
    if not username:
        raise BackendError("choose a username")
    if not is_username(username):
        raise BackendError(
            "a username is 3 to 32 characters: lower-case letters a-z, digits 0-9 and _"
        )
    urls = split_relay_urls(relay_url)
    if not urls:
        raise BackendError(f"enter the relay's URL (the README's local one is {DEFAULT_RELAY_URL})")
    try:
        check_relay_urls(urls)
    except UsageError:
        raise BackendError(
            "the relay URL is http:// or https:// and a host (and port), "
            f"with no path: e.g. {DEFAULT_RELAY_URL} (a relay of several nodes: "
            f"up to {MAX_RELAY_URLS} URLs separated by commas)"
        ) from None


def relay_error(exc: E2EEError, relay_url: str, username: str = "") -> str:
    """A sentence for a failed relay call (never a Python class name).

    Args:
        exc: what the SDK raised.
        relay_url: the relay it talked to.
        username: the name being registered, if any.
    """
    if isinstance(exc, RelayTimeout):
        return f"the relay at {relay_url} did not answer in time; try again"
    if isinstance(exc, ConnectionFailed):
        return f"cannot reach the relay at {relay_url}: is the URL right and the relay running?"
    if isinstance(exc, RelayRejected):
        if exc.status == 409 and username:
            return f"the username {username} is taken on this relay; choose another"
        return f"the relay refused: {exc.detail or exc.code} (HTTP {exc.status})"
    if isinstance(exc, TransportError):
        return f"the relay at {relay_url} answered something unexpected: {exc}"
    return str(exc)


def _remove_account(data_dir: Path, existed: bool) -> None:
    """Remove the database files a failed creation left (and the folder if it made it)."""
    if not data_dir.is_dir():
        return
    for name in os.listdir(data_dir):
        if name.startswith(DB_FILE) or name.endswith(".lock"):
            with contextlib.suppress(OSError):
                (data_dir / name).unlink()
    if not existed:
        with contextlib.suppress(OSError):
            data_dir.rmdir()


def _peer_of(chat_id: str) -> str | None:
    return chat_id[3:] if chat_id.startswith("dm:") else None


def _group_of(chat_id: str) -> str:
    if not chat_id.startswith("group:"):
        raise BackendError(f"{chat_id} is not a group chat")
    return chat_id[len("group:") :]


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


class Messenger:
    """The :class:`Backend` over a real :class:`e2ee.client.Client`.

    Use :meth:`create` (first run: create and register) or :meth:`open`.
    """

    def __init__(self, client: Client, relay_url: str) -> None:
        self._client = client
        self._relay_url = relay_url
        self._recovery_key: str | None = None  # made at first run, shown once
        # Updates are read from one SDK subscription taken at construction, so
        # nothing emitted between start() and the first updates() call is lost.
        self._events = client.events()

    def __repr__(self) -> str:
        return f"Messenger({self._client!r})"

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        data_dir: Path,
        username: str,
        relay_url: str,
        passphrase: str | None,
        *,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
        kdf_limits: KdfLimits | None = None,
        strict_trust: bool = False,
        invite: str | None = None,
    ) -> Messenger:
        """Create an account in ``data_dir`` and register it with the relay.

        The name and the relay URL are checked before anything is written, and a
        failed creation or registration removes what it wrote: a failed first run
        leaves no account behind (the next launch shows the first-run form again).

        ``invite``: a code from the relay's operator (invite-only relays).

        Raises:
            InviteNeeded: invite-only relay and no code, or a refused one.
            BackendError: bad name or URL, name taken, relay unreachable.
        """
        check_new_account(username, relay_url)
        existed = data_dir.exists()
        try:
            client = await Client.create(
                data_dir,
                username,
                split_relay_urls(relay_url),
                passphrase=passphrase or None,
                strict_trust=strict_trust,
                now_ms=now_ms,
                options=options,
                kdf_limits=kdf_limits,
            )
        except E2EEError as exc:
            _remove_account(data_dir, existed)
            raise BackendError(str(exc)) from exc
        try:
            await client.register(invite=invite)
        except E2EEError as exc:
            await client.close()
            # The account exists locally now but is unregistered; remove it so the
            # user can retry with another name or relay.
            _remove_account(data_dir, existed)
            refused = _registration_error(exc)
            if refused is not None:
                raise refused from exc
            raise BackendError(relay_error(exc, relay_url, username)) from exc
        messenger = cls(client, ", ".join(client.relay_urls))
        # The account works without one: `blindpost recovery-key` makes one later.
        with contextlib.suppress(E2EEError):
            messenger._recovery_key = await client.recovery.new_key()
        return messenger

    def take_recovery_key(self) -> str | None:
        """The recovery key made at first run, once (None afterwards, or if none was made)."""
        key, self._recovery_key = self._recovery_key, None
        return key

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        passphrase: str | None = None,
        *,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
    ) -> Messenger:
        """Open the account in ``data_dir``.

        Raises:
            PassphraseRequired: a passphrase is needed, or the one given is wrong.
            BackendError: the account cannot be opened.
        """
        with _backend_errors():
            try:
                client = await Client.open(
                    data_dir, passphrase or None, now_ms=now_ms, options=options
                )
            except WrongPassphrase as exc:
                raise PassphraseRequired(str(exc)) from exc
        return cls(client, ", ".join(client.relay_urls))

    async def start(self) -> None:
        """Connect to the relay (in the background; returns at once)."""
        with _backend_errors():
            await self._client.start()

    async def close(self) -> None:
        """Disconnect and close the store."""
        await self._client.close()

    @property
    def username(self) -> str:
        """Our user name."""
        return self._client.username

    @property
    def relay_url(self) -> str:
        """The relay's URL (its nodes' URLs, comma-separated, when it has several)."""
        return self._relay_url

    @property
    def fingerprint(self) -> str:
        """Our own safety-number half: 30 digits, the same for every contact."""
        return self._client.fingerprint

    def is_connected(self) -> bool:
        """True while the relay connection is up."""
        return self._client.connected

    # -- reading ------------------------------------------------------------------------

    def _view(self, m: StoredMessage) -> MessageView:
        """Blocking: the view of a stored message (reactions, attachment, quote)."""
        history = self._client.history
        reactions = tuple(sorted(history.reactions(m.id).items()))
        attachment = None
        if m.type == "attachment":
            row = history.attachment(m.id)
            if row is not None:
                attachment = AttachmentInfo(
                    row["file_name"] or "file",
                    int(row["size"] or 0),
                    row["mime_type"] or "",
                    row["local_path"],
                )
        quote_sender = None
        if m.reply_to:
            quoted = history.message(m.reply_to)
            quote_sender = quoted.sender if quoted else None
        return _plain_view(m, reactions, attachment, quote_sender)

    def _stored_view(self, event: MessageStored) -> MessageView:
        """The view of one of our new messages, from its event alone (no history read)."""
        found = event.attachment
        attachment = None
        if found is not None:
            attachment = AttachmentInfo(found.file_name or "file", found.size, found.mime_type)
        return _plain_view(event.message, (), attachment, event.quote_sender)

    def _title(self, chat_id: str) -> str:
        peer = _peer_of(chat_id)
        if peer is not None:
            return peer
        group = self._client.history.group(chat_id[len("group:") :])
        return str(group["name"]) if group and group.get("name") else "group"

    def _summary(
        self, found: SdkChatSummary, verified: frozenset[str] = frozenset()
    ) -> ChatSummary:
        chat, last = found.chat, found.last_message
        history = self._client.history
        if last is None:
            text = ""
        elif last.deleted:
            text = "message deleted"
        elif last.type == "attachment":
            row = history.attachment(last.id)
            name = (row["file_name"] if row else None) or "file"
            text = "📎 " + name + (f" {last.text}" if last.text else "")
        elif last.type == "text":
            text = last.text or ""
        else:  # a group change, a timer change or a notice: what happened, not blank
            text = self._describe(last)
        if last is not None and last.outgoing and text and last.type in ("text", "attachment"):
            text = "you: " + text
        left = False
        if chat.kind == "group" and chat.group_id:
            group = history.group(chat.group_id)
            left = group is not None and not group["member"]
            if not text and group is not None:
                # Joined, nothing said yet: the SDK keeps no row for the creation.
                by = group.get("created_by") or "someone"
                text = "you created the group" if by == self.username else f"{by} created the group"
        peer = _peer_of(chat.id)
        return ChatSummary(
            chat_id=chat.id,
            kind="group" if chat.kind == "group" else "direct",
            title=self._title(chat.id),
            unread=found.unread,
            last_text=text.replace("\n", " "),
            last_at=chat.last_message_at,
            left=left,
            verified=peer is not None and peer in verified,
        )

    def _describe(self, m: StoredMessage) -> str:
        """One line for a history row that is not a text or a file."""
        if m.type == "group":
            return group_line("you" if m.outgoing else m.sender, m.text)
        if m.type == "timer":
            return m.text or "disappearing messages changed"
        return m.text or m.type

    async def _verified_users(self) -> frozenset[str]:
        """Contacts whose every known device is marked verified."""
        try:
            contacts = await self._client.contacts()
        except E2EEError:
            return frozenset()
        return frozenset(
            user
            for user, devices in contacts.items()
            if devices and all(level == "verified" for level in devices.values())
        )

    def _summaries(self, verified: frozenset[str]) -> list[ChatSummary]:
        # One query for every chat's unread count and newest message (the SDK's
        # chat_summaries); groups we left are not listed.
        found = self._client.history.chat_summaries()
        return [s for s in (self._summary(f, verified) for f in found) if not s.left]

    async def chats(self) -> list[ChatSummary]:
        """Every chat, most recently active first."""
        return await asyncio.to_thread(self._summaries, await self._verified_users())

    async def chat_summary(self, chat_id: str) -> ChatSummary:
        """One chat's row (also for a chat with no history yet)."""

        verified = await self._verified_users()

        def read() -> ChatSummary:
            for found in self._client.history.chat_summaries():
                if found.chat.id == chat_id:
                    return self._summary(found, verified)
            kind: Literal["direct", "group"] = "direct" if chat_id.startswith("dm:") else "group"
            return ChatSummary(chat_id, kind, self._title(chat_id), 0, "", None)

        return await asyncio.to_thread(read)

    async def messages(
        self,
        chat_id: str,
        before: str | None = None,
        limit: int = PAGE_SIZE,
        *,
        after: str | None = None,
        around: str | None = None,
    ) -> list[MessageView]:
        """A page of a chat, oldest first.

        The page ending before ``before`` (or the newest page), the page starting
        after ``after``, or the page holding ``around`` with up to ``limit // 2``
        messages before it. A message id that is not in the chat gives ``[]``.
        """

        def read() -> list[MessageView]:
            try:
                page = self._client.history.messages(
                    chat_id, before=before, after=after, around=around, limit=limit
                )
            except UsageError:
                return []
            return [self._view(m) for m in page]

        return await asyncio.to_thread(read)

    async def message(self, message_id: str) -> MessageView | None:
        """One message, or None."""

        def read() -> MessageView | None:
            found = self._client.history.message(message_id)
            return None if found is None else self._view(found)

        return await asyncio.to_thread(read)

    async def search(
        self, text: str, *, before: str | None = None, limit: int = SEARCH_PAGE
    ) -> list[SearchHit]:
        """Search every chat: each word matches the words it begins, newest first.

        Args:
            text: the words (``histo`` finds ``history``).
            before: the next page: hits stored before this message id (the last
                hit of the page before).
            limit: hits per page.

        Raises:
            BackendError: the history cannot be read.
        """

        def read() -> list[SearchHit]:
            found = self._client.history.search_newest(text, limit=limit, before=before)
            titles: dict[str, str] = {}
            hits = []
            for m in found:
                if m.chat_id not in titles:
                    titles[m.chat_id] = self._title(m.chat_id)
                hits.append(SearchHit(self._view(m), titles[m.chat_id]))
            return hits

        try:
            return await asyncio.to_thread(read)
        except E2EEError as exc:
            raise BackendError(str(exc)) from exc

    async def queued_count(self) -> int:
        """Messages composed but not yet accepted by the relay (receipts left out)."""

        with _backend_errors():
            return await self._client.queued_count()

    # -- sending ------------------------------------------------------------------------

    async def send_text(self, chat_id: str, text: str, reply_to: str | None = None) -> str:
        """Queue a text message; returns its id once it is in history (not yet sent).

        Raises:
            BackendError: empty text, not a member, unknown reply.
        """
        with _backend_errors():
            return await self._client.send_text(chat_id, text, reply_to=reply_to, wait=False)

    async def edit(self, message_id: str, text: str) -> None:
        """Edit one of our messages for everyone."""
        with _backend_errors():
            await self._client.edit(message_id, text, wait=False)

    async def delete(self, message_id: str) -> None:
        """Delete one of our messages for everyone."""
        with _backend_errors():
            await self._client.delete_for_everyone(message_id, wait=False)

    async def react(self, message_id: str, emoji: str) -> None:
        """React to a message (an empty emoji removes our reaction)."""
        with _backend_errors():
            await self._client.react(message_id, emoji, wait=False)

    async def send_typing(self, chat_id: str, typing: bool) -> None:
        """Tell the chat we are typing; failures are irrelevant and dropped."""
        try:
            await self._client.send_typing(chat_id, typing)
        except E2EEError:
            return

    async def mark_read(self, chat_id: str) -> int:
        """Mark a chat read (sends read receipts)."""
        with _backend_errors():
            return await self._client.mark_read(chat_id)

    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat's history on this device (the others keep theirs).

        Raises:
            BackendError: no such chat, or a group we are still in (leave it first).
        """
        with _backend_errors():
            await self._client.delete_chat(chat_id)

    async def send_file(self, chat_id: str, path: Path, progress: Progress | None) -> str:
        """Encrypt and upload a file, then send it; ``progress(done, total)`` while uploading.

        Raises:
            BackendError: unreadable file, upload failed.
        """
        if not path.is_file():
            raise BackendError(f"not a file: {path}")
        try:
            return await self._client.send_file(chat_id, path, progress=progress, wait=False)
        except (E2EEError, OSError) as exc:
            raise BackendError(f"could not send {path.name}: {exc}") from exc

    async def save_attachment(
        self, message_id: str, destination: Path, progress: Progress | None
    ) -> Path:
        """Download and decrypt an attachment into ``destination`` (a file or a folder)."""
        if destination.is_dir():
            found = await self.message(message_id)
            name = found.attachment.file_name if found and found.attachment else message_id
            destination = destination / Path(name).name
        try:
            return await self._client.download_attachment(
                message_id, destination, progress=progress
            )
        except (E2EEError, OSError) as exc:
            raise BackendError(f"could not save the attachment: {exc}") from exc

    async def attachment_bytes(self, message_id: str, limit: int) -> bytes:
        """The decrypted content of an attachment of at most ``limit`` bytes (for previews).

        Decrypted in memory by the SDK (:meth:`e2ee.client.Client.attachment_bytes`):
        no plaintext copy is written to disk.

        Raises:
            BackendError: no such attachment, larger than ``limit``, download or
                decryption failed.
        """
        try:
            return await self._client.attachment_bytes(message_id, limit=limit)
        except AttachmentTooLarge as exc:
            raise BackendError("the attachment is too large to preview") from exc
        except E2EEError as exc:
            raise BackendError(f"could not fetch the attachment: {exc}") from exc

    # -- groups -------------------------------------------------------------------------

    async def create_group(self, name: str, members: Sequence[str]) -> str:
        """Create a group; returns its chat id."""
        with _backend_errors():
            gid = await self._client.create_group(name, members)
        return group_chat_id(gid)

    async def group_info(self, chat_id: str) -> GroupInfo | None:
        """The group behind a chat, or None."""
        gid = _group_of(chat_id)

        def read() -> GroupInfo | None:
            history = self._client.history
            group = history.group(gid)
            if group is None:
                return None
            members = history.group_members(gid)
            admins = tuple(sorted(u for u, role in members.items() if role == "admin"))
            return GroupInfo(
                chat_id=chat_id,
                group_id=gid,
                name=str(group["name"] or ""),
                members=tuple(sorted(members)),
                admins=admins,
                am_admin=self.username in admins,
                am_member=bool(group["member"]),
            )

        return await asyncio.to_thread(read)

    # The SDK keeps what changed and who did it in the group row of history.

    async def rename_group(self, chat_id: str, name: str) -> None:
        """Rename a group (admins)."""
        with _backend_errors():
            await self._client.rename_group(_group_of(chat_id), name)

    async def add_member(self, chat_id: str, user: str) -> None:
        """Add a member (admins)."""
        with _backend_errors():
            await self._client.add_member(_group_of(chat_id), user)

    async def remove_member(self, chat_id: str, user: str) -> None:
        """Remove a member (admins)."""
        with _backend_errors():
            await self._client.remove_member(_group_of(chat_id), user)

    async def leave_group(self, chat_id: str) -> None:
        """Leave a group."""
        with _backend_errors():
            await self._client.leave_group(_group_of(chat_id))

    # -- devices ------------------------------------------------------------------------

    async def approve_device(self, code: str, name: str) -> int:
        """Approve a new device of this account that shows ``code`` (``blindpost link``).

        Returns:
            The new device's id.

        Raises:
            BackendError: a code with a typo, an expired or used one, or the relay refused.
        """
        with _backend_errors():
            grant = await self._client.devices.approve(code, name=name)
        return grant.device_id

    async def list_devices(self) -> list[DeviceView]:
        """This account's devices at the relay, by id (this one marked).

        Raises:
            BackendError: the relay cannot be reached or refused.
        """
        with _backend_errors():
            found = await self._client.devices.list()
        return [
            DeviceView(d.device_id, d.name, d.created_at, d.last_seen, d.this_device) for d in found
        ]

    async def remove_device(self, device_id: int) -> None:
        """Remove another device of this account: the relay drops its keys and mailbox and
        closes its connection, so it reads nothing sent from then on.

        Raises:
            BackendError: ``device_id`` is this device (it would log itself out; the CLI's
                ``blindpost devices remove ID --force`` does that), no such device, or the
                relay cannot be reached or refused.
        """
        if device_id == self._client.device_id:
            raise BackendError(REMOVE_THIS_DEVICE)
        with _backend_errors():
            await self._client.devices.remove(device_id)

    # -- trust --------------------------------------------------------------------------

    async def contact_info(self, user: str) -> ContactInfo:
        """Trust levels, safety numbers and the QR code (of the first device).

        Raises:
            BackendError: no key known for that user yet (no message exchanged).
        """
        try:
            numbers = await self._client.safety_number(user)
            trust = await self._client.trust_level(user)
        except UsageError as exc:
            raise BackendError(
                f"no key of {user} yet: it comes with the first message either of you sends"
            ) from exc
        except E2EEError as exc:
            raise BackendError(str(exc)) from exc
        qr = await asyncio.to_thread(qr_terminal, numbers[0][1].scannable) if numbers else ""
        return ContactInfo(
            user=user,
            trust=tuple(sorted(trust.items())),
            safety_numbers=tuple((d, n.digits) for d, n in numbers),
            qr=qr,
        )

    async def user_exists(self, user: str) -> bool:
        """Whether the relay knows ``user`` (checked before a new chat opens).

        Raises:
            BackendError: not a valid name (the text says why).
            RelayUnavailable: the relay cannot be reached now.
        """
        if not is_username(user):
            raise BackendError(f"{user!r} is not a username: 3 to 32 of a-z, 0-9 and _")
        if user == self.username:
            raise BackendError("that is you: pick someone else")
        try:
            return await self._client.user_exists(user)
        except TransportError as exc:
            raise RelayUnavailable(relay_error(exc, self._relay_url)) from exc
        except E2EEError as exc:
            raise BackendError(str(exc)) from exc

    async def accept_key(self, user: str, verified: bool) -> None:
        """Accept (and optionally verify) a contact's current keys; held messages go out."""
        with _backend_errors():
            await self._client.accept_identity(user, verified=verified)

    async def held_users(self) -> set[str]:
        """Contacts whose changed key holds our messages until accepted (also after a restart)."""
        with _backend_errors():
            return await self._client.held_users()

    # -- updates ------------------------------------------------------------------------

    async def updates(self) -> AsyncIterator[Update]:
        """SDK events as :data:`Update` values; ends when the client closes."""
        async for event in self._events:
            update = await self._translate(event)
            if update is not None:
                yield update

    async def _translate(self, event: Event) -> Update | None:
        match event:
            case MessageStored():
                # Our own message: the event holds all a view needs (new: no reactions).
                return NewMessage(self._stored_view(event))
            case MessageReceived(message=m):
                view = await asyncio.to_thread(self._view, m)
                if m.outgoing:
                    return NewMessage(view)
                return NewMessage(view, await asyncio.to_thread(self._title, m.chat_id))
            case MessageChanged(message=StoredMessage() as m, change=change, by=by):
                # The committed message comes with the event: no history read.
                reaction = None if event.reaction is None else (by, event.reaction)
                view = _plain_view(m, (), None, None)
                return MessageChanged_(view, change, partial=True, reaction=reaction)
            case MessageChanged(message_id=mid, change=change):
                found = await self.message(mid)
                return None if found is None else MessageChanged_(found, change)
            case ReceiptUpdated(message_id=mid, chat_id=chat_id):
                return ReceiptChanged(chat_id, mid, event.message_status or event.status)
            case Typing(chat_id=chat_id, user=user, typing=typing):
                return TypingChanged(chat_id, user, typing)
            case GroupChanged(notice=StoredMessage() as notice):
                # Kept in history (who and what): shown like a message, also after a restart.
                view = await asyncio.to_thread(self._view, notice)
                return NewMessage(view, await asyncio.to_thread(self._title, notice.chat_id))
            case GroupChanged(group_id=gid):
                # Stored already (delivered again): only the chat's row may need a refresh.
                return ChatUpdated(group_chat_id(gid), "")
            case IdentityChanged(user=user, held=held, first_use=first_use):
                return KeyChanged(user, direct_chat_id(user), held, first_use)
            case ConnectionStateChanged(state=state, retry_in=retry_in):
                if state == "closed":
                    return ConnectionChanged(state, 0, None)
                return ConnectionChanged(state, await self.queued_count(), retry_in)
            case (
                GapDetected(notice=StoredMessage() as notice)
                | DecryptionProblem(notice=StoredMessage() as notice)
            ):
                # Kept in history by the SDK: shown in place like a message, and
                # again whenever that part of the chat is loaded (also after a restart).
                return NewMessage(await asyncio.to_thread(self._view, notice))
            case GapDetected(chat_id=chat_id, user=user, missed=missed):
                plural = "s" if missed != 1 else ""
                return Notice(chat_id, f"{missed} message{plural} from {user} never arrived")
            case DecryptionProblem(user=user, explanation=explanation, group_id=gid):
                chat_id = group_chat_id(gid) if gid else direct_chat_id(user)
                return Notice(chat_id, f"a message from {user} could not be read: {explanation}")
        return None


def _plain_view(
    m: StoredMessage,
    reactions: tuple[tuple[str, str], ...],
    attachment: AttachmentInfo | None,
    quote_sender: str | None,
) -> MessageView:
    """The view of a stored message, given what history holds beside it (pure)."""
    return MessageView(
        id=m.id,
        chat_id=m.chat_id,
        sender=m.sender,
        outgoing=m.outgoing,
        kind=m.type,
        text=m.text,
        sent_at=m.sent_at,
        status=m.status,
        edited=m.edited,
        deleted=m.deleted,
        reply_to=m.reply_to,
        quote_text=m.quote_text,
        quote_sender=quote_sender,
        reactions=reactions,
        attachment=attachment,
        seq=m.seq,
        read=m.outgoing or m.read_at is not None,
    )


class Opener:
    """Creates or opens the account of one data directory (the first-run and unlock screens).

    Args:
        data_dir: the account's directory.
        now_ms: the clock given to the SDK.
        options: SDK tunables (tests shorten the reconnect delays).
        kdf_limits: passphrase KDF cost (tests pass a cheap one).
        strict_trust: new accounts hold sending to every new key until accepted.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
        kdf_limits: KdfLimits | None = None,
        strict_trust: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self._now_ms = now_ms
        self._options = options
        self._kdf_limits = kdf_limits
        self._strict = strict_trust

    def __repr__(self) -> str:
        return f"Opener({str(self.data_dir)!r})"

    def exists(self) -> bool:
        """True once an account was created here."""
        return account_exists(self.data_dir)

    async def create(
        self, username: str, relay_url: str, passphrase: str | None, invite: str | None = None
    ) -> Messenger:
        """First run: create and register the account.

        Raises:
            InviteNeeded: invite-only relay and no code, or a refused one.
            BackendError: bad name, name taken, relay unreachable.
        """
        return await Messenger.create(
            self.data_dir,
            username,
            relay_url,
            passphrase,
            now_ms=self._now_ms,
            options=self._options,
            kdf_limits=self._kdf_limits,
            strict_trust=self._strict,
            invite=invite,
        )

    async def open(self, passphrase: str | None) -> Messenger:
        """Open the account.

        Raises:
            PassphraseRequired: a (different) passphrase is needed.
            BackendError: the account cannot be opened.
        """
        return await Messenger.open(
            self.data_dir, passphrase, now_ms=self._now_ms, options=self._options
        )
